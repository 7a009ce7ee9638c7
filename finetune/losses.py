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
``h, h0``   last hidden states ``(B, L, H)`` of ``T`` and ``T0`` on the safe caption
=========  ==================================================================

Cosines are computed with :func:`torch.nn.functional.cosine_similarity`, so the inputs do not
have to be normalised (for L2-normalised inputs it is the dot product). InfoNCE normalises its
inputs as CLIP does before the logits. Every term returns the mean over the batch.

The combiners (:class:`SaferClipLoss`, :class:`SafeClipLoss`) follow open_clip's pattern: an
``nn.Module`` returning a dict of named terms plus ``"loss"``, the weighted total, so a new term
never touches the training loop. Terms whose inputs are ``None`` are skipped; the names of the
terms that were computed are in the output dict and in ``last_active_terms``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_LOGIT_SCALE",
    "LOSS_CHOICES",
    "PRESERVATION_TERMS",
    "REDIRECTION_TERMS",
    "SAFE_CLIP_TERMS",
    "SAFE_CLIP_WEIGHTS",
    "GatherFn",
    "SafeClipLoss",
    "SaferClipLoss",
    "build_loss",
    "check_weights",
    "distributed_gather",
    "info_nce",
    "pres_cross_loss",
    "pres_img_loss",
    "pres_txt_loss",
    "relative_img_loss",
    "relative_tt_loss",
    "relative_txt_loss",
    "loss_terms",
    "safe_clip_weights",
    "token_pres_loss",
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
        h (`(B, L, H)`): last hidden states of ``T`` on the safe captions.
        h0 (`(B, L, H)`): last hidden states of ``T0`` on the same tokens.
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


# ----------------------------------------------------------------------------- combiners

#: SaFeR-CLIP redirection terms (weighted together as one group).
REDIRECTION_TERMS = ("rel_img", "rel_txt", "rel_tt", "uni_txt", "uni_img")
#: SaFeR-CLIP preservation terms (one group). The token term has its own weight (``token_weight``).
PRESERVATION_TERMS = ("pres_txt", "pres_img", "pres_x")
_TOKEN_TERM = "token_pres"
#: Total weight of each SaFeR-CLIP group (redirection, preservation) with automatic weights (docs/METHOD.md decision).
_GROUP_WEIGHT = 0.5
#: The combiners, by their ``--loss`` name.
LOSS_CHOICES = ("safer_clip", "safe_clip")


def loss_terms(loss: str) -> tuple[str, ...]:
    """Names of the weighted terms of ``loss`` (``"safer_clip"`` or ``"safe_clip"``); the token term is separate."""
    if loss not in LOSS_CHOICES:
        raise ValueError(f"`--loss` must be one of {list(LOSS_CHOICES)}, got {loss!r}.")
    return REDIRECTION_TERMS + PRESERVATION_TERMS if loss == "safer_clip" else tuple(SAFE_CLIP_TERMS)


def check_weights(weights: Mapping[str, float], loss: str, argument: str = "weights") -> dict[str, float]:
    """Validate term -> weight for ``loss``: known term names, finite numbers >= 0. Returns them as floats.

    Raises:
        ValueError: naming ``argument`` (e.g. ``--loss_weights``), the term or value, and the known terms.
    """
    known = loss_terms(loss)
    out = {}
    for name, w in weights.items():
        if name not in known:
            raise ValueError(f"`{argument}` has unknown term {name!r} for `--loss {loss}`; known terms: {', '.join(known)}.")
        if isinstance(w, bool) or not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise ValueError(f"`{argument}` {name}={w!r}: a weight must be a finite number >= 0.")
        out[name] = float(w)
    return out


def _check_token_weight(token_weight: float) -> None:
    if not (isinstance(token_weight, (int, float)) and math.isfinite(token_weight) and token_weight >= 0):
        raise ValueError(f"`token_weight` must be a finite number >= 0, got {token_weight!r}.")


