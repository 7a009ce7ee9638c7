"""`SaferStableDiffusionPipeline`: Stable Diffusion with a safe text encoder, NSFW scores on every image,
and a comparison of the original, the safe or any N text encoders from one denoising loop (:mod:`.compare`)."""

from __future__ import annotations

import logging
import os
import types
from collections.abc import Callable
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.utils import replace_example_docstring

from .compare import BranchConditioning
from .encoders import DEFAULT_SAFE_TEXT_ENCODER, check_text_encoder, load_safe_text_encoder, truncate_layers
from .pipeline_common import (
    ORIGINAL_TEXT_ENCODER_DIR,
    SAFETY_MODES,
    OriginalEncoder,
    SaferPipelineMixin,
    check_prompt,
    check_safety_mode,
)
from .pipeline_output import SaferComparisonOutput, SaferStableDiffusionMultiCompareOutput, SaferStableDiffusionPipelineOutput

logger = logging.getLogger(__name__)

# SAFETY_MODES and ORIGINAL_TEXT_ENCODER_DIR are defined in `pipeline_common` (shared with the SDXL pipeline) and
# exported here too, where they have always been importable from.
__all__ = ["ORIGINAL_TEXT_ENCODER_DIR", "SAFETY_MODES", "SaferStableDiffusionPipeline"]

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


def _fit_depth(encoder, base_layers: int):
    """Cut an encoder with exactly one layer more than the base's (OpenCLIP for SD 2.x) to the base's depth."""
    if encoder.config.num_hidden_layers == base_layers + 1:
        logger.info(
            "The safe encoder has %d layers, the base %d: using its penultimate layer, as Stable Diffusion 2 does.",
            encoder.config.num_hidden_layers, base_layers,
        )
        truncate_layers(encoder, base_layers)
    return encoder


