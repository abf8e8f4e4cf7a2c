"""`edge-agent demo`: a scripted shift on the example line, end to end; ``--rules``: the rules.

The default demo runs the real runtime (:mod:`simulators.shift`): the OPC UA line PLC simulator,
the agent as a daemon process, an MQTT broker (embedded, or ``--broker HOST:PORT``) and the MES
simulator, through two orders with a broker outage and an agent restart, and ends with the
reconciliation of what the MES received against what the PLC counted.

``--rules`` walks work order WO-7 through the pure backflush rules step by step instead, on
config/masterdata.json and config/lots.json: confirmations at the mixing (10) and filling (20)
operations, a weighed active ingredient, metered water, lots drawn FEFO, a substitution, a
single-lot deviation, a correction, and the order-close variance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edge_agent.calc import parse_confirmation, run_calc
from edge_agent.documents import load_lots_file, load_master
from edge_agent.domain.backflush import (
    ComponentPosting,
    ConsumptionState,
    ScaleReading,
    meter,
    weigh,
    weighing_target,
)
from edge_agent.domain.explosion import ComponentKey, ExplodedBom, explode
from edge_agent.domain.lots import Binding, BindingState, Lot, bind
from edge_agent.domain.masterdata import MasterData, PostingMethod, parse_timestamp
from edge_agent.domain.quantities import Rounding, fmt, round_to_increment
from edge_agent.domain.variance import close_variance
from edge_agent.reports import print_table

ORDER = "WO-7"
ORDER_QUANTITY = Decimal(250)
AS_OF = parse_timestamp("2026-11-22T08:00:00Z")
VARIANCE_THRESHOLD_PCT = Decimal(2)


@dataclass
class Order:
    """The demo order's carried state, as the runtime will persist it."""

    master: MasterData
    bom: ExplodedBom
    lots: tuple[Lot, ...]
    state: ConsumptionState = field(default_factory=ConsumptionState)
    bindings: dict[ComponentKey, BindingState] = field(default_factory=dict)

    def bind(self, posting: ComponentPosting) -> Binding:
        key = posting.component.key
        b = bind(
            self.master,
            self.lots,
            self.bindings.get(key, BindingState()),
            posting.material,
            posting.quantity,
            AS_OF,
            posting.component.alternates,
        )
        self.bindings[key], self.lots = b.state, b.lots
        return b


def run_rules_demo(out: Console, config_dir: Path) -> None:
    masterdata, lots_file = config_dir / "masterdata.json", config_dir / "lots.json"
    master = load_master(masterdata)
    bom = explode(master, master.bom("FG-100", None, AS_OF), AS_OF)
    order = Order(master, bom, load_lots_file(lots_file, master))
    out.print(
        f"[bold]edge-agent demo[/bold] — work order {ORDER}: {ORDER_QUANTITY} {bom.uom} of "
        f"BOM {bom.ref}, as of {AS_OF:%Y-%m-%d %H:%M} UTC\n"
        f"  master data {masterdata}\n  staged lots {lots_file}\n"
        "  These are the pure backflush rules the runtime applies (`edge-agent demo` without "
        "--rules runs the runtime itself).\n"
    )
    steps = (
        ("10", ["100", "150:5"]),
        ("20", ["120:3", "1", "1", "80:2", "-5:0", "54:0"]),
    )
    for operation, confirmations in steps:
        out.print(f"[bold]Operation {operation}[/bold]: confirmations {', '.join(confirmations)}")
        result = run_calc(
            master,
            bom,
            operation,
            [parse_confirmation(c) for c in confirmations],
            AS_OF,
            order.lots,
            order.state,
            order.bindings,
        )
        assert result.lots is not None
        order.state, order.lots, order.bindings = result.state, result.lots, result.bindings
        print_table(out, bom, operation, result, with_lots=True)
        if operation == "10":
            _weighings(out, order)
            _meter(out, order)
        out.print()
    _close(out, order)


