"""SaferStableDiffusionPipeline and SaferStableDiffusionXLPipeline overheads, measured side by side (interleaved) in one run.

    python -m benchmarks.bench_pipeline                                               # CPU, tiny models (seconds)
    python -m benchmarks.bench_pipeline --size sd15 --device cuda --dtype float16     # GPU, SD1.5-size, 512 px, 25 steps
    python -m benchmarks.bench_pipeline --size sdxl --device cuda --dtype float16     # GPU, SDXL-size, 1024 px, 25 steps
    python -m benchmarks.bench_pipeline --size sdxl-small --threads 1                 # CPU, reduced SDXL (a minute or two)

Measured on the same components (random weights, built from configs: nothing is downloaded):

* ``safe_over_vanilla``: SaferStableDiffusionPipeline with scoring off / vanilla
  ``StableDiffusionPipeline`` given the same UNet, VAE, scheduler and (safe) text encoder
  (goal <= 1.05 on CPU tiny, <= 1.01 on GPU);
* ``compare_over_single``: ``compare()`` (original + safe images, one UNet loop, batch 4x with
  guidance) / one generation (goal <= 1.3 on GPU);
* ``compare_peak_mem_over_single``: peak memory of ``compare()`` / one generation, resident
  weights included (CUDA: weights + peak allocated during the call; CPU: peak RSS) (goal <= 1.15).
  On CUDA ``compare_peak_extra_mem_over_single`` also gives the ratio of the memory allocated on
  top of the weights alone.

``--size sd15`` is an SD 1.5-size UNet (320-640-1280-1280, cross-attention 768), VAE and ViT-L/14
text encoders. ``--size sdxl`` is SDXL base 1.0's sizes (UNet 320-640-1280 with 1/2/10 transformer
layers, cross-attention 2048, text_time add-embedding 2816; its VAE; CLIP ViT-L/14 and OpenCLIP ViT-bigG/14
with projection, each as the safe and the original pair): SaferStableDiffusionXLPipeline (scoring off) /
vanilla ``StableDiffusionXLPipeline`` on the same components (goal <= 1.01 on GPU), and ``compare()``
(original + safe pairs) / one generation. It holds 4.3 G parameters with both pairs (17 GB in float32): a GPU size.
``--size sdxl-small`` keeps SDXL's topology (three levels, 1/2/4 transformer layers, two text encoders
whose token states are concatenated, pooled ``text_embeds`` + time ids) at reduced widths, for a CPU figure
in minutes; ``--size sdxl-tiny`` is the tiny SDXL of :mod:`safer_diffusion.tiny` (seconds; plumbing).
Components are built on the benchmark's device. The last output line is one JSON object.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/bench_pipeline.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.timing import benchmark_main, dump_json_line, environment, print_table, time_interleaved  # noqa: E402
from safer_diffusion.options import device_option, dtype_option, option, resolve_device_and_dtype  # noqa: E402

PROG = "python -m benchmarks.bench_pipeline"
#: ``--size`` choices of this benchmark: the SD pipeline's, then the SDXL pipeline's.
SD_SIZES = ("tiny", "sd15")
SDXL_SIZES = ("sdxl-tiny", "sdxl-small", "sdxl")
SIZES = SD_SIZES + SDXL_SIZES
#: Size -> (default denoising steps, default height and width); the real sizes use the field's usual 25 steps.
SIZE_DEFAULTS = {"tiny": (10, 64), "sd15": (25, 512), "sdxl-tiny": (4, 64), "sdxl-small": (4, 128), "sdxl": (25, 1024)}
#: The sizes whose runs take seconds each (more repeats by default).
_FAST_SIZES = ("tiny", "sdxl-tiny")


@dataclass
class PipelineBenchConfig:
    size: str = option("tiny", "Model size (random weights): tiny or SD 1.5-size (SD pipeline); sdxl-tiny, sdxl-small (reduced "
                               "widths, CPU) or SDXL-size (SDXL pipeline).", choices=SIZES)  # fmt: skip
    device: str = device_option("cpu")
    dtype: str = dtype_option()
    num_inference_steps: int | None = option(None, "Denoising steps (default: 25 sd15 and sdxl, 10 tiny, 4 sdxl-small, 4 sdxl-tiny).",
                                             bounds=(1, 1000), deprecated=("--steps",))  # fmt: skip
    height: int | None = option(None, "Image height, a multiple of 8 (default: 512 sd15, 1024 sdxl, 128 sdxl-small, 64 tiny and "
                                      "sdxl-tiny).", bounds=(8, 4096))  # fmt: skip
    width: int | None = option(None, "Image width, a multiple of 8 (default: as --height).", bounds=(8, 4096))
    repeats: int | None = option(None, "Timed repeats per variant (default: 15 tiny and sdxl-tiny, where one run is ~0.1 s and "
                                       "noisy; 5 sd15, sdxl and sdxl-small).", bounds=(1, None))  # fmt: skip
    threads: int | None = option(None, "torch CPU threads (default: torch's).", bounds=(1, None))

    def validate(self) -> None:
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and value % 8:
                raise ValueError(f"`--{name}` must be a multiple of 8, got {value}.")
        resolve_device_and_dtype(self.device, self.dtype)


def sd15_components(seed: int = 0) -> dict:
    """SD 1.5-size components with random weights (configs of stable-diffusion-v1-5), plus a second text encoder."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from safer_diffusion.tiny import clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8,
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
    )  # fmt: skip
    text_config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
    original = CLIPTextModel(text_config)
    torch.manual_seed(seed + 1)
    safe = CLIPTextModel(text_config)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1)
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=safe.eval(), original_text_encoder=original.eval(),
                tokenizer=clip_tokenizer(), scheduler=scheduler)


