"""Evaluate a (SaFeR-)CLIP encoder: redirection, retrieval, geometry preservation, zero-shot accuracy.

::

    python -m finetune.evaluate --model exported/ --data pairs.jsonl --output results.json
    python -m finetune.evaluate --model outputs/run --data assets/sample_pairs.jsonl       # a training run / checkpoint
    python -m finetune.evaluate --model exported/ --model_name_or_path openai/clip-vit-large-patch14 \\
        --zero_shot_root imagenette/val --templates templates.txt

``--model`` is an export folder (read through :func:`safer_diffusion.encoders.load_safe_text_encoder`
and :func:`safer_diffusion.export_format.read_manifest`; docs/EXPORT_FORMAT.md), a training run folder or
``checkpoint-{step}`` folder (:func:`finetune.checkpoint.merged_clip_from_checkpoint`), a ``CLIPModel``
folder / hub id, ``open_clip:<arch>:<tag>`` or ``tiny``. ``--model_name_or_path`` is the frozen reference
T0/V0 (default: the base model recorded in the export / checkpoint; the old spelling ``--base`` still works).

The metrics (one JSON object on stdout, also written atomically to ``--output``) are defined in
:mod:`finetune.metrics`: ``text`` (caption-only redirection and preservation, model and frozen base),
``retrieval`` / ``retrieval_frozen`` (data with images), ``weights`` (drift of the text tower from the base)
and ``zero_shot`` (with ``--zero_shot_root``).

Exit status: 0 success, 2 bad input (checked before any model is loaded), 1 a runtime failure.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from safer_diffusion.encoders import load_safe_text_encoder
from safer_diffusion.export_format import CLIP_DIR, ExportManifest, is_export_folder, read_manifest
from safer_diffusion.fileio import atomic_write_text, check_output_file
from safer_diffusion.hub import resolve_model_source
from safer_diffusion.options import (
    MISSING,
    configure_logging,
    device_option,
    option,
    parse_config,
    resolve_device_and_dtype,
    run_main,
)

from .checkpoint import is_checkpoint_or_run, merged_clip_from_checkpoint, read_training_state, resolve_checkpoint
from .data import DATA_FORMATS, check_source, load_pairs, load_pixels
from .metrics import DEFAULT_TEMPLATES, list_image_folder, retrieval_metrics, text_metrics, weight_drift, zero_shot_accuracy
from .modeling import OPEN_CLIP_PREFIX, TINY_MODEL_NAME, LoadedCLIP, load_clip

logger = logging.getLogger(__name__)

__all__ = ["EvaluateConfig", "evaluate", "load_eval_model", "main", "parse_evaluate_config"]

PROG = "python -m finetune.evaluate"


@dataclass
class EvaluateConfig:
    """Options of ``python -m finetune.evaluate``."""

    model: str = option(MISSING, "Export folder, run/checkpoint folder, CLIP folder/hub id, open_clip:<arch>:<tag> or tiny.")
    model_name_or_path: str | None = option(
        None, "Frozen reference CLIP T0/V0 (default: the base model recorded in the export/checkpoint).", deprecated=("--base",)
    )
    data: str | None = option(None, "Pairs file (.csv/.jsonl/.json/.parquet) or hub id for text/retrieval metrics.")
    data_format: str = option("auto", "Column layout of `--data`.", choices=DATA_FORMATS)
    image_root: str | None = option(None, "Folder that relative image paths are resolved against.")
    zero_shot_root: str | None = option(None, "Image folder dataset (root/<class>/<image>) for zero-shot accuracy.")
    class_names: list[str] = option(
        [], "Class names in folder order (default: the folder names), or one JSON file holding the list.", legacy_commas=True
    )
    templates: str | None = option(None, "Text file, one prompt template with '{}' per line (default: 5 CLIP templates).")
    k: int = option(10, "Neighbours for the kNN-overlap preservation metric.", bounds=(1, None))
    batch_size: int = option(256, "Encoding batch size.", bounds=(1, None))
    device: str = device_option()
    output: str | None = option(None, "Also write the JSON to this file (atomically).")
    verbose: bool = option(False, "INFO logging.")

    def validate(self) -> EvaluateConfig:
        if not self.data and not self.zero_shot_root:
            raise ValueError("Nothing to evaluate: pass `--data` (pairs) and/or `--zero_shot_root` (image folder).")
        if not self.model.strip():
            raise ValueError("`--model` is empty; pass a model folder, hub id, `tiny` or `open_clip:<arch>:<tag>`.")
        return self


@dataclass
class _Plan:
    """What :func:`check_inputs` resolved: the device, the reference model, class names and templates."""

    device: str
    base: str
    class_names: list[str] | None
    templates: tuple[str, ...]


def parse_evaluate_config(argv: Sequence[str] | None = None) -> EvaluateConfig:
    """Parse ``python -m finetune.evaluate``'s arguments into a validated :class:`EvaluateConfig`."""
    return parse_config(EvaluateConfig, argv, prog=PROG, description=__doc__.split("\n")[0])


