"""SDXL training (issue 15 items 2-3): both towers under one config, token terms at the penultimate layer, the two-encoder
export, and its loading in the SDXL pipeline and in plain transformers. Tiny towers, offline, CPU.

Setup: ``finetune/configs/tiny_cpu_sdxl.yaml``: the tiny SDXL pipeline's own text encoders (``tiny_sdxl``: 2 layers,
``tiny_sdxl_2``: 3 layers with projection; the real CLIP tokenizers), LoRA r16, lr 2e-2, no dropout, no curriculum,
34 steps of batch 16 per tower, ``token_layer: penultimate``, ``token_weight: 1``, ``token_redir_weight: 2``.

Token-level figures are on ``hidden_states[-2]`` (what SDXL's UNet reads), mean-pooled over each caption's tokens
without the start token: ``token cos`` = mean cos(trained unsafe caption, its nearest-safe target under the frozen
tower), ``token r1`` = the unsafe caption's top-1 among the frozen states of all training captions (safe and unsafe)
is its target (0 for the frozen tower: each unsafe caption retrieves itself). Measured (seed 42, CPU, 2026-12):

==============  =========================  ===================  ==========  ==================  ==================
tower           pooled redirect_to_target  token cos to target  token r1    held-out safe_cos   held-out token cos
==============  =========================  ===================  ==========  ==================  ==================
text_encoder    0 -> 0.117                 0.9206 -> 0.9421     0 -> 0.098  1 -> 0.9665         1 -> 0.9837
text_encoder_2  0 -> 0.163                 0.9783 -> 0.9799     0 -> 0.163  1 -> 0.9871         1 -> 0.9917
==============  =========================  ===================  ==========  ==================  ==================

``metrics.json``'s ``train_tokens`` ``redirect_rate`` (top-1 among frozen token states is any safe caption): 0 -> 0.197
and 0 -> 0.295.

The same run with ``--token_redir_weight 0`` (pooled terms + token preservation only) moved the token states the
wrong way: token cos 0.9206 -> 0.9159 and 0.9783 -> 0.9733, token r1 0.008 and 0.023 (token redirect_rate 0.011 and
0.098), while its pooled redirection was similar (0.087, 0.197) and held-out token cos 0.9913 / 0.9912: pooled redirection does not
carry over to the penultimate layer on these towers, which is why the term exists (docs/METHOD.md). Thresholds below
are set with margin under the measured values.
"""

from __future__ import annotations

import json

import pytest
import torch

from safer_diffusion.export_format import read_manifest

CONFIG = ["--config", "tiny_cpu_sdxl.yaml", "--checkpointing_steps", "1000", "--no_verbose"]
TOWERS = ("text_encoder", "text_encoder_2")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory):
    from finetune.config import parse_train_config
    from finetune.train import train

    out = tmp_path_factory.mktemp("sdxl_train") / "run"
    return train(parse_train_config([*CONFIG, "--output_dir", str(out)]))


@pytest.fixture(scope="module")
def sdxl_export(sdxl_run, tmp_path_factory):
    from finetune.export import main

    folder = tmp_path_factory.mktemp("sdxl_export") / "pair"
    assert main(["--checkpoint", str(sdxl_run.output_dir), "--output_dir", str(folder)]) == 0
    return folder


def _pooled_tokens(result, captions, reference):
    """Penultimate token states, mean-pooled without the start token, of the trained (or frozen) tower."""
    from finetune.train import _tokenize

    ids, mask = _tokenize(result.tokenizer, captions, 77)
    model = result.model.eval()
    with torch.no_grad():
        h = model.reference_text(ids, mask, output_tokens=True)[1] if reference else model(
            input_ids=ids, attention_mask=mask, output_tokens=True)["tokens"]
    m = mask.bool().clone()
    m[:, 0] = False
    m = m.unsqueeze(-1).float()
    return (h.float() * m).sum(1) / m.sum(1)


def _token_figures(result):
    from finetune.data import load_pairs, split_pairs
    from finetune.targets import compute_targets

    config = result.config
    train_set, val_set = split_pairs(load_pairs(config.train_data), config.val_fraction, config.seed)
    hat = compute_targets(result.anchors, train_set, cache_dir=result.output_dir / "cache").index.tolist()
    cos = torch.nn.functional.cosine_similarity
    unsafe, unsafe0 = (_pooled_tokens(result, train_set.unsafe_captions, r) for r in (False, True))
    target0 = _pooled_tokens(result, [train_set.safe_captions[i] for i in hat], True)
    gallery = torch.nn.functional.normalize(torch.cat([_pooled_tokens(result, train_set.safe_captions, True), unsafe0]), dim=-1)

    def r1(q):
        return float(((torch.nn.functional.normalize(q, dim=-1) @ gallery.T).argmax(1) == torch.tensor(hat)).float().mean())

    safe, safe0 = (_pooled_tokens(result, val_set.safe_captions, r) for r in (False, True))
    return {"cos_before": float(cos(unsafe0, target0).mean()), "cos_after": float(cos(unsafe, target0).mean()),
            "r1_before": r1(unsafe0), "r1_after": r1(unsafe), "safe_token_cos": float(cos(safe, safe0).mean())}  # fmt: skip


