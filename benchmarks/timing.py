"""What every benchmark shares: interleaved timing (warm-up, repeats, median, min/max, peak memory), the
environment record, the result table and JSON line, and :func:`benchmark_main` (options -> exit status).

Benchmarks measure the things they compare side by side in one run, interleaved, and print
ratios (machines are noisy; absolute times alone prove little).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from safer_diffusion.options import configure_logging, parse_config, run_main

__all__ = ["Timing", "benchmark_main", "dump_json_line", "environment", "print_table", "rss_bytes", "time_interleaved"]


@dataclass
class Timing:
    name: str
    times_s: list[float] = field(default_factory=list)
    peak_mem_bytes: int = 0
    peak_mem_kind: str = "rss"

    @property
    def median(self) -> float:
        return statistics.median(self.times_s)

    @property
    def min(self) -> float:
        return min(self.times_s)

    @property
    def max(self) -> float:
        return max(self.times_s)


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def _sync() -> None:
    if _cuda_available():
        import torch

        torch.cuda.synchronize()


def rss_bytes() -> int:
    """This process's resident memory in bytes."""
    try:
        import psutil

        return psutil.Process(os.getpid()).memory_info().rss
    except ImportError:  # pragma: no cover
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _measure_once(fn: Callable[[], object]) -> tuple[float, int, str]:
    gc.collect()
    if _cuda_available():
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        dt = time.perf_counter() - t0
        return dt, torch.cuda.max_memory_allocated() - base, "cuda_max_allocated_over_baseline"
    # CPU: sample RSS in a thread for the peak during the call
    import threading

    peak = [rss_bytes()]
    stop = threading.Event()

    def sampler():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes())
            stop.wait(0.005)

    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    t0 = time.perf_counter()
    try:
        fn()
    finally:
        dt = time.perf_counter() - t0
        stop.set()
        th.join()
    return dt, peak[0], "rss_peak"


def time_interleaved(fns: dict[str, Callable[[], object]], warmup: int = 1, repeats: int = 5) -> dict[str, Timing]:
    """Time several callables round-robin (A, B, C, A, B, C, ...) so drift hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out = {name: Timing(name) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            dt, mem, kind = _measure_once(fn)
            out[name].times_s.append(dt)
            out[name].peak_mem_bytes = max(out[name].peak_mem_bytes, mem)
            out[name].peak_mem_kind = kind
    return out


def environment() -> dict:
    """Device and package versions, recorded next to every figure."""
    env = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "machine": platform.machine(),
           "cpus": os.cpu_count()}
    try:
        import torch

        env["torch"] = torch.__version__
        env["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})"
        env["torch_threads"] = torch.get_num_threads()
    except ImportError:  # pragma: no cover
        pass
    for pkg in ("diffusers", "transformers", "accelerate", "open_clip", "xformers", "nudenet"):
        try:
            env[pkg] = __import__(pkg).__version__
        except Exception:
            pass
    return env


def print_table(timings: dict[str, Timing], baseline: str | None = None) -> None:
    """Print name, median/min/max, peak memory and the ratio to ``baseline`` (stdout: benchmarks are scripts)."""
    base = timings[baseline] if baseline else None
    print(f"{'name':<34}{'median s':>10}{'min s':>10}{'max s':>10}{'peak MiB':>10}{'ratio':>8}")
    for name, t in timings.items():
        ratio = f"{t.median / base.median:8.3f}" if base else ""
        print(f"{name:<34}{t.median:10.4f}{t.min:10.4f}{t.max:10.4f}{t.peak_mem_bytes / 2**20:10.1f}{ratio}")


def dump_json_line(obj: dict) -> None:
    """Print ``obj`` as the final one-line JSON result of a benchmark."""
    print(json.dumps(obj, sort_keys=True))


def benchmark_main(config_cls: type, body: Callable[[Any], dict], argv: Sequence[str] | None, *, prog: str, doc: str) -> int:
    """Parse ``argv`` into ``config_cls`` (:mod:`safer_diffusion.options`), run ``body(config)``; 0, 2 bad input, 1 failure.

    A config with a ``threads`` option (set) gets ``torch.set_num_threads(threads)`` before ``body`` runs.
    """
    configure_logging()

    def run() -> None:
        config = parse_config(config_cls, argv, prog=prog, description=doc.split("\n\n")[0])
        if getattr(config, "threads", None):
            import torch

            torch.set_num_threads(config.threads)
        body(config)

    return run_main(run, prog=prog)
