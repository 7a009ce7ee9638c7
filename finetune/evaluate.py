"""Evaluate a (SaFeR-)CLIP encoder: redirection, retrieval, geometry preservation, zero-shot accuracy.

::

    python -m finetune.evaluate --model exported/ --data pairs.jsonl --output results.json
    python -m finetune.evaluate --model outputs/run --data assets/sample_pairs.jsonl       # a training run / checkpoint
    python -m finetune.evaluate --model exported/ --base openai/clip-vit-large-patch14 \\
        --zero_shot_root imagenette/val --templates templates.txt

``--model`` is an export folder (``safer_clip.json``), a training run folder or ``checkpoint-{step}``
folder, a ``CLIPModel`` folder / hub id, ``open_clip:<arch>:<tag>`` or ``tiny``. ``--base`` is the
frozen reference T0/V0 (default: the base model recorded in the export / checkpoint).

Metrics (JSON, one object on stdout; also written to ``--output``). Every "frozen" entry is the
same metric for the base model, i.e. the value at the start of fine-tuning (LoRA starts at the base):

* ``text``: caption-only metrics on the pairs (:func:`text_metrics`):
  ``t_star_to_t_r1`` (paper-style T*->T: an unsafe query retrieves its pair's safe caption among the
  frozen safe captions), ``redirect_to_target_r1`` / ``redirect_to_pair_r1`` (the gallery holds the
  frozen embeddings of all safe *and* unsafe captions; a hit is the nearest-safe target t̂ / the pair's
  safe caption; the base model scores ~0 because each unsafe caption retrieves itself), ``redirect_rate``
  (top-1 is any safe caption), ``safe_cos`` = mean cos(T(t), T0(t)), ``unsafe_cos`` = mean cos(T(t*), T0(t*)),
  ``knn_overlap@k`` (overlap of the k nearest safe captions by T and by T0).
* ``retrieval`` (when the data has images): R@1 T->V, V->T (utility) and T*->V, V*->T (redirection).
* ``weights``: L2 drift of the text tower from the base, absolute and relative.
* ``zero_shot`` (with ``--zero_shot_root``): top-1 accuracy on an image-folder dataset (one sub-folder per
  class) with prompt templates, for the model and the base.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from safer_diffusion.fileio import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TEMPLATES",
    "knn_overlap",
    "load_eval_model",
    "main",
    "recall_at_1",
    "retrieval_metrics",
    "text_metrics",
    "weight_drift",
    "zero_shot_accuracy",
]

DEFAULT_TEMPLATES = ("a photo of a {}.", "a blurry photo of a {}.", "a close-up photo of a {}.", "a photo of the large {}.", "art of the {}.")
_IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


# --------------------------------------------------------------------------- pure metrics
def recall_at_1(queries: torch.Tensor, gallery: torch.Tensor, targets: torch.Tensor, gallery_keys: Sequence[str] | None = None) -> float:
    """Fraction of queries whose most similar gallery row is their target.

    Args:
        queries (`Tensor (Q, D)`), gallery (`Tensor (G, D)`): L2-normalised embeddings.
        targets (`LongTensor (Q,)`): the gallery row each query should retrieve.
        gallery_keys (`list[str]`, *optional*): gallery strings; a retrieved row counts as a hit when its string
            equals the target's (duplicate captions are the same item).
    """
    if queries.shape[0] == 0:
        raise ValueError("`queries` is empty: recall needs at least one query.")
    top = (queries.float() @ gallery.float().T).argmax(dim=1).cpu()
    targets = targets.cpu()
    if gallery_keys is None:
        return float((top == targets).float().mean())
    return float(sum(gallery_keys[int(a)] == gallery_keys[int(b)] for a, b in zip(top, targets)) / len(targets))


def knn_overlap(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> float:
    """Mean overlap |kNN_a(i) ∩ kNN_b(i)| / k of the k nearest neighbours (self excluded) of each row under two embeddings."""
    n = a.shape[0]
    k = min(k, n - 1)
    if k < 1:
        raise ValueError(f"`knn_overlap` needs at least 2 rows, got {n}.")
    eye = torch.eye(n, dtype=torch.bool)

    def knn(x):
        sim = x.float() @ x.float().T
        return sim.masked_fill(eye, float("-inf")).topk(k, dim=1).indices

    ia, ib = knn(a.cpu()), knn(b.cpu())
    return float(sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(ia, ib)) / (n * k))


def text_metrics(
    encode: Callable[[list[str]], torch.Tensor],
    encode0: Callable[[list[str]], torch.Tensor],
    safe_captions: Sequence[str],
    unsafe_captions: Sequence[str],
    k: int = 10,
) -> dict[str, Any]:
    """Caption-only redirection and preservation metrics (see the module docstring), model and frozen base.

    Args:
        encode: trained text encoder, captions -> L2-normalised (N, D).
        encode0: frozen text encoder T0, same signature.
        safe_captions, unsafe_captions: aligned pairs (row i is a pair).
        k: neighbours for ``knn_overlap@k``.

    Returns:
        `dict` of metric -> value for the model, plus ``"frozen"``: the same metrics for T0.
    """
    from .targets import nearest_safe

    safe, unsafe = list(safe_captions), list(unsafe_captions)
    if len(safe) != len(unsafe) or len(safe) < 2:
        raise ValueError(f"`safe_captions` and `unsafe_captions` must be aligned pairs, at least 2; got {len(safe)} and {len(unsafe)}.")
    t, t_star = encode(safe).float().cpu(), encode(unsafe).float().cpu()
    t0, t0_star = encode0(safe).float().cpu(), encode0(unsafe).float().cpu()
    n = len(safe)
    hat, _ = nearest_safe(t0_star, t0, safe_keys=safe)
    pair = torch.arange(n)
    gallery = torch.cat([t0, t0_star])
    keys = safe + [f"\x00unsafe\x00{c}" for c in unsafe]  # an unsafe caption never equals a safe one

    def block(q_unsafe, q_safe):
        top = (q_unsafe @ gallery.T).argmax(dim=1)
        return {
            "t_star_to_t_r1": recall_at_1(q_unsafe, t0, pair, safe),
            "redirect_to_target_r1": recall_at_1(q_unsafe, gallery, hat, keys),
            "redirect_to_pair_r1": recall_at_1(q_unsafe, gallery, pair, keys),
            "redirect_rate": float((top < n).float().mean()),
            "safe_cos": float((q_safe * t0).sum(-1).mean()),
            "unsafe_cos": float((q_unsafe * t0_star).sum(-1).mean()),
            f"knn_overlap@{k}": knn_overlap(q_safe, t0, k),
        }

    out = block(t_star, t)
    out["frozen"] = block(t0_star, t0)
    out["n_pairs"] = n
    out["targets_differ_from_pair"] = float(sum(safe[int(j)] != safe[i] for i, j in enumerate(hat)) / n)
    return out


def weight_drift(model_state: dict[str, torch.Tensor], base_state: dict[str, torch.Tensor], prefix: str = "text_model.") -> dict[str, float]:
    """L2 norm of (weights - base weights) over the parameters under ``prefix``, absolute and relative to the base norm."""
    diff2 = base2 = 0.0
    count = 0
    for name, w0 in base_state.items():
        if not name.startswith(prefix) or name not in model_state or not w0.dtype.is_floating_point:
            continue
        w = model_state[name].double().cpu()
        diff2 += float(((w - w0.double().cpu()) ** 2).sum())
        base2 += float((w0.double() ** 2).sum())
        count += 1
    if count == 0:
        raise ValueError(f"No common floating-point weights under {prefix!r} to compare.")
    return {"l2": diff2**0.5, "relative": (diff2 / base2) ** 0.5 if base2 > 0 else 0.0, "tensors": count}


def retrieval_metrics(encode_text, encode_image, dataset) -> dict[str, float]:
    """R@1 of T->V, V->T (utility) and T*->V, V*->T (redirection); gallery = safe items, target = the pair's own."""
    safe, unsafe = dataset.safe_captions, dataset.unsafe_captions
    n = len(safe)
    t, t_star = encode_text(safe), encode_text(unsafe)
    v = encode_image([r.safe_image for r in dataset])
    target = torch.arange(n)
    out = {"t_to_v_r1": recall_at_1(t, v, target), "v_to_t_r1": recall_at_1(v, t, target, safe), "t_star_to_v_r1": recall_at_1(t_star, v, target)}
    if all(r.unsafe_image for r in dataset):
        out["v_star_to_t_r1"] = recall_at_1(encode_image([r.unsafe_image for r in dataset]), t, target, safe)
    return out


