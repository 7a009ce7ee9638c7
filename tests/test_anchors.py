"""Frozen anchors with the tiny real CLIP model and the real tokenizer: values, cache hits/misses, targets on the sample."""

import json
import os

import pytest
import torch

import finetune.anchors as A
from finetune.data import PairDataset, PairRecord, load_pairs
from finetune.targets import compute_targets, nearest_safe


@pytest.fixture(scope="module")
def model():
    from safer_diffusion.testing import tiny_clip_model

    return tiny_clip_model()


@pytest.fixture(scope="module")
def sample(sample_pairs_path):
    return load_pairs(sample_pairs_path)


@pytest.fixture
def count_text_encodes(monkeypatch):
    calls = []
    real = A._encode_text

    def counting(*args, **kwargs):
        calls.append(len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(A, "_encode_text", counting)
    return calls


def test_encode_text_matches_clip_features(model, clip_tokenizer):
    captions = ["a man reading a book in a park", "a man holding a gun in a park", "a cat"]
    emb = A.encode_text(model, clip_tokenizer, captions, batch_size=2)
    enc = clip_tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref = model.text_projection(model.text_model(**enc).pooler_output)
    torch.testing.assert_close(emb, torch.nn.functional.normalize(ref, dim=-1))
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    assert emb.dtype == torch.float32 and emb.shape == (3, model.config.projection_dim)


def test_features_accepts_tensor_and_model_output():
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    x = torch.randn(2, 4)
    assert A._features(x) is x
    assert A._features(BaseModelOutputWithPooling(last_hidden_state=torch.randn(2, 3, 5), pooler_output=x)) is x
    with pytest.raises(TypeError, match="Cannot read features"):
        A._features("nope")


def test_cache_hit_and_misses(model, clip_tokenizer, sample, tmp_path, count_text_encodes):
    small = sample[:40]
    first = A.compute_anchors(model, clip_tokenizer, small, cache_dir=tmp_path, batch_size=32)
    assert len(count_text_encodes) == 1 and first.safe_text.shape == (40, 16) and first.safe_image is None
    again = A.compute_anchors(model, clip_tokenizer, PairDataset(list(small.records)), cache_dir=tmp_path, batch_size=7)
    assert len(count_text_encodes) == 1, "identical data + encoder + options must hit the cache"
    assert again.fingerprint == first.fingerprint
    assert torch.equal(again.safe_text, first.safe_text) and torch.equal(again.unsafe_text, first.unsafe_text)

    # data change -> miss
    changed = PairDataset([PairRecord(small[0].safe, small[0].unsafe + " at night")] + list(small.records[1:]))
    other = A.compute_anchors(model, clip_tokenizer, changed, cache_dir=tmp_path)
    assert len(count_text_encodes) == 2 and other.fingerprint != first.fingerprint
    assert not torch.equal(other.unsafe_text[0], first.unsafe_text[0]) and torch.equal(other.unsafe_text[1:], first.unsafe_text[1:])

    # one weight changes -> miss
    import copy

    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.text_model.encoder.layers[0].mlp.fc1.weight[0, 0] += 1e-3
    assert A.encoder_fingerprint(moved) != A.encoder_fingerprint(model)
    third = A.compute_anchors(moved, clip_tokenizer, small, cache_dir=tmp_path)
    assert len(count_text_encodes) == 3 and third.fingerprint != first.fingerprint
    assert not torch.equal(third.safe_text, first.safe_text)

    # option change (token states) -> miss
    A.compute_anchors(model, clip_tokenizer, small, cache_dir=tmp_path, token_states=True)
    assert len(count_text_encodes) == 4

    # a tampered entry (metadata not matching its key) is never trusted
    meta_path = tmp_path / f"{first.fingerprint}.json"
    meta = json.loads(meta_path.read_text())
    meta["encoder"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    A.compute_anchors(model, clip_tokenizer, small, cache_dir=tmp_path)
    assert len(count_text_encodes) == 5


def test_token_states(model, clip_tokenizer, tmp_path):
    ds = PairDataset([PairRecord("a red bicycle", "a red bicycle on fire"), PairRecord("a long caption about a quiet lake at dawn", "x")])
    anchors = A.compute_anchors(model, clip_tokenizer, ds, cache_dir=tmp_path, token_states=True)
    assert anchors.safe_tokens.shape == (2, 77, 32) and anchors.safe_token_mask.dtype == torch.bool
    enc = A.tokenize(clip_tokenizer, ds.safe_captions)
    assert torch.equal(anchors.safe_token_mask, enc["attention_mask"].bool())
    with torch.no_grad():
        ref = model.text_model(**enc).last_hidden_state
    torch.testing.assert_close(anchors.safe_tokens, ref)
    torch.testing.assert_close(anchors.safe_text, A.encode_text(model, clip_tokenizer, ds.safe_captions))
    hit = A.compute_anchors(model, clip_tokenizer, ds, cache_dir=tmp_path, token_states=True)
    assert torch.equal(hit.safe_token_mask, anchors.safe_token_mask) and torch.equal(hit.safe_tokens, anchors.safe_tokens)


def test_image_anchors(model, clip_tokenizer, tmp_path):
    from PIL import Image
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    records = []
    for i in range(3):
        for kind in ("s", "u"):
            Image.new("RGB", (40, 36), (60 * i, 20 if kind == "s" else 200, 5)).save(tmp_path / f"{kind}{i}.png")
        records.append(PairRecord(f"safe {i}", f"unsafe {i}", str(tmp_path / f"s{i}.png"), str(tmp_path / f"u{i}.png")))
    ds = PairDataset(records)
    anchors = A.compute_anchors(model, clip_tokenizer, ds, cache_dir=tmp_path / "c", image_processor=proc)
    assert anchors.safe_image.shape == (3, 16) and anchors.unsafe_image.shape == (3, 16)
    torch.testing.assert_close(anchors.safe_image.norm(dim=-1), torch.ones(3))
    pixels = proc(images=[Image.open(tmp_path / "s1.png").convert("RGB")], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = A._features(model.get_image_features(pixel_values=pixels))
    torch.testing.assert_close(anchors.safe_image[1], torch.nn.functional.normalize(ref, dim=-1)[0])
    assert not torch.equal(anchors.safe_image, anchors.unsafe_image)
    # without a processor: text only
    assert A.compute_anchors(model, clip_tokenizer, ds, cache_dir=tmp_path / "c").safe_image is None


def test_model_left_untouched(model, clip_tokenizer):
    model.train()
    try:
        emb64 = A.encode_text(model, clip_tokenizer, ["a dog"], dtype=torch.float64)
        assert model.training, "training mode must be restored"
        assert next(model.parameters()).dtype == torch.float32, "a temporary copy runs in float64"
        emb = A.encode_text(model, clip_tokenizer, ["a dog"])
        assert model.training
    finally:
        model.eval()
    torch.testing.assert_close(emb64, emb)


def test_encoder_fingerprint(model):
    fp = A.encoder_fingerprint(model)
    assert fp == A.encoder_fingerprint(model)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    assert A.encoder_fingerprint(sd) == A.encoder_fingerprint(model.state_dict()) != fp  # the module adds its config
    sd["logit_scale"] = sd["logit_scale"] + 1
    assert A.encoder_fingerprint(sd) != A.encoder_fingerprint(model.state_dict())
    with pytest.raises(ValueError, match="must be an nn.Module or a state dict"):
        A.encoder_fingerprint([1, 2])


def test_targets_on_sample(model, clip_tokenizer, sample, tmp_path, caplog):
    """On the bundled sample with the tiny CLIP: nearest-safe targets, how many differ from the own pair, cache."""
    anchors = A.compute_anchors(model, clip_tokenizer, sample, cache_dir=tmp_path)
    with caplog.at_level("INFO", logger="finetune.targets"):
        targets = compute_targets(anchors, sample, chunk_size=64, cache_dir=tmp_path)
    assert len(targets) == len(sample)
    ref_idx, ref_sim = nearest_safe(anchors.unsafe_text, anchors.safe_text, chunk_size=len(sample))
    assert torch.equal(targets.index, ref_idx) and torch.equal(targets.similarity, ref_sim)
    redirected = int(targets.redirected(sample).sum())
    print(f"\n[targets on sample] {redirected} of {len(sample)} chosen targets differ from the own pair")
    assert redirected > 0
    assert "point to a safe caption other than their own pair's" in caplog.text
    # the difficulty is the cosine to the chosen caption, never below the own pair's cosine
    own = (anchors.unsafe_text * anchors.safe_text).sum(-1)
    assert torch.all(targets.similarity >= own - 1e-5)
    hats = targets.hat_anchors(anchors)
    torch.testing.assert_close((hats["t0_hat"] * anchors.unsafe_text).sum(-1), targets.similarity, rtol=0, atol=1e-5)
    assert hats["v0_hat"] is None
    # cache hit: identical result without searching again
    import finetune.targets as T

    real = T.nearest_safe
    T.nearest_safe = None  # any search would fail
    try:
        cached = compute_targets(anchors, sample, cache_dir=tmp_path)
    finally:
        T.nearest_safe = real
    assert torch.equal(cached.index, targets.index) and torch.equal(cached.similarity, targets.similarity)
    with pytest.raises(ValueError, match="compute the anchors on this dataset"):
        compute_targets(anchors, sample[:10], cache_dir=tmp_path)


def test_unwritable_cache_dir(model, clip_tokenizer, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    ds = PairDataset([PairRecord("a", "b")])
    with pytest.raises(PermissionError, match="`cache_dir` .* is not a writable directory"):
        A.compute_anchors(model, clip_tokenizer, ds, cache_dir=blocker / "anchors")
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(PermissionError, match="not a writable directory"):
                A.compute_anchors(model, clip_tokenizer, ds, cache_dir=ro)
        finally:
            ro.chmod(0o700)
    anchors = A.compute_anchors(model, clip_tokenizer, ds, cache_dir=tmp_path / "ok")
    with pytest.raises(PermissionError, match="`cache_dir` .* is not a writable directory"):
        compute_targets(anchors, ds, cache_dir=blocker / "targets")


def test_bad_inputs(model, clip_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="`dataset` is empty"):
        A.compute_anchors(model, clip_tokenizer, PairDataset([]), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="`dataset` must be a PairDataset"):
        A.compute_anchors(model, clip_tokenizer, [("a", "b")], cache_dir=tmp_path)
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer"):
        A.encode_text(model, clip_tokenizer, ["a"], batch_size=0)


def test_encode_text_trims_sorted_batches_without_changing_the_result(model, clip_tokenizer):
    """Batches of similar length trimmed to their longest caption give the padded-to-77 embeddings, in the input order."""
    from finetune.anchors import _encode_text, encode_text, tokenize

    captions = ["a cat", "a very long caption about a dog running in a park on a sunny afternoon with two friends", "x",
                "two birds on a wire at dawn", "a red car"] * 3  # fmt: skip
    enc = tokenize(clip_tokenizer, captions)
    with torch.no_grad():
        out = model.text_model(**enc)
        ref = torch.nn.functional.normalize(model.text_projection(out.pooler_output), dim=-1)
    got = encode_text(model, clip_tokenizer, captions, batch_size=4)
    assert got.shape == ref.shape and (got - ref).abs().max() < 1e-6
    emb, hidden, mask = _encode_text(model, clip_tokenizer, captions, 4, "cpu", torch.float32, True)
    real = enc["attention_mask"].bool()
    assert torch.equal(mask, real) and hidden.shape == out.last_hidden_state.shape
    torch.testing.assert_close(hidden, out.last_hidden_state)  # token states keep every padded position
