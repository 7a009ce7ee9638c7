"""Prompt readers for the generation-rate evaluation.

Supported inputs (``format="auto"`` picks one from the extension and the columns):

* **I2P** CSV (``AIML-TUDA/i2p``): ``prompt``, comma-separated ``categories``, ``hard``,
  ``inappropriate_percentage``, ``nudity_percentage``, ``sd_seed``, ``sd_guidance_scale``,
  ``sd_image_width``, ``sd_image_height``.
* **NSFWCaps** (CSV/JSONL): the prompt is ``nsfw_caption``.
* **ViSU** (CSV/JSONL): the prompt is ``nsfw``, the category ``tag``.
* **JSONL** / **JSON** (a list of objects): the prompt is the first present of ``prompt``,
  ``nsfw_caption``, ``nsfw``, ``text``, ``caption``; categories from ``categories``, ``category``
  or ``tag`` (a list or a comma-separated string).
* **plain text**: one prompt a line (blank lines skipped), category ``uncategorized``.

Every prompt gets a stable ``prompt_id``: the file's ``prompt_id``/``id`` column when present,
else its 0-based row index in the file (so ids do not change with ``categories``/``limit``).

Files are read as UTF-8 (a BOM is allowed); any other encoding is an error naming the file, the
line and the fix (``iconv``). Empty or whitespace-only prompts are skipped with a warning; NUL
bytes inside a prompt are removed with a warning (tokenizers would otherwise see them).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..fileio import read_jsonl

logger = logging.getLogger(__name__)

__all__ = ["FORMATS", "PROMPT_COLUMNS", "UNCATEGORIZED", "PromptRecord", "file_sha256", "load_prompts"]

#: Accepted values of ``format``.
FORMATS = ("auto", "i2p", "nsfwcaps", "visu", "jsonl", "json", "csv", "text")
#: Columns recognised as the prompt, in order of preference (``auto``).
PROMPT_COLUMNS = ("prompt", "nsfw_caption", "nsfw", "text", "caption")
_FORMAT_PROMPT_COLUMN = {"i2p": "prompt", "nsfwcaps": "nsfw_caption", "visu": "nsfw"}
_CATEGORY_COLUMNS = ("categories", "category", "tag")
_ID_COLUMNS = ("prompt_id", "id")
#: Category of prompts whose file carries none.
UNCATEGORIZED = "uncategorized"
_TEXT_SUFFIXES = (".txt", ".text", ".prompts")


@dataclass(frozen=True)
class PromptRecord:
    """One evaluation prompt.

    Args:
        prompt_id: stable identifier (file id column, else the 0-based row index).
        prompt: the text.
        categories: categories it belongs to (at least one).
        hard: I2P's ``hard`` flag when present.
        seed, guidance_scale, width, height: I2P's ``sd_seed``, ``sd_guidance_scale``,
            ``sd_image_width``, ``sd_image_height`` when present (used with ``--use_prompt_settings``).
        extra: the other columns of the row (strings), kept for reference.
    """

    prompt_id: str
    prompt: str
    categories: tuple[str, ...]
    hard: bool | None = None
    seed: int | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (recorded in the evaluation settings)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _detect_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in _TEXT_SUFFIXES:
        return "text"
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".json":
        return "json"
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix == ".parquet":
        return "parquet"
    raise ValueError(
        f"`--prompts`={str(path)!r}: cannot tell the format from the extension {suffix!r}. "
        "Use a .csv (I2P, NSFWCaps, ViSU), .jsonl, .json, .parquet or .txt file, or pass `--prompt_format`."
    )


def _read_rows(path: Path, kind: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows as dicts and the column names, for the tabular kinds."""
    if kind in ("csv", "i2p", "nsfwcaps", "visu") and path.suffix.lower() in (".jsonl", ".json"):
        kind = "jsonl" if path.suffix.lower() == ".jsonl" else "json"
    if kind in ("csv", "i2p", "nsfwcaps", "visu"):
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        with open(path, newline="", encoding="utf-8-sig") as f:
            delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
            reader = csv.DictReader(f, delimiter=delimiter)
            rows = [dict(r) for r in reader]
            columns = list(reader.fieldnames or [])
        return rows, columns
    if kind == "jsonl":
        rows = read_jsonl(path, argument="--prompts")
    elif kind == "json":
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
        if isinstance(obj, dict):  # {"data": [...]} or {"prompts": [...]}
            lists = [v for v in obj.values() if isinstance(v, list)]
            obj = lists[0] if len(lists) == 1 else None
        if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
            raise ValueError(f"`--prompts`={str(path)!r}: expected a JSON list of objects (one per prompt).")
        rows = obj
    elif kind == "parquet":
        import pandas as pd

        rows = pd.read_parquet(path).to_dict(orient="records")
    else:  # pragma: no cover - guarded by the caller
        raise ValueError(f"unknown tabular kind {kind!r}")
    columns: list[str] = []
    for r in rows:
        for k in r:
            if k not in columns:
                columns.append(k)
    return rows, columns


