"""What the two safer pipelines share, written once.

:class:`~safer_diffusion.SaferStableDiffusionPipeline` (SD 1.x/2.x, one text encoder) and
:class:`~safer_diffusion.pipeline_safer_stable_diffusion_xl.SaferStableDiffusionXLPipeline` (SDXL, a pair) differ in
how a prompt is encoded and in their parents' hooks. Everything else is here:

* :class:`OriginalEncodersMixin`: the base model's own text encoder(s), for ``compare()``, kept outside the component
  registry (``components`` has exactly the parent's keys) yet moved, offloaded, saved and loaded like components;
* :class:`SaferPipelineMixin`: the NSFW scorer and ``safety_mode``, scoring and decoding, ``default_size``, the checks
  both ``check_inputs`` add to their parents', ``save_pretrained``'s scorer warning, the ``from_pretrained`` preamble
  (source, dtype names, safetensors only, the originals) and the N-way ``compare()`` plumbing (resolving
  ``text_encoders``, one denoising loop from :mod:`safer_diffusion.compare`, the output classes);
* module-level checks both use (prompts, counts, generators, safety modes, pickle-only folders, dtype options).

A pipeline using the mixin names its text-encoder slots (``_text_encoder_slots``), its originals
(``_original_encoders``) and implements a few narrow hooks: ``_check_text_encoder_fit`` (do these modules fit the
UNet?), ``_load_text_encoders_for_compare`` (load a source into one module per slot) and ``_decode`` (latents to VAE
output).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import numbers
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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
from .encoders import as_torch_dtype
from .hub import resolve_model_source
from .pipeline_output import SaferComparisonOutput, SaferStableDiffusionMultiCompareOutput
from .scoring.base import SAFETY_MODES

logger = logging.getLogger(__name__)

__all__ = [
    "NOT_GIVEN",
    "ORIGINAL_TEXT_ENCODER_DIR",
    "SAFETY_MODES",
    "OriginalEncoder",
    "OriginalEncodersMixin",
    "SaferPipelineMixin",
    "check_count",
    "check_generator",
    "check_prompt",
    "check_safetensors_only",
    "check_safety_mode",
    "is_int",
    "is_real",
    "load_dtype",
]

#: Subfolder of a saved pipeline holding the base model's own text encoder (for ``compare()``).
ORIGINAL_TEXT_ENCODER_DIR = "original_text_encoder"
#: Default of the ``check_inputs`` keywords that the parents' own ``__call__`` does not pass (so nothing is checked).
NOT_GIVEN: Any = object()
_PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


# ---------------------------------------------------------------------------------------------- module-level checks
def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_count(name: str, value: Any, example: str) -> None:
    """``value`` must be a whole number >= 1 (not a bool); the `ValueError` names ``name`` and ends with ``example``."""
    if not is_int(value) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}; {example}.")


def check_generator(generator: Any, batch: int | None) -> None:
    """`None`, a `torch.Generator`, or a list of exactly ``batch`` of them (any length when ``batch`` is `None`)."""
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


def check_prompt(prompt: Any, required: bool = False) -> None:
    """``prompt`` must be a string or a non-empty list of strings (or `None`); ``required``: given, none blank."""
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


def check_safety_mode(safety_mode: Any) -> str:
    if safety_mode not in SAFETY_MODES:
        raise ValueError(f"`safety_mode` must be one of {list(SAFETY_MODES)}, got {safety_mode!r}.")
    return safety_mode


def check_safetensors_only(folder: Path, config: dict | None) -> None:
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


def load_dtype(kwargs: dict) -> Any:
    """Read ``torch_dtype`` / ``dtype`` (names allowed) and ``use_safetensors`` from ``from_pretrained``'s kwargs.

    `torch_dtype` (the long-standing name) and `dtype` (diffusers >= 0.42, transformers 5) are both accepted; the one
    given is passed on as ``dtype``. ``use_safetensors`` is forced to True (`False` is refused). Returns the dtype.
    """
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


def _json_or_none(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return None


def _blur(images: torch.Tensor) -> torch.Tensor:
    """Heavy blur of ``(N, C, H, W)`` images in [0, 1]: area-downsample 32x, then bilinear upsample."""
    height, width = images.shape[-2:]
    small = torch.nn.functional.interpolate(images.float(), size=(max(1, height // 32), max(1, width // 32)), mode="area")
    return torch.nn.functional.interpolate(small, size=(height, width), mode="bilinear", align_corners=False).to(images.dtype)


# ---------------------------------------------------------------------------------------------- the original encoders
@dataclass(frozen=True)
class OriginalEncoder:
    """Where one of the base model's own text encoders is read from.

    Args:
        saved_dir: its subfolder in a folder saved by a safer pipeline (beside the components).
        base_dir: its subfolder in the base pipeline's folder (the component it is the original of).
        model_class: the transformers class it is loaded as.
    """

    saved_dir: str
    base_dir: str
    model_class: str


class OriginalEncodersMixin:
    """The base model's own text encoders, kept beside the safe ones but outside the component registry.

    ``_original_encoders`` maps each attribute (``original_text_encoder``, ...) to its :class:`OriginalEncoder`
    (one for SD 1.x/2.x, two for SDXL). They are plain attributes, so ``components`` has exactly the parent pipeline's
    keys (and ``StableDiffusionImg2ImgPipeline(**pipe.components)`` works); ``to()``, the CPU-offload helpers,
    ``save_pretrained`` and ``from_pretrained(..., keep_original_text_encoder=True)`` treat them as components.
    """

    _original_encoders: dict[str, OriginalEncoder] = {}
    #: How ``__init__``'s type error describes an original encoder.
    _original_kind = "CLIP text encoder module"

    def _originals(self) -> dict[str, Any]:
        return {name: self.__dict__.get(name) for name in self._original_encoders}

    @classmethod
    def _check_originals(cls, originals: dict[str, Any]) -> bool:
        """``__init__``'s originals are modules (or `None`), all or none of them; returns whether they are given."""
        for name, encoder in originals.items():
            if encoder is not None and not isinstance(encoder, torch.nn.Module):
                raise TypeError(f"`{name}` must be a {cls._original_kind} (or None), got {type(encoder).__name__}.")
        given = [name for name, encoder in originals.items() if encoder is not None]
        if given and len(given) < len(originals):
            missing = next(name for name in originals if name not in given)
            raise ValueError(f"`{given[0]}` was given without `{missing}`: `compare()` needs the base model's whole pair. "
                             "Pass both (or neither).")  # fmt: skip
        return bool(given)

    def _original_text_encoders(self, message: str) -> tuple:
        """The originals in slot order, or a `ValueError` with ``message`` (its ``{what}``: "text encoder(s)",
        ``{passes}``: the ``original_...=`` arguments to pass)."""
        originals = tuple(self._originals().values())
        if any(encoder is None for encoder in originals):
            what = "text encoder" if len(originals) == 1 else "text encoders"
            passes = " and ".join(f"`{name}=`" for name in self._original_encoders)
            raise ValueError(message.replace("{what}", what).replace("{passes}", passes))
        return originals

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
            folder = Path(save_directory) / self._original_encoders[name].saved_dir
            if encoder is not None:
                encoder.save_pretrained(folder, safe_serialization=safe_serialization)
            elif folder.is_dir():  # `keep_original_text_encoder=True` would load a stale copy from an earlier save
                shutil.rmtree(folder)

    @classmethod
    def _original_encoder_kwargs(cls, kwargs: dict, keep: bool, source: str, given: Any, saved_by_us: bool, torch_dtype,
                                 hub_kwargs: dict) -> None:  # fmt: skip
        """Fill ``from_pretrained``'s kwargs with the originals: a module passed explicitly is used as is; otherwise
        `None` without ``keep``, else loaded from ``base_dir`` of a base or ``saved_dir`` of our saves (each folder
        checked before any is loaded)."""
        import transformers

        plan = []
        for name, spec in cls._original_encoders.items():
            if kwargs.get(name) is not None:
                continue  # given explicitly: used as is
            if not keep:
                kwargs[name] = None
                continue
            subfolder = spec.saved_dir if saved_by_us else spec.base_dir
            local = Path(source) / subfolder
            if saved_by_us and os.path.isdir(source) and not (local / "config.json").is_file():
                what = "an original text encoder" if len(cls._original_encoders) == 1 else "the original text encoders"
                raise ValueError(
                    f"`keep_original_text_encoder=True`, but {os.fspath(given)!r} was saved without {what} (no {subfolder}/ "
                    f"folder). Load the base model instead, or pass `{name}=`."
                )
            if os.path.isdir(source):
                check_safetensors_only(local, None)
            plan.append((name, subfolder, getattr(transformers, spec.model_class)))
        for name, subfolder, model_cls in plan:
            kwargs[name] = model_cls.from_pretrained(source, subfolder=subfolder, dtype=torch_dtype, use_safetensors=True,
                                                     **hub_kwargs).eval()  # fmt: skip


