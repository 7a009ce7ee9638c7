"""Unit tests of the demo's input validation (`demos/validation.py`): pure, no Gradio, no model."""

import math

import numpy as np
import pytest

from demos.validation import LIMITS, MAX_SEED, GenerationRequest, Limits, check_reveal, validate_request

GOOD = {"prompt": "a red bicycle", "negative_prompt": "", "seed": 0, "steps": 4, "guidance": 7.5, "width": 64, "height": 64}


def test_validate_request_normalises_valid_inputs(clip_tokenizer):
    request = validate_request("  a red bicycle  ", "   ", 42.0, 4.0, "7.5", 64, 128.0, tokenizer=clip_tokenizer)
    assert request == GenerationRequest(
        prompt="a red bicycle", negative_prompt=None, seed=42, num_inference_steps=4, guidance_scale=7.5, height=128, width=64
    )
    assert isinstance(request.num_inference_steps, int) and isinstance(request.width, int)
    edge = validate_request("x", "blurry", 0, 1, 0, 1024, 64, tokenizer=clip_tokenizer)
    assert (edge.negative_prompt, edge.num_inference_steps, edge.guidance_scale, edge.width) == ("blurry", 1, 0.0, 1024)
    assert validate_request("x", steps=np.int64(3), guidance=np.float32(2.5)).num_inference_steps == 3
    assert validate_request("x", seed="17").seed == 17


