"""Frozen anchors: the pretrained encoders' embeddings of a dataset, computed once and cached.

``T0`` and ``V0`` never move (docs/METHOD.md §3), so ``T0(t)``, ``T0(t*)``, ``V0(v)``, ``V0(v*)`` (and,
for the token-level preservation term, ``T0``'s last hidden states on safe captions) are
computed once, batched and without gradients, and cached on disk. The training loop then runs
only the trainable encoder(s); ``T0(t̂)`` and ``V0(v̂)`` are rows of these tensors picked by the
nearest-safe targets (:meth:`finetune.targets.Targets.hat_anchors`).

Extra safe captions (``--extra_safe_captions``) are encoded with the pairs: ``extra_text`` = ``T0(extra)``; they
join the nearest-safe pool after the paired safe captions (:attr:`AnchorSet.pool_text`, row ``N + j`` = extra
caption ``j``) and, with ``--preserve_extra``, the preservation rows.

Cache entries (``<key>.safetensors`` + ``<key>.json``) are keyed by the data fingerprint, the
encoder fingerprint (a hash of every weight and of the config), the tokenizer / image processor,
the extra captions (their count and a hash of the list) and the options; the JSON metadata is
compared in full before an entry is used, so a cache from another model, dataset, caption list or
option set is never reused.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _cache
from .data import PairDataset

logger = logging.getLogger(__name__)

__all__ = ["ANCHORS_VERSION", "AnchorSet", "compute_anchors", "encode_images", "encode_text", "encoder_fingerprint"]

#: Bump when the computation changes, so old caches are never reused.
ANCHORS_VERSION = 1
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_commit_hash", "torch_dtype", "dtype", "_attn_implementation_autoset"}


@dataclass
class AnchorSet:
    """Frozen embeddings of a :class:`~finetune.data.PairDataset` (row ``i`` = pair ``i``).

    Attributes:
        safe_text (`Tensor (N, D)`): ``T0(t)``, L2-normalised float32.
        unsafe_text (`Tensor (N, D)`): ``T0(t*)``.
        safe_image (`Tensor (N, D)` or None): ``V0(v)`` when every pair has a safe image.
        unsafe_image (`Tensor (N, D)` or None): ``V0(v*)`` when every pair has an unsafe image.
        safe_tokens (`Tensor (N, L, H)` or None): ``T0``'s last hidden states on the safe captions
            (``token_states=True``), tokenised exactly as :func:`tokenize` does (padding to ``L``).
        safe_token_mask (`BoolTensor (N, L)` or None): real (non-padding) tokens.
        extra_text (`Tensor (M, D)` or None): ``T0`` of the extra safe captions, in the order given.
        fingerprint (`str`): the cache key (data + encoder + extra captions + options).
    """

    safe_text: Tensor
    unsafe_text: Tensor
    safe_image: Tensor | None = None
    unsafe_image: Tensor | None = None
    safe_tokens: Tensor | None = None
    safe_token_mask: Tensor | None = None
    extra_text: Tensor | None = None
    fingerprint: str = ""

    def __len__(self) -> int:
        return int(self.safe_text.shape[0])

    @property
    def pool_text(self) -> Tensor:
        """``T0`` of every safe caption a row index can name: the pairs' (rows 0..N-1), then the extra captions (N..N+M-1)."""
        return self.safe_text if self.extra_text is None else torch.cat([self.safe_text, self.extra_text])

    def to(self, device: str | torch.device) -> AnchorSet:
        """A copy with every tensor on ``device``."""
        move = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}
        return AnchorSet(**move)


# ----------------------------------------------------------------------------- fingerprints


def _config_dict(config: Any) -> dict:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)

    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if k not in _VOLATILE_CONFIG_KEYS}
        return x

    return clean(d)


