"""The Gradio app of the demo: Stable Diffusion (1.x/2.x or SDXL) with the original CLIP text encoder(s) vs SaFeR-CLIP (or any N encoders), side by side.

This file holds the Blocks layout, its event wiring and the command line (``main``). The rest lives beside it:
:mod:`demos.validation` checks every input, :mod:`demos.service` loads the pipeline and runs requests on a pool of
thread-safe pipeline views, :mod:`demos.rendering` decides what is shown (verdicts, blur, text). All model logic is
in :mod:`safer_diffusion`.

One ``compare()`` call of the safer pipeline draws every image from the same seed and the same UNet; each image is
scored by NudeNet, and a flagged image leaves the server blurred unless ``reveal`` is ``True``. Under each image but
the reference (the base model's own encoder, else the first) is its SSIM to the reference image. The pipeline class
follows ``--base`` (:func:`safer_diffusion.pipelines.load_safer_pipeline`): ``SaferStableDiffusionPipeline`` for SD
1.x/2.x, ``SaferStableDiffusionXLPipeline`` for SDXL, whose safe encoder is a *pair* (a two-encoder export folder as
``--safe_encoder``, or the ViT-L/14 as ``--safe_encoder`` and the bigG as ``--safe_encoder_2``).

Run it::

    python demos/app.py                    # CompVis/stable-diffusion-v1-4 + Adeely93/SafeR_CLIP (use a GPU)
    python demos/app.py --tiny             # offline: tiny random models, images are noise
    python demos/app.py --base ./sd-v1-4 --safe_encoder ./safer-clip-export --port 7860
    python demos/app.py --tiny --smoke_test   # one generation through the UI handler, prints JSON, exits
    python demos/app.py --tiny --tiny_variant sdxl --smoke_test   # the same on a tiny SDXL base and safe pair
    python demos/app.py --base stabilityai/stable-diffusion-xl-base-1.0 --safe_encoder ./safer-clip-sdxl-export
    python demos/app.py --encoders original=original safer-clip=safe safe-clip=aimagelab/safeclip_vit-l_14 mine=./export

``--encoders NAME=SOURCE ...`` (optional) lists the encoders shown, in order: SOURCE ``original`` is the base model's
own encoder, ``safe`` the ``--safe_encoder``, anything else a folder, ``.safetensors`` file or hub id (each loaded
once at startup and checked against the base model's width; for SDXL a two-encoder export folder). Without it the
demo shows ``original`` and ``safe``.

The only API endpoint is ``/compare`` (the Generate button, Enter in the prompt box and the Reveal checkbox all
call it; the other buttons run in the browser only)::

    from gradio_client import Client
    client = Client("http://127.0.0.1:7860/")
    original, safe, original_verdict, safe_verdict, timing, details = client.predict(
        "a watercolor fox in the snow", "", 0, 25, 7.5, 512, 512, False, api_name="/compare")

``reveal`` (the last argument) must be a boolean: ``"false"``, ``0`` or ``None`` are refused with an error.

With ``--encoders`` (N encoders), ``/compare`` takes the same eight inputs and returns ``2 * N + 2`` values: the N
images in ``--encoders`` order, their N verdicts in the same order, the timing line and the details; the details
list the names (``details["encoders"]``) and hold each one's ``flagged``, ``scores``, ``score_details``,
``blurred`` and ``ssim_to_reference`` under ``details["verdicts"][NAME]``. Without ``--encoders``, N = 2 and the
six values above are unchanged (``details`` also keeps its ``"original"`` and ``"safe"`` blocks). Over raw HTTP
(``/gradio_api/call/compare``) one more value follows, always ``null``: the session state, which stays on the
server. For N = 3::

    a, b, c, a_verdict, b_verdict, c_verdict, timing, details = client.predict(
        "a watercolor fox in the snow", "", 0, 25, 7.5, 512, 512, False, api_name="/compare")
    details["encoders"], details["verdicts"]["c"]["ssim_to_reference"]
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python demos/app.py`: make this checkout importable (demos.*, safer_diffusion)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from demos.rendering import BUILTIN_EXAMPLES, EXAMPLE_LABELS, ComparisonResult, load_examples, render, timing_markdown  # noqa: E402
from demos.service import CompareService, default_image_size, load_encoders, load_pipeline  # noqa: E402
from demos.validation import MAX_SEED, check_reveal  # noqa: E402
from safer_diffusion.compare import ENCODER_ALIASES, ORIGINAL, SAFE  # noqa: E402
from safer_diffusion.options import (  # noqa: E402
    DEFAULT_BASE_MODEL,
    DEFAULT_SAFE_ENCODER,
    BadInputError,
    configure_logging,
    device_option,
    dtype_option,
    option,
    parse_config,
    resolve_device_and_dtype,
    run_main,
)
from safer_diffusion.tiny import TINY_VARIANTS, tiny_variant_option  # noqa: E402

logger = logging.getLogger(__name__)

PROG = "demos/app.py"
DEFAULT_PORT = 7860  # Gradio's default; without --port the first free port from here on is used
PORT_SCAN = 100  # how many ports to try from DEFAULT_PORT when --port is not given
SMOKE_TEST_STEPS = 2  # --smoke_test checks that everything runs, not image quality
RANDOM_SEED_SPAN = 2**32  # the Random seed button draws from [0, 2**32): short seeds are easy to read and retype
DELETE_CACHE = (600, 3600)  # every 10 min, delete generated files older than 1 h (all of them when the server stops)
STATE_TTL_S = 3600  # the unblurred images of a session stay on the server at most this long
MAX_UPLOAD_BYTES = 0  # the app has no file inputs: /gradio_api/upload refuses any non-empty file (413)
MAX_ENCODERS = 6  # images side by side: more do not fit a screen, and each adds a UNet batch per step
ENCODER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.+-]{0,39}")  # shown as a label: short and plain


def parse_encoders(items: Sequence[str]) -> dict[str, str]:
    """``--encoders NAME=SOURCE ...`` as an ordered ``{name: source}`` (``BadInputError`` naming the item otherwise)."""
    encoders: dict[str, str] = {}
    for item in items:
        name, sep, source = item.partition("=")
        name, source = name.strip(), source.strip()
        if not sep or not name or not source:
            raise BadInputError(f"`--encoders` item {item!r} is not NAME=SOURCE; e.g. `--encoders original=original "
                                "safer-clip=safe mine=./my-export`.")  # fmt: skip
        if not ENCODER_NAME.fullmatch(name):
            raise BadInputError(f"`--encoders` name {name!r} must be 1-40 letters, digits, spaces or _ . + - (starting with "
                                "a letter or digit); it labels the image.")  # fmt: skip
        if name in encoders:
            raise BadInputError(f"`--encoders` names {name!r} twice; give each encoder one name.")
        encoders[name] = source
    if len(encoders) > MAX_ENCODERS:
        raise BadInputError(f"`--encoders` lists {len(encoders)} encoders; the demo shows at most {MAX_ENCODERS} side by side.")
    if encoders and all(source == ORIGINAL for source in encoders.values()):
        raise BadInputError("`--encoders` lists only `original`; add a safe encoder (NAME=safe or NAME=FOLDER).")
    return encoders


@dataclass
class DemoConfig:
    """Options of ``python demos/app.py`` (``--snake_case``; ``--kebab-case`` is accepted too)."""

    base: str | None = option(None, "Stable Diffusion 1.x/2.x or SDXL pipeline: hub id or local folder; its model_index.json "
                                    f"picks the pipeline class (default: {DEFAULT_BASE_MODEL}).", group="models")  # fmt: skip
    safe_encoder: str | None = option(
        None, f"SaFeR-CLIP text encoder: hub id, CLIP folder or `finetune.export` folder (default: {DEFAULT_SAFE_ENCODER}). "
              "For an SDXL `--base`: a two-encoder export folder (text_encoder/ and text_encoder_2/, docs/EXPORT_FORMAT.md "
              "section 8), or the ViT-L/14 with `--safe_encoder_2`.", group="models")  # fmt: skip
    safe_encoder_2: str | None = option(None, "SDXL only: the safe text_encoder_2 (OpenCLIP ViT-bigG/14 with projection) on its "
                                              "own, beside a ViT-L/14 `--safe_encoder`.", group="models")  # fmt: skip
    tiny: bool = option(False, "Use tiny random models built offline (images are noise; for trying the app without a GPU "
                               "or network). Cannot be combined with --base, --safe_encoder or --safe_encoder_2.",
                        group="models")  # fmt: skip
    tiny_variant: str | None = tiny_variant_option(group="models")
    device: str = device_option(group="models")
    dtype: str = dtype_option(help="Weights dtype: auto = float16 on CUDA, float32 otherwise (float16 is refused on the CPU).",
                              group="models")  # fmt: skip
    host: str = option("127.0.0.1", "Address to serve on; 0.0.0.0 exposes the UI and the /compare API to your network.",
                       group="server")  # fmt: skip
    port: int | None = option(None, f"Port to serve on (default: the first free port from {DEFAULT_PORT}). "
                                    "A given port that is in use is an error.", bounds=(1, 65535), group="server")  # fmt: skip
    share: bool = option(False, "Also create a public gradio.live link.", group="server")
    max_concurrency: int = option(1, "Generations that run at once; further requests wait in the queue.", bounds=(1, 64),
                                  group="server")  # fmt: skip
    queue_size: int = option(64, "Requests that may wait in the queue; more are refused.", bounds=(1, 10_000), group="server")
    analytics: bool = option(False, "Allow Gradio's usage analytics (off unless given).", group="server")
    encoders: list[str] = option(
        [], "Encoders shown side by side, in order, as NAME=SOURCE: SOURCE `original` (the base model's own), `safe` "
            f"(--safe_encoder) or a folder, .safetensors file or hub id; at most {MAX_ENCODERS}. Default: original and safe.",
        metavar="NAME=SOURCE", group="models")  # fmt: skip
    max_batch: int | None = option(None, "UNet rows per forward pass in compare() (default: all 2 x encoders rows at once; "
                                         "lower it for many encoders on a small GPU).", bounds=(1, None), group="models")  # fmt: skip
    smoke_test: bool = option(False, f"Build the app, run one comparison ({SMOKE_TEST_STEPS} steps) through the UI handler, "
                                     "print a JSON line and exit (no server).")  # fmt: skip
    verbose: bool = option(False, "Log INFO messages (model loading, requests).")

    def validate(self) -> None:
        if self.tiny and (self.base is not None or self.safe_encoder is not None or self.safe_encoder_2 is not None):
            raise BadInputError("`--tiny` builds its own models: do not combine it with `--base` or `--safe_encoder` (or "
                                "`--safe_encoder_2`).")  # fmt: skip
        if self.tiny_variant is not None and not self.tiny:
            raise BadInputError(f"`--tiny_variant` {self.tiny_variant} picks the tiny models of `--tiny`; add `--tiny`, or drop "
                                "`--tiny_variant`.")  # fmt: skip
        for name in ("base", "safe_encoder", "safe_encoder_2"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise BadInputError(f"`--{name}` is empty; pass a hub id or a folder, or leave it out for the default.")
        if not self.host.strip():
            raise BadInputError("`--host` is empty; use 127.0.0.1 (this machine only) or 0.0.0.0 (your network).")
        encoders = parse_encoders(self.encoders)
        for name in ("safe_encoder", "safe_encoder_2"):
            if encoders and getattr(self, name) is not None and SAFE not in encoders.values():
                raise BadInputError(f"`--{name}` is given but no `--encoders` item is NAME=safe, so it would not be shown; "
                                    f"add one (e.g. `safer-clip=safe`) or drop `--{name}`.")  # fmt: skip


def parse_args(argv: Sequence[str] | None = None) -> DemoConfig:
    """The validated :class:`DemoConfig` of ``argv`` (``BadInputError`` or argparse's ``SystemExit(2)`` otherwise)."""
    return parse_config(DemoConfig, argv, prog=PROG, description=__doc__.splitlines()[0])


# --------------------------------------------------------------------------------------------
# Gradio UI
# --------------------------------------------------------------------------------------------

CSS = """
#tiny-banner { background: #fff4ce; border: 1px solid #e0b400; border-radius: 8px; padding: 8px 14px; color: #4a3b00; }
#tiny-banner * { color: #4a3b00 !important; }
.verdict { min-height: 2.5em; }
.compare-image img { width: 100%; height: 100%; object-fit: contain; }
.tiny-pixels img { image-rendering: pixelated; }  /* 64 x 64 tiny-model images, scaled up */
"""

HOW_IT_WORKS = """
**How it works.** Stable Diffusion sees your prompt only through its CLIP text encoder.
SaFeR-CLIP is that encoder fine-tuned so that unsafe prompts land on their *nearest safe*
meaning, while safe prompts stay where the original encoder put them. All images here come from
the **same UNet, VAE, seed and settings** in one `compare()` call; only the text encoder differs.
Each image is then scored by NudeNet; flagged images are blurred until you tick
*Reveal flagged images*. The scorer is an automatic classifier: it can miss things and flag
harmless images. The SSIM under an image (1 = identical) measures how close it stays to the
reference image (the original encoder's) drawn from the same seed: how much the encoder changed it.
"""


def _tiny_banner() -> str:
    return (
        "⚠ **Tiny mode (`--tiny`)**: both images come from tiny models with **random weights**, built offline. "
        "They show noise-like patterns, not real pictures; the verdicts only show that scoring runs. "
        f"Run without `--tiny` (with a GPU) to use `{DEFAULT_BASE_MODEL}` and `{DEFAULT_SAFE_ENCODER}`."
    )


def make_handlers(service: CompareService):
    """The Gradio callbacks, as plain functions (usable without a browser).

    Both check ``reveal`` first (a real boolean, see :func:`demos.validation.check_reveal`) and raise ``gr.Error``
    for a bad input before any work.

    Returns:
        `(generate, rerender)`: ``generate(prompt, negative_prompt, seed, steps, guidance, width, height, reveal)``
        returns ``(*images, *verdicts, timing, details, result)`` (N images and N verdicts in ``service.names``
        order; for the default pair ``(original_image, safe_image, original_verdict, safe_verdict, timing, details,
        result)``); ``rerender(result, reveal)`` returns the same ``2N + 3`` outputs for an earlier ``result``, with
        the timing and the result left as they are (``gr.skip()``), or all of them skipped when ``result`` is None.
    """
    import gradio as gr

    n_outputs = 2 * len(service.names) + 3

    def invalid(err: Exception):
        return gr.Error(str(err), title="Invalid input", print_exception=False)

    def generate(prompt, negative_prompt, seed, steps, guidance, width, height, reveal=False):
        try:
            reveal = check_reveal(reveal)
            request = service.validate(prompt, negative_prompt, seed, steps, guidance, width, height)
        except ValueError as err:
            raise invalid(err) from None
        try:
            result = service.run(request)
        except Exception as err:  # show model failures (e.g. out of memory) in the UI, keep the traceback in the log
            logger.exception("compare() failed for %s", request)
            raise gr.Error(f"Generation failed: {type(err).__name__}: {err}", title="Generation failed") from None
        *shown, details = render(result, reveal)
        return (*shown, timing_markdown(result), details, result)

    def rerender(result: ComparisonResult | None, reveal):
        try:
            reveal = check_reveal(reveal)
        except ValueError as err:
            raise invalid(err) from None
        if result is None:
            return (gr.skip(),) * n_outputs
        *shown, details = render(result, reveal)
        return (*shown, gr.skip(), details, gr.skip())

    return generate, rerender


def element_prefix(service: CompareService, index: int, name: str) -> str:
    """The ``elem_id`` prefix of an encoder's image and verdict: its name for the default pair (``original-image``,
    ``safe-verdict``, as before), ``encoder-<index>`` for ``--encoders`` names (which may hold any label text)."""
    return name if service.names == ["original", "safe"] else f"encoder-{index}"


def _headline(service: CompareService) -> str:
    if service.names == ["original", "safe"]:
        return ("The same prompt, seed and UNet, drawn with the **original CLIP** text encoder and with the "
                "**SaFeR-CLIP** text encoder, side by side.")  # fmt: skip
    labels = ", ".join(f"**{service.label(name)}**" for name in service.names)
    return f"The same prompt, seed and UNet, drawn with {len(service.names)} text encoders side by side: {labels}."


def build_demo(service: CompareService, *, tiny: bool = False, examples: dict[str, list[str]] | None = None,
               default_size: int = 512, default_steps: int = 25, max_concurrency: int = 1, analytics: bool = False,
               delete_cache: tuple[int, int] = DELETE_CACHE):  # fmt: skip
    """Build the Gradio Blocks app around ``service`` (not launched, not queued).

    The app has ONE server-side handler, the API endpoint ``/compare``; the Random seed button and the example
    prompts run in the browser only (no backend function), so nothing else can be called over HTTP.

    Args:
        service: the :class:`~demos.service.CompareService` to call.
        tiny: show the random-weights banner.
        examples: example prompts by list name (see :func:`~demos.rendering.load_examples`).
        default_size: initial width and height.
        default_steps: initial number of steps.
        max_concurrency: how many generations run at once; the rest wait in the queue.
        analytics: allow Gradio's usage analytics.
        delete_cache: ``(every_s, older_than_s)``: generated files older than ``older_than_s`` are deleted every
            ``every_s`` seconds (and all of them when the server stops).
    """
    import gradio as gr

    limits = service.limits
    examples = load_examples() if examples is None else examples
    generate, rerender = make_handlers(service)

    with gr.Blocks(title="SaFeR-CLIP: original vs safe text encoder", analytics_enabled=analytics,
                   delete_cache=delete_cache) as demo:  # fmt: skip
        gr.Markdown("# SaFeR-CLIP for Stable Diffusion\n" + _headline(service))
        if tiny:
            gr.Markdown(_tiny_banner(), elem_id="tiny-banner")
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                prompt = gr.Textbox(label="Prompt", lines=2, max_lines=6, placeholder="a watercolor painting of a fox in the snow",
                                    elem_id="prompt", max_length=limits.max_prompt_chars)  # fmt: skip
                negative_prompt = gr.Textbox(label="Negative prompt (optional)", lines=1, max_lines=4,
                                             elem_id="negative-prompt", max_length=limits.max_prompt_chars)  # fmt: skip
                with gr.Row(equal_height=True):
                    seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, maximum=MAX_SEED, elem_id="seed", scale=3)
                    random_seed = gr.Button("Random seed", elem_id="random-seed", scale=1, size="sm")
                steps = gr.Slider(limits.min_steps, limits.max_steps, value=default_steps, step=1, label="Steps", elem_id="steps")
                guidance = gr.Slider(limits.min_guidance, limits.max_guidance, value=7.5, step=0.5, label="Guidance scale",
                                     elem_id="guidance")  # fmt: skip
                with gr.Row():
                    width = gr.Slider(limits.min_size, limits.max_size, value=default_size, step=limits.size_multiple,
                                      label="Width", elem_id="width")  # fmt: skip
                    height = gr.Slider(limits.min_size, limits.max_size, value=default_size, step=limits.size_multiple,
                                       label="Height", elem_id="height")  # fmt: skip
                generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                reveal_box = gr.Checkbox(label="Reveal flagged images", value=False, elem_id="reveal")
            with gr.Column(scale=max(2, len(service.names))):
                images, verdicts = [], []
                with gr.Row():
                    for index, name in enumerate(service.names):
                        prefix = element_prefix(service, index, name)
                        with gr.Column(min_width=160):
                            images.append(gr.Image(
                                label=service.label(name), type="pil", format="png", interactive=False,
                                height=360 if len(service.names) <= 2 else 260, elem_id=f"{prefix}-image",
                                elem_classes=["compare-image"] + (["tiny-pixels"] if tiny else []),
                                buttons=["download", "fullscreen"]))  # fmt: skip
                            verdicts.append(gr.Markdown(elem_id=f"{prefix}-verdict", elem_classes="verdict"))
                timing = gr.Markdown(elem_id="timing")
                with gr.Accordion("Details (JSON)", open=False):
                    details = gr.JSON(label="Details", elem_id="details")
        for name, prompts in examples.items():
            if prompts:  # clicking an example fills the prompt box in the browser (no server call)
                dataset = gr.Dataset(components=[prompt], samples=[[p] for p in prompts], type="index",
                                     label=EXAMPLE_LABELS.get(name, name), samples_per_page=len(prompts),
                                     elem_id=f"examples-{name.replace('_', '-')}")  # fmt: skip
                dataset.click(None, dataset, prompt, js=f"(i) => {json.dumps(prompts)}[i]", queue=False)
        with gr.Accordion("How it works", open=False):
            gr.Markdown(HOW_IT_WORKS)
        result_state = gr.State(None, time_to_live=STATE_TTL_S)  # the unblurred images stay on the server

        def compare(prompt, negative_prompt, seed, steps, guidance, width, height, reveal, last_result, evt):
            """Draw `prompt` with every text encoder (one compare() call, same seed): by default the original CLIP and
            SaFeR-CLIP.

            Returns the N images in encoder order (a flagged image blurred unless `reveal` is true), their N verdicts in
            the same order, the timing line and the details as JSON (`encoders`, `verdicts` per name, `similarity`).
            `reveal` must be a boolean. Ticking the Reveal checkbox in the UI re-renders the last result of the session
            instead of drawing again.
            """
            if getattr(evt, "target", None) is reveal_box:
                return rerender(last_result, reveal)
            return generate(prompt, negative_prompt, seed, steps, guidance, width, height, reveal)

        # Gradio passes the event (which component fired it) to a parameter typed gr.EventData; set as an object,
        # since the string annotations of this module cannot see the local `gr`.
        compare.__annotations__ = {"evt": gr.EventData}

        gr.on(
            triggers=[generate_button.click, prompt.submit, reveal_box.input],
            fn=compare,
            inputs=[prompt, negative_prompt, seed, steps, guidance, width, height, reveal_box, result_state],
            outputs=[*images, *verdicts, timing, details, result_state],
            api_name="compare",
            concurrency_limit=max_concurrency,
            concurrency_id="compare",
            preprocess=False,  # raw values: validate_request names the bad field, check_reveal refuses "false"
        )
        random_seed.click(None, None, seed, js=f"() => Math.floor(Math.random() * {RANDOM_SEED_SPAN})", queue=False)
    return demo


