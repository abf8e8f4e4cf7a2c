"""PNG plots of a bench report: ``python -m bench.plots REPORT.json DIR`` (the full run draws
them itself with ``--plots DIR``).

- ``latency.png``: the end-to-end latency of every change (to the first message of it at the
  MES) at 100 and 500 events/s: its distribution (CDF, log scale) and its course over the phase
  (a latency that climbs all along says the agent does not keep up with the rate);
- ``backlog-N.png``: the outbox depth and the worker's RSS over time while the backlog of N
  fills (broker down) and drains;
- ``e2e-throughput.png``: messages at the MES and the agent's RSS over time in each throughput
  run (where the time goes: the engine's big batches before anything is sent, then the drain).

matplotlib is imported only here, and only when plots are asked for; each plot is a Figure of
its own saved as PNG (the Agg renderer, no pyplot, no display).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

PHASE_COLOURS = {"fill": "#fde0c5", "wait": "#eeeeee", "drain": "#d5e8d4"}


def draw(report: dict[str, Any], outdir: Path) -> list[Path]:
    """Every plot the report has data for; the files written."""
    outdir.mkdir(parents=True, exist_ok=True)
    details = report.get("details", {})
    title = _title(report)
    written = []
    latency = details.get("e2e.latency")
    if latency:
        written.append(_latency(latency, title, outdir / "latency.png"))
    for key, backlog in details.items():
        if key.startswith("backlog.") and backlog.get("series"):
            n = int(key.split(".")[1])
            written.append(_backlog(n, backlog, title, outdir / f"backlog-{n}.png"))
    runs = {k[4:]: v for k, v in details.items() if k.startswith("e2e.") and k != "e2e.latency"}
    if runs:
        written.append(_throughput(runs, title, outdir / "e2e-throughput.png"))
    return written


def _title(report: dict[str, Any]) -> str:
    m = report.get("machine", {})
    return (
        f"edge-agent bench, {report.get('profile', '?')} run {report.get('started', '')}: "
        f"{m.get('cpus', '?')} × {m.get('cpu_model', '?')}"
    )


def _latency(run: dict[str, Any], title: str, path: Path) -> Path:
    fig = Figure(figsize=(13, 5))
    cdf, course = fig.subplots(1, 2)
    phases = sorted(run["phases"].values(), key=lambda phase: phase["offered_rate"] or 0)
    for phase in phases:
        ms = phase.get("latency_first_ms")
        if not ms:
            continue
        rate = int(phase["offered_rate"])
        lat = phase["latency"]
        label = (
            f"{rate} events/s (agent took {phase['changes_per_s']:.0f}/s): "
            f"p50 {lat['p50']:,.0f} ms, p99 {lat['p99']:,.0f} ms"
        )
        ordered = sorted(ms)
        n = len(ordered)
        cdf.step(ordered, [(i + 1) / n for i in range(n)], where="post", label=label)
        # the i-th change was made i / rate seconds into the phase
        course.plot([i / rate for i in range(n)], ms, ".", markersize=2, label=f"{rate} events/s")
    for ax in (cdf, course):
        ax.grid(True, which="both", alpha=0.3)
    cdf.axvline(50, color="red", linestyle="--", linewidth=1, label="target p99 ≤ 50 ms (500/s)")
    cdf.set_xscale("log")
    cdf.set_xlabel("simulator's change → MES receipt of its first message (ms, log)")
    cdf.set_ylabel("fraction of changes")
    cdf.legend(fontsize=8, loc="lower right")
    course.set_yscale("log")
    course.set_xlabel("seconds into the phase (when the change was made)")
    course.set_ylabel("latency (ms, log)")
    course.legend(fontsize=8)
    wcs, bom = run.get("work_centres"), run.get("bom_lines")
    fig.suptitle(f"End-to-end latency, {wcs} work centres, BOM {bom}\n{title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)  # a Figure of its own: Agg, no pyplot, no display
    return path


def _backlog(n: int, backlog: dict[str, Any], title: str, path: Path) -> Path:
    series = backlog["series"]
    t0 = next((t for t, phase, _mb, _d in series if phase == "fill"), series[0][0])
    fig = Figure(figsize=(11, 5))
    depth_ax = fig.subplots()
    rss_ax = depth_ax.twinx()
    times = [t - t0 for t, _p, _mb, _d in series]
    depth_ax.plot(times, [d for _t, _p, _mb, d in series], color="tab:blue", label="outbox depth")
    rss_ax.plot(times, [mb for _t, _p, mb, _d in series], color="tab:red", label="RSS")
    start, current = times[0], series[0][1]
    for t, (_t, phase, _mb, _d) in zip(times, series, strict=True):
        if phase != current:
            _shade(depth_ax, start, t, current)
            start, current = t, phase
    _shade(depth_ax, start, times[-1], current)
    depth_ax.set_xlabel("seconds since the fill started")
    depth_ax.set_ylabel("outbox depth (messages)", color="tab:blue")
    rss_ax.set_ylabel("resident memory (MB)", color="tab:red")
    rss_ax.set_ylim(0, max(110.0, 1.1 * max(mb for _t, _p, mb, _d in series)))
    rss_ax.axhline(100, color="tab:red", linestyle="--", linewidth=1, alpha=0.6)
    depth_ax.grid(True, alpha=0.3)
    fig.suptitle(
        f"Backlog of {n:,}: fill (broker down) {backlog['fill']:,.0f} rows/s, "
        f"drain {backlog['drain']:,.0f} msg/s; RSS peak {backlog['rss_drain']:.1f} MB "
        f"(target ≤ 100 MB, dashed)\n{title}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)  # a Figure of its own: Agg, no pyplot, no display
    return path


def _shade(ax: Axes, start: float, end: float, phase: str) -> None:
    colour = PHASE_COLOURS.get(phase)
    if colour and end > start:
        ax.axvspan(start, end, color=colour, alpha=0.6, zorder=0)
        ax.text((start + end) / 2, 0.98, phase, transform=ax.get_xaxis_transform(),
                ha="center", va="top", fontsize=8)  # fmt: skip


def _throughput(runs: dict[str, dict[str, Any]], title: str, path: Path) -> Path:
    fig = Figure(figsize=(11, 8))
    arrived, rss = fig.subplots(2, 1, sharex=True)
    for name, run in runs.items():
        phase = run["phases"].get("throughput")
        if not phase:
            continue
        label = (
            f"{name}: {run['work_centres']} WC, BOM {run['bom_lines']}, "
            f"{phase['changes']:,} changes, {phase['msg_per_s']:,.0f} msg/s"
        )
        arrived.plot([t for t, _ in phase["arrivals"]], [c for _, c in phase["arrivals"]],
                     label=label)  # fmt: skip
        if phase.get("rss"):
            rss.plot([t for t, _ in phase["rss"]], [mb for _, mb in phase["rss"]], label=name)
    arrived.set_ylabel("messages at the MES")
    arrived.legend(fontsize=8)
    arrived.grid(True, alpha=0.3)
    rss.axhline(100, color="red", linestyle="--", linewidth=1, label="target ≤ 100 MB")
    rss.set_ylim(bottom=0)
    rss.set_ylabel("agent RSS (MB)")
    rss.set_xlabel("seconds since the first change (all changes written at once)")
    rss.legend(fontsize=8)
    rss.grid(True, alpha=0.3)
    fig.suptitle(f"End to end under a burst of changes\n{title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)  # a Figure of its own: Agg, no pyplot, no display
    return path


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m bench.plots REPORT.json DIR", file=sys.stderr)
        return 2
    for path in draw(json.loads(Path(argv[0]).read_text()), Path(argv[1])):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
