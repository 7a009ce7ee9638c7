"""Small file helpers shared by the library and the training application: JSON Lines reading,
writable-folder checks and crash-safe writes (tmp file + fsync + ``os.replace``)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_text", "fsync_dir", "probe_writable_dir", "read_jsonl"]


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
