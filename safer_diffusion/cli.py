"""``safer-diffusion``: generate with a safe text encoder, score images, run the evaluation.

    safer-diffusion generate "a photo of a cat" --out cat.png                      # SD 1.4 + SaFeR-CLIP (hub)
    safer-diffusion generate "a photo of a cat" --out cat.png --compare --scorer nudenet
    safer-diffusion generate "a photo of a cat" --out cat.png --tiny               # offline, tiny random models
    safer-diffusion score photo1.png photo2.jpg --scorer nudenet                   # one JSON line per image
    safer-diffusion evaluate --help                                                # safer_diffusion.evaluate

Results go to stdout as one JSON object per line; logs and errors go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["build_parser", "main"]

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_SCORER_CHOICES = ("nudenet", "q16", "safety_checker")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safer-diffusion",
        description="Stable Diffusion with a SaFeR-CLIP safe text encoder: generate, score, evaluate.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level (to stderr)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,score,evaluate}")

    gen = sub.add_parser("generate", help="generate images with the safe text encoder (optionally side by side with the original)")
    gen.add_argument("prompt", nargs="+", help="one or more prompts")
    gen.add_argument("--base", default="CompVis/stable-diffusion-v1-4", help="base Stable Diffusion: hub id or local folder")
    gen.add_argument("--safe-encoder", default=None,
                     help="safe text encoder: hub id, folder, open_clip .safetensors (default: Adeely93/SafeR_CLIP, or the one "
                          "saved in --base if it was saved by SaferStableDiffusionPipeline)")
    gen.add_argument("--out", required=True, type=Path,
                     help="output PNG; several images become OUT_<i>.png, --compare adds _original/_safe")
    gen.add_argument("--tiny", action="store_true", help="use tiny random offline models instead of --base/--safe-encoder")
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--steps", type=int, default=25, help="denoising steps (default: 25)")
    gen.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance scale (default: 7.5)")
    gen.add_argument("--height", type=int, default=None, help="image height (default: the model's)")
    gen.add_argument("--width", type=int, default=None, help="image width (default: the model's)")
    gen.add_argument("--num-images", type=int, default=1, help="images per prompt (default: 1)")
    gen.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    gen.add_argument("--scorer", nargs="*", choices=_SCORER_CHOICES, default=[],
                     help="NSFW scorer(s) for every image (several: flagged if any flags); q16 needs --q16-prompts")
    gen.add_argument("--q16-prompts", default=None, help="Q16 prompt embeddings (.npy/.safetensors)")
    gen.add_argument("--safety-mode", choices=("flag", "blur", "black"), default="flag",
                     help="what to do with flagged images (default: flag = keep, report)")
    gen.add_argument("--compare", action="store_true",
                     help="also generate with the original text encoder from the same seeds (one UNet pass)")
    gen.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    gen.add_argument("--dtype", choices=tuple(_DTYPES), default=None, help="weights dtype (default: fp16 on cuda, fp32 on cpu)")

    score = sub.add_parser("score", help="score image files for NSFW content, one JSON line per image")
    score.add_argument("images", nargs="+", type=Path, help="image files (any format PIL reads)")
    score.add_argument("--scorer", nargs="+", choices=_SCORER_CHOICES, default=["nudenet"],
                       help="scorer(s); several: flagged if any flags (default: nudenet)")
    score.add_argument("--threshold", type=float, default=None, help="NudeNet threshold (default: 0.6)")
    score.add_argument("--classes", nargs="+", default=None, help="NudeNet classes that flag (default: exposed body parts)")
    score.add_argument("--q16-prompts", default=None, help="Q16 prompt embeddings (.npy/.safetensors)")
    score.add_argument("--q16-model", default="openai/clip-vit-large-patch14", help="CLIP model for Q16")
    score.add_argument("--details", action="store_true", help="include per-class details in the JSON")

    sub.add_parser("evaluate", help="NSFW generation-rate evaluation (see `safer-diffusion evaluate --help`)", add_help=False)
    return parser


def _scorer_spec(names: Sequence[str], args) -> object:
    if not names:
        return None
    options = {}
    if "nudenet" in names:
        nude = {k: v for k, v in (("threshold", getattr(args, "threshold", None)), ("classes", getattr(args, "classes", None)))
                if v is not None}
        options["nudenet"] = nude
    if "q16" in names:
        if not args.q16_prompts:
            raise ValueError("`--scorer q16` needs `--q16-prompts FILE` (the two Q16 prompt embeddings, .npy or .safetensors).")
        options["q16"] = {"prompts": args.q16_prompts, "clip_model": getattr(args, "q16_model", "openai/clip-vit-large-patch14")}
    specs = [{"name": n, **options.get(n, {})} for n in dict.fromkeys(names)]
    return specs[0] if len(specs) == 1 else {"name": "any_of", "scorers": specs}


def _device_and_dtype(device: str, dtype: str | None):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        dtype = "fp16" if device.startswith("cuda") else "fp32"
    return device, getattr(torch, _DTYPES[dtype])


def _outputs(out: Path, n: int, tag: str | None) -> list[Path]:
    stem = out.with_suffix("") if out.suffix else out
    suffix = out.suffix or ".png"
    parts = [f"_{tag}" if tag else ""] * n
    if n == 1:
        return [Path(f"{stem}{parts[0]}{suffix}")]
    return [Path(f"{stem}{parts[i]}_{i}{suffix}") for i in range(n)]


def _save(image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def _generate(args) -> int:
    import torch

    from .pipeline_safer_stable_diffusion import SaferStableDiffusionPipeline

    for name in ("steps", "num_images"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name.replace('_', '-')}` must be a positive integer, got {getattr(args, name)}.")
    base, safe = args.base, args.safe_encoder
    if args.tiny:
        from .tiny import tiny_pipeline_folders

        base, safe = tiny_pipeline_folders()
    else:
        from .hub import resolve_model_source

        base = resolve_model_source(base, argument="--base")
        safe = resolve_model_source(safe, argument="--safe-encoder") if safe is not None else None
    device, dtype = _device_and_dtype(args.device, args.dtype)
    pipe = SaferStableDiffusionPipeline.from_pretrained(
        base,
        safe_text_encoder=safe,
        keep_original_text_encoder=args.compare,
        nsfw_scorer=_scorer_spec(args.scorer, args),
        safety_mode=args.safety_mode,
        torch_dtype=dtype,
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    prompts = list(args.prompt)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    common = dict(negative_prompt=[args.negative_prompt] * len(prompts) if args.negative_prompt else None,
                  height=args.height, width=args.width, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                  num_images_per_prompt=args.num_images, generator=generator)  # fmt: skip
    if args.compare:
        cmp = pipe.compare(prompts, **common)
        branches = [("original", cmp.original_images, cmp.original_nsfw_content_detected, cmp.original_nsfw_scores),
                    ("safe", cmp.safe_images, cmp.safe_nsfw_content_detected, cmp.safe_nsfw_scores)]  # fmt: skip
    else:
        out = pipe(prompts, **common)
        branches = [(None, out.images, out.nsfw_content_detected, out.nsfw_scores)]
    for tag, images, flags, scores in branches:
        for i, (image, path) in enumerate(zip(images, _outputs(args.out, len(images), tag))):
            _save(image, path)
            record = {"path": str(path), "prompt": prompts[i // args.num_images], "seed": args.seed, "encoder": tag or "safe",
                      "nsfw": None if flags is None else flags[i], "scores": None if scores is None else scores[i]}  # fmt: skip
            print(json.dumps(record), flush=True)
    return 0


def _score(args) -> int:
    from PIL import Image, UnidentifiedImageError

    from .scoring import get_scorer

    images = []
    for path in args.images:
        if not path.is_file():
            raise FileNotFoundError(f"`IMAGE` {os.fspath(path)!r} does not exist.")
        try:
            with Image.open(path) as im:
                im.load()
                images.append(im.copy())
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"`IMAGE` {os.fspath(path)!r} is not an image file PIL can read ({e}). Pass PNG/JPEG/WebP/... files.") from e
    scorer = get_scorer(_scorer_spec(args.scorer, args))
    for path, result in zip(args.images, scorer.score(images)):
        record = {"image": str(path), "scorer": scorer.name, "flagged": result.flagged, "score": result.score}
        record["scores"] = result.flat_scores(scorer.name)
        if args.details:
            record["details"] = result.to_dict()["details"]
        print(json.dumps(record), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``safer-diffusion``; returns the exit code (0 ok, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "evaluate":
        from .evaluate import main as evaluate_main  # imported only when asked for

        return evaluate_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    from .hub import HubUnavailableError

    try:
        return _generate(args) if args.command == "generate" else _score(args)
    except (HubUnavailableError, FileNotFoundError, ValueError, ImportError, TypeError) as e:
        print(f"safer-diffusion {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
