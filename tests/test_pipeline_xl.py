"""SaferStableDiffusionXLPipeline: the SD pipeline's contract for SDXL's two text encoders, on tiny real components
(diffusers' SDXL test sizes, the real CLIP tokenizers), 2-3 steps on the CPU."""

import copy
import inspect
import json

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)

from safer_diffusion.encoders import (
    check_sdxl_text_encoders,
    load_safe_text_encoder,
    load_safe_text_encoder_2,
    load_safe_text_encoder_pair,
    text_encoder_pair_folder,
)
from safer_diffusion.export_format import SDXL_TEXT_ENCODERS, TEXT_ENCODER_DIR, export_text_encoders, read_manifest
from safer_diffusion.pipeline_output import (
    SaferComparisonOutput,
    SaferStableDiffusionMultiCompareOutput,
    SaferStableDiffusionPipelineOutput,
)
from safer_diffusion.pipeline_safer_stable_diffusion import SaferStableDiffusionPipeline
from safer_diffusion.pipeline_safer_stable_diffusion_xl import SaferStableDiffusionXLPipeline
from safer_diffusion.pipelines import SUPPORTED_PIPELINES, load_safer_pipeline, safer_pipeline_class
from safer_diffusion.scoring import ScoreResult
from safer_diffusion.testing import (
    save_tiny_clip,
    save_tiny_sdxl_export,
    tiny_pipeline_folders,
    tiny_sdxl_text_configs,
    tiny_sdxl_text_encoders,
)

STEPS = 2
PROMPTS = ["a cat on a sofa", "a mountain lake"]
N_WAY_SCHEDULERS = {  # compare(text_encoders=) against separate calls
    "euler_ancestral": lambda config: EulerAncestralDiscreteScheduler.from_config(config),  # draws noise every step
    "pndm": lambda config: PNDMScheduler.from_config(config, skip_prk_steps=True),  # multistep: keeps a history
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gen(seed=0):
    return torch.Generator("cpu").manual_seed(seed)


@pytest.fixture(scope="module")
def sdxl_folders(tmp_path_factory):
    """(tiny SDXL base folder, tiny two-encoder export folder)."""
    return tiny_pipeline_folders(tmp_path_factory.mktemp("tiny_sdxl"), variant="sdxl")


@pytest.fixture(scope="module")
def pipe(sdxl_folders):
    base, safe = sdxl_folders
    p = SaferStableDiffusionXLPipeline.from_pretrained(base, safe_text_encoder=safe, keep_original_text_encoder=True)
    p.set_progress_bar_config(disable=True)
    return p


def _vanilla(pipe, pair, scheduler=None):
    v = StableDiffusionXLPipeline(
        vae=pipe.vae, text_encoder=pair[0], text_encoder_2=pair[1], tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer_2,
        unet=pipe.unet, scheduler=scheduler or pipe.scheduler, add_watermarker=False,
    )  # fmt: skip
    v.set_progress_bar_config(disable=True)
    return v


@pytest.fixture(scope="module")
def pairs():
    """Three tiny SDXL (text_encoder, text_encoder_2) pairs with different random weights (seeds 11, 12, 13)."""
    return {f"pair{seed}": tiny_sdxl_text_encoders(seed=seed) for seed in (11, 12, 13)}


def _originals(pipe):
    return pipe.original_text_encoder, pipe.original_text_encoder_2


def _components(pipe, **overrides):
    keys = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")
    return {**{k: getattr(pipe, k) for k in keys}, **overrides}


class FlagAll:
    """Flags every image whose mean brightness is above `level` (deterministic, for hook tests)."""

    name = "flag_all"

    def __init__(self, level=-1.0):
        self.level = level

    def score(self, images):
        return [ScoreResult(flagged=np.asarray(im).mean() / 255 > self.level, score=1.0, details={"mean": np.asarray(im).mean() / 255})
                for im in images]  # fmt: skip


# ---------------------------------------------------------------- the contract
def test_call_keeps_every_parent_argument_and_default():
    parent = inspect.signature(StableDiffusionXLPipeline.__call__).parameters
    child = inspect.signature(SaferStableDiffusionXLPipeline.__call__).parameters
    assert list(parent) == list(child)
    for name, param in parent.items():
        assert child[name].default == param.default, name
        assert child[name].kind == param.kind, name
    seq = SaferStableDiffusionXLPipeline.model_cpu_offload_seq.split("->")
    assert {"original_text_encoder", "original_text_encoder_2"} <= set(seq)
    doc = SaferStableDiffusionXLPipeline.__call__.__doc__
    assert "Examples:" in doc and "pipe.compare(" in doc and "text_encoder_2/" in doc


def test_safe_pair_is_swapped_in_and_originals_kept(pipe, sdxl_folders):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    safe = sdxl_folders[1]
    first = CLIPTextModel.from_pretrained(safe / "text_encoder")
    second = CLIPTextModelWithProjection.from_pretrained(safe / "text_encoder_2")
    torch.testing.assert_close(pipe.text_encoder.state_dict(), first.state_dict())
    torch.testing.assert_close(pipe.text_encoder_2.state_dict(), second.state_dict())
    key = "encoder.layers.0.mlp.fc1.weight"
    assert not torch.equal(pipe.text_encoder.state_dict()[key], pipe.original_text_encoder.state_dict()[key])
    assert not torch.equal(pipe.text_encoder_2.text_projection.weight, pipe.original_text_encoder_2.text_projection.weight)
    assert pipe.nsfw_scorer is None and pipe.safety_mode == "flag"


def test_components_are_the_vanilla_keys_and_img2img_works(pipe, sdxl_folders):
    vanilla_keys = set(StableDiffusionXLPipeline.from_pretrained(sdxl_folders[0]).components)
    assert set(pipe.components) == vanilla_keys
    assert "original_text_encoder" not in pipe.components and "original_text_encoder_2" not in pipe.components
    text2img = StableDiffusionXLPipeline(**pipe.components)
    text2img.set_progress_bar_config(disable=True)
    ours = pipe("a cat", num_inference_steps=STEPS, generator=_gen(), output_type="np").images
    theirs = text2img("a cat", num_inference_steps=STEPS, generator=_gen(), output_type="np").images
    np.testing.assert_array_equal(ours, theirs)  # the same (safe) pair, the same weights
    img2img = StableDiffusionXLImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    out = img2img("a cat", image=torch.rand(1, 3, 64, 64), strength=0.5, num_inference_steps=4, generator=_gen(), output_type="np")
    assert out.images.shape == (1, 64, 64, 3)
    assert set(SaferStableDiffusionXLPipeline(**pipe.components).components) == vanilla_keys


def test_deterministic_and_seeded(pipe):
    a = pipe(PROMPTS, num_inference_steps=STEPS, generator=_gen(3), output_type="np").images
    b = pipe(PROMPTS, num_inference_steps=STEPS, generator=_gen(3), output_type="np").images
    c = pipe(PROMPTS, num_inference_steps=STEPS, generator=_gen(4), output_type="np").images
    assert a.shape == (2, 64, 64, 3) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_safe_call_equals_vanilla_pipeline_with_the_safe_pair(pipe):
    ours = pipe(PROMPTS, num_inference_steps=STEPS, generator=_gen(3), output_type="np", negative_prompt=["dark", "blurry"])
    vanilla = _vanilla(pipe, (pipe.text_encoder, pipe.text_encoder_2))(
        PROMPTS, num_inference_steps=STEPS, generator=_gen(3), output_type="np", negative_prompt=["dark", "blurry"])
    assert isinstance(ours, SaferStableDiffusionPipelineOutput)
    np.testing.assert_array_equal(ours.images, vanilla.images)
    assert ours.nsfw_content_detected is None and ours.nsfw_scores is None  # no scorer


def test_pooled_text_embeds_come_from_the_safe_encoder_2(pipe):
    ids = pipe.tokenizer_2("a cat", padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    _, _, pooled, _ = pipe.encode_prompt("a cat", device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(pooled, pipe.text_encoder_2(ids).text_embeds)
    _, _, pooled_original, _ = pipe.encode_prompt("a cat", device="cpu", do_classifier_free_guidance=False, encoder="original")
    torch.testing.assert_close(pooled_original, pipe.original_text_encoder_2(ids).text_embeds)
    assert not torch.allclose(pooled, pooled_original)
    # change only the safe encoder_2's projection: the token states stay, the pooled text_embeds and the image change
    second = copy.deepcopy(pipe.text_encoder_2)
    with torch.no_grad():
        second.text_projection.weight.mul_(-3.0)
    other = SaferStableDiffusionXLPipeline(**_components(pipe, text_encoder_2=second))
    other.set_progress_bar_config(disable=True)
    states, _, pooled_other, _ = other.encode_prompt("a cat", device="cpu", do_classifier_free_guidance=False)
    states_ours, _, _, _ = pipe.encode_prompt("a cat", device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(states, states_ours)
    torch.testing.assert_close(pooled_other, -3.0 * pooled)
    before = pipe("a cat", num_inference_steps=STEPS, generator=_gen(), output_type="np").images
    after = other("a cat", num_inference_steps=STEPS, generator=_gen(), output_type="np").images
    assert np.abs(before - after).max() > 1e-3


def test_encode_prompt_encoder_choice(pipe):
    safe = pipe.encode_prompt("a cat", device="cpu", num_images_per_prompt=2)
    orig = pipe.encode_prompt("a cat", device="cpu", num_images_per_prompt=2, encoder="original")
    assert safe[0].shape == orig[0].shape == (2, 77, 64) and safe[2].shape == (2, 32)  # 32 + 32 concatenated; pooled 32
    assert not torch.allclose(safe[0], orig[0])
    assert pipe.text_encoder is not pipe.original_text_encoder and pipe.text_encoder_2 is not pipe.original_text_encoder_2
    with pytest.raises(ValueError, match="`encoder` must be 'safe' or 'original', got 'both'"):
        pipe.encode_prompt("a cat", device="cpu", encoder="both")


# ---------------------------------------------------------------- compare()
def test_compare_equals_two_separate_calls(pipe):
    cmp = pipe.compare(PROMPTS, num_inference_steps=STEPS, num_images_per_prompt=2, generator=_gen(7), output_type="np")
    assert isinstance(cmp, SaferComparisonOutput)
    safe = pipe(PROMPTS, num_inference_steps=STEPS, num_images_per_prompt=2, generator=_gen(7), output_type="np").images
    orig = _vanilla(pipe, _originals(pipe))(PROMPTS, num_inference_steps=STEPS, num_images_per_prompt=2, generator=_gen(7),
                                            output_type="np").images  # fmt: skip
    assert cmp.safe_images.shape == cmp.original_images.shape == (4, 64, 64, 3)
    np.testing.assert_allclose(cmp.safe_images, safe, atol=1e-4)
    np.testing.assert_allclose(cmp.original_images, orig, atol=1e-4)
    assert np.abs(cmp.safe_images - cmp.original_images).max() > 1e-2  # the safe pair really changes the image
    assert cmp.safe_nsfw_content_detected is None


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda c: EulerAncestralDiscreteScheduler.from_config(c),
        lambda c: PNDMScheduler.from_config(c, skip_prk_steps=True),
        lambda c: DPMSolverMultistepScheduler.from_config(c),
    ],
    ids=["euler_ancestral", "pndm", "dpm_multistep"],
)
def test_compare_equals_separate_calls_for_other_schedulers(pipe, make_scheduler):
    original = pipe.scheduler
    pipe.scheduler = make_scheduler(original.config)
    try:
        kw = dict(num_inference_steps=3, output_type="np", negative_prompt="blurry")
        cmp = pipe.compare("a cat", generator=_gen(1), **kw)
        safe = pipe("a cat", generator=_gen(1), **kw).images
        orig = _vanilla(pipe, _originals(pipe))("a cat", generator=_gen(1), **kw).images
    finally:
        pipe.scheduler = original
    np.testing.assert_allclose(cmp.safe_images, safe, atol=1e-4)
    np.testing.assert_allclose(cmp.original_images, orig, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"guidance_scale": 1.0},  # no classifier-free guidance: 2 rows per step, not 4
        {"negative_original_size": (32, 32), "negative_target_size": (64, 48), "crops_coords_top_left": (4, 0)},
        {"denoising_end": 0.6, "output_type": "latent"},  # the base half of a base + refiner run
        {"clip_skip": 1, "prompt_2": "an oil painting", "guidance_rescale": 0.7},
    ],
    ids=["no_cfg", "size_conditioning", "denoising_end", "clip_skip_prompt_2"],
)
def test_compare_options_equal_separate_calls(pipe, kwargs):
    kw = {"num_inference_steps": 3, "output_type": "np", **kwargs}
    cmp = pipe.compare("a cat", generator=_gen(2), **kw)
    safe = pipe("a cat", generator=_gen(2), **kw).images
    orig = _vanilla(pipe, _originals(pipe))("a cat", generator=_gen(2), **kw).images
    np.testing.assert_allclose(np.asarray(cmp.safe_images), np.asarray(safe), atol=1e-4)
    np.testing.assert_allclose(np.asarray(cmp.original_images), np.asarray(orig), atol=1e-4)


