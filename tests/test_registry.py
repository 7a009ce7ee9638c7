"""Encoders by name (safer_diffusion.registry), NAME=SOURCE items, and `safer-diffusion convert` for .pt state dicts."""

import json

import pytest
import torch

from safer_diffusion.convert import convert_state_dict, main
from safer_diffusion.evaluation.config import config_from_args
from safer_diffusion.options import BadInputError
from safer_diffusion.registry import KNOWN_ENCODERS, encoder_width, parse_encoder_items, split_subfolder


def test_known_encoders():
    assert list(KNOWN_ENCODERS) == ["original", "safe", "safer-clip", "safe-clip", "advunlearn"]
    spec = {n: (s.source, s.subfolder) for n, s in KNOWN_ENCODERS.items()}
    assert spec["safer-clip"] == ("Adeely93/SafeR_CLIP", None) and spec["safe-clip"] == ("aimagelab/safeclip_vit-l_14", None)
    assert spec["advunlearn"] == ("OPTML-Group/AdvUnlearn", "nudity_unlearned") and spec["original"] == (None, None)
    assert all(s.licence and s.paper and s.description for s in KNOWN_ENCODERS.values())
    assert KNOWN_ENCODERS["advunlearn"].licence == "CC-BY-4.0"


def test_items_names_and_sources(tmp_path):
    (tmp_path / "enc" / "sub").mkdir(parents=True)
    items = parse_encoder_items(["original", "advunlearn", f"mine={tmp_path / 'enc'}", f"deep={tmp_path / 'enc'}:sub", "hub=owner/repo:folder"])
    assert [i.name for i in items] == ["original", "advunlearn", "mine", "deep", "hub"]
    assert (items[1].source, items[1].subfolder, items[1].known, items[1].is_hub) == ("OPTML-Group/AdvUnlearn", "nudity_unlearned", True, True)
    assert (items[3].source, items[3].subfolder) == (str(tmp_path / "enc"), "sub")
    assert items[3].describe() == f"{(tmp_path / 'enc').resolve()}:sub" and items[4].describe() == "owner/repo:folder"
    assert items[0].describe() == "original" and split_subfolder(str(tmp_path / "enc")) == (str(tmp_path / "enc"), None)


@pytest.mark.parametrize(
    ("items", "tiny", "match"),
    [
        (["safe-clipp"], False, r"^`--encoders` 'safe-clipp' is not a known encoder; the known ones are original, safe, safer-clip, "
                                r"safe-clip, advunlearn \(or pass NAME=SOURCE for a folder or hub id\)\.$"),
        (["original", "original"], False, r"^`--encoders` names 'original' twice"),
        (["bad name=x/y"], False, r"the name 'bad name' must be letters, digits"),
        (["safe=x/y"], False, r"'safe' is a known encoder's name"),
        (["a="], False, r"has no source after '='"),
        (["a=./nowhere/at/all"], False, r"'\./nowhere/at/all' is not an existing local path and not a hub id"),
        (["safer-clip"], True, r"^`--encoders` safer-clip is the full-size hub encoder Adeely93/SafeR_CLIP, which does not fit `--tiny`"),
        (["a=owner/repo"], True, r"is a hub id; `--tiny` needs tiny encoders from local folders"),
        ([], False, r"^`--encoders` is empty"),
    ],
)  # fmt: skip
def test_bad_items(items, tiny, match):
    with pytest.raises((BadInputError, FileNotFoundError), match=match):
        parse_encoder_items(items, tiny=tiny)


def test_a_missing_subfolder_and_a_pickle_are_refused(tmp_path):
    (tmp_path / "enc" / "other").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"has no subfolder 'nudity'; its folders are \['other'\]"):
        parse_encoder_items([f"a={tmp_path / 'enc'}:nudity"])
    pt = tmp_path / "des.pt"
    pt.write_bytes(b"not loaded")
    with pytest.raises(BadInputError, match=r"is a pickle state dict, which is never loaded .* `safer-diffusion convert --allow_pickle "):
        parse_encoder_items([f"des={pt}"])


def test_evaluate_encoders_options(tmp_path):
    from pathlib import Path

    mild = Path(__file__).resolve().parents[1] / "assets" / "prompts" / "mild_unsafe.csv"
    argv = ["--tiny", "--prompts", str(mild), "--output_dir", str(tmp_path / "o")]
    assert config_from_args([*argv, "--encoders", "original", "safe"]).variants == ("original", "safe")
    assert config_from_args([*argv, "--compare_original"]).variants == ("original", "safe")
    (tmp_path / "e").mkdir()
    cfg = config_from_args([*argv, "--encoders", "original", f"e={tmp_path / 'e'}", "--reference", "e"])
    assert cfg.variants == ("original", "e") and cfg.reference == "e"
    with pytest.raises(BadInputError, match=r"^`--compare_original` is `--encoders original safe`; with `--encoders`, list `original`"):
        config_from_args([*argv, "--compare_original", "--encoders", "original", "safe"])
    with pytest.raises(BadInputError, match=r"^`--reference` 'safe' is not among the variants \['original', 'e'\]; pass one of them\.$"):
        config_from_args([*argv, "--encoders", "original", f"e={tmp_path / 'e'}", "--reference", "safe"])
    with pytest.raises(BadInputError, match=r"^`--safe_encoder` is set but `--encoders` \['original'\] has no `safe`"):
        config_from_args(["--prompts", str(mild), "--output_dir", str(tmp_path / "o"), "--safe_encoder", "x/y", "--encoders", "original"])


