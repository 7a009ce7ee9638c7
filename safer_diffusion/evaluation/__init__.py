"""The NSFW generation-rate evaluation: prompt readers, the append-only results store, the summary.

The entry point is :mod:`safer_diffusion.evaluate` (``safer-diffusion evaluate``). The pieces here
can be used alone:

* :func:`~safer_diffusion.evaluation.prompts.load_prompts` reads I2P CSV, NSFWCaps, ViSU, JSONL
  and plain-text prompt files into :class:`~safer_diffusion.evaluation.prompts.PromptRecord` s.
* :class:`~safer_diffusion.evaluation.results.ResultsWriter` appends one JSON row per image with
  flush + fsync; :func:`~safer_diffusion.evaluation.results.read_results` reads them back
  (tolerating a torn last line) for resuming and summarising.
* :func:`~safer_diffusion.evaluation.summary.summarize` turns rows into per-category unsafe rates
  with bootstrap confidence intervals; :func:`~safer_diffusion.evaluation.summary.write_summary`
  writes ``summary.json``, ``summary.csv`` and ``report.png``.

Importing this package imports nothing heavy.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "PromptRecord": "safer_diffusion.evaluation.prompts",
    "load_prompts": "safer_diffusion.evaluation.prompts",
    "ResultsWriter": "safer_diffusion.evaluation.results",
    "SettingsMismatchError": "safer_diffusion.evaluation.results",
    "read_results": "safer_diffusion.evaluation.results",
    "summarize": "safer_diffusion.evaluation.summary",
    "write_summary": "safer_diffusion.evaluation.summary",
    "format_table": "safer_diffusion.evaluation.summary",
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
