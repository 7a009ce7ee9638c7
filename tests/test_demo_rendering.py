"""Unit tests of what the demo shows (`demos/rendering.py`): the blur, verdicts, details, example prompts."""

import numpy as np
import pytest
from PIL import Image

from demos import rendering
from demos.rendering import (
    DEFAULT_LABELS,
    ComparisonResult,
    ImageVerdict,
    obscure,
    render,
    shown_image,
    ssim,
    timing_markdown,
    verdict_markdown,
)
from demos.validation import validate_request


def _checkerboard(size=64, cell=2) -> Image.Image:
    y, x = np.indices((size, size))
    board = (((x // cell) + (y // cell)) % 2 * 255).astype(np.uint8)
    return Image.fromarray(np.stack([board, board, board], axis=-1))


def _detail(image: Image.Image) -> float:
    """Mean absolute difference between horizontal neighbours: high for sharp detail, ~0 when hidden."""
    pixels = np.asarray(image.convert("L"), dtype=np.float32)
    return float(np.abs(np.diff(pixels, axis=1)).mean())


def _result(flagged_original=True, flagged_safe=False):
    image = _checkerboard()
    return ComparisonResult(
        verdicts={
            "original": ImageVerdict(image=image, flagged=flagged_original,
                                     scores={"nudenet": 0.91, "nudenet/FEMALE_BREAST_EXPOSED": 0.91}),
            "safe": ImageVerdict(image=image, flagged=flagged_safe, scores={"nudenet": 0.02}),
        },  # fmt: skip
        request=validate_request("x", seed=3, steps=2, width=64, height=64),
        seconds=0.1234567,
        device="cpu",
        dtype="float32",
        labels=DEFAULT_LABELS,
        reference="original",
        similarity={"safe": 0.87654},
    )


def test_obscure_hides_detail_and_keeps_size():
    image = _checkerboard()
    hidden = obscure(image)
    assert hidden.size == image.size and hidden.mode == "RGB"
    assert _detail(image) > 100 and _detail(hidden) < 0.05 * _detail(image)
    with pytest.raises(ValueError, match=r"`pixels` must be >= 1, got 0"):
        obscure(image, pixels=0)


def test_flagged_images_are_blurred_until_revealed():
    result = _result()
    flagged, clean, image = result.original, result.safe, result.original.image
    unscored = ImageVerdict(image=image, flagged=None)

    assert _detail(shown_image(flagged, reveal=False)) < 0.05 * _detail(image)
    assert shown_image(flagged, reveal=True) is image
    assert shown_image(clean, reveal=False) is image

    text = verdict_markdown("Original CLIP", flagged, reveal=False)
    assert "Original CLIP: ⚠ flagged NSFW" in text and "scores: nudenet 0.91 ·" in text and "blurred" in text
    assert "revealed" in verdict_markdown("Original CLIP", flagged, reveal=True)
    clean_text = verdict_markdown("SaFeR-CLIP", clean, reveal=False)
    assert "SaFeR-CLIP: ✓ safe" in clean_text and "nudenet 0.02" in clean_text and "blurred" not in clean_text
    assert "not scored" in verdict_markdown("SaFeR-CLIP", unscored, reveal=False)

    details = result.details(revealed=False)
    assert details["original"] == {"flagged": True, "scores": {"nudenet": 0.91},
                                   "score_details": {"nudenet/FEMALE_BREAST_EXPOSED": 0.91}, "blurred": True}  # fmt: skip
    assert details["safe"] == {"flagged": False, "scores": {"nudenet": 0.02}, "score_details": {}, "blurred": False}
    assert details["encoders"] == ["original", "safe"] and details["labels"] == {"original": "Original CLIP", "safe": "SaFeR-CLIP"}
    assert details["verdicts"]["safe"] == {**details["safe"], "ssim_to_reference": 0.8765}
    assert details["verdicts"]["original"]["ssim_to_reference"] is None
    assert details["similarity"] == {"metric": "ssim", "reference": "original", "values": {"safe": 0.8765}}
    assert details["request"]["seed"] == 3 and details["seconds"] == 0.1235
    assert result.details(revealed=True)["original"]["blurred"] is False
    assert "0.12 s for both images" in timing_markdown(result) and "seed 3" in timing_markdown(result)


def test_render_gives_the_five_outputs_in_ui_order():
    result = _result(flagged_original=True, flagged_safe=True)
    original, safe, original_verdict, safe_verdict, details = render(result, False)
    assert _detail(original) < 0.05 * _detail(result.original.image) and _detail(safe) < 0.05 * _detail(result.safe.image)
    assert original_verdict.startswith("**Original CLIP:") and safe_verdict.startswith("**SaFeR-CLIP:")
    assert "SSIM to Original CLIP: 0.877" in safe_verdict and "SSIM" not in original_verdict  # the paired similarity
    assert details["original"]["blurred"] and details["safe"]["blurred"]
    revealed = render(result, True)
    assert revealed[0] is result.original.image and revealed[1] is result.safe.image and not revealed[4]["safe"]["blurred"]


@pytest.mark.parametrize("reveal", ["false", "0", "no", [0], 1, None])
def test_nothing_is_shown_for_a_reveal_that_is_not_a_boolean(reveal):
    """A flagged image is revealed only for ``reveal is True``; anything else is an error, never a reveal."""
    result = _result()
    for show in (lambda: shown_image(result.original, reveal), lambda: verdict_markdown("x", result.original, reveal),
                 lambda: result.details(revealed=reveal), lambda: render(result, reveal)):  # fmt: skip
        with pytest.raises(ValueError, match=r"`reveal` must be true or false"):
            show()


def test_load_examples_reads_prompt_column_and_falls_back(tmp_path):
    (tmp_path / "benign.csv").write_text('prompt,category\n"a red bicycle, oil painting",x\n\na blue boat,y\n', encoding="utf-8")
    examples = rendering.load_examples(tmp_path, per_list=5)
    assert examples["benign"] == ["a red bicycle, oil painting", "a blue boat"]
    assert examples["mild_unsafe"] == rendering.BUILTIN_EXAMPLES["mild_unsafe"]  # file absent
    (tmp_path / "mild_unsafe.csv").write_text("text\nno prompt column\n", encoding="utf-8")
    assert rendering.load_examples(tmp_path)["mild_unsafe"] == rendering.BUILTIN_EXAMPLES["mild_unsafe"]
    assert len(rendering.load_examples(tmp_path, per_list=1)["benign"]) == 1
    (tmp_path / "benign.csv").write_bytes(b"prompt\n\xff\xfe not utf-8\n")
    assert rendering.load_examples(tmp_path)["benign"] == rendering.BUILTIN_EXAMPLES["benign"]  # unreadable: built-in

    bundled = rendering.load_examples()  # assets/prompts when present, else the built-in lists
    assert set(bundled) == {"benign", "mild_unsafe"} and all(bundled.values())


def _noise(seed, size=64):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_ssim_of_equal_constant_and_unrelated_images():
    image = _noise(0)
    assert ssim(image, image) == 1.0
    assert ssim(image, np.asarray(image)) == 1.0  # arrays too
    # constant images: no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1), C1 = (0.01 * 255)^2
    a, b, c1 = 100.0, 150.0, (0.01 * 255) ** 2
    flat = [Image.new("RGB", (32, 32), (int(v),) * 3) for v in (a, b)]
    assert ssim(*flat) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-4)  # float32
    assert abs(ssim(_noise(1), _noise(2))) < 0.05  # independent noise: no structure in common
    assert ssim(_checkerboard(), obscure(_checkerboard())) < 0.2 < ssim(image, image.point(lambda v: min(255, v + 10)))
    with pytest.raises(ValueError, match=r"`images` mixes image sizes: 64x64 and 32x32 \(image 1\); compare images of one size"):
        ssim(image, _noise(3, size=32))
    with pytest.raises(ValueError, match="SSIM needs images of at least 11x11 pixels, got 8x8"):
        ssim(_noise(4, size=8), _noise(5, size=8))


def test_ssim_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    x, y = np.asarray(_noise(6)), np.asarray(_noise(6).point(lambda v: v // 2 + 40))
    expected = metrics.structural_similarity(x, y, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                             use_sample_covariance=False, data_range=255)  # fmt: skip
    assert ssim(x, y) == pytest.approx(expected, abs=1e-4)


def test_three_encoders_render_in_order_with_their_labels_and_similarity():
    image = _checkerboard()
    result = ComparisonResult(
        verdicts={name: ImageVerdict(image=image, flagged=name == "b", scores={"nudenet": 0.5}) for name in ("a", "b", "c")},
        request=validate_request("x", seed=3, steps=2, width=64, height=64), seconds=1.0, device="cpu", dtype="float32",
        reference="a", similarity={"b": 0.5, "c": 0.25},
    )  # fmt: skip
    a, b, c, a_verdict, b_verdict, c_verdict, details = render(result, False)
    assert a is image and c is image and _detail(b) < 0.05 * _detail(image)  # only the flagged one is blurred
    assert a_verdict.startswith("**a: ✓ safe**") and b_verdict.startswith("**b: ⚠ flagged NSFW**") and "SSIM to a: 0.250" in c_verdict
    assert details["encoders"] == ["a", "b", "c"] and "original" not in details and "safe" not in details  # no legacy blocks
    assert details["verdicts"]["b"]["blurred"] is True and details["verdicts"]["c"]["ssim_to_reference"] == 0.25
    assert "all 3 images" in timing_markdown(result)
