"""What to generate: one work item per (prompt, image index), sharded by rank, grouped into batches.

Seeds: image ``i`` of a prompt uses seed ``--seed + i`` (``sd_seed + i`` with
``--use_prompt_settings``). A finished ``(prompt_id, seed, variant)`` row is never planned again,
so a rerun resumes where the last one stopped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .config import EvaluateConfig, check_prompt_settings
from .prompts import SETTING_COLUMNS, PromptFile, PromptRecord

__all__ = ["WorkItem", "make_batches", "make_work_items", "prompt_settings_report", "shard"]


@dataclass(frozen=True)
class WorkItem:
    """One image to generate: a prompt, its image index and seed, its settings, the variants still missing."""

    record: PromptRecord
    image_index: int
    seed: int
    guidance_scale: float
    height: int
    width: int
    variants: tuple[str, ...]


def shard(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Rank ``rank``'s share of ``items``: every ``world_size``-th item from ``rank`` (balanced, order kept)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"`rank` must be in [0, world_size) with world_size >= 1, got rank={rank}, world_size={world_size}.")
    return list(items[rank::world_size])


def make_work_items(
    records: Sequence[PromptRecord],
    config: EvaluateConfig,
    default_height: int,
    default_width: int,
    done: set[tuple[str, int, str]],
    columns: dict[str, str | None] | None = None,
) -> tuple[list[WorkItem], int]:
    """(items still to generate, number of items already finished) for ``records``.

    Each item is one (prompt, image index) with its seed and settings and the variants whose rows
    are missing from ``done``.

    ``columns`` (the prompt file's :attr:`~safer_diffusion.evaluation.prompts.PromptFile.columns`) only
    names the columns in errors.

    Raises:
        BadInputError: with ``--use_prompt_settings``, a prompt whose own seed, guidance or size is unusable.
    """
    use = config.use_prompt_settings
    if use:
        check_prompt_settings(records, config, columns)
    variants = config.variants  # parsed once (each access checks the --encoders items)
    items, skipped = [], 0
    for r in records:
        base_seed = r.seed if use and r.seed is not None else config.seed
        guidance = r.guidance_scale if use and r.guidance_scale is not None else config.guidance_scale
        height = r.height if use and r.height is not None else (config.height or default_height)
        width = r.width if use and r.width is not None else (config.width or default_width)
        for i in range(config.num_images_per_prompt):
            seed = base_seed + i
            missing = tuple(v for v in variants if (r.prompt_id, seed, v) not in done)
            if missing:
                items.append(WorkItem(r, i, seed, float(guidance), int(height), int(width), missing))
            else:
                skipped += 1
    return items, skipped


def make_batches(items: Sequence[WorkItem], batch_size: int) -> list[list[WorkItem]]:
    """Group items with identical (guidance, height, width) into batches of at most ``batch_size``, order kept."""
    groups: dict[tuple, list] = {}
    for it in items:
        groups.setdefault((it.guidance_scale, it.height, it.width), []).append(it)
    return [g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


def prompt_settings_report(prompt_file: PromptFile, config: EvaluateConfig, default_height: int, default_width: int) -> tuple[list[str], dict[str, Any]]:
    """What each per-prompt setting was taken from: ``(lines to log, record for the protocol)``.

    With ``--use_prompt_settings``, a setting whose column is missing, or empty for some prompts,
    falls back to its flag (or the model's size): each such fallback is one line saying how many
    prompts and what was used instead. Without it, a file that has setting columns gets one line
    saying they are not used.
    """
    n = len(prompt_file.records)
    fallback = {
        "seed": f"--seed {config.seed} + i",
        "guidance_scale": f"--guidance_scale {config.guidance_scale:g}",
        "width": f"--width {config.width}" if config.width else f"the model's width {default_width}",
        "height": f"--height {config.height}" if config.height else f"the model's height {default_height}",
    }
    where = str(prompt_file.path)
    lines: list[str] = []
    record: dict[str, Any] = {}
    present = [c for k in SETTING_COLUMNS if (c := prompt_file.columns.get(k))]
    if not config.use_prompt_settings:
        if present:
            lines.append(f"{where} has per-prompt settings ({', '.join(present)}); they are not used without "
                         "`--use_prompt_settings` (every prompt uses the flags).")  # fmt: skip
        return lines, {k: {"column": None, "used": fallback[k]} for k in SETTING_COLUMNS}
    for key, candidates in SETTING_COLUMNS.items():
        column = prompt_file.columns.get(key)
        missing = n if column is None else prompt_file.missing.get(key, 0)
        record[key] = {"column": column, "n_prompts": n, "n_missing": missing, "fallback": fallback[key] if missing else None}
        if column is None:
            lines.append(f"`--use_prompt_settings`: {where} has no {' or '.join(candidates)} column; all {n} prompts use "
                         f"{fallback[key]}.")  # fmt: skip
        elif missing:
            lines.append(f"`--use_prompt_settings`: {missing} of {n} prompts have no {column} value in {where}; they use "
                         f"{fallback[key]}.")  # fmt: skip
    return lines, record
