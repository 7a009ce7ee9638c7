"""Loading a safe (SaFeR-CLIP) text encoder for Stable Diffusion from any of the usual layouts.

:func:`load_safe_text_encoder` accepts

* a folder exported by ``python -m finetune.export`` (the layout :mod:`safer_diffusion.export_format` owns),
* a full ``CLIPModel`` checkpoint folder (the text tower is taken, the vision tower ignored),
* a ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` folder,
* a diffusers pipeline folder (its ``text_encoder/`` is taken),
* an open_clip text tower: a ``.safetensors`` state dict, a folder holding
  ``open_clip_model.safetensors`` / ``open_clip_pytorch_model.safetensors``, or an ``open_clip``
  model object; converted to transformers with
  :func:`~safer_diffusion.open_clip_conversion.convert_open_clip_text` (which, unlike diffusers'
  ``convert_open_clip_checkpoint``, keeps ``text_projection``),
* a hub id of any of those, or an already loaded module.

Weights are read from safetensors only; pickle checkpoints (``.bin``, ``.pt``, ``.ckpt``) are refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from .export_format import (
    CLIP_DIR,
    MANIFEST_FILE,
    TEXT_ENCODER_DIR,
    TEXT_PROJECTION_FILE,
    is_export_folder,
    read_manifest,
)
from .open_clip_conversion import convert_open_clip_text, find_open_clip_prefix

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SAFE_TEXT_ENCODER",
    "TORCH_DTYPE_NAMES",
    "as_torch_dtype",
    "check_text_encoder",
    "convert_open_clip_text",
    "load_safe_text_encoder",
    "load_safetensors",
    "text_transformer",
    "truncate_layers",
]

#: The paper's released SaFeR-CLIP weights (ViT-L/14, for Stable Diffusion 1.x).
DEFAULT_SAFE_TEXT_ENCODER = "Adeely93/SafeR_CLIP"

_OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
#: Dtypes the Python API also accepts by name (``torch_dtype="float16"``): torch's names, as ``--dtype`` uses.
TORCH_DTYPE_NAMES = ("float32", "float16", "bfloat16")
_LAYOUTS = (
    f"a finetune export folder ({MANIFEST_FILE}), a CLIPModel or CLIPTextModel folder (config.json + model.safetensors), "
    "a diffusers pipeline folder (text_encoder/), an open_clip .safetensors state dict or folder "
    f"({' / '.join(_OPEN_CLIP_FILES)}), a hub id of one of these, or a loaded module"
)


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load report while loading a text tower out of a full CLIPModel (vision keys are expected)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def as_torch_dtype(value: Any, argument: str = "torch_dtype"):
    """``None``, a `torch.dtype`, or one of :data:`TORCH_DTYPE_NAMES` (read as that dtype); anything else is refused.

    Raises:
        ValueError: an unknown name (``"fp16"``, ``"auto"``); TypeError: neither a dtype nor a string.
    """
    import torch

    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value in TORCH_DTYPE_NAMES:
        return getattr(torch, value)
    raise (ValueError if isinstance(value, str) else TypeError)(
        f"`{argument}` must be a torch.dtype (e.g. torch.float16) or one of {list(TORCH_DTYPE_NAMES)}, got {value!r}."
    )


def load_safetensors(path: str | os.PathLike, argument: str = "source") -> dict:
    """Read a safetensors file into a dict of CPU tensors, with a clear error for corrupt or truncated files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(os.fspath(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(
            f"`{argument}`: cannot read safetensors file {os.fspath(path)!r} ({e}). The file is corrupt or truncated; "
            "re-download or re-export it."
        ) from e


def text_transformer(encoder):
    """The module holding ``embeddings``/``encoder``/``final_layer_norm`` (``encoder.text_model`` when it exists).

    transformers 5 flattened ``CLIPTextModel`` (no ``text_model`` child) but kept it in
    ``CLIPTextModelWithProjection``; this works with both.
    """
    return getattr(encoder, "text_model", encoder)


def truncate_layers(encoder, num_hidden_layers: int):
    """Keep the first ``num_hidden_layers`` transformer layers (SD 2.x uses OpenCLIP's penultimate layer).

    The final layer norm is kept, as Stable Diffusion 2 applies it after the penultimate layer.
    """
    tower = text_transformer(encoder)
    n = len(tower.encoder.layers)
    if num_hidden_layers > n or num_hidden_layers < 1:
        raise ValueError(f"`num_hidden_layers`={num_hidden_layers} must be between 1 and the encoder's {n} layers.")
    if num_hidden_layers < n:
        tower.encoder.layers = tower.encoder.layers[:num_hidden_layers]
        encoder.config.num_hidden_layers = num_hidden_layers
        if hasattr(tower, "config") and tower.config is not encoder.config:
            tower.config.num_hidden_layers = num_hidden_layers
    return encoder


def _to_text_model(encoder):
    """A ``CLIPTextModel`` sharing the weights of a ``CLIPTextModelWithProjection`` (Stable Diffusion needs hidden states)."""
    from transformers import CLIPTextModel

    model = CLIPTextModel(encoder.config)
    text_transformer(model).load_state_dict(text_transformer(encoder).state_dict(), strict=True)
    return model.to(next(encoder.parameters()).dtype).eval()


def _from_module(module, with_projection: bool, hidden_act, num_attention_heads):
    from transformers import CLIPModel, CLIPTextModel, CLIPTextModelWithProjection

    if isinstance(module, CLIPTextModelWithProjection):
        return module if with_projection else _to_text_model(module)
    if isinstance(module, CLIPTextModel):
        if with_projection:
            raise ValueError("`with_projection=True` needs a text projection, but a bare CLIPTextModel was given.")
        return module
    if isinstance(module, CLIPModel):
        out = CLIPTextModelWithProjection(module.config.text_config)
        text_transformer(out).load_state_dict(module.text_model.state_dict(), strict=True)
        out.text_projection.load_state_dict(module.text_projection.state_dict())
        out = out.to(module.dtype).eval()
        return out if with_projection else _to_text_model(out)
    if hasattr(module, "token_embedding") or hasattr(getattr(module, "text", None), "token_embedding"):
        out = convert_open_clip_text(module, hidden_act=hidden_act, num_attention_heads=num_attention_heads)
        return out if with_projection else _to_text_model(out)
    if hasattr(module, "config") and hasattr(module.config, "hidden_size"):
        if with_projection:
            raise ValueError(f"`with_projection=True` is not supported for a {type(module).__name__}.")
        logger.warning("Using a %s as the safe text encoder as is; it must behave like CLIPTextModel.", type(module).__name__)
        return module
    raise TypeError(f"`source` is a {type(module).__name__}, which is not a CLIP text encoder. Accepted: {_LAYOUTS}.")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"Cannot read {os.fspath(path)!r}: {e}. Re-create the folder.") from e


def _hf_load(cls, folder: Path, argument: str, torch_dtype, quiet: bool = False):
    from safetensors import SafetensorError

    has_weights = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    if not has_weights:
        pickles = [p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES]
        hint = f" (found pickle files {pickles}; convert them to safetensors)" if pickles else ""
        raise FileNotFoundError(f"`{argument}`: {os.fspath(folder)!r} has a config.json but no model.safetensors{hint}.")
    try:
        with _quiet_transformers() if quiet else contextlib.nullcontext():
            return cls.from_pretrained(os.fspath(folder), dtype=torch_dtype, use_safetensors=True).eval()
    except SafetensorError as e:
        raise ValueError(
            f"`{argument}`: cannot read the safetensors weights in {os.fspath(folder)!r} ({e}). The file is corrupt or "
            "truncated; re-download or re-export it."
        ) from e


def _load_folder(folder: Path, argument: str, torch_dtype, with_projection: bool, hidden_act, num_attention_heads):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if is_export_folder(folder):
        read_manifest(folder, argument=argument)  # format, version and required keys
        encoder = _hf_load(CLIPTextModel, folder / TEXT_ENCODER_DIR, argument, torch_dtype)
        if not with_projection:
            return encoder
        if (folder / TEXT_PROJECTION_FILE).is_file():
            weight = load_safetensors(folder / TEXT_PROJECTION_FILE, argument)["weight"]
            out = CLIPTextModelWithProjection(encoder.config.__class__(**{**encoder.config.to_dict(), "projection_dim": weight.shape[0]}))
            text_transformer(out).load_state_dict(text_transformer(encoder).state_dict())
            out.text_projection.weight.data.copy_(weight)
            return out.to(encoder.dtype).eval()
        if (folder / CLIP_DIR / "config.json").is_file():
            return _hf_load(CLIPTextModelWithProjection, folder / CLIP_DIR, argument, torch_dtype, quiet=True)
        raise ValueError(f"`{argument}`: export {os.fspath(folder)!r} has no {TEXT_PROJECTION_FILE} or {CLIP_DIR}/; "
                         "`with_projection=True` is not possible.")
    if (folder / "config.json").is_file():
        config = _read_json(folder / "config.json")
        model_type = config.get("model_type")
        if model_type == "clip":
            cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
            return _hf_load(cls, folder, argument, torch_dtype, quiet=True)
        if model_type == "clip_text_model":
            architectures = config.get("architectures") or []
            if with_projection and "CLIPTextModelWithProjection" not in architectures:
                raise ValueError(f"`{argument}`: {os.fspath(folder)!r} is a CLIPTextModel without projection.")
            cls = CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in architectures else CLIPTextModel
            encoder = _hf_load(cls, folder, argument, torch_dtype, quiet=True)
            return encoder if with_projection or cls is CLIPTextModel else _to_text_model(encoder)
        if model_type is not None and model_type != "clip":
            raise ValueError(f"`{argument}`: {os.fspath(folder)!r} holds a {model_type!r} model, not a CLIP text encoder. "
                             f"Accepted: {_LAYOUTS}.")
    if (folder / "model_index.json").is_file() and (folder / "text_encoder").is_dir():
        return _load_folder(folder / "text_encoder", argument, torch_dtype, with_projection, hidden_act, num_attention_heads)
    for name in _OPEN_CLIP_FILES:
        if (folder / name).is_file():
            return _load_open_clip_file(folder / name, argument, torch_dtype, with_projection, hidden_act, num_attention_heads)
    raise ValueError(f"`{argument}`={os.fspath(folder)!r} is a folder in no known layout. Accepted: {_LAYOUTS}.")


def _load_open_clip_file(path: Path, argument: str, torch_dtype, with_projection, hidden_act, num_attention_heads):
    state = load_safetensors(path, argument)
    if find_open_clip_prefix(state) is None:
        raise ValueError(f"`{argument}`: {os.fspath(path)!r} is not an open_clip text tower state dict. Accepted: {_LAYOUTS}.")
    encoder = convert_open_clip_text(state, hidden_act=hidden_act, num_attention_heads=num_attention_heads)
    if not with_projection:
        encoder = _to_text_model(encoder)
    return encoder.to(torch_dtype) if torch_dtype is not None else encoder


def _download(repo_id: str, with_projection: bool) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.txt", "model.safetensors", "model-*.safetensors", TEXT_PROJECTION_FILE,
                f"{TEXT_ENCODER_DIR}/*", *_OPEN_CLIP_FILES]
    if with_projection:
        patterns.append(f"{CLIP_DIR}/*")
    return Path(snapshot_download(repo_id, allow_patterns=patterns))


