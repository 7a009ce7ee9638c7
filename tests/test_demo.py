"""Tests of the Gradio app (`demos/app.py`): the command line and its exit codes, startup errors, the app's
server-side surface, the handlers on the tiny pipeline, and end to end over HTTP against
`python demos/app.py --tiny` (gradio_client and raw requests). Validation, rendering and the pipeline pool are
tested on their own in tests/test_demo_validation.py, test_demo_rendering.py and test_demo_service.py."""

import json
import logging
import re
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from demos import app

ROOT = Path(__file__).resolve().parents[1]
APP_PATH = ROOT / "demos" / "app.py"
#: The app's documented API: the Generate button (also Enter in the prompt box and the Reveal checkbox).
DOCUMENTED_ENDPOINTS = {"/compare"}
#: Names that were (or could be) server-side helper handlers: none may be callable.
HELPER_NAMES = ("rerender", "compare_on_submit", "lambda", "load_example", "random_seed", "js_fn", "js_fn_1", "js_fn_2")
NOT_BOOLEANS = ["false", "0", "no", [0], 0, 1, None]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _detail(image: Image.Image) -> float:
    """Mean absolute difference between horizontal neighbours: high for sharp detail, ~0 when hidden."""
    pixels = np.asarray(image.convert("L"), dtype=np.float32)
    return float(np.abs(np.diff(pixels, axis=1)).mean())


def _http(url: str, path: str, body=None, headers=None, data: bytes | None = None):
    """``(status, text)`` of a GET (no body) or POST to ``url + path``; HTTP errors are returned, not raised."""
    if body is not None:
        data, headers = json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})}
    request = urllib.request.Request(url + path, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=180) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _events(stream: str) -> list[tuple[str, object]]:
    """The ``(event, data)`` pairs of a server-sent-events body."""
    return [(name, json.loads(data)) for name, data in re.findall(r"^event: (\w+)\ndata: (.*)$", stream, flags=re.M)]


def _call(url: str, data: list, api_name: str = "compare") -> tuple[int, list[tuple[str, object]]]:
    """POST ``data`` to ``/gradio_api/call/<api_name>`` and read the result stream: ``(status, events)``."""
    status, text = _http(url, f"gradio_api/call/{api_name}", {"data": data})
    if status != 200:
        return status, []
    event_id = json.loads(text)["event_id"]
    status, stream = _http(url, f"gradio_api/call/{api_name}/{event_id}")
    return status, _events(stream)


def _request(prompt="a red bicycle", negative="", seed=0, steps=2, guidance=7.5, width=64, height=64, reveal=False):
    return [prompt, negative, seed, steps, guidance, width, height, reveal]


# ---------------------------------------------------------------------------------------------
# Command line: the shared options vocabulary, exit codes
# ---------------------------------------------------------------------------------------------


def test_parse_args_defaults():
    config = app.parse_args([])
    assert config == app.DemoConfig()
    assert (config.base, config.safe_encoder, config.tiny, config.host, config.port, config.share) == (
        None, None, False, "127.0.0.1", None, False)  # fmt: skip
    assert (config.device, config.dtype, config.max_concurrency, config.queue_size) == ("auto", "auto", 1, 64)
    assert (config.analytics, config.smoke_test, config.verbose) == (False, False, False)


def test_snake_and_kebab_spellings_are_the_same_flags():
    snake = app.parse_args(["--safe_encoder", "./enc", "--max_concurrency", "3", "--queue_size", "5", "--smoke_test"])
    kebab = app.parse_args(["--safe-encoder", "./enc", "--max-concurrency", "3", "--queue-size", "5", "--smoke-test"])
    assert snake == kebab and (snake.safe_encoder, snake.max_concurrency, snake.queue_size, snake.smoke_test) == (
        "./enc", 3, 5, True)  # fmt: skip


