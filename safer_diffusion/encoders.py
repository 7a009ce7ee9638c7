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

For Stable Diffusion XL, which conditions on two text encoders, :func:`load_safe_text_encoder_pair` loads both from
one folder (a two-encoder export, docs/EXPORT_FORMAT.md section 8, or an SDXL pipeline folder),
:func:`load_safe_text_encoder_2` loads the second (OpenCLIP ViT-bigG/14 with projection) alone, and
:func:`check_sdxl_text_encoders` checks a pair against the UNet and the base model's own pair.

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
    SDXL_TEXT_ENCODERS,
    TEXT_ENCODER_2_DIR,
    TEXT_ENCODER_DIR,
    TEXT_PROJECTION_FILE,
    export_text_encoders,
    is_export_folder,
    read_manifest,
)
from .open_clip_conversion import convert_open_clip_text, find_open_clip_prefix

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SAFE_TEXT_ENCODER",
    "SDXL_TIME_IDS",
    "TORCH_DTYPE_NAMES",
    "as_torch_dtype",
    "check_sdxl_text_encoders",
    "check_text_encoder",
    "check_text_encoder_pair_configs",
    "convert_open_clip_text",
    "load_safe_text_encoder",
    "load_safe_text_encoder_2",
    "load_safe_text_encoder_pair",
    "load_safetensors",
    "refuse_text_encoder_pair",
    "require_text_encoder_pair",
    "text_encoder_pair_folder",
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


def _download(repo_id: str, with_projection: bool, extra_patterns: tuple[str, ...] = ()) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.txt", "model.safetensors", "model-*.safetensors", TEXT_PROJECTION_FILE,
                f"{TEXT_ENCODER_DIR}/*", *_OPEN_CLIP_FILES, *extra_patterns]
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


# ---------------------------------------------------------------------------------------------- SDXL: two encoders
#: Time ids SDXL's text-to-image pipeline appends to the pooled text embedding (original size, crop corner, target
#: size: two numbers each); the UNet's add-embedding reads ``projection_dim + SDXL_TIME_IDS * addition_time_embed_dim``.
SDXL_TIME_IDS = 6
#: What each SDXL encoder is, for messages.
_SDXL_ROLES = {
    TEXT_ENCODER_DIR: "CLIP ViT-L/14, 768 wide in SDXL",
    TEXT_ENCODER_2_DIR: "OpenCLIP ViT-bigG/14 with projection, 1280 wide in SDXL",
}
_SWAP_HINT = (
    "`safe_text_encoder` takes SDXL's CLIP ViT-L/14 (768 wide, no projection needed) and `safe_text_encoder_2` its "
    "OpenCLIP ViT-bigG/14 (1280 wide, a CLIPTextModelWithProjection)"
)


def _source_folder(source: Any, argument: str) -> Path | None:
    """``source`` as a local folder when it names one (a hub id is fetched, both encoders' files included)."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    from .hub import resolve_model_source

    path = Path(resolve_model_source(source, argument=argument))
    if not path.exists():  # a hub id the hub (or its cache) can serve now
        path = _download(os.fspath(source), with_projection=False, extra_patterns=(f"{TEXT_ENCODER_2_DIR}/*",))
    return path if path.is_dir() else None


def _export_encoder_names(folder: Path, argument: str) -> tuple[str, ...]:
    """The encoder subfolders an export's manifest lists, each checked to exist."""
    names = export_text_encoders(read_manifest(folder, argument=argument), argument)
    for name in names:
        if not (folder / name / "config.json").is_file():
            raise ValueError(
                f"`{argument}`: export {os.fspath(folder)!r} lists {name!r} in its manifest's `text_encoders` but has no "
                f"{name}/config.json; the folder is incomplete: re-export it."
            )
    return names


def text_encoder_pair_folder(source: Any, argument: str = "safe_text_encoder") -> Path | None:
    """The local folder of ``source`` when it holds both SDXL text encoders, else `None`.

    Both are held by a two-encoder export (its manifest's ``text_encoders`` lists ``text_encoder`` and
    ``text_encoder_2``) and by a diffusers SDXL pipeline folder (``model_index.json``, ``text_encoder/``,
    ``text_encoder_2/``). Modules, state dicts, files and single-encoder folders give `None`.
    """
    folder = _source_folder(source, argument)
    if folder is None:
        return None
    if is_export_folder(folder):
        return folder if set(SDXL_TEXT_ENCODERS) <= set(_export_encoder_names(folder, argument)) else None
    if (folder / "model_index.json").is_file() and all((folder / n / "config.json").is_file() for n in SDXL_TEXT_ENCODERS):
        return folder
    return None


