"""``safer-diffusion summarize RUN_DIR [RUN_DIR ...] --protocol NAME``: recompute an evaluation's summary from its
``results.jsonl`` alone, under any protocol whose scorers the run stored.

    python -m safer_diffusion.evaluation.summarize runs/i2p --protocol nudity-0.45
    python -m safer_diffusion.evaluation.summarize runs/i2p runs/mma --protocol nudity-0.45 --output_dir runs/board

Each run gets ``summary.<protocol>.json`` / ``.csv`` and ``report.<protocol>.png`` (``summary.json``
for the protocol it was generated under) and its ``leaderboard.md`` / ``.csv`` rewritten, one table
per protocol computed so far. With ``--output_dir``, a leaderboard of all the runs (variants x
suites) is written there too. Nothing is generated or scored again.

Exit status: 0 success, 2 bad input (a folder without results, a protocol needing a scorer the
run did not store, a ``--reference`` that is not a variant), 1 a runtime failure.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..fileio import check_writable_dir
from ..options import MISSING, BadInputError, configure_logging, option, parse_config, run_main
from .leaderboard import write_leaderboard
from .protocols import AS_RUN, PROTOCOLS, as_run_protocol, get_protocol
from .results import read_results, results_files
from .summary import format_table, write_summary

__all__ = ["PROG", "SummarizeConfig", "main", "summarize_runs"]

PROG = "safer-diffusion summarize"
DESCRIPTION = "Recompute evaluation summaries from results.jsonl under a protocol, and the leaderboard."


@dataclass
class SummarizeConfig:
    """The options of ``safer-diffusion summarize``."""

    run_dirs: list[str] = option(MISSING, "Evaluation output folders (each with results.jsonl).", positional=True, metavar="RUN_DIR")
    protocol: str | None = option(None, "Protocol to apply to the stored scores (default: the one each run was generated under).",
                                  choices=(*PROTOCOLS, AS_RUN))  # fmt: skip
    reference: str | None = option(None, "Variant the paired differences are taken against (default: original when present).")
    bootstrap: int = option(1000, "Bootstrap resamples for the 95%% CIs (0: none).", bounds=(0, None))
    output_dir: str | None = option(None, "Also write a leaderboard of all the runs here.", metavar="DIR")
    plot: bool = option(True, "Write the report plot of each summary.")
    verbose: bool = option(False, "Log at INFO level (to stderr).")

    def validate(self) -> None:
        for run in self.run_dirs:
            if not Path(run).expanduser().is_dir():
                raise FileNotFoundError(f"`RUN_DIR` {run!r} is not a folder; pass an evaluation's `--output_dir`.")
            if not results_files(Path(run).expanduser()):
                raise BadInputError(f"`RUN_DIR` {run!r} holds no results.jsonl; pass the `--output_dir` of an evaluation that ran.")
        if self.output_dir is not None:
            check_writable_dir(self.output_dir, "--output_dir")


def summarize_runs(config: SummarizeConfig) -> list[dict]:
    """Recompute and write each run's summary under ``config.protocol``; returns the summaries.

    Raises:
        ProtocolError: the protocol needs a scorer a run did not store (nothing is written for that run).
        ValueError: ``--reference`` is not among a run's variants.
    """
    rule = get_protocol(config.protocol) if config.protocol not in (None, AS_RUN) else None
    summaries = []
    for run in config.run_dirs:
        out = Path(run).expanduser()
        rows = read_results(out)
        if not rows:
            raise BadInputError(f"`RUN_DIR` {run!r}: results.jsonl holds no rows yet; run the evaluation first.")
        if config.protocol == AS_RUN:
            rule = as_run_protocol(sorted({n for r in rows for n in (r.get("scores") or {})}))
        summaries.append(write_summary(out, rows, n_bootstrap=config.bootstrap, plot=config.plot, rule=rule, reference=config.reference))
        write_leaderboard(out)
    if config.output_dir is not None:
        write_leaderboard(Path(config.output_dir).expanduser(), [Path(r).expanduser() for r in config.run_dirs])
    return summaries


def _summarize(argv: list[str]) -> int:
    config = parse_config(SummarizeConfig, argv, prog=PROG, description=DESCRIPTION)
    for run, summary in zip(config.run_dirs, summarize_runs(config)):
        print(f"== {run} ({summary['suite']})")
        print(format_table(summary))
        print()
    where = [*config.run_dirs, *([config.output_dir] if config.output_dir else [])]
    print("leaderboard: " + ", ".join(str(Path(w) / "leaderboard.md") for w in where))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``safer-diffusion summarize`` / ``python -m safer_diffusion.evaluation.summarize``. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    configure_logging(verbose="--verbose" in argv)
    return run_main(lambda: _summarize(argv), prog=PROG)


if __name__ == "__main__":
    raise SystemExit(main())
