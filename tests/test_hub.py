"""safer_diffusion.hub decides "offline" through huggingface_hub (its offline mode, its errors), never by probing sockets."""

import httpx2
import huggingface_hub
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError

from safer_diffusion import hub
from safer_diffusion.hub import HubUnavailableError, resolve_model_source


def _response(status: int) -> httpx2.Response:
    return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/owner/name"))


@pytest.fixture
def online(monkeypatch, no_network):
    """huggingface_hub in online mode, while any raw socket connection still fails the test (``no_network``)."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []

    def fake_repo_info(repo_id, **kwargs):  # what huggingface_hub's client returns (through any proxy)
        calls.append((repo_id, kwargs))
        return {"id": repo_id}

    monkeypatch.setattr(huggingface_hub, "repo_info", fake_repo_info)
    return calls


def test_offline_mode_is_huggingface_hubs_own(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub.is_offline()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert not hub.is_offline()


def test_proxy_only_network_is_not_offline(online):
    """No socket probe: behind an HTTPS proxy (raw connections refused) a hub id resolves when the hub client answers."""
    assert resolve_model_source("CompVis/stable-diffusion-v1-4", argument="--base", revision="main") == "CompVis/stable-diffusion-v1-4"
    [(repo_id, kwargs)] = online
    assert repo_id == "CompVis/stable-diffusion-v1-4" and kwargs["repo_type"] == "model" and kwargs["revision"] == "main"
    resolve_model_source("owner/data", repo_type="dataset")
    assert online[-1][1]["repo_type"] == "dataset"


@pytest.mark.parametrize(
    "error, kind, pattern",
    [
        (RepositoryNotFoundError("404", response=_response(404)), FileNotFoundError,
         r"`--base`='owner/name' is not an existing local path, nor a model repository on the Hugging Face Hub"),
        (GatedRepoError("403", response=_response(403)), HubUnavailableError,
         r"`--base`='owner/name' is a gated repository: accept its terms .*hf auth login"),
        (OfflineModeIsEnabled("offline"), HubUnavailableError, r"HF_HUB_OFFLINE=1 is set"),
        (httpx2.ConnectError("Connection refused"), HubUnavailableError,
         r"the Hugging Face Hub cannot be reached \(ConnectError: Connection refused\) .*HTTPS_PROXY.*--tiny"),
    ],
)
def test_hub_errors_become_one_clear_message(online, monkeypatch, error, kind, pattern):
    def failing(repo_id, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub, "repo_info", failing)
    monkeypatch.setattr(hub, "_cached", lambda *a: False)
    with pytest.raises(kind, match=pattern):
        resolve_model_source("owner/name", argument="--base")


def test_unreachable_hub_falls_back_to_the_cache(online, monkeypatch, caplog):
    def failing(repo_id, **kwargs):
        raise httpx2.ConnectError("Connection refused")

    monkeypatch.setattr(huggingface_hub, "repo_info", failing)
    monkeypatch.setattr(hub, "_cached", lambda *a: True)
    with caplog.at_level("WARNING", logger="safer_diffusion.hub"):
        assert resolve_model_source("owner/name") == "owner/name"
    assert "using the copy of 'owner/name' in the local hub cache" in caplog.text


def test_offline_and_not_cached_fails_fast_without_any_connection(monkeypatch, no_network):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnavailableError, match=r"`--safe_encoder`='owner/name' is a hub id, but HF_HUB_OFFLINE=1 .*--tiny"):
        resolve_model_source("owner/name", argument="--safe_encoder")


@pytest.mark.parametrize("value", [None, 123])
def test_source_of_the_wrong_type(value):
    with pytest.raises(TypeError, match=rf"`--base` must be a local path or a hub id \('owner/name'\), got {type(value).__name__}"):
        resolve_model_source(value, argument="--base")


@pytest.mark.parametrize("text", ["owner/", "/owner", "a/b/c", "./missing"])
def test_neither_path_nor_hub_id(text):
    with pytest.raises(FileNotFoundError, match="is not an existing local path and not a hub id of the form 'owner/name'"):
        resolve_model_source(text, argument="--base")

