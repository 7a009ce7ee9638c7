"""Resolving model sources (local folders or hub ids) with fast, clear offline errors."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["HubUnavailableError", "is_offline", "resolve_model_source"]

_HUB_HOST = "huggingface.co"


class HubUnavailableError(OSError):
    """A hub id was given but the hub cannot be reached (offline mode or no network)."""


def is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to a true value."""
    return any(os.environ.get(k, "").strip().lower() in {"1", "true", "yes", "on"} for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", f"https://{_HUB_HOST}")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0].split(":")[0]
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_on_disk(repo_id: str) -> bool:
    try:
        from huggingface_hub import scan_cache_dir

        return any(r.repo_id == repo_id for r in scan_cache_dir().repos)
    except Exception:  # no cache folder yet, or an unreadable one
        return False


def resolve_model_source(source: str | os.PathLike, argument: str = "source") -> str:
    """Return ``source`` as a string if it can be loaded now, else raise at once.

    A local folder or file is returned as is. A hub id (``"owner/name"``) is returned when the
    hub is reachable or the repository is already in the local hub cache. Otherwise this raises
    :class:`HubUnavailableError` without waiting for download retries: the message names
    ``HF_HUB_OFFLINE`` or the missing network and suggests a local path or ``--tiny``.

    Args:
        source: a local path or a hub id.
        argument: the name of the user-facing argument, used in error messages.
    """
    text = os.fspath(source)
    if Path(text).expanduser().exists():
        return str(Path(text).expanduser())
    looks_like_path = text.startswith((".", "/", "~")) or os.sep in text.strip("/").replace("/", "", 1) or text.count("/") != 1
    if looks_like_path:
        raise FileNotFoundError(
            f"`{argument}`={text!r} is not an existing local path and not a hub id of the form 'owner/name'. "
            "Pass an existing folder, a hub id, or use `--tiny` for offline tiny random models."
        )
    if _cached_on_disk(text):
        return text
    if is_offline():
        raise HubUnavailableError(
            f"`{argument}`={text!r} is a hub id, but HF_HUB_OFFLINE=1 is set and it is not in the local hub cache. "
            "Pass a local folder instead (e.g. one saved with `save_pretrained`), unset HF_HUB_OFFLINE to download it, "
            "or use `--tiny` for offline tiny random models."
        )
    if not _hub_reachable():
        raise HubUnavailableError(
            f"`{argument}`={text!r} is a hub id, but the Hugging Face Hub ({_HUB_HOST}) cannot be reached from this machine "
            "(no network) and it is not in the local hub cache. Pass a local folder instead, "
            "or use `--tiny` for offline tiny random models."
        )
    return text
