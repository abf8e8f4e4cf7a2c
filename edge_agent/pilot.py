"""``edge-agent pilot report``: a pilot's backflush against its actual issues, and the proposal.

Read from the agent's store (as the agent last committed it, while the daemon runs too): for each
order that backflushed materials in shadow (``[pilot]``), per operation and material, the
figures of :class:`~edge_agent.domain.pilot.OrderEvidence`: good and scrap confirmed at the
operation, the pinned BOM's line (quantity per unit, scrap %, setup), what the agent
backflushed in shadow, and the actual issues the MES sent (``actual-issue``). The comparison
and the fit are :mod:`edge_agent.domain.pilot`'s; this module only gathers, prints and writes:

- readable tables (rich): the comparison per order with a total per material, then the proposal;
- ``--json FILE``: everything, decimal strings;
- ``--csv DIR``: ``comparison.csv`` and ``proposal.csv``;
- ``--proposal FILE --revision NAME``: the proposals that can be applied, as a new BOM revision
  in a master-data document, for the MES's change control (never applied by the agent);
- ``--charts DIR``: one PNG per material, actual against backflushed per order (matplotlib:
  ``pip install 'edge-agent[charts]'``).

Only closed orders are evidence unless ``--include-open``: an open order's issues are not all in.
An order with no actual issue for a shadowed material is shown, and left out of the fit.
"""

from __future__ import annotations

import asyncio
import csv
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from edge_agent.config import Config
from edge_agent.domain.explosion import explode
from edge_agent.domain.masterdata import (
    MasterData,
    PostingMethod,
    load_master_data,
    parse_decimal,
)
from edge_agent.domain.pilot import (
    Comparison,
    Interval,
    OrderEvidence,
    Proposal,
    compare,
    fit_all,
    proposed_revision,
    revision_notes,
    total,
)
from edge_agent.domain.quantities import fmt, to_decimal
from edge_agent.engine import OrderState, actual_issued
from edge_agent.errors import EdgeAgentError, InputError
from edge_agent.store import Store


@dataclass
class Pilot:
    """What the store holds of a pilot: the evidence, and what could not be evidence."""

    #: (product, revision) → evidence of its orders (those with actual issues)
    evidence: dict[tuple[str, str], list[OrderEvidence]] = field(default_factory=dict)
    #: comparisons of every shadowed component of the orders taken, issues or not
    comparisons: list[Comparison] = field(default_factory=list)
    #: sentences: what was left out and why
    notes: list[str] = field(default_factory=list)
    master: MasterData | None = None
    master_doc: Mapping[str, Any] | None = None

    @property
    def all_evidence(self) -> list[OrderEvidence]:
        return [e for group in self.evidence.values() for e in group]


def pilot_report(
    config: Config,
    out: Console,
    *,
    include_open: bool = False,
    confidence: Decimal = Decimal("0.95"),
    min_orders: int = 5,
    json_path: Path | None = None,
    csv_dir: Path | None = None,
    proposal_path: Path | None = None,
    revision: str | None = None,
    charts_dir: Path | None = None,
) -> int:
    """Print the report and write what was asked; 0, or 1 when the store holds no pilot."""
    if proposal_path is not None and not revision:
        raise InputError("--proposal needs --revision NAME: the new revision's name")
    path = Path(config.store.path)
    if not path.exists():
        out.print(f"store {path} does not exist yet: the agent has not run", markup=False)
        return 1
    pilot = asyncio.run(read_pilot(path, include_open))
    if not pilot.comparisons:
        out.print(
            "no pilot in this store: no "
            + ("" if include_open else "closed ")
            + "order backflushed a material in shadow ([pilot] in the configuration)",
            markup=False,
        )
        for note in pilot.notes:
            out.print(f"  {note}", markup=False)
        return 1
    assert pilot.master is not None
    increments = {m.id: m.increment for m in pilot.master.materials.values()}
    proposals = {
        key: fit_all(group, confidence=confidence, min_orders=min_orders, increments=increments)
        for key, group in pilot.evidence.items()
    }
    _print(out, pilot, proposals)
    if json_path is not None:
        json_path.write_text(json.dumps(as_json(pilot, proposals), indent=2) + "\n")
        out.print(f"wrote {json_path}", markup=False)
    if csv_dir is not None:
        for written in write_csv(csv_dir, pilot.comparisons, proposals):
            out.print(f"wrote {written}", markup=False)
    if proposal_path is not None:
        assert revision is not None
        _write_proposal(proposal_path, revision, pilot, proposals, out)
    if charts_dir is not None:
        from edge_agent.pilot_charts import write_charts  # noqa: PLC0415 - matplotlib when asked

        for written in write_charts(charts_dir, pilot.comparisons, pilot.all_evidence, proposals):
            out.print(f"wrote {written}", markup=False)
    return 0


