"""Export: LoRA merged into a CLIPTextModel folder that plain transformers and the Safer pipeline load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from finetune.train import main

    out = tmp_path_factory.mktemp("export") / "run"
    result = main(["--config", "tiny_cpu.yaml", "--output_dir", str(out), "--max_train_steps", "10", "--learning_rate", "5e-2",
                   "--checkpointing_steps", "5", "--lora_dropout", "0"])
    return result


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    from finetune.export import main

    folder = tmp_path_factory.mktemp("exported") / "safer-clip"
    main(["--checkpoint", str(trained.output_dir), "--output_dir", str(folder)])
    return folder


def _captions():
    return ["a man holding a knife in a kitchen", "two kids playing football in the park"]


def test_export_layout_and_metadata(exported, trained):
    for rel in ("text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/tokenizer_config.json",
                "clip/config.json", "clip/model.safetensors", "text_projection.safetensors", "safer_clip.json", "README.md"):
        assert (exported / rel).is_file(), rel
    meta = json.loads((exported / "safer_clip.json").read_text())
    assert meta["format"] == "safer-clip-encoder" and meta["format_version"] == 1
    assert (meta["base_model"], meta["loss"], meta["train_towers"], meta["finetune"]) == ("tiny", "safer_clip", "text", "lora")
    assert meta["global_step"] == 10 and meta["config"]["learning_rate"] == 5e-2
    assert meta["metrics"]["val"]["safe_cos"] == trained.metrics["val"]["safe_cos"]
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

    folder = export(trained.output_dir / "checkpoint-5", tmp_path / "l1", dtype="fp16", save_full_clip=False, text_encoder_num_layers=1)
    assert CLIPTextConfig.from_pretrained(str(folder / "text_encoder")).num_hidden_layers == 1
    assert not (folder / "clip").exists()
    assert json.loads((folder / "safer_clip.json").read_text())["global_step"] == 5
    with pytest.raises(ValueError, match="exists and is not empty"):
        export(trained.output_dir, folder)
    with pytest.raises(FileNotFoundError, match="`--checkpoint`"):
        export(tmp_path / "missing", tmp_path / "x")
    with pytest.raises(ValueError, match="`--text_encoder_num_layers`"):
        export(trained.output_dir, tmp_path / "y", text_encoder_num_layers=7)
    with pytest.raises(ValueError, match="`--dtype`"):
        export(trained.output_dir, tmp_path / "z", dtype="int8")
    assert not (tmp_path / "y").exists() and not list(tmp_path.glob(".y-*"))  # nothing half-written


def test_cli_help():
    for module in ("finetune.export", "finetune.evaluate"):
        out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=REPO, timeout=120)
        assert out.returncode == 0 and "--output" in out.stdout, module


def test_evaluate_cli_on_export(exported, sample_pairs_path, tmp_path, capsys):
    from finetune.evaluate import main

    results = main(["--model", str(exported), "--data", str(sample_pairs_path), "--output", str(tmp_path / "r.json"), "--device", "cpu"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(results))
    assert results["base"] == "tiny" and results["text"]["n_pairs"] == 330
    assert results["weights"]["l2"] > 0 and results["text"]["frozen"]["safe_cos"] == pytest.approx(1.0, abs=1e-5)
