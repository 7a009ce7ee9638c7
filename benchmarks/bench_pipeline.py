"""SaferStableDiffusionPipeline overheads, measured side by side (interleaved) in one run.

    python -m benchmarks.bench_pipeline                                               # CPU, tiny models (seconds)
    python -m benchmarks.bench_pipeline --size sd15 --device cuda --dtype float16     # GPU, SD1.5-size, 512 px, 25 steps

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
text encoders. The last output line is one JSON object.
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


@dataclass
class PipelineBenchConfig:
    size: str = option("tiny", "Model size: tiny, or SD 1.5-size random weights.", choices=("tiny", "sd15"))
    device: str = device_option("cpu")
    dtype: str = dtype_option()
    num_inference_steps: int | None = option(None, "Denoising steps (default: 25 sd15, 10 tiny).", bounds=(1, 1000),
                                             deprecated=("--steps",))  # fmt: skip
    height: int | None = option(None, "Image height, a multiple of 8 (default: 512 sd15, 64 tiny).", bounds=(8, 4096))
    width: int | None = option(None, "Image width, a multiple of 8 (default: 512 sd15, 64 tiny).", bounds=(8, 4096))
    repeats: int | None = option(None, "Timed repeats per variant (default: 15 tiny, where one run is ~0.1 s and noisy; 5 sd15).",
                                 bounds=(1, None))  # fmt: skip
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


def resolve_run(config, repeats_sd15: int, repeats_tiny: int) -> tuple:
    """The size-dependent defaults every pipeline benchmark shares (threads set, device and dtype resolved):
    ``(sd15, steps, height, width, repeats, device, dtype, dtype_name)``."""
    if config.threads:
        torch.set_num_threads(config.threads)
    sd15 = config.size == "sd15"
    steps = config.num_inference_steps or (25 if sd15 else 10)
    height = config.height or (512 if sd15 else 64)
    width = config.width or (512 if sd15 else 64)
    repeats = config.repeats or (repeats_sd15 if sd15 else repeats_tiny)
    device, dtype = resolve_device_and_dtype(config.device, config.dtype)
    return sd15, steps, height, width, repeats, device, dtype, str(dtype).removeprefix("torch.")


def run(config: PipelineBenchConfig) -> dict:
    """Time the three variants; print the table and the JSON line; return the result."""
    sd15, steps, height, width, repeats, device, dtype, dtype_name = resolve_run(config, repeats_sd15=5, repeats_tiny=15)

    from diffusers import StableDiffusionPipeline

    from safer_diffusion.pipeline_safer_stable_diffusion import SaferStableDiffusionPipeline

    parts = sd15_components() if sd15 else tiny_components()
    safer = SaferStableDiffusionPipeline(**parts).to(device)
    if dtype != torch.float32:
        safer.to(dtype=dtype)
    vanilla = StableDiffusionPipeline(
        vae=safer.vae, text_encoder=safer.text_encoder, tokenizer=safer.tokenizer, unet=safer.unet, scheduler=safer.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    for p in (safer, vanilla):
        p.set_progress_bar_config(disable=True)
    prompt = "a photo of an astronaut riding a horse on the moon"
    common = dict(num_inference_steps=steps, height=height, width=width, output_type="np")

    def gen():
        return torch.Generator(device).manual_seed(0)

    fns = {
        "vanilla StableDiffusionPipeline": lambda: vanilla(prompt, generator=gen(), **common),
        "SaferSD (scoring off)": lambda: safer(prompt, generator=gen(), **common),
        "SaferSD compare()": lambda: safer.compare(prompt, generator=gen(), score=False, **common),
    }
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated() if cuda else 0
    timings = time_interleaved(fns, warmup=1, repeats=repeats)
    print(f"size={config.size} device={device} dtype={dtype_name} num_inference_steps={steps} {height}x{width} repeats={repeats}")
    print_table(timings, baseline="vanilla StableDiffusionPipeline")
    van, safe, cmp = (timings[k] for k in fns)
    result = {
        "benchmark": "bench_pipeline",
        "size": config.size, "device": device, "dtype": dtype_name, "num_inference_steps": steps, "height": height,
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