def api_endpoints(demo) -> dict[str, str]:
    """The handlers of ``demo`` that run on the server, by API name, with their visibility.

    Every one of them can be called over HTTP (``/gradio_api/queue/join`` takes any function index), so this is
    the app's whole server-side surface; events without a backend function run in the browser only.
    """
    return {fn.api_name: fn.api_visibility for fn in demo.fns.values() if fn.fn is not None}


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


class StartupError(BadInputError):
    """A problem found before the server starts (port in use, models unavailable): exit status 2."""


def port_is_free(host: str, port: int) -> bool:
    """True when a server could listen on ``(host, port)`` now (same socket options as uvicorn)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise StartupError(f"`--host` {host!r} cannot be resolved ({err}); use 127.0.0.1 or 0.0.0.0.") from None
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
                f"`--port` {port} is already in use on {host}; stop the program using it, pass another `--port`, "
                "or leave `--port` out to use the first free port."
            )
        return port
    start = int(os.environ.get("GRADIO_SERVER_PORT", DEFAULT_PORT))
    for candidate in range(start, start + PORT_SCAN):
        if port_is_free(host, candidate):
            return candidate
    raise StartupError(f"No free port in {start}-{start + PORT_SCAN - 1} on {host}; pass a free one with `--port`.")


def check_device_dtype(device: str, dtype) -> None:
    """Refuse what the demo cannot run: float16 weights on the CPU (``resolve_device_and_dtype`` resolved both)."""
    import torch

    if dtype == torch.float16 and torch.device(device).type == "cpu":
        raise StartupError("`--dtype` float16 is not supported on the CPU; use `--dtype float32` or `--dtype bfloat16` there.")


def encoder_plan(config: DemoConfig) -> tuple[tuple[str, str] | None, dict[str, str]]:
    """``(slot, encoders)``: ``encoders`` maps every name shown to ``"original"``, ``"safe"`` or a source.

    The pipeline's own safe encoder is ``--safe_encoder`` (default: the paper's) whenever the default pair is shown or
    an ``--encoders`` item is ``safe`` (``slot`` is None); otherwise it is the first listed source (``slot`` =
    ``(name, source)``; that item becomes ``safe``), so that no encoder is loaded that is not shown.
    """
    encoders = parse_encoders(config.encoders)
    if not encoders:
        return None, {ORIGINAL: ORIGINAL, SAFE: SAFE}
    if SAFE in encoders.values():
        return None, encoders
    first = next(name for name, source in encoders.items() if source != ORIGINAL)  # parse_encoders guarantees one
    return (first, encoders[first]), {**encoders, first: SAFE}


def _unavailable(err: Exception) -> StartupError:
    return StartupError(
        f"Cannot load the models: {err} To run the demo anyway: offline on tiny random models with "
        "`python demos/app.py --tiny` (`--tiny_variant sdxl` for SDXL); on local copies with `python demos/app.py --base "
        "/path/to/stable-diffusion-v1-4 --safe_encoder /path/to/safer-clip` (SDXL: `--base /path/to/sdxl-base "
        f"--safe_encoder /path/to/sdxl-pair-export`); or with network access, where the defaults ({DEFAULT_BASE_MODEL}, "
        f"{DEFAULT_SAFE_ENCODER}) are downloaded once."
    )


def _not_loadable(base: str, safe_encoder: str, err: Exception) -> StartupError:
    return StartupError(
        f"could not load the models from `--base` {base} and `--safe_encoder` {safe_encoder}: {err} Pass a Stable "
        "Diffusion 1.x/2.x or SDXL pipeline folder (model_index.json) as `--base`, and as `--safe_encoder` a CLIP or "
        "`finetune.export` folder (for SDXL a two-encoder export folder, or the ViT-L/14 with `--safe_encoder_2`), or use "
        "`--tiny` for offline tiny random models."
    )


def check_encoders_fit_base(config: DemoConfig, base: str, sdxl: bool) -> None:
    """Refuse encoder options that cannot fit ``base``'s pipeline class before anything is resolved or loaded:
    ``--safe_encoder_2`` for an SD 1.x/2.x base, and the default ``--safe_encoder`` (a ViT-L/14 only) for SDXL."""
    if not sdxl:
        if config.safe_encoder_2 is not None:
            raise BadInputError(f"`--safe_encoder_2` is for SDXL bases (two text encoders), but `--base` {base!r} is a Stable "
                                "Diffusion 1.x/2.x pipeline with one; drop `--safe_encoder_2`.")  # fmt: skip
        return
    shown_safe = not config.encoders or SAFE in parse_encoders(config.encoders).values()
    if not config.tiny and shown_safe and config.safe_encoder is None and config.safe_encoder_2 is None:
        raise BadInputError(
            f"`--base` {base!r} is SDXL, which conditions on two text encoders (CLIP ViT-L/14 and OpenCLIP ViT-bigG/14), but "
            f"the default `--safe_encoder` {DEFAULT_SAFE_ENCODER} is a ViT-L/14 only and would leave the bigG path unsafe. "
            "Pass a two-encoder export folder (text_encoder/ and text_encoder_2/ with their manifest, docs/EXPORT_FORMAT.md "
            "section 8) as `--safe_encoder DIR`, or the ViT-L/14 as `--safe_encoder` and the bigG as `--safe_encoder_2`."
        )


def resolve_sources(config: DemoConfig) -> tuple[str, str, str | None]:
    """``(base, safe_encoder, safe_encoder_2)`` as loadable sources (``safe_encoder_2`` `None` unless given), checked
    against the base's pipeline class (SD 1.x/2.x or SDXL, read from its model_index.json) before any model loads;
    :class:`StartupError` naming ``--tiny`` and local paths when a source cannot be reached."""
    from safer_diffusion.encoders import require_text_encoder_pair
    from safer_diffusion.hub import HubUnavailableError, resolve_model_source
    from safer_diffusion.pipelines import is_sdxl_base

    slot, _ = encoder_plan(config)
    if config.tiny:
        from safer_diffusion.tiny import tiny_pipeline_folders

        base, safe = (str(path) for path in tiny_pipeline_folders(variant=config.tiny_variant or TINY_VARIANTS[0]))
    else:
        base = config.base if config.base is not None else DEFAULT_BASE_MODEL
        safe = config.safe_encoder if config.safe_encoder is not None else DEFAULT_SAFE_ENCODER
    safe_argument = "--safe_encoder"
    if slot is not None:
        safe, safe_argument = slot[1], f"--encoders {slot[0]}"
    try:
        base = resolve_model_source(base, "--base")
        try:
            sdxl = is_sdxl_base(base, "--base")
        except ValueError as err:  # not a diffusers pipeline, or not one safer-diffusion loads
            raise _not_loadable(base, safe, err) from None
        check_encoders_fit_base(config, base, sdxl)
        safe = resolve_model_source(safe, safe_argument)
        safe_2 = None if config.safe_encoder_2 is None else resolve_model_source(config.safe_encoder_2, "--safe_encoder_2")
    except (HubUnavailableError, FileNotFoundError) as err:
        raise _unavailable(err) from None
    if sdxl and safe_2 is None and slot is None:  # one folder must hold the safe pair: name the missing encoder now
        require_text_encoder_pair(safe, argument=safe_argument, other="--safe_encoder_2")
    return base, safe, safe_2


def check_encoder_sources_fit_base(base: str, sources: dict[str, str]) -> None:
    """Every ``--encoders`` source (``{name: loadable source}``; the aliases are skipped) must fit ``base``'s pipeline
    class, from the config files before any model loads: for SDXL a pair (a two-encoder export or an SDXL pipeline
    folder) that fits the base (:func:`~safer_diffusion.encoders.check_text_encoder_pair_configs`: the missing
    text_encoder_2, swapped towers, widths), for SD 1.x/2.x not a pair
    (:func:`~safer_diffusion.encoders.refuse_text_encoder_pair`). Errors name ``--encoders NAME``."""
    from safer_diffusion.encoders import check_text_encoder_pair_configs, refuse_text_encoder_pair
    from safer_diffusion.pipelines import is_sdxl_base

    sdxl = is_sdxl_base(base, "--base")
    for name, source in sources.items():
        if source in ENCODER_ALIASES:
            continue
        if sdxl:
            check_text_encoder_pair_configs(source, base, argument=f"--encoders {name}")
        else:
            refuse_text_encoder_pair(source, f"--encoders {name}", base)


def resolve_encoder_sources(config: DemoConfig) -> dict[str, str]:
    """``{name: "original" | "safe" | loadable source}`` of the encoders shown (see :func:`encoder_plan`)."""
    from safer_diffusion.hub import HubUnavailableError, resolve_model_source

    _, encoders = encoder_plan(config)
    try:
        return {name: source if source in ENCODER_ALIASES else resolve_model_source(source, f"--encoders {name}")
                for name, source in encoders.items()}  # fmt: skip
    except (HubUnavailableError, FileNotFoundError) as err:
        raise _unavailable(err) from None


def _is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to a network address
        return False


def exposure_warnings(config: DemoConfig, port: int | None) -> list[str]:
    """What ``--host`` and ``--share`` expose beyond this machine, one sentence each (empty when nothing is)."""
    warnings = []
    if not _is_loopback(config.host):
        reach = "every machine on your network" if config.host in ("0.0.0.0", "::") else f"anyone who can reach {config.host}"
        warnings.append(
            f"`--host {config.host}` exposes the demo UI and its /compare API (image generation on this machine, no "
            f"authentication) to {reach} on port {port}. Use `--host 127.0.0.1` to keep them on this machine."
        )
    if config.share:
        warnings.append("`--share` also publishes the demo UI and its /compare API at a public gradio.live URL: anyone "
                        "with the link can generate images on this machine.")  # fmt: skip
    return warnings


def load_models(base: str, safe_encoder: str, device, dtype, keep_original_text_encoder: bool = True,
                safe_encoder_2: str | None = None):  # fmt: skip
    """:func:`~demos.service.load_pipeline`, with a folder that is not a model reported as bad input (exit 2)."""
    try:
        return load_pipeline(base, safe_encoder, device, dtype, keep_original_text_encoder=keep_original_text_encoder,
                             safe_encoder_2=safe_encoder_2)  # fmt: skip
    except (OSError, ValueError) as err:  # not a pipeline / encoder folder, incomplete download, ...
        raise _not_loadable(base, safe_encoder, err) from None


def load_demo_encoders(pipe, sources: dict[str, str]) -> dict[str, Any]:
    """:func:`~demos.service.load_encoders`, with an encoder that cannot load or does not fit reported as bad input."""
    try:
        return load_encoders(pipe, sources)
    except (OSError, ValueError) as err:  # not an encoder, wrong width (the message names `--encoders NAME`), ...
        raise StartupError(f"could not load an encoder of `--encoders`: {err}") from None


def launch_settings(config: DemoConfig, port: int | None) -> dict[str, Any]:
    """The keyword arguments of ``demo.launch`` for ``config``: no uploads, no monitoring page, no MCP server,
    no run history kept in the browser (it would keep revealed images)."""
    return dict(server_name=config.host, server_port=port, share=config.share, show_error=True, css=CSS,
                footer_links=["api", "gradio"], max_file_size=MAX_UPLOAD_BYTES, enable_monitoring=False,
                mcp_server=False, run_history=False)  # fmt: skip


def smoke_test(demo_service: CompareService, examples: dict[str, list[str]], size: int) -> dict[str, Any]:
    """Run one comparison through the same handlers the UI calls; return the details."""
    generate, rerender = make_handlers(demo_service)
    prompt = (examples.get("benign") or BUILTIN_EXAMPLES["benign"])[0]
    names = demo_service.names
    *images, _, _, details, result = generate(prompt, "", 0, SMOKE_TEST_STEPS, 7.5, size, size, False)
    rerender(result, True)
    sizes = {name: list(image.size) for name, image in zip(names, images[: len(names)])}
    summary = {"ok": True, "pipeline": type(demo_service.pipe).__name__, "prompt": prompt, "image_sizes": sizes, **details}
    if names == ["original", "safe"]:
        summary.update(original_size=sizes["original"], safe_size=sizes["safe"])
    return summary


def _run(argv: Sequence[str] | None) -> int:
    config = parse_args(argv)
    configure_logging(config.verbose)
    # Everything the user can get wrong is checked before the (slow) model loading.
    port = None if config.smoke_test else choose_port(config.host, config.port)
    device, dtype = resolve_device_and_dtype(config.device, config.dtype)
    check_device_dtype(device, dtype)
    base, safe_encoder, safe_encoder_2 = resolve_sources(config)
    sources = resolve_encoder_sources(config)
    slot, _ = encoder_plan(config)  # an `--encoders` source loaded as the pipeline's safe encoder is checked too
    check_encoder_sources_fit_base(base, {**sources, **({slot[0]: safe_encoder} if slot is not None else {})})
    if not config.smoke_test:
        for warning in exposure_warnings(config, port):
            logger.warning(warning)

    logger.info("Loading %s with safe text encoder %s%s on %s (%s)", base, safe_encoder,
                f" and {safe_encoder_2}" if safe_encoder_2 else "", device, dtype)  # fmt: skip
    pipe = load_models(base, safe_encoder, device, dtype, keep_original_text_encoder=ORIGINAL in sources.values(),
                       safe_encoder_2=safe_encoder_2)  # fmt: skip
    encoders = load_demo_encoders(pipe, sources) if config.encoders else None
    service = CompareService(pipe, concurrency=config.max_concurrency, encoders=encoders, max_batch=config.max_batch)
    examples = load_examples()
    size = default_image_size(pipe)
    demo = build_demo(service, tiny=config.tiny, examples=examples, default_size=size,
                      default_steps=4 if config.tiny else 25, max_concurrency=config.max_concurrency,
                      analytics=config.analytics)  # fmt: skip
    if config.smoke_test:
        print(json.dumps(smoke_test(service, examples, size), sort_keys=True), flush=True)
        return 0
    demo.queue(max_size=config.queue_size, default_concurrency_limit=config.max_concurrency)
    demo.launch(**launch_settings(config, port))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the demo (or run ``--smoke_test``). Returns 0, 2 on bad input (one line on stderr), 1 on a failure."""
    return run_main(lambda: _run(argv), prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
