"""Pipeline contract tests (in the spirit of diffusers' PipelineTesterMixin) on tiny real components, 2 steps."""

import inspect

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, StableDiffusionPipeline

from safer_diffusion.pipeline_output import SaferComparisonOutput, SaferStableDiffusionPipelineOutput
from safer_diffusion.pipeline_safer_stable_diffusion import SaferStableDiffusionPipeline
from safer_diffusion.scoring import ScoreResult

STEPS = 2

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gen(seed=0):
    return torch.Generator("cpu").manual_seed(seed)


@pytest.fixture(scope="module")
def pipe(tiny_folders):
    base, safe = tiny_folders
    p = SaferStableDiffusionPipeline.from_pretrained(base, safe_text_encoder=safe, keep_original_text_encoder=True)
    p.set_progress_bar_config(disable=True)
    return p


def _vanilla(pipe, encoder):
    v = StableDiffusionPipeline(
        vae=pipe.vae, text_encoder=encoder, tokenizer=pipe.tokenizer, unet=pipe.unet, scheduler=pipe.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    v.set_progress_bar_config(disable=True)
    return v


class FlagAll:
    """A scorer that flags every image whose mean brightness is above `level` (deterministic, for hook tests)."""

    name = "flag_all"

    def __init__(self, level=-1.0):
        self.level = level

    def score(self, images):
        return [ScoreResult(flagged=np.asarray(im).mean() / 255 > self.level, score=1.0, details={"mean": np.asarray(im).mean() / 255})
                for im in images]  # fmt: skip

    def describe(self):
        return {"name": self.name}


def test_call_keeps_every_parent_argument_and_default():
    parent = inspect.signature(StableDiffusionPipeline.__call__).parameters
    child = inspect.signature(SaferStableDiffusionPipeline.__call__).parameters
    assert list(parent) == list(child)
    for name, param in parent.items():
        assert child[name].default == param.default, name
        assert child[name].kind == param.kind, name
    assert "original_text_encoder" in SaferStableDiffusionPipeline.model_cpu_offload_seq


def test_components_and_safe_encoder_is_text_encoder(pipe, tiny_folders):
    from transformers import CLIPModel

    safe_clip = CLIPModel.from_pretrained(tiny_folders[1])
    w_safe = pipe.text_encoder.state_dict()["encoder.layers.0.mlp.fc1.weight"]
    assert torch.equal(w_safe, safe_clip.text_model.encoder.layers[0].mlp.fc1.weight)
    assert not torch.equal(w_safe, pipe.original_text_encoder.state_dict()["encoder.layers.0.mlp.fc1.weight"])
    assert pipe.nsfw_scorer is None and pipe.safety_mode == "flag"


def test_dict_and_tuple_outputs_equal(pipe):
    pipe.nsfw_scorer = FlagAll(level=2.0)  # scores everything, flags nothing
    try:
        out = pipe("a red bicycle", num_inference_steps=STEPS, generator=_gen(), output_type="np")
        tup = pipe("a red bicycle", num_inference_steps=STEPS, generator=_gen(), output_type="np", return_dict=False)
    finally:
        pipe.nsfw_scorer = None
    assert isinstance(out, SaferStableDiffusionPipelineOutput) and isinstance(tup, tuple) and len(tup) == 3
    np.testing.assert_array_equal(out.images, tup[0])
    assert out.nsfw_content_detected == tup[1] == [False]
    assert out.nsfw_scores == tup[2] and set(out.nsfw_scores[0]) == {"flag_all", "flag_all/mean"}
    plain = pipe("a red bicycle", num_inference_steps=STEPS, output_type="np", return_dict=False)
    assert len(plain) == 3 and plain[1] is None and plain[2] is None  # None fields keep their positions


def test_safe_call_equals_vanilla_pipeline_with_safe_encoder(pipe):
    ours = pipe(["a cat", "a dog"], num_inference_steps=STEPS, generator=_gen(3), output_type="np").images
    vanilla = _vanilla(pipe, pipe.text_encoder)(["a cat", "a dog"], num_inference_steps=STEPS, generator=_gen(3), output_type="np")
    np.testing.assert_array_equal(ours, vanilla.images)


def test_compare_equals_two_separate_calls(pipe):
    prompts = ["a cat on a sofa", "a mountain lake"]
    cmp = pipe.compare(prompts, num_inference_steps=STEPS, num_images_per_prompt=2, generator=_gen(7), output_type="np")
    assert isinstance(cmp, SaferComparisonOutput)
    safe = pipe(prompts, num_inference_steps=STEPS, num_images_per_prompt=2, generator=_gen(7), output_type="np").images
    orig = _vanilla(pipe, pipe.original_text_encoder)(
        prompts, num_inference_steps=STEPS, num_images_per_prompt=2, generator=_gen(7), output_type="np"
    ).images
    assert cmp.safe_images.shape == cmp.original_images.shape == (4, 64, 64, 3)
    np.testing.assert_allclose(cmp.safe_images, safe, atol=1e-4)
    np.testing.assert_allclose(cmp.original_images, orig, atol=1e-4)
    # the safe encoder really changes the image
    assert np.abs(cmp.safe_images - cmp.original_images).max() > 1e-2
    assert cmp.safe_nsfw_content_detected is None  # no scorer


@pytest.mark.parametrize("scheduler_cls", [EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler])
def test_compare_equals_separate_calls_with_stochastic_and_multistep_schedulers(pipe, scheduler_cls):
    original = pipe.scheduler
    pipe.scheduler = scheduler_cls.from_config(original.config)
    try:
        cmp = pipe.compare("a cat", num_inference_steps=3, generator=_gen(1), output_type="np", negative_prompt="blurry")
        safe = pipe("a cat", num_inference_steps=3, generator=_gen(1), output_type="np", negative_prompt="blurry").images
        orig = _vanilla(pipe, pipe.original_text_encoder)(
            "a cat", num_inference_steps=3, generator=_gen(1), output_type="np", negative_prompt="blurry"
        ).images
    finally:
        pipe.scheduler = original
    np.testing.assert_allclose(cmp.safe_images, safe, atol=1e-4)
    np.testing.assert_allclose(cmp.original_images, orig, atol=1e-4)


def test_compare_scores_both_branches_and_latent_output(pipe):
    pipe.nsfw_scorer = FlagAll(level=-1.0)
    try:
        cmp = pipe.compare(["a", "b"], num_inference_steps=STEPS, generator=_gen(), output_type="pil")
        unscored = pipe.compare(["a", "b"], num_inference_steps=STEPS, generator=_gen(), output_type="pil", score=False)
        lat = pipe.compare("a", num_inference_steps=STEPS, generator=_gen(), output_type="latent")
    finally:
        pipe.nsfw_scorer = None
    assert cmp.original_nsfw_content_detected == cmp.safe_nsfw_content_detected == [True, True]
    assert len(cmp.original_nsfw_scores) == 2 and "flag_all" in cmp.safe_nsfw_scores[0]
    assert unscored.safe_nsfw_scores is None
    np.testing.assert_array_equal(np.asarray(cmp.safe_images[0]), np.asarray(unscored.safe_images[0]))  # flag mode: untouched
    assert lat.safe_images.shape == (1, 4, 32, 32) and lat.safe_nsfw_content_detected is None


def test_batch_of_one_equals_item_in_batch_of_three(pipe):
    prompts = ["a cat", "a dog", "a red bicycle"]
    three = pipe(prompts, num_inference_steps=STEPS, generator=[_gen(i) for i in range(3)], output_type="np").images
    one = pipe(prompts[1], num_inference_steps=STEPS, generator=[_gen(1)], output_type="np").images
    np.testing.assert_allclose(one[0], three[1], atol=1e-4)


def test_encode_prompt_alone_and_encoder_choice(pipe):
    safe, neg_safe = pipe.encode_prompt("a cat", "cpu", 2, True)
    orig, neg_orig = pipe.encode_prompt("a cat", "cpu", 2, True, encoder="original")
    assert safe.shape == orig.shape == neg_safe.shape == (2, 77, 32)
    assert not torch.allclose(safe, orig)
    assert pipe.text_encoder is not pipe.original_text_encoder  # the swap was undone
    with pytest.raises(ValueError, match="`encoder` must be 'safe' or 'original', got 'both'"):
        pipe.encode_prompt("a cat", "cpu", 1, False, encoder="both")


def test_prompt_embeds_negative_prompt_clip_skip_and_callbacks(pipe):
    embeds, negative = pipe.encode_prompt("a cat", "cpu", 1, True, negative_prompt="blurry")
    by_embeds = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=STEPS, generator=_gen(), output_type="np")
    by_text = pipe("a cat", negative_prompt="blurry", num_inference_steps=STEPS, generator=_gen(), output_type="np")
    np.testing.assert_allclose(by_embeds.images, by_text.images, atol=1e-5)
    # clip_skip works (diffusers' own path breaks on transformers>=5's flattened CLIPTextModel) and changes the result
    skipped, _ = pipe.encode_prompt("a cat", "cpu", 1, False, clip_skip=1)
    ids = pipe.tokenizer("a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(skipped, pipe.text_encoder.final_layer_norm(hidden))
    steps = []
    pipe("a cat", num_inference_steps=STEPS, output_type="np", clip_skip=1,
         callback_on_step_end=lambda p, i, t, kw: steps.append(i) or kw)  # fmt: skip
    assert steps == list(range(pipe.num_timesteps)) and len(steps) >= STEPS


@pytest.mark.parametrize("mode", ["flag", "blur", "black"])
def test_safety_modes(pipe, mode):
    clean = pipe("a cat", num_inference_steps=STEPS, generator=_gen(), output_type="np").images
    pipe.nsfw_scorer, pipe.safety_mode = FlagAll(level=-1.0), mode
    try:
        out = pipe("a cat", num_inference_steps=STEPS, generator=_gen(), output_type="np")
    finally:
        pipe.nsfw_scorer, pipe.safety_mode = None, "flag"
    assert out.nsfw_content_detected == [True]
    if mode == "flag":
        np.testing.assert_allclose(out.images, clean, atol=1e-6)
    elif mode == "black":
        assert out.images.max() == 0.0
    else:
        assert np.abs(out.images - clean).max() > 0.01 and out.images.std() < clean.std() and out.images.max() > 0


def test_latent_output_is_not_scored(pipe):
    pipe.nsfw_scorer = FlagAll()
    try:
        out = pipe("a cat", num_inference_steps=STEPS, output_type="latent")
    finally:
        pipe.nsfw_scorer = None
    assert out.images.shape == (1, 4, 32, 32) and out.nsfw_content_detected is None and out.nsfw_scores is None


def test_scheduler_swap_and_nudenet_scores(pipe):
    original = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(original.config)
    pipe.nsfw_scorer = "nudenet"
    try:
        out = pipe(["a cat", "a dog"], num_inference_steps=STEPS, generator=_gen(), eta=1.0)
    finally:
        pipe.scheduler, pipe.nsfw_scorer = original, None
    assert out.nsfw_content_detected == [False, False]  # random tiny weights draw noise, nothing to detect
    assert [set(s) >= {"nudenet"} for s in out.nsfw_scores] == [True, True]


def test_save_load_round_trip(pipe, tmp_path):
    pipe.nsfw_scorer = {"name": "nudenet", "threshold": 0.75, "classes": ["FACE_FEMALE", "BUTTOCKS_EXPOSED"]}
    pipe.safety_mode = "blur"
    try:
        before = pipe("a cat", num_inference_steps=STEPS, generator=_gen(), output_type="np").images
        pipe.save_pretrained(tmp_path / "saved")
    finally:
        pipe.nsfw_scorer, pipe.safety_mode = None, "flag"
    loaded = SaferStableDiffusionPipeline.from_pretrained(tmp_path / "saved", keep_original_text_encoder=True)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.safety_mode == "blur"
    assert loaded.nsfw_scorer.threshold == 0.75 and loaded.nsfw_scorer.classes == ("FACE_FEMALE", "BUTTOCKS_EXPOSED")
    after = loaded("a cat", num_inference_steps=STEPS, generator=_gen(), output_type="np").images
    np.testing.assert_allclose(before, after, atol=1e-6)
    torch.testing.assert_close(loaded.original_text_encoder.state_dict(), pipe.original_text_encoder.state_dict())
    # without the original encoder
    light = SaferStableDiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert light.original_text_encoder is None
    with pytest.raises(ValueError, match="keep_original_text_encoder=True"):
        light.compare("a cat", num_inference_steps=STEPS)
    # overriding options at load time
    other = SaferStableDiffusionPipeline.from_pretrained(tmp_path / "saved", nsfw_scorer=None, safety_mode="black")
    assert other.nsfw_scorer is None and other.safety_mode == "black"


def test_unsavable_scorer_warns_and_saves_none(pipe, tmp_path, caplog):
    pipe.nsfw_scorer = FlagAll()
    try:
        with caplog.at_level("WARNING"):
            pipe.save_pretrained(tmp_path / "s")
    finally:
        pipe.nsfw_scorer = None
    assert "no serialisable config" in caplog.text
    assert SaferStableDiffusionPipeline.from_pretrained(tmp_path / "s").nsfw_scorer is None


def test_sd2_variant_v_prediction(tiny_folders_sd2):
    base, safe = tiny_folders_sd2
    p = SaferStableDiffusionPipeline.from_pretrained(base, safe_text_encoder=safe, keep_original_text_encoder=True)
    p.set_progress_bar_config(disable=True)
    assert p.scheduler.config.prediction_type == "v_prediction" and p.text_encoder.config.hidden_act == "gelu"
    assert p.tokenizer.pad_token == "!"
    cmp = p.compare("a cat", num_inference_steps=STEPS, generator=_gen(), output_type="np")
    safe_images = p("a cat", num_inference_steps=STEPS, generator=_gen(), output_type="np").images
    np.testing.assert_allclose(cmp.safe_images, safe_images, atol=1e-4)
    assert np.isfinite(safe_images).all() and np.abs(cmp.safe_images - cmp.original_images).max() > 1e-2


# ---------------------------------------------------------------- bad inputs
def test_bad_safety_mode(pipe, tiny_folders):
    with pytest.raises(ValueError, match=r"`safety_mode` must be one of \['flag', 'blur', 'black'\], got 'hide'"):
        pipe.safety_mode = "hide"
    with pytest.raises(ValueError, match="`safety_mode` must be one of"):
        SaferStableDiffusionPipeline.from_pretrained(tiny_folders[0], safe_text_encoder=tiny_folders[1], safety_mode="Blur")
    with pytest.raises(ValueError, match="`safety_mode` must be one of"):
        SaferStableDiffusionPipeline(**{**_components(pipe), "safety_mode": "off"})


def _components(pipe):
    return dict(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet, scheduler=pipe.scheduler)


def test_unknown_scorer_name(pipe):
    with pytest.raises(ValueError, match=r"Unknown scorer 'nudenett'. Valid names: \['nudenet', 'q16', 'safety_checker'\]"):
        SaferStableDiffusionPipeline(**_components(pipe), nsfw_scorer="nudenett")


def test_encoder_width_mismatch_names_both_numbers(pipe, tiny_folders, tmp_path):
    from safer_diffusion.testing import save_tiny_clip

    wide = save_tiny_clip(tmp_path / "wide", text_hidden_size=48)
    with pytest.raises(ValueError, match="width \\(hidden_size\\) 48, but the UNet's cross_attention_dim is 32"):
        SaferStableDiffusionPipeline.from_pretrained(tiny_folders[0], safe_text_encoder=wide)


def test_empty_and_bad_prompts(pipe):
    with pytest.raises(ValueError, match="`prompt` is an empty list"):
        pipe([], num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="`prompt` is an empty list"):
        pipe.compare([], num_inference_steps=STEPS)
    with pytest.raises(ValueError, match=r"`prompt\[1\]` is a int"):
        pipe.compare(["a", 3], num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="`num_images_per_prompt` must be a positive integer"):
        pipe.compare("a", num_images_per_prompt=0)


def test_missing_sources_and_offline_hub(tiny_folders, tmp_path, monkeypatch, no_network):
    """Bad sources fail up front. The two hub ids below are the error path the issue asks for (a hub id
    while offline): nothing is downloaded, and ``no_network`` makes any connection attempt fail the test."""
    from safer_diffusion.hub import HubUnavailableError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="`safe_text_encoder`='/nonexistent/encoder'"):
        SaferStableDiffusionPipeline.from_pretrained(tiny_folders[0], safe_text_encoder="/nonexistent/encoder")
    # default safe encoder is the paper's hub id: offline it fails fast and says so
    with pytest.raises(HubUnavailableError, match="`safe_text_encoder`='Adeely93/SafeR_CLIP'.*HF_HUB_OFFLINE"):
        SaferStableDiffusionPipeline.from_pretrained(tiny_folders[0])
    with pytest.raises(HubUnavailableError, match="`pretrained_model_name_or_path`='CompVis/stable-diffusion-v1-4'"):
        SaferStableDiffusionPipeline.from_pretrained("CompVis/stable-diffusion-v1-4", safe_text_encoder=tiny_folders[1])
    with pytest.raises(ValueError, match="either as `safe_text_encoder` or as `text_encoder`"):
        SaferStableDiffusionPipeline.from_pretrained(tiny_folders[0], safe_text_encoder=tiny_folders[1], text_encoder=object())