def load_safe_text_encoder(
    source: Any = DEFAULT_SAFE_TEXT_ENCODER,
    *,
    torch_dtype: Any = None,
    with_projection: bool = False,
    num_hidden_layers: int | None = None,
    cross_attention_dim: int | None = None,
    tokenizer: Any = None,
    hidden_act: str | None = None,
    num_attention_heads: int | None = None,
    argument: str = "safe_text_encoder",
):
    """Load a safe CLIP text encoder from a folder, a file, a hub id or a module.

    Args:
        source: see the module docstring for the accepted layouts. Defaults to the paper's
            released weights, :data:`DEFAULT_SAFE_TEXT_ENCODER`.
        torch_dtype (`torch.dtype` or its name, *optional*): dtype to load the weights in (see :func:`as_torch_dtype`).
        with_projection (`bool`, defaults to `False`): return a ``CLIPTextModelWithProjection``
            (hidden states + projected pooled embedding) instead of the ``CLIPTextModel`` that
            Stable Diffusion conditions on.
        num_hidden_layers (`int`, *optional*): keep only the first layers (e.g. 23 of OpenCLIP
            ViT-H's 24 for Stable Diffusion 2.x, which uses the penultimate layer).
        cross_attention_dim (`int`, *optional*): the UNet's cross-attention width; the encoder's
            width must equal it.
        tokenizer (*optional*): the pipeline's tokenizer; the encoder must cover its vocabulary and
            its ``model_max_length`` positions.
        hidden_act, num_attention_heads: for open_clip state dicts only, see :func:`convert_open_clip_text`.
        argument (`str`): the user-facing name of ``source`` in error messages.

    Returns:
        `transformers.CLIPTextModel` (or ``CLIPTextModelWithProjection``) in eval mode.
    """
    import torch

    torch_dtype = as_torch_dtype(torch_dtype, "torch_dtype")
    if isinstance(source, dict):
        encoder = convert_open_clip_text(source, hidden_act=hidden_act, num_attention_heads=num_attention_heads)
        encoder = encoder if with_projection else _to_text_model(encoder)
    elif isinstance(source, torch.nn.Module):
        encoder = _from_module(source, with_projection, hidden_act, num_attention_heads)
    elif isinstance(source, (str, os.PathLike)):
        from .hub import resolve_model_source

        resolved = resolve_model_source(source, argument=argument)
        path = Path(resolved)
        if not path.exists():  # a hub id the hub (or its cache) can serve now
            path = _download(resolved, with_projection)
        if path.is_file():
            if path.suffix.lower() in _PICKLE_SUFFIXES:
                raise ValueError(
                    f"`{argument}`={os.fspath(source)!r} is a pickle checkpoint; only safetensors weights are loaded (pickle "
                    "can run arbitrary code). Convert it once, e.g. `safetensors.torch.save_file(torch.load(path), 'x.safetensors')` "
                    "for a file you trust."
                )
            if path.suffix.lower() != ".safetensors":
                raise ValueError(f"`{argument}`={os.fspath(source)!r} is a file of unknown type {path.suffix!r}. Accepted: {_LAYOUTS}.")
            encoder = _load_open_clip_file(path, argument, torch_dtype, with_projection, hidden_act, num_attention_heads)
        else:
            encoder = _load_folder(path, argument, torch_dtype, with_projection, hidden_act, num_attention_heads)
    else:
        raise TypeError(f"`{argument}` must be a path, hub id, state dict or module, got {type(source).__name__}. Accepted: {_LAYOUTS}.")
    if torch_dtype is not None:
        encoder = encoder.to(torch_dtype)
    if num_hidden_layers is not None:
        truncate_layers(encoder, num_hidden_layers)
    check_text_encoder(encoder, cross_attention_dim=cross_attention_dim, tokenizer=tokenizer, argument=argument)
    return encoder.eval()


