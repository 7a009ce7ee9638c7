"""The model side of the demo: loading the pipeline, and :class:`CompareService`, which runs validated requests
through ``pipe.compare()`` on a pool of thread-safe pipeline views (one per concurrent generation).

No Gradio here: the service can be used and tested on its own, e.g. on the tiny pipeline::

    from safer_diffusion.tiny import tiny_pipeline_folders
    base, safe = tiny_pipeline_folders()
    service = CompareService(load_pipeline(str(base), str(safe), "cpu", torch.float32))
    result = service.run(service.validate("a red bicycle", steps=2, width=64, height=64))
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from demos.rendering import ComparisonResult, ImageVerdict
from demos.validation import LIMITS, GenerationRequest, Limits, validate_request

logger = logging.getLogger(__name__)

__all__ = ["CompareService", "default_image_size", "load_pipeline"]


def _worker_view(pipe):
    """A shallow copy of ``pipe`` sharing every weight but with its own scheduler and per-call state.

    diffusers pipelines keep per-call state on the instance (``_guidance_scale``, ``_num_timesteps``)
    and in the scheduler (timesteps, step index), so two concurrent calls must not share an instance.
    The fast tokenizer is copied too: its Rust backend keeps the padding/truncation mode of the last
    call, and ``encode_prompt`` tokenizes twice with different modes, so a shared tokenizer lets one
    request's ``padding="longest"`` leak into another's ``padding="max_length"``.
    """
    view = copy.copy(pipe)
    view.scheduler = copy.deepcopy(pipe.scheduler)
    view.tokenizer = copy.deepcopy(pipe.tokenizer)
    return view


class CompareService:
    """Runs validated requests through ``pipe.compare()``; at most ``concurrency`` at once.

    Args:
        pipe: a ``SaferStableDiffusionPipeline`` loaded with ``keep_original_text_encoder=True``.
        concurrency: how many generations may run at the same time (each gets its own pipeline view).
        limits: input limits for :func:`~demos.validation.validate_request`.
    """

    def __init__(self, pipe, concurrency: int = 1, limits: Limits = LIMITS):
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"`concurrency` must be >= 1, got {concurrency!r}.")
        if getattr(pipe, "original_text_encoder", None) is None:
            raise ValueError("`pipe` has no original text encoder: load it with `keep_original_text_encoder=True`.")
        self.pipe = pipe
        self.limits = limits
        self.concurrency = concurrency
        self._views: queue.Queue = queue.Queue()
        for i in range(concurrency):
            self._views.put(pipe if i == 0 else _worker_view(pipe))
        # Validation counts tokens while generations run: it gets its own tokenizer (the views' tokenizers
        # change mode on every call), used by one request at a time.
        tokenizer = getattr(pipe, "tokenizer", None)
        self._validation_tokenizer = copy.deepcopy(tokenizer) if tokenizer is not None else None
        self._validation_lock = threading.Lock()

    @property
    def tokenizer(self):
        """The tokenizer :meth:`validate` counts prompt tokens with (never one a generation is using)."""
        return self._validation_tokenizer

    @property
    def device(self) -> str:
        return str(getattr(self.pipe, "device", "cpu"))

    @property
    def dtype(self) -> str:
        return str(getattr(self.pipe, "dtype", "")).replace("torch.", "")

    @contextmanager
    def _view(self) -> Iterator[Any]:
        view = self._views.get()
        try:
            yield view
        finally:
            self._views.put(view)

    def validate(self, *args, **kwargs) -> GenerationRequest:
        """:func:`~demos.validation.validate_request` with this pipeline's tokenizer and limits."""
        with self._validation_lock:
            return validate_request(*args, tokenizer=self._validation_tokenizer, limits=self.limits, **kwargs)

    def run(self, request: GenerationRequest) -> ComparisonResult:
        """Draw both images with ONE ``compare()`` call, from ``request.seed``."""
        import torch

        if not isinstance(request, GenerationRequest):
            raise TypeError(f"`request` must be a GenerationRequest (from `validate`), got {type(request).__name__}.")
        generator = torch.Generator(device="cpu").manual_seed(request.seed)  # CPU: same seed, same image on any device
        start = time.perf_counter()
        with self._view() as pipe:
            out = pipe.compare(
                request.prompt,
                negative_prompt=request.negative_prompt,
                height=request.height,
                width=request.width,
                num_inference_steps=request.num_inference_steps,
                guidance_scale=request.guidance_scale,
                num_images_per_prompt=1,
                generator=generator,
                output_type="pil",
                score=True,
            )
        seconds = time.perf_counter() - start

        def verdict(images, detected, scores) -> ImageVerdict:
            return ImageVerdict(
                image=images[0],
                flagged=None if detected is None else bool(detected[0]),
                scores=dict(scores[0]) if scores else {},
            )

        return ComparisonResult(
            original=verdict(out.original_images, out.original_nsfw_content_detected, out.original_nsfw_scores),
            safe=verdict(out.safe_images, out.safe_nsfw_content_detected, out.safe_nsfw_scores),
            request=request,
            seconds=seconds,
            device=self.device,
            dtype=self.dtype,
        )


def load_pipeline(base: str, safe_encoder: str, device, dtype):
    """Load ``SaferStableDiffusionPipeline`` for the demo: NudeNet scoring, both text encoders kept."""
    from safer_diffusion import SaferStableDiffusionPipeline

    pipe = SaferStableDiffusionPipeline.from_pretrained(
        base,
        safe_text_encoder=safe_encoder,
        nsfw_scorer="nudenet",
        keep_original_text_encoder=True,
        safety_mode="flag",  # the demo blurs flagged images itself, so that the user can reveal them
        torch_dtype=dtype,
    )
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def default_image_size(pipe, limits: Limits = LIMITS) -> int:
    """The native resolution of ``pipe`` (512 for SD 1.x, 64 for the tiny models), clamped to the limits."""
    try:
        size = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    except (AttributeError, TypeError, ValueError):
        size = 512
    size -= size % limits.size_multiple
    return min(max(size, limits.min_size), limits.max_size)
