"""Shared fixtures. Everything is offline and CPU-only; `slow` and `gpu` tests are opt-in."""

import os

# Set before any hub-aware library is imported: tests never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")
    parser.addoption("--rungpu", action="store_true", default=False, help="run tests marked gpu")


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--runslow") or os.environ.get("RUN_SLOW") == "1"
    run_gpu = config.getoption("--rungpu") or os.environ.get("RUN_GPU") == "1"
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: run with --runslow or RUN_SLOW=1"))
        if "gpu" in item.keywords and not run_gpu:
            item.add_marker(pytest.mark.skip(reason="gpu: run with --rungpu or RUN_GPU=1"))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Build tokenizer/tiny-model caches in a per-session folder, never in the user's home."""
    if "SAFER_DIFFUSION_CACHE" not in os.environ:
        os.environ["SAFER_DIFFUSION_CACHE"] = str(tmp_path_factory.mktemp("safer_diffusion_cache"))
    yield


@pytest.fixture(scope="session")
def clip_tokenizer():
    from safer_diffusion.testing import clip_tokenizer as build

    return build()


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory):
    """(base_folder, safe_clip_folder) of the tiny SD 1.x pipeline and tiny safe CLIPModel."""
    from safer_diffusion.testing import tiny_pipeline_folders

    return tiny_pipeline_folders(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def tiny_folders_sd2(tmp_path_factory):
    from safer_diffusion.testing import tiny_pipeline_folders

    return tiny_pipeline_folders(tmp_path_factory.mktemp("tiny_models_sd2"), variant="sd2")


@pytest.fixture(scope="session")
def sample_pairs_path():
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "assets" / "sample_pairs.jsonl"


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory):
    """URL of `python demos/app.py --tiny --max-concurrency 2` serving on a free local port (stopped at the end)."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    root, tmp = Path(__file__).resolve().parents[1], tmp_path_factory.mktemp("demo_server")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp / "gradio"), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(root / "demos" / "app.py"), "--tiny", "--port", str(port), "--max-concurrency", "2"]
    log_path = tmp / "server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
        url, deadline = f"http://127.0.0.1:{port}/", time.monotonic() + 240
        try:
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"the demo exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
                try:
                    urllib.request.urlopen(url + "config", timeout=2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        pytest.fail(f"the demo did not start within 240 s:\n{log_path.read_text()[-4000:]}")
                    time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tiny models on one intra-op thread (use with ``pytestmark``).

    Tiny models gain nothing from threads; on a shared 2-core machine two OpenMP threads stall
    each other (10x slower, erratic).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_network(monkeypatch):
    """Fail any attempt to open a network connection during the test (offline error paths must not try)."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"the test tried to open a network connection: {args!r}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
