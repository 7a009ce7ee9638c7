"""Export a training checkpoint as an encoder folder that Stable Diffusion pipelines load.

::

    python -m finetune.export --checkpoint outputs/run --output_dir exported/safer-clip     # newest checkpoint of a run
    python -m finetune.export --checkpoint outputs/run/checkpoint-1500 --output_dir exported/x --dtype float16
    # SD 2.x (OpenCLIP ViT-H): the UNet reads the penultimate layer, so keep 23 of the 24 text layers
    python -m finetune.export --checkpoint outputs/vit-h --output_dir exported/vit-h --text_encoder_num_layers 23
    # SDXL (a `--sdxl` run): both towers, full depth, in one two-encoder folder (docs/EXPORT_FORMAT.md section 8)
    python -m finetune.export --checkpoint outputs/sdxl --output_dir exported/sdxl-pair

The LoRA adapters are merged into the fp32 base weights (reloaded from the original source, not the
low-precision copy used in training; :func:`finetune.checkpoint.merged_clip_from_checkpoint`). The folder
layout, its names, version and manifest schema are owned by :mod:`safer_diffusion.export_format` and
documented in docs/EXPORT_FORMAT.md; ``--no_save_full_clip`` leaves out ``clip/``.

Load it with ``CLIPTextModel.from_pretrained(folder + "/" + TEXT_ENCODER_DIR)`` or
``SaferStableDiffusionPipeline.from_pretrained(base, safe_text_encoder=folder)``
(:func:`safer_diffusion.encoders.load_safe_text_encoder` is the folder's reader). An SDXL run's folder
(``text_encoder/`` a ``CLIPTextModel``, ``text_encoder_2/`` a ``CLIPTextModelWithProjection``, ``tokenizer/``,
``tokenizer_2/``) loads with ``SaferStableDiffusionXLPipeline.from_pretrained(sdxl_base, safe_text_encoder=folder)``.

Exit status of ``python -m finetune.export``: 0 success (the folder's path on stdout), 2 bad input, 1 a runtime failure.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safer_diffusion.export_format import (
    CLIP_DIR,
    SDXL_TEXT_ENCODERS,
    TEXT_ENCODER_2_DIR,
    TEXT_ENCODER_DIR,
    TOKENIZER_2_DIR,
    TOKENIZER_DIR,
    ExportManifest,
    write_export_files,
)
from safer_diffusion.fileio import check_writable_dir, fsync_dir
from safer_diffusion.options import DEPRECATED_DTYPES, DTYPE_CHOICES, MISSING, configure_logging, option, parse_config, run_main

from .checkpoint import merged_clip_from_checkpoint, resolve_checkpoint
from .config import TrainConfig

logger = logging.getLogger(__name__)

__all__ = ["EXPORT_DTYPES", "ExportConfig", "export", "main", "parse_export_config"]

PROG = "python -m finetune.export"
#: Dtypes an export can be written in (torch names; "auto" has no meaning for a file on disk).
EXPORT_DTYPES = tuple(d for d in DTYPE_CHOICES if d != "auto")


@dataclass
class ExportConfig:
    """Options of ``python -m finetune.export``."""

    checkpoint: str = option(MISSING, "Run folder (its newest complete checkpoint) or a checkpoint-{step} folder.")
    output_dir: str = option(MISSING, "Export folder to create (must not exist, or be empty).")
    dtype: str = option("float32", "Dtype of the saved weights.", choices=EXPORT_DTYPES, value_aliases=DEPRECATED_DTYPES)
    save_full_clip: bool = option(True, "Also save the full CLIPModel in clip/ (image metrics, with_projection loading). An "
                                  "SDXL run's two-encoder folder has no clip/ (its towers may be text-only).",
                                  deprecated=("--no-save_full_clip",))  # fmt: skip
    text_encoder_num_layers: int | None = option(
        None, "Keep the first N text layers in text_encoder/ (SD 2.x with OpenCLIP ViT-H: 23 of 24). Not for an SDXL run: "
        "SDXL reads hidden_states[-2] of the full towers.", bounds=(1, None)
    )
    metrics: str | None = option(None, "JSON file of evaluation figures for the model card (default: the run's metrics.json).")
    verbose: bool = option(False, "INFO logging.")

    def validate(self) -> ExportConfig:
        for name in ("checkpoint", "output_dir"):
            if not str(getattr(self, name)).strip():
                raise ValueError(f"`--{name}` is empty; pass a folder.")
        return self


def _text_config(clip):
    """A copy of the text tower's config of a ``CLIPModel`` or a text-only ``CLIPTextModelWithProjection``."""
    config = getattr(clip.config, "text_config", clip.config)
    return config.__class__.from_dict(config.to_dict())


