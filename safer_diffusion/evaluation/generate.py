"""The models and the images: which pipeline and encoders to load, loading them, and generating one batch.

Each image's initial noise is drawn on the CPU from its own ``torch.Generator(seed)``, so the
images do not depend on ``--batch_size``, the device or the rank, and every variant of an image
starts from the same latents (and the same scheduler noise: each variant gets fresh generators of
the same seeds). torch and diffusers are imported inside the functions, so importing this module
stays light.

Variants: ``original`` is the base model's own text encoder, ``safe`` is ``--safe_encoder``, any
other ``--encoders`` item is loaded with :func:`~safer_diffusion.encoders.load_safe_text_encoder`.
:func:`generate_batch` generates ``original`` + ``safe`` in one UNet pass (``pipe.compare``) and any
other set of variants one variant at a time from the same latents and seeds
(:func:`generate_variants`), the one place an N-way ``compare`` will replace.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..hub import resolve_model_source
from ..options import BadInputError
from ..registry import ORIGINAL, SAFE, EncoderItem, encoder_width
from ..tiny import tiny_pipeline_folders
from .config import TINY_SOURCE, EvaluateConfig
from .plan import WorkItem

logger = logging.getLogger(__name__)

__all__ = [
    "check_encoder_widths",
    "encoder_paths",
    "generate_batch",
    "generate_variants",
    "initial_latents",
    "load_encoders",
    "load_pipeline",
    "model_sources",
]


def model_sources(config: EvaluateConfig) -> tuple[str, str | None, str, str | None]:
    """(base id for the settings, safe id for the settings, base path to load, safe path to load); the safe
    encoder's are `None` when no variant uses ``--safe_encoder``.

    Raises:
        FileNotFoundError / HubUnavailableError: ``--base`` or ``--safe_encoder`` cannot be loaded now.
    """
    uses_safe = SAFE in config.variants
    if config.tiny:
        base, safe = tiny_pipeline_folders()
        return TINY_SOURCE, TINY_SOURCE if uses_safe else None, str(base), str(safe) if uses_safe else None
    return (
        config.base,
        config.safe_encoder if uses_safe else None,
        resolve_model_source(config.base, argument="--base"),
        resolve_model_source(config.safe_encoder, argument="--safe_encoder") if uses_safe else None,
    )


def _subfolder_path(item: EncoderItem, root: Path, argument: str) -> Path:
    path = root / item.subfolder
    if not path.is_dir():
        raise FileNotFoundError(f"`{argument}`: {item.source} has no subfolder {item.subfolder!r}; check the name on its model card.")
    return path


def encoder_paths(config: EvaluateConfig) -> dict[str, str | None]:
    """``{variant: what to load}`` for the variants that are not ``original``/``safe``: a local path, or a hub id the
    loader downloads (a hub subfolder is downloaded here). Checked now, before any model is loaded.

    Raises:
        FileNotFoundError / HubUnavailableError: a source (or its subfolder) cannot be loaded now.
    """
    out: dict[str, str | None] = {}
    for item in config.encoder_items:
        if item.name in (ORIGINAL, SAFE):
            continue
        argument = f"--encoders {item.name}"
        resolved = resolve_model_source(item.source, argument=argument)
        if item.subfolder is None:
            out[item.name] = resolved
            continue
        local = Path(resolved)
        if not local.exists():  # a hub id the hub (or its cache) serves now: fetch only that subfolder
            from huggingface_hub import snapshot_download

            local = Path(snapshot_download(resolved, allow_patterns=[f"{item.subfolder}/*"]))
        out[item.name] = str(_subfolder_path(item, local, argument))
    return out


def _base_width(base_path: str) -> int | None:
    config = Path(base_path) / "unet" / "config.json"
    try:
        return int(json.loads(config.read_text())["cross_attention_dim"]) if config.is_file() else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_encoder_widths(base_path: str, paths: dict[str, str | None]) -> None:
    """Every local encoder's width must be the base UNet's cross-attention width (read from the config files only).

    Raises:
        BadInputError: naming the variant, both widths and the fix.
    """
    width = _base_width(base_path)
    if width is None:
        return
    for name, path in paths.items():
        if path is None or not Path(path).is_dir():
            continue
        got = encoder_width(path)
        if got is not None and int(got) != width:
            raise BadInputError(
                f"`--encoders` {name}: its text encoder has width (hidden_size) {got}, but the base's UNet expects {width} "
                "(cross_attention_dim); pass an encoder fine-tuned from the base's own text encoder (768 for SD 1.x, 1024 for SD 2.x)."
            )


def load_pipeline(config: EvaluateConfig, base_path: str, safe_path: str | None, device: Any, dtype: Any) -> Any:
    """The pipeline with no scorer inside (scoring runs on the worker thread).

    Its ``text_encoder`` is ``--safe_encoder`` when a variant uses it, else the base's own; its
    ``original_text_encoder`` is the base's own when the ``original`` variant is generated.
    """
    import diffusers.utils.logging
    import transformers.utils.logging

    # imported here because the pipeline module imports diffusers (heavy), not to break a cycle
    from ..pipeline_safer_stable_diffusion import SaferStableDiffusionPipeline

    variants = config.variants
    kwargs: dict[str, Any] = {}
    if safe_path is None:  # no variant uses --safe_encoder: the base's own encoder conditions (and is `original`)
        from transformers import CLIPTextModel

        own = CLIPTextModel.from_pretrained(base_path, subfolder="text_encoder", dtype=dtype).eval()
        kwargs.update(text_encoder=own, original_text_encoder=own)
    else:
        kwargs["safe_text_encoder"] = safe_path
    # `--no_progress` also silences the libraries' loading bars (restored afterwards)
    silenced = [m for m in (diffusers.utils.logging, transformers.utils.logging) if not config.progress and m.is_progress_bar_enabled()]
    for m in silenced:
        m.disable_progress_bar()
    try:
        pipe = SaferStableDiffusionPipeline.from_pretrained(
            base_path,
            nsfw_scorer=None,
            safety_checker=None,  # scoring runs on the worker thread, never inside the pipeline
            requires_safety_checker=False,
            keep_original_text_encoder=ORIGINAL in variants,
            torch_dtype=dtype,
            **kwargs,
        )
    finally:
        for m in silenced:
            m.enable_progress_bar()
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_encoders(config: EvaluateConfig, pipe: Any, paths: dict[str, str | None], base_path: str, device: Any, dtype: Any) -> dict[str, Any]:
    """``{variant: text encoder}``: ``original`` and ``safe`` from the pipeline, the others loaded from ``paths``
    (checked against the pipeline's UNet width and tokenizer)."""
    from ..encoders import load_safe_text_encoder

    out: dict[str, Any] = {}
    for name in config.variants:
        if name == SAFE:
            out[name] = pipe.text_encoder
        elif name == ORIGINAL:
            encoder = getattr(pipe, "original_text_encoder", None)
            if encoder is None:  # a pipeline passed in without it
                encoder = load_safe_text_encoder(base_path, torch_dtype=dtype, argument="--base").to(device)
            out[name] = encoder
        else:
            out[name] = load_safe_text_encoder(paths[name], torch_dtype=dtype, cross_attention_dim=pipe.unet.config.cross_attention_dim,
                                               tokenizer=pipe.tokenizer, argument=f"--encoders {name}").to(device)  # fmt: skip
    return out


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


def _generators(items: Sequence[WorkItem]) -> list[Any]:
    """Fresh CPU generators of the items' seeds (the scheduler's noise of stochastic samplers; every variant gets its own)."""
    import torch

    return [torch.Generator("cpu").manual_seed(it.seed) for it in items]


@contextlib.contextmanager
def _conditioned_by(pipe: Any, encoder: Any):
    """Make ``encoder`` the pipeline's ``text_encoder`` for the block (without touching its config)."""
    saved = pipe.__dict__["text_encoder"]
    pipe.__dict__["text_encoder"] = encoder
    try:
        yield
    finally:
        pipe.__dict__["text_encoder"] = saved


def generate_variants(pipe: Any, items: Sequence[WorkItem], encoders: dict[str, Any], config: EvaluateConfig, device: Any,
                      dtype: Any) -> dict[str, list[Any]]:  # fmt: skip
    """Each variant's images of the items that still need it, from the same initial latents and seeds.

    One pipeline call per variant, conditioned on that variant's prompt embeddings. Returns
    ``{variant: [image or None per item]}`` (`None` where the item's row exists already). This is
    the function an N-way ``pipe.compare(prompt, text_encoders=...)`` (one denoising loop) replaces.
    """
    first = items[0]
    out: dict[str, list[Any]] = {}
    for variant, encoder in encoders.items():
        todo = [i for i, it in enumerate(items) if variant in it.variants]
        if not todo:
            continue
        sub = [items[i] for i in todo]
        prompts = [it.record.prompt for it in sub]
        cfg = first.guidance_scale > 1.0
        with _conditioned_by(pipe, encoder):
            cond, uncond = pipe.encode_prompt(prompts, device, 1, cfg, [config.negative_prompt] * len(sub) if config.negative_prompt else None)
        result = pipe(
            prompt_embeds=cond, negative_prompt_embeds=uncond, height=first.height, width=first.width,
            num_inference_steps=config.num_inference_steps, guidance_scale=first.guidance_scale,
            latents=initial_latents(pipe, sub, dtype, device), generator=_generators(sub), output_type="pil",
        )  # fmt: skip
        images: list[Any] = [None] * len(items)
        for i, image in zip(todo, result.images):
            images[i] = image
        out[variant] = images
    return out


def generate_batch(pipe: Any, items: Sequence[WorkItem], config: EvaluateConfig, device: Any, dtype: Any,
                   encoders: dict[str, Any] | None = None) -> dict[str, list[Any]]:  # fmt: skip
    """Generate one batch (items share guidance and size); returns ``{variant: [PIL image (or None) per item]}``.

    ``encoders`` (:func:`load_encoders`; default: the pipeline's own for ``original``/``safe``) are
    the variants' text encoders. ``original`` + ``safe`` of the pipeline run through one UNet pass
    (``pipe.compare``); any other set through :func:`generate_variants`.
    """
    if encoders is None:
        encoders = {v: (pipe.original_text_encoder if v == ORIGINAL else pipe.text_encoder) for v in config.variants}
    first = items[0]
    one_pass = (set(encoders) == {ORIGINAL, SAFE} and encoders[ORIGINAL] is pipe.original_text_encoder
                and encoders[SAFE] is pipe.text_encoder and encoders[ORIGINAL] is not encoders[SAFE])  # fmt: skip
    if not one_pass:
        return generate_variants(pipe, items, encoders, config, device, dtype)
    kwargs = dict(
        height=first.height,
        width=first.width,
        num_inference_steps=config.num_inference_steps,
        guidance_scale=first.guidance_scale,
        negative_prompt=[config.negative_prompt] * len(items) if config.negative_prompt else None,
        latents=initial_latents(pipe, items, dtype, device),
        generator=_generators(items),
        output_type="pil",
    )
    out = pipe.compare([it.record.prompt for it in items], score=False, **kwargs)
    return {ORIGINAL: list(out.original_images), SAFE: list(out.safe_images)}
