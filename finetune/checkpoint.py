"""The training checkpoint format: names, finding, resolving, atomic saving, verified loading, the merged model.

A run folder (``--output_dir``) holds ``checkpoint-{step}/`` folders::

    checkpoint-{step}/
        trainable.safetensors      only the trained weights (LoRA matrices or the unfrozen tower), keyed as in CLIPModel
        optimizer.bin              Adam state           } written by ``accelerate``'s ``save_state`` with
        scheduler.bin              learning-rate state  } ``torch.save``; read back here with
        random_states_{rank}.pkl   RNG state per rank   } ``torch.load(weights_only=True)`` (see below)
        scaler.pt                  fp16 loss scaler (``--mixed_precision fp16`` only)
        training_state.json        written last: step, epoch, data position, run fingerprint, resolved config

A folder is *complete* when ``training_state.json`` exists. A checkpoint is built in
``.tmp-checkpoint-{step}/``, every file is fsynced, then the folder is renamed into place
(:func:`save_checkpoint`), so a crash or a full disk never leaves a half-written ``checkpoint-{step}``;
leftovers of a crashed run are removed on the next start (:func:`remove_stale_temp`).

Pickle. accelerate writes the optimizer, scheduler and RNG states with ``torch.save`` (a pickle). They are
the only pickles this project reads, only from a complete checkpoint folder this trainer wrote, and only
through :func:`_load_state_file`: ``torch.load(..., weights_only=True)``, torch's restricted unpickler
(tensors, containers, numbers, and the numpy RNG arrays accelerate allow-lists), never a plain unpickle.

Resume (:func:`load_training_state`) checks every state file before anything is restored: a missing or
unreadable RNG, optimizer, scheduler or scaler state stops with :class:`ResumeError` naming the file,
unless ``--allow_inexact_resume`` is given; then training continues without it and the problem is
returned (the trainer logs it and records it in ``metrics.json`` and in later checkpoints).

The checkpoint's base model is not stored: :func:`merged_clip_from_checkpoint` reloads it from its source
in fp32 and merges the trained weights (the export path, docs/EXPORT_FORMAT.md).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

from safer_diffusion.fileio import atomic_write_text, fsync_dir

from .config import TrainConfig
from .modeling import SaferCLIP, load_clip

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "CHECKPOINT_STATE",
    "CheckpointWriteError",
    "ResumeError",
    "TRAINABLE_WEIGHTS",
    "checkpoint_name",
    "find_checkpoints",
    "is_checkpoint_or_run",
    "latest_checkpoint",
    "load_training_state",
    "merged_clip_from_checkpoint",
    "read_training_state",
    "remove_stale_temp",
    "resolve_checkpoint",
    "resolve_resume_path",
    "save_checkpoint",
]

#: Marks a checkpoint folder complete; written last.
CHECKPOINT_STATE = "training_state.json"
#: The trained weights (safetensors).
TRAINABLE_WEIGHTS = "trainable.safetensors"
#: Version of :data:`CHECKPOINT_STATE`'s layout.
CHECKPOINT_FORMAT_VERSION = 1
#: accelerate's file names (``save_state``).
OPTIMIZER_FILE = "optimizer.bin"
SCHEDULER_FILE = "scheduler.bin"
SCALER_FILE = "scaler.pt"
RNG_FILE = "random_states_{rank}.pkl"

_PREFIX = "checkpoint-"
_TMP_PREFIX = ".tmp-checkpoint-"
_OLD_PREFIX = ".old-checkpoint-"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_RNG_KEYS = ("random_state", "numpy_random_seed", "torch_manual_seed")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permissions); the partial folder was removed.

    The message names the folder, the free space on its disk and the last good checkpoint that was kept;
    ``errno`` is the cause's (``ENOSPC`` for a full disk, ``EIO`` when torch reported it as a RuntimeError) and
    ``path`` the temporary folder that was being written.
    """

    path: str = ""


