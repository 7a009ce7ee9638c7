"""safer-diffusion: SaFeR-CLIP safety-tuned text encoders for Stable Diffusion.

Importing this package has no side effects and imports no heavy library; the public names
below are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    # name -> module that defines it
    "SaferStableDiffusionPipeline": "safer_diffusion.pipeline_safer_stable_diffusion",
    "SaferStableDiffusionXLPipeline": "safer_diffusion.pipeline_safer_stable_diffusion_xl",
    "load_safer_pipeline": "safer_diffusion.pipelines",
    "SaferStableDiffusionPipelineOutput": "safer_diffusion.pipeline_output",
    "SaferComparisonOutput": "safer_diffusion.pipeline_output",
    "SaferStableDiffusionMultiCompareOutput": "safer_diffusion.pipeline_output",
    "load_safe_text_encoder": "safer_diffusion.encoders",
    "get_scorer": "safer_diffusion.scoring",
    "ScoreResult": "safer_diffusion.scoring",
    "NudeNetScorer": "safer_diffusion.scoring",
    "Q16Scorer": "safer_diffusion.scoring",
    "SafetyCheckerScorer": "safer_diffusion.scoring",
    "AnyOf": "safer_diffusion.scoring",
    "NSFWScorer": "safer_diffusion.scoring",
    "convert_open_clip_text": "safer_diffusion.open_clip_conversion",
    "resolve_model_source": "safer_diffusion.hub",
    "HubUnavailableError": "safer_diffusion.hub",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'safer_diffusion' has no attribute {name!r}")


def __dir__():
    return __all__


if TYPE_CHECKING:  # pragma: no cover
    from .encoders import load_safe_text_encoder  # noqa: F401
    from .hub import HubUnavailableError, resolve_model_source  # noqa: F401
    from .open_clip_conversion import convert_open_clip_text  # noqa: F401
    from .pipeline_output import (  # noqa: F401
        SaferComparisonOutput,
        SaferStableDiffusionMultiCompareOutput,
        SaferStableDiffusionPipelineOutput,
    )
    from .pipeline_safer_stable_diffusion import SaferStableDiffusionPipeline  # noqa: F401
    from .pipeline_safer_stable_diffusion_xl import SaferStableDiffusionXLPipeline  # noqa: F401
    from .pipelines import load_safer_pipeline  # noqa: F401
    from .scoring import AnyOf, NSFWScorer, NudeNetScorer, Q16Scorer, SafetyCheckerScorer, ScoreResult, get_scorer  # noqa: F401