@pytest.mark.gpu
def test_model_cpu_offload_runs_call_and_compare(tiny_folders):
    base, safe = tiny_folders
    p = SaferStableDiffusionPipeline.from_pretrained(base, safe_text_encoder=safe, keep_original_text_encoder=True)
    p.set_progress_bar_config(disable=True)
    p.enable_model_cpu_offload()
    out = p("a cat", num_inference_steps=STEPS, generator=_gen(), output_type="np")
    cmp = p.compare("a cat", num_inference_steps=STEPS, generator=_gen(), output_type="np")
    np.testing.assert_allclose(cmp.safe_images, out.images, atol=1e-3)
    assert p.text_encoder.device.type == "cpu"  # offloaded again after the call


@pytest.mark.parametrize("key", ["torch_dtype", "dtype"])
def test_from_pretrained_dtype_names(tiny_folders, key):
    base, safe = tiny_folders
    p = SaferStableDiffusionPipeline.from_pretrained(base, safe_text_encoder=safe, keep_original_text_encoder=True,
                                                     **{key: torch.bfloat16})
    assert p.unet.dtype == p.text_encoder.dtype == p.original_text_encoder.dtype == torch.bfloat16


def test_from_pretrained_conflicting_dtypes(tiny_folders):
    base, safe = tiny_folders
    with pytest.raises(ValueError, match="either `torch_dtype`"):
        SaferStableDiffusionPipeline.from_pretrained(base, safe_text_encoder=safe, torch_dtype=torch.float16, dtype=torch.bfloat16)


