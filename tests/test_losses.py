"""Loss terms of METHOD.md §4: hand-computed values, a naive loop reference, gradients, combiners."""

import math

import pytest
import torch

from finetune import losses as L

# ----------------------------------------------------------------------------- hand-computed values
# 2-D unit vectors: e1 = (1, 0), e2 = (0, 1), p = (0.6, 0.8), q = (0.8, 0.6).
# cos(e1, p) = 0.6, cos(e1, q) = 0.8, cos(e2, p) = 0.8, cos(e2, q) = 0.6, cos(p, q) = 0.96.
E1, E2, P, Q = [1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]


def T(*rows, grad=False):
    return torch.tensor(rows, dtype=torch.float64, requires_grad=grad)


def softplus(x):
    return math.log1p(math.exp(x))


def test_relative_tt_by_hand():
    # row 0: cos(T(t*), T0(t*)) = cos(e1, p) = 0.6, cos(T(t*), T0(t^)) = cos(e1, q) = 0.8 -> softplus(1 * (0.6 - 0.8))
    # row 1: cos(e2, p) = 0.8, cos(e2, q) = 0.6 -> softplus(0.2)
    expected = (softplus(-0.2) + softplus(0.2)) / 2
    got = L.relative_tt_loss(T(E1, E2), T(P, P), T(Q, Q))
    assert got.item() == pytest.approx(expected, abs=1e-12)
    # scale s = 2: softplus(2 * (0.6 - 0.8)) = softplus(-0.4)
    assert L.relative_tt_loss(T(E1), T(P), T(Q), scale=2.0).item() == pytest.approx(softplus(-0.4), abs=1e-12)


def test_relative_cross_modal_by_hand():
    # L_rel_img = softplus(cos(V(v*), T0(t*)) - cos(V(v*), T0(t^))): v* = e1, t0* = q (0.8), t0^ = p (0.6) -> softplus(0.2)
    assert L.relative_img_loss(T(E1), T(Q), T(P)).item() == pytest.approx(softplus(0.2), abs=1e-12)
    # L_rel_txt with t* = e2, v0* = e2 (cos 1), v0^ = p (cos 0.8): softplus(3 * (1 - 0.8)) = softplus(0.6)
    assert L.relative_txt_loss(T(E2), T(E2), T(P), scale=3.0).item() == pytest.approx(softplus(0.6), abs=1e-12)
    # unnormalised inputs give the same cosines: 2*e1 vs 5*q and 0.5*p
    assert L.relative_img_loss(T([2.0, 0.0]), T([4.0, 3.0]), T([0.3, 0.4])).item() == pytest.approx(softplus(0.2), abs=1e-12)


def test_cosine_terms_by_hand():
    # uni_txt: mean(1 - cos(e1, q), 1 - cos(e2, e2)) = mean(0.2, 0) = 0.1
    assert L.uni_txt_loss(T(E1, E2), T(Q, E2)).item() == pytest.approx(0.1, abs=1e-12)
    # uni_img: 1 - cos(p, q) = 1 - 0.96 = 0.04
    assert L.uni_img_loss(T(P), T(Q)).item() == pytest.approx(0.04, abs=1e-12)
    # pres_txt: mean(1 - 0.6, 1 - 0.6) = 0.4
    assert L.pres_txt_loss(T(E1, E2), T(P, Q)).item() == pytest.approx(0.4, abs=1e-12)
    # pres_img: identical -> 0; opposite -> 2; mean = 1
    assert L.pres_img_loss(T(E1, E2), T(E1, [0.0, -1.0])).item() == pytest.approx(1.0, abs=1e-12)


def test_info_nce_by_hand():
    # a = [e1, e2], b = [p, e2], logit scale 1. a.b^T = [[0.6, 0], [0.8, 1]].
    # a->b: row0 CE = -0.6 + log(e^0.6 + e^0);  row1 CE = -1 + log(e^0.8 + e^1)
    # b->a: b0.a = [0.6, 0.8] -> -0.6 + log(e^0.6 + e^0.8);  b1.a = [0, 1] -> -1 + log(e^0 + e^1)
    e = math.exp
    a2b = ((-0.6 + math.log(e(0.6) + 1)) + (-1 + math.log(e(0.8) + e(1)))) / 2
    b2a = ((-0.6 + math.log(e(0.6) + e(0.8))) + (-1 + math.log(1 + e(1)))) / 2
    got = L.info_nce(T(E1, E2), T(P, E2), logit_scale=1.0)
    assert got.item() == pytest.approx((a2b + b2a) / 2, abs=1e-12)
    # identical orthonormal batches, scale 100: each CE = log(1 + e^-100)
    assert L.info_nce(T(E1, E2), T(E1, E2)).item() == pytest.approx(math.log1p(math.exp(-100.0)), rel=1e-6)


