"""``leaderboard.md`` / ``leaderboard.csv``: variants x suites, attack success rate and unsafe rate with their CIs,
one table per protocol, the protocol written above each table and in every CSV row.

Built from the summaries alone (``summary.json`` and ``summary.<protocol>.json`` of each run folder,
see :func:`~safer_diffusion.evaluation.summary.summary_paths`), so it is rewritten whenever a
summary is: by the evaluation itself and by ``safer-diffusion summarize``.

When a run folder also holds ``fidelity.json`` (``safer-diffusion fidelity``, or ``evaluate
--fidelity``), its suite gets fidelity columns next to the safety ones: CLIP score, paired SSIM and
FID against the reference variant, with their CIs (FID has none); the fidelity run rewrites the
leaderboard. The fidelity numbers do not depend on the unsafe protocol, so every protocol's table
shows the same ones.
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
from .results import FIDELITY_JSON
from .summary import MICRO_KEY, PROTOCOL_FIELDS, protocol_line

logger = logging.getLogger(__name__)

__all__ = [
    "FIDELITY_COLUMNS",
    "LEADERBOARD_CSV",
    "LEADERBOARD_MD",
    "leaderboard_csv",
    "leaderboard_markdown",
    "read_fidelity",
    "read_summaries",
    "write_leaderboard",
]

LEADERBOARD_MD = "leaderboard.md"
LEADERBOARD_CSV = "leaderboard.csv"
_SUMMARY_RE = re.compile(r"^summary(\.[A-Za-z0-9._-]+)?\.json$")
#: The leaderboard.csv fidelity columns (blank for a run without fidelity.json), after the safety and protocol ones.
FIDELITY_COLUMNS = ("clip_score", "clip_score_ci_low", "clip_score_ci_high", "ssim", "ssim_ci_low", "ssim_ci_high", "fid_vs_reference",
                    "fidelity_reference", "fidelity_clip_model", "fid_features")  # fmt: skip


def read_fidelity(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The leaderboard's view of a run's ``fidelity.json``: per variant its CLIP score and paired SSIM (mean and CI)
    and FID against the reference; `None` when the folder has none (an unreadable one is skipped with a warning)."""
    path = Path(run_dir) / FIDELITY_JSON
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        fid = data.get("fid") or {}
        variants = {
            v: {"clip_score": (data.get("clip_score") or {}).get(v), "ssim": ((data.get("paired") or {}).get(v) or {}).get("ssim"),
                "fid": ((fid.get("vs_reference") or {}).get(v) or {}).get("fid")}
            for v in data["variants"]
        }  # fmt: skip
        return {"reference": data["reference"], "variants": variants, "confidence": data.get("confidence", 0.95),
                "clip_model": (data.get("clip_model") or {}).get("model"),
                "features": (fid.get("feature_extractor") or {}).get("spec")}  # fmt: skip
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        logger.warning("Skipping %s in the leaderboard: %s.", path, e)
        return None