# ---------------------------------------------------------------- components (the diffusers reuse idiom)
def test_components_have_the_vanilla_keys_and_build_other_pipelines(pipe):
    from diffusers import StableDiffusionImg2ImgPipeline

    vanilla_keys = set(StableDiffusionPipeline(**_components(pipe), safety_checker=None, feature_extractor=None).components)
    assert set(pipe.components) == vanilla_keys and "original_text_encoder" not in pipe.components
    assert pipe.original_text_encoder is not None  # kept, outside the registry
    text2img = StableDiffusionPipeline(**pipe.components)
    text2img.set_progress_bar_config(disable=True)
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    ours = pipe("a cat", num_inference_steps=STEPS, generator=_gen(), output_type="np").images
    theirs = text2img("a cat", num_inference_steps=STEPS, generator=_gen(), output_type="np").images
    np.testing.assert_array_equal(ours, theirs)  # the same (safe) encoder, the same weights
    out = img2img("a cat", image=torch.rand(1, 3, 64, 64), strength=0.5, num_inference_steps=4, generator=_gen(), output_type="np")
    assert out.images.shape == (1, 64, 64, 3)
    assert set(SaferStableDiffusionPipeline(**pipe.components).components) == vanilla_keys


def test_original_encoder_saved_in_its_own_subfolder_not_in_model_index(pipe, tmp_path):
    import json

    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert "original_text_encoder" not in index and index["_class_name"] == "SaferStableDiffusionPipeline"
    assert (tmp_path / "saved" / "original_text_encoder" / "model.safetensors").is_file()
    # a later save without the original encoder leaves no stale copy behind
    light = SaferStableDiffusionPipeline.from_pretrained(tmp_path / "saved")
    light.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / "original_text_encoder").exists()
    with pytest.raises(ValueError, match="was saved without an original text encoder .*original_text_encoder/"):
        SaferStableDiffusionPipeline.from_pretrained(tmp_path / "saved", keep_original_text_encoder=True)


