"""load_safe_text_encoder: every accepted layout, open_clip conversion checked numerically, and bad inputs."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPModel, CLIPTextModel, CLIPTextModelWithProjection

from safer_diffusion.encoders import check_text_encoder, load_safe_text_encoder, text_transformer
from safer_diffusion.export_format import MANIFEST_FILE, TEXT_ENCODER_DIR, TEXT_PROJECTION_FILE, ExportManifest, write_manifest
from safer_diffusion.hub import HubUnavailableError
from safer_diffusion.open_clip_conversion import convert_open_clip, convert_open_clip_text
from safer_diffusion.testing import save_tiny_clip, tiny_clip_model

open_clip = pytest.importorskip("open_clip")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_open_clip(layers=2, quick_gelu=False, seed=0):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    model = CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=layers),
        quick_gelu=quick_gelu,
    ).eval()
    with torch.no_grad():  # non-trivial norms so that a mis-mapped LayerNorm would show
        for name, p in model.named_parameters():
            if ".ln_" in name or name.startswith("ln_final"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _open_clip_tokens(model, ids, upto=None):
    """open_clip's own forward: token states after ln_final (optionally after the first `upto` blocks)."""
    x = model.token_embedding(ids) + model.positional_embedding
    for block in model.transformer.resblocks[:upto]:
        x = block(x, attn_mask=model.attn_mask)
    return model.ln_final(x)


IDS = None


@pytest.fixture(scope="module")
def ids():
    return open_clip.tokenize(["a photo of a cat", "an astronaut riding a horse on the moon"])


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_open_clip_conversion_matches_open_clip_forward(ids, quick_gelu):
    model = _tiny_open_clip(quick_gelu=quick_gelu)
    hf = convert_open_clip_text(model)
    assert hf.config.hidden_act == ("quick_gelu" if quick_gelu else "gelu") and hf.config.num_attention_heads == 2
    with torch.no_grad():
        out = hf(input_ids=ids)
        torch.testing.assert_close(out.last_hidden_state, _open_clip_tokens(model, ids), atol=1e-5, rtol=1e-4)
        # text_projection is kept (diffusers' convert_open_clip_checkpoint drops it)
        torch.testing.assert_close(out.text_embeds, model.encode_text(ids), atol=1e-5, rtol=1e-4)


