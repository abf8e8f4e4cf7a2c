"""`edge-agent demo`: the scripted shift with live progress and the reconciliation tables.

See :mod:`simulators.shift` for what runs. Exit code 0 when the MES ledger equals, per order and
material, what the PLC counted; 1 when anything was lost or doubled.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edge_agent.domain.quantities import Rounding, fmt, round_to_increment
from edge_agent.logs import configure_logging
from simulators.shift import (
    DEMO_FEED_LOTS,
    Reconciliation,
    ShiftPlan,
    SourceKind,
    run_shift,
    units_bar,
)


def run_shift_demo(
    out: Console,
    broker: tuple[str, int] | None,
    workdir: Path | None = None,
    plan: ShiftPlan | None = None,
    kind: SourceKind = "opcua",
) -> int:
    # the water tank is switched halfway, before the agent's restart: each lot's water is shown
    plan = plan or ShiftPlan(feed_lots=DEMO_FEED_LOTS[:2])
    where = f"the broker at {broker[0]}:{broker[1]}" if broker else "an embedded MQTT broker"
    out.print(
        f"[bold]edge-agent demo[/bold] — a shift on the example line: "
        f"{', '.join(f'{o} × {n}' for o, n in plan.orders)} tubes of FG-100 through mixing "
        "(counters, flow meter, scale) and filling (operation-complete handshake).\n"
        + (
            f"  The water tank is switched from lot {plan.feed_lots[0]} to "
            f"{', '.join(plan.feed_lots[1:])} during the shift.\n"
            if len(plan.feed_lots) > 1
            else ""
        )
        + f"  {'OPC UA' if kind == 'opcua' else 'Modbus TCP'} PLC simulator → edge-agent (daemon "
        f"process) → {where} → MES simulator.\n"
        "  In the middle: the broker goes down"
        + (" (embedded broker only)" if broker else "")
        + ", and the agent is stopped while the PLC keeps counting.\n"
    )
    started = time.monotonic()
    # the simulators' own logs go to the console only when something is wrong
    configure_logging("error", "console", sys.stderr)
    logging.getLogger("asyncua").setLevel(logging.ERROR)  # security-policy notes of the sim
    with tempfile.TemporaryDirectory(prefix="edge-agent-demo-") as tmp:
        work = workdir or Path(tmp)
        with units_bar(out, plan.units, started) as report:
            result = asyncio.run(run_shift(work, plan, broker, report, kind=kind))
        _print(out, result, time.monotonic() - started)
    return 0 if result.ok else 1


def _print(out: Console, r: Reconciliation, seconds: float) -> None:
    table = Table(
        title="Reconciliation: what the PLC counted (through the BOM) vs what the MES received",
        title_justify="left",
    )
    for col in ("order", "material", "uom", "expected", "received", "difference", ""):
        table.add_column(
            col, justify="right" if col in ("expected", "received", "difference") else "left"
        )
    for line in r.lines:
        status = (
            "[green]✓[/green]"
            if line.difference == 0
            else ("[red]LOST[/red]" if line.difference < 0 else "[red]DOUBLED[/red]")
        )
        table.add_row(
            line.order,
            line.material,
            line.uom,
            fmt(line.expected),
            fmt(line.received),
            fmt(line.difference),
            status,
        )
    out.print(table)
    summary = Table(show_header=False, title="Summary", title_justify="left")
    summary.add_column()
    summary.add_column(justify="right")
    summary.add_row("messages received by the MES (unique ids)", str(r.messages))
    summary.add_row("repeat deliveries recognised by id (not counted)", str(r.duplicate_deliveries))
    summary.add_row("messages rejected by the MES", str(r.rejected))
    summary.add_row("lines lost", _bad(r.lost))
    summary.add_row("lines doubled", _bad(r.doubled))
    summary.add_row("left in the agent's outbox", str(r.outbox_left))
    summary.add_row("audit chain", "intact" if r.audit_ok else "[red]BROKEN[/red]")
    summary.add_row("duration", f"{seconds:.0f} s")
    out.print(summary)
    if r.feed_lots:
        feed = Table(
            title="Water per tank lot: metered while the lot was at the meter (the PLC's own "
            "meter history, after the hold-up lag) vs drawn from it in the MES ledger",
            title_justify="left",
        )
        for col in ("lot", "expected L", "drawn L", "difference"):
            feed.add_column(col, justify="left" if col == "lot" else "right")
        for lot, x in r.feed_lots.items():
            expected = round_to_increment(x.expected, Decimal("0.01"), Rounding.HALF_UP)
            feed.add_row(lot or "(no lot)", fmt(expected), fmt(x.posted), fmt(x.posted - expected))
        out.print(feed)
        out.print(
            "  The agent splits the flow between lots by interpolating between its readings of the "
            "totalizer, so a lot's share can differ by what the meter moved in the one reading "
            "interval the change-over falls in; the total is exact."
        )
    for v in r.variances:
        close = Table(
            title=f"Order {v.order} closed by the MES: variance per component (issued to lots, "
            f"alternates drawn, held for want of a lot; ! beyond ±{fmt(v.threshold_pct)} %)",
            title_justify="left",
        )
        for col in ("material", "theoretical", "issued", "alternates", "held", "variance", "%"):
            close.add_column(
                col, justify="left" if col == "material" else "right", no_wrap=col == "material"
            )
        for c in v.lines:
            pct = _short(c.variance_pct, "0.1") if c.variance_pct is not None else ""
            close.add_row(
                f"{c.material} ({c.uom})",
                _short(c.theoretical),
                _short(c.issued),
                _short(c.substituted) if c.substituted else "",
                _short(c.held) if c.held else "",
                _short(c.variance),
                f"[yellow]{pct} ![/yellow]" if c.flagged else pct,
            )
        out.print(close)
    for g in r.genealogy:
        lots = ", ".join(f"{x.lot} {fmt(x.quantity)} {x.uom}" for x in g.components)
        out.print(f"  genealogy {g.order}: {fmt(g.good)} {g.uom} good ← {lots}")
    for refusal in r.refused_commands:
        out.print(f"[red]close refused: {refusal}[/red]")
    if r.exceptions:
        exc = Table(
            title="Exception messages to the MES (raised, and resolved when they cleared)",
            title_justify="left",
        )
        exc.add_column("code")
        exc.add_column("count", justify="right")
        for code, n in sorted(r.exceptions.items()):
            exc.add_row(code, str(n))
        out.print(exc)
    out.print(
        "[bold green]lost 0, duplicated 0: the MES ledger equals what the PLC counted.[/bold green]"
        if r.ok
        else "[bold red]MISMATCH: the MES ledger differs from what the PLC counted.[/bold red]"
    )


def _short(value: Decimal, increment: str = "0.001") -> str:
    """``value`` rounded to ``increment``, without trailing zeros (for narrow tables)."""
    text = fmt(round_to_increment(value, Decimal(increment), Rounding.HALF_UP))
    return text.rstrip("0").rstrip(".") if "." in text else text


def _bad(n: int) -> str:
    return str(n) if n == 0 else f"[red]{n}[/red]"
