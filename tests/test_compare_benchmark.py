"""benchmarks/bench_compare.py: runs tiny (1 step, 1 repeat) and reports every ratio per N; bad options exit 2.
No timing is asserted (the figures are the benchmark's, not a test's)."""

import json

import pytest

from benchmarks import bench_compare, run_all

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_bench_compare_tiny_reports_the_ratios_per_n(capsys):
    assert bench_compare.main(["--num_inference_steps", "1", "--repeats", "1", "--n_encoders", "3", "1", "--max_batch", "4"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["benchmark"] == "bench_compare" and result["n_encoders"] == [1, 3] and result["max_batch"] == 4
    for n in (1, 3):
        for key in (f"compare_n{n}_over_one", f"compare_n{n}_per_encoder", f"compare_n{n}_over_separate",
                    f"separate_n{n}_over_one", f"compare_n{n}_peak_mem_over_one"):  # fmt: skip
            assert result[key] > 0, key
        assert result[f"compare_n{n}_per_encoder"] == pytest.approx(result[f"compare_n{n}_over_one"] / n)
    assert set(result["median_s"]) == {"one generation", "compare() N=1", "separate N=1", "compare() N=3", "separate N=3"}
    assert "compare/(N*one)" in out and "compare/separate" in out  # the side-by-side table


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["--n_encoders", "0"], "`--n_encoders` must be in [1, 16], got 0"),
        (["--n_encoders", "2", "2"], "`--n_encoders` lists a number twice: [2, 2]"),
        (["--max_batch", "0"], "`--max_batch` must be in [1, inf], got 0"),
        (["--height", "60"], "`--height` must be a multiple of 8, got 60"),
        (["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
    ],
)
def test_bad_options_exit_2_with_the_flag_named(argv, pattern, capsys):
    assert bench_compare.main(argv) == 2
    err = capsys.readouterr().err
    assert pattern in err.strip().splitlines()[-1] and "Traceback" not in err


def test_run_all_and_the_gpu_suite_run_it():
    from pathlib import Path

    assert "bench_compare" in run_all.BENCHMARKS
    suite = (Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.sh").read_text()
    assert "benchmarks.bench_compare" in suite and '"compare"' in suite and "compare_n3_per_encoder" in suite