def test_compare_runs_one_unet_call_per_step(pipe, monkeypatch):
    calls = []
    forward = pipe.unet.forward

    def counting(sample, *args, **kwargs):
        calls.append((sample.shape[0], kwargs["encoder_hidden_states"].shape[0], kwargs["added_cond_kwargs"]["text_embeds"].shape))
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", counting)
    pipe.compare(PROMPTS, num_inference_steps=3, generator=_gen(), output_type="latent")
    assert calls == [(8, 8, (8, 32))] * 3  # 2 prompts x (original, safe) x (uncond, cond), pooled rows included


def test_compare_scores_both_branches_and_latent_output(pipe):
    pipe.nsfw_scorer = FlagAll(level=-1.0)
    try:
        cmp = pipe.compare(["a", "b"], num_inference_steps=STEPS, generator=_gen(), output_type="pil")
        unscored = pipe.compare(["a", "b"], num_inference_steps=STEPS, generator=_gen(), output_type="pil", score=False)
        lat = pipe.compare("a", num_inference_steps=STEPS, generator=_gen(), output_type="latent")
    finally:
        pipe.nsfw_scorer = None
    assert cmp.original_nsfw_content_detected == cmp.safe_nsfw_content_detected == [True, True]
    assert len(cmp.original_nsfw_scores) == 2 and set(cmp.safe_nsfw_scores[0]) == {"flag_all", "flag_all/mean"}
    assert unscored.safe_nsfw_scores is None
    np.testing.assert_array_equal(np.asarray(cmp.safe_images[0]), np.asarray(unscored.safe_images[0]))  # flag: untouched
    assert lat.safe_images.shape == (1, 4, 32, 32) and lat.safe_nsfw_content_detected is None