def require_text_encoder_pair(source: Any, argument: str = "safe_text_encoder", other: str | None = "safe_text_encoder_2") -> Path:
    """:func:`text_encoder_pair_folder`, or a `ValueError` naming the encoder ``source`` lacks and how to add it.

    ``other`` is the argument that takes the second encoder on its own, offered as a fix; `None` where there is none
    (an ``--encoders NAME=SOURCE`` item of an SDXL evaluation: each source must hold the pair).
    """
    folder = text_encoder_pair_folder(source, argument)
    if folder is not None:
        return folder
    shown = repr(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else f"a {type(source).__name__}"
    local = _source_folder(source, argument)
    names = _export_encoder_names(local, argument) if local is not None and is_export_folder(local) else None
    pair = f"an SDXL export holding both ({TEXT_ENCODER_DIR}/ and {TEXT_ENCODER_2_DIR}/, manifest `text_encoders` {list(SDXL_TEXT_ENCODERS)})"
    if names == (TEXT_ENCODER_2_DIR,):
        fix = f"Pass the ViT-L encoder as `{argument}` and this folder as `{other}`, or {pair}" if other else f"Pass {pair}"
        raise ValueError(
            f"`{argument}`={shown} is an export holding only {TEXT_ENCODER_2_DIR}/ ({_SDXL_ROLES[TEXT_ENCODER_2_DIR]}); "
            f"the safe {TEXT_ENCODER_DIR} ({_SDXL_ROLES[TEXT_ENCODER_DIR]}) is missing. {fix}."
        )
    if names is not None:
        raise ValueError(
            f"`{argument}`={shown} is a single-encoder export ({TEXT_ENCODER_DIR}/ only, as made for SD 1.x/2.x). An SDXL "
            f"base conditions on two text encoders, and this export lacks the safe {TEXT_ENCODER_2_DIR} "
            f"({_SDXL_ROLES[TEXT_ENCODER_2_DIR]}), so the bigG path would stay unsafe. Pass {pair}"
            + (f", or the missing encoder as `{other}=`." if other else ".")
        )
    raise ValueError(
        f"`{argument}`={shown} is one text encoder, but an SDXL base conditions on two: {TEXT_ENCODER_DIR} "
        f"({_SDXL_ROLES[TEXT_ENCODER_DIR]}) and {TEXT_ENCODER_2_DIR} ({_SDXL_ROLES[TEXT_ENCODER_2_DIR]}). The safe "
        f"{TEXT_ENCODER_2_DIR} is missing: pass {pair}" + (f", or the second encoder as `{other}=`." if other else ".")
    )


def refuse_text_encoder_pair(source: Any, argument: str, base: str, base_argument: str = "--base") -> None:
    """A Stable Diffusion 1.x/2.x base conditions on one text encoder: a local folder holding an SDXL *pair*
    (:func:`text_encoder_pair_folder`) is refused, since its ``text_encoder/`` would be taken silently and the bigG
    tower dropped. Hub ids and modules are not looked at (nothing is fetched here).

    Raises:
        ValueError: naming the argument, the folder, the base and the fix.
    """
    if not isinstance(source, (str, os.PathLike)) or not os.path.isdir(source) or text_encoder_pair_folder(source, argument) is None:
        return
    shown = os.fspath(source)
    raise ValueError(
        f"`{argument}`={shown!r} holds a pair of SDXL text encoders ({TEXT_ENCODER_DIR}/ and {TEXT_ENCODER_2_DIR}/), but "
        f"`{base_argument}` {base!r} is a Stable Diffusion 1.x/2.x pipeline, which conditions on one text encoder; pass an "
        f"SDXL `{base_argument}`, or a single encoder (only the pair's CLIP ViT-L/14 tower: "
        f"{os.path.join(shown, TEXT_ENCODER_DIR)!r})."
    )


def _config_stand_in(folder: Path, argument: str, second: bool) -> Any:
    """An encoder stand-in carrying ``folder/config.json`` (and a ``text_projection`` when the saved class has one), for
    :func:`check_sdxl_text_encoders` before any weight is loaded."""
    import types

    from transformers import CLIPTextConfig

    data = _read_json(folder / "config.json")
    architectures = data.get("architectures") or []
    projects = "CLIPTextModelWithProjection" in architectures or (second and data.get("model_type") != "clip_text_model")
    try:
        config = CLIPTextConfig.from_pretrained(os.fspath(folder))
    except (OSError, ValueError) as e:
        raise ValueError(f"`{argument}`: cannot read {os.fspath(folder / 'config.json')!r} as a CLIP text config ({e}).") from e
    return types.SimpleNamespace(config=config, **({"text_projection": None} if projects else {}))


def check_text_encoder_pair_configs(source: Any, base: str | os.PathLike, *, argument: str = "safe_text_encoder",
                                    hub_kwargs: dict | None = None) -> Path:  # fmt: skip
    """Check a pair folder (:func:`require_text_encoder_pair`) against an SDXL base from the config files alone.

    The checks of :func:`check_sdxl_text_encoders` (swapped towers, widths, depths, projections, the UNet's widths),
    run on stand-ins that carry each tower's ``config.json``: nothing is loaded, so a pair that cannot fit is
    refused before any model is.

    Args:
        source: the pair (a two-encoder export or an SDXL pipeline folder, or a hub id of either).
        base: the SDXL base pipeline (folder or hub id) whose ``text_encoder``, ``text_encoder_2`` and ``unet`` configs
            are the reference.
        argument: how ``source`` is named; the towers are named ``ARGUMENT/text_encoder`` and ``ARGUMENT/text_encoder_2``.
        hub_kwargs: keyword arguments for reading the base's configs from the hub (``revision``, ...).

    Returns:
        the local folder holding the pair.

    Raises:
        ValueError: naming the tower at fault (or the missing one), the values and the fix.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    folder = require_text_encoder_pair(source, argument=argument, other=None)
    hub_kwargs = hub_kwargs or {}
    reference = tuple(CLIPTextConfig.from_pretrained(os.fspath(base), subfolder=sub, **hub_kwargs)
                      for sub in (TEXT_ENCODER_DIR, TEXT_ENCODER_2_DIR))  # fmt: skip
    unet_config = dict(UNet2DConditionModel.load_config(os.fspath(base), subfolder="unet", **hub_kwargs))
    towers = (_config_stand_in(folder / TEXT_ENCODER_DIR, argument, second=False),
              _config_stand_in(folder / TEXT_ENCODER_2_DIR, argument, second=True))  # fmt: skip
    check_sdxl_text_encoders(*towers, unet_config, reference=reference,
                             arguments=(f"{argument}/{TEXT_ENCODER_DIR}", f"{argument}/{TEXT_ENCODER_2_DIR}"))  # fmt: skip
    return folder


def _no_projection_error(shown: str, argument: str) -> ValueError:
    return ValueError(
        f"`{argument}`={shown} is a CLIPTextModel without a text projection, but SDXL's text_encoder_2 is "
        "a CLIPTextModelWithProjection: its pooled, projected `text_embeds` condition the UNet's add-embedding. "
        f"If this is the ViT-L encoder, the two are swapped: {_SWAP_HINT}."
    )


def _check_projection_config(folder: Path, shown: str, argument: str) -> None:
    config = _read_json(folder / "config.json")
    if config.get("model_type") == "clip_text_model" and "CLIPTextModelWithProjection" not in (config.get("architectures") or []):
        raise _no_projection_error(shown, argument)


def load_safe_text_encoder_pair(source: Any, *, torch_dtype: Any = None, argument: str = "safe_text_encoder"):
    """Both SDXL text encoders from one folder (:func:`text_encoder_pair_folder`): a two-encoder export, an SDXL
    pipeline folder, or a hub id of either.

    Args:
        source: the folder or hub id.
        torch_dtype (`torch.dtype` or its name, *optional*): dtype to load the weights in (see :func:`as_torch_dtype`).
        argument (`str`): the user-facing name of ``source`` in error messages.

    Returns:
        ``(CLIPTextModel, CLIPTextModelWithProjection)`` in eval mode: ``text_encoder`` and ``text_encoder_2``.

    Raises:
        ValueError: ``source`` holds one encoder only (the message names the missing one), or ``text_encoder_2/``
            has no text projection.
    """
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch_dtype = as_torch_dtype(torch_dtype, "torch_dtype")
    folder = require_text_encoder_pair(source, argument)
    _check_projection_config(folder / TEXT_ENCODER_2_DIR, repr(os.fspath(folder / TEXT_ENCODER_2_DIR)), argument)
    first = _hf_load(CLIPTextModel, folder / TEXT_ENCODER_DIR, argument, torch_dtype, quiet=True)
    second = _hf_load(CLIPTextModelWithProjection, folder / TEXT_ENCODER_2_DIR, argument, torch_dtype)
    return first, second


def load_safe_text_encoder_2(
    source: Any,
    *,
    torch_dtype: Any = None,
    hidden_act: str | None = None,
    num_attention_heads: int | None = None,
    argument: str = "safe_text_encoder_2",
):
    """SDXL's second safe text encoder (OpenCLIP ViT-bigG/14) on its own, as a ``CLIPTextModelWithProjection``.

    ``source`` is anything :func:`load_safe_text_encoder` accepts with ``with_projection=True``; from a two-encoder
    export or an SDXL pipeline folder, its ``text_encoder_2/`` is taken.

    Raises:
        ValueError: a single-encoder export, or an encoder without text projection (both name the likely swap).
    """
    from transformers import CLIPTextModel

    shown = repr(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else f"a {type(source).__name__}"
    if isinstance(source, CLIPTextModel):
        raise _no_projection_error(shown, argument)
    folder = _source_folder(source, argument)
    if folder is not None:
        if is_export_folder(folder):
            if TEXT_ENCODER_2_DIR not in _export_encoder_names(folder, argument):
                raise ValueError(
                    f"`{argument}`={shown} is a single-encoder export ({TEXT_ENCODER_DIR}/ only) with no "
                    f"{TEXT_ENCODER_2_DIR}/; SDXL's text_encoder_2 is {_SDXL_ROLES[TEXT_ENCODER_2_DIR]}. If this is the "
                    f"ViT-L encoder, it belongs in `safe_text_encoder`: {_SWAP_HINT}."
                )
            folder = folder / TEXT_ENCODER_2_DIR
        elif (folder / "model_index.json").is_file() and (folder / TEXT_ENCODER_2_DIR / "config.json").is_file():
            folder = folder / TEXT_ENCODER_2_DIR
        if (folder / "config.json").is_file():
            _check_projection_config(folder, shown, argument)
        source = folder
    return load_safe_text_encoder(source, torch_dtype=torch_dtype, with_projection=True, hidden_act=hidden_act,
                                  num_attention_heads=num_attention_heads, argument=argument)  # fmt: skip


def _config_value(config: Any, key: str, default: Any = None) -> Any:
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def check_sdxl_text_encoders(
    text_encoder,
    text_encoder_2,
    unet_config: Any = None,
    tokenizer: Any = None,
    tokenizer_2: Any = None,
    reference: tuple[Any, Any] | None = None,
    arguments: tuple[str, str] = ("safe_text_encoder", "safe_text_encoder_2"),
) -> None:
    """Raise a `ValueError` (or `TypeError`) if the pair cannot condition an SDXL UNet, naming the encoder at fault.

    Checked, in this order: both given and CLIP-like; the pair against ``reference`` (the base model's own
    ``(text_encoder, text_encoder_2)``, modules or their configs): swapped towers, then each width, depth and the
    second's ``projection_dim``; ``text_encoder_2`` projects and ``text_encoder`` does not (the parent pipeline takes
    the pooled embedding from the first encoder that returns one); against ``unet_config`` (a config or dict): the
    widths sum to ``cross_attention_dim`` (the token states are concatenated) and ``projection_dim`` +
    :data:`SDXL_TIME_IDS` x ``addition_time_embed_dim`` equals ``projection_class_embeddings_input_dim``; each
    encoder covers its tokenizer's positions and vocabulary (:func:`check_text_encoder`).

    Args:
        arguments: the user-facing names of the two encoders in error messages.
    """
    names = dict(zip((TEXT_ENCODER_DIR, TEXT_ENCODER_2_DIR), arguments))
    encoders = {TEXT_ENCODER_DIR: text_encoder, TEXT_ENCODER_2_DIR: text_encoder_2}
    for role, encoder in encoders.items():
        if encoder is None:
            raise ValueError(f"`{names[role]}` is missing: SDXL conditions on two text encoders; its {role} is "
                             f"{_SDXL_ROLES[role]}.")  # fmt: skip
        if not hasattr(getattr(encoder, "config", None), "hidden_size"):
            raise TypeError(f"`{names[role]}` must be a CLIP text encoder ({_SDXL_ROLES[role]}), got {type(encoder).__name__}.")
    configs = {role: encoder.config for role, encoder in encoders.items()}
    first, second = arguments

    def shape(config):
        return int(config.hidden_size), int(config.num_hidden_layers)

    if reference is not None:
        ref = {role: getattr(r, "config", r) for role, r in zip(encoders, reference)}
        if (shape(configs[TEXT_ENCODER_DIR]) == shape(ref[TEXT_ENCODER_2_DIR]) and shape(configs[TEXT_ENCODER_2_DIR])
                == shape(ref[TEXT_ENCODER_DIR]) and shape(ref[TEXT_ENCODER_DIR]) != shape(ref[TEXT_ENCODER_2_DIR])):
            raise ValueError(
                f"`{first}` and `{second}` are swapped: `{first}` has the shape of the base's text_encoder_2 "
                f"(width, layers) {shape(ref[TEXT_ENCODER_2_DIR])} and `{second}` that of its text_encoder "
                f"{shape(ref[TEXT_ENCODER_DIR])}. {_SWAP_HINT}."
            )
        for role in encoders:
            got, want = shape(configs[role]), shape(ref[role])
            if got[0] != want[0]:
                raise ValueError(
                    f"`{names[role]}` has width (hidden_size) {got[0]}, but the base's {role} ({_SDXL_ROLES[role]}) is "
                    f"{want[0]} wide. Use a safe encoder fine-tuned from the base's own {role}."
                )
            if got[1] != want[1]:
                raise ValueError(
                    f"`{names[role]}` has {got[1]} layers, but the base's {role} has {want[1]}. SDXL reads the penultimate "
                    "layer (hidden_states[-2]) of the full tower, so the safe encoder needs the base's depth: export it "
                    "without `--text_encoder_num_layers`."
                )
        got, want = configs[TEXT_ENCODER_2_DIR].projection_dim, ref[TEXT_ENCODER_2_DIR].projection_dim
        if got != want:
            raise ValueError(f"`{second}` projects to projection_dim {got}, but the base's text_encoder_2 to {want}.")
    if not hasattr(text_encoder_2, "text_projection"):
        raise _no_projection_error(f"a {type(text_encoder_2).__name__}", second)
    if hasattr(text_encoder, "text_projection"):
        raise ValueError(
            f"`{first}` is a {type(text_encoder).__name__}; SDXL's text_encoder must be a CLIPTextModel: the pipeline "
            f"takes the pooled `text_embeds` from the first encoder that returns them, so it would read `{first}`'s "
            f"instead of `{second}`'s. Load it with `load_safe_text_encoder(..., with_projection=False)`. If this is the "
            f"bigG encoder, the two are swapped: {_SWAP_HINT}."
        )
    if unet_config is not None:
        widths = {role: int(config.hidden_size) for role, config in configs.items()}
        cross = _config_value(unet_config, "cross_attention_dim")
        if cross is not None and not isinstance(cross, (list, tuple)) and sum(widths.values()) != int(cross):
            raise ValueError(
                f"`{first}` (width {widths[TEXT_ENCODER_DIR]}) and `{second}` (width {widths[TEXT_ENCODER_2_DIR]}) give "
                f"token states {sum(widths.values())} wide (SDXL concatenates them), but the UNet's cross_attention_dim is "
                f"{cross}. SDXL base 1.0 needs 768 + 1280 = 2048: use safe encoders fine-tuned from the base's own pair."
            )
        if _config_value(unet_config, "addition_embed_type") == "text_time":
            time_dim = int(_config_value(unet_config, "addition_time_embed_dim"))
            total = int(_config_value(unet_config, "projection_class_embeddings_input_dim"))
            want = total - SDXL_TIME_IDS * time_dim
            got = int(configs[TEXT_ENCODER_2_DIR].projection_dim)
            if got != want:
                raise ValueError(
                    f"`{second}` projects its pooled output to projection_dim {got}, but the UNet's add-embedding reads "
                    f"projection_class_embeddings_input_dim {total} = text_embeds + {SDXL_TIME_IDS} time ids x "
                    f"addition_time_embed_dim {time_dim}, so `{second}` must project to {want} (1280 in SDXL base 1.0)."
                )
    check_text_encoder(text_encoder, None, tokenizer, argument=first)
    check_text_encoder(text_encoder_2, None, tokenizer_2, argument=second)
