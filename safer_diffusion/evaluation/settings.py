"""``settings.json``: the settings every row of an output folder was produced with, checked on every rerun.

    out/settings.json    {"settings": {...}, "protocol": {...}}, written atomically

``settings`` (:func:`settings_of`) are what determines the rows: the prompt file's SHA-256, the
resolved model ids, seeds, steps, guidance, size, dtype and each scorer's resolved model, classes
and threshold. A rerun compares them (:func:`check_settings`) and is refused with
:class:`SettingsMismatchError`, listing every difference, when they differ. ``protocol`` is
descriptive (scheduler, versions, every option with its resolved default) and replaced by each run.

Non-finite numbers are never written (:func:`write_settings` refuses them). A folder whose
settings.json holds one (written by an older version, e.g. from ``--guidance-scale nan``) matches no
run; :func:`repair_settings` (``safer-diffusion evaluate ... --repair_settings``) rewrites it from
the current command, keeping every row, when the non-finite values are the only differences.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_text
from ..registry import ORIGINAL, SAFE
from .config import EvaluateConfig
from .prompts import SETTING_COLUMNS, PromptFile, file_sha256, legacy_columns, read_prompt_file
from .results import read_results, writing

logger = logging.getLogger(__name__)

__all__ = [
    "SETTINGS_NAME",
    "SettingsMismatchError",
    "check_settings",
    "non_finite_values",
    "read_settings",
    "repair_settings",
    "encoder_ids",
    "legacy_settings",
    "merged_settings",
    "prompt_columns_of",
    "settings_of",
    "stored_encoders",
    "write_settings",
]

SETTINGS_NAME = "settings.json"
_KEPT = "Every result row in the folder is kept."
#: Settings that every row also records (so a repair can check the rows agree with the new value).
_ROW_FIELDS = ("guidance_scale", "height", "width")


class SettingsMismatchError(ValueError):
    """A rerun into an existing output folder with settings that differ from the stored ones."""


def _read(config: EvaluateConfig) -> PromptFile:
    return read_prompt_file(config.prompts, format=config.prompt_format, categories=config.categories, limit=config.limit,
                            prompt_column=config.prompt_column)  # fmt: skip


def prompt_columns_of(config: EvaluateConfig, columns: dict[str, str | None]) -> dict[str, str | None]:
    """The columns whose values end up in the rows: the per-prompt setting columns only with ``--use_prompt_settings``."""
    return {k: (None if k in SETTING_COLUMNS and not config.use_prompt_settings else v) for k, v in columns.items()}


def legacy_settings(config: EvaluateConfig, prompt_file: PromptFile | None = None) -> dict[str, Any]:
    """The values of settings added in this version, as a ``settings.json`` written before it implied them.

    Such a file has no ``prompt_columns``: the readers then read the columns
    :func:`~safer_diffusion.evaluation.prompts.legacy_columns` names. :func:`check_settings` fills
    the missing keys with these values before comparing, so an old folder resumes when nothing
    changed and is refused, naming the difference, when the new readers read other columns.
    """
    prompt_file = prompt_file or _read(config)
    return {"prompt_columns": prompt_columns_of(config, legacy_columns(prompt_file, config.prompt_column)), "suite": None, "protocol": None}


def encoder_ids(config: EvaluateConfig, safe_id: str | None) -> dict[str, str]:
    """``{variant: the identity of its text encoder}``: ``base`` (the base's own) for ``original``, ``--safe_encoder``'s id
    for ``safe``, the source (an absolute path or a hub id, with ``:SUBFOLDER``) for the others."""
    out = {}
    for item in config.encoder_items:
        out[item.name] = "base" if item.name == ORIGINAL else (safe_id or config.safe_encoder) if item.name == SAFE else item.describe()
    return out


def settings_of(config: EvaluateConfig, base_id: str, safe_id: str | None, dtype_name: str, scorers: dict[str, Any],
                prompt_file: PromptFile | None = None) -> dict[str, Any]:  # fmt: skip
    """The settings that determine the rows (stored in ``settings.json`` and compared on resume).

    Every value is resolved (model ids, dtype, each scorer's threshold and classes from the scorer
    itself, the columns of the prompt file that were read). The key names are the on-disk format
    and stay stable across versions (so ``images_per_prompt`` is ``--num_images_per_prompt``).

    ``encoders`` maps each variant to its encoder; a rerun may add variants (only their rows are
    generated) but not change the encoder of an existing one (:func:`check_settings`). An SDXL run
    with ``--safe_encoder_2`` also stores it as ``safe_encoder_2`` (absent otherwise, so folders
    written before it resume).

    Not included (they do not change any row): ``--batch_size``, ``--save_images``, ``--output_dir``,
    ``--device``, the number of processes, ``--bootstrap``, ``--grid_samples``, ``--progress``.
    """
    prompt_file = prompt_file or _read(config)
    scorer_settings = {}
    for name, scorer in scorers.items():
        d = scorer.describe() if hasattr(scorer, "describe") else {}
        scorer_settings[name] = {k: d[k] for k in ("model", "classes", "threshold", "prompts") if k in d}
    return {
        "prompts_sha256": file_sha256(config.prompts),
        "suite": config.suite,
        "prompt_format": config.prompt_format,
        "prompt_column": config.prompt_column,
        "prompt_columns": prompt_columns_of(config, prompt_file.columns),
        "categories": config.categories,
        "limit": config.limit,
        "base": base_id,
        "encoders": encoder_ids(config, safe_id),
        **({"safe_encoder_2": config.safe_encoder_2} if config.safe_encoder_2 is not None else {}),
        "images_per_prompt": config.num_images_per_prompt,
        "seed": config.seed,
        "use_prompt_settings": config.use_prompt_settings,
        "num_inference_steps": config.num_inference_steps,
        "guidance_scale": config.guidance_scale,
        "negative_prompt": config.negative_prompt,
        "height": config.height,
        "width": config.width,
        "dtype": dtype_name,
        "scorers": scorer_settings,
        "protocol": config.protocol,
    }


def non_finite_values(value: Any, prefix: str = "") -> dict[str, float]:
    """``{dotted key: value}`` of every NaN or infinite number inside ``value`` (dicts and lists)."""
    if isinstance(value, dict):
        out: dict[str, float] = {}
        for k, v in value.items():
            out.update(non_finite_values(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, (list, tuple)):
        out = {}
        for i, v in enumerate(value):
            out.update(non_finite_values(v, f"{prefix}[{i}]"))
        return out
    if isinstance(value, float) and not math.isfinite(value):
        return {prefix: value}
    return {}


def _diff(stored: Any, current: Any, prefix: str = "") -> list[tuple[str, str]]:
    """``(dotted key, "key: stored X, now Y")`` for each difference."""
    if isinstance(stored, dict) and isinstance(current, dict):
        out = []
        for k in sorted(set(stored) | set(current), key=str):
            name = f"{prefix}.{k}" if prefix else str(k)
            if k not in stored:
                out.append((name, f"{name}: not stored, now {current[k]!r}"))
            elif k not in current:
                out.append((name, f"{name}: stored {stored[k]!r}, now absent"))
            else:
                out.extend(_diff(stored[k], current[k], name))
        return out
    if stored != current:  # NaN != NaN, so a stored NaN always shows as a difference
        return [(prefix, f"{prefix}: stored {stored!r}, now {current!r}")]
    return []


def _described(value: Any) -> Any:
    """The protocol with non-finite numbers as text ("nan"), so an old protocol can be stored again."""
    if isinstance(value, dict):
        return {k: _described(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_described(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


def read_settings(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The stored ``{"settings", "protocol"}`` of ``out_dir``, or `None` when it has none.

    Raises:
        SettingsMismatchError: the file is not readable JSON with a ``settings`` mapping.
    """
    path = Path(out_dir) / SETTINGS_NAME
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(stored.get("settings"), dict):
            raise KeyError("settings")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise SettingsMismatchError(
            f"`--output_dir`={str(out_dir)!r} holds an unreadable {SETTINGS_NAME} ({type(e).__name__}: {e}). "
            "Use a new `--output_dir` folder."
        ) from None
    return stored


def _normalised(settings: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(settings))  # tuples -> lists, like the stored JSON


def stored_encoders(settings: dict[str, Any]) -> dict[str, str] | None:
    """``{variant: the identity of its text encoder}`` of stored settings (:func:`encoder_ids`), also from a settings.json
    written before many encoders (``safe_encoder`` + ``variants``); `None` when they name no encoder."""
    encoders = settings.get("encoders")
    if isinstance(encoders, dict):
        return dict(encoders)
    if "variants" in settings:
        return {v: ("base" if v == ORIGINAL else settings.get("safe_encoder")) for v in settings["variants"]}
    return None


def _upgraded(stored: dict[str, Any], legacy: dict[str, Any] | None) -> dict[str, Any]:
    """``stored`` in this version's layout: ``safe_encoder`` + ``variants`` (before many encoders) become ``encoders``,
    and the keys a settings.json from before this version lacks are filled from ``legacy``."""
    stored = dict(stored)
    if "encoders" not in stored and "variants" in stored:
        stored["encoders"] = stored_encoders(stored)
        stored.pop("safe_encoder", None)
        stored.pop("variants")
    return {**{k: v for k, v in (legacy or {}).items() if k not in stored}, **stored}


def _comparable(stored: dict[str, Any], current: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both settings with ``encoders`` reduced to the variants they share: a new variant is an addition, not a difference."""
    stored, current = dict(stored), dict(current)
    se, ce = stored.get("encoders"), current.get("encoders")
    if isinstance(se, dict) and isinstance(ce, dict):
        common = [k for k in ce if k in se]
        stored["encoders"], current["encoders"] = {k: se[k] for k in common}, {k: ce[k] for k in common}
    return stored, current


def merged_settings(out_dir: str | os.PathLike, settings: dict[str, Any], legacy: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings to store after a run that passed :func:`check_settings`: ``settings`` with the encoders of the
    variants generated earlier kept beside the new ones."""
    stored = read_settings(out_dir)
    if stored is None:
        return settings
    earlier = _upgraded(stored["settings"], legacy).get("encoders")
    if not isinstance(earlier, dict) or not isinstance(settings.get("encoders"), dict):
        return settings
    return {**settings, "encoders": {**earlier, **settings["encoders"]}}


def check_settings(out_dir: str | os.PathLike, settings: dict[str, Any], legacy: dict[str, Any] | None = None) -> bool:
    """Compare ``settings`` with ``out_dir/settings.json``.

    ``legacy`` (:func:`legacy_settings`) gives the values that keys missing from an older
    settings.json stand for.

    Returns:
        `True` when the folder already holds these settings (resume), `False` when it has none yet.

    Raises:
        SettingsMismatchError: the stored settings differ (the message lists each difference and
            the two ways out: a new ``--output_dir``, or the stored settings), or hold a non-finite
            value (the message names ``--repair_settings``).
    """
    stored = read_settings(out_dir)
    if stored is None:
        return False
    path = Path(out_dir) / SETTINGS_NAME
    bad = non_finite_values(stored["settings"])
    if bad:
        values = ", ".join(f"{k}: stored {v!r}" for k, v in bad.items())
        raise SettingsMismatchError(
            f"`--output_dir`={str(out_dir)!r} holds a {SETTINGS_NAME} with a non-finite value ({values}), written by an older "
            "version; no run can match it. Rerun this command with `--repair_settings` to rewrite the settings from it "
            "(every row is kept), then rerun it without `--repair_settings`."
        )
    diffs = [line for _, line in _diff(*_comparable(_normalised(_upgraded(stored["settings"], legacy)), _normalised(settings)))]
    if diffs:
        raise SettingsMismatchError(
            f"`--output_dir`={str(out_dir)!r} holds results produced with different settings, so they cannot be resumed or mixed:\n  "
            + "\n  ".join(diffs)
            + f"\nUse a new `--output_dir` folder for these settings, or rerun with the stored settings (see {path}) to resume."
        )
    return True


def write_settings(out_dir: str | os.PathLike, settings: dict[str, Any], protocol: dict[str, Any] | None = None) -> Path:
    """Write ``{"settings": ..., "protocol": ...}`` to ``out_dir/settings.json`` atomically.

    ``settings`` are compared on every rerun; ``protocol`` is descriptive and replaced by the latest run's.

    Raises:
        ValueError: ``settings`` hold a non-finite number (it could never be matched again).
        EvaluationWriteError: the file cannot be written (disk full, permissions).
    """
    bad = non_finite_values(settings)
    if bad:
        raise ValueError(f"settings hold non-finite values {bad}; they cannot be stored (no rerun could match them). "
                         "Pass finite numbers.")  # fmt: skip
    path = Path(out_dir) / SETTINGS_NAME
    text = json.dumps({"settings": settings, "protocol": _described(protocol or {})}, indent=2, sort_keys=True, allow_nan=False, default=str)
    with writing(path, _KEPT):
        atomic_write_text(path, text + "\n")
    return path


def _check_rows_agree(out_dir: str | os.PathLike, settings: dict[str, Any], keys: dict[str, float]) -> None:
    """The rows already in the folder must have been generated with the values a repair writes (e.g. guidance_scale)."""
    if settings.get("use_prompt_settings"):
        return  # the rows' guidance and size came from the prompt file, not from these settings
    fields = [k for k in keys if k in _ROW_FIELDS and settings.get(k) is not None]
    for row in read_results(out_dir) if fields else ():
        for k in fields:
            if k in row and row[k] != settings[k]:
                raise SettingsMismatchError(
                    f"`--repair_settings`: the rows in `--output_dir`={str(out_dir)!r} were generated with {k} {row[k]!r}, "
                    f"not {settings[k]!r}; pass `--{k} {row[k]}` to repair the settings to match them, or use a new `--output_dir`."
                )


def repair_settings(out_dir: str | os.PathLike, settings: dict[str, Any], legacy: dict[str, Any] | None = None) -> list[str]:
    """Rewrite a ``settings.json`` whose only differences from ``settings`` are stored non-finite values.

    The rows are untouched (a row can never hold a non-finite value: they are written with
    ``allow_nan=False``), and must agree with the new value where they record it (``guidance_scale``,
    ``height``, ``width``). The change list is logged, returned, and recorded in the protocol under ``repaired``.

    Returns:
        the changes, one ``"key: stored X, now Y"`` line each; empty when there was nothing to repair.

    Raises:
        ValueError: the folder has no settings.json.
        SettingsMismatchError: other settings differ too, or the rows were generated with another value
            (a repair never mixes rows of different settings).
    """
    stored = read_settings(out_dir)
    if stored is None:
        raise ValueError(f"`--repair_settings`: `--output_dir`={str(out_dir)!r} has no {SETTINGS_NAME}; there is nothing to repair. "
                         "Drop `--repair_settings` to start the evaluation.")  # fmt: skip
    bad = non_finite_values(stored["settings"])
    diffs = _diff(*_comparable(_upgraded(stored["settings"], legacy), _normalised(settings)))
    other = [line for key, line in diffs if key not in bad]
    if other:
        raise SettingsMismatchError(
            "`--repair_settings` only replaces non-finite stored values, but other settings differ too:\n  " + "\n  ".join(other)
            + "\nRerun with the stored settings (only the non-finite ones changed), or use a new `--output_dir`."
        )
    if not bad:
        return []
    _check_rows_agree(out_dir, settings, bad)
    changes = [line for _, line in diffs]
    protocol = dict(stored.get("protocol") or {})
    protocol["repaired"] = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "changes": changes}
    write_settings(out_dir, merged_settings(out_dir, settings, legacy), protocol)
    logger.warning("%s: rewrote %d non-finite setting(s): %s", Path(out_dir) / SETTINGS_NAME, len(changes), "; ".join(changes))
    return changes
