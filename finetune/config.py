"""The one typed training configuration: YAML file + command-line overrides.

Every option is a field of :class:`TrainConfig`. The command line is generated from the fields,
so flags are the field names in snake_case (``--learning_rate``), enumerations are checked with
``choices=`` both on the command line and in YAML files, and the resolved configuration is written
next to the outputs (``<output_dir>/config.yaml``).

Precedence: dataclass defaults < ``--config file.yaml`` < explicit command-line flags.

Example::

    python -m finetune.train --config finetune/configs/safer_clip_vit_l14.yaml --train_batch_size 32
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safer_diffusion.fileio import atomic_write_text

__all__ = ["TrainConfig", "parse_config", "load_config_file", "CONFIG_DIR"]

#: Folder of the bundled configurations (``safer_clip_vit_l14.yaml``, ``tiny_cpu.yaml``, ...).
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def _opt(default: Any, help: str, choices: tuple | None = None, group: str = "training") -> Any:
    metadata = {"help": help, "choices": choices, "group": group}
    if isinstance(default, (list, dict, tuple)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """All options of ``python -m finetune.train``. Defaults are the paper recipe or a documented decision."""

    # ----- model
    model_name_or_path: str = _opt(
        "openai/clip-vit-large-patch14",
        "CLIP to fine-tune: a local CLIPModel folder or hub id, `open_clip:<arch>[:<pretrained tag or .safetensors file>]` "
        "(e.g. open_clip:ViT-H-14:laion2b_s32b_b79k for SD 2.x), or `tiny` (tiny random CLIP, offline tests).",
        group="model",
    )
    attention: str = _opt(
        "sdpa", "Attention kernel: PyTorch SDPA (default), eager (reference maths), or xformers (CUDA + xformers installed).",
        ("sdpa", "xformers", "eager"), "model",
    )
    # ----- data
    train_data: str = _opt(
        "aimagelab/ViSU-Text",
        "Pairs: a local .csv/.jsonl/.json/.parquet file or a hub dataset id (see finetune.data.load_pairs).", group="data",
    )
    data_format: str = _opt("auto", "Column layout of `train_data`.", ("auto", "visu", "nsfwcaps", "generic"), "data")
    column_map: str | None = _opt(
        None, "Column names for generic tables, e.g. 'safe=caption,unsafe=nsfw_caption,safe_image=path'.", group="data"
    )
    image_root: str | None = _opt(None, "Folder that relative image paths in the data are resolved against.", group="data")
    val_fraction: float = _opt(
        0.05, "Fraction of pairs held out (deterministically, by `seed`) for end-of-training validation metrics.", group="data"
    )
    max_length: int = _opt(77, "Token length cap (CLIP's context is 77).", group="data")
    # ----- method
    loss: str = _opt(
        "safer_clip", "safer_clip: nearest-safe targets + relative loss; safe_clip: the Safe-CLIP baseline (fixed pair, InfoNCE).",
        ("safer_clip", "safe_clip"), "method",
    )
    relative_scale: float = _opt(
        1.0,
        "Scale s of the relative loss softplus(s*[cos(.,unsafe)-cos(.,target)]). Paper: none (s=1). Measured: s=1 redirects "
        "more than Safe-CLIP with less drift; s=2-3 = stronger redirection; s>=5 drifts more than Safe-CLIP; never s>=10.",
        group="method",
    )
    loss_weights: dict | None = _opt(
        None, "JSON dict overriding term weights, e.g. '{\"rel_tt\": 0.3}'. Default: METHOD.md weights.", group="method"
    )
    token_weight: float = _opt(
        0.0, "Weight of the token-level preservation term on safe captions (what the UNet sees); 0 = off.", group="method"
    )
    curriculum: str = _opt(
        "tertiles", "Easy-to-hard curriculum over pair difficulty cos(T0(t*), T0(t_hat)), or none.", ("tertiles", "none"), "method"
    )
    curriculum_boundaries: list[float] = _opt([1 / 3, 2 / 3], "Quantile boundaries of the curriculum stages.", group="method")
    curriculum_stage_epochs: list[int] = _opt([1, 2, 3], "First epoch (1-based) at which each stage is trained.", group="method")
    precompute_anchors: bool = _opt(
        True,
        "Precompute the frozen T0/V0 embeddings once (fast). Off: run the frozen reference every step (Safe-CLIP style) "
        "with the LoRA adapters disabled on the same weights.",
        group="method",
    )
    anchor_batch_size: int = _opt(256, "Batch size of the one-off anchor encoding.", group="method")
    cache_dir: str | None = _opt(None, "Cache of anchors and targets (keyed by data + encoder). Default: <output_dir>/cache.", group="method")
    # ----- what is trained
    train_towers: str = _opt(
        "text", "Towers to train: text (all the diffusion plug-in needs), vision, or both.", ("text", "vision", "both")
    )
    finetune: str = _opt("lora", "LoRA adapters (paper) or full fine-tuning of the trained tower(s).", ("lora", "full"))
    lora_rank: int = _opt(16, "LoRA rank (paper: 16).")
    lora_alpha: float = _opt(16.0, "LoRA alpha (decision: = rank, scaling 1).")
    lora_dropout: float = _opt(0.1, "LoRA dropout (decision).")
    lora_target_modules: list[str] = _opt(
        ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], "Linear layers that get LoRA adapters (decision: attention + MLP)."
    )
    # ----- optimisation
    learning_rate: float = _opt(1e-4, "Adam learning rate (paper: 1e-4).")
    adam_beta1: float = _opt(0.9, "Adam beta1 (PyTorch default).")
    adam_beta2: float = _opt(0.999, "Adam beta2 (PyTorch default).")
    adam_epsilon: float = _opt(1e-8, "Adam epsilon (PyTorch default).")
    adam_weight_decay: float = _opt(0.0, "Weight decay (paper: plain Adam, so 0).")
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm (decision: 1.0, a standard guard; 0 disables).")
    lr_scheduler: str = _opt(
        "constant_with_warmup", "Learning-rate schedule (decision: constant as in the paper, after an optional warm-up).",
        ("constant", "constant_with_warmup", "linear", "cosine"),
    )
    lr_warmup_steps: int = _opt(0, "Warm-up steps (decision: 0, the paper mentions none).")
    train_batch_size: int = _opt(48, "Pairs per device per step (paper: 48 on one GPU).")
    num_train_epochs: int = _opt(9, "Epochs over the (curriculum-filtered) unsafe pairs (paper: 9).")
    max_train_steps: int | None = _opt(None, "Stop after this many steps (overrides the epoch count when smaller).")
    mixed_precision: str = _opt(
        "no", "Mixed precision: frozen weights in fp16/bf16, trainable weights fp32 (fp16 uses loss scaling).", ("no", "fp16", "bf16")
    )
    gradient_checkpointing: bool = _opt(False, "Recompute activations in the backward pass to save memory.")
    seed: int = _opt(42, "Seed of weights init (LoRA), data order, dropout and the validation split.")
    use_cpu: bool = _opt(False, "Run on the CPU even if an accelerator is available.")
    # ----- checkpoints and logging
    output_dir: str = _opt("outputs/safer-clip", "Output folder: config.yaml, checkpoint-{step}/, logs/, metrics.json.", group="io")
    checkpointing_steps: int = _opt(500, "Save a resumable checkpoint every this many steps (and at the end).", group="io")
    checkpoints_total_limit: int | None = _opt(None, "Keep at most this many checkpoints (oldest removed first).", group="io")
    resume_from_checkpoint: str | None = _opt(
        None, "`latest` (newest complete checkpoint in output_dir) or a checkpoint folder path.", group="io"
    )
    report_to: str = _opt("tensorboard", "Metrics logger.", ("tensorboard", "none"), "io")
    logging_steps: int = _opt(10, "Log the loss terms every this many steps.", group="io")
    eval_at_end: bool = _opt(True, "Compute validation metrics (redirection, preservation) at the end into metrics.json.", group="io")

    # ------------------------------------------------------------------ helpers
    def validate(self) -> TrainConfig:
        """Check enumerations and ranges; raise `ValueError` naming the option, the value and the fix."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ValueError(f"`--{f.name}` must be one of {list(choices)}, got {value!r}.")
        positive = ["train_batch_size", "num_train_epochs", "checkpointing_steps", "logging_steps", "anchor_batch_size", "max_length"]
        for name in positive + ["lora_rank"]:
            if getattr(self, name) < 1:
                raise ValueError(f"`--{name}` must be >= 1, got {getattr(self, name)!r}.")
        for name in ("max_train_steps", "checkpoints_total_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`--{name}` must be >= 1 or unset, got {value!r}.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"`--val_fraction` must be in [0, 1), got {self.val_fraction!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"`--lora_dropout` must be in [0, 1), got {self.lora_dropout!r}.")
        if self.learning_rate <= 0:
            raise ValueError(f"`--learning_rate` must be > 0, got {self.learning_rate!r}.")
        if self.relative_scale <= 0:
            raise ValueError(f"`--relative_scale` must be > 0 (paper: 1), got {self.relative_scale!r}.")
        if self.relative_scale >= 10:
            raise ValueError(f"`--relative_scale` {self.relative_scale!r} is >= 10, which destroys the geometry; use 1 (default) to 3.")
        if self.max_length > 77:
            raise ValueError(f"`--max_length` must be <= 77 (CLIP context), got {self.max_length!r}.")
        if len(self.curriculum_boundaries) + 1 != len(self.curriculum_stage_epochs):
            raise ValueError(
                f"`--curriculum_stage_epochs` needs one entry per stage (len(`--curriculum_boundaries`) + 1 = "
                f"{len(self.curriculum_boundaries) + 1}), got {self.curriculum_stage_epochs!r}."
            )
        if self.loss_weights is not None and not isinstance(self.loss_weights, dict):
            raise ValueError(f"`--loss_weights` must be a JSON object of term -> weight, got {self.loss_weights!r}.")
        if self.resume_from_checkpoint == "":
            raise ValueError("`--resume_from_checkpoint` is empty: pass `latest` or a checkpoint folder.")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the resolved configuration as YAML, atomically (tmp file + os.replace)."""
        import yaml

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"Unknown option(s) {unknown} in {source}; valid options are the `--` flags of `python -m finetune.train --help`.")
        hints = typing.get_type_hints(cls)
        coerced = {}
        for key, value in data.items():
            kind = hints[key]
            base = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
            if isinstance(value, str) and base in (int, float):
                try:
                    value = base(value)  # YAML reads "1e-4" as a string
                except ValueError as e:
                    raise ValueError(f"`--{key}` must be {base.__name__}, got {value!r} in {source}.") from e
            elif isinstance(value, int) and not isinstance(value, bool) and base is float:
                value = float(value)
            coerced[key] = value
        return cls(**coerced).validate()


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML config (keys = option names). A bare name resolves inside :data:`CONFIG_DIR`."""
    import yaml

    p = Path(path)
    if not p.is_file() and (CONFIG_DIR / p).is_file():
        p = CONFIG_DIR / p
    if not p.is_file():
        raise FileNotFoundError(f"`--config` {os.fspath(path)!r} does not exist. Bundled configs: {sorted(x.name for x in CONFIG_DIR.glob('*.yaml'))}.")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"`--config` {str(p)!r} must hold a mapping of option -> value, got {type(data).__name__}.")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"Unknown option(s) {unknown} in `--config` {str(p)!r}; see `python -m finetune.train --help`.")
    return data


