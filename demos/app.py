"""Gradio demo: Stable Diffusion with the original CLIP text encoder vs SaFeR-CLIP, side by side.

One ``SaferStableDiffusionPipeline.compare()`` call draws both images from the same seed and the
same UNet (the two prompt encodings are batched in one denoising loop); each image is scored by
NudeNet, and images flagged as NSFW are blurred until the user ticks "Reveal flagged images".

Run it::

    python demos/app.py                    # CompVis/stable-diffusion-v1-4 + Adeely93/SafeR_CLIP (use a GPU)
    python demos/app.py --tiny             # offline: tiny random models, images are noise
    python demos/app.py --base ./sd-v1-4 --safe-encoder ./safer-clip-export --port 7860
    python demos/app.py --tiny --smoke-test   # one generation through the UI handler, prints JSON, exits

This file is the thin UI layer only: all model logic lives in :mod:`safer_diffusion`.
The API endpoint ``/compare`` can be called with ``gradio_client``::

    from gradio_client import Client
    client = Client("http://127.0.0.1:7860/")
    original, safe, original_verdict, safe_verdict, timing, details = client.predict(
        "a watercolor fox in the snow", "", 0, 25, 7.5, 512, 512, False, api_name="/compare")
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import os
import queue
import random
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPTS_DIR = REPO_ROOT / "assets" / "prompts"

DEFAULT_BASE = "CompVis/stable-diffusion-v1-4"
DEFAULT_SAFE_ENCODER = "Adeely93/SafeR_CLIP"
DEFAULT_PORT = 7860  # Gradio's default; without --port the first free port from here on is used
PORT_SCAN = 100  # how many ports to try from DEFAULT_PORT when --port is not given
DTYPES = ("auto", "float32", "float16", "bfloat16")
SMOKE_TEST_STEPS = 2  # --smoke-test checks that everything runs, not image quality
MAX_SEED = 2**32 - 1  # torch.Generator.manual_seed accepts 64-bit seeds; 32 bits keep the UI readable

ORIGINAL_LABEL = "Original CLIP"
SAFE_LABEL = "SaFeR-CLIP"

# Shown when assets/prompts/*.csv are not there (the evaluation prompt lists are optional here).
BUILTIN_EXAMPLES = {
    "benign": [
        "a watercolor painting of a fox in the snow",
        "a cozy reading nook with a cat, warm afternoon light",
        "a lighthouse on a cliff at sunset, oil painting",
        "an astronaut riding a horse on the moon",
    ],
    "mild_unsafe": [
        "a woman in a bikini lying on the beach",
        "a shirtless man flexing at the gym",
        "a bloody knife on a kitchen table",
        "a sensual portrait of a couple in bed",
    ],
}
EXAMPLE_LABELS = {"benign": "Benign prompts", "mild_unsafe": "Mildly unsafe prompts"}
EXAMPLES_PER_LIST = 6


# --------------------------------------------------------------------------------------------
# Input validation (pure: no Gradio, no model)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """Input limits of the demo. Sizes are in pixels."""

    max_prompt_chars: int = 1000  # checked before tokenizing, so huge pastes are cheap to reject
    max_prompt_tokens: int = 77  # CLIP's context, start and end tokens included (overridden by the tokenizer's)
    min_steps: int = 1
    max_steps: int = 100
    min_guidance: float = 0.0
    max_guidance: float = 30.0
    min_size: int = 64
    max_size: int = 1024
    size_multiple: int = 8  # the VAE downsamples by 8


LIMITS = Limits()


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request: what :meth:`CompareService.run` passes to ``pipe.compare()``."""

    prompt: str
    negative_prompt: str | None
    seed: int
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int


def _as_int(name: str, value: Any, fix: str) -> int:
    if isinstance(value, bool) or value is None:
        raise ValueError(f"`{name}` must be a whole number, got {value!r}. {fix}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"`{name}` must be a whole number, got {value!r}. {fix}") from None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a whole number, got {value!r}. {fix}") from None
    if number != number or number in (float("inf"), float("-inf")) or number != int(number):
        raise ValueError(f"`{name}` must be a whole number, got {value!r}. {fix}")
    return int(number)


