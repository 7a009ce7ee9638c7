"""Trainer reliability (issue 14): a full disk while checkpointing, leftovers of a crashed run, resume integrity, the log
after a resume. Tiny random CLIP on the bundled pairs, CPU, a few steps each."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import pytest
import torch

from finetune.checkpoint import CheckpointWriteError, ResumeError, find_checkpoints, latest_checkpoint
from finetune.config import parse_train_config
from finetune.train import main, train

FAST = ["--config", "tiny_cpu.yaml", "--train_batch_size", "8", "--report_to", "none", "--no_eval_at_end", "--logging_steps", "1"]


def args(out: Path, *extra: str) -> list[str]:
    return [*FAST, "--output_dir", str(out), *extra]


def run(out: Path, *extra: str):
    return train(parse_train_config(args(out, *extra)))


def _fail_second_checkpoint(monkeypatch, error: BaseException) -> None:
    """Make ``torch.save`` write half a file and then fail, on the second checkpoint's first state file."""
    real = torch.save
    calls = {"n": 0}

    def flaky(obj, f, *a, **kw):
        if isinstance(f, (str, Path)) and ".tmp-checkpoint-4" in str(f):
            calls["n"] += 1
            if calls["n"] == 1:
                Path(f).write_bytes(b"PK\x03\x04 half a zip")  # something half-written, then the write fails
                raise error
        return real(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", flaky)


def test_disk_full_mid_write_is_a_checkpoint_write_error(tmp_path, monkeypatch):
    _fail_second_checkpoint(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    out = tmp_path / "full"
    with pytest.raises(CheckpointWriteError) as info:
        run(out, "--max_train_steps", "6", "--checkpointing_steps", "2")
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC and info.value.path.endswith(".tmp-checkpoint-4")
    assert message.startswith(f"Could not write checkpoint-4 in {str(out)!r}: No space left on device (writing ")
    assert "GiB free on that disk" in message or "MiB free on that disk" in message
    assert f"the last good checkpoint {str(out / 'checkpoint-2')!r} is kept" in message and "--resume_from_checkpoint latest" in message
    assert latest_checkpoint(out).name == "checkpoint-2" and not (out / "checkpoint-4").exists()
    assert not list(out.glob(".tmp-*"))  # the partial folder is gone
    monkeypatch.undo()
    resumed = run(out, "--max_train_steps", "6", "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest")
    assert resumed.global_step == 6 and len(resumed.losses) == 4


def test_torch_position_error_is_reported_as_a_write_failure_exit_1(tmp_path, monkeypatch, capsys):
    """torch reports a full disk as RuntimeError('... unexpected pos ...'): the user sees the project's error, one line."""
    _fail_second_checkpoint(monkeypatch, RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 65536 vs 65424"))
    out = tmp_path / "pos"
    assert main(args(out, "--max_train_steps", "6", "--checkpointing_steps", "2", "--no_verbose")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    line = next(x for x in err if x.startswith("python -m finetune.train: "))
    assert line.startswith("python -m finetune.train: failed (CheckpointWriteError): Could not write checkpoint-4 in ")
    assert "unexpected pos" not in line and "a write failed inside RuntimeError" in line and "checkpoint-2' is kept" in line
    assert not any("Traceback" in x for x in err)
    assert [p.name for p in find_checkpoints(out)] == ["checkpoint-2"] and not list(out.glob(".tmp-*"))


def test_leftovers_of_a_crashed_run_are_removed_on_the_next_start(tmp_path, caplog):
    out = tmp_path / "crashed"
    run(out, "--max_train_steps", "2", "--checkpointing_steps", "2")
    left = [out / ".tmp-checkpoint-4", out / ".old-checkpoint-2", out / ".config.yaml.k3j2.tmp", out / ".write-test-abc",
            out / "cache" / ".0123abcd-x1y2.safetensors"]  # fmt: skip
    left[0].mkdir()
    (left[0] / "optimizer.bin").write_bytes(b"half")
    left[1].mkdir()
    for path in left[2:]:
        path.write_bytes(b"x")
    keep = out / "cache" / "notes.txt"
    keep.write_text("not ours to remove")
    with caplog.at_level(logging.WARNING, logger="finetune.checkpoint"):
        resumed = run(out, "--max_train_steps", "3", "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest")
    assert resumed.global_step == 3
    assert not any(p.exists() for p in left) and keep.is_file()
    for path in left:
        assert f"Removed {path}, left by an interrupted earlier run." in caplog.text


@pytest.fixture()
def three_steps(tmp_path):
    """A run folder with checkpoint-3 (3 of 6 steps) and the losses of the uninterrupted 6-step run."""
    straight = run(tmp_path / "straight", "--max_train_steps", "6", "--checkpointing_steps", "3")
    out = tmp_path / "run"
    first = run(out, "--max_train_steps", "3", "--checkpointing_steps", "3")
    return out, first.losses + [], straight.losses


def test_corrupt_rng_state_stops_the_resume(three_steps, capsys):
    out, _, _ = three_steps
    (out / "checkpoint-3" / "random_states_0.pkl").write_bytes(b"\x80\x04 not a torch file")
    with pytest.raises(ResumeError, match=r"Cannot resume exactly from '.*checkpoint-3': random_states_0.pkl is unreadable .*"
                                          r"--resume_from_checkpoint checkpoint-N.*`--allow_inexact_resume`"):
        run(out, "--max_train_steps", "6", "--resume_from_checkpoint", "latest")
    assert main(args(out, "--max_train_steps", "6", "--resume_from_checkpoint", "latest", "--no_verbose")) == 1
    err = capsys.readouterr().err
    assert "python -m finetune.train: failed (ResumeError): Cannot resume exactly" in err and "Traceback" not in err
    assert [p.name for p in find_checkpoints(out)] == ["checkpoint-3"]  # nothing was trained
    torch.save({"step": 3}, out / "checkpoint-3" / "random_states_0.pkl")  # readable, but not what accelerate writes
    with pytest.raises(ResumeError, match=r"random_states_0.pkl is not an RNG state \(needs random_state, numpy_random_seed"):
        run(out, "--max_train_steps", "6", "--resume_from_checkpoint", "latest")


def test_allow_inexact_resume_continues_and_records_it(three_steps):
    out, first, straight = three_steps
    (out / "checkpoint-3" / "random_states_0.pkl").unlink()
    resumed = run(out, "--max_train_steps", "6", "--checkpointing_steps", "3", "--resume_from_checkpoint", "latest",
                  "--allow_inexact_resume")  # fmt: skip
    assert resumed.global_step == 6 and len(resumed.losses) == 3
    assert [p["file"] for p in resumed.inexact_resume] == ["random_states_0.pkl"]
    assert resumed.inexact_resume[0]["problem"] == "is missing"
    recorded = json.loads((out / "metrics.json").read_text())["inexact_resume"]
    assert recorded == resumed.inexact_resume
    state = json.loads((out / "checkpoint-6" / "training_state.json").read_text())
    assert state["inexact_resume"] == resumed.inexact_resume  # a once-inexact run stays marked in later checkpoints
    assert resumed.losses != straight[3:]  # a fresh dropout stream: honestly not the uninterrupted run


def test_corrupt_optimizer_state_stops_or_restarts_adam(three_steps):
    out, _, _ = three_steps
    (out / "checkpoint-3" / "optimizer.bin").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ResumeError, match=r"optimizer.bin is unreadable .*fresh Adam moments"):
        run(out, "--max_train_steps", "6", "--resume_from_checkpoint", "latest")
    resumed = run(out, "--max_train_steps", "6", "--resume_from_checkpoint", "latest", "--allow_inexact_resume")
    assert resumed.global_step == 6 and [p["file"] for p in resumed.inexact_resume] == ["optimizer.bin"]


def test_intact_resume_is_bit_exact_and_the_log_holds_each_step_once(three_steps):
    out, first, straight = three_steps
    log = out / "train_log.jsonl"
    with log.open("a") as f:  # the first run was killed after step 5 while writing its log
        f.write(json.dumps({"step": 4, "loss": 1.0}) + "\n" + json.dumps({"step": 5, "loss": 1.0}) + '\n{"step": 6, "lo')
    resumed = run(out, "--max_train_steps", "6", "--checkpointing_steps", "3", "--resume_from_checkpoint", "latest")
    assert first + resumed.losses == straight and resumed.inexact_resume == []
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in records] == pytest.approx(straight)  # the replayed steps' values, not the stale ones
