"""open_clip -> transformers CLIP conversion: the project's one converter.

* :func:`convert_open_clip_text`: an open_clip text tower (model or state dict, e.g. SD 2.x's OpenCLIP ViT-H/14 or an
  open_clip fine-tune) -> ``CLIPTextModelWithProjection``; the library loads open_clip safe encoders with it.
* :func:`convert_open_clip`: a whole open_clip ``CLIP`` (ViT vision tower + transformer text tower) -> ``CLIPModel``;
  ``finetune`` converts OpenCLIP models to fine-tune with it.

Both map the same blocks the same way (open_clip's fused ``in_proj`` split into ``q/k/v_proj``, ``ln_1/ln_2`` ->
``layer_norm1/2``, ``c_fc/c_proj`` -> ``fc1/fc2``) and keep ``text_projection`` (diffusers'
``convert_open_clip_checkpoint`` drops it), so ``text_embeds`` equals ``open_clip_model.encode_text(tokens)``.
Imports nothing heavy at module level.
"""

from __future__ import annotations

from typing import Any

__all__ = ["OPEN_CLIP_PREFIXES", "convert_open_clip", "convert_open_clip_text", "find_open_clip_prefix"]

#: Key prefixes under which open_clip text towers are found in the wild (bare, CustomTextCLIP, SD checkpoints, DDP).
OPEN_CLIP_PREFIXES = ("", "text.", "model.", "cond_stage_model.model.", "module.", "module.text.")
_BOS, _EOS, _PAD = 49406, 49407, 0  # open_clip's tokenizer pads with 0
_DEFAULT_MEAN = (0.48145466, 0.4578275, 0.40821073)
_DEFAULT_STD = (0.26862954, 0.26130258, 0.27577711)


def find_open_clip_prefix(state_dict: dict) -> str | None:
    """The prefix under which ``state_dict`` holds an open_clip text tower, or None if it holds none."""
    for prefix in OPEN_CLIP_PREFIXES:
        if f"{prefix}token_embedding.weight" in state_dict and f"{prefix}transformer.resblocks.0.ln_1.weight" in state_dict:
            return prefix
    return None


def _resblocks(sd: dict, src: str, dst: str, layers: int) -> dict:
    """open_clip ``{src}.resblocks.{i}.*`` -> transformers ``{dst}.encoder.layers.{i}.*``."""
    out = {}
    pairs = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1",
             "mlp.c_proj": "mlp.fc2"}  # fmt: skip
    for i in range(layers):
        s, d = f"{src}.resblocks.{i}.", f"{dst}encoder.layers.{i}."
        q, k, v = sd[s + "attn.in_proj_weight"].chunk(3, dim=0)
        qb, kb, vb = sd[s + "attn.in_proj_bias"].chunk(3, dim=0)
        for name, w, b in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
            out[d + f"self_attn.{name}.weight"], out[d + f"self_attn.{name}.bias"] = w, b
        for a, b in pairs.items():
            out[d + b + ".weight"], out[d + b + ".bias"] = sd[s + a + ".weight"], sd[s + a + ".bias"]
    return out


def _text_weights(sd: dict, layers: int, dst: str) -> dict:
    """The text transformer's weights (embeddings, blocks, final norm) under the transformers prefix ``dst``."""
    out = _resblocks(sd, "transformer", dst, layers)
    out.update({
        f"{dst}embeddings.token_embedding.weight": sd["token_embedding.weight"],
        f"{dst}embeddings.position_embedding.weight": sd["positional_embedding"],
        f"{dst}final_layer_norm.weight": sd["ln_final.weight"],
        f"{dst}final_layer_norm.bias": sd["ln_final.bias"],
    })  # fmt: skip
    return out


def _text_projection(sd: dict):
    """open_clip's ``text_projection`` as a transformers ``Linear`` weight ``(projection_dim, width)``."""
    if "text_projection" in sd:
        return sd["text_projection"].T.contiguous()  # a Parameter (width, projection_dim)
    if "text_projection.weight" in sd:
        return sd["text_projection.weight"]  # already an nn.Linear
    raise ValueError("The open_clip state dict has no `text_projection`; it is needed for the pooled embedding.")


