"""The N-way comparison core: several text encoders' prompt embeddings denoised in ONE loop from the same latents.

:meth:`SaferStableDiffusionPipeline.compare` and :meth:`SaferStableDiffusionXLPipeline.compare` are both built on these
helpers (through :class:`~safer_diffusion.pipeline_common.SaferPipelineMixin`): each builds one
:class:`BranchConditioning` per encoder (its UNet keyword tensors: ``encoder_hidden_states``, and for SDXL also
``added_cond_kwargs`` with the pooled ``text_embeds`` and ``time_ids``), then calls :func:`branch_schedulers`,
:func:`branch_generators` and :func:`denoise_branches`, and decodes each branch's latents itself.

Why the images equal N separate generations with the same seeds: every branch starts from the same initial
latents, steps its own copy of the scheduler (multistep schedulers keep history; stochastic ones draw noise) with
its own copy of the generator, taken in the state a separate call would have after drawing the latents. Only the
UNet is shared: its rows are independent, so batching them (or splitting them into chunks of ``max_batch`` rows)
changes nothing but float rounding.
"""

from __future__ import annotations

import copy
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ENCODER_ALIASES",
    "ORIGINAL",
    "SAFE",
    "BranchConditioning",
    "branch_generators",
    "branch_schedulers",
    "check_max_batch",
    "check_text_encoders",
    "clone_generator",
    "denoise_branches",
]

#: ``text_encoders`` value naming the pipeline's ``original_text_encoder`` (the base model's own encoder).
ORIGINAL = "original"
#: ``text_encoders`` value naming the pipeline's ``text_encoder`` (its safe encoder).
SAFE = "safe"
ENCODER_ALIASES = (ORIGINAL, SAFE)


def clone_generator(generator):
    """An independent generator (or list of them) in the same state, so a second branch draws the same noise."""
    import torch

    if generator is None:
        return None
    if isinstance(generator, list):
        return [clone_generator(g) for g in generator]
    clone = torch.Generator(device=generator.device)
    clone.set_state(generator.get_state())
    return clone


def branch_schedulers(scheduler, n: int) -> list:
    """``[scheduler, copy, ...]``: ``n`` schedulers in the state of ``scheduler`` (call after ``set_timesteps``)."""
    return [scheduler] + [copy.deepcopy(scheduler) for _ in range(n - 1)]


def branch_generators(generator, n: int) -> list:
    """``[generator, clone, ...]``: ``n`` generators in the state of ``generator`` (call after drawing the latents)."""
    return [generator] + [clone_generator(generator) for _ in range(n - 1)]


def check_max_batch(max_batch: Any) -> int | None:
    """``max_batch`` itself (`None` or a whole number >= 1); anything else is a `ValueError` naming it."""
    if max_batch is None:
        return None
    if isinstance(max_batch, bool) or not isinstance(max_batch, numbers.Integral) or max_batch < 1:
        raise ValueError(
            f"`max_batch` must be a whole number >= 1 (UNet rows per forward pass) or None (all rows at once), "
            f"got {max_batch!r}."
        )
    return int(max_batch)


def check_text_encoders(text_encoders: Any, pair: bool = False) -> dict[str, Any]:
    """Check the shape of a ``text_encoders`` mapping without loading anything; return it as an ordered `dict`.

    Keys are the names results are reported under (non-empty strings). Values are ``"original"`` / ``"safe"``
    (the pipeline's own encoders), a loaded text encoder (a `torch.nn.Module`), or a source that
    :func:`~safer_diffusion.encoders.load_safe_text_encoder` accepts (a folder, a ``.safetensors`` file, a hub id).
    With ``pair`` (SDXL, two text encoders) a loaded value is a ``(text_encoder, text_encoder_2)`` pair of modules
    and a source holds both (a two-encoder export or an SDXL pipeline folder, or its hub id).

    Raises:
        TypeError: not a mapping, or a value of another kind (naming ``text_encoders[NAME]``).
        ValueError: an empty mapping, a name that is not a non-empty string, an empty source.
    """
    import torch

    if not isinstance(text_encoders, Mapping):
        raise TypeError(
            f"`text_encoders` must be a dict {{name: encoder}}, got {type(text_encoders).__name__}; e.g. "
            "text_encoders={'original': 'original', 'safe': 'safe', 'mine': './my-export'}."
        )
    if not text_encoders:
        raise ValueError("`text_encoders` is empty; give at least one {name: encoder} item.")
    checked: dict[str, Any] = {}
    for name, value in text_encoders.items():
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"`text_encoders` names must be non-empty strings, got {name!r}.")
        where = f"`text_encoders[{name!r}]`"
        if isinstance(value, (str, os.PathLike)):
            if not os.fspath(value).strip():
                raise ValueError(f"{where} is empty; pass 'original', 'safe', a folder, a file or a hub id.")
        elif pair and isinstance(value, torch.nn.Module):
            raise TypeError(
                f"{where} is one text encoder ({type(value).__name__}), but an SDXL pipeline conditions on two: pass the "
                "pair (text_encoder, text_encoder_2) as a tuple of modules, a two-encoder export folder, 'original' or 'safe'."
            )
        elif pair and isinstance(value, (tuple, list)):
            if len(value) != 2 or not all(isinstance(v, torch.nn.Module) for v in value):
                kinds = ", ".join(type(v).__name__ for v in value)
                raise TypeError(
                    f"{where} must be a pair (text_encoder, text_encoder_2) of loaded text encoder modules, got a "
                    f"{type(value).__name__} of {len(value)} ({kinds})."
                )
        elif pair:
            raise TypeError(
                f"{where} must be 'original', 'safe', a pair (text_encoder, text_encoder_2) of loaded text encoders or a "
                f"source holding both (two-encoder export folder, SDXL pipeline folder, hub id), got {type(value).__name__}."
            )
        elif not isinstance(value, torch.nn.Module):
            raise TypeError(
                f"{where} must be 'original', 'safe', a loaded text encoder (torch.nn.Module) or a source "
                f"(folder, .safetensors file, hub id), got {type(value).__name__}."
            )
        checked[name] = value
    return checked