def check_text_encoder(encoder, cross_attention_dim: int | None = None, tokenizer: Any = None, argument: str = "safe_text_encoder"):
    """Raise a `ValueError` if ``encoder`` cannot condition a UNet of ``cross_attention_dim`` through ``tokenizer``."""
    config = getattr(encoder, "config", None)
    hidden = getattr(config, "hidden_size", None)
    if cross_attention_dim is not None and hidden is not None and int(hidden) != int(cross_attention_dim):
        raise ValueError(
            f"`{argument}` has width (hidden_size) {hidden}, but the UNet's cross_attention_dim is {cross_attention_dim}. "
            "Use a safe encoder fine-tuned from the base model's own text encoder (ViT-L/14, 768, for SD 1.x; "
            "OpenCLIP ViT-H/14, 1024, for SD 2.x)."
        )
    if tokenizer is not None and config is not None:
        positions = getattr(config, "max_position_embeddings", None)
        max_len = getattr(tokenizer, "model_max_length", None)
        if positions is not None and max_len is not None and max_len < 10**6 and int(positions) < int(max_len):
            raise ValueError(
                f"`{argument}` has {positions} position embeddings, but the tokenizer pads prompts to model_max_length={max_len}. "
                "Use an encoder with at least as many positions, or a tokenizer with a matching model_max_length."
            )
        vocab = getattr(config, "vocab_size", None)
        if vocab is not None and int(vocab) < len(tokenizer):
            raise ValueError(
                f"`{argument}` has a vocabulary of {vocab} tokens, but the tokenizer has {len(tokenizer)}. "
                "Use the tokenizer the encoder was trained with."
            )
