"""Pick the safer pipeline class that fits a base model, from the base's own ``model_index.json``.

::

    >>> from safer_diffusion.pipelines import load_safer_pipeline
    >>> pipe = load_safer_pipeline("CompVis/stable-diffusion-v1-4", safe_text_encoder="Adeely93/SafeR_CLIP")
    >>> pipe = load_safer_pipeline("stabilityai/stable-diffusion-xl-base-1.0", safe_text_encoder="exported/sdxl-pair")

The base's ``_class_name`` decides: ``StableDiffusionPipeline`` -> `SaferStableDiffusionPipeline`,
``StableDiffusionXLPipeline`` -> `SaferStableDiffusionXLPipeline` (and each one's own saves). The pipeline modules
are imported only when a class is picked (they import torch and diffusers).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from .hub import resolve_model_source

logger = logging.getLogger(__name__)

__all__ = ["SUPPORTED_PIPELINES", "is_sdxl_base", "load_safer_pipeline", "read_model_index", "safer_pipeline_class"]

_SD = ("safer_diffusion.pipeline_safer_stable_diffusion", "SaferStableDiffusionPipeline")
_SDXL = ("safer_diffusion.pipeline_safer_stable_diffusion_xl", "SaferStableDiffusionXLPipeline")
#: A base's ``model_index.json`` ``_class_name`` -> (module, class) of the safer pipeline that loads it.
SUPPORTED_PIPELINES: dict[str, tuple[str, str]] = {
    "StableDiffusionPipeline": _SD,
    "SaferStableDiffusionPipeline": _SD,
    "StableDiffusionXLPipeline": _SDXL,
    "SaferStableDiffusionXLPipeline": _SDXL,
}
MODEL_INDEX_FILE = "model_index.json"


def read_model_index(base: str | os.PathLike, argument: str = "base", *, revision: str | None = None,
                     token: str | bool | None = None, cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:  # fmt: skip
    """The ``model_index.json`` of a local pipeline folder, or of a hub id (one file, from the hub or its cache).

    Raises:
        TypeError / FileNotFoundError / HubUnavailableError: as :func:`~safer_diffusion.hub.resolve_model_source`.
        ValueError: the folder is not a diffusers pipeline (no ``model_index.json``), or the file is not valid JSON.
    """
    source = resolve_model_source(base, argument=argument, revision=revision, token=token)
    if Path(source).is_dir():
        path = Path(source) / MODEL_INDEX_FILE
        if not path.is_file():
            raise ValueError(
                f"`{argument}`={os.fspath(base)!r} is a folder without {MODEL_INDEX_FILE}, so not a diffusers pipeline; "
                "pass a Stable Diffusion (1.x/2.x) or SDXL pipeline folder (one saved with `save_pretrained`), or a hub id."
            )
    elif Path(source).is_file():
        raise ValueError(f"`{argument}`={os.fspath(base)!r} is a file; pass a diffusers pipeline folder or a hub id.")
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            path = Path(hf_hub_download(source, MODEL_INDEX_FILE, revision=revision, token=token, cache_dir=cache_dir))
        except EntryNotFoundError:
            raise ValueError(f"`{argument}`={source!r} has no {MODEL_INDEX_FILE} on the hub, so it is not a diffusers "
                             "pipeline; pass a Stable Diffusion (1.x/2.x) or SDXL pipeline.") from None  # fmt: skip
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"`{argument}`: {os.fspath(path)!r} is not valid JSON ({e}); re-save the pipeline.") from None
    if not isinstance(data, dict):
        raise ValueError(f"`{argument}`: {os.fspath(path)!r} must hold a JSON object, got {type(data).__name__}.")
    return data


def _pipeline_entry(base: str | os.PathLike, argument: str, **hub_kwargs) -> tuple[str, str]:
    """``(module, class)`` of the safer pipeline for ``base`` (from its ``model_index.json``; nothing imported)."""
    class_name = read_model_index(base, argument, **hub_kwargs).get("_class_name")
    if class_name not in SUPPORTED_PIPELINES:
        supported = sorted({name for name in SUPPORTED_PIPELINES if not name.startswith("Safer")})
        raise ValueError(
            f"`{argument}`={os.fspath(base)!r} is a {class_name!r} pipeline (model_index.json `_class_name`); safer-diffusion "
            f"supports {supported} bases (and the folders its own pipelines save). Pass a text-to-image Stable "
            "Diffusion 1.x/2.x or SDXL base."
        )
    return SUPPORTED_PIPELINES[class_name]


def safer_pipeline_class(base: str | os.PathLike, argument: str = "base", **hub_kwargs):
    """The safer pipeline class for ``base``, chosen by its ``model_index.json`` ``_class_name``.

    Args:
        base: a local pipeline folder or a hub id.
        argument: the user-facing name of ``base`` in error messages (``"base"`` for ``--base``).
        hub_kwargs: ``revision``, ``token``, ``cache_dir`` for a hub id.

    Raises:
        ValueError: an unsupported pipeline class (the message lists the supported ones), or not a pipeline.
    """
    module, name = _pipeline_entry(base, argument, **hub_kwargs)
    return getattr(importlib.import_module(module), name)


def is_sdxl_base(base: str | os.PathLike, argument: str = "base", **hub_kwargs) -> bool:
    """Whether ``base`` loads as `SaferStableDiffusionXLPipeline` (two text encoders) rather than
    `SaferStableDiffusionPipeline`: read from its ``model_index.json`` alone, before anything heavy is imported or
    loaded, so that a caller can check the encoder options that fit it. Raises as :func:`safer_pipeline_class`."""
    return _pipeline_entry(base, argument, **hub_kwargs) == _SDXL


def load_safer_pipeline(base: str | os.PathLike, *, argument: str = "base", **kwargs):
    """Load ``base`` with the safer pipeline class its ``model_index.json`` names (see :func:`safer_pipeline_class`).

    ``**kwargs`` go to that class's ``from_pretrained`` (``safe_text_encoder``, ``keep_original_text_encoder``,
    ``nsfw_scorer``, ``torch_dtype``, ...; for SDXL also ``safe_text_encoder_2``). ``revision``, ``token`` and
    ``cache_dir`` are also used to read the index of a hub id. ``argument`` names ``base`` in errors about it.

    Returns:
        `SaferStableDiffusionPipeline` or `SaferStableDiffusionXLPipeline`.

    Raises:
        ValueError: an unsupported base (the message lists the supported classes); ``safe_text_encoder_2`` for a
            base with one text encoder; and whatever the class's ``from_pretrained`` raises.
    """
    hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir") if k in kwargs}
    cls = safer_pipeline_class(base, argument, **hub_kwargs)
    if kwargs.get("safe_text_encoder_2") is not None and cls.__name__ != _SDXL[1]:
        raise ValueError(
            f"`safe_text_encoder_2` is for SDXL bases, but `{argument}`={os.fspath(base)!r} is a Stable Diffusion 1.x/2.x "
            "pipeline with one text encoder; pass only `safe_text_encoder`."
        )
    logger.info("Loading %s as %s.", os.fspath(base), cls.__name__)
    return cls.from_pretrained(base, **kwargs)