def tiny_components(seed: int = 0) -> dict:
    from safer_diffusion.encoders import load_safe_text_encoder
    from safer_diffusion.tiny import tiny_clip_model, tiny_sd_components

    parts = tiny_sd_components(seed)
    parts["original_text_encoder"] = parts.pop("text_encoder")
    parts["text_encoder"] = load_safe_text_encoder(tiny_clip_model(seed + 1))
    return parts


#: SDXL base 1.0's configs (stabilityai/stable-diffusion-xl-base-1.0), and a reduced SDXL of the same topology.
_SDXL_CONFIGS = {
    "sdxl": dict(
        unet=dict(sample_size=128, block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                  attention_head_dim=(5, 10, 20), cross_attention_dim=2048, addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=1024),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768),
        text_2=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280),
    ),
    "sdxl-small": dict(
        unet=dict(sample_size=16, block_out_channels=(64, 128, 256), transformer_layers_per_block=(1, 2, 4),
                  attention_head_dim=(2, 4, 8), cross_attention_dim=256 + 512, addition_time_embed_dim=64,
                  projection_class_embeddings_input_dim=512 + 6 * 64),
        vae=dict(block_out_channels=(32, 64, 128, 128), layers_per_block=1, sample_size=128),
        text=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, projection_dim=256),
        text_2=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8, projection_dim=512),
    ),
}  # fmt: skip


