"""`SaferStableDiffusionXLPipeline`: Stable Diffusion XL with a safe *pair* of text encoders, NSFW scores on every
image, and an original-vs-safe comparison from one UNet pass.

SDXL conditions on two text encoders: ``text_encoder`` (CLIP ViT-L/14, ``hidden_states[-2]``, 768 wide) and
``text_encoder_2`` (OpenCLIP ViT-bigG/14 as ``CLIPTextModelWithProjection``: ``hidden_states[-2]``, 1280 wide, and
the pooled, projected ``text_embeds`` that enter the UNet through ``added_cond_kwargs``). Both are swapped for safe
ones: swapping only the ViT-L encoder would leave the bigG path unsafe. The contract is that of
:class:`~safer_diffusion.SaferStableDiffusionPipeline`, whose scoring and safety-mode members are shared, not copied.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import shutil
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg, retrieve_timesteps
from diffusers.utils import replace_example_docstring
from diffusers.utils.torch_utils import get_module_execution_device

from .compare import clone_generator
from .encoders import (
    as_torch_dtype,
    check_sdxl_text_encoders,
    load_safe_text_encoder,
    load_safe_text_encoder_2,
    load_safe_text_encoder_pair,
    require_text_encoder_pair,
    text_encoder_pair_folder,
)
from .export_format import TEXT_ENCODER_2_DIR, TEXT_ENCODER_DIR
from .hub import resolve_model_source
from .pipeline_output import SaferComparisonOutput, SaferStableDiffusionPipelineOutput
from .pipeline_safer_stable_diffusion import (
    _NOT_GIVEN,
    ORIGINAL_TEXT_ENCODER_DIR,
    SaferStableDiffusionPipeline,
    _check_count,
    _check_generator,
    _check_prompt,
    _check_safetensors_only,
    _check_safety_mode,
    _is_int,
    _is_real,
)

logger = logging.getLogger(__name__)

__all__ = ["ORIGINAL_TEXT_ENCODER_2_DIR", "OriginalEncodersMixin", "SaferStableDiffusionXLPipeline"]

#: Subfolder of a saved SDXL pipeline holding the base model's own second text encoder (for :meth:`compare`).
ORIGINAL_TEXT_ENCODER_2_DIR = "original_text_encoder_2"
#: `model_index.json` class names this pipeline loads as a base (its own saves included).
_SDXL_CLASSES = ("StableDiffusionXLPipeline", "SaferStableDiffusionXLPipeline")

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from safer_diffusion.pipeline_safer_stable_diffusion_xl import SaferStableDiffusionXLPipeline

        >>> pipe = SaferStableDiffusionXLPipeline.from_pretrained(
        ...     "stabilityai/stable-diffusion-xl-base-1.0",
        ...     safe_text_encoder="exported/safer-clip-sdxl",  # one export holding text_encoder/ and text_encoder_2/
        ...     nsfw_scorer="nudenet",
        ...     keep_original_text_encoder=True,
        ...     torch_dtype=torch.float16,
        ... ).to("cuda")
        >>> out = pipe("a photo of an astronaut riding a horse", generator=torch.Generator("cuda").manual_seed(0))
        >>> out.images[0], out.nsfw_content_detected, out.nsfw_scores
        >>> cmp = pipe.compare("a photo of an astronaut riding a horse", generator=torch.Generator("cuda").manual_seed(0))
        >>> cmp.original_images[0], cmp.safe_images[0]
        ```
"""


class OriginalEncodersMixin:
    """The base model's own text encoders, kept beside the safe ones but outside the component registry.

    ``_original_encoders`` maps each attribute (``original_text_encoder``, ...) to the subfolder a saved pipeline
    keeps it in. They are plain attributes, so ``components`` has exactly the parent pipeline's keys (and
    ``StableDiffusionXLImg2ImgPipeline(**pipe.components)`` works); ``to()``, the CPU-offload helpers and
    ``save_pretrained`` treat them as components. Written for any number of originals, so that a pipeline with
    one original encoder can use it too.
    """

    _original_encoders: dict[str, str] = {}

    def _originals(self) -> dict[str, Any]:
        return {name: self.__dict__.get(name) for name in self._original_encoders}

    def to(self, *args, **kwargs):
        """As `DiffusionPipeline.to`; also moves the original text encoders."""
        pipe = super().to(*args, **kwargs)
        device = kwargs.get("device") or next((a for a in args if isinstance(a, (str, torch.device))), None)
        dtype = kwargs.get("dtype") or next((a for a in args if isinstance(a, torch.dtype)), None)
        if device is not None or dtype is not None:
            for encoder in self._originals().values():
                if encoder is not None:
                    encoder.to(device=device, dtype=dtype)
        return pipe

    # diffusers' offload helpers walk `self.components`; the originals take part in them as components would.
    @contextlib.contextmanager
    def _with_original_encoders(self):
        before = self.__dict__.get("_components_with_originals", False)
        self.__dict__["_components_with_originals"] = True
        try:
            yield
        finally:
            self.__dict__["_components_with_originals"] = before

    @property
    def components(self) -> dict[str, Any]:
        """As `DiffusionPipeline.components`: the parent pipeline's keys only (the original encoders are not components)."""
        components = super().components
        if self.__dict__.get("_components_with_originals"):
            components.update({name: encoder for name, encoder in self._originals().items() if encoder is not None})
        return components

    def enable_model_cpu_offload(self, *args, **kwargs):
        """As in `DiffusionPipeline`; the original text encoders are offloaded in their place in ``model_cpu_offload_seq``."""
        with self._with_original_encoders():
            return super().enable_model_cpu_offload(*args, **kwargs)

    def enable_sequential_cpu_offload(self, *args, **kwargs):
        """As in `DiffusionPipeline`, the original text encoders included."""
        with self._with_original_encoders():
            return super().enable_sequential_cpu_offload(*args, **kwargs)

    def remove_all_hooks(self):
        """As in `DiffusionPipeline`, the original text encoders' hooks included."""
        with self._with_original_encoders():
            return super().remove_all_hooks()

    def _save_original_encoders(self, save_directory: str | os.PathLike, safe_serialization: bool = True) -> None:
        """Write each loaded original to its subfolder; remove a stale copy of one that is not loaded."""
        for name, encoder in self._originals().items():
            folder = Path(save_directory) / self._original_encoders[name]
            if encoder is not None:
                encoder.save_pretrained(folder, safe_serialization=safe_serialization)
            elif folder.is_dir():  # `keep_original_text_encoder=True` would load a stale copy from an earlier save
                shutil.rmtree(folder)


