"""Reading JSON Lines files with errors that name the file, the line and the fix."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["read_jsonl"]


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
