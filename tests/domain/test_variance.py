"""Order-close variance: planned, theoretical, issued, actual and mix variance."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

from edge_agent.domain.backflush import ConsumptionState, confirm
from edge_agent.domain.explosion import explode
from edge_agent.domain.lots import BindingState, Lot, bind
from edge_agent.domain.variance import close_variance

from .builders import NOW, bom, line, master, material

D = Decimal


def test_variance_per_component_with_returns_and_substitution() -> None:
    md = master(
        [
            material("RESIN", uom="kg", increment="0.001"),
            material("RESIN-B", uom="kg", increment="0.001"),
            material("BOX"),
            material("DOC"),
        ],
        [
            bom(
                "P",
                [
                    line("RESIN", "0.2", uom="kg", setup_quantity="1", alternates=["RESIN-B"]),
                    line("BOX", "1"),
                    line("DOC", "1", method="manual"),
                ],
            )
        ],
    )
    exploded = explode(md, md.bom("P"))
    state = ConsumptionState()
    lots: tuple[Lot, ...] = (
        Lot("R1", "RESIN", D(10), NOW),
        Lot("RB", "RESIN-B", D(50), NOW),
        Lot("B1", "BOX", D(500), NOW),
    )
    bindings: dict[tuple[str, str, object], BindingState] = {}
    for good in (D(40), D(50)):
        result = confirm(md, exploded, state, "10", good, D(5))
        state = result.state
        for p in result.postings:
            b = bind(
                md,
                lots,
                bindings.get(p.component.key, BindingState()),
                p.material,
                p.quantity,
                NOW,
                p.component.alternates,
            )
            bindings[p.component.key], lots = b.state, b.lots
    report = {
        v.material: v
        for v in close_variance(
            md,
            exploded,
            state,
            order_quantity=D(110),
            threshold_pct=D(5),
            bindings=bindings,
            returned={"RESIN": D("2.5")},
        )
    }
    assert set(report) == {"RESIN", "BOX"}  # manual lines are issued in the MES
    resin = report["RESIN"]
    assert resin.planned == Fraction(23)  # 110 × 0.2 + 1
    assert resin.theoretical == Fraction(21)  # (90 good + 10 scrap) × 0.2 + 1
    assert resin.issued == 10  # the primary lot ran out …
    assert resin.substituted == 11  # … and the alternate covered the rest
    assert [(s.material, s.quantity) for s in resin.substitutions] == [("RESIN-B", D(11))]
    assert resin.actual == D("18.5")  # 2.5 kg returned at close
    assert resin.variance == Fraction("-2.5")
    assert resin.variance_pct == Fraction(-250, 21)
    assert resin.flagged
    box = report["BOX"]
    assert (box.planned, box.theoretical, box.issued, box.variance) == (110, 100, 100, 0)
    assert not box.flagged


def test_variance_without_lot_binding_uses_what_was_posted() -> None:
    md = master([material("A", rounding="up")], [bom("P", [line("A", "0.5")])])
    exploded = explode(md, md.bom("P"))
    state = confirm(md, exploded, ConsumptionState(), "10", D(3)).state
    (a,) = close_variance(md, exploded, state, D(4), threshold_pct=D(10))
    assert (a.planned, a.theoretical, a.issued) == (2, Fraction(3, 2), 2)
    assert a.variance_pct == Fraction(100, 3)
    assert a.flagged