def _activation(block: Any) -> str | None:
    """``"quick_gelu"`` / ``"gelu"`` from an open_clip residual block's MLP (None when it cannot tell)."""
    act = getattr(getattr(block, "mlp", None), "gelu", None)
    if act is None:
        return None
    return "quick_gelu" if type(act).__name__ == "QuickGELU" else "gelu"


def _load_checked(model, weights: dict) -> None:
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    missing = [m for m in missing if not m.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"open_clip conversion mismatch: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}.")


def convert_open_clip_text(
    source: Any,
    hidden_act: str | None = None,
    num_attention_heads: int | None = None,
    eos_token_id: int = _EOS,
):
    """Convert an open_clip text tower to a transformers ``CLIPTextModelWithProjection``.

    Args:
        source: an ``open_clip`` model (``CLIP`` or ``CustomTextCLIP``/``TextTransformer``) or its
            state dict (keys possibly prefixed, see :data:`OPEN_CLIP_PREFIXES`).
        hidden_act (`str`, *optional*): ``"gelu"`` or ``"quick_gelu"``. Read from a model object (ignoring this);
            for a bare state dict defaults to ``"gelu"`` (OpenCLIP ViT-H/ViT-bigG; OpenAI-trained
            towers use ``"quick_gelu"``).
        num_attention_heads (`int`, *optional*): read from a model object (ignoring this); for a state dict
            defaults to ``width // 64`` (open_clip's default head width).
        eos_token_id (`int`, defaults to 49407): the end-of-text token, where the pooled output is taken.

    Returns:
        `transformers.CLIPTextModelWithProjection` in float32, in eval mode, whose ``text_embeds`` equal
        ``open_clip_model.encode_text(tokens)``.
    """
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    if isinstance(source, torch.nn.Module):
        module = getattr(source, "text", source) if not hasattr(source, "token_embedding") else source
        if not hasattr(module, "token_embedding") or not hasattr(module, "transformer"):
            raise TypeError(f"`source` ({type(source).__name__}) is not an open_clip model with a text tower.")
        block = module.transformer.resblocks[0]
        # a model object knows its heads and activation: those win over the arguments (defaults for state dicts)
        if hasattr(block.attn, "num_heads"):
            num_attention_heads = int(block.attn.num_heads)
        hidden_act = _activation(block) or hidden_act
        state = dict(module.state_dict())
        if isinstance(getattr(module, "text_projection", None), torch.nn.Linear) and module.text_projection.bias is not None:
            raise ValueError("open_clip text towers with a biased `text_projection` are not supported.")
    elif isinstance(source, dict):
        state = source
    else:
        raise TypeError(f"`source` must be an open_clip model or its state dict, got {type(source).__name__}.")
    prefix = find_open_clip_prefix(state)
    if prefix is None:
        raise ValueError(
            "`source` does not look like an open_clip text tower: no `token_embedding.weight` / "
            "`transformer.resblocks.0.*` keys (with or without a `text.`/`model.` prefix)."
        )
    sd = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    extra = sorted({k.split(".")[3] for k in sd if k.startswith("transformer.resblocks.") and k.split(".")[3] in ("ls_1", "ls_2", "ln_attn")})
    if extra:
        raise ValueError(f"open_clip text towers with {extra} (layer scale / extra norms) are not supported.")
    hidden_act = hidden_act or "gelu"
    if hidden_act not in ("gelu", "quick_gelu"):
        raise ValueError(f"`hidden_act` must be 'gelu' or 'quick_gelu', got {hidden_act!r}.")
    vocab, width = sd["token_embedding.weight"].shape
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks."))
    heads = num_attention_heads or max(1, width // 64)
    if width % heads:
        raise ValueError(f"`num_attention_heads`={heads} does not divide the width {width}.")
    projection = _text_projection(sd)
    config = CLIPTextConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=sd["positional_embedding"].shape[0],
        hidden_act=hidden_act, projection_dim=projection.shape[0], layer_norm_eps=1e-5, bos_token_id=_BOS,
        eos_token_id=eos_token_id, pad_token_id=_PAD,
    )  # fmt: skip
    model = CLIPTextModelWithProjection(config)
    _load_checked(model, {**_text_weights(sd, layers, "text_model."), "text_projection.weight": projection})
    return model.eval()