def _list_image_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"`--zero_shot_root` {str(root)!r} has no class sub-folders (expected root/<class>/<image>).")
    items = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir()) if f.suffix.lower() in _IMAGE_EXTS]
    if not items:
        raise ValueError(f"`--zero_shot_root` {str(root)!r} has no images ({sorted(_IMAGE_EXTS)}).")
    return classes, items


def zero_shot_accuracy(encode_text, encode_image_paths, root, class_names: Sequence[str] | None = None,
                       templates: Sequence[str] = DEFAULT_TEMPLATES) -> dict[str, Any]:
    """Top-1 zero-shot accuracy on an image folder (``root/<class>/*.jpg``): class embedding = mean over templates."""
    root = Path(root)
    folders, items = _list_image_folder(root)
    names = list(class_names) if class_names is not None else [f.replace("_", " ") for f in folders]
    if len(names) != len(folders):
        raise ValueError(f"`--class_names` has {len(names)} names but {str(root)!r} has {len(folders)} class folders {folders}.")
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"`--templates` must be non-empty and each must contain '{{}}', got {list(templates)!r}.")
    weights = []
    for name in names:
        e = encode_text([tpl.format(name) for tpl in templates]).float().mean(0)
        weights.append(F.normalize(e, dim=-1))
    weights = torch.stack(weights)
    v = encode_image_paths([str(p) for p, _ in items]).float()
    pred = (v @ weights.T).argmax(1)
    labels = torch.tensor([c for _, c in items])
    return {"accuracy": float((pred == labels).float().mean()), "n_images": len(items), "n_classes": len(names), "templates": len(templates)}


