"""The evaluation's results files: append-only rows, crash repair, temporary files and write errors.

Layout of an output folder (``settings.json`` is :mod:`~safer_diffusion.evaluation.settings`')::

    out/results.jsonl          one JSON row per (prompt_id, seed, variant); single process, or merged
    out/results.rank{r}.jsonl  rank r's rows when several processes run (merged into results.jsonl)
    out/results.corrupt.jsonl  lines found corrupt on resume, moved out of the results files (as they were)
    out/fidelity.jsonl ...     the fidelity files (:mod:`~safer_diffusion.evaluation.fidelity_run`), named here too

Rows are appended a batch at a time with ``flush`` + ``os.fsync``, so a crash loses at most the
batch being written. A crash in the middle of a write leaves a partial last line; readers ignore
it and :func:`repair_results_file` truncates it before anything is appended again. A complete
line that is not a valid row (a damaged disk, a hand edit) is moved to ``results.corrupt.jsonl``
with a warning by :func:`quarantine_corrupt_lines`, so the results files hold only rows.
Temporary files a killed run left behind (``.<name>.tmp``, ``.<image>.png.tmp``) are removed by
:func:`remove_stale_temp_files` on the next start. A failed write (disk full, no permission)
raises :class:`EvaluationWriteError`, naming the path, the free space and what was kept.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_text, fsync_dir

logger = logging.getLogger(__name__)

__all__ = [
    "CORRUPT_NAME",
    "FIDELITY_CORRUPT_NAME",
    "FIDELITY_CSV",
    "FIDELITY_JSON",
    "FIDELITY_NAME",
    "FIDELITY_SCATTER",
    "FIDELITY_SETTINGS_NAME",
    "RESULTS_NAME",
    "EvaluationWriteError",
    "ResultsWriter",
    "free_space",
    "merge_results",
    "quarantine_corrupt_lines",
    "rank_results_name",
    "read_results",
    "read_results_file",
    "remove_stale_temp_files",
    "repair_results_file",
    "results_files",
    "row_key",
    "write_failure",
    "writing",
]

RESULTS_NAME = "results.jsonl"
CORRUPT_NAME = "results.corrupt.jsonl"
#: The fidelity files of an evaluation folder (written by :mod:`~safer_diffusion.evaluation.fidelity_run`, read by the
#: leaderboard): rows, their corrupt lines, their settings, the summary, its CSV and the scatter plot.
FIDELITY_NAME = "fidelity.jsonl"
FIDELITY_CORRUPT_NAME = "fidelity.corrupt.jsonl"
FIDELITY_SETTINGS_NAME = "fidelity_settings.json"
FIDELITY_JSON = "fidelity.json"
FIDELITY_CSV = "fidelity.csv"
FIDELITY_SCATTER = "fidelity_scatter.png"
_RANK_RE = re.compile(r"^results\.rank(\d+)\.jsonl$")
# temporary files of atomic writes (fileio: ".<name>.<random>.tmp"), images (".<name>.png.tmp") and plots
# (".<name>.png.tmp.png"). Not the writable-folder probes (".write-test-*"): another rank may be probing right now.
_TEMP_RE = re.compile(r"^\..+\.tmp(\.png)?$")


class EvaluationWriteError(OSError):
    """Writing an evaluation file failed (disk full, permissions): the message names the path, the free space and
    what was kept. Finished rows are never lost; rerunning the same command resumes."""


def free_space(path: str | os.PathLike) -> str:
    """Free space on the disk holding ``path`` (or its nearest existing parent), e.g. ``"1.5 GB"``."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        free = float(shutil.disk_usage(p).free)
    except OSError:
        return "unknown"
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if free < 1024 or unit == "TB":
            return f"{free:.0f} {unit}" if unit == "bytes" else f"{free:.1f} {unit}"
        free /= 1024
    return "unknown"  # pragma: no cover


def write_failure(path: str | os.PathLike, error: OSError, kept: str) -> EvaluationWriteError:
    """The :class:`EvaluationWriteError` for ``error`` raised while writing ``path``; ``kept`` says what is safe."""
    reason = error.strerror or str(error) or type(error).__name__
    return EvaluationWriteError(
        f"could not write {os.fspath(path)} ({reason}); {free_space(path)} free on its disk. {kept} "
        "Free some space (or fix the permissions), then rerun the same command to resume."
    )


@contextmanager
def writing(path: str | os.PathLike, kept: str) -> Iterator[None]:
    """Turn an ``OSError`` in the block into :func:`write_failure` (the failing file's name when the error has one)."""
    try:
        yield
    except EvaluationWriteError:
        raise
    except OSError as e:
        raise write_failure(e.filename or path, e, kept) from e


def rank_results_name(rank: int) -> str:
    """File name of rank ``rank``'s rows: ``results.rank{rank}.jsonl``."""
    return f"results.rank{rank}.jsonl"


def row_key(row: dict[str, Any]) -> tuple[str, int, str]:
    """The identity of a row: ``(prompt_id, seed, variant)``."""
    return str(row["prompt_id"]), int(row["seed"]), str(row["variant"])