def test_pres_cross_by_hand():
    # InfoNCE(T(t), V0(v)) + InfoNCE(T0(t), V(v)); with only one half given, only that half.
    t, v0, t0, v = T(E1, E2), T(P, E2), T(E1, E2), T(E1, E2)
    both = L.pres_cross_loss(t, v0, t0, v, logit_scale=1.0)
    first = L.info_nce(t, v0, 1.0)
    second = L.info_nce(t0, v, 1.0)
    assert both.item() == pytest.approx(first.item() + second.item(), abs=1e-12)
    assert L.pres_cross_loss(t, v0, None, None, logit_scale=1.0).item() == pytest.approx(first.item(), abs=1e-12)


def test_text_safe_clip_nce_terms_by_hand():
    # nce_tt = InfoNCE(T(t), T0(t)); nce_redir_tt = InfoNCE(T(t*), T0(t_pair)). Same arithmetic as test_info_nce_by_hand:
    # a = [e1, e2] (trainable), b = [p, e2] (frozen), logit scale 1.
    e = math.exp
    a2b = ((-0.6 + math.log(e(0.6) + 1)) + (-1 + math.log(e(0.8) + e(1)))) / 2
    b2a = ((-0.6 + math.log(e(0.6) + e(0.8))) + (-1 + math.log(1 + e(1)))) / 2
    expected = (a2b + b2a) / 2
    assert L.nce_tt_loss(T(E1, E2), T(P, E2), logit_scale=1.0).item() == pytest.approx(expected, abs=1e-12)
    assert L.nce_redir_tt_loss(T(E1, E2), T(P, E2), logit_scale=1.0).item() == pytest.approx(expected, abs=1e-12)
    # one row: the only candidate is the positive, so both cross-entropies are 0
    assert L.nce_redir_tt_loss(T(E1), T(Q)).item() == pytest.approx(0.0, abs=1e-12)
    # the positive is the pair's frozen caption, not its own trainable one: swapping the frozen rows raises the loss
    swapped = L.nce_redir_tt_loss(T(E1, E2), T(E2, E1), logit_scale=1.0).item()
    assert swapped > L.nce_redir_tt_loss(T(E1, E2), T(E1, E2), logit_scale=1.0).item()
    with pytest.raises(ValueError, match="`t0_hat` has shape"):
        L.nce_redir_tt_loss(T(E1, E2), T(E1))


def test_token_pres_by_hand():
    # one caption, 3 positions, H = 2; mask [1, 1, 0].
    # token 0: diff (1, 1) -> mean sq 1; token 1: diff (2, 0) -> mean sq 2; token 2 (padding, diff (5, 5)) ignored -> (1 + 2) / 2
    h = T([[1.0, 1.0], [2.0, 0.0], [5.0, 5.0]])
    h0 = torch.zeros_like(h)
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    assert L.token_pres_loss(h, h0, mask).item() == pytest.approx(1.5, abs=1e-12)
    assert L.token_pres_loss(h, h0).item() == pytest.approx((1 + 2 + 25) / 3, abs=1e-12)


def test_token_redir_by_hand():
    # B = 2, H = 2. Row 0: unsafe states (1,0),(3,0) masked [1,1] -> mean (2,0); its target (0,1),(0,3),(9,9) masked
    # [1,1,0] -> mean (0,2): orthogonal, 1 - cos = 1. Row 1: unsafe (1,1),(5,5) masked [1,0] -> (1,1); target (2,2),(0,7),(0,0)
    # masked [1,0,0] -> (2,2): parallel, 1 - cos = 0. Mean over the batch: (1 + 0) / 2 = 0.5.
    h_star = T([[1.0, 0.0], [3.0, 0.0]], [[1.0, 1.0], [5.0, 5.0]])
    h0_hat = T([[0.0, 1.0], [0.0, 3.0], [9.0, 9.0]], [[2.0, 2.0], [0.0, 7.0], [0.0, 0.0]])
    m_star = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    m_hat = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert L.token_redir_loss(h_star, h0_hat, m_star, m_hat).item() == pytest.approx(0.5, abs=1e-12)
    # a 45-degree row: unsafe mean (1, 0), target mean (1, 1) -> 1 - 1/sqrt(2)
    one = L.token_redir_loss(T([[1.0, 0.0]]), T([[1.0, 1.0]]), torch.ones(1, 1), torch.ones(1, 1))
    assert one.item() == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-7)


