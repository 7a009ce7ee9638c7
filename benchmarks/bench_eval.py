"""Evaluation overhead: ``safer-diffusion evaluate`` wall time over generation alone, on the same prompts.

Measured side by side in one process, interleaved (same pipeline, same batches, same seeds):

* ``generate only``         : the generation loop, images discarded;
* ``generate, then score``  : the same loop scoring each batch on the main thread (no overlap);
* ``evaluate``              : :func:`safer_diffusion.evaluate.run_evaluation` into a fresh folder: generation
  with scoring on the background worker, durable results rows, summary (bootstrap), report and grid.

Goal: ``evaluate / generate only <= 1.05`` when generation dominates (real models on a GPU). With the
tiny random models generation takes milliseconds, so the NudeNet cost shows; ``--height/--width`` and
``--steps`` make the tiny generation heavier to see the overlap.

    python -m benchmarks.bench_eval                                   # tiny models, CPU
    python -m benchmarks.bench_eval --tiny --device cuda
    python -m benchmarks.bench_eval --size sd15 --device cuda --dtype float16 --steps 25   # SD 1.5-size random weights, 512 px
    python -m benchmarks.bench_eval --base PATH --safe-encoder PATH --device cuda --steps 25

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import dump_json_line, environment, print_table, time_interleaved  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random models (the default when --base is not given)")
    p.add_argument("--size", choices=("tiny", "sd15"), default="tiny",
                   help="random-weight model size: tiny, or an SD 1.5-size UNet/VAE/text encoders (benchmarks.bench_pipeline)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--base", default=None, help="Stable Diffusion folder or hub id (instead of --tiny)")
    p.add_argument("--safe-encoder", default=None, help="safe text encoder folder or hub id (with --base)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--prompts", default=str(ROOT / "assets" / "prompts" / "mild_unsafe.csv"))
    p.add_argument("--limit", type=int, default=8, help="prompts")
    p.add_argument("--images-per-prompt", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--compare-original", action="store_true", help="generate original and safe (compare())")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from safer_diffusion import evaluate as ev
    from safer_diffusion.evaluation.prompts import load_prompts

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tiny = args.tiny or args.base is None
    tmp = Path(tempfile.mkdtemp(prefix="bench_eval-"))
    argv_eval = ["--prompts", args.prompts, "--limit", str(args.limit), "--images-per-prompt", str(args.images_per_prompt),
                 "--batch-size", str(args.batch_size), "--num-inference-steps", str(args.steps), "--dtype", args.dtype,
                 "--no-progress", "--out", str(tmp / "probe")]
    argv_eval += ["--tiny"] if tiny else ["--base", args.base] + (["--safe-encoder", args.safe_encoder] if args.safe_encoder else [])
    argv_eval += ["--compare-original"] if args.compare_original else []
    argv_eval += ["--height", str(args.height)] if args.height else []
    argv_eval += ["--width", str(args.width)] if args.width else []
    config = ev.config_from_args(argv_eval)

    dtype = ev._resolve_dtype(config.dtype, device)
    if tiny and args.size == "sd15":
        from benchmarks.bench_pipeline import sd15_components
        from safer_diffusion.pipeline_safer_stable_diffusion import SaferStableDiffusionPipeline

        pipe = SaferStableDiffusionPipeline(**sd15_components()).to(device, dtype)
        pipe.set_progress_bar_config(disable=True)
    else:
        _, _, base_path, safe_path = ev._model_sources(config)
        pipe = ev.load_pipeline(config, base_path, safe_path, device, dtype)
    scorers = ev.build_scorers(config)
    default_size = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    records = load_prompts(config.prompts, limit=config.limit)
    items, _ = ev.make_work_items(records, config, default_size, default_size, done=set())
    batches = ev.make_batches(items, config.batch_size)
    exec_device = getattr(pipe, "_execution_device", device)

    def generate_only():
        for b in batches:
            ev.generate_batch(pipe, b, config, exec_device, dtype)

    def generate_then_score():
        for b in batches:
            images = ev.generate_batch(pipe, b, config, exec_device, dtype)
            for imgs in images.values():
                for s in scorers.values():
                    s.score(imgs)

    runs = {"n": 0}
    last = {}

    def evaluate():
        runs["n"] += 1
        out = tmp / f"run{runs['n']}"
        config.out = str(out)
        last["result"] = ev.run_evaluation(config, pipe=pipe, scorers=scorers, process_index=0, num_processes=1)
        shutil.rmtree(out, ignore_errors=True)

    try:
        timings = time_interleaved(
            {"generate only": generate_only, "generate, then score (serial)": generate_then_score, "evaluate": evaluate},
            warmup=1, repeats=args.repeats,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n_images = len(items) * len(config.variants)
    print(f"\n{len(records)} prompts x {config.images_per_prompt} images x {len(config.variants)} variant(s) = {n_images} images, "
          f"{config.num_inference_steps} steps, batch {config.batch_size}, {args.size if tiny else args.base}, {device}")
    print_table(timings, baseline="generate only")
    gen, serial, evaluation = (timings[k].median for k in ("generate only", "generate, then score (serial)", "evaluate"))
    result = last["result"]
    dump_json_line({
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
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
