"""Safe/unsafe pair data: one record type and loaders for ViSU-Text, NSFWCaps and generic tables.

A training sample is the quadruplet (v, t, v*, t*) of docs/METHOD.md §2: safe caption ``t``, unsafe
caption ``t*``, optional safe image ``v`` and unsafe image ``v*``, plus an optional category.

Formats (``format=``):

* ``"visu"`` -- ViSU-Text (Poppi et al.): columns ``safe``, ``nsfw``, ``tag``; hub id
  ``aimagelab/ViSU-Text`` (gated; splits train / validation / test) or local CSV/JSONL/Parquet.
* ``"nsfwcaps"`` -- NSFWCaps: ``caption``, ``nsfw_caption``, ``chosen_category``,
  ``image_coco_url``. Safe images are read from ``image_root`` (file name = last part of the URL)
  when it is given; unsafe images are not released.
* ``"generic"`` -- any CSV / JSONL / JSON / Parquet with a column mapping (``column_map``,
  ``--column_map safe=... unsafe=...`` on the command line); default columns ``safe``,
  ``unsafe`` and, when present, ``safe_image``, ``unsafe_image``, ``category``. Image paths are
  relative to ``image_root`` (default: the data file's folder).
* ``"auto"`` -- picked from the columns found.

Row-aligned pair files (:func:`load_aligned_pairs`, the trainer's ``--train_data UNSAFE --train_data_safe SAFE``):
two tables with one prompt column each, row ``i`` of one pairing with row ``i`` of the other, as DES
(amoeba04/des) ships ``datasets/unsafe_prompts_copro_sexual.csv`` and ``safe_prompts_copro_sexual.csv``
(6,911 rows each, column ``prompt``). One file with two named columns is the generic format with
``--column_map safe=COL unsafe=COL``.

Extra safe captions (:func:`load_captions`, ``--extra_safe_captions``): ``.txt`` (one caption a line) or a
table with a caption column.

Example::

    >>> ds = load_pairs("assets/sample_pairs.jsonl")
    >>> train, val = split_pairs(ds, val_fraction=0.1, seed=0)
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, overload

from safer_diffusion.fileio import read_jsonl

logger = logging.getLogger(__name__)

__all__ = [
    "DATA_FORMATS",
    "FIELDS",
    "CAPTION_COLUMNS",
    "CAPTION_EXTENSIONS",
    "check_source",
    "PairDataset",
    "PairRecord",
    "load_aligned_pairs",
    "load_captions",
    "load_pairs",
    "load_pixels",
    "parse_column_map",
    "split_pairs",
]

#: Values accepted by ``format=``.
DATA_FORMATS = ("auto", "visu", "nsfwcaps", "generic")
#: Logical fields a column map can name.
FIELDS = ("safe", "unsafe", "safe_image", "unsafe_image", "category")
_REQUIRED = ("safe", "unsafe")
_DEFAULT_MAPS = {
    "visu": {"safe": "safe", "unsafe": "nsfw", "category": "tag"},
    "nsfwcaps": {"safe": "caption", "unsafe": "nsfw_caption", "category": "chosen_category", "safe_image": "image_coco_url"},
    "generic": {"safe": "safe", "unsafe": "unsafe", "safe_image": "safe_image", "unsafe_image": "unsafe_image", "category": "category"},
}
_EXTENSIONS = (".csv", ".jsonl", ".json", ".parquet")
#: File types of ``--extra_safe_captions``: plain text (one caption a line) and the tables.
CAPTION_EXTENSIONS = (".txt", *_EXTENSIONS)
#: Columns looked for, in this order, when a caption or prompt file's column is not named.
CAPTION_COLUMNS = ("caption", "prompt", "text", "safe")
#: The column of each row-aligned pair file when none is named (DES's layout).
ALIGNED_COLUMN = "prompt"
VISU_HUB_ID = "aimagelab/ViSU-Text"
_COLUMN_FLAG = "`--column_map` (e.g. --column_map safe=<column> unsafe=<column>; Python: column_map={'safe': ..., 'unsafe': ...})"


@dataclass(frozen=True)
class PairRecord:
    """One safe/unsafe pair: captions, optional image paths (absolute or as given), optional category."""

    safe: str
    unsafe: str
    safe_image: str | None = None
    unsafe_image: str | None = None
    category: str | None = None


class PairDataset(Sequence[PairRecord]):
    """An immutable, ordered sequence of :class:`PairRecord`.

    Args:
        records (`Sequence[PairRecord]`): the pairs.
        source (`str`, *optional*): where they came from (for logs and saved configs).
    """

    def __init__(self, records: Sequence[PairRecord], source: str | None = None):
        records = tuple(records)
        for i, r in enumerate(records):
            if not isinstance(r, PairRecord):
                raise ValueError(f"`records[{i}]` must be a PairRecord, got {type(r).__name__}.")
        self.records = records
        self.source = source
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.records)

    @overload
    def __getitem__(self, index: int) -> PairRecord: ...
    @overload
    def __getitem__(self, index: slice) -> PairDataset: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return PairDataset(self.records[index], self.source)
        return self.records[index]

    def __iter__(self) -> Iterator[PairRecord]:
        return iter(self.records)

    def __repr__(self) -> str:
        return f"PairDataset(n={len(self)}, has_images={self.has_images}, source={self.source!r})"

    def subset(self, indices: Sequence[int]) -> PairDataset:
        """The records at ``indices``, in that order."""
        return PairDataset([self.records[int(i)] for i in indices], self.source)

    @property
    def safe_captions(self) -> list[str]:
        return [r.safe for r in self.records]

    @property
    def unsafe_captions(self) -> list[str]:
        return [r.unsafe for r in self.records]

    @property
    def categories(self) -> list[str | None]:
        return [r.category for r in self.records]

    @property
    def has_images(self) -> bool:
        """True when every pair has a safe image (``V0(v)`` can be computed for all of them)."""
        return bool(self.records) and all(r.safe_image is not None for r in self.records)

    @property
    def has_unsafe_images(self) -> bool:
        """True when every pair has an unsafe image too."""
        return bool(self.records) and all(r.unsafe_image is not None for r in self.records)

    def fingerprint(self) -> str:
        """SHA-256 of the content: every record's fields in order, and each image file's size and mtime.

        Image *files* enter through (size, mtime) rather than their bytes, which would mean
        reading every image; replacing an image in place with one of identical size and
        timestamp is not detected.
        """
        if self._fingerprint is None:
            h = hashlib.sha256(b"safer-diffusion-pairs-v1\n")
            for r in self.records:
                row: dict[str, Any] = asdict(r)
                for key in ("safe_image", "unsafe_image"):
                    if row[key] is not None:
                        try:
                            st = os.stat(row[key])
                            row[key + "_stat"] = [st.st_size, st.st_mtime_ns]
                        except OSError:
                            row[key + "_stat"] = None
                h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
                h.update(b"\n")
            self._fingerprint = h.hexdigest()
        return self._fingerprint


# ----------------------------------------------------------------------------- reading tables


def parse_column_map(text: str | Mapping[str, str] | None) -> dict[str, str] | None:
    """A dict (the ``--column_map FIELD=COLUMN`` items) or the string ``"safe=prompt,unsafe=nsfw_prompt"`` -> validated dict."""
    if text is None or text == "":
        return None
    if isinstance(text, Mapping):
        mapping = dict(text)
    else:
        mapping = {}
        for part in str(text).split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise ValueError(f"`--column_map` entries must look like field=column, got {part!r} in {text!r}.")
            key, value = part.split("=", 1)
            mapping[key.strip()] = value.strip()
    for key, value in mapping.items():
        if key not in FIELDS:
            raise ValueError(f"`column_map` has unknown field {key!r}; fields are {', '.join(FIELDS)}.")
        if not isinstance(value, str) or not value:
            raise ValueError(f"`column_map[{key!r}]` must be a column name, got {value!r}.")
    return mapping


def _read_table(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))  # strings kept verbatim (no "NA" -> NaN conversion)
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            data = data.get("data", data.get("rows"))
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise ValueError(f"{path} must hold a JSON list of objects (or {{'data': [...]}}).")
        return data
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:  # pragma: no cover
            raise ImportError("Reading .parquet needs pyarrow: `pip install 'safer-diffusion[train]'`.") from e
        return pq.read_table(path).to_pylist()
    raise ValueError(f"Unsupported data file {str(path)!r}: expected one of {', '.join(_EXTENSIONS)}.")


def _split_files(folder: Path, split: str) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in _EXTENSIONS and not p.name.startswith("."))
    aliases = {split, {"validation": "val", "val": "validation"}.get(split, split)}
    chosen = [p for p in files if aliases & set(re.split(r"[^a-z0-9]+", p.stem.lower()))]
    if not chosen and len(files) == 1:
        chosen = files
    if not chosen:
        found = ", ".join(str(p.relative_to(folder)) for p in files[:10]) or "none"
        raise FileNotFoundError(f"No data file for split {split!r} in {str(folder)!r} (data files found: {found}). Pass a file or another `split`.")
    return chosen


def check_source(source: str | os.PathLike, argument: str = "--train_data") -> None:
    """Check, before any reading, that ``source`` can be loaded: an existing local file or folder, or a hub dataset id
    that can be reached now (or is cached).

    Raises:
        FileNotFoundError: a missing local path (a name with a data-file suffix, or not shaped like 'owner/name').
        HubUnavailableError: a hub id while offline and not cached.
    """
    from safer_diffusion.hub import resolve_model_source

    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.exists():
        return
    if path.suffix.lower() in _EXTENSIONS:
        raise FileNotFoundError(f"`{argument}` {text!r} does not exist; pass an existing {'/'.join(_EXTENSIONS)} file or a hub id.")
    resolve_model_source(text, argument=argument)


def _download(repo_id: str) -> Path:
    from safer_diffusion.hub import resolve_model_source

    resolve_model_source(repo_id, argument="source")  # fast HubUnavailableError when offline
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=[f"*{e}" for e in _EXTENSIONS]))
    except Exception as e:
        raise OSError(
            f"Could not download the dataset {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: {e}). "
            "ViSU-Text is gated: accept its terms on the hub page and log in (`hf auth login`), or pass local files."
        ) from e


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value) or (isinstance(value, str) and not value.strip())


def _detect_format(columns: set[str]) -> str:
    if {"caption", "nsfw_caption"} <= columns:
        return "nsfwcaps"
    if {"safe", "nsfw"} <= columns:
        return "visu"
    return "generic"


def _resolve_image(value: Any, root: Path, from_url: bool) -> str | None:
    if _is_missing(value):
        return None
    text = str(value).strip()
    if from_url or re.match(r"^[a-z]+://", text):
        text = text.rstrip("/").rsplit("/", 1)[-1]
    path = Path(text).expanduser()
    return str(path if path.is_absolute() else root / path)


def load_pairs(
    source: str | os.PathLike,
    format: str = "auto",
    column_map: Mapping[str, str] | str | None = None,
    image_root: str | os.PathLike | None = None,
    split: str = "train",
    check_images: bool = True,
) -> PairDataset:
    """Load safe/unsafe caption pairs (and image paths) from a file, a folder or a hub dataset.

    Args:
        source (`str`): a ``.csv`` / ``.jsonl`` / ``.json`` / ``.parquet`` file, a folder holding such
            files (the ones whose name contains ``split`` are read), or a hub dataset id such as
            ``"aimagelab/ViSU-Text"`` (only when the hub can be reached).
        format (`str`, defaults to `"auto"`): one of ``"auto"``, ``"visu"``, ``"nsfwcaps"``, ``"generic"``.
        column_map (`dict` or `str`, *optional*): field -> column overrides, fields ``safe``,
            ``unsafe``, ``safe_image``, ``unsafe_image``, ``category``; also accepts the flag's
            ``"safe=a,unsafe=b"`` form.
        image_root (`str`, *optional*): folder that relative image paths are relative to (default:
            the data file's folder). For NSFWCaps, safe images are only used when this is given.
        split (`str`, defaults to `"train"`): which split of a folder / hub dataset.
        check_images (`bool`, defaults to True): raise if image files are missing.

    Returns:
        :class:`PairDataset`. Rows whose safe or unsafe caption is empty are dropped (logged).

    Raises:
        ValueError: unknown format, missing columns (the message lists the columns found and the
            ``--column_map`` flag), or no pair left.
        FileNotFoundError: a missing source, or missing image files (count and first example).
        HubUnavailableError: a hub id while offline.
    """
    if format not in DATA_FORMATS:
        raise ValueError(f"`format` must be one of {DATA_FORMATS}, got {format!r}.")
    overrides = parse_column_map(column_map) or {}
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = _split_files(path, split)
    else:
        files = _split_files(_download(text), split)
    rows: list[dict[str, Any]] = []
    for f in files:
        rows.extend(_read_table(f))
    columns: set[str] = set()
    for row in rows:
        columns.update(row)
    name = text if len(files) == 1 and files[0] == path else f"{text} [{split}]"
    if not rows:
        raise ValueError(f"The dataset {name!r} is empty (no rows in {', '.join(str(f) for f in files)}).")

    fmt = _detect_format(columns) if format == "auto" else format
    mapping = dict(_DEFAULT_MAPS[fmt])
    mapping.update(overrides)
    missing = [f"{field}={mapping[field]!r}" for field in _REQUIRED if mapping[field] not in columns]
    missing += [f"{field}={col!r}" for field, col in overrides.items() if field not in _REQUIRED and col not in columns]
    if missing:
        raise ValueError(
            f"{name!r} (format {fmt!r}) lacks the column(s) {', '.join(missing)}. Columns found: {', '.join(sorted(columns))}. "
            f"Map them with {_COLUMN_FLAG}."
        )
    mapping = {k: v for k, v in mapping.items() if v in columns or k in _REQUIRED}
    if fmt == "nsfwcaps" and image_root is None and "safe_image" not in overrides:
        mapping.pop("safe_image", None)  # images only from a local folder
    root = Path(image_root).expanduser() if image_root is not None else files[0].parent

    records, dropped = [], 0
    for row in rows:
        safe, unsafe = row.get(mapping["safe"]), row.get(mapping["unsafe"])
        if _is_missing(safe) or _is_missing(unsafe):
            dropped += 1
            continue
        category = row.get(mapping["category"]) if "category" in mapping else None
        records.append(PairRecord(
            safe=str(safe).strip(),
            unsafe=str(unsafe).strip(),
            safe_image=_resolve_image(row.get(mapping["safe_image"]), root, fmt == "nsfwcaps") if "safe_image" in mapping else None,
            unsafe_image=_resolve_image(row.get(mapping["unsafe_image"]), root, False) if "unsafe_image" in mapping else None,
            category=None if _is_missing(category) else str(category).strip(),
        ))
    if dropped:
        logger.warning("%s: dropped %d of %d rows with an empty safe or unsafe caption.", name, dropped, len(rows))
    if not records:
        raise ValueError(f"The dataset {name!r} is empty: all {len(rows)} rows lack a safe or unsafe caption.")
    if check_images:
        paths = [p for r in records for p in (r.safe_image, r.unsafe_image) if p is not None]
        absent = [p for p in paths if not os.path.isfile(p)]
        if absent:
            raise FileNotFoundError(
                f"{len(absent)} of {len(paths)} image files of {name!r} are missing on disk (first: {absent[0]!r}). "
                "Check `image_root` (image paths are relative to it; default: the data file's folder)."
            )
    dataset = PairDataset(records, source=name)
    logger.info("Loaded %d pairs from %s (format %s, images: %s).", len(dataset), name, fmt, dataset.has_images)
    if not dataset.has_images and any(r.safe_image for r in records):
        logger.warning("%s: only some pairs have a safe image; image terms need every pair to have one.", name)
    return dataset


def _read_rows(path: Path, argument: str) -> list[dict[str, Any]]:
    """The rows of a table file, with every read error as a ValueError naming ``argument`` and the file."""
    if not path.is_file():
        raise FileNotFoundError(f"`{argument}` {str(path)!r} does not exist; pass an existing file.")
    try:
        return _read_table(path)
    except (ValueError, csv.Error) as e:  # not UTF-8, bad JSON / JSON Lines, a malformed CSV
        raise ValueError(f"`{argument}` {str(path)!r} cannot be read ({e}); pass a UTF-8 {'/'.join(_EXTENSIONS)} file.") from None
    except OSError as e:
        raise ValueError(f"`{argument}` {str(path)!r} cannot be read ({e.strerror or e}).") from None


def _pick_column(rows: list[dict[str, Any]], column: str | None, preferred: Sequence[str], path: Path, argument: str,
                 flag: str) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    if column is not None:
        if column not in columns:
            raise ValueError(f"`{argument}` {str(path)!r} has no column {column!r} (columns: {', '.join(map(str, columns))}); "
                             f"fix {flag}.")
        return column
    for name in preferred:
        if name in columns:
            return name
    if len(columns) == 1:
        return columns[0]
    raise ValueError(f"`{argument}` {str(path)!r} has no column {' / '.join(preferred)} and more than one column "
                     f"({', '.join(map(str, columns))}); name it with {flag}.")


def load_captions(paths: str | os.PathLike | Sequence[str | os.PathLike], column: str | None = None,
                  argument: str = "--extra_safe_captions") -> list[str]:
    """Captions from one or more files: ``.txt`` (one caption a line, blank lines skipped) or a ``.csv`` / ``.jsonl`` /
    ``.json`` / ``.parquet`` table (``column``, else the first of :data:`CAPTION_COLUMNS` present, else its only column).

    Captions are stripped; empty cells are skipped (logged) and duplicates kept once, in first-seen order.

    Raises:
        FileNotFoundError: a missing file.
        ValueError: an unsupported suffix, an unreadable file (not UTF-8, bad JSON), a missing column, or a file
            with no caption, naming ``argument`` and the file.
    """
    files = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not files:
        raise ValueError(f"`{argument}` needs at least one file.")
    captions: dict[str, None] = {}
    for item in files:
        path = Path(item).expanduser()
        suffix = path.suffix.lower()
        if suffix not in CAPTION_EXTENSIONS:
            raise ValueError(f"`{argument}` {str(path)!r}: unsupported file type; pass one of {', '.join(CAPTION_EXTENSIONS)}.")
        if suffix == ".txt":
            if not path.is_file():
                raise FileNotFoundError(f"`{argument}` {str(path)!r} does not exist; pass an existing file.")
            try:
                values: list[Any] = path.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError as e:
                raise ValueError(f"`{argument}` {str(path)!r} cannot be read (not UTF-8 text: {e.reason}); save it as UTF-8.") from None
            empty = 0
        else:
            rows = _read_rows(path, argument)
            if not rows:
                raise ValueError(f"`{argument}` {str(path)!r} is empty (no rows); pass a file with captions.")
            col = _pick_column(rows, column, CAPTION_COLUMNS, path, argument, "`--extra_safe_captions_column`")
            values = [row.get(col) for row in rows]
            empty = sum(_is_missing(v) for v in values)
            if empty:
                logger.warning("%s %s: skipped %d of %d rows with an empty %r.", argument, path, empty, len(values), col)
        found = [str(v).strip() for v in values if not _is_missing(v)]
        if not found:
            raise ValueError(f"`{argument}` {str(path)!r} holds no caption (every line or cell is empty); pass a file with captions.")
        before = len(captions)
        captions.update(dict.fromkeys(found))
        logger.info("%s %s: %d captions (%d new).", argument, path, len(found), len(captions) - before)
    return list(captions)


def load_aligned_pairs(unsafe_source: str | os.PathLike, safe_source: str | os.PathLike,
                       column_map: Mapping[str, str] | str | None = None) -> PairDataset:
    """Pairs from two row-aligned files: row ``i`` of ``unsafe_source`` is the unsafe prompt paired with row ``i`` of
    ``safe_source`` (the DES layout: one ``prompt`` column each).

    Args:
        unsafe_source (`str`): the unsafe prompts (``--train_data``), a ``.csv`` / ``.jsonl`` / ``.json`` / ``.parquet`` file.
        safe_source (`str`): the safe prompts (``--train_data_safe``).
        column_map (`dict`, *optional*): ``unsafe=COL`` / ``safe=COL`` name each file's column (default: ``prompt``, or
            the file's only column). No other field applies.

    Returns:
        :class:`PairDataset` (no images, no categories).

    Raises:
        FileNotFoundError: a missing file.
        ValueError: unreadable files, a missing column, row counts that differ, or an empty prompt (naming its file
            and row), or a column map field other than safe/unsafe.
    """
    mapping = parse_column_map(column_map) or {}
    extra = sorted(set(mapping) - {"safe", "unsafe"})
    if extra:
        raise ValueError(f"`--column_map` field(s) {extra} do not apply to row-aligned files (`--train_data_safe`); "
                         "only unsafe=COL and safe=COL do.")
    sides = {}
    for field, source, argument in (("unsafe", unsafe_source, "--train_data"), ("safe", safe_source, "--train_data_safe")):
        path = Path(source).expanduser()
        if path.suffix.lower() not in _EXTENSIONS:
            raise ValueError(f"`{argument}` {str(path)!r}: row-aligned pairs need a {'/'.join(_EXTENSIONS)} file.")
        rows = _read_rows(path, argument)
        if not rows:
            raise ValueError(f"`{argument}` {str(path)!r} is empty (no rows).")
        col = _pick_column(rows, mapping.get(field), (ALIGNED_COLUMN,), path, argument, f"`--column_map {field}=COLUMN`")
        values = [row.get(col) for row in rows]
        blank = [i for i, v in enumerate(values) if _is_missing(v)]
        if blank:
            raise ValueError(f"`{argument}` {str(path)!r} has {len(blank)} empty {col!r} value(s) (first: data row {blank[0] + 1}); "
                             "row-aligned files pair row i with row i, so every row needs a prompt: fill or remove the row in "
                             "both files.")
        sides[field] = (path, [str(v).strip() for v in values])
    (u_path, unsafe), (s_path, safe) = sides["unsafe"], sides["safe"]
    if len(unsafe) != len(safe):
        raise ValueError(f"Row-aligned pair files differ in length: `--train_data` {str(u_path)!r} has {len(unsafe)} rows, "
                         f"`--train_data_safe` {str(s_path)!r} has {len(safe)}; row i of one must pair with row i of the other.")
    dataset = PairDataset([PairRecord(safe=a, unsafe=b) for a, b in zip(safe, unsafe)], source=f"{u_path} + {s_path}")
    logger.info("Loaded %d row-aligned pairs from %s (unsafe) and %s (safe).", len(dataset), u_path, s_path)
    return dataset


def load_pixels(paths: Sequence[str | os.PathLike], image_processor, image_root: str | os.PathLike | None = None):
    """Read image files as RGB and preprocess them for CLIP.

    Args:
        paths: image files; relative ones are resolved against ``image_root`` when it is given.
        image_processor: a ``CLIPImageProcessor``.
        image_root: folder of relative paths (the trainer's and finetune.evaluate's ``--image_root``).

    Returns:
        `Tensor (N, 3, H, W)`: the processor's ``pixel_values``.
    """
    from PIL import Image

    images = []
    for p in paths:
        path = Path(p)
        if not path.is_absolute() and image_root:
            path = Path(image_root) / path
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    return image_processor(images=images, return_tensors="pt").pixel_values


def split_pairs(dataset: PairDataset, val_fraction: float, seed: int = 0) -> tuple[PairDataset, PairDataset]:
    """Deterministic train/validation split that keeps every safe caption on one side.

    Pairs are grouped by their safe caption (duplicates never straddle the split, so validation
    safe captions are unseen in training), groups are shuffled with ``random.Random(seed)`` and
    taken into validation until ``round(val_fraction * N)`` pairs would be exceeded. Both
    splits keep the original record order.

    Args:
        dataset (`PairDataset`): the pairs.
        val_fraction (`float`): in [0, 1).
        seed (`int`, defaults to 0): shuffle seed.

    Returns:
        `(train, val)` :class:`PairDataset` objects.
    """
    if not (isinstance(val_fraction, (int, float)) and 0.0 <= val_fraction < 1.0):
        raise ValueError(f"`val_fraction` must be in [0, 1), got {val_fraction!r}.")
    if len(dataset) == 0:
        raise ValueError("`dataset` is empty; nothing to split.")
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(dataset.records):
        groups.setdefault(r.safe, []).append(i)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    n_val = int(val_fraction * len(dataset) + 0.5)
    val: list[int] = []
    for k in keys:
        if len(val) >= n_val:
            break
        if len(val) + len(groups[k]) <= n_val:
            val.extend(groups[k])
    val_set = set(val)
    train_idx = [i for i in range(len(dataset)) if i not in val_set]
    if not train_idx:
        raise ValueError(f"`val_fraction`={val_fraction} leaves no training pair; lower it.")
    return dataset.subset(train_idx), dataset.subset(sorted(val))
