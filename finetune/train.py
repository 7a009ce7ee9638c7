"""Train a SaFeR-CLIP (or Safe-CLIP baseline) encoder.

Single GPU (or CPU)::

    python -m finetune.train --config finetune/configs/safer_clip_vit_l14.yaml --output_dir outputs/safer-clip-l14
    safer-clip-train --config safer_clip_vit_l14.yaml --train_data pairs.jsonl --output_dir outputs/run   # same, console script

Several GPUs / nodes (DDP through accelerate; ``--train_batch_size`` is per GPU)::

    accelerate launch --multi_gpu --num_processes 8 -m finetune.train --config finetune/configs/safer_clip_vit_l14.yaml \\
        --output_dir outputs/safer-clip-l14 --mixed_precision bf16
    accelerate launch --num_machines 2 --machine_rank 0 --main_process_ip 10.0.0.1 --num_processes 16 -m finetune.train ...

Offline smoke run (tiny random CLIP, bundled sample pairs, < 2 min on 2 CPU cores)::

    python -m finetune.train --config finetune/configs/tiny_cpu.yaml --output_dir outputs/tiny

Stable Diffusion XL (``--sdxl``): both text encoders, one after the other, each with its own anchors and targets, into
``<output_dir>/text_encoder/`` and ``<output_dir>/text_encoder_2/`` (docs/METHOD.md §6.6)::

    python -m finetune.train --config finetune/configs/safer_clip_sdxl.yaml --output_dir outputs/safer-clip-sdxl
    python -m finetune.train --config finetune/configs/tiny_cpu_sdxl.yaml --output_dir outputs/tiny-sdxl   # offline, tiny

Resume: ``--resume_from_checkpoint latest`` (or a ``checkpoint-{step}`` folder); the checkpoint format and its
integrity checks are :mod:`finetune.checkpoint`. Export the result with
``python -m finetune.export --checkpoint outputs/run --output_dir exported/``.

Exit status (every launch path alike): 0 success, 2 bad input (one line naming the option, the value and
the fix, before any model or data is loaded where the check allows), 1 a runtime failure (non-finite
loss, a checkpoint that cannot be written or resumed exactly).

The loop, top to bottom (:func:`train`):

1. Load pairs (one table, or two row-aligned files with ``--train_data_safe``) and the extra safe captions,
   hold out ``val_fraction`` for end-of-training metrics, resolve the loss- and data-dependent defaults
   (:meth:`~finetune.config.TrainConfig.resolve`; ``config.yaml`` records them).
2. Load CLIP fp32; precompute the frozen anchors T0/V0 once (cached on disk), the nearest-safe
   targets (over the paired and extra safe captions) and the curriculum stages.
3. Wrap CLIP: LoRA on the trained tower(s), fp32 trainable weights, frozen weights in fp16/bf16.
4. Every step: one forward of the trainable tower on the batch's safe + unsafe captions; frozen
   embeddings come from the anchors (or, with ``--no_precompute_anchors``, from the same weights
   with the adapters disabled); the loss module sums the named terms; Adam step.
5. Checkpoint every ``checkpointing_steps`` (atomically), stop on a non-finite loss, write metrics
   (:mod:`finetune.metrics`).

The method (every loss term, the target search, the curriculum) is docs/METHOD.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from safer_diffusion.export_format import TEXT_ENCODER_2_DIR, TEXT_ENCODER_DIR
from safer_diffusion.fileio import atomic_write_text, check_writable_dir
from safer_diffusion.hub import resolve_model_source
from safer_diffusion.options import BadInputError, configure_logging, run_main, validate_config

from . import _cache
from . import anchors as anchors_mod
from . import curriculum as curriculum_mod
from . import data as data_mod
from . import targets as targets_mod
from .checkpoint import (
    TRAINABLE_WEIGHTS,
    latest_checkpoint,
    load_training_state,
    read_training_state,
    remove_stale_temp,
    resolve_resume_path,
    save_checkpoint,
)
from .config import PROG, TrainConfig, parse_train_config
from .losses import build_loss, distributed_gather
from .metrics import text_metrics
from .modeling import (
    OPEN_CLIP_PREFIX,
    TINY_MODEL_NAME,
    TINY_SDXL_MODEL_NAMES,
    SaferCLIP,
    check_attention,
    check_mixed_precision,
    check_sdxl_towers,
    load_clip,
    weight_dtype_for,
)

logger = logging.getLogger(__name__)

__all__ = ["NonFiniteLossError", "SDXL_TOWERS", "TRAIN_LOG", "TrainResult", "check_inputs", "epoch_order", "epoch_plan", "group_by_length", "main",
           "sdxl_tower_configs", "train"]

#: Per-step loss log of the main process (JSON Lines, one ``{"step": ...}`` object per logged step).
TRAIN_LOG = "train_log.jsonl"
#: The run subfolders of an ``--sdxl`` run, in training order (named as the export's and a pipeline's encoders).
SDXL_TOWERS = (TEXT_ENCODER_DIR, TEXT_ENCODER_2_DIR)
_REPO_ROOT = Path(__file__).resolve().parents[1]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; training stopped before applying that step."""


