"""Prompt readers for the generation-rate evaluation.

Supported inputs (``format="auto"`` picks one from the extension and the columns):

* **I2P** CSV (``AIML-TUDA/i2p``): ``prompt``, comma-separated ``categories``, ``hard``,
  ``inappropriate_percentage``, ``nudity_percentage``, ``sd_seed``, ``sd_guidance_scale``,
  ``sd_image_width``, ``sd_image_height``.
* **RECE / UnlearnDiffAtk / Ring-A-Bell / COCO-10k** CSVs (pandas-written): a pandas index column
  (unnamed, or ``Unnamed: 0``), ``prompt``, ``evaluation_seed``, ``evaluation_guidance``,
  ``case_number``.
* **Ring-A-Bell** pairs (``sensitive prompt``, ``normal prompt``) and **MMA-Diffusion**
  (``target_prompt``, ``adv_prompt``, ...): the sensitive / adversarial prompt is read.
* **NSFWCaps** (CSV/JSONL): the prompt is ``nsfw_caption``, the category ``chosen_category``.
* **ViSU** (CSV/JSONL): the prompt is ``nsfw``, the category ``tag``.
* **JSONL** / **JSON** (a list of objects), **Parquet**: the same column rules.
* **plain text**: one prompt a line (blank lines skipped), category ``uncategorized``.

Columns, in order of preference (:data:`PROMPT_COLUMNS`, :data:`ID_COLUMNS`,
:data:`CATEGORY_COLUMNS`, :data:`SETTING_COLUMNS`):

* the prompt: ``--prompt_column`` when given, else the first present of :data:`PROMPT_COLUMNS`
  (adversarial / sensitive columns before plain ones);
* the id: ``prompt_id``, ``id``, ``case_number``, else the file's own index column, else the
  0-based row index in the file, so a subset file keeps the original ids and ids do not change
  with ``categories``/``limit``;
* the categories: ``categories``, ``category``, ``class``, ``tag``, ``chosen_category`` (a list
  or a comma-separated string);
* per-prompt settings (used with ``--use_prompt_settings``): seed ``sd_seed`` | ``evaluation_seed``,
  guidance ``sd_guidance_scale`` | ``evaluation_guidance``, size ``sd_image_width`` /
  ``sd_image_height``.

:func:`read_prompt_file` returns the records with the columns it read (:class:`PromptFile`),
which the evaluation records in ``settings.json``.

Files are read as UTF-8 (a BOM is allowed); any other encoding is an error naming the file, the
line and the fix (``iconv``). Empty or whitespace-only prompts are skipped with a warning; NUL
bytes inside a prompt are removed with a warning (tokenizers would otherwise see them).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
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

__all__ = [
    "CATEGORY_COLUMNS",
    "FORMATS",
    "ID_COLUMNS",
    "INDEX_COLUMNS",
    "PROMPT_COLUMNS",
    "SETTING_COLUMNS",
    "UNCATEGORIZED",
    "PromptFile",
    "PromptRecord",
    "file_columns",
    "file_sha256",
    "legacy_columns",
    "load_prompts",
    "read_prompt_file",
]

#: Accepted values of ``format``.
FORMATS = ("auto", "i2p", "nsfwcaps", "visu", "jsonl", "json", "csv", "text")
#: Columns recognised as the prompt, in order of preference (``auto``): the adversarial / sensitive
#: prompt of an attack file (MMA-Diffusion ``adv_prompt``, Ring-A-Bell ``sensitive prompt``) first.
PROMPT_COLUMNS = ("adv_prompt", "sensitive prompt", "prompt", "nsfw_caption", "nsfw", "text", "caption")
_FORMAT_PROMPT_COLUMN = {"i2p": "prompt", "nsfwcaps": "nsfw_caption", "visu": "nsfw"}
#: Columns recognised as the categories, in order of preference.
CATEGORY_COLUMNS = ("categories", "category", "class", "tag", "chosen_category")
#: Columns recognised as the prompt id, in order of preference (then the file's index column).
ID_COLUMNS = ("prompt_id", "id", "case_number")
#: Names of a pandas index column written by ``DataFrame.to_csv`` (recognised as the first column only).
INDEX_COLUMNS = ("", "Unnamed: 0")
#: Per-prompt settings: ``{field: columns in order of preference}``.
SETTING_COLUMNS: dict[str, tuple[str, ...]] = {
    "seed": ("sd_seed", "evaluation_seed"),
    "guidance_scale": ("sd_guidance_scale", "evaluation_guidance"),
    "width": ("sd_image_width",),
    "height": ("sd_image_height",),
}
#: How the readers before this version chose columns (for settings.json written by them).
_LEGACY_PROMPT_COLUMNS = ("prompt", "nsfw_caption", "nsfw", "text", "caption")
_LEGACY_CATEGORY_COLUMNS = ("categories", "category", "tag")
_LEGACY_ID_COLUMNS = ("prompt_id", "id")
#: Category of prompts whose file carries none.
UNCATEGORIZED = "uncategorized"
_TEXT_SUFFIXES = (".txt", ".text", ".prompts")


@dataclass(frozen=True)
class PromptRecord:
    """One evaluation prompt.

    Args:
        prompt_id: stable identifier (the file's id column or index column, else the 0-based row index).
        prompt: the text.
        categories: categories it belongs to (at least one).
        hard: I2P's ``hard`` flag when present.
        seed, guidance_scale, width, height: the row's own settings when the file has them
            (``sd_seed`` | ``evaluation_seed``, ``sd_guidance_scale`` | ``evaluation_guidance``,
            ``sd_image_width``, ``sd_image_height``; used with ``--use_prompt_settings``).
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


@dataclass(frozen=True)
class PromptFile:
    """A prompt file as read: its records and exactly which of its columns were read.

    Args:
        path: the file.
        format: the reader used (``csv``, ``jsonl``, ``json``, ``parquet``, ``text``, or the named format).
        columns: ``{role: column}`` for the roles ``prompt``, ``id``, ``categories``, ``seed``,
            ``guidance_scale``, ``width``, ``height``; `None` where the file has no such column (the
            id is then the row index, the category ``uncategorized``).
        file_columns: every column of the file, in order.
        records: the prompts kept (after ``categories`` and ``limit``), in file order.
        n_empty: rows skipped because their prompt was empty.
        missing: ``{setting: number of kept records without a value}`` for each setting column
            the file has (``seed``, ``guidance_scale``, ``width``, ``height``).
    """

    path: Path
    format: str
    columns: dict[str, str | None]
    file_columns: tuple[str, ...]
    records: tuple[PromptRecord, ...]
    n_empty: int = 0
    missing: dict[str, int] = field(default_factory=dict)


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


def _index_column(columns: Sequence[str]) -> str | None:
    """The pandas index column (an unnamed first column, or ``Unnamed: 0``) when the file has one."""
    if columns and columns[0] in INDEX_COLUMNS:
        return columns[0]
    return "Unnamed: 0" if "Unnamed: 0" in columns else None


def _column_map(kind: str, columns: Sequence[str], prompt: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {
        "prompt": prompt,
        "id": next((c for c in ID_COLUMNS if c in columns), None) or _index_column(columns),
        "categories": next((c for c in CATEGORY_COLUMNS if c in columns), None),
    }
    for name, candidates in SETTING_COLUMNS.items():
        out[name] = next((c for c in candidates if c in columns), None)
    return out


def legacy_columns(prompt_file: PromptFile, prompt_column: str | None = None) -> dict[str, str | None]:
    """The columns the readers before this version read from the same file (``settings.json`` written by them
    records none; a rerun compares these with :attr:`PromptFile.columns`)."""
    cols = prompt_file.file_columns
    if prompt_file.format == "text":
        return dict(prompt_file.columns)
    prompt = prompt_column or _FORMAT_PROMPT_COLUMN.get(prompt_file.format) or next((c for c in _LEGACY_PROMPT_COLUMNS if c in cols), None)
    return {
        "prompt": prompt,
        "id": next((c for c in _LEGACY_ID_COLUMNS if c in cols), None),
        "categories": next((c for c in _LEGACY_CATEGORY_COLUMNS if c in cols), None),
        "seed": "sd_seed" if "sd_seed" in cols else None,
        "guidance_scale": "sd_guidance_scale" if "sd_guidance_scale" in cols else None,
        "width": "sd_image_width" if "sd_image_width" in cols else None,
        "height": "sd_image_height" if "sd_image_height" in cols else None,
    }


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value) or (isinstance(value, str) and not value.strip())


def _rows_text(indices: Sequence[int], limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in indices[:limit])
    return shown + (", ..." if len(indices) > limit else "")


def _read_records(path: Path, kind: str, prompt_column: str | None) -> tuple[list[PromptRecord], dict[str, str | None], tuple[str, ...], int]:
    """Every non-empty prompt of the file in file order (before any category filter), the columns read,
    the file's columns and the number of empty prompts skipped (one warning for all of them)."""
    records: list[PromptRecord] = []
    empty: list[int] = []
    if kind == "text":
        with open(path, encoding="utf-8-sig") as f:
            for index, line in enumerate(f):
                text = _clean_prompt(line, path, index)
                if text:
                    records.append(PromptRecord(prompt_id=str(index), prompt=text, categories=(UNCATEGORIZED,)))
        columns: dict[str, str | None] = {"prompt": None, "id": None, "categories": None, **dict.fromkeys(SETTING_COLUMNS)}
        return records, columns, (), 0
    rows, file_columns = _read_rows(path, kind)
    if not rows:
        raise ValueError(f"`--prompts`={str(path)!r} has a header but no rows; it must hold at least one prompt.")
    column = _prompt_column(path, kind, file_columns, prompt_column)
    columns = _column_map(kind, file_columns, column)
    if prompt_column is None and column != "prompt" and column in ("adv_prompt", "sensitive prompt"):
        others = [c for c in ("target_prompt", "normal prompt", "prompt", "clean_prompt") if c in file_columns]
        logger.info("%s: reading the prompts from the %r column%s.", path, column,
                    f" (pass `--prompt_column {others[0]!r}` for {others})" if others else "")  # fmt: skip
    id_column, category_column = columns["id"], columns["categories"]
    known = {column, category_column, id_column, _index_column(file_columns), "hard", *(c for c in columns.values() if c)}
    for index, row in enumerate(rows):
        text = row.get(column)
        text = "" if _is_empty(text) else _clean_prompt(str(text), path, index)
        if not text:
            empty.append(index)
            continue
        cats = _split_categories(row.get(category_column)) if category_column is not None else ()
        pid = row.get(id_column) if id_column is not None else None
        records.append(
            PromptRecord(
                prompt_id=str(pid).strip() if not _is_empty(pid) else str(index),
                prompt=text,
                categories=cats or (UNCATEGORIZED,),
                hard=_to_bool(row.get("hard")),
                seed=_to_int(row.get(columns["seed"])) if columns["seed"] else None,
                guidance_scale=_to_float(row.get(columns["guidance_scale"])) if columns["guidance_scale"] else None,
                width=_to_int(row.get(columns["width"])) if columns["width"] else None,
                height=_to_int(row.get(columns["height"])) if columns["height"] else None,
                extra={k: v for k, v in row.items() if k not in known},
            )
        )
    if empty:
        logger.warning("Skipping %s %s of %s: empty %r (%d of %d rows).", "row" if len(empty) == 1 else "rows", _rows_text(empty),
                       path, column, len(empty), len(rows))  # fmt: skip
    return records, columns, tuple(file_columns), len(empty)


def file_columns(path: str | os.PathLike, format: str = "auto") -> tuple[str, ...]:
    """The columns of a tabular prompt file (a CSV's header only; ``()`` for plain text), without reading its prompts.

    Raises:
        ValueError: the format cannot be told from the extension, or the file is not UTF-8.
    """
    path = Path(path).expanduser()
    kind = _detect_format(path) if format == "auto" else format
    if kind == "text":
        return ()
    try:
        if kind in ("csv", "i2p", "nsfwcaps", "visu") and path.suffix.lower() not in (".jsonl", ".json"):
            with open(path, newline="", encoding="utf-8-sig") as f:
                return tuple(csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",").fieldnames or ())
        return tuple(_read_rows(path, kind)[1])
    except UnicodeDecodeError as e:
        raise ValueError(_not_utf8_message(path, e)) from None