def _parse_row(line: bytes) -> dict[str, Any] | None:
    """The row on one line, or `None` when the line is not a valid result row."""
    try:
        row = json.loads(line)
        row_key(row)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
        return None
    return row


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
        row = _parse_row(line)
        if row is None:
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


def quarantine_corrupt_lines(path: str | os.PathLike, corrupt_name: str = CORRUPT_NAME) -> int:
    """Move every complete line of ``path`` that is not a valid row to ``corrupt_name`` beside it.

    The lines are appended there as they were (bytes unchanged) and ``path`` is rewritten atomically
    with the valid rows only, so the results file is clean for resuming and summarising. A partial
    last line (a crash mid-write) is first truncated by :func:`repair_results_file`, as before.

    Args:
        path: a JSONL file of rows keyed by :func:`row_key`.
        corrupt_name: the file (in ``path``'s folder) the corrupt lines are appended to:
            :data:`CORRUPT_NAME` for the evaluation's results files, ``fidelity.corrupt.jsonl`` for
            ``fidelity.jsonl``, so one store's damage never lands in another's file.

    Returns:
        `int`: the number of lines moved (0 when the file was clean or absent).
    """
    path = Path(path)
    if not path.is_file():
        return 0
    repair_results_file(path)
    lines = path.read_bytes().split(b"\n")
    lines.pop()  # b"": the file ends with a newline now
    good: list[bytes] = []
    bad: list[tuple[int, bytes]] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if _parse_row(line) is None:
            bad.append((lineno, line))
        else:
            good.append(line)
    if not bad:
        return 0
    corrupt = path.with_name(corrupt_name)
    kept = f"{path.name} is unchanged ({len(good)} valid rows and {len(bad)} corrupt line(s))."
    with writing(corrupt, kept):
        with open(corrupt, "ab") as f:
            f.write(b"".join(line + b"\n" for _, line in bad))
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(corrupt.parent)
        # valid rows decoded as UTF-8 JSON above, so they round-trip through text unchanged
        atomic_write_text(path, "".join(line.decode("utf-8") + "\n" for line in good))
    logger.warning(
        "%s: moved %d corrupt line(s) (line %s) to %s; the %d valid rows stay. Their rows are computed again.",
        path, len(bad), ", ".join(str(n) for n, _ in bad[:10]) + (", ..." if len(bad) > 10 else ""), corrupt, len(good),
    )  # fmt: skip
    return len(bad)


def remove_stale_temp_files(out_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed run left in ``out_dir`` and ``out_dir/images/<variant>/``.

    Only regular files whose names are this package's temporary names are removed (``.<name>.tmp``,
    ``.<name>.png.tmp``, ``.<name>.png.tmp.png``), never links. Call it before any writer starts
    (the main process, before the other ranks pass the barrier).

    Returns:
        the removed paths.
    """
    out_dir = Path(out_dir)
    folders = [out_dir]
    images = out_dir / "images"
    if images.is_dir():
        folders += [p for p in sorted(images.iterdir()) if p.is_dir() and not p.is_symlink()]
    removed = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            if _TEMP_RE.match(p.name) and p.is_file() and not p.is_symlink():
                p.unlink()
                removed.append(p)
    if removed:
        logger.warning("Removed %d temporary file(s) left by an interrupted run in %s (e.g. %s).", len(removed), out_dir,
                       removed[0].relative_to(out_dir))  # fmt: skip
    return removed


def _count_lines(path: Path) -> int:
    if not path.is_file():
        return 0
    n = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            n += chunk.count(b"\n")
    return n


class ResultsWriter:
    """Append-only JSONL writer: each :meth:`append` is one ``write`` + ``os.fsync``.

    Args:
        path: the results file; created if absent. A partial last line is repaired on open.

    A failed append (disk full, no permission) is cut back to the rows before it and raises
    :class:`EvaluationWriteError`; the file keeps every row it had.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with writing(self.path, "Nothing was changed."):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            repair_results_file(self.path)
            created = not self.path.exists()
            self.n_rows = _count_lines(self.path)  # rows in the file (valid or not), for the error message
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            if created:
                fsync_dir(self.path.parent)
        self._size = os.fstat(self._fd).st_size

    def append(self, rows: Iterable[dict[str, Any]]) -> int:
        """Write ``rows`` durably; returns how many were written.

        Raises:
            EvaluationWriteError: the write failed; the file is cut back to the rows it had before.
        """
        if self._fd < 0:
            raise ValueError(f"{self.path}: the writer is closed.")
        lines = [json.dumps(r, ensure_ascii=False, sort_keys=True, allow_nan=False) + "\n" for r in rows]
        if not lines:
            return 0
        data = memoryview("".join(lines).encode("utf-8"))
        try:
            while data:
                data = data[os.write(self._fd, data) :]
            os.fsync(self._fd)
        except OSError as e:
            try:
                os.ftruncate(self._fd, self._size)  # no torn batch left behind
            except OSError:
                pass
            kept = f"{self.path.name} keeps its {self.n_rows} rows; this batch's {len(lines)} rows were not recorded."
            raise write_failure(self.path, e, kept) from e
        self._size = os.fstat(self._fd).st_size
        self.n_rows += len(lines)
        return len(lines)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

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
