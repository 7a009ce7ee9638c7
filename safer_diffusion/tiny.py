"""Tiny but real models for ``--tiny`` modes (CLI, evaluation, demo), benchmarks and tests.

Everything here works offline: no weights are downloaded.

* :func:`clip_tokenizer` builds the real 49,408-token CLIP BPE tokenizer as a transformers
  :class:`~transformers.CLIPTokenizer` from the BPE vocabulary that ships inside the
  ``open_clip_torch`` wheel, and caches the files on disk.
* :func:`tiny_sd_components` returns the components of a Stable Diffusion pipeline with tiny
  random weights (the pattern of diffusers' ``get_dummy_components``) and the real tokenizer.
* :func:`tiny_clip_model` returns a tiny random :class:`~transformers.CLIPModel` whose text
  width matches the tiny UNet's cross-attention width, so it can stand in for a safe encoder.
* :func:`save_tiny_sd` and :func:`save_tiny_clip` write those in the hub folder layout, so that
  ``from_pretrained(path)`` works exactly as it would with a hub id.
* :func:`tiny_sdxl_components` (Stable Diffusion XL, two text encoders, as diffusers' SDXL tests build
  them), :func:`tiny_sdxl_text_encoders` (a "safe" pair that fits it), :func:`save_tiny_sdxl` and
  :func:`save_tiny_sdxl_export` (the pair as a two-encoder export folder, docs/EXPORT_FORMAT.md).
  ``tiny_pipeline_folders(variant="sdxl")`` builds both for ``--tiny`` modes.

Example::

    >>> from diffusers import StableDiffusionPipeline
    >>> from safer_diffusion.tiny import tiny_sd_components
    >>> pipe = StableDiffusionPipeline(**tiny_sd_components(), safety_checker=None,
    ...                                feature_extractor=None, requires_safety_checker=False)
    >>> image = pipe("a red bicycle", num_inference_steps=2).images[0]   # 64 x 64, random weights
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

from .export_format import (
    SDXL_TEXT_ENCODERS,
    TEXT_ENCODER_2_DIR,
    TEXT_ENCODER_DIR,
    TOKENIZER_2_DIR,
    TOKENIZER_DIR,
    ExportManifest,
    write_export_files,
)

logger = logging.getLogger(__name__)

__all__ = [
    "TINY_VARIANTS",
    "tiny_variant_option",
    "CLIP_VOCAB_SIZE",
    "TINY_HIDDEN_SIZE",
    "cache_dir",
    "clip_tokenizer",
    "TINY_SDXL_VARIANT",
    "save_tiny_clip",
    "save_tiny_sd",
    "save_tiny_sdxl",
    "save_tiny_sdxl_export",
    "tiny_clip_model",
    "tiny_pipeline_folders",
    "tiny_sd_components",
    "tiny_sdxl_components",
    "tiny_sdxl_text_configs",
    "tiny_sdxl_text_encoders",
]

#: Size of the CLIP BPE vocabulary: 256 bytes, 256 end-of-word bytes, 48,894 merges, 2 specials.
CLIP_VOCAB_SIZE = 49408
#: Width of the tiny text encoders and of the tiny UNet's cross-attention.
TINY_HIDDEN_SIZE = 32

#: ``tiny_pipeline_folders``'s variant name for Stable Diffusion XL.
TINY_SDXL_VARIANT = "sdxl"
#: ``tiny_pipeline_folders``'s variants.
#: The tiny model families ``--tiny_variant`` chooses from (the first is the default).
TINY_VARIANTS = ("sd1", "sd2", TINY_SDXL_VARIANT)


def tiny_variant_option(**kwargs: Any) -> Any:
    """The ``--tiny_variant`` field every entry point with ``--tiny`` shares (None = the first family)."""
    from .options import option

    return option(None, f"With --tiny: the tiny model family, one of {', '.join(TINY_VARIANTS)} (default "
                        f"{TINY_VARIANTS[0]}; sdxl: a tiny SDXL base and a two-encoder safe export).",
                  choices=TINY_VARIANTS, **kwargs)  # fmt: skip

_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
_N_MERGES = 49152 - 256 - 2  # the merges open_clip and OpenAI CLIP use from the BPE file


def cache_dir() -> Path:
    """Folder for files this module builds: ``$SAFER_DIFFUSION_CACHE`` or ``~/.cache/safer_diffusion``."""
    root = os.environ.get("SAFER_DIFFUSION_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "safer_diffusion"
    )
    return Path(root)


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable unicode map of GPT-2/CLIP byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _bpe_vocab_path() -> Path:
    try:
        import open_clip
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "`clip_tokenizer()` builds the CLIP tokenizer from the BPE vocabulary shipped inside the "
            "`open_clip_torch` wheel, which is not installed. Install it with "
            "`pip install 'safer-diffusion[train]'` (or `pip install open_clip_torch`)."
        ) from e
    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():  # pragma: no cover
        raise FileNotFoundError(f"open_clip is installed but its BPE vocabulary {path} is missing; reinstall open_clip_torch.")
    return path


def _write_tokenizer_files(folder: Path, pad_token: str) -> None:
    lines = gzip.open(_bpe_vocab_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : _N_MERGES + 1]
    byte_vocab = list(_bytes_to_unicode().values())
    vocab = byte_vocab + [v + "</w>" for v in byte_vocab] + ["".join(m.split()) for m in merges] + [_BOS, _EOS]
    if len(vocab) != CLIP_VOCAB_SIZE:  # pragma: no cover - guards a changed open_clip file
        raise RuntimeError(f"Expected {CLIP_VOCAB_SIZE} CLIP tokens, built {len(vocab)}.")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(dict(zip(vocab, range(len(vocab)))), ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": _BOS,
        "eos_token": _EOS,
        "unk_token": _EOS,
        "pad_token": pad_token,
        "do_lower_case": True,
        "errors": "replace",
        "clean_up_tokenization_spaces": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {"bos_token": _BOS, "eos_token": _EOS, "unk_token": _EOS, "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def _build_folder_once(folder: Path, build, marker: str = ".complete", replace_incomplete: bool = True) -> Path:
    """Build ``folder`` with ``build(tmp_folder)`` unless it already holds ``marker``, atomically.

    The folder is written under a temporary name (``marker`` is created after ``build`` if ``build``
    did not write it) and renamed into place, so a crash or a concurrent builder never leaves or
    sees half a folder. ``replace_incomplete`` removes an existing folder that lacks ``marker``
    first (only for folders this module owns); otherwise such a folder makes the rename fail.
    """
    if (folder / marker).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        build(tmp)
        if not (tmp / marker).is_file():
            (tmp / marker).write_text("ok\n")
        if replace_incomplete:
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / marker).is_file():  # a concurrent builder finishing first is fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def clip_tokenizer(pad_token: str = _EOS, cache: str | os.PathLike | None = None):
    """The real CLIP BPE tokenizer (49,408 tokens, 77 positions), built offline.

    The vocabulary and merges are those of OpenAI CLIP and open_clip, read from the
    ``bpe_simple_vocab_16e6.txt.gz`` file inside the ``open_clip_torch`` wheel, written once as
    ``vocab.json`` / ``merges.txt`` under :func:`cache_dir` and loaded with
    ``CLIPTokenizer.from_pretrained(folder)``.

    Args:
        pad_token (`str`, defaults to `"<|endoftext|>"`):
            Padding token. Stable Diffusion 1.x pads with `"<|endoftext|>"`; Stable Diffusion 2.x
            (OpenCLIP) pads with `"!"`.
        cache (`str` or `os.PathLike`, *optional*):
            Folder for the built files; defaults to ``cache_dir() / "clip_tokenizer-<pad>"``.

    Returns:
        `transformers.CLIPTokenizer`
    """
    from transformers import CLIPTokenizer

    if pad_token not in (_EOS, "!"):
        raise ValueError(f"`pad_token` must be '{_EOS}' (SD 1.x) or '!' (SD 2.x), got {pad_token!r}.")
    folder = Path(cache) if cache is not None else cache_dir() / ("clip_tokenizer-eos" if pad_token == _EOS else "clip_tokenizer-bang")
    _build_folder_once(folder, lambda tmp: _write_tokenizer_files(tmp, pad_token), marker="tokenizer_config.json",
                       replace_incomplete=False)
    return CLIPTokenizer.from_pretrained(str(folder))


def _seeded(seed: int):
    import torch

    torch.manual_seed(seed)


def tiny_text_config(variant: Literal["sd1", "sd2"] = "sd1", hidden_size: int = TINY_HIDDEN_SIZE, projection_dim: int | None = None):
    """`CLIPTextConfig` of a tiny text tower with the real vocabulary and 77 positions."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="gelu" if variant == "sd2" else "quick_gelu",
        projection_dim=projection_dim or hidden_size,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=0 if variant == "sd2" else 49407,
    )