def test_token_redir_gradient_and_bad_shapes(rand):
    h_star = rand(2, 4, 3).requires_grad_()
    h0_hat = rand(2, 6, 3)
    m_star = torch.ones(2, 4, dtype=torch.bool)
    m_star[:, 2:] = False
    m_hat = torch.ones(2, 6, dtype=torch.bool)
    L.token_redir_loss(h_star, h0_hat, m_star, m_hat).backward()
    assert torch.all(h_star.grad[:, 2:] == 0) and h_star.grad[:, :2].abs().sum() > 0 and h0_hat.grad is None
    with pytest.raises(ValueError, match=r"`h_star` \(2, 4, 3\) and `h0_hat` \(2, 6, 5\) must share B and H"):
        L.token_redir_loss(h_star, rand(2, 6, 5), m_star, m_hat)
    with pytest.raises(ValueError, match=r"`mask_hat` selects no token in some row"):
        L.token_redir_loss(h_star, h0_hat, m_star, torch.zeros(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"`mask_star` must have shape \(B, L\) = \(2, 4\)"):
        L.token_redir_loss(h_star, h0_hat, m_hat, m_hat)


def test_combiner_adds_token_redir_with_its_weight(rand):
    batch = _batch(rand, images=False)
    h_star, h0_hat = rand(len(batch["t"]), 5, 3), rand(len(batch["t"]), 4, 3)
    m_star, m_hat = torch.ones(h_star.shape[:2], dtype=torch.bool), torch.ones(h0_hat.shape[:2], dtype=torch.bool)
    loss = L.SaferClipLoss(token_redir_weight=0.7)
    out = loss(**batch, h_star=h_star, h0_hat=h0_hat, token_mask_star=m_star, token_mask_hat=m_hat)
    assert loss.last_weights["token_redir"] == 0.7 and "token_pres" not in out
    expected = L.SaferClipLoss()(**batch)["loss"] + 0.7 * L.token_redir_loss(h_star, h0_hat, m_star, m_hat)
    torch.testing.assert_close(out["loss"], expected)
    assert "token_redir" not in L.SaferClipLoss()(**batch, h_star=h_star, h0_hat=h0_hat)  # weight 0: off
    with pytest.raises(ValueError, match=r"`token_redir_weight` must be a finite number >= 0, got -1"):
        L.SaferClipLoss(token_redir_weight=-1)


# ----------------------------------------------------------------------------- naive loop references


def _ncos(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a)) / math.sqrt(sum(y * y for y in b))


def _naive_relative(anchor, neg, pos, s):
    rows = [softplus(s * (_ncos(x, n) - _ncos(x, p))) for x, n, p in zip(anchor, neg, pos)]
    return sum(rows) / len(rows)


def _naive_one_minus_cos(a, b):
    rows = [1 - _ncos(x, y) for x, y in zip(a, b)]
    return sum(rows) / len(rows)


def _naive_info_nce(a, b, s):
    n = len(a)

    def ce(x, y):
        total = 0.0
        for i in range(n):
            logits = [s * _ncos(x[i], y[j]) for j in range(n)]
            m = max(logits)
            total += -(logits[i] - m) + math.log(sum(math.exp(z - m) for z in logits))
        return total / n

    return 0.5 * (ce(a, b) + ce(b, a))


def _naive_token(h, h0, mask):
    num, den = 0.0, 0.0
    for b in range(len(h)):
        for pos in range(len(h[b])):
            if mask[b][pos]:
                num += sum((x - y) ** 2 for x, y in zip(h[b][pos], h0[b][pos])) / len(h[b][pos])
                den += 1
    return num / den


@pytest.fixture
def rand():
    g = torch.Generator().manual_seed(0)
    return lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)


def test_terms_match_naive_reference(rand):
    B, D = 5, 7
    a, b, c = rand(B, D), rand(B, D), rand(B, D)
    la, lb, lc = a.tolist(), b.tolist(), c.tolist()
    for s in (1.0, 2.5):
        ref = _naive_relative(la, lb, lc, s)
        for fn in (L.relative_img_loss, L.relative_txt_loss, L.relative_tt_loss):
            assert fn(a, b, c, scale=s).item() == pytest.approx(ref, abs=1e-10)
    ref = _naive_one_minus_cos(la, lb)
    for fn in (L.uni_txt_loss, L.uni_img_loss, L.pres_txt_loss, L.pres_img_loss):
        assert fn(a, b).item() == pytest.approx(ref, abs=1e-10)
    for s in (1.0, 10.0, 100.0):
        assert L.info_nce(a, b, logit_scale=s).item() == pytest.approx(_naive_info_nce(la, lb, s), rel=1e-9, abs=1e-9)
    ref_x = _naive_info_nce(la, lb, 100.0) + _naive_info_nce(lc, la, 100.0)
    for s in (1.0, 100.0):  # the text-only Safe-CLIP InfoNCE terms against the naive loop
        assert L.nce_tt_loss(a, b, logit_scale=s).item() == pytest.approx(_naive_info_nce(la, lb, s), rel=1e-9, abs=1e-9)
        assert L.nce_redir_tt_loss(c, b, logit_scale=s).item() == pytest.approx(_naive_info_nce(lc, lb, s), rel=1e-9, abs=1e-9)
    assert L.pres_cross_loss(a, b, c, a).item() == pytest.approx(ref_x, rel=1e-9)
    h, h0 = rand(3, 4, 6), rand(3, 4, 6)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert L.token_pres_loss(h, h0, mask).item() == pytest.approx(_naive_token(h.tolist(), h0.tolist(), mask.tolist()), abs=1e-10)


