"""N-way `compare(text_encoders=...)`: one denoising loop for N encoders equals N separate generations (tiny models)."""

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)

from safer_diffusion.compare import BranchConditioning, check_max_batch, check_text_encoders, denoise_branches
from safer_diffusion.encoders import load_safe_text_encoder
from safer_diffusion.pipeline_output import SaferComparisonOutput, SaferStableDiffusionMultiCompareOutput
from safer_diffusion.pipeline_safer_stable_diffusion import SaferStableDiffusionPipeline
from safer_diffusion.scoring import ScoreResult
from safer_diffusion.testing import save_tiny_clip, tiny_clip_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 3
PROMPTS = ["a cat on a sofa", "a mountain lake"]
SCHEDULERS = {
    "pndm": (PNDMScheduler, 0.0),
    "ddim": (DDIMScheduler, 1.0),  # eta=1: DDIM draws noise from the generator at every step
    "euler_ancestral": (EulerAncestralDiscreteScheduler, 0.0),
    "dpm_multistep": (DPMSolverMultistepScheduler, 0.0),
}


def _gen(seed=0):
    return torch.Generator("cpu").manual_seed(seed)


@pytest.fixture(scope="module")
def pipe(tiny_folders):
    base, safe = tiny_folders
    p = SaferStableDiffusionPipeline.from_pretrained(base, safe_text_encoder=safe, keep_original_text_encoder=True)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def encoders():
    """Three tiny CLIP text encoders with different random weights (seeds 11, 12, 13)."""
    return {f"enc{seed}": load_safe_text_encoder(tiny_clip_model(seed=seed)) for seed in (11, 12, 13)}