def tiny_sd_components(seed: int = 0, variant: Literal["sd1", "sd2"] = "sd1") -> dict[str, Any]:
    """Tiny random Stable Diffusion components with the real CLIP tokenizer.

    Args:
        seed (`int`, defaults to 0): seed of the random weights.
        variant (`"sd1"` or `"sd2"`):
            ``"sd1"``: epsilon-prediction PNDM scheduler, quick-gelu text encoder, padding with
            ``<|endoftext|>`` (as SD 1.x). ``"sd2"``: v-prediction DDIM scheduler, gelu text encoder
            standing for OpenCLIP's penultimate layer (SD 2.x drops the last layer), linear
            projections in the UNet, padding with ``"!"``.

    Returns:
        `dict` with keys ``unet``, ``vae``, ``scheduler``, ``text_encoder``, ``tokenizer``: the
        non-optional arguments of ``StableDiffusionPipeline`` (pass ``safety_checker=None,
        feature_extractor=None, requires_safety_checker=False`` beside them). Images are 64 x 64.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    if variant not in ("sd1", "sd2"):
        raise ValueError(f"`variant` must be 'sd1' or 'sd2', got {variant!r}.")
    sd2 = variant == "sd2"
    _seeded(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TINY_HIDDEN_SIZE,
        attention_head_dim=2,
        norm_num_groups=2,
        use_linear_projection=sd2,
    )
    _seeded(seed)
    vae = AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=2,
        sample_size=64,
    )
    _seeded(seed)
    text_encoder = CLIPTextModel(tiny_text_config(variant)).eval()
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False)
    if sd2:
        scheduler = DDIMScheduler(prediction_type="v_prediction", steps_offset=1, **common)
    else:
        scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1)
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "scheduler": scheduler,
        "text_encoder": text_encoder,
        "tokenizer": clip_tokenizer(pad_token="!" if sd2 else _EOS),
    }


def tiny_clip_model(
    seed: int = 1,
    projection_dim: int = 16,
    text_hidden_size: int = TINY_HIDDEN_SIZE,
    variant: Literal["sd1", "sd2"] = "sd1",
):
    """A tiny random :class:`~transformers.CLIPModel` (text + vision towers + projections).

    Its text width equals the tiny UNet's cross-attention width (``TINY_HIDDEN_SIZE``) by
    default, so its text tower can be swapped into :func:`tiny_sd_components` as a "safe" encoder.
    Vision tower: 32 x 32 images, patch 8.

    Args:
        seed (`int`, defaults to 1): seed of the random weights (differs from the SD default so
            the "safe" text encoder really conditions differently).
        projection_dim (`int`, defaults to 16): width of the shared embedding space.
        text_hidden_size (`int`): width of the text tower.
        variant (`"sd1"` or `"sd2"`): activation of the text tower, as in :func:`tiny_sd_components`.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8, projection_dim=projection_dim,
    )
    text = tiny_text_config(variant, hidden_size=text_hidden_size, projection_dim=projection_dim)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=projection_dim)
    _seeded(seed)
    return CLIPModel(config).eval()


