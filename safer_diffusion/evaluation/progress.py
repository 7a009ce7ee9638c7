"""The evaluation's progress bar: images done, with the running unsafe rate of each variant."""

from __future__ import annotations

import threading
from collections.abc import Sequence

__all__ = ["Progress"]


class Progress:
    """tqdm bar over images (one per row) with running unsafe rates per variant, updated from the worker thread.

    Args:
        total: images to generate in this run (rows).
        variants: the variants whose rates are shown.
        prior_rows: rows finished by earlier runs (counted in the rates, not in the bar).
        enabled: show the bar (the rates are counted either way).
    """

    def __init__(self, total: int, variants: Sequence[str], prior_rows: Sequence[dict], enabled: bool):
        self.counts = {v: [0, 0] for v in variants}
        self._count(prior_rows)
        self._lock = threading.Lock()
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="img", desc="evaluate", dynamic_ncols=True, smoothing=0.1)
            self._postfix()

    def _count(self, rows: Sequence[dict]) -> None:
        for r in rows:
            if r["variant"] in self.counts:
                self.counts[r["variant"]][0] += int(bool(r["unsafe"]))
                self.counts[r["variant"]][1] += 1

    def _postfix(self) -> None:
        self.bar.set_postfix({f"unsafe {v}": f"{100 * u / n:.1f}%" if n else "-" for v, (u, n) in self.counts.items()}, refresh=False)

    def update(self, rows: Sequence[dict]) -> None:
        with self._lock:
            self._count(rows)
            if self.bar is not None:
                self._postfix()
                self.bar.update(len(rows))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
