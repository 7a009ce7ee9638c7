"""`SaferStableDiffusionPipeline`: Stable Diffusion with a safe text encoder, NSFW scores on every image,
and a comparison of the original, the safe or any N text encoders from one denoising loop (:mod:`.compare`)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import numbers
import os
import shutil
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.utils import replace_example_docstring

from .compare import (
    ENCODER_ALIASES,
    ORIGINAL,
    SAFE,
    BranchConditioning,
    branch_generators,
    branch_schedulers,
    check_max_batch,
    check_text_encoders,
    denoise_branches,
)
from .encoders import DEFAULT_SAFE_TEXT_ENCODER, as_torch_dtype, check_text_encoder, load_safe_text_encoder, truncate_layers
from .pipeline_output import SaferComparisonOutput, SaferStableDiffusionMultiCompareOutput, SaferStableDiffusionPipelineOutput

logger = logging.getLogger(__name__)

__all__ = ["ORIGINAL_TEXT_ENCODER_DIR", "SAFETY_MODES", "SaferStableDiffusionPipeline"]

#: What happens to flagged images: "flag" leaves them untouched, "blur" blurs them heavily, "black" blanks them.
SAFETY_MODES = ("flag", "blur", "black")
#: Subfolder of a saved pipeline holding the base model's own text encoder (for :meth:`compare`).
ORIGINAL_TEXT_ENCODER_DIR = "original_text_encoder"
_PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_NOT_GIVEN: Any = object()

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from safer_diffusion import SaferStableDiffusionPipeline

        >>> pipe = SaferStableDiffusionPipeline.from_pretrained(
        ...     "CompVis/stable-diffusion-v1-4",
        ...     safe_text_encoder="Adeely93/SafeR_CLIP",
        ...     nsfw_scorer="nudenet",
        ...     keep_original_text_encoder=True,
        ...     torch_dtype=torch.float16,
        ... ).to("cuda")
        >>> out = pipe("a photo of an astronaut riding a horse", generator=torch.Generator("cuda").manual_seed(0))
        >>> out.images[0], out.nsfw_content_detected, out.nsfw_scores
        >>> cmp = pipe.compare("a photo of an astronaut riding a horse", generator=torch.Generator("cuda").manual_seed(0))
        >>> cmp.original_images[0], cmp.safe_images[0]
        >>> many = pipe.compare(  # any N encoders, still one denoising loop
        ...     "a photo of an astronaut riding a horse",
        ...     text_encoders={"original": "original", "safer-clip": "safe", "mine": "./my-export"},
        ...     generator=torch.Generator("cuda").manual_seed(0),
        ... )
        >>> many.images["mine"][0], many.nsfw_scores["mine"]
        ```
"""


def _check_safetensors_only(folder: Path, config: dict | None) -> None:
    """Refuse a local model folder (or a pipeline folder's component subfolders) whose weights are only pickles."""
    if config is None:
        folders = [folder]
    else:
        folders = [folder / name for name, value in config.items()
                   if not name.startswith("_") and isinstance(value, (list, tuple)) and value and value[0] is not None]
    for sub in folders:
        if not sub.is_dir():
            continue
        names = [f.name for f in sub.iterdir() if f.is_file()]
        pickles = sorted(n for n in names if n.endswith(_PICKLE_WEIGHTS))
        if pickles and not any(n.endswith(".safetensors") for n in names):
            raise ValueError(
                f"`pretrained_model_name_or_path`: {os.fspath(sub)!r} has weights only as pickle files {pickles}; this "
                "library loads safetensors only (a pickle can run code when loaded). For a model you trust, convert it once: "
                "`StableDiffusionPipeline.from_pretrained(FOLDER, use_safetensors=False).save_pretrained(NEW_FOLDER)` "
                "(diffusers writes safetensors), then load NEW_FOLDER."
            )


def _check_safety_mode(safety_mode: Any) -> str:
    if safety_mode not in SAFETY_MODES:
        raise ValueError(f"`safety_mode` must be one of {list(SAFETY_MODES)}, got {safety_mode!r}.")
    return safety_mode