def test_compare_needs_the_original_pair_and_text(pipe, sdxl_folders):
    light = SaferStableDiffusionXLPipeline.from_pretrained(sdxl_folders[0], safe_text_encoder=sdxl_folders[1])
    assert light.original_text_encoder is None and light.original_text_encoder_2 is None
    with pytest.raises(ValueError, match=r"`compare\(\)` needs the base model's text encoders: .*keep_original_text_encoder=True"):
        light.compare("a cat", num_inference_steps=STEPS)
    with pytest.raises(ValueError, match=r"`encoder='original'` needs the base model's text encoders"):
        light.encode_prompt("a cat", device="cpu", encoder="original")
    with pytest.raises(ValueError, match=r"`prompt` is empty \(''\); `compare\(\)` compares how two encoders read a prompt"):
        pipe.compare("", num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="`prompt` is required"):
        pipe.compare(None, num_inference_steps=STEPS)
    out = pipe("", num_inference_steps=STEPS, output_type="np")  # unconditional generation, as in diffusers
    assert out.images.shape == (1, 64, 64, 3)
    with pytest.raises(ValueError, match="`original_text_encoder` was given without `original_text_encoder_2`"):
        SaferStableDiffusionXLPipeline(**_components(pipe), original_text_encoder=pipe.original_text_encoder)
    with pytest.raises(TypeError, match="`original_text_encoder_2` must be a CLIP text encoder module"):
        SaferStableDiffusionXLPipeline(**_components(pipe), original_text_encoder=pipe.original_text_encoder,
                                       original_text_encoder_2="text_encoder_2")  # fmt: skip


# ---------------------------------------------------------------- N-way compare(text_encoders=...): equals N separate calls
@pytest.mark.parametrize("scheduler_name", list(N_WAY_SCHEDULERS))
def test_n_way_compare_of_pairs_equals_n_separate_calls(pipe, pairs, scheduler_name):
    make = N_WAY_SCHEDULERS[scheduler_name]
    original = pipe.scheduler
    pipe.scheduler = make(original.config)
    common = dict(num_inference_steps=3, negative_prompt=["blurry", "dark"], output_type="np")
    try:
        separate = {name: _vanilla(pipe, pair, make(original.config))(PROMPTS, generator=_gen(7), **common).images
                    for name, pair in pairs.items()}  # fmt: skip
        names = list(pairs)
        for n in (1, 2, 3):
            chosen = {name: pairs[name] for name in names[:n]}
            out = pipe.compare(PROMPTS, text_encoders=chosen, generator=_gen(7), **common)
            assert isinstance(out, SaferStableDiffusionMultiCompareOutput) and out.names == names[:n]
            assert list(out.images) == list(out.nsfw_content_detected) == list(out.nsfw_scores) == names[:n]
            for name in names[:n]:
                assert out.images[name].shape == (2, 64, 64, 3)
                np.testing.assert_allclose(out.images[name], separate[name], atol=1e-4, err_msg=f"{scheduler_name} N={n} {name}")
                assert out.nsfw_content_detected[name] is None and out.nsfw_scores[name] is None  # no scorer
        # chunked UNet batches (12 rows: 3 pairs x 2 halves x 2 prompts; 5 does not divide it) change nothing
        chunked = pipe.compare(PROMPTS, text_encoders=pairs, generator=_gen(7), max_batch=5, **common)
        for name in names:
            np.testing.assert_allclose(chunked.images[name], separate[name], atol=1e-4, err_msg=f"{scheduler_name} max_batch {name}")
    finally:
        pipe.scheduler = original
    for a, b in zip(names, names[1:]):  # different pairs really give different images
        assert np.abs(separate[a] - separate[b]).max() > 1e-2


def test_n_way_unet_rows_per_step_and_max_batch_chunks(pipe, pairs, monkeypatch):
    calls = []
    forward = pipe.unet.forward

    def counting(sample, *args, **kwargs):
        added = kwargs["added_cond_kwargs"]
        calls.append((sample.shape[0], kwargs["encoder_hidden_states"].shape[0], added["text_embeds"].shape[0],
                      added["time_ids"].shape[0]))  # fmt: skip
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", counting)
    pipe.compare("a cat", text_encoders=pairs, num_inference_steps=2, generator=_gen(), output_type="latent", max_batch=4)
    assert calls == [(4, 4, 4, 4), (2, 2, 2, 2)] * 2  # 3 pairs x (uncond, cond) = 6 rows per step, in chunks of 4


def test_n_way_names_follow_the_given_order_and_aliases_are_the_pipelines_own(pipe, pairs):
    common = dict(num_inference_steps=2, output_type="np")
    out = pipe.compare("a red bicycle", text_encoders={"z": pairs["pair12"], "safe": "safe", "base": "original"},
                       generator=_gen(3), **common)  # fmt: skip
    assert out.names == ["z", "safe", "base"]
    default = pipe.compare("a red bicycle", generator=_gen(3), **common)  # today's compare(): original + safe pair
    assert isinstance(default, SaferComparisonOutput)
    np.testing.assert_allclose(out.images["safe"], default.safe_images, atol=1e-5)
    np.testing.assert_allclose(out.images["base"], default.original_images, atol=1e-5)
    assert out.output("z").images is out.images["z"]


def test_n_way_loads_a_two_encoder_export_and_scores_per_name(pipe, tmp_path):
    folder = save_tiny_sdxl_export(tmp_path / "pair14", seed=14)
    pipe.nsfw_scorer = FlagAll(level=-1.0)
    try:
        out = pipe.compare("a", text_encoders={"export": str(folder), "safe": "safe"}, num_inference_steps=2,
                           generator=_gen(), output_type="pil")  # fmt: skip
        lat = pipe.compare("a", text_encoders={"export": folder}, num_inference_steps=2, generator=_gen(), output_type="latent")
    finally:
        pipe.nsfw_scorer = None
    assert out.nsfw_content_detected == {"export": [True], "safe": [True]}
    assert set(out.nsfw_scores["export"][0]) == {"flag_all", "flag_all/mean"}
    assert lat.images["export"].shape == (1, 4, 32, 32) and lat.nsfw_content_detected == {"export": None}
    alone = _vanilla(pipe, load_safe_text_encoder_pair(folder), type(pipe.scheduler).from_config(pipe.scheduler.config))(
        "a", num_inference_steps=2, generator=_gen(), output_type="latent").images
    torch.testing.assert_close(lat.images["export"], alone, atol=1e-4, rtol=1e-4)
    loaded = pipe.load_text_encoder_pair(folder, argument="mine")
    assert [type(e).__name__ for e in loaded] == ["CLIPTextModel", "CLIPTextModelWithProjection"]
    assert loaded[0].dtype == pipe.text_encoder.dtype
    states, _, pooled, _ = pipe.encode_prompt("a cat", device="cpu", do_classifier_free_guidance=False, encoder=loaded)
    assert states.shape == (1, 77, 64) and pooled.shape == (1, 32) and pipe.text_encoder_2 is not loaded[1]


@pytest.fixture
def no_work(pipe, monkeypatch):
    def no_unet(*args, **kwargs):
        raise AssertionError("the UNet ran: the check came too late")

    monkeypatch.setattr(pipe.unet, "forward", no_unet)
    monkeypatch.setattr(type(pipe), "load_text_encoder_pair", lambda *a, **k: pytest.fail("loaded before the inputs were checked"))