def test_old_dtype_names_still_work_with_a_deprecation_warning(caplog):
    with caplog.at_level(logging.WARNING):
        assert app.parse_args(["--dtype", "fp32"]).dtype == "float32"
    assert "`--dtype fp32` is deprecated; use `--dtype float32`" in caplog.text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tiny", "--base", "x/y"], r"`--tiny` builds its own models: do not combine it with `--base` or `--safe_encoder`"),
        (["--tiny", "--safe-encoder", "./enc"], r"`--tiny` builds its own models: do not combine it with `--base` or `--safe_encoder`"),
        (["--port", "70000"], r"`--port` must be in \[1, 65535\], got 70000"),
        (["--port", "0"], r"`--port` must be in \[1, 65535\], got 0"),
        (["--max-concurrency", "0"], r"`--max_concurrency` must be in \[1, 64\], got 0"),
        (["--queue-size", "0"], r"`--queue_size` must be in \[1, 10000\], got 0"),
        (["--host", " "], r"`--host` is empty"),
        (["--base", ""], r"`--base` is empty"),
    ],
)
def test_bad_flags_exit_2_with_one_line(capsys, argv, message):
    assert app.main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(rf"^demos/app.py: error: {message}", err) and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dtype", "float8"], r"argument --dtype: invalid choice: 'float8'"),
        (["--port", "http"], r"argument --port: not a whole number: 'http'"),
        (["--no-such-flag"], r"unrecognized arguments: --no-such-flag"),
    ],
)
def test_unparsable_flags_exit_2_with_argparse_usage(capsys, argv, message):
    assert app.main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err


def test_help_runs_and_lists_the_flags():
    out = subprocess.run([sys.executable, str(APP_PATH), "--help"], capture_output=True, text=True, timeout=60, check=True).stdout
    for flag in ("--base", "--safe_encoder", "--tiny", "--host", "--port", "--share", "--device", "--dtype",
                 "--max_concurrency", "--queue_size", "--analytics", "--smoke_test", "--verbose", "--encoders",
                 "--max_batch", "--safe_encoder_2", "--tiny_variant"):  # fmt: skip
        assert flag in out
    assert "--safe-encoder" not in out  # one spelling shown


def test_the_module_docstring_says_what_the_file_is():
    doc = app.__doc__
    assert doc.startswith("The Gradio app of the demo") and "demos.validation" in doc and "demos.service" in doc
    assert "thin UI layer only" not in doc


# ---------------------------------------------------------------------------------------------
# Startup errors: before any model is loaded
# ---------------------------------------------------------------------------------------------


