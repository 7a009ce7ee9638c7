"""The models and the images: which pipeline to load, loading it, and generating one batch.

Each image's initial noise is drawn on the CPU from its own ``torch.Generator(seed)``, so the
images do not depend on ``--batch_size``, the device or the rank. torch and diffusers are imported
inside the functions, so importing this module stays light.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..hub import resolve_model_source
from ..tiny import tiny_pipeline_folders
from .config import TINY_SOURCE, EvaluateConfig
from .plan import WorkItem

__all__ = ["generate_batch", "initial_latents", "load_pipeline", "model_sources"]


def model_sources(config: EvaluateConfig) -> tuple[str, str, str, str]:
    """(base id for the settings, safe id for the settings, base path to load, safe path to load).

    Raises:
        FileNotFoundError / HubUnavailableError: ``--base`` or ``--safe_encoder`` cannot be loaded now.
    """
    if config.tiny:
        base, safe = tiny_pipeline_folders()
        return TINY_SOURCE, TINY_SOURCE, str(base), str(safe)
    return (
        config.base,
        config.safe_encoder,
        resolve_model_source(config.base, argument="--base"),
        resolve_model_source(config.safe_encoder, argument="--safe_encoder"),
    )


def load_pipeline(config: EvaluateConfig, base_path: str, safe_path: str, device: Any, dtype: Any) -> Any:
    """The pipeline with no scorer inside (scoring runs on the worker thread)."""
    import diffusers.utils.logging
    import transformers.utils.logging

    # imported here because the pipeline module imports diffusers (heavy), not to break a cycle
    from ..pipeline_safer_stable_diffusion import SaferStableDiffusionPipeline

    # `--no_progress` also silences the libraries' loading bars (restored afterwards)
    silenced = [m for m in (diffusers.utils.logging, transformers.utils.logging) if not config.progress and m.is_progress_bar_enabled()]
    for m in silenced:
        m.disable_progress_bar()
    try:
        pipe = SaferStableDiffusionPipeline.from_pretrained(
            base_path,
            safe_text_encoder=safe_path,
            nsfw_scorer=None,
            safety_checker=None,  # scoring runs on the worker thread, never inside the pipeline
            requires_safety_checker=False,
            keep_original_text_encoder=config.compare_original,
            torch_dtype=dtype,
        )
    finally:
        for m in silenced:
            m.enable_progress_bar()
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def initial_latents(pipe: Any, items: Sequence[WorkItem], dtype: Any, device: Any) -> Any:
    """Initial noise of each item from its own CPU ``torch.Generator(seed)``: independent of batching and device."""
    import torch

    channels = pipe.unet.config.in_channels
    scale = pipe.vae_scale_factor
    noise = [
        torch.randn((channels, it.height // scale, it.width // scale), generator=torch.Generator("cpu").manual_seed(it.seed),
                    dtype=torch.float32)  # fmt: skip
        for it in items
    ]
    return torch.stack(noise).to(device=device, dtype=dtype)


def generate_batch(pipe: Any, items: Sequence[WorkItem], config: EvaluateConfig, device: Any, dtype: Any) -> dict[str, list[Any]]:
    """Generate one batch (items share guidance and size); returns ``{variant: [PIL image per item]}``."""
    first = items[0]
    kwargs = dict(
        height=first.height,
        width=first.width,
        num_inference_steps=config.num_inference_steps,
        guidance_scale=first.guidance_scale,
        negative_prompt=[config.negative_prompt] * len(items) if config.negative_prompt else None,
        latents=initial_latents(pipe, items, dtype, device),
        output_type="pil",
    )
    prompts = [it.record.prompt for it in items]
    if config.compare_original:
        out = pipe.compare(prompts, score=False, **kwargs)
        return {"original": list(out.original_images), "safe": list(out.safe_images)}
    out = pipe(prompts, **kwargs)
    return {"safe": list(out.images)}