def test_folder_saved_by_the_previous_layout_still_loads(pipe, tmp_path):
    """Earlier releases registered the original encoder as a component (a `model_index.json` entry)."""
    import json

    pipe.save_pretrained(tmp_path / "old")
    index_path = tmp_path / "old" / "model_index.json"
    index_path.write_text(json.dumps({**json.loads(index_path.read_text()), "original_text_encoder": ["transformers", "CLIPTextModel"]}))
    loaded = SaferStableDiffusionPipeline.from_pretrained(tmp_path / "old", keep_original_text_encoder=True)
    torch.testing.assert_close(loaded.original_text_encoder.state_dict(), pipe.original_text_encoder.state_dict())
    assert "original_text_encoder" not in loaded.components


def test_to_moves_the_original_encoder_and_cpu_offload_hooks_it(tiny_folders):
    base, safe = tiny_folders
    p = SaferStableDiffusionPipeline.from_pretrained(base, safe_text_encoder=safe, keep_original_text_encoder=True)
    p.set_progress_bar_config(disable=True)
    p.to(torch.bfloat16)
    assert p.original_text_encoder.dtype == p.text_encoder.dtype == torch.bfloat16
    p.to(dtype=torch.float32)
    assert p.original_text_encoder.dtype == torch.float32
    before = p.compare("a cat", num_inference_steps=STEPS, generator=_gen(), output_type="np")
    p.enable_model_cpu_offload(device="cpu")  # the accelerate hooks work on the CPU too
    assert hasattr(p.original_text_encoder, "_hf_hook") and hasattr(p.text_encoder, "_hf_hook")
    after = p.compare("a cat", num_inference_steps=STEPS, generator=_gen(), output_type="np")
    np.testing.assert_allclose(after.original_images, before.original_images, atol=1e-6)
    assert "original_text_encoder" not in p.components  # only inside the offload helpers
    p.remove_all_hooks()
    assert not hasattr(p.original_text_encoder, "_hf_hook")