def encoder_fingerprint(module_or_state_dict: nn.Module | Mapping[str, Tensor]) -> str:
    """SHA-256 of every tensor (name, dtype, shape, bytes) and, for a module with ``.config``, of its config.

    Two encoders get the same fingerprint only if all their weights are bit-identical and their
    configs agree (ignoring ``_name_or_path`` / version fields). A ViT-L/14 CLIP (1.7 GB in
    float32) hashes in a few seconds.
    """
    if isinstance(module_or_state_dict, nn.Module):
        state = module_or_state_dict.state_dict()
        config = getattr(module_or_state_dict, "config", None)
    elif isinstance(module_or_state_dict, Mapping):
        state, config = module_or_state_dict, None
    else:
        raise ValueError(f"`module_or_state_dict` must be an nn.Module or a state dict, got {type(module_or_state_dict).__name__}.")
    h = hashlib.sha256(b"safer-diffusion-encoder-v1\n")
    if config is not None:
        h.update(json.dumps(_config_dict(config), sort_keys=True, default=str).encode())
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, Tensor):
            continue
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"\n{name}|{t.dtype}|{tuple(state[name].shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _tokenizer_fingerprint(tokenizer) -> dict:
    vocab = tokenizer.get_vocab()
    return {
        "class": type(tokenizer).__name__,
        "vocab_sha256": hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest(),
        "model_max_length": int(tokenizer.model_max_length),
        "pad_token": tokenizer.pad_token,
        "eos_token": tokenizer.eos_token,
        "bos_token": tokenizer.bos_token,
    }


def _processor_fingerprint(image_processor) -> dict | None:
    if image_processor is None:
        return None
    d = image_processor.to_dict() if hasattr(image_processor, "to_dict") else {"repr": repr(image_processor)}
    return {"class": type(image_processor).__name__, "sha256": _cache.hash_json(d)}


# ----------------------------------------------------------------------------- encoding


def _features(output: Any) -> Tensor:
    """Pooled, projected features from ``get_text_features`` / ``get_image_features``.

    transformers < 5 returns a tensor; transformers 5 returns a ``BaseModelOutputWithPooling``
    whose ``pooler_output`` is the projected embedding.
    """
    if isinstance(output, Tensor):
        return output
    for key in ("text_embeds", "image_embeds", "pooler_output"):
        value = getattr(output, key, None)
        if isinstance(value, Tensor):
            return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"Cannot read features from a {type(output).__name__}; expected a tensor or a model output with `pooler_output`.")