def test_sdxl_run_trains_both_towers_into_resumable_runs(sdxl_run):
    import yaml

    out = sdxl_run.output_dir
    top = yaml.safe_load((out / "config.yaml").read_text())
    assert (top["sdxl"], top["model_name_or_path"], top["model_name_or_path_2"], top["token_layer"]) == (
        True, "tiny_sdxl", "tiny_sdxl_2", "penultimate")
    assert top["loss_weights_mode"] == "replace"  # the resolved config, as for a single-tower run
    for tower, model in zip(TOWERS, ("tiny_sdxl", "tiny_sdxl_2")):
        run = sdxl_run.towers[tower]
        assert run.output_dir == out / tower and run.global_step == 34 and (out / tower / "checkpoint-34").is_dir()
        assert yaml.safe_load((out / tower / "config.yaml").read_text())["model_name_or_path"] == model
        assert set(run.active_terms) == {"rel_tt", "uni_txt", "pres_txt", "token_pres", "token_redir"}
        assert (out / tower / "cache").is_dir()  # each tower its own anchors and targets
    assert sdxl_run.global_step == 68 and sdxl_run.last_checkpoint == out / "text_encoder_2" / "checkpoint-34"
    assert json.loads((out / "metrics.json").read_text()).keys() == set(TOWERS)
    # the two towers live in different spaces: different anchors
    a1, a2 = (sdxl_run.towers[t].anchors for t in TOWERS)
    assert a1.fingerprint != a2.fingerprint and not torch.allclose(a1.safe_text, a2.safe_text)


# (tower, pooled redirect min, token cos gain min, token r1 min, held-out safe_cos min, held-out token cos min)
LEARNING = [
    pytest.param("text_encoder", 0.07, 0.01, 0.05, 0.95, 0.97, id="text_encoder"),
    pytest.param("text_encoder_2", 0.10, 0.0005, 0.1, 0.97, 0.98, id="text_encoder_2"),
]


@pytest.mark.parametrize("tower,redirect_min,token_gain_min,token_r1_min,safe_cos_min,token_safe_min", LEARNING)
def test_sdxl_towers_redirect_at_the_pooled_output_and_the_penultimate_tokens(sdxl_run, tower, redirect_min, token_gain_min,
                                                                             token_r1_min, safe_cos_min, token_safe_min):
    result = sdxl_run.towers[tower]
    train, val = result.metrics["train"], result.metrics["val"]
    assert train["frozen"]["redirect_to_target_r1"] == 0.0 and train["redirect_to_target_r1"] >= redirect_min, train
    assert val["safe_cos"] >= safe_cos_min, val
    tokens = _token_figures(result)
    assert tokens["r1_before"] == 0.0 and tokens["r1_after"] >= token_r1_min, tokens
    assert tokens["cos_after"] >= tokens["cos_before"] + token_gain_min, tokens
    assert tokens["safe_token_cos"] >= token_safe_min, tokens
    # metrics.json carries the token-state metrics too (text_metrics on the mean-pooled penultimate states)
    assert result.metrics["val_tokens"]["frozen"]["safe_cos"] > 0.9999 and result.metrics["val_tokens"]["safe_cos"] >= token_safe_min
    assert result.metrics["train_tokens"]["frozen"]["redirect_rate"] == 0.0 and result.metrics["train_tokens"]["redirect_rate"] >= 0.1


