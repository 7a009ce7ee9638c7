"""Run every benchmark in turn (CPU tiny sizes by default) and print one table of their ratios.

    python benchmarks/run_all.py                 # `make bench`
    python benchmarks/run_all.py --out bench.json

Each benchmark prints its own side-by-side table and, as its last line, one JSON object;
this runner collects those objects. Extra arguments after ``--`` go to every benchmark.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ["bench_pipeline", "bench_targets", "bench_train", "bench_eval"]


def run_one(name: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", f"benchmarks.{name}", *extra]
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=HERE.parent, stdout=subprocess.PIPE, stderr=None, text=True)
    sys.stdout.write(proc.stdout)
    result: dict = {"benchmark": name, "returncode": proc.returncode, "wall_s": round(time.perf_counter() - t0, 2)}
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    if proc.returncode == 0 and lines:
        try:
            result["result"] = json.loads(lines[-1])
        except json.JSONDecodeError:
            result["error"] = "last line is not JSON"
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS, help="run only these benchmarks")
    parser.add_argument("--out", type=Path, help="write all results as one JSON file")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    results = [run_one(name, extra) for name in (args.only or BENCHMARKS) if (HERE / f"{name}.py").is_file()]
    print("\n=== summary")
    for r in results:
        ratios = {k: v for k, v in (r.get("result") or {}).items() if isinstance(v, (int, float)) and ("over" in k or "ratio" in k or "speedup" in k)}
        print(f"{r['benchmark']:<16} rc={r['returncode']} wall={r['wall_s']:>7.1f}s {json.dumps(ratios)}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0 if all(r["returncode"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