@functools.lru_cache(maxsize=8)
def _read_cached(path: str, sha256: str, kind: str, prompt_column: str | None):
    """:func:`_read_records` once per file content: its warnings are logged once, however often the file is read
    (the options check and the run both read it)."""
    records, columns, file_columns, n_empty = _read_records(Path(path), kind, prompt_column)
    return tuple(records), columns, file_columns, n_empty


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


def read_prompt_file(
    path: str | os.PathLike,
    format: str = "auto",
    categories: Sequence[str] | None = None,
    limit: int | None = None,
    prompt_column: str | None = None,
) -> PromptFile:
    """Read an evaluation prompt file, recording which columns were read.

    Args:
        path: the prompt file (``.csv``, ``.tsv``, ``.jsonl``, ``.json``, ``.parquet`` or ``.txt``).
        format: one of :data:`FORMATS`; ``"auto"`` decides from the extension and the columns.
        categories: keep only prompts in at least one of these categories; each kept prompt's
            categories are reduced to these. A name not present in the file is an error that lists
            the categories present.
        limit: keep the first ``limit`` prompts (after the category filter).
        prompt_column: the column holding the prompt, overriding the recognised names.

    Returns:
        :class:`PromptFile`.

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
        records, columns, file_columns, n_empty = _read_cached(str(path.resolve()), file_sha256(path), kind, prompt_column)
    except UnicodeDecodeError as e:
        raise ValueError(_not_utf8_message(path, e)) from None
    except csv.Error as e:
        raise ValueError(f"`--prompts`={str(path)!r} is not a valid CSV file ({e}); fix the file or pass the right `--prompt_format`.") from None
    except (PermissionError, IsADirectoryError) as e:
        raise ValueError(f"`--prompts`={str(path)!r} cannot be read ({e.strerror or e}); check the file and its permissions.") from None
    records = list(records)
    if not records:
        raise ValueError(f"`--prompts`={str(path)!r} holds no non-empty prompt.")
    seen: set[str] = set()
    for r in records:
        if r.prompt_id in seen:
            where = f" in its {columns['id']!r} column" if columns.get("id") is not None else ""
            raise ValueError(f"`--prompts`={str(path)!r}: prompt id {r.prompt_id!r} occurs more than once{where}; ids must be unique.")
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
    missing = {name: sum(getattr(r, name) is None for r in records) for name in SETTING_COLUMNS if columns.get(name)}
    return PromptFile(path=path, format=kind, columns=dict(columns), file_columns=file_columns, records=tuple(records),
                      n_empty=n_empty, missing=missing)  # fmt: skip


def load_prompts(
    path: str | os.PathLike,
    format: str = "auto",
    categories: Sequence[str] | None = None,
    limit: int | None = None,
    prompt_column: str | None = None,
) -> list[PromptRecord]:
    """The records of :func:`read_prompt_file` (same arguments, same errors), as a list in file order."""
    return list(read_prompt_file(path, format=format, categories=categories, limit=limit, prompt_column=prompt_column).records)