def test_encoder_width_reads_the_config_files(tmp_path):
    from safer_diffusion.testing import save_tiny_clip, tiny_pipeline_folders

    assert encoder_width(save_tiny_clip(tmp_path / "clip", text_hidden_size=16)) == 16
    base, safe = tiny_pipeline_folders()
    assert encoder_width(base) == 32 and encoder_width(safe) == 32 and encoder_width(tmp_path) is None


# ---- safer-diffusion convert -----------------------------------------------------------------------------------------


def _des_checkpoint(tmp_path, seed=5, hidden=32, prefix="text_model."):
    """A DES-style checkpoint: {'model_state_dict': CLIPTextModel.state_dict() (transformers 4 key names), 'epoch', 'args'}."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from safer_diffusion.testing import tiny_pipeline_folders

    config = CLIPTextConfig.from_pretrained(tiny_pipeline_folders()[0] / "text_encoder")  # the tiny base's architecture
    config.hidden_size, config.intermediate_size = hidden, 2 * hidden
    torch.manual_seed(seed)
    model = CLIPTextModel(config).eval()
    state = {f"{prefix}{k}": v for k, v in model.state_dict().items()}
    state[f"{prefix}embeddings.position_ids"] = torch.arange(77)[None]  # the buffer older transformers saved
    path = tmp_path / "des.pt"
    torch.save({"model_state_dict": state, "epoch": 2, "using_text_encoder": True, "args": {"learning_rate": 1e-5}}, path)
    return path, model


def test_convert_writes_a_safetensors_folder_that_loads_with_the_same_weights(tmp_path, capsys):
    from safer_diffusion.encoders import load_safe_text_encoder
    from safer_diffusion.testing import tiny_pipeline_folders

    base, _ = tiny_pipeline_folders()
    pt, model = _des_checkpoint(tmp_path)
    out = tmp_path / "des"
    assert main(["--allow_pickle", str(pt), str(out), "--base", str(base)]) == 0
    assert f"Wrote {out} (config.json, model.safetensors)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "conversion.json", "model.safetensors"]
    assert json.loads((out / "conversion.json").read_text())["converted_from"] == "des.pt"
    loaded = load_safe_text_encoder(str(out), cross_attention_dim=32)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert parse_encoder_items([f"des={out}"])[0].source == str(out)  # usable as --encoders des=OUT


def test_convert_refuses_without_allow_pickle_and_writes_nothing(tmp_path, capsys):
    pt, _ = _des_checkpoint(tmp_path)
    assert main([str(pt), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == (f"safer-diffusion convert: error: `INPUT`={str(pt)!r} is a pickle file: loading it runs code it contains. Pass "
                   "`--allow_pickle` only for a file you trust (e.g. one downloaded from the paper's authors).\n")  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_convert_errors(tmp_path):
    from safer_diffusion.testing import tiny_pipeline_folders

    base, _ = tiny_pipeline_folders()
    narrow, _ = _des_checkpoint(tmp_path, hidden=16)
    with pytest.raises(ValueError, match=r"does not fit the base's text encoder: \d+ tensors have other shapes, e\.g\. embeddings\."):
        convert_state_dict(narrow, tmp_path / "n", base, allow_pickle=True)
    other = tmp_path / "other.pt"
    torch.save({"model_state_dict": {"vision_model.x": torch.zeros(1)}}, other)
    with pytest.raises(ValueError, match=r"does not fit the base's text encoder \(2 layers, width 32\): missing \d+ keys .* unexpected 1 keys "
                                         r"\['vision_model\.x'\]"):  # fmt: skip
        convert_state_dict(other, tmp_path / "o", base, allow_pickle=True)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    good, _ = _des_checkpoint(tmp_path)
    with pytest.raises(BadInputError, match=r"`OUTPUT_DIR`=.*full' exists and is not an empty folder"):
        convert_state_dict(good, tmp_path / "full", base, allow_pickle=True)
    st = tmp_path / "w.safetensors"
    st.write_bytes(b"x")
    with pytest.raises(BadInputError, match=r"is not a torch pickle .*a safetensors file or folder loads as is"):
        convert_state_dict(st, tmp_path / "s", base, allow_pickle=True)
    assert not any((tmp_path / n).exists() for n in ("n", "o", "s"))