# --------------------------------------------------------------------------- loading
def load_eval_model(model: str, attention: str = "sdpa"):
    """Load what ``--model`` names as ``(CLIPModel fp32, tokenizer, image_processor, base_model_source or None)``."""
    from .modeling import load_clip

    path = Path(model).expanduser()
    if (path / "safer_clip.json").is_file():
        meta = json.loads((path / "safer_clip.json").read_text())
        base = meta.get("base_model")
        if (path / "clip" / "config.json").is_file():
            from transformers import CLIPModel, CLIPTokenizer

            clip = CLIPModel.from_pretrained(str(path / "clip"), attn_implementation=attention).float().eval()
            tokenizer = CLIPTokenizer.from_pretrained(str(path / "tokenizer"))
            processor = load_clip(base, attention).image_processor if base else None
            return clip, tokenizer, processor, base
        from safetensors.torch import load_file
        from transformers import CLIPTextModel

        loaded = load_clip(base, attention)
        text = CLIPTextModel.from_pretrained(str(path / "text_encoder")).float()
        loaded.model.text_model.load_state_dict(text.state_dict())
        if (path / "text_projection.safetensors").is_file():
            loaded.model.text_projection.weight.data.copy_(load_file(str(path / "text_projection.safetensors"))["weight"])
        return loaded.model.eval(), loaded.tokenizer, loaded.image_processor, base
    if path.is_dir() and (path.name.startswith("checkpoint-") or (path / "config.yaml").is_file()):
        from .export import merged_clip_from_checkpoint

        clip, tokenizer, processor, config, _ = merged_clip_from_checkpoint(path)
        return clip, tokenizer, processor, config.model_name_or_path
    loaded = load_clip(model, attention)
    return loaded.model, loaded.tokenizer, loaded.image_processor, None


