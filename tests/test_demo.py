"""Tests of the Gradio demo (`demos/app.py`): input validation, rendering, startup errors, the
handler on the tiny pipeline, and `gradio_client` end to end against `python demos/app.py --tiny`."""

import importlib.util
import json
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

ROOT = Path(__file__).resolve().parents[1]
APP_PATH = ROOT / "demos" / "app.py"


def _load_app():
    if "demos.app" in sys.modules:
        return sys.modules["demos.app"]
    spec = importlib.util.spec_from_file_location("demos.app", APP_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


app = _load_app()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _checkerboard(size=64, cell=2) -> Image.Image:
    y, x = np.indices((size, size))
    board = (((x // cell) + (y // cell)) % 2 * 255).astype(np.uint8)
    return Image.fromarray(np.stack([board, board, board], axis=-1))


def _detail(image: Image.Image) -> float:
    """Mean absolute difference between horizontal neighbours: high for sharp detail, ~0 when hidden."""
    pixels = np.asarray(image.convert("L"), dtype=np.float32)
    return float(np.abs(np.diff(pixels, axis=1)).mean())


# ---------------------------------------------------------------------------------------------
# validate_request (pure)
# ---------------------------------------------------------------------------------------------


def test_validate_request_normalises_valid_inputs(clip_tokenizer):
    request = app.validate_request("  a red bicycle  ", "   ", 42.0, 4.0, "7.5", 64, 128.0, tokenizer=clip_tokenizer)
    assert request == app.GenerationRequest(
        prompt="a red bicycle", negative_prompt=None, seed=42, num_inference_steps=4, guidance_scale=7.5, height=128, width=64
    )
    assert isinstance(request.num_inference_steps, int) and isinstance(request.width, int)
    edge = app.validate_request("x", "blurry", 0, 1, 0, 1024, 64, tokenizer=clip_tokenizer)
    assert (edge.negative_prompt, edge.num_inference_steps, edge.guidance_scale, edge.width) == ("blurry", 1, 0.0, 1024)
    assert app.validate_request("x", seed=app.MAX_SEED).seed == 2**32 - 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prompt": ""}, r"`prompt` is empty"),
        ({"prompt": "   \n"}, r"`prompt` is empty"),
        ({"prompt": None}, r"`prompt` is empty"),
        ({"prompt": 3}, r"`prompt` must be text, got int"),
        ({"prompt": "a" * 1001}, r"`prompt` is 1001 characters long; the limit is 1000"),
        ({"prompt": "cat " * 80}, r"`prompt` is 82 tokens long; the CLIP text encoder reads at most 77"),
        ({"negative_prompt": "dog " * 90}, r"`negative_prompt` is 92 tokens long"),
        ({"seed": -1}, r"`seed` must be between 0 and 4294967295, got -1"),
        ({"seed": 2**32}, r"`seed` must be between 0 and 4294967295"),
        ({"seed": 1.5}, r"`seed` must be a whole number, got 1.5"),
        ({"seed": None}, r"`seed` must be a whole number, got None"),
        ({"steps": 0}, r"`steps` must be between 1 and 100, got 0"),
        ({"steps": 101}, r"`steps` must be between 1 and 100, got 101"),
        ({"steps": 2.5}, r"`steps` must be a whole number, got 2.5"),
        ({"steps": "many"}, r"`steps` must be a whole number, got 'many'"),
        ({"steps": True}, r"`steps` must be a whole number, got True"),
        ({"guidance": -0.5}, r"`guidance` must be between 0 and 30, got -0.5"),
        ({"guidance": 30.5}, r"`guidance` must be between 0 and 30, got 30.5"),
        ({"guidance": float("nan")}, r"`guidance` must be between 0 and 30, got nan"),
        ({"guidance": "high"}, r"`guidance` must be a number, got 'high'"),
        ({"width": 100}, r"`width` must be a multiple of 8, got 100"),
        ({"height": 1032}, r"`height` must be between 64 and 1024, got 1032"),
        ({"width": 56}, r"`width` must be between 64 and 1024, got 56"),
        ({"height": float("inf")}, r"`height` must be a whole number, got inf"),
    ],
)
def test_validate_request_rejects_bad_inputs(clip_tokenizer, kwargs, match):
    args = {"prompt": "a red bicycle", "negative_prompt": "", "seed": 0, "steps": 4, "guidance": 7.5, "width": 64, "height": 64}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        app.validate_request(**args, tokenizer=clip_tokenizer)


def test_token_limit_counts_start_and_end_tokens(clip_tokenizer):
    # "cat" is one token: 75 of them + start + end = 77 fits, 76 does not.
    assert app.validate_request("cat " * 75, tokenizer=clip_tokenizer).prompt.count("cat") == 75
    with pytest.raises(ValueError, match=r"is 78 tokens long"):
        app.validate_request("cat " * 76, tokenizer=clip_tokenizer)
    # Without a tokenizer only the character limit applies.
    assert app.validate_request("cat " * 76).prompt


# ---------------------------------------------------------------------------------------------
# Rendering helpers (pure)
# ---------------------------------------------------------------------------------------------


def test_obscure_hides_detail_and_keeps_size():
    image = _checkerboard()
    hidden = app.obscure(image)
    assert hidden.size == image.size and hidden.mode == "RGB"
    assert _detail(image) > 100 and _detail(hidden) < 0.05 * _detail(image)
    with pytest.raises(ValueError, match=r"`pixels` must be >= 1, got 0"):
        app.obscure(image, pixels=0)


def test_flagged_images_are_blurred_until_revealed():
    image = _checkerboard()
    flagged = app.ImageVerdict(image=image, flagged=True, scores={"nudenet": 0.91, "nudenet/FEMALE_BREAST_EXPOSED": 0.91})
    clean = app.ImageVerdict(image=image, flagged=False, scores={"nudenet": 0.02})
    unscored = app.ImageVerdict(image=image, flagged=None)

    assert _detail(app.shown_image(flagged, reveal=False)) < 0.05 * _detail(image)
    assert app.shown_image(flagged, reveal=True) is image
    assert app.shown_image(clean, reveal=False) is image

    text = app.verdict_markdown("Original CLIP", flagged, reveal=False)
    assert "Original CLIP: ⚠ flagged NSFW" in text and "scores: nudenet 0.91 ·" in text and "blurred" in text
    assert "revealed" in app.verdict_markdown("Original CLIP", flagged, reveal=True)
    clean_text = app.verdict_markdown("SaFeR-CLIP", clean, reveal=False)
    assert "SaFeR-CLIP: ✓ safe" in clean_text and "nudenet 0.02" in clean_text and "blurred" not in clean_text
    assert "not scored" in app.verdict_markdown("SaFeR-CLIP", unscored, reveal=False)

    request = app.validate_request("x", seed=3, steps=2, width=64, height=64)
    result = app.ComparisonResult(original=flagged, safe=clean, request=request, seconds=0.1234567, device="cpu", dtype="float32")
    details = result.details(revealed=False)
    assert details["original"] == {"flagged": True, "scores": {"nudenet": 0.91},
                                   "score_details": {"nudenet/FEMALE_BREAST_EXPOSED": 0.91}, "blurred": True}
    assert details["safe"] == {"flagged": False, "scores": {"nudenet": 0.02}, "score_details": {}, "blurred": False}
    assert details["request"]["seed"] == 3 and details["seconds"] == 0.1235
    assert result.details(revealed=True)["original"]["blurred"] is False
    assert "0.12 s for both images" in app.timing_markdown(result) and "seed 3" in app.timing_markdown(result)


def test_load_examples_reads_prompt_column_and_falls_back(tmp_path):
    (tmp_path / "benign.csv").write_text('prompt,category\n"a red bicycle, oil painting",x\n\na blue boat,y\n', encoding="utf-8")
    examples = app.load_examples(tmp_path, per_list=5)
    assert examples["benign"] == ["a red bicycle, oil painting", "a blue boat"]
    assert examples["mild_unsafe"] == app.BUILTIN_EXAMPLES["mild_unsafe"]  # file absent
    (tmp_path / "mild_unsafe.csv").write_text("text\nno prompt column\n", encoding="utf-8")
    assert app.load_examples(tmp_path)["mild_unsafe"] == app.BUILTIN_EXAMPLES["mild_unsafe"]
    assert len(app.load_examples(tmp_path, per_list=1)["benign"]) == 1

    bundled = app.load_examples()  # assets/prompts when present, else the built-in lists
    assert set(bundled) == {"benign", "mild_unsafe"} and all(bundled.values())


# ---------------------------------------------------------------------------------------------
# Command line and startup errors
# ---------------------------------------------------------------------------------------------


def test_parse_args_defaults():
    args = app.parse_args([])
    assert (args.base, args.safe_encoder, args.tiny, args.host, args.port, args.share) == (None, None, False, "127.0.0.1", None, False)
    assert (args.device, args.dtype, args.max_concurrency, args.smoke_test) == ("auto", "auto", 1, False)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--tiny", "--base", "x/y"], r"--tiny builds its own models: do not combine it with --base or --safe-encoder"),
        (["--tiny", "--safe-encoder", "./enc"], r"do not combine it with --base or --safe-encoder"),
        (["--port", "70000"], r"--port must be between 1 and 65535, got 70000"),
        (["--max-concurrency", "0"], r"--max-concurrency must be >= 1, got 0"),
        (["--queue-size", "0"], r"--queue-size must be >= 1, got 0"),
        (["--dtype", "float8"], r"argument --dtype: invalid choice: 'float8'"),
    ],
)
def test_parse_args_rejects_bad_flags(capsys, argv, match):
    with pytest.raises(SystemExit) as exc:
        app.parse_args(argv)
    assert exc.value.code == 2
    assert re.search(match, capsys.readouterr().err)


