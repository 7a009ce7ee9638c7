"""The NSFW generation-rate evaluation (``safer-diffusion evaluate``), one module per concept.

* :mod:`~safer_diffusion.evaluation.config`: :class:`EvaluateConfig`, every option, its default and checks.
* :mod:`~safer_diffusion.evaluation.prompts`: :func:`load_prompts` reads I2P CSV, NSFWCaps, ViSU,
  JSONL and plain-text prompt files into :class:`PromptRecord` s.
* :mod:`~safer_diffusion.evaluation.plan`: work items (prompt, image index, seed), rank sharding, batches.
* :mod:`~safer_diffusion.evaluation.generate`: which models to load, loading them, generating a batch.
* :mod:`~safer_diffusion.evaluation.worker`: the scorers and the background scoring thread.
* :mod:`~safer_diffusion.evaluation.results`: the append-only ``results.jsonl`` store (crash repair,
  corrupt lines, temporary files, :class:`EvaluationWriteError`).
* :mod:`~safer_diffusion.evaluation.settings`: ``settings.json``, compared on every rerun; ``--repair_settings``.
* :mod:`~safer_diffusion.evaluation.suites`: the standard prompt suites (``--suite``).
* :mod:`~safer_diffusion.evaluation.protocols`: unsafe-image protocols applied to stored scores (``--protocol``).
* :mod:`~safer_diffusion.evaluation.summary`: unsafe rates and ASR with bootstrap CIs, paired differences,
  ``summary.json``/``.csv``, ``report.png``, ``grid.png``.
* :mod:`~safer_diffusion.evaluation.leaderboard`: ``leaderboard.md``/``.csv`` (variants x suites, one table per protocol).
* :mod:`~safer_diffusion.evaluation.summarize`: ``safer-diffusion summarize RUN --protocol NAME``.
* :mod:`~safer_diffusion.evaluation.fidelity`: image-fidelity metrics (SSIM, PSNR, CLIP score, LPIPS, FID/KID,
  encoder drift) on images or features in memory.
* :mod:`~safer_diffusion.evaluation.fidelity_run`: ``safer-diffusion fidelity`` (and ``evaluate --fidelity``) over an
  evaluation folder: ``fidelity.jsonl``/``.json``/``.csv``, the safety-vs-fidelity scatter.
* :mod:`~safer_diffusion.evaluation.progress`: the progress bar.
* :mod:`~safer_diffusion.evaluation.run`: :func:`run_evaluation`, :class:`EvaluationResult`.
* :mod:`~safer_diffusion.evaluation.cli`: :func:`main` (``safer-diffusion evaluate``, ``python -m safer_diffusion.evaluate``).

Importing this package imports nothing heavy; the names below load their module on first use.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "EvaluateConfig": "safer_diffusion.evaluation.config",
    "config_from_args": "safer_diffusion.evaluation.config",
    "PromptRecord": "safer_diffusion.evaluation.prompts",
    "load_prompts": "safer_diffusion.evaluation.prompts",
    "PromptFile": "safer_diffusion.evaluation.prompts",
    "read_prompt_file": "safer_diffusion.evaluation.prompts",
    "SUITES": "safer_diffusion.evaluation.suites",
    "PROTOCOLS": "safer_diffusion.evaluation.protocols",
    "write_leaderboard": "safer_diffusion.evaluation.leaderboard",
    "WorkItem": "safer_diffusion.evaluation.plan",
    "EvaluationWriteError": "safer_diffusion.evaluation.results",
    "ResultsWriter": "safer_diffusion.evaluation.results",
    "read_results": "safer_diffusion.evaluation.results",
    "SettingsMismatchError": "safer_diffusion.evaluation.settings",
    "summarize_runs": "safer_diffusion.evaluation.summarize",
    "write_summary": "safer_diffusion.evaluation.summary",
    "format_table": "safer_diffusion.evaluation.summary",
    "EvaluationResult": "safer_diffusion.evaluation.run",
    "repair_evaluation_settings": "safer_diffusion.evaluation.run",
    "run_evaluation": "safer_diffusion.evaluation.run",
    "main": "safer_diffusion.evaluation.cli",
    # fidelity: the run over an evaluation folder, and the metrics
    "FidelityConfig": "safer_diffusion.evaluation.fidelity_run",
    "FidelityResult": "safer_diffusion.evaluation.fidelity_run",
    "run_fidelity": "safer_diffusion.evaluation.fidelity_run",
    "summarize_fidelity": "safer_diffusion.evaluation.fidelity_run",
    "load_run": "safer_diffusion.evaluation.fidelity_run",
    "plot_fidelity_scatter": "safer_diffusion.evaluation.fidelity_run",
    "ClipModel": "safer_diffusion.evaluation.fidelity",
    "encoder_drift": "safer_diffusion.evaluation.fidelity",
    "ssim": "safer_diffusion.evaluation.fidelity",
    "psnr_db": "safer_diffusion.evaluation.fidelity",
    "clip_score": "safer_diffusion.evaluation.fidelity",
    "fid_from_features": "safer_diffusion.evaluation.fidelity",
    "kid_from_features": "safer_diffusion.evaluation.fidelity",
    "build_feature_extractor": "safer_diffusion.evaluation.fidelity",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'safer_diffusion.evaluation' has no attribute {name!r}")


def __dir__():
    return __all__