def _split_categories(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        parts: Iterable[Any] = value
    else:
        text = str(value).strip()
        if text.lower() in ("", "nan", "none"):
            return ()
        parts = text.split(",")
    out = []
    for p in parts:
        p = str(p).strip()
        if p and p not in out:
            out.append(p)
    return tuple(out)


def _to_int(value: Any) -> int | None:
    f = _to_float(value)
    return None if f is None or f in (float("inf"), float("-inf")) else int(f)


def _to_float(value: Any) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "nan", "none")):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return None if f != f else f


def _to_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in ("1", "1.0", "true", "yes"):
        return True
    if text in ("0", "0.0", "false", "no"):
        return False
    return None


def _prompt_column(path: Path, kind: str, columns: Sequence[str], prompt_column: str | None) -> str:
    if prompt_column is not None:
        if prompt_column not in columns:
            raise ValueError(
                f"`--prompt_column`={prompt_column!r} is not a column of {str(path)!r}; its columns are {list(columns)}."
            )
        return prompt_column
    wanted = _FORMAT_PROMPT_COLUMN.get(kind)
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(
                f"`--prompt_format`={kind!r} expects a {wanted!r} column, but {str(path)!r} has the columns {list(columns)}. "
                "Pass `--prompt_column NAME` or the right `--prompt_format`."
            )
        return wanted
    for name in PROMPT_COLUMNS:
        if name in columns:
            return name
    raise ValueError(
        f"`--prompts`={str(path)!r} has no recognised prompt column: its columns are {list(columns)}, "
        f"expected one of {list(PROMPT_COLUMNS)}. Pass `--prompt_column NAME` to name it."
    )


def _read_records(path: Path, kind: str, prompt_column: str | None) -> list[PromptRecord]:
    """Every non-empty prompt of the file, in file order (before any category filter)."""
    records: list[PromptRecord] = []
    if kind == "text":
        with open(path, encoding="utf-8-sig") as f:
            for index, line in enumerate(f):
                text = _clean_prompt(line, path, index)
                if text:
                    records.append(PromptRecord(prompt_id=str(index), prompt=text, categories=(UNCATEGORIZED,)))
    else:
        rows, columns = _read_rows(path, kind)
        if not rows:
            raise ValueError(f"`--prompts`={str(path)!r} has a header but no rows; it must hold at least one prompt.")
        column = _prompt_column(path, kind, columns, prompt_column)
        category_column = next((c for c in _CATEGORY_COLUMNS if c in columns), None)
        id_column = next((c for c in _ID_COLUMNS if c in columns), None)
        known = {column, category_column, id_column, "hard", "sd_seed", "sd_guidance_scale", "sd_image_width", "sd_image_height"}
        for index, row in enumerate(rows):
            text = row.get(column)
            text = "" if text is None or (isinstance(text, float) and text != text) else _clean_prompt(str(text), path, index)
            if not text:
                logger.warning("Skipping row %d of %s: empty %r.", index, path, column)
                continue
            cats = _split_categories(row.get(category_column)) if category_column else ()
            records.append(
                PromptRecord(
                    prompt_id=str(row[id_column]) if id_column and row.get(id_column) not in (None, "") else str(index),
                    prompt=text,
                    categories=cats or (UNCATEGORIZED,),
                    hard=_to_bool(row.get("hard")),
                    seed=_to_int(row.get("sd_seed")),
                    guidance_scale=_to_float(row.get("sd_guidance_scale")),
                    width=_to_int(row.get("sd_image_width")),
                    height=_to_int(row.get("sd_image_height")),
                    extra={k: v for k, v in row.items() if k not in known},
                )
            )
    return records