# --------------------------------------------------------------------------- input checks
def _check_model_source(name: str, argument: str) -> None:
    if name == TINY_MODEL_NAME or name.startswith(OPEN_CLIP_PREFIX):
        return
    resolve_model_source(name, argument=argument)  # a local path, or a hub id reachable (or cached) now


def _recorded_base(model: str) -> str | None:
    """The base model an export or a checkpoint records (validating the manifest / training state), else None."""
    path = Path(model).expanduser()
    if is_export_folder(path):
        return read_manifest(path, argument="--model").base_model
    if is_checkpoint_or_run(path):
        return read_training_state(resolve_checkpoint(path, "--model"))["config"]["model_name_or_path"]
    _check_model_source(model, "--model")
    return None


def _read_templates(path: str | None) -> tuple[str, ...]:
    if path is None:
        return DEFAULT_TEMPLATES
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"`--templates` {path!r} does not exist; pass a text file with one template ('{{}}' = class) per line.")
    templates = tuple(line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip())
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"`--templates` {path!r}: every line must contain '{{}}' (the class name), got {list(templates)!r}.")
    return templates


def _read_class_names(names: list[str]) -> list[str] | None:
    if not names:
        return None
    if len(names) == 1 and names[0].endswith(".json"):
        p = Path(names[0]).expanduser()
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"`--class_names` {names[0]!r} does not exist; pass the names, or a JSON list file.") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"`--class_names` {names[0]!r} is not valid JSON ({e.msg}); it must hold a list of names.") from None
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise ValueError(f"`--class_names` {names[0]!r} must hold a JSON list of strings.")
        return data
    return list(names)


def check_inputs(config: EvaluateConfig) -> _Plan:
    """Every check that needs no model: device, model and reference sources, data, image folders, templates, output.

    Raises:
        ValueError / FileNotFoundError / BadInputError / HubUnavailableError: naming the option (exit status 2).
    """
    device, _ = resolve_device_and_dtype(config.device, "float32")
    recorded = _recorded_base(config.model)
    base = config.model_name_or_path or recorded
    if base is None:
        raise ValueError(
            f"`--model_name_or_path` is required: `--model` {config.model!r} records no base model (pass the frozen CLIP it "
            "was trained from, e.g. openai/clip-vit-large-patch14)."
        )
    _check_model_source(base, "--model_name_or_path")
    if config.data:
        check_source(config.data, "--data")
    for name in ("image_root", "zero_shot_root"):
        value = getattr(config, name)
        if value is not None and not Path(value).expanduser().is_dir():
            raise FileNotFoundError(f"`--{name}` {value!r} is not an existing folder.")
    names = _read_class_names(config.class_names)
    templates = _read_templates(config.templates)
    if config.zero_shot_root:
        folders, _ = list_image_folder(Path(config.zero_shot_root).expanduser())
        if names is not None and len(names) != len(folders):
            raise ValueError(f"`--class_names` has {len(names)} names but `--zero_shot_root` has {len(folders)} class folders {folders}.")
    if config.output is not None:
        check_output_file(config.output, "--output")
    return _Plan(device, base, names, templates)


# --------------------------------------------------------------------------- loading
def _load_export(folder: Path, manifest: ExportManifest, base: LoadedCLIP) -> LoadedCLIP:
    """The export's encoder inside the base model's architecture: the text tower (and projection) through the library's
    reader, the base's vision tower, or, when the run trained it, the vision tower of ``clip/``."""
    clip = base.model
    full_layers = clip.config.text_config.num_hidden_layers
    source = folder
    if manifest.text_encoder_num_layers != full_layers:  # text_encoder/ was truncated (SD 2.x): the full tower is in clip/
        if not (folder / CLIP_DIR).is_dir():
            raise ValueError(
                f"`--model` {os.fspath(folder)!r} keeps {manifest.text_encoder_num_layers} of {full_layers} text layers and has no "
                f"{CLIP_DIR}/ (exported with --no_save_full_clip): CLIP metrics need the full tower; evaluate the checkpoint instead."
            )
        source = folder / CLIP_DIR
    text = load_safe_text_encoder(source, with_projection=True, argument="--model")
    clip.text_model.load_state_dict(text.text_model.state_dict())
    clip.text_projection.load_state_dict(text.text_projection.state_dict())
    if manifest.train_towers in ("vision", "both"):
        if not (folder / CLIP_DIR).is_dir():
            raise ValueError(f"`--model` {os.fspath(folder)!r} trained the vision tower but has no {CLIP_DIR}/ folder; re-export it "
                             "with --save_full_clip.")
        from transformers import CLIPModel

        vision = CLIPModel.from_pretrained(os.fspath(folder / CLIP_DIR), use_safetensors=True)
        clip.vision_model.load_state_dict(vision.vision_model.state_dict())
        clip.visual_projection.load_state_dict(vision.visual_projection.state_dict())
    return LoadedCLIP(clip.float().eval(), base.tokenizer, base.image_processor, os.fspath(folder))


