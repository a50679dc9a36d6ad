"""The run report: per-rank worker reports merged into one record of where startup time went.

Workers each return a JSON-able dict (phases with start/end times, cache counters, errors). The
driver merges them into a `RunReport`, which renders three ways: a fixed-width table for the
terminal, a JSON file (loadable again with `RunReport.from_json`), and a Chrome-trace timeline
with one track per rank that Perfetto and chrome://tracing open (timeline.py).

Stdlib and kiln.cache's atomic writer only, on purpose: `kiln` subcommands that only read or
print reports must not pay for importing torch or ray.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from kiln.cache.atomic import atomic_write_bytes
from kiln.orchestrator.fanout import fanout_lines, fanout_summary
from kiln.orchestrator.timeline import chrome_trace, rank_number

# Counters summed over ranks by RunReport.totals(); a failed rank may lack any of them.
COUNTERS = (
    "inductor_compiles",
    "cache_hits",
    "cache_misses",
    "artifacts_saved",
    "artifacts_loaded",
    "bytes_saved",
    "bytes_loaded",
    "memory_dedup_hits",
    "autotune_benchmarks",
)

# What a phase's time went to; workers tag each phase with its kind (kiln.workers.protocol).
PHASE_KINDS = ("setup", "build", "trace", "compile", "load", "fetch", "wait", "capture", "run", "other")
# The kinds the per-rank table shows, each as a column of seconds.
TABLE_KINDS = ("build", "trace", "compile", "load", "capture")
REPORT_VERSION = 1
MIB = 1 << 20


def _rate(nbytes: int, seconds: float) -> str:
    """"6.20 MiB in 3.21 s, 1.93 MiB/s" (no rate for a zero time)."""
    text = f"{nbytes / MIB:.2f} MiB in {seconds:.2f} s"
    return text + (f", {nbytes / MIB / seconds:.2f} MiB/s" if seconds > 0 else "")


class ReportError(OSError):
    """A report file could not be written or read; the message names the path."""


def phase_kind(phase: dict) -> str:
    """A phase's kind (one of PHASE_KINDS) as its worker tagged it; "other" if it did not."""
    kind = phase.get("kind")
    return kind if kind in PHASE_KINDS else "other"


def phase_seconds(rank_report: dict, kind: str) -> float:
    """Total seconds a rank spent in phases of `kind` (one of PHASE_KINDS)."""
    if kind not in PHASE_KINDS:
        raise ValueError(f"unknown phase kind {kind!r}; expected one of {', '.join(PHASE_KINDS)}")
    return sum(_duration(p) for p in rank_report.get("phases") or () if phase_kind(p) == kind)


def _duration(phase: dict) -> float:
    """A phase's seconds, falling back to end - start when the worker did not record them."""
    seconds = phase.get("seconds")
    if seconds is None and phase.get("start") is not None and phase.get("end") is not None:
        seconds = phase["end"] - phase["start"]
    return float(seconds or 0.0)


def _normalize_rank(report: dict) -> dict:
    """A copy of a worker report with the keys every consumer reads filled in, so that a rank
    that died half-way renders like the others (zeros, no phases) instead of raising KeyError."""
    out = json.loads(json.dumps(report, default=str))  # deep copy that also proves JSON-ability
    for name in COUNTERS:
        out[name] = out.get(name) or 0
    out.setdefault("node", None)
    out.setdefault("error", None)
    out["phases"] = [_normalize_phase(p) for p in out.get("phases") or ()]
    out["warnings"] = list(out.get("warnings") or ())
    return out


def _normalize_phase(phase: dict) -> dict:
    """A phase with name/start/end/seconds/extra all present (end and seconds derived if absent)."""
    start, end = phase.get("start"), phase.get("end")
    seconds = _duration(phase)
    if end is None and start is not None:
        end = start + seconds
    return {"name": str(phase.get("name", "?")), "kind": phase_kind(phase), "start": start, "end": end,
            "seconds": seconds, "extra": dict(phase.get("extra") or {})}


def _failure_from_error(rank: int | None, error: dict) -> dict:
    """The failures-list entry for a worker's `error` field."""
    kind, message = error.get("type") or "Error", error.get("message")
    cause = f"{kind}: {message}" if message else kind
    return {"rank": rank, "phase": error.get("phase"), "cause": cause}


def _failure_sort_key(f: dict) -> tuple:
    # Attempts in order, the final one's (no "retried") last; within one, driver-level failures
    # (rank None) go last; str() keeps None phases comparable.
    return (not f.get("retried"), f.get("attempt") or 0, f.get("rank") is None, f.get("rank") or 0,
            str(f.get("phase")), str(f.get("cause")))


