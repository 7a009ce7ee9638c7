"""Fidelity metrics on fixed arrays and tiny models: SSIM/PSNR against scikit-image, FID/KID maths, CLIP score,
feature extractors and LPIPS availability, encoder drift against the pipeline's own encode_prompt."""

import math
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from safer_diffusion.evaluation.fidelity import (
    ClipModel,
    build_feature_extractor,
    center_crop_resize,
    check_feature_extractor,
    clip_score,
    cosine,
    encoder_drift,
    fid_from_features,
    frechet_distance,
    images_to_tensor,
    kid_from_features,
    load_lpips,
    mse,
    psnr_db,
    ssim,
)
from safer_diffusion.evaluation.fidelity_run import pareto_front
from safer_diffusion.hub import HubUnavailableError
from safer_diffusion.options import BadInputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pairs(seed=0, shape=(3, 37, 29, 3), noise=40):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-noise, noise + 1, shape), 0, 255).astype(np.uint8)
    return a, b


# ---------------------------------------------------------------------------------------------------- SSIM / PSNR


@pytest.mark.parametrize("shape", [(3, 37, 29, 3), (2, 11, 11, 3), (1, 64, 48, 3)])
def test_ssim_matches_scikit_image(shape):
    a, b = _pairs(shape=shape)
    ours = ssim(images_to_tensor(list(a)), images_to_tensor(list(b))).numpy()
    ref = [structural_similarity(a[i], b[i], channel_axis=-1, data_range=255, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False) for i in range(len(a))]  # fmt: skip
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-10)
    assert (ours < 1).all()


def test_psnr_matches_scikit_image_and_identical_images_are_inf():
    a, b = _pairs(1)
    m = mse(images_to_tensor(list(a)), images_to_tensor(list(b))).tolist()
    for i in range(len(a)):
        assert psnr_db(m[i]) == pytest.approx(peak_signal_noise_ratio(a[i], b[i], data_range=255), abs=1e-10)
    x = images_to_tensor(list(a))
    assert mse(x, x).tolist() == [0.0] * len(a)
    assert psnr_db(0.0) == math.inf
    assert ssim(x, x).tolist() == [1.0] * len(a)
    with pytest.raises(ValueError, match=r"`mse` must be >= 0, got -1.0"):
        psnr_db(-1.0)


def test_images_of_different_sizes_or_too_small_are_refused():
    with pytest.raises(ValueError, match=r"`images` mixes image sizes: 32x32 and 40x32 \(image 1\)"):
        images_to_tensor([Image.new("RGB", (32, 32)), Image.new("RGB", (40, 32))])
    x = images_to_tensor([Image.new("RGB", (10, 10))])
    with pytest.raises(ValueError, match=r"SSIM needs images of at least 11x11 pixels, got 10x10"):
        ssim(x, x)
    with pytest.raises(ValueError, match=r"one shape"):
        ssim(images_to_tensor([Image.new("RGB", (12, 12))]), images_to_tensor([Image.new("RGB", (16, 16))]))


def test_center_crop_resize_keeps_the_center():
    im = Image.new("RGB", (90, 30), "red")
    im.paste(Image.new("RGB", (30, 30), "blue"), (30, 0))
    out = center_crop_resize(im, 16, 16)
    assert out.size == (16, 16) and np.asarray(out)[8, 8].tolist() == [0, 0, 255]


# ---------------------------------------------------------------------------------------------------- FID / KID


def test_fid_of_identical_sets_is_zero_and_matches_the_closed_form():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))  # correlated features
    assert abs(fid_from_features(f, f)) < 1e-9
    assert fid_from_features(f, f[::-1].copy()) == pytest.approx(0.0, abs=1e-9)  # order does not matter
    # diagonal Gaussians: FID = |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    # a shift of the mean by c adds |c|^2
    assert fid_from_features(f, f + 2.0) == pytest.approx(4.0 * 6, rel=1e-8)


