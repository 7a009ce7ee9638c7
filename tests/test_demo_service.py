"""Tests of the demo's model side (`demos/service.py`) on the real tiny pipeline: the pool of pipeline views,
validation with its own tokenizer, and one `compare()` call per request."""

import numpy as np
import pytest

from demos.rendering import ComparisonResult
from demos.service import CompareService, _worker_view, default_image_size, load_pipeline
from demos.validation import GenerationRequest


@pytest.fixture(scope="module")
def tiny_pipe(tiny_folders):
    base, safe = tiny_folders
    return load_pipeline(str(base), str(safe), "cpu", pytest.importorskip("torch").float32)


def test_compare_service_checks_its_arguments(tiny_pipe):
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match=r"`concurrency` must be >= 1, got "):
            CompareService(tiny_pipe, concurrency=bad)

    class NoOriginal:
        original_text_encoder = None

    with pytest.raises(ValueError, match=r"load it with `keep_original_text_encoder=True`"):
        CompareService(NoOriginal())
    with pytest.raises(TypeError, match=r"`request` must be a GenerationRequest \(from `validate`\), got dict"):
        CompareService(tiny_pipe).run({"prompt": "a cat"})


def test_run_draws_both_images_in_one_compare_call(tiny_pipe, monkeypatch):
    calls = []
    original_compare = type(tiny_pipe).compare

    def counting(self, *args, **kwargs):
        calls.append(kwargs)
        return original_compare(self, *args, **kwargs)

    monkeypatch.setattr(type(tiny_pipe), "compare", counting)
    service = CompareService(tiny_pipe)
    request = service.validate("a red bicycle", "blurry", 7, 2, 7.5, 64, 64)
    assert request == GenerationRequest("a red bicycle", "blurry", 7, 2, 7.5, 64, 64)
    result = service.run(request)
    assert isinstance(result, ComparisonResult) and len(calls) == 1
    assert calls[0]["negative_prompt"] == "blurry" and calls[0]["num_inference_steps"] == 2 and calls[0]["score"] is True
    assert result.original.image.size == result.safe.image.size == (64, 64)
    assert isinstance(result.original.flagged, bool) and "nudenet" in result.safe.scores
    assert (result.device, result.dtype) == ("cpu", "float32")
    again = service.run(request)  # same seed, same images
    assert np.array_equal(np.asarray(again.original.image), np.asarray(result.original.image))


def test_worker_views_share_weights_not_schedulers(tiny_pipe):
    service = CompareService(tiny_pipe, concurrency=2)
    views = [service._views.get() for _ in range(2)]
    assert views[0] is tiny_pipe and views[1] is not tiny_pipe
    assert views[1].unet is tiny_pipe.unet and views[1].original_text_encoder is tiny_pipe.original_text_encoder
    assert views[1].scheduler is not tiny_pipe.scheduler


