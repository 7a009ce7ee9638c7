"""Loading CLIP, adding LoRA (or unfreezing), precision, attention kernels, and the frozen reference.

* :func:`load_clip` loads a transformers ``CLIPModel`` from a local folder or hub id, converts an
  OpenCLIP model (``open_clip:<arch>[:<pretrained>]``, e.g. SD 2.x's ``ViT-H-14``) into one, or
  builds the tiny random CLIP of the tests (``tiny``).
* :class:`SaferCLIP` wraps it for training: LoRA adapters (PEFT) or full fine-tuning on the chosen
  tower(s), trainable weights in fp32 and frozen weights in the low-precision dtype, gradient
  checkpointing, and :meth:`SaferCLIP.reference`, the frozen reference T0/V0. With LoRA the
  reference is the *same* base weights with the adapters disabled (PEFT ``disable_adapter()``):
  no second copy in memory, and the base weights never receive gradients, so T0/V0 cannot move.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from safer_diffusion.encoders import check_sdxl_text_encoders, text_transformer
from safer_diffusion.open_clip_conversion import convert_open_clip

from .losses import TOKEN_LAYERS

logger = logging.getLogger(__name__)

__all__ = [
    "LoadedCLIP",
    "SaferCLIP",
    "TINY_MODEL_NAME",
    "TINY_SDXL_BASE",
    "TINY_SDXL_MODEL_NAMES",
    "check_attention",
    "check_sdxl_towers",
    "check_mixed_precision",
    "convert_open_clip",
    "load_clip",
    "text_tower_shape",
    "weight_dtype_for",
]

#: ``--model_name_or_path`` value that builds :func:`safer_diffusion.tiny.tiny_clip_model` (offline tests).
TINY_MODEL_NAME = "tiny"
#: ``--model_name_or_path`` / ``--model_name_or_path_2`` values that build the tiny SDXL pipeline's own text encoders
#: (:func:`safer_diffusion.tiny.tiny_sdxl_text_encoders`, seed 0 as in :func:`~safer_diffusion.tiny.tiny_sdxl_components`),
#: each with its real tokenizer; the first gets an identity projection (it has none).
TINY_SDXL_MODEL_NAMES = ("tiny_sdxl", "tiny_sdxl_2")
#: ``--base`` value naming the tiny SDXL pipeline (:func:`safer_diffusion.tiny.tiny_pipeline_folders`, variant sdxl).
TINY_SDXL_BASE = "tiny_sdxl"
OPEN_CLIP_PREFIX = "open_clip:"
ATTENTION_CHOICES = ("sdpa", "xformers", "eager")
_TOWER_PREFIX = {"text": ("text_model", "text_projection"), "vision": ("vision_model", "visual_projection")}


@dataclass
class LoadedCLIP:
    """A loaded CLIP and what goes with it.

    Args:
        model: the `transformers.CLIPModel` (fp32, eval mode).
        tokenizer: its `CLIPTokenizer`.
        image_processor: a `CLIPImageProcessor`, or None when the source ships none.
        source: the `--model_name_or_path` value it came from (recorded in exports).
    """

    model: Any
    tokenizer: Any
    image_processor: Any
    source: str


# --------------------------------------------------------------------------- checks
def check_attention(attention: str, device: torch.device | str) -> None:
    """Raise `ValueError` when the attention backend cannot run on ``device``; register xformers when used."""
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"`--attention` must be one of {list(ATTENTION_CHOICES)}, got {attention!r}.")
    if attention != "xformers":
        return
    device = torch.device(device)
    try:
        import xformers.ops  # noqa: F401
    except ImportError as e:
        raise ValueError(
            "`--attention xformers` was requested but the `xformers` package is not installed. "
            "Install it on a CUDA machine with `pip install -e '.[xformers]'`, or use `--attention sdpa` "
            "(PyTorch's fused attention, usually as fast)."
        ) from e
    if device.type != "cuda":
        raise ValueError(
            f"`--attention xformers` needs a CUDA device, but training runs on {device.type!r}. Use `--attention sdpa` instead."
        )
    _register_xformers()


def _register_xformers() -> None:
    from transformers import AttentionInterface

    def xformers_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, is_causal=None, **kwargs):
        import xformers.ops as xops

        # transformers passes (B, H, L, D); xformers wants (B, L, H, D).
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        if attention_mask is not None:
            length = attention_mask.shape[-1]
            padded = (length + 7) // 8 * 8  # xformers needs the bias' last dimension 8-aligned in memory
            bias = attention_mask.new_zeros(*attention_mask.shape[:-1], padded).to(q.dtype)
            bias[..., :length] = attention_mask.to(q.dtype)
            bias = bias[..., :length].expand(q.shape[0], q.shape[2], q.shape[1], length)
        elif is_causal if is_causal is not None else getattr(module, "is_causal", False):
            bias = xops.LowerTriangularMask()
        else:
            bias = None
        out = xops.memory_efficient_attention(q, k, v, attn_bias=bias, p=dropout if module.training else 0.0, scale=scaling)
        return out, None

    AttentionInterface.register("xformers", xformers_attention_forward)


def check_mixed_precision(mixed_precision: str, device: torch.device | str) -> None:
    """Raise `ValueError` when ``mixed_precision`` is not supported on ``device``."""
    device = torch.device(device)
    if mixed_precision not in ("no", "fp16", "bf16"):
        raise ValueError(f"`--mixed_precision` must be 'no', 'fp16' or 'bf16', got {mixed_precision!r}.")
    if mixed_precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(
                "`--mixed_precision bf16` was requested but this GPU does not support bfloat16 (needs compute capability >= 8.0, "
                "e.g. A100/H100/RTX 30xx). Use `--mixed_precision fp16` (with loss scaling) or `no`."
            )
        if device.type == "mps":
            raise ValueError("`--mixed_precision bf16` is not supported on Apple MPS here; use `--mixed_precision no`.")
    if mixed_precision == "fp16" and device.type == "cpu":
        raise ValueError(
            "`--mixed_precision fp16` needs a GPU (gradient scaling of fp16 is not supported on the CPU). "
            "Use `--mixed_precision bf16` or `no` on the CPU."
        )


def weight_dtype_for(mixed_precision: str) -> torch.dtype:
    """Dtype of the frozen weights: fp16 / bf16 under mixed precision, else fp32."""
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


# --------------------------------------------------------------------------- loading
def _tiny_image_processor(size: int = 32):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_center_crop=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )


def load_clip(name_or_path: str | os.PathLike, attention: str = "sdpa") -> LoadedCLIP:
    """Load a CLIP model in fp32 with the requested attention backend.

    Args:
        name_or_path: a local ``CLIPModel`` folder or hub id; ``open_clip:<arch>[:<pretrained>]`` where
            ``<pretrained>`` is an OpenCLIP tag (``laion2b_s32b_b79k``) or a local weights file (without it
            the weights are random, for benchmarks); or ``tiny`` (tiny random CLIP, offline).
        attention: ``"sdpa"``, ``"eager"`` or ``"xformers"`` (call :func:`check_attention` first for xformers).

    Returns:
        :class:`LoadedCLIP`.
    """
    name = os.fspath(name_or_path)
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"`--attention` must be one of {list(ATTENTION_CHOICES)}, got {attention!r}.")
    if name == TINY_MODEL_NAME:
        from safer_diffusion.tiny import clip_tokenizer, tiny_clip_model

        model = tiny_clip_model()
        model.set_attn_implementation(attention)
        return LoadedCLIP(model, clip_tokenizer(), _tiny_image_processor(), name)
    if name in TINY_SDXL_MODEL_NAMES:
        from safer_diffusion.tiny import clip_tokenizer, tiny_sdxl_text_encoders

        first, second = tiny_sdxl_text_encoders(seed=0)
        model = _with_identity_projection(first) if name == TINY_SDXL_MODEL_NAMES[0] else second
        model.set_attn_implementation(attention)
        pad = "<|endoftext|>" if name == TINY_SDXL_MODEL_NAMES[0] else "!"
        return LoadedCLIP(model.float().eval(), clip_tokenizer(pad_token=pad), None, name)
    if name.startswith(OPEN_CLIP_PREFIX):
        return _load_open_clip(name, attention)

    from transformers import AutoConfig, CLIPImageProcessor, CLIPModel, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from safer_diffusion.hub import resolve_model_source

    source = resolve_model_source(name, argument="--model_name_or_path")
    config = AutoConfig.from_pretrained(source)
    if config.model_type == "clip_text_model":  # a text tower alone, e.g. an SDXL pipeline's text_encoder/ or text_encoder_2/
        if "CLIPTextModelWithProjection" in (config.architectures or []):
            model = CLIPTextModelWithProjection.from_pretrained(source, attn_implementation=attention, dtype=torch.float32)
        else:
            model = _with_identity_projection(CLIPTextModel.from_pretrained(source, attn_implementation=attention, dtype=torch.float32))
        return LoadedCLIP(model.eval(), CLIPTokenizer.from_pretrained(_tokenizer_folder(Path(source))), None, name)
    if config.model_type != "clip":
        raise ValueError(
            f"`--model_name_or_path`={name!r} holds a {config.model_type!r} model, not a CLIPModel (model_type 'clip') or a "
            "CLIP text model. Pass e.g. openai/clip-vit-large-patch14, `open_clip:<arch>:<tag>`, a CLIPTextModelWithProjection "
            "folder, or `tiny`."
        )
    model = CLIPModel.from_pretrained(source, attn_implementation=attention, dtype=torch.float32).eval()
    tokenizer = CLIPTokenizer.from_pretrained(source)
    try:
        image_processor = CLIPImageProcessor.from_pretrained(source)
    except (OSError, ValueError):
        image_processor = None
    return LoadedCLIP(model, tokenizer, image_processor, name)


def _with_identity_projection(text_model):
    """A ``CLIPTextModelWithProjection`` holding ``text_model``'s weights and an identity ``text_projection``.

    For a text tower that has no projection (an SDXL pipeline's ``text_encoder/``): the pooled losses then compare the
    pooled output itself, and the projection is never exported (SDXL's ``text_encoder`` is a plain ``CLIPTextModel``).
    """
    from transformers import CLIPTextModelWithProjection

    config = text_model.config.__class__.from_dict(text_model.config.to_dict())
    config.projection_dim = config.hidden_size
    config.architectures = ["CLIPTextModelWithProjection"]
    model = CLIPTextModelWithProjection(config)
    model.text_model.load_state_dict(text_transformer(text_model).state_dict())
    with torch.no_grad():
        model.text_projection.weight.copy_(torch.eye(config.hidden_size))
    model.set_attn_implementation(text_model.config._attn_implementation or "sdpa")
    logger.info("%s has no text projection: the pooled output is used as is (identity projection).", type(text_model).__name__)
    return model.float().eval()


def _tokenizer_folder(folder: Path) -> Path:
    """Where the tokenizer of a text-tower folder is: the folder itself, or the sibling ``tokenizer``/``tokenizer_2`` of a
    pipeline folder's ``text_encoder``/``text_encoder_2``."""
    if (folder / "tokenizer_config.json").is_file():
        return folder
    sibling = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}.get(folder.name)
    if sibling and (folder.parent / sibling / "tokenizer_config.json").is_file():
        return folder.parent / sibling
    raise FileNotFoundError(
        f"`--model_name_or_path` {os.fspath(folder)!r} has no tokenizer (tokenizer_config.json), and no sibling tokenizer folder of a "
        "pipeline; put the encoder's tokenizer files beside its config.json."
    )


def text_tower_shape(name_or_path: str) -> dict[str, Any]:
    """The text tower's ``hidden_size``, ``num_hidden_layers`` and ``projection_dim`` (None: no projection) of a
    ``--model_name_or_path`` value, from its configuration only (no weights are loaded)."""
    name = os.fspath(name_or_path)
    if name in TINY_SDXL_MODEL_NAMES:
        from safer_diffusion.tiny import tiny_sdxl_text_configs

        config = tiny_sdxl_text_configs()[TINY_SDXL_MODEL_NAMES.index(name)]
        proj = config.projection_dim if name == TINY_SDXL_MODEL_NAMES[1] else None
        return {"hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers, "projection_dim": proj}
    if name == TINY_MODEL_NAME:
        from safer_diffusion.tiny import tiny_clip_model

        config = tiny_clip_model().config
        text = config.text_config
        return {"hidden_size": text.hidden_size, "num_hidden_layers": text.num_hidden_layers, "projection_dim": config.projection_dim}
    if name.startswith(OPEN_CLIP_PREFIX):
        import open_clip

        cfg = open_clip.get_model_config(name[len(OPEN_CLIP_PREFIX):].split(":", 1)[0])
        if cfg is None:
            raise ValueError(f"`--model_name_or_path`={name!r}: unknown OpenCLIP architecture.")
        text = cfg["text_cfg"]
        return {"hidden_size": int(text["width"]), "num_hidden_layers": int(text["layers"]), "projection_dim": int(cfg["embed_dim"])}
    from transformers import AutoConfig

    from safer_diffusion.hub import resolve_model_source

    config = AutoConfig.from_pretrained(resolve_model_source(name, argument="--model_name_or_path"))
    if config.model_type == "clip":
        text = config.text_config
        return {"hidden_size": text.hidden_size, "num_hidden_layers": text.num_hidden_layers, "projection_dim": config.projection_dim}
    if config.model_type == "clip_text_model":
        proj = config.projection_dim if "CLIPTextModelWithProjection" in (config.architectures or []) else None
        return {"hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers, "projection_dim": proj}
    raise ValueError(f"`--model_name_or_path`={name!r} holds a {config.model_type!r} model, not a CLIP text tower.")


def _base_configs(base: str) -> tuple[dict, dict, dict]:
    """``(text_encoder, text_encoder_2, unet)`` config dicts of an SDXL pipeline (folder or hub id; config files only)."""
    from safer_diffusion.hub import resolve_model_source

    if base == TINY_SDXL_BASE:
        from safer_diffusion.tiny import tiny_pipeline_folders

        base = os.fspath(tiny_pipeline_folders(variant="sdxl")[0])
    source = resolve_model_source(base, argument="--base")
    configs = []
    for sub in ("text_encoder", "text_encoder_2", "unet"):
        if Path(source).is_dir():
            path = Path(source) / sub / "config.json"
            if not path.is_file():
                raise ValueError(f"`--base` {base!r} has no {sub}/config.json: pass an SDXL pipeline (two text encoders), e.g. "
                                 "stabilityai/stable-diffusion-xl-base-1.0.")
        else:
            from huggingface_hub import hf_hub_download

            try:
                path = Path(hf_hub_download(source, f"{sub}/config.json"))
            except Exception as e:  # noqa: BLE001 - offline cache miss, missing file, network: all a bad `--base`
                raise ValueError(f"`--base` {base!r}: cannot read {sub}/config.json ({type(e).__name__}); pass an SDXL "
                                 "pipeline folder or a hub id whose configs are cached (or reachable).") from None
        configs.append(json.loads(path.read_text(encoding="utf-8")))
    return configs[0], configs[1], configs[2]


def check_sdxl_towers(model_name_or_path: str, model_name_or_path_2: str, base: str) -> None:
    """Raise a `ValueError` when the two towers of an ``--sdxl`` run cannot replace ``base``'s text encoders: each tower's
    width and depth against the base's, the second's projection (present, and the base's ``projection_dim``), swapped
    towers, and the UNet's cross-attention and add-embedding widths (the library's
    :func:`safer_diffusion.encoders.check_sdxl_text_encoders`). Reads configuration files only."""
    first, second = text_tower_shape(model_name_or_path), text_tower_shape(model_name_or_path_2)
    ref1, ref2, unet = _base_configs(base)
    if ref2.get("projection_dim") is None:
        raise ValueError(f"`--base` {base!r}: its text_encoder_2 has no projection_dim; pass an SDXL pipeline.")
    tower1 = SimpleNamespace(config=SimpleNamespace(**first))  # no text_projection attribute: SDXL's text_encoder
    tower2 = SimpleNamespace(config=SimpleNamespace(**second))
    if second["projection_dim"] is not None:
        tower2.text_projection = True
    reference = (SimpleNamespace(**ref1), SimpleNamespace(**ref2))
    check_sdxl_text_encoders(tower1, tower2, unet_config=unet, reference=reference,
                             arguments=("--model_name_or_path", "--model_name_or_path_2"))  # fmt: skip


def _load_open_clip(name: str, attention: str) -> LoadedCLIP:
    try:
        import open_clip
    except ImportError as e:  # pragma: no cover
        raise ImportError("`open_clip:` models need open_clip_torch: `pip install -e '.[train]'`.") from e
    from safer_diffusion.hub import resolve_model_source
    from safer_diffusion.tiny import clip_tokenizer

    parts = name[len(OPEN_CLIP_PREFIX):].split(":", 1)
    arch, pretrained = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None)
    if open_clip.get_model_config(arch) is None:
        close = [m for m in open_clip.list_models() if arch.lower().split("-")[0] in m.lower()][:8]
        raise ValueError(
            f"`--model_name_or_path`={name!r}: unknown OpenCLIP architecture {arch!r}. Examples: {close or open_clip.list_models()[:8]}."
        )
    if pretrained is None:
        logger.warning("open_clip:%s without a pretrained tag: random weights (benchmarks only).", arch)
        oc_model = open_clip.create_model(arch, pretrained=None)
    elif Path(pretrained).expanduser().is_file():
        if not str(pretrained).endswith(".safetensors"):
            raise ValueError(
                f"`--model_name_or_path`={name!r}: local OpenCLIP weights must be a .safetensors file (pickled checkpoints "
                "are not loaded); convert it first."
            )
        oc_model = open_clip.create_model(arch, pretrained=None)
        from safetensors.torch import load_file

        oc_model.load_state_dict(load_file(str(Path(pretrained).expanduser())))
    else:
        cfg = open_clip.get_pretrained_cfg(arch, pretrained)
        if not cfg:
            raise ValueError(
                f"`--model_name_or_path`={name!r}: {pretrained!r} is neither a local .safetensors file nor an OpenCLIP tag of "
                f"{arch!r}. Known tags: {open_clip.list_pretrained_tags_by_model(arch)}."
            )
        if cfg.get("hf_hub"):
            resolve_model_source(cfg["hf_hub"].strip("/"), argument="--model_name_or_path")
        oc_model = open_clip.create_model(arch, pretrained=pretrained)
    model, image_size, mean, std = convert_open_clip(oc_model, open_clip.get_model_config(arch))
    model.set_attn_implementation(attention)
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=list(mean), image_std=list(std), resample=3,
    )
    return LoadedCLIP(model.eval(), clip_tokenizer(pad_token="!"), processor, name)


# --------------------------------------------------------------------------- the training wrapper
def _lora_target_regex(towers: tuple[str, ...], modules: list[str]) -> str:
    tower = "|".join(f"{t}_model" for t in towers)
    mods = "|".join(modules)
    return rf"({tower})\.encoder\.layers\.\d+\.(self_attn|mlp)\.({mods})"


class SaferCLIP(nn.Module):
    """CLIP prepared for SaFeR-CLIP / Safe-CLIP training.

    ``forward`` runs the trainable encoder(s); :meth:`reference` is a context in which the same module
    computes the frozen T0/V0 (adapters disabled, no gradients).

    Args:
        clip: a `transformers.CLIPModel` (fp32).
        train_towers: ``"text"``, ``"vision"`` or ``"both"``.
        finetune: ``"lora"`` or ``"full"``.
        lora_rank, lora_alpha, lora_dropout, lora_target_modules: LoRA settings.
        weight_dtype: dtype of the frozen weights (fp16/bf16 under mixed precision); trainable weights are fp32.
        keep_frozen_copy: for ``finetune="full"`` only: keep a frozen copy to serve as live reference
            (needed when anchors are not precomputed; LoRA never needs a copy).
        gradient_checkpointing: recompute activations in the backward pass.
        token_layer: the token states ``output_tokens`` returns: ``"last"`` (``last_hidden_state``, after the final
            layer norm: what SD 1.x reads) or ``"penultimate"`` (``hidden_states[-2]``, no final layer norm: what SDXL reads).
    """

    def __init__(
        self,
        clip,
        *,
        train_towers: str = "text",
        finetune: str = "lora",
        lora_rank: int = 16,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.1,
        lora_target_modules: list[str] | tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
        weight_dtype: torch.dtype = torch.float32,
        keep_frozen_copy: bool = False,
        gradient_checkpointing: bool = False,
        token_layer: str = "last",
    ):
        super().__init__()
        if token_layer not in TOKEN_LAYERS:
            raise ValueError(f"`token_layer` must be one of {list(TOKEN_LAYERS)}, got {token_layer!r}.")
        self.token_layer = token_layer
        if train_towers not in ("text", "vision", "both"):
            raise ValueError(f"`train_towers` must be 'text', 'vision' or 'both', got {train_towers!r}.")
        if finetune not in ("lora", "full"):
            raise ValueError(f"`finetune` must be 'lora' or 'full', got {finetune!r}.")
        self.towers = ("text", "vision") if train_towers == "both" else (train_towers,)
        self.finetune = finetune
        clip.requires_grad_(False)
        clip.to(weight_dtype)  # frozen parts in the low-precision dtype
        self.frozen_copy = None
        if finetune == "lora":
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(
                r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                target_modules=_lora_target_regex(self.towers, list(lora_target_modules)), bias="none",
            )
            self.model = get_peft_model(clip, lora)
            for p in self.model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()  # trainable LoRA weights in fp32
        else:
            if keep_frozen_copy:
                self.frozen_copy = [copy.deepcopy(clip).eval()]  # list: not a registered submodule (not trained, not saved)
            for tower in self.towers:
                for prefix in _TOWER_PREFIX[tower]:
                    module = getattr(clip, prefix)
                    module.float().requires_grad_(True)
            self.model = clip
        if gradient_checkpointing:
            self.clip.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        n_train = sum(p.numel() for p in self.parameters() if p.requires_grad)
        logger.info("Trainable parameters: %s (%s, towers %s)", f"{n_train:,}", finetune, "+".join(self.towers))

    @property
    def clip(self):
        """The underlying `transformers.CLIPModel` (with LoRA layers injected when finetune='lora')."""
        return self.model.get_base_model() if self.finetune == "lora" else self.model

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the trained weights (LoRA matrices, or the unfrozen tower), keyed as in ``self.clip``."""
        names = {n for n, p in self.clip.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.clip.state_dict().items() if k in names}

    def _text(self, clip, input_ids, attention_mask=None, output_tokens: bool = False):
        penultimate = output_tokens and self.token_layer == "penultimate"
        out = clip.text_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=penultimate)
        emb = clip.text_projection(out.pooler_output)
        emb = nn.functional.normalize(emb.float(), dim=-1)
        if not output_tokens:
            return emb, None
        return emb, (out.hidden_states[-2] if penultimate else out.last_hidden_state)

    @staticmethod
    def _image(clip, pixel_values):
        out = clip.vision_model(pixel_values=pixel_values.to(clip.visual_projection.weight.dtype))
        return nn.functional.normalize(clip.visual_projection(out.pooler_output).float(), dim=-1)

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, output_tokens: bool = False) -> dict[str, Any]:
        """Trainable encoders. Returns ``{"text": (B, D) normalised fp32, "tokens": (B, L, H) | None, "image": (B', D) | None}``."""
        clip = self.clip
        result: dict[str, Any] = {"text": None, "tokens": None, "image": None}
        if input_ids is not None:
            result["text"], result["tokens"] = self._text(clip, input_ids, attention_mask, output_tokens)
        if pixel_values is not None:
            result["image"] = self._image(clip, pixel_values)
        return result

    @contextlib.contextmanager
    def reference(self):
        """Context yielding the frozen reference CLIP (T0, V0): adapters disabled, no gradients, eval mode.

        With LoRA this is the same module with the adapters switched off (nothing is copied); with full
        fine-tuning it is the frozen copy (``keep_frozen_copy=True``).
        """
        if self.finetune == "full":
            if self.frozen_copy is None:
                raise RuntimeError("Full fine-tuning keeps no frozen copy; build SaferCLIP with keep_frozen_copy=True.")
            with torch.no_grad():
                yield self.frozen_copy[0]
            return
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad(), self.model.disable_adapter():
                yield self.clip
        finally:
            self.train(was_training)

    def reference_text(self, input_ids, attention_mask=None, output_tokens: bool = False):
        """T0 on token ids: ``(normalised embeddings (B, D) fp32, last hidden states or None)``."""
        with self.reference() as ref:
            return self._text(ref, input_ids, attention_mask, output_tokens)

    def reference_image(self, pixel_values):
        """V0 on pixel values: normalised embeddings (B, D) fp32."""
        with self.reference() as ref:
            return self._image(ref, pixel_values)

    def merged_clip(self):
        """A plain fp32 `CLIPModel` with the LoRA adapters merged in (a copy; this module is unchanged)."""
        model = copy.deepcopy(self.model)
        if self.finetune == "lora":
            model = model.merge_and_unload()
        return model.float().eval()