def _none_or(kind):
    def convert(text: str):
        return None if text.lower() in ("none", "null", "") else kind(text)

    convert.__name__ = f"{kind.__name__}_or_none"
    return convert


def _json_dict(text: str):
    if text.lower() in ("none", "null"):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}); example: '{{\"rel_tt\": 0.25}}'") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def build_parser(defaults: dict[str, Any] | None = None, prog: str = "python -m finetune.train") -> argparse.ArgumentParser:
    """An argparse parser with one flag per :class:`TrainConfig` field (defaults may come from a YAML file)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Fine-tune a CLIP encoder with SaFeR-CLIP (or the Safe-CLIP baseline).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", default=None, help="YAML file of options (bundled: finetune/configs/*.yaml); flags override it.")
    hints = typing.get_type_hints(TrainConfig)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(TrainConfig):
        group = groups.setdefault(f.metadata["group"], parser.add_argument_group(f.metadata["group"]))
        default = (defaults or {}).get(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
        kind = hints[f.name]
        args = typing.get_args(kind)
        optional = type(None) in args or (isinstance(kind, types.UnionType) and type(None) in args)
        base = next((a for a in args if a is not type(None)), kind) if optional else kind
        kwargs: dict[str, Any] = {"default": default, "help": f.metadata["help"]}
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        origin = typing.get_origin(base)
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is list:
            item = typing.get_args(base)[0]
            kwargs.update(nargs="+", type=item)
        elif base is dict or origin is dict:
            kwargs["type"] = _json_dict
        elif optional:
            kwargs["type"] = _none_or(base)
        else:
            kwargs["type"] = base
        group.add_argument(f"--{f.name}", **kwargs)
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Parse ``argv`` (``sys.argv[1:]`` when None): ``--config`` YAML first, then flags on top. Returns a validated config."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    defaults = load_config_file(known.config) if known.config else {}
    args = vars(build_parser(defaults).parse_args(argv))
    args.pop("config")
    return TrainConfig.from_dict(args, source="the command line")
