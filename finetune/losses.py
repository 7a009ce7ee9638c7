"""SaFeR-CLIP and Safe-CLIP loss terms (docs/METHOD.md §4) and their combiners.

Every term is a pure function of embedding tensors: no model runs in here, so each one is
tested on its own against hand-computed values. Notation follows docs/METHOD.md:

=========  ==================================================================
name       meaning
=========  ==================================================================
``t``       ``T(t)``: trainable text encoder on the safe caption, ``(B, D)``
``t_star``  ``T(t*)``: trainable text encoder on the unsafe caption
``t0``      ``T0(t)``: frozen text encoder on the safe caption
``t0_star`` ``T0(t*)``: frozen text encoder on the unsafe caption
``t0_hat``  ``T0(t̂)``: frozen text encoder on the nearest safe caption (Safe-CLIP: the fixed pair)
``v`` …     the same for images: ``V(v)``, ``V(v*)``, ``V0(v)``, ``V0(v*)``, ``V0(v̂)``
``h, h0``   token states ``(B, L, H)`` of ``T`` and ``T0`` on the safe caption (the ``--token_layer``)
``h_star``  token states of ``T`` on the unsafe caption
``h0_hat``  token states of ``T0`` on the nearest safe caption (Safe-CLIP: the fixed pair)
=========  ==================================================================

Cosines are computed with :func:`torch.nn.functional.cosine_similarity`, so the inputs do not
have to be normalised (for L2-normalised inputs it is the dot product). InfoNCE normalises its
inputs as CLIP does before the logits. Every term returns the mean over the batch.

The combiners (:class:`SaferClipLoss`, :class:`SafeClipLoss` with its ``image`` and text-only ``text``
variants) follow open_clip's pattern: an ``nn.Module`` returning a dict of named terms plus ``"loss"``,
the weighted total, so a new term never touches the training loop. Terms whose inputs are ``None`` are
skipped; the names of the terms that were computed are in the output dict and in ``last_active_terms``.

Weights: :func:`resolve_loss_weights` is the one rule for ``--loss_weights`` (merged into the defaults,
or replacing them with ``--loss_weights_mode replace``); :data:`TERM_INPUTS` is the one table of which
inputs each term needs (the trainer reads it to know, before the first step, which terms will run).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_LOGIT_SCALE",
    "LOSS_CHOICES",
    "PRESERVATION_TERMS",
    "REDIRECTION_TERMS",
    "SAFER_CLIP_TERMS",
    "SAFE_CLIP_TERMS",
    "SAFE_CLIP_TEXT_TERMS",
    "SAFE_CLIP_TEXT_WEIGHTS",
    "SAFE_CLIP_VARIANTS",
    "SAFE_CLIP_WEIGHTS",
    "TERM_INPUTS",
    "TOKEN_LAYERS",
    "WEIGHTS_MODES",
    "GatherFn",
    "SafeClipLoss",
    "SaferClipLoss",
    "available_terms",
    "build_loss",
    "check_weights",
    "default_weights",
    "distributed_gather",
    "info_nce",
    "loss_terms",
    "nce_redir_tt_loss",
    "nce_tt_loss",
    "PAIR_FORMS",
    "PAIR_TERMS",
    "pair_pres_loss",
    "pres_cross_loss",
    "pres_img_loss",
    "pres_txt_loss",
    "relative_img_loss",
    "relative_tt_loss",
    "relative_txt_loss",
    "resolve_loss_weights",
    "safe_clip_weights",
    "safer_clip_default_weights",
    "token_pres_loss",
    "token_redir_loss",
    "uni_img_loss",
    "uni_txt_loss",
]

#: CLIP's logit scale (exp of the learned temperature, clamped at 100 in CLIP).
DEFAULT_LOGIT_SCALE = 100.0

#: ``gather(x) -> (all_x, offset)``: concatenation of ``x`` over all ranks (keeping the autograd
#: graph of the local rows) and the row index of this rank's first row in ``all_x``.
GatherFn = Callable[[Tensor], tuple[Tensor, int]]


# ----------------------------------------------------------------------------- helpers


def _check_2d(**tensors: Tensor | None) -> None:
    """Every given tensor is (B, D) with the same B and D; raise a ValueError naming the argument otherwise."""
    ref_name, ref_shape = None, None
    for name, x in tensors.items():
        if x is None:
            continue
        if not isinstance(x, Tensor):
            raise ValueError(f"`{name}` must be a torch.Tensor of shape (B, D), got {type(x).__name__}.")
        if x.dim() != 2:
            raise ValueError(f"`{name}` must have shape (B, D), got shape {tuple(x.shape)}; pass pooled embeddings.")
        if ref_shape is None:
            ref_name, ref_shape = name, x.shape
        elif x.shape != ref_shape:
            raise ValueError(
                f"`{name}` has shape {tuple(x.shape)} but `{ref_name}` has shape {tuple(ref_shape)}; "
                "all embeddings of one batch must have the same (B, D)."
            )


def _check_scale(scale: float, name: str = "scale") -> None:
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"`{name}` must be a finite number > 0, got {scale!r}.")


def _cos(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine similarity, (B, D) x (B, D) -> (B,)."""
    return F.cosine_similarity(a, b, dim=-1)


# ----------------------------------------------------------------------------- InfoNCE


def info_nce(a: Tensor, b: Tensor, logit_scale: float = DEFAULT_LOGIT_SCALE, gather: GatherFn | None = None) -> Tensor:
    r"""Symmetric CLIP InfoNCE between two aligned batches.

    .. math::
        \mathrm{InfoNCE}(A, B) = \tfrac12\Big[\tfrac1B\sum_i -\log \frac{e^{s\,a_i\cdot b_i}}{\sum_j e^{s\,a_i\cdot b_j}}
        + \tfrac1B\sum_i -\log \frac{e^{s\,b_i\cdot a_i}}{\sum_j e^{s\,b_i\cdot a_j}}\Big]

    with ``a``, ``b`` L2-normalised here and ``s = logit_scale``. Row ``i`` of ``a`` and of ``b``
    are the positive pair; every other row of the (gathered) batch is a negative.

    Multi-GPU (DDP): pass ``gather`` (e.g. :func:`distributed_gather`). Each rank then scores its
    local rows against the features of *all* ranks: logits ``(B_local, B_global)`` and labels
    ``arange(B_local) + offset`` where ``offset`` is this rank's first row in the gathered tensor.
    ``gather`` must keep the autograd graph of the local rows (``torch.distributed.nn`` all-gather
    does), so gradients reach the local encoder; DDP's gradient averaging then yields the gradient
    of the global-batch loss when all ranks have the same batch size. With ``gather=None`` the
    batch is the local batch (single process).

    Args:
        a (`Tensor` of shape `(B, D)`): first modality, e.g. ``T(t)``.
        b (`Tensor` of shape `(B, D)`): second modality, e.g. ``V0(v)``.
        logit_scale (`float`, defaults to 100): inverse temperature ``s``.
        gather (`callable`, *optional*): ``gather(x) -> (all_x, offset)``, see above.

    Returns:
        `Tensor` of shape `()`: the mean of both directions' cross-entropies.
    """
    _check_2d(a=a, b=b)
    _check_scale(logit_scale, "logit_scale")
    a = F.normalize(a, dim=-1)
    b = F.normalize(b, dim=-1)
    if gather is None:
        all_a, all_b, offset = a, b, 0
    else:
        all_a, offset_a = gather(a)
        all_b, offset_b = gather(b)
        if offset_a != offset_b:
            raise ValueError(f"`gather` returned different offsets for the two modalities ({offset_a} vs {offset_b}).")
        offset = int(offset_a)
    labels = torch.arange(a.shape[0], device=a.device) + offset
    logits_a = logit_scale * a @ all_b.T  # (B, B_global)
    logits_b = logit_scale * b @ all_a.T
    return 0.5 * (F.cross_entropy(logits_a, labels) + F.cross_entropy(logits_b, labels))


