"""Exact nearest-safe search (finetune.targets.nearest_safe): throughput, peak memory vs chunk size, 200k x 200k.

    python -m benchmarks.bench_targets                                   # CPU, 20k x 20k, extrapolates 200k x 200k
    python -m benchmarks.bench_targets --n 200000 --device cuda          # GPU: measures 200k x 200k directly
    python -m benchmarks.bench_targets --device cuda --dtype bfloat16    # faster shortlist, same exact answer
    python -m benchmarks.bench_targets --chunk_sizes 512 2048            # the chunk sizes to compare

For every chunk size it times ``nearest_safe`` and, interleaved with it, a plain chunked
``matmul + argmax`` (the speed floor, without the exactness machinery: shortlist, float64
rescoring, lowest-index ties). Cost grows as N x M, so the CPU time of 200k x 200k is extrapolated
from the measured pairs/s (goal <= 15 min); on CUDA with ``--n 200000`` it is measured (goal <= 2 s).
The last line is one JSON object.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/bench_targets.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.timing import benchmark_main, dump_json_line, environment, rss_bytes, time_interleaved  # noqa: E402
from finetune.targets import nearest_safe  # noqa: E402
from safer_diffusion.options import device_option, dtype_option, option, resolve_device_and_dtype  # noqa: E402

PROG = "python -m benchmarks.bench_targets"
FULL = 200_000


@dataclass
class TargetsBenchConfig:
    n: int | None = option(None, "Unsafe rows and pool size (default: 20000 on CPU, 200000 on CUDA).", bounds=(1, None))
    pool: int | None = option(None, "Safe pool size (default: --n).", bounds=(1, None))
    dim: int = option(768, "Embedding width (768 = CLIP ViT-L/14 projection).", bounds=(1, None))
    device: str = device_option()
    dtype: str = dtype_option("float32", help="Matmul dtype of the search's shortlist (auto = float16 on CUDA).")
    chunk_sizes: list[int] | None = option(None, "Chunk sizes to compare (default: 512 2048 8192 on CPU; 8192 16384 on CUDA).",
                                           bounds=(1, None), legacy_commas=True)  # fmt: skip
    repeats: int = option(3, "Timed repeats per variant.", bounds=(1, None))
    seed: int = option(0, "Random seed of the embeddings.", bounds=(0, 2**63 - 1))

    def validate(self) -> None:
        resolve_device_and_dtype(self.device, self.dtype)


def plain_search(unsafe: torch.Tensor, safe: torch.Tensor, chunk: int, dtype: torch.dtype):
    """Chunked matmul + max: the speed floor (not tie-exact, not chunk-invariant)."""
    pool = safe.to(dtype)
    out = []
    for start in range(0, unsafe.shape[0], chunk):
        out.append((unsafe[start:start + chunk].to(dtype) @ pool.T).max(dim=1).indices.cpu())
    return torch.cat(out)


def run(args: TargetsBenchConfig) -> dict:
    """Time every chunk size against the plain search; print the table and the JSON line; return the result."""
    device, dtype = resolve_device_and_dtype(args.device, args.dtype)
    cuda = torch.device(device).type == "cuda"
    dtype_name = str(dtype).removeprefix("torch.")
    n = args.n or (FULL if cuda else 20_000)
    m = args.pool or n
    chunks = list(args.chunk_sizes or ((8192, 16384) if cuda else (512, 2048, 8192)))

    g = torch.Generator(device="cpu").manual_seed(args.seed)
    unsafe = F.normalize(torch.randn(n, args.dim, generator=g), dim=1)
    safe = F.normalize(torch.randn(m, args.dim, generator=g), dim=1)
    if cuda:
        unsafe, safe = unsafe.to(device), safe.to(device)

    fns = {}
    for c in chunks:
        fns[f"nearest_safe chunk={c}"] = (lambda c=c: nearest_safe(unsafe, safe, chunk_size=c, dtype=dtype))
        fns[f"plain matmul+max chunk={c}"] = (lambda c=c: plain_search(unsafe, safe, c, dtype))
    base_rss = rss_bytes()
    timings = time_interleaved(fns, warmup=1, repeats=args.repeats)

    # exactness on this data: same indices for every chunk size
    ref = nearest_safe(unsafe, safe, chunk_size=chunks[0], dtype=dtype)
    invariant = all(torch.equal(nearest_safe(unsafe, safe, chunk_size=c, dtype=dtype)[0], ref[0]) for c in chunks[1:])
    agree_plain = float((plain_search(unsafe, safe, chunks[0], torch.float32) == ref[0]).float().mean())

    env = environment()
    print(f"exact nearest-safe search: {n} unsafe x {m} safe, dim {args.dim}, {device} {dtype_name}, {env.get('device')}, "
          f"torch threads {env.get('torch_threads')}")
    print(f"{'name':<34}{'median s':>10}{'pairs/s':>12}{'peak MiB':>10}{'ratio':>8}")
    rows = {}
    for c in chunks:
        t = timings[f"nearest_safe chunk={c}"]
        p = timings[f"plain matmul+max chunk={c}"]
        mem = t.peak_mem_bytes if cuda else max(0, t.peak_mem_bytes - base_rss)
        rows[c] = {"median_s": t.median, "pairs_per_s": n * m / t.median, "peak_mem_mib": mem / 2**20,
                   "plain_median_s": p.median, "overhead_over_plain": t.median / p.median}
        print(f"{t.name:<34}{t.median:10.3f}{n * m / t.median:12.3g}{mem / 2**20:10.1f}{t.median / p.median:8.2f}")
        print(f"{p.name:<34}{p.median:10.3f}{n * m / p.median:12.3g}{'':>10}{1.0:8.2f}")
    best = min(chunks, key=lambda c: rows[c]["median_s"])
    measured_full = n >= FULL and m >= FULL
    full_s = rows[best]["median_s"] * (FULL * FULL) / (n * m)
    goal = 2.0 if cuda else 15 * 60.0
    kind = "measured" if measured_full else "extrapolated"
    print(f"200k x 200k: {full_s:.2f} s ({kind}, chunk {best}); goal <= {goal:.0f} s: {'met' if full_s <= goal else 'NOT met'}")
    print(f"chunk-size invariant: {invariant}; agreement with plain argmax: {agree_plain:.4f} (ties/near-ties differ)")
    result = {
        "benchmark": "bench_targets", "n": n, "pool": m, "dim": args.dim, "device": device, "dtype": dtype_name,
        "chunks": {str(c): rows[c] for c in chunks}, "best_chunk": best, "pairs_per_s": rows[best]["pairs_per_s"],
        "full_200k_s": full_s, "full_200k_kind": kind, "goal_s": goal, "goal_met": full_s <= goal,
        "overhead_over_plain": rows[best]["overhead_over_plain"], "chunk_invariant": invariant,
        "env": {k: env.get(k) for k in ("device", "torch", "cpus", "torch_threads")}, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    dump_json_line(result)
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.bench_targets``: 0 success, 2 bad input, 1 failure."""
    return benchmark_main(TargetsBenchConfig, run, argv, prog=PROG, doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