class _ScoringPostprocessor:
    """Stands in for ``pipe.image_processor`` during the parent's ``__call__``, for its one ``postprocess`` call.

    SDXL's pipeline has no safety-checker hook; its decoded (and watermarked) images reach ``postprocess``, so the
    images are scored there, exactly as :meth:`SaferStableDiffusionXLPipeline.compare` scores its own.
    """

    def __init__(self, pipe: SaferStableDiffusionXLPipeline, processor):
        self._pipe, self._processor = pipe, processor
        self.flags = self.scores = None

    def __getattr__(self, name: str):
        return getattr(self._processor, name)

    def postprocess(self, image, output_type: str = "pil", do_denormalize=None):
        self._pipe.image_processor = self._processor  # one use; scoring post-processes with the real processor
        if not torch.is_tensor(image) or output_type == "latent":
            return self._processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)
        images, self.flags, self.scores = self._pipe._score_and_postprocess(image, output_type)
        return images


class SaferStableDiffusionXLPipeline(OriginalEncodersMixin, StableDiffusionXLPipeline):
    r"""Stable Diffusion XL conditioned by a safe pair of text encoders, scoring every image it makes.

    Identical to [`~diffusers.StableDiffusionXLPipeline`] (same components, same ``__call__`` arguments and
    defaults) except that

    * ``text_encoder`` and ``text_encoder_2`` are the **safe** encoders (the pooled ``text_embeds`` come from the
      safe ``text_encoder_2``); the base model's own pair can be kept as ``original_text_encoder`` /
      ``original_text_encoder_2`` to enable :meth:`compare`;
    * images are scored by ``nsfw_scorer`` (any :mod:`safer_diffusion.scoring` scorer) and the scores returned;
    * ``safety_mode`` decides what happens to flagged images: ``"flag"`` (default, untouched), ``"blur"`` or
      ``"black"``.

    Args:
        vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, image_encoder, feature_extractor,
        force_zeros_for_empty_prompt, add_watermarker: as in `StableDiffusionXLPipeline`; the text encoders are the
            safe ones. Their widths are checked against the UNet (see
            :func:`~safer_diffusion.encoders.check_sdxl_text_encoders`).
        original_text_encoder (`CLIPTextModel`), original_text_encoder_2 (`CLIPTextModelWithProjection`), *optional*:
            the base model's pair, for :meth:`compare`; both or neither. They are not *components*:
            ``pipe.components`` has exactly the keys of `StableDiffusionXLPipeline`. ``save_pretrained`` writes them
            to ``original_text_encoder/`` and ``original_text_encoder_2/``, ``from_pretrained(...,
            keep_original_text_encoder=True)`` reads them back; ``to()`` and the CPU-offload methods treat them as
            components.
        nsfw_scorer: `None`, a scorer name (``"nudenet"``, ``"q16"``, ``"safety_checker"``), a list of names (any-of),
            a config dict, or a scorer object (see :func:`safer_diffusion.scoring.get_scorer`). Names and dicts are
            saved by ``save_pretrained``; objects only when they have ``to_config()``.
        safety_mode (`str`, defaults to `"flag"`): one of ``"flag"``, ``"blur"``, ``"black"``.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->original_text_encoder->original_text_encoder_2->image_encoder->unet->vae"
    _original_encoders = {"original_text_encoder": ORIGINAL_TEXT_ENCODER_DIR, "original_text_encoder_2": ORIGINAL_TEXT_ENCODER_2_DIR}

    # One owner: what the scorer and the safety mode do is SaferStableDiffusionPipeline's. These members use no
    # `super()` and only attributes both pipelines have, so they are shared as they are rather than written twice.
    nsfw_scorer = SaferStableDiffusionPipeline.nsfw_scorer
    safety_mode = SaferStableDiffusionPipeline.safety_mode
    _safety_checker_scorer = SaferStableDiffusionPipeline._safety_checker_scorer
    _active_scorer = SaferStableDiffusionPipeline._active_scorer
    score_images = SaferStableDiffusionPipeline.score_images
    default_size = SaferStableDiffusionPipeline.default_size

    def __init__(
        self,
        vae,
        text_encoder,
        text_encoder_2,
        tokenizer,
        tokenizer_2,
        unet,
        scheduler,
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
        original_text_encoder=None,
        original_text_encoder_2=None,
        nsfw_scorer: Any = None,
        safety_mode: str = "flag",
    ):
        _check_safety_mode(safety_mode)
        unet_config = unet.config if unet is not None else None
        check_sdxl_text_encoders(text_encoder, text_encoder_2, unet_config, tokenizer, tokenizer_2,
                                 arguments=("text_encoder", "text_encoder_2"))  # fmt: skip
        originals = {"original_text_encoder": original_text_encoder, "original_text_encoder_2": original_text_encoder_2}
        for name, encoder in originals.items():
            if encoder is not None and not isinstance(encoder, torch.nn.Module):
                raise TypeError(f"`{name}` must be a CLIP text encoder module (or None), got {type(encoder).__name__}.")
        given = [name for name, encoder in originals.items() if encoder is not None]
        if len(given) == 1:
            missing = next(name for name in originals if name not in given)
            raise ValueError(f"`{given[0]}` was given without `{missing}`: `compare()` needs the base model's whole pair. "
                             "Pass both (or neither).")  # fmt: skip
        if given:
            check_sdxl_text_encoders(original_text_encoder, original_text_encoder_2, unet_config, tokenizer, tokenizer_2,
                                     arguments=tuple(originals))  # fmt: skip
            check_sdxl_text_encoders(text_encoder, text_encoder_2, reference=(original_text_encoder, original_text_encoder_2),
                                     arguments=("text_encoder", "text_encoder_2"))  # fmt: skip
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=add_watermarker,
        )
        # plain attributes, not `register_modules`: they stay out of `components` and of `model_index.json`
        self.original_text_encoder = original_text_encoder
        self.original_text_encoder_2 = original_text_encoder_2
        self.register_to_config(safety_mode=safety_mode)
        self.nsfw_scorer = nsfw_scorer

    # ------------------------------------------------------------------ saving and loading
    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """As `DiffusionPipeline.save_pretrained`; the scorer is saved as its name/options in ``model_index.json``,
        and the original pair (when loaded) in ``original_text_encoder/`` and ``original_text_encoder_2/``."""
        if not self.__dict__.get("_nsfw_scorer_savable", True):
            logger.warning(
                "The NSFW scorer %r has no serialisable config; it is not saved. Pass `nsfw_scorer=` again when loading.",
                self.nsfw_scorer,
            )
        # written first, so that `push_to_hub=True` uploads them too
        self._save_original_encoders(save_directory, safe_serialization=kwargs.get("safe_serialization", True))
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        safe_text_encoder: Any = None,
        safe_text_encoder_2: Any = None,
        keep_original_text_encoder: bool = False,
        **kwargs,
    ):
        r"""Load a base SDXL model and swap in a safe pair of text encoders.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): hub id or local folder of an SDXL pipeline
                (``model_index.json`` naming ``StableDiffusionXLPipeline``), or a folder saved by this pipeline's
                ``save_pretrained``. Weights are read from safetensors only.
            safe_text_encoder: the safe pair as one folder or hub id: a two-encoder export (docs/EXPORT_FORMAT.md,
                section 8) or an SDXL pipeline folder. Or, with ``safe_text_encoder_2``, only the safe
                ``text_encoder`` (CLIP ViT-L/14): anything :func:`~safer_diffusion.encoders.load_safe_text_encoder`
                accepts. There is no default: the released SaFeR-CLIP weights are ViT-L/14 only. For a folder saved
                by this pipeline, each encoder not given is the safe one saved in it.
            safe_text_encoder_2: the safe ``text_encoder_2`` (OpenCLIP ViT-bigG/14 with projection) on its own (see
                :func:`~safer_diffusion.encoders.load_safe_text_encoder_2`).
            keep_original_text_encoder (`bool`, defaults to `False`): also load the base model's own pair as
                ``original_text_encoder`` / ``original_text_encoder_2`` (needed by :meth:`compare`); modules passed
                explicitly as those are used either way.
            torch_dtype (or its newer name ``dtype``): a `torch.dtype`, or one of ``"float32"``, ``"float16"``,
                ``"bfloat16"``.
            nsfw_scorer, safety_mode, and any other keyword: as for `__init__` / `DiffusionPipeline.from_pretrained`.
                ``text_encoder=`` / ``text_encoder_2=`` modules are taken as the safe encoders. SDXL has no safety
                checker: ``safety_checker=None`` and ``requires_safety_checker=False`` (what SD callers pass) are
                accepted as the no-ops they are; a checker module is refused (use ``nsfw_scorer="safety_checker"``).

        Returns:
            `SaferStableDiffusionXLPipeline`

        Raises:
            ValueError: the base is not an SDXL pipeline; one safe encoder is missing (the message names it); a safe
                encoder does not fit the base (width, depth, projection, swapped towers: the message names it).
        """
        from transformers import CLIPTextConfig

        if not isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
            raise TypeError(
                "`pretrained_model_name_or_path` must be a hub id ('owner/name') or a local folder (str or os.PathLike), "
                f"got {type(pretrained_model_name_or_path).__name__} {pretrained_model_name_or_path!r}."
            )
        torch_dtype = _load_dtype(kwargs)
        _drop_safety_checker_options(kwargs)
        hub_kwargs = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
        source = resolve_model_source(pretrained_model_name_or_path, argument="pretrained_model_name_or_path",
                                      revision=hub_kwargs.get("revision"), token=hub_kwargs.get("token"))  # fmt: skip
        config = cls.load_config(source, **hub_kwargs)
        class_name = config.get("_class_name")
        if class_name not in _SDXL_CLASSES:
            raise ValueError(
                f"`pretrained_model_name_or_path`={os.fspath(pretrained_model_name_or_path)!r} is a {class_name} pipeline, "
                f"not Stable Diffusion XL ({' or '.join(_SDXL_CLASSES)} in model_index.json). Use SaferStableDiffusionPipeline "
                "for SD 1.x/2.x, or `safer_diffusion.pipelines.load_safer_pipeline`, which picks the class."
            )
        if os.path.isdir(source):
            _check_safetensors_only(Path(source), config)
        saved_by_us = class_name == cls.__name__

        # 1. Which encoders come from where: everything checked before any weight is loaded
        for component, argument, value in (("text_encoder", "safe_text_encoder", safe_text_encoder),
                                           ("text_encoder_2", "safe_text_encoder_2", safe_text_encoder_2)):  # fmt: skip
            if value is not None and kwargs.get(component) is not None:
                raise ValueError(f"Pass the safe encoder either as `{argument}` or as `{component}`, not both.")
        for argument, value in (("safe_text_encoder", safe_text_encoder), ("safe_text_encoder_2", safe_text_encoder_2)):
            if isinstance(value, (str, os.PathLike)):
                resolve_model_source(value, argument=argument)  # a missing path or an unreachable hub id, at once
        pair = text_encoder_pair_folder(safe_text_encoder) if safe_text_encoder is not None else None
        if pair is not None and (safe_text_encoder_2 is not None or kwargs.get("text_encoder_2") is not None):
            raise ValueError(
                f"`safe_text_encoder`={os.fspath(safe_text_encoder)!r} holds both SDXL encoders; do not also pass "
                "`safe_text_encoder_2` (or `text_encoder_2`). Pass the pair alone, or two single encoders."
            )
        has_first = saved_by_us or kwargs.get("text_encoder") is not None or safe_text_encoder is not None
        has_second = saved_by_us or pair is not None or kwargs.get("text_encoder_2") is not None or safe_text_encoder_2 is not None
        if not has_first and not has_second:
            raise ValueError(
                "`safe_text_encoder` is required for an SDXL base: SDXL conditions on two text encoders (CLIP ViT-L/14 "
                "and OpenCLIP ViT-bigG/14), and the released SaFeR-CLIP weights (Adeely93/SafeR_CLIP) are a ViT-L/14 "
                "only, which would leave the bigG path unsafe. Pass an SDXL export folder (text_encoder/ and "
                "text_encoder_2/) as `safe_text_encoder`, or both `safe_text_encoder=` and `safe_text_encoder_2=`."
            )
        if not has_second:
            if safe_text_encoder is not None:
                require_text_encoder_pair(safe_text_encoder)  # raises, naming the missing encoder
            require_text_encoder_pair(kwargs["text_encoder"], argument="text_encoder", other="text_encoder_2")
        if not has_first:
            raise ValueError(
                "`safe_text_encoder` is missing: `safe_text_encoder_2` (SDXL's OpenCLIP ViT-bigG/14) was given, but an "
                "SDXL base also conditions on CLIP ViT-L/14 (text_encoder), which would stay unsafe. Pass the safe "
                "ViT-L/14 as `safe_text_encoder`, or one SDXL export holding both as `safe_text_encoder`."
            )
        reference = tuple(CLIPTextConfig.from_pretrained(source, subfolder=sub, **hub_kwargs)
                          for sub in (TEXT_ENCODER_DIR, TEXT_ENCODER_2_DIR))  # fmt: skip
        unet_config = cls._unet_config(source, hub_kwargs)

        # 2. Load the safe encoders given, and check them against the base before the UNet is loaded
        if pair is not None:
            kwargs["text_encoder"], kwargs["text_encoder_2"] = load_safe_text_encoder_pair(pair, torch_dtype=torch_dtype)
        else:
            if safe_text_encoder is not None:  # only used for open_clip state dicts, which do not record these
                kwargs["text_encoder"] = load_safe_text_encoder(
                    safe_text_encoder, torch_dtype=torch_dtype, hidden_act=reference[0].hidden_act,
                    num_attention_heads=reference[0].num_attention_heads, argument="safe_text_encoder",
                )  # fmt: skip
            if safe_text_encoder_2 is not None:
                kwargs["text_encoder_2"] = load_safe_text_encoder_2(
                    safe_text_encoder_2, torch_dtype=torch_dtype, hidden_act=reference[1].hidden_act,
                    num_attention_heads=reference[1].num_attention_heads, argument="safe_text_encoder_2",
                )  # fmt: skip
        components = ("text_encoder", "text_encoder_2")
        if any(kwargs.get(component) is not None for component in components):
            if all(kwargs.get(component) is not None for component in components):
                check_sdxl_text_encoders(kwargs["text_encoder"], kwargs["text_encoder_2"], unet_config,
                                         reference=reference)  # fmt: skip
            else:  # one replaced in a folder saved by this pipeline: check it against its slot alone
                _check_one_encoder(kwargs, reference, unet_config)

        # 3. The base's own pair, for compare()
        originals = ("original_text_encoder", "original_text_encoder_2")
        if keep_original_text_encoder:
            loaded = cls._load_original_text_encoders(source, pretrained_model_name_or_path, saved_by_us, torch_dtype,
                                                      hub_kwargs, skip=[n for n in originals if kwargs.get(n) is not None])  # fmt: skip
            kwargs.update({name: encoder for name, encoder in loaded.items() if kwargs.get(name) is None})
        return super().from_pretrained(source, **kwargs)

    @staticmethod
    def _unet_config(source: str, hub_kwargs: dict) -> dict:
        from diffusers import UNet2DConditionModel

        return dict(UNet2DConditionModel.load_config(source, subfolder="unet", **hub_kwargs))

    @staticmethod
    def _load_original_text_encoders(source: str, given: Any, saved_by_us: bool, torch_dtype, hub_kwargs: dict,
                                     skip: Sequence[str] = ()) -> dict[str, Any]:  # fmt: skip
        """The base's own pair: ``text_encoder(_2)/`` of a base, ``original_text_encoder(_2)/`` of our saves."""
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        plan = {
            "original_text_encoder": (CLIPTextModel, ORIGINAL_TEXT_ENCODER_DIR if saved_by_us else TEXT_ENCODER_DIR),
            "original_text_encoder_2": (CLIPTextModelWithProjection,
                                        ORIGINAL_TEXT_ENCODER_2_DIR if saved_by_us else TEXT_ENCODER_2_DIR),
        }  # fmt: skip
        out = {}
        for name, (model_cls, subfolder) in plan.items():
            if name in skip:
                continue
            local = Path(source) / subfolder
            if saved_by_us and os.path.isdir(source) and not (local / "config.json").is_file():
                raise ValueError(
                    f"`keep_original_text_encoder=True`, but {os.fspath(given)!r} was saved without the original text "
                    f"encoders (no {subfolder}/ folder). Load the base model instead, or pass `{name}=`."
                )
            if os.path.isdir(source):
                _check_safetensors_only(local, None)
            out[name] = model_cls.from_pretrained(source, subfolder=subfolder, dtype=torch_dtype, use_safetensors=True,
                                                  **hub_kwargs).eval()  # fmt: skip
        return out

    def to(self, *args, **kwargs):
        """As `DiffusionPipeline.to`; also moves the original pair, and a scorer that has a ``to`` method."""
        pipe = super().to(*args, **kwargs)
        device = kwargs.get("device") or next((a for a in args if isinstance(a, (str, torch.device))), None)
        scorer = self.nsfw_scorer
        if device is not None and scorer is not None and hasattr(scorer, "to"):
            scorer.to(device)
        return pipe

    # ------------------------------------------------------------------ encoding
    @contextlib.contextmanager
    def _encoders_in_place(self, text_encoder, text_encoder_2):
        """Temporarily make ``self.text_encoder(_2)`` the given pair (without touching the config)."""
        saved = self.__dict__["text_encoder"], self.__dict__["text_encoder_2"]
        self.__dict__["text_encoder"], self.__dict__["text_encoder_2"] = text_encoder, text_encoder_2
        try:
            yield
        finally:
            self.__dict__["text_encoder"], self.__dict__["text_encoder_2"] = saved

    def _encoder_pair(self, encoder: str) -> tuple[Any, Any]:
        if encoder == "safe":
            return self.text_encoder, self.text_encoder_2
        if encoder != "original":
            raise ValueError(f"`encoder` must be 'safe' or 'original', got {encoder!r}.")
        if self.original_text_encoder is None or self.original_text_encoder_2 is None:
            raise ValueError(
                "`encoder='original'` needs the base model's text encoders: load the pipeline with "
                "`keep_original_text_encoder=True` (or pass `original_text_encoder=` and `original_text_encoder_2=`)."
            )
        return self.original_text_encoder, self.original_text_encoder_2

    def encode_prompt(
        self,
        prompt: str,
        prompt_2: str | None = None,
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | None = None,
        negative_prompt_2: str | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None,
        clip_skip: int | None = None,
        encoder: str = "safe",
    ):
        r"""`StableDiffusionXLPipeline.encode_prompt`, with the choice of text-encoder pair.

        Args:
            encoder (`str`, defaults to `"safe"`): ``"safe"`` (``text_encoder`` + ``text_encoder_2``) or
                ``"original"`` (``original_text_encoder`` + ``original_text_encoder_2``).
            (all other arguments as in the parent)

        Returns:
            `(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds)`.
        """
        with self._encoders_in_place(*self._encoder_pair(encoder)):
            return super().encode_prompt(
                prompt, prompt_2, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt,
                negative_prompt_2, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                lora_scale=lora_scale, clip_skip=clip_skip,
            )  # fmt: skip

    # ------------------------------------------------------------------ decoding and scoring
    def _score_and_postprocess(self, image: torch.Tensor, output_type: str, score: bool = True):
        """Score decoded images (applying ``safety_mode``) and post-process them: ``(images, flags, scores)``."""
        flags = scores = None
        if score:
            image, flags, scores = self.score_images(image)
        denormalize = None if flags is None else [not f for f in flags]  # flagged images come back in [0, 1]
        return self.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize), flags, scores

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> VAE output in [-1, 1], as the parent's ``__call__`` decodes (fp16 upcast, latent mean/std,
        watermark)."""
        needs_upcasting = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if needs_upcasting:
            self.vae.to(dtype=torch.float32)
            latents = latents.to(next(iter(self.vae.post_quant_conv.parameters())).dtype)
        mean, std = getattr(self.vae.config, "latents_mean", None), getattr(self.vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / self.vae.config.scaling_factor + mean
        else:
            latents = latents / self.vae.config.scaling_factor
        image = self.vae.decode(latents.to(get_module_execution_device(self.vae)), return_dict=False)[0]
        if needs_upcasting:
            self.vae.to(dtype=torch.float16)
        if self.watermark is not None:
            image = self.watermark.apply_watermark(image)
        return image

    # ------------------------------------------------------------------ checks
    def check_inputs(
        self,
        prompt,
        prompt_2,
        height,
        width,
        callback_steps,
        negative_prompt=None,
        negative_prompt_2=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        pooled_prompt_embeds=None,
        negative_pooled_prompt_embeds=None,
        ip_adapter_image=None,
        ip_adapter_image_embeds=None,
        callback_on_step_end_tensor_inputs=None,
        *,
        num_inference_steps: Any = _NOT_GIVEN,
        timesteps=None,
        sigmas=None,
        denoising_end=None,
        guidance_scale: Any = _NOT_GIVEN,
        guidance_rescale: Any = _NOT_GIVEN,
        eta: Any = _NOT_GIVEN,
        num_images_per_prompt: Any = _NOT_GIVEN,
        generator=None,
        latents=None,
        original_size=None,
        crops_coords_top_left=(0, 0),
        target_size=None,
        negative_original_size=None,
        negative_crops_coords_top_left=(0, 0),
        negative_target_size=None,
    ):
        """The parent's checks, plus those of the arguments it leaves to fail late or silently, as
        `SaferStableDiffusionPipeline.check_inputs` does (the same helpers and messages).

        Raises `ValueError` / `TypeError` naming the argument, the value and the fix: ``prompt`` / ``prompt_2`` /
        the negative prompts strings (a ``prompt_2`` list as long as ``prompt``); ``height``/``width`` positive
        multiples of 8; ``num_inference_steps`` and ``num_images_per_prompt`` whole numbers >= 1;
        ``guidance_scale``, ``guidance_rescale`` and ``eta`` finite; ``denoising_end`` in (0, 1]; the size
        conditioning pairs of whole numbers; ``generator`` one or one per image; ``latents`` of the right shape.
        """
        _check_prompt(prompt)
        batch_prompts = None if prompt is None else (1 if isinstance(prompt, str) else len(prompt))
        for name, value in (("prompt_2", prompt_2), ("negative_prompt", negative_prompt), ("negative_prompt_2", negative_prompt_2)):
            _check_text(name, value, batch_prompts)
        for name, value in (("height", height), ("width", width)):
            if not _is_int(value) or value < 8 or value % 8:
                raise ValueError(f"`{name}` must be a positive multiple of 8, got {value!r}; e.g. {name}=1024.")
        super().check_inputs(
            prompt, prompt_2, height, width, callback_steps, negative_prompt, negative_prompt_2, prompt_embeds,
            negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, ip_adapter_image,
            ip_adapter_image_embeds, callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        custom_schedule = timesteps is not None or sigmas is not None
        if num_inference_steps is not _NOT_GIVEN and not (num_inference_steps is None and custom_schedule):
            _check_count("num_inference_steps", num_inference_steps, "e.g. num_inference_steps=25")
        for name, value in (("guidance_scale", guidance_scale), ("guidance_rescale", guidance_rescale), ("eta", eta)):
            if value is not _NOT_GIVEN and (not _is_real(value) or not math.isfinite(value)):
                raise ValueError(f"`{name}` must be a finite number, got {value!r}; e.g. guidance_scale=5.0, eta=0.0.")
        if denoising_end is not None and (not _is_real(denoising_end) or not 0 < denoising_end <= 1):
            raise ValueError(f"`denoising_end` must be a number in (0, 1] (the fraction of the schedule to run) or None, "
                             f"got {denoising_end!r}; e.g. denoising_end=0.8 before a refiner.")  # fmt: skip
        for name, value, lowest in (("original_size", original_size, 1), ("target_size", target_size, 1),
                                    ("crops_coords_top_left", crops_coords_top_left, 0),
                                    ("negative_original_size", negative_original_size, 1),
                                    ("negative_target_size", negative_target_size, 1),
                                    ("negative_crops_coords_top_left", negative_crops_coords_top_left, 0)):  # fmt: skip
            if value is not None and (not isinstance(value, (tuple, list)) or len(value) != 2
                                      or not all(_is_int(v) and v >= lowest for v in value)):  # fmt: skip
                raise ValueError(f"`{name}` must be (height, width): two whole numbers >= {lowest}, got {value!r}; "
                                 f"e.g. {name}=(1024, 1024).")  # fmt: skip
        per_prompt = 1
        if num_images_per_prompt is not _NOT_GIVEN:
            _check_count("num_images_per_prompt", num_images_per_prompt, "e.g. num_images_per_prompt=1")
            per_prompt = num_images_per_prompt
        if batch_prompts is not None:
            batch = batch_prompts * per_prompt
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
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] = None,
        sigmas: list[float] = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[[int, int], None] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 - the parent's default, kept
        **kwargs,
    ) -> SaferStableDiffusionPipelineOutput | tuple:
        r"""Generate images with the safe pair of text encoders and score them.

        All arguments are those of `StableDiffusionXLPipeline.__call__`, with the same defaults, checked up front by
        :meth:`check_inputs` (bad values raise a `ValueError`/`TypeError` naming the argument before any work). The
        decoded images are scored where the parent post-processes them, and ``safety_mode`` is applied to flagged
        ones.

        Examples:

        Returns:
            [`SaferStableDiffusionPipelineOutput`] (``images``, ``nsfw_content_detected``, ``nsfw_scores``), or with
            ``return_dict=False`` the tuple of those three in that order. Flags and scores are `None` when no scorer
            ran (no scorer, or ``output_type="latent"``).
        """
        height, width = self.default_size(height, width)
        self.check_inputs(
            prompt, prompt_2, height, width, kwargs.get("callback_steps"), negative_prompt, negative_prompt_2,
            prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
            ip_adapter_image, ip_adapter_image_embeds, callback_on_step_end_tensor_inputs,
            num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas, denoising_end=denoising_end,
            guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, eta=eta,
            num_images_per_prompt=num_images_per_prompt, generator=generator, latents=latents,
            original_size=original_size, crops_coords_top_left=crops_coords_top_left, target_size=target_size,
            negative_original_size=negative_original_size, negative_crops_coords_top_left=negative_crops_coords_top_left,
            negative_target_size=negative_target_size,
        )  # fmt: skip
        processor = self.image_processor
        hook = _ScoringPostprocessor(self, processor)
        self.image_processor = hook
        try:
            out = super().__call__(
                prompt=prompt, prompt_2=prompt_2, height=height, width=width, num_inference_steps=num_inference_steps,
                timesteps=timesteps, sigmas=sigmas, denoising_end=denoising_end, guidance_scale=guidance_scale,
                negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2,
                num_images_per_prompt=num_images_per_prompt, eta=eta, generator=generator, latents=latents,
                prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                ip_adapter_image=ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds,
                output_type=output_type, return_dict=True, cross_attention_kwargs=cross_attention_kwargs,
                guidance_rescale=guidance_rescale, original_size=original_size,
                crops_coords_top_left=crops_coords_top_left, target_size=target_size,
                negative_original_size=negative_original_size, negative_crops_coords_top_left=negative_crops_coords_top_left,
                negative_target_size=negative_target_size, clip_skip=clip_skip, callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, **kwargs,
            )  # fmt: skip
        finally:
            self.image_processor = processor
        result = SaferStableDiffusionPipelineOutput(images=out.images, nsfw_content_detected=hook.flags, nsfw_scores=hook.scores)
        return result if return_dict else result.to_tuple()

    @torch.no_grad()
    def compare(
        self,
        prompt: str | list[str],
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        score: bool = True,
        eta: float = 0.0,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
    ) -> SaferComparisonOutput:
        r"""Generate the same seeds with the original and the safe pair of text encoders, in one denoising loop.

        Both pairs' encodings (token states *and* pooled ``text_embeds``) go through the one shared UNet in a single
        batch per step (with guidance: ``[uncond_original, uncond_safe, cond_original, cond_safe]``), from the same
        initial latents. Each branch has its own copy of the scheduler state and of the generator state, so the
        images equal, within float tolerance, those of two separate calls (one with the original pair, one with
        the safe pair) with the same seeds, for stochastic schedulers too. Images are decoded one branch at a time.

        Args:
            prompt (`str` or `list[str]`): the prompt(s); required, none empty (``__call__`` keeps diffusers'
                unconditional ``""``).
            prompt_2, negative_prompt, negative_prompt_2, height, width, num_inference_steps, denoising_end,
            guidance_scale, num_images_per_prompt, generator, latents, output_type, eta, guidance_rescale,
            original_size, crops_coords_top_left, target_size, negative_original_size,
            negative_crops_coords_top_left, negative_target_size, clip_skip, cross_attention_kwargs: as in `__call__`.
            score (`bool`, defaults to `True`): score both sets (and apply ``safety_mode``); `False` skips scoring.

        Returns:
            [`SaferComparisonOutput`]
        """
        if self.original_text_encoder is None or self.original_text_encoder_2 is None:
            raise ValueError(
                "`compare()` needs the base model's text encoders: load the pipeline with `keep_original_text_encoder=True` "
                "(or pass `original_text_encoder=` and `original_text_encoder_2=`)."
            )
        _check_prompt(prompt, required=True)
        height, width = self.default_size(height, width)
        self.check_inputs(
            prompt, prompt_2, height, width, None, negative_prompt, negative_prompt_2,
            num_inference_steps=num_inference_steps, denoising_end=denoising_end, guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale, eta=eta, num_images_per_prompt=num_images_per_prompt,
            generator=generator, latents=latents, original_size=original_size,
            crops_coords_top_left=crops_coords_top_left, target_size=target_size,
            negative_original_size=negative_original_size, negative_crops_coords_top_left=negative_crops_coords_top_left,
            negative_target_size=negative_target_size,
        )  # fmt: skip
        (orig_images, orig_flags, orig_scores), (safe_images, safe_flags, safe_scores) = self._generate_branches(
            [self._encoder_pair("original"), self._encoder_pair("safe")],
            prompt=prompt, prompt_2=prompt_2, negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2,
            height=height, width=width, num_inference_steps=num_inference_steps, denoising_end=denoising_end,
            guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt, generator=generator,
            latents=latents, output_type=output_type, score=score, eta=eta, guidance_rescale=guidance_rescale,
            original_size=original_size or (height, width), crops_coords_top_left=crops_coords_top_left,
            target_size=target_size or (height, width), negative_original_size=negative_original_size,
            negative_crops_coords_top_left=negative_crops_coords_top_left, negative_target_size=negative_target_size,
            clip_skip=clip_skip, cross_attention_kwargs=cross_attention_kwargs,
        )  # fmt: skip
        return SaferComparisonOutput(
            original_images=orig_images,
            safe_images=safe_images,
            original_nsfw_content_detected=orig_flags,
            safe_nsfw_content_detected=safe_flags,
            original_nsfw_scores=orig_scores,
            safe_nsfw_scores=safe_scores,
        )

    def _generate_branches(self, pairs: Sequence[tuple[Any, Any]], *, prompt, prompt_2, negative_prompt, negative_prompt_2,
                           height, width, num_inference_steps, denoising_end, guidance_scale, num_images_per_prompt,
                           generator, latents, output_type, score, eta, guidance_rescale, original_size,
                           crops_coords_top_left, target_size, negative_original_size, negative_crops_coords_top_left,
                           negative_target_size, clip_skip, cross_attention_kwargs) -> list[tuple[Any, Any, Any]]:  # fmt: skip
        """One denoising loop for any number of text-encoder pairs (the N-way comparison's engine; ``compare()``
        passes two). Inputs are checked by the caller. Returns ``(images, flags, scores)`` per pair, in order.

        Rows per UNet call: with guidance ``[uncond_0 .. uncond_{N-1}, cond_0 .. cond_{N-1}]``, each ``batch`` rows.
        """
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._denoising_end = denoising_end
        self._interrupt = False
        cfg = self.do_classifier_free_guidance
        n = len(pairs)
        batch = (1 if isinstance(prompt, str) else len(prompt)) * num_images_per_prompt
        device = self._execution_device
        lora_scale = cross_attention_kwargs.get("scale") if cross_attention_kwargs else None

        # 1. Encode with every pair; all embeddings in the dtype of the first pair's second encoder
        encoded = []
        for pair in pairs:
            with self._encoders_in_place(*pair):
                encoded.append(StableDiffusionXLPipeline.encode_prompt(
                    self, prompt, prompt_2, device, num_images_per_prompt, cfg, negative_prompt, negative_prompt_2,
                    lora_scale=lora_scale, clip_skip=clip_skip,
                ))  # fmt: skip
        dtype = encoded[-1][0].dtype
        encoded = [tuple(None if e is None else e.to(dtype) for e in item) for item in encoded]

        # 2. Time ids, laid out per branch exactly as the parent lays them out for its batch
        projection_dim = self.text_encoder_2.config.projection_dim
        time_ids = self._get_add_time_ids(original_size, crops_coords_top_left, target_size, dtype=dtype,
                                          text_encoder_projection_dim=projection_dim)  # fmt: skip
        negative_time_ids = time_ids
        if negative_original_size is not None and negative_target_size is not None:
            negative_time_ids = self._get_add_time_ids(negative_original_size, negative_crops_coords_top_left,
                                                       negative_target_size, dtype=dtype,
                                                       text_encoder_projection_dim=projection_dim)  # fmt: skip
        if cfg:  # the parent repeats the (negative, positive) pair over its 2 x batch rows; each half is kept as is
            rows = torch.cat([negative_time_ids, time_ids]).to(device).repeat(batch, 1)
            time_uncond, time_cond = rows[:batch], rows[batch:]
            states = torch.cat([e[1] for e in encoded] + [e[0] for e in encoded])
            text_embeds = torch.cat([e[3] for e in encoded] + [e[2] for e in encoded])
            add_time_ids = torch.cat([time_uncond] * n + [time_cond] * n)
        else:
            states = torch.cat([e[0] for e in encoded])
            text_embeds = torch.cat([e[2] for e in encoded])
            add_time_ids = time_ids.to(device).repeat(batch * n, 1)
        states, text_embeds = states.to(device), text_embeds.to(device)

        # 3. Timesteps, one scheduler state per branch
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device)
        if denoising_end is not None and 0 < denoising_end < 1:
            cutoff = int(round(self.scheduler.config.num_train_timesteps * (1 - denoising_end)))
            num_inference_steps = len([t for t in timesteps if t >= cutoff])
            timesteps = timesteps[:num_inference_steps]
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)
        schedulers = [self.scheduler] + [copy.deepcopy(self.scheduler) for _ in range(n - 1)]

        # 4. Shared initial latents; per-branch generator copies for the scheduler's noise
        latents = self.prepare_latents(batch, self.unet.config.in_channels, height, width, dtype, device, generator, latents)
        generators = [generator] + [clone_generator(generator) for _ in range(n - 1)]
        extra = [self.prepare_extra_step_kwargs(g, eta) for g in generators]
        branch = [latents] + [latents.clone() for _ in range(n - 1)]
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            w = torch.tensor(self.guidance_scale - 1).repeat(n * batch)
            timestep_cond = self.get_guidance_scale_embedding(w, embedding_dim=self.unet.config.time_cond_proj_dim).to(
                device=device, dtype=latents.dtype
            )

        # 5. One denoising loop, one UNet call per step
        added_cond_kwargs = {"text_embeds": text_embeds, "time_ids": add_time_ids}
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for t in timesteps:
                scaled = [s.scale_model_input(x, t) for s, x in zip(schedulers, branch)]
                model_input = torch.cat(scaled * 2) if cfg else torch.cat(scaled)
                noise = self.unet(
                    model_input, t, encoder_hidden_states=states, timestep_cond=timestep_cond,
                    cross_attention_kwargs=cross_attention_kwargs, added_cond_kwargs=added_cond_kwargs, return_dict=False,
                )[0]  # fmt: skip
                if cfg:
                    noise_uncond, noise_text = noise.chunk(2)
                    noise = noise_uncond + self.guidance_scale * (noise_text - noise_uncond)
                    if self.guidance_rescale > 0.0:
                        noise = rescale_noise_cfg(noise, noise_text, guidance_rescale=self.guidance_rescale)
                branch = [
                    s.step(e, t, x, **kw, return_dict=False)[0] for s, e, x, kw in zip(schedulers, noise.chunk(n), branch, extra)
                ]
                progress_bar.update()

        # 6. Decode branch by branch (peak memory of one generation), score, post-process
        outputs = []
        for latent in branch:
            if output_type == "latent":
                outputs.append((latent, None, None))
            else:
                outputs.append(self._score_and_postprocess(self._decode(latent), output_type, score=score))
        self.maybe_free_model_hooks()
        return outputs


def _load_dtype(kwargs: dict) -> Any:
    """Read ``torch_dtype`` / ``dtype`` (names allowed) and ``use_safetensors`` from ``from_pretrained``'s kwargs."""
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
    return torch_dtype


