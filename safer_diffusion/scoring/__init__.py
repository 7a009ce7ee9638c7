"""NSFW scorers: one protocol (``score(images) -> list[ScoreResult]``), several detectors.

>>> from safer_diffusion.scoring import get_scorer
>>> scorer = get_scorer("nudenet")                       # NudeNetScorer()
>>> results = scorer.score([image])                      # [ScoreResult(flagged=..., score=..., details=...)]
>>> i2p = get_scorer(["nudenet", "q16"], q16={"prompts": "q16_prompts.safetensors"})   # AnyOf

Heavy dependencies (onnxruntime, transformers) are imported only when a scorer is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import SAFETY_MODES, AnyOf, NSFWScorer, ScoreResult, check_images, to_rgb
from .nudenet_scorer import DEFAULT_CLASSES, NUDENET_LABELS, NudeNetScorer
from .q16 import Q16Scorer, load_prompt_embeddings
from .safety_checker import SafetyCheckerScorer

__all__ = [
    "DEFAULT_CLASSES",
    "NUDENET_LABELS",
    "SAFETY_MODES",
    "SCORERS",
    "AnyOf",
    "NSFWScorer",
    "NudeNetScorer",
    "Q16Scorer",
    "SafetyCheckerScorer",
    "ScoreResult",
    "check_images",
    "get_scorer",
    "load_prompt_embeddings",
    "scorer_config",
    "to_rgb",
]

#: Scorer names accepted by :func:`get_scorer`.
SCORERS: dict[str, type] = {"nudenet": NudeNetScorer, "q16": Q16Scorer, "safety_checker": SafetyCheckerScorer}


def get_scorer(name_or_obj: Any, **kwargs) -> NSFWScorer:
    """Build a scorer from a name, a list of names, a config dict, or pass a scorer object through.

    Args:
        name_or_obj:
            - ``"nudenet"``, ``"q16"`` or ``"safety_checker"``: that scorer, built with ``**kwargs``;
            - a list/tuple of those: an :class:`AnyOf`; options per member as ``kwargs[name] = {...}``;
            - a dict ``{"name": ..., **options}`` (the form saved in a pipeline's config; ``"any_of"`` takes
              ``"scorers": [dict, ...]``);
            - an object with ``score`` and ``name``: returned as is.

    Returns:
        A scorer following the :class:`NSFWScorer` protocol.
    """
    if isinstance(name_or_obj, str):
        key = name_or_obj.strip().lower().replace("-", "_")
        if key not in SCORERS:
            raise ValueError(
                f"Unknown scorer {name_or_obj!r}. Valid names: {sorted(SCORERS)} "
                "(or a list of them for any-of, or a scorer object)."
            )
        return SCORERS[key](**kwargs)
    if isinstance(name_or_obj, Mapping):
        spec = dict(name_or_obj)
        name = spec.pop("name", None)
        if name is None:
            raise ValueError(f"A scorer config dict needs a 'name' key, got keys {sorted(spec)}; e.g. {{'name': 'nudenet'}}.")
        if name == "any_of":
            return AnyOf([get_scorer(member) for member in spec.get("scorers", [])])
        spec = {k: v for k, v in spec.items() if v is not None}
        return get_scorer(name, **{**spec, **kwargs})
    if isinstance(name_or_obj, (list, tuple)):
        if not name_or_obj:
            raise ValueError(f"The scorer list is empty; pass some of {sorted(SCORERS)}.")
        unexpected = set(kwargs) - {n for n in name_or_obj if isinstance(n, str)}
        if unexpected:
            raise ValueError(
                f"With a list of scorers, options go per name (e.g. q16={{'prompts': ...}}); got unexpected {sorted(unexpected)}."
            )
        members = [get_scorer(n, **(kwargs.get(n) or {})) if isinstance(n, str) else get_scorer(n) for n in name_or_obj]
        return members[0] if len(members) == 1 else AnyOf(members)
    if name_or_obj is not None and hasattr(name_or_obj, "score") and hasattr(name_or_obj, "name"):
        if kwargs:
            raise ValueError(f"Options {sorted(kwargs)} cannot be applied to an already built scorer {name_or_obj!r}.")
        return name_or_obj
    raise ValueError(
        f"Cannot build a scorer from {name_or_obj!r} ({type(name_or_obj).__name__}). Valid names: {sorted(SCORERS)}, "
        "a list of them, a config dict with 'name', or an object with `name` and `score(images)`."
    )


def scorer_config(scorer: Any) -> dict | None:
    """The JSON-serialisable config that rebuilds ``scorer`` with :func:`get_scorer`, or None if it can't be saved."""
    if scorer is None:
        return None
    to_config = getattr(scorer, "to_config", None)
    return to_config() if callable(to_config) else None