def distributed_gather(x: Tensor) -> tuple[Tensor, int]:
    """All-gather ``x`` (B, D) over the default process group, keeping gradients of the local rows.

    A :data:`GatherFn` for :func:`info_nce` under ``torch.distributed`` (DDP / accelerate).
    Ranks may hold different batch sizes (the last batch): rows are padded to the largest batch
    for the collective and the padding is dropped again. Identity when torch.distributed is not
    initialised or the world has one process.

    Returns:
        ``(all_x, offset)``: the rows of every rank in rank order, and the index of this rank's first row.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    world, rank = dist.get_world_size(), dist.get_rank()
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s.item()) for s in sizes]
    padded = F.pad(x, (0, 0, 0, max(sizes) - x.shape[0]))
    parts = all_gather(padded)  # autograd-aware: the gradient of our own slice flows back to x
    all_x = torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)
    return all_x, sum(sizes[:rank])


# ----------------------------------------------------------------------------- SaFeR-CLIP terms


def _relative(anchor: Tensor, negative: Tensor, positive: Tensor, scale: float) -> Tensor:
    _check_2d(anchor=anchor, negative=negative, positive=positive)
    _check_scale(scale)
    return F.softplus(scale * (_cos(anchor, negative) - _cos(anchor, positive))).mean()


def relative_img_loss(v_star: Tensor, t0_star: Tensor, t0_hat: Tensor, scale: float = 1.0) -> Tensor:
    r"""Relative cross-modal redirection, image branch.

    .. math:: L_{rel\_img} = \operatorname{mean}_i\ \mathrm{softplus}\big(s\,[\cos(V(v^*_i), T_0(t^*_i)) - \cos(V(v^*_i), T_0(\hat t_i))]\big)

    The only negative is the sample's own unsafe caption; no in-batch negatives.

    Args:
        v_star (`(B, D)`): ``V(v*)``, trainable vision encoder on the unsafe image.
        t0_star (`(B, D)`): ``T0(t*)``, frozen text embedding of the unsafe caption (negative).
        t0_hat (`(B, D)`): ``T0(t̂)``, frozen text embedding of the nearest safe caption (positive).
        scale (`float`, defaults to 1): ``s`` (see :class:`SaferClipLoss`).

    Returns:
        `Tensor` of shape `()`.
    """
    return _relative(v_star, t0_star, t0_hat, scale)


def relative_txt_loss(t_star: Tensor, v0_star: Tensor, v0_hat: Tensor, scale: float = 1.0) -> Tensor:
    r"""Relative cross-modal redirection, text branch.

    .. math:: L_{rel\_txt} = \operatorname{mean}_i\ \mathrm{softplus}\big(s\,[\cos(T(t^*_i), V_0(v^*_i)) - \cos(T(t^*_i), V_0(\hat v_i))]\big)

    Args:
        t_star (`(B, D)`): ``T(t*)``, trainable text encoder on the unsafe caption.
        v0_star (`(B, D)`): ``V0(v*)``, frozen embedding of the unsafe image (negative).
        v0_hat (`(B, D)`): ``V0(v̂)``, frozen embedding of the image paired with the nearest safe caption (positive).
        scale (`float`, defaults to 1): ``s``.

    Returns:
        `Tensor` of shape `()`.
    """
    return _relative(t_star, v0_star, v0_hat, scale)


def relative_tt_loss(t_star: Tensor, t0_star: Tensor, t0_hat: Tensor, scale: float = 1.0) -> Tensor:
    r"""Relative text-only redirection (docs/METHOD.md decision, for caption-only data such as ViSU-Text).

    .. math:: L_{rel\_tt} = \operatorname{mean}_i\ \mathrm{softplus}\big(s\,[\cos(T(t^*_i), T_0(t^*_i)) - \cos(T(t^*_i), T_0(\hat t_i))]\big)

    Args:
        t_star (`(B, D)`): ``T(t*)``.
        t0_star (`(B, D)`): ``T0(t*)`` (negative: where the pretrained model put the unsafe caption).
        t0_hat (`(B, D)`): ``T0(t̂)`` (positive: the nearest safe caption).
        scale (`float`, defaults to 1): ``s``.

    Returns:
        `Tensor` of shape `()`.
    """
    return _relative(t_star, t0_star, t0_hat, scale)


def uni_txt_loss(t_star: Tensor, t0_hat: Tensor) -> Tensor:
    r"""Proximity uni-modal redirection, text.

    .. math:: L_{uni\_txt} = \operatorname{mean}_i\ [1 - \cos(T(t^*_i), T_0(\hat t_i))]

    Args:
        t_star (`(B, D)`): ``T(t*)``.
        t0_hat (`(B, D)`): ``T0(t̂)``.

    Returns:
        `Tensor` of shape `()`.
    """
    _check_2d(t_star=t_star, t0_hat=t0_hat)
    return (1.0 - _cos(t_star, t0_hat)).mean()


def uni_img_loss(v_star: Tensor, v0_hat: Tensor) -> Tensor:
    r"""Proximity uni-modal redirection, image.

    .. math:: L_{uni\_img} = \operatorname{mean}_i\ [1 - \cos(V(v^*_i), V_0(\hat v_i))]

    Args:
        v_star (`(B, D)`): ``V(v*)``.
        v0_hat (`(B, D)`): ``V0(v̂)``.

    Returns:
        `Tensor` of shape `()`.
    """
    _check_2d(v_star=v_star, v0_hat=v0_hat)
    return (1.0 - _cos(v_star, v0_hat)).mean()


def pres_txt_loss(t: Tensor, t0: Tensor) -> Tensor:
    r"""Text preservation.

    .. math:: L_{pres\_txt} = \operatorname{mean}_i\ [1 - \cos(T(t_i), T_0(t_i))]

    Args:
        t (`(B, D)`): ``T(t)``.
        t0 (`(B, D)`): ``T0(t)``.

    Returns:
        `Tensor` of shape `()`.
    """
    _check_2d(t=t, t0=t0)
    return (1.0 - _cos(t, t0)).mean()


def pres_img_loss(v: Tensor, v0: Tensor) -> Tensor:
    r"""Image preservation.

    .. math:: L_{pres\_img} = \operatorname{mean}_i\ [1 - \cos(V(v_i), V_0(v_i))]

    Args:
        v (`(B, D)`): ``V(v)``.
        v0 (`(B, D)`): ``V0(v)``.

    Returns:
        `Tensor` of shape `()`.
    """
    _check_2d(v=v, v0=v0)
    return (1.0 - _cos(v, v0)).mean()


def pres_cross_loss(
    t: Tensor | None,
    v0: Tensor | None,
    t0: Tensor | None,
    v: Tensor | None,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    gather: GatherFn | None = None,
) -> Tensor:
    r"""Cross-modal preservation.

    .. math:: L_{pres\_x} = \mathrm{InfoNCE}(T(t), V_0(v)) + \mathrm{InfoNCE}(T_0(t), V(v))

    A half whose inputs are ``None`` is left out: with a frozen vision tower ``V = V0`` and the
    second half is a constant, so pass ``v=None``; with a frozen text tower pass ``t=None``.

    Args:
        t (`(B, D)` or `None`): ``T(t)``.
        v0 (`(B, D)` or `None`): ``V0(v)``.
        t0 (`(B, D)` or `None`): ``T0(t)``.
        v (`(B, D)` or `None`): ``V(v)``.
        logit_scale (`float`, defaults to 100): InfoNCE inverse temperature.
        gather (`callable`, *optional*): cross-rank gather for in-batch negatives, see :func:`info_nce`.

    Returns:
        `Tensor` of shape `()`.
    """
    _check_2d(t=t, v0=v0, t0=t0, v=v)
    parts = []
    if t is not None and v0 is not None:
        parts.append(info_nce(t, v0, logit_scale, gather))
    if t0 is not None and v is not None:
        parts.append(info_nce(t0, v, logit_scale, gather))
    if not parts:
        raise ValueError("`pres_cross_loss` needs (`t`, `v0`) and/or (`t0`, `v`); got neither complete pair.")
    return sum(parts[1:], parts[0])


def token_pres_loss(h: Tensor, h0: Tensor, mask: Tensor | None = None) -> Tensor:
    r"""Token-level preservation (docs/METHOD.md decision, optional): what the UNet sees for safe prompts.

    .. math:: L_{tok} = \frac{\sum_{b,l} m_{bl}\ \frac1H \lVert h_{bl} - h^0_{bl}\rVert^2}{\sum_{b,l} m_{bl}}

    i.e. the mean squared error over the hidden dimension, averaged over real (non-padding)
    tokens of the whole batch. Using the per-element mean (not the squared norm) keeps the
    term's size independent of the width ``H``.

    Args:
        h (`(B, L, H)`): token states of ``T`` on the safe captions, at the ``--token_layer`` (last: the final
            layer after its layer norm, what SD 1.x reads; penultimate: ``hidden_states[-2]``, what SDXL reads).
        h0 (`(B, L, H)`): the same states of ``T0`` on the same tokens.
        mask (`(B, L)` bool or 0/1, *optional*): 1 for real tokens (the tokenizer's attention mask).
            ``None`` counts every position.

    Returns:
        `Tensor` of shape `()`.
    """
    if not isinstance(h, Tensor) or not isinstance(h0, Tensor) or h.dim() != 3 or h.shape != h0.shape:
        raise ValueError(
            f"`h` and `h0` must be tensors of the same shape (B, L, H), got {tuple(getattr(h, 'shape', ()))} "
            f"and {tuple(getattr(h0, 'shape', ()))}."
        )
    per_token = (h - h0).pow(2).mean(dim=-1)  # (B, L)
    if mask is None:
        return per_token.mean()
    if mask.shape != h.shape[:2]:
        raise ValueError(f"`mask` must have shape (B, L) = {tuple(h.shape[:2])}, got {tuple(mask.shape)}.")
    m = mask.to(per_token.dtype)
    n = m.sum()
    if n.item() == 0:
        raise ValueError("`mask` selects no token; every caption has at least its start and end token.")
    return (per_token * m).sum() / n


def _masked_mean(h: Tensor, mask: Tensor, name: str) -> Tensor:
    """Mean of ``h`` (B, L, H) over the positions where ``mask`` (B, L) is set -> (B, H)."""
    if mask.shape != h.shape[:2]:
        raise ValueError(f"`{name}` must have shape (B, L) = {tuple(h.shape[:2])}, got {tuple(mask.shape)}.")
    m = mask.to(h.dtype).unsqueeze(-1)
    count = m.sum(dim=1)
    if bool((count == 0).any()):
        raise ValueError(f"`{name}` selects no token in some row; every caption has at least one real token.")
    return (h * m).sum(dim=1) / count


def token_redir_loss(h_star: Tensor, h0_hat: Tensor, mask_star: Tensor, mask_hat: Tensor) -> Tensor:
    r"""Token-level redirection (docs/METHOD.md decision, optional): what the UNet sees for unsafe prompts.

    .. math::
        \bar h^*_i = \frac{\sum_l m^*_{il}\, h^*_{il}}{\sum_l m^*_{il}}, \qquad
        \bar h^0_i = \frac{\sum_l \hat m_{il}\, \hat h^0_{il}}{\sum_l \hat m_{il}}, \qquad
        L_{tok\_redir} = \operatorname{mean}_i\ [1 - \cos(\bar h^*_i, \bar h^0_i)]

    The trained token states of the unsafe caption ``t*_i``, mean-pooled over its tokens, are pulled toward the
    frozen token states of its target ``t̂_i``, mean-pooled over *its* tokens. The two captions have different
    lengths and word orders, so position ``l`` of one is not position ``l`` of the other: pooling each over its
    own mask compares what each caption as a whole conveys (a cosine, so the term's size does not depend on the
    states' scale or width). The trainer's masks leave out the start token: its state is the same for every
    caption (CLIP is causal) and in pretrained CLIPs an outlier of large norm that would dominate the mean.

    Args:
        h_star (`(B, L, H)`): token states of ``T`` on the unsafe captions (the ``--token_layer``).
        h0_hat (`(B, L', H)`): token states of ``T0`` on their targets (``L'`` may differ from ``L``).
        mask_star (`(B, L)` bool or 0/1): the unsafe captions' tokens that count.
        mask_hat (`(B, L')` bool or 0/1): the targets' tokens that count.

    Returns:
        `Tensor` of shape `()`.
    """
    for name, x in (("h_star", h_star), ("h0_hat", h0_hat)):
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise ValueError(f"`{name}` must be a tensor of shape (B, L, H), got {tuple(getattr(x, 'shape', ()))}.")
    if h_star.shape[0] != h0_hat.shape[0] or h_star.shape[2] != h0_hat.shape[2]:
        raise ValueError(f"`h_star` {tuple(h_star.shape)} and `h0_hat` {tuple(h0_hat.shape)} must share B and H.")
    a = _masked_mean(h_star.float(), mask_star, "mask_star")
    b = _masked_mean(h0_hat.float(), mask_hat, "mask_hat")
    return (1.0 - _cos(a, b)).mean()


# ----------------------------------------------------------------------------- Safe-CLIP text-only analogue terms


def nce_tt_loss(t: Tensor, t0: Tensor, logit_scale: float = DEFAULT_LOGIT_SCALE, gather: GatherFn | None = None) -> Tensor:
    r"""Text-space InfoNCE preservation of the text-only Safe-CLIP baseline (docs/METHOD.md §4.6).

    .. math:: L_{nce\_tt} = \mathrm{InfoNCE}(T(t), T_0(t))

    The text analogue of Safe-CLIP's ``nce_txt`` = InfoNCE(T(t), V0(v)): the frozen embedding of the
    same safe caption takes the place of its frozen image. Each safe caption must stay nearer to its
    own frozen embedding than to the other captions' frozen embeddings in the (gathered) batch.

    Args:
        t (`(B, D)`): ``T(t)``, trainable text encoder on the safe captions.
        t0 (`(B, D)`): ``T0(t)``, frozen embeddings of the same captions.
        logit_scale (`float`, defaults to 100): InfoNCE inverse temperature.
        gather (`callable`, *optional*): cross-rank gather for in-batch negatives, see :func:`info_nce`.

    Returns:
        `Tensor` of shape `()`.
    """
    _check_2d(t=t, t0=t0)
    return info_nce(t, t0, logit_scale, gather)


def nce_redir_tt_loss(t_star: Tensor, t0_hat: Tensor, logit_scale: float = DEFAULT_LOGIT_SCALE, gather: GatherFn | None = None) -> Tensor:
    r"""Text-space InfoNCE redirection of the text-only Safe-CLIP baseline (docs/METHOD.md §4.6).

    .. math:: L_{nce\_redir\_tt} = \mathrm{InfoNCE}(T(t^*), T_0(\hat t))

    The text analogue of Safe-CLIP's ``nce_redir_txt`` = InfoNCE(T(t*), V0(v)): each unsafe caption is
    pulled to the frozen embedding of its paired safe caption (Safe-CLIP's fixed pair, ``t̂ = t``) and
    pushed away from the other rows' paired safe captions.

    Args:
        t_star (`(B, D)`): ``T(t*)``, trainable text encoder on the unsafe captions.
        t0_hat (`(B, D)`): ``T0(t̂)``, frozen embeddings of their paired safe captions (row-aligned).
        logit_scale (`float`, defaults to 100): InfoNCE inverse temperature.
        gather (`callable`, *optional*): cross-rank gather for in-batch negatives, see :func:`info_nce`.

    Returns:
        `Tensor` of shape `()`.
    """
    _check_2d(t_star=t_star, t0_hat=t0_hat)
    return info_nce(t_star, t0_hat, logit_scale, gather)


# ----------------------------------------------------------------------------- paired safe-twin preservation (issue 16 item 6)


#: Forms of the twins' drift d_i in :func:`pair_pres_loss`.
PAIR_FORMS = ("cosine", "distance")
_DIST_EPS = 1e-8


def pair_pres_loss(t_pair: Tensor, t0_pair: Tensor, margin: float = 0.0, form: str = "cosine") -> Tensor:
    r"""Paired safe-twin preservation (docs/METHOD.md §4.7, project decision, off by default).

    .. math::
        L_{pres\_pair} = \operatorname{mean}_i\ \max\big(0,\ d_i - \delta\big), \qquad
        d_i = 1 - \cos(T(t_i), T_0(t_i)) \ \text{(cosine)} \quad\text{or}\quad
        d_i = \sqrt{2\,[1 - \cos(T(t_i), T_0(t_i))] + \varepsilon} - \sqrt{\varepsilon} \ \text{(distance)}

    where row ``i`` is the **own paired safe caption** ``t_i`` of the batch's unsafe row ``t*_i`` (the minimal-edit
    safe twin), so the twin is held in place in the same step in which its unsafe caption is redirected: the
    update has to move what the two captions do *not* share. ``form="distance"`` is the Euclidean distance of the
    L2-normalised embeddings (ε = 1e-8 keeps the gradient finite at zero drift): unlike ``1 - cos``, which is
    quadratic in the distance, its pull does not vanish as the drift shrinks, so it holds the twins from the first
    step. ``δ`` (``margin``, default 0) is a drift budget in the same unit: a twin whose ``d_i`` is within ``δ``
    costs nothing.

    Args:
        t_pair (`(B, D)`): ``T(t_i)``, trainable text encoder on the unsafe rows' own paired safe captions.
        t0_pair (`(B, D)`): ``T0(t_i)``, frozen embeddings of the same captions.
        margin (`float`, defaults to 0): ``δ`` >= 0, the drift each twin may have without loss.
        form (`str`, defaults to `"cosine"`): ``"cosine"`` or ``"distance"`` (:data:`PAIR_FORMS`).

    Returns:
        `Tensor` of shape `()`.
    """
    _check_2d(t_pair=t_pair, t0_pair=t0_pair)
    _check_margin(margin)
    _check_pair_form(form)
    drift = 1.0 - _cos(t_pair, t0_pair)
    if form == "distance":
        drift = torch.sqrt(2.0 * drift.clamp(min=0.0) + _DIST_EPS) - math.sqrt(_DIST_EPS)
    return torch.clamp(drift - margin, min=0.0).mean()


def _check_pair_form(form: str) -> None:
    if form not in PAIR_FORMS:
        raise ValueError(f"`pair_form` must be one of {list(PAIR_FORMS)}, got {form!r}.")


def _check_margin(margin: float) -> None:
    if isinstance(margin, bool) or not (isinstance(margin, (int, float)) and math.isfinite(margin) and 0 <= margin < 2):
        raise ValueError(f"`pair_margin` must be a finite number in [0, 2), got {margin!r}.")


# ----------------------------------------------------------------------------- weights

#: SaFeR-CLIP redirection terms (weighted together as one group).
REDIRECTION_TERMS = ("rel_img", "rel_txt", "rel_tt", "uni_txt", "uni_img")
#: SaFeR-CLIP preservation terms (one group). The token term has its own weight (``token_weight``).
PRESERVATION_TERMS = ("pres_txt", "pres_img", "pres_x")
#: SaFeR-CLIP terms outside both groups, default weight 0 (on only when named in ``--loss_weights``): the paired
#: safe-twin preservation (:func:`pair_pres_loss`, docs/METHOD.md §4.7).
PAIR_TERMS = ("pres_pair",)
#: Every weighted SaFeR-CLIP term.
SAFER_CLIP_TERMS = REDIRECTION_TERMS + PRESERVATION_TERMS + PAIR_TERMS
_TOKEN_TERM = "token_pres"
_TOKEN_REDIR_TERM = "token_redir"
#: ``--token_layer``: the text tower's token states the token terms read. ``last``: the final layer after its
#: layer norm (``last_hidden_state``, what SD 1.x cross-attends to); ``penultimate``: ``hidden_states[-2]``, no
#: final layer norm (what SDXL's UNet reads from both encoders, and SD 2.x from its 23-layer export).
TOKEN_LAYERS = ("last", "penultimate")
#: Total weight of each SaFeR-CLIP group (redirection, preservation) with automatic weights (docs/METHOD.md decision).
_GROUP_WEIGHT = 0.5
#: The combiners, by their ``--loss`` name.
LOSS_CHOICES = ("safer_clip", "safe_clip")
#: How ``--loss_weights`` combines with the defaults: ``merge`` (named terms override, the others keep their
#: default; a term named at 0 is off) or ``replace`` (only the named terms, the others off).
WEIGHTS_MODES = ("merge", "replace")
#: Safe-CLIP variants: ``image`` = the paper's eight terms (needs images), ``text`` = the text-only analogue.
SAFE_CLIP_VARIANTS = ("image", "text")

#: Safe-CLIP's eight terms (fixed ViSU pair as target, InfoNCE for cross-modal redirection).
SAFE_CLIP_TERMS = {
    "pres_txt": "1 - cos(T(t), T0(t))",
    "redir_txt": "1 - cos(T(t*), T0(t))",
    "pres_img": "1 - cos(V(v), V0(v))",
    "redir_img": "1 - cos(V(v*), V0(v))",
    "nce_txt": "InfoNCE(T(t), V0(v))",
    "nce_redir_txt": "InfoNCE(T(t*), V0(v))",
    "nce_img": "InfoNCE(T0(t), V(v))",
    "nce_redir_img": "InfoNCE(T0(t), V(v*))",
}
#: Safe-CLIP's raw default weights (docs/METHOD.md §4.6 table).
SAFE_CLIP_WEIGHTS = {
    "pres_txt": 0.1,
    "redir_txt": 0.1,
    "pres_img": 0.1,
    "redir_img": 0.2,
    "nce_txt": 0.25,
    "nce_redir_txt": 0.25,
    "nce_img": 0.25,
    "nce_redir_img": 0.5,
}
#: The text-only Safe-CLIP analogue (docs/METHOD.md §4.6): the image version's text-tower terms with the
#: frozen image replaced by the frozen embedding of the (paired) safe caption.
SAFE_CLIP_TEXT_TERMS = {
    "pres_txt": "1 - cos(T(t), T0(t))",
    "redir_txt": "1 - cos(T(t*), T0(t))",
    "nce_tt": "InfoNCE(T(t), T0(t))",
    "nce_redir_tt": "InfoNCE(T(t*), T0(t))",
}
#: Its raw weights: those of the image version's text terms (pres_txt, redir_txt 0.1; nce_txt, nce_redir_txt 0.25).
SAFE_CLIP_TEXT_WEIGHTS = {"pres_txt": 0.1, "redir_txt": 0.1, "nce_tt": 0.25, "nce_redir_tt": 0.25}
_SAFE_CLIP_VARIANT_WEIGHTS = {"image": SAFE_CLIP_WEIGHTS, "text": SAFE_CLIP_TEXT_WEIGHTS}

#: The inputs each weighted term needs: a tuple of alternatives, each a tuple of input names; the term runs when
#: every input of at least one alternative is given. The one table both combiners and the trainer read.
TERM_INPUTS: dict[str, dict[str, tuple[tuple[str, ...], ...]]] = {
    "safer_clip": {
        "rel_img": (("v_star", "t0_star", "t0_hat"),),
        "rel_txt": (("t_star", "v0_star", "v0_hat"),),
        "rel_tt": (("t_star", "t0_star", "t0_hat"),),
        "uni_txt": (("t_star", "t0_hat"),),
        "uni_img": (("v_star", "v0_hat"),),
        "pres_txt": (("t", "t0"),),
        "pres_img": (("v", "v0"),),
        "pres_x": (("t", "v0"), ("t0", "v")),
        "pres_pair": (("t_pair", "t0_pair"),),
    },
    "safe_clip": {
        "pres_txt": (("t", "t0"),),
        "redir_txt": (("t_star", "t0_hat"),),
        "pres_img": (("v", "v0"),),
        "redir_img": (("v_star", "v0_hat"),),
        "nce_txt": (("t", "v0"),),
        "nce_redir_txt": (("t_star", "v0_hat"),),
        "nce_img": (("t0", "v"),),
        "nce_redir_img": (("t0_hat", "v_star"),),
        "nce_tt": (("t", "t0"),),
        "nce_redir_tt": (("t_star", "t0_hat"),),
    },
}


def _check_loss(loss: str) -> None:
    if loss not in LOSS_CHOICES:
        raise ValueError(f"`--loss` must be one of {list(LOSS_CHOICES)}, got {loss!r}.")


def _check_variant(variant: str) -> None:
    if variant not in SAFE_CLIP_VARIANTS:
        raise ValueError(f"`--safe_clip_variant` must be one of {list(SAFE_CLIP_VARIANTS)} (or auto in the config), got {variant!r}.")


def loss_terms(loss: str, variant: str | None = None) -> tuple[str, ...]:
    """Names of the weighted terms of ``loss``; the token term is separate.

    ``variant`` (``safe_clip`` only): ``"image"`` or ``"text"``; ``None`` lists the terms of both variants.
    """
    _check_loss(loss)
    if loss == "safer_clip":
        return SAFER_CLIP_TERMS
    if variant is None:
        return tuple(dict.fromkeys([*SAFE_CLIP_WEIGHTS, *SAFE_CLIP_TEXT_WEIGHTS]))
    _check_variant(variant)
    return tuple(_SAFE_CLIP_VARIANT_WEIGHTS[variant])


def available_terms(loss: str, inputs: set[str] | frozenset[str], variant: str | None = None) -> list[str]:
    """The weighted terms of ``loss`` (and ``variant``) whose inputs are all among ``inputs`` (names such as ``"t_star"``)."""
    table = TERM_INPUTS["safer_clip" if loss == "safer_clip" else "safe_clip"]
    return [name for name in loss_terms(loss, variant) if any(set(alt) <= set(inputs) for alt in table[name])]


def check_weights(weights: Mapping[str, float], loss: str, argument: str = "weights", variant: str | None = None) -> dict[str, float]:
    """Validate term -> weight for ``loss`` (and ``variant``): known term names, finite numbers >= 0. Returns them as floats.

    Raises:
        ValueError: naming ``argument`` (e.g. ``--loss_weights``), the term or value, and the known terms.
    """
    known = loss_terms(loss, variant)
    if not isinstance(weights, Mapping):
        raise ValueError(f"`{argument}` must be TERM=WEIGHT items, got {weights!r}.")
    out = {}
    for name, w in weights.items():
        if name not in known:
            if loss == "safe_clip" and variant is not None and name in loss_terms(loss):
                other = "text" if variant == "image" else "image"
                raise ValueError(f"`{argument}` term {name!r} belongs to the Safe-CLIP {other} variant, but this run uses "
                                 f"`--safe_clip_variant {variant}`; its terms: {', '.join(known)}.")
            raise ValueError(f"`{argument}` has unknown term {name!r} for `--loss {loss}`; known terms: {', '.join(known)}.")
        if isinstance(w, bool) or not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise ValueError(f"`{argument}` {name}={w!r}: a weight must be a finite number >= 0.")
        out[name] = float(w)
    return out


def _check_mode(mode: str) -> None:
    if mode not in WEIGHTS_MODES:
        raise ValueError(f"`--loss_weights_mode` must be one of {list(WEIGHTS_MODES)}, got {mode!r}.")


def safer_clip_default_weights(available: Iterable[str]) -> dict[str, float]:
    """SaFeR-CLIP's automatic weights (docs/METHOD.md §4.5) for a call or run in which the ``available`` terms have inputs.

    Each group (redirection, preservation) shares 0.5, split evenly among its available terms. ``rel_tt``, the
    text-space stand-in for ``rel_txt`` (a project decision for caption-only data), counts only when ``rel_txt``
    is not available (no unsafe images); name it in ``--loss_weights`` to use it alongside ``rel_txt``.

    Returns:
        every SaFeR-CLIP term -> weight (0 for the terms that are off).
    """
    avail = set(available)
    if "rel_txt" in avail:
        avail.discard("rel_tt")
    out = dict.fromkeys(SAFER_CLIP_TERMS, 0.0)
    for group in (REDIRECTION_TERMS, PRESERVATION_TERMS):
        members = [name for name in group if name in avail]
        out.update({name: _GROUP_WEIGHT / len(members) for name in members})
    return out


def default_weights(loss: str, available: Iterable[str] | None = None, variant: str = "image") -> dict[str, float]:
    """The default raw weights of ``loss``: SaFeR-CLIP's automatic split over ``available`` terms (every term when
    ``None``), or the Safe-CLIP ``variant``'s table."""
    _check_loss(loss)
    if loss == "safer_clip":
        return safer_clip_default_weights(SAFER_CLIP_TERMS if available is None else available)
    _check_variant(variant)
    return dict(_SAFE_CLIP_VARIANT_WEIGHTS[variant])


def resolve_loss_weights(
    loss: str,
    weights: Mapping[str, float] | None = None,
    mode: str = "merge",
    available: Iterable[str] | None = None,
    variant: str = "image",
    argument: str = "weights",
) -> dict[str, float]:
    """The raw weight of every term of ``loss``: the defaults with ``weights`` merged in, or ``weights`` alone.

    ``mode="merge"`` (the default, ``--loss_weights_mode merge``): every named term gets its weight, every other
    term keeps its default, a term named at 0 is off. ``mode="replace"``: the named terms only, all others 0.
    Safe-CLIP's normalisation (:func:`safe_clip_weights`) is applied afterwards, to this resolved dict.

    Example (caption-only SaFeR-CLIP, defaults rel_tt = uni_txt = 0.25, pres_txt = 0.5)::

        >>> w = resolve_loss_weights("safer_clip", {"rel_tt": 0.3}, available=["rel_tt", "uni_txt", "pres_txt"])
        >>> w["rel_tt"], w["uni_txt"], w["pres_txt"]
        (0.3, 0.25, 0.5)
        >>> w = resolve_loss_weights("safer_clip", {"rel_tt": 0.3}, "replace")
        >>> w["rel_tt"], w["uni_txt"], w["pres_txt"]
        (0.3, 0.0, 0.0)

    Returns:
        term -> raw weight, for every term of ``loss`` (and ``variant``).
    """
    _check_mode(mode)
    named = {} if weights is None else check_weights(weights, loss, argument, variant if loss == "safe_clip" else None)
    if mode == "replace":
        if not named:
            raise ValueError(f"`{argument}` is empty in replace mode (`--loss_weights_mode replace`): every term would be off; "
                             "name at least one TERM=WEIGHT, or use merge mode.")
        return {name: named.get(name, 0.0) for name in loss_terms(loss, variant if loss == "safe_clip" else None)}
    return {**default_weights(loss, available, variant), **named}


def safe_clip_weights(raw: Mapping[str, float] | None = None, variant: str = "image") -> dict[str, float]:
    """Safe-CLIP's effective weights: ``raw`` (the variant's resolved weights) normalised to sum 1, then divided by the
    variant's number of terms K (8, or 4 for the text variant), as Safe-CLIP's reference code averages its terms.

    The rule maps a dict that already sums to 1/K onto itself, so recorded effective weights reproduce the run. With
    the image defaults: 0.1 / 1.75 / 8 = 0.00714..., ..., 0.5 / 1.75 / 8 = 0.0357...; they sum to 1/8. Text defaults:
    0.1 / 0.7 / 4 = 0.0357 (pres_txt, redir_txt) and 0.25 / 0.7 / 4 = 0.0893 (nce_tt, nce_redir_tt); they sum to 1/4.
    """
    _check_variant(variant)
    terms = tuple(_SAFE_CLIP_VARIANT_WEIGHTS[variant])
    raw = dict(_SAFE_CLIP_VARIANT_WEIGHTS[variant] if raw is None else check_weights(raw, "safe_clip", "weights", variant))
    total = sum(raw.values())
    if total <= 0:
        raise ValueError(f"`weights` must have a positive sum, got {raw}.")
    return {name: raw.get(name, 0.0) / total / len(terms) for name in terms}


def _check_token_weight(token_weight: float, name: str = "token_weight") -> None:
    if not (isinstance(token_weight, (int, float)) and math.isfinite(token_weight) and token_weight >= 0):
        raise ValueError(f"`{name}` must be a finite number >= 0, got {token_weight!r}.")


def _present(**tensors: Tensor | None) -> set[str]:
    return {name for name, x in tensors.items() if x is not None}


def _active_weights(weights: Mapping[str, float], available: Sequence[str], renormalize_active: bool) -> dict[str, float]:
    """The weights of the terms that run in this call: positive weight and inputs present, in ``available``'s order.

    ``renormalize_active``: when a positive-weight term is skipped (inputs absent), rescale the active weights so they
    sum to the total of all positive weights; otherwise the skipped terms' share is simply not trained.
    """
    active = {name: weights[name] for name in available if weights.get(name, 0.0) > 0}
    if renormalize_active and active:
        wanted = sum(w for w in weights.values() if w > 0)
        have = sum(active.values())
        if have < wanted:
            active = {name: w * wanted / have for name, w in active.items()}
    return active


class _Combiner(nn.Module):
    """Shared forward of the combiners: compute the active terms, weight and sum them, add the token term."""

    loss_name = ""
    token_weight: float
    token_redir_weight: float
    last_active_terms: list[str]
    last_weights: dict[str, float]

    def _terms(self, **inputs) -> dict[str, Callable[[], Tensor]]:  # pragma: no cover - overridden
        raise NotImplementedError

    def _weights(self, available: list[str]) -> dict[str, float]:  # pragma: no cover - overridden
        raise NotImplementedError

    def weights_for(self, inputs: set[str] | frozenset[str]) -> dict[str, float]:
        """Every term's static weight (before ``renormalize_active``) in calls given exactly these ``inputs``."""
        return self._weights(available_terms(self.loss_name, inputs, getattr(self, "variant", None)))

    def forward(
        self,
        t: Tensor | None = None,
        t_star: Tensor | None = None,
        t0: Tensor | None = None,
        t0_star: Tensor | None = None,
        t0_hat: Tensor | None = None,
        v: Tensor | None = None,
        v_star: Tensor | None = None,
        v0: Tensor | None = None,
        v0_star: Tensor | None = None,
        v0_hat: Tensor | None = None,
        h: Tensor | None = None,
        h0: Tensor | None = None,
        token_mask: Tensor | None = None,
        h_star: Tensor | None = None,
        h0_hat: Tensor | None = None,
        token_mask_star: Tensor | None = None,
        token_mask_hat: Tensor | None = None,
        t_pair: Tensor | None = None,
        t0_pair: Tensor | None = None,
    ) -> dict[str, Tensor]:
        tensors = dict(t=t, t_star=t_star, t0=t0, t0_star=t0_star, t0_hat=t0_hat, v=v, v_star=v_star, v0=v0, v0_star=v0_star, v0_hat=v0_hat,
                       t_pair=t_pair, t0_pair=t0_pair)  # fmt: skip
        _check_2d(**tensors)
        tensors = self._prepare(tensors)
        available = available_terms(self.loss_name, _present(**tensors), getattr(self, "variant", None))
        weights = _active_weights(self._weights(available), available, self.renormalize_active)
        compute = self._terms(**tensors)
        if self.token_weight > 0 and h is not None and h0 is not None:
            weights[_TOKEN_TERM] = self.token_weight
            compute[_TOKEN_TERM] = lambda: token_pres_loss(h, h0, token_mask)
        if self.token_redir_weight > 0 and h_star is not None and h0_hat is not None:
            weights[_TOKEN_REDIR_TERM] = self.token_redir_weight
            compute[_TOKEN_REDIR_TERM] = lambda: token_redir_loss(h_star, h0_hat, token_mask_star, token_mask_hat)
        if not weights:
            raise ValueError(self._nothing_message)
        out: dict[str, Tensor] = {}
        total = None
        for name, w in weights.items():
            value = compute[name]()
            out[name] = value
            total = w * value if total is None else total + w * value
        self.last_active_terms = list(weights)
        self.last_weights = dict(weights)
        return {"loss": total, **out}

    def _prepare(self, tensors: dict[str, Tensor | None]) -> dict[str, Tensor | None]:
        return tensors


class SaferClipLoss(_Combiner):
    r"""SaFeR-CLIP total loss: a weighted sum of the docs/METHOD.md §4 terms whose inputs are present.

    Terms and the inputs they need (``None`` inputs skip the term; :data:`TERM_INPUTS`):

    ===============  ===========================================  ==============
    term             equation                                     inputs
    ===============  ===========================================  ==============
    ``rel_img``      :func:`relative_img_loss`                    v_star, t0_star, t0_hat
    ``rel_txt``      :func:`relative_txt_loss`                    t_star, v0_star, v0_hat
    ``rel_tt``       :func:`relative_tt_loss`                     t_star, t0_star, t0_hat
    ``uni_txt``      :func:`uni_txt_loss`                         t_star, t0_hat
    ``uni_img``      :func:`uni_img_loss`                         v_star, v0_hat
    ``pres_txt``     :func:`pres_txt_loss`                        t, t0
    ``pres_img``     :func:`pres_img_loss`                        v, v0
    ``pres_x``       :func:`pres_cross_loss`                      (t, v0) and/or (t0, v)
    ``pres_pair``    :func:`pair_pres_loss` (weight 0 unless named)       t_pair, t0_pair
    ``token_pres``   :func:`token_pres_loss` (only if token_weight > 0)   h, h0, token_mask
    ``token_redir``  :func:`token_redir_loss` (only if token_redir_weight > 0)   h_star, h0_hat, token_mask_star/_hat
    ===============  ===========================================  ==============

    Weights (docs/METHOD.md §4.5): the defaults (:func:`safer_clip_default_weights`, per call over the terms whose
    inputs are present) give each group, redirection and preservation, 0.5 split evenly over its present terms;
    ``rel_tt`` counts only when ``rel_txt`` has no inputs. E.g. caption-only data: ``rel_tt`` = ``uni_txt`` = 0.25,
    ``pres_txt`` = 0.5. ``weights`` (``--loss_weights``) are merged into these defaults (``weights_mode="merge"``:
    a term named at 0 is off) or replace them (``"replace"``: unnamed terms are off), see
    :func:`resolve_loss_weights`. ``token_pres`` and ``token_redir`` are outside the groups: they are added with ``token_weight`` and
    ``token_redir_weight``; so is ``pres_pair`` (:data:`PAIR_TERMS`), default weight 0, on when ``--loss_weights pres_pair=W`` names it.

    Args:
        weights (`dict[str, float]`, *optional*): per-term weights (see above).
        scale (`float`, defaults to 1.0): ``s``, the scale inside the relative losses' softplus.
            The paper uses none (s = 1). Evidence (docs/METHOD.md §8): s = 1 redirected more than the Safe-CLIP
            terms at every learning rate tried, with slightly less drift of safe captions at matched redirection;
            s >= 5 drifted more than Safe-CLIP; s = 2-3 is the "stronger redirection" setting; never use s >= 10
            (a warning is logged).
        token_weight (`float`, defaults to 0): weight of the token-level preservation term; 0 disables it.
        token_redir_weight (`float`, defaults to 0): weight of the token-level redirection term; 0 disables it.
        gather (`callable`, *optional*): cross-rank gather for InfoNCE, see :func:`info_nce`.
        weights_mode (`str`, defaults to `"merge"`): ``"merge"`` or ``"replace"``.
        renormalize_active (`bool`, defaults to False): when a term with a positive weight has no inputs in a call,
            rescale the active terms' weights to the total of the positive weights (False: that share is not trained).
        pair_margin (`float`, defaults to 0): ``δ``, the drift budget of ``pres_pair`` (:func:`pair_pres_loss`).
        pair_form (`str`, defaults to `"cosine"`): the twins' drift in ``pres_pair``: ``"cosine"`` or ``"distance"``.

    InfoNCE (``pres_x``) uses CLIP's logit scale :data:`DEFAULT_LOGIT_SCALE`.

    Returns (``forward``):
        `dict`: ``"loss"`` the weighted total, and every active term's unweighted value under its
        name. ``self.last_active_terms`` lists the active term names and ``self.last_weights`` the
        weights used.
    """

    loss_name = "safer_clip"
    _nothing_message = ("No SaFeR-CLIP loss term has its inputs and a positive weight: pass at least `t_star`, `t0_star`, "
                        "`t0_hat` (text redirection) or `t`, `t0` (text preservation).")

    def __init__(
        self,
        weights: Mapping[str, float] | None = None,
        scale: float = 1.0,
        token_weight: float = 0.0,
        gather: GatherFn | None = None,
        weights_mode: str = "merge",
        renormalize_active: bool = False,
        token_redir_weight: float = 0.0,
        pair_margin: float = 0.0,
        pair_form: str = "cosine",
    ):
        super().__init__()
        _check_scale(scale)
        _check_margin(pair_margin)
        _check_pair_form(pair_form)
        if scale >= 10:
            logger.warning("Relative-loss scale s=%s >= 10: docs/METHOD.md evidence says never use s >= 10 (s >= 5 already drifts more than Safe-CLIP).", scale)
        elif scale >= 5:
            logger.warning("Relative-loss scale s=%s >= 5 drifted more than Safe-CLIP in docs/METHOD.md's measurements.", scale)
        _check_token_weight(token_weight)
        _check_token_weight(token_redir_weight, "token_redir_weight")
        _check_mode(weights_mode)
        self.weights = None if weights is None else check_weights(weights, "safer_clip", "weights")
        if weights_mode == "replace":
            resolve_loss_weights("safer_clip", self.weights, "replace")  # an empty dict is refused here, not at the first step
        self.weights_mode = weights_mode
        self.renormalize_active = bool(renormalize_active)
        self.scale = float(scale)
        self.pair_margin = float(pair_margin)
        self.pair_form = pair_form
        self.logit_scale = DEFAULT_LOGIT_SCALE
        self.token_weight = float(token_weight)
        self.token_redir_weight = float(token_redir_weight)
        self.gather = gather
        self.last_active_terms: list[str] = []
        self.last_weights: dict[str, float] = {}

    def extra_repr(self) -> str:
        return (f"scale={self.scale}, token_weight={self.token_weight}, weights={self.weights or 'auto'}, "
                f"weights_mode={self.weights_mode}, renormalize_active={self.renormalize_active}, pair_margin={self.pair_margin}, "
                f"pair_form={self.pair_form}")

    def _weights(self, available: list[str]) -> dict[str, float]:
        return resolve_loss_weights("safer_clip", self.weights, self.weights_mode, available)

    def _terms(self, t, t_star, t0, t0_star, t0_hat, v, v_star, v0, v0_star, v0_hat, t_pair=None, t0_pair=None) -> dict[str, Callable[[], Tensor]]:
        s = self.scale
        return {
            "rel_img": lambda: relative_img_loss(v_star, t0_star, t0_hat, s),
            "rel_txt": lambda: relative_txt_loss(t_star, v0_star, v0_hat, s),
            "rel_tt": lambda: relative_tt_loss(t_star, t0_star, t0_hat, s),
            "uni_txt": lambda: uni_txt_loss(t_star, t0_hat),
            "uni_img": lambda: uni_img_loss(v_star, v0_hat),
            "pres_txt": lambda: pres_txt_loss(t, t0),
            "pres_img": lambda: pres_img_loss(v, v0),
            "pres_x": lambda: pres_cross_loss(t, v0, t0, v, self.logit_scale, self.gather),
            "pres_pair": lambda: pair_pres_loss(t_pair, t0_pair, self.pair_margin, self.pair_form),
        }


class SafeClipLoss(_Combiner):
    r"""The Safe-CLIP baseline loss (Poppi et al., ECCV 2024), image version or its text-only analogue (docs/METHOD.md §4.6).

    ``variant="image"``, the paper's eight terms:

    ==================  ==========================  ========  ===================
    term                equation                    weight    inputs
    ==================  ==========================  ========  ===================
    ``pres_txt``        1 - cos(T(t), T0(t))        0.1       t, t0
    ``redir_txt``       1 - cos(T(t*), T0(t))       0.1       t_star, t0_hat
    ``pres_img``        1 - cos(V(v), V0(v))        0.1       v, v0
    ``redir_img``       1 - cos(V(v*), V0(v))       0.2       v_star, v0_hat
    ``nce_txt``         InfoNCE(T(t), V0(v))        0.25      t, v0
    ``nce_redir_txt``   InfoNCE(T(t*), V0(v))       0.25      t_star, v0_hat
    ``nce_img``         InfoNCE(T0(t), V(v))        0.25      t0, v
    ``nce_redir_img``   InfoNCE(T0(t), V(v*))       0.5       t0_hat, v_star
    ==================  ==========================  ========  ===================

    ``variant="text"``, for caption-only data: the two cosine terms and the text analogues of the image version's
    text-tower InfoNCE terms, with the same raw weights (:func:`nce_tt_loss`, :func:`nce_redir_tt_loss`):

    ==================  ==========================  ========  ===================
    ``pres_txt``        1 - cos(T(t), T0(t))        0.1       t, t0
    ``redir_txt``       1 - cos(T(t*), T0(t))       0.1       t_star, t0_hat
    ``nce_tt``          InfoNCE(T(t), T0(t))        0.25      t, t0
    ``nce_redir_tt``    InfoNCE(T(t*), T0(t))       0.25      t_star, t0_hat
    ==================  ==========================  ========  ===================

    Safe-CLIP's target is the *fixed* pair: pass ``t0_hat = t0`` and ``v0_hat = v0`` for the unsafe rows' own
    pairs (when ``t0_hat``/``v0_hat`` are ``None`` they default to ``t0``/``v0``). The resolved raw weights
    (:func:`resolve_loss_weights`: ``weights`` merged into the variant's defaults, or replacing them) are normalised
    to sum 1 and divided by the variant's term count (:func:`safe_clip_weights`), as the reference code does.
    Terms without inputs are skipped; their weight is not redistributed unless ``renormalize_active`` (the
    reference trains both towers, so a frozen tower's terms are constants there).

    Args:
        weights (`dict[str, float]`, *optional*): raw weights (defaults: the variant's table above).
        token_weight (`float`, defaults to 0): optional token-level preservation term (not in Safe-CLIP).
        token_redir_weight (`float`, defaults to 0): optional token-level redirection term toward the pair (not in Safe-CLIP).
        gather (`callable`, *optional*): cross-rank gather for InfoNCE, see :func:`info_nce`.
        variant (`str`, defaults to `"image"`): ``"image"`` or ``"text"``.
        weights_mode (`str`, defaults to `"merge"`): ``"merge"`` or ``"replace"``, see :func:`resolve_loss_weights`.
        renormalize_active (`bool`, defaults to False): rescale the active terms to the total of the positive weights.

    InfoNCE uses CLIP's logit scale :data:`DEFAULT_LOGIT_SCALE`.
    """

    loss_name = "safe_clip"
    _nothing_message = "No Safe-CLIP loss term has its inputs and a positive weight: pass at least `t`, `t0` or `t_star`, `t0_hat`."

    def __init__(
        self,
        weights: Mapping[str, float] | None = None,
        token_weight: float = 0.0,
        gather: GatherFn | None = None,
        variant: str = "image",
        weights_mode: str = "merge",
        renormalize_active: bool = False,
        token_redir_weight: float = 0.0,
    ):
        super().__init__()
        _check_token_weight(token_weight)
        _check_token_weight(token_redir_weight, "token_redir_weight")
        _check_variant(variant)
        self.variant = variant
        self.weights_mode = weights_mode
        self.renormalize_active = bool(renormalize_active)
        self.raw_weights = resolve_loss_weights("safe_clip", weights, weights_mode, variant=variant)
        self.weights = safe_clip_weights(self.raw_weights, variant)
        self.logit_scale = DEFAULT_LOGIT_SCALE
        self.token_weight = float(token_weight)
        self.token_redir_weight = float(token_redir_weight)
        self.gather = gather
        self.last_active_terms: list[str] = []
        self.last_weights: dict[str, float] = {}

    def extra_repr(self) -> str:
        return f"variant={self.variant}, weights={self.weights}, token_weight={self.token_weight}, renormalize_active={self.renormalize_active}"

    def _weights(self, available: list[str]) -> dict[str, float]:
        return dict(self.weights)

    def _prepare(self, tensors):
        tensors = dict(tensors)
        if tensors["t0_hat"] is None:
            tensors["t0_hat"] = tensors["t0"]
        if tensors["v0_hat"] is None:
            tensors["v0_hat"] = tensors["v0"]
        return tensors

    def _terms(self, t, t_star, t0, t0_star, t0_hat, v, v_star, v0, v0_star, v0_hat, t_pair=None, t0_pair=None) -> dict[str, Callable[[], Tensor]]:
        ls, g = self.logit_scale, self.gather
        return {
            "pres_txt": lambda: pres_txt_loss(t, t0),
            "redir_txt": lambda: uni_txt_loss(t_star, t0_hat),
            "pres_img": lambda: pres_img_loss(v, v0),
            "redir_img": lambda: uni_img_loss(v_star, v0_hat),
            "nce_txt": lambda: info_nce(t, v0, ls, g),
            "nce_redir_txt": lambda: info_nce(t_star, v0_hat, ls, g),
            "nce_img": lambda: info_nce(t0, v, ls, g),
            "nce_redir_img": lambda: info_nce(t0_hat, v_star, ls, g),
            "nce_tt": lambda: nce_tt_loss(t, t0, ls, g),
            "nce_redir_tt": lambda: nce_redir_tt_loss(t_star, t0_hat, ls, g),
        }


def build_loss(
    loss: str,
    weights: Mapping[str, float] | None = None,
    scale: float = 1.0,
    token_weight: float = 0.0,
    gather: GatherFn | None = None,
    *,
    weights_mode: str = "merge",
    renormalize_active: bool = False,
    variant: str = "image",
    token_redir_weight: float = 0.0,
    pair_margin: float = 0.0,
    pair_form: str = "cosine",
) -> nn.Module:
    """The combiner named by ``--loss``: :class:`SaferClipLoss` (uses ``scale`` and ``pair_margin``) or :class:`SafeClipLoss`
    (uses ``variant``)."""
    _check_loss(loss)
    w = None if weights is None else dict(weights)
    if loss == "safer_clip":
        return SaferClipLoss(weights=w, scale=scale, token_weight=token_weight, gather=gather, weights_mode=weights_mode,
                             renormalize_active=renormalize_active, token_redir_weight=token_redir_weight, pair_margin=pair_margin,
                             pair_form=pair_form)  # fmt: skip
    return SafeClipLoss(weights=w, token_weight=token_weight, gather=gather, variant=variant, weights_mode=weights_mode,
                        renormalize_active=renormalize_active, token_redir_weight=token_redir_weight)  # fmt: skip
