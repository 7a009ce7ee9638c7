"""Trainer: config, model wrapper, frozen references, checkpoints/resume, failure handling (tiny CLIP, CPU)."""

from __future__ import annotations

import errno
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune.config import CONFIG_DIR, TrainConfig, parse_train_config
from safer_diffusion.options import BadInputError

REPO = Path(__file__).resolve().parents[1]

# Small, fast runs: tiny random CLIP on the bundled sample pairs, a handful of steps.
FAST = ["--config", "tiny_cpu.yaml", "--train_batch_size", "8", "--report_to", "none", "--no_eval_at_end"]


def run(tmp_path, *extra, name="run"):
    from finetune.train import train

    return train(parse_train_config(FAST + ["--output_dir", str(tmp_path / name), *extra]))


# ----------------------------------------------------------------------------- config
def test_bundled_configs_parse_and_paper_recipe():
    names = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
    assert {"safer_clip_vit_l14.yaml", "safe_clip_vit_l14.yaml", "safer_clip_vit_h14_sd2.yaml", "tiny_cpu.yaml"} <= set(names)
    for name in names:
        assert isinstance(parse_train_config(["--config", name]), TrainConfig)
    paper = parse_train_config(["--config", "safer_clip_vit_l14.yaml"])
    assert (paper.model_name_or_path, paper.finetune, paper.lora_rank, paper.learning_rate, paper.train_batch_size,
            paper.num_train_epochs, paper.loss) == ("openai/clip-vit-large-patch14", "lora", 16, 1e-4, 48, 9, "safer_clip")
    baseline = parse_train_config(["--config", "safe_clip_vit_l14.yaml"])
    assert (baseline.loss, baseline.curriculum, baseline.safe_clip_variant) == ("safe_clip", "none", "auto")
    improved = parse_train_config(["--config", "safer_clip_improved_vit_l14.yaml"])
    assert improved.preserve_extra and improved.token_weight > 0 and improved.extra_safe_captions == ["generic_safe_captions.txt"]
    assert improved.loss_weights == {"pres_txt": 1.5, "pres_pair": 1.0} and improved.loss_weights_mode == "merge"
    assert paper.resolve(safe_images=False, unsafe_images=False).loss_weights["pres_pair"] == 0.0  # the paper recipe: off
    changed = ("extra_safe_captions", "preserve_extra", "token_weight", "loss_weights", "output_dir")
    assert {k: v for k, v in improved.to_dict().items() if k not in changed} == {k: v for k, v in paper.to_dict().items() if k not in changed}
    assert parse_train_config(["--config", "safer_clip_vit_h14_sd2.yaml"]).model_name_or_path == "open_clip:ViT-H-14:laion2b_s32b_b79k"


def test_cli_overrides_yaml_and_types():
    c = parse_train_config(["--config", "tiny_cpu.yaml", "--learning_rate", "0.5", "--max_train_steps", "7", "--no_precompute_anchors",
                            "--loss_weights", "rel_tt=1.0", "pres_txt=0.5", "--lora_target_modules", "q_proj", "v_proj",
                            "--column-map", "safe=a", "unsafe=b"])  # fmt: skip
    assert c.model_name_or_path == "tiny" and c.learning_rate == 0.5 and c.max_train_steps == 7
    assert c.precompute_anchors is False and c.loss_weights == {"rel_tt": 1.0, "pres_txt": 0.5}
    assert c.lora_target_modules == ["q_proj", "v_proj"] and c.column_map == {"safe": "a", "unsafe": "b"}
    assert parse_train_config([]).train_towers == "text"  # default: only the text tower
    # the config written next to the outputs reads back to the same config
    assert TrainConfig.from_dict(c.to_dict()) == c


def test_old_spellings_still_parse_with_a_deprecation_warning(caplog):
    with caplog.at_level(logging.WARNING):
        c = parse_train_config(["--config", "tiny_cpu.yaml", "--no-precompute_anchors", "--no-eval_at_end",
                                "--loss_weights", '{"rel_tt": 1.0}', "--column_map", "safe=a,unsafe=b"])  # fmt: skip
    assert c.precompute_anchors is False and c.eval_at_end is False
    assert c.loss_weights == {"rel_tt": 1.0} and c.column_map == {"safe": "a", "unsafe": "b"}
    assert "`--no-precompute_anchors` is deprecated" in caplog.text and "--no_precompute_anchors" in caplog.text
    assert "`--loss_weights` as a JSON object is deprecated" in caplog.text