@pytest.mark.parametrize(
    "make_value, error, pattern",
    [
        (lambda pairs: pairs["pair11"][0], TypeError,
         r"`text_encoders\['x'\]` is one text encoder \(CLIPTextModel\), but an SDXL pipeline conditions on two: pass the pair"),
        (lambda pairs: (*pairs["pair11"], pairs["pair12"][0]), TypeError,
         r"`text_encoders\['x'\]` must be a pair \(text_encoder, text_encoder_2\) of loaded text encoder modules, got a tuple of 3"),
        (lambda pairs: [pairs["pair11"][0], "b"], TypeError, r"got a list of 2 \(CLIPTextModel, str\)"),
        (lambda pairs: 3, TypeError, r"`text_encoders\['x'\]` must be 'original', 'safe', a pair \(text_encoder, text_encoder_2\)"),
        (lambda pairs: pairs["pair11"][::-1], ValueError,
         r"`text_encoders\['x'\]\[0\]` and `text_encoders\['x'\]\[1\]` are swapped"),
        (lambda pairs: tiny_sdxl_text_encoders(seed=3, hidden_size=48), ValueError,
         r"`text_encoders\['x'\]\[0\]` has width \(hidden_size\) 48, but the base's text_encoder"),
        (lambda pairs: "/nonexistent/pair", FileNotFoundError, r"`text_encoders\['x'\]`='/nonexistent/pair' is not an existing local path"),
    ],
    ids=["one_module", "three_modules", "not_modules", "int", "swapped", "too_wide", "missing_folder"],
)
def test_bad_text_encoder_pairs_are_refused_before_any_work(pipe, pairs, no_work, make_value, error, pattern):
    with pytest.raises(error, match=pattern):
        pipe.compare("a cat", num_inference_steps=2, text_encoders={"safe": "safe", "x": make_value(pairs)})


def test_n_way_names_a_single_encoder_export_a_wide_pair_and_a_missing_original(pipe, tmp_path, monkeypatch):
    single = save_tiny_sdxl_export(tmp_path / "single", text_encoders=("text_encoder",))
    with pytest.raises(ValueError, match=r"`text_encoders\['one'\]`='.*single' is a single-encoder export .*lacks the safe "
                                         r"text_encoder_2"):
        pipe.compare("a cat", num_inference_steps=2, text_encoders={"one": str(single)})
    wide = save_tiny_sdxl_export(tmp_path / "wide", seed=4, hidden_size=48)
    with pytest.raises(ValueError, match=r"`text_encoders\['wide'\]/text_encoder` has width \(hidden_size\) 48"):
        pipe.compare("a cat", num_inference_steps=2, text_encoders={"wide": str(wide)})
    light = SaferStableDiffusionXLPipeline(**_components(pipe))
    light.set_progress_bar_config(disable=True)
    monkeypatch.setattr(type(light), "load_text_encoder_pair", lambda *a, **k: pytest.fail("loaded before the aliases were checked"))
    with pytest.raises(ValueError, match=r"`text_encoders\['base'\]` is 'original', but the pipeline has no original text "
                                         r"encoders: .*\(or pass `original_text_encoder=` and `original_text_encoder_2=`\)"):
        light.compare("a cat", num_inference_steps=2, text_encoders={"x": "./some-pair", "base": "original"})
    meta = tuple(encoder.to("meta") for encoder in tiny_sdxl_text_encoders(seed=30))
    with pytest.raises(ValueError, match=r"`text_encoders\['m'\]\[0\]` is on meta, but the pipeline runs on cpu; move it first"):
        pipe.compare("a cat", num_inference_steps=2, text_encoders={"m": meta})


@pytest.mark.gpu
def test_n_way_compare_of_pairs_on_cuda_equals_separate_calls_and_works_with_cpu_offload(sdxl_folders, pairs):
    base, safe = sdxl_folders
    p = SaferStableDiffusionXLPipeline.from_pretrained(base, safe_text_encoder=safe, keep_original_text_encoder=True).to("cuda")
    p.set_progress_bar_config(disable=True)
    on_gpu = {name: tuple(copy.deepcopy(e).to("cuda") for e in pair) for name, pair in pairs.items()}  # the fixture stays on CPU
    common = dict(num_inference_steps=3, output_type="np")
    out = p.compare("a cat", text_encoders={**on_gpu, "safe": "safe"}, generator=torch.Generator("cuda").manual_seed(0), **common)
    for name, pair in {**on_gpu, "safe": (p.text_encoder, p.text_encoder_2)}.items():
        alone = _vanilla(p, pair, type(p.scheduler).from_config(p.scheduler.config))(
            "a cat", generator=torch.Generator("cuda").manual_seed(0), **common).images
        np.testing.assert_allclose(out.images[name], alone, atol=1e-3)
    offloaded = SaferStableDiffusionXLPipeline.from_pretrained(base, safe_text_encoder=safe, keep_original_text_encoder=True)
    offloaded.set_progress_bar_config(disable=True)
    offloaded.enable_model_cpu_offload()
    cmp = offloaded.compare("a cat", text_encoders={"original": "original", "export": str(safe)},
                            generator=torch.Generator("cuda").manual_seed(0), **common)  # fmt: skip
    assert cmp.images["export"].shape == (1, 64, 64, 3) and np.isfinite(cmp.images["export"]).all()


@pytest.mark.parametrize("max_batch", [0, 1.5, True])
def test_bad_max_batch_is_refused_before_loading_a_pair(pipe, no_work, max_batch):
    with pytest.raises(ValueError, match=rf"`max_batch` must be a whole number >= 1 .*got {max_batch!r}"):
        pipe.compare("a cat", num_inference_steps=2, text_encoders={"x": "./some-pair"}, max_batch=max_batch)


# ---------------------------------------------------------------- scores and safety modes
def test_dict_and_tuple_outputs_and_scores(pipe):
    pipe.nsfw_scorer = FlagAll(level=2.0)  # scores everything, flags nothing
    try:
        out = pipe("a red bicycle", num_inference_steps=STEPS, generator=_gen(), output_type="np")
        tup = pipe("a red bicycle", num_inference_steps=STEPS, generator=_gen(), output_type="np", return_dict=False)
        latent = pipe("a red bicycle", num_inference_steps=STEPS, output_type="latent")
    finally:
        pipe.nsfw_scorer = None
    assert isinstance(tup, tuple) and len(tup) == 3
    np.testing.assert_array_equal(out.images, tup[0])
    assert out.nsfw_content_detected == tup[1] == [False]
    assert out.nsfw_scores == tup[2] and set(out.nsfw_scores[0]) == {"flag_all", "flag_all/mean"}
    assert latent.images.shape == (1, 4, 32, 32) and latent.nsfw_content_detected is None and latent.nsfw_scores is None


def test_the_scoring_hook_is_removed_after_every_call(pipe):
    from diffusers.image_processor import VaeImageProcessor

    processor = pipe.image_processor

    def fail(p, i, t, kw):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        pipe("a cat", num_inference_steps=STEPS, callback_on_step_end=fail)
    assert pipe.image_processor is processor and type(processor) is VaeImageProcessor
    steps = []
    pipe("a cat", num_inference_steps=STEPS, output_type="np", callback_on_step_end=lambda p, i, t, kw: steps.append(i) or kw)
    assert steps == list(range(pipe.num_timesteps)) and pipe.image_processor is processor