def _weighings(out: Console, order: Order) -> None:
    api = order.bom.component("10", "RM-ACTIVE", PostingMethod.WEIGH)
    assert api is not None, "the example BOM weighs RM-ACTIVE at operation 10"
    counted = order.state.operation("10").counted
    material = order.master.materials[api.material]
    target = round_to_increment(
        weighing_target(api, counted, with_setup=False), material.increment, material.rounding
    )
    table = Table(
        title=f"Weighing RM-ACTIVE for {fmt(counted)} tubes — target {fmt(target)} kg "
        f"± {fmt(api.tolerance_pct or 0)} %",
        title_justify="left",
    )
    for name in ("gross", "tare", "net", "stable", "deviation %", "result", "lots"):
        table.add_column(name, justify="left" if name in ("result", "lots") else "right")
    for gross, tare, stable in (
        ("1.790", "0.500", False),
        ("1.840", "0.500", True),
        ("1.781", "0.500", True),
    ):
        reading = ScaleReading(Decimal(gross), Decimal(tare), "kg", stable)
        outcome = weigh(order.master, order.state, api, reading, target)
        lots = "—"
        if outcome.posting is not None:
            order.state = outcome.state
            b = order.bind(outcome.posting)
            lots = ", ".join(f"{d.lot} {fmt(d.quantity)}" for d in b.draws)
            result = f"posted {fmt(outcome.posting.quantity)} kg"
        else:
            assert outcome.rejection is not None
            result = f"rejected: {outcome.rejection.value}"
        deviation = _pct(outcome.deviation_pct)
        table.add_row(
            gross, tare, fmt(reading.net), "yes" if stable else "no", deviation, result, lots
        )
    out.print(table)


def _meter(out: Console, order: Order) -> None:
    water = order.bom.component("10", "RM-WATER", PostingMethod.METER)
    assert water is not None, "the example BOM meters RM-WATER at operation 10"
    table = Table(title="Metering RM-WATER — totalizer slices", title_justify="left")
    for name in ("slice", "totalizer Δ", "posted", "metered Σ", "issued Σ", "lots"):
        table.add_column(name, justify="left" if name == "lots" else "right")
    for n, delta in enumerate(("2.46", "3.05", "2.18", "0.04"), start=1):
        order.state, posting = meter(order.master, order.state, water, Decimal(delta), "L")
        b = order.bind(posting)
        table.add_row(
            str(n),
            f"{delta} L",
            f"{fmt(posting.quantity)} L",
            fmt(posting.theoretical),
            fmt(posting.issued),
            ", ".join(f"{d.lot} {fmt(d.quantity)}" for d in b.draws) or "—",
        )
    out.print(table)


def _close(out: Console, order: Order) -> None:
    returned = {"RM-BASE": Decimal("0.450"), "PK-TUBE-B": Decimal("0")}
    rows = close_variance(
        order.master,
        order.bom,
        order.state,
        ORDER_QUANTITY,
        VARIANCE_THRESHOLD_PCT,
        order.bindings,
        returned,
    )
    table = Table(
        title=f"Order close {ORDER} — variance per component (flag above "
        f"{fmt(VARIANCE_THRESHOLD_PCT)} %; RM-BASE 0.450 kg returned)",
        title_justify="left",
    )
    for name in (
        "op",
        "material",
        "uom",
        "planned",
        "theoretical",
        "issued",
        "substituted",
        "held",
        "actual",
        "variance",
        "variance %",
        "flag",
    ):
        table.add_column(name, justify="left" if name in ("material", "uom", "flag") else "right")
    for v in rows:
        mix = "; ".join(f"mix: {s.material} {fmt(s.quantity)} {s.uom}" for s in v.substitutions)
        table.add_row(
            v.operation,
            v.material,
            v.uom,
            fmt(v.planned),
            fmt(v.theoretical),
            fmt(v.issued),
            fmt(v.substituted),
            fmt(v.held),
            fmt(v.actual) if v.actual is not None else "—",
            fmt(v.variance),
            _pct(v.variance_pct),
            " ".join(x for x in ("FLAG" if v.flagged else "", mix) if x),
        )
    out.print(table)


def _pct(value: Fraction | None) -> str:
    """A percentage for display, to two places."""
    return (
        "—" if value is None else fmt(round_to_increment(value, Decimal("0.01"), Rounding.HALF_UP))
    )
