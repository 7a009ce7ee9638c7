"""Resolving model sources (local folders or hub ids) with fast, clear errors, decided by huggingface_hub itself.

Offline means huggingface_hub's own offline mode (``HF_HUB_OFFLINE=1``, :func:`huggingface_hub.is_offline_mode`);
nothing here opens a socket. Online, one metadata request goes through huggingface_hub's HTTP client (which
honours ``HTTPS_PROXY`` and the token), and its errors (:class:`~huggingface_hub.errors.RepositoryNotFoundError`,
``GatedRepoError``, ``OfflineModeIsEnabled``, transport errors) become one clear message.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["HubUnavailableError", "is_offline", "resolve_model_source"]

#: Seconds the one metadata request may take before the hub is reported unreachable.
HUB_TIMEOUT_S = 10.0
_LOCAL_HINT = "Pass a local folder instead (e.g. one saved with `save_pretrained`), or use `--tiny` for offline tiny random models."


class HubUnavailableError(OSError):
    """A hub id was given but the hub cannot serve it now (offline mode, no network, a gated repository)."""


def is_offline() -> bool:
    """huggingface_hub's offline mode: ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as huggingface_hub read it."""
    from huggingface_hub import is_offline_mode

    return bool(is_offline_mode())


def _cached(repo_id: str, repo_type: str, revision: str | None) -> bool:
    """True when the local hub cache holds a snapshot of ``repo_id`` (huggingface_hub's own lookup, no network)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot_download(repo_id, repo_type=repo_type, revision=revision, local_files_only=True)
        return True
    except (LocalEntryNotFoundError, OSError, ValueError):
        return False


def _check_on_hub(text: str, argument: str, repo_type: str, revision: str | None, token) -> None:
    """One metadata request; huggingface_hub's errors become ours (exit status 2 at the command line)."""
    from huggingface_hub import repo_info
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        repo_info(text, repo_type=repo_type, revision=revision, token=token, timeout=HUB_TIMEOUT_S)
        return
    except HFValidationError as e:
        raise FileNotFoundError(f"`{argument}`={text!r} is not an existing local path nor a valid hub id ({e}).") from None
    except GatedRepoError:
        raise HubUnavailableError(
            f"`{argument}`={text!r} is a gated repository: accept its terms on https://huggingface.co/{text} and log in "
            f"(`hf auth login`, or HF_TOKEN). {_LOCAL_HINT}"
        ) from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"`{argument}`={text!r} is not an existing local path, nor a {repo_type} repository on the Hugging Face Hub "
            f"(or it is private: log in with `hf auth login`). Check the spelling. {_LOCAL_HINT}"
        ) from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"`{argument}`={text!r} has no revision {revision!r} on the Hugging Face Hub; check `revision`.") from None
    except OfflineModeIsEnabled:
        raise HubUnavailableError(_offline_message(text, argument)) from None
    except HfHubHTTPError as e:  # the hub answered, with another error status (5xx, 401, 429, ...)
        reason = f"the Hugging Face Hub answered HTTP {getattr(e.response, 'status_code', '?')}"
    except Exception as e:  # noqa: BLE001 - transport errors of huggingface_hub's HTTP client (DNS, refused, proxy, timeout)
        reason = f"the Hugging Face Hub cannot be reached ({type(e).__name__}: {e})"
    if _cached(text, repo_type, revision):
        logger.warning("%s; using the copy of %r in the local hub cache.", reason, text)
        return
    raise HubUnavailableError(
        f"`{argument}`={text!r} is a hub id, but {reason} and it is not in the local hub cache. Check the network "
        f"(and HTTPS_PROXY behind a proxy), or set HF_HUB_OFFLINE=1 to work from the cache. {_LOCAL_HINT}"
    )


def _offline_message(text: str, argument: str) -> str:
    return (
        f"`{argument}`={text!r} is a hub id, but HF_HUB_OFFLINE=1 is set and it is not in the local hub cache. "
        "Pass a local folder instead (e.g. one saved with `save_pretrained`), unset HF_HUB_OFFLINE to download it, "
        "or use `--tiny` for offline tiny random models."
    )


def resolve_model_source(
    source: str | os.PathLike,
    argument: str = "source",
    *,
    repo_type: str = "model",
    revision: str | None = None,
    token: str | bool | None = None,
) -> str:
    """Return ``source`` as a string if it can be loaded now, else raise at once.

    A local folder or file is returned as is. A hub id (``"owner/name"``) is returned when huggingface_hub can
    serve it: from the local cache in offline mode, or after one metadata request online (through
    huggingface_hub's HTTP client, so a proxy-only network works). Otherwise this raises without waiting for
    download retries, naming ``HF_HUB_OFFLINE`` or the network and suggesting a local path or ``--tiny``.

    Args:
        source: a local path or a hub id.
        argument: the name of the user-facing argument, used in error messages.
        repo_type: ``"model"`` or ``"dataset"`` (what the hub id names).
        revision, token: as in huggingface_hub, for the metadata request.

    Raises:
        TypeError: ``source`` is not a string or path.
        FileNotFoundError: neither an existing path nor a repository on the hub.
        HubUnavailableError: a hub id the hub cannot serve now (offline and not cached, unreachable, gated).
    """
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"`{argument}` must be a local path or a hub id ('owner/name'), got {type(source).__name__} {source!r}.")
    text = os.fspath(source)
    if Path(text).expanduser().exists():
        return str(Path(text).expanduser())
    looks_like_path = text.startswith((".", "/", "~")) or os.sep in text.strip("/").replace("/", "", 1) or text.count("/") != 1
    if looks_like_path or not all(text.split("/")):
        raise FileNotFoundError(
            f"`{argument}`={text!r} is not an existing local path and not a hub id of the form 'owner/name'. "
            "Pass an existing folder, a hub id, or use `--tiny` for offline tiny random models."
        )
    if is_offline():
        if _cached(text, repo_type, revision):
            return text
        raise HubUnavailableError(_offline_message(text, argument))
    _check_on_hub(text, argument, repo_type, revision, token)
    return text
