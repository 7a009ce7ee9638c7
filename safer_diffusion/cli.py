"""``safer-diffusion``: generate with a safe text encoder, score images, run the evaluation.

    safer-diffusion generate "a photo of a cat" --output cat.png                              # SD 1.4 + SaFeR-CLIP (hub)
    safer-diffusion generate "a photo of a cat" --output cat.png --compare_original --scorers nudenet
    safer-diffusion generate "a photo of a cat" --output cat.png --tiny                       # offline, tiny random models
    safer-diffusion generate "a photo of a cat" --output cat.png --tiny --tiny_variant sdxl --compare_original  # tiny SDXL
    safer-diffusion generate "a photo of a cat" --output cat.png --base stabilityai/stable-diffusion-xl-base-1.0 \
        --safe_encoder exported/sdxl-pair                       # SDXL: a two-encoder export (docs/EXPORT_FORMAT.md section 8)
    safer-diffusion score photo1.png photo2.jpg --scorers nudenet                             # one JSON line per image
    safer-diffusion evaluate --help                                                           # safer_diffusion.evaluate
    safer-diffusion fidelity --help                                 # benign fidelity of an evaluation folder
    safer-diffusion summarize RUN_DIR --protocol nudity-0.45        # recompute a summary under another protocol
    safer-diffusion convert --allow_pickle des.pt OUT_DIR --base BASE   # a .pt state dict -> safetensors folder

``--base`` may be Stable Diffusion 1.x/2.x or SDXL: the pipeline class comes from its ``model_index.json``
(:func:`safer_diffusion.pipelines.load_safer_pipeline`). SDXL conditions on two text encoders, so its safe encoder is a
two-encoder export folder, or ``--safe_encoder`` (ViT-L/14) with ``--safe_encoder_2`` (OpenCLIP ViT-bigG/14); the
default SaFeR-CLIP weights are ViT-L/14 only and are refused for SDXL.

Each subcommand has its own options (``safer-diffusion generate --help``), parsed by :mod:`safer_diffusion.options`
from one config dataclass (:class:`GenerateConfig`, :class:`ScoreConfig`). Every input is checked before any
model is loaded. Results go to stdout as one JSON object per line; logs and errors go to stderr. Exit status:
0 success, 2 bad input (one line naming the argument, the value and the fix), 1 a runtime failure.

Prompts must hold text: an empty or whitespace-only prompt is refused, and so is a prompt containing a NUL byte
(``\\0``; a command line cannot carry one, and a prompt file that does is more likely corrupt than meant).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import tiny as tiny_models
from .evaluation.generate import base_kind, check_base_fits
from .fileio import check_output_file
from .hub import resolve_model_source
from .options import (
    DEFAULT_BASE_MODEL,
    DEFAULT_CLIP_MODEL,
    DEFAULT_SAFE_ENCODER,
    MISSING,
    BadInputError,
    configure_logging,
    device_option,
    dtype_option,
    option,
    parse_config,
    resolve_device_and_dtype,
    run_main,
)
from .pipelines import load_safer_pipeline
from .registry import ORIGINAL, SAFE
from .scoring import NUDENET_LABELS, SAFETY_MODES, SCORERS
from .tiny import TINY_VARIANTS, tiny_variant_option

logger = logging.getLogger(__name__)

__all__ = ["GenerateConfig", "OutputWriteError", "ScoreConfig", "main"]

PROG = "safer-diffusion"
#: Subcommands with their own module and ``main(argv)``, imported only when asked for (their options and dependencies).
DELEGATED = {
    "evaluate": "safer_diffusion.evaluate",
    "fidelity": "safer_diffusion.evaluation.fidelity_run",
    "summarize": "safer_diffusion.evaluation.summarize",
    "convert": "safer_diffusion.convert",
}
SUBCOMMANDS = ("generate", "score", *DELEGATED)
SCORER_NAMES = tuple(SCORERS)
#: Scorers that take a threshold (`--thresholds NAME=VALUE`); diffusers' safety checker has fixed concept thresholds.
THRESHOLD_SCORERS = ("nudenet", "q16")
_SCORER_HELP = f"NSFW scorer(s) for every image, of {', '.join(SCORER_NAMES)}; several: flagged if any flags. q16 needs `--q16_prompts`."
_VERBOSE_HELP = "Log at INFO level (to stderr)."


class OutputWriteError(OSError):
    """An output file could not be written (disk full, permissions); the message names the path and the free space."""


# ---------------------------------------------------------------------------------------------------- configs


@dataclass(kw_only=True)
class _ScorerOptions:
    """The scorer options `generate` and `score` share (the same flags, the same checks)."""

    thresholds: dict[str, float] = option({}, "Threshold per scorer, e.g. `nudenet=0.6 q16=0.5` (defaults: 0.6, 0.5).",
                                          bounds=(0.0, 1.0), metavar="NAME=VALUE", group="scoring")  # fmt: skip
    nudenet_classes: list[str] | None = option(None, "NudeNet classes that flag an image (default: exposed body parts).",
                                               legacy_commas=True, deprecated=("--classes",), group="scoring")  # fmt: skip
    q16_prompts: Path | None = option(None, "Q16 prompt embeddings (.npy or .safetensors; needed by `--scorers q16`).",
                                      group="scoring")  # fmt: skip
    q16_clip_model: str = option(DEFAULT_CLIP_MODEL, "CLIP model for Q16 (hub id or folder).", deprecated=("--q16-model",),
                                 group="scoring")  # fmt: skip
    q16_allow_pickle: bool = option(False, "Allow a pickle `--q16_prompts` file (the original prompts.p); only one you trust.",
                                    group="scoring")  # fmt: skip

    def _check_scorers(self, scorers: list[str]) -> None:
        extra = sorted(set(self.thresholds) - set(THRESHOLD_SCORERS))
        if extra:
            raise BadInputError(
                f"`--thresholds` has {extra}; thresholds exist for {list(THRESHOLD_SCORERS)} only, e.g. `--thresholds nudenet=0.6`."
            )
        unused = sorted(set(self.thresholds) - set(scorers))
        if unused:
            raise BadInputError(f"`--thresholds` sets {unused}, which `--scorers {' '.join(scorers)}` does not run; add it to `--scorers`.")
        if self.nudenet_classes is not None:
            unknown = [c for c in self.nudenet_classes if c not in NUDENET_LABELS]
            if unknown or not self.nudenet_classes:
                raise BadInputError(
                    f"`--nudenet_classes` has unknown NudeNet classes {unknown}; valid classes are {list(NUDENET_LABELS)}."
                )
        if "q16" in scorers:
            if self.q16_prompts is None:
                raise BadInputError("`--scorers q16` needs `--q16_prompts FILE` (the two Q16 prompt embeddings, .npy or .safetensors).")
            if not self.q16_prompts.is_file():
                raise BadInputError(f"`--q16_prompts` {os.fspath(self.q16_prompts)!r} is not a file; pass the Q16 prompt embeddings file.")

    def scorer_spec(self, scorers: Sequence[str]) -> object:
        """The scorer config :func:`safer_diffusion.scoring.get_scorer` builds (None without scorers)."""
        options: dict[str, dict] = {"nudenet": {}, "q16": {}, "safety_checker": {}}
        if self.nudenet_classes is not None:
            options["nudenet"]["classes"] = list(self.nudenet_classes)
        options["q16"].update(prompts=os.fspath(self.q16_prompts) if self.q16_prompts else None, clip_model=self.q16_clip_model,
                              allow_pickle=self.q16_allow_pickle)  # fmt: skip
        for name, value in self.thresholds.items():
            options[name]["threshold"] = value
        specs = [{"name": n, **options[n]} for n in dict.fromkeys(scorers)]
        if not specs:
            return None
        return specs[0] if len(specs) == 1 else {"name": "any_of", "scorers": specs}


@dataclass(kw_only=True)
class GenerateConfig(_ScorerOptions):
    """Options of ``safer-diffusion generate``."""

    prompt: list[str] = option(MISSING, "One or more prompts (each non-empty text).", positional=True)
    output: Path = option(MISSING, "Output PNG file; several images become OUTPUT_<i>.png, `--compare_original` adds "
                          "_original/_safe.", deprecated=("--out",), metavar="FILE.png")  # fmt: skip
    base: str = option(DEFAULT_BASE_MODEL, "Base Stable Diffusion: hub id or local folder.")
    safe_encoder: str | None = option(None, "Safe text encoder: hub id, folder, open_clip .safetensors (default: "
                                      "Adeely93/SafeR_CLIP, or the one saved in `--base` by a safer pipeline). For an SDXL "
                                      "`--base`: a two-encoder export folder (docs/EXPORT_FORMAT.md section 8), or the ViT-L/14 "
                                      "with `--safe_encoder_2`.")  # fmt: skip
    safe_encoder_2: str | None = option(None, "SDXL only: the safe text_encoder_2 (OpenCLIP ViT-bigG/14 with projection) on its own, "
                                              "beside a ViT-L/14 `--safe_encoder` (default Adeely93/SafeR_CLIP).")  # fmt: skip
    tiny: bool = option(False, "Use tiny random offline models instead of `--base`/`--safe_encoder`.")
    tiny_variant: str | None = tiny_variant_option()
    negative_prompt: str | None = option(None, "Negative prompt (applied to every prompt).", group="generation")
    num_inference_steps: int = option(25, "Denoising steps.", bounds=(1, 1000), deprecated=("--steps",), group="generation")
    guidance_scale: float = option(7.5, "Classifier-free guidance scale.", bounds=(0.0, 100.0), group="generation")
    height: int | None = option(None, "Image height, a multiple of 8 (give both or neither; default: the model's).",
                                bounds=(8, 4096), group="generation")  # fmt: skip
    width: int | None = option(None, "Image width, a multiple of 8 (give both or neither; default: the model's).",
                               bounds=(8, 4096), group="generation")  # fmt: skip
    num_images_per_prompt: int = option(1, "Images per prompt (and per encoder with `--compare_original`).", bounds=(1, 64),
                                        deprecated=("--num-images", "--images-per-prompt"), group="generation")  # fmt: skip
    seed: int = option(0, "Random seed.", bounds=(0, 2**63 - 1), group="generation")
    compare_original: bool = option(False, "Also generate with the original text encoder from the same seeds (one UNet pass).",
                                    deprecated=("--compare",), group="generation")  # fmt: skip
    scorers: list[str] = option([], _SCORER_HELP, choices=SCORER_NAMES, legacy_commas=True, deprecated=("--scorer",),
                                group="scoring")  # fmt: skip
    safety_mode: str = option("flag", "What happens to flagged images: flag (kept, reported), blur, black.",
                              choices=SAFETY_MODES, group="scoring")  # fmt: skip
    device: str = device_option()
    dtype: str = dtype_option()
    verbose: bool = option(False, _VERBOSE_HELP, aliases=("-v",))

    def validate(self) -> None:
        for i, text in enumerate(self.prompt):
            where = f"`prompt` {i + 1}" if len(self.prompt) > 1 else "`prompt`"
            if "\0" in text:
                raise BadInputError(f"{where} {text!r} contains a NUL byte; remove it (prompts are plain text).")
            if not text.strip():
                raise BadInputError(f"{where} {text!r} is empty; pass a text prompt, e.g. \"a photo of a cat\".")
        if self.tiny and (self.base != DEFAULT_BASE_MODEL or self.safe_encoder is not None or self.safe_encoder_2 is not None):
            raise BadInputError("`--tiny` builds its own tiny models; drop `--base`/`--safe_encoder`/`--safe_encoder_2`, or drop "
                                "`--tiny` to use them.")  # fmt: skip
        if self.tiny_variant is not None and not self.tiny:
            raise BadInputError(f"`--tiny_variant` {self.tiny_variant} picks the tiny models of `--tiny`; add `--tiny`, or drop "
                                "`--tiny_variant`.")  # fmt: skip
        if self.negative_prompt is not None and "\0" in self.negative_prompt:
            raise BadInputError(f"`--negative_prompt` {self.negative_prompt!r} contains a NUL byte; remove it.")
        if (self.height is None) != (self.width is None):
            given, missing = ("--height", "--width") if self.width is None else ("--width", "--height")
            value = self.height if self.width is None else self.width
            raise BadInputError(f"`{given}` {value} was given without `{missing}`; pass both (e.g. --height 512 --width 512) or neither.")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and value % 8:
                raise BadInputError(f"`--{name}` must be a multiple of 8, got {value}; e.g. {value - value % 8 or 8}.")
        self._check_scorers(self.scorers)
        device, dtype = resolve_device_and_dtype(self.device, self.dtype)
        if device == "cpu" and str(dtype) == "torch.float16":
            raise BadInputError("`--dtype float16` on the CPU: PyTorch cannot run Stable Diffusion in float16 there; use float32 or bfloat16.")
        self._check_output()

    def _check_output(self) -> None:
        check_output_file(self.output, "--output", suffixes=("", ".png"), example="image.png")  # images are PNG


@dataclass(kw_only=True)
class ScoreConfig(_ScorerOptions):
    """Options of ``safer-diffusion score``."""

    images: list[Path] = option(MISSING, "Image files (any format PIL reads).", positional=True, metavar="IMAGE")
    scorers: list[str] = option(["nudenet"], _SCORER_HELP, choices=SCORER_NAMES, legacy_commas=True, deprecated=("--scorer",),
                                group="scoring")  # fmt: skip
    threshold: float | None = option(None, "Deprecated: `--thresholds nudenet=X`.", bounds=(0.0, 1.0), hidden=True)
    details: bool = option(False, "Include per-class details in the JSON.")
    verbose: bool = option(False, _VERBOSE_HELP, aliases=("-v",))

    def validate(self) -> None:
        if self.threshold is not None:
            logger.warning("`--threshold %s` is deprecated and will be removed in the next release; use `--thresholds nudenet=%s`.",
                           self.threshold, self.threshold)  # fmt: skip
            self.thresholds = {"nudenet": self.threshold, **self.thresholds}
            self.threshold = None
        for path in self.images:
            if path.is_dir():
                raise BadInputError(f"`IMAGE` {os.fspath(path)!r} is a directory, pass image files (e.g. {os.fspath(path / '*.png')}).")
            if not path.is_file():
                raise FileNotFoundError(f"`IMAGE` {os.fspath(path)!r} does not exist; pass existing image files.")
        self._check_scorers(self.scorers)


# ---------------------------------------------------------------------------------------------------- generate


def _outputs(out: Path, n: int, tag: str | None) -> list[Path]:
    stem = out.with_suffix("") if out.suffix else out
    part = f"_{tag}" if tag else ""
    if n == 1:
        return [Path(f"{stem}{part}.png")]
    return [Path(f"{stem}{part}_{i}.png") for i in range(n)]


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _remove_stale_tmp(output: Path) -> None:
    """Create ``--output``'s folder; remove temporary files an interrupted run left beside it (``.<name>.png.tmp``)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    stem = (output.with_suffix("") if output.suffix else output).name
    for stale in output.parent.glob(f".{stem}*.png.tmp"):
        logger.info("Removing %s, left by an interrupted run.", stale)
        stale.unlink(missing_ok=True)


