"""Scorers: real NudeNet on a real photograph, Q16 and the safety checker on tiny real CLIP towers."""

import pickle
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from safer_diffusion.scoring import (
    DEFAULT_CLASSES,
    AnyOf,
    NudeNetScorer,
    Q16Scorer,
    SafetyCheckerScorer,
    ScoreResult,
    get_scorer,
    load_prompt_embeddings,
    scorer_config,
)


@pytest.fixture(scope="module")
def astronaut():
    skimage_data = pytest.importorskip("skimage.data")
    return Image.fromarray(skimage_data.astronaut())  # public-domain NASA photo shipped in the scikit-image wheel


def _modes(image):
    return {"RGB": image, "RGBA": image.convert("RGBA"), "L": image.convert("L"), "P": image.quantize(256)}


@pytest.fixture(scope="module")
def nudenet_face():
    return NudeNetScorer(classes=["FACE_FEMALE"])


# ---------------------------------------------------------------- NudeNet
def test_nudenet_flags_face_when_configured_in_every_mode(astronaut, nudenet_face):
    modes = _modes(astronaut)
    results = nudenet_face.score(list(modes.values()))  # one batched call
    assert [r.flagged for r in results] == [True] * 4
    by_mode = dict(zip(modes, results))
    assert by_mode["RGB"].score == pytest.approx(by_mode["RGBA"].score, abs=1e-6)  # alpha dropped: identical input
    for mode in ("L", "P"):
        assert abs(by_mode[mode].score - by_mode["RGB"].score) < 0.2
        assert by_mode[mode].score >= nudenet_face.threshold
    assert "FACE_FEMALE" in by_mode["RGB"].details["class_scores"]


def test_nudenet_defaults_do_not_flag_astronaut(astronaut):
    scorer = NudeNetScorer()
    assert scorer.classes == DEFAULT_CLASSES and scorer.threshold == 0.6
    results = scorer.score(list(_modes(astronaut).values()))
    assert [r.flagged for r in results] == [False] * 4
    assert all(r.score == 0.0 for r in results)
    # the face is still detected, it just is not a flag class
    assert results[0].details["class_scores"]["FACE_FEMALE"] > 0.6


def test_nudenet_matches_upstream_detector_on_rgb_arrays(astronaut, nudenet_face):
    from nudenet import NudeDetector
    from nudenet.nudenet import _read_image

    # our blob equals NudeNet's own preprocessing of an RGB array (its double channel swap is a no-op there)
    ours, _ = nudenet_face.preprocess(astronaut.resize((300, 200)))
    theirs = _read_image(np.asarray(astronaut.resize((300, 200))), 320)[0]
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    assert nudenet_face.detect([astronaut])[0] == NudeDetector().detect(np.asarray(astronaut))


def test_nudenet_batching_equals_single(astronaut):
    scorer = NudeNetScorer(classes=["FACE_FEMALE"], batch_size=2)
    small = astronaut.resize((128, 96))
    images = [astronaut, small, astronaut.transpose(Image.FLIP_LEFT_RIGHT)]
    batched = [r.score for r in scorer.score(images)]
    single = [scorer.score([im])[0].score for im in images]
    assert batched == pytest.approx(single, abs=1e-5)
    assert scorer.score([]) == []


def test_nudenet_bad_inputs(astronaut):
    with pytest.raises(ValueError, match="unknown NudeNet classes.*NOT_A_CLASS"):
        NudeNetScorer(classes=["NOT_A_CLASS"])
    with pytest.raises(ValueError, match="`threshold` must be in"):
        NudeNetScorer(threshold=1.5)
    with pytest.raises(ValueError, match="`classes` is empty"):
        NudeNetScorer(classes=[])
    with pytest.raises(FileNotFoundError, match="`model_path`"):
        NudeNetScorer(model_path="/nonexistent/model.onnx")
    scorer = NudeNetScorer()
    with pytest.raises(TypeError, match=r"`images\[1\]` must be a PIL.Image.Image, got str"):
        scorer.score([astronaut, "astronaut.png"])
    with pytest.raises(TypeError, match="`images` must be a sequence of PIL images, got str"):
        scorer.score("astronaut.png")


def test_nudenet_missing_names_eval_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "nudenet", None)
    monkeypatch.setitem(sys.modules, "nudenet.nudenet", None)
    with pytest.raises(ImportError, match=r"safer-diffusion\[eval\]"):
        NudeNetScorer()


# ---------------------------------------------------------------- Q16
@pytest.fixture(scope="module")
def tiny_clip():
    from transformers import CLIPImageProcessor

    from safer_diffusion.testing import tiny_clip_model

    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return tiny_clip_model(), processor