def _print(
    out: Console, pilot: Pilot, proposals: Mapping[tuple[str, str], Sequence[Proposal]]
) -> None:
    # a table is read whole: in a file or a pipe it is not squeezed to 80 columns
    wide = out if out.is_terminal else Console(file=out.file, width=max(out.width, 132))
    for table in comparison_tables(pilot.comparisons):
        wide.print(table)
    for (product, rev), group in sorted(proposals.items()):
        for p in group:
            wide.print(proposal_heading(product, rev, p), markup=False)
            wide.print(proposal_table(p))
            wide.print(f"  {p.material} at {p.operation}: {verdict(p)}", markup=False)
    for note in pilot.notes:
        out.print(f"  {note}", markup=False)


# ----------------------------------------------------------------------------- the evidence


async def read_pilot(path: Path, include_open: bool = False) -> Pilot:
    """The pilot's evidence from the store at ``path`` (read only)."""
    async with Store.open(path) as store:
        states = [OrderState.from_dict(v) for v in (await store.all_state("order/")).values()]
        master_doc = await store.get_masterdata("document", "masterdata")
    if master_doc is None:
        raise EdgeAgentError(f"{path}: the store holds no master data: the agent has not run")
    master = load_master_data(dict(master_doc))
    pilot = Pilot(master=master, master_doc=master_doc)
    for state in sorted(states, key=lambda s: s.order):
        if not state.shadow or state.product is None or state.revision is None:
            continue
        if state.status != "closed" and not include_open:
            pilot.notes.append(f"order {state.order} is {state.status}: left out until closed")
            continue
        _order_evidence(pilot, master, state)
    return pilot


def _order_evidence(pilot: Pilot, master: MasterData, state: OrderState) -> None:
    assert state.product is not None
    assert state.revision is not None
    bom = master.bom(state.product, state.revision)
    exploded = explode(master, bom)
    for c in exploded.components:
        if c.method is not PostingMethod.BACKFLUSH or not state.shadowed(c.material):
            continue
        progress = state.consumption.operation(c.operation)
        if progress.confirmations == 0:
            continue  # the operation never ran for this order: nothing to compare
        lines = [
            line
            for line in bom.lines
            if line.operation == c.operation and line.material == c.material and not line.phantom
        ]
        if len(lines) != 1 or len(c.origin) != 1:
            pilot.notes.append(
                f"order {state.order}: {c.material} at {c.operation} comes from "
                f"{len(c.origin)} BOM lines or a phantom: compared with its total, not fitted"
            )
        scrap_pct = lines[0].scrap_pct if len(lines) == 1 else Decimal(0)
        bom_quantity = c.rate / (1 + Fraction(scrap_pct) / 100)
        record = state.actuals.get(c.key)
        actual = actual_issued(record) if record else Decimal(0)
        tagged = record is not None and parse_decimal(record["untagged"]) == 0
        evidence = OrderEvidence(
            order=state.order,
            operation=c.operation,
            material=c.material,
            uom=c.uom,
            good=progress.good,
            scrap=progress.scrap,
            bom_quantity=bom_quantity,
            scrap_pct=scrap_pct,
            setup=to_decimal(c.setup),
            backflushed=(
                state.consumption.component(c.key).issued - state.reversed.get(c.key, Decimal(0))
            ),
            actual=actual,
            actual_setup=parse_decimal(record["setup"]) if record and tagged else None,
        )
        pilot.comparisons.append(compare(evidence))
        if record is None:
            pilot.notes.append(
                f"order {state.order}: no actual issue of {c.material} at {c.operation}: "
                "shown, not fitted"
            )
        elif len(lines) == 1 and len(c.origin) == 1:
            pilot.evidence.setdefault((state.product, state.revision), []).append(evidence)


# ----------------------------------------------------------------------------- the tables