def test_gradcheck_terms(rand):
    a, b, c = (rand(3, 4).requires_grad_() for _ in range(3))
    assert torch.autograd.gradcheck(lambda x, y, z: L.relative_tt_loss(x, y, z, scale=2.0), (a, b, c))
    assert torch.autograd.gradcheck(lambda x, y: L.info_nce(x, y, logit_scale=3.0), (a, b))
    assert torch.autograd.gradcheck(L.uni_txt_loss, (a, b))


# ----------------------------------------------------------------------------- gradients reach only trainable inputs


def _batch(rand, B=4, D=6, images=True, grad=True):
    trainable = {k: rand(B, D).requires_grad_(grad) for k in ("t", "t_star", "v", "v_star")}
    frozen = {k: rand(B, D) for k in ("t0", "t0_star", "t0_hat", "v0", "v0_star", "v0_hat")}
    batch = {**trainable, **frozen}
    if not images:
        batch = {k: x for k, x in batch.items() if not k.startswith("v")}
    return batch


@pytest.mark.parametrize("make,trained", [
    (L.SaferClipLoss, ("t", "t_star", "v", "v_star")),
    (L.SafeClipLoss, ("t", "t_star", "v", "v_star")),
    (lambda: L.SafeClipLoss(variant="text"), ("t", "t_star")),
], ids=["safer_clip", "safe_clip_image", "safe_clip_text"])
def test_gradients_flow_only_to_trainable(rand, make, trained):
    batch = _batch(rand)
    out = make()(**batch)
    out["loss"].backward()
    for k in trained:
        assert batch[k].grad is not None and batch[k].grad.abs().sum() > 0, k
    for k in ("t0", "t0_star", "t0_hat", "v0", "v0_star", "v0_hat"):
        assert not batch[k].requires_grad and batch[k].grad is None, k


def test_token_term_gradient_only_to_h(rand):
    h = rand(2, 5, 3).requires_grad_()
    h0 = rand(2, 5, 3)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 3:] = False
    loss = L.token_pres_loss(h, h0, mask)
    loss.backward()
    assert torch.all(h.grad[0, 3:] == 0), "padding positions must get no gradient"
    assert h.grad[:, :3].abs().sum() > 0 and h0.grad is None


# ----------------------------------------------------------------------------- combiners


def test_safer_clip_caption_only_weights(rand):
    batch = _batch(rand, images=False)
    loss = L.SaferClipLoss()
    out = loss(**batch)
    assert loss.last_active_terms == ["rel_tt", "uni_txt", "pres_txt"]
    assert set(out) == {"loss", "rel_tt", "uni_txt", "pres_txt"}
    # redirection group 0.5 split over 2 terms, preservation group 0.5 over 1 term
    assert loss.last_weights == {"rel_tt": 0.25, "uni_txt": 0.25, "pres_txt": 0.5}
    expected = (0.25 * L.relative_tt_loss(batch["t_star"], batch["t0_star"], batch["t0_hat"])
                + 0.25 * L.uni_txt_loss(batch["t_star"], batch["t0_hat"]) + 0.5 * L.pres_txt_loss(batch["t"], batch["t0"]))
    assert out["loss"].item() == pytest.approx(expected.item(), abs=1e-12)


def test_safer_clip_with_images_weights_and_total(rand):
    batch = _batch(rand)
    loss = L.SaferClipLoss(scale=2.0)
    out = loss(**batch)
    # rel_tt (the caption-only stand-in for rel_txt) is off by default when rel_txt has its inputs
    redirection = [n for n in L.REDIRECTION_TERMS if n != "rel_tt"]
    assert loss.last_active_terms == redirection + list(L.PRESERVATION_TERMS)
    assert sum(loss.last_weights.values()) == pytest.approx(1.0)
    assert all(loss.last_weights[n] == pytest.approx(0.125) for n in redirection)
    assert all(loss.last_weights[n] == pytest.approx(0.5 / 3) for n in L.PRESERVATION_TERMS)
    total = sum(loss.last_weights[n] * out[n] for n in loss.last_active_terms)
    assert out["loss"].item() == pytest.approx(total.item(), abs=1e-12)
    assert out["rel_img"].item() == pytest.approx(L.relative_img_loss(batch["v_star"], batch["t0_star"], batch["t0_hat"], 2.0).item())


