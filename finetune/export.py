"""Export a training checkpoint as an encoder folder that Stable Diffusion pipelines load.

::

    python -m finetune.export --checkpoint outputs/run --output_dir exported/safer-clip     # newest checkpoint of a run
    python -m finetune.export --checkpoint outputs/run/checkpoint-1500 --output_dir exported/x --dtype fp16
    # SD 2.x (OpenCLIP ViT-H): the UNet reads the penultimate layer, so keep 23 of the 24 text layers
    python -m finetune.export --checkpoint outputs/vit-h --output_dir exported/vit-h --text_encoder_num_layers 23

The LoRA adapters are merged into the fp32 base weights (reloaded from the original source, not the
low-precision copy used in training). Folder layout (CONTRACTS.md)::

    text_encoder/{config.json, model.safetensors}   CLIPTextModel
    tokenizer/                                      CLIPTokenizer
    clip/{config.json, model.safetensors}           full CLIPModel (unless --no-save_full_clip)
    text_projection.safetensors                     {"weight": (projection_dim, hidden)}
    safer_clip.json                                 format, base model, loss, config, metrics
    README.md                                       model card

Load it with ``CLIPTextModel.from_pretrained(folder + "/text_encoder")`` or
``SaferStableDiffusionPipeline.from_pretrained(base, safe_text_encoder=folder)``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["EXPORT_FORMAT", "EXPORT_FORMAT_VERSION", "export", "main", "merged_clip_from_checkpoint", "resolve_checkpoint"]

EXPORT_FORMAT = "safer-clip-encoder"
EXPORT_FORMAT_VERSION = 1
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A ``checkpoint-{step}`` folder, or a run folder (-> its newest complete checkpoint)."""
    from .train import CHECKPOINT_STATE, latest_checkpoint

    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"`--checkpoint` {os.fspath(path)!r} does not exist; pass a run folder or a checkpoint-{{step}} folder.")
    if (p / CHECKPOINT_STATE).is_file():
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise ValueError(f"`--checkpoint` {os.fspath(path)!r} holds no complete checkpoint-{{step}} folder (with {CHECKPOINT_STATE}).")
    return latest


def merged_clip_from_checkpoint(path: str | os.PathLike, attention: str = "sdpa"):
    """Rebuild the trained CLIP from a checkpoint: fp32 base + trained weights, LoRA merged.

    Returns:
        ``(clip_model, tokenizer, image_processor, config, training_state)``.
    """
    from safetensors.torch import load_file

    from .config import TrainConfig
    from .modeling import SaferCLIP, load_clip
    from .train import CHECKPOINT_STATE, TRAINABLE_WEIGHTS

    ckpt = resolve_checkpoint(path)
    state = json.loads((ckpt / CHECKPOINT_STATE).read_text())
    config = TrainConfig.from_dict(state["config"], source=str(ckpt / CHECKPOINT_STATE))
    loaded = load_clip(config.model_name_or_path, attention=attention if attention != "xformers" else "sdpa")
    wrapper = SaferCLIP(
        loaded.model, train_towers=config.train_towers, finetune=config.finetune, lora_rank=config.lora_rank,
        lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, lora_target_modules=config.lora_target_modules,
    )
    weights = load_file(str(ckpt / TRAINABLE_WEIGHTS))
    expected = set(wrapper.trainable_state_dict())
    if set(weights) != expected:
        raise ValueError(f"{ckpt / TRAINABLE_WEIGHTS} does not match the model rebuilt from its config "
                         f"({len(expected - set(weights))} missing, {len(set(weights) - expected)} unexpected weights).")
    wrapper.clip.load_state_dict(weights, strict=False)
    clip = wrapper.merged_clip()
    clip.requires_grad_(False)
    return clip, loaded.tokenizer, loaded.image_processor, config, state


def _text_encoder(clip, num_layers: int | None):
    from transformers import CLIPTextModel

    text_config = clip.config.text_config.__class__.from_dict(clip.config.text_config.to_dict())
    total = text_config.num_hidden_layers
    if num_layers is not None:
        if not 1 <= num_layers <= total:
            raise ValueError(f"`--text_encoder_num_layers` must be in [1, {total}], got {num_layers}.")
        text_config.num_hidden_layers = num_layers
    text_config._attn_implementation = "sdpa"
    model = CLIPTextModel(text_config)
    state = {k: v for k, v in clip.text_model.state_dict().items() if not k.startswith("encoder.layers.")
             or int(k.split(".")[2]) < text_config.num_hidden_layers}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"Text encoder export mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}.")
    return model.eval()


