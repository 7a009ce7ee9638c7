"""Evaluation overhead: ``safer-diffusion evaluate`` wall time over generation alone, on the same prompts.

Measured side by side in one process, interleaved (same pipeline, same batches, same seeds):

* ``generate only``         : the generation loop, images discarded;
* ``generate, then score``  : the same loop scoring each batch on the main thread (no overlap);
* ``evaluate``              : :func:`safer_diffusion.evaluation.run.run_evaluation` into a fresh folder: generation
  with scoring on the background worker, durable results rows, summary (bootstrap), report and grid.

Goal: ``evaluate / generate only <= 1.05`` when generation dominates (real models on a GPU). With the
tiny random models generation takes milliseconds, so the NudeNet cost shows; ``--height/--width`` and
``--num_inference_steps`` make the tiny generation heavier to see the overlap.

    python -m benchmarks.bench_eval                                   # tiny models, CPU
    python -m benchmarks.bench_eval --tiny --device cuda
    python -m benchmarks.bench_eval --size sd15 --device cuda --dtype float16 --num_inference_steps 25   # SD 1.5-size random weights
    python -m benchmarks.bench_eval --base PATH --safe_encoder PATH --device cuda --num_inference_steps 25

The last line is one JSON object.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.eval_common import evaluate_config, work_batches  # noqa: E402
from benchmarks.timing import benchmark_main, dump_json_line, environment, print_table, time_interleaved  # noqa: E402
from safer_diffusion.evaluation.generate import generate_batch, load_pipeline, model_sources  # noqa: E402
from safer_diffusion.evaluation.run import run_evaluation  # noqa: E402
from safer_diffusion.evaluation.worker import build_scorers  # noqa: E402
from safer_diffusion.options import device_option, dtype_option, option, resolve_device_and_dtype  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class BenchEvalConfig:
    """The options of ``python -m benchmarks.bench_eval`` (the evaluation's own names where they are the same thing)."""

    tiny: bool = option(False, "Tiny random models (the default when --base is not given).")
    size: str = option("tiny", "Random-weight model size: tiny, or an SD 1.5-size UNet/VAE/text encoders (benchmarks.bench_pipeline).",
                       choices=("tiny", "sd15"))  # fmt: skip
    threads: int | None = option(None, "torch CPU threads (default: torch's).", bounds=(1, None))
    base: str | None = option(None, "Stable Diffusion folder or hub id (instead of --tiny).")
    safe_encoder: str | None = option(None, "Safe text encoder folder or hub id (with --base; default: the evaluation's).")
    device: str = device_option()
    dtype: str = dtype_option()
    prompts: str = option(str(ROOT / "assets" / "prompts" / "mild_unsafe.csv"), "Prompt file.")
    limit: int = option(8, "Prompts.", bounds=(1, None))
    num_images_per_prompt: int = option(2, "Images per prompt and variant.", bounds=(1, None), deprecated=("--images-per-prompt",))
    batch_size: int = option(4, "Images per denoising batch.", bounds=(1, None))
    num_inference_steps: int = option(10, "Denoising steps.", bounds=(1, 1000), deprecated=("--steps",))
    height: int | None = option(None, "Image height (a multiple of 8; with --width).")
    width: int | None = option(None, "Image width (a multiple of 8; with --height).")
    compare_original: bool = option(False, "Generate original and safe (compare()).")
    repeats: int = option(3, "Timed repeats of each variant.", bounds=(1, None))


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.bench_eval``: 0 success, 2 bad input, 1 failure."""
    return benchmark_main(BenchEvalConfig, _bench, argv, prog="python -m benchmarks.bench_eval", doc=__doc__)


def _bench(args: BenchEvalConfig) -> dict:
    import torch

    device, dtype = resolve_device_and_dtype(args.device, args.dtype)
    device = torch.device(device)
    tiny = args.tiny or args.base is None
    tmp = Path(tempfile.mkdtemp(prefix="bench_eval-"))
    try:
        return _measure(args, tiny, tmp, device, dtype)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _measure(args: BenchEvalConfig, tiny: bool, tmp: Path, device, dtype) -> dict:
    import torch

    config = evaluate_config(args, tiny=tiny, output_dir=tmp / "probe", source="benchmarks.bench_eval",
                             compare_original=args.compare_original)  # fmt: skip

    if tiny and args.size == "sd15":
        from benchmarks.bench_pipeline import sd15_components
        from safer_diffusion.pipeline_safer_stable_diffusion import SaferStableDiffusionPipeline

        pipe = SaferStableDiffusionPipeline(**sd15_components()).to(device, dtype)
        pipe.set_progress_bar_config(disable=True)
    else:
        _, _, base_path, safe_path = model_sources(config)
        pipe = load_pipeline(config, base_path, safe_path, device, dtype)
    scorers = build_scorers(config)
    records, items, batches = work_batches(pipe, config)
    exec_device = getattr(pipe, "_execution_device", device)

    def generate_only():
        for b in batches:
            generate_batch(pipe, b, config, exec_device, dtype)

    def generate_then_score():
        for b in batches:
            images = generate_batch(pipe, b, config, exec_device, dtype)
            for imgs in images.values():
                for s in scorers.values():
                    s.score(imgs)

    runs = {"n": 0}
    last = {}

    def evaluate():
        runs["n"] += 1
        out = tmp / f"run{runs['n']}"
        config.output_dir = str(out)
        last["result"] = run_evaluation(config, pipe=pipe, scorers=scorers, process_index=0, num_processes=1)
        shutil.rmtree(out, ignore_errors=True)

    timings = time_interleaved(
        {"generate only": generate_only, "generate, then score (serial)": generate_then_score, "evaluate": evaluate},
        warmup=1, repeats=args.repeats,
    )
    n_images = len(items) * len(config.variants)
    print(f"\n{len(records)} prompts x {config.num_images_per_prompt} images x {len(config.variants)} variant(s) = {n_images} images, "
          f"{config.num_inference_steps} steps, batch {config.batch_size}, {args.size if tiny else args.base}, {device}")
    print_table(timings, baseline="generate only")
    gen, serial, evaluation = (timings[k].median for k in ("generate only", "generate, then score (serial)", "evaluate"))
    result = last["result"]
    summary = {
        "benchmark": "bench_eval",
        "models": args.size if tiny else args.base,
        "device": str(device),
        "n_images": n_images,
        "steps": config.num_inference_steps,
        "batch_size": config.batch_size,
        "generate_only_s": round(gen, 4),
        "serial_generate_then_score_s": round(serial, 4),
        "evaluate_s": round(evaluation, 4),
        "evaluate_loop_s": round(result.generation_s, 4),
        "scoring_busy_s": round(result.scoring_busy_s, 4),
        "evaluate_over_generate_ratio": round(evaluation / gen, 4),
        "serial_over_generate_ratio": round(serial / gen, 4),
        "goal_ratio": 1.05,
        "cpu_threads": torch.get_num_threads(),
        "os_cpus": os.cpu_count(),
        "environment": environment(),
    }
    dump_json_line(summary)
    return summary


if __name__ == "__main__":
    raise SystemExit(main())
