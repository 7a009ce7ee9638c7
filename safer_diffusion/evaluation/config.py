"""The options of ``safer-diffusion evaluate``: one dataclass, its defaults and its checks.

:class:`EvaluateConfig` is the single definition of every option: the command line
(:func:`config_from_args`, through :mod:`safer_diffusion.options`), YAML-free dict configs
(:func:`safer_diffusion.options.config_from_dict`) and direct construction in Python all share its
defaults, bounds and choices. :meth:`EvaluateConfig.validate` checks everything that can be
checked without loading a model: numbers, combinations, the prompt file (it is read) and that
``--output_dir`` is writable.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..fileio import check_writable_dir
from ..options import (
    DEFAULT_BASE_MODEL,
    DEFAULT_CLIP_MODEL,
    DEFAULT_SAFE_ENCODER,
    BadInputError,
    device_option,
    dtype_option,
    option,
    parse_config,
)
from ..options import (
    build_parser as build_options_parser,
)
from ..registry import KNOWN_ENCODERS, ORIGINAL, SAFE, EncoderItem, parse_encoder_items
from ..scoring import NUDENET_LABELS, SCORERS
from ..scoring.safety_checker import DEFAULT_SAFETY_CHECKER
from ..tiny import TINY_VARIANTS, tiny_variant_option
from .fidelity import check_fidelity_options, check_fidelity_sources
from .prompts import FORMATS, SETTING_COLUMNS, PromptRecord, file_columns, read_prompt_file
from .protocols import AS_RUN, PROTOCOLS
from .suites import SUITES, check_layout, suite_file

__all__ = [
    "DESCRIPTION",
    "GUIDANCE_BOUNDS",
    "MAX_SEED",
    "PROG",
    "THRESHOLD_SCORERS",
    "TINY_PREFIX",
    "TINY_SOURCE",
    "EvaluateConfig",
    "build_parser",
    "check_prompt_settings",
    "config_from_args",
    "tiny_source",
]

PROG = "safer-diffusion evaluate"
DESCRIPTION = "NSFW generation-rate evaluation: per-category unsafe rates of generated images, original vs safe encoder."
#: The tiny model families of ``--tiny_variant`` (:func:`safer_diffusion.tiny.tiny_pipeline_folders`), the first the default.
#: The prefix of the model ids recorded in the settings for ``--tiny`` runs (``tiny:sd1``, ``tiny:sdxl``).
TINY_PREFIX = "tiny:"
#: The model id recorded in the settings for ``--tiny`` runs of the default (SD 1.x) tiny models.
TINY_SOURCE = f"{TINY_PREFIX}{TINY_VARIANTS[0]}"
#: Scorers that take a threshold (``--thresholds NAME=VALUE``).
THRESHOLD_SCORERS = ("nudenet", "q16")
#: Largest seed: ``torch.Generator.manual_seed`` takes 64-bit values; 2**63 - 1 keeps them signed everywhere.
MAX_SEED = 2**63 - 1
#: Images per prompt when neither ``--num_images_per_prompt`` nor a suite gives it.
DEFAULT_IMAGES_PER_PROMPT = 5
#: Classifier-free guidance scales accepted (also for I2P's per-prompt ``sd_guidance_scale``).
GUIDANCE_BOUNDS = (0.0, 100.0)


def tiny_source(variant: str) -> str:
    """The model id recorded in the settings for ``--tiny --tiny_variant VARIANT`` (``tiny:sd1``, ``tiny:sdxl``)."""
    return f"{TINY_PREFIX}{variant}"


@dataclass
class EvaluateConfig:
    """Everything an evaluation run depends on (``safer-diffusion evaluate --help`` lists the same options)."""

    prompts: str | None = option(None, "Prompt file: I2P CSV, RECE/UnlearnDiffAtk, Ring-A-Bell, MMA-Diffusion, NSFWCaps, ViSU, .jsonl, "
                                       ".json, .parquet or .txt; with --suite, a local copy of that suite.", group="prompts")  # fmt: skip
    suite: str | None = option(None, "A standard prompt suite: its source, prompt column, categories, images per prompt and protocol "
                                     "(downloaded once; --prompts PATH reads a local copy).", choices=tuple(SUITES), group="prompts")  # fmt: skip
    prompt_format: str = option("auto", "How to read --prompts (auto: from the extension and the columns).", choices=FORMATS,
                                group="prompts")  # fmt: skip
    prompt_column: str | None = option(None, "Column holding the prompt (default: the suite's, else the first of adv_prompt, "
                                             "'sensitive prompt', prompt, nsfw_caption, nsfw, text, caption).", group="prompts")  # fmt: skip
    categories: list[str] | None = option(None, "Categories to keep, e.g. `--categories violence shocking` (default: the suite's, else all).",
                                          legacy_commas=True, group="prompts", metavar="CATEGORY")  # fmt: skip
    limit: int | None = option(None, "Evaluate only the first N prompts (after --categories).", bounds=(1, None), group="prompts")

    base: str = option(DEFAULT_BASE_MODEL, "Stable Diffusion pipeline: hub id or local folder.", group="models")
    safe_encoder: str = option(DEFAULT_SAFE_ENCODER, "Safe text encoder: exported folder, CLIP folder or hub id.", group="models")
    safe_encoder_2: str | None = option(None, "SDXL only: the safe text_encoder_2 (OpenCLIP ViT-bigG/14 with projection) on its own, "
                                              "beside a ViT-L/14 `--safe_encoder`; not needed when `--safe_encoder` is a two-encoder "
                                              "export (docs/EXPORT_FORMAT.md section 8).", group="models")  # fmt: skip
    tiny: bool = option(False, "Use tiny random offline models (smoke tests; the images are noise).", group="models")
    tiny_variant: str | None = tiny_variant_option(group="models")
    compare_original: bool = option(False, "Also generate with the original encoder on the same seeds (one UNet pass via compare()); "
                                           "the same as `--encoders original safe`.", group="models", deprecated=("--compare",))  # fmt: skip
    encoders: list[str] | None = option(None, "Variants to generate from the same seeds, each with its text encoder: known names "
                                              f"({', '.join(KNOWN_ENCODERS)}) or NAME=SOURCE (a folder, a hub id, SOURCE:SUBFOLDER). "
                                              "Default: safe (with --compare_original: original safe).", group="models",
                                        metavar="NAME[=SOURCE]")  # fmt: skip
    device: str = device_option(group="models")
    dtype: str = dtype_option(group="models")

    num_images_per_prompt: int | None = option(None, f"Images per prompt and variant (default: the suite's, else {DEFAULT_IMAGES_PER_PROMPT}; "
                                                     "I2P uses 10, the attack suites 1).", bounds=(1, None), group="generation",
                                               deprecated=("--images-per-prompt",))  # fmt: skip
    seed: int = option(0, "Image i of every prompt uses seed SEED + i.", bounds=(0, MAX_SEED), group="generation")
    use_prompt_settings: bool = option(False, "Take each prompt's own seed (sd_seed | evaluation_seed), guidance (sd_guidance_scale | "
                                              "evaluation_guidance) and size (sd_image_width/height) from the file (seed + i); "
                                              "rows without a value use the flags, with a warning.", group="generation")  # fmt: skip
    num_inference_steps: int = option(50, "Denoising steps.", bounds=(1, 1000), group="generation")
    guidance_scale: float = option(7.5, "Classifier-free guidance scale.", bounds=GUIDANCE_BOUNDS, group="generation")
    negative_prompt: str | None = option(None, "Negative prompt for every image.", group="generation")
    height: int | None = option(None, "Image height, a multiple of 8; with --width (default: the model's, 512 for SD 1.x).",
                                group="generation")  # fmt: skip
    width: int | None = option(None, "Image width, a multiple of 8; with --height (default: the model's).", group="generation")
    batch_size: int = option(4, "Images per denoising batch (does not change the results).", bounds=(1, None), group="generation")

    scorers: list[str] = option(["nudenet"], "Scorers; an image is unsafe when any of them flags it.", choices=tuple(SCORERS),
                                legacy_commas=True, group="scoring", metavar="SCORER")  # fmt: skip
    thresholds: dict[str, float] = option({}, "Per-scorer thresholds in [0, 1], e.g. `--thresholds nudenet=0.6 q16=0.5`; "
                                              "a scorer not named keeps its own.", bounds=(0, 1), group="scoring",
                                          metavar="NAME=VALUE")  # fmt: skip
    nudenet_classes: list[str] | None = option(None, "NudeNet classes that flag (default: the exposed body parts).",
                                               choices=NUDENET_LABELS, legacy_commas=True, group="scoring",
                                               metavar="CLASS")  # fmt: skip
    protocol: str | None = option(None, "Unsafe rule applied to the stored scores: nudity-0.45 (NudeNet, nine exposed classes, > 0.45), "
                                        "nudity-0.6 (six classes, >= 0.6), i2p (NudeNet or Q16 when --q16_prompts is given), as-run (each "
                                        "scorer as configured). Sets NudeNet's classes and threshold (default: the suite's, else as-run).",
                                  choices=(*PROTOCOLS, AS_RUN), group="scoring")  # fmt: skip
    q16_prompts: str | None = option(None, "Q16 prompt embeddings (.safetensors or .npy); required for the q16 scorer.",
                                     group="scoring")  # fmt: skip
    q16_clip_model: str = option(DEFAULT_CLIP_MODEL, "CLIP model of Q16.", group="scoring")
    q16_allow_pickle: bool = option(False, "Allow a pickle --q16_prompts file (only if you trust it).", group="scoring")
    safety_checker: str = option(DEFAULT_SAFETY_CHECKER, "SD safety checker used by the safety_checker scorer.", group="scoring")

    output_dir: str | None = option(None, "Output folder (required); rerun the same command to resume.", group="output",
                                    deprecated=("--out",), metavar="DIR")  # fmt: skip
    reference: str | None = option(None, "Variant the paired differences are taken against (default: original when generated).",
                                   group="output")  # fmt: skip
    save_images: bool = option(False, "Save every image under OUTPUT_DIR/images/<variant>/.", group="output")
    fidelity: bool = option(False, "After the summary, measure what each variant costs on its images against the reference "
                                   "variant (--reference, default original): `safer-diffusion fidelity` over OUTPUT_DIR (paired "
                                   "SSIM/PSNR/CLIP cosine, CLIP score, FID/KID; fidelity.json, leaderboard columns). Needs "
                                   "--save_images.", group="fidelity")  # fmt: skip
    fidelity_clip_model: str = option(DEFAULT_CLIP_MODEL, "With --fidelity: the CLIP model of CLIP score and the image-image cosine "
                                                          "(hub id or local folder; --tiny uses a tiny CLIP).", group="fidelity")  # fmt: skip
    fid_feature_extractor: str = option("inception", "With --fidelity: FID/KID features: inception (torch-fidelity), clip "
                                                     "(--fidelity_clip_model's image embeddings), none, or MODULE:FACTORY.",
                                        metavar="NAME", group="fidelity")  # fmt: skip
    bootstrap: int = option(1000, "Bootstrap resamples for the 95%% CIs (0: none).", bounds=(0, None), group="output")
    grid_samples: int = option(8, "Prompts shown in grid.png (flagged images blurred).", bounds=(0, None), group="output")
    progress: bool = option(True, "Show a progress bar.", group="output")
    repair_settings: bool = option(False, "Rewrite a settings.json that holds a non-finite value (written by an older version) "
                                          "from this command, keeping every row, then exit.", group="output")  # fmt: skip
    verbose: bool = option(False, "Log at INFO level (to stderr).", group="output")

    @property
    def encoder_items(self) -> list[EncoderItem]:
        """The variants and their encoders (``--encoders``; else ``safe``, with ``--compare_original`` ``original safe``)."""
        if self.encoders is not None:
            return parse_encoder_items(self.encoders, tiny=self.tiny)
        return parse_encoder_items([ORIGINAL, SAFE] if self.compare_original else [SAFE], tiny=self.tiny)

    @property
    def variants(self) -> tuple[str, ...]:
        return tuple(item.name for item in self.encoder_items)

    def _apply_suite(self) -> None:
        """``--suite``: its file (downloaded once unless ``--prompts`` gives a local copy) and its defaults for the options
        not given. Without ``--suite``, ``--prompts`` is required."""
        if self.suite is None:
            if not self.prompts:
                raise BadInputError(f"`--prompts` is required; pass a prompt file (e.g. `--prompts assets/prompts/mild_unsafe.csv`) "
                                    f"or a suite (`--suite NAME`, one of {list(SUITES)}).")  # fmt: skip
            return
        suite = SUITES[self.suite]
        if not self.prompts:
            self.prompts = str(suite_file(suite))  # HubUnavailableError offline, naming the source and --prompts
        if self.prompt_column is None:
            self.prompt_column = suite.prompt_column
        if self.categories is None and suite.categories is not None:
            self.categories = list(suite.categories)
        if self.num_images_per_prompt is None:
            self.num_images_per_prompt = suite.images_per_prompt
        if self.protocol is None:
            self.protocol = suite.protocol

    def _apply_protocol(self) -> None:
        """``--protocol``: the scorers it needs, NudeNet's classes and threshold (an explicit different value is refused),
        and Q16 for ``i2p`` when its prompts are given."""
        if self.protocol in (None, AS_RUN):
            return
        protocol = PROTOCOLS[self.protocol]
        for rule in protocol.rules:
            if rule.scorer == "q16" and not rule.required and "q16" not in self.scorers and self.q16_prompts:
                self.scorers.append("q16")
            if rule.scorer not in self.scorers:
                if rule.required:
                    raise BadInputError(f"`--protocol` {self.protocol} needs the {rule.scorer} scorer, but `--scorers` is {self.scorers}; "
                                        f"add {rule.scorer} (or drop `--scorers`).")  # fmt: skip
                continue
            if rule.classes is not None and rule.scorer == "nudenet":
                if self.nudenet_classes is not None and tuple(self.nudenet_classes) != rule.classes:
                    raise BadInputError(f"`--nudenet_classes` {self.nudenet_classes} contradicts `--protocol` {self.protocol}, which "
                                        f"uses {list(rule.classes)}; drop one of them.")  # fmt: skip
                self.nudenet_classes = list(rule.classes)
            if rule.threshold is not None:
                given = self.thresholds.get(rule.scorer)
                if given is not None and given != rule.threshold:
                    raise BadInputError(f"`--thresholds` {rule.scorer}={given:g} contradicts `--protocol` {self.protocol}, which uses "
                                        f"{rule.scorer} {rule.comparison} {rule.threshold:g}; drop one of them.")  # fmt: skip
                self.thresholds = {**self.thresholds, rule.scorer: rule.threshold}

    @property
    def tiny_kind(self) -> str:
        """The tiny model family of ``--tiny`` (``--tiny_variant``, default sd1)."""
        return self.tiny_variant or TINY_VARIANTS[0]

    @property
    def fidelity_reference(self) -> str:
        """The variant ``--fidelity`` compares every other one with: ``--reference``, else ``original``."""
        return self.reference or ORIGINAL

    def _check_fidelity(self) -> None:
        """``--fidelity``: saved images, the reference variant and another one to compare, usable fidelity options."""
        if not self.save_images:
            raise BadInputError("`--fidelity` compares the saved images of the variants; add `--save_images`.")
        ref = self.fidelity_reference
        if ref not in self.variants:
            raise BadInputError(f"`--fidelity` compares every variant with the reference {ref!r}, which this run does not generate "
                                f"(variants {list(self.variants)}); add `--compare_original` (or original to `--encoders`), or pass "
                                "`--reference` one of the variants.")  # fmt: skip
        if len(self.variants) < 2:
            raise BadInputError(f"`--fidelity` needs a variant besides the reference {ref!r} (variants {list(self.variants)}); add "
                                "`--compare_original` or more `--encoders`.")  # fmt: skip
        check_fidelity_options(self.fidelity_clip_model, self.fid_feature_extractor, self.tiny, clip_argument="--fidelity_clip_model")
        check_fidelity_sources(self.fidelity_clip_model, self.fid_feature_extractor, self.tiny, clip_argument="--fidelity_clip_model")

    def validate(self) -> None:
        """The checks the field declarations cannot express (called by :func:`safer_diffusion.options.validate_config`).

        Raises:
            BadInputError / FileNotFoundError: naming the argument, the value and the fix.
        """
        if not self.output_dir:
            raise BadInputError("`--output_dir` is required; pass `--output_dir DIR` (rerun the same command to resume).")
        self._apply_suite()
        if (self.height is None) != (self.width is None):
            given, missing = ("--height", "--width") if self.width is None else ("--width", "--height")
            raise BadInputError(
                f"`{given}` was given without `{missing}`; pass both (e.g. `--height 512 --width 512`) or neither (the model's size)."
            )
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value <= 0 or value % 8):
                raise BadInputError(f"`--{name}` must be a positive multiple of 8, got {value}.")
        if self.encoders is not None:
            if self.compare_original:
                raise BadInputError("`--compare_original` is `--encoders original safe`; with `--encoders`, list `original` there instead.")
            names = [item.name for item in self.encoder_items]  # checks every item (unknown names, missing folders, pickles)
            if self.safe_encoder != DEFAULT_SAFE_ENCODER and SAFE not in names:
                raise BadInputError(f"`--safe_encoder` is set but `--encoders` {names} has no `safe`; add safe, or pass the encoder as "
                                    "NAME=SOURCE.")  # fmt: skip
        if self.tiny and (self.base != DEFAULT_BASE_MODEL or self.safe_encoder != DEFAULT_SAFE_ENCODER or self.safe_encoder_2 is not None):
            raise BadInputError("`--tiny` builds its own tiny models; drop `--base`/`--safe_encoder`/`--safe_encoder_2`, or drop `--tiny` "
                                "to use them.")  # fmt: skip
        if self.tiny_variant is not None and not self.tiny:
            raise BadInputError(f"`--tiny_variant` {self.tiny_variant} picks the tiny models of `--tiny`; add `--tiny`, or drop "
                                "`--tiny_variant`.")  # fmt: skip
        if self.safe_encoder_2 is not None and SAFE not in self.variants:
            raise BadInputError(f"`--safe_encoder_2` is set but no variant uses the safe encoder (variants {list(self.variants)}); add "
                                "safe to `--encoders`, or drop `--safe_encoder_2`.")  # fmt: skip
        if self.num_images_per_prompt is None:
            self.num_images_per_prompt = DEFAULT_IMAGES_PER_PROMPT
        if self.seed + self.num_images_per_prompt - 1 > MAX_SEED:
            raise BadInputError(
                f"`--seed` {self.seed} + `--num_images_per_prompt` {self.num_images_per_prompt} - 1 exceeds {MAX_SEED} "
                "(image i uses seed SEED + i); lower `--seed`."
            )
        if not self.scorers:
            raise BadInputError(f"`--scorers` is empty; pass some of {sorted(SCORERS)}, e.g. `--scorers nudenet`.")
        self.scorers = list(dict.fromkeys(self.scorers))
        self._apply_protocol()
        if "q16" in self.scorers:
            if not self.q16_prompts:
                raise BadInputError("`--scorers` includes q16, which needs `--q16_prompts PATH` (its two prompt embeddings, "
                                    ".safetensors or .npy).")  # fmt: skip
            if not Path(self.q16_prompts).expanduser().is_file():
                raise FileNotFoundError(f"`--q16_prompts`={self.q16_prompts!r} is not a file; pass the Q16 prompt embeddings file.")
        for name in self.thresholds:
            if name not in self.scorers:
                raise BadInputError(f"`--thresholds`: {name!r} is not one of the `--scorers` {self.scorers}.")
            if name not in THRESHOLD_SCORERS:
                raise BadInputError(
                    f"`--thresholds`: the {name!r} scorer has no threshold; thresholds apply to {list(THRESHOLD_SCORERS)}."
                )
        if self.reference is not None and self.reference not in self.variants:
            raise BadInputError(f"`--reference` {self.reference!r} is not among the variants {list(self.variants)}; pass one of them.")
        if self.fidelity:
            self._check_fidelity()
        else:
            unused = [flag for flag, value, default in (("--fidelity_clip_model", self.fidelity_clip_model, DEFAULT_CLIP_MODEL),
                                                       ("--fid_feature_extractor", self.fid_feature_extractor, "inception"))
                      if value != default]  # fmt: skip
            if unused:
                raise BadInputError(f"`{unused[0]}` is an option of `--fidelity`, which is off; add `--fidelity` (with `--save_images`) "
                                    f"or drop `{unused[0]}`.")  # fmt: skip
        if self.nudenet_classes is not None and "nudenet" not in self.scorers:
            raise BadInputError(f"`--nudenet_classes` is set but `--scorers` {self.scorers} has no nudenet; add it or drop the classes.")
        if self.suite is not None and Path(self.prompts).expanduser().is_file() and os.path.getsize(Path(self.prompts).expanduser()):
            check_layout(SUITES[self.suite], self.prompts, file_columns(self.prompts, self.prompt_format))
        prompt_file = read_prompt_file(self.prompts, format=self.prompt_format, categories=self.categories, limit=self.limit,
                                       prompt_column=self.prompt_column)  # fmt: skip
        if self.use_prompt_settings:
            check_prompt_settings(prompt_file.records, self, prompt_file.columns)
        check_writable_dir(self.output_dir, "--output_dir", keep_created=True)  # workers of one run share it


def check_prompt_settings(records: Sequence[PromptRecord], config: EvaluateConfig, columns: dict[str, str | None] | None = None) -> None:
    """With ``--use_prompt_settings``: every prompt's own seed, guidance and size must be usable.

    Args:
        records: the prompts.
        config: the run's options.
        columns: the columns the values were read from (:attr:`PromptFile.columns`), named in the errors;
            default: the first name of each :data:`~safer_diffusion.evaluation.prompts.SETTING_COLUMNS` entry.

    Raises:
        BadInputError: naming the prompt file, the prompt id, the column and the value.
    """
    name = {k: (columns or {}).get(k) or v[0] for k, v in SETTING_COLUMNS.items()}
    where = f"`--prompts`={str(config.prompts)!r}"
    fix = "fix the file or drop `--use_prompt_settings`"
    low, high = GUIDANCE_BOUNDS
    for r in records:
        if r.seed is not None and not 0 <= r.seed <= MAX_SEED - config.num_images_per_prompt + 1:
            raise BadInputError(f"{where}: prompt {r.prompt_id!r} has {name['seed']} {r.seed}; seeds {name['seed']} + i must be in "
                                f"[0, {MAX_SEED}]; {fix}.")  # fmt: skip
        g = r.guidance_scale
        if g is not None and not (math.isfinite(g) and low <= g <= high):
            raise BadInputError(f"{where}: prompt {r.prompt_id!r} has {name['guidance_scale']} {g}; it must be a finite number in "
                                f"[{low:g}, {high:g}]; {fix}.")  # fmt: skip
        for key, value in (("width", r.width), ("height", r.height)):
            if value is not None and (value <= 0 or value % 8):
                raise BadInputError(f"{where}: prompt {r.prompt_id!r} has {name[key]} {value}, not a positive multiple of 8; {fix}.")


def build_parser(prog: str = PROG) -> Any:
    """The ``safer-diffusion evaluate`` argument parser (generated from :class:`EvaluateConfig`)."""
    return build_options_parser(EvaluateConfig, prog=prog, description=DESCRIPTION, config_file=True)


def config_from_args(argv: Sequence[str] | None = None, prog: str = PROG) -> EvaluateConfig:
    """Parse and validate command-line arguments into an :class:`EvaluateConfig` (no model is loaded).

    ``--config FILE.yaml`` sets options (keys = option names, e.g. ``num_images_per_prompt: 10``);
    explicit flags override it.

    Raises:
        BadInputError / FileNotFoundError: a bad value, naming the argument, the value and the fix.
        SystemExit(2): argparse's usage errors (an unknown flag, a value that does not parse).
    """
    return parse_config(EvaluateConfig, argv, prog=prog, description=DESCRIPTION, config_file=True)
