"""``safer-diffusion convert --allow_pickle IN.pt OUT_DIR``: a torch state dict of a CLIP text encoder (DES and other
papers release ``.pt``/``.bin`` files) -> a safetensors ``CLIPTextModel`` folder the library loads.

The library never unpickles a file on its own (unpickling runs code from the file): this command does,
once, and only with ``--allow_pickle``. The architecture comes from the base model's text encoder
(``--base``: a pipeline folder or hub id, a CLIPTextModel / CLIPModel folder, or a ``config.json``),
so the weights must fit it key for key and shape for shape.

    safer-diffusion convert --allow_pickle des.pt encoders/des --base CompVis/stable-diffusion-v1-4
    safer-diffusion evaluate --encoders original safer-clip des=encoders/des ...

Accepted layouts: a bare state dict, or a checkpoint dict holding it under ``model_state_dict``,
``state_dict``, ``text_encoder`` or ``model`` (DES: ``{"model_state_dict": ..., "epoch": ..., "args": ...}``);
keys with or without ``text_model.`` (transformers 4 / 5), ``module.``, ``text_encoder.`` or
``cond_stage_model.transformer.``. Exit status: 0, 2 bad input, 1 runtime failure.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .options import DEFAULT_BASE_MODEL, MISSING, BadInputError, configure_logging, option, parse_config, run_main

logger = logging.getLogger(__name__)

__all__ = ["PROG", "ConvertConfig", "convert_state_dict", "main"]

PROG = "safer-diffusion convert"
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_WRAPPER_KEYS = ("model_state_dict", "state_dict", "text_encoder", "model")
_PREFIXES = ("module.", "text_encoder.", "cond_stage_model.transformer.")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _base_text_config(base_config: Any):
    """The base's ``CLIPTextConfig`` from a config object, a config.json, a CLIPTextModel/CLIPModel folder or a pipeline."""
    from transformers import CLIPConfig, CLIPTextConfig

    if isinstance(base_config, CLIPTextConfig):
        return base_config
    text = os.fspath(base_config)
    path = Path(text).expanduser()
    if path.is_file():
        data = json.loads(path.read_text())
        return CLIPConfig(**data).text_config if data.get("model_type") == "clip" else CLIPTextConfig(**data)
    if path.is_dir():
        for folder in (path / "text_encoder", path):
            if (folder / "config.json").is_file():
                data = json.loads((folder / "config.json").read_text())
                if data.get("model_type") == "clip":
                    return CLIPConfig.from_pretrained(str(folder)).text_config
                return CLIPTextConfig.from_pretrained(str(folder))
        raise FileNotFoundError(f"`--base`={text!r} has no config.json nor text_encoder/config.json; pass the base pipeline folder.")
    from .hub import resolve_model_source

    return CLIPTextConfig.from_pretrained(resolve_model_source(text, argument="--base"), subfolder="text_encoder")


def _unwrap(obj: Any, where: str) -> dict:
    import torch

    if isinstance(obj, dict) and not any(torch.is_tensor(v) for v in obj.values()):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                return obj[key]
        raise ValueError(f"{where} holds a dict without tensors (keys {sorted(obj)[:8]}) and none of {list(_WRAPPER_KEYS)}; "
                         "it is not a text encoder state dict.")  # fmt: skip
    if isinstance(obj, dict):
        return obj
    raise ValueError(f"{where} holds a {type(obj).__name__}, not a state dict; save `text_encoder.state_dict()`.")


def _normalised(state: dict, expected: set[str]) -> dict:
    out = {}
    for key, value in state.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        if key not in expected and key.startswith("text_model.") and key[len("text_model.") :] in expected:
            key = key[len("text_model.") :]
        elif key not in expected and f"text_model.{key}" in expected:
            key = f"text_model.{key}"
        if key.endswith("position_ids") and key not in expected:
            continue  # a buffer older transformers saved; recomputed on load
        out[key] = value
    return out