def sdxl_components(size: str = "sdxl", seed: int = 0, device: str = "cpu") -> dict:
    """SDXL components with random weights built on ``device``: the safe pair as ``text_encoder``/``text_encoder_2`` and
    another random pair as ``original_text_encoder``/``original_text_encoder_2`` (the arguments of
    ``SaferStableDiffusionXLPipeline``, with ``add_watermarker=False``).

    ``size``: ``"sdxl"`` (SDXL base 1.0's sizes: 3.5 G parameters, 4.3 G with both pairs), ``"sdxl-small"`` (the same
    topology at reduced widths) or ``"sdxl-tiny"`` (:func:`safer_diffusion.tiny.tiny_sdxl_components`).
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from safer_diffusion.tiny import clip_tokenizer, tiny_sdxl_components, tiny_sdxl_text_encoders

    if size == "sdxl-tiny":
        parts = tiny_sdxl_components(seed)
        parts["original_text_encoder"], parts["original_text_encoder_2"] = parts.pop("text_encoder"), parts.pop("text_encoder_2")
        parts["text_encoder"], parts["text_encoder_2"] = tiny_sdxl_text_encoders(seed=seed + 1)
        return parts  # tiny: built on the CPU, moved by the pipeline's `to()`
    if size not in _SDXL_CONFIGS:
        raise ValueError(f"`size` must be one of {list(SDXL_SIZES)}, got {size!r}.")
    sizes = _SDXL_CONFIGS[size]
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
    first = CLIPTextConfig(hidden_act="quick_gelu", pad_token_id=49407, **common, **sizes["text"])
    second = CLIPTextConfig(hidden_act="gelu", pad_token_id=0, **common, **sizes["text_2"])
    with torch.device(device):  # random init where the benchmark runs (seconds on a GPU, not minutes on its CPU)
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            in_channels=4, out_channels=4, layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            use_linear_projection=True, addition_embed_type="text_time", **sizes["unet"],
        )  # fmt: skip
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025, force_upcast=True, **sizes["vae"],
        )  # fmt: skip
        pairs = []
        for offset in (1, 2):  # the safe pair, then the original pair
            torch.manual_seed(seed + offset)
            pairs.append((CLIPTextModel(first).eval(), CLIPTextModelWithProjection(second).eval()))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                       timestep_spacing="leading")  # fmt: skip
    (safe, safe_2), (original, original_2) = pairs
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=safe, text_encoder_2=safe_2, original_text_encoder=original,
                original_text_encoder_2=original_2, tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(pad_token="!"),
                scheduler=scheduler)  # fmt: skip


def resolve_run(config, repeats_sd15: int, repeats_tiny: int) -> tuple:
    """The size-dependent defaults every pipeline benchmark shares (threads set, device and dtype resolved):
    ``(sd15, steps, height, width, repeats, device, dtype, dtype_name)``; ``repeats_tiny`` for the sizes whose runs take
    seconds (:data:`SIZE_DEFAULTS`), ``repeats_sd15`` for the others."""
    if config.threads:
        torch.set_num_threads(config.threads)
    default_steps, default_px = SIZE_DEFAULTS[config.size]
    steps = config.num_inference_steps or default_steps
    height = config.height or default_px
    width = config.width or default_px
    repeats = config.repeats or (repeats_tiny if config.size in _FAST_SIZES else repeats_sd15)
    device, dtype = resolve_device_and_dtype(config.device, config.dtype)
    return config.size == "sd15", steps, height, width, repeats, device, dtype, str(dtype).removeprefix("torch.")


def _sd_pipelines(config: PipelineBenchConfig, device: str, dtype) -> tuple:
    """(safer SD pipeline, vanilla SD pipeline on the same components, the table's names)."""
    from diffusers import StableDiffusionPipeline

    from safer_diffusion.pipeline_safer_stable_diffusion import SaferStableDiffusionPipeline

    parts = sd15_components() if config.size == "sd15" else tiny_components()
    safer = SaferStableDiffusionPipeline(**parts).to(device)
    if dtype != torch.float32:
        safer.to(dtype=dtype)
    vanilla = StableDiffusionPipeline(
        vae=safer.vae, text_encoder=safer.text_encoder, tokenizer=safer.tokenizer, unet=safer.unet, scheduler=safer.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    return safer, vanilla, ("vanilla StableDiffusionPipeline", "SaferSD (scoring off)", "SaferSD compare()")


def _sdxl_pipelines(config: PipelineBenchConfig, device: str, dtype) -> tuple:
    """(safer SDXL pipeline, vanilla ``StableDiffusionXLPipeline`` on the same components, the table's names)."""
    from diffusers import StableDiffusionXLPipeline

    from safer_diffusion.pipeline_safer_stable_diffusion_xl import SaferStableDiffusionXLPipeline

    safer = SaferStableDiffusionXLPipeline(**sdxl_components(config.size, device=device), add_watermarker=False).to(device)
    if dtype != torch.float32:
        safer.to(dtype=dtype)
    vanilla = StableDiffusionXLPipeline(
        vae=safer.vae, text_encoder=safer.text_encoder, text_encoder_2=safer.text_encoder_2, tokenizer=safer.tokenizer,
        tokenizer_2=safer.tokenizer_2, unet=safer.unet, scheduler=safer.scheduler, add_watermarker=False,
    )  # fmt: skip
    return safer, vanilla, ("vanilla StableDiffusionXLPipeline", "SaferSDXL (scoring off)", "SaferSDXL compare()")


def run(config: PipelineBenchConfig) -> dict:
    """Time the three variants; print the table and the JSON line; return the result."""
    _, steps, height, width, repeats, device, dtype, dtype_name = resolve_run(config, repeats_sd15=5, repeats_tiny=15)
    build = _sdxl_pipelines if config.size in SDXL_SIZES else _sd_pipelines
    safer, vanilla, names = build(config, device, dtype)
    for p in (safer, vanilla):
        p.set_progress_bar_config(disable=True)
    prompt = "a photo of an astronaut riding a horse on the moon"
    common = dict(num_inference_steps=steps, height=height, width=width, output_type="np")

    def gen():
        return torch.Generator(device).manual_seed(0)

    fns = dict(zip(names, (
        lambda: vanilla(prompt, generator=gen(), **common),
        lambda: safer(prompt, generator=gen(), **common),
        lambda: safer.compare(prompt, generator=gen(), score=False, **common),
    )))  # fmt: skip
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated() if cuda else 0
    timings = time_interleaved(fns, warmup=1, repeats=repeats)
    print(f"size={config.size} device={device} dtype={dtype_name} num_inference_steps={steps} {height}x{width} repeats={repeats}")
    print_table(timings, baseline=names[0])
    van, safe, cmp = (timings[k] for k in fns)
    result = {
        "benchmark": "bench_pipeline",
        "size": config.size, "pipeline": type(safer).__name__, "device": device, "dtype": dtype_name, "num_inference_steps": steps, "height": height,
        "width": width, "repeats": repeats,
        "safe_over_vanilla": safe.median / van.median,
        "compare_over_single": cmp.median / safe.median,
        "compare_peak_mem_over_single": (resident + cmp.peak_mem_bytes) / (resident + safe.peak_mem_bytes),
        "median_s": {k: t.median for k, t in timings.items()},
        "peak_mem_bytes": {k: t.peak_mem_bytes for k, t in timings.items()},
        "peak_mem_kind": safe.peak_mem_kind + (" + resident weights" if cuda else ""),
        "resident_bytes": resident,
        "environment": environment(),
    }  # fmt: skip
    if cuda:
        result["compare_peak_extra_mem_over_single"] = cmp.peak_mem_bytes / max(1, safe.peak_mem_bytes)
    dump_json_line(result)
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.bench_pipeline``: 0 success, 2 bad input, 1 failure."""
    return benchmark_main(PipelineBenchConfig, run, argv, prog=PROG, doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
