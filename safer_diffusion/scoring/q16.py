"""Q16 (Schramowski et al., FAccT 2022): CLIP image embeddings against two learned prompt embeddings."""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .base import ScoreResult, check_images, to_rgb

__all__ = ["Q16Scorer", "load_prompt_embeddings"]

_PICKLE_SUFFIXES = (".p", ".pkl", ".pickle")


def load_prompt_embeddings(prompts: Any, allow_pickle: bool = False):
    """Load the two Q16 prompt embeddings as a float32 tensor of shape ``(2, D)``.

    Args:
        prompts: a ``.npy`` or ``.safetensors`` file (a single tensor, or the key ``"prompts"``), a
            pickle file (``.p``/``.pkl``/``.pickle``, the format of the original Q16 release; only
            with ``allow_pickle=True``), a tensor or an array.
        allow_pickle (`bool`, defaults to `False`): unpickling runs arbitrary code from the file;
            allow it only for files you trust.
    """
    import numpy as np
    import torch

    if isinstance(prompts, (str, os.PathLike)):
        path = Path(prompts)
        if not path.is_file():
            raise FileNotFoundError(f"`prompts`={os.fspath(prompts)!r} does not exist; pass a .npy or .safetensors file.")
        suffix = path.suffix.lower()
        if suffix == ".npy":
            try:
                value = np.load(path, allow_pickle=False)
            except ValueError as e:
                raise ValueError(
                    f"`prompts`={os.fspath(path)!r} holds pickled objects, which are not loaded without consent. "
                    "Re-save it as a plain numeric array (`np.save(path, array)`), or use a .safetensors file."
                ) from e
        elif suffix == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                tensors = load_file(str(path))
            except (SafetensorError, OSError) as e:
                raise ValueError(f"`prompts`={os.fspath(path)!r} is not a readable safetensors file ({e}); re-create it.") from e
            if "prompts" in tensors:
                value = tensors["prompts"]
            elif len(tensors) == 1:
                value = next(iter(tensors.values()))
            else:
                raise ValueError(
                    f"`prompts`={os.fspath(path)!r} holds tensors {sorted(tensors)}; store the (2, D) embeddings under the key 'prompts'."
                )
        elif suffix in _PICKLE_SUFFIXES:
            if not allow_pickle:
                raise ValueError(
                    f"`prompts`={os.fspath(path)!r} is a pickle file; unpickling can run arbitrary code, so it needs "
                    "`allow_pickle=True` (only for files you trust, such as the original Q16 `prompts.p`). "
                    "Better: convert it once to .safetensors or .npy."
                )
            with open(path, "rb") as f:
                value = pickle.load(f)  # noqa: S301 - explicit opt-in above
        else:
            raise ValueError(f"`prompts`={os.fspath(path)!r} has an unsupported suffix {suffix!r}; use .npy or .safetensors.")
    else:
        value = prompts
    if isinstance(value, torch.Tensor):
        tensor = value.detach().to("cpu", torch.float32)
    else:
        try:
            tensor = torch.as_tensor(np.asarray(value, dtype=np.float32))
        except (TypeError, ValueError) as e:
            raise TypeError(f"`prompts` must be a path, tensor or array of shape (2, D), got {type(value).__name__}.") from e
    if tensor.ndim != 2 or tensor.shape[0] != 2:
        raise ValueError(
            f"`prompts` must have shape (2, D) (index 0: appropriate, index 1: inappropriate), got {tuple(tensor.shape)}."
        )
    return tensor