class SaferStableDiffusionPipeline(SaferPipelineMixin, StableDiffusionPipeline):
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

    # `original_text_encoder` is in the offload sequence although it is not a component: see `OriginalEncodersMixin`
    model_cpu_offload_seq = "text_encoder->original_text_encoder->image_encoder->unet->vae"
    _optional_components = ["safety_checker", "feature_extractor", "image_encoder"]
    _exclude_from_cpu_offload = ["safety_checker"]
    _original_encoders = {"original_text_encoder": OriginalEncoder(ORIGINAL_TEXT_ENCODER_DIR, "text_encoder", "CLIPTextModel")}
    _original_kind = "CLIPTextModel"

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
        check_safety_mode(safety_mode)
        cross_attention_dim = unet.config.cross_attention_dim if unet is not None else None
        check_text_encoder(text_encoder, cross_attention_dim, tokenizer, argument="text_encoder")
        if self._check_originals({"original_text_encoder": original_text_encoder}):
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
        self._last_nsfw_scores = None
        self._init_safer({"original_text_encoder": original_text_encoder}, nsfw_scorer, safety_mode)

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
        source, config, hub_kwargs, torch_dtype = cls._from_pretrained_source(
            pretrained_model_name_or_path, keep_original_text_encoder, kwargs
        )
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

        cls._original_encoder_kwargs(kwargs, keep_original_text_encoder, source, pretrained_model_name_or_path, saved_by_us,
                                     torch_dtype, hub_kwargs)  # fmt: skip
        return super().from_pretrained(source, **kwargs)

    @classmethod
    def _safety_checker_options(cls, kwargs: dict) -> None:
        """With a scorer other than ``"safety_checker"``, the base model's safety checker is not loaded."""
        if "nsfw_scorer" in kwargs:
            scorer = kwargs["nsfw_scorer"]
            uses_checker = scorer == "safety_checker" or (isinstance(scorer, (list, tuple)) and "safety_checker" in scorer)
            if scorer is not None and not uses_checker:
                kwargs.setdefault("safety_checker", None)
                kwargs.setdefault("requires_safety_checker", False)

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

    def _check_text_encoder_fit(self, modules: tuple, labels: tuple[str, ...]) -> None:
        check_text_encoder(modules[0], self.unet.config.cross_attention_dim, self.tokenizer, argument=labels[0])

    def _load_text_encoders_for_compare(self, source: Any, argument: str) -> tuple:
        return (self.load_text_encoder(source, argument=argument),)

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
        with self._text_encoders_in_place(*self._encoders_for(encoder)) as (module,):
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

    def run_safety_checker(self, image, device, dtype):
        """Hook called by the parent's ``__call__`` after decoding: score with ``nsfw_scorer`` and keep the scores."""
        if not torch.is_tensor(image):  # numpy input (legacy callers): score as the parent would
            image = torch.from_numpy(image).permute(0, 3, 1, 2) * 2 - 1
        image, flags, scores = self.score_images(image)
        self._last_nsfw_scores = scores
        return image, flags

    # ------------------------------------------------------------------ checks
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
        text_encoders: Any = None,
        max_batch: Any = None,
        **sampling: Any,
    ):
        """The parent's checks, plus those of the arguments it leaves to fail late or silently.

        Raises `ValueError` (a wrong value) or `TypeError` (a wrong kind of object) naming the argument, the value
        and the fix: ``prompt`` strings; ``height``/``width`` positive multiples of 8; ``num_inference_steps`` and
        ``num_images_per_prompt`` whole numbers >= 1; ``guidance_scale``, ``guidance_rescale`` and ``eta`` finite;
        ``generator`` a `torch.Generator` or a list of one per image; ``latents`` of the shape that ``height``,
        ``width`` and the batch call for; :meth:`compare`'s ``text_encoders`` (a ``{name: encoder}`` dict, see
        :func:`~safer_diffusion.compare.check_text_encoders`; nothing is loaded here) and ``max_batch`` (a whole
        number >= 1, or None). ``sampling`` holds the keywords ``num_inference_steps``, ``timesteps``, ``sigmas``,
        ``guidance_scale``, ``guidance_rescale``, ``eta``, ``num_images_per_prompt``, ``generator`` and ``latents``
        (each checked when given; see ``_check_sampling_inputs``, shared with the SDXL pipeline). The parent's
        ``__call__`` calls this with its own arguments only; :meth:`__call__` and :meth:`compare` call it first with
        all of them, before any work.
        """
        check_prompt(prompt)
        self._check_compare_inputs(text_encoders, max_batch)
        self._check_size(height, width)
        super().check_inputs(
            prompt, height, width, callback_steps, negative_prompt, prompt_embeds, negative_prompt_embeds,
            ip_adapter_image, ip_adapter_image_embeds, callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        self._check_sampling_inputs(prompt, prompt_embeds, height, width, **sampling)

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
        self._check_compare_originals(text_encoders)
        check_prompt(prompt, required=True)
        height, width = self.default_size(height, width)
        self.check_inputs(
            prompt, height, width, None, negative_prompt, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, eta=eta,
            num_images_per_prompt=num_images_per_prompt, generator=generator, latents=latents,
            text_encoders=text_encoders, max_batch=max_batch,
        )  # fmt: skip
        encoders = self._compare_text_encoders(text_encoders)
        self._start_call(guidance_scale, guidance_rescale, clip_skip, cross_attention_kwargs)
        cfg = self.do_classifier_free_guidance
        device = self._execution_device
        lora_scale = cross_attention_kwargs.get("scale") if cross_attention_kwargs else None

        # 1. Encode with every encoder, in the dtype a call of this pipeline conditions in
        dtype = self.text_encoder.dtype
        branches = []
        for modules in encoders.values():
            cond, uncond = self.encode_prompt(
                prompt, device, num_images_per_prompt, cfg, negative_prompt, lora_scale=lora_scale, clip_skip=clip_skip,
                encoder=modules,
            )  # fmt: skip
            branches.append(BranchConditioning(
                cond={"encoder_hidden_states": cond.to(dtype)},
                uncond={"encoder_hidden_states": uncond.to(dtype)} if cfg else None,
            ))  # fmt: skip

        # 2. Timesteps; 3.-5. one scheduler and generator copy per encoder, shared initial latents, one denoising loop
        # (one UNet batch per step, in chunks of `max_batch` rows), decoded encoder by encoder, scored
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device)
        outputs = self._denoise_and_decode(
            branches, timesteps, batch=(1 if isinstance(prompt, str) else len(prompt)) * num_images_per_prompt,
            height=height, width=width, dtype=dtype, generator=generator, latents=latents, eta=eta,
            output_type=output_type, score=score, max_batch=max_batch,
        )  # fmt: skip
        return self._comparison_output(list(encoders), outputs, default=text_encoders is None)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> VAE output in [-1, 1], as the parent's ``__call__`` decodes."""
        return self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