class SaferClipLoss(nn.Module):
    r"""SaFeR-CLIP total loss: a weighted sum of the docs/METHOD.md §4 terms whose inputs are present.

    Terms and the inputs they need (``None`` inputs skip the term):

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
    ``token_pres``   :func:`token_pres_loss` (only if token_weight > 0)   h, h0, token_mask
    ===============  ===========================================  ==============

    Weights (docs/METHOD.md decision): with ``weights=None`` the redirection terms share 0.5 and the
    preservation terms share 0.5, split evenly among the terms of each group that are active in
    this call (inputs present). E.g. caption-only data: ``rel_tt`` = ``uni_txt`` = 0.25,
    ``pres_txt`` = 0.5. With an explicit ``weights`` dict (``--loss_weights``), each named term gets
    that fixed weight and terms not named are disabled. ``token_pres`` is outside the groups: it is
    added with ``token_weight`` (default 0 = off).

    Args:
        weights (`dict[str, float]`, *optional*): fixed per-term weights (see above).
        scale (`float`, defaults to 1.0): ``s``, the scale inside the relative losses' softplus.
            The paper uses none (s = 1). Evidence (docs/METHOD.md §4, measured on a real pretrained
            sentence encoder with the text-only terms): s = 1 redirected more than the Safe-CLIP
            terms at every learning rate tried, with slightly less drift of safe captions at
            matched redirection; s >= 5 drifted more than Safe-CLIP; s = 2-3 is the "stronger
            redirection" setting; never use s >= 10 (a warning is logged).
        token_weight (`float`, defaults to 0): weight of the token-level preservation term; 0 disables it.
        gather (`callable`, *optional*): cross-rank gather for InfoNCE, see :func:`info_nce`.

    InfoNCE (``pres_x``) uses CLIP's logit scale :data:`DEFAULT_LOGIT_SCALE`.

    Returns (``forward``):
        `dict`: ``"loss"`` the weighted total, and every active term's unweighted value under its
        name. ``self.last_active_terms`` lists the active term names and ``self.last_weights`` the
        weights used.
    """

    def __init__(
        self,
        weights: dict[str, float] | None = None,
        scale: float = 1.0,
        token_weight: float = 0.0,
        gather: GatherFn | None = None,
    ):
        super().__init__()
        _check_scale(scale)
        if scale >= 10:
            logger.warning("Relative-loss scale s=%s >= 10: docs/METHOD.md evidence says never use s >= 10 (s >= 5 already drifts more than Safe-CLIP).", scale)
        elif scale >= 5:
            logger.warning("Relative-loss scale s=%s >= 5 drifted more than Safe-CLIP in docs/METHOD.md's measurements.", scale)
        _check_token_weight(token_weight)
        self.weights = None if weights is None else check_weights(weights, "safer_clip", "weights")
        self.scale = float(scale)
        self.logit_scale = DEFAULT_LOGIT_SCALE
        self.token_weight = float(token_weight)
        self.gather = gather
        self.last_active_terms: list[str] = []
        self.last_weights: dict[str, float] = {}

    def extra_repr(self) -> str:
        return f"scale={self.scale}, token_weight={self.token_weight}, weights={self.weights or 'auto'}"

    def _enabled(self, name: str) -> bool:
        return True if self.weights is None else self.weights.get(name, 0.0) > 0

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
    ) -> dict[str, Tensor]:
        _check_2d(t=t, t_star=t_star, t0=t0, t0_star=t0_star, t0_hat=t0_hat, v=v, v_star=v_star, v0=v0, v0_star=v0_star, v0_hat=v0_hat)
        s = self.scale

        def have(*xs):
            return all(x is not None for x in xs)

        candidates = {
            "rel_img": (have(v_star, t0_star, t0_hat), lambda: relative_img_loss(v_star, t0_star, t0_hat, s)),
            "rel_txt": (have(t_star, v0_star, v0_hat), lambda: relative_txt_loss(t_star, v0_star, v0_hat, s)),
            "rel_tt": (have(t_star, t0_star, t0_hat), lambda: relative_tt_loss(t_star, t0_star, t0_hat, s)),
            "uni_txt": (have(t_star, t0_hat), lambda: uni_txt_loss(t_star, t0_hat)),
            "uni_img": (have(v_star, v0_hat), lambda: uni_img_loss(v_star, v0_hat)),
            "pres_txt": (have(t, t0), lambda: pres_txt_loss(t, t0)),
            "pres_img": (have(v, v0), lambda: pres_img_loss(v, v0)),
            "pres_x": (have(t, v0) or have(t0, v), lambda: pres_cross_loss(t, v0, t0, v, self.logit_scale, self.gather)),
        }
        active = [name for name, (ok, _) in candidates.items() if ok and self._enabled(name)]
        if self.weights is not None:
            weights = {name: self.weights[name] for name in active}
        else:
            weights = {}
            for group, total in ((REDIRECTION_TERMS, _GROUP_WEIGHT), (PRESERVATION_TERMS, _GROUP_WEIGHT)):
                members = [name for name in active if name in group]
                weights.update({name: total / len(members) for name in members})
        if self.token_weight > 0 and have(h, h0):
            active.append(_TOKEN_TERM)
            weights[_TOKEN_TERM] = self.token_weight
            candidates[_TOKEN_TERM] = (True, lambda: token_pres_loss(h, h0, token_mask))
        if not active:
            raise ValueError(
                "No SaFeR-CLIP loss term has its inputs: pass at least `t_star`, `t0_star`, `t0_hat` (text redirection) "
                "or `t`, `t0` (text preservation)."
            )
        out: dict[str, Tensor] = {}
        total = None
        for name in active:
            value = candidates[name][1]()
            out[name] = value
            term = weights[name] * value
            total = term if total is None else total + term
        out = {"loss": total, **out}
        self.last_active_terms = list(active)
        self.last_weights = weights
        return out


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
#: Safe-CLIP's raw default weights (docs/METHOD.md §4 table).
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