def _tiny_image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )


def save_tiny_sd(path: str | os.PathLike, **kwargs) -> Path:
    """Write :func:`tiny_sd_components` (``**kwargs`` as there) as a diffusers pipeline folder.

    The folder loads offline with ``StableDiffusionPipeline.from_pretrained(path)`` (and
    ``SaferStableDiffusionPipeline``). No safety checker is included.
    """
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    pipe = StableDiffusionPipeline(
        **tiny_sd_components(**kwargs), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def save_tiny_clip(path: str | os.PathLike, **kwargs) -> Path:
    """Write :func:`tiny_clip_model` (``**kwargs`` as there) as a hub-style ``CLIPModel`` folder.

    The folder holds ``config.json``, ``model.safetensors``, the real tokenizer and an image
    processor, so ``CLIPModel.from_pretrained(path)``, ``CLIPTokenizer.from_pretrained(path)`` and
    ``CLIPProcessor.from_pretrained(path)`` all work offline.
    """
    path = Path(path)
    model = tiny_clip_model(**kwargs)
    model.save_pretrained(path, safe_serialization=True)
    pad = "!" if kwargs.get("variant") == "sd2" else _EOS
    clip_tokenizer(pad_token=pad).save_pretrained(path)
    _tiny_image_processor().save_pretrained(path)
    return path


def tiny_sdxl_text_configs(hidden_size: int = TINY_HIDDEN_SIZE):
    """`CLIPTextConfig`s of the tiny SDXL pair: ``(text_encoder, text_encoder_2)``.

    The sizes are those of diffusers' SDXL tests (32 wide, 4 heads, 37 intermediate, projection 32) with the real
    vocabulary and 77 positions. Each tower keeps its real model's traits so that a mix-up shows: the first
    stands for CLIP ViT-L/14 (quick-gelu, pads with ``<|endoftext|>``, 2 layers), the second for OpenCLIP
    ViT-bigG/14 (gelu, pads with ``"!"``, 3 layers).
    """
    from transformers import CLIPTextConfig

    common = dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=37, num_attention_heads=4,
                  max_position_embeddings=77, layer_norm_eps=1e-5, projection_dim=hidden_size, bos_token_id=49406,
                  eos_token_id=49407)  # fmt: skip
    first = CLIPTextConfig(num_hidden_layers=2, hidden_act="quick_gelu", pad_token_id=49407, **common)
    second = CLIPTextConfig(num_hidden_layers=3, hidden_act="gelu", pad_token_id=0, **common)
    return first, second


