"""Reliability figures: run the fault-injection suite N times; tabulate what was lost and how fast
kiln got back to a verified good state, per scenario.

    python benchmarks/reliability_figures.py [--runs 3] [--slow] [--out results.json] [-k EXPR]

Each run is `python -m pytest tests/reliability -m reliability -p no:cacheprovider` (with
--slow: the slow scenarios too) with $KILN_RELIABILITY_LOG naming a fresh file, to which every
test appends one JSON line {"scenario", "lost", "recovery_s"} (tests/reliability/conftest.py).
"lost" is "nothing" when the test passed; a failing test records "test failed: …".
recovery_s is seconds from the fault to a verified good state (for refusals and bad input: to
the clear error). Prints a markdown table; --out also saves the raw lines and the aggregate.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # benchmarks.common
LOG_ENV_VAR = "KILN_RELIABILITY_LOG"


def run_suite(slow: bool, keyword: str | None) -> tuple[list[dict], int, float]:
    """One pytest run of tests/reliability: (figure lines, pytest exit status, seconds)."""
    with tempfile.TemporaryDirectory(prefix="kiln-reliability-") as tmp:
        log = os.path.join(tmp, "figures.jsonl")
        cmd = [sys.executable, "-m", "pytest", "tests/reliability", "-q", "-p", "no:cacheprovider",
               # tests/conftest.py runs slow tests only when "slow" appears in -m.
               "-m", "reliability or slow" if slow else "reliability"]
        if keyword:
            cmd += ["-k", keyword]
        start = time.perf_counter()
        status = subprocess.run(cmd, cwd=ROOT, env={**os.environ, LOG_ENV_VAR: log}).returncode
        seconds = time.perf_counter() - start
        lines = []
        if os.path.exists(log):
            with open(log, encoding="utf-8") as f:
                lines = [json.loads(line) for line in f if line.strip()]
    return lines, status, seconds


def aggregate(lines: list[dict]) -> list[dict]:
    """Per scenario, in first-seen order: runs, what was lost, median and max recovery seconds."""
    by_scenario: dict[str, list[dict]] = collections.defaultdict(list)
    for line in lines:
        by_scenario[line["scenario"]].append(line)
    rows = []
    for scenario, group in by_scenario.items():
        losses = collections.Counter(g["lost"] for g in group if g["lost"] != "nothing")
        times = [g["recovery_s"] for g in group if g.get("recovery_s") is not None]
        rows.append({
            "scenario": scenario,
            "runs": len(group),
            "lost": "nothing" if not losses else "; ".join(f"{n}× {what}" for what, n in losses.items()),
            "median_s": statistics.median(times) if times else None,
            "max_s": max(times) if times else None,
        })
    return rows


def markdown(rows: list[dict]) -> str:
    def seconds(value: float | None) -> str:
        if value is None:
            return "–"
        return "< 0.01" if value < 0.01 else f"{value:.2f}"

    out = ["| scenario | runs | lost | median recovery s | max recovery s |", "|---|---|---|---|---|"]
    out += [f"| {r['scenario']} | {r['runs']} | {r['lost']} | {seconds(r['median_s'])} | {seconds(r['max_s'])} |"
            for r in rows]
    return "\n".join(out)


def machine() -> str:
    from benchmarks.common import machine as torch_machine

    return f"{torch_machine()}; {os.cpu_count()} cores; {platform.platform()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of the suite (default 3)")
    parser.add_argument("--slow", action="store_true", help="include the slow scenarios (not run in CI)")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression, to run some scenarios only")
    parser.add_argument("--out", help="save the raw figure lines and the aggregate as JSON here")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    lines: list[dict] = []
    runs = []
    for i in range(args.runs):
        got, status, seconds = run_suite(args.slow, args.keyword)
        runs.append({"run": i + 1, "pytest_status": status, "seconds": round(seconds, 1), "figures": len(got)})
        print(f"run {i + 1}/{args.runs}: pytest exit {status}, {len(got)} figures, {seconds:.0f} s", flush=True)
        lines += got
    rows = aggregate(lines)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"\nmachine: {machine()}\ndate: {when}\n")
    print(markdown(rows))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"machine": machine(), "date": when, "slow": args.slow, "runs": runs, "rows": rows,
                       "lines": lines}, f, indent=2)
    if any(r["pytest_status"] != 0 for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