def _text_encoder(clip, num_layers: int | None):
    from transformers import CLIPTextModel

    text_config = _text_config(clip)
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


def _text_encoder_with_projection(clip):
    """The full-depth ``CLIPTextModelWithProjection`` of a trained tower (SDXL's ``text_encoder_2``), projection included."""
    from transformers import CLIPTextModelWithProjection

    text_config = _text_config(clip)
    text_config.projection_dim = int(clip.config.projection_dim)
    text_config._attn_implementation = "sdpa"
    model = CLIPTextModelWithProjection(text_config)
    model.text_model.load_state_dict(clip.text_model.state_dict())
    model.text_projection.load_state_dict(clip.text_projection.state_dict())
    return model.eval()


def sdxl_run_config(path: str | os.PathLike) -> TrainConfig | None:
    """The resolved top config of an ``--sdxl`` run folder (``config.yaml`` with ``sdxl: true``), else None."""
    import yaml

    file = Path(path).expanduser() / "config.yaml"
    if not file.is_file():
        return None
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return None
    if not isinstance(data, dict) or not data.get("sdxl"):
        return None
    return TrainConfig.from_dict(data, source=os.fspath(file))


def _metric_lines(metrics: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    splits = {k: v for k, v in metrics.items() if isinstance(v, dict) and "frozen" in v}
    if not splits and "frozen" in metrics:
        splits = {"eval": metrics}
    for split, values in splits.items():
        what = {"train": "training pairs (redirection of what was trained)", "val": "held-out pairs"}.get(split, split)
        lines += [f"### {what}", "", "| metric | model | frozen base |", "|---|---|---|"]
        frozen = values.get("frozen", {})
        for key, value in values.items():
            if isinstance(value, float) and key in frozen:
                lines.append(f"| {key} | {value:.4f} | {frozen[key]:.4f} |")
        lines.append("")
    return lines


def _sdxl_model_card(meta: dict[str, Any]) -> str:
    """The model card of a two-encoder (SDXL) export."""
    cfg = meta["config"]
    bases = meta.get("base_models", {})
    lines = [
        "---", "library_name: transformers", "tags: [clip, safety, stable-diffusion-xl, safer-clip]",
        f"base_model: [{', '.join(bases.get(t, '?') for t in SDXL_TEXT_ENCODERS)}]", "---", "",
        f"# {'SaFeR-CLIP' if meta['loss'] == 'safer_clip' else 'Safe-CLIP (baseline)'} text encoders for Stable Diffusion XL", "",
        f"Both SDXL text encoders, safety fine-tuned with the `{meta['loss']}` loss ({meta['finetune']}): `{TEXT_ENCODER_DIR}/` "
        f"from `{bases.get(TEXT_ENCODER_DIR)}` ({meta.get('global_steps', {}).get(TEXT_ENCODER_DIR, '?')} steps) and "
        f"`{TEXT_ENCODER_2_DIR}/` from `{bases.get(TEXT_ENCODER_2_DIR)}` ({meta.get('global_steps', {}).get(TEXT_ENCODER_2_DIR, '?')} "
        f"steps), each with its own anchors and nearest-safe targets; token terms at the `{cfg.get('token_layer')}` layer "
        "(SDXL's UNet reads hidden_states[-2]).", "",
        "## Use with Stable Diffusion XL", "", "```python",
        "from safer_diffusion.pipeline_safer_stable_diffusion_xl import SaferStableDiffusionXLPipeline",
        "pipe = SaferStableDiffusionXLPipeline.from_pretrained(SDXL_BASE, safe_text_encoder=THIS_FOLDER)",
        f"# or: transformers.CLIPTextModel.from_pretrained(THIS_FOLDER + '/{TEXT_ENCODER_DIR}') and",
        f"#     transformers.CLIPTextModelWithProjection.from_pretrained(THIS_FOLDER + '/{TEXT_ENCODER_2_DIR}')",
        "```", "", "## Training configuration", "", "| option | value |", "|---|---|",
    ]
    for key in ("model_name_or_path", "model_name_or_path_2", "base", "train_data", "loss", "relative_scale", "curriculum",
                "token_layer", "token_weight", "token_redir_weight", "finetune", "lora_rank", "lora_alpha", "learning_rate",
                "train_batch_size", "num_train_epochs", "max_train_steps", "mixed_precision", "seed"):
        lines.append(f"| `{key}` | `{cfg.get(key)}` |")
    lines += ["", "## Evaluation", ""]
    metrics = meta.get("metrics") or {}
    written = False
    for tower in SDXL_TEXT_ENCODERS:
        tables = _metric_lines(metrics.get(tower) or {})
        if tables:
            lines += [f"## {tower}", "", *tables]
            written = True
    lines.append("Metric definitions: the module docstring of `finetune/metrics.py`; the method: docs/METHOD.md." if written
                 else "No evaluation figures were recorded for this export.")
    lines += ["", "Method: SafeR-CLIP (Yousaf et al., AAAI 2026, arXiv:2511.16743).", ""]
    return "\n".join(lines)


def _model_card(meta: dict[str, Any]) -> str:
    """The export's README.md (model card) from the manifest's dict."""
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
        f"# or: transformers.CLIPTextModel.from_pretrained(THIS_FOLDER + '/{TEXT_ENCODER_DIR}')",
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
    tables = _metric_lines(metrics)
    lines += tables
    lines.append("Metric definitions: the module docstring of `finetune/metrics.py`; the method: docs/METHOD.md." if tables
                 else "No evaluation figures were recorded for this export.")
    lines += ["", "Method: SafeR-CLIP (Yousaf et al., AAAI 2026, arXiv:2511.16743).", ""]
    return "\n".join(lines)


def _read_metrics(metrics: dict[str, Any] | str | os.PathLike | None) -> dict[str, Any] | None:
    if metrics is None or isinstance(metrics, dict):
        return metrics
    path = Path(metrics).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"`--metrics` {os.fspath(metrics)!r} does not exist; pass a JSON file of evaluation figures.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"`--metrics` {os.fspath(metrics)!r} is not valid JSON ({e}); pass the output of finetune.evaluate.") from None
    if not isinstance(data, dict):
        raise ValueError(f"`--metrics` {os.fspath(metrics)!r} must hold a JSON object, got {type(data).__name__}.")
    return data


def _remove_stale_exports(out: Path) -> None:
    """Remove temp folders left beside ``out`` by an interrupted export of the same name."""
    if not out.parent.is_dir():
        return
    for stale in out.parent.glob(f".{out.name}.export-*"):
        shutil.rmtree(stale, ignore_errors=True)
        logger.warning("Removed %s, left by an interrupted earlier export.", stale)


def export(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    dtype: str = "float32",
    save_full_clip: bool = True,
    text_encoder_num_layers: int | None = None,
    metrics: dict[str, Any] | str | os.PathLike | None = None,
) -> Path:
    """Write the export folder (docs/EXPORT_FORMAT.md) atomically: built in a temp folder beside it, then renamed.

    An ``--sdxl`` run folder (its ``config.yaml`` says ``sdxl: true``) gives the two-encoder layout (section 8) from
    the newest checkpoint of each tower; ``save_full_clip`` then has no effect and ``text_encoder_num_layers`` is refused.

    Args:
        checkpoint: run folder or ``checkpoint-{step}`` folder (or an ``--sdxl`` run folder).
        output_dir: destination; must not exist or be empty.
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` for the saved weights (the old ``fp32``/``fp16``/``bf16``
            still work, with a deprecation warning).
        save_full_clip: also save the full ``CLIPModel`` under ``clip/``.
        text_encoder_num_layers: keep only the first N text layers in ``text_encoder/`` (SD 2.x: 23 of 24).
        metrics: metrics dict or JSON file for the card (default: the run's ``metrics.json`` if present).

    Returns:
        The export folder.

    Raises:
        ValueError / FileNotFoundError: a bad argument (checked before the model is loaded, except the layer count,
            checked against the model before anything is written).
    """
    if dtype in DEPRECATED_DTYPES:
        logger.warning("`--dtype %s` is deprecated; use `--dtype %s`.", dtype, DEPRECATED_DTYPES[dtype])
        dtype = DEPRECATED_DTYPES[dtype]
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"`--dtype` must be one of {list(EXPORT_DTYPES)}, got {dtype!r}.")
    if text_encoder_num_layers is not None and (isinstance(text_encoder_num_layers, bool) or text_encoder_num_layers < 1):
        raise ValueError(f"`--text_encoder_num_layers` must be a whole number >= 1, got {text_encoder_num_layers!r}.")
    out = Path(output_dir).expanduser()
    check_writable_dir(out, "--output_dir", require_empty=True)
    sdxl = sdxl_run_config(checkpoint)
    if sdxl is not None:
        if text_encoder_num_layers is not None:
            raise ValueError(f"`--text_encoder_num_layers` {text_encoder_num_layers} does not apply to the SDXL run "
                             f"{os.fspath(checkpoint)!r}: SDXL reads hidden_states[-2] of both full towers; drop the option.")
        return _export_sdxl(Path(checkpoint).expanduser(), sdxl, out, dtype, metrics)
    ckpt = resolve_checkpoint(checkpoint)
    if metrics is None and (ckpt.parent / "metrics.json").is_file():
        metrics = ckpt.parent / "metrics.json"
    metrics = _read_metrics(metrics)
    _remove_stale_exports(out)

    clip, tokenizer, _, config, state = merged_clip_from_checkpoint(ckpt)
    torch_dtype = getattr(torch, dtype)
    text_encoder = _text_encoder(clip, text_encoder_num_layers).to(torch_dtype)
    manifest = ExportManifest(
        base_model=config.model_name_or_path, loss=config.loss, global_step=int(state["global_step"]), dtype=dtype,
        text_encoder_num_layers=text_encoder_num_layers or _text_config(clip).num_hidden_layers,
        train_towers=config.train_towers, finetune=config.finetune, checkpoint=os.fspath(ckpt), config=config.to_dict(),
        metrics=metrics or {},
    )
    with _published_folder(out) as tmp:
        if save_full_clip and not hasattr(clip, "vision_model"):
            logger.info("%s is a text tower alone: no full CLIPModel to save in %s/.", config.model_name_or_path, CLIP_DIR)
        elif save_full_clip:
            clip.to(torch_dtype).save_pretrained(tmp / CLIP_DIR, safe_serialization=True)
            clip.float()
        write_export_files(tmp, text_encoders={TEXT_ENCODER_DIR: text_encoder}, tokenizers={TOKENIZER_DIR: tokenizer},
                           text_projection=clip.text_projection.weight.to(torch_dtype), model_card=_model_card(manifest.to_dict()),
                           manifest=manifest)  # fmt: skip
    logger.info("Exported %s (step %s) to %s", ckpt, state["global_step"], out)
    return out


