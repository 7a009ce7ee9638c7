"""`--group_by_length`: steps of similar caption length, the epoch's rows and the curriculum unchanged."""

from __future__ import annotations

import pytest
import torch

from finetune.config import parse_train_config
from finetune.train import epoch_order, group_by_length

FAST = ["--config", "tiny_cpu.yaml", "--train_batch_size", "8", "--report_to", "none", "--no_eval_at_end"]


def _mean_step_max(order, lengths, steps, global_batch):
    return lengths[order.view(steps, global_batch)].max(1).values.float().mean().item()


@pytest.mark.parametrize("extra_rows, batch, world", [(0, 16, 1), (4, 16, 2)])
def test_grouping_keeps_every_window_rows_and_shortens_the_steps(extra_rows, batch, world):
    g = torch.Generator().manual_seed(0)
    n, n_extra, steps, window = 600, 50, 40, 10
    len_u = torch.randint(8, 45, (n,), generator=g)
    len_s = torch.randint(8, 45, (n + n_extra,), generator=g)
    gb = batch * world
    u, s = epoch_order(0, 1, torch.arange(n), n, steps, gb, n_extra=n_extra if extra_rows else 0, extra_rows=extra_rows, batch=batch)
    gu, gs = group_by_length(u, s, len_u, len_s, gb, window, 0, 1, batch=batch, extra_rows=extra_rows)
    for start in range(0, steps, window):  # each window keeps exactly its rows (so the epoch and the curriculum too)
        rows = slice(start * gb, (start + window) * gb)
        assert torch.equal(u[rows].sort().values, gu[rows].sort().values)
        assert torch.equal(s[rows].sort().values, gs[rows].sort().values)
    if extra_rows:  # every process batch keeps its share of extra captions, in the same columns
        blocks = gs.view(-1, batch)
        assert (blocks[:, batch - extra_rows:] >= n).all() and (blocks[:, : batch - extra_rows] < n).all()
    # uniform lengths in [8, 45): a mixed step's longest caption is near 44; grouped ones are much shorter
    assert _mean_step_max(u, len_u, steps, gb) > 42
    assert _mean_step_max(gu, len_u, steps, gb) < 32 and _mean_step_max(gs, len_s, steps, gb) < 32
    again = group_by_length(u, s, len_u, len_s, gb, window, 0, 1, batch=batch, extra_rows=extra_rows)
    assert torch.equal(again[0], gu) and torch.equal(again[1], gs)  # (seed, epoch) decide it: resuming needs no state
    other = group_by_length(u, s, len_u, len_s, gb, window, 0, 2, batch=batch, extra_rows=extra_rows)
    assert not torch.equal(other[0], gu)  # the steps are shuffled differently each epoch


def test_grouped_training_runs_resumes_and_records_the_option(tmp_path):
    import yaml

    from finetune.train import train

    def run(name, *extra):
        return train(parse_train_config(FAST + ["--output_dir", str(tmp_path / name), "--group_by_length", "--length_group_steps", "3",
                                                *extra]))  # fmt: skip

    straight = run("straight", "--max_train_steps", "6", "--checkpointing_steps", "3")
    first = run("split", "--max_train_steps", "3", "--checkpointing_steps", "3")
    resumed = run("split", "--max_train_steps", "6", "--checkpointing_steps", "3", "--resume_from_checkpoint", "latest")
    assert first.losses + resumed.losses == straight.losses
    plain = train(parse_train_config(FAST + ["--output_dir", str(tmp_path / "plain"), "--max_train_steps", "6"]))
    assert plain.losses != straight.losses  # other rows share the steps
    resolved = yaml.safe_load((tmp_path / "straight" / "config.yaml").read_text())
    assert resolved["group_by_length"] is True and resolved["length_group_steps"] == 3


def test_length_group_steps_bounds():
    from safer_diffusion.options import BadInputError

    with pytest.raises(BadInputError, match=r"`--length_group_steps` must be in \[2, inf\], got 1"):
        parse_train_config(FAST + ["--output_dir", "x", "--length_group_steps", "1"])