@pytest.mark.parametrize("mode", ["flag", "blur", "black"])
def test_safety_modes(pipe, mode):
    clean = pipe("a cat", num_inference_steps=STEPS, generator=_gen(), output_type="np").images
    pipe.nsfw_scorer, pipe.safety_mode = FlagAll(level=-1.0), mode
    try:
        out = pipe("a cat", num_inference_steps=STEPS, generator=_gen(), output_type="np")
        cmp = pipe.compare("a cat", num_inference_steps=STEPS, generator=_gen(), output_type="np")
    finally:
        pipe.nsfw_scorer, pipe.safety_mode = None, "flag"
    assert out.nsfw_content_detected == cmp.safe_nsfw_content_detected == [True]
    np.testing.assert_allclose(cmp.safe_images, out.images, atol=1e-4)  # compare() applies the mode the same way
    if mode == "flag":
        np.testing.assert_allclose(out.images, clean, atol=1e-6)
    elif mode == "black":
        assert out.images.max() == 0.0 and cmp.original_images.max() == 0.0
    else:
        assert np.abs(out.images - clean).max() > 0.01 and out.images.std() < clean.std() and out.images.max() > 0


def test_bad_safety_mode_and_scorer(pipe):
    with pytest.raises(ValueError, match=r"`safety_mode` must be one of \['flag', 'blur', 'black'\], got 'hide'"):
        pipe.safety_mode = "hide"
    with pytest.raises(ValueError, match=r"`safety_mode` must be one of"):
        SaferStableDiffusionXLPipeline(**_components(pipe), safety_mode="off")
    with pytest.raises(ValueError, match=r"Unknown scorer 'nudenett'"):
        SaferStableDiffusionXLPipeline(**_components(pipe), nsfw_scorer="nudenett")


# ---------------------------------------------------------------- save / load
def test_save_load_round_trip(pipe, tmp_path):
    pipe.nsfw_scorer = {"name": "nudenet", "threshold": 0.75, "classes": ["FACE_FEMALE", "BUTTOCKS_EXPOSED"]}
    pipe.safety_mode = "blur"
    try:
        before = pipe("a cat", num_inference_steps=STEPS, generator=_gen(), output_type="np").images
        pipe.save_pretrained(tmp_path / "saved")
    finally:
        pipe.nsfw_scorer, pipe.safety_mode = None, "flag"
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "SaferStableDiffusionXLPipeline" and index["safety_mode"] == "blur"
    assert "original_text_encoder" not in index and "original_text_encoder_2" not in index
    for sub in ("original_text_encoder", "original_text_encoder_2"):
        assert (tmp_path / "saved" / sub / "model.safetensors").is_file()
    loaded = SaferStableDiffusionXLPipeline.from_pretrained(tmp_path / "saved", keep_original_text_encoder=True)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.safety_mode == "blur"
    assert loaded.nsfw_scorer.threshold == 0.75 and loaded.nsfw_scorer.classes == ("FACE_FEMALE", "BUTTOCKS_EXPOSED")
    loaded.nsfw_scorer = None  # NudeNet's verdict is not what this test is about
    after = loaded("a cat", num_inference_steps=STEPS, generator=_gen(), output_type="np").images
    np.testing.assert_allclose(before, after, atol=1e-6)
    for name in ("text_encoder", "text_encoder_2", "original_text_encoder", "original_text_encoder_2"):
        torch.testing.assert_close(getattr(loaded, name).state_dict(), getattr(pipe, name).state_dict())
    cmp = loaded.compare("a cat", num_inference_steps=STEPS, generator=_gen(), output_type="np")
    np.testing.assert_allclose(cmp.safe_images, pipe.compare("a cat", num_inference_steps=STEPS, generator=_gen(),
                                                             output_type="np").safe_images, atol=1e-5)  # fmt: skip
    other = SaferStableDiffusionXLPipeline.from_pretrained(tmp_path / "saved", nsfw_scorer=None, safety_mode="black")
    assert other.nsfw_scorer is None and other.safety_mode == "black" and other.original_text_encoder is None
    # a later save without the originals leaves no stale copy behind
    other.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / "original_text_encoder").exists()
    assert not (tmp_path / "saved" / "original_text_encoder_2").exists()
    with pytest.raises(ValueError, match=r"was saved without the original text encoders \(no original_text_encoder/ folder\)"):
        SaferStableDiffusionXLPipeline.from_pretrained(tmp_path / "saved", keep_original_text_encoder=True)


def test_a_saved_pipeline_takes_a_new_safe_encoder_2_alone(pipe, sdxl_folders, tmp_path):
    pipe.save_pretrained(tmp_path / "saved")
    second = tmp_path / "second"
    tiny_sdxl_text_encoders(seed=5)[1].save_pretrained(second)
    loaded = SaferStableDiffusionXLPipeline.from_pretrained(tmp_path / "saved", safe_text_encoder_2=second)
    torch.testing.assert_close(loaded.text_encoder.state_dict(), pipe.text_encoder.state_dict())  # the saved one
    assert not torch.equal(loaded.text_encoder_2.text_projection.weight, pipe.text_encoder_2.text_projection.weight)
    wide = tmp_path / "wide"
    tiny_sdxl_text_encoders(seed=5, hidden_size=48)[1].save_pretrained(wide)
    with pytest.raises(ValueError, match=r"`safe_text_encoder_2` has width \(hidden_size\) 48, but the base's text_encoder_2"):
        SaferStableDiffusionXLPipeline.from_pretrained(tmp_path / "saved", safe_text_encoder_2=wide)


def test_unsavable_scorer_warns_and_saves_none(pipe, tmp_path, caplog):
    pipe.nsfw_scorer = FlagAll()
    try:
        with caplog.at_level("WARNING"):
            pipe.save_pretrained(tmp_path / "s")
    finally:
        pipe.nsfw_scorer = None
    assert "no serialisable config" in caplog.text
    assert SaferStableDiffusionXLPipeline.from_pretrained(tmp_path / "s").nsfw_scorer is None


def test_to_moves_the_originals_and_cpu_offload_hooks_them(sdxl_folders):
    p = SaferStableDiffusionXLPipeline.from_pretrained(*sdxl_folders, keep_original_text_encoder=True)
    p.set_progress_bar_config(disable=True)
    p.to(torch.bfloat16)
    assert p.original_text_encoder.dtype == p.original_text_encoder_2.dtype == p.text_encoder_2.dtype == torch.bfloat16
    p.to(dtype=torch.float32)
    assert p.original_text_encoder_2.dtype == torch.float32
    before = p.compare("a cat", num_inference_steps=STEPS, generator=_gen(), output_type="np")
    p.enable_model_cpu_offload(device="cpu")  # the accelerate hooks work on the CPU too
    assert hasattr(p.original_text_encoder, "_hf_hook") and hasattr(p.original_text_encoder_2, "_hf_hook")
    after = p.compare("a cat", num_inference_steps=STEPS, generator=_gen(), output_type="np")
    np.testing.assert_allclose(after.original_images, before.original_images, atol=1e-6)
    assert "original_text_encoder_2" not in p.components  # only inside the offload helpers
    p.remove_all_hooks()
    assert not hasattr(p.original_text_encoder_2, "_hf_hook")