def test_sdxl_export_layout_and_plain_transformers(sdxl_export, sdxl_run):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    for rel in ("text_encoder/model.safetensors", "text_encoder_2/model.safetensors", "tokenizer/tokenizer_config.json",
                "tokenizer_2/tokenizer_config.json", "safer_clip.json", "README.md"):
        assert (sdxl_export / rel).is_file(), rel
    assert not list(sdxl_export.rglob("*.bin")) and not (sdxl_export / "clip").exists()
    manifest = read_manifest(sdxl_export)
    assert manifest.text_encoders == list(TOWERS) and manifest.base_models == dict(zip(TOWERS, ("tiny_sdxl", "tiny_sdxl_2")))
    assert manifest.global_steps == dict.fromkeys(TOWERS, 34) and manifest.global_step == 68
    assert manifest.text_encoder_num_layers == 2 and manifest.config["sdxl"] is True
    assert json.loads((sdxl_export / "text_encoder_2" / "config.json").read_text())["architectures"] == ["CLIPTextModelWithProjection"]
    assert "SaferStableDiffusionXLPipeline" in (sdxl_export / "README.md").read_text()
    # each tower alone in plain transformers, full depth, reproducing the trained tower (LoRA merged)
    first = CLIPTextModel.from_pretrained(str(sdxl_export / "text_encoder")).eval()
    second = CLIPTextModelWithProjection.from_pretrained(str(sdxl_export / "text_encoder_2")).eval()
    assert (first.config.num_hidden_layers, second.config.num_hidden_layers) == (2, 3)
    assert CLIPTokenizer.from_pretrained(str(sdxl_export / "tokenizer_2")).pad_token == "!"
    captions = ["a man holding a knife in a kitchen", "two kids playing football in the park"]
    for tower, model in zip(TOWERS, (first, second)):
        run = sdxl_run.towers[tower]
        tok = CLIPTokenizer.from_pretrained(str(sdxl_export / ("tokenizer" if tower == "text_encoder" else "tokenizer_2")))
        enc = tok(captions, padding="max_length", max_length=77, return_tensors="pt")
        with torch.no_grad():
            got = model(**enc, output_hidden_states=True).hidden_states[-2]
            want = run.model.eval()(input_ids=enc.input_ids, attention_mask=enc.attention_mask, output_tokens=True)["tokens"]
            base = run.model.reference_text(enc.input_ids, enc.attention_mask, output_tokens=True)[1]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert (got - base).abs().max() > 1e-3  # trained, not the base


def test_sdxl_pipeline_loads_the_export_and_generates(sdxl_export):
    from safer_diffusion.pipeline_safer_stable_diffusion_xl import SaferStableDiffusionXLPipeline
    from safer_diffusion.testing import tiny_pipeline_folders

    base, _ = tiny_pipeline_folders(variant="sdxl")  # the pipeline whose encoders tiny_sdxl / tiny_sdxl_2 are
    pipe = SaferStableDiffusionXLPipeline.from_pretrained(str(base), safe_text_encoder=str(sdxl_export))
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel" and type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    images = pipe("a cat on a sofa", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 64, 64, 3) and bool(torch.isfinite(torch.from_numpy(images)).all())


def test_sdxl_export_refuses_text_encoder_num_layers(sdxl_run, tmp_path, capsys):
    from finetune.export import main

    code = main(["--checkpoint", str(sdxl_run.output_dir), "--output_dir", str(tmp_path / "x"), "--text_encoder_num_layers", "1"])
    assert code == 2 and not (tmp_path / "x").exists()
    assert "`--text_encoder_num_layers` 1 does not apply to the SDXL run" in capsys.readouterr().err


def test_one_tower_of_an_sdxl_run_exports_alone(sdxl_run, tmp_path):
    """Each tower folder is a normal run: it exports as a single-encoder folder (text-only tower: no clip/)."""
    from transformers import CLIPTextModel

    from finetune.export import main

    assert main(["--checkpoint", str(sdxl_run.output_dir / "text_encoder"), "--output_dir", str(tmp_path / "one")]) == 0
    manifest = read_manifest(tmp_path / "one")
    assert manifest.text_encoders == ["text_encoder"] and manifest.base_model == "tiny_sdxl" and manifest.text_encoder_num_layers == 2
    assert not (tmp_path / "one" / "clip").exists() and not (tmp_path / "one" / "text_encoder_2").exists()
    assert CLIPTextModel.from_pretrained(str(tmp_path / "one" / "text_encoder")).config.num_hidden_layers == 2


def test_sdxl_resume_latest_keeps_both_towers(sdxl_run, tmp_path):
    """A resumed SDXL run restarts each tower from its newest checkpoint (here both are done: nothing is retrained)."""
    import shutil

    from finetune.config import parse_train_config
    from finetune.train import train

    out = tmp_path / "run"
    shutil.copytree(sdxl_run.output_dir, out)
    shutil.rmtree(out / "text_encoder_2")  # as if training had stopped before the second tower's first checkpoint
    again = train(parse_train_config([*CONFIG, "--output_dir", str(out), "--resume_from_checkpoint", "latest", "--max_train_steps", "2",
                                      "--no_eval_at_end"]))  # fmt: skip
    assert again.towers["text_encoder"].losses == [] and again.towers["text_encoder"].global_step == 34  # tower 1 kept
    assert again.towers["text_encoder_2"].global_step == 2 and len(again.towers["text_encoder_2"].losses) == 2