def tokenize(tokenizer, captions: Sequence[str]) -> dict[str, Tensor]:
    """Tokenise as Stable Diffusion does: pad to ``model_max_length`` (77), truncate."""
    return tokenizer(list(captions), padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt")


class _Frozen:
    """Context: the model (or a temporary copy on ``device``/``dtype``) in eval mode, restored after."""

    def __init__(self, model: nn.Module, device, dtype):
        self.model, self.device, self.dtype = model, torch.device(device), dtype

    def __enter__(self) -> nn.Module:
        p = next(self.model.parameters())
        if p.device != self.device or p.dtype != self.dtype:
            logger.info("Encoding anchors with a copy of the model on %s in %s (the given model is left untouched).", self.device, self.dtype)
            self.use = copy.deepcopy(self.model).to(device=self.device, dtype=self.dtype)
        else:
            self.use = self.model
        self.was_training = self.use.training
        self.use.eval()
        return self.use

    def __exit__(self, *exc):
        if self.use is self.model:
            self.model.train(self.was_training)
        return False


def _encode_text(model, tokenizer, captions, batch_size, device, dtype, token_states):
    """Encode in batches of captions of similar length, each trimmed to its longest caption, then restore the order.

    CLIP's text tower is causal and pools at the end-of-text token, so the padding after a caption does not change
    its outputs: trimming gives the padded result (within float rounding) on a fraction of the tokens. With
    ``token_states`` the batches are not trimmed: the states of every padded position are kept, as :func:`tokenize` pads.
    """
    if not captions:
        return torch.empty(0), (torch.empty(0) if token_states else None), (torch.empty(0, dtype=torch.bool) if token_states else None)
    enc = tokenize(tokenizer, captions)
    all_ids, all_mask = enc["input_ids"], enc["attention_mask"]
    order = torch.argsort(all_mask.sum(1), stable=True)  # shortest first
    embeds, hidden, masks = [], [], []
    with _Frozen(model, device, dtype) as m, torch.no_grad():
        for start in range(0, len(captions), batch_size):
            rows = order[start:start + batch_size]
            length = all_ids.shape[1] if token_states else int(all_mask[rows].sum(1).max())  # token states: every position
            ids, mask = all_ids[rows, :length].to(device), all_mask[rows, :length].to(device)
            if token_states:
                out = m.text_model(input_ids=ids, attention_mask=mask)
                pooled = out.pooler_output
                feats = m.text_projection(pooled) if hasattr(m, "text_projection") else pooled
                hidden.append(out.last_hidden_state.float().cpu())
                masks.append(mask.bool().cpu())
            elif hasattr(m, "get_text_features"):
                feats = _features(m.get_text_features(input_ids=ids, attention_mask=mask))
            else:  # a text tower alone (CLIPTextModelWithProjection): the same pooled, projected output
                feats = m.text_projection(m.text_model(input_ids=ids, attention_mask=mask).pooler_output)
            embeds.append(F.normalize(feats.float(), dim=-1).cpu())
    inverse = torch.argsort(order)
    emb = torch.cat(embeds)[inverse]
    if not token_states:
        return emb, None, None
    return emb, torch.cat(hidden)[inverse], torch.cat(masks)[inverse]


def encode_text(model, tokenizer, captions: Sequence[str], batch_size: int = 256, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> Tensor:
    """Pooled, projected, L2-normalised text embeddings ``T0(captions)``, float32 on CPU.

    Args:
        model (`transformers.CLIPModel`): the (frozen) model; a temporary copy is used if it is not
            on ``device`` in ``dtype``.
        tokenizer: its CLIP tokenizer (captions are truncated to ``model_max_length``; batches of similar length
            are trimmed to their longest caption, which leaves the outputs unchanged).
        captions (`list[str]`): the texts.
        batch_size (`int`, defaults to 256), device, dtype: how to run the encoder.

    Returns:
        `Tensor (N, D)` float32, rows of unit norm.
    """
    _check_batch(batch_size)
    return _encode_text(model, tokenizer, list(captions), batch_size, device, dtype, False)[0]


def encode_images(model, image_processor, paths: Sequence[str], batch_size: int = 256, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """Pooled, projected, L2-normalised image embeddings ``V0(images)`` of image files, float32 on CPU."""
    from PIL import Image

    _check_batch(batch_size)
    embeds = []
    with _Frozen(model, device, dtype) as m, torch.no_grad():
        for start in range(0, len(paths), batch_size):
            images = []
            for p in paths[start:start + batch_size]:
                with Image.open(p) as im:
                    images.append(im.convert("RGB"))
            pixels = image_processor(images=images, return_tensors="pt")["pixel_values"].to(device=device, dtype=dtype)
            embeds.append(F.normalize(_features(m.get_image_features(pixel_values=pixels)).float(), dim=-1).cpu())
    return torch.cat(embeds) if embeds else torch.empty(0)


def _check_batch(batch_size: int) -> None:
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")


def _unique(items: Sequence[str]) -> tuple[list[str], Tensor]:
    """Distinct items in first-seen order and, for every item, its row in that list."""
    where: dict[str, int] = {}
    inverse = [where.setdefault(x, len(where)) for x in items]
    return list(where), torch.tensor(inverse, dtype=torch.long)


def compute_anchors(
    model,
    tokenizer,
    dataset: PairDataset,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
    token_states: bool = False,
    image_processor=None,
    extra_captions: Sequence[str] | None = None,
) -> AnchorSet:
    """Frozen embeddings of every pair of ``dataset`` (and of ``extra_captions``), from the disk cache when an identical
    entry exists.

    Identical caption strings (or image paths) are encoded once. Images are encoded only when
    ``image_processor`` is given and every pair has that image.

    Args:
        model (`transformers.CLIPModel` or `CLIPTextModelWithProjection`): the frozen pretrained model ``T0`` / ``V0``.
        tokenizer: its tokenizer.
        dataset (`PairDataset`): the pairs.
        batch_size (`int`, defaults to 256): encoder batch size.
        device, dtype: where and in which precision the encoder runs (outputs are float32 on CPU).
        cache_dir (`str`, *optional*): cache folder (default ``$SAFER_DIFFUSION_CACHE/anchors``). Must be writable.
        token_states (`bool`, defaults to False): also keep ``T0``'s last hidden states on the safe
            captions and their attention mask (token-level preservation). Memory: ``N x 77 x H x 4`` bytes.
        image_processor (`CLIPImageProcessor`, *optional*): needed for image anchors.
        extra_captions (`list[str]`, *optional*): extra safe captions (``--extra_safe_captions``), encoded into
            ``extra_text``; part of the cache key.

    Returns:
        :class:`AnchorSet`
    """
    if not isinstance(dataset, PairDataset):
        raise ValueError(f"`dataset` must be a PairDataset (see finetune.data.load_pairs), got {type(dataset).__name__}.")
    if len(dataset) == 0:
        raise ValueError("`dataset` is empty; load at least one pair.")
    _check_batch(batch_size)
    extras = None if extra_captions is None else [str(c) for c in extra_captions]
    if extras is not None and not extras:
        raise ValueError("`extra_captions` is empty; pass None or at least one caption.")
    folder = _cache.ensure_writable(cache_dir if cache_dir is not None else _cache.default_cache_dir("anchors"))
    with_images = image_processor is not None and dataset.has_images
    with_unsafe_images = with_images and dataset.has_unsafe_images
    if image_processor is not None and not dataset.has_images:
        logger.info("No image anchors: not every pair of the dataset has a safe image.")
    meta = {
        "kind": "anchors",
        "version": ANCHORS_VERSION,
        "data": dataset.fingerprint(),
        "n": len(dataset),
        "encoder": encoder_fingerprint(model),
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "image_processor": _processor_fingerprint(image_processor) if with_images else None,
        "options": {"token_states": bool(token_states), "images": with_images, "unsafe_images": with_unsafe_images, "dtype": str(dtype)},
    }
    if extras is not None:  # only then, so the keys of caches without extra captions stay valid
        meta["extra_captions"] = {"n": len(extras), "sha256": _cache.hash_json(extras)}
    key = _cache.hash_json(meta)[:32]
    hit = _cache.load_entry(folder, key, meta)
    if hit is not None:
        logger.info("Anchors: cache hit %s.", folder / key)
        return AnchorSet(**hit, fingerprint=key)

    logger.info("Anchors: computing %d pairs (images: %s, token states: %s) on %s.", len(dataset), with_images, token_states, device)
    texts, inverse = _unique(dataset.safe_captions + dataset.unsafe_captions + (extras or []))
    emb, hidden, mask = _encode_text(model, tokenizer, texts, batch_size, device, dtype, token_states)
    n = len(dataset)
    tensors: dict[str, Tensor] = {"safe_text": emb[inverse[:n]], "unsafe_text": emb[inverse[n : 2 * n]]}
    if extras is not None:
        tensors["extra_text"] = emb[inverse[2 * n :]]
    if token_states:
        # the hidden states of every safe caption (encoded with the unsafe ones; the rows are per caption)
        tensors["safe_tokens"] = hidden[inverse[:n]]
        tensors["safe_token_mask"] = mask[inverse[:n]]
        size = tensors["safe_tokens"].numel() * 4
        if size > 4 * 2**30:
            logger.warning("Token-state anchors take %.1f GiB of memory.", size / 2**30)
    if with_images:
        paths = [r.safe_image for r in dataset] + ([r.unsafe_image for r in dataset] if with_unsafe_images else [])
        unique_paths, inv = _unique(paths)
        img = encode_images(model, image_processor, unique_paths, batch_size, device, dtype)
        tensors["safe_image"] = img[inv[:n]]
        if with_unsafe_images:
            tensors["unsafe_image"] = img[inv[n:]]
    _cache.save_entry(Path(folder), key, tensors, meta)
    return AnchorSet(**{k: v.contiguous() for k, v in tensors.items()}, fingerprint=key)