def test_bad_options(tmp_path):
    with pytest.raises(SystemExit):
        parse_train_config(["--loss", "safer-clip"])  # argparse choices
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: infonce\n")
    with pytest.raises(BadInputError, match="`--loss` must be one of"):
        parse_train_config(["--config", str(bad)])
    bad.write_text("learning_rat: 0.1\n")
    with pytest.raises(BadInputError, match=r"unknown option\(s\) \['learning_rat'\]"):
        parse_train_config(["--config", str(bad)])
    bad.write_text("learning_rate: .nan\n")
    with pytest.raises(BadInputError, match="`--learning_rate` must be a finite number, got nan"):
        parse_train_config(["--config", str(bad)])
    with pytest.raises(BadInputError, match="`--config`.*does not exist"):
        parse_train_config(["--config", str(tmp_path / "missing.yaml")])
    cases = [
        (["--relative_scale", "12"], r"`--relative_scale` must be in \[0.0, 10.0\], got 12.0"),
        (["--relative_scale", "10"], r"`--relative_scale` 10.0 is >= 10"),
        (["--train_batch_size", "0"], r"`--train_batch_size` must be in \[1, inf\], got 0"),
        (["--learning_rate", "nan"], r"`--learning_rate` must be a finite number, got nan"),
        (["--learning_rate", "0"], r"`--learning_rate` must be > 0, got 0.0"),
        (["--val_fraction", "1"], r"`--val_fraction` must be in \[0, 1\), got 1.0"),
        (["--seed", str(2**32)], r"`--seed` must be in \[0, 4294967295\]"),
        (["--loss_weights", "rel_tt=inf"], r"`--loss_weights` must be a finite number, got inf"),
        (["--loss_weights", "nce_txt=1"], r"`--loss_weights` has unknown term 'nce_txt' for `--loss safer_clip`"),
        (["--loss", "safe_clip", "--loss_weights", "rel_tt=1"], r"unknown term 'rel_tt' for `--loss safe_clip`"),
        (["--curriculum_boundaries", "0.6", "0.3"], r"`--curriculum_boundaries` must be strictly increasing"),
        (["--curriculum_stage_epochs", "1", "2"], r"`--curriculum_stage_epochs` needs one epoch per stage"),
        (["--column_map", "sfe=a"], r"`column_map` has unknown field 'sfe'"),
    ]
    for argv, pattern in cases:
        with pytest.raises(BadInputError, match=pattern):
            parse_train_config(argv)
    with pytest.raises(BadInputError, match="`--learning_rate` must be a finite number"):  # a config built in Python too
        from finetune.train import train

        train(TrainConfig(learning_rate=float("nan")))


