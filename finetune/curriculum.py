"""Easy-to-hard curriculum over unsafe pairs (docs/METHOD.md §5).

Pairs are ranked by difficulty ``d_i = cos(T0(t*_i), T0(t̂_i))`` (high = easy) and cut into
stages at the ``boundaries`` quantiles (default tertiles: easy, medium, hard). Stage ``k`` joins
training at epoch ``stage_epochs[k]`` (default 1, 2, 3): epoch 1 trains easy pairs only, epoch 2
easy + medium, epoch 3 onward all. ``mode="none"`` trains every pair every epoch. Safe-caption
preservation samples are not filtered (docs/METHOD.md decision): the curriculum only selects which
*unsafe* pairs are redirected in an epoch.

Example::

    >>> cur = Curriculum(torch.tensor([0.9, 0.1, 0.5, 0.7, 0.3, 0.2]))
    >>> cur.stage_of.tolist()        # 0 = easy, 1 = medium, 2 = hard
    [0, 2, 1, 0, 1, 2]
    >>> cur.indices_for_epoch(1).tolist()
    [0, 3]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["CURRICULUM_MODES", "Curriculum", "check_schedule"]

CURRICULUM_MODES = ("tertiles", "none")


def check_schedule(boundaries: Sequence[float], stage_epochs: Sequence[int], names: tuple[str, str] = ("boundaries", "stage_epochs")) -> None:
    """Raise `ValueError` unless ``boundaries`` are strictly increasing fractions in (0, 1) and ``stage_epochs`` has one
    non-decreasing 1-based epoch per stage, starting at 1. ``names``: how the two arguments are called in the message
    (the trainer passes its flags, ``--curriculum_boundaries`` / ``--curriculum_stage_epochs``)."""
    b_name, e_name = names
    boundaries, stage_epochs = tuple(boundaries), tuple(stage_epochs)
    if any(not (0.0 < float(b) < 1.0) for b in boundaries) or any(a >= b for a, b in zip(boundaries, boundaries[1:])):
        raise ValueError(f"`{b_name}` must be strictly increasing fractions in (0, 1), got {list(boundaries)}.")
    if len(stage_epochs) != len(boundaries) + 1:
        raise ValueError(
            f"`{e_name}` needs one epoch per stage ({len(boundaries) + 1} for {len(boundaries)} boundaries), got {list(stage_epochs)}."
        )
    if (any(isinstance(e, bool) or not isinstance(e, int) or e < 1 for e in stage_epochs) or stage_epochs[0] != 1
            or any(a > b for a, b in zip(stage_epochs, stage_epochs[1:]))):
        raise ValueError(f"`{e_name}` must be non-decreasing integers starting at 1, got {list(stage_epochs)}.")


class Curriculum:
    """Stages of unsafe pairs by difficulty and the pairs trained in each epoch.

    Args:
        difficulty (`Tensor` of shape `(N,)`): ``d_i``, higher = easier (the nearest-safe similarity).
        mode (`"tertiles"` or `"none"`, defaults to `"tertiles"`): ``"none"`` switches the curriculum off.
        boundaries (`tuple[float, ...]`, defaults to `(1/3, 2/3)`): increasing fractions in (0, 1) where
            the easiest-first ranking is cut; ``k`` boundaries give ``k + 1`` stages. Stage sizes are
            ``round(b * N)`` differences; equal difficulties are ordered by index (deterministic).
        stage_epochs (`tuple[int, ...]`, defaults to `(1, 2, 3)`): 1-based epoch at which each stage
            joins; non-decreasing, starting at 1, one per stage.

    Attributes:
        stage_of (`LongTensor (N,)`): stage of each pair (0 = easiest); all 0 with ``mode="none"``.
    """

    def __init__(
        self,
        difficulty: Tensor,
        mode: str = "tertiles",
        boundaries: Sequence[float] = (1 / 3, 2 / 3),
        stage_epochs: Sequence[int] = (1, 2, 3),
    ):
        if mode not in CURRICULUM_MODES:
            raise ValueError(f"`mode` must be one of {CURRICULUM_MODES}, got {mode!r}.")
        if not isinstance(difficulty, Tensor) or difficulty.dim() != 1:
            raise ValueError(f"`difficulty` must be a 1-D tensor (N,), got {getattr(difficulty, 'shape', type(difficulty).__name__)}.")
        if difficulty.numel() == 0:
            raise ValueError("`difficulty` is empty: the curriculum needs at least one unsafe pair.")
        if not bool(torch.isfinite(difficulty).all()):
            raise ValueError("`difficulty` contains NaN or inf; recompute the nearest-safe targets.")
        boundaries = tuple(float(b) for b in boundaries)
        stage_epochs = tuple(stage_epochs)
        if mode == "tertiles":
            check_schedule(boundaries, stage_epochs)
        self.mode = mode
        self.boundaries = boundaries
        self.stage_epochs = stage_epochs
        self.difficulty = difficulty.detach().to(device="cpu", dtype=torch.float64)
        n = self.difficulty.numel()
        stage_of = torch.zeros(n, dtype=torch.long)
        if mode == "tertiles":
            # easiest first; stable sort keeps equal difficulties in index order
            order = torch.sort(-self.difficulty, stable=True).indices
            cuts = [0] + [math.floor(b * n + 0.5) for b in boundaries] + [n]
            for k in range(len(cuts) - 1):
                stage_of[order[cuts[k]:cuts[k + 1]]] = k
        self.stage_of = stage_of

    @property
    def num_stages(self) -> int:
        return 1 if self.mode == "none" else len(self.boundaries) + 1

    def stage_sizes(self) -> list[int]:
        """Number of pairs in each stage."""
        return torch.bincount(self.stage_of, minlength=self.num_stages).tolist()

    def indices_for_epoch(self, epoch: int) -> Tensor:
        """Sorted indices of the unsafe pairs trained in ``epoch`` (1-based)."""
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
            raise ValueError(f"`epoch` is 1-based and must be an integer >= 1, got {epoch!r}.")
        if self.mode == "none":
            return torch.arange(self.stage_of.numel())
        joined = torch.tensor([e <= epoch for e in self.stage_epochs])
        return joined[self.stage_of].nonzero().flatten()

    def describe(self) -> dict:
        """Mode, boundaries, stage sizes and difficulty ranges, for logs and the saved config."""
        out = {"mode": self.mode, "stage_sizes": self.stage_sizes()}
        if self.mode != "none":
            out.update(boundaries=list(self.boundaries), stage_epochs=list(self.stage_epochs), difficulty_range=[
                [float(self.difficulty[self.stage_of == k].min()), float(self.difficulty[self.stage_of == k].max())]
                if bool((self.stage_of == k).any()) else None for k in range(self.num_stages)])
        return out

    def __repr__(self) -> str:
        return f"Curriculum(mode={self.mode!r}, stage_sizes={self.stage_sizes()}, stage_epochs={self.stage_epochs})"