def _check_text(name: str, text: Any, tokenizer, limits: Limits, required: bool) -> str | None:
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise ValueError(f"`{name}` must be text, got {type(text).__name__}.")
    text = text.strip()
    if not text:
        if required:
            raise ValueError(f"`{name}` is empty: type what the images should show.")
        return None
    if len(text) > limits.max_prompt_chars:
        raise ValueError(
            f"`{name}` is {len(text)} characters long; the limit is {limits.max_prompt_chars}. Shorten it."
        )
    if tokenizer is not None:
        max_tokens = min(limits.max_prompt_tokens, getattr(tokenizer, "model_max_length", limits.max_prompt_tokens))
        n_tokens = len(tokenizer(text, truncation=False).input_ids)
        if n_tokens > max_tokens:
            raise ValueError(
                f"`{name}` is {n_tokens} tokens long; the CLIP text encoder reads at most {max_tokens} "
                "(start and end tokens included) and would silently cut the rest. Shorten it."
            )
    return text


def validate_request(
    prompt: Any,
    negative_prompt: Any = "",
    seed: Any = 0,
    steps: Any = 25,
    guidance: Any = 7.5,
    width: Any = 512,
    height: Any = 512,
    *,
    tokenizer=None,
    limits: Limits = LIMITS,
) -> GenerationRequest:
    """Check the demo's inputs and return them as a :class:`GenerationRequest`.

    Args:
        prompt: what to draw; required, at most ``limits.max_prompt_chars`` characters and
            ``limits.max_prompt_tokens`` CLIP tokens (when ``tokenizer`` is given).
        negative_prompt: optional; same limits as ``prompt``. Empty means none.
        seed: whole number in ``[0, 2**32 - 1]``.
        steps: number of denoising steps, whole, in ``[limits.min_steps, limits.max_steps]``.
        guidance: classifier-free guidance scale in ``[limits.min_guidance, limits.max_guidance]``.
        width, height: pixels, multiples of ``limits.size_multiple`` in ``[limits.min_size, limits.max_size]``.
        tokenizer: the pipeline's CLIP tokenizer, used to count prompt tokens.
        limits: the limits to apply.

    Returns:
        `GenerationRequest` with stripped prompts (an empty negative prompt becomes ``None``).

    Raises:
        ValueError: naming the argument, the value received and how to fix it.
    """
    prompt = _check_text("prompt", prompt, tokenizer, limits, required=True)
    negative_prompt = _check_text("negative_prompt", negative_prompt, tokenizer, limits, required=False)

    seed = _as_int("seed", seed, f"Use a number between 0 and {MAX_SEED}, or press 'Random seed'.")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"`seed` must be between 0 and {MAX_SEED}, got {seed}.")

    steps_fix = f"Use {limits.min_steps} to {limits.max_steps} steps."
    steps = _as_int("steps", steps, steps_fix)
    if not limits.min_steps <= steps <= limits.max_steps:
        raise ValueError(f"`steps` must be between {limits.min_steps} and {limits.max_steps}, got {steps}. {steps_fix}")

    try:
        guidance = float(guidance)
    except (TypeError, ValueError):
        raise ValueError(f"`guidance` must be a number, got {guidance!r}.") from None
    if not limits.min_guidance <= guidance <= limits.max_guidance:  # also rejects NaN
        raise ValueError(
            f"`guidance` must be between {limits.min_guidance:g} and {limits.max_guidance:g}, got {guidance:g}. "
            "7.5 is the usual Stable Diffusion value; values <= 1 turn classifier-free guidance off."
        )

    sizes = {}
    for name, value in (("width", width), ("height", height)):
        fix = f"Use a multiple of {limits.size_multiple} between {limits.min_size} and {limits.max_size}."
        size = _as_int(name, value, fix)
        if size % limits.size_multiple:
            raise ValueError(f"`{name}` must be a multiple of {limits.size_multiple}, got {size}. {fix}")
        if not limits.min_size <= size <= limits.max_size:
            raise ValueError(f"`{name}` must be between {limits.min_size} and {limits.max_size}, got {size}. {fix}")
        sizes[name] = size

    return GenerationRequest(
        prompt=prompt,
        negative_prompt=negative_prompt,
        seed=seed,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=sizes["height"],
        width=sizes["width"],
    )


# --------------------------------------------------------------------------------------------
# Presentation helpers (pure)
# --------------------------------------------------------------------------------------------


