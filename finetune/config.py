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
        --loss_weights rel_tt=0.3            # merged: rel_tt 0.3, every other term keeps its default
    python -m finetune.train ... --loss_weights_mode replace --loss_weights rel_tt=0.3 pres_txt=0.7   # only these two

Loss-dependent defaults (``auto`` values, ``loss_weights`` merged into the defaults) are resolved once the data is
known (:meth:`TrainConfig.resolve`), and ``config.yaml`` holds the resolved values: the curriculum actually used,
the Safe-CLIP variant, and the effective weight of every loss term (``loss_weights_mode: replace``), so the file
reruns the same method.

The method behind the defaults is described in docs/METHOD.md.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safer_diffusion.fileio import atomic_write_text
from safer_diffusion.options import DEFAULT_CLIP_MODEL, config_from_dict, config_to_dict, option, parse_config, validate_config

from .curriculum import CURRICULUM_MODES, check_schedule
from .data import DATA_FORMATS, parse_column_map
from .losses import (
    LOSS_CHOICES,
    PAIR_FORMS,
    SAFE_CLIP_VARIANTS,
    TOKEN_LAYERS,
    WEIGHTS_MODES,
    available_terms,
    build_loss,
    check_weights,
)
from .modeling import ATTENTION_CHOICES, TINY_SDXL_BASE

logger = logging.getLogger(__name__)

__all__ = ["AUTO", "CONFIG_DIR", "PROG", "TrainConfig", "loss_inputs", "parse_train_config"]

