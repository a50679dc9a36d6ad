"""A run report as a Chrome-trace timeline: one process per node, one thread per rank.

Perfetto and chrome://tracing open it. Times are microseconds from the earliest phase start,
rounded so that the same report always gives the same bytes. Stdlib only, like report.py.
"""

from __future__ import annotations

from collections.abc import Callable


def rank_number(report: dict) -> int:
    """A report's rank for sorting and as its trace thread; -1 where a broken report lacks one."""
    rank = report.get("rank")
    return rank if isinstance(rank, int) else -1


def chrome_trace(ranks: list[dict], failures: list[dict], phases_of: Callable[[dict], list[dict]]) -> dict:
    """The Chrome-trace JSON object of normalised rank reports and the run's failures; a rank's
    placed phases are `phases_of(rank)` (its own, plus any the report adds for the timeline)."""
    origin = min((p["start"] for r in ranks for p in r["phases"] if p.get("start") is not None),
                 default=0.0)
    pids: dict[str, int] = {}
    meta: list[dict] = []
    events: list[dict] = []
    for r in ranks:
        node = str(r.get("node") or r.get("node_id") or "?")
        if node not in pids:
            pids[node] = len(pids)
            meta += _process_meta(pids[node], node)
        pid, tid = pids[node], rank_number(r)
        meta += _thread_meta(pid, tid, r)
        events += _phase_events(pid, tid, phases_of(r), origin)
        if r.get("error"):
            events.append(_error_event(pid, tid, r, origin))
    # Failures no rank report carries (a rank that died, or failed before it could report):
    # instant events on a "failures" track, so the trace names them too.
    reported = {r.get("rank") for r in ranks if r.get("error")}
    unreported = [f for f in failures if f.get("retried") or f.get("rank") not in reported]
    if unreported:
        pid = len(pids)
        meta += [{"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": "failures"}},
                 {"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0, "args": {"sort_index": pid}}]
        events += [_failure_event(pid, f) for f in unreported]
    events.sort(key=lambda e: (e["pid"], e["tid"], e["ts"]))
    return {"traceEvents": meta + events, "displayTimeUnit": "ms"}


def _us(seconds: float) -> float:
    # Rounded to nanoseconds so the trace is byte-for-byte stable across float noise.
    return round(seconds * 1e6, 3)


def _process_meta(pid: int, node: str) -> list[dict]:
    return [{"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": f"node {node}"}},
            {"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0, "args": {"sort_index": pid}}]


def _thread_meta(pid: int, tid: int, r: dict) -> list[dict]:
    label = f"rank {r.get('rank', '?')} ({r.get('device') or '?'})"
    return [{"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": label}},
            {"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid, "args": {"sort_index": tid}}]


def _phase_events(pid: int, tid: int, phases: list[dict], origin: float) -> list[dict]:
    """Complete ("X") events for phases that have a start time; others cannot be placed."""
    return [{"name": p["name"], "cat": p["kind"], "ph": "X", "pid": pid, "tid": tid,
             "ts": _us(p["start"] - origin), "dur": max(1.0, _us(p["seconds"])), "args": p["extra"]}
            for p in phases if p.get("start") is not None]


def _error_event(pid: int, tid: int, r: dict, origin: float) -> dict:
    """A thread-scoped instant event at the end of the rank's last placed phase (where it died)."""
    ends = [p["end"] for p in r["phases"] if p.get("end") is not None]
    ts = _us(max(ends) - origin) if ends else 0.0
    err = r["error"]
    return {"name": f"error: {err.get('type') or 'Error'}", "cat": "error", "ph": "i", "s": "t",
            "pid": pid, "tid": tid, "ts": max(ts, 0.0),
            "args": {k: err.get(k) for k in ("phase", "message", "traceback") if err.get(k) is not None}}


def _failure_event(pid: int, f: dict) -> dict:
    """A failure from the report's failures list as an instant event on the rank's thread."""
    where = f"rank {f['rank']}" if f.get("rank") is not None else "driver"
    label = f"attempt {f.get('attempt') or '?'} failed (retried)" if f.get("retried") else "FAILED"
    rank = f.get("rank")
    return {"name": f"{label}: {where} in {f.get('phase')}", "cat": "error", "ph": "i", "s": "t",
            "pid": pid, "tid": rank if isinstance(rank, int) else -1, "ts": 0.0,
            "args": {k: f.get(k) for k in ("rank", "phase", "cause", "attempt", "retried") if f.get(k) is not None}}
