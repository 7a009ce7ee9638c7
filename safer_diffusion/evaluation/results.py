"""The evaluation's on-disk state: append-only results files and the settings they belong to.

Layout of an output folder::

    out/settings.json          the settings every row was produced with (written once, atomically)
    out/results.jsonl          one JSON row per (prompt_id, seed, variant); single process, or merged
    out/results.rank{r}.jsonl  rank r's rows when several processes run (merged into results.jsonl)

Rows are appended a batch at a time with ``flush`` + ``os.fsync``, so a crash loses at most the
batch being written. A crash in the middle of a write leaves a partial last line; readers ignore
it and :func:`repair_results_file` truncates it before anything is appended again. A rerun into
the same folder skips every finished ``(prompt_id, seed, variant)``; a rerun with different
settings is refused with :class:`SettingsMismatchError`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_text, fsync_dir

logger = logging.getLogger(__name__)

__all__ = [
    "RESULTS_NAME",
    "SETTINGS_NAME",
    "ResultsWriter",
    "SettingsMismatchError",
    "check_settings",
    "merge_results",
    "rank_results_name",
    "read_results",
    "read_results_file",
    "repair_results_file",
    "results_files",
    "row_key",
    "write_settings",
]

RESULTS_NAME = "results.jsonl"
SETTINGS_NAME = "settings.json"
_RANK_RE = re.compile(r"^results\.rank(\d+)\.jsonl$")


class SettingsMismatchError(ValueError):
    """A rerun into an existing output folder with settings that differ from the stored ones."""


def rank_results_name(rank: int) -> str:
    """File name of rank ``rank``'s rows: ``results.rank{rank}.jsonl``."""
    return f"results.rank{rank}.jsonl"


def row_key(row: dict[str, Any]) -> tuple[str, int, str]:
    """The identity of a row: ``(prompt_id, seed, variant)``."""
    return str(row["prompt_id"]), int(row["seed"]), str(row["variant"])




def results_files(out_dir: str | os.PathLike) -> list[Path]:
    """``results.jsonl`` then the ``results.rank*.jsonl`` files of ``out_dir`` that exist (rank order)."""
    out_dir = Path(out_dir)
    files = [out_dir / RESULTS_NAME] if (out_dir / RESULTS_NAME).is_file() else []
    ranked = []
    if out_dir.is_dir():
        for p in out_dir.iterdir():
            m = _RANK_RE.match(p.name)
            if m and p.is_file():
                ranked.append((int(m.group(1)), p))
    return files + [p for _, p in sorted(ranked)]


