"""The paired safe-twin preservation term ``pres_pair`` (docs/METHOD.md §4.7): hand-computed values, its weight and inputs."""

import pytest
import torch

from finetune import losses as L

# 2-D unit vectors: e1 = (1, 0), e2 = (0, 1), p = (0.6, 0.8), q = (0.8, 0.6); cos(e1, p) = 0.6, cos(e1, q) = 0.8.
E1, E2, P, Q = [1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]


def T(*rows, grad=False):
    return torch.tensor(rows, dtype=torch.float64, requires_grad=grad)


def test_pair_pres_by_hand():
    # drifts 1 - cos: row 0 1 - cos(e1, p) = 0.4, row 1 1 - cos(e1, q) = 0.2, row 2 1 - cos(e2, e2) = 0
    t_pair, t0_pair = T(E1, E1, E2), T(P, Q, E2)
    assert L.pair_pres_loss(t_pair, t0_pair).item() == pytest.approx((0.4 + 0.2 + 0.0) / 3, abs=1e-12)
    # drift budget δ = 0.3: max(0, 0.4 - 0.3) = 0.1, the others 0 -> mean 0.1 / 3
    assert L.pair_pres_loss(t_pair, t0_pair, margin=0.3).item() == pytest.approx(0.1 / 3, abs=1e-12)
    # unnormalised inputs: 3*e1 vs 0.5*p is still 1 - 0.6
    assert L.pair_pres_loss(T([3.0, 0.0]), T([0.3, 0.4])).item() == pytest.approx(0.4, abs=1e-12)


def test_pair_pres_gradient_stops_inside_the_budget():
    t_pair = T(E1, E1, grad=True)
    L.pair_pres_loss(t_pair, T(P, Q), margin=0.3).backward()
    assert t_pair.grad[0].abs().sum() > 0  # drift 0.4 > 0.3: pulled back
    assert torch.equal(t_pair.grad[1], torch.zeros(2, dtype=torch.float64))  # drift 0.2 <= 0.3: free


def test_pair_pres_bad_inputs():
    with pytest.raises(ValueError, match=r"`pair_margin` must be a finite number in \[0, 2\), got -0.1"):
        L.pair_pres_loss(T(E1), T(P), margin=-0.1)
    with pytest.raises(ValueError, match=r"`pair_margin` must be a finite number in \[0, 2\), got nan"):
        L.SaferClipLoss(pair_margin=float("nan"))
    with pytest.raises(ValueError, match=r"`t0_pair` has shape \(2, 2\) but `t_pair` has shape \(1, 2\)"):
        L.pair_pres_loss(T(E1), T(P, Q))


def test_pres_pair_off_by_default_and_outside_the_groups():
    # caption-only SaFeR-CLIP with the twins given: the default weights do not change and pres_pair does not run
    base = dict(t=T(E1), t_star=T(E2), t0=T(P), t0_star=T(Q), t0_hat=T(P))
    default = L.SaferClipLoss()
    out = default(**base, t_pair=T(E1), t0_pair=T(Q))
    assert "pres_pair" not in out and default.last_weights == {"rel_tt": 0.25, "uni_txt": 0.25, "pres_txt": 0.5}
    # named: added on top with its own weight, the groups keep 0.5 / 0.5
    loss = L.build_loss("safer_clip", {"pres_pair": 2.0}, pair_margin=0.1)
    out = loss(**base, t_pair=T(E1), t0_pair=T(Q))
    assert loss.last_weights == {"rel_tt": 0.25, "uni_txt": 0.25, "pres_txt": 0.5, "pres_pair": 2.0}
    assert out["pres_pair"].item() == pytest.approx(0.2 - 0.1, abs=1e-12)
    expected = 0.25 * out["rel_tt"] + 0.25 * out["uni_txt"] + 0.5 * out["pres_txt"] + 2.0 * out["pres_pair"]
    assert out["loss"].item() == pytest.approx(expected.item(), abs=1e-12)
    # without the twins' inputs the named term is skipped, the others run
    loss(**base)
    assert "pres_pair" not in loss.last_active_terms
    assert L.TERM_INPUTS["safer_clip"]["pres_pair"] == (("t_pair", "t0_pair"),)
    assert "pres_pair" in L.SAFER_CLIP_TERMS and "pres_pair" not in L.PRESERVATION_TERMS


def test_pres_pair_is_not_a_safe_clip_term():
    with pytest.raises(ValueError, match="unknown term 'pres_pair' for `--loss safe_clip`"):
        L.build_loss("safe_clip", {"pres_pair": 1.0}, variant="text")


def test_trainer_feeds_the_twins_with_anchors_and_with_a_live_reference(tmp_path):
    from finetune.config import parse_train_config
    from finetune.train import train

    fast = ["--config", "tiny_cpu.yaml", "--train_batch_size", "8", "--report_to", "none", "--no_eval_at_end", "--max_train_steps", "2"]
    twins = ["--loss_weights", "pres_pair=2", "--pair_form", "distance", "--pair_margin", "0.01"]
    pre = train(parse_train_config([*fast, *twins, "--output_dir", str(tmp_path / "pre")]))
    live = train(parse_train_config([*fast, *twins, "--no_precompute_anchors", "--output_dir", str(tmp_path / "live")]))
    plain = train(parse_train_config([*fast, "--output_dir", str(tmp_path / "plain")]))
    assert pre.active_terms == ["rel_tt", "uni_txt", "pres_txt", "pres_pair"] == live.active_terms
    assert pre.config.loss_weights["pres_pair"] == 2.0 and pre.config.pair_form == "distance" and pre.config.pair_margin == 0.01
    assert live.losses[0] == pytest.approx(pre.losses[0], abs=1e-5)  # the same twins' anchors, precomputed or live
    # step 1 starts at T = T0: the twins have no drift, so pres_pair adds nothing to the first loss; the paper recipe is unchanged
    assert pre.losses[0] == pytest.approx(plain.losses[0], abs=1e-5)
    assert plain.active_terms == ["rel_tt", "uni_txt", "pres_txt"] and plain.config.loss_weights["pres_pair"] == 0.0


def test_twins_with_both_token_terms(tmp_path):
    """pres_pair adds a third block of rows to the forward; the token terms still read only their own rows."""
    from finetune.config import parse_train_config
    from finetune.train import train

    fast = ["--config", "tiny_cpu.yaml", "--train_batch_size", "8", "--report_to", "none", "--no_eval_at_end", "--max_train_steps", "2"]
    both = ["--token_weight", "1", "--token_redir_weight", "1"]
    with_twins = train(parse_train_config([*fast, *both, "--loss_weights", "pres_pair=1", "--output_dir", str(tmp_path / "t")]))
    without = train(parse_train_config([*fast, *both, "--output_dir", str(tmp_path / "p")]))
    assert with_twins.active_terms == ["rel_tt", "uni_txt", "pres_txt", "pres_pair", "token_pres", "token_redir"]
    # step 1 starts at T = T0, where the twins' term is 0: the token terms saw the same rows with and without the twins
    assert with_twins.losses[0] == pytest.approx(without.losses[0], abs=1e-5)