# ---------------------------------------------------------------------------------------------- the shared pipeline half
class SaferPipelineMixin(OriginalEncodersMixin):
    """Scoring, ``safety_mode``, checks, saving/loading and the N-way ``compare()`` plumbing of the safer pipelines.

    Used before the diffusers parent in the bases (``class P(SaferPipelineMixin, StableDiffusionPipeline)``).
    """

    #: The pipeline's text-encoder attributes, in the order ``compare()`` modules are given (one per slot).
    _text_encoder_slots: tuple[str, ...] = ("text_encoder",)
    #: The values error messages suggest (the base's native size and usual guidance).
    _example_size = 512
    _example_guidance_scale = 7.5

    def _init_safer(self, originals: dict[str, Any], nsfw_scorer: Any, safety_mode: str) -> None:
        """The end of ``__init__``, after the parent's: the originals as plain attributes, the options in the config."""
        for name, encoder in originals.items():
            # a plain attribute, not `register_modules`: it stays out of `components` and of `model_index.json`
            setattr(self, name, encoder)
        self.register_to_config(safety_mode=safety_mode)
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
        self.register_to_config(safety_mode=check_safety_mode(value))

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

    def to(self, *args, **kwargs):
        """As `DiffusionPipeline.to`; also moves the original text encoders, and a scorer that has a ``to`` method."""
        pipe = super().to(*args, **kwargs)
        device = kwargs.get("device") or next((a for a in args if isinstance(a, (str, torch.device))), None)
        scorer = self.nsfw_scorer
        if device is not None and scorer is not None and hasattr(scorer, "to"):
            scorer.to(device)
        return pipe

    # ------------------------------------------------------------------ saving and loading
    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """As `DiffusionPipeline.save_pretrained`; the scorer is saved as its name/options in ``model_index.json``,
        and the original text encoder(s) (when loaded) in their own subfolders (``original_text_encoder/``, ...)
        beside the components."""
        if not self.__dict__.get("_nsfw_scorer_savable", True):
            logger.warning(
                "The NSFW scorer %r has no serialisable config; it is not saved. Pass `nsfw_scorer=` again when loading.",
                self.nsfw_scorer,
            )
        # written first, so that `push_to_hub=True` uploads them too
        self._save_original_encoders(save_directory, safe_serialization=kwargs.get("safe_serialization", True))
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def _safety_checker_options(cls, kwargs: dict) -> None:
        """Hook: adjust ``from_pretrained``'s safety-checker kwargs (nothing by default)."""

    @classmethod
    def _check_base_config(cls, config: dict, given: Any) -> None:
        """Hook: refuse a ``model_index.json`` this class cannot load (nothing by default)."""

    @classmethod
    def _from_pretrained_source(cls, pretrained_model_name_or_path: Any, keep_original_text_encoder: Any, kwargs: dict):
        """What every safer ``from_pretrained`` does first, before any weight is read: the arguments' types, the
        dtype names and safetensors only (:func:`load_dtype`), the base resolved (a missing path or an unreachable
        hub id fails at once), its ``model_index.json`` read and checked, a pickle-only folder refused.

        Returns:
            ``(source, config, hub_kwargs, torch_dtype)``.
        """
        if not isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
            raise TypeError(
                "`pretrained_model_name_or_path` must be a hub id ('owner/name') or a local folder (str or os.PathLike), "
                f"got {type(pretrained_model_name_or_path).__name__} {pretrained_model_name_or_path!r}."
            )
        if not isinstance(keep_original_text_encoder, bool):
            raise TypeError(f"`keep_original_text_encoder` must be True or False, got {keep_original_text_encoder!r}.")
        if "safety_mode" in kwargs:
            check_safety_mode(kwargs["safety_mode"])
        torch_dtype = load_dtype(kwargs)
        cls._safety_checker_options(kwargs)
        hub_kwargs = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
        source = resolve_model_source(pretrained_model_name_or_path, argument="pretrained_model_name_or_path",
                                      revision=hub_kwargs.get("revision"), token=hub_kwargs.get("token"))  # fmt: skip
        config = cls.load_config(source, **hub_kwargs)
        cls._check_base_config(config, pretrained_model_name_or_path)
        if os.path.isdir(source):
            check_safetensors_only(Path(source), config)
        return source, config, hub_kwargs, torch_dtype

    # ------------------------------------------------------------------ encoders
    def _safe_text_encoders(self) -> tuple:
        return tuple(getattr(self, slot) for slot in self._text_encoder_slots)

    def _encoders_for(self, encoder: Any) -> tuple:
        """``encode_prompt``'s ``encoder``: ``"safe"``, ``"original"``, or modules (one per text-encoder slot)."""
        if isinstance(encoder, torch.nn.Module):
            modules = (encoder,)
        elif isinstance(encoder, (tuple, list)) and encoder and all(isinstance(e, torch.nn.Module) for e in encoder):
            modules = tuple(encoder)
        elif isinstance(encoder, str) and encoder == SAFE:
            return self._safe_text_encoders()
        elif isinstance(encoder, str) and encoder == ORIGINAL:
            return self._original_text_encoders(
                "`encoder='original'` needs the base model's {what}: load the pipeline with "
                "`keep_original_text_encoder=True` (or pass {passes})."
            )
        else:
            raise ValueError(f"`encoder` must be 'safe' or 'original', got {encoder!r}.")
        if len(modules) != len(self._text_encoder_slots):
            raise ValueError(f"`encoder` must be one module per text encoder {list(self._text_encoder_slots)}, got {len(modules)}.")
        return modules

    @contextlib.contextmanager
    def _text_encoders_in_place(self, *modules):
        """Temporarily make the text-encoder slots (``self.text_encoder``, ...) these modules (without touching the
        config)."""
        saved = tuple(self.__dict__[slot] for slot in self._text_encoder_slots)
        for slot, module in zip(self._text_encoder_slots, modules):
            self.__dict__[slot] = module
        try:
            yield modules
        finally:
            for slot, module in zip(self._text_encoder_slots, saved):
                self.__dict__[slot] = module

    def _check_text_encoder_fit(self, modules: tuple, labels: tuple[str, ...]) -> None:
        """Hook: raise a `ValueError` naming ``labels[i]`` when ``modules`` (one per slot) do not fit this pipeline."""
        raise NotImplementedError

    def _load_text_encoders_for_compare(self, source: Any, argument: str) -> tuple:
        """Hook: load ``source`` as one fitting module per slot, on the pipeline's device (errors name ``argument``)."""
        raise NotImplementedError

    def load_compare_text_encoder(self, source: Any, *, argument: str = "text_encoders") -> Any:
        """Load ``source`` once as one value of ``compare(text_encoders={name: value})``: a text encoder module that
        fits the pipeline (SD 1.x/2.x, :meth:`load_text_encoder`) or a pair (SDXL, :meth:`load_text_encoder_pair`),
        on the pipeline's device. Errors name ``argument``."""
        modules = self._load_text_encoders_for_compare(source, argument=argument)
        return modules[0] if len(modules) == 1 else modules

    def _compare_labels(self, where: str) -> tuple[str, ...]:
        """How each module of a ``text_encoders`` value is named in errors: the value itself, or ``[0]``, ``[1]``."""
        return (where,) if len(self._text_encoder_slots) == 1 else tuple(f"{where}[{i}]" for i in range(len(self._text_encoder_slots)))

    def _resolve_text_encoders(self, text_encoders: dict[str, Any]) -> dict[str, tuple]:
        """``{name: modules}`` (one per slot) for checked ``text_encoders`` (see
        :func:`~safer_diffusion.compare.check_text_encoders`), every problem reported before anything is loaded:
        first the aliases (the pipeline's own encoders) and the modules (fit, device), then each source is resolved
        (a missing path, an unreachable hub id), and only then are the sources loaded."""
        device = self._execution_device
        resolved: dict[str, tuple] = {}
        for name, value in text_encoders.items():
            where = f"text_encoders[{name!r}]"
            if isinstance(value, str) and value in ENCODER_ALIASES:
                resolved[name] = self._safe_text_encoders() if value == SAFE else self._original_text_encoders(
                    f"`{where}` is 'original', but the pipeline has no original {{what}}: load it with "
                    "`keep_original_text_encoder=True` (or pass {passes})."
                )  # fmt: skip
            elif not isinstance(value, (str, os.PathLike)):
                modules = tuple(value) if isinstance(value, (tuple, list)) else (value,)
                labels = self._compare_labels(where)
                self._check_text_encoder_fit(modules, labels)
                for module, label in zip(modules, labels):
                    param = next(module.parameters(), None)
                    if param is not None and not hasattr(module, "_hf_hook") and param.device.type != torch.device(device).type:
                        raise ValueError(
                            f"`{label}` is on {param.device}, but the pipeline runs on {device}; move it first "
                            "(`encoder.to(pipe.device)`), or pass its source and let `compare()` load it."
                        )
                resolved[name] = modules
        sources = {name: value for name, value in text_encoders.items() if name not in resolved}
        for name, value in sources.items():
            resolve_model_source(value, argument=f"text_encoders[{name!r}]")
        for name, value in sources.items():
            resolved[name] = self._load_text_encoders_for_compare(value, argument=f"text_encoders[{name!r}]")
        return {name: resolved[name] for name in text_encoders}

    def _check_compare_originals(self, text_encoders: dict[str, Any] | None) -> None:
        """The default ``compare()`` (no ``text_encoders``) needs the originals: checked first, before any input."""
        if text_encoders is None:
            self._original_text_encoders(
                "`compare()` needs the base model's {what}: load the pipeline with `keep_original_text_encoder=True` "
                "(or pass {passes})."
            )

    def _compare_text_encoders(self, text_encoders: dict[str, Any] | None) -> dict[str, tuple]:
        """``compare()``'s encoders by name: the original and the safe one(s) by default, else ``text_encoders``
        checked and resolved (see :meth:`_resolve_text_encoders`)."""
        text_encoders = {ORIGINAL: ORIGINAL, SAFE: SAFE} if text_encoders is None else text_encoders
        return self._resolve_text_encoders(check_text_encoders(text_encoders, pair=len(self._text_encoder_slots) == 2))

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

    def _check_compare_inputs(self, text_encoders: Any, max_batch: Any) -> None:
        """``compare()``'s ``text_encoders`` (shape only; nothing is loaded) and ``max_batch``."""
        if text_encoders is not None:
            check_text_encoders(text_encoders, pair=len(self._text_encoder_slots) == 2)
        check_max_batch(max_batch)

    def _check_size(self, height: Any, width: Any) -> None:
        for name, value in (("height", height), ("width", width)):
            if not is_int(value) or value < 8 or value % 8:
                raise ValueError(f"`{name}` must be a positive multiple of 8, got {value!r}; e.g. {name}={self._example_size}.")

    def _check_sampling_inputs(self, prompt, prompt_embeds, height, width, *, num_inference_steps: Any = NOT_GIVEN,
                               timesteps=None, sigmas=None, guidance_scale: Any = NOT_GIVEN, guidance_rescale: Any = NOT_GIVEN,
                               eta: Any = NOT_GIVEN, num_images_per_prompt: Any = NOT_GIVEN, generator=None,
                               latents=None) -> None:  # fmt: skip
        """The checks both ``check_inputs`` add after their parent's: ``num_inference_steps`` and
        ``num_images_per_prompt`` whole numbers >= 1, ``guidance_scale``, ``guidance_rescale`` and ``eta`` finite
        (each only when given: the parents' own ``__call__`` calls ``check_inputs`` without them), ``generator`` one
        or one per image, ``latents`` of the right shape."""
        custom_schedule = timesteps is not None or sigmas is not None
        if num_inference_steps is not NOT_GIVEN and not (num_inference_steps is None and custom_schedule):
            check_count("num_inference_steps", num_inference_steps, "e.g. num_inference_steps=25")
        for name, value in (("guidance_scale", guidance_scale), ("guidance_rescale", guidance_rescale), ("eta", eta)):
            if value is not NOT_GIVEN and (not is_real(value) or not math.isfinite(value)):
                raise ValueError(f"`{name}` must be a finite number, got {value!r}; e.g. "
                                 f"guidance_scale={self._example_guidance_scale}, eta=0.0.")  # fmt: skip
        per_prompt = 1
        if num_images_per_prompt is not NOT_GIVEN:
            check_count("num_images_per_prompt", num_images_per_prompt, "e.g. num_images_per_prompt=1")
            per_prompt = num_images_per_prompt
        if isinstance(prompt, (str, list)):
            batch = (1 if isinstance(prompt, str) else len(prompt)) * per_prompt
        else:
            batch = prompt_embeds.shape[0] * per_prompt if torch.is_tensor(prompt_embeds) else None
        check_generator(generator, batch)
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

    # ------------------------------------------------------------------ scoring and decoding
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

    def _score_and_postprocess(self, image: torch.Tensor, output_type: str, score: bool = True):
        """Score decoded images (applying ``safety_mode``) and post-process them: ``(images, flags, scores)``."""
        flags = scores = None
        if score:
            image, flags, scores = self.score_images(image)
        denormalize = None if flags is None else [not f for f in flags]  # flagged images come back in [0, 1]
        return self.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize), flags, scores

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Hook: final latents -> VAE output in [-1, 1], as the parent's ``__call__`` decodes."""
        raise NotImplementedError

    def decode_and_score(self, latents: torch.Tensor, output_type: str = "pil", score: bool = True):
        """Decode final latents, score the images (:meth:`score_images`, which applies ``safety_mode``), post-process.

        Returns:
            `(images, flags, scores)`; for ``output_type="latent"`` the latents themselves and `None`, `None`
            (as for flags and scores when ``score`` is `False` or there is no scorer).
        """
        if output_type == "latent":
            return latents, None, None
        return self._score_and_postprocess(self._decode(latents), output_type, score=score)

    # ------------------------------------------------------------------ compare()
    def _start_call(self, guidance_scale: float, guidance_rescale: float, clip_skip: int | None,
                    cross_attention_kwargs: dict[str, Any] | None) -> None:  # fmt: skip
        """The per-call state the parents' properties read (``guidance_scale``, ``do_classifier_free_guidance``, ...)."""
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False

    def _denoise_and_decode(self, branches: Sequence[BranchConditioning], timesteps, *, batch: int, height: int, width: int,
                            dtype, generator, latents, eta: float, output_type: str, score: bool,
                            max_batch: int | None) -> list[tuple[Any, Any, Any]]:  # fmt: skip
        """Every branch from the same initial latents through ONE denoising loop (:func:`~safer_diffusion.compare.
        denoise_branches`, each with its own scheduler and generator copy), then decoded branch by branch (peak memory
        of one generation), scored and post-processed: ``(images, flags, scores)`` per branch, in order.

        Call after :meth:`_start_call` and after ``set_timesteps`` (``timesteps`` as a separate call would run them).
        """
        device = self._execution_device
        n = len(branches)
        schedulers = branch_schedulers(self.scheduler, n)
        latents = self.prepare_latents(batch, self.unet.config.in_channels, height, width, dtype, device, generator, latents)
        extra = [self.prepare_extra_step_kwargs(g, eta) for g in branch_generators(generator, n)]
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            w = torch.tensor(self.guidance_scale - 1).repeat(1)
            timestep_cond = self.get_guidance_scale_embedding(w, embedding_dim=self.unet.config.time_cond_proj_dim).to(
                device=device, dtype=latents.dtype
            )
        self._num_timesteps = len(timesteps)
        final = denoise_branches(
            self, latents, branches, timesteps, schedulers, extra, do_classifier_free_guidance=self.do_classifier_free_guidance,
            guidance_scale=self.guidance_scale, guidance_rescale=self.guidance_rescale, timestep_cond=timestep_cond,
            cross_attention_kwargs=self.cross_attention_kwargs, max_batch=max_batch,
        )  # fmt: skip
        outputs = [self.decode_and_score(latent, output_type=output_type, score=score) for latent in final]
        self.maybe_free_model_hooks()
        return outputs

    @staticmethod
    def _comparison_output(names: list[str], outputs: list[tuple[Any, Any, Any]], default: bool):
        """`SaferComparisonOutput` for the default original/safe pair, else `SaferStableDiffusionMultiCompareOutput`."""
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