def test_safer_clip_frozen_vision_skips_half_of_pres_x(rand):
    batch = _batch(rand)
    del batch["v"], batch["v_star"]  # vision tower not trained: only V0 embeddings
    loss = L.SaferClipLoss()
    out = loss(**batch)
    assert loss.last_active_terms == ["rel_txt", "uni_txt", "pres_txt", "pres_x"]
    assert out["pres_x"].item() == pytest.approx(L.info_nce(batch["t"], batch["v0"]).item())


def test_safer_clip_fixed_weights_terms_and_token(rand):
    batch = _batch(rand, images=False)
    h, h0 = rand(4, 3, 5), rand(4, 3, 5)
    mask = torch.ones(4, 3, dtype=torch.bool)
    loss = L.SaferClipLoss(weights={"rel_tt": 2.0}, token_weight=0.5, weights_mode="replace")
    out = loss(**batch, h=h, h0=h0, token_mask=mask)
    assert loss.last_active_terms == ["rel_tt", "token_pres"]
    expected = 2.0 * out["rel_tt"] + 0.5 * L.token_pres_loss(h, h0, mask)
    assert out["loss"].item() == pytest.approx(expected.item())
    auto = L.SaferClipLoss()
    auto(**batch)  # caption-only: each group's 0.5 split among its active terms
    assert auto.last_weights == {"rel_tt": 0.25, "uni_txt": 0.25, "pres_txt": 0.5}
    # token term is off by default even when hidden states are passed
    default = L.SaferClipLoss()
    default(**batch, h=h, h0=h0)
    assert "token_pres" not in default.last_active_terms


def test_safe_clip_weights_normalised_and_fixed_pair(rand):
    w = L.safe_clip_weights()
    assert sum(w.values()) == pytest.approx(1 / 8)
    assert w["nce_redir_img"] == pytest.approx(0.5 / 1.75 / 8) and w["pres_txt"] == pytest.approx(0.1 / 1.75 / 8)
    batch = _batch(rand)
    batch.pop("t0_hat")
    batch.pop("v0_hat")  # Safe-CLIP target defaults to the fixed pair t0 / v0
    loss = L.SafeClipLoss()
    out = loss(**batch)
    assert loss.last_active_terms == list(L.SAFE_CLIP_TERMS)
    assert out["redir_txt"].item() == pytest.approx(L.uni_txt_loss(batch["t_star"], batch["t0"]).item())
    assert out["nce_redir_img"].item() == pytest.approx(L.info_nce(batch["t0"], batch["v_star"]).item())
    total = sum(w[n] * out[n] for n in L.SAFE_CLIP_TERMS)
    assert out["loss"].item() == pytest.approx(total.item(), abs=1e-12)


def test_safe_clip_caption_only(rand):
    batch = _batch(rand, images=False)
    loss = L.SafeClipLoss()
    out = loss(**batch)
    assert loss.last_active_terms == ["pres_txt", "redir_txt"]
    w = L.safe_clip_weights()
    assert out["loss"].item() == pytest.approx((w["pres_txt"] * out["pres_txt"] + w["redir_txt"] * out["redir_txt"]).item())
    assert sum(loss.last_weights.values()) == pytest.approx((0.1 + 0.1) / 1.75 / 8)  # not renormalised (as the reference)
    renorm = L.SafeClipLoss(renormalize_active=True)
    out_r = renorm(**batch)
    assert renorm.last_active_terms == ["pres_txt", "redir_txt"]
    assert renorm.last_weights == pytest.approx({"pres_txt": 1 / 16, "redir_txt": 1 / 16})  # rescaled to the full 1/8
    assert out_r["loss"].item() == pytest.approx((out_r["pres_txt"] + out_r["redir_txt"]).item() / 16)