def test_example_docstring_is_applied():
    doc = SaferStableDiffusionPipeline.__call__.__doc__
    assert "Examples:" in doc and "pipe.compare(" in doc and "keep_original_text_encoder=True" in doc


# ---------------------------------------------------------------- check_inputs: refused before any work
@pytest.mark.parametrize("method", ["call", "compare"])
@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"num_inference_steps": 0}, ValueError, r"`num_inference_steps` must be a positive integer, got 0; e\.g\."),
        ({"num_inference_steps": 2.5}, ValueError, r"`num_inference_steps` must be a positive integer, got 2\.5"),
        ({"num_inference_steps": -3}, ValueError, r"`num_inference_steps` must be a positive integer, got -3"),
        ({"num_inference_steps": True}, ValueError, r"`num_inference_steps` must be a positive integer, got True"),
        ({"guidance_scale": float("inf")}, ValueError, r"`guidance_scale` must be a finite number, got inf"),
        ({"guidance_scale": float("nan")}, ValueError, r"`guidance_scale` must be a finite number, got nan"),
        ({"guidance_scale": "7"}, ValueError, r"`guidance_scale` must be a finite number, got '7'"),
        ({"eta": float("nan")}, ValueError, r"`eta` must be a finite number, got nan"),
        ({"guidance_rescale": float("inf")}, ValueError, r"`guidance_rescale` must be a finite number, got inf"),
        ({"num_images_per_prompt": 0}, ValueError, r"`num_images_per_prompt` must be a positive integer, got 0"),
        ({"num_images_per_prompt": None}, ValueError, r"`num_images_per_prompt` must be a positive integer, got None"),
        ({"generator": 0}, TypeError, r"`generator` must be a torch\.Generator or a list of them .*got int: 0"),
        ({"generator": [0]}, TypeError, r"`generator` must be a torch\.Generator .*got a list holding a int"),
        ({"generator": [torch.Generator(), torch.Generator()]}, ValueError, r"`generator` is a list of 2 generators, but 1 image"),
        ({"latents": torch.zeros(1, 4, 3, 3)}, ValueError,
         r"`latents` has shape \(1, 4, 3, 3\), but height=64, width=64 and 1 image\(s\) need \(1, 4, 32, 32\)"),
        ({"latents": [[0.0]]}, TypeError, r"`latents` must be a torch\.Tensor"),
        ({"height": 60}, ValueError, r"`height` must be a positive multiple of 8, got 60"),
        ({"width": 64.0}, ValueError, r"`width` must be a positive multiple of 8, got 64\.0"),
        ({"height": 0}, ValueError, r"`height` must be a positive multiple of 8, got 0"),
    ],
)
def test_bad_generation_arguments_are_refused_up_front(pipe, method, kwargs, error, pattern, monkeypatch):
    def no_unet(*args, **kw):
        raise AssertionError("the UNet ran: the check came too late")

    monkeypatch.setattr(pipe.unet, "forward", no_unet)
    run = pipe.compare if method == "compare" else pipe
    with pytest.raises(error, match=pattern):
        run("a cat", **{"num_inference_steps": STEPS, **kwargs})