def test_from_pretrained_dtype_names(sdxl_folders):
    p = SaferStableDiffusionXLPipeline.from_pretrained(*sdxl_folders, torch_dtype="bfloat16")
    assert p.unet.dtype == p.text_encoder.dtype == p.text_encoder_2.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"`torch_dtype` must be a torch\.dtype .*got 'fp16'"):
        SaferStableDiffusionXLPipeline.from_pretrained(*sdxl_folders, torch_dtype="fp16")
    with pytest.raises(ValueError, match="`use_safetensors=False` is not supported"):
        SaferStableDiffusionXLPipeline.from_pretrained(*sdxl_folders, use_safetensors=False)


# ---------------------------------------------------------------- the export folder
def test_export_folder_loads_in_plain_transformers_and_in_the_library(pipe, sdxl_folders):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = sdxl_folders[1]
    manifest = read_manifest(folder)
    assert export_text_encoders(manifest) == SDXL_TEXT_ENCODERS and manifest.format_version == 1
    first = CLIPTextModel.from_pretrained(folder / "text_encoder")
    second = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2")
    tokenizer, tokenizer_2 = CLIPTokenizer.from_pretrained(folder / "tokenizer"), CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer_2.pad_token == "!" and len(tokenizer_2) == 49408
    ids = tokenizer_2(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    torch.testing.assert_close(second(ids).text_embeds, pipe.text_encoder_2(ids).text_embeds)
    torch.testing.assert_close(first(ids).last_hidden_state, pipe.text_encoder(ids).last_hidden_state)
    pair = load_safe_text_encoder_pair(folder)
    assert [type(e).__name__ for e in pair] == ["CLIPTextModel", "CLIPTextModelWithProjection"]
    torch.testing.assert_close(pair[1].state_dict(), second.state_dict())
    # a version-1 reader (the SD 1.x loader) still reads text_encoder/ of the folder
    torch.testing.assert_close(load_safe_text_encoder(folder).state_dict(), first.state_dict())
    torch.testing.assert_close(load_safe_text_encoder_2(folder).state_dict(), second.state_dict())
    assert text_encoder_pair_folder(folder) == folder and (folder / "README.md").is_file()


def test_an_sdxl_pipeline_folder_also_serves_as_a_pair(sdxl_folders):
    base = sdxl_folders[0]
    assert text_encoder_pair_folder(base) == base
    p = SaferStableDiffusionXLPipeline.from_pretrained(base, safe_text_encoder=base)  # the base's own pair: a no-op swap
    assert p.text_encoder_2.config.projection_dim == 32


def test_single_encoder_manifests_default_to_one_encoder(tmp_path):
    from safer_diffusion.export_format import ExportManifest, write_manifest

    write_manifest(tmp_path, ExportManifest(base_model="b", loss="safer_clip", global_step=1, dtype="float32", text_encoder_num_layers=2))
    data = json.loads((tmp_path / "safer_clip.json").read_text())
    del data["text_encoders"], data["base_models"]  # as written before the keys existed
    (tmp_path / "safer_clip.json").write_text(json.dumps(data))
    assert export_text_encoders(read_manifest(tmp_path)) == (TEXT_ENCODER_DIR,)
    (tmp_path / "safer_clip.json").write_text(json.dumps({**data, "text_encoders": ["text_encoder", "text_encoder_3"]}))
    with pytest.raises(ValueError, match=r"the manifest's `text_encoders` must be a list of distinct names among "
                                         r"\['text_encoder', 'text_encoder_2'\], got \['text_encoder', 'text_encoder_3'\]"):
        export_text_encoders(read_manifest(tmp_path))


# ---------------------------------------------------------------- bad input -> clear error, before the UNet loads
@pytest.fixture
def no_unet_load(monkeypatch):
    from diffusers import UNet2DConditionModel

    def refuse(*args, **kwargs):
        raise AssertionError("the UNet was loaded: the check came too late")

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", refuse)


def test_a_single_encoder_export_names_the_missing_encoder(sdxl_folders, tmp_path, no_unet_load):
    single = save_tiny_sdxl_export(tmp_path / "single", text_encoders=("text_encoder",))
    with pytest.raises(ValueError, match=r"`safe_text_encoder`='.*single' is a single-encoder export \(text_encoder/ only, "
                                         r"as made for SD 1\.x/2\.x\)\. .*lacks the safe text_encoder_2 \(OpenCLIP ViT-bigG/14"):
        SaferStableDiffusionXLPipeline.from_pretrained(sdxl_folders[0], safe_text_encoder=single)
    only_second = save_tiny_sdxl_export(tmp_path / "only2", text_encoders=("text_encoder_2",))
    with pytest.raises(ValueError, match=r"is an export holding only text_encoder_2/ .*the safe text_encoder \(CLIP ViT-L/14"):
        SaferStableDiffusionXLPipeline.from_pretrained(sdxl_folders[0], safe_text_encoder=only_second)
    clip = save_tiny_clip(tmp_path / "clip")
    with pytest.raises(ValueError, match=r"is one text encoder, but an SDXL base conditions on two: .*The safe text_encoder_2 "
                                         r"is missing: .*or the second encoder as `safe_text_encoder_2=`"):
        SaferStableDiffusionXLPipeline.from_pretrained(sdxl_folders[0], safe_text_encoder=clip)
    with pytest.raises(ValueError, match=r"`safe_text_encoder` is missing: `safe_text_encoder_2` .* was given"):
        SaferStableDiffusionXLPipeline.from_pretrained(sdxl_folders[0], safe_text_encoder_2=sdxl_folders[1])
    with pytest.raises(ValueError, match=r"`safe_text_encoder` is required for an SDXL base: .*Adeely93/SafeR_CLIP.* ViT-L/14 only"):
        SaferStableDiffusionXLPipeline.from_pretrained(sdxl_folders[0])
    with pytest.raises(ValueError, match=r"holds both SDXL encoders; do not also pass `safe_text_encoder_2`"):
        SaferStableDiffusionXLPipeline.from_pretrained(sdxl_folders[0], safe_text_encoder=sdxl_folders[1],
                                                       safe_text_encoder_2=sdxl_folders[1])  # fmt: skip
    with pytest.raises(ValueError, match=r"`safe_text_encoder_2`='.*single' is a single-encoder export .*it belongs in `safe_text_encoder`"):
        SaferStableDiffusionXLPipeline.from_pretrained(sdxl_folders[0], safe_text_encoder=clip, safe_text_encoder_2=single)


def test_an_incomplete_export_is_named(sdxl_folders, tmp_path):
    import shutil

    broken = shutil.copytree(sdxl_folders[1], tmp_path / "broken")
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(ValueError, match=r"lists 'text_encoder_2' in its manifest's `text_encoders` but has no "
                                         r"text_encoder_2/config\.json; the folder is incomplete"):
        SaferStableDiffusionXLPipeline.from_pretrained(sdxl_folders[0], safe_text_encoder=broken)


def test_swapped_encoders_are_named(pipe, sdxl_folders, no_unet_load):
    safe = sdxl_folders[1]
    # folders swapped: the ViT-L folder (no projection) offered as text_encoder_2
    with pytest.raises(ValueError, match=r"`safe_text_encoder_2`='.*text_encoder' is a CLIPTextModel without a text projection.*"
                                         r"If this is the ViT-L encoder, the two are swapped"):
        SaferStableDiffusionXLPipeline.from_pretrained(sdxl_folders[0], safe_text_encoder=safe / "text_encoder_2",
                                                       safe_text_encoder_2=safe / "text_encoder")  # fmt: skip
    # modules swapped (each in the other's class): told apart by their shapes against the base's pair
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    first_config, second_config = tiny_sdxl_text_configs()
    with pytest.raises(ValueError, match=r"`safe_text_encoder` and `safe_text_encoder_2` are swapped: `safe_text_encoder` has the "
                                         r"shape of the base's text_encoder_2 \(width, layers\) \(32, 3\)"):
        SaferStableDiffusionXLPipeline.from_pretrained(sdxl_folders[0], text_encoder=CLIPTextModel(second_config),
                                                       text_encoder_2=CLIPTextModelWithProjection(first_config))  # fmt: skip
    with pytest.raises(ValueError, match=r"`text_encoder` is a CLIPTextModelWithProjection; SDXL's text_encoder must be a "
                                         r"CLIPTextModel: .*would read `text_encoder`'s instead of `text_encoder_2`'s"):
        SaferStableDiffusionXLPipeline(**_components(pipe, text_encoder=pipe.text_encoder_2))
    with pytest.raises(ValueError, match=r"`safe_text_encoder_2`=a CLIPTextModel is a CLIPTextModel without a text projection"):
        load_safe_text_encoder_2(pipe.text_encoder)


def test_widths_that_do_not_fit_are_named(pipe, sdxl_folders, tmp_path, no_unet_load):
    wide = save_tiny_sdxl_export(tmp_path / "wide", hidden_size=48)
    with pytest.raises(ValueError, match=r"`safe_text_encoder` has width \(hidden_size\) 48, but the base's text_encoder "
                                         r"\(CLIP ViT-L/14, 768 wide in SDXL\) is 32 wide"):
        SaferStableDiffusionXLPipeline.from_pretrained(sdxl_folders[0], safe_text_encoder=wide)
    from transformers import CLIPTextModelWithProjection

    first_config, second_config = tiny_sdxl_text_configs()
    second_config.projection_dim = 16
    with pytest.raises(ValueError, match=r"`safe_text_encoder_2` projects to projection_dim 16, but the base's text_encoder_2 to 32"):
        SaferStableDiffusionXLPipeline.from_pretrained(sdxl_folders[0], safe_text_encoder=sdxl_folders[1] / "text_encoder",
                                                       text_encoder_2=CLIPTextModelWithProjection(second_config))  # fmt: skip


def test_widths_against_the_unet(pipe):
    first, second = tiny_sdxl_text_encoders(hidden_size=48)
    with pytest.raises(ValueError, match=r"`text_encoder` \(width 48\) and `text_encoder_2` \(width 48\) give token states 96 "
                                         r"wide \(SDXL concatenates them\), but the UNet's cross_attention_dim is 64"):
        SaferStableDiffusionXLPipeline(**_components(pipe, text_encoder=first, text_encoder_2=second))
    from transformers import CLIPTextModelWithProjection

    config = copy.deepcopy(pipe.text_encoder_2.config)
    config.projection_dim = 16
    with pytest.raises(ValueError, match=r"`text_encoder_2` projects its pooled output to projection_dim 16, but the UNet's "
                                         r"add-embedding reads projection_class_embeddings_input_dim 80 = text_embeds \+ 6 time "
                                         r"ids x addition_time_embed_dim 8, so `text_encoder_2` must project to 32"):
        SaferStableDiffusionXLPipeline(**_components(pipe, text_encoder_2=CLIPTextModelWithProjection(config)))
    with pytest.raises(ValueError, match=r"`text_encoder_2` is missing: SDXL conditions on two text encoders"):
        SaferStableDiffusionXLPipeline(**_components(pipe, text_encoder_2=None))
    with pytest.raises(ValueError, match=r"`safe_text_encoder_2` has 2 layers, but the base's text_encoder_2 has 3"):
        check_sdxl_text_encoders(pipe.text_encoder, CLIPTextModelWithProjection(pipe.text_encoder.config),
                                 reference=(pipe.text_encoder, pipe.text_encoder_2))  # fmt: skip


def test_real_sdxl_widths_are_checked_by_config():
    """SDXL base 1.0's real sizes (no weights: stand-ins carry the configs): the pair fits; a swapped pair, an SD 1.x
    ViT-L in the bigG slot and an SD 2.x ViT-H each get their own message."""
    from types import SimpleNamespace

    from transformers import CLIPTextConfig

    def tower(hidden, layers, projection=None):
        config = CLIPTextConfig(hidden_size=hidden, num_hidden_layers=layers, projection_dim=projection or hidden)
        return SimpleNamespace(config=config, **({"text_projection": None} if projection else {}))

    vit_l, big_g = tower(768, 12), tower(1280, 32, projection=1280)
    unet = {"cross_attention_dim": 2048, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816}  # fmt: skip
    check_sdxl_text_encoders(vit_l, big_g, unet, reference=(vit_l, big_g))
    with pytest.raises(ValueError, match=r"`safe_text_encoder` and `safe_text_encoder_2` are swapped: .*\(1280, 32\)"):
        check_sdxl_text_encoders(tower(1280, 32), tower(768, 12, projection=768), unet, reference=(vit_l, big_g))
    with pytest.raises(ValueError, match=r"`safe_text_encoder_2` has width \(hidden_size\) 768, but the base's text_encoder_2 "
                                         r"\(OpenCLIP ViT-bigG/14 with projection, 1280 wide in SDXL\) is 1280 wide"):
        check_sdxl_text_encoders(vit_l, tower(768, 12, projection=768), unet, reference=(vit_l, big_g))
    with pytest.raises(ValueError, match=r"give token states 1792 wide .*cross_attention_dim is 2048\. SDXL base 1\.0 needs "
                                         r"768 \+ 1280 = 2048"):
        check_sdxl_text_encoders(vit_l, tower(1024, 24, projection=1024), unet)
    with pytest.raises(ValueError, match=r"projects its pooled output to projection_dim 1024, .*reads "
                                         r"projection_class_embeddings_input_dim 2816 .*must project to 1280"):
        check_sdxl_text_encoders(vit_l, tower(1280, 32, projection=1024), unet)


def test_safety_checker_options_are_no_ops_or_refused(sdxl_folders):
    p = SaferStableDiffusionXLPipeline.from_pretrained(*sdxl_folders, safety_checker=None, requires_safety_checker=False)
    assert "safety_checker" not in p.config and "requires_safety_checker" not in p.config
    with pytest.raises(ValueError, match=r"`safety_checker`: Stable Diffusion XL pipelines have no safety checker component"):
        SaferStableDiffusionXLPipeline.from_pretrained(*sdxl_folders, safety_checker=object())
    with pytest.raises(ValueError, match=r"`requires_safety_checker` must be False"):
        SaferStableDiffusionXLPipeline.from_pretrained(*sdxl_folders, requires_safety_checker=True)


def test_an_sd1_base_is_refused_with_the_class_to_use(tmp_path):
    sd_base, _ = tiny_pipeline_folders(tmp_path, variant="sd1")
    with pytest.raises(ValueError, match=r"is a StableDiffusionPipeline pipeline, not Stable Diffusion XL .*Use "
                                         r"SaferStableDiffusionPipeline for SD 1\.x/2\.x, or `safer_diffusion\.pipelines\.load_safer_pipeline`"):
        SaferStableDiffusionXLPipeline.from_pretrained(sd_base, safe_text_encoder=sd_base)
    with pytest.raises(ValueError, match=r"`variant` must be one of \['sd1', 'sd2', 'sdxl'\], got 'sd3'"):
        tiny_pipeline_folders(tmp_path, variant="sd3")


# ---------------------------------------------------------------- check_inputs: refused before any work
@pytest.mark.parametrize("method", ["call", "compare"])
@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"num_inference_steps": 0}, ValueError, r"`num_inference_steps` must be a positive integer, got 0; e\.g\."),
        ({"num_inference_steps": True}, ValueError, r"`num_inference_steps` must be a positive integer, got True"),
        ({"guidance_scale": float("nan")}, ValueError, r"`guidance_scale` must be a finite number, got nan"),
        ({"eta": float("inf")}, ValueError, r"`eta` must be a finite number, got inf"),
        ({"guidance_rescale": "0.7"}, ValueError, r"`guidance_rescale` must be a finite number, got '0\.7'"),
        ({"num_images_per_prompt": 0}, ValueError, r"`num_images_per_prompt` must be a positive integer, got 0"),
        ({"generator": 0}, TypeError, r"`generator` must be a torch\.Generator or a list of them .*got int: 0"),
        ({"generator": [torch.Generator(), torch.Generator()]}, ValueError, r"`generator` is a list of 2 generators, but 1 image"),
        ({"latents": torch.zeros(1, 4, 3, 3)}, ValueError,
         r"`latents` has shape \(1, 4, 3, 3\), but height=64, width=64 and 1 image\(s\) need \(1, 4, 32, 32\)"),
        ({"height": 60}, ValueError, r"`height` must be a positive multiple of 8, got 60"),
        ({"width": 64.0}, ValueError, r"`width` must be a positive multiple of 8, got 64\.0"),
        ({"denoising_end": 1.5}, ValueError, r"`denoising_end` must be a number in \(0, 1\] .*got 1\.5"),
        ({"denoising_end": 0}, ValueError, r"`denoising_end` must be a number in \(0, 1\]"),
        ({"original_size": (64,)}, ValueError, r"`original_size` must be \(height, width\): two whole numbers >= 1, got \(64,\)"),
        ({"crops_coords_top_left": (-1, 0)}, ValueError, r"`crops_coords_top_left` must be \(height, width\): two whole numbers >= 0"),
        ({"negative_target_size": (64.5, 64)}, ValueError, r"`negative_target_size` must be \(height, width\)"),
        ({"prompt_2": ["a", "b"]}, ValueError, r"`prompt_2` is a list of 2 strings, but `prompt` has 1; pass one per prompt"),
        ({"prompt_2": 3}, ValueError, r"`prompt_2` must be a string or a list of strings, got a int"),
        ({"negative_prompt_2": ["x", 1]}, ValueError, r"`negative_prompt_2` must be a string or a list of strings, got a list holding a int"),
    ],
)
def test_bad_generation_arguments_are_refused_up_front(pipe, method, kwargs, error, pattern, monkeypatch):
    def no_unet(*args, **kw):
        raise AssertionError("the UNet ran: the check came too late")

    monkeypatch.setattr(pipe.unet, "forward", no_unet)
    run = pipe.compare if method == "compare" else pipe
    with pytest.raises(error, match=pattern):
        run("a cat", **{"num_inference_steps": STEPS, **kwargs})