def _forbid_model_loading(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("models must not be loaded")

    monkeypatch.setattr(app, "load_pipeline", fail)


def test_port_in_use_is_an_error_before_loading_models(monkeypatch, capsys):
    _forbid_model_loading(monkeypatch)
    monkeypatch.setattr(app, "resolve_sources", lambda args: pytest.fail("the port must be checked first"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert not app.port_is_free("127.0.0.1", port)
        with pytest.raises(app.StartupError, match=rf"--port {port} is already in use on 127.0.0.1"):
            app.choose_port("127.0.0.1", port)
        assert app.main(["--tiny", "--port", str(port)]) == 2
    assert f"error: --port {port} is already in use" in capsys.readouterr().err
    free = _free_port()
    assert app.port_is_free("127.0.0.1", free) and app.choose_port("127.0.0.1", free) == free


def test_unreachable_default_models_exit_with_a_clear_message(monkeypatch, capsys, no_network):
    # conftest sets HF_HUB_OFFLINE=1, so the default hub ids cannot be loaded: no silent fallback to --tiny.
    _forbid_model_loading(monkeypatch)
    monkeypatch.setattr("safer_diffusion.hub._cached_on_disk", lambda repo_id: False)
    assert app.main(["--port", str(_free_port())]) == 2
    err = capsys.readouterr().err
    assert "error: Cannot load the models: `--base`='CompVis/stable-diffusion-v1-4' is a hub id, but HF_HUB_OFFLINE=1" in err
    assert "python demos/app.py --tiny" in err and "--base /path/to/stable-diffusion-v1-4 --safe-encoder /path/to/safer-clip" in err

    assert app.main(["--base", str(ROOT / "no-such-folder"), "--port", str(_free_port())]) == 2
    assert "is not an existing local path" in capsys.readouterr().err


def test_folders_that_are_not_models_exit_with_a_clear_message(tmp_path, tiny_folders, capsys):
    base, safe = tiny_folders
    (tmp_path / "empty").mkdir()
    assert app.main(["--base", str(tmp_path / "empty"), "--safe-encoder", str(safe), "--smoke-test"]) == 2
    err = capsys.readouterr().err
    assert f"error: could not load the models from --base {tmp_path / 'empty'}" in err and "--tiny" in err


def test_bad_device_and_dtype_are_startup_errors():
    torch = pytest.importorskip("torch")
    assert app.resolve_device_dtype("cpu", "auto") == (torch.device("cpu"), torch.float32)
    assert app.resolve_device_dtype("cpu", "bfloat16")[1] == torch.bfloat16
    with pytest.raises(app.StartupError, match=r"--dtype float16 is not supported on the CPU"):
        app.resolve_device_dtype("cpu", "float16")
    with pytest.raises(app.StartupError, match=r"--device 'toaster' is not a torch device"):
        app.resolve_device_dtype("toaster", "auto")
    if not torch.cuda.is_available():
        with pytest.raises(app.StartupError, match=r"--device cuda was asked for, but CUDA is not available"):
            app.resolve_device_dtype("cuda", "auto")


def test_help_runs_and_lists_the_flags():
    out = subprocess.run([sys.executable, str(APP_PATH), "--help"], capture_output=True, text=True, timeout=60, check=True).stdout
    for flag in ("--base", "--safe-encoder", "--tiny", "--host", "--port", "--share", "--device", "--dtype",
                 "--max-concurrency", "--smoke-test"):
        assert flag in out


# ---------------------------------------------------------------------------------------------
# The handler on the real tiny pipeline (in process)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pipe(tiny_folders):
    base, safe = tiny_folders
    return app.load_pipeline(str(base), str(safe), "cpu", pytest.importorskip("torch").float32)


def _count_compare_calls(monkeypatch, pipe):
    calls = []
    original = type(pipe).compare

    def counting(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "compare", counting)
    return calls


def test_generate_handler_one_compare_call_two_scored_images(tiny_pipe, monkeypatch):
    service = app.CompareService(tiny_pipe)
    generate, rerender = app.make_handlers(service)
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
    assert rerender(result, True)[0] is result.original.image


def test_generate_handler_turns_bad_inputs_into_ui_errors(tiny_pipe, monkeypatch):
    import gradio as gr

    generate, _ = app.make_handlers(app.CompareService(tiny_pipe))
    calls = _count_compare_calls(monkeypatch, tiny_pipe)
    with pytest.raises(gr.Error, match=r"`steps` must be between 1 and 100, got 0"):
        generate("a red bicycle", "", 0, 0, 7.5, 64, 64, False)
    with pytest.raises(gr.Error, match=r"`prompt` is empty"):
        generate("", "", 0, 2, 7.5, 64, 64, False)
    assert calls == []  # rejected before the model runs


def test_flagged_images_leave_the_server_blurred(tiny_folders):
    """With a real NudeNet scorer at threshold 0 every image is flagged: the UI gets blurred copies."""
    from safer_diffusion import SaferStableDiffusionPipeline
    from safer_diffusion.scoring import NudeNetScorer

    base, safe = tiny_folders
    pipe = SaferStableDiffusionPipeline.from_pretrained(
        str(base), safe_text_encoder=str(safe), nsfw_scorer=NudeNetScorer(threshold=0.0), keep_original_text_encoder=True)
    generate, rerender = app.make_handlers(app.CompareService(pipe))
    original, safe_image, original_verdict, safe_verdict, _, details, result = generate("a red bicycle", "", 1, 2, 7.5, 64, 64, False)
    assert result.original.flagged and result.safe.flagged
    assert details["original"]["blurred"] and details["safe"]["blurred"]
    assert "flagged NSFW" in original_verdict and "blurred" in safe_verdict
    for shown, raw in ((original, result.original.image), (safe_image, result.safe.image)):
        assert _detail(shown) < 0.5 * _detail(raw)
    revealed = rerender(result, True)
    assert revealed[0] is result.original.image and revealed[1] is result.safe.image and "revealed" in revealed[2]
    assert rerender(None, True)[0] is not None  # nothing generated yet: outputs left as they are


def test_compare_service_checks_its_arguments(tiny_pipe):
    with pytest.raises(ValueError, match=r"`concurrency` must be >= 1, got 0"):
        app.CompareService(tiny_pipe, concurrency=0)

    class NoOriginal:
        original_text_encoder = None

    with pytest.raises(ValueError, match=r"load it with `keep_original_text_encoder=True`"):
        app.CompareService(NoOriginal())


def test_worker_views_share_weights_not_schedulers(tiny_pipe):
    service = app.CompareService(tiny_pipe, concurrency=2)
    views = [service._views.get() for _ in range(2)]
    assert views[0] is tiny_pipe and views[1] is not tiny_pipe
    assert views[1].unet is tiny_pipe.unet and views[1].original_text_encoder is tiny_pipe.original_text_encoder
    assert views[1].scheduler is not tiny_pipe.scheduler


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
# End to end: gradio_client against `python demos/app.py --tiny`
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
          f"p50 {p50:.2f} s, p95 {p95:.2f} s, max {latencies[-1]:.2f} s")


def test_worker_views_do_not_share_per_call_state(tiny_pipe):
    """Concurrent requests must not share the scheduler or the fast tokenizer: the Rust tokenizer keeps
    the padding mode of its last call, and ``encode_prompt`` tokenizes with two different modes."""
    view = app._worker_view(tiny_pipe)
    assert view.unet is tiny_pipe.unet and view.text_encoder is tiny_pipe.text_encoder  # weights shared
    assert view.scheduler is not tiny_pipe.scheduler
    assert view.tokenizer is not tiny_pipe.tokenizer and view.tokenizer._tokenizer is not tiny_pipe.tokenizer._tokenizer
    tiny_pipe.tokenizer("a cat", padding="longest")  # leaves the shared backend in "longest" mode
    ids = view.tokenizer("a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