def test_width_alone_keeps_its_value_and_matching_latents_pass(pipe):
    out = pipe("a cat", width=128, num_inference_steps=STEPS, generator=_gen(), output_type="np")
    assert out.images.shape == (1, 64, 128, 3)  # the parent would give 64 x 64 (it replaces both sides)
    cmp = pipe.compare("a cat", height=128, num_inference_steps=STEPS, generator=_gen(), output_type="np")
    assert cmp.safe_images.shape == (1, 128, 64, 3)
    latents = torch.randn(2, 4, 32, 32, generator=_gen())
    out = pipe("a cat", num_images_per_prompt=2, latents=latents, num_inference_steps=STEPS, output_type="np")
    assert out.images.shape == (2, 64, 64, 3)


def test_compare_refuses_empty_prompts_but_call_keeps_diffusers_behaviour(pipe):
    with pytest.raises(ValueError, match=r"`prompt` is empty \(''\); `compare\(\)` compares how two encoders read a prompt"):
        pipe.compare("", num_inference_steps=STEPS)
    with pytest.raises(ValueError, match=r"`prompt\[1\]` is empty \('   '\)"):
        pipe.compare(["a cat", "   "], num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="`prompt` is required"):
        pipe.compare(None, num_inference_steps=STEPS)
    out = pipe("", num_inference_steps=STEPS, output_type="np")  # unconditional generation, as in diffusers
    assert out.images.shape == (1, 64, 64, 3)


