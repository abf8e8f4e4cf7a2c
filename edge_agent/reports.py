"""Readable tables for people watching a run (rich)."""

from __future__ import annotations

from decimal import Decimal

from rich.console import Console
from rich.table import Table

from edge_agent.calc import CalcResult
from edge_agent.domain.explosion import ExplodedBom
from edge_agent.domain.quantities import fmt


def print_table(
    out: Console, bom: ExplodedBom, operation: str, result: CalcResult, with_lots: bool
) -> None:
    """The postings of a calc run as a table, then the totals per material."""
    table = Table(
        title=f"Backflush — BOM {bom.ref}, operation {operation}",
        title_justify="left",
        show_lines=False,
    )
    for name, justify in (
        ("#", "right"),
        ("good", "right"),
        ("scrap", "right"),
        ("material", "left"),
        ("posted", "right"),
        ("uom", "left"),
        ("theoretical Σ", "right"),
        ("issued Σ", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    if with_lots:
        table.add_column("lots")
        table.add_column("held")
    previous = 0
    for r in result.records:
        p = r.posting
        first = r.confirmation != previous
        previous = r.confirmation
        row = [
            str(r.confirmation) if first else "",
            fmt(r.good) if first else "",
            fmt(r.scrap) if first else "",
            p.material + (" (+setup)" if p.setup_included else ""),
            fmt(p.quantity),
            p.uom,
            fmt(p.theoretical),
            fmt(p.issued),
        ]
        if with_lots and r.binding is not None:
            b = r.binding
            row.append(
                ", ".join(
                    f"{d.lot} {fmt(d.quantity)}"
                    + (f" ({d.material}, substitute)" if d.substitution else "")
                    for d in b.draws
                )
                or "—"
            )
            held = [f"{fmt(b.held.quantity)} {b.held.reason.value}"] if b.held else []
            if b.held_cancelled:
                held.append(f"-{fmt(b.held_cancelled)} cancelled")
            row.append(", ".join(held) or "—")
        table.add_row(*row, end_section=False)
    out.print(table)

    totals = Table(title="Totals per material", title_justify="left")
    for name in ("material", "posted Σ", "uom", "theoretical (unrounded)", "rounding"):
        totals.add_column(name, justify="left" if name in ("material", "uom") else "right")
    last: dict[str, tuple[Decimal, str, str]] = {}
    sums: dict[str, Decimal] = {}
    for r in result.records:
        p = r.posting
        sums[p.material] = sums.get(p.material, Decimal(0)) + p.quantity
        last[p.material] = (p.issued, p.uom, fmt(p.theoretical))
    for material, total in sums.items():
        issued, uom, theo = last[material]
        assert total == issued, "postings add up to the rounded cumulative quantity"
        totals.add_row(material, fmt(total), uom, theo, fmt(issued - Decimal(theo)))
    out.print(totals)