def safe_clip_weights(raw: Mapping[str, float] | None = None) -> dict[str, float]:
    """Safe-CLIP's effective weights: ``raw`` normalised to sum 1, then divided by 8 (as its reference code does).

    With the defaults: 0.1 / 1.75 / 8 = 0.00714..., ..., 0.5 / 1.75 / 8 = 0.0357...; they sum to 1/8.
    """
    raw = dict(SAFE_CLIP_WEIGHTS if raw is None else check_weights(raw, "safe_clip", "weights"))
    total = sum(raw.values())
    if total <= 0:
        raise ValueError(f"`weights` must have a positive sum, got {raw}.")
    return {name: w / total / len(SAFE_CLIP_TERMS) for name, w in raw.items()}


class SafeClipLoss(nn.Module):
    r"""The Safe-CLIP baseline loss (Poppi et al., ECCV 2024): eight terms with fixed weights.

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

    Safe-CLIP's target is the *fixed* ViSU pair: pass ``t0_hat = t0`` and ``v0_hat = v0`` (when
    ``t0_hat``/``v0_hat`` are ``None`` they default to ``t0``/``v0``). Weights are normalised to
    sum 1 and divided by 8, as in the reference code (:func:`safe_clip_weights`); they are *not*
    renormalised when terms are skipped for missing inputs (the reference always had images), so
    a caption-only run trains with total weight (0.1 + 0.1) / 1.75 / 8.

    Args:
        weights (`dict[str, float]`, *optional*): raw weights (defaults: the table above).
        token_weight (`float`, defaults to 0): optional token-level preservation term (not in Safe-CLIP).
        gather (`callable`, *optional*): cross-rank gather for InfoNCE, see :func:`info_nce`.

    InfoNCE uses CLIP's logit scale :data:`DEFAULT_LOGIT_SCALE`.
    """

    def __init__(
        self,
        weights: dict[str, float] | None = None,
        token_weight: float = 0.0,
        gather: GatherFn | None = None,
    ):
        super().__init__()
        _check_token_weight(token_weight)
        self.weights = safe_clip_weights(weights)
        self.logit_scale = DEFAULT_LOGIT_SCALE
        self.token_weight = float(token_weight)
        self.gather = gather
        self.last_active_terms: list[str] = []
        self.last_weights: dict[str, float] = {}

    def extra_repr(self) -> str:
        return f"weights={self.weights}, token_weight={self.token_weight}"

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
    ) -> dict[str, Tensor]:
        _check_2d(t=t, t_star=t_star, t0=t0, t0_star=t0_star, t0_hat=t0_hat, v=v, v_star=v_star, v0=v0, v0_star=v0_star, v0_hat=v0_hat)
        t_pair = t0_hat if t0_hat is not None else t0
        v_pair = v0_hat if v0_hat is not None else v0
        ls, g = self.logit_scale, self.gather

        def have(*xs):
            return all(x is not None for x in xs)

        candidates = {
            "pres_txt": (have(t, t0), lambda: pres_txt_loss(t, t0)),
            "redir_txt": (have(t_star, t_pair), lambda: uni_txt_loss(t_star, t_pair)),
            "pres_img": (have(v, v0), lambda: pres_img_loss(v, v0)),
            "redir_img": (have(v_star, v_pair), lambda: uni_img_loss(v_star, v_pair)),
            "nce_txt": (have(t, v0), lambda: info_nce(t, v0, ls, g)),
            "nce_redir_txt": (have(t_star, v_pair), lambda: info_nce(t_star, v_pair, ls, g)),
            "nce_img": (have(t0, v), lambda: info_nce(t0, v, ls, g)),
            "nce_redir_img": (have(t_pair, v_star), lambda: info_nce(t_pair, v_star, ls, g)),
        }
        active = [name for name, (ok, _) in candidates.items() if ok and self.weights.get(name, 0.0) > 0]
        weights = {name: self.weights[name] for name in active}
        if self.token_weight > 0 and have(h, h0):
            active.append(_TOKEN_TERM)
            weights[_TOKEN_TERM] = self.token_weight
            candidates[_TOKEN_TERM] = (True, lambda: token_pres_loss(h, h0, token_mask))
        if not active:
            raise ValueError("No Safe-CLIP loss term has its inputs: pass at least `t`, `t0` or `t_star`, `t0_hat`.")
        out: dict[str, Tensor] = {}
        total = None
        for name in active:
            value = candidates[name][1]()
            out[name] = value
            term = weights[name] * value
            total = term if total is None else total + term
        self.last_active_terms = list(active)
        self.last_weights = weights
        return {"loss": total, **out}


def build_loss(loss: str, weights: Mapping[str, float] | None = None, scale: float = 1.0, token_weight: float = 0.0,
               gather: GatherFn | None = None) -> nn.Module:
    """The combiner named by ``--loss``: :class:`SaferClipLoss` (uses ``scale``) or :class:`SafeClipLoss`."""
    if loss not in LOSS_CHOICES:
        raise ValueError(f"`--loss` must be one of {list(LOSS_CHOICES)}, got {loss!r}.")
    if loss == "safer_clip":
        return SaferClipLoss(weights=None if weights is None else dict(weights), scale=scale, token_weight=token_weight, gather=gather)
    return SafeClipLoss(weights=None if weights is None else dict(weights), token_weight=token_weight, gather=gather)
