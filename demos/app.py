"""The Gradio app of the demo: Stable Diffusion with the original CLIP text encoder vs SaFeR-CLIP, side by side.

This file holds the Blocks layout, its event wiring and the command line (``main``). The rest lives beside it:
:mod:`demos.validation` checks every input, :mod:`demos.service` loads the pipeline and runs requests on a pool of
thread-safe pipeline views, :mod:`demos.rendering` decides what is shown (verdicts, blur, text). All model logic is
in :mod:`safer_diffusion`.

One ``SaferStableDiffusionPipeline.compare()`` call draws both images from the same seed and the same UNet; each
image is scored by NudeNet, and a flagged image leaves the server blurred unless ``reveal`` is ``True``.

Run it::

    python demos/app.py                    # CompVis/stable-diffusion-v1-4 + Adeely93/SafeR_CLIP (use a GPU)
    python demos/app.py --tiny             # offline: tiny random models, images are noise
    python demos/app.py --base ./sd-v1-4 --safe_encoder ./safer-clip-export --port 7860
    python demos/app.py --tiny --smoke_test   # one generation through the UI handler, prints JSON, exits

The only API endpoint is ``/compare`` (the Generate button, Enter in the prompt box and the Reveal checkbox all
call it; the other buttons run in the browser only)::

    from gradio_client import Client
    client = Client("http://127.0.0.1:7860/")
    original, safe, original_verdict, safe_verdict, timing, details = client.predict(
        "a watercolor fox in the snow", "", 0, 25, 7.5, 512, 512, False, api_name="/compare")

``reveal`` (the last argument) must be a boolean: ``"false"``, ``0`` or ``None`` are refused with an error.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python demos/app.py`: make this checkout importable (demos.*, safer_diffusion)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from demos.rendering import BUILTIN_EXAMPLES, EXAMPLE_LABELS, ComparisonResult, load_examples, render, timing_markdown  # noqa: E402
from demos.service import CompareService, default_image_size, load_pipeline  # noqa: E402
from demos.validation import MAX_SEED, check_reveal  # noqa: E402
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

logger = logging.getLogger(__name__)

PROG = "demos/app.py"
DEFAULT_PORT = 7860  # Gradio's default; without --port the first free port from here on is used
PORT_SCAN = 100  # how many ports to try from DEFAULT_PORT when --port is not given
SMOKE_TEST_STEPS = 2  # --smoke_test checks that everything runs, not image quality
RANDOM_SEED_SPAN = 2**32  # the Random seed button draws from [0, 2**32): short seeds are easy to read and retype
DELETE_CACHE = (600, 3600)  # every 10 min, delete generated files older than 1 h (all of them when the server stops)
STATE_TTL_S = 3600  # the unblurred images of a session stay on the server at most this long
MAX_UPLOAD_BYTES = 0  # the app has no file inputs: /gradio_api/upload refuses any non-empty file (413)


@dataclass
class DemoConfig:
    """Options of ``python demos/app.py`` (``--snake_case``; ``--kebab-case`` is accepted too)."""

    base: str | None = option(None, f"Stable Diffusion pipeline: hub id or local folder (default: {DEFAULT_BASE_MODEL}).",
                              group="models")  # fmt: skip
    safe_encoder: str | None = option(
        None, f"SaFeR-CLIP text encoder: hub id, CLIP folder or `finetune.export` folder (default: {DEFAULT_SAFE_ENCODER}).",
        group="models")  # fmt: skip
    tiny: bool = option(False, "Use tiny random models built offline (images are noise; for trying the app without a GPU "
                               "or network). Cannot be combined with --base or --safe_encoder.", group="models")  # fmt: skip
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
    smoke_test: bool = option(False, f"Build the app, run one comparison ({SMOKE_TEST_STEPS} steps) through the UI handler, "
                                     "print a JSON line and exit (no server).")  # fmt: skip
    verbose: bool = option(False, "Log INFO messages (model loading, requests).")

    def validate(self) -> None:
        if self.tiny and (self.base is not None or self.safe_encoder is not None):
            raise BadInputError("`--tiny` builds its own models: do not combine it with `--base` or `--safe_encoder`.")
        for name in ("base", "safe_encoder"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise BadInputError(f"`--{name}` is empty; pass a hub id or a folder, or leave it out for the default.")
        if not self.host.strip():
            raise BadInputError("`--host` is empty; use 127.0.0.1 (this machine only) or 0.0.0.0 (your network).")


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
        f"Run without `--tiny` (with a GPU) to use `{DEFAULT_BASE_MODEL}` and `{DEFAULT_SAFE_ENCODER}`."
    )


def make_handlers(service: CompareService):
    """The Gradio callbacks, as plain functions (usable without a browser).

    Both check ``reveal`` first (a real boolean, see :func:`demos.validation.check_reveal`) and raise ``gr.Error``
    for a bad input before any work.

    Returns:
        `(generate, rerender)`: ``generate(prompt, negative_prompt, seed, steps, guidance, width, height, reveal)``
        returns ``(original_image, safe_image, original_verdict, safe_verdict, timing, details, result)``;
        ``rerender(result, reveal)`` returns the same seven outputs for an earlier ``result``, with the timing and
        the result left as they are (``gr.skip()``), or all seven skipped when ``result`` is None.
    """
    import gradio as gr

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
        original, safe, original_verdict, safe_verdict, details = render(result, reveal)
        return original, safe, original_verdict, safe_verdict, timing_markdown(result), details, result

    def rerender(result: ComparisonResult | None, reveal):
        try:
            reveal = check_reveal(reveal)
        except ValueError as err:
            raise invalid(err) from None
        if result is None:
            return (gr.skip(),) * 7
        original, safe, original_verdict, safe_verdict, details = render(result, reveal)
        return original, safe, original_verdict, safe_verdict, gr.skip(), details, gr.skip()

    return generate, rerender


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
            with gr.Column(scale=2):
                with gr.Row():
                    with gr.Column():
                        original_image = gr.Image(label="Original CLIP", type="pil", format="png", interactive=False, height=360,
                                                  elem_id="original-image", elem_classes="tiny-pixels" if tiny else None,
                                                  buttons=["download", "fullscreen"])  # fmt: skip
                        original_verdict = gr.Markdown(elem_id="original-verdict", elem_classes="verdict")
                    with gr.Column():
                        safe_image = gr.Image(label="SaFeR-CLIP", type="pil", format="png", interactive=False, height=360,
                                              elem_id="safe-image", elem_classes="tiny-pixels" if tiny else None,
                                              buttons=["download", "fullscreen"])  # fmt: skip
                        safe_verdict = gr.Markdown(elem_id="safe-verdict", elem_classes="verdict")
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
            """Draw `prompt` with the original CLIP and with the SaFeR-CLIP text encoder (one compare() call, same seed).

            Returns both images (a flagged image blurred unless `reveal` is true), their verdicts, the timing line and
            the details as JSON. `reveal` must be a boolean. Ticking the Reveal checkbox in the UI re-renders the last
            result of the session instead of drawing again.
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
            outputs=[original_image, safe_image, original_verdict, safe_verdict, timing, details, result_state],
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