def test_help_runs_as_module():
    out = subprocess.run([sys.executable, "-m", "finetune.train", "--help"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0 and "--resume_from_checkpoint" in out.stdout and "{safer_clip,safe_clip}" in out.stdout


# ----------------------------------------------------------------------------- model wrapper
def test_lora_only_on_text_tower_fp32_trainable_lowp_frozen():
    from finetune.modeling import SaferCLIP, load_clip

    loaded = load_clip("tiny")
    model = SaferCLIP(loaded.model, weight_dtype=torch.bfloat16)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    layers = loaded.model.config.text_config.num_hidden_layers
    assert len(trainable) == layers * 6 * 2  # q,k,v,out,fc1,fc2 x (A, B)
    assert all("text_model" in n and "lora_" in n for n in trainable)
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    assert {p.dtype for n, p in model.named_parameters() if not p.requires_grad} == {torch.bfloat16}
    both = SaferCLIP(load_clip("tiny").model, train_towers="both")
    assert any("vision_model" in n for n, p in both.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("quick_gelu", [False, True], ids=["gelu", "quickgelu"])
def test_open_clip_conversion_matches(tmp_path, quick_gelu):
    open_clip = pytest.importorskip("open_clip")
    import json

    from finetune.modeling import convert_open_clip

    name = f"tiny-oc-test-{int(quick_gelu)}"
    cfg = {"embed_dim": 16, "quick_gelu": quick_gelu,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path)
    torch.manual_seed(0)
    oc = open_clip.create_model(name).eval()
    hf, size, _, _ = convert_open_clip(oc, open_clip.get_model_config(name))
    assert hf.config.text_config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
    tokens = open_clip.get_tokenizer(name)(["a photo of a cat", "two dogs on a beach"])
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hf.get_text_features(tokens).pooler_output, oc.encode_text(tokens), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(hf.get_image_features(pixels).pooler_output, oc.encode_image(pixels), atol=1e-5, rtol=1e-4)
    assert size == 32


def test_model_and_backend_errors(monkeypatch):
    from finetune.modeling import check_attention, check_mixed_precision, load_clip

    with pytest.raises(FileNotFoundError, match="`--model_name_or_path`"):
        load_clip("no-such-model")
    with pytest.raises(ValueError, match="unknown OpenCLIP architecture"):
        load_clip("open_clip:ViT-Nope-99")
    with pytest.raises(ValueError, match="xformers"):
        check_attention("xformers", "cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(ValueError, match="does not support bfloat16"):
        check_mixed_precision("bf16", "cuda")
    with pytest.raises(ValueError, match="fp16` needs a GPU"):
        check_mixed_precision("fp16", "cpu")


def test_train_rejects_bad_input_before_work(tmp_path, monkeypatch):
    from finetune import data as data_mod
    from finetune import train as train_mod

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the inputs were checked")

    with monkeypatch.context() as m:  # these are refused before any data is read or model loaded
        m.setattr(train_mod, "load_clip", no_work)
        m.setattr(data_mod, "load_pairs", no_work)
        (tmp_path / "a_file").write_text("x")
        with pytest.raises(BadInputError, match=r"`--output_dir` '.*a_file' is a file, not a folder"):
            train_mod.train(parse_train_config(FAST + ["--output_dir", str(tmp_path / "a_file")]))
        with pytest.raises(BadInputError, match=r"`--output_dir` '.*a_file/run' cannot be created: '.*a_file' is a file"):
            train_mod.train(parse_train_config(FAST + ["--output_dir", str(tmp_path / "a_file" / "run")]))
        with pytest.raises(BadInputError, match=r"`--cache_dir` '.*a_file/c' cannot be created"):
            run(tmp_path, "--cache_dir", str(tmp_path / "a_file" / "c"), name="cache")
        with pytest.raises(FileNotFoundError, match="`--train_data` 'nope.jsonl' does not exist"):
            run(tmp_path, "--train_data", "nope.jsonl", name="data")
        with pytest.raises(FileNotFoundError, match="`--image_root`"):
            run(tmp_path, "--image_root", str(tmp_path / "no-images"), name="images")
        with pytest.raises(FileNotFoundError, match="`--model_name_or_path`"):
            run(tmp_path, "--model_name_or_path", "tinyy", name="typo")
        with pytest.raises(ValueError, match="fp16` needs a GPU"):
            run(tmp_path, "--mixed_precision", "fp16", name="fp16")
        with pytest.raises(ValueError, match="xformers"):
            run(tmp_path, "--attention", "xformers", name="xf")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "data").exists()  # no folder left behind by the checks
    with pytest.raises(ValueError, match="larger than the training set"):
        run(tmp_path, "--train_batch_size", "100000", name="big")
    with pytest.raises(ValueError, match="has no images"):
        run(tmp_path, "--train_towers", "vision", name="vision")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not empty"):
        run(tmp_path, name="used")
    with pytest.raises(FileNotFoundError, match="`--resume_from_checkpoint`.*does not exist"):
        run(tmp_path, "--resume_from_checkpoint", str(tmp_path / "nope" / "checkpoint-3"), name="fresh")


# ----------------------------------------------------------------------------- frozen references stay frozen
@pytest.mark.parametrize("precompute", [False, True], ids=["live-reference", "precomputed-anchors"])
def test_frozen_reference_bit_identical_after_training(tmp_path, precompute):
    from finetune.modeling import load_clip

    flag = "--precompute_anchors" if precompute else "--no_precompute_anchors"
    pristine = load_clip("tiny")
    base_state = {k: v.clone() for k, v in pristine.model.state_dict().items()}
    result = run(tmp_path, flag, "--max_train_steps", "4", "--learning_rate", "5e-2", "--checkpointing_steps", "100")
    model, tok = result.model, result.tokenizer
    captions = ["a person riding a bike in the park", "a cat sleeping on a red sofa", "a woman holding a knife in a kitchen"]
    enc = tok(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        before = pristine.model.get_text_features(**enc).pooler_output
        before = torch.nn.functional.normalize(before, dim=-1)
        after, _ = model.reference_text(enc.input_ids, enc.attention_mask)
        trained = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask)["text"]
    assert torch.equal(before, after), "the frozen reference T0 moved during training"
    assert not torch.allclose(trained, before, atol=1e-4), "training did not change the trainable encoder"
    for name, value in model.clip.state_dict().items():  # every base weight is untouched
        key = name.replace(".base_layer", "")
        if "lora_" not in name:
            assert torch.equal(value, base_state[key]), name
    # the anchors used by the run equal anchors recomputed from the trained model with adapters disabled
    from finetune.anchors import compute_anchors
    from finetune.data import load_pairs, split_pairs

    cfg = parse_train_config(["--config", "tiny_cpu.yaml"])
    train_set, _ = split_pairs(load_pairs(REPO / cfg.train_data), cfg.val_fraction, cfg.seed)
    with model.model.disable_adapter():
        again = compute_anchors(model.clip, tok, train_set, batch_size=64, device="cpu", dtype=torch.float32, cache_dir=tmp_path / "c2")
    assert torch.equal(again.safe_text, result.anchors.safe_text)
    assert torch.equal(again.unsafe_text, result.anchors.unsafe_text)


# ----------------------------------------------------------------------------- checkpoints and resume
def test_resume_reproduces_loss_sequence_bit_exactly(tmp_path):
    import json

    from finetune.checkpoint import find_checkpoints

    straight = run(tmp_path, "--max_train_steps", "6", "--checkpointing_steps", "3", name="straight")
    assert len(straight.losses) == 6
    first = run(tmp_path, "--max_train_steps", "3", "--checkpointing_steps", "3", name="split")
    resumed = run(tmp_path, "--max_train_steps", "6", "--checkpointing_steps", "3", "--resume_from_checkpoint", "latest", name="split")
    assert first.losses + resumed.losses == straight.losses  # bit-exact: LoRA dropout RNG, Adam state, data order
    assert resumed.global_step == 6
    assert [p.name for p in find_checkpoints(tmp_path / "split")] == ["checkpoint-3", "checkpoint-6"]
    assert (tmp_path / "split" / "config.yaml").is_file()
    # a named checkpoint works too, relative to the output folder
    again = run(tmp_path, "--max_train_steps", "6", "--checkpointing_steps", "3", "--resume_from_checkpoint", "checkpoint-3",
                "--logging_steps", "1", name="split")
    assert again.losses == straight.losses[3:] and again.inexact_resume == []
    # the log holds each step once: the replayed steps 4-6 replaced the first resume's records
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [3, 4, 5, 6]


def test_checkpoints_total_limit(tmp_path):
    from finetune.checkpoint import find_checkpoints

    run(tmp_path, "--max_train_steps", "6", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2", name="limit")
    assert [p.name for p in find_checkpoints(tmp_path / "limit")] == ["checkpoint-4", "checkpoint-6"]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from finetune import train as train_mod

    real = train_mod._build_loss

    def poisoned(config, gather):
        loss = real(config, gather)
        calls = {"n": 0}
        forward = loss.forward

        def fwd(**kw):
            out = forward(**kw)
            calls["n"] += 1
            if calls["n"] == 5:
                out["loss"] = out["loss"] * float("nan")
            return out

        loss.forward = fwd
        return loss

    monkeypatch.setattr(train_mod, "_build_loss", poisoned)
    with pytest.raises(train_mod.NonFiniteLossError, match=r"loss is nan at step 5 .*checkpoint-4"):
        run(tmp_path, "--max_train_steps", "8", "--checkpointing_steps", "2", name="nan")
    from finetune.checkpoint import latest_checkpoint

    assert latest_checkpoint(tmp_path / "nan").name == "checkpoint-4"


def test_disk_full_while_checkpointing_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    from accelerate import Accelerator

    from finetune.checkpoint import CheckpointWriteError, latest_checkpoint

    real = Accelerator.save_state
    calls = {"n": 0}

    def flaky(self, output_dir=None, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(output_dir, "optimizer.bin").write_bytes(b"half")  # something half-written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, output_dir, **kw)

    monkeypatch.setattr(Accelerator, "save_state", flaky)
    with pytest.raises(CheckpointWriteError, match=r"checkpoint-4 .*No space left on device .*[GM]iB free on that disk.*removed.*checkpoint-2' is kept"):
        run(tmp_path, "--max_train_steps", "6", "--checkpointing_steps", "2", name="full")
    out = tmp_path / "full"
    assert latest_checkpoint(out).name == "checkpoint-2"
    assert not (out / "checkpoint-4").exists()
    assert not list(out.glob(".tmp-*"))
    monkeypatch.setattr(Accelerator, "save_state", real)
    resumed = run(tmp_path, "--max_train_steps", "6", "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest", name="full")
    assert resumed.global_step == 6 and len(resumed.losses) == 4


# ----------------------------------------------------------------------------- other modes
@pytest.fixture(scope="module")
def image_pairs(tmp_path_factory):
    """24 pairs with safe and unsafe images (random 40x40 PNGs), generic JSONL with relative paths."""
    import json

    from PIL import Image

    root = tmp_path_factory.mktemp("image_pairs")
    (root / "img").mkdir()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(24):
        for kind in ("safe", "unsafe"):
            arr = (torch.rand(40, 40, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / "img" / f"{kind}{i}.png")
        rows.append({"safe": f"a person number {i} walking a dog", "unsafe": f"a person number {i} hitting a dog",
                     "safe_image": f"img/safe{i}.png", "unsafe_image": f"img/unsafe{i}.png"})
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root / "pairs.jsonl"


@pytest.mark.parametrize("precompute", ["--precompute_anchors", "--no_precompute_anchors"])
def test_both_towers_with_images(tmp_path, image_pairs, precompute):
    result = run(tmp_path, "--train_data", str(image_pairs), "--train_towers", "both", "--train_batch_size", "4",
                 "--max_train_steps", "3", precompute, "--val_fraction", "0")
    assert result.global_step == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    # every term has its inputs; rel_tt (the caption-only stand-in for rel_txt) is off by default next to rel_txt
    assert result.active_terms == ["rel_img", "rel_txt", "uni_txt", "uni_img", "pres_txt", "pres_img", "pres_x"]
    assert result.active_terms == [k for k, w in result.config.loss_weights.items() if w > 0]  # resolved = what ran
    assert any("vision_model" in k for k in result.model.trainable_state_dict())


def test_safe_clip_with_images_uses_the_image_variant(tmp_path, image_pairs):
    result = run(tmp_path, "--train_data", str(image_pairs), "--loss", "safe_clip", "--train_batch_size", "4", "--max_train_steps", "2",
                 "--val_fraction", "0")
    assert result.config.safe_clip_variant == "image" and result.config.curriculum == "none"
    # text tower only: the vision terms cannot run; their weight is not redistributed (renormalize_active off)
    assert result.active_terms == ["pres_txt", "redir_txt", "nce_txt", "nce_redir_txt"]
    assert sum(result.loss_weights.values()) == pytest.approx(0.7 / 1.75 / 8)


def test_full_finetune_token_loss_and_live_copy(tmp_path):
    live = run(tmp_path, "--finetune", "full", "--no_precompute_anchors", "--token_weight", "0.5", "--max_train_steps", "2", name="a")
    assert "token_pres" in " ".join(live.active_terms) and live.model.frozen_copy is not None
    pre = run(tmp_path, "--finetune", "full", "--token_weight", "0.5", "--max_train_steps", "2", name="b")
    assert live.losses[0] == pytest.approx(pre.losses[0], abs=1e-5)  # same first step with anchors or a live reference
    lean = run(tmp_path, "--finetune", "full", "--max_train_steps", "1", name="c")
    assert lean.model.frozen_copy is None  # precomputed anchors, no token term: no second copy of the model


def test_bench_train_cpu_tiny_runs():
    import json

    cmd = [sys.executable, "benchmarks/bench_train.py", "--repeats", "1", "--warmup", "0", "--batch_size", "8"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert last["anchors_steps_per_s"] > 0 and last["live_reference_steps_per_s"] > 0 and last["size"] == "tiny"


@pytest.mark.slow
def test_ddp_two_cpu_processes_checkpoint_and_resume(tmp_path, image_pairs):
    """DDP with 2 CPU processes (gloo, launched like `accelerate launch` does, via torch.distributed.run): both towers with
    images, so the in-batch InfoNCE term gathers across ranks; per-rank RNG states in the checkpoint; then resume."""
    import json
    import os

    out = tmp_path / "ddp"
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "finetune.train",
            "--config", "finetune/configs/tiny_cpu.yaml", "--output_dir", str(out), "--checkpointing_steps", "2", "--no_eval_at_end",
            "--train_data", str(image_pairs), "--train_towers", "both", "--train_batch_size", "4", "--val_fraction", "0",
            "--logging_steps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(base + ["--max_train_steps", "2"], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "checkpoint-2" / "random_states_0.pkl").is_file() and (out / "checkpoint-2" / "random_states_1.pkl").is_file()
    again = subprocess.run(base + ["--max_train_steps", "4", "--resume_from_checkpoint", "latest"], cwd=REPO, capture_output=True,
                           text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "checkpoint-4" / "training_state.json").read_text())["global_step"] == 4
    logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4] and all("loss/pres_x" in r for r in logged)


def test_readme_training_commands_parse():
    """Every command in the README's training section names real modules, configs and flags."""
    import shlex

    from finetune.evaluate import parse_evaluate_config
    from finetune.export import parse_export_config

    text = (REPO / "README.md").read_text()
    section = text[text.index("<!-- section:training -->"): text.index("<!-- /section:training -->")]
    block = "\n".join(section.split("```bash")[i].split("```")[0] for i in range(1, section.count("```bash") + 1))
    commands = [shlex.split(c) for c in block.replace("\\\n", " ").splitlines() if c.strip()]
    parsers = {"finetune.train": parse_train_config, "finetune.export": parse_export_config, "finetune.evaluate": parse_evaluate_config}
    seen = set()
    for argv in commands:
        argv = argv[: argv.index("#")] if "#" in argv else argv
        module = argv[argv.index("-m") + 1]
        args = argv[argv.index("-m") + 2:]
        args = [str(REPO / a) if a.startswith("finetune/configs/") else a for a in args]
        parsers[module](args)
        seen.add(module)
    assert seen == set(parsers)
    assert "safer-clip-train = \"finetune.train:main\"" in (REPO / "pyproject.toml").read_text()


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory):
    from finetune.train import train

    out = tmp_path_factory.mktemp("ref") / "run"
    return train(parse_train_config(FAST + ["--output_dir", str(out), "--max_train_steps", "2"])).losses


@pytest.mark.parametrize("flags,tol", [
    (["--gradient_checkpointing"], 1e-6),
    (["--attention", "eager"], 1e-5),
    (["--mixed_precision", "bf16"], 5e-2),
], ids=["grad-checkpointing", "eager", "bf16"])
def test_memory_and_precision_options_train_the_same(tmp_path, reference_losses, flags, tol):
    result = run(tmp_path, *flags, "--max_train_steps", "2")
    assert result.losses == pytest.approx(reference_losses, abs=tol)
    dtypes_frozen = {p.dtype for p in result.model.parameters() if not p.requires_grad}
    assert {p.dtype for p in result.model.parameters() if p.requires_grad} == {torch.float32}
    assert dtypes_frozen == ({torch.bfloat16} if "bf16" in flags else {torch.float32})


# ----------------------------------------------------------------------------- GPU (opt-in: --rungpu)
@pytest.mark.gpu
@pytest.mark.parametrize("mixed_precision,attention", [("bf16", "sdpa"), ("fp16", "sdpa"), ("bf16", "xformers"), ("no", "eager")])
def test_gpu_training_precision_and_attention(tmp_path, mixed_precision, attention):
    """On CUDA: every precision/attention backend trains with finite losses, trainable weights in fp32,
    frozen weights in the low-precision dtype, and the frozen reference untouched."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if attention == "xformers":
        pytest.importorskip("xformers.ops")
    result = run(tmp_path, "--no_use_cpu", "--mixed_precision", mixed_precision, "--attention", attention,
                 "--max_train_steps", "6", "--checkpointing_steps", "100", "--no_precompute_anchors")
    assert len(result.losses) == 6 and all(torch.isfinite(torch.tensor(result.losses)))
    low = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[mixed_precision]
    params = list(result.model.named_parameters())
    assert {p.dtype for _, p in params if p.requires_grad} == {torch.float32}
    assert {p.dtype for _, p in params if not p.requires_grad} == {low}
    assert next(p for _, p in params).device.type == "cuda"
