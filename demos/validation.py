"""Input validation of the demo: pure functions, no Gradio and no model.

:func:`validate_request` turns the raw form values into a :class:`GenerationRequest` or raises ``ValueError``
naming the field, the value received and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["LIMITS", "MAX_SEED", "GenerationRequest", "Limits", "validate_request"]

MAX_SEED = 2**32 - 1  # torch.Generator.manual_seed accepts 64-bit seeds; 32 bits keep the UI readable


@dataclass(frozen=True)
class Limits:
    """Input limits of the demo. Sizes are in pixels."""

    max_prompt_chars: int = 1000  # checked before tokenizing, so huge pastes are cheap to reject
    max_prompt_tokens: int = 77  # CLIP's context, start and end tokens included (overridden by the tokenizer's)
    min_steps: int = 1
    max_steps: int = 100
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


def _as_int(name: str, value: Any, fix: str) -> int:
    if isinstance(value, bool) or value is None:
        raise ValueError(f"`{name}` must be a whole number, got {value!r}. {fix}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"`{name}` must be a whole number, got {value!r}. {fix}") from None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a whole number, got {value!r}. {fix}") from None
    if number != number or number in (float("inf"), float("-inf")) or number != int(number):
        raise ValueError(f"`{name}` must be a whole number, got {value!r}. {fix}")
    return int(number)


def _check_text(name: str, text: Any, tokenizer, limits: Limits, required: bool) -> str | None:
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise ValueError(f"`{name}` must be text, got {type(text).__name__}.")
    text = text.strip()
    if not text:
        if required:
            raise ValueError(f"`{name}` is empty: type what the images should show.")
        return None
    if len(text) > limits.max_prompt_chars:
        raise ValueError(
            f"`{name}` is {len(text)} characters long; the limit is {limits.max_prompt_chars}. Shorten it."
        )
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
        prompt: what to draw; required, at most ``limits.max_prompt_chars`` characters and
            ``limits.max_prompt_tokens`` CLIP tokens (when ``tokenizer`` is given).
        negative_prompt: optional; same limits as ``prompt``. Empty means none.
        seed: whole number in ``[0, 2**32 - 1]``.
        steps: number of denoising steps, whole, in ``[limits.min_steps, limits.max_steps]``.
        guidance: classifier-free guidance scale in ``[limits.min_guidance, limits.max_guidance]``.
        width, height: pixels, multiples of ``limits.size_multiple`` in ``[limits.min_size, limits.max_size]``.
        tokenizer: the pipeline's CLIP tokenizer, used to count prompt tokens.
        limits: the limits to apply.

    Returns:
        `GenerationRequest` with stripped prompts (an empty negative prompt becomes ``None``).

    Raises:
        ValueError: naming the argument, the value received and how to fix it.
    """
    prompt = _check_text("prompt", prompt, tokenizer, limits, required=True)
    negative_prompt = _check_text("negative_prompt", negative_prompt, tokenizer, limits, required=False)

    seed = _as_int("seed", seed, f"Use a number between 0 and {MAX_SEED}, or press 'Random seed'.")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"`seed` must be between 0 and {MAX_SEED}, got {seed}.")

    steps_fix = f"Use {limits.min_steps} to {limits.max_steps} steps."
    steps = _as_int("steps", steps, steps_fix)
    if not limits.min_steps <= steps <= limits.max_steps:
        raise ValueError(f"`steps` must be between {limits.min_steps} and {limits.max_steps}, got {steps}. {steps_fix}")

    try:
        guidance = float(guidance)
    except (TypeError, ValueError):
        raise ValueError(f"`guidance` must be a number, got {guidance!r}.") from None
    if not limits.min_guidance <= guidance <= limits.max_guidance:  # also rejects NaN
        raise ValueError(
            f"`guidance` must be between {limits.min_guidance:g} and {limits.max_guidance:g}, got {guidance:g}. "
            "7.5 is the usual Stable Diffusion value; values <= 1 turn classifier-free guidance off."
        )

    sizes = {}
    for name, value in (("width", width), ("height", height)):
        fix = f"Use a multiple of {limits.size_multiple} between {limits.min_size} and {limits.max_size}."
        size = _as_int(name, value, fix)
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
