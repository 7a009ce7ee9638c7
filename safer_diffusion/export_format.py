"""The export folder: the one contract between ``finetune`` (its writer) and ``safer_diffusion`` (its reader).

``python -m finetune.export`` writes it; :func:`safer_diffusion.encoders.load_safe_text_encoder` is its only
reader. Layout (documented in ``docs/EXPORT_FORMAT.md``)::

    text_encoder/{config.json, model.safetensors}   CLIPTextModel (what Stable Diffusion reads)
    tokenizer/                                      CLIPTokenizer
    clip/{config.json, model.safetensors}           full CLIPModel (optional)
    text_projection.safetensors                     {"weight": (projection_dim, hidden)}
    safer_clip.json                                 the manifest (schema below)
    README.md                                       model card

An SDXL export (the *two-encoder* layout, still version 1) adds, beside the above::

    text_encoder_2/{config.json, model.safetensors} CLIPTextModelWithProjection (SDXL's second, OpenCLIP bigG encoder)
    tokenizer_2/                                    its CLIPTokenizer

and lists both subfolders in the manifest's ``text_encoders`` (:data:`SDXL_TEXT_ENCODERS`); a folder without the
key is a single-encoder export (``[TEXT_ENCODER_DIR]``), so every version-1 folder reads as before.

This module owns the names, the version and the manifest schema; it imports nothing heavy.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .fileio import atomic_write_text

__all__ = [
    "CLIP_DIR",
    "EXPORT_FORMAT",
    "EXPORT_FORMAT_VERSION",
    "ExportManifest",
    "MANIFEST_FILE",
    "MODEL_CARD_FILE",
    "SDXL_TEXT_ENCODERS",
    "SDXL_TOKENIZERS",
    "TEXT_ENCODER_2_DIR",
    "TEXT_ENCODER_DIR",
    "TEXT_PROJECTION_FILE",
    "TOKENIZER_2_DIR",
    "TOKENIZER_DIR",
    "export_text_encoders",
    "is_export_folder",
    "read_manifest",
    "write_export_files",
    "write_manifest",
]

#: Value of the manifest's ``format`` key.
EXPORT_FORMAT = "safer-clip-encoder"
#: Version of the layout; a reader refuses a newer one.
EXPORT_FORMAT_VERSION = 1
MANIFEST_FILE = "safer_clip.json"
MODEL_CARD_FILE = "README.md"
TEXT_ENCODER_DIR = "text_encoder"
TOKENIZER_DIR = "tokenizer"
CLIP_DIR = "clip"
TEXT_PROJECTION_FILE = "text_projection.safetensors"
#: SDXL's second text encoder (OpenCLIP ViT-bigG/14 as ``CLIPTextModelWithProjection``) and its tokenizer, named
#: as in a diffusers SDXL pipeline folder.
TEXT_ENCODER_2_DIR = "text_encoder_2"
TOKENIZER_2_DIR = "tokenizer_2"
#: The manifest's ``text_encoders`` of an SDXL export, in the order the pipeline's encoders take them.
SDXL_TEXT_ENCODERS = (TEXT_ENCODER_DIR, TEXT_ENCODER_2_DIR)
SDXL_TOKENIZERS = (TOKENIZER_DIR, TOKENIZER_2_DIR)


@dataclass
class ExportManifest:
    """The manifest ``safer_clip.json``. Unknown keys written by a newer minor writer are kept in ``extra``."""

    base_model: str
    loss: str
    global_step: int
    dtype: str
    text_encoder_num_layers: int
    train_towers: str = "text"
    finetune: str = "lora"
    checkpoint: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    #: The encoder subfolders the export holds: ``["text_encoder"]`` (SD 1.x/2.x, and every folder written before
    #: the key existed) or :data:`SDXL_TEXT_ENCODERS`. Optional: old readers ignore it and load ``text_encoder/``.
    text_encoders: list[str] = field(default_factory=lambda: [TEXT_ENCODER_DIR])
    #: Per encoder subfolder, the frozen model it was fine-tuned from (optional; ``base_model`` is the first's).
    base_models: dict[str, str] = field(default_factory=dict)
    #: Per encoder subfolder, the optimisation steps it was trained (optional; an SDXL export's ``global_step`` is their sum).
    global_steps: dict[str, int] = field(default_factory=dict)
    format: str = EXPORT_FORMAT
    format_version: int = EXPORT_FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(data.pop("extra"))
        return data


def is_export_folder(folder: str | os.PathLike) -> bool:
    """True if ``folder`` holds a manifest (it may still be invalid: :func:`read_manifest` checks)."""
    return (Path(folder) / MANIFEST_FILE).is_file()


def export_text_encoders(manifest: ExportManifest, argument: str = "safe_text_encoder") -> tuple[str, ...]:
    """The manifest's ``text_encoders``, checked: a non-empty list of known encoder subfolders, no repeats.

    Raises:
        ValueError: not a list of strings, an unknown subfolder name, a repeated one, or an empty list.
    """
    names = manifest.text_encoders
    known = SDXL_TEXT_ENCODERS
    if (not isinstance(names, (list, tuple)) or not names or any(not isinstance(n, str) or n not in known for n in names)
            or len(set(names)) != len(names)):
        raise ValueError(
            f"`{argument}`: the manifest's `text_encoders` must be a list of distinct names among {list(known)}, got "
            f"{names!r}; re-export the encoders."
        )
    return tuple(names)


def write_manifest(folder: str | os.PathLike, manifest: ExportManifest) -> Path:
    """Write ``folder/safer_clip.json`` atomically."""
    path = Path(folder) / MANIFEST_FILE
    atomic_write_text(path, json.dumps(manifest.to_dict(), indent=2))
    return path


def write_export_files(folder: str | os.PathLike, *, text_encoders: dict[str, Any], tokenizers: dict[str, Any],
                       text_projection: Any, model_card: str, manifest: ExportManifest) -> Path:
    """Write the files of an export folder in the contract's layout, the manifest last (a folder with a manifest is complete).

    Args:
        folder: the (staging) folder.
        text_encoders: subfolder name (:data:`TEXT_ENCODER_DIR`, :data:`TEXT_ENCODER_2_DIR`) -> a transformers text
            model, saved with safetensors.
        tokenizers: subfolder name (:data:`TOKENIZER_DIR`, :data:`TOKENIZER_2_DIR`) -> its tokenizer.
        text_projection: the first tower's projection weight ``(D, H)`` for :data:`TEXT_PROJECTION_FILE`, or None.
        model_card: the ``README.md`` text.
        manifest: the :class:`ExportManifest`.
    """
    folder = Path(folder)
    for name, model in text_encoders.items():
        model.save_pretrained(folder / name, safe_serialization=True)
    for name, tokenizer in tokenizers.items():
        tokenizer.save_pretrained(folder / name)
    if text_projection is not None:
        from safetensors.torch import save_file

        save_file({"weight": text_projection.detach().contiguous()}, str(folder / TEXT_PROJECTION_FILE))
    atomic_write_text(folder / MODEL_CARD_FILE, model_card)
    write_manifest(folder, manifest)
    return folder


def read_manifest(folder: str | os.PathLike, argument: str = "safe_text_encoder") -> ExportManifest:
    """Read and check ``folder/safer_clip.json``.

    Raises:
        ValueError: not valid JSON, another format, a newer format version, or a required key missing.
    """
    path = Path(folder) / MANIFEST_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"`{argument}`: {os.fspath(path)!r} is not valid JSON ({e}); re-export the encoder.") from None
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"`{argument}`: {os.fspath(path)!r} has format {got!r}, expected {EXPORT_FORMAT!r}.")
    version = data.get("format_version", 1)
    if not isinstance(version, int) or version > EXPORT_FORMAT_VERSION:
        raise ValueError(
            f"`{argument}`: export format_version {version!r} is newer than this library reads "
            f"({EXPORT_FORMAT_VERSION}); upgrade safer-diffusion."
        )
    known = {f for f in ExportManifest.__dataclass_fields__ if f != "extra"}
    required = ("base_model", "loss", "global_step", "dtype", "text_encoder_num_layers")
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"`{argument}`: {os.fspath(path)!r} lacks {missing}; re-export the encoder with finetune.export.")
    return ExportManifest(**{k: v for k, v in data.items() if k in known},
                          extra={k: v for k, v in data.items() if k not in known})  # fmt: skip