def tiny_sdxl_text_encoders(seed: int = 1, hidden_size: int = TINY_HIDDEN_SIZE):
    """A tiny random ``(CLIPTextModel, CLIPTextModelWithProjection)`` pair that fits :func:`tiny_sdxl_components`.

    Seed 1 by default (the pipeline's own encoders use seed 0), so the pair stands in for a *safe* pair that
    really conditions differently. ``hidden_size`` other than 32 makes a pair that does not fit (for tests).
    """
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    first, second = tiny_sdxl_text_configs(hidden_size)
    _seeded(seed)
    text_encoder = CLIPTextModel(first).eval()
    _seeded(seed + 1000)
    text_encoder_2 = CLIPTextModelWithProjection(second).eval()
    return text_encoder, text_encoder_2


def tiny_sdxl_components(seed: int = 0) -> dict[str, Any]:
    """Tiny random Stable Diffusion XL components with the real CLIP tokenizers.

    The UNet, VAE and scheduler are those of diffusers' ``StableDiffusionXLPipelineFastTests.get_dummy_components``:
    ``addition_embed_type="text_time"``, ``addition_time_embed_dim=8``, ``transformer_layers_per_block=(1, 2)``,
    ``cross_attention_dim=64`` (the two 32-wide token sequences concatenated) and
    ``projection_class_embeddings_input_dim=80`` (the 32-wide pooled ``text_embeds`` + 6 time ids x 8). The text
    encoders are :func:`tiny_sdxl_text_configs`; ``tokenizer`` pads with ``<|endoftext|>`` and ``tokenizer_2`` with
    ``"!"``, as SDXL's do.

    Returns:
        `dict` with keys ``unet``, ``vae``, ``scheduler``, ``text_encoder``, ``text_encoder_2``, ``tokenizer``,
        ``tokenizer_2``: the non-optional arguments of ``StableDiffusionXLPipeline``. Images are 64 x 64.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    _seeded(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(2, 4),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=2 * TINY_HIDDEN_SIZE,
        norm_num_groups=1,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear",
                                       timestep_spacing="leading")  # fmt: skip
    _seeded(seed)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=128,
    )
    text_encoder, text_encoder_2 = tiny_sdxl_text_encoders(seed=seed)
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "scheduler": scheduler,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": clip_tokenizer(pad_token=_EOS),
        "tokenizer_2": clip_tokenizer(pad_token="!"),
    }


def save_tiny_sdxl(path: str | os.PathLike, **kwargs) -> Path:
    """Write :func:`tiny_sdxl_components` (``**kwargs`` as there) as a diffusers SDXL pipeline folder.

    The folder loads offline with ``StableDiffusionXLPipeline.from_pretrained(path)`` (and
    ``SaferStableDiffusionXLPipeline``); its ``model_index.json`` names ``StableDiffusionXLPipeline``.
    """
    from diffusers import StableDiffusionXLPipeline

    path = Path(path)
    StableDiffusionXLPipeline(**tiny_sdxl_components(**kwargs), add_watermarker=False).save_pretrained(path, safe_serialization=True)
    return path


def save_tiny_sdxl_export(path: str | os.PathLike, seed: int = 1, hidden_size: int = TINY_HIDDEN_SIZE,
                          text_encoders: tuple[str, ...] | None = None) -> Path:
    """Write :func:`tiny_sdxl_text_encoders` as a two-encoder export folder (docs/EXPORT_FORMAT.md, section 8).

    A stand-in for what ``finetune`` exports for SDXL: ``text_encoder/``, ``text_encoder_2/``, ``tokenizer/``,
    ``tokenizer_2/``, ``text_projection.safetensors`` (the first tower's projection), the manifest (``base_model``
    ``"tiny"``, ``text_encoders`` both) and a model card. ``text_encoders`` writes only the named towers, and a
    manifest listing just those (for tests of incomplete exports).
    """
    import torch

    path = Path(path)
    names = tuple(text_encoders) if text_encoders is not None else SDXL_TEXT_ENCODERS
    text_encoder, text_encoder_2 = tiny_sdxl_text_encoders(seed=seed, hidden_size=hidden_size)
    towers = {TEXT_ENCODER_DIR: (text_encoder, TOKENIZER_DIR, _EOS), TEXT_ENCODER_2_DIR: (text_encoder_2, TOKENIZER_2_DIR, "!")}
    projection = None
    if TEXT_ENCODER_DIR in names:
        _seeded(seed + 2000)
        projection = torch.nn.Linear(hidden_size, text_encoder.config.projection_dim, bias=False).weight
    manifest = ExportManifest(base_model="tiny", loss="safer_clip", global_step=0, dtype="float32",
                              text_encoder_num_layers=text_encoder.config.num_hidden_layers, text_encoders=list(names),
                              base_models={name: "tiny" for name in names})  # fmt: skip
    card = ("# Tiny random SDXL text-encoder pair\n\nRandom weights for offline tests and `--tiny` modes; it makes no image "
            "safer. Load it with `SaferStableDiffusionXLPipeline.from_pretrained(BASE, safe_text_encoder=THIS_FOLDER)`.\n")
    return write_export_files(path, text_encoders={name: towers[name][0] for name in names},
                              tokenizers={towers[name][1]: clip_tokenizer(pad_token=towers[name][2]) for name in names},
                              text_projection=projection, model_card=card, manifest=manifest)  # fmt: skip


def tiny_pipeline_folders(root: str | os.PathLike | None = None, variant: Literal["sd1", "sd2", "sdxl"] = "sd1") -> tuple[Path, Path]:
    """Build (once) and return ``(base_folder, safe_encoder_folder)`` for ``--tiny`` modes.

    ``variant`` ``"sd1"`` / ``"sd2"``: ``base_folder`` is a tiny Stable Diffusion pipeline (seed 0) and
    ``safe_encoder_folder`` a tiny ``CLIPModel`` (seed 1) whose text tower fits that pipeline's UNet.
    ``"sdxl"``: ``base_folder`` is a tiny SDXL pipeline (:func:`save_tiny_sdxl`) and ``safe_encoder_folder`` a
    two-encoder export that fits it (:func:`save_tiny_sdxl_export`). All are random weights: images show
    noise-like patterns, never real content. Cached under ``root`` (default ``cache_dir() / "tiny"``).
    """
    if variant not in TINY_VARIANTS:
        raise ValueError(f"`variant` must be one of {list(TINY_VARIANTS)}, got {variant!r}.")
    root = Path(root) if root is not None else cache_dir() / "tiny"
    if variant == TINY_SDXL_VARIANT:
        base, safe = root / f"{variant}-base", root / f"{variant}-safe-export"
        _build_folder_once(base, save_tiny_sdxl)
        _build_folder_once(safe, save_tiny_sdxl_export)
        return base, safe
    base, safe = root / f"{variant}-base", root / f"{variant}-safe-clip"
    _build_folder_once(base, lambda tmp: save_tiny_sd(tmp, variant=variant))
    _build_folder_once(safe, lambda tmp: save_tiny_clip(tmp, variant=variant))
    return base, safe
