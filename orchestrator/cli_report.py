"""`kiln report FILE [OTHER] [--plot out.png]`: a saved run report's table, and its timeline.

With `--plot`, each rank's phases are drawn on one time axis (one row per rank, one colour per
kind of phase: build, trace, compile, load, wait, capture, …); given two reports (say a cold and
a warm start), they are drawn one above the other on the same scale. matplotlib is an optional
extra (`pip install "torch-kiln[plot]"`). No torch or ray import.
"""

from __future__ import annotations

from pathlib import Path

import click

from kiln.orchestrator.report import PHASE_KINDS, ReportError, RunReport, phase_kind

# One colour per phase kind (matplotlib's tab10), fixed so that two plots compare at a glance.
KIND_COLOURS = dict(zip(PHASE_KINDS, ["#7f7f7f", "#8c564b", "#1f77b4", "#d62728", "#2ca02c", "#e377c2",
                                      "#bcbd22", "#9467bd", "#17becf", "#c7c7c7"]))


def _load(path: str) -> RunReport:
    try:
        return RunReport.from_json(path)
    except ReportError as exc:
        raise click.ClickException(str(exc)) from None


def plot_reports(reports: list[tuple[str, RunReport]], out: str | Path) -> Path:
    """Draw each report's ranks' phases on one shared time axis (seconds from each report's
    first phase); returns the path written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        raise click.ClickException('--plot needs matplotlib: pip install "torch-kiln[plot]"') from None
    rows = sum(max(1, len(r.ranks)) for _, r in reports)
    fig, axes = plt.subplots(len(reports), 1, sharex=True, squeeze=False,
                             figsize=(11, 1.2 + 0.45 * rows + 0.6 * len(reports)))
    seen: set[str] = set()
    for ax, (label, report) in zip(axes[:, 0], reports):
        starts = [p["start"] for r in report.ranks for p in r["phases"] if p.get("start") is not None]
        origin = min(starts, default=0.0)
        for row, rank in enumerate(report.ranks):
            for phase in rank["phases"]:
                if phase.get("start") is None:
                    continue
                kind = phase_kind(phase)
                seen.add(kind)
                ax.barh(row, max(phase["seconds"], 1e-3), left=phase["start"] - origin, height=0.6,
                        color=KIND_COLOURS[kind], edgecolor="none")
        ax.set_yticks(range(len(report.ranks)), [f"rank {r.get('rank', '?')}" for r in report.ranks])
        ax.invert_yaxis()
        ax.set_title(f"{label}: {report.model}, tp={report.tp_size}, wall {report.wall_seconds:.1f} s", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("seconds since the first phase")
    fig.legend(handles=[Patch(color=KIND_COLOURS[k], label=k) for k in PHASE_KINDS if k in seen],
               loc="upper right", ncol=len(seen), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    path = Path(out)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@click.command("report")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Draw every rank's phases on one time axis into this PNG (needs matplotlib).")
def report_command(files: tuple[str, ...], plot_path: str | None) -> None:
    """Print the table of one or two saved run reports (`kiln warmup --report`), e.g. cold and warm."""
    if len(files) > 2:
        raise click.BadParameter(f"at most two reports (cold and warm), got {len(files)}", param_hint="FILES")
    reports = [(Path(f).name, _load(f)) for f in files]
    for label, report in reports:
        if len(reports) > 1:
            click.echo(f"== {label}")
        click.echo(report.table())
    if plot_path:
        click.echo(f"plot: {plot_reports(reports, plot_path)}")