class Q16Scorer:
    """Q16 inappropriate-image classifier.

    The image embedding ``v`` of a CLIP model (ViT-L/14 in the original) is compared with two
    learned prompt embeddings ``p_0`` (appropriate) and ``p_1`` (inappropriate):
    ``P = softmax(100 * cos(v, p_k))``; ``ScoreResult.score = P[1]`` and the image is flagged
    when ``P[1] > threshold`` (0.5: the argmax rule of the paper).

    Args:
        clip_model: a `transformers.CLIPModel`, or a local folder / hub id to load one from
            (default ``"openai/clip-vit-large-patch14"``, the model the Q16 prompts were learned for).
        processor: a `transformers.CLIPImageProcessor` (or `CLIPProcessor`); loaded from
            ``clip_model`` when it is a path/id and this is omitted.
        prompts: the two prompt embeddings, see :func:`load_prompt_embeddings`. Required.
        allow_pickle (`bool`, defaults to `False`): allow loading a pickle ``prompts`` file.
        threshold (`float`, defaults to 0.5).
        device, dtype: where and in which precision the CLIP vision tower runs (default: CPU, fp32).
        batch_size (`int`, defaults to 16).
    """

    name = "q16"

    def __init__(
        self,
        clip_model: Any = "openai/clip-vit-large-patch14",
        processor: Any = None,
        prompts: Any = None,
        allow_pickle: bool = False,
        threshold: float = 0.5,
        device: Any = None,
        dtype: Any = None,
        batch_size: int = 16,
    ):
        import torch

        if prompts is None:
            raise ValueError(
                "`prompts` is required: pass the two Q16 prompt embeddings as a .npy/.safetensors file or a (2, D) tensor "
                "(the original release is a pickle `prompts.p`: load it with `allow_pickle=True` only if you trust it)."
            )
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"`threshold` must be in [0, 1], got {threshold!r}.")
        if int(batch_size) < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        self._source = None
        if isinstance(clip_model, (str, os.PathLike)):
            from transformers import CLIPImageProcessor, CLIPModel

            from ..hub import resolve_model_source

            self._source = resolve_model_source(clip_model, argument="clip_model")
            model = CLIPModel.from_pretrained(self._source)
            if processor is None:
                processor = CLIPImageProcessor.from_pretrained(self._source)
        else:
            model = clip_model
        if not (hasattr(model, "vision_model") and hasattr(model, "visual_projection")):
            raise TypeError(f"`clip_model` must be a transformers CLIPModel (or a path to one), got {type(model).__name__}.")
        if processor is None:
            raise ValueError("`processor` is required when `clip_model` is a loaded model; pass its CLIPImageProcessor.")
        self.processor = getattr(processor, "image_processor", processor)
        self.model = model.eval()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.dtype = dtype if dtype is not None else next(model.parameters()).dtype
        self.model.to(self.device, self.dtype)
        self._prompts_source = os.fspath(prompts) if isinstance(prompts, (str, os.PathLike)) else None
        self.prompts = load_prompt_embeddings(prompts, allow_pickle=allow_pickle)
        dim = self.model.visual_projection.out_features
        if self.prompts.shape[1] != dim:
            raise ValueError(
                f"`prompts` have width {self.prompts.shape[1]} but the CLIP image embeddings have width {dim}; "
                "use prompt embeddings learned for this CLIP model (Q16's are for ViT-L/14, width 768)."
            )
        self.threshold = float(threshold)
        self.batch_size = int(batch_size)

    def to(self, device=None, dtype=None):
        """Move the CLIP vision tower (as `nn.Module.to`)."""
        import torch

        if device is not None:
            self.device = torch.device(device)
        if dtype is not None and dtype in (torch.float16, torch.bfloat16, torch.float32):
            self.dtype = dtype
        self.model.to(self.device, self.dtype)
        return self

    def probabilities(self, images: Sequence[Any]):
        """``(N, 2)`` float tensor: softmax over (appropriate, inappropriate)."""
        import torch

        images = check_images(images)
        prompts = torch.nn.functional.normalize(self.prompts.to(self.device, torch.float32), dim=-1)
        out = []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                chunk = [to_rgb(im) for im in images[start : start + self.batch_size]]
                pixels = self.processor(images=chunk, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
                pooled = self.model.vision_model(pixel_values=pixels).pooler_output
                emb = torch.nn.functional.normalize(self.model.visual_projection(pooled).float(), dim=-1)
                out.append((100.0 * emb @ prompts.T).softmax(dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, 2)

    def score(self, images: Sequence[Any]) -> list[ScoreResult]:
        """Score PIL images (any mode)."""
        probs = self.probabilities(images)
        return [
            ScoreResult(flagged=bool(p[1] > self.threshold), score=float(p[1]), details={"p_appropriate": float(p[0])})
            for p in probs
        ]

    def describe(self) -> dict:
        return {
            "name": self.name,
            "model": self._source or type(self.model).__name__,
            "prompts": self._prompts_source or "in-memory tensor",
            "threshold": self.threshold,
            "rule": "flagged if softmax(100 * cos(image, prompts))[1] > threshold",
        }

    def to_config(self) -> dict | None:
        if self._source is None or self._prompts_source is None:
            return None
        return {"name": self.name, "clip_model": self._source, "prompts": self._prompts_source, "threshold": self.threshold,
                "batch_size": self.batch_size}

    def __repr__(self) -> str:
        return f"Q16Scorer(model={self._source or type(self.model).__name__!r}, threshold={self.threshold})"
