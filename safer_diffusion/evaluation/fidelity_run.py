"""``safer-diffusion fidelity`` / ``python -m safer_diffusion.evaluation.fidelity_run``: what each variant costs on its images.

Runs over an evaluation folder written with ``--save_images`` (every variant's image of each
``(prompt_id, seed)`` comes from the same seed and initial latents), compares every variant with
the reference variant (``--reference``, default ``original``) and writes into that folder::

    out/fidelity.jsonl          one row per (prompt_id, seed, variant): CLIP score, and against the
                                reference image of the same (prompt_id, seed): SSIM, PSNR, MSE, CLIP
                                image-image cosine, LPIPS (when available)
    out/fidelity.corrupt.jsonl  lines of fidelity.jsonl found corrupt on resume, moved out (as they were)
    out/fidelity_settings.json  what the rows depend on, compared on every rerun
    out/fidelity.json           per variant: the paired metrics and CLIP score with 95 % bootstrap CIs
                                over prompts, FID/KID against the reference variant (and real images),
                                encoder drift, the unsafe rate from summary.json, per-prompt values
    out/fidelity.csv            one row per variant (the same numbers)
    out/fidelity_scatter.png    unsafe rate vs CLIP score / paired SSIM (/ LPIPS), one point per
                                variant, CIs as error bars, the Pareto front drawn

Examples::

    safer-diffusion evaluate --prompts assets/prompts/benign.csv --compare_original --save_images --output_dir runs/benign
    safer-diffusion fidelity --output_dir runs/benign                            # Inception FID (torch-fidelity)
    safer-diffusion fidelity --output_dir runs/benign --real_images coco/val2014 --encoder_drift
    python -m safer_diffusion.evaluation.fidelity_run --output_dir runs/tiny --tiny   # offline smoke test

Rows stream to ``fidelity.jsonl`` a batch at a time (one write + fsync each, through the
evaluation's :class:`~safer_diffusion.evaluation.results.ResultsWriter`), so rerunning the same
command resumes: finished ``(prompt_id, seed, variant)`` rows are skipped, a torn last line is
dropped, a corrupt complete line is moved to ``fidelity.corrupt.jsonl`` and its row computed
again. Batches are fixed by the sorted ``(prompt_id, seed)`` keys, so a resumed run writes the
same numbers as an uninterrupted one. FID/KID, drift and the summaries are recomputed at the end
of every run, from the images and the rows alone.

Aggregates: each prompt's value is the mean over its seeds; a variant's value is the mean over
prompts; the 95 % CI is the percentile bootstrap over prompts of
:mod:`~safer_diffusion.evaluation.summary` (same seed, same resampled prompts for every variant
and metric, so differences are paired). PSNR of identical images is +inf: rows store
``psnr_db: null, identical: true``; the aggregate PSNR is the mean over the non-identical pairs
and ``n_identical`` counts the others.

Exit status: 0 success, 2 bad input (one line naming the argument, the value and the fix), 1 a
runtime failure.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_text, check_writable_dir
from ..hub import resolve_model_source
from ..options import (
    DEFAULT_CLIP_MODEL,
    MISSING,
    BadInputError,
    config_from_dict,
    configure_logging,
    device_option,
    dtype_option,
    option,
    parse_config,
    resolve_device_and_dtype,
    run_main,
    validate_config,
)
from ..registry import ORIGINAL, SAFE, EncoderItem, split_subfolder
from ..tiny import tiny_pipeline_folders
from .config import EvaluateConfig
from .fidelity import (
    IMAGE_EXTENSIONS,
    LPIPS_NETS,
    SSIM_SETTINGS,
    ClipModel,
    batched,
    build_feature_extractor,
    center_crop_resize,
    check_feature_extractor,
    check_fidelity_options,
    clip_score,
    cosine,
    describe_feature_extractor,
    encoder_drift,
    fid_from_features,
    fidelity_feature_spec,
    images_to_tensor,
    kid_from_features,
    load_lpips,
    mse,
    open_rgb,
    psnr_db,
    quiet_model_loading,
    resolve_clip_source,
    ssim,
)
from .generate import base_kind, open_pipeline, resolve_encoder_item, tiny_folders, variant_encoders
from .leaderboard import write_leaderboard
from .results import (
    FIDELITY_CORRUPT_NAME,
    FIDELITY_CSV,
    FIDELITY_JSON,
    FIDELITY_NAME,
    FIDELITY_SCATTER,
    FIDELITY_SETTINGS_NAME,
    ResultsWriter,
    quarantine_corrupt_lines,
    read_results,
    read_results_file,
    row_key,
    writing,
)
from .settings import read_settings, stored_encoders
from .summary import MEAN_KEY, bootstrap_rng, percentile_ci, quiet_nanmean, summarize

logger = logging.getLogger(__name__)

__all__ = [
    "FIDELITY_CORRUPT_NAME",
    "FIDELITY_CSV",
    "FIDELITY_JSON",
    "FIDELITY_NAME",
    "FIDELITY_SCATTER",
    "FIDELITY_SETTINGS_NAME",
    "PROG",
    "FidelityConfig",
    "DriftSources",
    "FidelityResult",
    "RunImages",
    "compute_fidelity_rows",
    "fidelity_config_for",
    "fidelity_csv",
    "format_fidelity_table",
    "list_real_images",
    "load_run",
    "main",
    "pareto_front",
    "plot_fidelity_scatter",
    "run_fidelity",
    "summarize_fidelity",
]

PROG = "safer-diffusion fidelity"
DESCRIPTION = "Benign fidelity of each variant against the reference: paired SSIM/PSNR/CLIP cosine/LPIPS, CLIP score, FID/KID, drift."
#: The CLIP model id recorded for ``--tiny``.
TINY_CLIP = "tiny:clip"
#: Paired metrics, in the order they are reported.
PAIRED_METRICS = ("ssim", "psnr_db", "clip_image_cosine", "lpips")


@dataclass
class FidelityConfig:
    """Everything a fidelity run depends on (``safer-diffusion fidelity --help`` lists the same options)."""

    output_dir: str = option(MISSING, "The evaluation folder (`safer-diffusion evaluate --save_images --output_dir DIR`); the "
                                      "fidelity files are written into it. Rerun the same command to resume.", metavar="DIR",
                             group="input")  # fmt: skip
    reference: str = option("original", "The variant every other variant is compared with.", group="input")
    real_images: str | None = option(None, "Folder of real images (e.g. COCO val2014; searched recursively) for FID/KID "
                                           "against real data.", metavar="DIR", group="input")  # fmt: skip
    real_images_resize: bool = option(True, "Center-crop real images to the generated aspect ratio and resize them to the "
                                            "generated size (bicubic); with --no_real_images_resize they must already be that size.",
                                      group="input")  # fmt: skip

    clip_model: str = option(DEFAULT_CLIP_MODEL, "CLIP model for CLIP score and the image-image cosine: hub id or local folder "
                                                 "(config.json + model.safetensors).", group="metrics")  # fmt: skip
    fid_feature_extractor: str = option("inception", "FID/KID features: inception (torch-fidelity's InceptionV3, 2048-d, the "
                                                     "published-FID network), clip (--clip_model's image embeddings), none, or "
                                                     "MODULE:FACTORY (FACTORY(device=...) returns images -> (N, D) array).",
                                        metavar="NAME", group="metrics")  # fmt: skip
    kid_subsets: int = option(100, "KID: random subsets averaged.", bounds=(1, None), group="metrics")
    kid_subset_size: int = option(1000, "KID: images per subset (capped at the smaller set).", bounds=(2, None), group="metrics")
    lpips: bool = option(True, "LPIPS when the `lpips` package and its weights are available here (reported as skipped "
                               "otherwise; never downloaded offline).", group="metrics")  # fmt: skip
    lpips_net: str = option("alex", "LPIPS backbone.", choices=LPIPS_NETS, group="metrics")
    encoder_drift: bool = option(False, "Also measure text-encoder drift per prompt (no images) for every variant against the "
                                        "reference: each variant's own encoder as the run's settings.json records it (original: "
                                        "--base's, safe: --safe_encoder, NAME=SOURCE items); SD 1.x/2.x runs.", group="metrics")  # fmt: skip
    tiny: bool = option(False, "Use the tiny random offline CLIP for the CLIP metrics and the FID features (smoke tests; the "
                               "numbers are meaningless).", group="metrics")  # fmt: skip

    device: str = device_option(group="runtime")
    dtype: str = dtype_option(group="runtime")
    batch_size: int = option(16, "(prompt, seed) pairs per metrics batch (each with all its variants).", bounds=(1, None),
                             group="runtime")  # fmt: skip
    bootstrap: int = option(1000, "Bootstrap resamples for the 95%% CIs (0: none).", bounds=(0, None), group="output")
    plot: bool = option(True, f"Write {FIDELITY_SCATTER}.", group="output")
    verbose: bool = option(False, "Log at INFO level (to stderr).", group="output")

    def validate(self) -> None:
        """Checks that read no image and load no model (the run folder's contents: :func:`load_run`)."""
        out = Path(self.output_dir).expanduser()
        if not out.is_dir():
            raise FileNotFoundError(f"`--output_dir`={self.output_dir!r} is not a folder; pass the `--output_dir` of a "
                                    "`safer-diffusion evaluate --save_images` run.")  # fmt: skip
        check_fidelity_options(self.clip_model, self.fid_feature_extractor, self.tiny)
        if self.real_images is not None and not Path(self.real_images).expanduser().is_dir():
            raise FileNotFoundError(f"`--real_images`={self.real_images!r} is not a folder; pass a folder of real images "
                                    "(png, jpg, jpeg, webp, bmp).")  # fmt: skip
        if self.real_images is not None and self.feature_spec == "none":
            raise BadInputError("`--real_images` is used for FID/KID, but `--fid_feature_extractor none` turns them off; drop one.")
        check_writable_dir(out, "--output_dir")

    @property
    def feature_spec(self) -> str:
        """The FID feature extractor actually used (``--tiny`` takes the tiny CLIP's features)."""
        return fidelity_feature_spec(self.fid_feature_extractor, self.tiny)


@dataclass
class RunImages:
    """What an evaluation folder holds for fidelity: its image rows, variants and prompts (checked by :func:`load_run`)."""

    out_dir: Path
    reference: str
    variants: list[str]
    keys: list[tuple[str, int]]
    rows: dict[tuple[str, int, str], dict[str, Any]]
    prompts: dict[str, str]
    size: tuple[int, int]
    n_unpaired: int = 0

    def path(self, key: tuple[str, int, str]) -> Path:
        return self.out_dir / self.rows[key]["image"]

    def images_of(self, variant: str) -> list[tuple[str, int, str]]:
        return [(p, s, variant) for p, s in self.keys if (p, s, variant) in self.rows]


@dataclass
class FidelityResult:
    """What :func:`run_fidelity` did."""

    out_dir: Path
    summary: dict[str, Any] = field(default_factory=dict)
    n_rows_written: int = 0
    n_skipped: int = 0
    rows_s: float = 0.0
    fid_s: float = 0.0
    table: str = ""


# ---------------------------------------------------------------------------------------------------- inputs


def _variant_order(variants: Sequence[str], reference: str) -> list[str]:
    rest = sorted(v for v in set(variants) if v != reference)
    return [reference, *rest]


def _first(paths: Sequence[Any], n: int = 1) -> str:
    return ", ".join(str(p) for p in paths[:n])


def load_run(output_dir: str | os.PathLike, reference: str = "original", need_one_size: bool = True) -> RunImages:
    """Read and check an evaluation folder: results with the reference variant, every image saved, readable, one size.

    Args:
        output_dir: the evaluation folder.
        reference: the reference variant.
        need_one_size: every image of the run must have one size (FID compares sets of one size);
            paired images must always match.

    Raises:
        BadInputError / FileNotFoundError: no results, no reference variant or no other variant,
            no saved images, missing or unreadable image files (count and first example), images
            of different sizes (both sizes and an example of each).
    """
    from PIL import Image

    out = Path(output_dir).expanduser()
    where = f"`--output_dir`={str(output_dir)!r}"
    rows = read_results(out)
    if not rows:
        raise FileNotFoundError(f"{where} holds no evaluation results (results.jsonl); run `safer-diffusion evaluate ... "
                                f"--save_images --output_dir {output_dir}` first.")  # fmt: skip
    variants = sorted({str(r["variant"]) for r in rows})
    if reference not in variants:
        raise BadInputError(f"{where} has no {reference!r} variant (it holds {variants}); pass `--reference` one of them, or "
                            "rerun the evaluation with `--compare_original` for the original images.")  # fmt: skip
    if len(variants) < 2:
        raise BadInputError(f"{where} holds only the reference variant {reference!r}; nothing to compare. Run the evaluation "
                            "with `--compare_original` (or more variants).")  # fmt: skip
    without = [r for r in rows if not r.get("image")]
    if without:
        r = without[0]
        raise BadInputError(f"{where}: {len(without)} of {len(rows)} result rows have no saved image (e.g. prompt "
                            f"{r['prompt_id']!r} seed {r['seed']} {r['variant']}); the run was made without `--save_images`. "
                            "Rerun `safer-diffusion evaluate` with `--save_images` into a new `--output_dir`.")  # fmt: skip
    by_key = {row_key(r): r for r in rows}
    missing = [out / r["image"] for r in rows if not (out / r["image"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{where}: {len(missing)} of {len(rows)} saved images are missing (first: {missing[0]}); "
                                "restore them or rerun the evaluation into a new `--output_dir`.")  # fmt: skip
    sizes: dict[tuple[int, int], Path] = {}
    size_of: dict[tuple[str, int, str], tuple[int, int]] = {}
    bad: list[str] = []
    for key, r in by_key.items():
        path = out / r["image"]
        try:
            with Image.open(path) as im:
                size_of[key] = im.size
        except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
            bad.append(f"{path} ({type(e).__name__})")
            continue
        sizes.setdefault(im.size, path)
    if bad:
        raise BadInputError(f"{where}: {len(bad)} of {len(rows)} saved images cannot be read (first: {bad[0]}); "
                            "rerun the evaluation into a new `--output_dir`.")  # fmt: skip
    keys = sorted({(p, s) for p, s, v in by_key if v == reference})
    for (p, s, v), size in size_of.items():
        ref = size_of.get((p, s, reference))
        if ref is not None and size != ref:
            raise BadInputError(f"{where}: the {v!r} image of prompt {p!r} seed {s} is {size[0]}x{size[1]}, its {reference!r} "
                                f"image {ref[0]}x{ref[1]}; paired metrics need images of one size.")  # fmt: skip
    if need_one_size and len(sizes) > 1:
        (a, pa), (b, pb) = list(sizes.items())[:2]
        raise BadInputError(f"{where}: FID/KID compare image sets of one size, but the run has {a[0]}x{a[1]} (e.g. {pa}) and "
                            f"{b[0]}x{b[1]} (e.g. {pb}) images; pass `--fid_feature_extractor none`, or evaluate one size "
                            "per `--output_dir`.")  # fmt: skip
    ref_keys = set(keys)
    unpaired = [k for k in by_key if (k[0], k[1]) not in ref_keys]
    if unpaired:
        logger.warning("%s: %d image(s) have no %r image of the same (prompt, seed) (e.g. %s); they are left out.", out,
                       len(unpaired), reference, unpaired[0])  # fmt: skip
    kept = {k: r for k, r in by_key.items() if (k[0], k[1]) in ref_keys}
    prompts = {str(r["prompt_id"]): str(r.get("prompt", "")) for r in kept.values()}
    size = size_of[(keys[0][0], keys[0][1], reference)]
    return RunImages(out, reference, _variant_order(variants, reference), keys, kept, prompts, size, len(unpaired))


def list_real_images(folder: str | os.PathLike, size: tuple[int, int] | None = None) -> list[Path]:
    """The image files under ``folder`` (recursive, sorted), each checked readable; ``size`` also checks their size.

    Raises:
        BadInputError: no image files, unreadable ones (count and first example), or (with ``size``)
            images of another size (count and first example).
    """
    from PIL import Image

    root = Path(folder).expanduser()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise BadInputError(f"`--real_images`={str(folder)!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)}); pass a "
                            "folder of real images, e.g. COCO val2014.")  # fmt: skip
    bad: list[str] = []
    wrong: list[str] = []
    for p in files:
        try:
            with Image.open(p) as im:
                im.verify()
                got = im.size
        except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files; each is "unreadable"
            bad.append(f"{p} ({type(e).__name__})")
            continue
        if size is not None and got != tuple(size):
            wrong.append(f"{p} ({got[0]}x{got[1]})")
    if bad:
        raise BadInputError(f"`--real_images`={str(folder)!r}: {len(bad)} of {len(files)} image files cannot be read (first: "
                            f"{bad[0]}); remove or replace them.")  # fmt: skip
    if wrong:
        raise BadInputError(f"`--real_images`={str(folder)!r}: {len(wrong)} of {len(files)} images are not {size[0]}x{size[1]}, "
                            f"the generated size (first: {wrong[0]}); drop `--no_real_images_resize` to center-crop and "
                            "resize them.")  # fmt: skip
    return files


def _settings(config: FidelityConfig, clip_name: str, lpips_status: str, dtype_name: str) -> dict[str, Any]:
    """What every fidelity row depends on (compared on resume). Not: batch size, device, bootstrap, FID options."""
    return {"reference": config.reference, "clip_model": clip_name, "lpips": lpips_status, "ssim": dict(SSIM_SETTINGS),
            "dtype": dtype_name}  # fmt: skip


def _check_settings(out: Path, settings: dict[str, Any]) -> bool:
    """True when resuming; raises when ``fidelity.jsonl`` exists with other settings."""
    path = out / FIDELITY_SETTINGS_NAME
    if not path.is_file():
        if (out / FIDELITY_NAME).is_file() and read_results_file(out / FIDELITY_NAME):
            raise BadInputError(f"`--output_dir`={str(out)!r} has {FIDELITY_NAME} but no {FIDELITY_SETTINGS_NAME}; move "
                                f"{FIDELITY_NAME} away to start over.")  # fmt: skip
        return False
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInputError(f"{path} is unreadable ({type(e).__name__}); move it and {FIDELITY_NAME} away to start over.") from None
    diffs = [f"{k}: stored {stored.get(k)!r}, now {settings.get(k)!r}" for k in sorted(set(stored) | set(settings))
             if stored.get(k) != settings.get(k)]  # fmt: skip
    if diffs:
        raise BadInputError(f"`--output_dir`={str(out)!r}: {FIDELITY_NAME} was computed with other settings ({'; '.join(diffs)}). "
                            f"Rerun with the same options, or move {FIDELITY_NAME} and {FIDELITY_SETTINGS_NAME} away to start "
                            "over.")  # fmt: skip
    return True


# ---------------------------------------------------------------------------------------------------- rows


def compute_fidelity_rows(run: RunImages, chunk: Sequence[tuple[str, int]], clip: ClipModel, lpips: Any) -> list[dict[str, Any]]:
    """Every fidelity row of the ``(prompt_id, seed)`` keys in ``chunk`` (all their variants), computed together.

    The reference row carries the CLIP score only; every other variant's row also the paired
    metrics against the reference image of the same key. Computing the whole chunk every time
    makes a row independent of which rows were already written (resume gives the same numbers).
    """
    ref = run.reference
    keys = [(p, s, v) for p, s in chunk for v in run.variants if (p, s, v) in run.rows]
    images = {k: open_rgb(run.path(k)) for k in keys}
    prompt_ids = sorted({p for p, _ in chunk})
    text = dict(zip(prompt_ids, clip.text_features([run.prompts[p] for p in prompt_ids])))
    image_emb = dict(zip(keys, clip.image_features([images[k] for k in keys])))
    rows: dict[tuple[str, int, str], dict[str, Any]] = {}
    for k in keys:
        p, s, v = k
        rows[k] = {
            "prompt_id": p, "seed": s, "variant": v, "reference": ref, "prompt": run.prompts[p], "image": run.rows[k]["image"],
            "clip_score": float(clip_score(image_emb[k][None], text[p][None])[0]),
            "ssim": None, "mse": None, "psnr_db": None, "identical": None, "clip_image_cosine": None, "lpips": None,
        }  # fmt: skip
    for v in run.variants[1:]:
        pairs = [(p, s) for p, s in chunk if (p, s, v) in run.rows]
        if not pairs:
            continue
        x = images_to_tensor([images[(p, s, v)] for p, s in pairs])
        y = images_to_tensor([images[(p, s, ref)] for p, s in pairs])
        s_values, m_values = ssim(x, y).tolist(), mse(x, y).tolist()
        l_values = lpips(x, y).tolist() if lpips is not None else [None] * len(pairs)
        for (p, s), sv, mv, lv in zip(pairs, s_values, m_values, l_values):
            db = psnr_db(mv)
            row = rows[(p, s, v)]
            row.update(ssim=float(sv), mse=float(mv), psnr_db=None if math.isinf(db) else db, identical=mv == 0.0,
                       clip_image_cosine=float(cosine(image_emb[(p, s, v)][None], image_emb[(p, s, ref)][None])[0]),
                       lpips=None if lv is None else float(lv))  # fmt: skip
    return [rows[k] for k in keys]


def _fidelity_rows(out: Path) -> list[dict[str, Any]]:
    """The rows of ``fidelity.jsonl``, one per key (first wins)."""
    seen, rows = set(), []
    for r in read_results_file(out / FIDELITY_NAME):
        k = row_key(r)
        if k not in seen:
            seen.add(k)
            rows.append(r)
    return rows


# ---------------------------------------------------------------------------------------------------- FID / KID


def _features(extractor: Any, paths: Sequence[Path], batch_size: int, resize_to: tuple[int, int] | None = None) -> Any:
    import numpy as np

    parts = []
    for chunk in batched(list(paths), batch_size):
        images = [open_rgb(p) for p in chunk]
        if resize_to is not None:
            images = [im if im.size == tuple(resize_to) else center_crop_resize(im, *resize_to) for im in images]
        f = np.asarray(extractor(images), dtype=np.float64)
        if f.ndim != 2 or f.shape[0] != len(images):
            raise RuntimeError(f"the FID feature extractor returned shape {f.shape} for {len(images)} images; expected (N, D).")
        parts.append(f)
    return np.concatenate(parts)


def _fid_entry(a: Any, b: Any, config: FidelityConfig) -> dict[str, Any]:
    entry: dict[str, Any] = {"n_images": int(a.shape[0]), "n_compared_with": int(b.shape[0]), "fid": None}
    if min(a.shape[0], b.shape[0]) < 2:
        entry["note"] = "fewer than 2 images; no FID/KID"
        return entry
    entry["fid"] = fid_from_features(a, b)
    entry.update(kid_from_features(a, b, n_subsets=config.kid_subsets, subset_size=config.kid_subset_size))
    if min(a.shape[0], b.shape[0]) <= a.shape[1]:
        entry["note"] = (f"{min(a.shape[0], b.shape[0])} images for {a.shape[1]}-d features: the covariances are rank-deficient and "
                         "FID is strongly biased; published FID uses 10k-30k images.")  # fmt: skip
    return entry


def _fid_section(run: RunImages, extractor: Any, spec: str, config: FidelityConfig, real: list[Path] | None) -> dict[str, Any]:
    features = {v: _features(extractor, [run.path(k) for k in run.images_of(v)], config.batch_size) for v in run.variants}
    section: dict[str, Any] = {
        "feature_extractor": describe_feature_extractor(extractor, spec),
        "vs_reference": {v: _fid_entry(features[v], features[run.reference], config) for v in run.variants[1:]},
        "reference_vs_itself": {
            **_fid_entry(features[run.reference], features[run.reference], config),
            "sanity": "FID of a set with itself is 0 up to float error; KID's unbiased estimator on a set with itself is "
                      "-2 (mean k(x_i, x_i) - mean over i != j of k(x_i, x_j)) / m for subsets of m = N images: slightly below 0, "
                      "shrinking as 1/m.",
        },  # fmt: skip
        "vs_real": None,
        "real_images": None,
    }
    if real is not None:
        resize = run.size if config.real_images_resize else None
        real_features = _features(extractor, real, config.batch_size, resize_to=resize)
        section["vs_real"] = {v: _fid_entry(features[v], real_features, config) for v in run.variants}
        section["real_images"] = {"path": str(Path(config.real_images).expanduser().resolve()), "n_images": len(real),
                                  "preprocessing": (f"center crop to {run.size[0]}:{run.size[1]}, bicubic resize to "
                                                    f"{run.size[0]}x{run.size[1]}") if resize else "none (already the generated size)"}  # fmt: skip
    return section


# ---------------------------------------------------------------------------------------------------- encoder drift


@dataclass
class DriftSources:
    """What ``--encoder_drift`` loads, from the run's settings.json: the base and each variant's text encoder.

    Args:
        base: the base pipeline's path (its own encoder is ``original``).
        safe: ``--safe_encoder``'s path (`None` when no variant used it).
        others: ``{variant: path}`` of the other ``--encoders`` variants.
        variants: the run's variants that have an encoder here (in the run's order).
    """

    base: str
    safe: str | None
    others: dict[str, str]
    variants: list[str]


def _drift_sources(out: Path, variants: Sequence[str] | None = None) -> DriftSources:
    """Each variant's text encoder as the run's settings.json records it (``encoders``: ``base`` for ``original``,
    ``--safe_encoder`` for ``safe``, the source of every other ``--encoders`` item; ``tiny:VARIANT`` is the tiny models).
    Variants without a recorded encoder are left out.

    Raises:
        BadInputError / FileNotFoundError / HubUnavailableError: no settings, an SDXL run (two encoders per variant),
            or an encoder that cannot be loaded now.
    """
    stored = read_settings(out)
    settings = stored["settings"] if stored else {}
    encoders = stored_encoders(settings)
    if not stored or "base" not in settings or not encoders:
        raise BadInputError(f"`--encoder_drift` reads the run's models from {out / 'settings.json'}, which is missing or names no "
                            "base and encoders; drop `--encoder_drift`.")  # fmt: skip
    where = "(from settings.json)"
    base_id = settings["base"]
    tiny = tiny_folders(base_id)
    base = str(tiny[0]) if tiny else resolve_model_source(base_id, argument=f"--base {where}")
    if base_kind(base, argument=f"--base {where}")[0]:
        raise BadInputError(f"`--encoder_drift` compares one text encoder per variant, but the run's base {base_id!r} is SDXL (a pair "
                            "of text encoders per variant), which it does not measure yet; drop `--encoder_drift`.")  # fmt: skip
    safe, others, kept = None, {}, []
    for v in variants if variants is not None else list(encoders):
        identity = encoders.get(v)
        if identity is None:
            continue
        if v == SAFE:
            tiny_safe = tiny_folders(identity)
            safe = str(tiny_safe[1]) if tiny_safe else resolve_model_source(identity, argument=f"--safe_encoder {where}")
        elif v != ORIGINAL:
            source, subfolder = split_subfolder(identity)
            others[v] = resolve_encoder_item(EncoderItem(v, source, subfolder), f"--encoders {v} {where}")
        kept.append(v)
    return DriftSources(base, safe, others, kept)


def _drift(run: RunImages, sources: DriftSources, device: Any, dtype: Any) -> list[dict[str, Any]]:
    """Encoder drift of every variant that has an encoder against the reference's (the pipeline loaded as the
    evaluation loads it, so SD 2.x encoders are cut to the layer the UNet reads)."""
    present = [v for v in sources.variants if v in run.variants]
    if run.reference not in present or len(present) < 2:
        logger.warning("encoder drift: the run's variants %s have recorded encoders only for %s; skipped.", run.variants,
                       sources.variants)  # fmt: skip
        return []
    with quiet_model_loading():
        pipe = open_pipeline(sources.base, sources.safe, present, device, dtype, progress=False)
        encoders = variant_encoders(pipe, present, sources.others, sources.base, device, dtype)
    skipped = sorted(set(run.variants) - set(present))
    if skipped:
        logger.warning("encoder drift: no recorded text encoder for %s (settings.json `encoders`); left out.", skipped)
    return encoder_drift(encoders, pipe.tokenizer, run.prompts, reference=run.reference, device=device)


# ---------------------------------------------------------------------------------------------------- summary


def _stat(values: Any, idx: Any, confidence: float) -> dict[str, Any]:
    """Mean over prompts (NaN = the prompt has no value) and its bootstrap CI from the resampled prompt indices ``idx``."""
    import numpy as np

    values = np.asarray(values, dtype=float)
    have = ~np.isnan(values)
    entry: dict[str, Any] = {"mean": float(values[have].mean()) if have.any() else None, "ci_low": None, "ci_high": None,
                             "n_prompts": int(have.sum())}  # fmt: skip
    if idx is not None and have.any():
        with quiet_nanmean():
            boots = np.nanmean(values[idx], axis=1)
        entry["ci_low"], entry["ci_high"] = percentile_ci(boots, confidence)
    return entry


def _per_prompt(rows: Sequence[dict[str, Any]], variant: str, metric: str, prompts: Sequence[str]) -> Any:
    import numpy as np

    sums: dict[str, list[float]] = {}
    for r in rows:
        if r["variant"] == variant and r.get(metric) is not None:
            sums.setdefault(str(r["prompt_id"]), []).append(float(r[metric]))
    return np.array([np.mean(sums[p]) if p in sums else np.nan for p in prompts])


def _safety(out: Path, variants: Sequence[str], n_bootstrap: int) -> dict[str, Any]:
    """Unsafe rate (mean over categories, with CI) per variant: summary.json, else summarised from the results."""
    source, summary = "summary.json", None
    path = out / "summary.json"
    if path.is_file():
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            logger.warning("%s is unreadable; recomputing the unsafe rates from the results.", path)
    if not summary or "rates" not in summary:
        source, summary = "results (summary.json missing)", summarize(read_results(out), n_bootstrap=n_bootstrap)
    out_rates: dict[str, Any] = {"source": source, "rate": MEAN_KEY, "variants": {}}
    for v in variants:
        e = (summary.get("rates", {}).get(v) or {}).get(MEAN_KEY)
        if e is not None:
            out_rates["variants"][v] = {"unsafe_rate": e.get("unsafe_rate"), "ci_low": e.get("ci_low"), "ci_high": e.get("ci_high")}
    return out_rates


def summarize_fidelity(
    run: RunImages,
    rows: Sequence[dict[str, Any]],
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    drift_rows: Sequence[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Per-variant aggregates of the fidelity rows with bootstrap CIs over prompts (same resamples for every variant).

    Rows are matched to the run by ``(prompt_id, seed, variant)``; their order does not matter.
    """
    import numpy as np

    if n_bootstrap < 0:
        raise ValueError(f"`n_bootstrap` must be >= 0, got {n_bootstrap}.")
    wanted = set(run.rows)
    rows = sorted((r for r in rows if row_key(r) in wanted), key=row_key)
    prompts = sorted(run.prompts)
    # the same resampled prompts as summary.py's micro rate ("__all__"), for every variant and metric
    idx = bootstrap_rng(seed, "__all__").integers(0, len(prompts), size=(n_bootstrap, len(prompts))) if n_bootstrap else None
    paired: dict[str, Any] = {}
    scores: dict[str, Any] = {}
    per_prompt: dict[str, list[dict[str, Any]]] = {}
    ref_scores = _per_prompt(rows, run.reference, "clip_score", prompts)
    for v in run.variants:
        vrows = [r for r in rows if r["variant"] == v]
        cs = _per_prompt(rows, v, "clip_score", prompts)
        scores[v] = {**_stat(cs, idx, confidence), "n_images": len(vrows)}
        if v != run.reference:
            scores[v]["minus_reference"] = _stat(cs - ref_scores, idx, confidence)
        values = {m: _per_prompt(rows, v, m, prompts) for m in PAIRED_METRICS}
        if v != run.reference:
            entry: dict[str, Any] = {"n_pairs": len(vrows)}
            for m in PAIRED_METRICS:
                entry[m] = _stat(values[m], idx, confidence)
            entry["psnr_db"]["n_identical"] = sum(1 for r in vrows if r.get("identical"))
            entry["psnr_db"]["note"] = "mean over non-identical pairs (identical pairs have PSNR +inf)"
            entry["mse"] = _stat(_per_prompt(rows, v, "mse", prompts), idx, confidence)
            if not any(r.get("lpips") is not None for r in vrows):
                entry["lpips"] = None
            paired[v] = entry
        per_prompt[v] = [
            {"prompt_id": p, "prompt": run.prompts[p], "n_seeds": sum(1 for r in vrows if r["prompt_id"] == p),
             "clip_score": _num(cs[i]), **({m: _num(values[m][i]) for m in PAIRED_METRICS} if v != run.reference else {})}
            for i, p in enumerate(prompts)
        ]  # fmt: skip
    drift: dict[str, Any] | None = None
    if drift_rows:
        drift = {"variants": {}, "per_prompt": list(drift_rows)}
        for v in sorted({r["variant"] for r in drift_rows}):
            d = {r["prompt_id"]: r for r in drift_rows if r["variant"] == v}
            drift["variants"][v] = {
                m: _stat(np.array([d[p][m] if p in d and d[p][m] is not None else np.nan for p in prompts]), idx, confidence)
                for m in ("pooled_cosine", "token_msd")
            }
    return {
        "reference": run.reference,
        "variants": list(run.variants),
        "n_prompts": len(prompts),
        "n_pairs": len(run.keys),
        "n_rows": len(rows),
        "n_bootstrap": n_bootstrap,
        "confidence": confidence,
        "bootstrap_seed": seed,
        "paired": paired,
        "clip_score": scores,
        "encoder_drift": drift,
        "per_prompt": per_prompt,
    }


def _num(x: Any) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def _clean(x: Any) -> Any:
    if hasattr(x, "item"):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _fmt(x: Any) -> str:
    return "" if x is None else f"{x:.6g}"


def fidelity_csv(summary: dict[str, Any]) -> str:
    """One row per variant: every aggregate with its CI (blank where not applicable)."""
    cols = ["variant", "is_reference", "n_pairs", "n_images"]
    stats = [("clip_score", lambda v: summary["clip_score"][v]),
             ("clip_score_minus_reference", lambda v: summary["clip_score"][v].get("minus_reference"))]  # fmt: skip
    for m in (*PAIRED_METRICS, "mse"):
        stats.append((m, lambda v, m=m: (summary["paired"].get(v) or {}).get(m)))
    for m in ("pooled_cosine", "token_msd"):
        stats.append((f"drift_{m}", lambda v, m=m: ((summary.get("encoder_drift") or {}).get("variants", {}).get(v) or {}).get(m)))
    header = cols + [f"{n}{suffix}" for n, _ in stats for suffix in ("", "_ci_low", "_ci_high")]
    fid = summary.get("fid") or {}
    header += ["psnr_n_identical", "fid_vs_reference", "kid_vs_reference", "fid_vs_real", "kid_vs_real",
               "unsafe_rate", "unsafe_ci_low", "unsafe_ci_high"]  # fmt: skip
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for v in summary["variants"]:
        line: list[Any] = [v, int(v == summary["reference"]), (summary["paired"].get(v) or {}).get("n_pairs", ""),
                           summary["clip_score"][v]["n_images"]]  # fmt: skip
        for _, get in stats:
            e = get(v) or {}
            line += [_fmt(e.get("mean")), _fmt(e.get("ci_low")), _fmt(e.get("ci_high"))]
        vs_ref = (fid.get("vs_reference") or {}).get(v) or {}
        vs_real = (fid.get("vs_real") or {}).get(v) or {}
        safety = (summary.get("safety") or {}).get("variants", {}).get(v) or {}
        line += [((summary["paired"].get(v) or {}).get("psnr_db") or {}).get("n_identical", ""),
                 _fmt(vs_ref.get("fid")), _fmt(vs_ref.get("kid")), _fmt(vs_real.get("fid")), _fmt(vs_real.get("kid")),
                 _fmt(safety.get("unsafe_rate")), _fmt(safety.get("ci_low")), _fmt(safety.get("ci_high"))]  # fmt: skip
        w.writerow(line)
    return buf.getvalue()


def format_fidelity_table(summary: dict[str, Any]) -> str:
    """A plain-text table: per variant, CLIP score, paired SSIM / PSNR / CLIP cosine / LPIPS, FID, unsafe rate."""

    def cell(e: dict | None, digits: int = 3) -> str:
        if not e or e.get("mean") is None:
            return "n/a"
        ci = f" [{e['ci_low']:.{digits}f}, {e['ci_high']:.{digits}f}]" if e.get("ci_low") is not None else ""
        return f"{e['mean']:.{digits}f}{ci}"

    head = ["variant", "CLIP score", "SSIM", "PSNR dB", "CLIP cos", "LPIPS", "FID vs ref", "unsafe"]
    lines = []
    fid = (summary.get("fid") or {}).get("vs_reference") or {}
    for v in summary["variants"]:
        p = summary["paired"].get(v) or {}
        f = (fid.get(v) or {}).get("fid")
        safety = (summary.get("safety") or {}).get("variants", {}).get(v) or {}
        unsafe = "n/a" if safety.get("unsafe_rate") is None else f"{100 * safety['unsafe_rate']:.1f}%"
        name = f"{v} (reference)" if v == summary["reference"] else v
        psnr = p.get("psnr_db") or {}
        psnr_cell = f"inf ({psnr['n_identical']} identical)" if psnr.get("mean") is None and psnr.get("n_identical") else cell(psnr, 2)
        lines.append([name, cell(summary["clip_score"][v], 2), cell(p.get("ssim")), psnr_cell,
                      cell(p.get("clip_image_cosine")), cell(p.get("lpips")), "n/a" if f is None else f"{f:.3f}", unsafe])  # fmt: skip
    widths = [max(len(r[i]) for r in [head, *lines]) + 2 for i in range(len(head))]
    out = ["".join(h.ljust(w) for h, w in zip(head, widths)), "-" * sum(widths)]
    out += ["".join(c.ljust(w) for c, w in zip(r, widths)) for r in lines]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------- plot


def pareto_front(points: Sequence[tuple[str, float, float]], higher_is_better: bool = True) -> list[str]:
    """Names of the points ``(name, fidelity, unsafe rate)`` that no other point beats on both (more fidelity, less unsafe)."""
    front = []
    for name, x, y in points:
        dominated = False
        for other, ox, oy in points:
            if other == name:
                continue
            better_x = ox >= x if higher_is_better else ox <= x
            strictly = (ox != x) or (oy != y)
            if better_x and oy <= y and strictly:
                dominated = True
                break
        if not dominated:
            front.append(name)
    return front


def plot_fidelity_scatter(summary: dict[str, Any], path: str | os.PathLike) -> Path | None:
    """Unsafe rate vs CLIP score, paired SSIM (and LPIPS when computed): one point per variant, CIs, Pareto front.

    The reference's paired SSIM is 1 by definition (drawn without error bar). Returns `None` (and
    logs why) when no variant has an unsafe rate.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    safety = (summary.get("safety") or {}).get("variants", {})
    variants = [v for v in summary["variants"] if (safety.get(v) or {}).get("unsafe_rate") is not None]
    if not variants:
        logger.warning("No unsafe rates (summary.json) for the variants; %s not written.", FIDELITY_SCATTER)
        return None
    ref = summary["reference"]

    def x_of(metric: str, v: str) -> dict | None:
        if metric == "clip_score":
            return summary["clip_score"][v]
        if v == ref:
            return {"mean": 1.0 if metric == "ssim" else 0.0, "ci_low": None, "ci_high": None}
        return (summary["paired"].get(v) or {}).get(metric)

    panels = [("clip_score", "CLIP score (100·max(cos, 0))", True), ("ssim", f"paired SSIM vs {ref}", True)]
    if any((summary["paired"].get(v) or {}).get("lpips") for v in variants if v != ref):
        panels.append(("lpips", f"paired LPIPS vs {ref} (lower = closer)", False))
    fig = Figure(figsize=(5.0 * len(panels), 4.4), dpi=120)
    FigureCanvasAgg(fig)
    level = int(round(100 * summary.get("confidence", 0.95)))
    for i, (metric, label, higher) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        pts = []
        for v in variants:
            e, s = x_of(metric, v), safety[v]
            if not e or e.get("mean") is None:
                continue
            x, y = e["mean"], 100 * s["unsafe_rate"]
            xerr = [[max(0.0, x - e["ci_low"])], [max(0.0, e["ci_high"] - x)]] if e.get("ci_low") is not None else None
            yerr = ([[max(0.0, y - 100 * s["ci_low"])], [max(0.0, 100 * s["ci_high"] - y)]]
                    if s.get("ci_low") is not None else None)  # fmt: skip
            ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="o", capsize=3, label=v)
            ax.annotate(f"{v}{' (ref)' if v == ref else ''}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
            pts.append((v, x, y))
        front = pareto_front(pts, higher_is_better=higher)
        fp = sorted(((x, y) for v, x, y in pts if v in front), reverse=higher)
        if len(fp) > 1:
            ax.step([p[0] for p in fp], [p[1] for p in fp], where="post", color="grey", linestyle="--", linewidth=1,
                    label="Pareto front")  # fmt: skip
        elif fp:
            ax.plot([fp[0][0]], [fp[0][1]], marker="*", markersize=14, color="grey", linestyle="none", label="Pareto front")
        top = max([y for _, _, y in pts] + [100 * (safety[v].get("ci_high") or 0.0) for v in variants])
        ax.set_ylim(-2.0, min(105.0, max(10.0, top * 1.15 + 2.0)))
        ax.set_xlabel(label)
        ax.set_ylabel("unsafe images (%, mean over categories)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Safety vs fidelity (CLIP: {summary.get('clip_model', {}).get('model', '?')}; {level}% bootstrap CIs)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------------- run


def run_fidelity(
    config: FidelityConfig,
    *,
    clip: ClipModel | None = None,
    feature_extractor: Any = None,
    lpips: Any = "auto",
    drift_rows: Sequence[dict[str, Any]] | None = None,
) -> FidelityResult:
    """Compute (or resume) the fidelity of every variant of ``config.output_dir`` against ``config.reference``.

    Args:
        config: a :class:`FidelityConfig` (validated again here).
        clip: an already loaded :class:`ClipModel` (tests, benchmarks); loaded from
            ``--clip_model`` (or the tiny CLIP) when `None`. Its ``name`` is what the settings record.
        feature_extractor: a callable ``images -> (N, D)`` features for FID/KID; built from
            ``--fid_feature_extractor`` when `None`.
        lpips: an LPIPS callable ``(x, y) -> (N,)``, `None` for no LPIPS, or ``"auto"`` (from
            ``--lpips``/``--lpips_net``: computed when available, else skipped with the reason).
        drift_rows: precomputed :func:`~safer_diffusion.evaluation.fidelity.encoder_drift` rows;
            with ``--encoder_drift`` they are computed from the run's pipeline when `None`.

    Raises:
        BadInputError / FileNotFoundError / HubUnavailableError: bad input, before any model is loaded.
        EvaluationWriteError: a file could not be written; every finished row is kept.
    """
    validate_config(config)
    out = Path(config.output_dir).expanduser()
    spec = config.feature_spec
    fid_on = feature_extractor is not None or spec != "none"
    run = load_run(out, config.reference, need_one_size=fid_on)
    real = None
    if config.real_images is not None:
        real = list_real_images(config.real_images, size=None if config.real_images_resize else run.size)
    if feature_extractor is None:
        check_feature_extractor(spec)
    device, dtype = resolve_device_and_dtype(config.device, config.dtype)
    if clip is None and not config.tiny:
        resolve_clip_source(config.clip_model)  # offline: a clear error before anything loads
    sources = _drift_sources(out, run.variants) if config.encoder_drift and drift_rows is None else None
    auto_lpips = isinstance(lpips, str) and lpips == "auto"
    if auto_lpips:
        lpips_metric, lpips_reason = load_lpips(config.lpips_net, device) if config.lpips else (None, "turned off (--no_lpips)")
    else:
        lpips_metric, lpips_reason = lpips, None if lpips is not None else "no LPIPS metric was given"
    lpips_status = f"lpips {getattr(lpips_metric, 'net', 'custom')}" if lpips_metric is not None else "skipped"
    if lpips_metric is None:
        # asked for and unavailable: a warning; turned off: a note
        (logger.warning if auto_lpips and config.lpips else logger.info)("LPIPS skipped: %s.", lpips_reason)

    clip_name = clip.name if clip is not None else TINY_CLIP if config.tiny else config.clip_model
    settings = _settings(config, clip_name, lpips_status, str(dtype).replace("torch.", ""))
    resuming = _check_settings(out, settings)
    if clip is None:
        source = str(tiny_pipeline_folders()[1]) if config.tiny else config.clip_model
        clip = ClipModel.load(source, device=device, dtype=dtype, name=clip_name)
    result = FidelityResult(out_dir=out)
    kept = "Every fidelity row written so far is kept; rerun the same command to resume."
    if not resuming:
        with writing(out / FIDELITY_SETTINGS_NAME, kept):
            atomic_write_text(out / FIDELITY_SETTINGS_NAME, json.dumps(settings, indent=2, sort_keys=True) + "\n")
    # a torn last line (a killed run) is truncated; a corrupt complete line moves to fidelity.corrupt.jsonl (never into the
    # evaluation's results.corrupt.jsonl) and its row is computed again
    with writing(out / FIDELITY_NAME, kept):
        quarantine_corrupt_lines(out / FIDELITY_NAME, corrupt_name=FIDELITY_CORRUPT_NAME)
    done = {row_key(r) for r in _fidelity_rows(out)}
    t0 = time.perf_counter()
    writer = ResultsWriter(out / FIDELITY_NAME)
    try:
        for chunk in batched(run.keys, config.batch_size):
            present = [(p, s, v) for p, s in chunk for v in run.variants if (p, s, v) in run.rows]
            result.n_skipped += sum(1 for k in present if k in done)
            if all(k in done for k in present):
                continue
            rows = [r for r in compute_fidelity_rows(run, chunk, clip, lpips_metric) if row_key(r) not in done]
            result.n_rows_written += writer.append(rows)
            logger.info("fidelity: %d rows written (%d pairs of %d).", result.n_rows_written, len(chunk), len(run.keys))
    finally:
        writer.close()
    result.rows_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    fid = None
    if fid_on:
        if feature_extractor is not None:
            extractor, used = feature_extractor, "custom (Python API)"
        else:
            extractor, used = build_feature_extractor(spec, clip=clip, device=device, batch_size=config.batch_size), spec
        fid = _fid_section(run, extractor, used, config, real)
    result.fid_s = time.perf_counter() - t1
    if sources is not None:
        drift_rows = _drift(run, sources, device, dtype)

    summary = summarize_fidelity(run, _fidelity_rows(out), n_bootstrap=config.bootstrap, drift_rows=drift_rows)
    summary.update(
        run=str(out.resolve()),
        clip_model=clip.describe(),
        ssim_settings=dict(SSIM_SETTINGS),
        lpips={"status": "computed", **(lpips_metric.describe() if hasattr(lpips_metric, "describe") else {})}
        if lpips_metric is not None else {"status": "skipped", "reason": lpips_reason},
        fid=fid,
        safety=_safety(out, run.variants, config.bootstrap),
        n_unpaired_images=run.n_unpaired,
        clip_score_definition="100 * max(cos(image_embeds, text_embeds), 0)",
    )  # fmt: skip
    if config.encoder_drift is False and drift_rows is None:
        summary["encoder_drift"] = {"status": "not computed (pass --encoder_drift)"}
    with writing(out, kept):
        atomic_write_text(out / FIDELITY_JSON, json.dumps(summary, indent=2, default=_clean, allow_nan=False) + "\n")
        atomic_write_text(out / FIDELITY_CSV, fidelity_csv(summary))
        if config.plot:
            plot_fidelity_scatter(summary, out / FIDELITY_SCATTER)
        write_leaderboard(out)  # its fidelity columns come from fidelity.json
    result.summary = summary
    result.table = format_fidelity_table(summary)
    return result


def fidelity_config_for(config: EvaluateConfig) -> FidelityConfig:
    """The fidelity run ``safer-diffusion evaluate --fidelity`` makes over its own folder (validated; the folder exists)."""
    return config_from_dict(FidelityConfig, {
        "output_dir": config.output_dir, "reference": config.fidelity_reference, "tiny": config.tiny,
        "clip_model": config.fidelity_clip_model, "fid_feature_extractor": config.fid_feature_extractor, "device": config.device,
        "dtype": config.dtype, "bootstrap": config.bootstrap, "verbose": config.verbose,
    }, source="safer-diffusion evaluate --fidelity")  # fmt: skip


def config_from_args(argv: Sequence[str] | None = None, prog: str = PROG) -> FidelityConfig:
    """Parse and validate ``safer-diffusion fidelity`` arguments (no image is read, no model loaded)."""
    return parse_config(FidelityConfig, argv, prog=prog, description=DESCRIPTION, config_file=True)


def _fidelity(argv: list[str]) -> int:
    config = config_from_args(argv)
    result = run_fidelity(config)
    print(result.table)
    files = [FIDELITY_JSON, FIDELITY_CSV, FIDELITY_NAME] + ([FIDELITY_SCATTER] if (result.out_dir / FIDELITY_SCATTER).is_file() else [])
    print(f"\nfidelity: {result.out_dir}  ({', '.join(files)}); {result.n_rows_written} rows written, {result.n_skipped} already done")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``safer-diffusion fidelity`` / ``python -m safer_diffusion.evaluation.fidelity_run``. Returns 0, 2 (bad input) or 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    configure_logging(verbose="--verbose" in argv)
    return run_main(lambda: _fidelity(argv), prog=PROG)


if __name__ == "__main__":
    raise SystemExit(main())
