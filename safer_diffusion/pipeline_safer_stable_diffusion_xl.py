"""`SaferStableDiffusionXLPipeline`: Stable Diffusion XL with a safe *pair* of text encoders, NSFW scores on every
image, and a comparison of the original, the safe or any N pairs from one denoising loop (:mod:`.compare`).

SDXL conditions on two text encoders: ``text_encoder`` (CLIP ViT-L/14, ``hidden_states[-2]``, 768 wide) and
``text_encoder_2`` (OpenCLIP ViT-bigG/14 as ``CLIPTextModelWithProjection``: ``hidden_states[-2]``, 1280 wide, and
the pooled, projected ``text_embeds`` that enter the UNet through ``added_cond_kwargs``). Both are swapped for safe
ones: swapping only the ViT-L encoder would leave the bigG path unsafe. The contract is that of
:class:`~safer_diffusion.SaferStableDiffusionPipeline`; what the two share (scoring, ``safety_mode``, checks, the
original encoders, saving and loading, the N-way ``compare()`` plumbing) is written once, in
:mod:`safer_diffusion.pipeline_common`.
"""

from __future__ import annotations

import logging
import os
import types
from collections.abc import Callable
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps
from diffusers.utils import replace_example_docstring
from diffusers.utils.torch_utils import get_module_execution_device

from .compare import BranchConditioning
from .encoders import (
    check_sdxl_text_encoders,
    load_safe_text_encoder,
    load_safe_text_encoder_2,
    load_safe_text_encoder_pair,
    require_text_encoder_pair,
    text_encoder_pair_folder,
)
from .export_format import TEXT_ENCODER_2_DIR, TEXT_ENCODER_DIR
from .hub import resolve_model_source
from .pipeline_common import (
    ORIGINAL_TEXT_ENCODER_DIR,
    OriginalEncoder,
    OriginalEncodersMixin,
    SaferPipelineMixin,
    check_prompt,
    check_safety_mode,
    is_int,
    is_real,
)
from .pipeline_output import SaferComparisonOutput, SaferStableDiffusionMultiCompareOutput, SaferStableDiffusionPipelineOutput

logger = logging.getLogger(__name__)

