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
from .prompts import PromptRecord

__all__ = ["WorkItem", "make_batches", "make_work_items", "shard"]


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
) -> tuple[list[WorkItem], int]:
    """(items still to generate, number of items already finished) for ``records``.

    Each item is one (prompt, image index) with its seed and settings and the variants whose rows
    are missing from ``done``.

    Raises:
        BadInputError: with ``--use_prompt_settings``, a prompt whose own seed, guidance or size is unusable.
    """
    use = config.use_prompt_settings
    if use:
        check_prompt_settings(records, config)
    items, skipped = [], 0
    for r in records:
        base_seed = r.seed if use and r.seed is not None else config.seed
        guidance = r.guidance_scale if use and r.guidance_scale is not None else config.guidance_scale
        height = r.height if use and r.height is not None else (config.height or default_height)
        width = r.width if use and r.width is not None else (config.width or default_width)
        for i in range(config.num_images_per_prompt):
            seed = base_seed + i
            missing = tuple(v for v in config.variants if (r.prompt_id, seed, v) not in done)
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