def test_safe_clip_text_variant_weights_and_total(rand):
    # raw 0.1, 0.1, 0.25, 0.25 (the image version's text-tower terms); sum 0.7; divided by its 4 terms
    w = L.safe_clip_weights(variant="text")
    assert w == pytest.approx({"pres_txt": 0.1 / 0.7 / 4, "redir_txt": 0.1 / 0.7 / 4, "nce_tt": 0.25 / 0.7 / 4,
                               "nce_redir_tt": 0.25 / 0.7 / 4})  # fmt: skip
    assert w["nce_tt"] == pytest.approx(0.0892857142857, abs=1e-12) and sum(w.values()) == pytest.approx(0.25)
    batch = _batch(rand, images=False)
    batch.pop("t0_hat")  # the fixed pair: T0(t) of the unsafe row's own safe caption
    loss = L.SafeClipLoss(variant="text")
    out = loss(**batch)
    assert loss.last_active_terms == ["pres_txt", "redir_txt", "nce_tt", "nce_redir_tt"]
    assert out["nce_tt"].item() == pytest.approx(L.info_nce(batch["t"], batch["t0"]).item())
    assert out["nce_redir_tt"].item() == pytest.approx(L.info_nce(batch["t_star"], batch["t0"]).item())
    total = sum(w[n] * out[n] for n in loss.last_active_terms)
    assert out["loss"].item() == pytest.approx(total.item(), abs=1e-12)
    # the image inputs are not used by the text variant
    with_images = L.SafeClipLoss(variant="text")
    with_images(**_batch(rand))
    assert with_images.last_active_terms == ["pres_txt", "redir_txt", "nce_tt", "nce_redir_tt"]


def test_loss_weights_merge_and_replace(rand):
    batch = _batch(rand, images=False)
    # merge (default): the named term changes, the others keep their default; a term named at 0 is off
    merged = L.SaferClipLoss(weights={"rel_tt": 0.3})
    merged(**batch)
    assert merged.last_weights == {"rel_tt": 0.3, "uni_txt": 0.25, "pres_txt": 0.5}
    off = L.SaferClipLoss(weights={"rel_tt": 0})
    off(**batch)
    assert off.last_weights == {"uni_txt": 0.25, "pres_txt": 0.5}
    # replace: only the named terms
    replaced = L.SaferClipLoss(weights={"rel_tt": 0.3, "pres_txt": 0.7}, weights_mode="replace")
    replaced(**batch)
    assert replaced.last_weights == {"rel_tt": 0.3, "pres_txt": 0.7}
    # rel_tt next to rel_txt only when asked for
    img = _batch(rand)
    asked = L.SaferClipLoss(weights={"rel_tt": 0.2})
    asked(**img)
    assert asked.last_weights["rel_tt"] == 0.2 and asked.last_weights["rel_txt"] == 0.125
    # Safe-CLIP: the merged dict is normalised (0.1 + 0.1 + 0.25 + 0.5 = 0.95, over 4 terms); replace keeps the named ones
    sc = L.SafeClipLoss(variant="text", weights={"nce_redir_tt": 0.5})
    assert sc.raw_weights == {"pres_txt": 0.1, "redir_txt": 0.1, "nce_tt": 0.25, "nce_redir_tt": 0.5}
    assert sc.weights == pytest.approx({"pres_txt": 0.1 / 0.95 / 4, "redir_txt": 0.1 / 0.95 / 4, "nce_tt": 0.25 / 0.95 / 4,
                                        "nce_redir_tt": 0.5 / 0.95 / 4})  # fmt: skip
    sc_off = L.SafeClipLoss(variant="text", weights={"nce_tt": 0, "nce_redir_tt": 0})
    assert sc_off.weights == pytest.approx({"pres_txt": 0.125, "redir_txt": 0.125, "nce_tt": 0.0, "nce_redir_tt": 0.0})
    sc_rep = L.SafeClipLoss(variant="text", weights={"nce_redir_tt": 2.0}, weights_mode="replace")
    assert sc_rep.weights == {"pres_txt": 0.0, "redir_txt": 0.0, "nce_tt": 0.0, "nce_redir_tt": 0.25}
    # the normalisation maps effective weights onto themselves, so a recorded dict reproduces the run
    for variant in L.SAFE_CLIP_VARIANTS:
        eff = L.safe_clip_weights(variant=variant)
        assert L.SafeClipLoss(variant=variant, weights=eff, weights_mode="replace").weights == pytest.approx(eff, rel=1e-15)
    # weights_for: the static weights of a run, from the inputs it passes
    caption_only = {"t", "t_star", "t0", "t0_star", "t0_hat"}
    assert L.SaferClipLoss().weights_for(caption_only) == {**dict.fromkeys(L.SAFER_CLIP_TERMS, 0.0), "rel_tt": 0.25, "uni_txt": 0.25,
                                                           "pres_txt": 0.5}  # fmt: skip
    assert L.resolve_loss_weights("safer_clip", {"rel_tt": 0.3}, "replace") == {**dict.fromkeys(L.SAFER_CLIP_TERMS, 0.0), "rel_tt": 0.3}