def _common_cache_key(ranks: list[dict]) -> str:
    """The ranks' shared cache key, "mixed" if they disagree, "" if none reported one. Ranks that
    died before computing a key do not count as disagreeing."""
    keys = {r["cache_key"] for r in ranks if r.get("cache_key")}
    if len(keys) > 1:
        return "mixed"
    return keys.pop() if keys else ""


@dataclass
class RunReport:
    """One warm-up run: driver-side facts plus every rank's worker report (sorted by rank)."""

    config_hash: str
    cache_key: str
    cache_root: str
    model: str
    tp_size: int
    sizes: list[int]
    wall_seconds: float
    orchestration: dict[str, float]
    ranks: list[dict]
    failures: list[dict] = field(default_factory=list)
    started_at: float = 0.0

    phase_seconds = staticmethod(phase_seconds)

    @classmethod
    def merge(cls, worker_reports: Iterable[dict], *, config_hash: str, cache_root: str, model: str,
              tp_size: int, sizes: Iterable[int], wall_seconds: float, orchestration: dict[str, float],
              started_at: float, failures: Iterable[dict] = ()) -> RunReport:
        """Merge the workers' reports. `failures` adds what no worker could report itself (an
        actor that died, a timeout); each worker's own `error` is added here, duplicates dropped.
        A failure with "retried": true belongs to an earlier attempt (number "attempt") that a
        retry made good: it is on record but does not make the report fail."""
        ranks = sorted((_normalize_rank(r) for r in worker_reports), key=rank_number)
        found = [_failure_from_error(r.get("rank"), r["error"]) for r in ranks if r["error"]]
        # One entry per (rank, phase, cause, attempt); a duplicate's extra keys (a traceback) are kept.
        unique: dict[tuple, dict] = {}
        for f in [*found, *failures]:
            key = (f.get("rank"), str(f.get("phase")), str(f.get("cause")), f.get("attempt"))
            unique.setdefault(key, {}).update(f)
        return cls(
            config_hash=config_hash,
            cache_key=_common_cache_key(ranks),
            cache_root=str(cache_root),
            model=model,
            tp_size=int(tp_size),
            sizes=sorted(int(s) for s in sizes),
            wall_seconds=float(wall_seconds),
            # Insertion order kept: the driver records its steps in the order they happened.
            orchestration={k: float(v) for k, v in orchestration.items()},
            ranks=ranks,
            failures=sorted(unique.values(), key=_failure_sort_key),
            started_at=float(started_at),
        )

    @property
    def ok(self) -> bool:
        """True when no rank and no driver step failed in the final attempt (failures that a
        retry made good stay on record without failing the run)."""
        return not any(not f.get("retried") for f in self.failures)

    def totals(self) -> dict:
        """Counters summed over ranks, plus the slowest rank's wall_seconds."""
        out: dict[str, Any] = {name: sum(r.get(name) or 0 for r in self.ranks) for name in COUNTERS}
        out["wall_seconds"] = max((float(r.get("wall_seconds") or 0.0) for r in self.ranks), default=0.0)
        return out

    # -- JSON ---------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The report as plain JSON-able data; `totals` is derived and ignored by from_dict."""
        data = dataclasses.asdict(self)
        data["totals"] = self.totals()
        data["fanout"] = fanout_summary(self.ranks)
        data["version"] = REPORT_VERSION
        return data

    @classmethod
    def from_dict(cls, data: dict) -> RunReport:
        """Inverse of to_dict; unknown keys (from a newer kiln) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write the report as JSON to `path`, atomically; returns the path."""
        return _atomic_write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> RunReport:
        """Load a report written by to_json."""
        try:
            with open(path, encoding="utf-8") as f:
                return cls.from_dict(json.load(f))
        except (OSError, ValueError, TypeError) as exc:
            raise ReportError(f"cannot read run report {os.fspath(path)}: {exc}") from exc

    # -- terminal table -----------------------------------------------------------------------

    def table(self) -> str:
        """A fixed-width table (one row per rank, then TOTAL) followed by a short footer.

        The TOTAL row sums phase seconds over ranks (work done, not elapsed time) and shows the
        slowest rank's wall seconds; the footer gives the run's own wall time."""
        header = ["rank", "node", "device", *(f"{k} s" for k in TABLE_KINDS),
                  "compiles", "hits", "misses", "saved MiB", "loaded MiB", "wall s"]
        rows = [self._table_row(r) for r in self.ranks]
        rows.append(self._total_row())
        return "\n".join([*_render_columns(header, rows), *self._footer()])

    def _table_row(self, r: dict) -> list[str]:
        # A trailing "!" marks a failed rank; the footer says why.
        rank = f"{r.get('rank', '?')}{'!' if r.get('error') else ''}"
        return [rank, str(r.get("node") or "?"), short_device(r.get("device")),
                *(f"{phase_seconds(r, k):.2f}" for k in TABLE_KINDS),
                str(r["inductor_compiles"]), str(r["cache_hits"]), str(r["cache_misses"]),
                f"{r['bytes_saved'] / MIB:.2f}", f"{r['bytes_loaded'] / MIB:.2f}",
                f"{float(r.get('wall_seconds') or 0.0):.2f}"]

    def _total_row(self) -> list[str]:
        t = self.totals()
        seconds = [sum(phase_seconds(r, k) for r in self.ranks) for k in TABLE_KINDS]
        return ["TOTAL", "", "", *(f"{s:.2f}" for s in seconds),
                str(t["inductor_compiles"]), str(t["cache_hits"]), str(t["cache_misses"]),
                f"{t['bytes_saved'] / MIB:.2f}", f"{t['bytes_loaded'] / MIB:.2f}", f"{t['wall_seconds']:.2f}"]

    def _footer(self) -> list[str]:
        overhead = sum(self.orchestration.values())
        parts = ", ".join(f"{k} {v:.2f}" for k, v in self.orchestration.items())
        lines = [
            f"config hash: {self.config_hash}",
            f"cache key:   {self.cache_key or '-'}",
            f"cache root:  {self.cache_root}",
            f"wall time:   {self.wall_seconds:.2f} s"
            f" (orchestration {overhead:.2f} s{': ' + parts if parts else ''})",
        ]
        lines += [f"cudagraphs:  {status} (ranks {_rank_list(ranks)})"
                  for status, ranks in self._cudagraph_groups().items()]
        lines += lazy_capture_lines(self.ranks)
        lines += [f"trace:       {status} (ranks {_rank_list(ranks)})"
                  for status, ranks in self._groups("trace_cache").items()]
        lines += self._load_lines()
        lines += fanout_lines(self.ranks)
        warnings = Counter(w for r in self.ranks for w in r.get("warnings") or ())
        lines += [f"warning{f' (x{n})' if n > 1 else ''}: {w}" for w, n in sorted(warnings.items())]
        for f in self.failures:
            where = f"rank {f['rank']}" if f.get("rank") is not None else "driver"
            phase = f" in {f['phase']}" if f.get("phase") else ""
            label = f"attempt {f.get('attempt') or '?'} failed (retried): " if f.get("retried") else "FAILED "
            lines.append(f"{label}{where}{phase}: {f.get('cause')}")
        return lines

    def _groups(self, field: str) -> dict[str, list]:
        """Ranks by the value of a report field (ranks without one left out)."""
        groups: dict[str, list] = {}
        for r in self.ranks:
            if r.get(field):
                groups.setdefault(r[field], []).append(r.get("rank"))
        return groups

    def _load_lines(self) -> list[str]:
        """What loading cost against what it read: bytes loaded, seconds in load phases, the
        rate (overall, and per rank when there are several), so that fixed per-artifact costs
        show as a rate far below the disk's; and how often Inductor autotuned."""
        ranks = [r for r in self.ranks if r.get("bytes_loaded") or phase_seconds(r, "load")]
        lines = []
        if ranks:
            nbytes = sum(r.get("bytes_loaded") or 0 for r in ranks)
            seconds = sum(phase_seconds(r, "load") for r in ranks)
            line = f"load:        {_rate(nbytes, seconds)}"
            if len(ranks) > 1:
                line += " (" + ", ".join(f"rank {r.get('rank', '?')} "
                                         f"{_rate(r.get('bytes_loaded') or 0, phase_seconds(r, 'load'))}"
                                         for r in ranks) + ")"
            lines.append(line)
        if self.ranks:
            total = sum(r.get("autotune_benchmarks") or 0 for r in self.ranks)
            busy = [f"{r.get('rank', '?')}: {r['autotune_benchmarks']}" for r in self.ranks
                    if r.get("autotune_benchmarks")]
            lines.append(f"autotuning:  {total} benchmark run{'' if total == 1 else 's'} by Inductor"
                         + (f" (ranks {', '.join(busy)})" if len(self.ranks) > 1 and busy else ""))
        return lines

    def _cudagraph_groups(self) -> dict[str, list]:
        """Distinct cudagraph status lines → ranks reporting them, in order of first rank."""
        groups: dict[str, list] = {}
        for r in self.ranks:
            status = str(r.get("cudagraphs") or "unknown")
            # Workers prefix the line with "cudagraphs:" themselves; the footer has its own label.
            status = status.removeprefix("cudagraphs:").strip()
            groups.setdefault(status, []).append(r.get("rank", "?"))
        return groups

    # -- Chrome trace -------------------------------------------------------------------------

    def chrome_trace(self) -> dict:
        """The run as a Chrome-trace JSON object (orchestrator/timeline.py): one process per node,
        one thread per rank, one complete event per phase, lazy captures included."""
        return chrome_trace(self.ranks, self.failures, lambda r: r["phases"] + _lazy_capture_phases(r))

    def write_chrome_trace(self, path: str | os.PathLike) -> Path:
        """Write chrome_trace() to `path`, atomically; returns the path."""
        return _atomic_write_json(path, self.chrome_trace())