def _drop_safety_checker_options(kwargs: dict) -> None:
    """Remove the SD pipeline's safety-checker options when they ask for nothing; refuse them when they ask for one."""
    if kwargs.get("safety_checker") is not None:
        raise ValueError(
            "`safety_checker`: Stable Diffusion XL pipelines have no safety checker component. Score images with "
            "`nsfw_scorer=\"safety_checker\"` (the same CompVis checker, run on the decoded images) instead."
        )
    if kwargs.get("requires_safety_checker", False) is not False:
        raise ValueError("`requires_safety_checker` must be False (or not given) for an SDXL pipeline, which has no safety checker.")
    kwargs.pop("safety_checker", None)
    kwargs.pop("requires_safety_checker", None)


def _check_one_encoder(kwargs: dict, reference: tuple, unet_config: dict) -> None:
    """One safe encoder replaced in a saved pipeline: checked in its slot, the saved one's place taken by a stand-in
    with the base's config (the saved safe encoder has the base's shape; ``__init__`` checks the real pair again)."""
    first, second = kwargs.get("text_encoder"), kwargs.get("text_encoder_2")
    first = types.SimpleNamespace(config=reference[0]) if first is None else first
    second = types.SimpleNamespace(config=reference[1], text_projection=None) if second is None else second
    check_sdxl_text_encoders(first, second, unet_config, reference=reference)


def _check_text(name: str, value: Any, batch: int | None) -> None:
    """``prompt_2`` and the negative prompts: `None`, a string, or a list of strings (as long as ``prompt``)."""
    if value is None or isinstance(value, str):
        return
    if not isinstance(value, list) or any(not isinstance(v, str) for v in value):
        kind = type(value).__name__ if not isinstance(value, list) else "list holding a " + next(
            type(v).__name__ for v in value if not isinstance(v, str))
        raise ValueError(f"`{name}` must be a string or a list of strings, got a {kind}.")
    if batch is not None and len(value) != batch:
        raise ValueError(f"`{name}` is a list of {len(value)} strings, but `prompt` has {batch}; pass one per prompt.")