def _save(image, path: Path, written: list[Path]) -> None:
    """Write one PNG atomically (temporary file + ``os.replace``); disk full or no permission -> :class:`OutputWriteError`."""
    tmp = _tmp_name(path)
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free"
        except OSError:
            free = "free space unknown"
        why = "the disk is full" if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)) else (e.strerror or str(e))
        kept = f"the {len(written)} image(s) written before are kept ({', '.join(map(str, written))})" if written else "nothing was written"
        raise OutputWriteError(
            f"`--output`: cannot write {os.fspath(path)!r}: {why} ({free} on its file system); {kept}. Free some space or "
            "pass another `--output`."
        ) from e
    written.append(path)


def _model_paths(config: GenerateConfig) -> tuple[str, str | None, str | None]:
    """(base, safe encoder, safe encoder 2) to load, checked against the base's class (SD or SDXL) before any loads."""
    if config.tiny:
        base, safe = tiny_models.tiny_pipeline_folders(variant=config.tiny_variant or TINY_VARIANTS[0])
        return str(base), str(safe), None
    base = resolve_model_source(config.base, argument="--base")
    sdxl, saved_pair = base_kind(base)
    variants = (ORIGINAL, SAFE) if config.compare_original else (SAFE,)
    safe_encoder = config.safe_encoder
    if sdxl and safe_encoder is None and config.safe_encoder_2 is not None and not saved_pair:
        safe_encoder = DEFAULT_SAFE_ENCODER  # the ViT-L/14 beside the given bigG, as `--safe_encoder`'s help says
    if safe_encoder in (None, DEFAULT_SAFE_ENCODER):  # the SDXL checks run before the default is looked up on the hub
        check_base_fits(config.base, sdxl=sdxl, variants=variants, safe_encoder=safe_encoder, safe_path=None,
                        safe_encoder_2=config.safe_encoder_2, saved_pair=saved_pair)  # fmt: skip
    safe = resolve_model_source(safe_encoder, argument="--safe_encoder") if safe_encoder is not None else None
    safe_2 = resolve_model_source(config.safe_encoder_2, argument="--safe_encoder_2") if config.safe_encoder_2 is not None else None
    check_base_fits(config.base, sdxl=sdxl, variants=variants, safe_encoder=safe_encoder, safe_path=safe,
                    safe_encoder_2=config.safe_encoder_2, saved_pair=saved_pair)  # fmt: skip
    return base, safe, safe_2