def lazy_capture_lines(ranks: list[dict], per_size: int = 12) -> list[str]:
    """Footer lines for ranks that capture lazily: how many sizes were captured by the time of
    the report (each rank reports ready before its background captures end), when the last one
    landed after ready, the first `per_size` sizes as size@seconds-after-ready (capture seconds),
    and any size whose capture failed (it runs without graphs)."""
    lines = []
    for r in ranks:
        lazy = r.get("lazy_capture")
        if not lazy:
            continue
        last = lazy.get("last_after_ready_s")
        when = f", last at ready +{last:.2f} s" if last is not None else ""
        state = "all done" if lazy.get("done") else "still capturing"
        lines.append(f"capture:     rank {r.get('rank', '?')}: lazy, {lazy.get('captured', 0)}/{lazy.get('sizes', 0)} "
                     f"sizes captured by the report{when} ({state})")
        done = [e for e in lazy.get("per_size") or () if e.get("state") == "captured"]
        if done:
            shown = " ".join(f"{e['size']}@+{e['after_ready_s']:.2f}s({e['seconds']:.2f}s)" for e in done[:per_size])
            more = f" … {len(done) - per_size} more" if len(done) > per_size else ""
            lines.append(f"             sizes@after ready(seconds): {shown}{more}")
        for size, error in sorted((lazy.get("failed") or {}).items(), key=lambda item: int(item[0])):
            lines.append(f"capture:     rank {r.get('rank', '?')}: size {size} FAILED, runs without graphs: {error}")
    return lines


