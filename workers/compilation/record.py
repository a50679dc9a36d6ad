"""Timings and counters of one worker's compile, as one JSON-serializable record.

Phases carry wall-clock start/end (time.time(), comparable across processes on one node) so the
driver can lay them out on a timeline; counters say what the cache did.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any


@dataclass
class Phase:
    name: str
    """e.g. "dynamo_trace", "split", "compile piece 2 size sym", "load piece 2 size 8", "capture"."""
    kind: str
    """What the time went to: one of kiln.workers.protocol.PhaseKind (setup, build, trace,
    compile, load, wait, capture, run, other)."""
    start: float
    """Wall-clock seconds since the epoch."""
    end: float
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)
    """Phase-specific facts: hit/miss, bytes, graph key, GiB captured, …"""


@dataclass
class CompileRecord:
    phases: list[Phase] = field(default_factory=list)
    pieces_total: int = 0
    pieces_splitting: int = 0
    pieces_compiled: int = 0
    """Non-splitting pieces (compiled by Inductor or loaded from the cache)."""
    unique_pieces: int = 0
    """Distinct structural hashes among the compiled pieces."""
    inductor_compiles: int = 0
    """Graphs this process compiled with Inductor (per piece and size)."""
    cache_hits: int = 0
    cache_misses: int = 0
    artifacts_saved: int = 0
    artifacts_loaded: int = 0
    bytes_saved: int = 0
    bytes_loaded: int = 0
    memory_dedup_hits: int = 0
    """(piece, size) served by an identical piece already compiled or loaded in this process."""
    trace_cache: str = ""
    """Whether Dynamo ran: "skipped (cached)", or "ran (why the cached trace did not serve)"."""
    autotune_benchmarks: int = 0
    """Times Inductor benchmarked candidates while this record's compile and first runs went on
    (Triton's runtime autotuner, coordinate descent, max-autotune's template choices): a warm
    start whose artifacts carry their tuning runs none."""
    traced_files: list[str] = field(default_factory=list)
    config_hash: str = ""
    cache_key: str = ""
    cache_dir: str = ""
    warnings: list[str] = field(default_factory=list)
    progress: Callable[[str, int, int], None] | None = field(default=None, repr=False, compare=False)
    """Optional callback (what, done, total) for live progress; not serialized."""
    fanout: Any = field(default=None, repr=False, compare=False)
    """Optional workers.fanout.FanoutClient: a miss asks the cluster before compiling; not serialized."""

    @contextlib.contextmanager
    def phase(self, name: str, kind: str, **extra: Any) -> Iterator[dict[str, Any]]:
        """Time a block as a phase of `kind`; the yielded dict lets the block add facts."""
        start = time.time()
        t0 = time.perf_counter()
        facts: dict[str, Any] = dict(extra)
        try:
            yield facts
        finally:
            seconds = time.perf_counter() - t0
            self.phases.append(Phase(name, kind, start, start + seconds, seconds, facts))

    def counters(self) -> dict[str, int]:
        """The integer counters, to restore after an abandoned attempt (a replay that missed)."""
        return {k: v for k, v in vars(self).items() if isinstance(v, int) and not isinstance(v, bool)}

    def restore_counters(self, saved: dict[str, int]) -> None:
        for key, value in saved.items():
            setattr(self, key, value)

    def seconds(self, prefix: str) -> float:
        return sum(p.seconds for p in self.phases if p.name.startswith(prefix))

    def to_dict(self) -> dict[str, Any]:
        # The hooks are left out before asdict, which would deep-copy them (a Ray actor handle).
        out = asdict(replace(self, progress=None, fanout=None))
        out.pop("progress", None)
        out.pop("fanout", None)
        return out
