"""Every finetune entry point in a subprocess: a tiny success exits 0, a bad flag value exits 2 with the option's name on
stderr and no traceback; the `safer-clip-train` console-script path (`sys.exit(main([...]))`) exits 0 on success."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TINY = ["--config", "tiny_cpu.yaml", "--max_train_steps", "3", "--report_to", "none", "--no_eval_at_end", "--no_verbose"]


def _run(argv: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=ENV)


def _assert_bad_input(out: subprocess.CompletedProcess, prog: str, flag: str) -> None:
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: error: ") and flag in last, out.stderr[-2000:]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    done = _run(["-m", "finetune.train", *TINY, "--output_dir", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"output_dir": str(out), "global_step": 3, "last_checkpoint": str(out / "checkpoint-3")}
    return out


def test_train_module_success_exits_0(run_folder):
    assert (run_folder / "checkpoint-3" / "training_state.json").is_file()


def test_console_script_path_exits_0_after_success(tmp_path):
    """pyproject's `safer-clip-train = "finetune.train:main"`: the generated script does `sys.exit(main())`."""
    code = f"import sys; from finetune.train import main; sys.exit(main({[*TINY, '--output_dir', str(tmp_path / 'run')]!r}))"
    done = _run(["-c", code])
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoint-3").is_dir()


@pytest.mark.parametrize("bad, flag", [
    (["--learning_rate", "nan"], "`--learning_rate` must be a finite number, got nan"),
    (["--loss_weights", "rel_tt=-1"], "`--loss_weights` rel_tt=-1.0"),
    (["--output_dir", "README.md"], "`--output_dir` 'README.md' is a file"),
], ids=["nan-lr", "negative-weight", "output-dir-is-a-file"])  # fmt: skip
def test_train_bad_input_exits_2(bad, flag):
    _assert_bad_input(_run(["-m", "finetune.train", "--config", "tiny_cpu.yaml", *bad]), "python -m finetune.train", flag)


def test_export_and_evaluate_exit_0_then_2_on_bad_values(run_folder, tmp_path, sample_pairs_path):
    exported = tmp_path / "exported"
    done = _run(["-m", "finetune.export", "--checkpoint", str(run_folder), "--output_dir", str(exported)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == str(exported) and (exported / "safer_clip.json").is_file()
    bad = _run(["-m", "finetune.export", "--checkpoint", str(run_folder), "--output_dir", str(tmp_path / "x"), "--dtype", "float64"])
    _assert_bad_input(bad, "python -m finetune.export", "--dtype")
    done = _run(["-m", "finetune.evaluate", "--model", str(exported), "--data", str(sample_pairs_path), "--device", "cpu"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["text"]["n_pairs"] == 330
    bad = _run(["-m", "finetune.evaluate", "--model", str(exported), "--data", str(sample_pairs_path), "--k", "0"])
    _assert_bad_input(bad, "python -m finetune.evaluate", "`--k` must be in [1, inf], got 0")