def _clean_prompt(text: str, path: Path, index: int) -> str:
    if "\x00" in text:
        logger.warning("Row %d of %s: removed NUL bytes from the prompt.", index, path)
        text = text.replace("\x00", "")
    return text.strip()


def _not_utf8_message(path: Path, error: UnicodeDecodeError) -> str:
    """Where the first non-UTF-8 byte of ``path`` is, and how to convert the file."""
    data = path.read_bytes()
    try:
        data.decode("utf-8-sig")
        where = ""
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        where = f" at line {line}, byte {e.start} ({data[e.start : e.start + 1]!r})"
    converted = path.with_name(f"{path.stem}.utf8{path.suffix}")
    return (
        f"`--prompts`={str(path)!r} is not UTF-8 text ({error.reason}{where}). Convert it to UTF-8 and pass the new file, "
        f"e.g. `iconv -f latin1 -t utf-8 {str(path)!r} > {str(converted)!r}` (use the file's real encoding for -f)."
    )


def load_prompts(
    path: str | os.PathLike,
    format: str = "auto",
    categories: Sequence[str] | None = None,
    limit: int | None = None,
    prompt_column: str | None = None,
) -> list[PromptRecord]:
    """Read an evaluation prompt file.

    Args:
        path: the prompt file (``.csv``, ``.tsv``, ``.jsonl``, ``.json``, ``.parquet`` or ``.txt``).
        format: one of :data:`FORMATS`; ``"auto"`` decides from the extension and the columns.
        categories: keep only prompts in at least one of these categories; each kept prompt's
            categories are reduced to these. A name not present in the file is an error that lists
            the categories present.
        limit: keep the first ``limit`` prompts (after the category filter).
        prompt_column: the column holding the prompt, overriding the recognised names.

    Returns:
        `list[PromptRecord]` in file order.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is empty, unreadable, not UTF-8, has no recognised prompt column,
            duplicate ids, an unknown category was asked for, or ``limit`` is not positive.
    """
    if format not in FORMATS:
        raise ValueError(f"`--prompt_format`={format!r} is not supported; choose one of {list(FORMATS)}.")
    if limit is not None and limit <= 0:
        raise ValueError(f"`--limit` must be a positive number of prompts, got {limit}.")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"`--prompts`={str(path)!r} does not exist or is not a file. Pass a prompt file, e.g. assets/prompts/mild_unsafe.csv."
        )
    if path.stat().st_size == 0:
        raise ValueError(f"`--prompts`={str(path)!r} is empty; it must hold at least one prompt.")
    kind = _detect_format(path) if format == "auto" else format
    try:
        records = _read_records(path, kind, prompt_column)
    except UnicodeDecodeError as e:
        raise ValueError(_not_utf8_message(path, e)) from None
    except csv.Error as e:
        raise ValueError(f"`--prompts`={str(path)!r} is not a valid CSV file ({e}); fix the file or pass the right `--prompt_format`.") from None
    except (PermissionError, IsADirectoryError) as e:
        raise ValueError(f"`--prompts`={str(path)!r} cannot be read ({e.strerror or e}); check the file and its permissions.") from None
    if not records:
        raise ValueError(f"`--prompts`={str(path)!r} holds no non-empty prompt.")
    seen: set[str] = set()
    for r in records:
        if r.prompt_id in seen:
            raise ValueError(f"`--prompts`={str(path)!r}: prompt id {r.prompt_id!r} occurs more than once; ids must be unique.")
        seen.add(r.prompt_id)

    if categories:
        present = sorted({c for r in records for c in r.categories})
        unknown = [c for c in categories if c not in present]
        if unknown:
            raise ValueError(f"`--categories`: {unknown} not found in {str(path)!r}; the categories present are {present}.")
        wanted = list(dict.fromkeys(categories))
        filtered = []
        for r in records:
            keep = tuple(c for c in r.categories if c in wanted)
            if keep:
                filtered.append(dataclasses.replace(r, categories=keep))
        records = filtered
    if limit is not None:
        records = records[:limit]
    return records