def _forbid_model_loading(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("models must not be loaded")

    monkeypatch.setattr(app, "load_pipeline", fail)


def test_port_in_use_is_an_error_before_loading_models(monkeypatch, capsys):
    _forbid_model_loading(monkeypatch)
    monkeypatch.setattr(app, "resolve_sources", lambda config: pytest.fail("the port must be checked first"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert not app.port_is_free("127.0.0.1", port)
        with pytest.raises(app.StartupError, match=rf"`--port` {port} is already in use on 127.0.0.1"):
            app.choose_port("127.0.0.1", port)
        assert app.main(["--tiny", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"demos/app.py: error: `--port` {port} is already in use") and "Traceback" not in err
    free = _free_port()
    assert app.port_is_free("127.0.0.1", free) and app.choose_port("127.0.0.1", free) == free


def test_unreachable_default_models_exit_with_a_clear_message(monkeypatch, capsys, no_network):
    # conftest sets HF_HUB_OFFLINE=1, so the default hub ids cannot be loaded: no silent fallback to --tiny.
    _forbid_model_loading(monkeypatch)
    monkeypatch.setattr("safer_diffusion.hub._cached", lambda repo_id, repo_type, revision: False)
    assert app.main(["--port", str(_free_port())]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("demos/app.py: error: Cannot load the models: `--base`='CompVis/stable-diffusion-v1-4'")
    assert "`python demos/app.py --tiny`" in err
    assert "--base /path/to/stable-diffusion-v1-4 --safe_encoder /path/to/safer-clip" in err

    assert app.main(["--base", str(ROOT / "no-such-folder"), "--port", str(_free_port())]) == 2
    assert "is not an existing local path" in capsys.readouterr().err


def test_folders_that_are_not_models_exit_with_a_clear_message(tmp_path, tiny_folders, capsys):
    base, safe = tiny_folders
    (tmp_path / "empty").mkdir()
    assert app.main(["--base", str(tmp_path / "empty"), "--safe-encoder", str(safe), "--smoke-test"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"demos/app.py: error: could not load the models from `--base` {tmp_path / 'empty'}")
    assert "--tiny" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bad_device_and_dtype_exit_2_before_loading(monkeypatch, capsys):
    torch = pytest.importorskip("torch")
    _forbid_model_loading(monkeypatch)
    assert app.main(["--tiny", "--device", "cpu", "--dtype", "float16", "--smoke-test"]) == 2
    assert "error: `--dtype` float16 is not supported on the CPU; use `--dtype float32`" in capsys.readouterr().err
    assert app.main(["--tiny", "--device", "toaster", "--smoke-test"]) == 2
    assert "error: `--device` 'toaster' is not a torch device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert app.main(["--tiny", "--device", "cuda", "--smoke-test"]) == 2
        assert "error: `--device` 'cuda': this machine has no CUDA GPU" in capsys.readouterr().err


def test_a_failure_while_loading_is_exit_1(monkeypatch, capsys):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(app, "load_pipeline", out_of_memory)
    assert app.main(["--tiny", "--smoke-test"]) == 1
    err = capsys.readouterr().err  # (building the --tiny folders may print progress bars first)
    assert err.strip().splitlines()[-1] == "demos/app.py: failed (RuntimeError): CUDA out of memory" and "Traceback" not in err


def test_host_0000_warns_what_is_exposed_before_loading(monkeypatch, caplog):
    def stop(*args, **kwargs):
        raise RuntimeError("stop before loading")

    monkeypatch.setattr(app, "load_pipeline", stop)
    port = _free_port()
    with caplog.at_level(logging.WARNING):
        assert app.main(["--tiny", "--host", "0.0.0.0", "--port", str(port)]) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("`--host 0.0.0.0` exposes the demo UI and its /compare API" in w and "every machine on your network" in w
               and f"port {port}" in w and "--host 127.0.0.1" in w for w in warnings), warnings  # fmt: skip

    assert app.exposure_warnings(app.DemoConfig(), 7860) == []
    assert app.exposure_warnings(app.DemoConfig(host="localhost"), 7860) == []
    assert app.exposure_warnings(app.DemoConfig(host="::1"), 7860) == []
    assert "anyone who can reach 192.168.1.5" in app.exposure_warnings(app.DemoConfig(host="192.168.1.5"), 7860)[0]
    assert "public gradio.live URL" in app.exposure_warnings(app.DemoConfig(share=True), 7860)[0]


# ---------------------------------------------------------------------------------------------
# The handlers on the real tiny pipeline (in process)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pipe(tiny_folders):
    base, safe = tiny_folders
    return app.load_pipeline(str(base), str(safe), "cpu", pytest.importorskip("torch").float32)


@pytest.fixture(scope="module")
def flagging_pipe(tiny_folders):
    """The tiny pipeline with a real NudeNet scorer at threshold 0: every image is flagged."""
    from safer_diffusion import SaferStableDiffusionPipeline
    from safer_diffusion.scoring import NudeNetScorer

    base, safe = tiny_folders
    pipe = SaferStableDiffusionPipeline.from_pretrained(
        str(base), safe_text_encoder=str(safe), nsfw_scorer=NudeNetScorer(threshold=0.0), keep_original_text_encoder=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _count_compare_calls(monkeypatch, pipe):
    calls = []
    original = type(pipe).compare

    def counting(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "compare", counting)
    return calls


def test_generate_handler_one_compare_call_two_scored_images(tiny_pipe, monkeypatch):
    generate, rerender = app.make_handlers(app.CompareService(tiny_pipe))
    calls = _count_compare_calls(monkeypatch, tiny_pipe)
    original, safe, original_verdict, safe_verdict, timing, details, result = generate(
        "a red bicycle", "blurry", 7, 2, 7.5, 64, 64, False)
    assert len(calls) == 1  # both images from ONE compare() call
    assert calls[0]["negative_prompt"] == "blurry" and calls[0]["num_inference_steps"] == 2 and calls[0]["score"] is True
    assert original.size == safe.size == (64, 64)
    assert not np.array_equal(np.asarray(original), np.asarray(safe))  # different text encoders, different images
    assert original_verdict.startswith("**Original CLIP:") and safe_verdict.startswith("**SaFeR-CLIP:")
    assert re.search(r"SSIM to Original CLIP: -?\d\.\d{3}", safe_verdict) and "SSIM" not in original_verdict  # paired similarity
    assert details["similarity"]["reference"] == "original" and set(details["similarity"]["values"]) == {"safe"}
    assert set(details["original"]["scores"]) == set(details["safe"]["scores"]) == {"nudenet"}
    assert details["request"]["seed"] == 7 and "for both images" in timing

    again = generate("a red bicycle", "blurry", 7, 2, 7.5, 64, 64, False)  # same seed, same images
    assert np.array_equal(np.asarray(again[0]), np.asarray(original)) and np.array_equal(np.asarray(again[1]), np.asarray(safe))
    assert rerender(result, True)[0] is result.original.image and len(calls) == 2  # re-rendering draws nothing


@pytest.mark.parametrize(
    "args, match",
    [
        (("a red bicycle", "", 0, 0, 7.5, 64, 64, False), r"`steps` must be between 1 and 100, got 0"),
        (("a red bicycle", "", 0, 100000, 7.5, 64, 64, False), r"`steps` must be between 1 and 100, got 100000"),
        (("", "", 0, 2, 7.5, 64, 64, False), r"`prompt` is empty"),
        (("  \n ", "", 0, 2, 7.5, 64, 64, False), r"`prompt` is empty"),
        (("a cat\x00", "", 0, 2, 7.5, 64, 64, False), r"`prompt` contains a NUL character"),
        (("a red bicycle", "", 2**63, 2, 7.5, 64, 64, False), r"`seed` must be between 0 and 9223372036854775807"),
        (("a red bicycle", "", 0, 2, float("nan"), 64, 64, False), r"`guidance` must be a finite number, got nan"),
        (("a red bicycle", "", 0, 2, float("inf"), 64, 64, False), r"`guidance` must be a finite number, got inf"),
        (("a red bicycle", "", 0, 2, 7.5, 100, 64, False), r"`width` must be a multiple of 8, got 100"),
        *[(("a red bicycle", "", 0, 2, 7.5, 64, 64, bad), r"`reveal` must be true or false") for bad in NOT_BOOLEANS],
    ],
)
def test_generate_handler_refuses_bad_inputs_before_any_work(tiny_pipe, monkeypatch, args, match):
    import gradio as gr

    generate, _ = app.make_handlers(app.CompareService(tiny_pipe))
    calls = _count_compare_calls(monkeypatch, tiny_pipe)
    with pytest.raises(gr.Error, match=match):
        generate(*args)
    assert calls == []  # rejected before the model runs


def test_flagged_images_leave_the_server_blurred_and_reveal_needs_true(flagging_pipe, monkeypatch):
    import gradio as gr

    generate, rerender = app.make_handlers(app.CompareService(flagging_pipe))
    original, safe_image, original_verdict, safe_verdict, _, details, result = generate("a red bicycle", "", 1, 2, 7.5, 64, 64, False)
    assert result.original.flagged and result.safe.flagged
    assert details["original"]["blurred"] and details["safe"]["blurred"]
    assert "flagged NSFW" in original_verdict and "blurred" in safe_verdict
    for shown, raw in ((original, result.original.image), (safe_image, result.safe.image)):
        assert _detail(shown) < 0.5 * _detail(raw)
    revealed = rerender(result, True)
    assert revealed[0] is result.original.image and revealed[1] is result.safe.image and "revealed" in revealed[2]
    assert all(value is not None for value in rerender(None, True))  # nothing generated yet: outputs left as they are

    calls = _count_compare_calls(monkeypatch, flagging_pipe)
    for bad in NOT_BOOLEANS:
        with pytest.raises(gr.Error, match=r"`reveal` must be true or false"):
            rerender(result, bad)
        with pytest.raises(gr.Error, match=r"`reveal` must be true or false"):
            generate("a red bicycle", "", 1, 2, 7.5, 64, 64, bad)
    assert calls == []


def _registered_compare(demo):
    (fn,) = [fn for fn in demo.fns.values() if fn.fn is not None]
    return fn


def test_the_app_has_one_server_side_handler_the_documented_api(tiny_pipe):
    demo = app.build_demo(app.CompareService(tiny_pipe), tiny=True, default_size=64, default_steps=2)
    assert app.api_endpoints(demo) == {"compare": "public"}
    assert {"/" + name for name in app.api_endpoints(demo)} == DOCUMENTED_ENDPOINTS
    compare = _registered_compare(demo)
    triggers = {(demo.blocks[block_id].elem_id, event) for block_id, event in compare.targets}
    assert triggers == {("generate", "click"), ("prompt", "submit"), ("reveal", "input")}
    assert not compare.preprocess  # raw values reach validation: "false" stays a string and is refused
    browser_only = [fn for fn in demo.fns.values() if fn.fn is None]
    assert len(browser_only) == 3 and all(fn.js for fn in browser_only)  # random seed + the two example lists
    assert demo.get_api_info()["named_endpoints"].keys() == DOCUMENTED_ENDPOINTS
    parameters = [p["parameter_name"] for p in demo.get_api_info()["named_endpoints"]["/compare"]["parameters"]]
    assert parameters == ["prompt", "negative_prompt", "seed", "steps", "guidance", "width", "height", "reveal"]


def test_the_reveal_checkbox_rerenders_the_last_result_through_compare(flagging_pipe, monkeypatch):
    import gradio as gr

    demo = app.build_demo(app.CompareService(flagging_pipe), default_size=64, default_steps=2)
    compare = _registered_compare(demo).fn
    reveal_box = next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "reveal")
    inputs = ("a red bicycle", "", 1, 2, 7.5, 64, 64)
    first = compare(*inputs, False, None, gr.EventData(None, None))  # an API call: no trigger
    result = first[6]
    calls = _count_compare_calls(monkeypatch, flagging_pipe)
    revealed = compare(*inputs, True, result, gr.EventData(reveal_box, None))
    assert revealed[0] is result.original.image and revealed[1] is result.safe.image and calls == []
    assert all(isinstance(value, type(gr.skip())) for value in compare(*inputs, True, None, gr.EventData(reveal_box, None)))
    with pytest.raises(gr.Error, match=r"`reveal` must be true or false"):
        compare(*inputs, "false", result, gr.EventData(reveal_box, None))


def test_privacy_settings_of_the_app(tiny_pipe, monkeypatch):
    service = app.CompareService(tiny_pipe)
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "True")  # Gradio's own default: on
    demo = app.build_demo(service, default_size=64)
    assert demo.analytics_enabled is False and demo.delete_cache == app.DELETE_CACHE == (600, 3600)
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry request from this test
    monkeypatch.setattr("gradio.analytics.version_check", lambda: None)  # the one request Blocks(analytics) makes itself
    assert app.parse_args(["--analytics"]).analytics is True
    assert app.build_demo(service, default_size=64, analytics=True).analytics_enabled is True
    settings = app.launch_settings(app.DemoConfig(), 7860)
    assert settings["max_file_size"] == 0 and settings["enable_monitoring"] is False and settings["mcp_server"] is False
    assert settings["run_history"] is False and settings["server_name"] == "127.0.0.1" and settings["share"] is False


@pytest.mark.parametrize("mode", ["tiny", "local folders"])
def test_smoke_test_flag_runs_one_comparison(capsys, tiny_folders, mode):
    base, safe = tiny_folders
    argv = ["--tiny"] if mode == "tiny" else ["--base", str(base), "--safe-encoder", str(safe), "--device", "cpu"]
    assert app.main([*argv, "--smoke-test"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["ok"] is True and summary["original_size"] == summary["safe_size"] == [64, 64]
    assert {"flagged", "scores", "blurred"} <= set(summary["original"]) and "nudenet" in summary["safe"]["scores"]
    assert summary["request"]["num_inference_steps"] == 2
    assert summary["pipeline"] == "SaferStableDiffusionPipeline"


# ---------------------------------------------------------------------------------------------
# An SDXL base (issue 15 item 4): the class picked from model_index.json, the safe pair, --tiny_variant sdxl
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_folders(tmp_path_factory):
    """(tiny SDXL base folder, tiny two-encoder export folder)."""
    from safer_diffusion.testing import tiny_pipeline_folders

    return tiny_pipeline_folders(tmp_path_factory.mktemp("tiny_sdxl"), variant="sdxl")


def test_tiny_sdxl_smoke_test_exits_0():
    """`python demos/app.py --tiny --tiny_variant sdxl --smoke_test`: a tiny SDXL base and safe pair, one comparison."""
    run = subprocess.run([sys.executable, str(APP_PATH), "--tiny", "--tiny_variant", "sdxl", "--smoke_test"],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["ok"] is True and summary["pipeline"] == "SaferStableDiffusionXLPipeline"
    assert summary["encoders"] == ["original", "safe"] and summary["original_size"] == summary["safe_size"] == [64, 64]
    assert "nudenet" in summary["safe"]["scores"] and summary["similarity"]["reference"] == "original"


def test_an_sdxl_base_from_local_folders_with_the_bigg_as_safe_encoder_2(capsys, sdxl_folders):
    base, pair = sdxl_folders
    argv = ["--base", str(base), "--safe_encoder", str(pair / "text_encoder"), "--safe_encoder_2", str(pair / "text_encoder_2"),
            "--device", "cpu", "--smoke_test"]  # fmt: skip
    assert app.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["pipeline"] == "SaferStableDiffusionXLPipeline" and summary["image_sizes"]["safe"] == [64, 64]


@pytest.mark.parametrize(
    "argv, message",
    [
        (lambda sd, xl: ["--tiny_variant", "sdxl"],
         r"`--tiny_variant` sdxl picks the tiny models of `--tiny`; add `--tiny`, or drop `--tiny_variant`"),
        (lambda sd, xl: ["--tiny", "--safe_encoder_2", "./big-g"],
         r"`--tiny` builds its own models: do not combine it with `--base` or `--safe_encoder` \(or `--safe_encoder_2`\)"),
        (lambda sd, xl: ["--base", str(sd[0]), "--safe_encoder", str(sd[1]), "--safe_encoder_2", str(xl[1])],
         r"`--safe_encoder_2` is for SDXL bases \(two text encoders\), but `--base` '.*' is a Stable Diffusion 1\.x/2\.x pipeline"),
        (lambda sd, xl: ["--base", str(xl[0])],
         r"`--base` '.*' is SDXL, which conditions on two text encoders .*the default `--safe_encoder` Adeely93/SafeR_CLIP is a "
         r"ViT-L/14 only"),
        (lambda sd, xl: ["--base", str(xl[0]), "--safe_encoder", str(sd[1])],
         r"`--safe_encoder`='.*' is one text encoder, but an SDXL base conditions on two: .*or the second encoder as "
         r"`--safe_encoder_2=`"),
        (lambda sd, xl: ["--tiny", "--tiny_variant", "sd3"], r"argument --tiny_variant/--tiny-variant: invalid choice: 'sd3'"),
    ],
    ids=["variant_without_tiny", "tiny_with_safe_encoder_2", "safe_encoder_2_for_sd", "sdxl_default_encoder",
         "sdxl_one_encoder", "unknown_variant"],
)
def test_sdxl_encoder_options_that_cannot_fit_exit_2_before_loading(capsys, monkeypatch, tiny_folders, sdxl_folders, argv,
                                                                     message):  # fmt: skip
    _forbid_model_loading(monkeypatch)
    assert app.main([*argv(tiny_folders, sdxl_folders), "--smoke_test"]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 or "usage:" in err


# ---------------------------------------------------------------------------------------------
# In process, served: blur over HTTP, and generated files deleted after a bounded age
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flagging_server(flagging_pipe):
    """The app on the always-flagging tiny pipeline, launched in process with the real launch settings and
    ``delete_cache=(1, 2)`` (the app's default is DELETE_CACHE; short here so the test can watch it)."""
    demo = app.build_demo(app.CompareService(flagging_pipe), default_size=64, default_steps=2, delete_cache=(1, 2))
    demo.queue(max_size=8)
    port = _free_port()
    _, url, _ = demo.launch(**app.launch_settings(app.DemoConfig(port=port), port), prevent_thread_lock=True, quiet=True)
    try:
        yield url
    finally:
        demo.close()


def _image_paths(events) -> list[Path]:
    (name, data), = [e for e in events if e[0] in ("complete", "error")]  # fmt: skip
    assert name == "complete", data
    return [Path(data[0]["path"]), Path(data[1]["path"])]


def test_over_http_a_flagged_image_is_blurred_unless_reveal_is_true(flagging_server, flagging_pipe):
    request = _request(seed=1)
    raw = app.CompareService(flagging_pipe).run(app.CompareService(flagging_pipe).validate(*request[:7]))
    status, blurred_events = _call(flagging_server, request)
    blurred = [Image.open(path) for path in _image_paths(blurred_events)]
    assert status == 200 and blurred_events[-1][1][5]["original"]["blurred"] is True
    assert _detail(blurred[0]) < 0.5 * _detail(raw.original.image) and _detail(blurred[1]) < 0.5 * _detail(raw.safe.image)
    for bad in NOT_BOOLEANS:
        status, events = _call(flagging_server, _request(seed=1, reveal=bad))
        assert [name for name, _ in events] == ["error"], (bad, events)
        assert "`reveal` must be true or false" in json.dumps(events[0][1]), events
    revealed = [Image.open(path) for path in _image_paths(_call(flagging_server, _request(seed=1, reveal=True))[1])]
    assert np.array_equal(np.asarray(revealed[0].convert("RGB")), np.asarray(raw.original.image.convert("RGB")))


def test_generated_files_are_deleted_after_a_bounded_age(flagging_server):
    paths = _image_paths(_call(flagging_server, _request(seed=2))[1])
    assert all(path.is_file() for path in paths)
    deadline = time.monotonic() + 20
    while any(path.exists() for path in paths) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(path.exists() for path in paths), "delete_cache did not remove the generated files"


# ---------------------------------------------------------------------------------------------
# End to end: gradio_client and raw HTTP against `python demos/app.py --tiny`
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(demo_server):
    from gradio_client import Client

    return Client(demo_server, verbose=False)


def _predict(client, prompt="a red bicycle", negative="", seed=0, steps=2, guidance=7.5, width=64, height=64, reveal=False):
    return client.predict(prompt, negative, seed, steps, guidance, width, height, reveal, api_name="/compare")


def test_client_gets_two_images_verdicts_and_scores(client):
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert "/compare" in api and [p["label"] for p in api["/compare"]["parameters"]][:2] == ["Prompt", "Negative prompt (optional)"]
    original, safe, original_verdict, safe_verdict, timing, details = _predict(client, seed=5)
    for path in (original, safe):
        with Image.open(path) as image:
            assert image.size == (64, 64) and image.format == "PNG"
    assert "Original CLIP:" in original_verdict and "SaFeR-CLIP:" in safe_verdict
    assert "for both images" in timing
    assert details["request"]["seed"] == 5 and details["request"]["num_inference_steps"] == 2
    for key in ("original", "safe"):
        assert "nudenet" in details[key]["scores"] and isinstance(details[key]["flagged"], bool)


def test_exposed_api_is_exactly_the_documented_endpoints(client, demo_server):
    api = client.view_api(return_format="dict", print_info=False)
    assert set(api["named_endpoints"]) == DOCUMENTED_ENDPOINTS and not api["unnamed_endpoints"]
    status, info = _http(demo_server, "gradio_api/info?all_endpoints=true")
    assert status == 200 and set(json.loads(info)["named_endpoints"]) == DOCUMENTED_ENDPOINTS
    status, config = _http(demo_server, "config")
    backend = [d["api_name"] for d in json.loads(config)["dependencies"] if d["backend_fn"]]
    assert backend == ["compare"]  # every other event runs in the browser only


def test_helper_handlers_cannot_be_called(demo_server):
    for name in HELPER_NAMES:  # refused, or (a browser-only event's own name) an error without data
        status, events = _call(demo_server, [None, True], api_name=name)
        assert status != 200 or [event for event, _ in events if event != "heartbeat"] == ["error"], (name, events)
    # The queue takes any function index: every dependency but /compare has no backend function to run.
    dependencies = json.loads(_http(demo_server, "config")[1])["dependencies"]
    others = [d["id"] for d in dependencies if d["api_name"] != "compare"]
    assert others
    for fn_index in others:
        status, text = _http(demo_server, "gradio_api/queue/join",
                             {"data": [None, True], "fn_index": fn_index, "session_hash": f"probe{fn_index}"})  # fmt: skip
        assert status == 200, text
        _, stream = _http(demo_server, f"gradio_api/queue/data?session_hash=probe{fn_index}")
        completed = [json.loads(line[len("data: "):]) for line in stream.splitlines() if '"process_completed"' in line]
        assert completed and completed[0]["success"] is False and "data" not in completed[0]["output"], stream


@pytest.mark.parametrize("reveal", NOT_BOOLEANS)
def test_http_reveal_that_is_not_a_boolean_is_an_error_and_reveals_nothing(demo_server, reveal):
    status, events = _call(demo_server, _request(reveal=reveal))
    assert status == 200 and [name for name, _ in events] == ["error"], events
    message = json.dumps(events[0][1])
    assert "`reveal` must be true or false" in message and ".png" not in message


def test_uploads_are_refused(demo_server):
    boundary = "safer-diffusion-test"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.bin\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + b"x" * 4096 + f"\r\n--{boundary}--\r\n".encode()  # fmt: skip
    status, text = _http(demo_server, "gradio_api/upload", data=body,
                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})  # fmt: skip
    assert status == 413, text


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prompt": ""}, r"`prompt` is empty"),
        ({"prompt": "a cat\x00"}, r"`prompt` contains a NUL character"),
        ({"steps": 0}, r"`steps` must be between 1 and 100, got 0"),
        ({"steps": 250}, r"`steps` must be between 1 and 100, got 250"),
        ({"seed": 2**63}, r"`seed` must be between 0 and 9223372036854775807"),
        ({"guidance": 31}, r"`guidance` must be between 0 and 30, got 31"),
        ({"width": 100}, r"`width` must be a multiple of 8, got 100"),
        ({"height": 2048}, r"`height` must be between 64 and 1024, got 2048"),
        ({"prompt": "cat " * 80}, r"`prompt` is 82 tokens long"),
        ({"reveal": "false"}, r"`reveal` must be true or false"),
    ],
)
def test_client_invalid_inputs_get_the_ui_error(client, kwargs, match):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=match):
        _predict(client, **kwargs)


def test_twenty_concurrent_requests_all_succeed(demo_server, client, record_property):
    from gradio_client import Client

    clients = [Client(demo_server, verbose=False) for _ in range(20)]

    def one(i):
        start = time.perf_counter()
        result = _predict(clients[i], prompt=f"a red bicycle number {i}", seed=100 + i)
        return time.perf_counter() - start, result

    with ThreadPoolExecutor(max_workers=20) as pool:
        outcomes = list(pool.map(one, range(20)))
    latencies = sorted(seconds for seconds, _ in outcomes)
    for i, (_, (original, safe, _, _, _, details)) in enumerate(outcomes):
        assert details["request"]["seed"] == 100 + i and details["request"]["prompt"] == f"a red bicycle number {i}"
        assert Path(original).is_file() and Path(safe).is_file()
    # Concurrent requests did not disturb each other: the same request alone gives the same images.
    for i in (0, 13):
        original, safe, *_ = _predict(client, prompt=f"a red bicycle number {i}", seed=100 + i)
        for alone, together in ((original, outcomes[i][1][0]), (safe, outcomes[i][1][1])):
            assert np.array_equal(np.asarray(Image.open(alone)), np.asarray(Image.open(together)))

    p50 = statistics.median(latencies)
    p95 = latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))]
    record_property("latency_p50_s", round(p50, 3))
    record_property("latency_p95_s", round(p95, 3))
    print(f"\n20 concurrent /compare requests (--tiny, 2 steps, 64x64, --max-concurrency 2): "
          f"p50 {p50:.2f} s, p95 {p95:.2f} s, max {latencies[-1]:.2f} s")  # fmt: skip