# `OriginalEncodersMixin` lives in `pipeline_common` (both pipelines use it); exported here too, where it was first.
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
        >>> many = pipe.compare(  # any N pairs, still one denoising loop
        ...     "a photo of an astronaut riding a horse",
        ...     text_encoders={"original": "original", "safer-clip": "safe", "mine": "exported/my-sdxl-pair"},
        ...     generator=torch.Generator("cuda").manual_seed(0),
        ... )
        >>> many.images["mine"][0], many.nsfw_scores["mine"]
        ```
"""


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


class SaferStableDiffusionXLPipeline(SaferPipelineMixin, StableDiffusionXLPipeline):
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
    _original_encoders = {
        "original_text_encoder": OriginalEncoder(ORIGINAL_TEXT_ENCODER_DIR, TEXT_ENCODER_DIR, "CLIPTextModel"),
        "original_text_encoder_2": OriginalEncoder(ORIGINAL_TEXT_ENCODER_2_DIR, TEXT_ENCODER_2_DIR, "CLIPTextModelWithProjection"),
    }
    _text_encoder_slots = ("text_encoder", "text_encoder_2")
    _example_size = 1024
    _example_guidance_scale = 5.0

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
        check_safety_mode(safety_mode)
        unet_config = unet.config if unet is not None else None
        check_sdxl_text_encoders(text_encoder, text_encoder_2, unet_config, tokenizer, tokenizer_2,
                                 arguments=("text_encoder", "text_encoder_2"))  # fmt: skip
        originals = {"original_text_encoder": original_text_encoder, "original_text_encoder_2": original_text_encoder_2}
        if self._check_originals(originals):
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
        self._init_safer(originals, nsfw_scorer, safety_mode)

    # ------------------------------------------------------------------ loading
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

        source, config, hub_kwargs, torch_dtype = cls._from_pretrained_source(
            pretrained_model_name_or_path, keep_original_text_encoder, kwargs
        )
        saved_by_us = config.get("_class_name") == cls.__name__

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
        cls._original_encoder_kwargs(kwargs, keep_original_text_encoder, source, pretrained_model_name_or_path, saved_by_us,
                                     torch_dtype, hub_kwargs)  # fmt: skip
        return super().from_pretrained(source, **kwargs)

    @classmethod
    def _check_base_config(cls, config: dict, given: Any) -> None:
        class_name = config.get("_class_name")
        if class_name not in _SDXL_CLASSES:
            raise ValueError(
                f"`pretrained_model_name_or_path`={os.fspath(given)!r} is a {class_name} pipeline, "
                f"not Stable Diffusion XL ({' or '.join(_SDXL_CLASSES)} in model_index.json). Use SaferStableDiffusionPipeline "
                "for SD 1.x/2.x, or `safer_diffusion.pipelines.load_safer_pipeline`, which picks the class."
            )

    @classmethod
    def _safety_checker_options(cls, kwargs: dict) -> None:
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

    @staticmethod
    def _unet_config(source: str, hub_kwargs: dict) -> dict:
        from diffusers import UNet2DConditionModel

        return dict(UNet2DConditionModel.load_config(source, subfolder="unet", **hub_kwargs))

    # ------------------------------------------------------------------ encoding
    def load_text_encoder_pair(self, source: Any, *, argument: str = "text_encoders") -> tuple[Any, Any]:
        """Load a safe pair that fits this pipeline, for :meth:`compare` (``text_encoders=``) or :meth:`encode_prompt`.

        Args:
            source: a folder or hub id holding both encoders (a two-encoder export or an SDXL pipeline folder, see
                :func:`~safer_diffusion.encoders.load_safe_text_encoder_pair`). Loaded in the dtype of ``text_encoder``
                and moved to the pipeline's device.
            argument (`str`): how ``source`` is named in error messages.

        Returns:
            ``(CLIPTextModel, CLIPTextModelWithProjection)`` in eval mode.

        Raises:
            ValueError: ``source`` holds one encoder (the message names the missing one), or the pair does not fit the
                pipeline: swapped towers, widths, depths or projection against the pipeline's pair and its UNet (the
                message names ``ARGUMENT/text_encoder`` or ``ARGUMENT/text_encoder_2``).
        """
        pair = load_safe_text_encoder_pair(source, torch_dtype=self.text_encoder.dtype, argument=argument)
        self._check_text_encoder_fit(pair, (f"{argument}/{TEXT_ENCODER_DIR}", f"{argument}/{TEXT_ENCODER_2_DIR}"))
        return tuple(encoder.to(self._execution_device).eval() for encoder in pair)

    def _check_text_encoder_fit(self, modules: tuple, labels: tuple[str, ...]) -> None:
        check_sdxl_text_encoders(*modules, self.unet.config, self.tokenizer, self.tokenizer_2,
                                 reference=(self.text_encoder, self.text_encoder_2), arguments=labels)  # fmt: skip

    def _load_text_encoders_for_compare(self, source: Any, argument: str) -> tuple:
        return self.load_text_encoder_pair(source, argument=argument)

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
        encoder: str | tuple[torch.nn.Module, torch.nn.Module] = "safe",
    ):
        r"""`StableDiffusionXLPipeline.encode_prompt`, with the choice of text-encoder pair.

        Args:
            encoder (`str` or a pair of modules, defaults to `"safe"`): ``"safe"`` (``text_encoder`` +
                ``text_encoder_2``), ``"original"`` (``original_text_encoder`` + ``original_text_encoder_2``), or a
                ``(text_encoder, text_encoder_2)`` pair that fits the pipeline (see :meth:`load_text_encoder_pair`).
            (all other arguments as in the parent)

        Returns:
            `(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds)`.
        """
        with self._text_encoders_in_place(*self._encoders_for(encoder)):
            return super().encode_prompt(
                prompt, prompt_2, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt,
                negative_prompt_2, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                lora_scale=lora_scale, clip_skip=clip_skip,
            )  # fmt: skip

    # ------------------------------------------------------------------ decoding
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
        denoising_end=None,
        original_size=None,
        crops_coords_top_left=(0, 0),
        target_size=None,
        negative_original_size=None,
        negative_crops_coords_top_left=(0, 0),
        negative_target_size=None,
        text_encoders: Any = None,
        max_batch: Any = None,
        **sampling: Any,
    ):
        """The parent's checks, plus those of the arguments it leaves to fail late or silently, as
        `SaferStableDiffusionPipeline.check_inputs` does (the same shared checks and messages).

        Raises `ValueError` / `TypeError` naming the argument, the value and the fix: ``prompt`` / ``prompt_2`` /
        the negative prompts strings (a ``prompt_2`` list as long as ``prompt``); ``height``/``width`` positive
        multiples of 8; ``num_inference_steps`` and ``num_images_per_prompt`` whole numbers >= 1;
        ``guidance_scale``, ``guidance_rescale`` and ``eta`` finite; ``denoising_end`` in (0, 1]; the size
        conditioning pairs of whole numbers; ``generator`` one or one per image; ``latents`` of the right shape;
        :meth:`compare`'s ``text_encoders`` (a ``{name: pair}`` dict, see
        :func:`~safer_diffusion.compare.check_text_encoders`; nothing is loaded here) and ``max_batch``.
        ``sampling`` holds the keywords ``num_inference_steps``, ``timesteps``, ``sigmas``, ``guidance_scale``,
        ``guidance_rescale``, ``eta``, ``num_images_per_prompt``, ``generator`` and ``latents`` (each checked when
        given; see ``_check_sampling_inputs``, shared with the SD pipeline).
        """
        check_prompt(prompt)
        batch_prompts = None if prompt is None else (1 if isinstance(prompt, str) else len(prompt))
        for name, value in (("prompt_2", prompt_2), ("negative_prompt", negative_prompt), ("negative_prompt_2", negative_prompt_2)):
            _check_text(name, value, batch_prompts)
        self._check_compare_inputs(text_encoders, max_batch)
        self._check_size(height, width)
        super().check_inputs(
            prompt, prompt_2, height, width, callback_steps, negative_prompt, negative_prompt_2, prompt_embeds,
            negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, ip_adapter_image,
            ip_adapter_image_embeds, callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        if denoising_end is not None and (not is_real(denoising_end) or not 0 < denoising_end <= 1):
            raise ValueError(f"`denoising_end` must be a number in (0, 1] (the fraction of the schedule to run) or None, "
                             f"got {denoising_end!r}; e.g. denoising_end=0.8 before a refiner.")  # fmt: skip
        for name, value, lowest in (("original_size", original_size, 1), ("target_size", target_size, 1),
                                    ("crops_coords_top_left", crops_coords_top_left, 0),
                                    ("negative_original_size", negative_original_size, 1),
                                    ("negative_target_size", negative_target_size, 1),
                                    ("negative_crops_coords_top_left", negative_crops_coords_top_left, 0)):  # fmt: skip
            if value is not None and (not isinstance(value, (tuple, list)) or len(value) != 2
                                      or not all(is_int(v) and v >= lowest for v in value)):  # fmt: skip
                raise ValueError(f"`{name}` must be (height, width): two whole numbers >= {lowest}, got {value!r}; "
                                 f"e.g. {name}=(1024, 1024).")  # fmt: skip
        self._check_sampling_inputs(prompt, prompt_embeds, height, width, **sampling)

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
        text_encoders: dict[str, Any] | None = None,
        max_batch: int | None = None,
    ) -> SaferComparisonOutput | SaferStableDiffusionMultiCompareOutput:
        r"""Generate the same seeds with several pairs of text encoders, in one denoising loop.

        By default the original and the safe pair; with ``text_encoders`` any N pairs. Every pair's encodings (token
        states *and* pooled ``text_embeds``, with the size-conditioning ``time_ids``) go through the one shared UNet
        in a single batch per step (with guidance: ``[uncond_1, ..., uncond_N, cond_1, ..., cond_N]``, i.e. ``2 * N``
        times the prompt batch; split into UNet calls of at most ``max_batch`` rows when given), from the same
        initial latents. Each pair has its own copy of the scheduler state and of the generator state, so its images
        equal, within float tolerance, those of a separate call with that pair and the same seeds, for stochastic
        and multistep schedulers too. Images are decoded one pair at a time.

        Args:
            prompt (`str` or `list[str]`): the prompt(s); required, none empty (``__call__`` keeps diffusers'
                unconditional ``""``).
            prompt_2, negative_prompt, negative_prompt_2, height, width, num_inference_steps, denoising_end,
            guidance_scale, num_images_per_prompt, generator, latents, output_type, eta, guidance_rescale,
            original_size, crops_coords_top_left, target_size, negative_original_size,
            negative_crops_coords_top_left, negative_target_size, clip_skip, cross_attention_kwargs: as in `__call__`.
            score (`bool`, defaults to `True`): score every image (and apply ``safety_mode``); `False` skips scoring.
            text_encoders (`dict[str, Any]`, *optional*): ``{name: pair}``, in the order results are reported. A
                value is ``"original"`` (``original_text_encoder`` + ``original_text_encoder_2``), ``"safe"``
                (``text_encoder`` + ``text_encoder_2``), a loaded ``(CLIPTextModel, CLIPTextModelWithProjection)``
                pair on the pipeline's device, or a source holding both (a two-encoder export folder, an SDXL
                pipeline folder, or a hub id of either) loaded with :meth:`load_text_encoder_pair` on every call
                (load it once yourself for repeated calls; a folder named ``original`` or ``safe`` is given as
                ``./original``). Every pair must fit the pipeline's (widths, depths, projection, the UNet); errors
                name ``text_encoders[NAME]``. Default: the original and the safe pair, with today's
                :class:`SaferComparisonOutput`.
            max_batch (`int`, *optional*): at most this many UNet rows per forward pass (bounds the memory of
                large N); `None` runs all ``2 * N * batch`` rows at once.

        Returns:
            [`SaferComparisonOutput`] without ``text_encoders``; [`SaferStableDiffusionMultiCompareOutput`]
            (images, flags and scores per name) with it.
        """
        self._check_compare_originals(text_encoders)
        check_prompt(prompt, required=True)
        height, width = self.default_size(height, width)
        self.check_inputs(
            prompt, prompt_2, height, width, None, negative_prompt, negative_prompt_2,
            num_inference_steps=num_inference_steps, denoising_end=denoising_end, guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale, eta=eta, num_images_per_prompt=num_images_per_prompt,
            generator=generator, latents=latents, original_size=original_size,
            crops_coords_top_left=crops_coords_top_left, target_size=target_size,
            negative_original_size=negative_original_size, negative_crops_coords_top_left=negative_crops_coords_top_left,
            negative_target_size=negative_target_size, text_encoders=text_encoders, max_batch=max_batch,
        )  # fmt: skip
        encoders = self._compare_text_encoders(text_encoders)
        self._start_call(guidance_scale, guidance_rescale, clip_skip, cross_attention_kwargs)
        self._denoising_end = denoising_end
        cfg = self.do_classifier_free_guidance
        batch = (1 if isinstance(prompt, str) else len(prompt)) * num_images_per_prompt
        device = self._execution_device
        lora_scale = cross_attention_kwargs.get("scale") if cross_attention_kwargs else None

        # 1. Encode with every pair, in the dtype a call of this pipeline conditions in (its text_encoder_2's)
        dtype = self.text_encoder_2.dtype
        encoded = [
            tuple(None if e is None else e.to(device=device, dtype=dtype) for e in self.encode_prompt(
                prompt, prompt_2, device, num_images_per_prompt, cfg, negative_prompt, negative_prompt_2,
                lora_scale=lora_scale, clip_skip=clip_skip, encoder=pair,
            ))
            for pair in encoders.values()
        ]  # fmt: skip

        # 2. Time ids, laid out per pair exactly as the parent lays them out for its batch
        projection_dim = self.text_encoder_2.config.projection_dim
        time_ids = self._get_add_time_ids(original_size or (height, width), crops_coords_top_left, target_size or (height, width),
                                          dtype=dtype, text_encoder_projection_dim=projection_dim)  # fmt: skip
        negative_time_ids = time_ids
        if negative_original_size is not None and negative_target_size is not None:
            negative_time_ids = self._get_add_time_ids(negative_original_size, negative_crops_coords_top_left,
                                                       negative_target_size, dtype=dtype,
                                                       text_encoder_projection_dim=projection_dim)  # fmt: skip
        if cfg:  # the parent repeats the (negative, positive) pair over its 2 x batch rows; each half is kept as is
            rows = torch.cat([negative_time_ids, time_ids]).to(device).repeat(batch, 1)
            time_uncond, time_cond = rows[:batch], rows[batch:]
        else:
            time_uncond, time_cond = None, time_ids.to(device).repeat(batch, 1)
        branches = [
            BranchConditioning(
                cond={"encoder_hidden_states": states, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_cond}},
                uncond={"encoder_hidden_states": negative_states,
                        "added_cond_kwargs": {"text_embeds": negative_pooled, "time_ids": time_uncond}} if cfg else None,
            )
            for states, negative_states, pooled, negative_pooled in encoded
        ]  # fmt: skip

        # 3. Timesteps (cut at `denoising_end`); 4.-6. one scheduler and generator copy per pair, shared initial
        # latents, one denoising loop (one UNet batch per step, in chunks of `max_batch` rows), decoded pair by pair
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device)
        if denoising_end is not None and 0 < denoising_end < 1:
            train_steps = self.scheduler.config.num_train_timesteps  # the parent's cutoff, rounded as it rounds
            cutoff = int(round(train_steps - denoising_end * train_steps))
            timesteps = timesteps[: len([t for t in timesteps if t >= cutoff])]
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)
        outputs = self._denoise_and_decode(
            branches, timesteps, batch=batch, height=height, width=width, dtype=dtype, generator=generator,
            latents=latents, eta=eta, output_type=output_type, score=score, max_batch=max_batch,
        )  # fmt: skip
        return self._comparison_output(list(encoders), outputs, default=text_encoders is None)


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