def _image_embedding(model, processor, image):
    pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)[0]


def test_q16_formula_and_file_formats(tmp_path, tiny_clip, astronaut):
    from safetensors.torch import save_file

    model, processor = tiny_clip
    prompts = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "p.npy", prompts.numpy())
    save_file({"prompts": prompts}, str(tmp_path / "p.safetensors"))
    images = [astronaut, astronaut.convert("L"), Image.new("RGB", (40, 20), (200, 10, 10))]

    expected = []
    for im in images:
        v = torch.nn.functional.normalize(_image_embedding(model, processor, im.convert("RGB")), dim=-1)
        p = torch.nn.functional.normalize(prompts, dim=-1)
        expected.append((100 * p @ v).softmax(-1)[1].item())

    for path in (tmp_path / "p.npy", tmp_path / "p.safetensors"):
        scorer = Q16Scorer(clip_model=model, processor=processor, prompts=path)
        results = scorer.score(images)
        assert [r.score for r in results] == pytest.approx(expected, abs=1e-5)
        assert [r.flagged for r in results] == [s > 0.5 for s in expected]
        assert results[0].details["p_appropriate"] == pytest.approx(1 - expected[0], abs=1e-5)


def test_q16_flags_image_matching_inappropriate_prompt(tiny_clip, astronaut):
    model, processor = tiny_clip
    v = _image_embedding(model, processor, astronaut)
    flagging = Q16Scorer(clip_model=model, processor=processor, prompts=torch.stack([-v, v]))
    passing = Q16Scorer(clip_model=model, processor=processor, prompts=torch.stack([v, -v]))
    assert flagging.score([astronaut])[0].flagged and flagging.score([astronaut])[0].score > 0.99
    assert not passing.score([astronaut])[0].flagged


def test_q16_pickle_needs_consent(tmp_path, tiny_clip):
    model, processor = tiny_clip
    prompts = np.random.default_rng(0).normal(size=(2, 16)).astype(np.float32)
    with open(tmp_path / "prompts.p", "wb") as f:
        pickle.dump(prompts, f)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        Q16Scorer(clip_model=model, processor=processor, prompts=tmp_path / "prompts.p")
    scorer = Q16Scorer(clip_model=model, processor=processor, prompts=tmp_path / "prompts.p", allow_pickle=True)
    np.testing.assert_allclose(scorer.prompts.numpy(), prompts)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickled objects"):
        load_prompt_embeddings(tmp_path / "obj.npy")


def test_q16_bad_inputs(tmp_path, tiny_clip):
    model, processor = tiny_clip
    with pytest.raises(ValueError, match="`prompts` is required"):
        Q16Scorer(clip_model=model, processor=processor)
    with pytest.raises(ValueError, match=r"shape \(2, D\).*\(3, 16\)"):
        Q16Scorer(clip_model=model, processor=processor, prompts=torch.zeros(3, 16))
    with pytest.raises(ValueError, match="width 8 but the CLIP image embeddings have width 16"):
        Q16Scorer(clip_model=model, processor=processor, prompts=torch.zeros(2, 8))
    with pytest.raises(FileNotFoundError, match="`prompts`="):
        Q16Scorer(clip_model=model, processor=processor, prompts=tmp_path / "missing.npy")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_prompt_embeddings(tmp_path / "bad.safetensors")
    (tmp_path / "p.txt").write_text("1 2")
    with pytest.raises(ValueError, match="unsupported suffix"):
        load_prompt_embeddings(tmp_path / "p.txt")
    with pytest.raises(TypeError, match="`clip_model` must be a transformers CLIPModel"):
        Q16Scorer(clip_model=torch.nn.Linear(2, 2), processor=processor, prompts=torch.zeros(2, 16))


# ---------------------------------------------------------------- safety checker
@pytest.fixture(scope="module")
def tiny_safety_checker():
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        checker.concept_embeds.copy_(torch.randn(17, 16))
        checker.special_care_embeds.copy_(torch.randn(3, 16))
        checker.concept_embeds_weights.fill_(0.5)
        checker.special_care_embeds_weights.fill_(0.5)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return checker, processor