def _encoders(clip, tokenizer, processor, device, batch_size: int, image_root=None):
    from .train import _load_pixels

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
            px = _load_pixels(paths[i : i + batch_size], processor, image_root).to(device)
            out.append(F.normalize(clip.get_image_features(pixel_values=px).pooler_output.float(), dim=-1).cpu())
        return torch.cat(out)

    return encode_text, encode_images


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    clip, tokenizer, processor, recorded_base = load_eval_model(args.model)
    base_name = args.base or recorded_base
    if base_name is None:
        raise ValueError(f"`--base` is required: {args.model!r} records no base model (pass the frozen CLIP it was trained from).")
    from .modeling import load_clip

    base = load_clip(base_name)
    device = torch.device(args.device)
    enc_t, enc_i = _encoders(clip, tokenizer, processor, device, args.batch_size, args.image_root)
    base_t, base_i = _encoders(base.model, base.tokenizer, base.image_processor, device, args.batch_size, args.image_root)
    results: dict[str, Any] = {"model": args.model, "base": base_name}
    results["weights"] = weight_drift(clip.state_dict(), base.model.state_dict())
    if args.data:
        from .data import load_pairs

        data = load_pairs(args.data, format=args.data_format, image_root=args.image_root)
        results["data"] = {"source": args.data, "n_pairs": len(data)}
        results["text"] = text_metrics(enc_t, base_t, data.safe_captions, data.unsafe_captions, k=args.k)
        if data.has_images and all(r.safe_image for r in data):
            results["retrieval"] = retrieval_metrics(enc_t, enc_i, data)
            results["retrieval_frozen"] = retrieval_metrics(base_t, base_i, data)
    if args.zero_shot_root:
        names = None
        if args.class_names:
            p = Path(args.class_names)
            names = json.loads(p.read_text()) if p.is_file() else [c.strip() for c in args.class_names.split(",")]
        templates = DEFAULT_TEMPLATES
        if args.templates:
            templates = tuple(line.strip() for line in Path(args.templates).read_text().splitlines() if line.strip())
        results["zero_shot"] = {
            "model": zero_shot_accuracy(enc_t, enc_i, args.zero_shot_root, names, templates),
            "base": zero_shot_accuracy(base_t, base_i, args.zero_shot_root, names, templates),
        }
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m finetune.evaluate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="Export folder, run/checkpoint folder, CLIP folder/hub id, open_clip:<arch>:<tag> or tiny.")
    p.add_argument("--base", default=None, help="Frozen reference CLIP (default: the base recorded in the export/checkpoint).")
    p.add_argument("--data", default=None, help="Pairs file (.csv/.jsonl/.json/.parquet) or hub id for text/retrieval metrics.")
    p.add_argument("--data_format", default="auto", choices=("auto", "visu", "nsfwcaps", "generic"), help="Column layout of --data.")
    p.add_argument("--image_root", default=None, help="Folder that relative image paths are resolved against.")
    p.add_argument("--zero_shot_root", default=None, help="Image folder dataset (root/<class>/<image>) for zero-shot accuracy.")
    p.add_argument("--class_names", default=None, help="Class names: a JSON list file or comma-separated (default: folder names).")
    p.add_argument("--templates", default=None, help="Text file, one prompt template with '{}' per line (default: 5 CLIP templates).")
    p.add_argument("--k", type=int, default=10, help="Neighbours for the kNN-overlap preservation metric.")
    p.add_argument("--batch_size", type=int, default=256, help="Encoding batch size.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Device, e.g. cuda, cuda:1, cpu.")
    p.add_argument("--output", default=None, help="Also write the JSON here (atomically).")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.k < 1:
        raise ValueError(f"`--k` must be >= 1, got {args.k}.")
    if not args.data and not args.zero_shot_root:
        raise ValueError("Nothing to evaluate: pass `--data` (pairs) and/or `--zero_shot_root` (image folder).")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    results = evaluate(args)
    text = json.dumps(results, indent=2)
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, text)
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