def test_loss_weights_errors():
    with pytest.raises(ValueError, match=r"`--loss_weights` has unknown term 'rel_foo' for `--loss safer_clip`; known terms: "
                                         r"rel_img, rel_txt, rel_tt, uni_txt, uni_img, pres_txt, pres_img, pres_x"):
        L.resolve_loss_weights("safer_clip", {"rel_foo": 1.0}, argument="--loss_weights")
    with pytest.raises(ValueError, match=r"term 'nce_txt' belongs to the Safe-CLIP image variant.*`--safe_clip_variant text`"):
        L.SafeClipLoss(variant="text", weights={"nce_txt": 1.0})
    with pytest.raises(ValueError, match=r"`--loss_weights_mode` must be one of \['merge', 'replace'\], got 'add'"):
        L.SaferClipLoss(weights={"rel_tt": 1.0}, weights_mode="add")
    with pytest.raises(ValueError, match=r"`weights` is empty in replace mode"):
        L.SaferClipLoss(weights={}, weights_mode="replace")
    with pytest.raises(ValueError, match=r"`weights` must have a positive sum"):
        L.SafeClipLoss(weights={"pres_txt": 0, "redir_txt": 0, "nce_txt": 0, "nce_redir_txt": 0, "pres_img": 0, "redir_img": 0,
                                "nce_img": 0, "nce_redir_img": 0})  # fmt: skip
    with pytest.raises(ValueError, match=r"`--safe_clip_variant` must be one of \['image', 'text'\]"):
        L.SafeClipLoss(variant="video")
    with pytest.raises(ValueError, match=r"`weights` rel_tt=-0.5: a weight must be a finite number >= 0"):
        L.SaferClipLoss(weights={"rel_tt": -0.5})
    with pytest.raises(ValueError, match=r"`weights` nce_tt=inf: a weight must be a finite number >= 0"):
        L.SafeClipLoss(variant="text", weights={"nce_tt": float("inf")})
    with pytest.raises(ValueError, match="No SaFeR-CLIP loss term has its inputs and a positive weight"):
        L.SaferClipLoss(weights={"rel_tt": 0, "uni_txt": 0})(t_star=torch.ones(2, 3), t0_star=torch.ones(2, 3), t0_hat=torch.ones(2, 3))


def test_build_loss_by_name_and_weight_checks():
    assert isinstance(L.build_loss("safer_clip", scale=2.0), L.SaferClipLoss) and L.build_loss("safer_clip", scale=2.0).scale == 2.0
    assert isinstance(L.build_loss("safe_clip", {"pres_txt": 1.0}), L.SafeClipLoss)
    text = L.build_loss("safe_clip", {"nce_tt": 0.5}, variant="text", weights_mode="replace", renormalize_active=True)
    assert (text.variant, text.raw_weights["nce_tt"], text.raw_weights["pres_txt"], text.renormalize_active) == ("text", 0.5, 0.0, True)
    assert L.check_weights({"rel_tt": 1}, "safer_clip", "--loss_weights") == {"rel_tt": 1.0}
    with pytest.raises(ValueError, match="`--loss` must be one of"):
        L.build_loss("infonce")
    with pytest.raises(ValueError, match=r"`--loss_weights` has unknown term 'pres_txt2' for `--loss safe_clip`"):
        L.check_weights({"pres_txt2": 1.0}, "safe_clip", "--loss_weights")
    with pytest.raises(ValueError, match=r"`--loss_weights` rel_tt=-1: a weight must be a finite number >= 0"):
        L.check_weights({"rel_tt": -1}, "safer_clip", "--loss_weights")


# ----------------------------------------------------------------------------- cross-rank InfoNCE


def test_info_nce_gather_matches_global_batch(rand):
    """Simulated 2-rank DDP: mean of per-rank losses and its gradient equal the global-batch InfoNCE."""
    world, B, D = 2, 3, 5
    a_full = rand(world * B, D).requires_grad_()
    b_full = rand(world * B, D).requires_grad_()
    ref = L.info_nce(a_full, b_full, logit_scale=10.0)
    ga, gb = torch.autograd.grad(ref, (a_full, b_full))

    a_full2 = a_full.detach().clone().requires_grad_()
    b_full2 = b_full.detach().clone().requires_grad_()
    per_rank = []
    for rank in range(world):
        sl = slice(rank * B, (rank + 1) * B)
        sources = iter((a_full2, b_full2))  # info_nce gathers `a` first, then `b`

        def gather(x, rank=rank, sources=sources):
            # like torch.distributed.nn.all_gather: other ranks' rows (with grad back to their owner), own rows live
            full = torch.nn.functional.normalize(next(sources), dim=-1)
            return torch.cat([full[: rank * B], x, full[(rank + 1) * B:]]), rank * B

        per_rank.append(L.info_nce(a_full2[sl], b_full2[sl], logit_scale=10.0, gather=gather))
    mean = sum(per_rank) / world
    assert mean.item() == pytest.approx(ref.item(), rel=1e-10)
    ga2, gb2 = torch.autograd.grad(mean, (a_full2, b_full2))
    torch.testing.assert_close(ga2, ga)
    torch.testing.assert_close(gb2, gb)


