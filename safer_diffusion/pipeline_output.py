"""Output dataclasses of :class:`~safer_diffusion.SaferStableDiffusionPipeline` and of
:class:`~safer_diffusion.pipeline_safer_stable_diffusion_xl.SaferStableDiffusionXLPipeline` (the same classes for both)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput
from diffusers.utils import BaseOutput

__all__ = ["SaferComparisonOutput", "SaferStableDiffusionMultiCompareOutput", "SaferStableDiffusionPipelineOutput"]


def _all_fields(output) -> tuple:
    # `BaseOutput.to_tuple` drops `None` fields, which shifts positions; keep every field, in order.
    return tuple(getattr(output, f.name) for f in fields(output))


@dataclass
class SaferStableDiffusionPipelineOutput(StableDiffusionPipelineOutput):
    """Output of :meth:`SaferStableDiffusionPipeline.__call__` (and of the SDXL pipeline's).

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            The generated images (after ``safety_mode`` was applied to flagged ones).
        nsfw_content_detected (`list[bool]` or `None`):
            Per image: flagged by the pipeline's NSFW scorer. `None` when nothing scored the images
            (no scorer, or ``output_type="latent"``).
        nsfw_scores (`list[dict[str, float]]` or `None`):
            Per image: ``{scorer name: score, "scorer/detail": value, ...}`` (see
            :meth:`~safer_diffusion.scoring.ScoreResult.flat_scores`). `None` when not scored.
    """

    nsfw_scores: list[dict[str, float]] | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        """``(images, nsfw_content_detected, nsfw_scores)``, `None` entries included."""
        return _all_fields(self)


@dataclass
class SaferComparisonOutput(BaseOutput):
    """Output of ``compare()`` (either pipeline) without ``text_encoders``: the same seeds through the original and the
    safe encoder(s).

    Lists are aligned: entry ``i`` of every list is prompt ``i // num_images_per_prompt``, image
    ``i % num_images_per_prompt``, and ``original_images[i]`` / ``safe_images[i]`` started from
    the same initial latents.

    Args:
        original_images: images conditioned by the original text encoder.
        safe_images: images conditioned by the safe text encoder.
        original_nsfw_content_detected, safe_nsfw_content_detected (`list[bool]` or `None`): scorer flags.
        original_nsfw_scores, safe_nsfw_scores (`list[dict[str, float]]` or `None`): scorer numbers.
    """

    original_images: Any = None
    safe_images: Any = None
    original_nsfw_content_detected: list[bool] | None = None
    safe_nsfw_content_detected: list[bool] | None = None
    original_nsfw_scores: list[dict[str, float]] | None = None
    safe_nsfw_scores: list[dict[str, float]] | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        """All six fields in order, `None` entries included."""
        return _all_fields(self)


@dataclass
class SaferStableDiffusionMultiCompareOutput(BaseOutput):
    """Output of ``compare()`` (either pipeline) with ``text_encoders=``: the same seeds through N encoders (SDXL: N pairs).

    Every dict is keyed by the names of ``text_encoders``, in that order (``names``). Lists are aligned as in
    :class:`SaferComparisonOutput`: entry ``i`` of every list is prompt ``i // num_images_per_prompt``, image
    ``i % num_images_per_prompt``, and entry ``i`` of every name started from the same initial latents.

    Args:
        names (`list[str]`): the encoder names, in the order they were given.
        images (`dict[str, list[PIL.Image.Image] | np.ndarray | torch.Tensor]`): the images per name.
        nsfw_content_detected (`dict[str, list[bool] | None]`): scorer flags per name (`None` when not scored).
        nsfw_scores (`dict[str, list[dict[str, float]] | None]`): scorer numbers per name (`None` when not scored).
    """

    names: list[str] = None
    images: dict[str, Any] = None
    nsfw_content_detected: dict[str, list[bool] | None] = None
    nsfw_scores: dict[str, list[dict[str, float]] | None] = None

    def output(self, name: str) -> SaferStableDiffusionPipelineOutput:
        """The images, flags and scores of one encoder, as a single generation's output."""
        if name not in self.names:
            raise KeyError(f"No encoder named {name!r}; the names are {self.names}.")
        return SaferStableDiffusionPipelineOutput(
            images=self.images[name], nsfw_content_detected=self.nsfw_content_detected[name], nsfw_scores=self.nsfw_scores[name]
        )

    def to_tuple(self) -> tuple[Any, ...]:
        """All four fields in order, `None` entries included."""
        return _all_fields(self)