@dataclass
class TrainResult:
    """What :func:`train` returns (on every process; ``losses`` are this process's).

    Args:
        output_dir: the run folder.
        global_step: optimisation steps done in total (including resumed ones).
        losses: the loss value of each step run by this call, in order.
        last_checkpoint: the newest complete checkpoint folder, or None.
        metrics: end-of-training validation metrics (``metrics.json``), or {}.
        active_terms: names of the loss terms that were active.
        model: the trained :class:`~finetune.modeling.SaferCLIP` (unwrapped), for in-process use.
        anchors: the frozen anchors the run used (``AnchorSet``).
        tokenizer: the tokenizer of the run.
        inexact_resume: the state files a resume had to do without (``--allow_inexact_resume``), or [].
        config: the resolved configuration (what ``config.yaml`` holds).
        loss_weights: the weight of every term active in the last step (after ``renormalize_active``).
        extra_captions: the extra safe captions the run used (after removing duplicates of the pair data), or [].
        towers: an ``--sdxl`` run's per-tower results (:data:`SDXL_TOWERS` -> `TrainResult`), else {}. The run's own
            fields then sum or combine them: ``global_step`` and ``losses`` both towers', ``metrics`` per tower,
            ``last_checkpoint`` the second tower's; ``model``/``anchors``/``tokenizer`` are in ``towers``.
    """

    output_dir: Path
    global_step: int
    losses: list[float] = field(default_factory=list)
    last_checkpoint: Path | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    active_terms: list[str] = field(default_factory=list)
    model: Any = field(default=None, repr=False)
    anchors: Any = field(default=None, repr=False)
    tokenizer: Any = field(default=None, repr=False)
    inexact_resume: list[dict[str, str]] = field(default_factory=list)
    config: Any = field(default=None, repr=False)
    loss_weights: dict[str, float] = field(default_factory=dict)
    extra_captions: list[str] = field(default_factory=list, repr=False)
    towers: dict[str, Any] = field(default_factory=dict, repr=False)


# --------------------------------------------------------------------------- data plan
def epoch_plan(curriculum, num_epochs: int, global_batch: int) -> list[int]:
    """Steps in each epoch (1-based epochs -> list index epoch-1): ceil(curriculum pairs / global batch)."""
    return [max(1, math.ceil(len(curriculum.indices_for_epoch(e)) / global_batch)) for e in range(1, num_epochs + 1)]


def _wrap(order: torch.Tensor, need: int) -> torch.Tensor:
    return order.repeat(math.ceil(need / len(order)))[:need] if need else order[:0]


def epoch_order(seed: int, epoch: int, pool: torch.Tensor, n_safe: int, steps: int, global_batch: int, n_extra: int = 0,
                 extra_rows: int = 0, batch: int | None = None):
    """Deterministic data order of one epoch: (unsafe pair indices, safe preservation indices), each steps*global_batch long.

    Unsafe pairs: a permutation of this epoch's curriculum pool, wrapped around to fill the last batch.
    Safe captions (preservation, not curriculum-filtered): a permutation of all pairs, wrapped likewise. With
    ``extra_rows`` > 0 (``--preserve_extra``), the last ``extra_rows`` of every process batch of ``batch`` rows come
    from a permutation of the ``n_extra`` extra captions instead, as indices ``n_safe + j``.
    Only (seed, epoch) decide the order, so resuming needs no sampler state.
    """
    need = steps * global_batch
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    unsafe = _wrap(pool[torch.randperm(len(pool), generator=g)], need)
    safe = torch.randperm(n_safe, generator=g)
    if not extra_rows:
        return unsafe, _wrap(safe, need)
    blocks = need // batch  # one block per process batch
    pairs = _wrap(safe, blocks * (batch - extra_rows)).view(blocks, batch - extra_rows)
    extra = _wrap(torch.randperm(n_extra, generator=g), blocks * extra_rows).view(blocks, extra_rows) + n_safe
    return unsafe, torch.cat([pairs, extra], dim=1).reshape(-1)