def test_distributed_gather_identity_without_process_group(rand):
    x = rand(3, 4)
    out, offset = L.distributed_gather(x)
    assert out is x and offset == 0


# ----------------------------------------------------------------------------- bad inputs


def test_bad_inputs(rand):
    a = rand(3, 4)
    with pytest.raises(ValueError, match="`t0_hat` has shape"):
        L.uni_txt_loss(a, rand(2, 4))
    with pytest.raises(ValueError, match=r"`a` must have shape \(B, D\)"):
        L.info_nce(rand(3, 4, 2), a)
    with pytest.raises(ValueError, match="`scale` must be a finite number > 0"):
        L.relative_tt_loss(a, a, a, scale=0.0)
    with pytest.raises(ValueError, match="`logit_scale` must be"):
        L.info_nce(a, a, logit_scale=float("nan"))
    with pytest.raises(ValueError, match="needs"):
        L.pres_cross_loss(a, None, None, a)
    with pytest.raises(ValueError, match="`mask` must have shape"):
        L.token_pres_loss(rand(2, 3, 4), rand(2, 3, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match="`mask` selects no token"):
        L.token_pres_loss(rand(2, 3, 4), rand(2, 3, 4), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="`h` and `h0` must be"):
        L.token_pres_loss(rand(2, 3), rand(2, 3))
    with pytest.raises(ValueError, match="unknown term 'rel_foo'"):
        L.SaferClipLoss(weights={"rel_foo": 1.0})
    with pytest.raises(ValueError, match=r"`weights` rel_tt=nan: a weight must be a finite number"):
        L.SaferClipLoss(weights={"rel_tt": float("nan")})
    with pytest.raises(ValueError, match="`token_weight` must be"):
        L.SaferClipLoss(token_weight=-1)
    with pytest.raises(ValueError, match="No SaFeR-CLIP loss term"):
        L.SaferClipLoss()(t_star=a)
    with pytest.raises(ValueError, match="No Safe-CLIP loss term"):
        L.SafeClipLoss()(t_star=a)
    with pytest.raises(ValueError, match=r"`weights` pres_txt=-1.0: a weight must be a finite number >= 0"):
        L.SafeClipLoss(weights={"pres_txt": -1.0})


def test_large_scale_warns(caplog):
    with caplog.at_level("WARNING", logger="finetune.losses"):
        L.SaferClipLoss(scale=12.0)
    assert "never use s >= 10" in caplog.text


def _ddp_worker(rank, world, init_file, a_full, b_full, sizes, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        start = sum(sizes[:rank])
        a = a_full[start:start + sizes[rank]].clone().requires_grad_()
        b = b_full[start:start + sizes[rank]].clone().requires_grad_()
        loss = L.info_nce(a, b, logit_scale=10.0, gather=L.distributed_gather)
        loss.backward()
        torch.save({"loss": loss.detach(), "ga": a.grad, "gb": b.grad}, f"{out_dir}/rank{rank}.pt")
        dist.barrier()  # no rank tears gloo down while the other still talks to it (SIGABRT at exit otherwise)
    finally:
        dist.destroy_process_group()


def test_distributed_gather_two_processes(tmp_path):
    """Real 2-process gloo run with uneven local batches (3 and 2 rows): the per-rank losses match the
    global-batch rows, and the gradients (summed over ranks, as the backward of all_gather does) match."""
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(3)
    sizes = [3, 2]
    a_full = torch.randn(sum(sizes), 4, generator=g, dtype=torch.float64)
    b_full = torch.randn(sum(sizes), 4, generator=g, dtype=torch.float64)
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), a_full, b_full, sizes, str(tmp_path)), nprocs=2, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    # reference: each rank's loss is the mean CE over its own rows against the whole global batch
    a = a_full.clone().requires_grad_()
    b = b_full.clone().requires_grad_()
    an, bn = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1)
    ce_a = torch.nn.functional.cross_entropy(10.0 * an @ bn.T, torch.arange(5), reduction="none")
    ce_b = torch.nn.functional.cross_entropy(10.0 * bn @ an.T, torch.arange(5), reduction="none")
    rank_losses = [0.5 * (ce_a[:3].mean() + ce_b[:3].mean()), 0.5 * (ce_a[3:].mean() + ce_b[3:].mean())]
    for r in range(2):
        assert res[r]["loss"].item() == pytest.approx(rank_losses[r].item(), rel=1e-10)
    ga, gb = torch.autograd.grad(sum(rank_losses), (a, b))
    torch.testing.assert_close(torch.cat([res[0]["ga"], res[1]["ga"]]), ga)
    torch.testing.assert_close(torch.cat([res[0]["gb"], res[1]["gb"]]), gb)