def _json_or_none(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return None


def _fit_depth(encoder, base_layers: int):
    """Cut an encoder with exactly one layer more than the base's (OpenCLIP for SD 2.x) to the base's depth."""
    if encoder.config.num_hidden_layers == base_layers + 1:
        logger.info(
            "The safe encoder has %d layers, the base %d: using its penultimate layer, as Stable Diffusion 2 does.",
            encoder.config.num_hidden_layers, base_layers,
        )
        truncate_layers(encoder, base_layers)
    return encoder


def _blur(images: torch.Tensor) -> torch.Tensor:
    """Heavy blur of ``(N, C, H, W)`` images in [0, 1]: area-downsample 32x, then bilinear upsample."""
    height, width = images.shape[-2:]
    small = torch.nn.functional.interpolate(images.float(), size=(max(1, height // 32), max(1, width // 32)), mode="area")
    return torch.nn.functional.interpolate(small, size=(height, width), mode="bilinear", align_corners=False).to(images.dtype)


class SaferStableDiffusionPipeline(StableDiffusionPipeline):
    r"""Stable Diffusion conditioned by a safe (SaFeR-CLIP) text encoder, scoring every image it makes.

    Identical to [`~diffusers.StableDiffusionPipeline`] (same components, same ``__call__``
    arguments and defaults) except that

    * ``text_encoder`` is the **safe** encoder; the base model's own encoder can be kept as
      ``original_text_encoder`` to enable :meth:`compare`;
    * images are scored by ``nsfw_scorer`` (any :mod:`safer_diffusion.scoring` scorer; falls back
      to the base model's ``safety_checker`` when one is loaded), and the scores are returned;
    * ``safety_mode`` decides what happens to flagged images: ``"flag"`` (default, untouched),
      ``"blur"`` or ``"black"``.

    Args:
        vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor, image_encoder:
            as in `StableDiffusionPipeline`; ``text_encoder`` is the safe encoder.
        original_text_encoder (`CLIPTextModel`, *optional*): the base model's text encoder, for :meth:`compare`.
            It is not one of the pipeline's *components*: ``pipe.components`` has exactly the keys of
            `StableDiffusionPipeline`, so ``StableDiffusionImg2ImgPipeline(**pipe.components)`` works.
            ``save_pretrained`` writes it to its own subfolder (``original_text_encoder/``) and
            ``from_pretrained(..., keep_original_text_encoder=True)`` reads it back; ``to()`` and the CPU
            offload methods move and hook it like a component.
        requires_safety_checker (`bool`, defaults to `False`): as in the parent; this pipeline scores
            images itself, so a missing safety checker is not warned about by default.
        nsfw_scorer: `None`, a scorer name (``"nudenet"``, ``"q16"``, ``"safety_checker"``), a list of
            names (any-of), a config dict, or a scorer object (see :func:`safer_diffusion.scoring.get_scorer`).
            Names and dicts are saved by ``save_pretrained``; objects only when they have ``to_config()``.
        safety_mode (`str`, defaults to `"flag"`): one of ``"flag"``, ``"blur"``, ``"black"``.
    """

    # `original_text_encoder` is in the offload sequence although it is not a component: see `_with_original_encoder`
    model_cpu_offload_seq = "text_encoder->original_text_encoder->image_encoder->unet->vae"
    _optional_components = ["safety_checker", "feature_extractor", "image_encoder"]
    _exclude_from_cpu_offload = ["safety_checker"]

    def __init__(
        self,
        vae,
        text_encoder,
        tokenizer,
        unet,
        scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        original_text_encoder=None,
        requires_safety_checker: bool = False,
        nsfw_scorer: Any = None,
        safety_mode: str = "flag",
    ):
        _check_safety_mode(safety_mode)
        cross_attention_dim = unet.config.cross_attention_dim if unet is not None else None
        check_text_encoder(text_encoder, cross_attention_dim, tokenizer, argument="text_encoder")
        if original_text_encoder is not None:
            if not isinstance(original_text_encoder, torch.nn.Module):
                raise TypeError(
                    f"`original_text_encoder` must be a CLIPTextModel (or None), got {type(original_text_encoder).__name__}."
                )
            check_text_encoder(original_text_encoder, cross_attention_dim, tokenizer, argument="original_text_encoder")
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
            requires_safety_checker=requires_safety_checker,
        )
        # a plain attribute, not `register_modules`: it stays out of `components` and of `model_index.json`
        self.original_text_encoder = original_text_encoder
        self.register_to_config(safety_mode=safety_mode)
        self._last_nsfw_scores = None
        self.nsfw_scorer = nsfw_scorer

    # ------------------------------------------------------------------ options
    @property
    def nsfw_scorer(self):
        """The scorer applied to every generated image (or `None`). Settable with anything `__init__` accepts."""
        return self.__dict__.get("_nsfw_scorer")

    @nsfw_scorer.setter
    def nsfw_scorer(self, value: Any) -> None:
        from .scoring import get_scorer, scorer_config

        if value is None:
            scorer, spec = None, None
        elif value == "safety_checker" or (isinstance(value, dict) and value.get("name") == "safety_checker" and len(value) == 1):
            scorer = self._safety_checker_scorer(required=False) or get_scorer("safety_checker")
            spec = "safety_checker"
        else:
            scorer = get_scorer(value)
            spec = _json_or_none(value) if isinstance(value, (str, list, tuple, dict)) else scorer_config(scorer)
        self.__dict__["_nsfw_scorer"] = scorer
        self.__dict__["_nsfw_scorer_savable"] = scorer is None or spec is not None
        self.register_to_config(nsfw_scorer=list(spec) if isinstance(spec, tuple) else spec)

    @property
    def safety_mode(self) -> str:
        """What happens to flagged images: ``"flag"``, ``"blur"`` or ``"black"``. Settable."""
        return self.config.safety_mode

    @safety_mode.setter
    def safety_mode(self, value: str) -> None:
        self.register_to_config(safety_mode=_check_safety_mode(value))

    def _safety_checker_scorer(self, required: bool = True):
        from .scoring import SafetyCheckerScorer

        if getattr(self, "safety_checker", None) is None or getattr(self, "feature_extractor", None) is None:
            return None
        cached = self.__dict__.get("_checker_scorer")
        if cached is None or cached.model is not self.safety_checker:
            cached = SafetyCheckerScorer(self.safety_checker, self.feature_extractor)
            self.__dict__["_checker_scorer"] = cached
        return cached

    def _active_scorer(self):
        return self.nsfw_scorer if self.nsfw_scorer is not None else self._safety_checker_scorer()

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """As `DiffusionPipeline.save_pretrained`; the scorer is saved as its name/options in ``model_index.json``,
        and the original text encoder (when loaded) in ``original_text_encoder/`` beside the components."""
        if not self.__dict__.get("_nsfw_scorer_savable", True):
            logger.warning(
                "The NSFW scorer %r has no serialisable config; it is not saved. Pass `nsfw_scorer=` again when loading.",
                self.nsfw_scorer,
            )
        folder = Path(save_directory) / ORIGINAL_TEXT_ENCODER_DIR
        if self.original_text_encoder is not None:  # written first, so that `push_to_hub=True` uploads it too
            self.original_text_encoder.save_pretrained(folder, safe_serialization=kwargs.get("safe_serialization", True))
        elif folder.is_dir():  # a stale copy from an earlier save would be loaded by `keep_original_text_encoder=True`
            shutil.rmtree(folder)
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        safe_text_encoder: Any = None,
        keep_original_text_encoder: bool = False,
        **kwargs,
    ):
        r"""Load a base Stable Diffusion model and swap in a safe text encoder.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): hub id or local folder of a Stable Diffusion
                (1.x/2.x) pipeline, or of a folder saved by this pipeline's ``save_pretrained``. Weights are read
                from safetensors only: a folder whose weights exist only as pickles (``.bin``) is refused.
            safe_text_encoder: anything :func:`~safer_diffusion.encoders.load_safe_text_encoder`
                accepts (hub id, folder, open_clip file, module). Defaults to
                ``"Adeely93/SafeR_CLIP"`` for a plain Stable Diffusion base; for a folder saved by
                this pipeline, to the safe encoder saved in it. An encoder with exactly one layer
                more than the base model's (OpenCLIP for SD 2.x) is cut to the base's depth.
            keep_original_text_encoder (`bool`, defaults to `False`): also load the base model's own
                text encoder as ``original_text_encoder`` (needed by :meth:`compare`); an ``original_text_encoder=``
                module passed explicitly is used either way.
            torch_dtype (or its newer name ``dtype``): a `torch.dtype`, or one of the names ``"float32"``,
                ``"float16"``, ``"bfloat16"`` (read as that torch dtype).
            nsfw_scorer, safety_mode, and any other keyword: as for `__init__` /
                `DiffusionPipeline.from_pretrained`. When a scorer other than ``"safety_checker"``
                is given, the base model's safety checker is not loaded.

        Returns:
            `SaferStableDiffusionPipeline`
        """
        from .hub import resolve_model_source

        if not isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
            raise TypeError(
                "`pretrained_model_name_or_path` must be a hub id ('owner/name') or a local folder (str or os.PathLike), "
                f"got {type(pretrained_model_name_or_path).__name__} {pretrained_model_name_or_path!r}."
            )
        if not isinstance(keep_original_text_encoder, bool):
            raise TypeError(f"`keep_original_text_encoder` must be True or False, got {keep_original_text_encoder!r}.")
        if "nsfw_scorer" in kwargs:
            scorer = kwargs["nsfw_scorer"]
            uses_checker = scorer == "safety_checker" or (isinstance(scorer, (list, tuple)) and "safety_checker" in scorer)
            if scorer is not None and not uses_checker:
                kwargs.setdefault("safety_checker", None)
                kwargs.setdefault("requires_safety_checker", False)
        if "safety_mode" in kwargs:
            _check_safety_mode(kwargs["safety_mode"])
        # `torch_dtype` (the long-standing name) and `dtype` (diffusers >= 0.42, transformers 5) are both accepted.
        torch_dtype = as_torch_dtype(kwargs.pop("torch_dtype", None), "torch_dtype")
        dtype = as_torch_dtype(kwargs.pop("dtype", None), "dtype")
        if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
            raise ValueError(f"Pass either `torch_dtype`={torch_dtype} or `dtype`={dtype}, not both.")
        torch_dtype = dtype if dtype is not None else torch_dtype
        if torch_dtype is not None:
            kwargs["dtype"] = torch_dtype
        if kwargs.get("use_safetensors") is False:
            raise ValueError("`use_safetensors=False` is not supported: weights are loaded from safetensors only (pickles can run code).")
        kwargs["use_safetensors"] = True

        hub_kwargs = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
        source = resolve_model_source(pretrained_model_name_or_path, argument="pretrained_model_name_or_path",
                                      revision=hub_kwargs.get("revision"), token=hub_kwargs.get("token"))  # fmt: skip
        config = cls.load_config(source, **hub_kwargs)
        if os.path.isdir(source):
            _check_safetensors_only(Path(source), config)
        saved_by_us = config.get("_class_name") == cls.__name__ or "original_text_encoder" in config

        if "text_encoder" in kwargs and safe_text_encoder is not None:
            raise ValueError("Pass the safe encoder either as `safe_text_encoder` or as `text_encoder`, not both.")
        if "text_encoder" not in kwargs and (safe_text_encoder is not None or not saved_by_us):
            from transformers import CLIPTextConfig

            base_config = CLIPTextConfig.from_pretrained(source, subfolder="text_encoder", **hub_kwargs)
            encoder = load_safe_text_encoder(
                safe_text_encoder if safe_text_encoder is not None else DEFAULT_SAFE_TEXT_ENCODER,
                torch_dtype=torch_dtype,
                # only used for open_clip state dicts, which do not record them: a safe encoder is a fine-tune of the base's
                hidden_act=base_config.hidden_act,
                num_attention_heads=base_config.num_attention_heads,
                argument="safe_text_encoder",
            )
            kwargs["text_encoder"] = _fit_depth(encoder, base_config.num_hidden_layers)

        if kwargs.get("original_text_encoder") is not None:
            pass  # given explicitly: used as is
        elif not keep_original_text_encoder:
            kwargs["original_text_encoder"] = None
        else:
            kwargs["original_text_encoder"] = cls._load_original_text_encoder(
                source, pretrained_model_name_or_path, saved_by_us, torch_dtype, hub_kwargs
            )
        return super().from_pretrained(source, **kwargs)

    @staticmethod
    def _load_original_text_encoder(source: str, given: Any, saved_by_us: bool, torch_dtype, hub_kwargs: dict):
        """The base model's own text encoder: ``text_encoder/`` of a base, ``original_text_encoder/`` of our saves."""
        from transformers import CLIPTextModel

        subfolder = ORIGINAL_TEXT_ENCODER_DIR if saved_by_us else "text_encoder"
        local = Path(source) / subfolder
        if saved_by_us and os.path.isdir(source) and not (local / "config.json").is_file():
            raise ValueError(
                f"`keep_original_text_encoder=True`, but {os.fspath(given)!r} was saved without an original text encoder "
                f"(no {ORIGINAL_TEXT_ENCODER_DIR}/ folder). Load the base model instead, or pass `original_text_encoder=`."
            )
        if os.path.isdir(source):
            _check_safetensors_only(local, None)
        return CLIPTextModel.from_pretrained(
            source, subfolder=subfolder, dtype=torch_dtype, use_safetensors=True, **hub_kwargs
        ).eval()

    def to(self, *args, **kwargs):
        """As `DiffusionPipeline.to`; also moves the original text encoder, and a scorer that has a ``to`` method."""
        pipe = super().to(*args, **kwargs)
        device = kwargs.get("device") or next((a for a in args if isinstance(a, (str, torch.device))), None)
        dtype = kwargs.get("dtype") or next((a for a in args if isinstance(a, torch.dtype)), None)
        if self.original_text_encoder is not None and (device is not None or dtype is not None):
            self.original_text_encoder.to(device=device, dtype=dtype)
        scorer = self.nsfw_scorer
        if device is not None and scorer is not None and hasattr(scorer, "to"):
            scorer.to(device)
        return pipe

    # diffusers' offload helpers walk `self.components`; the original encoder takes part in them as a component would.
    @contextlib.contextmanager
    def _with_original_encoder(self):
        before = self.__dict__.get("_components_with_original", False)
        self.__dict__["_components_with_original"] = self.original_text_encoder is not None
        try:
            yield
        finally:
            self.__dict__["_components_with_original"] = before

    @property
    def components(self) -> dict[str, Any]:
        """As `DiffusionPipeline.components`: the keys of `StableDiffusionPipeline`, so
        ``StableDiffusionImg2ImgPipeline(**pipe.components)`` works (the original encoder is not a component)."""
        components = super().components
        if self.__dict__.get("_components_with_original"):
            components["original_text_encoder"] = self.original_text_encoder
        return components

    def enable_model_cpu_offload(self, *args, **kwargs):
        """As in `DiffusionPipeline`; the original text encoder is offloaded in its place in ``model_cpu_offload_seq``."""
        with self._with_original_encoder():
            return super().enable_model_cpu_offload(*args, **kwargs)

    def enable_sequential_cpu_offload(self, *args, **kwargs):
        """As in `DiffusionPipeline`, the original text encoder included."""
        with self._with_original_encoder():
            return super().enable_sequential_cpu_offload(*args, **kwargs)

    def remove_all_hooks(self):
        """As in `DiffusionPipeline`, the original text encoder's hooks included."""
        with self._with_original_encoder():
            return super().remove_all_hooks()

    def load_text_encoder(self, source: Any, *, argument: str = "text_encoder") -> torch.nn.Module:
        """Load a text encoder that fits this pipeline, for :meth:`compare` (``text_encoders=``) or :meth:`encode_prompt`.

        Args:
            source: anything :func:`~safer_diffusion.encoders.load_safe_text_encoder` accepts (folder, ``.safetensors``
                file, hub id, module). Loaded in the dtype of ``text_encoder`` and moved to the pipeline's device;
                an encoder with exactly one layer more than the base's (OpenCLIP for SD 2.x) is cut to its depth.
            argument (`str`): how ``source`` is named in error messages.

        Raises:
            ValueError: the encoder's width does not match the UNet's ``cross_attention_dim``, or it does not cover
                the tokenizer's vocabulary and positions (the message names ``argument``); as well as every error of
                :func:`~safer_diffusion.encoders.load_safe_text_encoder` (unknown layout, pickle weights, offline hub).
        """
        encoder = load_safe_text_encoder(
            source,
            torch_dtype=self.text_encoder.dtype,
            hidden_act=self.text_encoder.config.hidden_act,
            num_attention_heads=self.text_encoder.config.num_attention_heads,
            argument=argument,
        )
        encoder = _fit_depth(encoder, self.text_encoder.config.num_hidden_layers)
        check_text_encoder(encoder, self.unet.config.cross_attention_dim, self.tokenizer, argument=argument)
        return encoder.to(self._execution_device).eval()

    def _resolve_text_encoders(self, text_encoders: dict[str, Any]) -> dict[str, torch.nn.Module]:
        """``{name: module}`` for checked ``text_encoders`` (see :func:`~safer_diffusion.compare.check_text_encoders`):
        the aliases are the pipeline's own encoders, modules are width-checked, other sources are loaded."""
        device = self._execution_device
        modules: dict[str, Any] = {}
        for name, value in text_encoders.items():  # first what needs no loading: every such error comes before any load
            where = f"text_encoders[{name!r}]"
            if isinstance(value, str) and value in ENCODER_ALIASES:
                if value == ORIGINAL and self.original_text_encoder is None:
                    raise ValueError(
                        f"`{where}` is 'original', but the pipeline has no original text encoder: load it with "
                        "`keep_original_text_encoder=True` (or pass `original_text_encoder=`)."
                    )
                modules[name] = self.original_text_encoder if value == ORIGINAL else self.text_encoder
            elif isinstance(value, torch.nn.Module):
                check_text_encoder(value, self.unet.config.cross_attention_dim, self.tokenizer, argument=where)
                param = next(value.parameters(), None)
                if param is not None and not hasattr(value, "_hf_hook") and param.device.type != torch.device(device).type:
                    raise ValueError(
                        f"`{where}` is on {param.device}, but the pipeline runs on {device}; move it first "
                        "(`encoder.to(pipe.device)`), or pass its source and let `compare()` load it."
                    )
                modules[name] = value
        for name, value in text_encoders.items():
            if name not in modules:
                modules[name] = self.load_text_encoder(value, argument=f"text_encoders[{name!r}]")
        return {name: modules[name] for name in text_encoders}

    # ------------------------------------------------------------------ hooks
    @contextlib.contextmanager
    def _text_encoder_swapped(self, encoder: str | torch.nn.Module):
        """Temporarily make ``self.text_encoder`` the original encoder, or a given module (without touching the config)."""
        if isinstance(encoder, torch.nn.Module):
            module = encoder
        elif encoder not in ENCODER_ALIASES:
            raise ValueError(f"`encoder` must be 'safe' or 'original', got {encoder!r}.")
        elif encoder == SAFE:
            yield self.text_encoder
            return
        elif self.original_text_encoder is None:
            raise ValueError(
                "`encoder='original'` needs the base model's text encoder: load the pipeline with "
                "`keep_original_text_encoder=True` (or pass `original_text_encoder=`)."
            )
        else:
            module = self.original_text_encoder
        safe = self.__dict__["text_encoder"]
        self.__dict__["text_encoder"] = module
        try:
            yield module
        finally:
            self.__dict__["text_encoder"] = safe

    def encode_prompt(
        self,
        prompt,
        device,
        num_images_per_prompt,
        do_classifier_free_guidance,
        negative_prompt=None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None,
        clip_skip: int | None = None,
        encoder: str | torch.nn.Module = "safe",
    ):
        r"""`StableDiffusionPipeline.encode_prompt`, with the choice of text encoder.

        Args:
            encoder (`str` or `torch.nn.Module`, defaults to `"safe"`): ``"safe"`` (``text_encoder``),
                ``"original"`` (``original_text_encoder``), or any text encoder module that fits the pipeline
                (see :meth:`load_text_encoder`).
            (all other arguments as in the parent)

        Returns:
            `(prompt_embeds, negative_prompt_embeds)` as in the parent.
        """
        with self._text_encoder_swapped(encoder) as module:
            shim = clip_skip is not None and "text_model" not in dir(module) and hasattr(module, "final_layer_norm")
            if shim:  # transformers>=5 flattened CLIPTextModel; diffusers' clip_skip still reads `.text_model.final_layer_norm`
                module.__dict__["text_model"] = types.SimpleNamespace(final_layer_norm=module.final_layer_norm)
            try:
                prompt_embeds, negative_prompt_embeds = super().encode_prompt(
                    prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt,
                    prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                    lora_scale=lora_scale, clip_skip=clip_skip,
                )  # fmt: skip
            finally:
                if shim:
                    module.__dict__.pop("text_model", None)
        return prompt_embeds, negative_prompt_embeds

    def score_images(self, image: torch.Tensor):
        """Score decoded images and apply ``safety_mode``.

        Args:
            image (`torch.Tensor`): ``(N, 3, H, W)`` VAE output in [-1, 1].

        Returns:
            `(image, flags, scores)`: flagged images are returned already in [0, 1] (blurred or
            black per ``safety_mode``), as the parent's post-processing expects for flagged images;
            ``flags`` is `list[bool]` and ``scores`` `list[dict[str, float]]`, or both `None`
            when there is no scorer.
        """
        scorer = self._active_scorer()
        if scorer is None:
            return image, None, None
        pil = self.image_processor.postprocess(image.detach(), output_type="pil")
        results = scorer.score(pil)
        flags = [bool(r.flagged) for r in results]
        scores = [r.flat_scores(scorer.name) for r in results]
        if any(flags):
            image = image.clone()
            for i, flagged in enumerate(flags):
                if not flagged:
                    continue
                unit = (image[i : i + 1] / 2 + 0.5).clamp(0, 1)  # the parent skips denormalising flagged images
                if self.safety_mode == "blur":
                    unit = _blur(unit)
                elif self.safety_mode == "black":
                    unit = torch.zeros_like(unit)
                image[i : i + 1] = unit
            logger.info("%d of %d images flagged by %s (safety_mode=%s).", sum(flags), len(flags), scorer.name, self.safety_mode)
        return image, flags, scores

    def run_safety_checker(self, image, device, dtype):
        """Hook called by the parent's ``__call__`` after decoding: score with ``nsfw_scorer`` and keep the scores."""
        if not torch.is_tensor(image):  # numpy input (legacy callers): score as the parent would
            image = torch.from_numpy(image).permute(0, 3, 1, 2) * 2 - 1
        image, flags, scores = self.score_images(image)
        self._last_nsfw_scores = scores
        return image, flags

    # ------------------------------------------------------------------ checks
    def default_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """``(height, width)`` with each missing side set to the model's own size (``sample_size x vae_scale_factor``).

        Unlike the parent, which replaces *both* sides when either is missing, a given side is always kept.
        """
        size = self.unet.config.sample_size
        default_h, default_w = (size, size) if isinstance(size, int) else tuple(size)
        return (
            default_h * self.vae_scale_factor if height is None else height,
            default_w * self.vae_scale_factor if width is None else width,
        )

    def check_inputs(
        self,
        prompt,
        height,
        width,
        callback_steps,
        negative_prompt=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        ip_adapter_image=None,
        ip_adapter_image_embeds=None,
        callback_on_step_end_tensor_inputs=None,
        *,
        num_inference_steps: Any = _NOT_GIVEN,
        timesteps=None,
        sigmas=None,
        guidance_scale: Any = _NOT_GIVEN,
        guidance_rescale: Any = _NOT_GIVEN,
        eta: Any = _NOT_GIVEN,
        num_images_per_prompt: Any = _NOT_GIVEN,
        generator=None,
        latents=None,
        text_encoders: Any = None,
        max_batch: Any = None,
    ):
        """The parent's checks, plus those of the arguments it leaves to fail late or silently.

        Raises `ValueError` (a wrong value) or `TypeError` (a wrong kind of object) naming the argument, the value
        and the fix: ``prompt`` strings; ``height``/``width`` positive multiples of 8; ``num_inference_steps`` and
        ``num_images_per_prompt`` whole numbers >= 1; ``guidance_scale``, ``guidance_rescale`` and ``eta`` finite;
        ``generator`` a `torch.Generator` or a list of one per image; ``latents`` of the shape that ``height``,
        ``width`` and the batch call for; :meth:`compare`'s ``text_encoders`` (a ``{name: encoder}`` dict, see
        :func:`~safer_diffusion.compare.check_text_encoders`; nothing is loaded here) and ``max_batch`` (a whole
        number >= 1, or None). The parent's ``__call__`` calls this with its own arguments only; :meth:`__call__`
        and :meth:`compare` call it first with all of them, before any work.
        """
        _check_prompt(prompt)
        if text_encoders is not None:
            check_text_encoders(text_encoders)
        check_max_batch(max_batch)
        for name, value in (("height", height), ("width", width)):
            if not _is_int(value) or value < 8 or value % 8:
                raise ValueError(f"`{name}` must be a positive multiple of 8, got {value!r}; e.g. {name}=512.")
        super().check_inputs(
            prompt, height, width, callback_steps, negative_prompt, prompt_embeds, negative_prompt_embeds,
            ip_adapter_image, ip_adapter_image_embeds, callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        custom_schedule = timesteps is not None or sigmas is not None
        if num_inference_steps is not _NOT_GIVEN and not (num_inference_steps is None and custom_schedule):
            _check_count("num_inference_steps", num_inference_steps, "e.g. num_inference_steps=25")
        for name, value in (("guidance_scale", guidance_scale), ("guidance_rescale", guidance_rescale), ("eta", eta)):
            if value is not _NOT_GIVEN and (not _is_real(value) or not math.isfinite(value)):
                raise ValueError(f"`{name}` must be a finite number, got {value!r}; e.g. guidance_scale=7.5, eta=0.0.")
        per_prompt = 1
        if num_images_per_prompt is not _NOT_GIVEN:
            _check_count("num_images_per_prompt", num_images_per_prompt, "e.g. num_images_per_prompt=1")
            per_prompt = num_images_per_prompt
        if isinstance(prompt, (str, list)):
            batch = (1 if isinstance(prompt, str) else len(prompt)) * per_prompt
        else:
            batch = prompt_embeds.shape[0] * per_prompt if torch.is_tensor(prompt_embeds) else None
        _check_generator(generator, batch)
        if latents is not None:
            if not torch.is_tensor(latents):
                raise TypeError(f"`latents` must be a torch.Tensor (or None), got {type(latents).__name__}.")
            expected = (batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
            if tuple(latents.shape) != expected:
                raise ValueError(
                    f"`latents` has shape {tuple(latents.shape)}, but height={height}, width={width} and {batch} image(s) "
                    f"need {expected} (latent side = image side / vae_scale_factor {self.vae_scale_factor}); pass latents "
                    "of that shape, or the height/width that match them."
                )

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] = None,
        sigmas: list[float] = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[[int, int], None] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 - the parent's default, kept
        **kwargs,
    ) -> SaferStableDiffusionPipelineOutput | tuple:
        r"""Generate images with the safe text encoder and score them.

        All arguments are those of `StableDiffusionPipeline.__call__`, with the same defaults, checked up front by
        :meth:`check_inputs`. Two differences: a missing ``height`` or ``width`` alone takes the model's default
        for that side only (the parent replaces both), and bad values raise a `ValueError`/`TypeError` naming the
        argument before any work. An empty prompt ``""`` keeps diffusers' behaviour (an unconditional generation);
        :meth:`compare` refuses it.

        Examples:

        Returns:
            [`SaferStableDiffusionPipelineOutput`] (``images``, ``nsfw_content_detected``,
            ``nsfw_scores``), or with ``return_dict=False`` the tuple of those three in that order.
            Flags and scores are `None` when no scorer ran (no scorer, or ``output_type="latent"``).
        """
        height, width = self.default_size(height, width)
        self.check_inputs(
            prompt, height, width, kwargs.get("callback_steps"), negative_prompt, prompt_embeds, negative_prompt_embeds,
            ip_adapter_image, ip_adapter_image_embeds, callback_on_step_end_tensor_inputs,
            num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas, guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale, eta=eta, num_images_per_prompt=num_images_per_prompt, generator=generator,
            latents=latents,
        )  # fmt: skip
        self._last_nsfw_scores = None
        out = super().__call__(
            prompt=prompt, height=height, width=width, num_inference_steps=num_inference_steps, timesteps=timesteps,
            sigmas=sigmas, guidance_scale=guidance_scale, negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt, eta=eta, generator=generator, latents=latents,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds, output_type=output_type, return_dict=True,
            cross_attention_kwargs=cross_attention_kwargs, guidance_rescale=guidance_rescale, clip_skip=clip_skip,
            callback_on_step_end=callback_on_step_end, callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            **kwargs,
        )  # fmt: skip
        result = SaferStableDiffusionPipelineOutput(
            images=out.images, nsfw_content_detected=out.nsfw_content_detected, nsfw_scores=self._last_nsfw_scores
        )
        self._last_nsfw_scores = None
        return result if return_dict else result.to_tuple()

    @torch.no_grad()
    def compare(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        score: bool = True,
        eta: float = 0.0,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        text_encoders: dict[str, Any] | None = None,
        max_batch: int | None = None,
    ) -> SaferComparisonOutput | SaferStableDiffusionMultiCompareOutput:
        r"""Generate the same seeds with several text encoders, in one denoising loop.

        By default the original and the safe text encoder; with ``text_encoders`` any N encoders. Every encoding goes
        through the one shared UNet in a single batch per step (with guidance: ``[uncond_1, ..., uncond_N, cond_1,
        ..., cond_N]``, i.e. ``2 * N`` times the prompt batch; split into UNet calls of at most ``max_batch`` rows when
        given), from the same initial latents. Each encoder has its own copy of the scheduler state and of the
        generator state, so its images equal — within float tolerance — those of a separate call with that encoder
        and the same seeds, for stochastic and multistep schedulers too. Images are decoded one encoder at a time.

        Args:
            prompt (`str` or `list[str]`): the prompt(s); required, and none may be empty or only whitespace
                (unlike `__call__`, which generates unconditionally from ``""`` as diffusers does).
            negative_prompt, height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
            generator, latents, output_type, eta, guidance_rescale, clip_skip, cross_attention_kwargs:
                as in `__call__`.
            score (`bool`, defaults to `True`): score every image with the pipeline's scorer (and apply
                ``safety_mode``); `False` skips scoring.
            text_encoders (`dict[str, Any]`, *optional*): ``{name: encoder}``, in the order results are reported.
                A value is ``"original"`` (``original_text_encoder``), ``"safe"`` (``text_encoder``), a loaded text
                encoder module on the pipeline's device, or a source (folder, ``.safetensors`` file, hub id) loaded
                with :meth:`load_text_encoder` on every call (load it once yourself for repeated calls; a folder named
                ``original`` or ``safe`` is given as ``./original``). Every encoder
                must match the UNet's width; errors name ``text_encoders[NAME]``. Default: the original and the
                safe encoder, with today's :class:`SaferComparisonOutput`.
            max_batch (`int`, *optional*): at most this many UNet rows per forward pass (bounds the memory of
                large N); `None` runs all ``2 * N * batch`` rows at once.

        Returns:
            [`SaferComparisonOutput`] without ``text_encoders``; [`SaferStableDiffusionMultiCompareOutput`]
            (images, flags and scores per name) with it.
        """
        default = text_encoders is None
        if default and self.original_text_encoder is None:
            raise ValueError(
                "`compare()` needs the base model's text encoder: load the pipeline with `keep_original_text_encoder=True` "
                "(or pass `original_text_encoder=`)."
            )
        _check_prompt(prompt, required=True)
        height, width = self.default_size(height, width)
        self.check_inputs(
            prompt, height, width, None, negative_prompt, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, eta=eta,
            num_images_per_prompt=num_images_per_prompt, generator=generator, latents=latents,
            text_encoders=text_encoders, max_batch=max_batch,
        )  # fmt: skip
        encoders = self._resolve_text_encoders(check_text_encoders({ORIGINAL: ORIGINAL, SAFE: SAFE} if default else text_encoders))
        names = list(encoders)
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        cfg = self.do_classifier_free_guidance
        batch = (1 if isinstance(prompt, str) else len(prompt)) * num_images_per_prompt
        device = self._execution_device
        lora_scale = cross_attention_kwargs.get("scale") if cross_attention_kwargs else None

        # 1. Encode with every encoder, in the dtype a call of this pipeline conditions in
        dtype = self.text_encoder.dtype
        branches = []
        for module in encoders.values():
            cond, uncond = self.encode_prompt(
                prompt, device, num_images_per_prompt, cfg, negative_prompt, lora_scale=lora_scale, clip_skip=clip_skip,
                encoder=module,
            )  # fmt: skip
            branches.append(BranchConditioning(
                cond={"encoder_hidden_states": cond.to(dtype)},
                uncond={"encoder_hidden_states": uncond.to(dtype)} if cfg else None,
            ))  # fmt: skip

        # 2. Timesteps, one scheduler state per encoder
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device)
        schedulers = branch_schedulers(self.scheduler, len(names))

        # 3. Shared initial latents; per-encoder generator copies for the scheduler's noise
        latents = self.prepare_latents(batch, self.unet.config.in_channels, height, width, dtype, device, generator, latents)
        extra = [self.prepare_extra_step_kwargs(g, eta) for g in branch_generators(generator, len(names))]
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            w = torch.tensor(self.guidance_scale - 1).repeat(1)
            timestep_cond = self.get_guidance_scale_embedding(w, embedding_dim=self.unet.config.time_cond_proj_dim).to(
                device=device, dtype=latents.dtype
            )

        # 4. One denoising loop, one UNet batch per step (in chunks of `max_batch` rows)
        self._num_timesteps = len(timesteps)
        final = denoise_branches(
            self, latents, branches, timesteps, schedulers, extra, do_classifier_free_guidance=cfg,
            guidance_scale=self.guidance_scale, guidance_rescale=self.guidance_rescale, timestep_cond=timestep_cond,
            cross_attention_kwargs=cross_attention_kwargs, max_batch=max_batch,
        )  # fmt: skip

        # 5. Decode encoder by encoder (peak memory of one generation), score, post-process
        outputs = [self.decode_and_score(latent, output_type=output_type, score=score) for latent in final]
        self.maybe_free_model_hooks()
        if default:
            (orig_images, orig_flags, orig_scores), (safe_images, safe_flags, safe_scores) = outputs
            return SaferComparisonOutput(
                original_images=orig_images,
                safe_images=safe_images,
                original_nsfw_content_detected=orig_flags,
                safe_nsfw_content_detected=safe_flags,
                original_nsfw_scores=orig_scores,
                safe_nsfw_scores=safe_scores,
            )
        return SaferStableDiffusionMultiCompareOutput(
            names=names,
            images={name: out[0] for name, out in zip(names, outputs)},
            nsfw_content_detected={name: out[1] for name, out in zip(names, outputs)},
            nsfw_scores={name: out[2] for name, out in zip(names, outputs)},
        )

    def decode_and_score(self, latents: torch.Tensor, output_type: str = "pil", score: bool = True):
        """Decode final latents, score the images (:meth:`score_images`, which applies ``safety_mode``), post-process.

        Returns:
            `(images, flags, scores)`; for ``output_type="latent"`` the latents themselves and `None`, `None`
            (as for flags and scores when ``score`` is `False` or there is no scorer).
        """
        if output_type == "latent":
            return latents, None, None
        image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        flags = scores = None
        if score:
            image, flags, scores = self.score_images(image)
        denormalize = [True] * image.shape[0] if flags is None else [not f for f in flags]
        return self.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize), flags, scores


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_count(name: str, value: Any, example: str) -> None:
    if not _is_int(value) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}; {example}.")