# ----------------------------------------------------------------------------- bad input -> exit 2, one line, before any work
def _main_err(capsys, *argv):
    from finetune.train import main

    code = main(list(argv))
    return code, capsys.readouterr().err


def test_sdxl_bad_inputs(tmp_path, capsys):
    from safer_diffusion.testing import tiny_sdxl_text_encoders

    out = ["--output_dir", str(tmp_path / "run")]
    code, err = _main_err(capsys, *CONFIG, *out, "--model_name_or_path_2", "")
    assert code == 2 and "`--model_name_or_path_2` is missing: an `--sdxl` run trains both SDXL text encoders" in err
    code, err = _main_err(capsys, "--config", "tiny_cpu.yaml", *out, "--model_name_or_path_2", "tiny_sdxl_2")
    assert code == 2 and "`--model_name_or_path_2` applies to `--sdxl` runs only" in err
    code, err = _main_err(capsys, *CONFIG, *out, "--token_layer", "first")
    assert code == 2 and "--token_layer" in err and "penultimate" in err
    # a tower whose width does not fit the base's text_encoder_2 (40 wide instead of 32)
    _, wide = tiny_sdxl_text_encoders(hidden_size=40)
    wide.save_pretrained(tmp_path / "wide")
    code, err = _main_err(capsys, *CONFIG, *out, "--model_name_or_path_2", str(tmp_path / "wide"))
    assert code == 2 and "`--model_name_or_path_2` has width (hidden_size) 40, but the base's text_encoder_2" in err
    # towers swapped
    code, err = _main_err(capsys, *CONFIG, *out, "--model_name_or_path", "tiny_sdxl_2", "--model_name_or_path_2", "tiny_sdxl")
    assert code == 2 and "`--model_name_or_path` and `--model_name_or_path_2` are swapped" in err
    code, err = _main_err(capsys, *CONFIG, *out, "--resume_from_checkpoint", "checkpoint-3")
    assert code == 2 and "an `--sdxl` run resumes each tower from its own newest checkpoint; pass `latest`" in err
    assert not (tmp_path / "run").exists()  # nothing was written


@pytest.mark.parametrize("extra", [
    pytest.param(["--no_precompute_anchors"], id="live-reference"),
    pytest.param(["--finetune", "full"], id="full-finetune"),
    pytest.param(["--loss", "safe_clip"], id="safe-clip-pair-target"),
])
def test_token_terms_at_the_penultimate_layer_run_in_every_mode(tmp_path, extra):
    """A single-tower run (SD 1.x tiny CLIP) with both token terms at `--token_layer penultimate`: the terms are active
    and finite whether the frozen reference is live, a frozen copy (full fine-tuning) or the Safe-CLIP pair target."""
    from finetune.config import parse_train_config
    from finetune.train import train

    result = train(parse_train_config(["--config", "tiny_cpu.yaml", "--output_dir", str(tmp_path / "run"), "--max_train_steps", "2",
                                       "--no_eval_at_end", "--token_layer", "penultimate", "--token_weight", "1",
                                       "--token_redir_weight", "1", "--no_verbose", *extra]))  # fmt: skip
    assert {"token_pres", "token_redir"} <= set(result.active_terms) and result.loss_weights["token_redir"] == 1.0
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert result.model.token_layer == "penultimate"


def test_token_layer_reads_the_layer_sdxl_reads():
    """`penultimate` = hidden_states[-2] (no final layer norm), what SDXL's pipeline reads; `last` = last_hidden_state."""
    from finetune.modeling import SaferCLIP, load_clip

    loaded = load_clip("tiny_sdxl_2")
    enc = loaded.tokenizer(["a cat on a sofa"], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        ref = loaded.model(**enc, output_hidden_states=True)
        states = {layer: SaferCLIP(load_clip("tiny_sdxl_2").model, token_layer=layer).eval()(
            input_ids=enc.input_ids, attention_mask=enc.attention_mask, output_tokens=True)["tokens"] for layer in ("last", "penultimate")}
    torch.testing.assert_close(states["penultimate"], ref.hidden_states[-2])
    torch.testing.assert_close(states["last"], ref.last_hidden_state)
    assert (states["penultimate"] - states["last"]).abs().max() > 1e-2
    with pytest.raises(ValueError, match=r"`token_layer` must be one of \['last', 'penultimate'\], got 'first'"):
        SaferCLIP(loaded.model, token_layer="first")