def comparison_tables(comparisons: Sequence[Comparison]) -> list[Table]:
    """One table per operation and material: each order, then the total."""
    tables = []
    for (operation, material), group in _by_component(comparisons):
        table = Table(
            title=f"{material} ({group[0].uom}) at operation {operation}: backflushed against "
            "actual issues (delta = actual − backflushed = process − rounding)",
            title_justify="left",
        )
        for name in _COMPARISON_COLUMNS:
            table.add_column(name, justify="left" if name == "order" else "right", no_wrap=True)
        for c in group:
            table.add_row(*_comparison_cells(c))
        table.add_row(*_comparison_cells(total(group)), style="bold")
        tables.append(table)
    return tables


_COMPARISON_COLUMNS = (
    "order",
    "theoretical",
    "backflushed",
    "actual",
    "delta",
    "delta %",
    "rounding",
    "process",
    "setup: std",
    "actual",
)


def _comparison_cells(c: Comparison) -> list[str]:
    return [
        c.order,
        _q(c.theoretical),
        _q(c.backflushed),
        _q(c.actual),
        _q(c.delta),
        _pct(c.delta_pct),
        _q(c.rounding),
        _q(c.process),
        _q(c.theoretical_setup),
        _q(c.actual_setup) if c.actual_setup is not None else "—",
    ]


def _q(value: Decimal) -> str:
    """A figure as shown in a table: to 6 decimal places at most (the files keep all 12)."""
    exponent = value.as_tuple().exponent
    return fmt(value.quantize(_SHOWN) if isinstance(exponent, int) and exponent < -6 else value)


_SHOWN = Decimal("0.000001")


def proposal_heading(product: str, revision: str, p: Proposal) -> str:
    return (
        f"Proposal for {p.material} ({p.uom}) at operation {p.operation} of {product} rev "
        f"{revision}: actual = rate × (good + scrap) + setup over {p.orders} orders "
        f"(spread {_q(p.spread) if p.spread is not None else '—'} {p.uom}, "
        f"R² {_short(p.r_squared)})"
    )


def proposal_table(p: Proposal) -> Table:
    """One proposal: the standard and the proposal of each figure, with its interval."""
    table = Table()
    for name in ("figure", "standard", "proposed", f"{fmt(p.confidence * 100)} % interval"):
        table.add_column(name, justify="left" if name == "figure" else "right", no_wrap=True)
    table.add_column("change?")
    for name, standard, proposed, interval, changed in (
        ("scrap %", p.standard_scrap_pct, p.proposed_scrap_pct, p.scrap_pct_interval,
         p.scrap_changed),
        (f"setup ({p.uom})", p.standard_setup, p.proposed_setup, p.setup_interval,
         p.setup_changed),
    ):  # fmt: skip
        table.add_row(
            name,
            fmt(standard),
            fmt(proposed) if proposed is not None else "—",
            f"{_short(interval.low)} … {_short(interval.high)}" if interval else "—",
            "thin" if p.thin else "yes" if changed else "no",
        )
    return table


def verdict(p: Proposal) -> str:
    """What to do with a proposal, then its reasons."""
    if p.thin:
        head = "too thin to change the standard"
    elif p.changed:
        head = "change: " + " and ".join(
            name
            for name, changed in (("scrap %", p.scrap_changed), ("setup", p.setup_changed))
            if changed
        )
    else:
        head = "keep the standard (it is within the interval)"
    return "; ".join((head, *p.reasons))


def _short(value: Decimal | None) -> str:
    return fmt(value.quantize(Decimal("0.0001"))) if value is not None else "—"


def _pct(value: Decimal | None) -> str:
    return fmt(value.quantize(Decimal("0.01"))) if value is not None else "—"


def _by_component(
    comparisons: Iterable[Comparison],
) -> list[tuple[tuple[str, str], list[Comparison]]]:
    groups: dict[tuple[str, str], list[Comparison]] = {}
    for c in comparisons:
        groups.setdefault((c.operation, c.material), []).append(c)
    return sorted(groups.items())


# ----------------------------------------------------------------------------- the files


_COMPARISON_FIELDS = (
    "order",
    "operation",
    "material",
    "uom",
    "theoretical",
    "theoretical_setup",
    "theoretical_running",
    "backflushed",
    "actual",
    "delta",
    "delta_pct",
    "rounding",
    "process",
    "actual_setup",
    "actual_running",
    "process_setup",
    "process_running",
)


def comparison_record(c: Comparison) -> dict[str, str | None]:
    return {name: _text(getattr(c, name)) for name in _COMPARISON_FIELDS}