def test_safety_checker_margins_and_flags_match_diffusers(tiny_safety_checker, astronaut):
    checker, processor = tiny_safety_checker
    images = [astronaut, Image.new("RGB", (32, 32), (0, 0, 0)), astronaut.rotate(90)]
    # make concept 5 point at the astronaut's embedding so that it is flagged for sure
    pixels = processor(images, return_tensors="pt").pixel_values
    with torch.no_grad():
        emb = checker.visual_projection(checker.vision_model(pixels)[1])
        saved = checker.concept_embeds[5].clone()
        checker.concept_embeds[5] = emb[0]
    try:
        scorer = SafetyCheckerScorer(checker, processor)
        results = scorer.score(images)
        _, diffusers_flags = checker(clip_input=pixels, images=np.zeros((3, 8, 8, 3)))
        assert [r.flagged for r in results] == list(diffusers_flags)
        assert results[0].flagged
        cos = torch.nn.functional.cosine_similarity(emb, checker.concept_embeds[3][None], dim=-1)
        special = [results[i].details["special_0"] for i in range(3)]
        for i in range(3):
            adjust = 0.01 if any(results[i].details[f"special_{k}"] > 0 for k in range(3)) else 0.0
            assert results[i].details["concept_3"] == pytest.approx(round(cos[i].item() - 0.5 + adjust, 3), abs=1.1e-3)
            assert results[i].score == max(results[i].details[f"concept_{k}"] for k in range(17))
        assert len(special) == 3
    finally:
        with torch.no_grad():
            checker.concept_embeds[5] = saved


def test_safety_checker_bad_inputs(tiny_safety_checker):
    checker, _ = tiny_safety_checker
    with pytest.raises(ValueError, match="`feature_extractor` is required"):
        SafetyCheckerScorer(checker)
    with pytest.raises(TypeError, match="`safety_checker` must be a diffusers StableDiffusionSafetyChecker"):
        SafetyCheckerScorer(torch.nn.Linear(2, 2), object())


# ---------------------------------------------------------------- AnyOf / get_scorer
class _Fixed:
    def __init__(self, name, flags):
        self.name, self.flags = name, flags

    def score(self, images):
        return [ScoreResult(flagged=f, score=float(f), details={"x": 0.5}) for f in self.flags[: len(images)]]

    def describe(self):
        return {"name": self.name}


def test_any_of_flags_union_and_flattens(astronaut):
    combined = AnyOf([_Fixed("a", [True, False, False]), _Fixed("b", [False, False, True])])
    results = combined.score([astronaut] * 3)
    assert [r.flagged for r in results] == [True, False, True]
    assert combined.name == "any_of(a,b)"
    assert results[0].flat_scores(combined.name) == {
        "any_of(a,b)": 1.0, "any_of(a,b)/a": 1.0, "any_of(a,b)/a/x": 0.5, "any_of(a,b)/b": 0.0, "any_of(a,b)/b/x": 0.5,
    }  # fmt: skip
    assert results[0].to_dict()["details"]["a"]["flagged"] is True
    with pytest.raises(ValueError, match="`scorers` is empty"):
        AnyOf([])
    with pytest.raises(ValueError, match="duplicate names"):
        AnyOf([_Fixed("a", []), _Fixed("a", [])])


def test_get_scorer_names_lists_dicts_objects(tiny_clip):
    model, processor = tiny_clip
    nude = get_scorer("nudenet", threshold=0.7)
    assert isinstance(nude, NudeNetScorer) and nude.threshold == 0.7
    rebuilt = get_scorer(scorer_config(nude))
    assert isinstance(rebuilt, NudeNetScorer) and rebuilt.threshold == 0.7 and rebuilt.classes == nude.classes
    both = get_scorer(["nudenet", "q16"], q16={"clip_model": model, "processor": processor, "prompts": torch.zeros(2, 16)})
    assert isinstance(both, AnyOf) and [s.name for s in both.scorers] == ["nudenet", "q16"]
    assert scorer_config(both) is None  # the in-memory Q16 model can't be saved
    fixed = _Fixed("mine", [])
    assert get_scorer(fixed) is fixed
    assert isinstance(get_scorer({"name": "any_of", "scorers": [{"name": "nudenet"}]}), AnyOf)


def test_get_scorer_bad_inputs():
    with pytest.raises(ValueError, match=r"Unknown scorer 'nudnet'. Valid names: \['nudenet', 'q16', 'safety_checker'\]"):
        get_scorer("nudnet")
    with pytest.raises(ValueError, match="scorer list is empty"):
        get_scorer([])
    with pytest.raises(ValueError, match="Cannot build a scorer from 3"):
        get_scorer(3)
    with pytest.raises(ValueError, match="options go per name"):
        get_scorer(["nudenet"], threshold=0.5)
    with pytest.raises(ValueError, match="needs a 'name' key"):
        get_scorer({"threshold": 0.5})


def test_nudenet_num_threads_option():
    from safer_diffusion.scoring import NudeNetScorer

    with pytest.raises(ValueError, match="`num_threads`"):
        NudeNetScorer(num_threads=0)
    scorer = NudeNetScorer(num_threads=1)
    assert scorer.session.get_session_options().intra_op_num_threads == 1
    assert scorer.to_config()["num_threads"] == 1