def _kid_by_loops(x, y):
    d, m = x.shape[1], x.shape[0]

    def k(a, b):
        return (a @ b / d + 1.0) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_a_hand_computed_mmd_and_is_near_zero_for_identical_sets():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 5)), rng.normal(size=(12, 5)) + 0.5
    out = kid_from_features(x, y, n_subsets=3, subset_size=12)  # every subset is the whole set
    assert out["kid"] == pytest.approx(_kid_by_loops(x, y), rel=1e-10) and out["kid_std"] < 1e-12
    assert (out["subset_size"], out["n_subsets"]) == (12, 3)
    # identical sets: the unbiased estimator is 2 (mean off-diagonal kernel - mean kernel) / ... , i.e. O(1/m) below 0
    f = rng.normal(size=(300, 8))
    same = kid_from_features(f, f, n_subsets=5, subset_size=300)["kid"]
    kern = (f @ f.T / 8 + 1.0) ** 3
    m = 300
    assert same == pytest.approx(2 * (kern.sum() - np.trace(kern)) / (m * (m - 1)) - 2 * kern.sum() / m**2, rel=1e-9)
    shifted = kid_from_features(f, f + 1.0, n_subsets=5, subset_size=300)["kid"]
    assert abs(same) < 0.02 * shifted
    with pytest.raises(ValueError, match=r"at least 2 images"):
        kid_from_features(f[:1], f)


# ---------------------------------------------------------------------------------------------------- CLIP


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from safer_diffusion.testing import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("fid_clip") / "clip")


def test_clip_score_matches_a_hand_computed_cosine(tiny_clip_dir):
    clip = ClipModel.load(str(tiny_clip_dir))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(3)]
    texts = ["a red bicycle", "a lighthouse at sunset", "two cats"]
    img, txt = clip.image_features(images), clip.text_features(texts)
    # by hand through CLIPModel.forward: logits_per_image = logit_scale * cos
    inputs = clip.tokenizer(texts, padding=True, return_tensors="pt")
    pixels = clip.image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = clip.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=pixels)
    cos_by_hand = (out.logits_per_image / clip.model.logit_scale.exp()).diagonal().detach()
    assert (cos_by_hand > 0).any() and (cos_by_hand < 0).any()  # both sides of max(cos, 0) are exercised
    np.testing.assert_allclose(cosine(img, txt).numpy(), cos_by_hand.numpy(), atol=1e-5)
    expected = 100 * torch.clamp(cos_by_hand, min=0)
    np.testing.assert_allclose(clip_score(img, txt).numpy(), expected.numpy(), atol=1e-3)
    assert clip_score(txt, txt).tolist() == pytest.approx([100.0] * 3, abs=1e-4)
    assert clip_score(img, -img).tolist() == [0.0] * 3  # negative cosines clamp to 0
    assert cosine(img, clip.image_features(images)).tolist() == pytest.approx([1.0] * 3, abs=1e-6)
    assert clip.describe() == {"model": str(tiny_clip_dir), "projection_dim": 16, "image_size": 32}


def test_clip_that_cannot_load_offline_names_the_flag_and_a_local_path(tmp_path, no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailableError, match=r"`--clip_model`='safer-diffusion-tests/no-such-clip' is a hub id, but "
                                                  r"HF_HUB_OFFLINE=1 .* Pass a local folder .*`--clip_model /path/to/"):
        ClipModel.load("safer-diffusion-tests/no-such-clip")
    (tmp_path / "notclip").mkdir()
    (tmp_path / "notclip" / "config.json").write_text('{"model_type": "clip"}')
    with pytest.raises(BadInputError, match=r"`--clip_model`=.*notclip.* cannot be loaded offline as a CLIP model"):
        ClipModel.load(str(tmp_path / "notclip"))


# ---------------------------------------------------------------------------------------------------- feature extractors, LPIPS


def test_inception_needs_torch_fidelity_and_names_its_weights_file_offline(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    with pytest.raises(BadInputError, match=r"`--fid_feature_extractor inception` needs torch-fidelity .* `pip install torch-fidelity`"):
        check_feature_extractor("inception")
    fake = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    fake.URL_INCEPTION_V3 = "https://example.invalid/releases/weights-inception-2015-12-05-6726825d.pth"
    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", fake)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailableError, match=r"weights weights-inception-2015-12-05-6726825d\.pth, which are not in the "
                                                  r"torch hub cache \(.*torch/hub/checkpoints/weights-inception"):
        check_feature_extractor("inception")
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "torch" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth").write_bytes(b"")
    check_feature_extractor("inception")  # cached: fine


