"""Issue 16: loss-weight merge/replace, loss- and data-dependent defaults in the resolved config, the text-only
Safe-CLIP baseline in a run, row-aligned pair files (DES layout), extra safe captions (pool, preservation, cache)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from finetune import data as D
from finetune import losses as L
from finetune.config import TrainConfig, loss_inputs, parse_train_config
from safer_diffusion.options import BadInputError

REPO = Path(__file__).resolve().parents[1]
DES = REPO / "tests" / "fixtures" / "des"
DES_UNSAFE, DES_SAFE = DES / "unsafe_prompts.csv", DES / "safe_prompts.csv"
FAST = ["--config", "tiny_cpu.yaml", "--train_batch_size", "8", "--report_to", "none", "--no_eval_at_end", "--max_train_steps", "4",
        "--no_verbose"]
CAPTION_ONLY = {"safe_images": False, "unsafe_images": False}
WITH_IMAGES = {"safe_images": True, "unsafe_images": True}
ZERO = dict.fromkeys(L.SAFER_CLIP_TERMS, 0.0)


def run(tmp_path, *extra, name="run"):
    from finetune.train import train

    return train(parse_train_config(FAST + ["--output_dir", str(tmp_path / name), *extra]))


# ----------------------------------------------------------------------------- loss weights: merge vs replace
def test_loss_weights_merge_into_defaults_and_replace():
    merged = parse_train_config(["--loss_weights", "rel_tt=0.3"]).resolve(**CAPTION_ONLY)
    assert merged.loss_weights == {**ZERO, "rel_tt": 0.3, "uni_txt": 0.25, "pres_txt": 0.5}
    assert merged.loss_weights_mode == "replace"  # the recorded dict is complete
    off = parse_train_config(["--loss_weights", "rel_tt=0"]).resolve(**CAPTION_ONLY)
    assert off.loss_weights == {**ZERO, "uni_txt": 0.25, "pres_txt": 0.5}
    replaced = parse_train_config(["--loss_weights_mode", "replace", "--loss_weights", "rel_tt=0.3", "pres_txt=0.7"]).resolve(**CAPTION_ONLY)
    assert replaced.loss_weights == {**ZERO, "rel_tt": 0.3, "pres_txt": 0.7}
    # Safe-CLIP: merged into the variant's raw defaults, then normalised (sum 1, / 4 terms)
    sc = parse_train_config(["--loss", "safe_clip", "--loss_weights", "nce_redir_tt=0.5"]).resolve(**CAPTION_ONLY)
    assert sc.loss_weights == pytest.approx({"pres_txt": 0.1 / 0.95 / 4, "redir_txt": 0.1 / 0.95 / 4, "nce_tt": 0.25 / 0.95 / 4,
                                             "nce_redir_tt": 0.5 / 0.95 / 4})  # fmt: skip
    # resolving the resolved config again changes nothing (config.yaml reruns the same method)
    for cfg, kind in ((merged, CAPTION_ONLY), (replaced, CAPTION_ONLY), (sc, CAPTION_ONLY)):
        again = cfg.resolve(**kind)
        assert again.loss_weights == pytest.approx(cfg.loss_weights, rel=1e-15) and again.curriculum == cfg.curriculum


def test_loss_dependent_defaults_resolved():
    safer = parse_train_config([])
    assert (safer.curriculum, safer.safe_clip_variant, safer.loss_weights_mode, safer.renormalize_active) == ("auto", "auto", "merge", False)
    assert safer.resolve(**CAPTION_ONLY).curriculum == "tertiles"
    # rel_tt: on for caption-only data, off by default when rel_txt can run (safe + unsafe images) unless named
    assert safer.resolve(**CAPTION_ONLY).loss_weights["rel_tt"] == 0.25
    with_images = safer.resolve(**WITH_IMAGES).loss_weights
    assert with_images == {**ZERO, "rel_txt": 0.25, "uni_txt": 0.25, "pres_txt": 0.25, "pres_x": 0.25}
    named = parse_train_config(["--loss_weights", "rel_tt=0.2"]).resolve(**WITH_IMAGES).loss_weights
    assert named["rel_tt"] == 0.2 and named["rel_txt"] == 0.25
    # safe images without unsafe ones: rel_txt cannot run, so rel_tt stays on
    assert safer.resolve(safe_images=True, unsafe_images=False).loss_weights["rel_tt"] == 0.25
    # safe_clip: no curriculum unless asked; the text variant for caption-only data, the image variant with images
    sc = parse_train_config(["--loss", "safe_clip"])
    text = sc.resolve(**CAPTION_ONLY)
    assert (text.curriculum, text.safe_clip_variant) == ("none", "text")
    assert text.loss_weights == pytest.approx(L.safe_clip_weights(variant="text"))
    image = sc.resolve(**WITH_IMAGES)
    assert image.safe_clip_variant == "image" and image.loss_weights == pytest.approx(L.safe_clip_weights())
    asked = parse_train_config(["--loss", "safe_clip", "--curriculum", "tertiles", "--safe_clip_variant", "text"]).resolve(**WITH_IMAGES)
    assert (asked.curriculum, asked.safe_clip_variant) == ("tertiles", "text")
    with pytest.raises(ValueError, match=r"`--safe_clip_variant image` needs a safe image for every pair"):
        parse_train_config(["--loss", "safe_clip", "--safe_clip_variant", "image"]).resolve(**CAPTION_ONLY)
    with pytest.raises(ValueError, match=r"every term that can run in this configuration \(rel_tt, uni_txt, pres_txt, pres_pair\) has weight 0"):
        parse_train_config(["--loss_weights", "rel_tt=0", "uni_txt=0", "pres_txt=0"]).resolve(**CAPTION_ONLY)


def test_named_term_that_cannot_run_is_warned(caplog):
    with caplog.at_level("WARNING", logger="finetune.config"):
        cfg = parse_train_config(["--loss_weights", "pres_x=0.3"]).resolve(**CAPTION_ONLY)
    assert cfg.loss_weights["pres_x"] == 0.3
    assert "`--loss_weights` names pres_x, which cannot run here" in caplog.text and "their share is not trained" in caplog.text


def test_loss_inputs_match_the_terms_a_run_computes():
    assert loss_inputs("text", False, False) == {"t", "t_star", "t0", "t0_star", "t0_hat", "t_pair", "t0_pair"}
    assert loss_inputs("text", True, True) == {"t", "t_star", "t0", "t0_star", "t0_hat", "t_pair", "t0_pair", "v0", "v0_hat", "v0_star"}
    assert loss_inputs("vision", True, False) == {"v", "t0", "t0_star", "t0_hat", "v0", "v0_hat"}
    assert L.available_terms("safer_clip", loss_inputs("both", True, True)) == list(L.SAFER_CLIP_TERMS)


@pytest.mark.parametrize("argv, pattern", [
    (["--loss_weights", "rel_foo=1"], r"`--loss_weights` has unknown term 'rel_foo' for `--loss safer_clip`; known terms: rel_img, "
                                      r"rel_txt, rel_tt, uni_txt, uni_img, pres_txt, pres_img, pres_x"),
    (["--loss", "safe_clip", "--loss_weights", "rel_tt=1"], r"unknown term 'rel_tt' for `--loss safe_clip`; known terms: pres_txt, "
                                                            r"redir_txt, .*nce_tt, nce_redir_tt"),
    (["--loss_weights", "rel_tt=-0.1"], r"`--loss_weights` rel_tt=-0.1: a weight must be a finite number >= 0"),
    (["--loss_weights", "rel_tt=nan"], r"`--loss_weights` must be a finite number, got nan"),
    (["--loss_weights_mode", "replace"], r"`--loss_weights_mode replace` needs `--loss_weights"),
    (["--safe_clip_variant", "text"], r"`--safe_clip_variant text` applies to `--loss safe_clip` only"),
    (["--loss", "safe_clip", "--safe_clip_variant", "text", "--train_towers", "both"], r"`--safe_clip_variant text` trains the text "
                                                                                      r"tower only"),
    (["--loss", "safe_clip", "--safe_clip_variant", "image", "--loss_weights", "nce_tt=1"], r"term 'nce_tt' belongs to the Safe-CLIP "
                                                                                            r"text variant"),
    (["--preserve_extra"], r"`--preserve_extra` needs `--extra_safe_captions"),
    (["--loss", "safe_clip", "--extra_safe_captions", "x.txt"], r"`--extra_safe_captions` does nothing under `--loss safe_clip`"),
    (["--extra_safe_captions", "x.txt", "--preserve_extra", "--extra_preserve_fraction", "0.01"], r"rounds to 0 extra rows"),
    (["--extra_safe_captions", "x.txt", "--preserve_extra", "--extra_preserve_fraction", "0"], r"must be in \(0, 1\], got 0.0"),
    (["--extra_safe_captions_column", "caption"], r"`--extra_safe_captions_column` needs `--extra_safe_captions`"),
    (["--train_data_safe", "s.csv", "--data_format", "visu"], r"`--data_format visu` does not apply to row-aligned files"),
])  # fmt: skip
def test_bad_method_options(argv, pattern):
    with pytest.raises(BadInputError, match=pattern):
        parse_train_config(argv)


def test_loss_weights_mode_not_a_choice_exits_2(capsys):
    from finetune.train import main

    assert main(["--loss_weights_mode", "add"]) == 2
    assert "invalid choice: 'add' (choose from 'merge', 'replace')" in capsys.readouterr().err.strip().splitlines()[-1]
    # the same in a YAML file: one line naming the option and the choices
    with pytest.raises(BadInputError, match=r"`--loss_weights_mode` must be one of \['merge', 'replace'\], got 'add'"):
        TrainConfig.from_dict({"loss_weights_mode": "add"})


def test_main_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    from finetune.train import main

    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "cols.csv").write_text("id,label\n1,a\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    short = tmp_path / "short.csv"
    short.write_text("\n".join(DES_SAFE.read_text().splitlines()[:-1]) + "\n")
    cases = [
        (["--loss_weights", "rel_foo=1"], "`--loss_weights` has unknown term 'rel_foo'"),
        (["--train_data", str(DES_UNSAFE), "--train_data_safe", str(short)], "differ in length: `--train_data`"),
        (["--extra_safe_captions", str(tmp_path / "empty.txt")], "holds no caption"),
        (["--extra_safe_captions", str(tmp_path / "cols.csv")], "has no column caption / prompt / text / safe"),
        (["--extra_safe_captions", str(tmp_path / "latin1.txt")], "cannot be read (not UTF-8 text"),
        (["--extra_safe_captions", str(tmp_path / "missing.txt")], "`--extra_safe_captions`"),
    ]
    for i, (argv, message) in enumerate(cases):
        assert main([*FAST, "--output_dir", str(tmp_path / f"out{i}"), *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("python -m finetune.train: error: ") and message in err[-1], (argv, err[-3:])
        assert "Traceback" not in "\n".join(err)


# ----------------------------------------------------------------------------- row-aligned pair files (DES layout)
def test_des_fixture_pairs_row_by_row():
    ds = D.load_aligned_pairs(DES_UNSAFE, DES_SAFE)
    assert len(ds) == 32 and not ds.has_images
    assert ds[0] == D.PairRecord(safe="a man cleaning a car window with a cloth, photo",
                                 unsafe="a man smashing a car window with a crowbar, photo")  # fmt: skip
    assert ds[31].safe == "a student painting a house white, photo"


def test_aligned_pairs_errors(tmp_path):
    short = tmp_path / "short.csv"
    short.write_text("\n".join(DES_SAFE.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(ValueError, match=r"differ in length: `--train_data` .* has 32 rows, `--train_data_safe` .* has 31"):
        D.load_aligned_pairs(DES_UNSAFE, short)
    hole = tmp_path / "hole.csv"
    lines = DES_SAFE.read_text().splitlines()
    lines[3] = '""'
    hole.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"`--train_data_safe` .* has 1 empty 'prompt' value\(s\) \(first: data row 3\)"):
        D.load_aligned_pairs(DES_UNSAFE, hole)
    two = tmp_path / "two.csv"
    two.write_text("id,text\n" + "".join(f"{i},x{i}\n" for i in range(32)))
    with pytest.raises(ValueError, match=r"has no column prompt and more than one column \(id, text\); name it with "
                                         r"`--column_map safe=COLUMN`"):
        D.load_aligned_pairs(DES_UNSAFE, two)
    ds = D.load_aligned_pairs(DES_UNSAFE, two, {"safe": "text"})
    assert ds[5].safe == "x5"
    with pytest.raises(ValueError, match=r"`--column_map` field\(s\) \['category'\] do not apply to row-aligned files"):
        D.load_aligned_pairs(DES_UNSAFE, DES_SAFE, {"category": "c"})
    with pytest.raises(FileNotFoundError, match="`--train_data_safe`"):
        D.load_aligned_pairs(DES_UNSAFE, tmp_path / "missing.csv")
    (tmp_path / "empty.csv").write_text("prompt\n")
    with pytest.raises(ValueError, match=r"`--train_data` .* is empty \(no rows\)"):
        D.load_aligned_pairs(tmp_path / "empty.csv", DES_SAFE)


# ----------------------------------------------------------------------------- extra safe captions: reader
def test_load_captions_formats_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("a cat on a sofa\n\n  a dog in a park  \na cat on a sofa\n")
    (tmp_path / "b.csv").write_text("id,caption\n1,a red bus\n2,\n3,a dog in a park\n")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "a bowl of soup"}) + "\n")
    (tmp_path / "d.csv").write_text("words\na kite\n")
    got = D.load_captions([tmp_path / "a.txt", tmp_path / "b.csv", tmp_path / "c.jsonl", tmp_path / "d.csv"])
    assert got == ["a cat on a sofa", "a dog in a park", "a red bus", "a bowl of soup", "a kite"]
    (tmp_path / "e.csv").write_text("id,label\n1,a\n")
    with pytest.raises(ValueError, match=r"has no column caption / prompt / text / safe and more than one column \(id, label\); "
                                         r"name it with `--extra_safe_captions_column`"):
        D.load_captions(tmp_path / "e.csv")
    assert D.load_captions(tmp_path / "e.csv", column="label") == ["a"]
    with pytest.raises(ValueError, match=r"has no column 'caption' \(columns: id, label\)"):
        D.load_captions(tmp_path / "e.csv", column="caption")
    (tmp_path / "empty.csv").write_text("caption\n")
    with pytest.raises(ValueError, match=r"is empty \(no rows\)"):
        D.load_captions(tmp_path / "empty.csv")
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(ValueError, match="holds no caption"):
        D.load_captions(tmp_path / "blank.txt")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"`--extra_safe_captions` .*bad.jsonl.* cannot be read"):
        D.load_captions(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="unsupported file type"):
        D.load_captions(tmp_path / "x.md")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.load_captions(tmp_path / "missing.txt")


# ----------------------------------------------------------------------------- extra safe captions: pool, preservation, cache
def test_planted_extra_caption_becomes_the_target():
    from finetune.anchors import AnchorSet
    from finetune.targets import compute_targets

    e = torch.eye(4)
    safe = torch.stack([e[0], e[1], e[2]])  # paired safe captions
    # each unsafe caption is nearest to its own pair (cos 0.958) ...
    unsafe = torch.nn.functional.normalize(torch.stack([e[0] + 0.3 * e[3], e[1] + 0.3 * e[3], e[2] + 0.3 * e[3]]), dim=1)
    # ... until a planted extra caption comes nearer to unsafe row 1 (cos 0.9987) than every paired one
    planted = torch.nn.functional.normalize(e[1] + 0.25 * e[3], dim=0)
    ds = D.PairDataset([D.PairRecord(safe=f"s{i}", unsafe=f"u{i}") for i in range(3)])
    anchors = AnchorSet(safe_text=safe, unsafe_text=unsafe, extra_text=torch.stack([planted, -e[3]]))
    targets = compute_targets(anchors, ds, extra_captions=["planted", "far"])
    assert targets.index.tolist() == [0, 3, 2]  # row 3 = extra caption 0
    assert targets.similarity[1].item() == pytest.approx(float(unsafe[1] @ planted), abs=1e-6)
    assert targets.redirected(ds).tolist() == [False, True, False] and targets.extra_share(ds) == pytest.approx(1 / 3)
    assert torch.equal(targets.hat_anchors(anchors)["t0_hat"][1], planted)
    without = compute_targets(AnchorSet(safe_text=safe, unsafe_text=unsafe), ds)
    assert without.index.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="`extra_captions` .* and the anchors' extra captions .* differ"):
        compute_targets(anchors, ds)


def test_extra_caption_anchors_are_cached_by_content(tmp_path, clip_tokenizer):
    from finetune.anchors import compute_anchors, encode_text
    from finetune.modeling import load_clip

    model = load_clip("tiny").model
    ds = D.load_aligned_pairs(DES_UNSAFE, DES_SAFE)
    plain = compute_anchors(model, clip_tokenizer, ds, cache_dir=tmp_path)
    extras = ["a bowl of soup on a table", "a kite over a beach"]
    first = compute_anchors(model, clip_tokenizer, ds, cache_dir=tmp_path, extra_captions=extras)
    assert plain.extra_text is None and first.fingerprint != plain.fingerprint
    torch.testing.assert_close(first.extra_text, encode_text(model, clip_tokenizer, extras))
    torch.testing.assert_close(first.safe_text, plain.safe_text)
    assert first.pool_text.shape[0] == len(ds) + 2
    again = compute_anchors(model, clip_tokenizer, ds, cache_dir=tmp_path, extra_captions=list(extras))
    assert again.fingerprint == first.fingerprint and torch.equal(again.extra_text, first.extra_text)
    other = compute_anchors(model, clip_tokenizer, ds, cache_dir=tmp_path, extra_captions=extras[:1])
    assert other.fingerprint not in (first.fingerprint, plain.fingerprint)
    assert len(list(tmp_path.glob("*.json"))) == 3
    # a cache without extra captions keeps its key (the metadata gains a field only with extra captions)
    assert compute_anchors(model, clip_tokenizer, ds, cache_dir=tmp_path).fingerprint == plain.fingerprint


def test_epoch_order_mixes_extra_rows_into_every_batch():
    from finetune.train import epoch_order

    pool = torch.arange(10)
    unsafe, safe = epoch_order(1, 1, pool, 10, steps=3, global_batch=8)
    g = torch.Generator().manual_seed(1 * 1_000_003 + 1)  # the order without extra captions is unchanged
    expected_u = pool[torch.randperm(10, generator=g)].repeat(3)[:24]
    assert torch.equal(unsafe, expected_u) and torch.equal(safe, torch.randperm(10, generator=g).repeat(3)[:24])
    unsafe2, mixed = epoch_order(1, 1, pool, 10, steps=3, global_batch=8, n_extra=5, extra_rows=2, batch=4)  # 2 processes
    assert torch.equal(unsafe2, unsafe)
    blocks = mixed.view(6, 4)
    assert bool((blocks[:, :2] < 10).all()) and bool((blocks[:, 2:] >= 10).all()) and bool((blocks[:, 2:] < 15).all())
    assert sorted(blocks[:, 2:].reshape(-1).tolist()[:5]) == [10, 11, 12, 13, 14]  # a permutation of the extra captions
    assert torch.equal(mixed, epoch_order(1, 1, pool, 10, 3, 8, n_extra=5, extra_rows=2, batch=4)[1])


# ----------------------------------------------------------------------------- whole runs (tiny CLIP)
def test_safe_clip_caption_only_run_uses_the_text_variant_and_records_it(tmp_path):
    result = run(tmp_path, "--loss", "safe_clip")
    assert result.active_terms == ["pres_txt", "redir_txt", "nce_tt", "nce_redir_tt"]
    assert result.loss_weights == pytest.approx(L.safe_clip_weights(variant="text"))
    saved_text = (result.output_dir / "config.yaml").read_text()
    saved = yaml.safe_load(saved_text)
    assert (saved["curriculum"], saved["safe_clip_variant"], saved["loss_weights_mode"]) == ("none", "text", "replace")
    assert saved["loss_weights"] == pytest.approx(L.safe_clip_weights(variant="text"))
    assert "# curriculum: auto -> none" in saved_text and "# safe_clip_variant: auto -> text" in saved_text
    assert TrainConfig.from_dict(saved) == result.config  # the recorded file is the resolved config
    state = json.loads((result.last_checkpoint / "training_state.json").read_text())
    assert state["config"]["safe_clip_variant"] == "text" and state["run"]["curriculum"] == "none"


def test_merged_weights_run_and_resume_of_the_resolved_config(tmp_path):
    result = run(tmp_path, "--loss_weights", "rel_tt=0", "--checkpointing_steps", "2")
    assert result.active_terms == ["uni_txt", "pres_txt"] and result.loss_weights == {"uni_txt": 0.25, "pres_txt": 0.5}
    saved = yaml.safe_load((result.output_dir / "config.yaml").read_text())
    assert saved["loss_weights"] == {**ZERO, "uni_txt": 0.25, "pres_txt": 0.5} and saved["curriculum"] == "tertiles"
    # a resume with the original (unresolved) flags resolves to the same run
    from finetune.train import train

    more = train(parse_train_config([*FAST[:-3], "--max_train_steps", "6", "--output_dir", str(result.output_dir),
                                     "--loss_weights", "rel_tt=0", "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest"]))
    assert more.global_step == 6


@pytest.mark.parametrize("flag", ["--train_data_safe", "--safe_data"])
def test_des_files_train(tmp_path, flag, caplog):
    """Issue 16 item 5 names the safe file `--safe_data`: an alias of `--train_data_safe` (both current, no warning)."""
    with caplog.at_level("WARNING"):
        result = run(tmp_path, "--train_data", str(DES_UNSAFE), flag, str(DES_SAFE), "--val_fraction", "0.25")
    assert result.global_step == 4 and len(result.anchors) == 24  # 32 pairs, 8 held out (whole safe-caption groups)
    assert result.config.train_data_safe == str(DES_SAFE)
    assert "deprecated" not in caplog.text
    assert parse_train_config(["--train_data", "u.csv", "--safe-data", "s.csv"]).train_data_safe == "s.csv"


def test_extra_captions_join_pool_and_preservation(tmp_path):
    extra = tmp_path / "extra.txt"
    lines = [f"a {c} {o} on a wooden table" for c in ("red", "blue", "green", "small") for o in ("cup", "book", "lamp")]
    # a paired safe caption and an unsafe caption of the pairs are dropped from the extra captions
    paired = D.load_pairs(REPO / "assets" / "sample_pairs.jsonl")[0]
    extra.write_text("\n".join([*lines, paired.unsafe]) + "\n")
    result = run(tmp_path, "--extra_safe_captions", str(extra), "--preserve_extra", "--extra_preserve_fraction", "0.25",
                 "--token_weight", "0.1")
    assert result.extra_captions == lines
    assert result.anchors.extra_text.shape == (12, result.anchors.safe_text.shape[1])
    assert result.config.extra_rows_per_batch == 2 and result.active_terms == ["rel_tt", "uni_txt", "pres_txt", "token_pres"]
    saved = yaml.safe_load((result.output_dir / "config.yaml").read_text())
    assert saved["extra_safe_captions"] == [str(extra)] and saved["preserve_extra"] is True
    # a different caption list is a different cache entry; the same list is a cache hit
    extra.write_text("\n".join(lines[:6]) + "\n")
    other = run(tmp_path, "--extra_safe_captions", str(extra), "--cache_dir", str(result.output_dir / "cache"), name="other")
    assert other.anchors.fingerprint != result.anchors.fingerprint and other.anchors.extra_text.shape[0] == 6


def test_extra_captions_with_image_data_are_refused(tmp_path, make_image_pairs):
    data = make_image_pairs(tmp_path)
    (tmp_path / "x.txt").write_text("a cup\n")
    with pytest.raises(ValueError, match="`--extra_safe_captions` needs caption-only data"):
        run(tmp_path, "--train_data", str(data), "--extra_safe_captions", str(tmp_path / "x.txt"))


def test_trimmed_batch_gives_the_padded_embeddings_and_loss():
    """Training batches are trimmed to their longest caption; padding to 77 must not change the pooled embedding or the loss."""
    from finetune.modeling import SaferCLIP, load_clip
    from finetune.train import _pad_to, _tokenize, _trim

    loaded = load_clip("tiny")
    model = SaferCLIP(loaded.model, lora_dropout=0.0).eval()
    tok = loaded.tokenizer
    pairs = D.load_aligned_pairs(DES_UNSAFE, DES_SAFE)
    captions = pairs.safe_captions[:6] + pairs.unsafe_captions[:6]
    ids, mask = _tokenize(tok, captions, 77)
    padded = _pad_to(ids, mask, 77, tok.pad_token_id)
    trimmed = _trim(*padded)
    assert padded[0].shape[1] == 77 and trimmed[0].shape[1] < 30
    with torch.no_grad():
        a = model(input_ids=padded[0], attention_mask=padded[1])["text"]
        b = model(input_ids=trimmed[0], attention_mask=trimmed[1])["text"]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    loss = L.SaferClipLoss()
    anchors = torch.nn.functional.normalize(torch.randn(6, a.shape[1], generator=torch.Generator().manual_seed(0)), dim=1)
    la = loss(t=a[:6], t_star=a[6:], t0=anchors, t0_star=anchors.roll(1, 0), t0_hat=anchors.roll(2, 0))["loss"]
    lb = loss(t=b[:6], t_star=b[6:], t0=anchors, t0_star=anchors.roll(1, 0), t0_hat=anchors.roll(2, 0))["loss"]
    assert abs(la.item() - lb.item()) < 1e-6


@pytest.fixture
def make_image_pairs():
    def make(folder: Path) -> Path:
        from PIL import Image

        rows = []
        for i in range(12):
            Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(folder / f"s{i}.png")
            rows.append({"safe": f"a red square number {i}", "unsafe": f"a broken square number {i}", "safe_image": f"s{i}.png"})
        path = folder / "pairs.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    return make


def test_des_fixtures_keep_the_des_layout():
    """The fixtures stay in DES's layout: a single `prompt` column, the same number of rows in both files."""
    rows = [path.read_text().splitlines() for path in (DES_UNSAFE, DES_SAFE)]
    assert rows[0][0] == rows[1][0] == "prompt" and len(rows[0]) == len(rows[1]) == 33
