"""The one typed training configuration, parsed by the project's shared mechanism (:mod:`safer_diffusion.options`).

Every option is a field of :class:`TrainConfig`; the command line is generated from the fields, so flags are
the field names in snake_case (``--learning_rate``; ``--learning-rate`` works too), every enumeration has
``choices`` (checked on the command line, in YAML files and for a config built in Python), numbers must be
finite and within their bounds, and the resolved configuration is written next to the outputs
(``<output_dir>/config.yaml``).

Precedence: dataclass defaults < ``--config file.yaml`` < explicit command-line flags. A bare
``--config NAME.yaml`` is also looked up in :data:`CONFIG_DIR` (the bundled configs).

Example::

    python -m finetune.train --config finetune/configs/safer_clip_vit_l14.yaml --train_batch_size 32 \\
        --loss_weights rel_tt=0.3 pres_txt=0.5

The method behind the defaults is described in docs/METHOD.md.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safer_diffusion.fileio import atomic_write_text
from safer_diffusion.options import DEFAULT_CLIP_MODEL, config_from_dict, config_to_dict, option, parse_config

from .curriculum import CURRICULUM_MODES, check_schedule
from .data import DATA_FORMATS, parse_column_map
from .losses import LOSS_CHOICES, check_weights
from .modeling import ATTENTION_CHOICES

__all__ = ["CONFIG_DIR", "PROG", "TrainConfig", "parse_train_config"]

#: Folder of the bundled configurations (``safer_clip_vit_l14.yaml``, ``tiny_cpu.yaml``, ...).
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
#: The program name in messages (``safer-clip-train`` is the same command).
PROG = "python -m finetune.train"
#: accelerate's vocabulary for ``--mixed_precision``.
MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16")
#: Linear layers of a CLIP encoder layer that can get LoRA adapters.
LORA_MODULE_CHOICES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
_POSITIVE = (1, None)


@dataclass
class TrainConfig:
    """All options of ``python -m finetune.train``. Defaults are the paper recipe or a documented decision (docs/METHOD.md)."""

    # ----- model
    model_name_or_path: str = option(
        DEFAULT_CLIP_MODEL,
        "CLIP to fine-tune: a local CLIPModel folder or hub id, `open_clip:<arch>[:<pretrained tag or .safetensors file>]` "
        "(e.g. open_clip:ViT-H-14:laion2b_s32b_b79k for SD 2.x), or `tiny` (tiny random CLIP, offline tests).",
        group="model",
    )
    attention: str = option(
        "sdpa", "Attention kernel: PyTorch SDPA (default), eager (reference maths), or xformers (CUDA + xformers installed).",
        choices=ATTENTION_CHOICES, group="model",
    )
    # ----- data
    train_data: str = option(
        "aimagelab/ViSU-Text",
        "Pairs: a local .csv/.jsonl/.json/.parquet file or a hub dataset id (see finetune.data.load_pairs).", group="data",
    )
    data_format: str = option("auto", "Column layout of `train_data`.", choices=DATA_FORMATS, group="data")
    column_map: dict[str, str] | None = option(
        None, "Column names for generic tables as FIELD=COLUMN items, e.g. `--column_map safe=caption unsafe=nsfw_caption "
        "safe_image=path` (fields: safe, unsafe, safe_image, unsafe_image, category).", group="data", metavar="FIELD=COLUMN",
    )
    image_root: str | None = option(None, "Folder that relative image paths in the data are resolved against.", group="data")
    val_fraction: float = option(
        0.05, "Fraction of pairs held out (deterministically, by `seed`) for end-of-training validation metrics; in [0, 1).",
        bounds=(0.0, 1.0), group="data",
    )
    max_length: int = option(77, "Token length cap (CLIP's context is 77).", bounds=(1, 77), group="data")
    # ----- method
    loss: str = option(
        "safer_clip", "safer_clip: nearest-safe targets + relative loss; safe_clip: the Safe-CLIP baseline (fixed pair, InfoNCE).",
        choices=LOSS_CHOICES, group="method",
    )
    relative_scale: float = option(
        1.0,
        "Scale s of the relative loss softplus(s*[cos(.,unsafe)-cos(.,target)]), in (0, 10). Paper: none (s=1). Measured: s=1 "
        "redirects more than Safe-CLIP with less drift; s=2-3 = stronger redirection; s>=5 drifts more than Safe-CLIP; never s>=10.",
        bounds=(0.0, 10.0), group="method",
    )
    loss_weights: dict[str, float] | None = option(
        None, "Fixed term weights as KEY=VALUE items, e.g. `--loss_weights rel_tt=0.3 pres_txt=0.5` (terms not named are off). "
        "Default: the docs/METHOD.md weights.", group="method", metavar="TERM=WEIGHT",
    )
    token_weight: float = option(
        0.0, "Weight of the token-level preservation term on safe captions (what the UNet sees); 0 = off.",
        bounds=(0.0, None), group="method",
    )
    curriculum: str = option(
        "tertiles", "Easy-to-hard curriculum over pair difficulty cos(T0(t*), T0(t_hat)), or none.", choices=CURRICULUM_MODES,
        group="method",
    )
    curriculum_boundaries: list[float] = option([1 / 3, 2 / 3], "Quantile boundaries of the curriculum stages.", group="method")
    curriculum_stage_epochs: list[int] = option([1, 2, 3], "First epoch (1-based) at which each stage is trained.", group="method")
    precompute_anchors: bool = option(
        True,
        "Precompute the frozen T0/V0 embeddings once (fast). Off: run the frozen reference every step (Safe-CLIP style) "
        "with the LoRA adapters disabled on the same weights.",
        group="method", deprecated=("--no-precompute_anchors",),
    )
    anchor_batch_size: int = option(256, "Batch size of the one-off anchor encoding.", bounds=_POSITIVE, group="method")
    cache_dir: str | None = option(
        None, "Cache of anchors and targets (keyed by data + encoder). Default: <output_dir>/cache.", group="method"
    )
    # ----- what is trained
    train_towers: str = option(
        "text", "Towers to train: text (all the diffusion plug-in needs), vision, or both.", choices=("text", "vision", "both"),
        group="training",
    )
    finetune: str = option("lora", "LoRA adapters (paper) or full fine-tuning of the trained tower(s).", choices=("lora", "full"),
                           group="training")
    lora_rank: int = option(16, "LoRA rank (paper: 16).", bounds=_POSITIVE, group="training")
    lora_alpha: float = option(16.0, "LoRA alpha (decision: = rank, scaling 1); > 0.", bounds=(0.0, None), group="training")
    lora_dropout: float = option(0.1, "LoRA dropout (decision), in [0, 1).", bounds=(0.0, 1.0), group="training")
    lora_target_modules: list[str] = option(
        list(LORA_MODULE_CHOICES), "Linear layers that get LoRA adapters (decision: attention + MLP).", choices=LORA_MODULE_CHOICES,
        group="training",
    )
    # ----- optimisation
    learning_rate: float = option(1e-4, "Adam learning rate (paper: 1e-4); > 0.", bounds=(0.0, None), group="training")
    adam_beta1: float = option(0.9, "Adam beta1 (PyTorch default), in [0, 1).", bounds=(0.0, 1.0), group="training")
    adam_beta2: float = option(0.999, "Adam beta2 (PyTorch default), in [0, 1).", bounds=(0.0, 1.0), group="training")
    adam_epsilon: float = option(1e-8, "Adam epsilon (PyTorch default); > 0.", bounds=(0.0, None), group="training")
    adam_weight_decay: float = option(0.0, "Weight decay (paper: plain Adam, so 0).", bounds=(0.0, None), group="training")
    max_grad_norm: float = option(1.0, "Gradient clipping norm (decision: 1.0, a standard guard; 0 disables).", bounds=(0.0, None),
                                  group="training")
    lr_scheduler: str = option(
        "constant_with_warmup", "Learning-rate schedule (decision: constant as in the paper, after an optional warm-up).",
        choices=("constant", "constant_with_warmup", "linear", "cosine"), group="training",
    )
    lr_warmup_steps: int = option(0, "Warm-up steps (decision: 0, the paper mentions none).", bounds=(0, None), group="training")
    train_batch_size: int = option(48, "Pairs per device per step (paper: 48 on one GPU).", bounds=_POSITIVE, group="training")
    num_train_epochs: int = option(9, "Epochs over the (curriculum-filtered) unsafe pairs (paper: 9).", bounds=_POSITIVE, group="training")
    max_train_steps: int | None = option(None, "Stop after this many steps (overrides the epoch count when smaller).",
                                         bounds=_POSITIVE, group="training")
    mixed_precision: str = option(
        "no", "Mixed precision: frozen weights in fp16/bf16, trainable weights fp32 (fp16 uses loss scaling).",
        choices=MIXED_PRECISION_CHOICES, group="training",
    )
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass to save memory.", group="training",
                                          deprecated=("--no-gradient_checkpointing",))
    seed: int = option(42, "Seed of weights init (LoRA), data order, dropout and the validation split (numpy's range: < 2**32).",
                       bounds=(0, 2**32 - 1), group="training")
    use_cpu: bool = option(False, "Run on the CPU even if an accelerator is available.", group="training", deprecated=("--no-use_cpu",))
    # ----- checkpoints and logging
    output_dir: str = option("outputs/safer-clip", "Output folder: config.yaml, checkpoint-{step}/, logs/, metrics.json.", group="io")
    checkpointing_steps: int = option(500, "Save a resumable checkpoint every this many steps (and at the end).", bounds=_POSITIVE,
                                      group="io")
    checkpoints_total_limit: int | None = option(None, "Keep at most this many checkpoints (oldest removed first).", bounds=_POSITIVE,
                                                 group="io")
    resume_from_checkpoint: str | None = option(
        None, "`latest` (newest complete checkpoint in output_dir) or a checkpoint folder path.", group="io"
    )
    allow_inexact_resume: bool = option(
        False, "Resume even if a checkpoint's RNG/optimizer/scheduler state is unreadable (those parts start fresh; not "
        "bit-exact; recorded in metrics.json). Off: such a checkpoint stops the resume with an error.", group="io",
    )
    report_to: str = option("tensorboard", "Metrics logger.", choices=("tensorboard", "none"), group="io")
    logging_steps: int = option(10, "Log the loss terms every this many steps.", bounds=_POSITIVE, group="io")
    eval_at_end: bool = option(True, "Compute validation metrics (redirection, preservation) at the end into metrics.json.",
                               group="io", deprecated=("--no-eval_at_end",))
    verbose: bool = option(True, "Log progress at INFO level (resume, checkpoints, metrics); `--no_verbose`: warnings only.",
                           group="io")

    # ------------------------------------------------------------------ helpers
    def validate(self) -> TrainConfig:
        """Cross-field and half-open range checks (the shared mechanism checks choices, bounds and finiteness first).

        Raises:
            ValueError: naming the option, the value and the fix.
        """
        for name in ("val_fraction", "lora_dropout", "adam_beta1", "adam_beta2"):
            if getattr(self, name) >= 1.0:
                raise ValueError(f"`--{name}` must be in [0, 1), got {getattr(self, name)!r}.")
        for name in ("learning_rate", "lora_alpha", "adam_epsilon", "relative_scale"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`--{name}` must be > 0, got {getattr(self, name)!r}.")
        if self.relative_scale >= 10:
            raise ValueError(f"`--relative_scale` {self.relative_scale!r} is >= 10, which destroys the geometry; use 1 (default) to 3.")
        check_schedule(self.curriculum_boundaries, self.curriculum_stage_epochs,
                       names=("--curriculum_boundaries", "--curriculum_stage_epochs"))  # fmt: skip
        if self.loss_weights is not None:
            if not isinstance(self.loss_weights, dict) or not self.loss_weights:
                raise ValueError(f"`--loss_weights` must be TERM=WEIGHT items (e.g. rel_tt=0.3), got {self.loss_weights!r}.")
            check_weights(self.loss_weights, self.loss, "--loss_weights")
        if self.column_map is not None:  # a saved config of an older version holds the 'safe=a,unsafe=b' string
            self.column_map = parse_column_map(self.column_map)
        if not self.lora_target_modules:
            raise ValueError(f"`--lora_target_modules` must name at least one of {list(LORA_MODULE_CHOICES)}.")
        if self.resume_from_checkpoint == "":
            raise ValueError("`--resume_from_checkpoint` is empty: pass `latest` or a checkpoint folder.")
        for name in ("output_dir", "train_data", "model_name_or_path"):
            if not str(getattr(self, name)).strip():
                raise ValueError(f"`--{name}` is empty; pass a value.")
        return self

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the resolved configuration as YAML, atomically (tmp file + fsync + os.replace)."""
        import yaml

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build and validate a config from a mapping (a saved config.yaml, a checkpoint's state), as the CLI would."""
        return config_from_dict(cls, data, source)


def parse_train_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse ``argv`` (``sys.argv[1:]`` when None): ``--config`` YAML first, then flags on top. Returns a validated config.

    Raises:
        BadInputError: a value is out of range, not finite, not a choice, or the YAML file is wrong.
        SystemExit(2): argparse's own usage errors (unknown flag, unparsable value).
    """
    return parse_config(TrainConfig, argv, prog=PROG, description="Fine-tune a CLIP encoder with SaFeR-CLIP (or the Safe-CLIP baseline).",
                        config_file=True, config_dirs=(CONFIG_DIR,))  # fmt: skip
