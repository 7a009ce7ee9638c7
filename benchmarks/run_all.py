"""Run every benchmark in turn (CPU tiny sizes by default) and print one table of their ratios.

    python benchmarks/run_all.py                                  # `make bench`
    python benchmarks/run_all.py --output bench.json              # also write every result to one JSON file
    python benchmarks/run_all.py --only bench_pipeline -- --repeats 1

Each benchmark prints its own side-by-side table and, as its last line, one JSON object;
this runner collects those objects. Arguments after ``--`` go to every benchmark, so they must be
flags every benchmark knows (``--repeats``, ``--device``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/run_all.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safer_diffusion.fileio import atomic_write_text, check_output_file  # noqa: E402
from safer_diffusion.options import configure_logging, option, parse_config, run_main  # noqa: E402

HERE = Path(__file__).resolve().parent
PROG = "python benchmarks/run_all.py"
#: run name -> (benchmark module, its own arguments); `bench_method` needs an encoder installed on the side, so it is not here.
RUNS: dict[str, tuple[str, list[str]]] = {
    "bench_pipeline": ("bench_pipeline", []),
    "bench_pipeline_sdxl": ("bench_pipeline", ["--size", "sdxl-tiny"]),
    "bench_compare": ("bench_compare", []),
    "bench_targets": ("bench_targets", []),
    "bench_train": ("bench_train", []),
    "bench_eval": ("bench_eval", []),
    "bench_fidelity": ("bench_fidelity", []),
}
BENCHMARKS = tuple(RUNS)


@dataclass
class RunAllConfig:
    only: list[str] = option([], "Run only these benchmarks (default: all).", choices=BENCHMARKS)
    output: Path | None = option(None, "Write all results to this JSON file.", deprecated=("--out",), metavar="FILE.json")

    def validate(self) -> None:
        if self.output is not None:
            check_output_file(self.output, "--output")


def run_one(name: str, extra: list[str]) -> dict:
    module, own = RUNS[name]
    cmd = [sys.executable, "-m", f"benchmarks.{module}", *own, *extra]
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


def run(config: RunAllConfig, extra: list[str]) -> int:
    results = [run_one(name, extra) for name in (config.only or BENCHMARKS)]
    print("\n=== summary")
    for r in results:
        ratios = {k: v for k, v in (r.get("result") or {}).items() if isinstance(v, (int, float)) and ("over" in k or "ratio" in k or "speedup" in k)}
        print(f"{r['benchmark']:<20} rc={r['returncode']} wall={r['wall_s']:>7.1f}s {json.dumps(ratios)}")
    if config.output:
        config.output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(config.output, json.dumps(results, indent=2))
    return 0 if all(r["returncode"] == 0 for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    """0 when every benchmark exited 0, 1 otherwise, 2 on a bad option."""
    argv = list(sys.argv[1:] if argv is None else argv)
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    configure_logging()
    return run_main(lambda: run(parse_config(RunAllConfig, own, prog=PROG, description=__doc__.split("\n\n")[0]), extra), prog=PROG)


if __name__ == "__main__":
    raise SystemExit(main())