@contextlib.contextmanager
def _published_folder(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` that replaces ``out`` (absent or empty, checked before) when the block ends
    without an error, and is removed when it raises: an export folder is there whole or not at all."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        yield tmp
        fsync_dir(tmp)
        if out.exists():
            out.rmdir()  # empty (checked before any work)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _export_sdxl(run: Path, config: TrainConfig, out: Path, dtype: str, metrics: dict[str, Any] | str | os.PathLike | None) -> Path:
    """The two-encoder export (docs/EXPORT_FORMAT.md section 8) of an ``--sdxl`` run folder, written atomically."""
    ckpts = {}
    for tower in SDXL_TEXT_ENCODERS:
        if not (run / tower).is_dir():
            raise ValueError(f"`--checkpoint` {os.fspath(run)!r} is an SDXL run without its {tower}/ run; resume the run with "
                             "`--resume_from_checkpoint latest` to train it.")
        try:
            ckpts[tower] = resolve_checkpoint(run / tower)
        except ValueError:
            raise ValueError(f"`--checkpoint` {os.fspath(run)!r}: the SDXL run's {tower} has no complete checkpoint yet; resume "
                             "the run with `--resume_from_checkpoint latest`.") from None
    if metrics is None and (run / "metrics.json").is_file():
        metrics = run / "metrics.json"
    metrics = _read_metrics(metrics)
    _remove_stale_exports(out)

    torch_dtype = getattr(torch, dtype)
    first, tok1, _, config1, state1 = merged_clip_from_checkpoint(ckpts[TEXT_ENCODER_DIR])
    second, tok2, _, config2, state2 = merged_clip_from_checkpoint(ckpts[TEXT_ENCODER_2_DIR])
    text_encoder = _text_encoder(first, None).to(torch_dtype)
    text_encoder_2 = _text_encoder_with_projection(second).to(torch_dtype)
    steps = {TEXT_ENCODER_DIR: int(state1["global_step"]), TEXT_ENCODER_2_DIR: int(state2["global_step"])}
    manifest = ExportManifest(
        base_model=config1.model_name_or_path, loss=config.loss, global_step=sum(steps.values()), dtype=dtype,
        text_encoder_num_layers=text_encoder.config.num_hidden_layers, train_towers=config.train_towers, finetune=config.finetune,
        checkpoint=os.fspath(run), config=config.to_dict(), metrics=metrics or {}, text_encoders=list(SDXL_TEXT_ENCODERS),
        base_models={TEXT_ENCODER_DIR: config1.model_name_or_path, TEXT_ENCODER_2_DIR: config2.model_name_or_path},
        global_steps=steps,
    )
    with _published_folder(out) as tmp:
        write_export_files(tmp, text_encoders={TEXT_ENCODER_DIR: text_encoder, TEXT_ENCODER_2_DIR: text_encoder_2},
                           tokenizers={TOKENIZER_DIR: tok1, TOKENIZER_2_DIR: tok2},
                           text_projection=first.text_projection.weight.to(torch_dtype),
                           model_card=_sdxl_model_card(manifest.to_dict()), manifest=manifest)  # fmt: skip
    logger.info("Exported the SDXL run %s (steps %s) to %s", run, steps, out)
    return out


def parse_export_config(argv: Sequence[str] | None = None) -> ExportConfig:
    """Parse ``python -m finetune.export``'s arguments into a validated :class:`ExportConfig`."""
    return parse_config(ExportConfig, argv, prog=PROG, description="Export a SaFeR-CLIP checkpoint as an encoder folder.")


def _main(argv: Sequence[str] | None) -> None:
    config = parse_export_config(argv)
    configure_logging(config.verbose)
    out = export(config.checkpoint, config.output_dir, dtype=config.dtype, save_full_clip=config.save_full_clip,
                 text_encoder_num_layers=config.text_encoder_num_layers, metrics=config.metrics)  # fmt: skip
    print(out)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m finetune.export``: 0 success (the export folder on stdout), 2 bad input, 1 a runtime failure."""
    return run_main(lambda: _main(argv), prog=PROG)


if __name__ == "__main__":
    raise SystemExit(main())