def test_width_alone_keeps_its_value(pipe):
    out = pipe("a cat", width=128, num_inference_steps=STEPS, generator=_gen(), output_type="np")
    assert out.images.shape == (1, 64, 128, 3)
    cmp = pipe.compare("a cat", height=128, num_inference_steps=STEPS, generator=_gen(), output_type="np")
    assert cmp.safe_images.shape == (1, 128, 64, 3)


# ---------------------------------------------------------------- picking the class from model_index.json
def test_load_safer_pipeline_picks_the_class(sdxl_folders, pipe, tmp_path):
    sd_base, sd_safe = tiny_pipeline_folders(tmp_path / "sd", variant="sd1")
    assert safer_pipeline_class(sdxl_folders[0]) is SaferStableDiffusionXLPipeline
    assert safer_pipeline_class(sd_base) is SaferStableDiffusionPipeline
    p = load_safer_pipeline(sdxl_folders[0], safe_text_encoder=sdxl_folders[1])
    assert type(p) is SaferStableDiffusionXLPipeline
    assert type(load_safer_pipeline(sd_base, safe_text_encoder=sd_safe)) is SaferStableDiffusionPipeline
    pipe.save_pretrained(tmp_path / "saved")
    assert type(load_safer_pipeline(tmp_path / "saved")) is SaferStableDiffusionXLPipeline
    assert set(SUPPORTED_PIPELINES) >= {"StableDiffusionPipeline", "StableDiffusionXLPipeline"}
    with pytest.raises(ValueError, match=r"`safe_text_encoder_2` is for SDXL bases, but `base`=.* is a Stable Diffusion 1\.x/2\.x"):
        load_safer_pipeline(sd_base, safe_text_encoder=sd_safe, safe_text_encoder_2=sdxl_folders[1])