def _check_generator(generator: Any, batch: int | None) -> None:
    if generator is None or isinstance(generator, torch.Generator):
        return
    if isinstance(generator, list) and generator and all(isinstance(g, torch.Generator) for g in generator):
        if batch is not None and len(generator) != batch:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators, but {batch} image(s) are generated; pass one "
                "torch.Generator, or a list of exactly one per image."
            )
        return
    kind = type(generator).__name__
    if isinstance(generator, list):
        kind = "an empty list" if not generator else f"a list holding a {type(next(g for g in generator if not isinstance(g, torch.Generator))).__name__}"
    raise TypeError(
        f"`generator` must be a torch.Generator or a list of them (one per image), got {kind}: {generator!r}; "
        "e.g. generator=torch.Generator('cpu').manual_seed(0)."
    )


def _check_prompt(prompt: Any, required: bool = False) -> None:
    if prompt is None:
        if required:
            raise ValueError("`prompt` is required: pass a string or a list of strings.")
        return
    if isinstance(prompt, list):
        if not prompt:
            raise ValueError("`prompt` is an empty list; pass at least one prompt string.")
        bad = [i for i, p in enumerate(prompt) if not isinstance(p, str)]
        if bad:
            raise ValueError(f"`prompt[{bad[0]}]` is a {type(prompt[bad[0]]).__name__}; every prompt must be a string.")
    elif not isinstance(prompt, str):
        raise ValueError(f"`prompt` must be a string or a list of strings, got {type(prompt).__name__}.")
    if required:
        prompts = [prompt] if isinstance(prompt, str) else prompt
        blank = next((i for i, p in enumerate(prompts) if not p.strip()), None)
        if blank is not None:
            where = "`prompt`" if isinstance(prompt, str) else f"`prompt[{blank}]`"
            raise ValueError(
                f"{where} is empty ({prompts[blank]!r}); `compare()` compares how two encoders read a prompt, so it needs "
                "text. (`pipe(\"\")` still generates unconditionally, as in diffusers.)"
            )