def test_worker_views_do_not_share_per_call_state(tiny_pipe):
    """Concurrent requests must not share the scheduler or the fast tokenizer: the Rust tokenizer keeps
    the padding mode of its last call, and ``encode_prompt`` tokenizes with two different modes."""
    view = _worker_view(tiny_pipe)
    assert view.unet is tiny_pipe.unet and view.text_encoder is tiny_pipe.text_encoder  # weights shared
    assert view.scheduler is not tiny_pipe.scheduler
    assert view.tokenizer is not tiny_pipe.tokenizer and view.tokenizer._tokenizer is not tiny_pipe.tokenizer._tokenizer
    tiny_pipe.tokenizer("a cat", padding="longest")  # leaves the shared backend in "longest" mode
    ids = view.tokenizer("a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77


def test_validation_never_touches_a_tokenizer_a_generation_uses(tiny_pipe):
    """Validation counts tokens with ``truncation=False`` while generations run: on a shared fast tokenizer
    that would switch truncation off under a running ``encode_prompt``."""
    service = CompareService(tiny_pipe, concurrency=2)
    views = [service._views.get() for _ in range(2)]
    backends = [view.tokenizer._tokenizer for view in views]
    assert service.tokenizer._tokenizer not in backends
    for view in views:
        view.tokenizer("a cat", padding="max_length", max_length=77, truncation=True)
    before = [backend.truncation for backend in backends]
    assert all(state is not None and state["max_length"] == 77 for state in before)
    service.validate("cat " * 70)
    assert [backend.truncation for backend in backends] == before
    with pytest.raises(ValueError, match=r"`prompt` is 82 tokens long"):
        service.validate("cat " * 80)


def test_default_image_size_is_the_native_resolution(tiny_pipe):
    assert default_image_size(tiny_pipe) == 64

    class NoUnet:
        pass

    assert default_image_size(NoUnet()) == 512


# ---------------------------------------------------------------- more than two encoders (--encoders)
@pytest.fixture(scope="module")
def clip_folders(tmp_path_factory):
    from safer_diffusion.testing import save_tiny_clip

    root = tmp_path_factory.mktemp("encoders")
    return {"b": save_tiny_clip(root / "b", seed=21), "c": save_tiny_clip(root / "c", seed=22),
            "wide": save_tiny_clip(root / "wide", seed=23, text_hidden_size=48)}  # fmt: skip


def test_three_encoders_in_one_compare_call_with_ssim_to_the_original(tiny_pipe, clip_folders, monkeypatch):
    from demos.rendering import ssim
    from demos.service import load_encoders

    encoders = load_encoders(tiny_pipe, {"base": "original", "b": str(clip_folders["b"]), "c": str(clip_folders["c"])})
    assert encoders["base"] == "original" and all(not isinstance(encoders[n], str) for n in ("b", "c"))
    calls = []
    original_compare = type(tiny_pipe).compare

    def counting(self, *args, **kwargs):
        calls.append(kwargs)
        return original_compare(self, *args, **kwargs)

    monkeypatch.setattr(type(tiny_pipe), "compare", counting)
    service = CompareService(tiny_pipe, encoders=encoders, max_batch=3)
    assert service.names == ["base", "b", "c"] and service.reference == "base" and service.label("b") == "b"
    result = service.run(service.validate("a red bicycle", "", 4, 2, 7.5, 64, 64))
    assert len(calls) == 1 and calls[0]["text_encoders"] == encoders and calls[0]["max_batch"] == 3
    assert result.names == ["base", "b", "c"] and result.reference == "base" and set(result.similarity) == {"b", "c"}
    images = {name: np.asarray(v.image) for name, v in result.verdicts.items()}
    assert not np.array_equal(images["b"], images["c"])  # different encoders, different images
    for name in ("b", "c"):
        assert result.similarity[name] == pytest.approx(ssim(result.verdicts["base"].image, result.verdicts[name].image))
        assert -1 <= result.similarity[name] < 1
    assert "nudenet" in result.verdicts["c"].scores and isinstance(result.verdicts["b"].flagged, bool)


def test_default_pair_keeps_its_labels_and_reference(tiny_pipe):
    service = CompareService(tiny_pipe)
    assert service.names == ["original", "safe"] and service.reference == "original"
    assert (service.label("original"), service.label("safe")) == ("Original CLIP", "SaFeR-CLIP")
    result = service.run(service.validate("a red bicycle", steps=2, width=64, height=64))
    assert set(result.similarity) == {"safe"} and result.labels == {"original": "Original CLIP", "safe": "SaFeR-CLIP"}


def test_encoders_without_original_and_bad_encoders(tiny_pipe, clip_folders):
    from demos.service import load_encoders

    class NoOriginal:
        original_text_encoder = None

    service = CompareService(NoOriginal(), encoders={"x": "safe", "y": "safe"})  # no original needed: none shown
    assert service.reference == "x"
    with pytest.raises(ValueError, match=r"`encoders` is empty"):
        CompareService(tiny_pipe, encoders={})
    with pytest.raises(ValueError, match=r"`--encoders wide` has width \(hidden_size\) 48, but the UNet's cross_attention_dim is 32"):
        load_encoders(tiny_pipe, {"wide": str(clip_folders["wide"])})


# ---------------------------------------------------------------- an SDXL base
@pytest.fixture(scope="module")
def sdxl_pipe(tmp_path_factory):
    from safer_diffusion.testing import tiny_pipeline_folders

    base, pair = tiny_pipeline_folders(tmp_path_factory.mktemp("tiny_sdxl"), variant="sdxl")
    return load_pipeline(str(base), str(pair), "cpu", pytest.importorskip("torch").float32), base, pair


def test_an_sdxl_base_loads_its_class_and_worker_views_copy_both_tokenizers(sdxl_pipe):
    pipe, _, _ = sdxl_pipe
    assert type(pipe).__name__ == "SaferStableDiffusionXLPipeline" and pipe.original_text_encoder_2 is not None
    view = _worker_view(pipe)
    assert view.text_encoder_2 is pipe.text_encoder_2 and view.unet is pipe.unet  # weights shared
    assert view.tokenizer_2 is not pipe.tokenizer_2 and view.tokenizer_2._tokenizer is not pipe.tokenizer_2._tokenizer
    pipe.tokenizer_2("a cat", padding="longest")  # leaves the shared backend in "longest" mode
    assert len(view.tokenizer_2("a cat", padding="max_length", max_length=77, truncation=True).input_ids) == 77
    assert default_image_size(pipe) == 64


def test_an_sdxl_service_shows_a_third_pair_from_an_export_in_one_compare_call(sdxl_pipe, tmp_path):
    from demos.service import load_encoders
    from safer_diffusion.testing import save_tiny_clip, save_tiny_sdxl_export

    pipe, _, _ = sdxl_pipe
    encoders = load_encoders(pipe, {"base": "original", "paper": "safe", "mine": str(save_tiny_sdxl_export(tmp_path / "p", seed=9))})
    assert [type(e).__name__ for e in encoders["mine"]] == ["CLIPTextModel", "CLIPTextModelWithProjection"]
    service = CompareService(pipe, concurrency=2, encoders=encoders)
    result = service.run(service.validate("a red bicycle", "", 1, 2, 7.5, 64, 64))
    assert result.names == ["base", "paper", "mine"] and set(result.similarity) == {"paper", "mine"}
    assert all(v.image.size == (64, 64) and "nudenet" in v.scores for v in result.verdicts.values())
    with pytest.raises(ValueError, match=r"`--encoders one`='.*one' is one text encoder, but an SDXL base conditions on two"):
        load_encoders(pipe, {"one": str(save_tiny_clip(tmp_path / "one", seed=3))})
