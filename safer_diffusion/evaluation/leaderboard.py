"""``leaderboard.md`` / ``leaderboard.csv``: variants x suites, attack success rate and unsafe rate with their CIs,
one table per protocol, the protocol written above each table and in every CSV row.

Built from the summaries alone (``summary.json`` and ``summary.<protocol>.json`` of each run folder,
see :func:`~safer_diffusion.evaluation.summary.summary_paths`), so it is rewritten whenever a
summary is: by the evaluation itself and by ``safer-diffusion summarize``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_text
from .summary import MICRO_KEY, PROTOCOL_FIELDS, protocol_line

logger = logging.getLogger(__name__)

__all__ = ["LEADERBOARD_CSV", "LEADERBOARD_MD", "leaderboard_csv", "leaderboard_markdown", "read_summaries", "write_leaderboard"]

LEADERBOARD_MD = "leaderboard.md"
LEADERBOARD_CSV = "leaderboard.csv"
_SUMMARY_RE = re.compile(r"^summary(\.[A-Za-z0-9._-]+)?\.json$")


def read_summaries(run_dirs: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """Every summary JSON of the run folders (the run's own protocol first, then the others by name)."""
    out = []
    for run in run_dirs:
        run = Path(run)
        paths = sorted((p for p in run.iterdir() if _SUMMARY_RE.match(p.name)), key=lambda p: (p.name != "summary.json", p.name)) \
            if run.is_dir() else []  # fmt: skip
        for p in paths:
            try:
                out.append(json.loads(p.read_text(encoding="utf-8")))
            except (OSError, json.JSONDecodeError) as e:
                logger.warning("Skipping %s in the leaderboard: %s.", p, e)
    return out


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _cell(value: float | None, low: float | None, high: float | None) -> str:
    if value is None:
        return "n/a"
    return _pct(value) + (f" [{_pct(low)}, {_pct(high)}]" if low is not None and high is not None else "")


def _tables(summaries: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{protocol line: {"protocol": unsafe_protocol, "suites": [...], "variants": [...], "cells": {(variant, suite): micro}}}``."""
    tables: dict[str, dict[str, Any]] = {}
    for s in summaries:
        key = protocol_line({**s, "unsafe_protocol": {**(s.get("unsafe_protocol") or {}), "seeds": None}})
        t = tables.setdefault(key, {"protocol": s.get("unsafe_protocol") or {}, "suites": [], "variants": [], "cells": {}, "seeds": set()})
        suite = str(s.get("suite") or "prompts")
        if suite not in t["suites"]:
            t["suites"].append(suite)
        seeds = (s.get("unsafe_protocol") or {}).get("seeds")
        if seeds:
            t["seeds"].add(str(seeds))
        for v in s["variants"]:
            if v not in t["variants"]:
                t["variants"].append(v)
            t["cells"][(v, suite)] = {**s["rates"][v][MICRO_KEY], "reference": s.get("reference"),
                                      "confidence": s.get("confidence", 0.95)}  # fmt: skip
    return tables


def leaderboard_markdown(summaries: Sequence[dict[str, Any]]) -> str:
    """The leaderboard as Markdown: per protocol, a table of variants x suites with ASR and unsafe rate and their CIs."""
    lines = ["# Leaderboard", "",
             "ASR: share of prompts with at least one unsafe image. Unsafe: share of unsafe images. "
             "Brackets: percentile bootstrap CI over prompts (paired across variants).", ""]  # fmt: skip
    for key, t in _tables(summaries).items():
        p = t["protocol"]
        level = int(round(100 * next(iter(t["cells"].values()), {}).get("confidence", 0.95)))
        lines += [f"## {p.get('name', '?')}", "", f"Protocol: {key}" + (f" · seeds {'; '.join(sorted(t['seeds']))}" if t["seeds"] else ""), ""]
        head = "| variant | " + " | ".join(f"{suite} ASR [{level}% CI] | {suite} unsafe [{level}% CI] | {suite} prompts" for suite in t["suites"]) + " |"
        lines += [head, "|" + "---|" * (1 + 3 * len(t["suites"]))]
        for v in t["variants"]:
            cells = []
            for suite in t["suites"]:
                e = t["cells"].get((v, suite))
                if e is None:
                    cells += ["", "", ""]
                    continue
                ref = " (reference)" if e.get("reference") == v else ""
                cells += [_cell(e.get("asr"), e.get("asr_ci_low"), e.get("asr_ci_high")) + ref,
                          _cell(e.get("unsafe_rate"), e.get("ci_low"), e.get("ci_high")), str(e.get("n_prompts", ""))]  # fmt: skip
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def leaderboard_csv(summaries: Sequence[dict[str, Any]]) -> str:
    """The leaderboard as CSV: one row per (protocol, suite, variant) with ASR, unsafe rate, CIs and the protocol."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["protocol", "suite", "variant", "n_prompts", "n_images", "asr", "asr_ci_low", "asr_ci_high", "unsafe_rate", "ci_low",
                "ci_high", "reference", *PROTOCOL_FIELDS])  # fmt: skip
    for s in summaries:
        p = s.get("unsafe_protocol") or {}
        for v in s["variants"]:
            e = s["rates"][v][MICRO_KEY]
            w.writerow([p.get("name", ""), s.get("suite", ""), v, e.get("n_prompts"), e.get("n_images"),
                        *("" if e.get(k) is None else f"{e[k]:.6f}" for k in ("asr", "asr_ci_low", "asr_ci_high", "unsafe_rate", "ci_low",
                                                                              "ci_high")),
                        s.get("reference") or "", *("" if p.get(k) is None else p[k] for k in PROTOCOL_FIELDS)])  # fmt: skip
    return buf.getvalue()


def write_leaderboard(out_dir: str | os.PathLike, run_dirs: Sequence[str | os.PathLike] | None = None) -> tuple[Path, Path] | None:
    """Write ``leaderboard.md`` and ``leaderboard.csv`` into ``out_dir`` from the summaries of ``run_dirs``
    (default: ``out_dir`` itself). Returns their paths, or `None` when there is no summary."""
    out_dir = Path(out_dir)
    summaries = read_summaries(run_dirs if run_dirs is not None else [out_dir])
    if not summaries:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    md, table = out_dir / LEADERBOARD_MD, out_dir / LEADERBOARD_CSV
    atomic_write_text(md, leaderboard_markdown(summaries))
    atomic_write_text(table, leaderboard_csv(summaries))
    return md, table
