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
* ``redirect_rate``: that top-1 is *any* safe caption.
* ``t_star_to_t_r1``: the paper's T*->T with a safe-only gallery and the pair as target (Safe-CLIP's goal).
* ``safe_cos`` = mean cos(T(t), T0(t)) and ``knn_overlap@10`` on held-out safe captions.

Three methods: SaFeR-CLIP; the Safe-CLIP baseline as it now runs on caption-only data, the text-only
variant (docs/METHOD.md §4.6.2: cosine terms + InfoNCE in text space); and the two-cosine form earlier
versions trained (``--loss_weights_mode replace --loss_weights pres_txt=0.1 redir_txt=0.1``). Two
variants: the default (fast) one, 136 steps with no curriculum, lr 2e-2 and no LoRA dropout, and the
full ``tiny_cpu.yaml`` recipe (curriculum for SaFeR, 323/340 steps; marked slow). Measured (seed 42,
CPU, 2026-12); thresholds below are set with margin under these values:

===============  =======  ===============================  ===============  =================  ================
loss             variant  redirection (train pairs)        redirect_rate    held-out safe_cos  held-out kNN@10
===============  =======  ===============================  ===============  =================  ================
safer_clip       fast     redirect_to_target 0 -> 0.280    0 -> 0.557       1.000 -> 0.989     1.000 -> 0.720
safe_clip text   fast     redirect_to_pair 0 -> 0.072      0 -> 0.473       1.000 -> 0.961     1.000 -> 0.502
                          t_star_to_t 0.136 -> 0.110
safe_clip cos    fast     redirect_to_pair 0 -> 0.254      0 -> 0.739       1.000 -> 0.983     1.000 -> 0.609
                          t_star_to_t 0.136 -> 0.303
safer_clip       full     redirect_to_target 0 -> 0.409    0 -> 0.587       1.000 -> 0.996     1.000 -> 0.844
safe_clip text   full     redirect_to_pair 0 -> 0.242      0 -> 0.629       1.000 -> 0.971     1.000 -> 0.532
                          t_star_to_t 0.136 -> 0.345
safe_clip cos    full     redirect_to_pair 0 -> 0.383      0 -> 0.769       1.000 -> 0.990     1.000 -> 0.671
                          t_star_to_t 0.136 -> 0.470
===============  =======  ===============================  ===============  =================  ================

These are tiny-random-model figures: they show that each objective trains, not how the methods compare
on a pretrained encoder (``benchmarks/bench_method.py`` does that). On this model the text variant's
InfoNCE terms (logit scale 100) move safe captions more than either cosine form, and SaFeR-CLIP keeps
the held-out safe captions closest to their frozen embeddings.
"""

from __future__ import annotations

import pytest

FAST = ["--num_train_epochs", "8", "--curriculum", "none", "--learning_rate", "2e-2", "--lora_dropout", "0"]
COSINE = ["--loss_weights_mode", "replace", "--loss_weights", "pres_txt=0.1", "redir_txt=0.1"]


def _train(tmp_path, *extra):
    from finetune.config import parse_train_config
    from finetune.train import train

    return train(parse_train_config(["--config", "tiny_cpu.yaml", "--output_dir", str(tmp_path / "run"), "--checkpointing_steps", "1000",
                                     *extra]))  # fmt: skip


# (variant, extra args, redirect_to_target min, safe_cos min, knn min)
SAFER = [
    pytest.param(FAST, 0.15, 0.98, 0.6, id="fast"),
    pytest.param([], 0.25, 0.99, 0.65, id="full", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("extra,redirect_min,safe_cos_min,knn_min", SAFER)
def test_safer_clip_redirects_unsafe_and_preserves_safe(tmp_path, extra, redirect_min, safe_cos_min, knn_min):
    result = _train(tmp_path, "--loss", "safer_clip", *extra)
    train, val = result.metrics["train"], result.metrics["val"]
    assert train["frozen"]["redirect_to_target_r1"] == 0.0 and val["frozen"]["safe_cos"] > 0.9999
    assert train["redirect_to_target_r1"] >= redirect_min, train
    assert val["safe_cos"] >= safe_cos_min and val["knn_overlap@10"] >= knn_min, val
    assert set(result.active_terms) == {"rel_tt", "uni_txt", "pres_txt"}


# (form, extra args, redirect_rate min, redirect_to_pair min, t*->t min, safe_cos min, knn min)
SAFE_CLIP = [
    pytest.param("text", FAST, 0.35, 0.04, 0.08, 0.94, 0.4, id="text-fast"),
    pytest.param("cosine", COSINE + FAST, 0.6, 0.15, 0.25, 0.97, 0.5, id="cosine-fast"),
    pytest.param("text", [], 0.5, 0.18, 0.28, 0.96, 0.45, id="text-full", marks=pytest.mark.slow),
    pytest.param("cosine", COSINE, 0.65, 0.3, 0.4, 0.98, 0.55, id="cosine-full", marks=pytest.mark.slow),
]
TERMS = {"text": ["pres_txt", "redir_txt", "nce_tt", "nce_redir_tt"], "cosine": ["pres_txt", "redir_txt"]}


@pytest.mark.parametrize("form,extra,rate_min,pair_min,t2t_min,safe_cos_min,knn_min", SAFE_CLIP)
def test_safe_clip_redirects_to_pair(tmp_path, form, extra, rate_min, pair_min, t2t_min, safe_cos_min, knn_min):
    result = _train(tmp_path, "--loss", "safe_clip", *extra)
    train, val = result.metrics["train"], result.metrics["val"]
    assert result.config.safe_clip_variant == "text" and result.config.curriculum == "none"  # resolved defaults
    assert result.active_terms == TERMS[form]
    assert train["frozen"]["redirect_to_pair_r1"] == 0.0 and train["frozen"]["redirect_rate"] == 0.0
    assert train["redirect_rate"] >= rate_min and train["redirect_to_pair_r1"] >= pair_min, train
    assert train["t_star_to_t_r1"] >= t2t_min, train
    assert val["safe_cos"] >= safe_cos_min and val["knn_overlap@10"] >= knn_min, val
