"""Tests of the Gradio app (`demos/app.py`): the command line and its exit codes, startup errors, the app's
server-side surface, the handlers on the tiny pipeline, and end to end over HTTP against
`python demos/app.py --tiny` (gradio_client). Validation, rendering and the pipeline pool are
tested on their own in tests/test_demo_validation.py, test_demo_rendering.py and test_demo_service.py."""

import json
import logging
import re
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from demos import app

ROOT = Path(__file__).resolve().parents[1]
APP_PATH = ROOT / "demos" / "app.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _detail(image: Image.Image) -> float:
    """Mean absolute difference between horizontal neighbours: high for sharp detail, ~0 when hidden."""
    pixels = np.asarray(image.convert("L"), dtype=np.float32)
    return float(np.abs(np.diff(pixels, axis=1)).mean())


# ---------------------------------------------------------------------------------------------
# Command line: the shared options vocabulary, exit codes
# ---------------------------------------------------------------------------------------------


def test_parse_args_defaults():
    config = app.parse_args([])
    assert config == app.DemoConfig()
    assert (config.base, config.safe_encoder, config.tiny, config.host, config.port, config.share) == (
        None, None, False, "127.0.0.1", None, False)  # fmt: skip
    assert (config.device, config.dtype, config.max_concurrency, config.queue_size) == ("auto", "auto", 1, 64)
    assert (config.smoke_test, config.verbose) == (False, False)


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
                 "--max_concurrency", "--queue_size", "--smoke_test", "--verbose"):  # fmt: skip
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
    monkeypatch.setattr("safer_diffusion.hub._cached_on_disk", lambda repo_id: False)
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
        (("a red bicycle", "", 0, 2, float("nan"), 64, 64, False), r"`guidance` must be between 0 and 30, got nan"),
        (("a red bicycle", "", 0, 2, float("inf"), 64, 64, False), r"`guidance` must be between 0 and 30, got inf"),
        (("a red bicycle", "", 0, 2, 7.5, 100, 64, False), r"`width` must be a multiple of 8, got 100"),
    ],
)
def test_generate_handler_refuses_bad_inputs_before_any_work(tiny_pipe, monkeypatch, args, match):
    import gradio as gr

    generate, _ = app.make_handlers(app.CompareService(tiny_pipe))
    calls = _count_compare_calls(monkeypatch, tiny_pipe)
    with pytest.raises(gr.Error, match=match):
        generate(*args)
    assert calls == []  # rejected before the model runs


def test_flagged_images_leave_the_server_blurred(flagging_pipe):
    generate, rerender = app.make_handlers(app.CompareService(flagging_pipe))
    original, safe_image, original_verdict, safe_verdict, _, details, result = generate("a red bicycle", "", 1, 2, 7.5, 64, 64, False)
    assert result.original.flagged and result.safe.flagged
    assert details["original"]["blurred"] and details["safe"]["blurred"]
    assert "flagged NSFW" in original_verdict and "blurred" in safe_verdict
    for shown, raw in ((original, result.original.image), (safe_image, result.safe.image)):
        assert _detail(shown) < 0.5 * _detail(raw)
    revealed = rerender(result, True)
    assert revealed[0] is result.original.image and revealed[1] is result.safe.image and "revealed" in revealed[2]
    assert rerender(None, True)[0] is not None  # nothing generated yet: outputs left as they are


@pytest.mark.parametrize("mode", ["tiny", "local folders"])
def test_smoke_test_flag_runs_one_comparison(capsys, tiny_folders, mode):
    base, safe = tiny_folders
    argv = ["--tiny"] if mode == "tiny" else ["--base", str(base), "--safe-encoder", str(safe), "--device", "cpu"]
    assert app.main([*argv, "--smoke-test"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["ok"] is True and summary["original_size"] == summary["safe_size"] == [64, 64]
    assert {"flagged", "scores", "blurred"} <= set(summary["original"]) and "nudenet" in summary["safe"]["scores"]
    assert summary["request"]["num_inference_steps"] == 2


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


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prompt": ""}, r"`prompt` is empty"),
        ({"steps": 0}, r"`steps` must be between 1 and 100, got 0"),
        ({"steps": 250}, r"`steps` must be between 1 and 100, got 250"),
        ({"guidance": 31}, r"`guidance` must be between 0 and 30, got 31"),
        ({"width": 100}, r"`width` must be a multiple of 8, got 100"),
        ({"height": 2048}, r"`height` must be between 64 and 1024, got 2048"),
        ({"prompt": "cat " * 80}, r"`prompt` is 82 tokens long"),
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