def obscure(image, pixels: int = 12):
    """Return a copy of ``image`` that hides its content: pixelated to ``pixels`` blocks a side, then blurred.

    Args:
        image: a `PIL.Image.Image`.
        pixels: blocks along the longer side before upscaling (fewer = more hidden).
    """
    from PIL import Image, ImageFilter

    if pixels < 1:
        raise ValueError(f"`pixels` must be >= 1, got {pixels}.")
    width, height = image.size
    scale = pixels / max(width, height)
    small = image.convert("RGB").resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BILINEAR)
    return small.resize((width, height), Image.Resampling.BILINEAR).filter(ImageFilter.GaussianBlur(radius=max(width, height) / 40))


@dataclass
class ImageVerdict:
    """One image of a comparison with its NSFW verdict."""

    image: Any  # PIL.Image.Image, never obscured
    flagged: bool | None  # None when no scorer ran
    scores: dict[str, float] = field(default_factory=dict)  # flat: {"nudenet": 0.8, "nudenet/<class>": 0.8}


@dataclass
class ComparisonResult:
    """What one ``compare()`` call produced, ready to render."""

    original: ImageVerdict
    safe: ImageVerdict
    request: GenerationRequest
    seconds: float
    device: str
    dtype: str

    def details(self, revealed: bool) -> dict[str, Any]:
        """JSON-ready summary: request, verdicts, scores, timing (no images)."""
        out: dict[str, Any] = {"request": asdict(self.request), "seconds": round(self.seconds, 4),
                               "device": self.device, "dtype": self.dtype}
        for key, verdict in (("original", self.original), ("safe", self.safe)):
            out[key] = {
                "flagged": verdict.flagged,
                "scores": {k: round(float(v), 4) for k, v in scorer_scores(verdict.scores).items()},
                "score_details": {k: round(float(v), 4) for k, v in verdict.scores.items() if "/" in k},
                "blurred": bool(verdict.flagged) and not revealed,
            }
        return out


def scorer_scores(scores: dict[str, float]) -> dict[str, float]:
    """The per-scorer scores of a pipeline's flat score dict (``{"nudenet": 0.8, "nudenet/<class>": 0.8, ...}``)."""
    return {name: value for name, value in scores.items() if "/" not in name}


def shown_image(verdict: ImageVerdict, reveal: bool):
    """The image to send to the browser: obscured when flagged, unless ``reveal``."""
    return obscure(verdict.image) if verdict.flagged and not reveal else verdict.image


def verdict_markdown(label: str, verdict: ImageVerdict, reveal: bool) -> str:
    """A one-paragraph verdict for the image under ``label``."""
    scores = ", ".join(f"{name} {value:.2f}" for name, value in sorted(scorer_scores(verdict.scores).items())) or "no scores"
    if verdict.flagged is None:
        head = f"**{label}: not scored**"
    elif verdict.flagged:
        head = f"**{label}: ⚠ flagged NSFW**"
    else:
        head = f"**{label}: ✓ safe**"
    tail = ""
    if verdict.flagged and not reveal:
        tail = ' · blurred (tick "Reveal flagged images" to show it)'
    elif verdict.flagged:
        tail = " · revealed"
    return f"{head} · scores: {scores}{tail}"


def timing_markdown(result: ComparisonResult) -> str:
    """The timing line under the images."""
    req = result.request
    return (
        f"Time: {result.seconds:.2f} s for both images (one `compare()` call: one UNet, both prompt encodings batched, "
        f"NSFW scoring included) · {req.num_inference_steps} steps · guidance {req.guidance_scale:g} · "
        f"{req.width}×{req.height} · seed {req.seed} · {result.device} {result.dtype}"
    )


def load_examples(prompts_dir: Path = PROMPTS_DIR, per_list: int = EXAMPLES_PER_LIST) -> dict[str, list[str]]:
    """Example prompts: the first ``per_list`` rows (column ``prompt``) of ``benign.csv`` and
    ``mild_unsafe.csv`` in ``prompts_dir``, or built-in examples for a file that is absent or unreadable."""
    examples = {}
    for name, builtin in BUILTIN_EXAMPLES.items():
        path = Path(prompts_dir) / f"{name}.csv"
        prompts: list[str] = []
        if path.is_file():
            try:
                with path.open(newline="", encoding="utf-8") as handle:
                    for row in csv.DictReader(handle):
                        text = (row.get("prompt") or "").strip()
                        if text and len(text) <= LIMITS.max_prompt_chars:
                            prompts.append(text)
                        if len(prompts) >= per_list:
                            break
            except (OSError, csv.Error, UnicodeDecodeError) as err:
                logger.warning("Could not read example prompts from %s (%s); using built-in examples.", path, err)
                prompts = []
        examples[name] = prompts or list(builtin[:per_list])
    return examples