def test_open_clip_state_dict_file_with_sd_prefix(tmp_path, ids):
    model = _tiny_open_clip()
    state = {f"cond_stage_model.model.{k}": v.contiguous() for k, v in model.state_dict().items() if not k.startswith("visual")}
    save_file(state, str(tmp_path / "open_clip.safetensors"))
    encoder = load_safe_text_encoder(tmp_path / "open_clip.safetensors", num_attention_heads=2)
    assert isinstance(encoder, CLIPTextModel)
    with_proj = load_safe_text_encoder(tmp_path / "open_clip.safetensors", num_attention_heads=2, with_projection=True)
    with torch.no_grad():
        torch.testing.assert_close(encoder(ids).last_hidden_state, _open_clip_tokens(model, ids), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(with_proj(ids).text_embeds, model.encode_text(ids), atol=1e-5, rtol=1e-4)
    # a folder with the open_clip file name is recognised too
    (tmp_path / "oc").mkdir()
    (tmp_path / "open_clip.safetensors").rename(tmp_path / "oc" / "open_clip_model.safetensors")
    assert isinstance(load_safe_text_encoder(tmp_path / "oc", num_attention_heads=2), CLIPTextModel)


def test_sd2_pipeline_uses_penultimate_layer_of_open_clip_encoder(tiny_folders_sd2, tmp_path, ids):
    from safer_diffusion.pipeline_safer_stable_diffusion import SaferStableDiffusionPipeline

    model = _tiny_open_clip(layers=3)  # one layer more than the tiny SD2 text encoder, as ViT-H (24) vs SD2 (23)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    pipe = SaferStableDiffusionPipeline.from_pretrained(tiny_folders_sd2[0], safe_text_encoder=tmp_path / "open_clip_model.safetensors")
    assert pipe.text_encoder.config.num_hidden_layers == 2 and len(pipe.text_encoder.encoder.layers) == 2
    with torch.no_grad():
        torch.testing.assert_close(pipe.text_encoder(ids).last_hidden_state, _open_clip_tokens(model, ids, upto=2), atol=1e-5, rtol=1e-4)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_clip_model_folder_takes_text_tower(tmp_path):
    folder = save_tiny_clip(tmp_path / "clip")
    reference = tiny_clip_model()
    encoder = load_safe_text_encoder(folder)
    assert type(encoder) is CLIPTextModel
    torch.testing.assert_close(text_transformer(encoder).state_dict(), reference.text_model.state_dict())
    projected = load_safe_text_encoder(folder, with_projection=True)
    torch.testing.assert_close(projected.text_projection.weight, reference.text_projection.weight)
    assert type(load_safe_text_encoder(reference)) is CLIPTextModel  # a loaded CLIPModel works too


def test_text_model_folders_module_and_pipeline_folder(tmp_path, tiny_folders):
    reference = tiny_clip_model()
    with_proj = CLIPTextModelWithProjection(reference.config.text_config)
    text_transformer(with_proj).load_state_dict(reference.text_model.state_dict())
    with_proj.save_pretrained(tmp_path / "wp")
    loaded = load_safe_text_encoder(tmp_path / "wp")
    assert type(loaded) is CLIPTextModel
    torch.testing.assert_close(loaded.state_dict(), load_safe_text_encoder(with_proj).state_dict())
    loaded.save_pretrained(tmp_path / "plain")
    torch.testing.assert_close(load_safe_text_encoder(tmp_path / "plain").state_dict(), loaded.state_dict())
    assert load_safe_text_encoder(loaded) is loaded
    from_pipeline = load_safe_text_encoder(tiny_folders[0])  # a diffusers folder: its text_encoder/
    torch.testing.assert_close(from_pipeline.state_dict(), CLIPTextModel.from_pretrained(tiny_folders[0], subfolder="text_encoder").state_dict())
    with torch.no_grad():
        ids = torch.tensor([[49406, 320, 2368, 49407]])
        torch.testing.assert_close(loaded(ids).last_hidden_state, reference.text_model(ids).last_hidden_state)


def _export(tmp_path, meta=None):
    reference = tiny_clip_model()
    folder = tmp_path / "export"
    encoder = load_safe_text_encoder(reference)
    encoder.save_pretrained(folder / TEXT_ENCODER_DIR)
    save_file({"weight": reference.text_projection.weight.detach().contiguous()}, str(folder / TEXT_PROJECTION_FILE))
    if meta is None:
        write_manifest(folder, ExportManifest(base_model="tiny", loss="safer_clip", global_step=1, dtype="float32",
                                              text_encoder_num_layers=2, finetune="full"))  # fmt: skip
    else:
        (folder / MANIFEST_FILE).write_text(json.dumps(meta))
    return folder, reference


def test_finetune_export_folder(tmp_path):
    folder, reference = _export(tmp_path)
    encoder = load_safe_text_encoder(folder)
    torch.testing.assert_close(text_transformer(encoder).state_dict(), reference.text_model.state_dict())
    projected = load_safe_text_encoder(folder, with_projection=True)
    torch.testing.assert_close(projected.text_projection.weight, reference.text_projection.weight)


def test_dtype_and_checks(tmp_path, clip_tokenizer):
    folder = save_tiny_clip(tmp_path / "clip")
    encoder = load_safe_text_encoder(folder, torch_dtype=torch.float16, cross_attention_dim=32, tokenizer=clip_tokenizer)
    assert encoder.dtype == torch.float16
    with pytest.raises(ValueError, match=r"width \(hidden_size\) 32, but the UNet's cross_attention_dim is 768"):
        load_safe_text_encoder(folder, cross_attention_dim=768)
    short = CLIPTextModel(encoder.config.__class__(**{**encoder.config.to_dict(), "max_position_embeddings": 16}))
    with pytest.raises(ValueError, match="has 16 position embeddings, but the tokenizer pads prompts to model_max_length=77"):
        check_text_encoder(short, tokenizer=clip_tokenizer)
    small_vocab = CLIPTextModel(encoder.config.__class__(**{**encoder.config.to_dict(), "vocab_size": 1000}))
    with pytest.raises(ValueError, match="vocabulary of 1000 tokens, but the tokenizer has 49408"):
        check_text_encoder(small_vocab, tokenizer=clip_tokenizer)
    with pytest.raises(ValueError, match="`num_hidden_layers`=5 must be between 1 and the encoder's 2 layers"):
        load_safe_text_encoder(folder, num_hidden_layers=5)


def test_corrupt_safetensors(tmp_path):
    folder = save_tiny_clip(tmp_path / "clip")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot read the safetensors weights .* corrupt or truncated"):
        load_safe_text_encoder(folder)
    (tmp_path / "oc.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="cannot read safetensors file .*oc.safetensors.* corrupt or truncated"):
        load_safe_text_encoder(tmp_path / "oc.safetensors")


def test_bad_sources(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="`safe_text_encoder`='/no/such/folder' is not an existing local path"):
        load_safe_text_encoder("/no/such/folder")
    with pytest.raises(HubUnavailableError, match="`safe_text_encoder`='Adeely93/SafeR_CLIP' is a hub id, but HF_HUB_OFFLINE=1"):
        load_safe_text_encoder()
    (tmp_path / "model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="is a pickle checkpoint; only safetensors weights are loaded"):
        load_safe_text_encoder(tmp_path / "model.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is a folder in no known layout"):
        load_safe_text_encoder(tmp_path / "empty")
    save_file({"weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="is not an open_clip text tower state dict"):
        load_safe_text_encoder(tmp_path / "other.safetensors")
    with pytest.raises(TypeError, match="is a Linear, which is not a CLIP text encoder"):
        load_safe_text_encoder(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="`safe_text_encoder` must be a path, hub id, state dict or module, got int"):
        load_safe_text_encoder(3)
    folder, _ = _export(tmp_path, meta={"format": "something-else"})
    with pytest.raises(ValueError, match="has format 'something-else', expected 'safer-clip-encoder'"):
        load_safe_text_encoder(folder)
    CLIPModel(tiny_clip_model().config).save_pretrained(tmp_path / "noweights")
    (tmp_path / "noweights" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has a config.json but no model.safetensors"):
        load_safe_text_encoder(tmp_path / "noweights")


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_full_open_clip_conversion_matches_text_and_image_features(ids, quick_gelu):
    model = _tiny_open_clip(quick_gelu=quick_gelu)
    cfg = {"embed_dim": 16, "quick_gelu": quick_gelu,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}  # fmt: skip
    hf, size, mean, std = convert_open_clip(model, cfg)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf.get_text_features(ids).pooler_output, model.encode_text(ids), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(hf.get_image_features(pixels).pooler_output, model.encode_image(pixels), atol=1e-5, rtol=1e-4)
        # the text tower of the full conversion is the text-only conversion
        torch.testing.assert_close(convert_open_clip_text(model)(input_ids=ids).text_embeds, model.encode_text(ids), atol=1e-5, rtol=1e-4)
    assert size == 32 and len(mean) == len(std) == 3 and hf.config.text_config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")


def test_one_converter_for_both_packages():
    import finetune.modeling
    import safer_diffusion.encoders
    import safer_diffusion.open_clip_conversion as conversion

    assert finetune.modeling.convert_open_clip is conversion.convert_open_clip
    assert safer_diffusion.encoders.convert_open_clip_text is conversion.convert_open_clip_text


def test_export_manifest_is_read_through_export_format(tmp_path):
    folder, _ = _export(tmp_path, meta={"format": "safer-clip-encoder", "format_version": 99, "base_model": "tiny"})
    with pytest.raises(ValueError, match="export format_version 99 is newer than this library reads"):
        load_safe_text_encoder(folder)
    (folder / MANIFEST_FILE).write_text(json.dumps({"format": "safer-clip-encoder", "format_version": 1}))
    with pytest.raises(ValueError, match=r"lacks \['base_model', 'loss', 'global_step', 'dtype', 'text_encoder_num_layers'\]"):
        load_safe_text_encoder(folder)
    source = (Path(__file__).parents[1] / "safer_diffusion" / "encoders.py").read_text()
    assert "safer_clip.json" not in source and "safer-clip-encoder" not in source


def test_torch_dtype_by_name(tmp_path):
    folder = save_tiny_clip(tmp_path / "clip")
    assert load_safe_text_encoder(folder, torch_dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"`torch_dtype` must be a torch\.dtype .*\['float32', 'float16', 'bfloat16'\], got 'auto'"):
        load_safe_text_encoder(folder, torch_dtype="auto")
