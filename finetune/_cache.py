"""Small on-disk cache helpers shared by anchors and targets: safetensors + JSON metadata, atomic writes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from safer_diffusion.fileio import probe_writable_dir

logger = logging.getLogger(__name__)


def default_cache_dir(kind: str) -> Path:
    """``$SAFER_DIFFUSION_CACHE/<kind>`` (or ``~/.cache/safer_diffusion/<kind>``)."""
    root = os.environ.get("SAFER_DIFFUSION_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "safer_diffusion"
    )
    return Path(root) / kind


def hash_json(obj: Any) -> str:
    """SHA-256 of the canonical JSON of ``obj`` (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def ensure_writable(folder: str | os.PathLike, argument: str = "cache_dir") -> Path:
    """Create ``folder`` if needed and check that files can be written in it; raise a clear error otherwise."""
    folder = Path(folder)
    try:
        probe_writable_dir(folder)
    except OSError as e:
        raise PermissionError(
            f"`{argument}` {str(folder)!r} is not a writable directory ({e.strerror or e}); pass another `{argument}` "
            "or set SAFER_DIFFUSION_CACHE to a writable folder."
        ) from e
    return folder


def save_entry(folder: Path, key: str, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write ``<key>.safetensors`` and ``<key>.json`` atomically (tmp + os.replace; the JSON last marks completeness)."""
    from safetensors.torch import save_file

    folder = ensure_writable(folder)
    target = folder / f"{key}.safetensors"
    fd, tmp = tempfile.mkstemp(prefix=f".{key}-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    meta_path = folder / f"{key}.json"
    fd, tmp = tempfile.mkstemp(prefix=f".{key}-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, meta_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load_entry(folder: Path, key: str, expected_meta: dict) -> dict[str, torch.Tensor] | None:
    """Load the entry ``key`` if present, complete, and its metadata equals ``expected_meta``; else ``None``."""
    from safetensors.torch import load_file

    meta_path, data_path = folder / f"{key}.json", folder / f"{key}.safetensors"
    if not (meta_path.is_file() and data_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        logger.warning("Ignoring unreadable cache metadata %s.", meta_path)
        return None
    if meta != json.loads(json.dumps(expected_meta, sort_keys=True, default=str)):
        logger.warning("Cache entry %s does not match the requested inputs; recomputing.", meta_path)
        return None
    try:
        return load_file(str(data_path))
    except Exception as e:  # a truncated or foreign file: never trust it
        logger.warning("Ignoring unreadable cache file %s (%s).", data_path, e)
        return None