def _deal(rows: torch.Tensor, lengths: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """The rows of a window (``(steps, ...)``) sorted by length and dealt out step by step, the steps in ``perm``'s order."""
    flat = rows.reshape(-1)
    return flat[torch.argsort(lengths[flat], stable=True)].view(rows.shape[0], -1)[perm]


def group_by_length(order_u: torch.Tensor, order_s: torch.Tensor, len_u: torch.Tensor, len_s: torch.Tensor, global_batch: int,
                    window: int, seed: int, epoch: int, batch: int | None = None, extra_rows: int = 0):
    """Re-deal an epoch's order so that every step holds captions of similar token length (``--group_by_length``).

    Within each window of ``window`` consecutive steps, the unsafe rows are sorted by token length and dealt out
    step by step, and so are the safe preservation rows (the extra-caption columns of every process batch,
    ``extra_rows`` of each ``batch``, separately, so each step keeps its share of extra captions); then the
    window's steps are shuffled, the same way for both sides. Every window keeps exactly its rows, so the
    epoch's multiset of rows, and the curriculum, are unchanged; only which rows share a step changes. The
    SaFeR-CLIP caption-only terms are per row, so the loss of each row is unchanged; in-batch InfoNCE
    terms (Safe-CLIP) see length-correlated negatives. Only (seed, epoch) and the lengths decide the result.
    """
    steps = order_u.numel() // global_batch
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 7_919)
    u = order_u.view(steps, global_batch).clone()
    s = order_s.view(steps, global_batch // (batch or global_batch), batch or global_batch).clone()
    pair_cols = s.shape[-1] - extra_rows
    for start in range(0, steps, window):
        w = slice(start, min(start + window, steps))
        n = w.stop - w.start
        perm = torch.randperm(n, generator=g)
        u[w] = _deal(u[w], len_u, perm)
        s[w, :, :pair_cols] = _deal(s[w, :, :pair_cols], len_s, perm).view(n, s.shape[1], pair_cols)
        if extra_rows:
            s[w, :, pair_cols:] = _deal(s[w, :, pair_cols:], len_s, perm).view(n, s.shape[1], extra_rows)
    return u.reshape(-1), s.reshape(-1)


def _tokenize(tokenizer, captions: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(list(captions), padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


def _extra_captions(config: TrainConfig, train_set, val_set) -> list[str]:
    """``--extra_safe_captions`` read, without the captions that repeat the pair data (logged): equal to an unsafe caption
    (it would be its own "safe" target), to a held-out safe caption (validation would measure a trained caption), or
    to a paired training safe caption (already in the pool and the preservation rows)."""
    captions = data_mod.load_captions(config.extra_safe_captions, config.extra_safe_captions_column)
    splits = [train_set] + ([val_set] if val_set is not None else [])
    unsafe = {c for d in splits for c in d.unsafe_captions}
    held_out = set(val_set.safe_captions) if val_set is not None else set()
    paired = set(train_set.safe_captions)
    kept = [c for c in captions if c not in unsafe and c not in held_out and c not in paired]
    dropped_unsafe = sum(c in unsafe for c in captions)
    if dropped_unsafe:
        logger.warning("`--extra_safe_captions`: dropped %d caption(s) equal to an unsafe caption of the pairs.", dropped_unsafe)
    if len(kept) + dropped_unsafe < len(captions):
        logger.info("`--extra_safe_captions`: dropped %d caption(s) equal to a paired safe caption (%d of them held out).",
                    len(captions) - len(kept) - dropped_unsafe, sum(c in held_out for c in captions))
    if not kept:
        raise ValueError(f"`--extra_safe_captions`: all {len(captions)} captions repeat captions of `--train_data`; pass other captions.")
    logger.info("Extra safe captions: %d%s.", len(kept), " (nearest-safe pool" + (" and preservation)" if config.preserve_extra else ")")
                if config.loss == "safer_clip" else " (preservation)")  # fmt: skip
    return kept


def _pad_to(ids: torch.Tensor, mask: torch.Tensor, length: int, pad_id: int):
    if ids.shape[1] >= length:
        return ids, mask
    extra = length - ids.shape[1]
    return (torch.cat([ids, ids.new_full((ids.shape[0], extra), pad_id)], 1), torch.cat([mask, mask.new_zeros((mask.shape[0], extra))], 1))


def _without_start(mask: torch.Tensor) -> torch.Tensor:
    """The attention mask without the start token (bool): the positions the token redirection term pools over."""
    mask = mask.bool().clone()
    mask[:, 0] = False
    return mask


def _trim(ids: torch.Tensor, mask: torch.Tensor):
    length = int(mask.sum(1).max())
    return ids[:, :length], mask[:, :length]


# --------------------------------------------------------------------------- the run
def _check_output_dir(config: TrainConfig) -> None:
    out = Path(config.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise BadInputError(f"`--output_dir` {config.output_dir!r} is a file, not a folder; pass a folder path.")
    if config.resume_from_checkpoint is None and out.is_dir() and any(not p.name.startswith(".write-test-") for p in out.iterdir()):
        raise ValueError(
            f"`--output_dir`={config.output_dir!r} exists and is not empty. Pass `--resume_from_checkpoint latest` to "
            "continue that run, or choose a new `--output_dir`."
        )


def check_inputs(config: TrainConfig) -> TrainConfig:
    """Every check of ``config`` that needs no model and no data read, run before any work.

    The shared mechanism's checks (choices, bounds, finite numbers) and :meth:`TrainConfig.validate`; the data
    source, image root and model source exist (or are reachable hub ids); mixed precision and the attention
    kernel suit the device; ``--output_dir`` is a writable folder, empty unless resuming; ``--cache_dir`` is
    writable; a named ``--resume_from_checkpoint`` exists. Bundled data paths (``assets/...``) are resolved
    against the repository, so they work from any working directory.

    Raises:
        BadInputError / ValueError / FileNotFoundError / HubUnavailableError: naming the option (exit status 2).
    """
    config = validate_config(config)
    if not Path(config.train_data).exists() and (_REPO_ROOT / config.train_data).is_file():
        config.train_data = str(_REPO_ROOT / config.train_data)  # bundled assets work from any working directory
    data_mod.check_source(config.train_data, "--train_data")
    if config.train_data_safe is not None:
        if not Path(config.train_data).is_file():
            raise FileNotFoundError(f"`--train_data` {config.train_data!r} must be a local file with `--train_data_safe` (row-aligned "
                                    "pair files); pass the file of unsafe prompts.")
        if not Path(config.train_data_safe).expanduser().is_file():
            raise FileNotFoundError(f"`--train_data_safe` {config.train_data_safe!r} does not exist; pass the file of safe prompts.")
    for path in config.extra_safe_captions or []:
        if not Path(path).expanduser().is_file():
            raise FileNotFoundError(f"`--extra_safe_captions` {path!r} does not exist; pass existing .txt/.csv/.jsonl/.json/.parquet files.")
    if config.image_root is not None and not Path(config.image_root).expanduser().is_dir():
        raise FileNotFoundError(f"`--image_root` {config.image_root!r} is not an existing folder; pass the folder of the images.")
    names = {"--model_name_or_path": config.model_name_or_path}
    if config.sdxl:
        names["--model_name_or_path_2"] = config.model_name_or_path_2
    for flag, name in names.items():
        if name != TINY_MODEL_NAME and name not in TINY_SDXL_MODEL_NAMES and not name.startswith(OPEN_CLIP_PREFIX):
            resolve_model_source(name, argument=flag)  # a local path, or a hub id reachable (or cached) now
    if config.sdxl:  # both towers fit the base's pair (config files only)
        check_sdxl_towers(config.model_name_or_path, config.model_name_or_path_2, config.base)
        if config.resume_from_checkpoint not in (None, "latest"):
            raise ValueError(f"`--resume_from_checkpoint` {config.resume_from_checkpoint!r}: an `--sdxl` run resumes each tower "
                             "from its own newest checkpoint; pass `latest`.")
    device = _predict_device(config)
    check_mixed_precision(config.mixed_precision, device)
    check_attention(config.attention, device)
    _check_output_dir(config)
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not several or int(os.environ.get("RANK", "0")) == 0:  # one probe per run folder
        check_writable_dir(config.output_dir, "--output_dir", keep_created=several)
    if config.cache_dir is not None:
        check_writable_dir(config.cache_dir, "--cache_dir", keep_created=several)
    resolve_resume_path(config.resume_from_checkpoint, config.output_dir)
    return config


def _predict_device(config: TrainConfig) -> torch.device:
    if config.use_cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def _build_loss(config: TrainConfig, gather):
    return build_loss(config.loss, config.loss_weights, scale=config.relative_scale, token_weight=config.token_weight, gather=gather,
                      weights_mode=config.loss_weights_mode, renormalize_active=config.renormalize_active,
                      variant=config.safe_clip_variant if config.loss == "safe_clip" else "image",
                      token_redir_weight=config.token_redir_weight, pair_margin=config.pair_margin, pair_form=config.pair_form)  # fmt: skip


def sdxl_tower_configs(config: TrainConfig) -> dict[str, TrainConfig]:
    """The single-tower runs of an ``--sdxl`` run: :data:`SDXL_TOWERS` -> the config of that tower's run, in
    ``<output_dir>/<tower>/`` (cache: ``<cache_dir>/<tower>`` when ``--cache_dir`` is given, else the tower's own)."""
    out = Path(config.output_dir).expanduser()
    runs = {}
    for tower, model in zip(SDXL_TOWERS, (config.model_name_or_path, config.model_name_or_path_2)):
        cache = None if config.cache_dir is None else os.fspath(Path(config.cache_dir).expanduser() / tower)
        runs[tower] = dataclasses.replace(config, sdxl=False, model_name_or_path=model, model_name_or_path_2=None, base=None,
                                          output_dir=os.fspath(out / tower), cache_dir=cache)  # fmt: skip
    return runs


def _train_sdxl(config: TrainConfig) -> TrainResult:
    """Train SDXL's two towers one after the other (each a normal resumable run, with its own anchors, targets and
    cache); ``<output_dir>/config.yaml`` (the resolved run, written once the first tower is done) and ``metrics.json``
    (per tower) sit at the top. A crash in the second tower keeps the first: ``--resume_from_checkpoint latest``
    resumes each tower from its newest checkpoint (a finished tower only recomputes its metrics)."""
    output_dir = Path(config.output_dir).expanduser()
    main_process = int(os.environ.get("RANK", "0")) == 0
    results: dict[str, TrainResult] = {}
    for tower, tower_config in sdxl_tower_configs(config).items():
        logger.info("SDXL: training %s (%s) into %s.", tower, tower_config.model_name_or_path, tower_config.output_dir)
        results[tower] = train(tower_config)
        if tower == SDXL_TOWERS[0] and main_process:
            resolved = dataclasses.replace(results[tower].config, sdxl=True, model_name_or_path=config.model_name_or_path,
                                           model_name_or_path_2=config.model_name_or_path_2, base=config.base,
                                           output_dir=config.output_dir, cache_dir=config.cache_dir)  # fmt: skip
            resolved.save(output_dir / "config.yaml", header=_resolved_header(config, resolved))
    first, second = (results[t] for t in SDXL_TOWERS)
    metrics = {tower: r.metrics for tower, r in results.items() if r.metrics}
    if metrics and main_process:
        atomic_write_text(output_dir / "metrics.json", json.dumps(metrics, indent=2))
    top = dataclasses.replace(first.config, sdxl=True, model_name_or_path=config.model_name_or_path,
                              model_name_or_path_2=config.model_name_or_path_2, base=config.base, output_dir=config.output_dir,
                              cache_dir=config.cache_dir)  # fmt: skip
    return TrainResult(output_dir, first.global_step + second.global_step, first.losses + second.losses, second.last_checkpoint,
                       metrics, first.active_terms, None, None, None, first.inexact_resume + second.inexact_resume, top,
                       first.loss_weights, first.extra_captions, results)


def _resolved_header(asked: TrainConfig, resolved: TrainConfig) -> str:
    """The comment block of config.yaml: what was resolved from what was asked."""
    lines = ["Resolved configuration written by finetune.train (docs/METHOD.md §8): rerunning it reproduces the method.",
             f"curriculum: {asked.curriculum} -> {resolved.curriculum}"]
    if resolved.loss == "safe_clip":
        lines.append(f"safe_clip_variant: {asked.safe_clip_variant} -> {resolved.safe_clip_variant}")
    asked_weights = "defaults" if asked.loss_weights is None else " ".join(f"{k}={v:g}" for k, v in asked.loss_weights.items())
    lines.append(f"loss_weights: {asked_weights} ({asked.loss_weights_mode}) -> the effective weight of every term below "
                 "(loss_weights_mode: replace)")
    return "\n".join(lines)


#: Options a resume must keep (added in this version: a checkpoint written without them is not checked on them).
_NEW_RUN_KEYS = ("train_data_safe", "safe_clip_variant", "preserve_extra", "extra_preserve_fraction", "extra_safe_captions")


def _run_fingerprint(config: TrainConfig, extra_captions: list[str] | None = None) -> dict[str, Any]:
    """What a resumed run must share with its checkpoint (of the *resolved* config; extra captions by content)."""
    keys = ("model_name_or_path", "train_data", "loss", "train_towers", "finetune", "lora_rank", "lora_target_modules", "seed",
            "train_batch_size", "curriculum", "curriculum_boundaries", "curriculum_stage_epochs", "val_fraction",
            "train_data_safe", "safe_clip_variant", "preserve_extra", "extra_preserve_fraction")
    out = {k: getattr(config, k) for k in keys}
    out["extra_safe_captions"] = _cache.hash_json(extra_captions) if extra_captions else None
    return out


def _truncate_log(path: Path, step: int) -> None:
    """Keep the records of ``path`` (``train_log.jsonl``) up to ``step``: a resumed run replays the steps after it."""
    if not path.is_file():
        return
    kept, replayed, unreadable = [], 0, 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record_step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            unreadable += 1  # e.g. half a line written when the earlier run was killed
            continue
        if record_step <= step:
            kept.append(line)
        else:
            replayed += 1
    if replayed or unreadable:
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))
        logger.warning("%s: kept %d records up to step %d; removed %d of steps that will be replayed and %d unreadable line(s).",
                       path, len(kept), step, replayed, unreadable)


def train(config: TrainConfig) -> TrainResult:  # noqa: C901 - a training loop reads best top to bottom
    """Run training as configured. Returns a :class:`TrainResult`; raises on bad input before any work.

    Raises:
        ValueError: bad option combination, existing output folder without resume, batch larger than the data,
            unsupported precision / attention backend (see :func:`check_inputs`).
        FileNotFoundError: a named `--resume_from_checkpoint` that does not exist, missing data or model.
        NonFiniteLossError: the loss became NaN/inf (the step is not applied; the last good checkpoint is kept).
        CheckpointWriteError: a checkpoint could not be written (no half-written checkpoint is left).
        ResumeError: a checkpoint's state files are unreadable (without ``--allow_inexact_resume``).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    # ---- 0. fail fast on bad input, before any heavy work (every rank checks before any rank writes)
    config = check_inputs(config)
    if config.sdxl:
        return _train_sdxl(config)
    output_dir = Path(config.output_dir).expanduser()

    AcceleratorState._reset_state()  # in-process reruns (tests, notebooks) may change the precision; keeps the process group
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        cpu=config.use_cpu,
    )
    main_process = accelerator.is_main_process
    resume_path = resolve_resume_path(config.resume_from_checkpoint, output_dir)
    accelerator.wait_for_everyone()  # every rank has inspected the output folder before any rank writes to it
    if main_process:
        remove_stale_temp(output_dir)
    set_seed(config.seed)

    # ---- 1. data
    if config.train_data_safe is not None:
        dataset = data_mod.load_aligned_pairs(config.train_data, config.train_data_safe, config.column_map)
    else:
        dataset = data_mod.load_pairs(config.train_data, format=config.data_format, column_map=config.column_map,
                                      image_root=config.image_root)  # fmt: skip
    if config.val_fraction > 0:
        train_set, val_set = data_mod.split_pairs(dataset, config.val_fraction, config.seed)
    else:
        train_set, val_set = dataset, None
    n = len(train_set)
    world = accelerator.num_processes
    global_batch = config.train_batch_size * world
    if global_batch > n:
        raise ValueError(
            f"`--train_batch_size` {config.train_batch_size} x {world} process(es) = {global_batch} is larger than the training "
            f"set ({n} pairs after holding out `--val_fraction` {config.val_fraction}). Lower `--train_batch_size` or add data."
        )
    train_vision = config.train_towers in ("vision", "both")
    train_text = config.train_towers in ("text", "both")
    if train_vision and not train_set.has_images:
        raise ValueError(
            f"`--train_towers {config.train_towers}` trains the vision tower, but `--train_data` {config.train_data!r} has no "
            "images. Use `--train_towers text`, or data with image paths (and `--image_root`)."
        )

    extras: list[str] = []
    if config.extra_safe_captions:
        if train_set.has_images:
            raise ValueError("`--extra_safe_captions` needs caption-only data: extra captions have no image, and the image terms of "
                             f"`--train_data` {config.train_data!r} need one for every safe caption (and target).")
        extras = _extra_captions(config, train_set, val_set)
    # loss- and data-dependent defaults (curriculum, Safe-CLIP variant, effective loss weights): recorded in config.yaml
    asked = config
    config = config.resolve(safe_images=train_set.has_images, unsafe_images=train_set.has_images and train_set.has_unsafe_images)

    # ---- 2. model, anchors, targets, curriculum
    loaded = load_clip(config.model_name_or_path, attention=config.attention)
    clip, tokenizer, image_processor = loaded.model, loaded.tokenizer, loaded.image_processor
    if config.train_towers != "text" and not hasattr(clip, "vision_model"):
        raise ValueError(f"`--train_towers {config.train_towers}`: `--model_name_or_path` {config.model_name_or_path!r} is a text "
                         "tower alone (no vision model); use `--train_towers text`.")
    weight_dtype = weight_dtype_for(config.mixed_precision)
    cache_dir = Path(config.cache_dir).expanduser() if config.cache_dir else output_dir / "cache"
    use_images = train_set.has_images and image_processor is not None
    if train_set.has_images and image_processor is None:
        logger.warning("`--model_name_or_path` %r ships no image processor: the images of `--train_data` are not used (caption-only "
                       "terms and defaults).", config.model_name_or_path)
        config = asked.resolve(safe_images=False, unsafe_images=False)
    with accelerator.main_process_first():  # the main process fills the cache, the others read it
        clip.to(accelerator.device)
        anchor_set = anchors_mod.compute_anchors(
            clip, tokenizer, train_set, batch_size=config.anchor_batch_size, device=accelerator.device, dtype=torch.float32,
            cache_dir=cache_dir, image_processor=image_processor if use_images else None, extra_captions=extras or None,
        )
        if config.loss == "safer_clip":
            targets = targets_mod.compute_targets(anchor_set, train_set, cache_dir=cache_dir, extra_captions=extras or None,
                                                  device=accelerator.device)  # exact wherever it runs; the GPU is faster
            target_index, difficulty = targets.index.cpu(), targets.similarity.cpu()
        else:  # Safe-CLIP: the fixed pair is the target
            target_index = torch.arange(n)
            difficulty = (anchor_set.unsafe_text * anchor_set.safe_text).sum(-1).cpu()
    curriculum = curriculum_mod.Curriculum(
        difficulty, mode=config.curriculum, boundaries=tuple(config.curriculum_boundaries), stage_epochs=tuple(config.curriculum_stage_epochs)
    )
    anchor_cpu = {k: getattr(anchor_set, k) for k in ("pool_text", "unsafe_text", "safe_image", "unsafe_image")}
    anchors_dev = {k: (v.to(accelerator.device) if v is not None else None) for k, v in anchor_cpu.items()}

    # token ids of every caption a row index names: the pairs' safe captions, then the extra ones (rows n + j)
    safe_ids, safe_mask = _tokenize(tokenizer, train_set.safe_captions + extras, config.max_length)
    unsafe_ids, unsafe_mask = _tokenize(tokenizer, train_set.unsafe_captions, config.max_length)
    length = max(safe_ids.shape[1], unsafe_ids.shape[1])
    pad_id = tokenizer.pad_token_id
    safe_ids, safe_mask = _pad_to(safe_ids, safe_mask, length, pad_id)
    unsafe_ids, unsafe_mask = _pad_to(unsafe_ids, unsafe_mask, length, pad_id)

    want_tokens = config.token_weight > 0 or config.token_redir_weight > 0  # token states at `--token_layer`
    model = SaferCLIP(
        clip, train_towers=config.train_towers, finetune=config.finetune, lora_rank=config.lora_rank, lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout, lora_target_modules=config.lora_target_modules, weight_dtype=weight_dtype,
        # full fine-tuning has no adapters to switch off: a live reference (or token states) needs a frozen copy
        keep_frozen_copy=config.finetune == "full" and (not config.precompute_anchors or want_tokens),
        gradient_checkpointing=config.gradient_checkpointing, token_layer=config.token_layer,
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(
        params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
        weight_decay=config.adam_weight_decay,
    )
    plan = epoch_plan(curriculum, config.num_train_epochs, global_batch)
    max_steps = sum(plan) if config.max_train_steps is None else min(sum(plan), config.max_train_steps)
    if config.max_train_steps is not None and config.max_train_steps > sum(plan):
        # more steps than the epochs give: extend with full-pool epochs
        extra = math.ceil((config.max_train_steps - sum(plan)) / plan[-1])
        plan += [plan[-1]] * extra
        max_steps = config.max_train_steps
    lr_scheduler = get_scheduler(
        config.lr_scheduler, optimizer=optimizer, num_warmup_steps=config.lr_warmup_steps * world,
        num_training_steps=max_steps * world,
    )
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    unwrapped: SaferCLIP = accelerator.unwrap_model(model)

    # trainable weights only in checkpoints (the frozen base is reloaded from its source)
    def save_hook(models, weights, out_dir):
        from safetensors.torch import save_file

        for i, m in enumerate(models):
            state = {k: v.detach().contiguous().cpu() for k, v in accelerator.unwrap_model(m).trainable_state_dict().items()}
            save_file(state, os.path.join(out_dir, TRAINABLE_WEIGHTS if i == 0 else f"trainable_{i}.safetensors"))
        weights.clear()

    accelerator.register_save_state_pre_hook(save_hook)

    gather = distributed_gather if world > 1 else None
    loss_fn = _build_loss(config, gather)
    fingerprint = _run_fingerprint(config, extras)

    # ---- resume
    global_step = 0
    inexact: list[dict[str, str]] = []
    if resume_path is not None:
        state = read_training_state(resume_path)
        unrecorded = [k for k in _NEW_RUN_KEYS if k not in state["run"]]
        if unrecorded:
            logger.warning("%s was written by an older version that records no %s; resuming without checking them.", resume_path,
                           ", ".join(unrecorded))
        mismatched = {k: (state["run"].get(k), v) for k, v in fingerprint.items() if k not in unrecorded and state["run"].get(k) != v}
        if mismatched:
            raise ValueError(
                f"`--resume_from_checkpoint` {str(resume_path)!r} was written with different options {mismatched} "
                "(checkpoint value, now). Resume with the original options or start a new `--output_dir`."
            )
        if state.get("data_fingerprint") != dataset.fingerprint():
            raise ValueError(f"The training data changed since {resume_path} was written (fingerprint differs); resume needs the same data.")
        global_step = int(state["global_step"])
        problems = load_training_state(accelerator, unwrapped, optimizer, lr_scheduler, resume_path, global_step=global_step,
                                       allow_inexact=config.allow_inexact_resume)  # fmt: skip
        inexact = list(state.get("inexact_resume", [])) + problems  # a once-inexact run stays marked
        logger.info("Resumed from %s at step %d%s.", resume_path, global_step, " (inexact: see metrics.json)" if problems else "")
    if main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        config.save(output_dir / "config.yaml", header=_resolved_header(asked, config))
        _truncate_log(output_dir / TRAIN_LOG, global_step)
    if config.report_to != "none":
        flat = {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v)) for k, v in config.to_dict().items()}
        accelerator.init_trackers("safer-clip", config=flat)

    def checkpoint(step: int, epoch: int, step_in_epoch: int) -> Path:
        state = {
            "epoch": epoch, "step_in_epoch": step_in_epoch, "steps_per_epoch": plan, "run": fingerprint,
            "data_fingerprint": dataset.fingerprint(), "base_model": loaded.source, "config": config.to_dict(),
            "trainable_keys": sorted(unwrapped.trainable_state_dict()), "inexact_resume": inexact,
        }
        return save_checkpoint(accelerator, output_dir, step, state, config.checkpoints_total_limit)

    # ---- 3. loop
    logger.info(
        "Training %s on %d pairs (%d held out), %d epochs %s, %d steps, global batch %d, loss %s, anchors %s.",
        config.train_towers, n, 0 if val_set is None else len(val_set), config.num_train_epochs, plan, max_steps, global_batch,
        config.loss, "precomputed" if config.precompute_anchors else "live (adapters disabled)",
    )
    losses: list[float] = []
    progress = tqdm(total=max_steps, initial=global_step, desc="steps", disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    rank = accelerator.process_index
    B = config.train_batch_size
    dev = accelerator.device
    token_pres = config.token_weight > 0
    # pres_pair (docs/METHOD.md §4.7): the unsafe rows' own safe twins join the trainable forward as a third block of B rows
    want_pairs = train_text and config.loss == "safer_clip" and (config.loss_weights or {}).get("pres_pair", 0.0) > 0
    last_saved = global_step if resume_path is not None else None
    log_file = open(output_dir / TRAIN_LOG, "a", encoding="utf-8") if main_process else None  # noqa: SIM115
    active_terms: list[str] = []
    epoch, start = 1, global_step
    try:
        while start >= plan[epoch - 1] and epoch < len(plan):
            start -= plan[epoch - 1]
            epoch += 1
        while global_step < max_steps and epoch <= len(plan):
            pool = curriculum.indices_for_epoch(min(epoch, config.num_train_epochs))
            if len(pool) < global_batch:
                logger.warning("Epoch %d trains %d curriculum pairs, fewer than the global batch %d: pairs repeat within a batch.",
                               epoch, len(pool), global_batch)
            order_u, order_s = epoch_order(config.seed, epoch, pool, n, plan[epoch - 1], global_batch, n_extra=len(extras),
                                            extra_rows=config.extra_rows_per_batch, batch=B)  # fmt: skip
            if config.group_by_length:
                order_u, order_s = group_by_length(order_u, order_s, unsafe_mask.sum(1), safe_mask.sum(1), global_batch,
                                                   config.length_group_steps, config.seed, epoch, batch=B,
                                                   extra_rows=config.extra_rows_per_batch)  # fmt: skip
            for step_in_epoch in range(start, plan[epoch - 1]):
                sl = slice(step_in_epoch * global_batch + rank * B, step_in_epoch * global_batch + (rank + 1) * B)
                u_idx, s_idx = order_u[sl], order_s[sl]
                hat_idx = target_index[u_idx]
                twin_ids, twin_mask = (safe_ids[u_idx], safe_mask[u_idx]) if want_pairs else (safe_ids[:0], safe_mask[:0])
                ids, mask = _trim(torch.cat([safe_ids[s_idx], unsafe_ids[u_idx], twin_ids]),
                                  torch.cat([safe_mask[s_idx], unsafe_mask[u_idx], twin_mask]))  # fmt: skip
                ids, mask = ids.to(dev), mask.to(dev)
                terms: dict[str, torch.Tensor | None] = {}
                pixels = None
                if train_vision or (use_images and not config.precompute_anchors):
                    paths = [train_set[int(i)].safe_image for i in s_idx]
                    has_unsafe_img = anchor_cpu["unsafe_image"] is not None
                    if has_unsafe_img:
                        paths += [train_set[int(i)].unsafe_image for i in u_idx]
                    pixels = data_mod.load_pixels(paths, image_processor, config.image_root).to(dev)
                with accelerator.autocast():
                    out = model(
                        input_ids=ids if train_text else None, attention_mask=mask if train_text else None,
                        pixel_values=pixels if train_vision else None, output_tokens=want_tokens,
                    )
                    if train_text:
                        terms["t"], terms["t_star"] = out["text"][:B], out["text"][B : 2 * B]
                        if want_pairs:
                            terms["t_pair"] = out["text"][2 * B :]
                    if train_vision:
                        terms["v"] = out["image"][:B]
                        terms["v_star"] = out["image"][B:] if out["image"].shape[0] > B else None
                    if config.precompute_anchors:
                        terms["t0"] = anchors_dev["pool_text"][s_idx.to(dev)]
                        terms["t0_star"] = anchors_dev["unsafe_text"][u_idx.to(dev)]
                        terms["t0_hat"] = anchors_dev["pool_text"][hat_idx.to(dev)]
                        if want_pairs:  # pool rows < n are the pairs' own safe captions
                            terms["t0_pair"] = anchors_dev["pool_text"][u_idx.to(dev)]
                        if anchors_dev["safe_image"] is not None:
                            terms["v0"] = anchors_dev["safe_image"][s_idx.to(dev)]
                            terms["v0_hat"] = anchors_dev["safe_image"][hat_idx.to(dev)]
                        if anchors_dev["unsafe_image"] is not None:
                            terms["v0_star"] = anchors_dev["unsafe_image"][u_idx.to(dev)]
                        h0 = None
                        if token_pres:
                            _, h0 = unwrapped.reference_text(ids[:B], mask[:B], output_tokens=True)
                    else:  # Safe-CLIP style: run the frozen reference now (same weights, adapters disabled)
                        ref_ids, ref_mask = _trim(
                            torch.cat([safe_ids[s_idx], unsafe_ids[u_idx], safe_ids[hat_idx], twin_ids]),
                            torch.cat([safe_mask[s_idx], unsafe_mask[u_idx], safe_mask[hat_idx], twin_mask]),
                        )
                        ref_text, ref_tokens = unwrapped.reference_text(ref_ids.to(dev), ref_mask.to(dev), output_tokens=token_pres)
                        terms["t0"], terms["t0_star"], terms["t0_hat"] = ref_text[:B], ref_text[B : 2 * B], ref_text[2 * B : 3 * B]
                        if want_pairs:
                            terms["t0_pair"] = ref_text[3 * B :]
                        h0 = ref_tokens[:B, : ids.shape[1]] if token_pres else None
                        if use_images:
                            ref_img = unwrapped.reference_image(pixels)
                            terms["v0"] = ref_img[:B]
                            terms["v0_star"] = ref_img[B:] if ref_img.shape[0] > B else None
                            hat_px = data_mod.load_pixels([train_set[int(i)].safe_image for i in hat_idx], image_processor,
                                                          config.image_root)
                            terms["v0_hat"] = unwrapped.reference_image(hat_px.to(dev))
                    if token_pres:
                        terms.update(h=out["tokens"][:B], h0=h0, token_mask=mask[:B].bool())
                    if config.token_redir_weight > 0:  # frozen token states of the targets, live (adapters disabled)
                        hat_ids, hat_mask = _trim(safe_ids[hat_idx], safe_mask[hat_idx])
                        hat_ids, hat_mask = hat_ids.to(dev), hat_mask.to(dev)
                        _, h0_hat = unwrapped.reference_text(hat_ids, hat_mask, output_tokens=True)
                        terms.update(h_star=out["tokens"][B : 2 * B], h0_hat=h0_hat, token_mask_star=_without_start(mask[B : 2 * B]),
                                     token_mask_hat=_without_start(hat_mask))  # fmt: skip
                    result = loss_fn(**terms)
                loss = result["loss"]
                finite = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
                if world > 1:
                    finite = accelerator.gather(finite).min().reshape(1)
                if finite.item() < 1:
                    last = latest_checkpoint(output_dir)
                    raise NonFiniteLossError(
                        f"The loss is {loss.item()} at step {global_step + 1} (epoch {epoch}); stopped without applying that "
                        f"step. Last good checkpoint: {last or 'none (no checkpoint yet)'}. Lower `--learning_rate`, use "
                        "`--mixed_precision bf16` instead of fp16, or check the data, then `--resume_from_checkpoint latest`."
                    )
                accelerator.backward(loss)
                if config.max_grad_norm > 0 and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
                active_terms = list(loss_fn.last_active_terms)
                loss_value = loss.item()
                losses.append(loss_value)
                progress.update(1)
                progress.set_postfix(loss=f"{loss_value:.4f}", epoch=epoch, lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
                if global_step % config.logging_steps == 0 or global_step == max_steps:
                    logs = {"loss": loss_value, "lr": lr_scheduler.get_last_lr()[0], "epoch": epoch}
                    logs.update({f"loss/{k}": float(v.detach()) for k, v in result.items() if k != "loss"})
                    accelerator.log(logs, step=global_step)
                    if log_file is not None:
                        log_file.write(json.dumps({"step": global_step, **logs}) + "\n")
                        log_file.flush()
                        os.fsync(log_file.fileno())
                if global_step % config.checkpointing_steps == 0:
                    checkpoint(global_step, epoch, step_in_epoch + 1)
                    last_saved = global_step
                if global_step >= max_steps:
                    break
            epoch, start = epoch + 1, 0
        if last_saved != global_step:
            checkpoint(global_step, epoch, 0)
    finally:
        progress.close()
        if log_file is not None:
            log_file.close()
        accelerator.end_training()

    # ---- 4. end-of-training metrics on held-out pairs
    metrics: dict[str, Any] = {}
    if config.eval_at_end:
        unwrapped.eval()

        def encode(captions, reference=False):
            embs = []
            for i in range(0, len(captions), config.anchor_batch_size):
                ids_, mask_ = _tokenize(tokenizer, captions[i : i + config.anchor_batch_size], config.max_length)
                with torch.no_grad(), accelerator.autocast():
                    if reference:
                        e, _ = unwrapped.reference_text(ids_.to(dev), mask_.to(dev))
                    else:
                        e = unwrapped(input_ids=ids_.to(dev), attention_mask=mask_.to(dev))["text"]
                embs.append(e.float().cpu())
            return torch.cat(embs)

        def encode_tokens(captions, reference=False):
            """Token states at `--token_layer`, mean-pooled over each caption's tokens without the start token, normalised."""
            embs = []
            for i in range(0, len(captions), config.anchor_batch_size):
                ids_, mask_ = _tokenize(tokenizer, captions[i : i + config.anchor_batch_size], config.max_length)
                ids_, mask_ = ids_.to(dev), mask_.to(dev)
                with torch.no_grad(), accelerator.autocast():
                    if reference:
                        _, h = unwrapped.reference_text(ids_, mask_, output_tokens=True)
                    else:
                        h = unwrapped(input_ids=ids_, attention_mask=mask_, output_tokens=True)["tokens"]
                m = _without_start(mask_).unsqueeze(-1).float()
                embs.append(torch.nn.functional.normalize((h.float() * m).sum(1) / m.sum(1), dim=-1).cpu())
            return torch.cat(embs)

        if config.finetune == "full" and unwrapped.frozen_copy is None:
            logger.info("Full fine-tuning without a frozen copy: end-of-training metrics are skipped (use finetune.evaluate).")
        else:
            # redirection of the trained pairs, and generalisation + preservation on held-out pairs
            for split, data in (("train", train_set), ("val", val_set)):
                if data is not None and len(data) > 1:
                    metrics[split] = text_metrics(encode, lambda c: encode(c, reference=True), data.safe_captions, data.unsafe_captions)
                    if want_tokens:  # the same metrics on what the UNet reads (docs/METHOD.md: token-level terms)
                        metrics[f"{split}_tokens"] = text_metrics(encode_tokens, lambda c: encode_tokens(c, reference=True),
                                                                  data.safe_captions, data.unsafe_captions)  # fmt: skip
            for split, m in metrics.items():
                logger.info("%s: redirect_to_target_r1 %.3f (frozen %.3f), t_star_to_t_r1 %.3f (frozen %.3f), safe_cos %.4f",
                            split, m["redirect_to_target_r1"], m["frozen"]["redirect_to_target_r1"], m["t_star_to_t_r1"],
                            m["frozen"]["t_star_to_t_r1"], m["safe_cos"])
    if inexact:
        metrics["inexact_resume"] = inexact
        logger.warning("This run resumed inexactly (not bit-exact): %s", "; ".join(f"{p['file']}: {p['consequence']}" for p in inexact))
    if metrics and main_process:
        atomic_write_text(output_dir / "metrics.json", json.dumps(metrics, indent=2))
    return TrainResult(output_dir, global_step, losses, latest_checkpoint(output_dir), metrics, active_terms, unwrapped, anchor_set,
                       tokenizer, inexact, config, dict(loss_fn.last_weights), extras)


def _main(argv: Sequence[str] | None) -> None:
    config = parse_train_config(argv)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    configure_logging(config.verbose and main_rank)  # other ranks log warnings only
    result = train(config)
    if main_rank:  # the result line
        print(json.dumps({"output_dir": os.fspath(result.output_dir), "global_step": result.global_step,
                          "last_checkpoint": os.fspath(result.last_checkpoint) if result.last_checkpoint else None}))  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``safer-clip-train``, ``python -m finetune.train``, ``accelerate launch -m finetune.train``).

    Returns the exit status: 0 success, 2 bad input (one line on stderr naming the option), 1 a runtime failure.
    In-process callers that want the :class:`TrainResult` call :func:`train` with a parsed config.
    """
    return run_main(lambda: _main(argv), prog=PROG)


if __name__ == "__main__":
    raise SystemExit(main())