@dataclass
class BranchConditioning:
    """One encoder's conditioning: the keyword tensors its UNet rows get, for the prompt and for the negative prompt.

    Args:
        cond: UNet keyword arguments of the prompt rows, e.g. ``{"encoder_hidden_states": (B, L, D)}``; one level of
            nesting is allowed for dicts of tensors (SDXL: ``{"added_cond_kwargs": {"text_embeds": ..., "time_ids":
            ...}}``). Every tensor has the branch's ``B`` rows first.
        uncond: the same keys for the negative-prompt rows (used with classifier-free guidance), or `None`.
    """

    cond: dict[str, Any]
    uncond: dict[str, Any] | None = None


def _cat(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    for key, first in parts[0].items():
        if isinstance(first, dict):
            out[key] = _cat([p[key] for p in parts])
        else:
            out[key] = torch.cat([p[key] for p in parts])
    return out


def _rows(tree: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    return {k: _rows(v, start, stop) if isinstance(v, dict) else v[start:stop] for k, v in tree.items()}


def denoise_branches(
    pipe,
    latents,
    branches: Sequence[BranchConditioning],
    timesteps,
    schedulers: Sequence[Any],
    extra_step_kwargs: Sequence[dict[str, Any]],
    *,
    do_classifier_free_guidance: bool,
    guidance_scale: float,
    guidance_rescale: float = 0.0,
    timestep_cond=None,
    cross_attention_kwargs: dict[str, Any] | None = None,
    max_batch: int | None = None,
) -> list:
    """Run every branch from the same ``latents`` through one denoising loop; return each branch's final latents.

    The UNet batch of a step holds, with guidance, ``[uncond_0, ..., uncond_{N-1}, cond_0, ..., cond_{N-1}]``
    (``2 * N * B`` rows), without it ``[cond_0, ..., cond_{N-1}]``; with ``max_batch`` it is run in slices of at
    most that many rows. Branch ``i`` is stepped by ``schedulers[i]`` with ``extra_step_kwargs[i]``.

    Args:
        pipe: the pipeline (its ``unet``, ``progress_bar`` and ``interrupt``).
        latents: ``(B, C, h, w)`` initial latents, shared by every branch.
        branches: one :class:`BranchConditioning` per encoder.
        timesteps: as returned by ``retrieve_timesteps``.
        schedulers, extra_step_kwargs: one per branch (:func:`branch_schedulers`, ``prepare_extra_step_kwargs``
            with :func:`branch_generators`).
        do_classifier_free_guidance, guidance_scale, guidance_rescale, cross_attention_kwargs: as in the pipeline.
        timestep_cond: ``(1, dim)`` guidance embedding (UNets with ``time_cond_proj_dim``), repeated for every row.
        max_batch: at most this many UNet rows per forward pass (`None`: all at once).

    Returns:
        `list` of ``(B, C, h, w)`` latents, one per branch, in the order of ``branches``.
    """
    import torch
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    n = len(branches)
    if not (n == len(schedulers) == len(extra_step_kwargs)):
        raise ValueError(f"{n} branches need {n} schedulers and step kwargs, got {len(schedulers)} and {len(extra_step_kwargs)}.")
    cfg = do_classifier_free_guidance
    halves = [b.uncond for b in branches] + [b.cond for b in branches] if cfg else [b.cond for b in branches]
    if cfg and any(h is None for h in halves):
        raise ValueError("Classifier-free guidance needs `uncond` conditioning in every branch.")
    unet_kwargs = _cat(halves)
    batch = latents.shape[0]
    rows = batch * len(halves)
    step = rows if max_batch is None else max_batch
    if timestep_cond is not None:
        unet_kwargs["timestep_cond"] = timestep_cond.expand(rows, -1)
    branch_latents = [latents] + [latents.clone() for _ in range(n - 1)]
    with pipe.progress_bar(total=len(timesteps)) as progress_bar:
        for t in timesteps:
            if getattr(pipe, "interrupt", False):
                continue
            scaled = [s.scale_model_input(x, t) if hasattr(s, "scale_model_input") else x
                      for s, x in zip(schedulers, branch_latents)]  # fmt: skip
            model_input = torch.cat(scaled * 2 if cfg else scaled)
            noise = torch.cat([
                pipe.unet(model_input[i : i + step], t, cross_attention_kwargs=cross_attention_kwargs, return_dict=False,
                          **_rows(unet_kwargs, i, i + step))[0]
                for i in range(0, rows, step)
            ])  # fmt: skip
            if cfg:
                noise_uncond, noise_text = noise.chunk(2)
                noise = noise_uncond + guidance_scale * (noise_text - noise_uncond)
                if guidance_rescale > 0.0:
                    noise = rescale_noise_cfg(noise, noise_text, guidance_rescale=guidance_rescale)
            branch_latents = [
                s.step(e, t, x, **kw, return_dict=False)[0]
                for s, e, x, kw in zip(schedulers, noise.chunk(n), branch_latents, extra_step_kwargs)
            ]
            progress_bar.update()
    return branch_latents