def test_an_unsupported_or_missing_index_is_a_clear_error(tmp_path):
    other = tmp_path / "kandinsky"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}))
    with pytest.raises(ValueError, match=r"`base`='.*kandinsky' is a 'KandinskyV22Pipeline' pipeline \(model_index\.json "
                                         r"`_class_name`\); safer-diffusion supports \['StableDiffusionPipeline', "
                                         r"'StableDiffusionXLPipeline'\] bases"):
        load_safer_pipeline(other)
    with pytest.raises(ValueError, match=r"`base`='.*empty' is a folder without model_index\.json, so not a diffusers pipeline"):
        (tmp_path / "empty").mkdir()
        load_safer_pipeline(tmp_path / "empty")
    (other / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"model_index\.json' is not valid JSON"):
        safer_pipeline_class(other)
    with pytest.raises(FileNotFoundError, match=r"`base`='/nonexistent/sdxl' is not an existing local path"):
        safer_pipeline_class("/nonexistent/sdxl")


def test_an_uncached_hub_id_offline_fails_at_once(monkeypatch, no_network):
    from safer_diffusion.hub import HubUnavailableError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailableError, match=r"`base`='stabilityai/stable-diffusion-xl-base-1\.0' is a hub id, but HF_HUB_OFFLINE=1"):
        load_safer_pipeline("stabilityai/stable-diffusion-xl-base-1.0", safe_text_encoder="owner/pair")


def test_an_uncached_safe_pair_hub_id_offline_fails_at_once(sdxl_folders, monkeypatch, no_network, no_unet_load):
    from safer_diffusion import pipeline_safer_stable_diffusion_xl as module
    from safer_diffusion.hub import HubUnavailableError

    def no_load(*args, **kwargs):
        raise AssertionError("an encoder was loaded before every source was checked")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(module, "load_safe_text_encoder", no_load)
    with pytest.raises(HubUnavailableError, match=r"`safe_text_encoder`='owner/sdxl-pair' is a hub id, but HF_HUB_OFFLINE=1"):
        SaferStableDiffusionXLPipeline.from_pretrained(sdxl_folders[0], safe_text_encoder="owner/sdxl-pair")
    with pytest.raises(FileNotFoundError, match=r"`safe_text_encoder_2`='/nonexistent/bigG' is not an existing local path"):
        SaferStableDiffusionXLPipeline.from_pretrained(sdxl_folders[0], safe_text_encoder=sdxl_folders[1] / "text_encoder",
                                                       safe_text_encoder_2="/nonexistent/bigG")  # fmt: skip