class ResumeError(RuntimeError):
    """A checkpoint cannot be resumed exactly (an unreadable or missing state file); the message names the file and the fix."""


# --------------------------------------------------------------------------- names and lookup
def checkpoint_name(step: int) -> str:
    """``checkpoint-{step}``."""
    return f"{_PREFIX}{int(step)}"


def find_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete ``checkpoint-{step}`` folders of ``output_dir``, oldest first (temp and incomplete folders are ignored)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CKPT_RE.match(p.name)) and (p / CHECKPOINT_STATE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of ``output_dir``, or None."""
    found = find_checkpoints(output_dir)
    return found[-1] if found else None


def resolve_resume_path(resume: str | None, output_dir: str | os.PathLike) -> Path | None:
    """Turn ``--resume_from_checkpoint`` into a checkpoint folder (None: start fresh).

    ``latest`` is the newest complete checkpoint of ``output_dir`` (none yet: a fresh start); a name or path
    must exist (also looked up inside ``output_dir``) and be complete.

    Raises:
        FileNotFoundError: a named checkpoint that does not exist.
        ValueError: a named folder that is not a complete checkpoint.
    """
    if resume is None:
        return None
    if resume == "latest":
        path = latest_checkpoint(output_dir)
        if path is None:
            logger.info("`--resume_from_checkpoint latest`: no checkpoint in %s yet, starting a fresh run.", output_dir)
        return path
    for candidate in (Path(resume).expanduser(), Path(output_dir) / resume):
        if candidate.is_dir():
            if not (candidate / CHECKPOINT_STATE).is_file():
                raise ValueError(
                    f"`--resume_from_checkpoint`={resume!r} is not a complete checkpoint (no {CHECKPOINT_STATE}); "
                    f"complete ones in {output_dir}: {[p.name for p in find_checkpoints(output_dir)]}."
                )
            return candidate
    raise FileNotFoundError(
        f"`--resume_from_checkpoint`={resume!r} does not exist (also looked in {os.fspath(output_dir)!r}). Pass an existing "
        f"checkpoint folder, or `latest` (available: {[p.name for p in find_checkpoints(output_dir)] or 'none'})."
    )


def resolve_checkpoint(path: str | os.PathLike, argument: str = "--checkpoint") -> Path:
    """A ``checkpoint-{step}`` folder as is, or a run folder -> its newest complete checkpoint.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` holds no complete checkpoint.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"`{argument}` {os.fspath(path)!r} does not exist; pass a run folder or a checkpoint-{{step}} folder.")
    if (p / CHECKPOINT_STATE).is_file():
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise ValueError(f"`{argument}` {os.fspath(path)!r} holds no complete checkpoint-{{step}} folder (with {CHECKPOINT_STATE}).")
    return latest


def is_checkpoint_or_run(path: str | os.PathLike) -> bool:
    """True for a checkpoint folder or a run folder with at least one complete checkpoint."""
    p = Path(path).expanduser()
    return p.is_dir() and ((p / CHECKPOINT_STATE).is_file() or latest_checkpoint(p) is not None)


def read_training_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's :data:`CHECKPOINT_STATE` as a dict.

    Raises:
        ValueError: the file is not valid JSON or has a newer format version.
    """
    path = Path(checkpoint) / CHECKPOINT_STATE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{os.fspath(path)!r} is not valid JSON ({e}); resume from another checkpoint.") from None
    if not isinstance(state, dict) or int(state.get("format_version", 1)) > CHECKPOINT_FORMAT_VERSION:
        raise ValueError(f"{os.fspath(path)!r} is not a checkpoint state this version reads (format_version "
                         f"{state.get('format_version') if isinstance(state, dict) else '?'}); upgrade safer-diffusion.")
    return state


# --------------------------------------------------------------------------- writing
def _free_space(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "unknown free space"
    return f"{free / 2**30:.2f} GiB free" if free >= 2**30 else f"{free / 2**20:.1f} MiB free"


def _fsync_files(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _write_error(error: BaseException, step: int, tmp: Path, output_dir: Path) -> CheckpointWriteError:
    if isinstance(error, OSError) and error.strerror:
        reason = error.strerror
    else:  # torch.save reports a full disk as RuntimeError("... unexpected pos ..."): say what it means
        reason = f"a write failed inside {type(error).__name__} (on a full disk torch reports this as a position mismatch)"
    last = latest_checkpoint(output_dir)
    kept = f"the last good checkpoint {os.fspath(last)!r} is kept" if last else "no earlier checkpoint exists"
    err = CheckpointWriteError(
        f"Could not write {checkpoint_name(step)} in {os.fspath(output_dir)!r}: {reason} (writing {os.fspath(tmp)!r}; "
        f"{_free_space(output_dir)} on that disk). The partial folder was removed; {kept}. Free disk space or fix the "
        "folder's permissions, then rerun with `--resume_from_checkpoint latest`."
    )
    err.errno = error.errno if isinstance(error, OSError) and error.errno else errno.EIO  # str(err) stays the message
    err.path = os.fspath(tmp)
    return err


def save_checkpoint(accelerator, output_dir: str | os.PathLike, step: int, state: dict[str, Any],
                    total_limit: int | None = None) -> Path:
    """Write ``checkpoint-{step}`` atomically: ``accelerator.save_state`` into ``.tmp-checkpoint-{step}/``, fsync,
    :data:`CHECKPOINT_STATE` last, then rename. Called on every rank (each writes its RNG state).

    Args:
        accelerator: the run's ``accelerate.Accelerator`` (its save hook writes :data:`TRAINABLE_WEIGHTS`).
        output_dir: the run folder.
        step: the global step.
        state: the JSON content of :data:`CHECKPOINT_STATE` (``format_version`` and ``global_step`` are set here).
        total_limit: keep at most this many checkpoints (oldest removed first).

    Raises:
        CheckpointWriteError: any failure while writing (disk full, permissions); the temp folder is removed.
    """
    output_dir = Path(output_dir)
    final = output_dir / checkpoint_name(step)
    tmp = output_dir / f"{_TMP_PREFIX}{step}"
    main = accelerator.is_main_process
    accelerator.wait_for_everyone()
    try:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()  # every rank has written its RNG state before the folder is published
        if main:
            _fsync_files(tmp)
            atomic_write_text(tmp / CHECKPOINT_STATE, json.dumps({**state, "format_version": CHECKPOINT_FORMAT_VERSION,
                                                                  "global_step": step}, indent=2))  # fmt: skip
            fsync_dir(tmp)
            if final.exists():
                old = output_dir / f"{_OLD_PREFIX}{step}"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, final)
            fsync_dir(output_dir)
    except Exception as e:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.debug("checkpoint write failure", exc_info=True)
        raise _write_error(e, step, tmp, output_dir) from e
    except BaseException:  # KeyboardInterrupt: no half-written folder either
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    if main and total_limit is not None:
        for old in find_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    logger.info("Saved %s", final)
    return final


def remove_stale_temp(output_dir: str | os.PathLike) -> list[Path]:
    """Remove what an interrupted run left in ``output_dir``: ``.tmp-checkpoint-*/`` and ``.old-checkpoint-*/`` folders,
    atomic-write temp files (``.*.tmp``), write probes (``.write-test-*``), and half-written entries of the run's own
    anchor cache (``cache/.*``). Each removal is logged. Returns the removed paths."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    candidates = [p for p in root.iterdir() if p.name.startswith((_TMP_PREFIX, _OLD_PREFIX, ".write-test-"))
                  or (p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file())]  # fmt: skip
    cache = root / "cache"
    if cache.is_dir():
        candidates += [p for p in cache.iterdir() if p.is_file() and p.name.startswith(".")]
    removed = []
    for path in sorted(candidates):
        try:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        except OSError as e:
            logger.warning("Could not remove %s left by an interrupted run (%s).", path, e.strerror or e)
            continue
        logger.warning("Removed %s, left by an interrupted earlier run.", path)
        removed.append(path)
    return removed


# --------------------------------------------------------------------------- reading
def _load_state_file(path: Path) -> Any:
    """Read one of accelerate's ``torch.save`` state files with torch's restricted unpickler (``weights_only=True``).

    This is the project's only pickle load (see the module docstring); ``accelerate.utils.load`` adds the numpy
    RNG types to the allow-list.
    """
    from accelerate.utils import load

    return load(path, map_location="cpu", weights_only=True)


def _set_rng(states: dict[str, Any], use_cuda: bool) -> None:
    import random

    import numpy as np
    import torch

    random.setstate(states["random_state"])
    np.random.set_state(states["numpy_random_seed"])
    torch.set_rng_state(states["torch_manual_seed"])
    if use_cuda and "torch_cuda_manual_seed" in states:
        torch.cuda.set_rng_state_all(states["torch_cuda_manual_seed"])


def load_training_state(accelerator, model: SaferCLIP, optimizer, lr_scheduler, checkpoint: str | os.PathLike, *,
                        global_step: int, allow_inexact: bool = False) -> list[dict[str, str]]:
    """Restore a checkpoint's trained weights, optimizer, scheduler, loss scaler and this rank's RNG state.

    Every state file (all ranks' RNG states included) is read and checked first, on every rank alike, so all ranks
    reach the same verdict. Any missing or unreadable file stops the resume with :class:`ResumeError`, unless
    ``allow_inexact``: then that part starts fresh (Adam moments at zero, the schedule fast-forwarded to
    ``global_step``, a new RNG stream), and the problem is returned for the run's record.

    Args:
        accelerator: the run's accelerator (its process index and count, its loss scaler).
        model: the unwrapped :class:`~finetune.modeling.SaferCLIP`.
        optimizer, lr_scheduler: as returned by ``accelerator.prepare``.
        checkpoint: the checkpoint folder.
        global_step: the checkpoint's step (to fast-forward a schedule whose state is unreadable).
        allow_inexact: ``--allow_inexact_resume``.

    Returns:
        One ``{"checkpoint", "file", "problem", "consequence"}`` dict per tolerated problem (empty: an exact resume).

    Raises:
        ResumeError: an unreadable trained-weights file (always), or any unreadable state without ``allow_inexact``.
        ValueError: the trained weights do not match the model built from the current options.
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    ckpt = Path(checkpoint)
    problems: list[dict[str, str]] = []

    def check(name: str, consequence: str, validate=None) -> Any:
        """The loaded file, or None after recording why not (raises instead without ``allow_inexact``)."""
        path = ckpt / name
        what, value = None, None
        try:
            if not path.is_file():
                what = "is missing"
            else:
                value = _load_state_file(path)
                if validate is not None:
                    what = validate(value)
        except Exception as e:  # noqa: BLE001 - any failure to read a state file is the same problem for the user
            logger.debug("reading %s failed", path, exc_info=True)
            what = f"is unreadable or corrupt ({type(e).__name__})"
        if what is None:
            return value
        if not allow_inexact:
            raise ResumeError(
                f"Cannot resume exactly from {os.fspath(ckpt)!r}: {name} {what}. Resume from an earlier checkpoint "
                f"(`--resume_from_checkpoint checkpoint-N`; complete: {[p.name for p in find_checkpoints(ckpt.parent)]}), "
                f"or pass `--allow_inexact_resume` to continue with {consequence} (recorded in metrics.json)."
            )
        logger.warning("Inexact resume from %s: %s %s; continuing with %s (--allow_inexact_resume).", ckpt, name, what, consequence)
        problems.append({"checkpoint": os.fspath(ckpt), "file": name, "problem": what, "consequence": consequence})
        return None

    def rng_keys(states: Any) -> str | None:
        if not isinstance(states, dict) or any(k not in states for k in _RNG_KEYS):
            return f"is not an RNG state (needs {', '.join(_RNG_KEYS)})"
        if torch.cuda.is_available() and accelerator.device.type == "cuda" and "torch_cuda_manual_seed" not in states:
            return "has no CUDA RNG state (written on a machine without a GPU)"
        return None

    # 1. check everything, identically on every rank
    try:
        weights = load_file(str(ckpt / TRAINABLE_WEIGHTS))
    except (OSError, SafetensorError) as e:
        raise ResumeError(f"Cannot resume from {os.fspath(ckpt)!r}: {TRAINABLE_WEIGHTS} is unreadable ({e}). Resume from an "
                          "earlier checkpoint (`--resume_from_checkpoint checkpoint-N`).") from None
    expected = set(model.trainable_state_dict())
    if set(weights) != expected:
        raise ValueError(
            f"Checkpoint {os.fspath(ckpt)!r} does not match this model: {len(expected - set(weights))} trainable weights missing, "
            f"{len(set(weights) - expected)} unexpected. Resume with the same --finetune/--train_towers/--lora_* options."
        )
    optimizer_state = check(OPTIMIZER_FILE, "fresh Adam moments (not bit-exact)")
    scheduler_state = check(SCHEDULER_FILE, f"the learning-rate schedule fast-forwarded to step {global_step}")
    scaler = getattr(accelerator, "scaler", None)
    scaler_state = check(SCALER_FILE, "a fresh fp16 loss scale") if scaler is not None else None
    rng = [check(RNG_FILE.format(rank=r), "a fresh random stream (dropout masks differ from an uninterrupted run)", rng_keys)
           for r in range(accelerator.num_processes)]

    # 2. restore
    model.clip.load_state_dict(weights, strict=False)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    if scheduler_state is not None:
        lr_scheduler.load_state_dict(scheduler_state)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
            for _ in range(global_step):
                lr_scheduler.step()
    if scaler_state is not None:
        scaler.load_state_dict(scaler_state)
    own = rng[accelerator.process_index]
    if own is not None:
        _set_rng(own, use_cuda=accelerator.device.type == "cuda")
    return problems


def merged_clip_from_checkpoint(path: str | os.PathLike, attention: str = "sdpa", argument: str = "--checkpoint"):
    """Rebuild the trained CLIP from a checkpoint: the fp32 base reloaded from its source + the trained weights, LoRA merged.

    Args:
        path: a ``checkpoint-{step}`` folder or a run folder (its newest checkpoint).
        attention: attention kernel of the rebuilt model (``xformers`` falls back to ``sdpa``).
        argument: the user-facing option that named ``path``, for error messages.

    Returns:
        ``(clip_model, tokenizer, image_processor, config, training_state)``.
    """
    from safetensors.torch import load_file

    ckpt = resolve_checkpoint(path, argument)
    state = read_training_state(ckpt)
    config = TrainConfig.from_dict(state["config"], source=str(ckpt / CHECKPOINT_STATE))
    loaded = load_clip(config.model_name_or_path, attention=attention if attention != "xformers" else "sdpa")
    wrapper = SaferCLIP(
        loaded.model, train_towers=config.train_towers, finetune=config.finetune, lora_rank=config.lora_rank,
        lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, lora_target_modules=config.lora_target_modules,
    )
    weights = load_file(str(ckpt / TRAINABLE_WEIGHTS))
    expected = set(wrapper.trainable_state_dict())
    if set(weights) != expected:
        raise ValueError(f"{ckpt / TRAINABLE_WEIGHTS} does not match the model rebuilt from its config "
                         f"({len(expected - set(weights))} missing, {len(set(weights) - expected)} unexpected weights).")
    wrapper.clip.load_state_dict(weights, strict=False)
    clip = wrapper.merged_clip()
    clip.requires_grad_(False)
    return clip, loaded.tokenizer, loaded.image_processor, config, state