def convert_open_clip(oc_model: Any, model_cfg: dict) -> tuple[Any, int, tuple, tuple]:
    """Convert a standard OpenCLIP ``CLIP`` (ViT vision tower, transformer text tower) into a ``transformers.CLIPModel``.

    Args:
        oc_model: the OpenCLIP model (``open_clip.create_model(arch, ...)``).
        model_cfg: its architecture dict (``open_clip.get_model_config(arch)``).

    Returns:
        ``(clip_model, image_size, image_mean, image_std)``; ``clip_model`` in float32, its text and image features
        equal open_clip's ``encode_text`` / ``encode_image``.
    """
    from transformers import CLIPConfig, CLIPModel

    text_cfg, vision_cfg = model_cfg["text_cfg"], model_cfg["vision_cfg"]
    if "hf_model_name" in text_cfg or not isinstance(vision_cfg.get("layers"), int) or vision_cfg.get("timm_model_name"):
        raise ValueError("Only OpenCLIP models with a standard ViT vision tower and transformer text tower can be converted.")
    # OpenAI weights use QuickGELU even when the architecture config does not say so (open_clip forces it for them)
    act = "quick_gelu" if model_cfg.get("quick_gelu") or _activation(oc_model.transformer.resblocks[0]) == "quick_gelu" else "gelu"
    tw, vw = text_cfg["width"], vision_cfg["width"]
    image_size = vision_cfg["image_size"] if isinstance(vision_cfg["image_size"], int) else vision_cfg["image_size"][0]
    config = CLIPConfig(
        text_config=dict(
            vocab_size=text_cfg["vocab_size"], hidden_size=tw, intermediate_size=int(tw * text_cfg.get("mlp_ratio", 4.0)),
            num_hidden_layers=text_cfg["layers"], num_attention_heads=text_cfg["heads"],
            max_position_embeddings=text_cfg["context_length"], hidden_act=act, layer_norm_eps=1e-5,
            projection_dim=model_cfg["embed_dim"], bos_token_id=_BOS, eos_token_id=_EOS, pad_token_id=_PAD,
        ),
        vision_config=dict(
            hidden_size=vw, intermediate_size=int(vw * vision_cfg.get("mlp_ratio", 4.0)), num_hidden_layers=vision_cfg["layers"],
            num_attention_heads=vw // vision_cfg.get("head_width", 64), image_size=image_size,
            patch_size=vision_cfg["patch_size"], hidden_act=act, layer_norm_eps=1e-5, projection_dim=model_cfg["embed_dim"],
        ),
        projection_dim=model_cfg["embed_dim"],
    )  # fmt: skip
    sd = {k: v.detach().float() for k, v in oc_model.state_dict().items()}
    weights = _text_weights(sd, text_cfg["layers"], "text_model.")
    weights.update(_resblocks(sd, "visual.transformer", "vision_model.", vision_cfg["layers"]))
    weights.update({
        "text_projection.weight": _text_projection(sd),
        "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": sd["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": sd["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": sd["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": sd["visual.ln_post.bias"],
        "visual_projection.weight": sd["visual.proj"].t().contiguous(),
        "logit_scale": sd["logit_scale"].reshape(()),
    })  # fmt: skip
    model = CLIPModel(config)
    _load_checked(model, weights)
    visual = getattr(oc_model, "visual", None)
    mean = tuple(getattr(visual, "image_mean", None) or _DEFAULT_MEAN)
    std = tuple(getattr(visual, "image_std", None) or _DEFAULT_STD)
    return model.eval(), image_size, mean, std
