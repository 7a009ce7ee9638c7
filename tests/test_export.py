"""Export: LoRA merged into a CLIPTextModel folder that plain transformers and the Safer pipeline load."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from safer_diffusion.export_format import EXPORT_FORMAT, EXPORT_FORMAT_VERSION, read_manifest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from finetune.config import parse_train_config
    from finetune.train import train

    out = tmp_path_factory.mktemp("export") / "run"
    return train(parse_train_config(["--config", "tiny_cpu.yaml", "--output_dir", str(out), "--max_train_steps", "10",
                                     "--learning_rate", "5e-2", "--checkpointing_steps", "5", "--lora_dropout", "0"]))  # fmt: skip


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    from finetune.export import main

    folder = tmp_path_factory.mktemp("exported") / "safer-clip"
    assert main(["--checkpoint", str(trained.output_dir), "--output_dir", str(folder)]) == 0
    return folder


def _captions():
    return ["a man holding a knife in a kitchen", "two kids playing football in the park"]


def test_export_layout_and_metadata(exported, trained):
    for rel in ("text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/tokenizer_config.json",
                "clip/config.json", "clip/model.safetensors", "text_projection.safetensors", "safer_clip.json", "README.md"):
        assert (exported / rel).is_file(), rel
    meta = json.loads((exported / "safer_clip.json").read_text())
    assert meta["format"] == EXPORT_FORMAT and meta["format_version"] == EXPORT_FORMAT_VERSION
    assert (meta["base_model"], meta["loss"], meta["train_towers"], meta["finetune"]) == ("tiny", "safer_clip", "text", "lora")
    assert meta["global_step"] == 10 and meta["config"]["learning_rate"] == 5e-2 and meta["dtype"] == "float32"
    assert meta["metrics"]["val"]["safe_cos"] == trained.metrics["val"]["safe_cos"]
    manifest = read_manifest(exported)  # the library's reader accepts what the writer wrote
    assert manifest.text_encoder_num_layers == 2 and manifest.checkpoint.endswith("checkpoint-10") and manifest.extra == {}
    card = (exported / "README.md").read_text()
    assert "redirect_to_target_r1" in card and "| `loss` | `safer_clip` |" in card


def test_plain_clip_text_model_reproduces_the_trained_encoder(exported, trained):
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTokenizer

    from finetune.modeling import load_clip

    text = CLIPTextModel.from_pretrained(str(exported / "text_encoder")).eval()
    tok = CLIPTokenizer.from_pretrained(str(exported / "tokenizer"))
    proj = load_file(str(exported / "text_projection.safetensors"))["weight"]
    enc = tok(_captions(), padding=True, return_tensors="pt")
    with torch.no_grad():
        got = torch.nn.functional.normalize(text(**enc).pooler_output @ proj.T, dim=-1)
        trained.model.eval()
        want = trained.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask)["text"]
        base = torch.nn.functional.normalize(load_clip("tiny").model.get_text_features(**enc).pooler_output, dim=-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)  # LoRA merged = the adapter model
    assert (got - base).abs().max() > 1e-3  # and it is not the base model


def test_safer_pipeline_loads_the_export(exported, tiny_folders):
    pytest.importorskip("safer_diffusion.pipeline_safer_stable_diffusion")
    from transformers import CLIPTextModel

    from safer_diffusion import SaferStableDiffusionPipeline

    base, _ = tiny_folders
    pipe = SaferStableDiffusionPipeline.from_pretrained(str(base), safe_text_encoder=str(exported))
    plain = CLIPTextModel.from_pretrained(str(exported / "text_encoder"))
    for name, value in plain.state_dict().items():
        assert torch.equal(pipe.text_encoder.state_dict()[name].float(), value.float()), name
    image = pipe("a photo of a cat", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3)


def test_export_options_and_errors(trained, tmp_path):
    from transformers import CLIPTextConfig

    from finetune.export import export

    folder = export(trained.output_dir / "checkpoint-5", tmp_path / "l1", dtype="float16", save_full_clip=False, text_encoder_num_layers=1)
    assert CLIPTextConfig.from_pretrained(str(folder / "text_encoder")).num_hidden_layers == 1
    assert not (folder / "clip").exists()
    assert read_manifest(folder).global_step == 5 and read_manifest(folder).dtype == "float16"
    with pytest.raises(ValueError, match="exists and is not empty"):
        export(trained.output_dir, folder)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="`--output_dir` .* is a file"):
        export(trained.output_dir, tmp_path / "a_file")
    with pytest.raises(FileNotFoundError, match="`--checkpoint`"):
        export(tmp_path / "missing", tmp_path / "x")
    with pytest.raises(ValueError, match="`--text_encoder_num_layers`"):
        export(trained.output_dir, tmp_path / "y", text_encoder_num_layers=7)
    with pytest.raises(ValueError, match="`--dtype`"):
        export(trained.output_dir, tmp_path / "z", dtype="int8")
    with pytest.raises(FileNotFoundError, match="`--metrics`"):
        export(trained.output_dir, tmp_path / "z", metrics=tmp_path / "none.json")
    assert not (tmp_path / "y").exists() and not list(tmp_path.glob(".y.export-*"))  # nothing half-written
    # a temp folder left by an interrupted export of the same name is removed on the next start
    (tmp_path / ".y.export-crashed").mkdir()
    export(trained.output_dir, tmp_path / "y", save_full_clip=False)
    assert not (tmp_path / ".y.export-crashed").exists() and (tmp_path / "y" / "safer_clip.json").is_file()


def test_export_old_spellings_still_work_with_a_deprecation_warning(trained, tmp_path, caplog):
    from finetune.export import parse_export_config

    with caplog.at_level(logging.WARNING):
        config = parse_export_config(["--checkpoint", str(trained.output_dir), "--output_dir", str(tmp_path / "e"),
                                      "--dtype", "fp16", "--no-save_full_clip"])  # fmt: skip
    assert config.dtype == "float16" and config.save_full_clip is False
    assert "`--dtype fp16` is deprecated" in caplog.text and "`--no-save_full_clip` is deprecated" in caplog.text
    assert "--no_save_full_clip" in caplog.text


def test_cli_help():
    for module, flag in (("finetune.export", "--dtype {float32,float16,bfloat16}"), ("finetune.evaluate", "--model_name_or_path")):
        out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=REPO, timeout=120)
        assert out.returncode == 0 and "--output" in out.stdout and flag in out.stdout, module
        assert "--base" not in out.stdout and "--no-save_full_clip" not in out.stdout  # old spellings are hidden


def test_evaluate_cli_on_export(exported, trained, sample_pairs_path, tmp_path, capsys):
    from finetune.evaluate import main

    code = main(["--model", str(exported), "--data", str(sample_pairs_path), "--output", str(tmp_path / "r.json"), "--device", "cpu"])
    assert code == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert results == json.loads((tmp_path / "r.json").read_text())
    assert results["base"] == "tiny" and results["text"]["n_pairs"] == 330
    assert results["weights"]["l2"] > 0 and results["text"]["frozen"]["safe_cos"] == pytest.approx(1.0, abs=1e-5)
    # the export (read through the library's loader) and its checkpoint evaluate to the same figures
    assert main(["--model", str(trained.output_dir), "--data", str(sample_pairs_path), "--device", "cpu"]) == 0
    from_checkpoint = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert from_checkpoint["text"]["safe_cos"] == pytest.approx(results["text"]["safe_cos"], abs=1e-6)
    assert from_checkpoint["weights"]["l2"] == pytest.approx(results["weights"]["l2"], rel=1e-5)