# --------------------------------------------------------------------------------------------
# Model side: a pool of pipeline views and the compare service
# --------------------------------------------------------------------------------------------


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
        limits: input limits for :func:`validate_request`.
    """

    def __init__(self, pipe, concurrency: int = 1, limits: Limits = LIMITS):
        if concurrency < 1:
            raise ValueError(f"`concurrency` must be >= 1, got {concurrency}.")
        if getattr(pipe, "original_text_encoder", None) is None:
            raise ValueError("`pipe` has no original text encoder: load it with `keep_original_text_encoder=True`.")
        self.pipe = pipe
        self.limits = limits
        self.concurrency = concurrency
        self._views: queue.Queue = queue.Queue()
        for i in range(concurrency):
            self._views.put(pipe if i == 0 else _worker_view(pipe))

    @property
    def tokenizer(self):
        return getattr(self.pipe, "tokenizer", None)

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
        """:func:`validate_request` with this pipeline's tokenizer and limits."""
        return validate_request(*args, tokenizer=self.tokenizer, limits=self.limits, **kwargs)

    def run(self, request: GenerationRequest) -> ComparisonResult:
        """Draw both images with ONE ``compare()`` call, from ``request.seed``."""
        import torch

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


# --------------------------------------------------------------------------------------------
# Gradio UI
# --------------------------------------------------------------------------------------------

CSS = """
#tiny-banner { background: #fff4ce; border: 1px solid #e0b400; border-radius: 8px; padding: 8px 14px; color: #4a3b00; }
#tiny-banner * { color: #4a3b00 !important; }
.verdict { min-height: 2.5em; }
#original-image img, #safe-image img { width: 100%; height: 100%; object-fit: contain; }
.tiny-pixels img { image-rendering: pixelated; }  /* 64 x 64 tiny-model images, scaled up */
"""

HOW_IT_WORKS = """
**How it works.** Stable Diffusion sees your prompt only through its CLIP text encoder.
SaFeR-CLIP is that encoder fine-tuned so that unsafe prompts land on their *nearest safe*
meaning, while safe prompts stay where the original encoder put them. Both images here come from
the **same UNet, VAE, seed and settings** in one `compare()` call; only the text encoder differs.
Each image is then scored by NudeNet; flagged images are blurred until you tick
*Reveal flagged images*. The scorer is an automatic classifier: it can miss things and flag
harmless images.
"""


def _tiny_banner() -> str:
    return (
        "⚠ **Tiny mode (`--tiny`)**: both images come from tiny models with **random weights**, built offline. "
        "They show noise-like patterns, not real pictures; the verdicts only show that scoring runs. "
        f"Run without `--tiny` (with a GPU) to use `{DEFAULT_BASE}` and `{DEFAULT_SAFE_ENCODER}`."
    )


def make_handlers(service: CompareService):
    """The Gradio callbacks, as plain functions (usable without a browser).

    Returns:
        `(generate, rerender)`: ``generate(prompt, negative_prompt, seed, steps, guidance, width, height, reveal)``
        returns ``(original_image, safe_image, original_verdict, safe_verdict, timing, details, result)``;
        ``rerender(result, reveal)`` returns ``(original_image, safe_image, original_verdict, safe_verdict, details)``.
    """
    import gradio as gr

    def render(result: ComparisonResult, reveal: bool):
        reveal = bool(reveal)
        return (
            shown_image(result.original, reveal),
            shown_image(result.safe, reveal),
            verdict_markdown(ORIGINAL_LABEL, result.original, reveal),
            verdict_markdown(SAFE_LABEL, result.safe, reveal),
            result.details(revealed=reveal),
        )

    def generate(prompt, negative_prompt, seed, steps, guidance, width, height, reveal=False):
        try:
            request = service.validate(prompt, negative_prompt, seed, steps, guidance, width, height)
        except ValueError as err:
            raise gr.Error(str(err), title="Invalid input", print_exception=False) from None
        try:
            result = service.run(request)
        except Exception as err:  # show model failures (e.g. out of memory) in the UI, keep the traceback in the log
            logger.exception("compare() failed for %s", request)
            raise gr.Error(f"Generation failed: {type(err).__name__}: {err}", title="Generation failed") from None
        original, safe, original_verdict, safe_verdict, details = render(result, reveal)
        return original, safe, original_verdict, safe_verdict, timing_markdown(result), details, result

    def rerender(result: ComparisonResult | None, reveal: bool):
        if result is None:
            return (gr.skip(),) * 5
        return render(result, reveal)

    return generate, rerender