#: The value of a key whose default depends on the loss or the data (resolved by :meth:`TrainConfig.resolve`).
AUTO = "auto"

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
        "(e.g. open_clip:ViT-H-14:laion2b_s32b_b79k for SD 2.x), a text-only CLIPTextModel(WithProjection) folder (e.g. an SDXL "
        "pipeline's text_encoder/; without a projection the pooled output is compared as is), or `tiny` (tiny random CLIP, "
        "offline tests; `tiny_sdxl` / `tiny_sdxl_2`: the tiny SDXL pipeline's two text encoders). With `--sdxl`: the first tower, "
        "SDXL's text_encoder (CLIP ViT-L/14).",
        group="model",
    )
    sdxl: bool = option(
        False, "Train Stable Diffusion XL's two text encoders, each with its own anchors, targets and cache, one after the other "
        "into <output_dir>/text_encoder/ (`--model_name_or_path`) and <output_dir>/text_encoder_2/ (`--model_name_or_path_2`), "
        "each a resumable run; needs `--model_name_or_path_2` and `--base`.", group="model",
    )
    model_name_or_path_2: str | None = option(
        None, "With `--sdxl`: the second tower, SDXL's text_encoder_2 (OpenCLIP ViT-bigG/14): "
        "`open_clip:ViT-bigG-14:laion2b_s39b_b160k`, a CLIPTextModelWithProjection folder (e.g. an SDXL pipeline's "
        "text_encoder_2/), a CLIPModel, or `tiny_sdxl_2`.", group="model",
    )
    base: str | None = option(
        None, "With `--sdxl`: the SDXL pipeline (hub id or folder) whose text encoders the towers replace; each tower's width, "
        f"depth and projection are checked against it before training (only its config files are read). `{TINY_SDXL_BASE}`: "
        "the tiny SDXL pipeline of the tests.", group="model",
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
    train_data_safe: str | None = option(
        None, "Row-aligned pair files: `--train_data` holds the unsafe prompts and this file the safe ones, row i pairing "
        "with row i (e.g. DES: `--train_data unsafe_prompts_copro_sexual.csv --train_data_safe safe_prompts_copro_sexual.csv`). "
        "Column: `prompt`, the only column, or `--column_map unsafe=COL safe=COL`. Row counts must match; no row may be empty. "
        "`--safe_data` is the same option.", group="data", metavar="FILE", aliases=("--safe_data", "--safe-data"),
    )
    image_root: str | None = option(None, "Folder that relative image paths in the data are resolved against.", group="data")
    extra_safe_captions: list[str] | None = option(
        None, "Extra safe captions (.txt one a line, or .csv/.jsonl/.json/.parquet with a caption column) that join the "
        "nearest-safe pool (safer_clip) and, with `--preserve_extra`, the preservation term. Caption-only data only.",
        group="data", metavar="FILE",
    )
    extra_safe_captions_column: str | None = option(
        None, "Column of the extra captions in a table. Default: the first of caption, prompt, text, safe, or the only column.",
        group="data",
    )
    val_fraction: float = option(
        0.05, "Fraction of pairs held out (deterministically, by `seed`) for end-of-training validation metrics; in [0, 1).",
        bounds=(0.0, 1.0), group="data",
    )
    max_length: int = option(77, "Token length cap (CLIP's context is 77).", bounds=(1, 77), group="data")
    group_by_length: bool = option(
        False, "Build each step from captions of similar token length (sorted within windows of `--length_group_steps` "
        "steps, the steps then shuffled), so that trimming every batch to its longest caption drops more padding "
        "(docs/METHOD.md §6.5). Off by default: the batches then mix lengths as in the paper.", group="data",
    )
    length_group_steps: int = option(50, "With `--group_by_length`: steps per sorting window (larger: more uniform "
                                         "lengths, less random batches).", bounds=(2, None), group="data")  # fmt: skip
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
        None, "Term weights as TERM=WEIGHT items, merged into the defaults (docs/METHOD.md §4.5-4.6): `--loss_weights rel_tt=0.3` "
        "sets rel_tt and keeps every other term's default; a term named at 0 is off. With `--loss_weights_mode replace`, "
        "`--loss_weights rel_tt=0.3 pres_txt=0.7` trains only those two. Safe-CLIP's weights are then normalised (sum 1, "
        "divided by the variant's term count).", group="method", metavar="TERM=WEIGHT",
    )
    loss_weights_mode: str = option(
        "merge", "merge: `--loss_weights` override single terms of the defaults; replace: only the named terms (the others off).",
        choices=WEIGHTS_MODES, group="method",
    )
    renormalize_active: bool = option(
        False, "When a term with a positive weight has no inputs (e.g. Safe-CLIP's vision terms with a frozen vision tower), "
        "rescale the active terms to the total of the positive weights. Off (decision): that share is not trained, as in "
        "Safe-CLIP's reference where a frozen tower's terms are constants.", group="method",
    )
    safe_clip_variant: str = option(
        AUTO, "Safe-CLIP baseline: image (the paper's eight terms; needs safe images), text (its text-only analogue with "
        "InfoNCE in text space, docs/METHOD.md §4.6), or auto: image when every pair has a safe image, else text.",
        choices=(AUTO, *SAFE_CLIP_VARIANTS), group="method",
    )
    token_weight: float = option(
        0.0, "Weight of the token-level preservation term on safe captions (what the UNet sees, at `--token_layer`); 0 = off.",
        bounds=(0.0, None), group="method",
    )
    token_redir_weight: float = option(
        0.0, "Weight of the token-level redirection term: the unsafe caption's mean-pooled token states (at `--token_layer`) "
        "pulled toward its target's frozen ones (docs/METHOD.md); 0 = off.", bounds=(0.0, None), group="method",
    )
    token_layer: str = option(
        "last", "Token states the token terms read: last (final layer after its layer norm, what SD 1.x reads; default) or "
        "penultimate (hidden_states[-2], no final layer norm: what SDXL reads from both encoders; the SDXL config's value).",
        choices=TOKEN_LAYERS, group="method",
    )
    pair_margin: float = option(
        0.0, "Drift budget δ of the paired safe-twin preservation pres_pair (on with `--loss_weights pres_pair=W`, "
        "docs/METHOD.md §4.7): a twin whose drift is within δ costs nothing.", bounds=(0.0, 1.99), group="method",
    )
    pair_form: str = option(
        "cosine", "The twins' drift in pres_pair: cosine (1 - cos, as pres_txt) or distance (||T(t) - T0(t)|| of the "
        "normalised embeddings, whose pull does not vanish at small drift).", choices=PAIR_FORMS, group="method",
    )
    curriculum: str = option(
        AUTO, "Easy-to-hard curriculum over pair difficulty cos(T0(t*), T0(t_hat)): tertiles, none, or auto = tertiles for "
        "safer_clip (paper) and none for safe_clip (Safe-CLIP has no curriculum).", choices=(*CURRICULUM_MODES, AUTO),
        group="method",
    )
    curriculum_boundaries: list[float] = option([1 / 3, 2 / 3], "Quantile boundaries of the curriculum stages.", group="method")
    curriculum_stage_epochs: list[int] = option([1, 2, 3], "First epoch (1-based) at which each stage is trained.", group="method")
    preserve_extra: bool = option(
        False, "Also preserve the `--extra_safe_captions`: each step, `extra_preserve_fraction` of the batch's preservation "
        "rows are extra captions.", group="method",
    )
    extra_preserve_fraction: float = option(
        0.5, "With `--preserve_extra`: share of each step's preservation rows drawn from the extra captions, in (0, 1] "
        "(decision: 0.5, the paired safe captions and the extra corpus weigh equally).", bounds=(0.0, 1.0), group="method",
    )
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
        variant = self.safe_clip_variant if self.safe_clip_variant != AUTO else None
        if self.loss_weights is not None:
            if not isinstance(self.loss_weights, dict) or not self.loss_weights:
                raise ValueError(f"`--loss_weights` must be TERM=WEIGHT items (e.g. rel_tt=0.3), got {self.loss_weights!r}.")
            check_weights(self.loss_weights, self.loss, "--loss_weights", variant if self.loss == "safe_clip" else None)
        elif self.loss_weights_mode == "replace":
            raise ValueError("`--loss_weights_mode replace` needs `--loss_weights TERM=WEIGHT ...` (every unnamed term is off); "
                             "name the terms to train, or use `--loss_weights_mode merge`.")
        if variant is not None and self.loss != "safe_clip":
            raise ValueError(f"`--safe_clip_variant {variant}` applies to `--loss safe_clip` only; drop it or leave it at auto.")
        if variant == "text" and self.train_towers != "text":
            raise ValueError(f"`--safe_clip_variant text` trains the text tower only, got `--train_towers {self.train_towers}`; "
                             "use `--train_towers text` or `--safe_clip_variant image`.")
        if self.extra_safe_captions is not None and not self.extra_safe_captions:
            raise ValueError("`--extra_safe_captions` needs at least one FILE.")
        if self.preserve_extra and not self.extra_safe_captions:
            raise ValueError("`--preserve_extra` needs `--extra_safe_captions FILE [FILE ...]`.")
        if self.extra_safe_captions and self.loss == "safe_clip" and not self.preserve_extra:
            raise ValueError("`--extra_safe_captions` does nothing under `--loss safe_clip` (its target is the fixed pair, "
                             "there is no nearest-safe pool); add `--preserve_extra` to preserve them, or drop them.")
        if self.extra_safe_captions_column is not None and not self.extra_safe_captions:
            raise ValueError("`--extra_safe_captions_column` needs `--extra_safe_captions`.")
        if self.preserve_extra:
            if self.extra_preserve_fraction <= 0:
                raise ValueError(f"`--extra_preserve_fraction` must be in (0, 1], got {self.extra_preserve_fraction!r}.")
            if self.extra_rows_per_batch < 1:
                raise ValueError(f"`--extra_preserve_fraction` {self.extra_preserve_fraction} x `--train_batch_size` "
                                 f"{self.train_batch_size} rounds to 0 extra rows per step; raise one of them.")
        if self.train_data_safe is not None:
            if not str(self.train_data_safe).strip():
                raise ValueError("`--train_data_safe` is empty; pass the file of safe prompts.")
            if self.data_format != "auto":
                raise ValueError(f"`--data_format {self.data_format}` does not apply to row-aligned files (`--train_data_safe`); "
                                 "leave it at auto.")
        if self.column_map is not None:  # a saved config of an older version holds the 'safe=a,unsafe=b' string
            self.column_map = parse_column_map(self.column_map)
        if not self.lora_target_modules:
            raise ValueError(f"`--lora_target_modules` must name at least one of {list(LORA_MODULE_CHOICES)}.")
        if self.resume_from_checkpoint == "":
            raise ValueError("`--resume_from_checkpoint` is empty: pass `latest` or a checkpoint folder.")
        for name in ("output_dir", "train_data", "model_name_or_path"):
            if not str(getattr(self, name)).strip():
                raise ValueError(f"`--{name}` is empty; pass a value.")
        if self.sdxl:
            for name, what in (("model_name_or_path_2", "the second tower (SDXL's text_encoder_2, OpenCLIP ViT-bigG/14), e.g. "
                                "open_clip:ViT-bigG-14:laion2b_s39b_b160k"),
                               ("base", "the SDXL pipeline the towers are for, e.g. stabilityai/stable-diffusion-xl-base-1.0")):
                if getattr(self, name) is None or not str(getattr(self, name)).strip():
                    raise ValueError(f"`--{name}` is missing: an `--sdxl` run trains both SDXL text encoders; pass {what}.")
            if self.train_towers != "text":
                raise ValueError(f"`--sdxl` trains the text encoders only, got `--train_towers {self.train_towers}`; use "
                                 "`--train_towers text`.")
        else:
            for name in ("model_name_or_path_2", "base"):
                if getattr(self, name) is not None:
                    raise ValueError(f"`--{name}` applies to `--sdxl` runs only; add `--sdxl` (both SDXL towers) or drop it.")
        return self

    @property
    def extra_rows_per_batch(self) -> int:
        """Preservation rows per process batch drawn from the extra captions (0 without `--preserve_extra`)."""
        return int(self.extra_preserve_fraction * self.train_batch_size + 0.5) if self.preserve_extra else 0

    def resolve(self, *, safe_images: bool, unsafe_images: bool) -> TrainConfig:
        """A copy with every loss- and data-dependent default resolved, for a run whose data has (every pair) a safe
        image (``safe_images``) and an unsafe image (``unsafe_images``):

        * ``curriculum``: auto -> ``tertiles`` (safer_clip) or ``none`` (safe_clip);
        * ``safe_clip_variant`` (safe_clip): auto -> ``image`` with safe images, else ``text``;
        * ``loss_weights``: the effective weight of every term of the loss (``--loss_weights`` merged into or replacing
          the defaults over the terms this run can compute, then Safe-CLIP's normalisation), with
          ``loss_weights_mode: replace``. Resolving the result again gives the same config.

        Raises:
            ValueError: the Safe-CLIP image variant without safe images; no term that can run has a positive weight.
        """
        curriculum = self.curriculum if self.curriculum != AUTO else ("none" if self.loss == "safe_clip" else "tertiles")
        variant = self.safe_clip_variant
        if self.loss == "safe_clip":
            if variant == AUTO:
                variant = "image" if safe_images else "text"
            elif variant == "image" and not safe_images:
                raise ValueError("`--safe_clip_variant image` needs a safe image for every pair, and `--train_data` has none "
                                 "(caption-only); use `--safe_clip_variant text` (or auto), the text-only analogue.")
        inputs = loss_inputs(self.train_towers, safe_images, unsafe_images)
        loss_fn = build_loss(self.loss, self.loss_weights, self.relative_scale, self.token_weight, weights_mode=self.loss_weights_mode,
                             renormalize_active=self.renormalize_active, variant=variant if variant != AUTO else "image",
                             token_redir_weight=self.token_redir_weight, pair_margin=self.pair_margin,
                             pair_form=self.pair_form)  # fmt: skip
        weights = loss_fn.weights_for(inputs)
        runnable = available_terms(self.loss, inputs, variant if self.loss == "safe_clip" else None)
        if not any(weights[name] > 0 for name in runnable) and self.token_weight == 0 and self.token_redir_weight == 0:
            raise ValueError(f"`--loss_weights`: every term that can run in this configuration ({', '.join(runnable)}) has weight 0; "
                             "give one of them a positive weight.")
        idle = [name for name, w in weights.items() if w > 0 and name not in runnable]
        if idle:
            named = [name for name in idle if name in (self.loss_weights or {})]
            fate = "the active terms are rescaled" if self.renormalize_active else "their share is not trained"
            if named:
                logger.warning("`--loss_weights` names %s, which cannot run here (inputs absent: towers %s, safe images %s, unsafe "
                               "images %s); %s.", ", ".join(named), self.train_towers, safe_images, unsafe_images, fate)
            logger.info("Loss terms with a positive weight that cannot run in this configuration: %s (%s).", ", ".join(idle), fate)
        resolved = dataclasses.replace(self, curriculum=curriculum, safe_clip_variant=variant, loss_weights=dict(weights),
                                       loss_weights_mode="replace")  # fmt: skip
        return validate_config(resolved)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    def save(self, path: str | os.PathLike, header: str = "") -> Path:
        """Write the configuration as YAML, atomically (tmp file + fsync + os.replace); ``header`` lines become comments."""
        import yaml

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
        atomic_write_text(path, comment + yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build and validate a config from a mapping (a saved config.yaml, a checkpoint's state), as the CLI would."""
        return config_from_dict(cls, data, source)


def loss_inputs(train_towers: str, safe_images: bool, unsafe_images: bool) -> frozenset[str]:
    """The embeddings :func:`finetune.train.train` passes to the loss each step (docs/METHOD.md §6.4).

    Frozen text embeddings always (``t0``, ``t0_star``, ``t0_hat``); the trained tower's outputs (``t``, ``t_star``;
    ``v``, and ``v_star`` with unsafe images); frozen image embeddings with images (``v0``, ``v0_hat``; ``v0_star``
    with unsafe images). With the text tower trained, also the unsafe rows' own safe twins (``t_pair``, ``t0_pair``),
    which the trainer computes when ``pres_pair`` has a positive weight.
    """
    inputs = {"t0", "t0_star", "t0_hat"}
    if train_towers in ("text", "both"):
        inputs |= {"t", "t_star", "t_pair", "t0_pair"}
    if train_towers in ("vision", "both") and safe_images:
        inputs |= {"v"} | ({"v_star"} if unsafe_images else set())
    if safe_images:
        inputs |= {"v0", "v0_hat"} | ({"v0_star"} if unsafe_images else set())
    return frozenset(inputs)


def parse_train_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse ``argv`` (``sys.argv[1:]`` when None): ``--config`` YAML first, then flags on top. Returns a validated config.

    Raises:
        BadInputError: a value is out of range, not finite, not a choice, or the YAML file is wrong.
        SystemExit(2): argparse's own usage errors (unknown flag, unparsable value).
    """
    return parse_config(TrainConfig, argv, prog=PROG, description="Fine-tune a CLIP encoder with SaFeR-CLIP (or the Safe-CLIP baseline).",
                        config_file=True, config_dirs=(CONFIG_DIR,))  # fmt: skip