def generate(config: GenerateConfig) -> int:
    """Run ``safer-diffusion generate`` with a validated config; prints one JSON line per image.

    The pipeline class follows ``--base`` (:func:`safer_diffusion.pipelines.load_safer_pipeline`): SD 1.x/2.x or SDXL."""
    import torch

    device, dtype = resolve_device_and_dtype(config.device, config.dtype)
    base, safe, safe_2 = _model_paths(config)
    kwargs = {"safe_text_encoder_2": safe_2} if safe_2 is not None else {}
    pipe = load_safer_pipeline(
        base,
        argument="--base",
        safe_text_encoder=safe,
        keep_original_text_encoder=config.compare_original,
        nsfw_scorer=config.scorer_spec(config.scorers),
        safety_mode=config.safety_mode,
        torch_dtype=dtype,
        **kwargs,
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    prompts = list(config.prompt)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    common = dict(negative_prompt=[config.negative_prompt] * len(prompts) if config.negative_prompt else None,
                  height=config.height, width=config.width, num_inference_steps=config.num_inference_steps,
                  guidance_scale=config.guidance_scale, num_images_per_prompt=config.num_images_per_prompt,
                  generator=generator)  # fmt: skip
    if config.compare_original:
        cmp = pipe.compare(prompts, **common)
        branches = [("original", cmp.original_images, cmp.original_nsfw_content_detected, cmp.original_nsfw_scores),
                    ("safe", cmp.safe_images, cmp.safe_nsfw_content_detected, cmp.safe_nsfw_scores)]  # fmt: skip
    else:
        out = pipe(prompts, **common)
        branches = [(None, out.images, out.nsfw_content_detected, out.nsfw_scores)]
    _remove_stale_tmp(config.output)
    written: list[Path] = []
    for tag, images, flags, scores in branches:
        for i, (image, path) in enumerate(zip(images, _outputs(config.output, len(images), tag))):
            _save(image, path, written)
            record = {"path": str(path), "prompt": prompts[i // config.num_images_per_prompt], "seed": config.seed,
                      "encoder": tag or "safe", "nsfw": None if flags is None else flags[i],
                      "scores": None if scores is None else scores[i]}  # fmt: skip
            print(json.dumps(record), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------- score


def score(config: ScoreConfig) -> int:
    """Run ``safer-diffusion score`` with a validated config; prints one JSON line per image."""
    from PIL import Image, UnidentifiedImageError

    from .scoring import get_scorer

    images = []
    for path in config.images:
        try:
            with Image.open(path) as im:
                im.load()
                images.append(im.copy())
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"`IMAGE` {os.fspath(path)!r} is not an image file PIL can read ({e}). Pass PNG/JPEG/WebP/... files.") from e
    scorer = get_scorer(config.scorer_spec(config.scorers))
    for path, result in zip(config.images, scorer.score(images)):
        record = {"image": str(path), "scorer": scorer.name, "flagged": result.flagged, "score": result.score}
        record["scores"] = result.flat_scores(scorer.name)
        if config.details:
            record["details"] = result.to_dict()["details"]
        print(json.dumps(record), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------- main

_COMMANDS = {
    "generate": (GenerateConfig, generate, "Generate images with the safe text encoder (optionally beside the original)."),
    "score": (ScoreConfig, score, "Score image files for NSFW content, one JSON line per image."),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Stable Diffusion with a SaFeR-CLIP safe text encoder: generate, score, evaluate.",
        epilog="Run `safer-diffusion COMMAND --help` for a command's options.",
    )  # fmt: skip
    parser.add_argument("command", choices=SUBCOMMANDS, metavar="{" + ",".join(SUBCOMMANDS) + "}",
                        help="generate: images with the safe encoder; score: NSFW scores of image files; "
                             "evaluate: the NSFW generation-rate evaluation (safer_diffusion.evaluate); "
                             "fidelity: what each safe encoder costs on safe prompts, over an evaluation folder; "
                             "summarize: recompute an evaluation's summary under another protocol; "
                             "convert: a .pt/.bin text-encoder state dict to a safetensors folder (--allow_pickle)")  # fmt: skip
    return parser


def _run(command: str, argv: list[str]) -> int:
    config_cls, body, description = _COMMANDS[command]
    configure_logging(any(a in ("-v", "--verbose") for a in argv))  # before parsing: deprecation warnings use the format
    config = parse_config(config_cls, argv, prog=f"{PROG} {command}", description=description)
    return body(config)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``safer-diffusion``; returns the exit status (0 ok, 2 bad input, 1 runtime failure).

    ``argv[0]`` is the subcommand; those in :data:`DELEGATED` hand the rest to their module's ``main``.
    A leading ``-v``/``--verbose`` (the old place) is moved after the subcommand.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-v", "--verbose") and len(argv) > 1 and argv[1] in SUBCOMMANDS:
        argv = [argv[1], argv[0], *argv[2:]]
    if argv and argv[0] in DELEGATED:
        return importlib.import_module(DELEGATED[argv[0]]).main(argv[1:])
    if argv and argv[0] in _COMMANDS:
        return run_main(lambda: _run(argv[0], argv[1:]), prog=f"{PROG} {argv[0]}")
    return run_main(lambda: _usage(argv), prog=PROG)


def _usage(argv: list[str]) -> None:
    """``safer-diffusion [--help]`` or an unknown subcommand: argparse prints the help (exit 0) or the usage error (2)."""
    _top_parser().parse_args(argv[:1])


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
