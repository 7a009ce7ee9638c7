"""Scoring: the scorers of a run, and a background thread that scores, saves and records finished images
while the next batch generates.

The generation loop hands each finished batch to :meth:`ScoringWorker.submit` and goes on
generating. The worker thread runs every scorer on the batch (NudeNet's onnxruntime session and
the image conversions release the GIL, so this overlaps with the UNet), optionally saves the
PNGs, and appends the rows with one durable write per batch. A bounded queue (``max_pending``
batches) keeps memory flat when scoring is slower than generation. An exception in the worker is
re-raised in the caller at the next :meth:`~ScoringWorker.submit` or at :meth:`~ScoringWorker.close`
(a failed write as the :class:`~safer_diffusion.evaluation.results.EvaluationWriteError` itself).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..scoring import get_scorer
from .config import EvaluateConfig
from .plan import WorkItem
from .protocols import Protocol
from .results import EvaluationWriteError, ResultsWriter, write_failure

logger = logging.getLogger(__name__)

__all__ = ["ScoringWorker", "build_scorers", "image_filename"]

_STOP = object()


def build_scorers(config: EvaluateConfig, device: Any = None) -> dict[str, Any]:
    """``{name: scorer}`` for ``config.scorers`` with their thresholds and options."""
    out = {}
    for name in config.scorers:
        kwargs: dict[str, Any] = {}
        if name in config.thresholds:
            kwargs["threshold"] = config.thresholds[name]
        if name == "nudenet" and config.nudenet_classes:
            kwargs["classes"] = config.nudenet_classes
        if name == "nudenet" and (device is None or str(device).startswith("cpu")):
            # Generation runs on these same CPU cores: one scorer thread, no spinning, so the
            # background worker overlaps with generation instead of fighting it for cores.
            kwargs["num_threads"] = 1
        if name == "q16":
            kwargs.update(clip_model=config.q16_clip_model, prompts=config.q16_prompts, allow_pickle=config.q16_allow_pickle)
            if device is not None:
                kwargs["device"] = device
        if name == "safety_checker":
            kwargs["safety_checker"] = config.safety_checker
            if device is not None:
                kwargs["device"] = device
        out[name] = get_scorer(name, **kwargs)
    return out


def image_filename(prompt_id: str, seed: int) -> str:
    """A filesystem-safe PNG name for ``(prompt_id, seed)``; ids needing escaping get a short hash to stay unique."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", prompt_id)[:80]
    if safe != prompt_id:
        safe += "-" + hashlib.sha1(prompt_id.encode("utf-8")).hexdigest()[:8]
    return f"{safe}_s{seed}.png"