def resolve_sources(config: DemoConfig) -> tuple[str, str]:
    """``(base, safe_encoder)`` as loadable sources, or :class:`StartupError` naming ``--tiny`` and local paths."""
    if config.tiny:
        from safer_diffusion.tiny import tiny_pipeline_folders

        base, safe = tiny_pipeline_folders()
        return str(base), str(safe)
    from safer_diffusion.hub import HubUnavailableError, resolve_model_source

    base = config.base if config.base is not None else DEFAULT_BASE_MODEL
    safe = config.safe_encoder if config.safe_encoder is not None else DEFAULT_SAFE_ENCODER
    try:
        return resolve_model_source(base, "--base"), resolve_model_source(safe, "--safe_encoder")
    except (HubUnavailableError, FileNotFoundError) as err:
        raise StartupError(
            f"Cannot load the models: {err} To run the demo anyway: offline on tiny random models with "
            "`python demos/app.py --tiny`; on local copies with `python demos/app.py --base /path/to/stable-diffusion-v1-4 "
            f"--safe_encoder /path/to/safer-clip`; or with network access, where the defaults ({DEFAULT_BASE_MODEL}, "
            f"{DEFAULT_SAFE_ENCODER}) are downloaded once."
        ) from None


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


def load_models(base: str, safe_encoder: str, device, dtype):
    """:func:`~demos.service.load_pipeline`, with a folder that is not a model reported as bad input (exit 2)."""
    try:
        return load_pipeline(base, safe_encoder, device, dtype)
    except (OSError, ValueError) as err:  # not a pipeline / encoder folder, incomplete download, ...
        raise StartupError(
            f"could not load the models from `--base` {base} and `--safe_encoder` {safe_encoder}: {err} "
            "Pass a Stable Diffusion pipeline folder (model_index.json) as `--base` and a CLIP or `finetune.export` "
            "folder as `--safe_encoder`, or use `--tiny` for offline tiny random models."
        ) from None


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
    original, safe, _, _, _, details, result = generate(prompt, "", 0, SMOKE_TEST_STEPS, 7.5, size, size, False)
    rerender(result, True)
    return {"ok": True, "prompt": prompt, "original_size": list(original.size), "safe_size": list(safe.size), **details}


def _run(argv: Sequence[str] | None) -> int:
    config = parse_args(argv)
    configure_logging(config.verbose)
    # Everything the user can get wrong is checked before the (slow) model loading.
    port = None if config.smoke_test else choose_port(config.host, config.port)
    device, dtype = resolve_device_and_dtype(config.device, config.dtype)
    check_device_dtype(device, dtype)
    base, safe_encoder = resolve_sources(config)
    if not config.smoke_test:
        for warning in exposure_warnings(config, port):
            logger.warning(warning)

    logger.info("Loading %s with safe text encoder %s on %s (%s)", base, safe_encoder, device, dtype)
    pipe = load_models(base, safe_encoder, device, dtype)
    service = CompareService(pipe, concurrency=config.max_concurrency)
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
