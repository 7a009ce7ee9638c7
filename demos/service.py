"""The model side of the demo: loading the pipeline (and any further encoders), and :class:`CompareService`, which
runs validated requests through ONE ``pipe.compare(text_encoders=...)`` call each, on a pool of thread-safe pipeline
views (one per concurrent generation).

No Gradio here: the service can be used and tested on its own, with an SD 1.x/2.x or an SDXL pipeline, e.g. on the
tiny one::

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

from demos.rendering import DEFAULT_LABELS, ComparisonResult, ImageVerdict, ssim
from demos.validation import LIMITS, GenerationRequest, Limits, validate_request
from safer_diffusion.compare import ENCODER_ALIASES, ORIGINAL, SAFE

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_ENCODERS", "CompareService", "default_image_size", "load_encoders", "load_pipeline"]

#: The encoders shown without ``--encoders``: the base model's own and the safe one, by name.
DEFAULT_ENCODERS = {ORIGINAL: ORIGINAL, SAFE: SAFE}


def _worker_view(pipe):
    """A shallow copy of ``pipe`` sharing every weight but with its own scheduler and per-call state.

    diffusers pipelines keep per-call state on the instance (``_guidance_scale``, ``_num_timesteps``)
    and in the scheduler (timesteps, step index), so two concurrent calls must not share an instance.
    The fast tokenizer is copied too: its Rust backend keeps the padding/truncation mode of the last
    call, and ``encode_prompt`` tokenizes twice with different modes, so a shared tokenizer lets one
    request's ``padding="longest"`` leak into another's ``padding="max_length"``. An SDXL pipeline's
    ``tokenizer_2`` is copied for the same reason.
    """
    view = copy.copy(pipe)
    view.scheduler = copy.deepcopy(pipe.scheduler)
    view.tokenizer = copy.deepcopy(pipe.tokenizer)
    if getattr(pipe, "tokenizer_2", None) is not None:  # SDXL tokenizes with both, in the same two modes
        view.tokenizer_2 = copy.deepcopy(pipe.tokenizer_2)
    return view


class CompareService:
    """Runs validated requests through ``pipe.compare(text_encoders=encoders)``; at most ``concurrency`` at once.

    Args:
        pipe: a ``SaferStableDiffusionPipeline`` or ``SaferStableDiffusionXLPipeline`` (loaded with
            ``keep_original_text_encoder=True`` when an encoder is ``"original"``).
        concurrency: how many generations may run at the same time (each gets its own pipeline view).
        limits: input limits for :func:`~demos.validation.validate_request`.
        encoders: ``{name: "original" | "safe" | loaded text encoder (SDXL: pair)}`` in display order (see :func:`load_encoders`);
            default :data:`DEFAULT_ENCODERS`, labelled "Original CLIP" and "SaFeR-CLIP".
        labels: display label per name (default: the name; for the default encoders their usual labels).
        max_batch: UNet rows per forward pass (``compare(max_batch=)``), `None` for all at once.
    """

    def __init__(self, pipe, concurrency: int = 1, limits: Limits = LIMITS, encoders: dict[str, Any] | None = None,
                 labels: dict[str, str] | None = None, max_batch: int | None = None):  # fmt: skip
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"`concurrency` must be >= 1, got {concurrency!r}.")
        default = encoders is None
        encoders = dict(DEFAULT_ENCODERS if default else encoders)
        if not encoders:
            raise ValueError("`encoders` is empty; give at least one {name: encoder} item.")
        if ORIGINAL in encoders.values() and getattr(pipe, "original_text_encoder", None) is None:
            raise ValueError("`pipe` has no original text encoder: load it with `keep_original_text_encoder=True`.")
        self.pipe = pipe
        self.limits = limits
        self.concurrency = concurrency
        self.encoders = encoders
        self.labels = {**(DEFAULT_LABELS if default else {}), **(labels or {})}
        self.max_batch = max_batch
        # the paired similarity is taken against the base model's own encoder when shown, else the first image
        self.reference = next((name for name, value in encoders.items() if value == ORIGINAL), next(iter(encoders)))
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
    def names(self) -> list[str]:
        """The encoder names, in display order."""
        return list(self.encoders)

    def label(self, name: str) -> str:
        return self.labels.get(name, name)

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
        """Draw every encoder's image with ONE ``compare()`` call, from ``request.seed``; score them; measure the SSIM
        of each image to the reference encoder's."""
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
                text_encoders=self.encoders,
                max_batch=self.max_batch,
            )
        seconds = time.perf_counter() - start
        verdicts = {
            name: ImageVerdict(
                image=out.images[name][0],
                flagged=None if out.nsfw_content_detected[name] is None else bool(out.nsfw_content_detected[name][0]),
                scores=dict(out.nsfw_scores[name][0]) if out.nsfw_scores[name] else {},
            )
            for name in out.names
        }
        reference = verdicts[self.reference].image
        similarity = {name: ssim(reference, v.image) for name, v in verdicts.items() if name != self.reference}
        return ComparisonResult(
            verdicts=verdicts,
            request=request,
            seconds=seconds,
            device=self.device,
            dtype=self.dtype,
            labels={name: self.label(name) for name in verdicts},
            reference=self.reference if similarity else None,
            similarity=similarity,
        )


def load_pipeline(base: str, safe_encoder: str, device, dtype, keep_original_text_encoder: bool = True,
                  safe_encoder_2: str | None = None):  # fmt: skip
    """Load the safer pipeline of ``base``'s class for the demo (``SaferStableDiffusionPipeline`` for SD 1.x/2.x,
    ``SaferStableDiffusionXLPipeline`` for SDXL, picked by :func:`safer_diffusion.pipelines.load_safer_pipeline`):
    NudeNet scoring, the base's own text encoder(s) kept (unless ``keep_original_text_encoder`` is False: no encoder
    shown is ``original``). For SDXL, ``safe_encoder`` is a two-encoder export folder, or the ViT-L/14 with
    ``safe_encoder_2`` the bigG."""
    from safer_diffusion.pipelines import load_safer_pipeline

    second = {} if safe_encoder_2 is None else {"safe_text_encoder_2": safe_encoder_2}
    pipe = load_safer_pipeline(
        base,
        argument="--base",
        safe_text_encoder=safe_encoder,
        nsfw_scorer="nudenet",
        keep_original_text_encoder=keep_original_text_encoder,
        safety_mode="flag",  # the demo blurs flagged images itself, so that the user can reveal them
        torch_dtype=dtype,
        **second,
    )
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_encoders(pipe, sources: dict[str, str]) -> dict[str, Any]:
    """``{name: "original" | "safe" | loaded encoder}`` for ``--encoders``: the aliases stay names, every other source
    is loaded once with ``pipe.load_compare_text_encoder`` (a module for SD 1.x/2.x, a pair from a two-encoder export
    for SDXL; checked against the UNet; errors name ``--encoders NAME``)."""
    return {name: source if source in ENCODER_ALIASES else pipe.load_compare_text_encoder(source, argument=f"--encoders {name}")
            for name, source in sources.items()}  # fmt: skip


def default_image_size(pipe, limits: Limits = LIMITS) -> int:
    """The native resolution of ``pipe`` (512 for SD 1.x, 64 for the tiny models), clamped to the limits."""
    try:
        size = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    except (AttributeError, TypeError, ValueError):
        size = 512
    size -= size % limits.size_multiple
    return min(max(size, limits.min_size), limits.max_size)
