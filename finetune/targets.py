"""Proximity targets (docs/METHOD.md §3): the nearest safe caption of every unsafe caption, exactly.

For every unsafe caption ``t*_i`` over the pool of all safe captions ``t_j`` of the training split (and the
extra safe captions, ``--extra_safe_captions``, after them: pool row ``N + j`` is extra caption ``j``)::

    j*(i) = argmax_j cos(T0(t*_i), T0(t_j))      t̂_i = t_{j*(i)}      v̂_i = v_{j*(i)}      d_i = cos(T0(t*_i), T0(t̂_i))

:func:`nearest_safe` is exact top-1 by chunked matrix products: ``chunk_size`` unsafe rows at a
time against the whole (de-duplicated) pool, so memory is ``O(chunk_size x pool)``, never ``N x N``.

Determinism. Results do not depend on ``chunk_size`` (bit for bit) or on the order in which BLAS
sums: the matrix product only *shortlists* candidates (every column within a rounding bound of
the row's maximum, usually one), the shortlisted pairs are rescored in float64 one pair at a
time (a fixed summation per pair), and the winner is the highest rescored similarity, ties broken
by the lowest pool index. The returned similarity is that rescored value, cast to float32.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _cache
from .anchors import AnchorSet
from .data import PairDataset

logger = logging.getLogger(__name__)

__all__ = ["Targets", "compute_targets", "nearest_safe", "unique_first_indices"]

#: Bump when the search's results could change, so old caches are never reused.
TARGETS_VERSION = 1
_RESCORE_BATCH = 1 << 14  # pairs rescored at once in float64 (x D x 8 bytes)


def _check_embeddings(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"`{name}` must be a 2-D tensor (N, D) of embeddings, got {getattr(x, 'shape', type(x).__name__)}.")
    if not x.dtype.is_floating_point:
        raise ValueError(f"`{name}` must be a floating-point tensor, got dtype {x.dtype}.")
    finite = torch.isfinite(x).all(dim=1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten()
        raise ValueError(
            f"`{name}` contains NaN or inf in {bad.numel()} row(s) (first: row {int(bad[0])}); "
            "recompute the anchors (a diverged or half-precision-overflowed encoder produces these)."
        )


def unique_first_indices(keys: list[str]) -> Tensor:
    """Ascending indices of the first occurrence of every distinct string in ``keys``."""
    seen: set[str] = set()
    keep = []
    for i, k in enumerate(keys):
        if k not in seen:
            seen.add(k)
            keep.append(i)
    return torch.tensor(keep, dtype=torch.long)


def _rescore(u: Tensor, s: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """float64 cosine of pairs (rows[k], cols[k]) with one fixed summation order per pair."""
    out = torch.empty(rows.numel(), dtype=torch.float64)
    for start in range(0, rows.numel(), _RESCORE_BATCH):
        r = rows[start:start + _RESCORE_BATCH]
        c = cols[start:start + _RESCORE_BATCH]
        a = u[r.to(u.device)].to(torch.float64)
        b = s[c.to(s.device)].to(torch.float64)
        out[start:start + r.numel()] = (a * b).sum(dim=1).cpu()
    return out


def nearest_safe(
    unsafe_emb: Tensor,
    safe_emb: Tensor,
    chunk_size: int = 8192,
    safe_keys: list[str] | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact top-1 nearest safe embedding (cosine) of every unsafe embedding.

    Args:
        unsafe_emb (`Tensor` of shape `(N, D)`): ``T0(t*)``; normalised here (cosine).
        safe_emb (`Tensor` of shape `(M, D)`): ``T0(t)`` of the whole safe pool. The search runs
            on ``safe_emb``'s device; unsafe rows are moved there one chunk at a time.
        chunk_size (`int`, defaults to 8192): unsafe rows per matrix product. Peak extra memory is
            about ``chunk_size x M x 5`` bytes (float32 scores + a mask); results do not depend on it.
        safe_keys (`list[str]`, *optional*): the safe caption strings (length ``M``). Identical
            strings count once: only the first occurrence is in the pool, so an index never points
            at a later duplicate.
        dtype (`torch.dtype`, *optional*): dtype of the matrix products (default float32; float16 /
            bfloat16 on GPU are faster). Winners are rescored in float64 from the float32
            embeddings, so the answer is the float32-exact argmax for every dtype; lower precision
            only shortlists more candidates.

    Returns:
        `(indices, similarities)`: ``LongTensor (N,)`` indices into the original ``safe_emb`` rows
        and ``FloatTensor (N,)`` cosines (the difficulty ``d_i``, high = easy), both on CPU.

    Raises:
        ValueError: wrong shapes, NaN/inf, an empty pool, ``safe_keys`` of the wrong length, or a
            pool whose captions are all the same string (duplicate-only pool).
    """
    _check_embeddings(unsafe_emb, "unsafe_emb")
    _check_embeddings(safe_emb, "safe_emb")
    if unsafe_emb.shape[1] != safe_emb.shape[1]:
        raise ValueError(
            f"`unsafe_emb` has dimension {unsafe_emb.shape[1]} but `safe_emb` has {safe_emb.shape[1]}; "
            "both must come from the same encoder."
        )
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"`chunk_size` must be a positive integer, got {chunk_size!r}.")
    n, m = unsafe_emb.shape[0], safe_emb.shape[0]
    if m == 0:
        raise ValueError("`safe_emb` is empty: the nearest-safe search needs at least one safe caption in the pool.")
    device = safe_emb.device
    compute_dtype = dtype or torch.float32
    if not compute_dtype.is_floating_point:
        raise ValueError(f"`dtype` must be a floating-point dtype, got {compute_dtype}.")

    pool_index = torch.arange(m)
    if safe_keys is not None:
        if len(safe_keys) != m:
            raise ValueError(f"`safe_keys` has {len(safe_keys)} entries but `safe_emb` has {m} rows; pass one caption per row.")
        pool_index = unique_first_indices(list(safe_keys))
        if m > 1 and pool_index.numel() == 1:
            raise ValueError(
                f"The safe pool is duplicate-only: all {m} safe captions are the same string {safe_keys[0]!r}, so every "
                "unsafe caption would get the same target. Check the `safe` column mapping (`--column_map safe=...`)."
            )
        if pool_index.numel() < m:
            logger.info("Nearest-safe pool: %d captions, %d distinct (duplicates count once).", m, pool_index.numel())
    if n == 0:
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.float32)

    # float32 normalised copies: the reference values that winners are rescored from
    safe32 = F.normalize(safe_emb.to(torch.float32), dim=1)[pool_index.to(device)]
    pool = safe32.to(compute_dtype)
    d = safe32.shape[1]
    # bound on |matmul - exact| for unit vectors, in each of two runs (summation over d terms in float32
    # plus input/output rounding to `compute_dtype`): columns within it of the max are shortlisted
    tol = 2 * d * torch.finfo(torch.float32).eps + 4 * torch.finfo(compute_dtype).eps + 1e-12
    if compute_dtype == torch.float32 and device.type == "cuda" and torch.get_float32_matmul_precision() != "highest":
        # TF32 (10-bit mantissa) or bf16 inputs inside float32 matmuls: widen the shortlist accordingly
        tol += 4 * (2.0**-10 if torch.get_float32_matmul_precision() == "high" else 2.0**-7)

    best_cols = torch.empty(n, dtype=torch.long)
    best_sims = torch.empty(n, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            u32 = F.normalize(unsafe_emb[start:stop].to(device=device, dtype=torch.float32), dim=1)
            scores = u32.to(compute_dtype) @ pool.T  # (chunk, M') -- the only large allocation
            top = scores.max(dim=1).values
            shortlist = scores >= (top - tol).unsqueeze(1).to(scores.dtype)
            del scores
            rows, cols = shortlist.nonzero(as_tuple=True)  # row-major order: cols ascending within a row
            del shortlist
            rows, cols = rows.cpu(), cols.cpu()
            sims = _rescore(u32, safe32, rows, cols)
            # per row: highest rescored similarity, ties -> lowest column (cols are ascending within each row)
            local = stop - start
            row_best = torch.full((local,), -math.inf, dtype=torch.float64).scatter_reduce(0, rows, sims, reduce="amax")
            is_best = sims == row_best[rows]
            first = torch.full((local,), m, dtype=torch.long).scatter_reduce(0, rows[is_best], cols[is_best], reduce="amin")
            best_cols[start:stop] = first
            best_sims[start:stop] = row_best
    return pool_index[best_cols], best_sims.to(torch.float32)


@dataclass
class Targets:
    """Nearest-safe targets of a dataset.

    Attributes:
        index (`LongTensor (N,)`): ``j*(i)``, row of the chosen safe caption (and of its image: the
            image target ``v̂_i`` is the image paired with the chosen caption).
        similarity (`FloatTensor (N,)`): ``d_i = cos(T0(t*_i), T0(t̂_i))``, the difficulty (high = easy).
        fingerprint (`str`): cache key of these targets.
    """

    index: Tensor
    similarity: Tensor
    fingerprint: str = ""

    def __len__(self) -> int:
        return int(self.index.numel())

    def hat_anchors(self, anchors: AnchorSet) -> dict[str, Tensor | None]:
        """``{"t0_hat": T0(t̂) (N, D), "v0_hat": V0(v̂) (N, D) or None}`` gathered from ``anchors``."""
        if anchors.safe_image is not None and bool((self.index >= anchors.safe_image.shape[0]).any()):
            raise ValueError("Some targets are extra safe captions, which have no image; image targets need paired captions.")
        return {
            "t0_hat": anchors.pool_text[self.index],
            "v0_hat": None if anchors.safe_image is None else anchors.safe_image[self.index],
        }

    def redirected(self, dataset: PairDataset) -> Tensor:
        """Bool (N,): the chosen safe caption differs (as a string) from the pair's own safe caption (an extra caption
        always differs: extra captions equal to a paired one never win, the paired one comes first in the pool)."""
        safe = dataset.safe_captions
        n = len(safe)
        return torch.tensor([int(j) >= n or safe[int(j)] != safe[i] for i, j in enumerate(self.index)], dtype=torch.bool)

    def extra_share(self, dataset: PairDataset) -> float:
        """Share of the targets that are extra safe captions (pool rows >= N)."""
        return float((self.index >= len(dataset.safe_captions)).float().mean()) if len(self) else 0.0


def compute_targets(
    anchors: AnchorSet,
    dataset: PairDataset,
    chunk_size: int = 8192,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    extra_captions: Sequence[str] | None = None,
) -> Targets:
    """Nearest safe caption of every unsafe caption of ``dataset`` over its own safe pool (and ``extra_captions``), cached.

    The cache key is the anchors' fingerprint (data + frozen encoder + options) plus the search
    version; ``chunk_size``, ``device`` and ``dtype`` do not change the result and are not part of it.

    Args:
        anchors (`AnchorSet`): frozen embeddings of ``dataset`` (``safe_text``, ``unsafe_text``).
        dataset (`PairDataset`): the training split (its safe captions are the pool; duplicates count once).
        chunk_size (`int`, defaults to 8192): see :func:`nearest_safe`.
        cache_dir (`str`, *optional*): folder of the cache (default ``$SAFER_DIFFUSION_CACHE/targets``).
        device (`str`, *optional*): where to search (default: where the anchors are).
        dtype (`torch.dtype`, *optional*): matrix-product dtype, see :func:`nearest_safe`.
        extra_captions (`list[str]`, *optional*): extra safe captions joining the pool after the paired ones; their
            embeddings are ``anchors.extra_text`` (compute the anchors with the same list).

    Returns:
        :class:`Targets` (``index`` >= N names extra caption ``index - N``).
    """
    n = len(dataset)
    extras = None if extra_captions is None else list(extra_captions)
    n_extra = 0 if anchors.extra_text is None else int(anchors.extra_text.shape[0])
    if (extras is None) != (anchors.extra_text is None) or (extras is not None and len(extras) != n_extra):
        raise ValueError(f"`extra_captions` ({'none' if extras is None else len(extras)}) and the anchors' extra captions "
                         f"({n_extra if anchors.extra_text is not None else 'none'}) differ; compute the anchors with the same list.")
    if anchors.safe_text.shape[0] != n or anchors.unsafe_text.shape[0] != n:
        raise ValueError(
            f"`anchors` hold {anchors.safe_text.shape[0]} safe / {anchors.unsafe_text.shape[0]} unsafe embeddings but "
            f"`dataset` has {n} pairs; compute the anchors on this dataset."
        )
    folder = Path(cache_dir) if cache_dir is not None else _cache.default_cache_dir("targets")
    meta = {"kind": "targets", "version": TARGETS_VERSION, "anchors": anchors.fingerprint, "data": dataset.fingerprint(), "n": n}
    if extras is not None:
        meta["extra_captions"] = {"n": len(extras), "sha256": _cache.hash_json(extras)}
    key = _cache.hash_json(meta)[:32]
    hit = _cache.load_entry(folder, key, meta) if anchors.fingerprint else None
    if hit is not None:
        logger.info("Nearest-safe targets: cache hit %s.", folder / key)
        return Targets(hit["index"], hit["similarity"], key)
    if anchors.fingerprint:
        _cache.ensure_writable(folder)  # fail before the search, not after it
    safe = anchors.pool_text if device is None else anchors.pool_text.to(device)
    keys = dataset.safe_captions + (extras or [])
    index, similarity = nearest_safe(anchors.unsafe_text, safe, chunk_size=chunk_size, safe_keys=keys, dtype=dtype)
    targets = Targets(index, similarity, key)
    if anchors.fingerprint:
        _cache.save_entry(folder, key, {"index": index, "similarity": similarity}, meta)
    own = targets.redirected(dataset)
    logger.info("Nearest-safe targets for %d pairs: %d (%.1f%%) point to a safe caption other than their own pair's%s.",
                n, int(own.sum()), 100.0 * float(own.float().mean()) if n else 0.0,
                f", {100.0 * targets.extra_share(dataset):.1f}% to an extra caption" if extras else "")
    return targets
