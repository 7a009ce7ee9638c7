"""Honest learning test: the tiny random CLIP really learns the task on the bundled sample pairs (CPU).

Setup: ``finetune/configs/tiny_cpu.yaml`` (tiny random CLIP, LoRA r16 on the text tower, 330 sample
pairs, 20% held out, lr 1e-2, 20 epochs = 323 steps of batch 16; Safe-CLIP: no curriculum, 340 steps).
The "frozen" values are the start of training (LoRA starts exactly at the base model).

Redirection is measured on the trained pairs, preservation on the held-out safe captions:

* ``redirect_to_target_r1``: an unsafe caption's top-1 among the frozen embeddings of *all* captions
  (safe and unsafe) is its target safe caption (SaFeR-CLIP: the frozen nearest safe caption t̂;
  Safe-CLIP: its pair). It is 0 at the start, since every unsafe caption retrieves itself. (With a
  safe-only gallery the nearest-safe target is retrieved 100% of the time by construction at the
  start, so that version cannot show SaFeR-CLIP's learning.)
* ``t_star_to_t_r1``: the paper's T*->T with a safe-only gallery and the pair as target (Safe-CLIP's goal).
* ``safe_cos`` = mean cos(T(t), T0(t)) and ``knn_overlap@10`` on held-out safe captions.

Two variants: the default (fast) one, 136 steps with no curriculum, lr 2e-2 and no LoRA dropout, and
the full ``tiny_cpu.yaml`` recipe (curriculum, 323/340 steps; marked slow: about 5 s on idle cores
but over a minute on this shared, busy 2-core machine). Measured (seed 42, CPU, 2026-11); thresholds below
are set with margin under these values:

==========  =======  =================================  =====================  ================
loss        variant  redirection (train pairs)          held-out safe_cos      held-out kNN@10
==========  =======  =================================  =====================  ================
safer_clip  fast     redirect_to_target 0.000 -> 0.280  1.000 -> 0.989         1.000 -> 0.720
safe_clip   fast     t_star_to_t 0.136 -> 0.303         1.000 -> 0.983         1.000 -> 0.597
                     redirect_to_pair 0.000 -> 0.242
safer_clip  full     redirect_to_target 0.000 -> 0.409  1.000 -> 0.996         1.000 -> 0.844
safe_clip   full     t_star_to_t 0.136 -> 0.473         1.000 -> 0.990         1.000 -> 0.671
                     redirect_to_pair 0.000 -> 0.390
==========  =======  =================================  =====================  ================

SaFeR-CLIP keeps the held-out safe captions closer to their frozen embeddings (safe_cos, kNN overlap)
than Safe-CLIP in both variants, as the paper reports for zero-shot accuracy.
"""

from __future__ import annotations

import pytest

FAST = ["--num_train_epochs", "8", "--curriculum", "none", "--learning_rate", "2e-2", "--lora_dropout", "0"]
# (variant, extra args, safer_clip redirect_to_target min, safer_clip safe_cos min, safe_clip t*->t gain min,
#  safe_clip redirect_to_pair min, safe_clip safe_cos min, knn min)
VARIANTS = [
    pytest.param("fast", FAST, 0.15, 0.98, 0.1, 0.12, 0.97, 0.5, id="fast"),
    pytest.param("full", [], 0.25, 0.99, 0.2, 0.2, 0.98, 0.55, id="full", marks=pytest.mark.slow),
]


def _train(tmp_path, *extra):
    from finetune.config import parse_train_config
    from finetune.train import train

    return train(parse_train_config(["--config", "tiny_cpu.yaml", "--output_dir", str(tmp_path / "run"), "--checkpointing_steps", "1000",
                                     *extra]))  # fmt: skip


@pytest.mark.parametrize("variant,extra,redirect_min,safe_cos_min,gain_min,pair_min,safe_cos_min_sc,knn_min", VARIANTS)
def test_safer_clip_redirects_unsafe_and_preserves_safe(tmp_path, variant, extra, redirect_min, safe_cos_min, gain_min, pair_min,
                                                        safe_cos_min_sc, knn_min):
    result = _train(tmp_path, "--loss", "safer_clip", *extra)
    train, val = result.metrics["train"], result.metrics["val"]
    assert train["frozen"]["redirect_to_target_r1"] == 0.0 and val["frozen"]["safe_cos"] > 0.9999
    assert train["redirect_to_target_r1"] >= redirect_min, train
    assert val["safe_cos"] >= safe_cos_min and val["knn_overlap@10"] >= knn_min + 0.1, val
    assert set(result.active_terms) == {"rel_tt", "uni_txt", "pres_txt"}


@pytest.mark.parametrize("variant,extra,redirect_min,safe_cos_min,gain_min,pair_min,safe_cos_min_sc,knn_min", VARIANTS)
def test_safe_clip_redirects_to_pair(tmp_path, variant, extra, redirect_min, safe_cos_min, gain_min, pair_min, safe_cos_min_sc, knn_min):
    result = _train(tmp_path, "--loss", "safe_clip", "--curriculum", "none", *extra)
    train, val = result.metrics["train"], result.metrics["val"]
    assert train["frozen"]["redirect_to_pair_r1"] == 0.0
    assert train["t_star_to_t_r1"] >= train["frozen"]["t_star_to_t_r1"] + gain_min, train
    assert train["redirect_to_pair_r1"] >= pair_min, train
    assert val["safe_cos"] >= safe_cos_min_sc and val["knn_overlap@10"] >= knn_min, val
    assert set(result.active_terms) == {"pres_txt", "redir_txt"}
