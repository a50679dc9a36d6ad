"""Lazy CUDA graph capture: one background thread captures the sizes while the rank serves.

With `cudagraph_capture="lazy"` a `KilnModel` is ready as soon as its pieces are compiled or
loaded. This module owns the thread that then captures one size after another, in the order of
expected use (`CompilationConfig.lazy_capture_order`: the given order, then smallest first),
and the record of when each size was captured. What one capture does (warm-ups, piecewise and
full graphs, publishing them) is `LazyGraphs._capture_size_lazily` (lazy_graphs.py); the
soundness argument (streams, buffers, the memory pool, publication) is written there.

The contract, from the main thread's side:
- no call ever waits for a capture: dispatch reads only what has been published (an immutable
  set of sizes, dict entries assigned once a graph is complete and synchronised) and runs the
  compiled pieces without graphs for any size not published yet;
- an exception while capturing a size is recorded (`SizeCapture.error`, the record's warnings,
  the report) and leaves that size running without graphs; the thread goes on with the next
  size and never raises into the main thread;
- `close()` (also run at interpreter exit, and when the KilnModel is collected) sets a stop
  flag that the thread checks between sizes, then joins it with a timeout; a capture already
  under way finishes first (a stream capture must end on the thread that began it).

The thread holds its KilnModel only weakly between sizes, so dropping the last reference to a
KilnModel stops its capture thread instead of keeping the model alive.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger("kiln.runner")

_LIVE: weakref.WeakSet[LazyCapture] = weakref.WeakSet()


@dataclass
class SizeCapture:
    """When one size was captured, relative to the moment the rank became ready."""

    size: int
    start: float = 0.0
    """Wall-clock seconds since the epoch (0 while pending)."""
    end: float = 0.0
    seconds: float = 0.0
    after_ready_s: float = 0.0
    """end - ready: how long after the rank was ready this size ran on graphs."""
    state: str = "pending"
    """pending, capturing, captured, failed, skipped (the thread was stopped first)."""
    error: str | None = None


class LazyCapture:
    """Captures `order` in a daemon thread through `capture_one(size)` (held as a weak method)."""

    def __init__(self, order: list[int], capture_one: Callable[[int], None], *, ready_at: float,
                 on_error: Callable[[int, str], None] | None = None, name: str = "kiln-lazy-capture"):
        self.order = list(order)
        self.ready_at = ready_at
        self.sizes = {size: SizeCapture(size) for size in self.order}
        self._capture_one = _weak(capture_one)
        self._on_error = _weak(on_error) if on_error is not None else None
        self._stop = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        _LIVE.add(self)

    # ---- the thread ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            for size in self.order:
                entry = self.sizes[size]
                fn = self._capture_one()
                if self._stop.is_set() or fn is None:
                    break
                entry.state, entry.start = "capturing", time.time()
                t0 = time.perf_counter()
                try:
                    fn(size)
                except BaseException as exc:  # noqa: BLE001 - recorded, never raised into the main thread
                    entry.state, entry.error = "failed", f"{type(exc).__name__}: {exc}"
                    log.warning("lazy capture of size %d failed; it runs without graphs: %s\n%s",
                                size, entry.error, traceback.format_exc())
                    on_error = self._on_error() if self._on_error is not None else None
                    if on_error is not None:
                        on_error(size, entry.error)
                    del on_error
                else:
                    entry.state = "captured"
                finally:
                    del fn
                    entry.seconds = time.perf_counter() - t0
                    entry.end = entry.start + entry.seconds
                    entry.after_ready_s = entry.end - self.ready_at
                time.sleep(0)  # let the main thread have the GIL between sizes
            for entry in self.sizes.values():
                if entry.state == "pending":
                    entry.state = "skipped"
        finally:
            self._done.set()

    # ---- the owner's side --------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every size is done (captured or failed); True if so. For tests and
        callers that choose to wait; kiln's dispatch never calls it."""
        return self._done.wait(timeout)

    def close(self, timeout: float = 30.0) -> bool:
        """Stop after the size being captured and join the thread; True if it ended in time."""
        self._stop.set()
        if threading.current_thread() is self._thread or not self._thread.is_alive():
            return not self._thread.is_alive() or threading.current_thread() is self._thread
        self._thread.join(timeout)
        if self._thread.is_alive() and timeout > 0:
            log.warning("lazy capture thread still running %.0f s after close()", timeout)
        return not self._thread.is_alive()

    def summary(self) -> dict[str, Any]:
        """A JSON-able snapshot: counts, and per size its state and timings (for the report)."""
        entries = [asdict(self.sizes[size]) for size in self.order]
        captured = [e for e in entries if e["state"] == "captured"]
        return {
            "capture": "lazy",
            "order": list(self.order),
            "sizes": len(entries),
            "captured": len(captured),
            "failed": {e["size"]: e["error"] for e in entries if e["state"] == "failed"},
            "done": self._done.is_set(),
            "ready_at": self.ready_at,
            "last_after_ready_s": max((e["after_ready_s"] for e in captured), default=None),
            "per_size": entries,
        }


def _weak(fn: Callable[..., Any]) -> Callable[[], Callable[..., Any] | None]:
    """A bound method held weakly (the thread must not keep its KilnModel alive); a plain
    function as is."""
    if hasattr(fn, "__self__"):
        return weakref.WeakMethod(fn)  # type: ignore[arg-type]
    return lambda: fn


@atexit.register
def _close_all() -> None:
    # Daemon threads are killed at interpreter teardown; a thread killed in the middle of a
    # stream capture can leave the device in an error state. End them between two sizes first.
    for capture in list(_LIVE):
        capture.close(timeout=10.0)