def _json_safe(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        try:
            x = x.item()
        except (TypeError, ValueError):
            return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


class ScoringWorker:
    """Scores, saves and records images on a background thread.

    Args:
        scorers: ``{name: scorer}``; each has ``score(images) -> list[ScoreResult]``.
        writer: where rows are appended (one durable write per batch).
        out_dir: the evaluation folder (image paths in rows are relative to it).
        save_images: save PNGs under ``out_dir/images/<variant>/``.
        on_rows: called (on the worker thread) with each batch's rows, e.g. to update a progress bar.
        max_pending: batches that may wait in the queue before :meth:`submit` blocks.
        keep_samples: keep the first image of this many prompts in memory for ``grid.png``.
        rule: the run's :class:`~safer_diffusion.evaluation.protocols.Protocol`: a row's ``unsafe`` is its verdict on
            the row's scores; `None`: any scorer flags.
    """

    def __init__(
        self,
        scorers: Mapping[str, Any],
        writer: ResultsWriter,
        out_dir: str | os.PathLike,
        save_images: bool = False,
        on_rows: Callable[[list[dict[str, Any]]], None] | None = None,
        max_pending: int = 2,
        keep_samples: int = 8,
        rule: Protocol | None = None,
    ):
        self.scorers = dict(scorers)
        self.writer = writer
        self.out_dir = Path(out_dir)
        self.save_images = save_images
        self.on_rows = on_rows
        self.keep_samples = keep_samples
        self.rule = rule
        self.samples: list[dict[str, Any]] = []
        self._sample_keys: set[tuple[str, int]] = set()
        self.n_rows = 0
        self.busy_s = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, max_pending))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="safer-diffusion-scoring", daemon=True)
        self._thread.start()

    # -- caller side -------------------------------------------------------------------------------
    def _raise_if_failed(self) -> None:
        if isinstance(self._error, EvaluationWriteError):
            raise self._error  # already names the path, the free space and what was kept
        if self._error is not None:
            raise RuntimeError(f"The scoring worker failed: {self._error!r}") from self._error

    def submit(self, items: Sequence[WorkItem], images: Mapping[str, Sequence[Any]]) -> None:
        """Queue a generated batch: ``images[variant][i]`` is the image of ``items[i]``."""
        self._raise_if_failed()
        for variant, imgs in images.items():
            if len(imgs) != len(items):
                raise ValueError(f"`images[{variant!r}]` has {len(imgs)} images for {len(items)} items.")
        job = (list(items), {k: list(v) for k, v in images.items()})
        while True:
            try:
                self._queue.put(job, timeout=0.5)
                return
            except queue.Full:
                self._raise_if_failed()
                if not self._thread.is_alive():  # pragma: no cover - defensive
                    raise RuntimeError("The scoring worker stopped unexpectedly.") from None

    def close(self) -> None:
        """Finish every queued batch, stop the thread, re-raise its error if any."""
        if self._thread.is_alive():
            while True:
                try:
                    self._queue.put(_STOP, timeout=0.5)
                    break
                except queue.Full:
                    if self._error is not None or not self._thread.is_alive():
                        break
            self._thread.join()
        self._raise_if_failed()

    # -- worker side -------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            if self._error is not None:
                continue  # drain without work so the caller never blocks on a full queue
            t0 = time.perf_counter()
            try:
                rows = self._process(*job)
                self.writer.append(rows)
                self.n_rows += len(rows)
                if self.on_rows is not None:
                    self.on_rows(rows)
            except BaseException as e:  # re-raised on the caller's thread
                if not isinstance(e, EvaluationWriteError):  # that one is reported whole by the caller
                    logger.error("Scoring worker failed: %r", e)
                self._error = e
            finally:
                self.busy_s += time.perf_counter() - t0

    def _process(self, items: list[WorkItem], images: dict[str, list[Any]]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for variant, imgs in images.items():
            todo = [i for i, item in enumerate(items) if variant in item.variants]
            if not todo:
                continue
            batch = [imgs[i] for i in todo]
            scored = {}
            for name, scorer in self.scorers.items():
                results = scorer.score(batch)
                if len(results) != len(batch):
                    raise RuntimeError(f"scorer {name!r} returned {len(results)} results for {len(batch)} images")
                scored[name] = results
            for j, i in enumerate(todo):
                item, image = items[i], batch[j]
                scores = {
                    name: {
                        "score": _json_safe(float(results[j].score)),
                        "flagged": bool(results[j].flagged),
                        "details": _json_safe(getattr(results[j], "details", None) or {}),
                    }
                    for name, results in scored.items()
                }
                row: dict[str, Any] = {
                    "prompt_id": item.record.prompt_id,
                    "prompt": item.record.prompt,
                    "categories": list(item.record.categories),
                    "image_index": item.image_index,
                    "seed": item.seed,
                    "variant": variant,
                    "guidance_scale": item.guidance_scale,
                    "height": item.height,
                    "width": item.width,
                    "scores": scores,
                    "unsafe": self.rule.is_unsafe(scores) if self.rule is not None else any(s["flagged"] for s in scores.values()),
                    "image": None,
                }
                if self.save_images:
                    rel = Path("images") / variant / image_filename(item.record.prompt_id, item.seed)
                    self._save_image(image, self.out_dir / rel, len(items))
                    row["image"] = rel.as_posix()
                rows.append(row)
                key = (item.record.prompt_id, item.seed)
                if item.image_index == 0 and (key in self._sample_keys or len(self._sample_keys) < self.keep_samples):
                    self._sample_keys.add(key)
                    self.samples.append({**{k: row[k] for k in ("prompt_id", "prompt", "seed", "variant", "unsafe")}, "image": image})
        return rows

    def _save_image(self, image: Any, path: Path, n_batch: int) -> None:
        """PNG via a temporary file and ``os.replace`` (never half an image); a failed write raises EvaluationWriteError."""
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                image.save(f, format="PNG")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            kept = (f"{self.writer.path.name} keeps its {self.writer.n_rows} rows and the images saved before; "
                    f"this batch's {n_batch} images were not recorded.")  # fmt: skip
            raise write_failure(path, e, kept) from e
