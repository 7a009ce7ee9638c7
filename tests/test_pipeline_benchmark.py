"""benchmarks/bench_pipeline.py runs (tiny, 1 step, 1 repeat) and reports the contract keys. No timing is asserted."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_pipeline_tiny_runs_and_reports_ratios():
    cmd = [sys.executable, "benchmarks/bench_pipeline.py", "--steps", "1", "--repeats", "1", "--threads", "1"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("safe_over_vanilla", "compare_over_single", "compare_peak_mem_over_single", "environment"):
        assert key in result
    assert result["safe_over_vanilla"] > 0 and result["compare_over_single"] > 0
    assert set(result["median_s"]) == {"vanilla StableDiffusionPipeline", "SaferSD (scoring off)", "SaferSD compare()"}


def test_bench_pipeline_sdxl_tiny_runs_and_reports_ratios():
    """`--size sdxl-tiny`: the SDXL branch of the benchmark (SaferSDXL vs vanilla StableDiffusionXLPipeline, compare())."""
    cmd = [sys.executable, "-m", "benchmarks.bench_pipeline", "--size", "sdxl-tiny", "--num_inference_steps", "1", "--repeats", "1",
           "--threads", "1"]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["size"] == "sdxl-tiny" and result["pipeline"] == "SaferStableDiffusionXLPipeline"
    assert (result["num_inference_steps"], result["height"], result["width"]) == (1, 64, 64)
    assert result["safe_over_vanilla"] > 0 and result["compare_over_single"] > 0 and result["compare_peak_mem_over_single"] > 0
    assert set(result["median_s"]) == {"vanilla StableDiffusionXLPipeline", "SaferSDXL (scoring off)", "SaferSDXL compare()"}


def test_sdxl_size_is_sdxl_base_1_0():
    """`--size sdxl` builds SDXL base 1.0's sizes (counted on the meta device: no memory, no weights), and they fit the pipeline."""
    import torch

    from benchmarks.bench_pipeline import SIZE_DEFAULTS, sdxl_components
    from safer_diffusion.pipeline_safer_stable_diffusion_xl import SaferStableDiffusionXLPipeline

    parts = sdxl_components("sdxl", device="meta")
    counts = {name: sum(p.numel() for p in parts[name].parameters()) for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
    assert counts == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}
    assert parts["original_text_encoder_2"].config.to_dict() == parts["text_encoder_2"].config.to_dict()
    assert all(p.device == torch.device("meta") for p in parts["unet"].parameters())
    pipe = SaferStableDiffusionXLPipeline(**parts, add_watermarker=False)  # the width checks of both pairs pass
    assert pipe.default_sample_size * pipe.vae_scale_factor == SIZE_DEFAULTS["sdxl"][1] == 1024