def _separate(pipe, encoder, scheduler, **kwargs):
    """One ordinary generation with ``encoder`` as the text encoder (a vanilla diffusers pipeline)."""
    vanilla = StableDiffusionPipeline(
        vae=pipe.vae, text_encoder=encoder, tokenizer=pipe.tokenizer, unet=pipe.unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    vanilla.set_progress_bar_config(disable=True)
    return vanilla(**kwargs).images


class FlagBright:
    """Flags images whose mean brightness is above `level` (deterministic)."""

    name = "flag_bright"

    def __init__(self, level):
        self.level = level

    def score(self, images):
        return [ScoreResult(flagged=np.asarray(im).mean() / 255 > self.level, score=np.asarray(im).mean() / 255) for im in images]

    def describe(self):
        return {"name": self.name}


# ---------------------------------------------------------------- equivalence with separate generations
@pytest.mark.parametrize("scheduler_name", list(SCHEDULERS))
def test_n_way_compare_equals_n_separate_calls(pipe, encoders, scheduler_name):
    scheduler_cls, eta = SCHEDULERS[scheduler_name]
    original = pipe.scheduler
    # clip_sample=False as diffusers' pipeline __init__ would set it for the separate calls' pipelines
    make = lambda: scheduler_cls.from_config(original.config, **({"clip_sample": False} if scheduler_cls is DDIMScheduler else {}))  # noqa: E731
    pipe.scheduler = make()
    common = dict(num_inference_steps=STEPS, num_images_per_prompt=2, negative_prompt=["blurry", "dark"], eta=eta, output_type="np")
    try:
        separate = {name: _separate(pipe, enc, make(), prompt=PROMPTS, generator=_gen(7), **common)
                    for name, enc in encoders.items()}  # fmt: skip
        names = list(encoders)
        for n in (1, 2, 3):
            chosen = {name: encoders[name] for name in names[:n]}
            out = pipe.compare(PROMPTS, text_encoders=chosen, generator=_gen(7), **common)
            assert isinstance(out, SaferStableDiffusionMultiCompareOutput) and out.names == names[:n]
            assert list(out.images) == list(out.nsfw_content_detected) == list(out.nsfw_scores) == names[:n]
            for name in names[:n]:
                assert out.images[name].shape == (4, 64, 64, 3)
                np.testing.assert_allclose(out.images[name], separate[name], atol=1e-4, err_msg=f"{scheduler_name} N={n} {name}")
                assert out.nsfw_content_detected[name] is None and out.nsfw_scores[name] is None  # no scorer
        # chunked UNet batches (12 rows: 3 encoders x 2 halves x 2 images; 5 does not divide it) change nothing
        chunked = pipe.compare(PROMPTS, text_encoders=encoders, generator=_gen(7), max_batch=5, **common)
        for name in names:
            np.testing.assert_allclose(chunked.images[name], separate[name], atol=1e-4, err_msg=f"{scheduler_name} max_batch {name}")
    finally:
        pipe.scheduler = original
    for a, b in zip(names, names[1:]):  # different encoders really give different images
        assert np.abs(separate[a] - separate[b]).max() > 1e-2


def test_names_follow_the_given_order_and_aliases_are_the_pipelines_own(pipe, encoders):
    common = dict(num_inference_steps=2, output_type="np")
    out = pipe.compare("a red bicycle", text_encoders={"z": encoders["enc12"], "safe": "safe", "base": "original"},
                       generator=_gen(3), **common)  # fmt: skip
    assert out.names == ["z", "safe", "base"]
    default = pipe.compare("a red bicycle", generator=_gen(3), **common)  # today's compare(): original + safe, today's output class
    assert isinstance(default, SaferComparisonOutput)
    np.testing.assert_allclose(out.images["safe"], default.safe_images, atol=1e-5)
    np.testing.assert_allclose(out.images["base"], default.original_images, atol=1e-5)
    single = out.output("z")  # one encoder as a single generation's output
    assert single.images is out.images["z"] and single.nsfw_content_detected is None
    with pytest.raises(KeyError, match=r"No encoder named 'nope'; the names are \['z', 'safe', 'base'\]"):
        out.output("nope")
    assert len(out.to_tuple()) == 4


def test_without_guidance_and_no_negative_rows(pipe, encoders):
    kwargs = dict(num_inference_steps=2, guidance_scale=1.0, output_type="np")
    out = pipe.compare("a cat", text_encoders={"a": encoders["enc11"], "b": encoders["enc13"]}, generator=_gen(5), max_batch=1, **kwargs)
    for name, key in (("a", "enc11"), ("b", "enc13")):
        alone = _separate(pipe, encoders[key], PNDMScheduler.from_config(pipe.scheduler.config), prompt="a cat", generator=_gen(5), **kwargs)
        np.testing.assert_allclose(out.images[name], alone, atol=1e-4)


def test_a_source_folder_is_loaded_and_scores_come_per_name(pipe, tmp_path):
    folder = save_tiny_clip(tmp_path / "clip14", seed=14)
    pipe.nsfw_scorer = FlagBright(level=-1.0)  # flags everything
    try:
        out = pipe.compare(["a", "b"], text_encoders={"folder": str(folder), "safe": "safe"}, num_inference_steps=2,
                           generator=_gen(), output_type="pil")  # fmt: skip
        lat = pipe.compare("a", text_encoders={"folder": folder}, num_inference_steps=2, generator=_gen(), output_type="latent")
    finally:
        pipe.nsfw_scorer = None
    assert out.nsfw_content_detected == {"folder": [True, True], "safe": [True, True]}
    assert set(out.nsfw_scores["folder"][0]) == {"flag_bright"} and len(out.images["safe"]) == 2
    assert lat.images["folder"].shape == (1, 4, 32, 32) and lat.nsfw_content_detected == {"folder": None}
    loaded = load_safe_text_encoder(folder)
    alone = _separate(pipe, loaded, PNDMScheduler.from_config(pipe.scheduler.config), prompt="a", num_inference_steps=2,
                      generator=_gen(), output_type="latent")  # fmt: skip
    torch.testing.assert_close(lat.images["folder"], alone, atol=1e-4, rtol=1e-4)


def test_load_text_encoder_fits_the_pipeline(pipe, tmp_path):
    folder = save_tiny_clip(tmp_path / "c", seed=21)
    encoder = pipe.load_text_encoder(folder, argument="mine")
    assert encoder.dtype == pipe.text_encoder.dtype and encoder.config.hidden_size == pipe.unet.config.cross_attention_dim
    embeds, _ = pipe.encode_prompt("a cat", "cpu", 1, False, encoder=encoder)
    assert embeds.shape == (1, 77, 32) and pipe.text_encoder is not encoder  # the swap was undone


# ---------------------------------------------------------------- bad input: refused before any work
def _forbid_work(pipe, monkeypatch):
    def no_unet(*args, **kwargs):
        raise AssertionError("the UNet ran: the check came too late")

    monkeypatch.setattr(pipe.unet, "forward", no_unet)


@pytest.mark.parametrize(
    "text_encoders, error, pattern",
    [
        (["safe"], TypeError, r"`text_encoders` must be a dict \{name: encoder\}, got list"),
        ({}, ValueError, r"`text_encoders` is empty; give at least one \{name: encoder\} item"),
        ({"": "safe"}, ValueError, r"`text_encoders` names must be non-empty strings, got ''"),
        ({3: "safe"}, ValueError, r"`text_encoders` names must be non-empty strings, got 3"),
        ({"a": 3}, TypeError, r"`text_encoders\['a'\]` must be 'original', 'safe', a loaded text encoder .*got int"),
        ({"a": None}, TypeError, r"`text_encoders\['a'\]` must be .*got NoneType"),
        ({"a": "  "}, ValueError, r"`text_encoders\['a'\]` is empty"),
        ({"a": "safe", "b": "/nonexistent/encoder"}, FileNotFoundError, r"`text_encoders\['b'\]`='/nonexistent/encoder'"),
    ],
)
def test_bad_text_encoders_are_refused_before_any_work(pipe, monkeypatch, text_encoders, error, pattern):
    _forbid_work(pipe, monkeypatch)
    with pytest.raises(error, match=pattern):
        pipe.compare("a cat", num_inference_steps=2, text_encoders=text_encoders)


@pytest.mark.parametrize("max_batch", [0, -1, 1.5, True, "4"])
def test_bad_max_batch_is_refused_before_loading(pipe, monkeypatch, max_batch, tmp_path):
    _forbid_work(pipe, monkeypatch)
    monkeypatch.setattr(type(pipe), "load_text_encoder", lambda *a, **k: pytest.fail("loaded before the inputs were checked"))
    with pytest.raises(ValueError, match=rf"`max_batch` must be a whole number >= 1 .*got {max_batch!r}"):
        pipe.compare("a cat", num_inference_steps=2, text_encoders={"x": str(tmp_path)}, max_batch=max_batch)
    with pytest.raises(ValueError, match=r"`num_inference_steps` must be a positive integer, got 0"):
        pipe.compare("a cat", num_inference_steps=0, text_encoders={"x": str(tmp_path)})


def test_an_encoder_of_the_wrong_width_is_named(pipe, monkeypatch, tmp_path):
    _forbid_work(pipe, monkeypatch)
    wide = save_tiny_clip(tmp_path / "wide", text_hidden_size=48)
    message = r"`text_encoders\['wide'\]` has width \(hidden_size\) 48, but the UNet's cross_attention_dim is 32"
    with pytest.raises(ValueError, match=message):
        pipe.compare("a cat", num_inference_steps=2, text_encoders={"safe": "safe", "wide": str(wide)})
    with pytest.raises(ValueError, match=message):  # a loaded module is checked too
        pipe.compare("a cat", num_inference_steps=2, text_encoders={"wide": load_safe_text_encoder(wide)})


def test_original_alias_needs_the_original_encoder_and_modules_the_pipelines_device(pipe, encoders, monkeypatch):
    light = SaferStableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
                                         scheduler=pipe.scheduler)  # fmt: skip
    light.set_progress_bar_config(disable=True)
    assert light.compare("a cat", num_inference_steps=1, text_encoders={"safe": "safe"}, output_type="latent").names == ["safe"]
    _forbid_work(pipe, monkeypatch)
    monkeypatch.setattr(type(pipe), "load_text_encoder", lambda *a, **k: pytest.fail("loaded before the aliases were checked"))
    with pytest.raises(ValueError, match=r"`text_encoders\['base'\]` is 'original', but the pipeline has no original text encoder"):
        light.compare("a cat", num_inference_steps=2, text_encoders={"x": "./some-folder", "base": "original"})
    meta = load_safe_text_encoder(tiny_clip_model(seed=30)).to("meta")
    with pytest.raises(ValueError, match=r"`text_encoders\['m'\]` is on meta, but the pipeline runs on cpu; move it first"):
        pipe.compare("a cat", num_inference_steps=2, text_encoders={"m": meta})


