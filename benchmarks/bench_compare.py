"""N-way ``compare()`` against N separate generations: wall time and peak memory, measured side by side (interleaved).

    python -m benchmarks.bench_compare                                                   # CPU, tiny models (seconds)
    python -m benchmarks.bench_compare --size sd15 --device cuda --dtype float16         # GPU, SD1.5-size, 512 px, 25 steps
    python -m benchmarks.bench_compare --n_encoders 3 --max_batch 4                      # UNet rows per pass bounded

For every N in ``--n_encoders`` (default 2 3 5), on the same components (random weights, built from configs: nothing
is downloaded; ``benchmarks.bench_pipeline`` owns them), one run interleaves:

* ``one generation``: ``pipe(prompt)`` (the safe encoder, scoring off), the unit every ratio is given in;
* ``compare() N=k``: ``pipe.compare(prompt, text_encoders={k encoders}, score=False)``: one denoising loop,
  ``2 * k`` prompt batches per UNet pass;
* ``separate N=k``: k ordinary generations, one per encoder, with the same seed.

Reported per N: ``compare_n{k}_over_one`` (wall of compare() in one-generation units), ``compare_n{k}_per_encoder``
(the same divided by k; goal on GPU <= 0.6 for k >= 3), ``compare_n{k}_over_separate`` and
``compare_n{k}_peak_mem_over_one`` (resident weights included, as in bench_pipeline). On the CPU the tiny UNet gains
little from a bigger batch, so the CPU ratios only show that the plumbing works. The last output line is one JSON
object.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/bench_compare.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.bench_pipeline import resolve_run, sd15_components, tiny_components  # noqa: E402
from benchmarks.timing import benchmark_main, dump_json_line, environment, print_table, time_interleaved  # noqa: E402
from safer_diffusion.options import device_option, dtype_option, option, resolve_device_and_dtype  # noqa: E402

PROG = "python -m benchmarks.bench_compare"
#: Goal on a GPU for N >= 3: compare() of N encoders costs at most 0.6 * N generations.
GOAL_PER_ENCODER = 0.6


@dataclass
class CompareBenchConfig:
    size: str = option("tiny", "Model size: tiny, or SD 1.5-size random weights (benchmarks.bench_pipeline).",
                       choices=("tiny", "sd15"))  # fmt: skip
    device: str = device_option("cpu")
    dtype: str = dtype_option()
    n_encoders: list[int] = option([2, 3, 5], "Numbers of encoders N to compare, each against N separate generations.",
                                   bounds=(1, 16))  # fmt: skip
    max_batch: int | None = option(None, "UNet rows per forward pass in compare() (default: all 2*N*batch rows at once).",
                                   bounds=(1, None))  # fmt: skip
    num_inference_steps: int | None = option(None, "Denoising steps (default: 25 sd15, 10 tiny).", bounds=(1, 1000),
                                             deprecated=("--steps",))  # fmt: skip
    height: int | None = option(None, "Image height, a multiple of 8 (default: 512 sd15, 64 tiny).", bounds=(8, 4096))
    width: int | None = option(None, "Image width, a multiple of 8 (default: 512 sd15, 64 tiny).", bounds=(8, 4096))
    repeats: int | None = option(None, "Timed repeats per variant (default: 5 tiny, 3 sd15).", bounds=(1, None))
    threads: int | None = option(None, "torch CPU threads (default: torch's).", bounds=(1, None))

    def validate(self) -> None:
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and value % 8:
                raise ValueError(f"`--{name}` must be a multiple of 8, got {value}.")
        if not self.n_encoders:
            raise ValueError("`--n_encoders` is empty; give at least one number of encoders, e.g. `--n_encoders 2 3 5`.")
        if len(set(self.n_encoders)) != len(self.n_encoders):
            raise ValueError(f"`--n_encoders` lists a number twice: {self.n_encoders}; give each N once.")
        resolve_device_and_dtype(self.device, self.dtype)


def extra_encoders(like, n: int, first_seed: int = 100) -> list:
    """``n`` text encoders of the same architecture as ``like``, with their own random weights."""
    from transformers import CLIPTextModel

    encoders = []
    for i in range(n):
        torch.manual_seed(first_seed + i)
        encoders.append(CLIPTextModel(like.config).to(device=like.device, dtype=like.dtype).eval())
    return encoders


def run(config: CompareBenchConfig) -> dict:
    """Time one generation, compare() and separate generations for every N; print the tables and the JSON line."""
    sd15, steps, height, width, repeats, device, dtype, dtype_name = resolve_run(config, repeats_sd15=3, repeats_tiny=5)
    ns = sorted(config.n_encoders)

    from diffusers import StableDiffusionPipeline

    from safer_diffusion.pipeline_safer_stable_diffusion import SaferStableDiffusionPipeline

    parts = sd15_components() if sd15 else tiny_components()
    pipe = SaferStableDiffusionPipeline(**parts).to(device)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    # every encoder: the pipeline's two, then random ones of the same architecture
    modules = {"original": pipe.original_text_encoder, "safe": pipe.text_encoder}
    for i, module in enumerate(extra_encoders(pipe.text_encoder, max(0, max(ns) - 2))):
        modules[f"extra{i + 1}"] = module
    names = list(modules)
    singles = {}
    for name, module in modules.items():  # a plain pipeline per encoder: an ordinary generation, weights shared
        singles[name] = StableDiffusionPipeline(**{**pipe.components, "text_encoder": module, "safety_checker": None,
                                                   "feature_extractor": None}, requires_safety_checker=False)  # fmt: skip
        singles[name].set_progress_bar_config(disable=True)
    prompt = "a photo of an astronaut riding a horse on the moon"
    common = dict(num_inference_steps=steps, height=height, width=width, output_type="np")

    def gen():
        return torch.Generator(device).manual_seed(0)

    def compare_fn(k):
        chosen = {name: modules[name] for name in names[:k]}
        return lambda: pipe.compare(prompt, text_encoders=chosen, generator=gen(), score=False, max_batch=config.max_batch, **common)

    def separate_fn(k):
        return lambda: [singles[name](prompt, generator=gen(), **common) for name in names[:k]]

    fns = {"one generation": lambda: pipe(prompt, generator=gen(), **common)}
    for k in ns:
        fns[f"compare() N={k}"] = compare_fn(k)
        fns[f"separate N={k}"] = separate_fn(k)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated() if cuda else 0
    timings = time_interleaved(fns, warmup=1, repeats=repeats)
    one = timings["one generation"]

    def mem(t):
        return resident + t.peak_mem_bytes

    result = {
        "benchmark": "bench_compare", "size": config.size, "device": device, "dtype": dtype_name, "num_inference_steps": steps,
        "height": height, "width": width, "repeats": repeats, "n_encoders": ns, "max_batch": config.max_batch,
        "one_generation_s": one.median,
    }  # fmt: skip
    print(f"size={config.size} device={device} dtype={dtype_name} num_inference_steps={steps} {height}x{width} "
          f"repeats={repeats} max_batch={config.max_batch}  (times: median of {repeats}; ratios in one-generation units)")  # fmt: skip
    print_table(timings, baseline="one generation")
    print()
    header = (f"{'N':>3}{'compare s':>12}{'separate s':>12}{'compare/one':>13}{'separate/one':>14}{'compare/(N*one)':>17}"
              f"{'compare/separate':>18}{'peak cmp/one':>14}{'goal':>7}")  # fmt: skip
    print(header)
    for k in ns:
        cmp, sep = timings[f"compare() N={k}"], timings[f"separate N={k}"]
        over_one = cmp.median / one.median
        per_encoder = over_one / k
        peak = mem(cmp) / mem(one)
        goal = "-" if k < 3 else ("met" if per_encoder <= GOAL_PER_ENCODER else "no")
        print(f"{k:>3}{cmp.median:12.4f}{sep.median:12.4f}{over_one:13.3f}{sep.median / one.median:14.3f}{per_encoder:17.3f}"
              f"{cmp.median / sep.median:18.3f}{peak:14.3f}{goal:>7}")  # fmt: skip
        result.update({
            f"compare_n{k}_over_one": over_one,
            f"compare_n{k}_per_encoder": per_encoder,
            f"compare_n{k}_over_separate": cmp.median / sep.median,
            f"separate_n{k}_over_one": sep.median / one.median,
            f"compare_n{k}_peak_mem_over_one": peak,
        })  # fmt: skip
    if not cuda:
        print(f"(CPU: the goal compare/(N*one) <= {GOAL_PER_ENCODER} for N >= 3 is a GPU goal; on a CPU the tiny UNet's "
              "gain from a bigger batch is small and noisy, so these figures check the plumbing, not the goal.)")  # fmt: skip
    result.update({
        "goal_per_encoder": GOAL_PER_ENCODER,
        "median_s": {k: t.median for k, t in timings.items()},
        "peak_mem_bytes": {k: t.peak_mem_bytes for k, t in timings.items()},
        "peak_mem_kind": one.peak_mem_kind + (" + resident weights" if cuda else ""),
        "resident_bytes": resident,
        "environment": environment(),
    })  # fmt: skip
    dump_json_line(result)
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.bench_compare``: 0 success, 2 bad input, 1 failure."""
    return benchmark_main(CompareBenchConfig, run, argv, prog=PROG, doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
