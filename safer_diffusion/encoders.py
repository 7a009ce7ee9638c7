"""Loading a safe (SaFeR-CLIP) text encoder for Stable Diffusion from any of the usual layouts.

:func:`load_safe_text_encoder` accepts

* a folder exported by ``python -m finetune.export`` (recognised by ``safer_clip.json``),
* a full ``CLIPModel`` checkpoint folder (the text tower is taken, the vision tower ignored),
* a ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` folder,
* a diffusers pipeline folder (its ``text_encoder/`` is taken),
* an open_clip text tower: a ``.safetensors`` state dict, a folder holding
  ``open_clip_model.safetensors`` / ``open_clip_pytorch_model.safetensors``, or an ``open_clip``
  model object; converted to transformers with :func:`convert_open_clip_text` (which, unlike
  diffusers' ``convert_open_clip_checkpoint``, keeps ``text_projection``),
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

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SAFE_TEXT_ENCODER",
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
_OPEN_CLIP_PREFIXES = ("", "text.", "model.", "cond_stage_model.model.", "module.", "module.text.")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_LAYOUTS = (
    "a finetune export folder (safer_clip.json), a CLIPModel or CLIPTextModel folder (config.json + model.safetensors), "
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


def _find_prefix(state_dict: dict) -> str | None:
    for prefix in _OPEN_CLIP_PREFIXES:
        if f"{prefix}token_embedding.weight" in state_dict and f"{prefix}transformer.resblocks.0.ln_1.weight" in state_dict:
            return prefix
    return None


def convert_open_clip_text(
    source: Any,
    hidden_act: str | None = None,
    num_attention_heads: int | None = None,
    eos_token_id: int = 49407,
):
    """Convert an open_clip text tower to a transformers ``CLIPTextModelWithProjection``.

    Args:
        source: an ``open_clip`` model (``CLIP`` or ``CustomTextCLIP``/``TextTransformer``) or its
            state dict (keys possibly prefixed by ``text.``, ``model.`` or ``cond_stage_model.model.``).
        hidden_act (`str`, *optional*): ``"gelu"`` or ``"quick_gelu"``. Read from a model object (ignoring this);
            for a bare state dict defaults to ``"gelu"`` (OpenCLIP ViT-H/ViT-bigG; OpenAI-trained
            towers use ``"quick_gelu"``).
        num_attention_heads (`int`, *optional*): read from a model object (ignoring this); for a state dict
            defaults to ``width // 64`` (open_clip's default head width).
        eos_token_id (`int`, defaults to 49407): the end-of-text token, where the pooled output is taken.

    Returns:
        `transformers.CLIPTextModelWithProjection` in float32, in eval mode. Its
        ``text_projection.weight`` is open_clip's ``text_projection`` transposed, so
        ``text_embeds`` equals ``open_clip_model.encode_text(tokens)``.
    """
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    if isinstance(source, torch.nn.Module):
        module = getattr(source, "text", source) if not hasattr(source, "token_embedding") else source
        if not hasattr(module, "token_embedding") or not hasattr(module, "transformer"):
            raise TypeError(f"`source` ({type(source).__name__}) is not an open_clip model with a text tower.")
        block = module.transformer.resblocks[0]
        # a model object knows its heads and activation: those win over the arguments (defaults for state dicts)
        if hasattr(block.attn, "num_heads"):
            num_attention_heads = int(block.attn.num_heads)
        act = getattr(block.mlp, "gelu", None)
        if act is not None:
            hidden_act = "quick_gelu" if type(act).__name__ == "QuickGELU" else "gelu"
        state = {k: v for k, v in module.state_dict().items()}
        if isinstance(getattr(module, "text_projection", None), torch.nn.Linear):
            if module.text_projection.bias is not None:
                raise ValueError("open_clip text towers with a biased `text_projection` are not supported.")
    elif isinstance(source, dict):
        state = source
    else:
        raise TypeError(f"`source` must be an open_clip model or its state dict, got {type(source).__name__}.")
    prefix = _find_prefix(state)
    if prefix is None:
        raise ValueError(
            "`source` does not look like an open_clip text tower: no `token_embedding.weight` / "
            "`transformer.resblocks.0.*` keys (with or without a `text.`/`model.` prefix)."
        )
    sd = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    unsupported = sorted({k.split(".")[3] for k in sd if k.startswith("transformer.resblocks.") and k.split(".")[3] in ("ls_1", "ls_2", "ln_attn")})
    if unsupported:
        raise ValueError(f"open_clip text towers with {unsupported} (layer scale / extra norms) are not supported.")
    hidden_act = hidden_act or "gelu"
    if hidden_act not in ("gelu", "quick_gelu"):
        raise ValueError(f"`hidden_act` must be 'gelu' or 'quick_gelu', got {hidden_act!r}.")
    vocab, width = sd["token_embedding.weight"].shape
    positions = sd["positional_embedding"].shape[0]
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks."))
    intermediate = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    heads = num_attention_heads or max(1, width // 64)
    if width % heads:
        raise ValueError(f"`num_attention_heads`={heads} does not divide the width {width}.")
    proj = sd.get("text_projection", sd.get("text_projection.weight"))
    if proj is None:
        raise ValueError("The open_clip state dict has no `text_projection`; it is needed for the pooled embedding.")
    proj_weight = proj.T if "text_projection" in sd else proj  # Parameter (W, D) -> Linear weight (D, W)
    config = CLIPTextConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=positions, hidden_act=hidden_act,
        projection_dim=proj_weight.shape[0], layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=eos_token_id,
        pad_token_id=1,
    )  # fmt: skip
    new = {
        "embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "embeddings.position_embedding.weight": sd["positional_embedding"],
        "final_layer_norm.weight": sd["ln_final.weight"],
        "final_layer_norm.bias": sd["ln_final.bias"],
    }
    for i in range(layers):
        src, dst = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        q, k, v = sd[src + "attn.in_proj_weight"].chunk(3, dim=0)
        qb, kb, vb = sd[src + "attn.in_proj_bias"].chunk(3, dim=0)
        for name, w, b in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
            new[dst + f"self_attn.{name}.weight"], new[dst + f"self_attn.{name}.bias"] = w, b
        pairs = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1",
                 "mlp.c_proj": "mlp.fc2"}
        for a, b in pairs.items():
            new[dst + b + ".weight"], new[dst + b + ".bias"] = sd[src + a + ".weight"], sd[src + a + ".bias"]
    model = CLIPTextModelWithProjection(config)
    tower = text_transformer(model)
    expected = set(tower.state_dict())
    missing = expected - set(new)
    if missing:
        raise ValueError(f"Converted open_clip weights miss transformers keys {sorted(missing)[:5]}.")
    tower.load_state_dict({k: v.float() for k, v in new.items() if k in expected}, strict=True)
    with torch.no_grad():
        model.text_projection.weight.copy_(proj_weight.float())
    return model.eval()


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

    if (folder / "safer_clip.json").is_file():
        meta = _read_json(folder / "safer_clip.json")
        if meta.get("format") != "safer-clip-encoder":
            raise ValueError(f"`{argument}`: {os.fspath(folder / 'safer_clip.json')!r} has format {meta.get('format')!r}, "
                             "expected 'safer-clip-encoder'.")
        if int(meta.get("format_version", 1)) > 1:
            raise ValueError(f"`{argument}`: export format_version {meta['format_version']} is newer than this library "
                             "supports (1); upgrade safer-diffusion.")
        encoder = _hf_load(CLIPTextModel, folder / "text_encoder", argument, torch_dtype)
        if not with_projection:
            return encoder
        if (folder / "text_projection.safetensors").is_file():
            weight = load_safetensors(folder / "text_projection.safetensors", argument)["weight"]
            out = CLIPTextModelWithProjection(encoder.config.__class__(**{**encoder.config.to_dict(), "projection_dim": weight.shape[0]}))
            text_transformer(out).load_state_dict(text_transformer(encoder).state_dict())
            out.text_projection.weight.data.copy_(weight)
            return out.to(encoder.dtype).eval()
        if (folder / "clip" / "config.json").is_file():
            return _hf_load(CLIPTextModelWithProjection, folder / "clip", argument, torch_dtype, quiet=True)
        raise ValueError(f"`{argument}`: export {os.fspath(folder)!r} has no text_projection.safetensors or clip/; "
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
    if _find_prefix(state) is None:
        raise ValueError(f"`{argument}`: {os.fspath(path)!r} is not an open_clip text tower state dict. Accepted: {_LAYOUTS}.")
    encoder = convert_open_clip_text(state, hidden_act=hidden_act, num_attention_heads=num_attention_heads)
    if not with_projection:
        encoder = _to_text_model(encoder)
    return encoder.to(torch_dtype) if torch_dtype is not None else encoder


def _download(repo_id: str, with_projection: bool) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.txt", "model.safetensors", "model-*.safetensors", "text_projection.safetensors",
                "text_encoder/*", *_OPEN_CLIP_FILES]
    if with_projection:
        patterns.append("clip/*")
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
        torch_dtype (`torch.dtype`, *optional*): dtype to load the weights in.
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