def test_check_helpers_directly():
    assert check_max_batch(None) is None and check_max_batch(8) == 8
    assert list(check_text_encoders({"b": "safe", "a": "original"})) == ["b", "a"]


def test_denoise_branches_checks_its_arguments(pipe):
    with pytest.raises(ValueError, match="2 branches need 2 schedulers and step kwargs, got 1 and 2"):
        denoise_branches(pipe, torch.zeros(1, 4, 8, 8), [BranchConditioning({}), BranchConditioning({})], [], [pipe.scheduler],
                         [{}, {}], do_classifier_free_guidance=False, guidance_scale=1.0)  # fmt: skip
    with pytest.raises(ValueError, match="Classifier-free guidance needs `uncond` conditioning in every branch"):
        denoise_branches(pipe, torch.zeros(1, 4, 8, 8), [BranchConditioning({"x": torch.zeros(1)})], [], [pipe.scheduler], [{}],
                         do_classifier_free_guidance=True, guidance_scale=7.5)  # fmt: skip


@pytest.mark.gpu
def test_n_way_compare_on_cuda_equals_separate_calls_and_works_with_cpu_offload(tiny_folders, encoders, tmp_path):
    base, safe = tiny_folders
    p = SaferStableDiffusionPipeline.from_pretrained(base, safe_text_encoder=safe, keep_original_text_encoder=True).to("cuda")
    p.set_progress_bar_config(disable=True)
    on_gpu = {name: enc.to("cuda") for name, enc in encoders.items()}
    common = dict(num_inference_steps=STEPS, output_type="np")
    out = p.compare("a cat", text_encoders=on_gpu, generator=torch.Generator("cuda").manual_seed(0), **common)
    for name, enc in on_gpu.items():
        alone = _separate(p, enc, PNDMScheduler.from_config(p.scheduler.config), prompt="a cat",
                          generator=torch.Generator("cuda").manual_seed(0), **common)  # fmt: skip
        np.testing.assert_allclose(out.images[name], alone, atol=1e-3)
    offloaded = SaferStableDiffusionPipeline.from_pretrained(base, safe_text_encoder=safe, keep_original_text_encoder=True)
    offloaded.set_progress_bar_config(disable=True)
    offloaded.enable_model_cpu_offload()
    folder = save_tiny_clip(tmp_path / "c", seed=40)
    cmp = offloaded.compare("a cat", text_encoders={"original": "original", "folder": str(folder)},
                            generator=torch.Generator("cuda").manual_seed(0), **common)  # fmt: skip
    assert cmp.images["folder"].shape == (1, 64, 64, 3) and np.isfinite(cmp.images["folder"]).all()
