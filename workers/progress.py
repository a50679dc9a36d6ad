"""Live progress from workers to the driver: a tiny board the driver runs as a Ray actor.

Workers post (rank, what, done, total) fire-and-forget; the driver polls `snapshot()` while it
waits for the warm-up and redraws one line per rank. Plain class: the driver wraps it with
ray.remote, so workers/ imports no Ray here.
"""

from __future__ import annotations

import time
from typing import Any


class ProgressBoard:
    def __init__(self) -> None:
        self.state: dict[int, dict[str, Any]] = {}

    def update(self, rank: int, what: str, done: int, total: int) -> None:
        self.state[rank] = {"what": what, "done": done, "total": total, "at": time.time()}

    def snapshot(self) -> dict[int, dict[str, Any]]:
        return dict(self.state)
