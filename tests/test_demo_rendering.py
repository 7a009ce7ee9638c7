"""Unit tests of what the demo shows (`demos/rendering.py`): the blur, verdicts, details, example prompts."""

import numpy as np
import pytest
from PIL import Image

from demos import rendering
from demos.rendering import ComparisonResult, ImageVerdict, obscure, render, shown_image, timing_markdown, verdict_markdown
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
        original=ImageVerdict(image=image, flagged=flagged_original, scores={"nudenet": 0.91, "nudenet/FEMALE_BREAST_EXPOSED": 0.91}),
        safe=ImageVerdict(image=image, flagged=flagged_safe, scores={"nudenet": 0.02}),
        request=validate_request("x", seed=3, steps=2, width=64, height=64),
        seconds=0.1234567,
        device="cpu",
        dtype="float32",
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
    assert details["request"]["seed"] == 3 and details["seconds"] == 0.1235
    assert result.details(revealed=True)["original"]["blurred"] is False
    assert "0.12 s for both images" in timing_markdown(result) and "seed 3" in timing_markdown(result)


def test_render_gives_the_five_outputs_in_ui_order():
    result = _result(flagged_original=True, flagged_safe=True)
    original, safe, original_verdict, safe_verdict, details = render(result, False)
    assert _detail(original) < 0.05 * _detail(result.original.image) and _detail(safe) < 0.05 * _detail(result.safe.image)
    assert original_verdict.startswith("**Original CLIP:") and safe_verdict.startswith("**SaFeR-CLIP:")
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