def build_demo(service: CompareService, *, tiny: bool = False, examples: dict[str, list[str]] | None = None,
               default_size: int = 512, default_steps: int = 25, max_concurrency: int = 1):
    """Build the Gradio Blocks app around ``service`` (not launched, not queued).

    Args:
        service: the :class:`CompareService` to call.
        tiny: show the random-weights banner.
        examples: example prompts by list name (see :func:`load_examples`).
        default_size: initial width and height.
        default_steps: initial number of steps.
        max_concurrency: how many Generate clicks run at once; the rest wait in the queue.
    """
    import gradio as gr

    limits = service.limits
    examples = load_examples() if examples is None else examples
    generate, rerender = make_handlers(service)

    with gr.Blocks(title="SaFeR-CLIP: original vs safe text encoder") as demo:
        gr.Markdown(
            "# SaFeR-CLIP for Stable Diffusion\n"
            "The same prompt, seed and UNet, drawn with the **original CLIP** text encoder and with the "
            "**SaFeR-CLIP** text encoder, side by side."
        )
        if tiny:
            gr.Markdown(_tiny_banner(), elem_id="tiny-banner")
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                prompt = gr.Textbox(label="Prompt", lines=2, max_lines=6, placeholder="a watercolor painting of a fox in the snow",
                                    elem_id="prompt", max_length=limits.max_prompt_chars)
                negative_prompt = gr.Textbox(label="Negative prompt (optional)", lines=1, max_lines=4,
                                             elem_id="negative-prompt", max_length=limits.max_prompt_chars)
                with gr.Row(equal_height=True):
                    seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, maximum=MAX_SEED, elem_id="seed", scale=3)
                    random_seed = gr.Button("Random seed", elem_id="random-seed", scale=1, size="sm")
                steps = gr.Slider(limits.min_steps, limits.max_steps, value=default_steps, step=1, label="Steps", elem_id="steps")
                guidance = gr.Slider(limits.min_guidance, limits.max_guidance, value=7.5, step=0.5, label="Guidance scale",
                                     elem_id="guidance")
                with gr.Row():
                    width = gr.Slider(limits.min_size, limits.max_size, value=default_size, step=limits.size_multiple,
                                      label="Width", elem_id="width")
                    height = gr.Slider(limits.min_size, limits.max_size, value=default_size, step=limits.size_multiple,
                                       label="Height", elem_id="height")
                generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                reveal = gr.Checkbox(label="Reveal flagged images", value=False, elem_id="reveal")
            with gr.Column(scale=2):
                with gr.Row():
                    with gr.Column():
                        original_image = gr.Image(label=ORIGINAL_LABEL, type="pil", format="png", interactive=False, height=360,
                                                  elem_id="original-image", elem_classes="tiny-pixels" if tiny else None, buttons=["download", "fullscreen"])
                        original_verdict = gr.Markdown(elem_id="original-verdict", elem_classes="verdict")
                    with gr.Column():
                        safe_image = gr.Image(label=SAFE_LABEL, type="pil", format="png", interactive=False, height=360,
                                              elem_id="safe-image", elem_classes="tiny-pixels" if tiny else None, buttons=["download", "fullscreen"])
                        safe_verdict = gr.Markdown(elem_id="safe-verdict", elem_classes="verdict")
                timing = gr.Markdown(elem_id="timing")
                with gr.Accordion("Details (JSON)", open=False):
                    details = gr.JSON(label="Details", elem_id="details")
        for name, prompts in examples.items():
            if prompts:
                gr.Examples(examples=[[p] for p in prompts], inputs=[prompt], label=EXAMPLE_LABELS.get(name, name),
                            examples_per_page=len(prompts))
        with gr.Accordion("How it works", open=False):
            gr.Markdown(HOW_IT_WORKS)
        result_state = gr.State(None, time_to_live=3600)  # the unblurred images stay on the server

        inputs = [prompt, negative_prompt, seed, steps, guidance, width, height, reveal]
        outputs = [original_image, safe_image, original_verdict, safe_verdict, timing, details, result_state]
        event_kwargs = dict(api_name="compare", concurrency_limit=max_concurrency, concurrency_id="compare",
                            preprocess=False)  # raw values: validate_request names the bad field (Gradio's bound errors do not)
        generate_button.click(generate, inputs, outputs, **event_kwargs)
        prompt.submit(generate, inputs, outputs, api_visibility="private",
                      **{**event_kwargs, "api_name": "compare_on_submit"})
        reveal.change(rerender, [result_state, reveal], [original_image, safe_image, original_verdict, safe_verdict, details],
                      api_visibility="private", queue=False)
        random_seed.click(lambda: random.randint(0, MAX_SEED), None, seed, api_visibility="private", queue=False)
    return demo


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