@pytest.mark.parametrize("value", [None, 123, 1.5])
def test_from_pretrained_source_must_be_a_path_or_hub_id(value):
    with pytest.raises(TypeError, match=rf"`pretrained_model_name_or_path` must be a hub id .* got {type(value).__name__} {value!r}"):
        SaferStableDiffusionPipeline.from_pretrained(value)


def test_from_pretrained_accepts_dtype_names_and_refuses_others(tiny_folders):
    base, safe = tiny_folders
    p = SaferStableDiffusionPipeline.from_pretrained(base, safe_text_encoder=safe, torch_dtype="bfloat16")
    assert p.unet.dtype == p.text_encoder.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"`torch_dtype` must be a torch\.dtype \(e\.g\. torch\.float16\) or one of "
                                         r"\['float32', 'float16', 'bfloat16'\], got 'fp16'"):
        SaferStableDiffusionPipeline.from_pretrained(base, safe_text_encoder=safe, torch_dtype="fp16")
    with pytest.raises(TypeError, match=r"`dtype` must be a torch\.dtype .*got 32"):
        SaferStableDiffusionPipeline.from_pretrained(base, safe_text_encoder=safe, dtype=32)


def test_from_pretrained_refuses_pickle_only_weights(tiny_folders, tmp_path):
    import shutil

    base = shutil.copytree(tiny_folders[0], tmp_path / "base")
    weights = base / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(base / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match=r"unet' has weights only as pickle files \['diffusion_pytorch_model\.bin'\]; "
                                         r"this library loads safetensors only .*save_pretrained\(NEW_FOLDER\)"):
        SaferStableDiffusionPipeline.from_pretrained(base, safe_text_encoder=tiny_folders[1])
    with pytest.raises(ValueError, match="`use_safetensors=False` is not supported"):
        SaferStableDiffusionPipeline.from_pretrained(tiny_folders[0], safe_text_encoder=tiny_folders[1], use_safetensors=False)


def test_an_explicit_original_encoder_is_used_without_the_flag(pipe, tiny_folders):
    base, safe = tiny_folders
    p = SaferStableDiffusionPipeline.from_pretrained(base, safe_text_encoder=safe, original_text_encoder=pipe.original_text_encoder)
    assert p.original_text_encoder is pipe.original_text_encoder
    with pytest.raises(TypeError, match="`original_text_encoder` must be a CLIPTextModel \\(or None\\), got list"):
        SaferStableDiffusionPipeline(**_components(pipe), original_text_encoder=["transformers", "CLIPTextModel"])