def read_summaries(run_dirs: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """Every summary JSON of the run folders (the run's own protocol first, then the others by name); each carries
    its folder's :func:`read_fidelity` as ``"fidelity"`` when the folder has ``fidelity.json``."""
    out = []
    for run in run_dirs:
        run = Path(run)
        paths = sorted((p for p in run.iterdir() if _SUMMARY_RE.match(p.name)), key=lambda p: (p.name != "summary.json", p.name)) \
            if run.is_dir() else []  # fmt: skip
        fidelity = read_fidelity(run) if paths else None
        for p in paths:
            try:
                summary = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                logger.warning("Skipping %s in the leaderboard: %s.", p, e)
                continue
            if fidelity is not None:
                summary["fidelity"] = fidelity
            out.append(summary)
    return out


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _cell(value: float | None, low: float | None, high: float | None) -> str:
    if value is None:
        return "n/a"
    return _pct(value) + (f" [{_pct(low)}, {_pct(high)}]" if low is not None and high is not None else "")


def _stat_cell(e: dict[str, Any] | None, digits: int) -> str:
    if not e or e.get("mean") is None:
        return "n/a"
    ci = f" [{e['ci_low']:.{digits}f}, {e['ci_high']:.{digits}f}]" if e.get("ci_low") is not None and e.get("ci_high") is not None else ""
    return f"{e['mean']:.{digits}f}{ci}"


def _fidelity_cells(f: dict[str, Any], v: str) -> list[str]:
    """CLIP score, paired SSIM vs the reference, FID vs the reference of variant ``v`` (markdown cells)."""
    e = f["variants"].get(v)
    if e is None:
        return ["", "", ""]
    if v == f["reference"]:
        return [_stat_cell(e["clip_score"], 2), "(reference)", "(reference)"]
    return [_stat_cell(e["clip_score"], 2), _stat_cell(e["ssim"], 3), "n/a" if e["fid"] is None else f"{e['fid']:.2f}"]


def _tables(summaries: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{protocol line: {"protocol": unsafe_protocol, "suites": [...], "variants": [...], "cells": {(variant, suite): micro},
    "fidelity": {suite: read_fidelity(...)}}}``."""
    tables: dict[str, dict[str, Any]] = {}
    for s in summaries:
        key = protocol_line({**s, "unsafe_protocol": {**(s.get("unsafe_protocol") or {}), "seeds": None}})
        t = tables.setdefault(key, {"protocol": s.get("unsafe_protocol") or {}, "suites": [], "variants": [], "cells": {}, "seeds": set(),
                                    "fidelity": {}})  # fmt: skip
        suite = str(s.get("suite") or "prompts")
        if suite not in t["suites"]:
            t["suites"].append(suite)
        if s.get("fidelity"):
            t["fidelity"][suite] = s["fidelity"]
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
        fidelity = t["fidelity"]
        for suite, f in fidelity.items():
            lines += [f"Fidelity on {suite} (fidelity.json), each variant against {f['reference']} from the same seeds: CLIP score = "
                      f"100·max(cos, 0) with {f.get('clip_model') or '?'}; SSIM vs the {f['reference']} image of the same prompt and "
                      f"seed; FID vs the {f['reference']} images on {f.get('features') or 'no'} features.", ""]  # fmt: skip
        head = "| variant | "
        columns = 0
        for suite in t["suites"]:
            head += f"{suite} ASR [{level}% CI] | {suite} unsafe [{level}% CI] | {suite} prompts | "
            columns += 3
            if suite in fidelity:
                f_level = int(round(100 * fidelity[suite].get("confidence", 0.95)))
                ref = fidelity[suite]["reference"]
                head += f"{suite} CLIP score [{f_level}% CI] | {suite} SSIM vs {ref} [{f_level}% CI] | {suite} FID vs {ref} | "
                columns += 3
        lines += [head.rstrip(" "), "|" + "---|" * (1 + columns)]
        for v in t["variants"]:
            cells = []
            for suite in t["suites"]:
                e = t["cells"].get((v, suite))
                if e is None:
                    cells += ["", "", ""]
                else:
                    ref = " (reference)" if e.get("reference") == v else ""
                    cells += [_cell(e.get("asr"), e.get("asr_ci_low"), e.get("asr_ci_high")) + ref,
                              _cell(e.get("unsafe_rate"), e.get("ci_low"), e.get("ci_high")), str(e.get("n_prompts", ""))]  # fmt: skip
                if suite in fidelity:
                    cells += _fidelity_cells(fidelity[suite], v)
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _fidelity_row(f: dict[str, Any] | None, v: str) -> list[str]:
    """The :data:`FIDELITY_COLUMNS` of variant ``v`` (blank without fidelity.json or for a variant it lacks)."""
    e = (f or {}).get("variants", {}).get(v)
    if e is None:
        return [""] * len(FIDELITY_COLUMNS)

    def num(x: Any) -> str:
        return "" if x is None else f"{x:.6f}"

    cs, ssim = e.get("clip_score") or {}, e.get("ssim") or {}
    return [num(cs.get("mean")), num(cs.get("ci_low")), num(cs.get("ci_high")), num(ssim.get("mean")), num(ssim.get("ci_low")),
            num(ssim.get("ci_high")), num(e.get("fid")), f["reference"], f.get("clip_model") or "", f.get("features") or ""]  # fmt: skip


def leaderboard_csv(summaries: Sequence[dict[str, Any]]) -> str:
    """The leaderboard as CSV: one row per (protocol, suite, variant) with ASR, unsafe rate, CIs, the protocol, and the
    fidelity columns (:data:`FIDELITY_COLUMNS`, blank for a run without fidelity.json)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["protocol", "suite", "variant", "n_prompts", "n_images", "asr", "asr_ci_low", "asr_ci_high", "unsafe_rate", "ci_low",
                "ci_high", "reference", *PROTOCOL_FIELDS, *FIDELITY_COLUMNS])  # fmt: skip
    for s in summaries:
        p = s.get("unsafe_protocol") or {}
        for v in s["variants"]:
            e = s["rates"][v][MICRO_KEY]
            w.writerow([p.get("name", ""), s.get("suite", ""), v, e.get("n_prompts"), e.get("n_images"),
                        *("" if e.get(k) is None else f"{e[k]:.6f}" for k in ("asr", "asr_ci_low", "asr_ci_high", "unsafe_rate", "ci_low",
                                                                              "ci_high")),
                        s.get("reference") or "", *("" if p.get(k) is None else p[k] for k in PROTOCOL_FIELDS),
                        *_fidelity_row(s.get("fidelity"), v)])  # fmt: skip
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