def read_results_file(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of one results file. A partial last line (a crash mid-write) is ignored with a warning;
    a malformed complete line is skipped with a warning."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    rows: list[dict[str, Any]] = []
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    if tail.strip():
        logger.warning("%s ends with a partial line (%d bytes, an interrupted write); ignoring it.", path, len(tail))
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            row_key(row)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
            logger.warning("%s line %d is not a valid result row; skipping it.", path, lineno)
            continue
        rows.append(row)
    return rows


def read_results(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All rows of an output folder (``results.jsonl`` and every rank file), one per key, first wins."""
    seen: set[tuple[str, int, str]] = set()
    rows = []
    for path in results_files(out_dir):
        for row in read_results_file(path):
            key = row_key(row)
            if key not in seen:
                seen.add(key)
                rows.append(row)
    return rows


def repair_results_file(path: str | os.PathLike) -> int:
    """Truncate a partial last line left by a crash, so appends start on a fresh line.

    Returns:
        `int`: the number of bytes removed (0 when the file was intact or absent).
    """
    path = Path(path)
    if not path.is_file():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        # read backwards in blocks until the last newline
        pos, block = size, 1 << 16
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        cut = 0
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            i = chunk.rfind(b"\n")
            if i >= 0:
                cut = start + i + 1
                break
            pos = start
        f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())
    logger.warning("%s: removed a partial last line of %d bytes left by an interrupted run.", path, size - cut)
    return size - cut


class ResultsWriter:
    """Append-only JSONL writer: each :meth:`append` is one ``write`` + ``flush`` + ``os.fsync``.

    Args:
        path: the results file; created if absent. A partial last line is repaired on open.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_results_file(self.path)
        created = not self.path.exists()
        self._f = open(self.path, "ab")
        if created:
            fsync_dir(self.path.parent)

    def append(self, rows: Iterable[dict[str, Any]]) -> int:
        """Write ``rows`` durably; returns how many were written."""
        lines = [json.dumps(r, ensure_ascii=False, sort_keys=True, allow_nan=False) + "\n" for r in rows]
        if not lines:
            return 0
        self._f.write("".join(lines).encode("utf-8"))
        self._f.flush()
        os.fsync(self._f.fileno())
        return len(lines)

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def merge_results(out_dir: str | os.PathLike, order: Sequence[str] | None = None) -> Path:
    """Merge every results file of ``out_dir`` into ``results.jsonl`` (atomically, one row per key).

    Args:
        out_dir: the output folder.
        order: prompt ids in prompt-file order; rows are sorted by it, then seed, then variant.
            Unknown ids go last.

    Returns:
        `Path` of ``results.jsonl``.
    """
    out_dir = Path(out_dir)
    rows = read_results(out_dir)
    rank = {pid: i for i, pid in enumerate(order or [])}
    rows.sort(key=lambda r: (rank.get(str(r["prompt_id"]), len(rank)), str(r["prompt_id"]), int(r["seed"]), str(r["variant"])))
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True, allow_nan=False) + "\n" for r in rows)
    path = out_dir / RESULTS_NAME
    atomic_write_text(path, text)
    return path


def _diff(stored: Any, current: Any, prefix: str = "") -> list[str]:
    if isinstance(stored, dict) and isinstance(current, dict):
        out = []
        for k in sorted(set(stored) | set(current), key=str):
            name = f"{prefix}.{k}" if prefix else str(k)
            if k not in stored:
                out.append(f"{name}: not stored, now {current[k]!r}")
            elif k not in current:
                out.append(f"{name}: stored {stored[k]!r}, now absent")
            else:
                out.extend(_diff(stored[k], current[k], name))
        return out
    if stored != current:
        return [f"{prefix}: stored {stored!r}, now {current!r}"]
    return []


def check_settings(out_dir: str | os.PathLike, settings: dict[str, Any]) -> bool:
    """Compare ``settings`` with ``out_dir/settings.json``.

    Returns:
        `True` when the folder already holds these settings (resume), `False` when it has none yet.

    Raises:
        SettingsMismatchError: the stored settings differ; the message lists each difference and
            the two ways out (a new ``--out``, or the stored settings).
    """
    path = Path(out_dir) / SETTINGS_NAME
    if not path.is_file():
        return False
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))["settings"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SettingsMismatchError(
            f"`--out`={str(out_dir)!r} holds an unreadable {SETTINGS_NAME} ({e}). Use a new `--out` folder."
        ) from e
    current = json.loads(json.dumps(settings))  # normalise tuples -> lists like the stored JSON
    diffs = _diff(stored, current)
    if diffs:
        raise SettingsMismatchError(
            f"`--out`={str(out_dir)!r} holds results produced with different settings, so they cannot be resumed or mixed:\n  "
            + "\n  ".join(diffs)
            + f"\nUse a new `--out` folder for these settings, or rerun with the stored settings (see {path}) to resume."
        )
    return True


def write_settings(out_dir: str | os.PathLike, settings: dict[str, Any], protocol: dict[str, Any] | None = None) -> Path:
    """Write ``{"settings": ..., "protocol": ...}`` to ``out_dir/settings.json`` atomically.

    ``settings`` are compared on every rerun; ``protocol`` is descriptive (resolved scheduler,
    scorer descriptions, package versions) and is replaced by the latest run's.
    """
    path = Path(out_dir) / SETTINGS_NAME
    atomic_write_text(path, json.dumps({"settings": settings, "protocol": protocol or {}}, indent=2, sort_keys=True) + "\n")
    return path