def load_eval_model(model: str, attention: str = "sdpa") -> tuple[Any, Any, Any, str | None]:
    """Load what ``--model`` names as ``(CLIPModel fp32, tokenizer, image_processor, recorded base model or None)``.

    Args:
        model: an export folder (loaded into the architecture of the base model its manifest records), a run or
            checkpoint folder, a CLIP folder / hub id, ``open_clip:...`` or ``tiny``.
        attention: attention kernel.
    """
    path = Path(model).expanduser()
    if is_export_folder(path):
        manifest = read_manifest(path, argument="--model")
        loaded = _load_export(path, manifest, load_clip(manifest.base_model, attention))
        return loaded.model, loaded.tokenizer, loaded.image_processor, manifest.base_model
    if is_checkpoint_or_run(path):
        clip, tokenizer, processor, config, _ = merged_clip_from_checkpoint(path, attention, argument="--model")
        return clip, tokenizer, processor, config.model_name_or_path
    loaded = load_clip(model, attention)
    return loaded.model, loaded.tokenizer, loaded.image_processor, None


def _encoders(clip, tokenizer, processor, device, batch_size: int, image_root=None):
    clip.to(device).eval()

    @torch.no_grad()
    def encode_text(captions):
        out = []
        for i in range(0, len(captions), batch_size):
            enc = tokenizer(list(captions[i : i + batch_size]), padding=True, truncation=True, max_length=77, return_tensors="pt").to(device)
            out.append(F.normalize(clip.get_text_features(**enc).pooler_output.float(), dim=-1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def encode_images(paths):
        if processor is None:
            raise ValueError("This model has no image processor; image metrics need a CLIP folder with preprocessor_config.json.")
        out = []
        for i in range(0, len(paths), batch_size):
            px = load_pixels(paths[i : i + batch_size], processor, image_root).to(device)
            out.append(F.normalize(clip.get_image_features(pixel_values=px).pooler_output.float(), dim=-1).cpu())
        return torch.cat(out)

    return encode_text, encode_images


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Compute the metrics of :mod:`finetune.metrics` for ``config.model`` against its frozen reference.

    Returns:
        `dict`: ``model``, ``base``, ``weights``, and ``data`` / ``text`` / ``retrieval`` / ``retrieval_frozen`` (with
        ``--data``), ``zero_shot`` (with ``--zero_shot_root``). Written to ``config.output`` when set.
    """
    plan = check_inputs(config)
    clip, tokenizer, processor, _ = load_eval_model(config.model)
    base = load_clip(plan.base)
    enc_t, enc_i = _encoders(clip, tokenizer, processor, plan.device, config.batch_size, config.image_root)
    base_t, base_i = _encoders(base.model, base.tokenizer, base.image_processor, plan.device, config.batch_size, config.image_root)
    results: dict[str, Any] = {"model": config.model, "base": plan.base}
    results["weights"] = weight_drift(clip.state_dict(), base.model.state_dict())
    if config.data:
        data = load_pairs(config.data, format=config.data_format, image_root=config.image_root)
        results["data"] = {"source": config.data, "n_pairs": len(data)}
        results["text"] = text_metrics(enc_t, base_t, data.safe_captions, data.unsafe_captions, k=config.k)
        if data.has_images and all(r.safe_image for r in data):
            results["retrieval"] = retrieval_metrics(enc_t, enc_i, data)
            results["retrieval_frozen"] = retrieval_metrics(base_t, base_i, data)
    if config.zero_shot_root:
        results["zero_shot"] = {
            "model": zero_shot_accuracy(enc_t, enc_i, config.zero_shot_root, plan.class_names, plan.templates),
            "base": zero_shot_accuracy(base_t, base_i, config.zero_shot_root, plan.class_names, plan.templates),
        }
    if config.output:
        out = Path(config.output).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(results, indent=2))
    logger.info("Evaluated %s against %s.", config.model, plan.base)
    return results


def _main(argv: Sequence[str] | None) -> None:
    config = parse_evaluate_config(argv)
    configure_logging(config.verbose)
    print(json.dumps(evaluate(config)))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m finetune.evaluate``: 0 success (the results as one JSON line on stdout), 2 bad input, 1 a runtime failure."""
    return run_main(lambda: _main(argv), prog=PROG)


if __name__ == "__main__":
    raise SystemExit(main())