def test_module_factory_feature_extractor(monkeypatch):
    mod = types.ModuleType("fidelity_test_features")
    mod.make = lambda device: (lambda images: np.stack([np.asarray(im, dtype=float).mean(axis=(0, 1)) for im in images]))
    monkeypatch.setitem(sys.modules, "fidelity_test_features", mod)
    fe = build_feature_extractor("fidelity_test_features:make")
    assert fe([Image.new("RGB", (4, 4), (10, 20, 30))]).tolist() == [[10.0, 20.0, 30.0]]
    with pytest.raises(BadInputError, match=r"`--fid_feature_extractor`='no_such_module_xyz:make' cannot be imported"):
        check_feature_extractor("no_such_module_xyz:make")
    with pytest.raises(BadInputError, match=r"must be one of \['inception', 'clip', 'none'\] or MODULE:FACTORY, got 'dino'"):
        check_feature_extractor("dino")
    assert build_feature_extractor("none") is None


def test_lpips_is_skipped_with_a_reason_when_unavailable(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lpips", None)
    assert load_lpips("alex") == (None, "the `lpips` package is not installed (`pip install lpips`)")

    class FakeLPIPS(torch.nn.Module):
        def __init__(self, net, verbose):
            super().__init__()

        def forward(self, a, b):
            return (a - b).abs().mean(dim=(1, 2, 3), keepdim=True)

    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=FakeLPIPS))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric, reason = load_lpips("alex")
    assert metric is None and "backbone weights" in reason and reason.endswith(
        "alexnet-owt-7be5be79.pth are not on this offline machine (run once online, or copy the file there)")
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "torch" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth").write_bytes(b"")
    metric, reason = load_lpips("alex")
    assert reason is None and metric.describe()["net"] == "alex"
    x = images_to_tensor([Image.new("RGB", (16, 16), (0, 0, 0))])
    y = images_to_tensor([Image.new("RGB", (16, 16), (255, 255, 255))])
    assert metric(x, y).tolist() == pytest.approx([2.0]) and metric(x, x).tolist() == [0.0]


# ---------------------------------------------------------------------------------------------------- encoder drift, Pareto


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_encoder_drift_reads_what_encode_prompt_produces(variant):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    from safer_diffusion.testing import tiny_sd_components

    components = tiny_sd_components(variant=variant)
    pipe = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    other = CLIPTextModel(components["text_encoder"].config).eval()  # another random encoder of the same shape
    prompts = {"a": "a red bicycle leaning against a brick wall", "b": "a lighthouse on a rocky coast at sunset"}
    rows = encoder_drift({"original": components["text_encoder"], "same": components["text_encoder"], "other": other},
                         components["tokenizer"], prompts, reference="original")  # fmt: skip
    by = {(r["prompt_id"], r["variant"]): r for r in rows}
    assert set(by) == {("a", "same"), ("b", "same"), ("a", "other"), ("b", "other")}
    assert by[("a", "same")]["pooled_cosine"] == pytest.approx(1.0) and by[("a", "same")]["token_msd"] == 0.0
    # by hand, from the pipeline's own encode_prompt (the hidden states the UNet reads) and the EOS-token pooled output
    embeds, _ = pipe.encode_prompt(list(prompts.values()), "cpu", 1, False)
    pipe.text_encoder = other
    embeds_other, _ = pipe.encode_prompt(list(prompts.values()), "cpu", 1, False)
    msd = ((embeds_other.double() - embeds.double()) ** 2).sum(-1).mean(-1)
    assert [by[("a", "other")]["token_msd"], by[("b", "other")]["token_msd"]] == pytest.approx(msd.tolist(), rel=1e-6)
    assert by[("a", "other")]["pooled_cosine"] < 0.99
    with pytest.raises(ValueError, match=r"`reference` 'x' is not one of the encoders"):
        encoder_drift({"original": other}, components["tokenizer"], prompts, reference="x")


def test_pareto_front():
    pts = [("a", 30.0, 10.0), ("b", 28.0, 2.0), ("c", 25.0, 5.0), ("d", 31.0, 40.0)]
    assert pareto_front(pts) == ["a", "b", "d"]  # c is beaten by b on both
    assert pareto_front([("x", 0.2, 1.0), ("y", 0.1, 3.0)], higher_is_better=False) == ["x", "y"]
    assert pareto_front([("x", 0.2, 1.0), ("y", 0.3, 3.0)], higher_is_better=False) == ["x"]
