"""benchmarks/bench_pipeline.py runs (tiny, 1 step, 1 repeat) and reports the contract keys. No timing is asserted."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_pipeline_tiny_runs_and_reports_ratios():
    cmd = [sys.executable, "benchmarks/bench_pipeline.py", "--steps", "1", "--repeats", "1", "--threads", "1"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("safe_over_vanilla", "compare_over_single", "compare_peak_mem_over_single", "environment"):
        assert key in result
    assert result["safe_over_vanilla"] > 0 and result["compare_over_single"] > 0
    assert set(result["median_s"]) == {"vanilla StableDiffusionPipeline", "SaferSD (scoring off)", "SaferSD compare()"}
