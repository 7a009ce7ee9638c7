"""What the evaluation benchmarks (``bench_eval``, ``bench_fidelity``) share: the evaluation config built from a
benchmark's options, and the batches of work the evaluation would generate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safer_diffusion.evaluation.config import EvaluateConfig
from safer_diffusion.evaluation.plan import make_batches, make_work_items
from safer_diffusion.evaluation.prompts import load_prompts
from safer_diffusion.options import config_from_dict

#: Options a benchmark passes through to the evaluation under the same names.
_SHARED = ("prompts", "limit", "num_images_per_prompt", "batch_size", "num_inference_steps", "dtype", "device", "height", "width")


def evaluate_config(args: Any, *, tiny: bool, output_dir: Path, source: str, **values: Any) -> EvaluateConfig:
    """The evaluation's config for a benchmark's options (``args``), checked like ``safer-diffusion evaluate``'s.

    Args:
        args: the benchmark's config; its ``prompts``, ``limit``, ... (`_SHARED`) and, without ``tiny``,
            ``base`` and ``safe_encoder`` go through unchanged.
        tiny: the tiny random models.
        output_dir: the run folder.
        source: the benchmark's name, for errors.
        values: further evaluation options (``compare_original=True``, ...).
    """
    merged = {name: getattr(args, name) for name in _SHARED}
    merged.update(progress=False, output_dir=str(output_dir), tiny=tiny, **values)
    if not tiny:
        merged["base"] = args.base
        if args.safe_encoder:
            merged["safe_encoder"] = args.safe_encoder
    return config_from_dict(EvaluateConfig, merged, source=source)


def work_batches(pipe: Any, config: EvaluateConfig) -> tuple[list, list, list]:
    """``(prompt records, work items, batches)`` of a fresh evaluation run of ``config`` on ``pipe``."""
    default_size = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    records = load_prompts(config.prompts, limit=config.limit)
    items, _ = make_work_items(records, config, default_size, default_size, done=set())
    return records, items, make_batches(items, config.batch_size)
