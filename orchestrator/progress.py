"""Per-rank progress on the driver's terminal while workers compile.

On a terminal, rich draws one live bar per rank (pieces and sizes done of the total, and what the
rank is on); elsewhere (CI logs, `ray job` logs) a plain line is printed when a rank moves on, at
most every few seconds per rank, so logs stay short.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

QUIET_LOG_S = 5.0
"""In non-terminal logs, the least time between two lines of one rank (unless it finished)."""


class ProgressView:
    def __init__(self, ranks: int, stream: TextIO | None = None, enabled: bool = True):
        self.ranks = ranks
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last: dict[int, tuple[Any, float]] = {}
        self._bars: Any = None
        self._tasks: dict[int, Any] = {}

    # ---- terminal: rich -------------------------------------------------------------------------

    def _start_bars(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self._bars = Progress(TextColumn("rank {task.fields[rank]}"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("{task.description}"), console=Console(file=self.stream),
                              transient=False, auto_refresh=False)
        self._bars.start()
        self._tasks = {r: self._bars.add_task("starting", total=None, rank=r) for r in range(self.ranks)}

    def _draw(self, snapshot: dict[int, dict[str, Any]]) -> None:
        if self._bars is None:
            self._start_bars()
        for rank, state in snapshot.items():
            task = self._tasks.get(rank)
            if task is not None:
                self._bars.update(task, description=state["what"], completed=state["done"],
                                  total=state["total"] or None)
        self._bars.refresh()

    # ---- logs: plain lines ----------------------------------------------------------------------

    def _line(self, rank: int, state: dict[str, Any]) -> str:
        done, total = state["done"], state["total"]
        count = f"{done}/{total} " if total else ""
        return f"rank {rank}: {count}{state['what']}"

    def _log(self, snapshot: dict[int, dict[str, Any]]) -> None:
        now = time.monotonic()
        for rank, state in sorted(snapshot.items()):
            key = (state["done"], state["total"])
            last = self._last.get(rank)
            finished = state["total"] and state["done"] == state["total"]
            if last is None or (last[0] != key and (now - last[1] > QUIET_LOG_S or finished)):
                self._last[rank] = (key, now)
                print(self._line(rank, state), file=self.stream, flush=True)

    def show(self, snapshot: dict[int, dict[str, Any]]) -> None:
        """Show the latest state of every rank: {rank: {"what", "done", "total"}}."""
        if not self.enabled:
            return
        if self.tty:
            self._draw(snapshot)
        else:
            self._log(snapshot)

    def close(self) -> None:
        if self._bars is not None:
            self._bars.stop()
            self._bars = None
