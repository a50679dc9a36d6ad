"""Per-rank progress on the driver's terminal while workers compile.

On a terminal, one line per rank is redrawn in place; elsewhere (CI logs, `ray job` logs) a
line is printed when a rank moves on, at most every few seconds per rank.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class ProgressView:
    def __init__(self, ranks: int, stream: TextIO | None = None, enabled: bool = True):
        self.ranks = ranks
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._drawn = 0
        self._last: dict[int, tuple[Any, float]] = {}

    def _line(self, rank: int, state: dict[str, Any] | None) -> str:
        if not state:
            return f"rank {rank}: starting"
        done, total = state["done"], state["total"]
        bar = ""
        if total:
            filled = int(20 * done / total)
            bar = f"[{'#' * filled}{'.' * (20 - filled)}] {done}/{total} "
        return f"rank {rank}: {bar}{state['what']}"

    def show(self, snapshot: dict[int, dict[str, Any]]) -> None:
        if not self.enabled:
            return
        if self.tty:
            if self._drawn:
                self.stream.write(f"\x1b[{self._drawn}F")
            for rank in range(self.ranks):
                self.stream.write("\x1b[2K" + self._line(rank, snapshot.get(rank)) + "\n")
            self._drawn = self.ranks
            self.stream.flush()
            return
        now = time.monotonic()
        for rank, state in sorted(snapshot.items()):
            key = (state["done"], state["total"])
            last = self._last.get(rank)
            finished = state["total"] and state["done"] == state["total"]
            if last is None or (last[0] != key and (now - last[1] > 5 or finished)):
                self._last[rank] = (key, now)
                print(self._line(rank, state), file=self.stream, flush=True)

    def close(self) -> None:
        self._drawn = 0
