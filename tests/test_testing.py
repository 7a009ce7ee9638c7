"""The tiny-component factory: real tokenizer, deterministic tiny pipelines, offline hub layout."""

import numpy as np
import pytest
import torch

from safer_diffusion import testing

TEXTS = [
    "a photo of an astronaut riding a horse",
    "Héllo wörld, naïve café — crème brûlée!",
    "emoji time 🚀🔥🐍 and ✨sparkles✨",
    "punctuation!!! (brackets) [square] {curly}; semi:colon... 'quotes' \"double\"",
    "  MULTIPLE   spaces\tand\nnewlines  ",
    "it's, don't, we'll, they've, I'm, she'd",
    "numbers 1234 and 5.67 and 8,900",
    "日本語のテキスト and Ελληνικά",
]


def _pipe(components):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def test_tokenizer_is_the_real_clip_vocabulary(clip_tokenizer):
    assert len(clip_tokenizer) == testing.CLIP_VOCAB_SIZE == 49408
    assert clip_tokenizer.model_max_length == 77
    assert clip_tokenizer.bos_token_id == 49406 and clip_tokenizer.eos_token_id == 49407


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_open_clip(clip_tokenizer, text):
    import open_clip

    ours = clip_tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids
    theirs = open_clip.get_tokenizer("ViT-L-14")([text])[0].tolist()
    end = theirs.index(49407)
    assert ours[: end + 1] == theirs[: end + 1]
    assert all(i == 49407 for i in ours[end + 1 :])  # SD 1.x pads with <|endoftext|>


def test_sd2_tokenizer_pads_with_bang():
    tok = testing.clip_tokenizer(pad_token="!")
    ids = tok("a cat", padding="max_length", max_length=77).input_ids
    assert ids[:4] == [49406, 320, 2368, 49407] and set(ids[4:]) == {0}


def test_tokenizer_rejects_unknown_pad():
    with pytest.raises(ValueError, match="`pad_token`"):
        testing.clip_tokenizer(pad_token="<pad>")


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_tiny_pipeline_is_deterministic(variant):
    def run():
        pipe = _pipe(testing.tiny_sd_components(seed=0, variant=variant))
        g = torch.Generator().manual_seed(0)
        return pipe("a red bicycle", num_inference_steps=2, generator=g, output_type="np").images

    a, b = run(), run()
    assert a.shape == (1, 64, 64, 3)
    np.testing.assert_array_equal(a, b)
    g = torch.Generator().manual_seed(1)
    c = _pipe(testing.tiny_sd_components(seed=0, variant=variant))("a red bicycle", num_inference_steps=2, generator=g, output_type="np").images
    assert np.abs(a - c).max() > 1e-3  # the seed matters


def test_sd2_variant_is_v_prediction():
    c = testing.tiny_sd_components(variant="sd2")
    assert c["scheduler"].config.prediction_type == "v_prediction"
    assert c["text_encoder"].config.hidden_act == "gelu"


def test_tiny_clip_fits_tiny_unet():
    clip = testing.tiny_clip_model()
    unet = testing.tiny_sd_components()["unet"]
    assert clip.text_model.config.hidden_size == unet.config.cross_attention_dim
    assert clip.text_model.config.max_position_embeddings == 77


def test_save_load_round_trip_reproduces_image(tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = _pipe(testing.tiny_sd_components(seed=0))
    ref = pipe("a lighthouse", num_inference_steps=2, generator=torch.Generator().manual_seed(3), output_type="np").images
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    out = loaded("a lighthouse", num_inference_steps=2, generator=torch.Generator().manual_seed(3), output_type="np").images
    np.testing.assert_array_equal(ref, out)


def test_hub_layout_loads_offline(tiny_folders):
    import os

    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel, CLIPTokenizer

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    base, safe = tiny_folders
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (base / sub).is_dir()
    assert list((base / "unet").glob("*.safetensors"))
    pipe = StableDiffusionPipeline.from_pretrained(base)
    assert pipe.tokenizer.vocab_size == 49408
    clip = CLIPModel.from_pretrained(safe)
    assert clip.text_model.config.hidden_size == pipe.unet.config.cross_attention_dim
    assert CLIPTokenizer.from_pretrained(safe)("a cat").input_ids == [49406, 320, 2368, 49407]


def test_hub_id_offline_fails_fast_with_clear_message(monkeypatch, no_network):
    import time

    from safer_diffusion.hub import HubUnavailableError, resolve_model_source

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(HubUnavailableError, match=r"HF_HUB_OFFLINE.*local folder.*--tiny"):
        resolve_model_source("CompVis/stable-diffusion-v1-4", argument="--base")
    assert time.monotonic() - t0 < 5


def test_missing_local_path_is_named(tmp_path):
    from safer_diffusion.hub import resolve_model_source

    with pytest.raises(FileNotFoundError, match="`--base`='.*nope'"):
        resolve_model_source(str(tmp_path / "nope"), argument="--base")


def test_local_folder_resolves(tiny_folders):
    from safer_diffusion.hub import resolve_model_source

    assert resolve_model_source(tiny_folders[0]) == str(tiny_folders[0])


def test_import_has_no_heavy_side_effects():
    import subprocess
    import sys

    code = "import sys, safer_diffusion; print(any(m in sys.modules for m in ('torch', 'diffusers', 'transformers')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