def convert_state_dict(input_pt: str | os.PathLike, output_dir: str | os.PathLike, base_config: Any = DEFAULT_BASE_MODEL,
                       allow_pickle: bool = False) -> Path:  # fmt: skip
    """Write a safetensors ``CLIPTextModel`` folder from a ``.pt``/``.bin`` text-encoder state dict.

    Args:
        input_pt: the pickle file.
        output_dir: a new (or empty) folder; written atomically (a temporary folder renamed into place).
        base_config: the architecture: a ``CLIPTextConfig``, a config.json, a CLIPTextModel/CLIPModel folder, a
            pipeline folder or its hub id (``text_encoder/config.json``).
        allow_pickle: consent to unpickle ``input_pt`` (it can run code); refused without it.

    Returns:
        `Path` of the folder (``config.json``, ``model.safetensors``, ``conversion.json``).

    Raises:
        BadInputError: no ``allow_pickle``, a file that is not a pickle state dict, an output folder that is not empty.
        ValueError: the weights do not fit the base's text encoder (missing, unexpected or mis-shaped keys).
    """
    import torch
    from transformers import CLIPTextModel

    source = Path(input_pt).expanduser()
    out = Path(output_dir).expanduser()
    if not source.is_file():
        raise FileNotFoundError(f"`INPUT`={os.fspath(input_pt)!r} is not a file; pass the .pt/.bin state dict to convert.")
    if source.suffix.lower() not in _PICKLE_SUFFIXES:
        raise BadInputError(f"`INPUT`={os.fspath(input_pt)!r} is not a torch pickle ({', '.join(_PICKLE_SUFFIXES)}); a safetensors "
                            "file or folder loads as is (pass it to --encoders directly).")  # fmt: skip
    if not allow_pickle:
        raise BadInputError(f"`INPUT`={os.fspath(input_pt)!r} is a pickle file: loading it runs code it contains. Pass `--allow_pickle` "
                            "only for a file you trust (e.g. one downloaded from the paper's authors).")  # fmt: skip
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInputError(f"`OUTPUT_DIR`={os.fspath(output_dir)!r} exists and is not an empty folder; pass a new folder.")
    config = _base_text_config(base_config)
    try:
        loaded = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - weights_only refuses python objects; the user consented to unpickling
        logger.warning("%s holds objects besides tensors (%s); unpickling it fully, as --allow_pickle permits.", source, e)
        loaded = torch.load(source, map_location="cpu", weights_only=False)
    state = _unwrap(loaded, f"`INPUT`={os.fspath(input_pt)!r}")
    model = CLIPTextModel(config)
    expected = set(model.state_dict())
    state = _normalised(state, expected)
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"`INPUT`={os.fspath(input_pt)!r} does not fit the base's text encoder ({config.num_hidden_layers} layers, width "
            f"{config.hidden_size}): missing {len(missing)} keys {missing[:5]}, unexpected {len(unexpected)} keys {unexpected[:5]}. "
            "Pass the `--base` the encoder was fine-tuned from."
        )
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in model.state_dict().items() if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        k, got, want = wrong[0]
        raise ValueError(f"`INPUT`={os.fspath(input_pt)!r} does not fit the base's text encoder: {len(wrong)} tensors have other shapes, "
                         f"e.g. {k} {list(got)} where the base has {list(want)}. Pass the `--base` the encoder was fine-tuned from.")  # fmt: skip
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.eval().save_pretrained(tmp, safe_serialization=True)
        (tmp / "conversion.json").write_text(json.dumps({"converted_from": source.name, "sha256": _sha256(source),
                                                         "base": os.fspath(base_config) if not hasattr(base_config, "to_dict") else None,
                                                         "tool": PROG}, indent=2) + "\n")  # fmt: skip
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Converted %s to %s (%d tensors).", source, out, len(state))
    return out


@dataclass
class ConvertConfig:
    """The options of ``safer-diffusion convert``."""

    input: str = option(MISSING, "The .pt/.bin state dict of a CLIP text encoder.", positional=True, metavar="INPUT")
    output_dir: str = option(MISSING, "New folder for the safetensors CLIPTextModel.", positional=True, metavar="OUTPUT_DIR")
    base: str = option(DEFAULT_BASE_MODEL, "The base model (pipeline folder or hub id) whose text encoder's architecture the weights fit.")
    allow_pickle: bool = option(False, "Consent to unpickle INPUT (it can run code); only for a file you trust.")
    verbose: bool = option(False, "Log at INFO level (to stderr).")


def _convert(argv: list[str]) -> int:
    config = parse_config(ConvertConfig, argv, prog=PROG, description="Convert a .pt/.bin text encoder state dict to safetensors.")
    out = convert_state_dict(config.input, config.output_dir, config.base, allow_pickle=config.allow_pickle)
    print(f"Wrote {out} (config.json, model.safetensors); use it as `--encoders NAME={out}`.")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``safer-diffusion convert`` / ``python -m safer_diffusion.convert``. Returns the exit status (0, 2 bad input, 1 failure)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    configure_logging(verbose="--verbose" in argv)
    return run_main(lambda: _convert(argv), prog=PROG)


if __name__ == "__main__":
    raise SystemExit(main())
