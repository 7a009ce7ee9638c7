"""Small file helpers shared by the library and the training application: JSON Lines reading,
writable-folder checks and crash-safe writes (tmp file + fsync + ``os.replace``)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .options import BadInputError

__all__ = ["atomic_write_text", "check_output_file", "check_writable_dir", "fsync_dir", "probe_writable_dir", "read_jsonl"]


def read_jsonl(path: str | os.PathLike, argument: str | None = None) -> list[dict[str, Any]]:
    """Read a ``.jsonl`` file: one JSON object a line, blank lines skipped.

    Args:
        path: the file.
        argument: the user-facing option that named the file (e.g. ``"--prompts"``), used in error
            messages; ``None`` names the file alone.

    Returns:
        `list[dict]`, one per non-blank line.

    Raises:
        ValueError: a line is not valid JSON, or not a JSON object; the message names the file and line.
    """
    path = Path(path)
    where = f"`{argument}`={str(path)!r}: line" if argument else f"{path}:"
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{where}{' ' if argument else ''}{lineno} is not valid JSON ({e.msg}); each line of a .jsonl file must be one object."
                ) from e
            if not isinstance(row, dict):
                raise ValueError(f"{where}{' ' if argument else ''}{lineno} is a JSON {type(row).__name__}, expected an object.")
            rows.append(row)
    return rows


def probe_writable_dir(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and write (then remove) a probe file in it.

    Returns:
        The folder as a `Path`.

    Raises:
        OSError: the folder cannot be created or written; callers turn it into an error that names
            their own option.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
    os.close(fd)
    os.unlink(probe)
    return folder


def check_writable_dir(folder: str | os.PathLike, argument: str, *, keep_created: bool = False, require_empty: bool = False) -> Path:
    """Check, before any work, that an output folder exists or can be created, and can be written.

    A probe file is written and removed. Folders created only for the probe are removed again unless
    ``keep_created`` (several processes probing the same folder at once keep it), so bad input leaves
    nothing behind.

    Args:
        folder: the folder an entry point will write into.
        argument: the option that named it (``"--output_dir"``), used in the error.
        keep_created: keep the folders created for the probe.
        require_empty: refuse a folder that already holds files (an export must not mix with an older one).

    Returns:
        The folder as an expanded `Path`.

    Raises:
        BadInputError: ``folder`` is a file, lies under a file, cannot be written, or (``require_empty``) is not
            empty; the message names ``argument`` and the fix.
    """
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise BadInputError(f"`{argument}` {os.fspath(folder)!r} is a file, not a folder; pass a folder path.")
    if require_empty and folder.is_dir() and any(folder.iterdir()):
        raise BadInputError(f"`{argument}` {os.fspath(folder)!r} exists and is not empty; choose a new folder or delete it.")
    missing, existing = [], folder
    while not existing.exists() and existing != existing.parent:
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        raise BadInputError(f"`{argument}` {os.fspath(folder)!r} cannot be created: {os.fspath(existing)!r} is a file; "
                            "pass another folder.")  # fmt: skip
    try:
        probe_writable_dir(folder)
    except OSError as e:
        raise BadInputError(f"`{argument}` {os.fspath(folder)!r} is not a writable folder ({e.strerror or e}); pass a folder "
                            "you can write to.") from None  # fmt: skip
    finally:
        for d in [] if keep_created else missing:  # deepest first
            try:
                d.rmdir()
            except OSError:
                break
    return folder


def check_output_file(path: str | os.PathLike, argument: str, *, suffixes: Sequence[str] | None = None,
                      example: str = "results.json") -> Path:  # fmt: skip
    """Check, before any work, that an output *file* can be written: not a folder, an allowed suffix, a writable folder.

    Args:
        path: the file an entry point will write.
        argument: the option that named it (``"--output"``), used in the error.
        suffixes: allowed suffixes in lower case (``(".png", "")``); None allows any.
        example: a file name for the error's fix when ``path`` is a folder.

    Returns:
        The file as an expanded `Path` (nothing is created).

    Raises:
        BadInputError: the path is a folder, has another suffix, or its folder cannot be written.
    """
    out = Path(path).expanduser()
    if out.is_dir():
        raise BadInputError(f"`{argument}` {os.fspath(out)!r} is a directory; pass a file path such as "
                            f"{os.fspath(out / example)!r}.")  # fmt: skip
    if suffixes is not None and out.suffix.lower() not in suffixes:
        named = ", ".join(repr(x) if x else "no suffix" for x in suffixes)
        raise BadInputError(f"`{argument}` {os.fspath(out)!r} must end in {named}; rename it.")
    check_writable_dir(out.parent if str(out.parent) else Path("."), argument)
    return out


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a folder so a rename or new file in it survives a crash (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file, fsync and ``os.replace`` (never half a file)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)
