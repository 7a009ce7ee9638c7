"""Fidelity overhead: the per-image cost of the paired metrics + CLIP score next to the cost of generating the image.

One evaluation folder is generated first (``compare()``: original and safe from the same latents,
images saved; not timed). Then, side by side in one process, interleaved:

* ``generate (compare)``             : the generation loop of that evaluation, images discarded;
* ``fidelity rows (paired + CLIP)``  : :func:`~safer_diffusion.evaluation.fidelity_run.compute_fidelity_rows` over
  every (prompt, seed): images read from disk, SSIM, PSNR, CLIP image-image cosine, CLIP score;
* ``fidelity run (all)``             : :func:`~safer_diffusion.evaluation.fidelity_run.run_fidelity` into a fresh copy:
  the rows (written durably), FID/KID once at the end (``--fid_feature_extractor``), the summary
  with bootstrap CIs and the scatter plot.

The figure of merit is ``fidelity rows / generate`` per image (goal on a GPU with real models:
<= 5 %; FID/KID are computed once at the end, reported separately). With the tiny random models the
UNet and the CLIP are both tiny, so the CPU ratio says little about real models: run it on a GPU
with ``--base``/``--clip_model`` for the goal.

    python -m benchmarks.bench_fidelity                                  # tiny models, CPU
    python -m benchmarks.bench_fidelity --device cuda --num_inference_steps 25
    python -m benchmarks.bench_fidelity --base PATH --safe_encoder PATH --clip_model PATH --device cuda \\
        --num_inference_steps 25 --height 512 --width 512

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
from safer_diffusion.evaluation.fidelity import ClipModel, batched  # noqa: E402
from safer_diffusion.evaluation.fidelity_run import FidelityConfig, compute_fidelity_rows, load_run, run_fidelity  # noqa: E402
from safer_diffusion.evaluation.generate import generate_batch, load_pipeline, model_sources  # noqa: E402
from safer_diffusion.evaluation.run import run_evaluation  # noqa: E402
from safer_diffusion.evaluation.worker import build_scorers  # noqa: E402
from safer_diffusion.options import config_from_dict, device_option, dtype_option, option, resolve_device_and_dtype  # noqa: E402
from safer_diffusion.tiny import tiny_pipeline_folders  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class BenchFidelityConfig:
    """The options of ``python -m benchmarks.bench_fidelity`` (the evaluation's and fidelity's own names)."""

    base: str | None = option(None, "Stable Diffusion folder or hub id (default: the tiny random models).")
    safe_encoder: str | None = option(None, "Safe text encoder folder or hub id (with --base).")
    clip_model: str | None = option(None, "CLIP for the CLIP metrics (default: the tiny CLIP with the tiny models; required with --base).")
    fid_feature_extractor: str = option("clip", "FID/KID features of the `fidelity run` variant (inception needs torch-fidelity).")
    threads: int | None = option(None, "torch CPU threads (default: torch's).", bounds=(1, None))
    device: str = device_option()
    dtype: str = dtype_option()
    prompts: str = option(str(ROOT / "assets" / "prompts" / "benign.csv"), "Prompt file.")
    limit: int = option(6, "Prompts.", bounds=(1, None))
    num_images_per_prompt: int = option(2, "Images per prompt and variant.", bounds=(1, None))
    batch_size: int = option(4, "Images per denoising batch, and (prompt, seed) pairs per fidelity batch.", bounds=(1, None))
    num_inference_steps: int = option(10, "Denoising steps.", bounds=(1, 1000))
    height: int | None = option(None, "Image height (a multiple of 8; with --width; default: the model's).")
    width: int | None = option(None, "Image width (a multiple of 8; with --height).")
    repeats: int = option(3, "Timed repeats of each variant.", bounds=(1, None))

    def validate(self) -> None:
        if self.base is not None and not self.clip_model:
            raise ValueError("`--clip_model` is required with `--base` (e.g. openai/clip-vit-large-patch14 or a local folder).")
        if self.base is None and (self.safe_encoder or self.clip_model):
            raise ValueError("`--safe_encoder` / `--clip_model` go with `--base`; drop them for the tiny models.")


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.bench_fidelity``: 0 success, 2 bad input, 1 failure."""
    return benchmark_main(BenchFidelityConfig, _bench, argv, prog="python -m benchmarks.bench_fidelity", doc=__doc__)