def _lazy_capture_phases(rank_report: dict) -> list[dict]:
    """A lazily captured rank's per-size captures as phases, for the timeline only (they ran
    after ready, in the background: the table's capture column leaves them out)."""
    lazy = rank_report.get("lazy_capture") or {}
    return [_normalize_phase({"name": f"lazy capture size {e['size']}", "kind": "capture", "start": e["start"],
                              "end": e["end"], "seconds": e["seconds"],
                              "extra": {"after_ready_s": e["after_ready_s"], "state": e["state"]}})
            for e in lazy.get("per_size") or () if e.get("state") in ("captured", "failed")]


def short_device(device: str | None) -> str:
    """"cuda:0 NVIDIA H100 80GB HBM3" → "cuda:0 H100 80GB": index plus model, vendor dropped."""
    if not device:
        return "?"
    words = [w for w in str(device).split() if w not in ("NVIDIA", "GeForce")]
    return " ".join(words[:3])


def _render_columns(header: list[str], rows: list[list[str]]) -> list[str]:
    """Lines of a fixed-width table: text columns (the first three) left-aligned, numbers right."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = (c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "  ".join(padded).rstrip()

    rule = "-" * len(line(["-" * w for w in widths]))
    return [line(header), rule, *(line(r) for r in rows[:-1]), rule, line(rows[-1])]


def _rank_list(ranks: list) -> str:
    return ",".join(str(r) for r in ranks)


def _atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as JSON to `path` atomically (kiln's one atomic writer: a reader never sees
    half a file); parent directories are created. Reports are for sharing: mode 0o644."""
    path = Path(path)
    _make_parent(path)
    # Keys in insertion order (fields as declared, orchestration steps as run): already stable.
    text = json.dumps(obj, indent=2, default=str) + "\n"
    try:
        atomic_write_bytes(path, text.encode("utf-8"), mode=0o644)
    except OSError as exc:
        raise ReportError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path


def _nearest_existing_dir(path: Path) -> Path:
    """The closest ancestor of `path` that exists; ReportError if it is not a directory."""
    for ancestor in [path.parent, *path.parent.parents]:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise ReportError(f"cannot write {path}: {ancestor} exists and is not a directory")
            return ancestor
    return Path(path.anchor or ".")  # unreachable for real paths: the root always exists


def check_writable(path: str | os.PathLike) -> None:
    """Raise ReportError naming `path` if a report could not be written there: a directory is
    in the way, or the nearest existing ancestor is not a writable directory. Creates nothing,
    so a caller can check before long work and write (creating parents) after it."""
    path = Path(path)
    if path.is_dir():
        raise ReportError(f"cannot write {path}: it is a directory")
    ancestor = _nearest_existing_dir(path)
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ReportError(f"cannot write {path}: {ancestor} is not writable")


def _make_parent(path: Path) -> None:
    """Create the parent directories of `path`, or explain which ancestor is in the way."""
    _nearest_existing_dir(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"cannot write {path}: cannot create {path.parent}: {exc.strerror or exc}") from exc
