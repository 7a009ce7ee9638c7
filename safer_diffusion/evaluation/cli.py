"""``safer-diffusion evaluate`` / ``python -m safer_diffusion.evaluate``: the NSFW generation-rate evaluation.

Generates ``--num_images_per_prompt`` images for every prompt of a benchmark (a ``--suite`` such as
I2P, UnlearnDiffAtk, Ring-A-Bell, MMA-Diffusion, P4D, SneakyPrompt, NSFWCaps, COCO, or any prompt
file), once per variant (``--encoders``: the base's own encoder, the safe encoders to compare),
all variants from the same seeds; scores each image with NudeNet (and/or Q16, the SD safety
checker) on a background thread while the next batch generates, and appends one row per image
and variant to ``results.jsonl``, with every scorer's raw per-class scores. ``summary.json`` /
``summary.csv`` (per-category unsafe rates and attack success rates, the mean over categories,
the micro rate, 95 % bootstrap CIs, paired differences vs ``--reference``, the protocol next to
every number), ``leaderboard.md``/``.csv``, ``report.png`` and ``grid.png`` are then computed
from the results alone; ``safer-diffusion summarize RUN --protocol NAME`` recomputes them under
another protocol.

Single GPU (or CPU)::

    safer-diffusion evaluate --prompts i2p_benchmark.csv --compare_original --output_dir runs/i2p
    python -m safer_diffusion.evaluate --prompts i2p_benchmark.csv --compare_original --output_dir runs/i2p

Several GPUs (prompts sharded by rank; each rank writes ``results.rank{r}.jsonl``, rank 0 merges)::

    accelerate launch --num_processes 8 -m safer_diffusion.evaluate --prompts i2p_benchmark.csv --compare_original \\
        --output_dir runs/i2p

Several safe encoders side by side, on a standard suite and its pinned protocol (nudity-0.45)::

    safer-diffusion evaluate --suite unlearndiffatk-nudity --use_prompt_settings \\
        --encoders original safer-clip safe-clip advunlearn des=encoders/des --output_dir runs/nudity
    safer-diffusion summarize runs/nudity --protocol nudity-0.6

Offline smoke test on tiny random models (``--tiny_variant sdxl``: a tiny SDXL base)::

    safer-diffusion evaluate --tiny --prompts assets/prompts/mild_unsafe.csv --limit 4 --num_images_per_prompt 2 \\
        --num_inference_steps 2 --compare_original --output_dir runs/tiny

Benign fidelity in the same run (``--fidelity`` runs ``safer-diffusion fidelity`` over the folder
after the summary, on the saved images, against ``--reference``; fidelity.json and the
leaderboard's fidelity columns)::

    safer-diffusion evaluate --prompts assets/prompts/benign.csv --compare_original --save_images --fidelity \\
        --fid_feature_extractor clip --output_dir runs/benign

SDXL (the pipeline class comes from ``--base``'s ``model_index.json``; its safe encoder is a
two-encoder export, docs/EXPORT_FORMAT.md section 8, or ``--safe_encoder`` with
``--safe_encoder_2``; an SDXL run generates ``original`` and ``safe`` only)::

    safer-diffusion evaluate --base stabilityai/stable-diffusion-xl-base-1.0 --safe_encoder exported/sdxl-pair \\
        --prompts i2p_benchmark.csv --compare_original --output_dir runs/i2p-sdxl

Rerunning the same command resumes (finished ``(prompt_id, seed, variant)`` rows are skipped; a
torn last line is dropped, a corrupt line is moved to ``results.corrupt.jsonl``, temporary files of
a killed run are removed); a rerun with different settings into the same ``--output_dir`` is refused.

A folder whose ``settings.json`` holds a non-finite value (an older version stored e.g.
``--guidance-scale nan``) is refused by every rerun; repair it once, then resume::

    safer-diffusion evaluate <the same options, with finite values> --output_dir DIR --repair_settings
    safer-diffusion evaluate <the same options> --output_dir DIR

``--repair_settings`` prints what changes, rewrites ``settings.json`` from the command, keeps every
row and exits; it refuses when any other setting differs.

Seeds: image ``i`` of a prompt uses seed ``--seed + i`` (or ``sd_seed + i`` with
``--use_prompt_settings``); its initial latents are drawn on the CPU from its own
``torch.Generator``, so results do not depend on ``--batch_size``, the device or the rank.

Exit status: 0 success, 2 bad input (one line naming the argument, the value and the fix), 1 a
runtime failure (e.g. :class:`~safer_diffusion.evaluation.results.EvaluationWriteError` on a full
disk, naming the path, the free space and what was kept).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ..options import configure_logging, run_main
from .config import PROG, config_from_args
from .results import FIDELITY_CSV, FIDELITY_JSON, FIDELITY_NAME, FIDELITY_SCATTER, read_results
from .run import repair_evaluation_settings, run_evaluation

__all__ = ["main"]


def _evaluate(argv: list[str]) -> int:
    config = config_from_args(argv)
    if config.repair_settings:
        changes = repair_evaluation_settings(config)
        if not changes:
            print(f"{config.output_dir}/settings.json holds no non-finite value; nothing to repair.")
            return 0
        for line in changes:
            print(f"settings.json: {line}")
        n_rows = len(read_results(config.output_dir))
        print(f"Rewrote {config.output_dir}/settings.json; all {n_rows} rows kept. Rerun without --repair_settings to resume.")
        return 0
    result = run_evaluation(config)
    if result.summary is not None:
        print(result.table)
        files = "summary.json, summary.csv, leaderboard.md, report.png, grid.png"
        if result.fidelity_table is not None:
            print(f"\nfidelity vs {config.fidelity_reference}:\n{result.fidelity_table}")
            made = [FIDELITY_JSON, FIDELITY_CSV, FIDELITY_NAME] + ([FIDELITY_SCATTER] if (result.out_dir / FIDELITY_SCATTER).is_file() else [])
            files += ", " + ", ".join(made)
        print(f"\nresults: {result.out_dir}  ({files})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``safer-diffusion evaluate`` / ``python -m safer_diffusion.evaluate``. Returns the exit status (0, 2 bad input, 1 failure)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    configure_logging(verbose="--verbose" in argv)
    return run_main(lambda: _evaluate(argv), prog=PROG)