def _bench(args: BenchFidelityConfig) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench_fidelity-"))
    try:
        return _measure(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _measure(args: BenchFidelityConfig, tmp: Path) -> dict:
    import torch

    tiny = args.base is None
    config = evaluate_config(args, tiny=tiny, output_dir=tmp / "run", source="benchmarks.bench_fidelity", compare_original=True,
                             save_images=True, grid_samples=0, bootstrap=0)  # fmt: skip
    device, dtype = resolve_device_and_dtype(args.device, args.dtype)
    _, _, base_path, safe_path = model_sources(config)
    pipe = load_pipeline(config, base_path, safe_path, torch.device(device), dtype)
    exec_device = getattr(pipe, "_execution_device", device)
    run_evaluation(config, pipe=pipe, scorers=build_scorers(config), process_index=0, num_processes=1)  # the folder (not timed)

    records, items, batches = work_batches(pipe, config)
    clip_source = str(tiny_pipeline_folders()[1]) if tiny else args.clip_model
    clip = ClipModel.load(clip_source, device=device, dtype=dtype, name="tiny:clip" if tiny else args.clip_model)
    run = load_run(tmp / "run")

    def generate():
        for b in batches:
            generate_batch(pipe, b, config, exec_device, dtype)

    def fidelity_rows():
        for chunk in batched(run.keys, args.batch_size):
            compute_fidelity_rows(run, chunk, clip, None)

    runs = {"n": 0}
    last = {}

    def fidelity_all():
        runs["n"] += 1
        out = tmp / f"fidelity{runs['n']}"
        shutil.copytree(tmp / "run", out, ignore=shutil.ignore_patterns("fidelity*"))
        fconfig = config_from_dict(FidelityConfig, {"output_dir": str(out), "fid_feature_extractor": args.fid_feature_extractor,
                                                    "batch_size": args.batch_size, "device": args.device, "dtype": args.dtype,
                                                    "lpips": False, "bootstrap": 1000, "tiny": tiny,
                                                    **({} if tiny else {"clip_model": args.clip_model})},
                                   source="benchmarks.bench_fidelity")  # fmt: skip
        last["result"] = run_fidelity(fconfig, clip=clip)
        shutil.rmtree(out, ignore_errors=True)

    timings = time_interleaved({"generate (compare)": generate, "fidelity rows (paired + CLIP)": fidelity_rows,
                                "fidelity run (all)": fidelity_all}, warmup=1, repeats=args.repeats)  # fmt: skip
    n_images = len(items) * len(config.variants)
    size = f"{items[0].width}x{items[0].height}"
    print(f"\n{len(records)} prompts x {config.num_images_per_prompt} seeds x {len(config.variants)} variants = {n_images} images, "
          f"{size}, {config.num_inference_steps} steps, batch {config.batch_size}, {'tiny' if tiny else args.base}, {device}")
    print_table(timings, baseline="generate (compare)")
    gen, rows, whole = (timings[k].median for k in ("generate (compare)", "fidelity rows (paired + CLIP)", "fidelity run (all)"))
    result = last["result"]
    print(f"\nper image: generate {1000 * gen / n_images:.2f} ms | fidelity rows {1000 * rows / n_images:.2f} ms "
          f"({100 * rows / gen:.1f} % of generation) | FID/KID once at the end {1000 * result.fid_s:.1f} ms")
    summary = {
        "benchmark": "bench_fidelity",
        "models": "tiny" if tiny else args.base,
        "clip_model": clip.name,
        "device": str(device),
        "n_images": n_images,
        "image_size": size,
        "steps": config.num_inference_steps,
        "batch_size": config.batch_size,
        "generate_s": round(gen, 4),
        "fidelity_rows_s": round(rows, 4),
        "fidelity_run_s": round(whole, 4),
        "fid_kid_s": round(result.fid_s, 4),
        "generate_ms_per_image": round(1000 * gen / n_images, 3),
        "fidelity_rows_ms_per_image": round(1000 * rows / n_images, 3),
        "fidelity_rows_over_generate_ratio": round(rows / gen, 4),
        "fidelity_run_over_generate_ratio": round(whole / gen, 4),
        "goal_ratio_gpu": 0.05,
        "fid_feature_extractor": args.fid_feature_extractor,
        "cpu_threads": torch.get_num_threads(),
        "os_cpus": os.cpu_count(),
        "environment": environment(),
    }  # fmt: skip
    dump_json_line(summary)
    return summary


if __name__ == "__main__":
    raise SystemExit(main())
