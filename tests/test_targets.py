"""Exact nearest-safe search: brute force, ties, duplicates, chunk invariance (bit for bit), bad inputs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from finetune.targets import Targets, nearest_safe, unique_first_indices


def brute_force(unsafe, safe, keys=None):
    """float64 full similarity matrix; duplicates of a key masked out; numpy argmax = first (lowest) index."""
    u = F.normalize(unsafe.float(), dim=1).double().numpy()
    s = F.normalize(safe.float(), dim=1).double().numpy()
    sims = u @ s.T
    if keys is not None:
        first = {}
        for j, k in enumerate(keys):
            first.setdefault(k, j)
        dup = np.array([first[k] != j for j, k in enumerate(keys)])
        sims[:, dup] = -np.inf
    idx = sims.argmax(axis=1)
    return torch.from_numpy(idx), torch.from_numpy(sims[np.arange(len(idx)), idx])


def tie_data(seed=0, n=37, m=53, d=8):
    """Random pool with exact duplicates and exact (one-hot) ties."""
    g = torch.Generator().manual_seed(seed)
    safe = torch.randn(m, d, generator=g)
    unsafe = torch.randn(n, d, generator=g)
    safe[20] = safe[4]            # duplicate rows: a tie, the lower index (4) must win
    safe[45] = safe[4]
    unsafe[3] = safe[4] * 2.5     # unsafe 3's nearest is exactly row 4 (and 20, 45)
    e = torch.eye(d)
    safe[10] = e[0] + e[1]        # rows 10 and 30: exactly equal cosine to e0 (1/sqrt 2)
    safe[30] = e[0] + e[2]
    unsafe[7] = e[0]
    return unsafe, safe


def test_matches_brute_force_with_ties_and_duplicates():
    unsafe, safe = tie_data()
    # with the planted rows, nothing else may beat the ties for rows 3 and 7: check against brute force
    idx, sim = nearest_safe(unsafe, safe, chunk_size=5)
    ref_idx, ref_sim = brute_force(unsafe, safe)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(sim, ref_sim.float(), rtol=0, atol=1e-6)
    assert idx[3] == 4


def test_exact_tie_lowest_index_wins():
    e = torch.eye(4)
    # cos(e0, e0 + e1) == cos(e0, e0 + e2) == 1/sqrt(2) exactly; the other rows are farther
    safe = torch.stack([-e[0], e[0] + e[2], e[3] - e[0], e[0] + e[1], e[0] + e[3]])
    for chunk in (1, 2):
        idx, sim = nearest_safe(torch.stack([e[0], 3 * e[0]]), safe, chunk_size=chunk)
        assert idx.tolist() == [1, 1]
        assert sim[0].item() == pytest.approx(2 ** -0.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunked_equals_unchunked_bit_for_bit(seed):
    unsafe, safe = tie_data(seed)
    ref_idx, ref_sim = nearest_safe(unsafe, safe, chunk_size=10_000)
    for chunk in (1, 2, 5, 7, 16, 36, 37, 38):  # most do not divide N = 37
        idx, sim = nearest_safe(unsafe, safe, chunk_size=chunk)
        assert torch.equal(idx, ref_idx), chunk
        assert torch.equal(sim.view(torch.int32), ref_sim.view(torch.int32)), chunk  # bit for bit


def test_near_ties_clustered_data_exact_and_chunk_invariant():
    """Many pool vectors within ~1e-6 of each other: results equal float64 brute force for every chunking."""
    g = torch.Generator().manual_seed(5)
    centres = torch.randn(6, 16, generator=g)
    safe = centres.repeat(40, 1) + 1e-6 * torch.randn(240, 16, generator=g)
    unsafe = centres.repeat(25, 1) + 0.3 * torch.randn(150, 16, generator=g)
    ref_idx, ref_sim = brute_force(unsafe, safe)
    results = [nearest_safe(unsafe, safe, chunk_size=c) for c in (1, 9, 64, 150)]
    for idx, sim in results:
        assert torch.equal(idx, ref_idx)
        assert torch.equal(sim, results[0][1])
        torch.testing.assert_close(sim, ref_sim.float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_search_gives_the_float32_answer(dtype):
    unsafe, safe = tie_data(3)
    ref = nearest_safe(unsafe, safe)
    got = nearest_safe(unsafe, safe, chunk_size=8, dtype=dtype)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_duplicate_captions_count_once():
    # row 2 repeats caption "a" of row 0 but (say, from a different batch padding) sits exactly on the query:
    # with keys it is not in the pool, so the answer is a first occurrence.
    safe = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    unsafe = torch.tensor([[0.0, 1.0]])
    assert nearest_safe(unsafe, safe)[0].item() == 2
    idx, sim = nearest_safe(unsafe, safe, safe_keys=["a", "b", "a"])
    assert idx.item() == 1 and sim.item() == pytest.approx(0.6)
    ref_idx, _ = brute_force(unsafe, safe, keys=["a", "b", "a"])
    assert idx.item() == ref_idx.item()
    assert unique_first_indices(["x", "y", "x", "z", "y"]).tolist() == [0, 1, 3]


def test_random_with_keys_matches_brute_force():
    g = torch.Generator().manual_seed(11)
    keys = [f"cap{int(k)}" for k in torch.randint(0, 30, (60,), generator=g)]
    safe = torch.randn(60, 12, generator=g)
    unsafe = torch.randn(45, 12, generator=g)
    idx, _ = nearest_safe(unsafe, safe, chunk_size=13, safe_keys=keys)
    ref_idx, _ = brute_force(unsafe, safe, keys)
    assert torch.equal(idx, ref_idx)
    first = {}
    for j, k in enumerate(keys):
        first.setdefault(k, j)
    assert all(first[keys[j]] == j for j in idx.tolist())


def test_empty_unsafe_and_single_pool():
    idx, sim = nearest_safe(torch.empty(0, 4), torch.randn(3, 4))
    assert idx.shape == (0,) and sim.dtype == torch.float32
    idx, sim = nearest_safe(torch.randn(5, 4), torch.randn(1, 4), safe_keys=["only"])
    assert idx.tolist() == [0] * 5


def test_targets_helpers():
    class DS:
        safe_captions = ["a", "b", "a"]

    t = Targets(torch.tensor([2, 0, 1]), torch.tensor([0.9, 0.8, 0.7]))
    assert len(t) == 3
    # pair 0 -> caption of row 2 == "a" == its own; pair 1 -> "a" != "b"; pair 2 -> "b" != "a"
    assert t.redirected(DS()).tolist() == [False, True, True]


def test_bad_inputs():
    good = torch.randn(4, 3)
    bad = good.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"`unsafe_emb` contains NaN or inf in 1 row\(s\) \(first: row 2\)"):
        nearest_safe(bad, good)
    inf = good.clone()
    inf[0, 0] = float("inf")
    with pytest.raises(ValueError, match="`safe_emb` contains NaN or inf"):
        nearest_safe(good, inf)
    with pytest.raises(ValueError, match="duplicate-only"):
        nearest_safe(good, good, safe_keys=["same"] * 4)
    with pytest.raises(ValueError, match="`safe_emb` is empty"):
        nearest_safe(good, torch.empty(0, 3))
    with pytest.raises(ValueError, match="dimension 3 but `safe_emb` has 5"):
        nearest_safe(good, torch.randn(4, 5))
    with pytest.raises(ValueError, match="`chunk_size` must be a positive integer"):
        nearest_safe(good, good, chunk_size=0)
    with pytest.raises(ValueError, match="`safe_keys` has 2 entries"):
        nearest_safe(good, good, safe_keys=["a", "b"])
    with pytest.raises(ValueError, match="must be a 2-D tensor"):
        nearest_safe(torch.randn(3), good)
    with pytest.raises(ValueError, match="floating-point tensor"):
        nearest_safe(torch.ones(4, 3, dtype=torch.long), good)
