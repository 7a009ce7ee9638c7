"""Curriculum stages partition the pairs by difficulty as METHOD.md §5 specifies."""

import pytest
import torch

from finetune.curriculum import Curriculum


@pytest.mark.parametrize("n", [1, 2, 3, 10, 300, 301])
def test_tertiles_partition(n):
    d = torch.rand(n, generator=torch.Generator().manual_seed(n))
    cur = Curriculum(d)
    stages = [torch.nonzero(cur.stage_of == k).flatten() for k in range(3)]
    # a partition: every pair in exactly one stage
    assert sorted(torch.cat(stages).tolist()) == list(range(n))
    # tertile sizes: cuts at round(n/3), round(2n/3)
    c1, c2 = int(n / 3 + 0.5), int(2 * n / 3 + 0.5)
    assert cur.stage_sizes() == [c1, c2 - c1, n - c2]
    # easy = most similar: every easy difficulty >= every medium >= every hard
    for k in range(2):
        if stages[k].numel() and stages[k + 1].numel():
            assert d[stages[k]].min() >= d[stages[k + 1]].max()
    # epoch 1: easy only; epoch 2: easy + medium; epoch >= 3: all; sorted indices
    assert cur.indices_for_epoch(1).tolist() == sorted(stages[0].tolist())
    assert cur.indices_for_epoch(2).tolist() == sorted(stages[0].tolist() + stages[1].tolist())
    for epoch in (3, 4, 9):
        assert cur.indices_for_epoch(epoch).tolist() == list(range(n))


def test_by_hand_and_ties():
    cur = Curriculum(torch.tensor([0.9, 0.1, 0.5, 0.7, 0.3, 0.2]))
    assert cur.stage_of.tolist() == [0, 2, 1, 0, 1, 2]
    assert cur.indices_for_epoch(2).tolist() == [0, 2, 3, 4]
    # equal difficulties: order by index (deterministic)
    tied = Curriculum(torch.full((6,), 0.5))
    assert tied.stage_of.tolist() == [0, 0, 1, 1, 2, 2]
    assert cur.describe()["stage_sizes"] == [2, 2, 2]
    assert cur.describe()["difficulty_range"][0] == pytest.approx([0.7, 0.9])


def test_custom_boundaries_and_epochs():
    d = torch.arange(10, dtype=torch.float32)  # index 9 easiest
    cur = Curriculum(d, boundaries=(0.5,), stage_epochs=(1, 3))
    assert cur.stage_sizes() == [5, 5]
    assert cur.indices_for_epoch(1).tolist() == [5, 6, 7, 8, 9]
    assert cur.indices_for_epoch(2).tolist() == [5, 6, 7, 8, 9]
    assert cur.indices_for_epoch(3).tolist() == list(range(10))
    quarters = Curriculum(d, boundaries=(0.25, 0.5, 0.75), stage_epochs=(1, 1, 2, 4))
    assert quarters.stage_sizes() == [3, 2, 3, 2]
    assert quarters.indices_for_epoch(1).tolist() == [5, 6, 7, 8, 9]


def test_mode_none_trains_everything():
    cur = Curriculum(torch.rand(7), mode="none")
    assert cur.stage_of.tolist() == [0] * 7
    assert cur.indices_for_epoch(1).tolist() == list(range(7))


def test_bad_inputs():
    d = torch.rand(5)
    with pytest.raises(ValueError, match="`mode` must be one of"):
        Curriculum(d, mode="quartiles")
    with pytest.raises(ValueError, match="`boundaries` must be strictly increasing"):
        Curriculum(d, boundaries=(0.6, 0.3))
    with pytest.raises(ValueError, match="`boundaries` must be strictly increasing"):
        Curriculum(d, boundaries=(0.0, 0.5))
    with pytest.raises(ValueError, match="one epoch per stage"):
        Curriculum(d, stage_epochs=(1, 2))
    with pytest.raises(ValueError, match="starting at 1"):
        Curriculum(d, stage_epochs=(2, 3, 4))
    with pytest.raises(ValueError, match="non-decreasing"):
        Curriculum(d, stage_epochs=(1, 3, 2))
    with pytest.raises(ValueError, match="NaN or inf"):
        Curriculum(torch.tensor([0.1, float("nan")]))
    with pytest.raises(ValueError, match="`difficulty` is empty"):
        Curriculum(torch.empty(0))
    with pytest.raises(ValueError, match="1-D tensor"):
        Curriculum(torch.rand(2, 2))
    with pytest.raises(ValueError, match="`epoch` is 1-based"):
        Curriculum(d).indices_for_epoch(0)
