"""The benchmarks speak the shared vocabulary (safer_diffusion.options): bad values exit 2 with one line, old spellings warn."""

import json

import pytest

from benchmarks import bench_pipeline, bench_targets, bench_train, run_all


@pytest.mark.parametrize(
    "module, argv, pattern",
    [
        (bench_pipeline, ["--num_inference_steps", "0"], "`--num_inference_steps` must be in [1, 1000], got 0"),
        (bench_pipeline, ["--height", "60"], "`--height` must be a multiple of 8, got 60"),
        (bench_pipeline, ["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
        (bench_targets, ["--n", "0"], "`--n` must be in [1, inf], got 0"),
        (bench_targets, ["--chunk_sizes", "512", "x"], "`--chunk_sizes`: not a whole number: 'x'"),
        (bench_train, ["--repeats", "0"], "`--repeats` must be in [1, inf], got 0"),
        (bench_train, ["--peak_tflops", "nan"], "`--peak_tflops` must be a finite number, got nan"),
        (bench_train, ["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
        (run_all, ["--only", "bench_nope"], "argument --only: invalid choice: 'bench_nope'"),
    ],
)
def test_bad_values_exit_2_with_the_flag_named(module, argv, pattern, capsys):
    assert module.main(argv) == 2
    err = capsys.readouterr().err
    assert pattern in err.strip().splitlines()[-1] and "Traceback" not in err


def test_run_all_checks_its_output_before_running_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(run_all, "run_one", lambda *a: pytest.fail("a benchmark ran before --output was checked"))
    assert run_all.main(["--output", str(tmp_path)]) == 2
    assert "is a directory; pass a file path" in capsys.readouterr().err


def test_run_all_passes_arguments_after_the_separator_and_writes_json(tmp_path, monkeypatch):
    seen = []

    def fake_run_one(name, extra):
        seen.append((name, extra))
        return {"benchmark": name, "returncode": 0, "wall_s": 0.0, "result": {"x_over_y": 1.0}}

    monkeypatch.setattr(run_all, "run_one", fake_run_one)
    out = tmp_path / "all.json"
    assert run_all.main(["--only", "bench_pipeline", "bench_train", "--out", str(out), "--", "--repeats", "1"]) == 0
    assert seen == [("bench_pipeline", ["--repeats", "1"]), ("bench_train", ["--repeats", "1"])]
    assert [r["benchmark"] for r in json.loads(out.read_text())] == ["bench_pipeline", "bench_train"]


def test_bench_targets_runs_small_with_the_old_comma_syntax(capsys, caplog):
    with caplog.at_level("WARNING"):
        assert bench_targets.main(["--n", "300", "--dim", "16", "--repeats", "1", "--chunk_sizes", "64,128", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["benchmark"] == "bench_targets" and set(result["chunks"]) == {"64", "128"} and result["chunk_invariant"]
    assert result["dtype"] == "float32" and "Comma-separated `--chunk_sizes` is deprecated" in caplog.text