def test_seed_range_is_0_to_2_63_exclusive_and_exact():
    assert MAX_SEED == 2**63 - 1
    assert validate_request("x", seed=MAX_SEED).seed == 2**63 - 1  # exact: never through a float
    assert validate_request("x", seed=str(MAX_SEED)).seed == 2**63 - 1
    assert validate_request("x", seed=2**32).seed == 2**32  # the old 32-bit cap is gone
    with pytest.raises(ValueError, match=rf"`seed` must be between 0 and {MAX_SEED}, got {2**63}"):
        validate_request("x", seed=2**63)
    with pytest.raises(ValueError, match=rf"`seed` must be between 0 and {MAX_SEED}, got {2**64}"):
        validate_request("x", seed=2**64)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prompt": ""}, r"`prompt` is empty: type what the images should show"),
        ({"prompt": "   \n\t"}, r"`prompt` is empty"),
        ({"prompt": None}, r"`prompt` is empty"),
        ({"prompt": 3}, r"`prompt` must be text, got int"),
        ({"prompt": ["a cat"]}, r"`prompt` must be text, got list"),
        ({"prompt": "a cat\x00 on a mat"}, r"`prompt` contains a NUL character \(\\x00\) at position 5; remove it"),
        ({"prompt": "\x00"}, r"`prompt` contains a NUL character"),
        ({"negative_prompt": "blurry\x00"}, r"`negative_prompt` contains a NUL character \(\\x00\) at position 6"),
        ({"prompt": "a" * 1001}, r"`prompt` is 1001 characters long; the limit is 1000"),
        ({"prompt": "cat " * 80}, r"`prompt` is 82 tokens long; the CLIP text encoder reads at most 77"),
        ({"negative_prompt": "dog " * 90}, r"`negative_prompt` is 92 tokens long"),
        ({"negative_prompt": 5}, r"`negative_prompt` must be text, got int"),
        ({"seed": -1}, r"`seed` must be between 0 and 9223372036854775807, got -1"),
        ({"seed": 1.5}, r"`seed` must be a whole number, got 1.5"),
        ({"seed": None}, r"`seed` must be a whole number, got None"),
        ({"seed": True}, r"`seed` must be a whole number, got True"),
        ({"seed": float("nan")}, r"`seed` must be a whole number, got nan"),
        ({"seed": [1]}, r"`seed` must be a whole number, got \[1\]"),
        ({"steps": 0}, r"`steps` must be between 1 and 100, got 0. Use 1 to 100 steps"),
        ({"steps": -3}, r"`steps` must be between 1 and 100, got -3"),
        ({"steps": 101}, r"`steps` must be between 1 and 100, got 101"),
        ({"steps": 100000}, r"`steps` must be between 1 and 100, got 100000"),
        ({"steps": 2.5}, r"`steps` must be a whole number, got 2.5"),
        ({"steps": "many"}, r"`steps` must be a whole number, got 'many'"),
        ({"steps": True}, r"`steps` must be a whole number, got True"),
        ({"steps": float("inf")}, r"`steps` must be a whole number, got inf"),
        ({"guidance": -0.5}, r"`guidance` must be between 0 and 30, got -0.5"),
        ({"guidance": 30.5}, r"`guidance` must be between 0 and 30, got 30.5"),
        ({"guidance": float("nan")}, r"`guidance` must be a finite number, got nan"),
        ({"guidance": float("inf")}, r"`guidance` must be a finite number, got inf"),
        ({"guidance": "-inf"}, r"`guidance` must be a finite number, got -inf"),
        ({"guidance": "nan"}, r"`guidance` must be a finite number, got nan"),
        ({"guidance": "high"}, r"`guidance` must be a number, got 'high'"),
        ({"guidance": None}, r"`guidance` must be a number, got None"),
        ({"guidance": True}, r"`guidance` must be a number, got True"),
        ({"width": 100}, r"`width` must be a multiple of 8, got 100. Use a multiple of 8 between 64 and 1024"),
        ({"width": 65}, r"`width` must be a multiple of 8, got 65"),
        ({"height": 1032}, r"`height` must be between 64 and 1024, got 1032"),
        ({"width": 56}, r"`width` must be between 64 and 1024, got 56"),
        ({"height": float("inf")}, r"`height` must be a whole number, got inf"),
        ({"height": None}, r"`height` must be a whole number, got None"),
    ],
)
def test_validate_request_rejects_bad_inputs(clip_tokenizer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        validate_request(**{**GOOD, **kwargs}, tokenizer=clip_tokenizer)


def test_token_limit_counts_start_and_end_tokens(clip_tokenizer):
    # "cat" is one token: 75 of them + start + end = 77 fits, 76 does not.
    assert validate_request("cat " * 75, tokenizer=clip_tokenizer).prompt.count("cat") == 75
    with pytest.raises(ValueError, match=r"is 78 tokens long"):
        validate_request("cat " * 76, tokenizer=clip_tokenizer)
    # Without a tokenizer only the character limit applies.
    assert validate_request("cat " * 76).prompt


def test_limits_are_the_documented_ones_and_can_be_tightened():
    assert (LIMITS.min_steps, LIMITS.max_steps, LIMITS.min_guidance, LIMITS.max_guidance) == (1, 100, 0.0, 30.0)
    assert (LIMITS.min_size, LIMITS.max_size, LIMITS.size_multiple, LIMITS.max_prompt_chars) == (64, 1024, 8, 1000)
    strict = Limits(max_steps=10, max_prompt_chars=5)
    with pytest.raises(ValueError, match=r"`steps` must be between 1 and 10, got 11"):
        validate_request("x", steps=11, limits=strict)
    with pytest.raises(ValueError, match=r"`prompt` is 6 characters long; the limit is 5"):
        validate_request("abcdef", limits=strict)


def test_check_reveal_accepts_only_real_booleans():
    assert check_reveal(True) is True and check_reveal(False) is False
    with pytest.raises(ValueError, match=r"^`reveal` must be true or false \(a boolean\), got 'false' \(str\)\. "):
        check_reveal("false")  # bool("false") is True: the bug this guards against


@pytest.mark.parametrize("value", ["false", "False", "0", "no", "", "true", [0], [], [True], 0, 1, 0.0, None, {}, math.nan,
                                   np.bool_(False)])  # fmt: skip
def test_check_reveal_refuses_everything_else(value):
    with pytest.raises(ValueError, match=r"`reveal` must be true or false \(a boolean\), got .* Send false to keep flagged"):
        check_reveal(value)
