"""The models and the images: which pipeline and encoders to load, loading them, and generating one batch.

Each image's initial noise is drawn on the CPU from its own ``torch.Generator(seed)``, so the
images do not depend on ``--batch_size``, the device or the rank, and every variant of an image
starts from the same latents (and the same scheduler noise: each variant gets fresh generators of
the same seeds). torch and diffusers are imported inside the functions, so importing this module
stays light.

Variants: ``original`` is the base model's own text encoder, ``safe`` is ``--safe_encoder``, any
other ``--encoders`` item is loaded with :func:`~safer_diffusion.encoders.load_safe_text_encoder`.
:func:`generate_batch` generates ``original`` + ``safe`` of the pipeline in one UNet pass
(``pipe.compare``) and any other set of variants through one N-way ``pipe.compare(text_encoders=...)``
per batch (:func:`generate_variants`): one denoising loop for all of them, from the same latents and seeds.

The base picks the pipeline class (:func:`safer_diffusion.pipelines.load_safer_pipeline`, from its
``model_index.json``): Stable Diffusion 1.x/2.x or SDXL. An SDXL variant is a *pair* of text encoders
(``text_encoder`` + ``text_encoder_2``): ``safe`` is ``--safe_encoder`` as a two-encoder export
(docs/EXPORT_FORMAT.md section 8) or an SDXL pipeline folder, or ``--safe_encoder`` (ViT-L/14) with
``--safe_encoder_2`` (bigG); every other ``--encoders NAME=SOURCE`` item is a pair folder (a two-encoder export
or an SDXL pipeline folder), checked against the base from its config files before any model loads
(:func:`check_encoders_fit_base`) and loaded with the pipeline's ``load_text_encoder_pair``. All SDXL variants
share one denoising loop per batch, exactly as on SD 1.x/2.x. A pair is refused for an SD 1.x/2.x base.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..encoders import check_text_encoder_pair_configs, refuse_text_encoder_pair, require_text_encoder_pair
from ..hub import resolve_model_source
from ..options import DEFAULT_SAFE_ENCODER, BadInputError
from ..pipelines import SUPPORTED_PIPELINES, load_safer_pipeline, read_model_index, safer_pipeline_class
from ..registry import KNOWN_ENCODERS, ORIGINAL, SAFE, EncoderItem, encoder_width
from ..tiny import TINY_VARIANTS, tiny_pipeline_folders
from .config import TINY_PREFIX, EvaluateConfig, tiny_source
from .plan import WorkItem

logger = logging.getLogger(__name__)

__all__ = [
    "base_kind",
    "check_base_fits",
    "check_encoder_widths",
    "check_encoders_fit_base",
    "encoder_paths",
    "generate_batch",
    "generate_variants",
    "initial_latents",
    "is_sdxl_pipeline",
    "load_encoders",
    "load_pipeline",
    "model_sources",
    "open_pipeline",
    "resolve_encoder_item",
    "safe_encoder_2_source",
    "tiny_folders",
    "variant_encoders",
]

#: The SDXL pipeline class (module, name) of :data:`safer_diffusion.pipelines.SUPPORTED_PIPELINES`.
_SDXL = SUPPORTED_PIPELINES["StableDiffusionXLPipeline"]


def tiny_folders(source_id: str) -> tuple[Path, Path] | None:
    """``(base folder, safe encoder folder)`` of a recorded ``tiny:VARIANT`` model id (:func:`tiny_source`), else `None`."""
    if not isinstance(source_id, str) or not source_id.startswith(TINY_PREFIX):
        return None
    variant = source_id[len(TINY_PREFIX) :]
    if variant not in TINY_VARIANTS:
        raise BadInputError(f"the recorded model id {source_id!r} names no tiny model family ({', '.join(TINY_VARIANTS)}).")
    return tiny_pipeline_folders(variant=variant)


def base_kind(base: str, argument: str = "--base") -> tuple[bool, bool]:
    """``(is SDXL, saved by a safer pipeline)`` of a base pipeline, from its ``model_index.json`` (nothing is loaded).

    Raises:
        ValueError / FileNotFoundError / HubUnavailableError: not a pipeline, or one safer-diffusion does not support
            (the message lists the supported classes), as :func:`safer_diffusion.pipelines.safer_pipeline_class`.
    """
    name = read_model_index(base, argument).get("_class_name")
    if name not in SUPPORTED_PIPELINES:
        safer_pipeline_class(base, argument)  # raises, naming the class and the supported ones
    return SUPPORTED_PIPELINES[name] == _SDXL, str(name).startswith("Safer")


def check_base_fits(base: str, *, sdxl: bool, variants: Sequence[str], safe_encoder: str | None,
                    safe_path: str | None, safe_encoder_2: str | None, tiny: bool = False,
                    saved_pair: bool = False, base_path: str | None = None) -> None:  # fmt: skip
    """The text-encoder options must fit the base's pipeline class (checked before any model is loaded).

    An SD 1.x/2.x base takes no ``--safe_encoder_2``, and no pair of SDXL encoders as ``--safe_encoder``
    (:func:`~safer_diffusion.encoders.refuse_text_encoder_pair`). An SDXL base's safe variant needs both safe
    encoders: a two-encoder ``--safe_encoder`` folder (with ``base_path``, checked against the base's configs:
    :func:`~safer_diffusion.encoders.check_text_encoder_pair_configs`), or ``--safe_encoder`` with
    ``--safe_encoder_2``; the default ``--safe_encoder`` (SaFeR-CLIP, ViT-L/14 only) cannot be used, nor a known
    single encoder (``--encoders safer-clip``, ...). The other ``--encoders`` variants are checked by
    :func:`check_encoders_fit_base`.

    Args:
        base: ``--base`` as given (named in the errors).
        sdxl: the base is SDXL (:func:`base_kind`).
        variants: the variants to generate; safe_encoder: ``--safe_encoder`` as given (`None`: the default);
        safe_path: where it is (`None` when no variant uses it); safe_encoder_2: ``--safe_encoder_2`` as given.
        tiny: ``--tiny`` (its SDXL safe encoder is a two-encoder export).
        saved_pair: the base was saved by the safer SDXL pipeline, so it holds a safe pair of its own (``generate``).
        base_path: where the base is (a folder or hub id): with it, a safe pair folder is checked against the base's
            configs too.

    Raises:
        BadInputError / ValueError: naming the argument, the value and the fix.
    """
    if not sdxl:
        if safe_encoder_2 is not None:
            raise BadInputError(f"`--safe_encoder_2` is for SDXL bases (two text encoders), but `--base` {base!r} is a Stable "
                                "Diffusion 1.x/2.x pipeline with one; drop `--safe_encoder_2`.")  # fmt: skip
        if SAFE in variants and safe_path is not None:
            refuse_text_encoder_pair(safe_path, "--safe_encoder", base)
        return
    known = [v for v in variants if v in KNOWN_ENCODERS and v not in (ORIGINAL, SAFE)]
    if known:  # refused before their (single-encoder) repositories are downloaded
        raise BadInputError(
            f"`--encoders {known[0]}` is {KNOWN_ENCODERS[known[0]].description}: one text encoder, but `--base` {base!r} is SDXL, "
            "whose variants are pairs (text_encoder and text_encoder_2); pass NAME=FOLDER of a two-encoder export "
            "(docs/EXPORT_FORMAT.md section 8), or evaluate it on a Stable Diffusion 1.x base."
        )
    if SAFE not in variants or tiny or safe_encoder_2 is not None:
        return
    if safe_encoder is None and saved_pair:
        return
    if safe_encoder is None or safe_encoder == DEFAULT_SAFE_ENCODER:
        raise BadInputError(
            f"`--base` {base!r} is SDXL, which conditions on two text encoders (CLIP ViT-L/14 and OpenCLIP ViT-bigG/14), but "
            f"the default `--safe_encoder` {DEFAULT_SAFE_ENCODER} is a ViT-L/14 only and would leave the bigG path unsafe. "
            "Pass a two-encoder export folder (text_encoder/ and text_encoder_2/ with their manifest, docs/EXPORT_FORMAT.md "
            "section 8) or an SDXL pipeline folder holding the safe pair as `--safe_encoder DIR`, or the ViT-L/14 as "
            "`--safe_encoder` and the bigG as `--safe_encoder_2`."
        )
    source = safe_path or safe_encoder
    require_text_encoder_pair(source, argument="--safe_encoder", other="--safe_encoder_2")  # names --safe_encoder_2 as a fix
    if base_path is not None:
        check_text_encoder_pair_configs(source, base_path, argument="--safe_encoder")


def model_sources(config: EvaluateConfig) -> tuple[str, str | None, str, str | None]:
    """(base id for the settings, safe id for the settings, base path to load, safe path to load); the safe
    encoder's are `None` when no variant uses ``--safe_encoder``. The encoder options are checked against the
    base's pipeline class (:func:`check_base_fits`) before the safe encoder is looked up.

    Raises:
        FileNotFoundError / HubUnavailableError: ``--base`` or ``--safe_encoder`` cannot be loaded now.
        BadInputError / ValueError: the encoder options do not fit the base (SD or SDXL).
    """
    uses_safe = SAFE in config.variants
    if config.tiny:
        base, safe = tiny_pipeline_folders(variant=config.tiny_kind)
        source = tiny_source(config.tiny_kind)
        sdxl, _ = base_kind(str(base))
        check_base_fits(source, sdxl=sdxl, variants=config.variants, safe_encoder=None, safe_path=str(safe),
                        safe_encoder_2=None, tiny=True)  # fmt: skip
        return source, source if uses_safe else None, str(base), str(safe) if uses_safe else None
    base_path = resolve_model_source(config.base, argument="--base")
    sdxl, _ = base_kind(base_path)
    if sdxl and uses_safe and config.safe_encoder_2 is None and config.safe_encoder == DEFAULT_SAFE_ENCODER:
        check_base_fits(config.base, sdxl=sdxl, variants=config.variants, safe_encoder=config.safe_encoder,
                        safe_path=None, safe_encoder_2=None)  # raises before the default is looked up on the hub  # fmt: skip
    safe_path = resolve_model_source(config.safe_encoder, argument="--safe_encoder") if uses_safe else None
    check_base_fits(config.base, sdxl=sdxl, variants=config.variants, safe_encoder=config.safe_encoder, safe_path=safe_path,
                    safe_encoder_2=config.safe_encoder_2, base_path=base_path)  # fmt: skip
    return config.base, config.safe_encoder if uses_safe else None, base_path, safe_path


def safe_encoder_2_source(config: EvaluateConfig) -> str | None:
    """Where ``--safe_encoder_2`` is (`None` when not given).

    Raises:
        FileNotFoundError / HubUnavailableError: it cannot be loaded now.
    """
    if config.safe_encoder_2 is None:
        return None
    return resolve_model_source(config.safe_encoder_2, argument="--safe_encoder_2")


def _subfolder_path(item: EncoderItem, root: Path, argument: str) -> Path:
    path = root / item.subfolder
    if not path.is_dir():
        raise FileNotFoundError(f"`{argument}`: {item.source} has no subfolder {item.subfolder!r}; check the name on its model card.")
    return path


def resolve_encoder_item(item: EncoderItem, argument: str) -> str:
    """What to load for an ``--encoders`` item: a local path, or a hub id the loader downloads (a hub subfolder is
    downloaded here).

    Raises:
        FileNotFoundError / HubUnavailableError: the source (or its subfolder) cannot be loaded now.
    """
    resolved = resolve_model_source(item.source, argument=argument)
    if item.subfolder is None:
        return resolved
    local = Path(resolved)
    if not local.exists():  # a hub id the hub (or its cache) serves now: fetch only that subfolder
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(resolved, allow_patterns=[f"{item.subfolder}/*"]))
    return str(_subfolder_path(item, local, argument))


def encoder_paths(config: EvaluateConfig) -> dict[str, str | None]:
    """``{variant: what to load}`` for the variants that are not ``original``/``safe`` (:func:`resolve_encoder_item`).
    Checked now, before any model is loaded.

    Raises:
        FileNotFoundError / HubUnavailableError: a source (or its subfolder) cannot be loaded now.
    """
    return {item.name: resolve_encoder_item(item, f"--encoders {item.name}") for item in config.encoder_items
            if item.name not in (ORIGINAL, SAFE)}  # fmt: skip


def _base_width(base_path: str) -> int | None:
    config = Path(base_path) / "unet" / "config.json"
    try:
        return int(json.loads(config.read_text())["cross_attention_dim"]) if config.is_file() else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_encoders_fit_base(base_path: str, paths: dict[str, str | None], base: str | None = None) -> None:
    """The ``--encoders NAME=SOURCE`` variants (``paths``, :func:`encoder_paths`) must fit the base's pipeline class,
    checked from the config files before any model is loaded.

    SDXL base: every source holds a pair (a two-encoder export or an SDXL pipeline folder) that fits the base's pair
    and UNet (:func:`~safer_diffusion.encoders.check_text_encoder_pair_configs`: the missing encoder, swapped
    towers, widths, depths, projection, each named ``--encoders NAME/text_encoder`` or ``.../text_encoder_2``).
    SD 1.x/2.x base: no source is an SDXL pair (:func:`~safer_diffusion.encoders.refuse_text_encoder_pair`), and
    every local encoder's width is the UNet's (:func:`check_encoder_widths`).

    Args:
        base_path: where the base is; base: how it is shown (``--base`` as given; default ``base_path``).

    Raises:
        BadInputError / ValueError: naming the variant, the value and the fix.
    """
    sdxl, _ = base_kind(base_path)
    shown = base if base is not None else base_path
    for name, path in paths.items():
        if path is None:
            continue
        argument = f"--encoders {name}"
        if sdxl:
            check_text_encoder_pair_configs(path, base_path, argument=argument)
        else:
            refuse_text_encoder_pair(path, argument, shown)
    if not sdxl:
        check_encoder_widths(base_path, paths)


def check_encoder_widths(base_path: str, paths: dict[str, str | None]) -> None:
    """Every local encoder's width must be the base UNet's cross-attention width (read from the config files only;
    for an SD 1.x/2.x base: an SDXL base's variants are pairs, see :func:`check_encoders_fit_base`).

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


def load_pipeline(config: EvaluateConfig, base_path: str, safe_path: str | None, device: Any, dtype: Any,
                  safe_path_2: str | None = None) -> Any:  # fmt: skip
    """The pipeline of ``config``'s variants with no scorer inside (scoring runs on the worker thread); see
    :func:`open_pipeline`. ``safe_path_2`` is ``--safe_encoder_2`` (:func:`safe_encoder_2_source`)."""
    return open_pipeline(base_path, safe_path, config.variants, device, dtype, progress=config.progress, safe_path_2=safe_path_2)


def _own_text_encoders(base_path: str, sdxl: bool, dtype: Any) -> dict[str, Any]:
    """The base's own text encoder(s), as the components they are loaded into."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    own = {"text_encoder": CLIPTextModel.from_pretrained(base_path, subfolder="text_encoder", dtype=dtype).eval()}
    if sdxl:
        own["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(base_path, subfolder="text_encoder_2", dtype=dtype).eval()
    return own


def open_pipeline(base_path: str, safe_path: str | None, variants: Sequence[str], device: Any, dtype: Any, *, progress: bool = True,
                  safe_path_2: str | None = None) -> Any:  # fmt: skip
    """The safer pipeline of the base's class (SD 1.x/2.x or SDXL, :func:`safer_diffusion.pipelines.load_safer_pipeline`)
    with no scorer inside.

    Its ``text_encoder`` (and ``text_encoder_2``) are the safe encoder(s) when a variant uses them (``safe_path``, and
    ``safe_path_2`` for SDXL), else the base's own; its ``original_text_encoder`` (``_2``) are the base's own when the
    ``original`` variant is generated. ``progress=False`` also silences the libraries' loading bars.
    """
    import diffusers.utils.logging
    import transformers.utils.logging

    sdxl, _ = base_kind(base_path)
    kwargs: dict[str, Any] = {}
    if safe_path is None:  # no variant uses --safe_encoder: the base's own encoder(s) condition (and are `original`)
        own = _own_text_encoders(base_path, sdxl, dtype)
        kwargs.update(own)
        kwargs.update({f"original_{name}": encoder for name, encoder in own.items()})
    else:
        kwargs["safe_text_encoder"] = safe_path
        if safe_path_2 is not None:
            kwargs["safe_text_encoder_2"] = safe_path_2
    silenced = [m for m in (diffusers.utils.logging, transformers.utils.logging) if not progress and m.is_progress_bar_enabled()]
    for m in silenced:
        m.disable_progress_bar()
    try:
        pipe = load_safer_pipeline(
            base_path,
            argument="--base",
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


def is_sdxl_pipeline(pipe: Any) -> bool:
    """The pipeline conditions on a pair of text encoders (SDXL)."""
    return getattr(pipe, "text_encoder_2", None) is not None


def _sdxl_pairs(pipe: Any) -> dict[str, tuple[Any, Any]]:
    pairs = {SAFE: (pipe.text_encoder, pipe.text_encoder_2)}
    if getattr(pipe, "original_text_encoder", None) is not None and getattr(pipe, "original_text_encoder_2", None) is not None:
        pairs[ORIGINAL] = (pipe.original_text_encoder, pipe.original_text_encoder_2)
    return pairs


def load_encoders(config: EvaluateConfig, pipe: Any, paths: dict[str, str | None], base_path: str, device: Any, dtype: Any) -> dict[str, Any]:
    """``{variant: text encoder}`` of ``config``'s variants (:func:`variant_encoders`)."""
    return variant_encoders(pipe, config.variants, paths, base_path, device, dtype)


def variant_encoders(pipe: Any, variants: Sequence[str], paths: dict[str, str | None], base_path: str, device: Any,
                     dtype: Any) -> dict[str, Any]:  # fmt: skip
    """``{variant: text encoder}``: ``original`` and ``safe`` from the pipeline, the others loaded from ``paths``
    (checked against the pipeline's UNet width and tokenizer). For SDXL each value is the pair
    ``(text_encoder, text_encoder_2)``; the other variants' pairs are loaded with the pipeline's
    ``load_text_encoder_pair`` (checked against its pair, UNet and tokenizers; errors name ``--encoders NAME``).

    Raises:
        ValueError: an SDXL pipeline without the original pair asked for ``original``; a pair that does not fit.
    """
    from ..encoders import load_safe_text_encoder

    if is_sdxl_pipeline(pipe):
        pairs = _sdxl_pairs(pipe)
        missing = [v for v in variants if v in (ORIGINAL, SAFE) and v not in pairs]
        if missing:
            raise ValueError(f"the SDXL pipeline has no text-encoder pair for {missing} (it has {sorted(pairs)}); load it with "
                             "`keep_original_text_encoder=True` for original.")  # fmt: skip
        return {v: pairs[v] if v in (ORIGINAL, SAFE) else pipe.load_text_encoder_pair(paths[v], argument=f"--encoders {v}")
                for v in variants}  # fmt: skip
    out: dict[str, Any] = {}
    for name in variants:
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


def generate_variants(pipe: Any, items: Sequence[WorkItem], encoders: dict[str, Any], config: EvaluateConfig, device: Any,
                      dtype: Any) -> dict[str, list[Any]]:  # fmt: skip
    """Each variant's images of the items that still need it, from the same initial latents and seeds.

    Variants that need the same items go through one N-way ``pipe.compare(prompts, text_encoders=...)``:
    one denoising loop for all of them (each image equals a separate call with that encoder and seed).
    Returns ``{variant: [image or None per item]}`` (`None` where the item's row exists already).
    """
    first = items[0]
    groups: dict[tuple[int, ...], list[str]] = {}
    for variant in encoders:
        todo = tuple(i for i, it in enumerate(items) if variant in it.variants)
        if todo:
            groups.setdefault(todo, []).append(variant)
    out: dict[str, list[Any]] = {}
    for todo, variants in groups.items():
        sub = [items[i] for i in todo]
        result = pipe.compare(
            [it.record.prompt for it in sub], text_encoders={v: encoders[v] for v in variants}, score=False,
            negative_prompt=[config.negative_prompt] * len(sub) if config.negative_prompt else None,
            height=first.height, width=first.width, num_inference_steps=config.num_inference_steps,
            guidance_scale=first.guidance_scale, latents=initial_latents(pipe, sub, dtype, device),
            generator=_generators(sub), output_type="pil",
        )  # fmt: skip
        for variant in variants:
            images: list[Any] = [None] * len(items)
            for i, image in zip(todo, result.images[variant]):
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
    sdxl = is_sdxl_pipeline(pipe)
    if encoders is None:
        if sdxl:
            encoders = variant_encoders(pipe, config.variants, {}, "", device, dtype)
        else:
            encoders = {v: (pipe.original_text_encoder if v == ORIGINAL else pipe.text_encoder) for v in config.variants}
    first = items[0]
    if sdxl:
        pairs = _sdxl_pairs(pipe)
        one_pass = (set(encoders) == {ORIGINAL, SAFE} and ORIGINAL in pairs
                    and all(all(a is b for a, b in zip(encoders[v], pairs[v])) for v in (ORIGINAL, SAFE))
                    and pairs[ORIGINAL][0] is not pairs[SAFE][0])  # fmt: skip
    else:
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