class StartupError(RuntimeError):
    """A problem found before the server starts (port in use, models unavailable)."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python demos/app.py",
        description="Gradio demo: Stable Diffusion with the original CLIP text encoder vs SaFeR-CLIP, side by side.",
    )
    parser.add_argument("--base", default=None,
                        help=f"Stable Diffusion pipeline: hub id or local folder (default: {DEFAULT_BASE}).")
    parser.add_argument("--safe-encoder", default=None,
                        help=f"SaFeR-CLIP encoder: hub id, local CLIP folder or `finetune.export` folder (default: {DEFAULT_SAFE_ENCODER}).")
    parser.add_argument("--tiny", action="store_true",
                        help="Use tiny random models built offline (images are noise; for trying the app without a GPU or network).")
    parser.add_argument("--host", default="127.0.0.1", help="Address to serve on (default: 127.0.0.1; 0.0.0.0 exposes it on the network).")
    parser.add_argument("--port", type=int, default=None,
                        help=f"Port to serve on (default: the first free port from {DEFAULT_PORT}). A given port that is in use is an error.")
    parser.add_argument("--share", action="store_true", help="Also create a public gradio.live link (off by default).")
    parser.add_argument("--device", default="auto", help="torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="Weights dtype: auto (float16 on CUDA, float32 otherwise), float32, float16, bfloat16.")
    parser.add_argument("--max-concurrency", type=int, default=1,
                        help="Generations that run at once (default: 1); further requests wait in the queue.")
    parser.add_argument("--queue-size", type=int, default=64, help="Requests that may wait in the queue (default: 64).")
    parser.add_argument("--smoke-test", action="store_true",
                        help=f"Build the app, run one comparison ({SMOKE_TEST_STEPS} steps) through the UI handler, print a JSON line "
                             "and exit (no server).")
    args = parser.parse_args(argv)
    if args.tiny and (args.base is not None or args.safe_encoder is not None):
        parser.error("--tiny builds its own models: do not combine it with --base or --safe-encoder.")
    if args.port is not None and not 1 <= args.port <= 65535:
        parser.error(f"--port must be between 1 and 65535, got {args.port}.")
    if args.max_concurrency < 1:
        parser.error(f"--max-concurrency must be >= 1, got {args.max_concurrency}.")
    if args.queue_size < 1:
        parser.error(f"--queue-size must be >= 1, got {args.queue_size}.")
    return args


def port_is_free(host: str, port: int) -> bool:
    """True when a server could listen on ``(host, port)`` now (same socket options as uvicorn)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise StartupError(f"--host {host!r} cannot be resolved: {err}.") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError:
            return False
    return True


def choose_port(host: str, port: int | None) -> int:
    """The port to serve on: ``port`` if free (else :class:`StartupError`), or the first free one from 7860."""
    if port is not None:
        if not port_is_free(host, port):
            raise StartupError(
                f"--port {port} is already in use on {host}. Stop the program using it, pass another --port, "
                "or leave --port out to use the first free port."
            )
        return port
    start = int(os.environ.get("GRADIO_SERVER_PORT", DEFAULT_PORT))
    for candidate in range(start, start + PORT_SCAN):
        if port_is_free(host, candidate):
            return candidate
    raise StartupError(f"No free port in {start}-{start + PORT_SCAN - 1} on {host}; pass a free one with --port.")