def _model_card(meta: dict[str, Any]) -> str:
    cfg = meta["config"]
    metrics = meta.get("metrics") or {}
    lines = [
        "---", "library_name: transformers", "tags: [clip, safety, stable-diffusion, safer-clip]", f"base_model: {meta['base_model']}", "---", "",
        f"# {'SaFeR-CLIP' if meta['loss'] == 'safer_clip' else 'Safe-CLIP (baseline)'} text encoder",
        "",
        f"Safety fine-tuned from `{meta['base_model']}` with the `{meta['loss']}` loss "
        f"({meta['finetune']}, towers: {meta['train_towers']}) for {meta.get('global_step', '?')} steps. "
        "Unsafe prompts are redirected toward safe content; safe prompts stay close to the original embedding.",
        "",
        "## Use with Stable Diffusion",
        "",
        "```python",
        "from safer_diffusion import SaferStableDiffusionPipeline",
        "pipe = SaferStableDiffusionPipeline.from_pretrained(BASE_SD_MODEL, safe_text_encoder=THIS_FOLDER)",
        "# or: transformers.CLIPTextModel.from_pretrained(THIS_FOLDER + '/text_encoder')",
        "```",
        "",
        "## Training configuration",
        "",
        "| option | value |", "|---|---|",
    ]
    for key in ("model_name_or_path", "train_data", "loss", "relative_scale", "curriculum", "finetune", "lora_rank", "lora_alpha",
                "learning_rate", "train_batch_size", "num_train_epochs", "max_train_steps", "mixed_precision", "seed"):
        lines.append(f"| `{key}` | `{cfg.get(key)}` |")
    lines += ["", "## Evaluation", ""]
    splits = {k: v for k, v in metrics.items() if isinstance(v, dict) and "frozen" in v}
    if not splits and "frozen" in metrics:
        splits = {"eval": metrics}
    if splits:
        for split, values in splits.items():
            what = {"train": "training pairs (redirection of what was trained)", "val": "held-out pairs"}.get(split, split)
            lines += [f"### {what}", "", "| metric | model | frozen base |", "|---|---|---|"]
            frozen = values.get("frozen", {})
            for key, value in values.items():
                if isinstance(value, float) and key in frozen:
                    lines.append(f"| {key} | {value:.4f} | {frozen[key]:.4f} |")
            lines.append("")
        lines.append("Metric definitions: the module docstring of `finetune/evaluate.py` (`python -m finetune.evaluate --help`).")
    if not splits:
        lines.append("No evaluation figures were recorded for this export.")
    lines += ["", "Method: SafeR-CLIP (Yousaf et al., AAAI 2026, arXiv:2511.16743).", ""]
    return "\n".join(lines)


def export(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    dtype: str = "fp32",
    save_full_clip: bool = True,
    text_encoder_num_layers: int | None = None,
    metrics: dict[str, Any] | str | os.PathLike | None = None,
) -> Path:
    """Write the export folder (see the module docstring) atomically: built in a temp folder, then renamed.

    Args:
        checkpoint: run folder or ``checkpoint-{step}`` folder.
        output_dir: destination; must not exist or be empty.
        dtype: ``"fp32"``, ``"fp16"`` or ``"bf16"`` for the saved weights.
        save_full_clip: also save the full ``CLIPModel`` under ``clip/``.
        text_encoder_num_layers: keep only the first N text layers in ``text_encoder/`` (SD 2.x: 23 of 24).
        metrics: metrics dict or JSON file for the card (default: the run's ``metrics.json`` if present).

    Returns:
        The export folder.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"`--dtype` must be one of {list(_DTYPES)}, got {dtype!r}.")
    out = Path(output_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"`--output_dir` {os.fspath(output_dir)!r} exists and is not empty; choose a new folder or delete it.")
    ckpt = resolve_checkpoint(checkpoint)
    clip, tokenizer, _, config, state = merged_clip_from_checkpoint(ckpt)
    if metrics is None and (ckpt.parent / "metrics.json").is_file():
        metrics = ckpt.parent / "metrics.json"
    if metrics is not None and not isinstance(metrics, dict):
        metrics = json.loads(Path(metrics).read_text())
    torch_dtype = _DTYPES[dtype]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        text_encoder = _text_encoder(clip, text_encoder_num_layers).to(torch_dtype)
        text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "tokenizer")
        if save_full_clip:
            clip.to(torch_dtype).save_pretrained(tmp / "clip", safe_serialization=True)
            clip.float()
        from safetensors.torch import save_file

        save_file({"weight": clip.text_projection.weight.detach().to(torch_dtype).contiguous()}, str(tmp / "text_projection.safetensors"))
        meta = {
            "format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION, "base_model": config.model_name_or_path,
            "loss": config.loss, "train_towers": config.train_towers, "finetune": config.finetune,
            "global_step": state["global_step"], "checkpoint": str(ckpt), "dtype": dtype,
            "text_encoder_num_layers": text_encoder_num_layers or clip.config.text_config.num_hidden_layers,
            "config": config.to_dict(), "metrics": metrics or {},
        }
        (tmp / "safer_clip.json").write_text(json.dumps(meta, indent=2))
        (tmp / "README.md").write_text(_model_card(meta))
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Exported %s (step %s) to %s", ckpt, state["global_step"], out)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m finetune.export", description="Export a SaFeR-CLIP checkpoint as an encoder folder.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="Run folder (newest checkpoint) or checkpoint-{step} folder.")
    p.add_argument("--output_dir", required=True, help="Export folder (must not exist or be empty).")
    p.add_argument("--dtype", default="fp32", choices=tuple(_DTYPES), help="Dtype of the saved weights.")
    p.add_argument("--save_full_clip", default=True, action=argparse.BooleanOptionalAction, help="Also save the full CLIPModel in clip/.")
    p.add_argument("--text_encoder_num_layers", type=int, default=None,
                   help="Keep the first N text layers in text_encoder/ (SD 2.x with OpenCLIP ViT-H: 23).")
    p.add_argument("--metrics", default=None, help="JSON file of evaluation figures for the card (default: the run's metrics.json).")
    return p


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    out = export(args.checkpoint, args.output_dir, dtype=args.dtype, save_full_clip=args.save_full_clip,
                 text_encoder_num_layers=args.text_encoder_num_layers, metrics=args.metrics)
    print(out)
    return out


if __name__ == "__main__":
    main()
