"""Input validation of the demo: every value a browser or an API client sends to ``/compare`` is checked here,
before any work (no model call, no tokenizer state shared with a running generation).

Pure functions, no Gradio and no model: :func:`validate_request` turns the raw form values into a
:class:`GenerationRequest` or raises ``ValueError`` naming the field, the value received and the fix;
:func:`check_reveal` accepts only a real boolean for *Reveal flagged images*.

The documented limits (README, "Demo"): prompt and negative prompt each at most 1,000 characters and
77 CLIP tokens (start and end tokens included), no NUL characters (refused, not stripped), the prompt not
empty or whitespace only; steps 1-100; guidance a finite number in 0-30; width and height multiples of 8
in 64-1024; seed a whole number in ``[0, 2**63)``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

__all__ = ["LIMITS", "MAX_SEED", "GenerationRequest", "Limits", "check_reveal", "validate_request"]

#: Largest seed: ``[0, 2**63)`` like every other entry point (``--seed``). Seeds above 2**53 are exact through
#: the API only (a browser's number field rounds them).
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Limits:
    """Input limits of the demo. Sizes are in pixels."""

    max_prompt_chars: int = 1000  # checked before tokenizing, so huge pastes are cheap to reject
    max_prompt_tokens: int = 77  # CLIP's context, start and end tokens included (overridden by the tokenizer's)
    min_steps: int = 1
    max_steps: int = 100  # a shared demo: bounded work per request
    min_guidance: float = 0.0
    max_guidance: float = 30.0
    min_size: int = 64
    max_size: int = 1024
    size_multiple: int = 8  # the VAE downsamples by 8


LIMITS = Limits()


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request: what ``CompareService.run`` passes to ``pipe.compare()``."""

    prompt: str
    negative_prompt: str | None
    seed: int
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int


def check_reveal(reveal: Any) -> bool:
    """``reveal`` itself if it is a real boolean; anything else is refused.

    A flagged image is shown unblurred only for ``reveal is True``. Strings (``"false"``, ``"0"``, ``"no"``),
    numbers, lists and ``None`` are errors, never a reveal: ``bool("false")`` is ``True``.

    Raises:
        ValueError: naming ``reveal``, the value and its type received, and the fix.
    """
    if isinstance(reveal, bool):
        return reveal
    raise ValueError(
        f"`reveal` must be true or false (a boolean), got {reveal!r} ({type(reveal).__name__}). "
        "Send false to keep flagged images blurred, true to show them."
    )


def _whole_number(name: str, value: Any, fix: str) -> int:
    """``value`` as an exact ``int``: ints, integral finite floats and numeric text; never booleans or None."""
    bad = ValueError(f"`{name}` must be a whole number, got {value!r}. {fix}")
    if isinstance(value, bool) or value is None:
        raise bad
    if isinstance(value, numbers.Integral):
        return int(value)  # exact, also above 2**53
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            value = float(text)
        except ValueError:
            raise bad from None
    if not isinstance(value, numbers.Real):
        raise bad
    number = float(value)
    if not math.isfinite(number) or number != int(number):
        raise bad
    return int(number)


def _number(name: str, value: Any) -> float:
    """``value`` as a finite ``float``: numbers and numeric text; never booleans, None or NaN/inf."""
    if isinstance(value, bool) or value is None or not isinstance(value, (numbers.Real, str)):
        raise ValueError(f"`{name}` must be a number, got {value!r}.")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"`{name}` must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise ValueError(f"`{name}` must be a finite number, got {number!r}.")
    return number