def resolve_device_dtype(device: str, dtype: str):
    """``(torch.device, torch.dtype)`` for the ``--device`` and ``--dtype`` flags."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch_device = torch.device(device)
    except RuntimeError as err:
        raise StartupError(f"--device {device!r} is not a torch device ({err}). Use auto, cpu, cuda or cuda:N.") from None
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise StartupError(f"--device {device} was asked for, but CUDA is not available here. Use --device cpu.")
    if dtype == "auto":
        dtype = "float16" if torch_device.type == "cuda" else "float32"
    if dtype == "float16" and torch_device.type == "cpu":
        raise StartupError("--dtype float16 is not supported on the CPU. Use --dtype float32 or bfloat16 there.")
    return torch_device, getattr(torch, dtype)


def resolve_sources(args: argparse.Namespace) -> tuple[str, str]:
    """``(base, safe_encoder)`` as loadable sources, or :class:`StartupError` naming ``--tiny`` and local paths."""
    if args.tiny:
        from safer_diffusion.tiny import tiny_pipeline_folders

        base, safe = tiny_pipeline_folders()
        return str(base), str(safe)
    from safer_diffusion.hub import HubUnavailableError, resolve_model_source

    base = args.base if args.base is not None else DEFAULT_BASE
    safe = args.safe_encoder if args.safe_encoder is not None else DEFAULT_SAFE_ENCODER
    try:
        return resolve_model_source(base, "--base"), resolve_model_source(safe, "--safe-encoder")
    except (HubUnavailableError, FileNotFoundError) as err:
        raise StartupError(
            f"Cannot load the models: {err}\n"
            "To run the demo anyway:\n"
            "  * offline, on tiny random models:  python demos/app.py --tiny\n"
            "  * on local copies:                 python demos/app.py --base /path/to/stable-diffusion-v1-4 "
            "--safe-encoder /path/to/safer-clip\n"
            f"  * with network access, the defaults ({DEFAULT_BASE}, {DEFAULT_SAFE_ENCODER}) are downloaded once."
        ) from None


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


def default_image_size(pipe) -> int:
    """The native resolution of ``pipe`` (512 for SD 1.x, 64 for the tiny models), clamped to the limits."""
    try:
        size = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    except (AttributeError, TypeError, ValueError):
        size = 512
    size -= size % LIMITS.size_multiple
    return min(max(size, LIMITS.min_size), LIMITS.max_size)


def smoke_test(demo_service: CompareService, examples: dict[str, list[str]], size: int) -> dict[str, Any]:
    """Run one comparison through the same handler the Generate button calls; return the details."""
    generate, rerender = make_handlers(demo_service)
    prompt = (examples.get("benign") or BUILTIN_EXAMPLES["benign"])[0]
    original, safe, _, _, _, details, result = generate(prompt, "", 0, SMOKE_TEST_STEPS, 7.5, size, size, False)
    rerender(result, True)
    return {"ok": True, "prompt": prompt, "original_size": list(original.size), "safe_size": list(safe.size), **details}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        port = None if args.smoke_test else choose_port(args.host, args.port)  # before the (slow) model loading
        device, dtype = resolve_device_dtype(args.device, args.dtype)
        base, safe_encoder = resolve_sources(args)
    except StartupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    logger.info("Loading %s with safe text encoder %s on %s (%s)", base, safe_encoder, device, dtype)
    try:
        pipe = load_pipeline(base, safe_encoder, device, dtype)
    except (OSError, ValueError) as err:  # not a pipeline / encoder folder, incomplete download, ...
        print(f"error: could not load the models from --base {base} and --safe-encoder {safe_encoder}: {err}\n"
              "Pass a Stable Diffusion pipeline folder (model_index.json) as --base and a CLIP or `finetune.export` "
              "folder as --safe-encoder, or use --tiny for offline tiny random models.", file=sys.stderr)
        return 2
    service = CompareService(pipe, concurrency=args.max_concurrency)
    examples = load_examples()
    size = default_image_size(pipe)

    demo = build_demo(service, tiny=args.tiny, examples=examples, default_size=size,
                      default_steps=4 if args.tiny else 25, max_concurrency=args.max_concurrency)
    if args.smoke_test:
        summary = smoke_test(service, examples, size)
        print(json.dumps(summary, sort_keys=True), flush=True)
        return 0
    demo.queue(max_size=args.queue_size, default_concurrency_limit=args.max_concurrency)
    demo.launch(server_name=args.host, server_port=port, share=args.share, show_error=True, css=CSS,
                footer_links=["api", "gradio"])
    return 0


if __name__ == "__main__":
    if str(REPO_ROOT) not in sys.path:  # `python demos/app.py` from a checkout that is not pip-installed
        sys.path.insert(0, str(REPO_ROOT))
    sys.exit(main())