def proposal_record(product: str, revision: str, p: Proposal) -> dict[str, Any]:
    def interval(i: Interval | None) -> dict[str, str] | None:
        return None if i is None else {"low": fmt(i.low), "high": fmt(i.high)}

    return {
        "product": product,
        "bom_revision": revision,
        "operation": p.operation,
        "material": p.material,
        "uom": p.uom,
        "orders": p.orders,
        "order_ids": list(p.order_ids),
        "confidence": fmt(p.confidence),
        "standard_scrap_pct": fmt(p.standard_scrap_pct),
        "proposed_scrap_pct": _text(p.proposed_scrap_pct),
        "scrap_pct_interval": interval(p.scrap_pct_interval),
        "standard_setup": fmt(p.standard_setup),
        "proposed_setup": _text(p.proposed_setup),
        "setup_interval": interval(p.setup_interval),
        "spread": _text(p.spread),
        "r_squared": _text(p.r_squared),
        "scrap_changed": p.scrap_changed,
        "setup_changed": p.setup_changed,
        "thin": p.thin,
        "reasons": list(p.reasons),
    }


def as_json(
    pilot: Pilot, proposals: Mapping[tuple[str, str], Sequence[Proposal]]
) -> dict[str, Any]:
    return {
        "comparisons": [comparison_record(c) for c in pilot.comparisons],
        "totals": [comparison_record(total(g)) for _, g in _by_component(pilot.comparisons)],
        "proposals": [
            proposal_record(product, revision, p)
            for (product, revision), group in sorted(proposals.items())
            for p in group
        ],
        "notes": pilot.notes,
    }


def write_csv(
    directory: Path,
    comparisons: Sequence[Comparison],
    proposals: Mapping[tuple[str, str], Sequence[Proposal]],
) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    rows = [comparison_record(c) for c in comparisons]
    records = [
        proposal_record(product, rev, p)
        for (product, rev), group in sorted(proposals.items())
        for p in group
    ]
    flat = [
        {
            **{k: v for k, v in r.items() if not isinstance(v, dict | list)},
            "scrap_pct_low": (r["scrap_pct_interval"] or {}).get("low"),
            "scrap_pct_high": (r["scrap_pct_interval"] or {}).get("high"),
            "setup_low": (r["setup_interval"] or {}).get("low"),
            "setup_high": (r["setup_interval"] or {}).get("high"),
            "reasons": " | ".join(r["reasons"]),
        }
        for r in records
    ]
    written = []
    for name, data, fields in (
        ("comparison.csv", rows, list(_COMPARISON_FIELDS)),
        ("proposal.csv", flat, list(flat[0]) if flat else ["product"]),
    ):
        path = directory / name
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(data)
        written.append(path)
    return written


def _write_proposal(
    path: Path,
    revision: str,
    pilot: Pilot,
    proposals: Mapping[tuple[str, str], Sequence[Proposal]],
    out: Console,
) -> None:
    """The applicable proposals as new BOM revisions in a master-data document."""
    products = [product for product, _ in proposals]
    twice = sorted({p for p in products if products.count(p) > 1})
    if twice:
        raise InputError(
            f"--proposal: the pilot's orders of {', '.join(twice)} ran on more than one BOM "
            "revision: one proposal cannot revise both"
        )
    assert pilot.master_doc is not None
    boms = []
    for (product, rev), group in sorted(proposals.items()):
        doc = next(
            (
                b
                for b in pilot.master_doc.get("boms", [])
                if b.get("product") == product and b.get("revision") == rev
            ),
            None,
        )
        if doc is None:
            raise EdgeAgentError(f"the store's master data has no BOM {product} rev {rev}")
        orders = sorted({o for p in group for o in p.order_ids})
        label = f"of {len(orders)} orders ({orders[0]} to {orders[-1]})" if orders else None
        boms.append(proposed_revision(doc, group, revision, pilot=label, master=pilot.master))
        for note in revision_notes(doc, group, master=pilot.master):
            out.print(f"  {product} rev {revision}: {note}", markup=False)
    path.write_text(json.dumps({"boms": boms}, indent=2) + "\n")
    out.print(
        f"wrote {path}: a master-data document with {len(boms)} proposed BOM revision(s) for "
        "change control (the agent applies nothing: the MES sends it back as master-data once "
        "approved)",
        markup=False,
    )


def _text(value: Decimal | Fraction | str | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return fmt(value if isinstance(value, Decimal) else to_decimal(value))