def _check_text(name: str, text: Any, tokenizer, limits: Limits, required: bool) -> str | None:
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise ValueError(f"`{name}` must be text, got {type(text).__name__}.")
    if "\x00" in text:
        raise ValueError(f"`{name}` contains a NUL character (\\x00) at position {text.index(chr(0))}; remove it.")
    text = text.strip()
    if not text:
        if required:
            raise ValueError(f"`{name}` is empty: type what the images should show.")
        return None
    if len(text) > limits.max_prompt_chars:
        raise ValueError(f"`{name}` is {len(text)} characters long; the limit is {limits.max_prompt_chars}. Shorten it.")
    if tokenizer is not None:
        max_tokens = min(limits.max_prompt_tokens, getattr(tokenizer, "model_max_length", limits.max_prompt_tokens))
        n_tokens = len(tokenizer(text, truncation=False).input_ids)
        if n_tokens > max_tokens:
            raise ValueError(
                f"`{name}` is {n_tokens} tokens long; the CLIP text encoder reads at most {max_tokens} "
                "(start and end tokens included) and would silently cut the rest. Shorten it."
            )
    return text


def validate_request(
    prompt: Any,
    negative_prompt: Any = "",
    seed: Any = 0,
    steps: Any = 25,
    guidance: Any = 7.5,
    width: Any = 512,
    height: Any = 512,
    *,
    tokenizer=None,
    limits: Limits = LIMITS,
) -> GenerationRequest:
    """Check the demo's inputs and return them as a :class:`GenerationRequest`.

    Args:
        prompt: what to draw; required (not empty or whitespace only), no NUL character, at most
            ``limits.max_prompt_chars`` characters and ``limits.max_prompt_tokens`` CLIP tokens (when
            ``tokenizer`` is given).
        negative_prompt: optional; same limits as ``prompt``. Empty means none.
        seed: whole number in ``[0, MAX_SEED]`` (``MAX_SEED = 2**63 - 1``).
        steps: number of denoising steps, whole, in ``[limits.min_steps, limits.max_steps]``.
        guidance: classifier-free guidance scale, finite, in ``[limits.min_guidance, limits.max_guidance]``.
        width, height: pixels, multiples of ``limits.size_multiple`` in ``[limits.min_size, limits.max_size]``.
        tokenizer: a CLIP tokenizer used to count prompt tokens. It is called here, so it must not be one a
            generation is using at the same time (fast tokenizers keep the mode of their last call).
        limits: the limits to apply.

    Returns:
        `GenerationRequest` with stripped prompts (an empty negative prompt becomes ``None``).

    Raises:
        ValueError: naming the argument, the value received and how to fix it.
    """
    prompt = _check_text("prompt", prompt, tokenizer, limits, required=True)
    negative_prompt = _check_text("negative_prompt", negative_prompt, tokenizer, limits, required=False)

    seed = _whole_number("seed", seed, f"Use a number between 0 and {MAX_SEED}, or press 'Random seed'.")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"`seed` must be between 0 and {MAX_SEED}, got {seed}.")

    steps_fix = f"Use {limits.min_steps} to {limits.max_steps} steps."
    steps = _whole_number("steps", steps, steps_fix)
    if not limits.min_steps <= steps <= limits.max_steps:
        raise ValueError(f"`steps` must be between {limits.min_steps} and {limits.max_steps}, got {steps}. {steps_fix}")

    guidance = _number("guidance", guidance)
    if not limits.min_guidance <= guidance <= limits.max_guidance:
        raise ValueError(
            f"`guidance` must be between {limits.min_guidance:g} and {limits.max_guidance:g}, got {guidance:g}. "
            "7.5 is the usual Stable Diffusion value; values <= 1 turn classifier-free guidance off."
        )

    sizes = {}
    for name, value in (("width", width), ("height", height)):
        fix = f"Use a multiple of {limits.size_multiple} between {limits.min_size} and {limits.max_size}."
        size = _whole_number(name, value, fix)
        if size % limits.size_multiple:
            raise ValueError(f"`{name}` must be a multiple of {limits.size_multiple}, got {size}. {fix}")
        if not limits.min_size <= size <= limits.max_size:
            raise ValueError(f"`{name}` must be between {limits.min_size} and {limits.max_size}, got {size}. {fix}")
        sizes[name] = size

    return GenerationRequest(
        prompt=prompt,
        negative_prompt=negative_prompt,
        seed=seed,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=sizes["height"],
        width=sizes["width"],
    )
