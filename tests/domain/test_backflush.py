"""Consumption: the worked examples of issue 2 and the no-drift property."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.domain.backflush import ConsumptionState, confirm, theoretical
from edge_agent.domain.explosion import explode
from edge_agent.domain.masterdata import MasterData, load_master_data
from edge_agent.domain.quantities import Rounding, round_to_increment
from edge_agent.errors import ConsumptionError

from .builders import bom, line, master, material

D = Decimal


def run(
    md: MasterData, product: str, operation: str, *confirmations: tuple[str, str]
) -> list[dict[str, Decimal]]:
    """Postings per confirmation as {material: quantity}."""
    exploded = explode(md, md.bom(product))
    state = ConsumptionState()
    out = []
    for good, scrap in confirmations:
        result = confirm(md, exploded, state, operation, D(good), D(scrap))
        state = result.state
        out.append({p.material: p.quantity for p in result.postings})
    return out


def test_one_gram_per_unit_issued_in_kilograms() -> None:
    md = master(
        [material("PERF", uom="kg", increment="0.001")], [bom("P", [line("PERF", "1", uom="g")])]
    )
    (posting,) = run(md, "P", "10", ("300", "0"))
    assert posting["PERF"] == D("0.300")
    assert str(posting["PERF"]) == "0.300"


def test_half_a_litre_of_liquid_at_density_issued_in_kilograms() -> None:
    md = master(
        [material("BASE", uom="kg", increment="0.001", density="0.92")],
        [bom("P", [line("BASE", "0.5", uom="L")])],
    )
    (posting,) = run(md, "P", "10", ("10", "0"))
    assert str(posting["BASE"]) == "4.600"


def test_component_scrap_applies_to_good_and_scrap() -> None:
    md = master([material("CAP")], [bom("P", [line("CAP", "1", scrap_pct="10")])])
    (posting,) = run(md, "P", "10", ("200", "20"))
    assert posting["CAP"] == 242


def test_setup_quantity_is_posted_once_per_order_and_operation() -> None:
    md = master(
        [material("BASE", uom="kg", increment="0.001")],
        [bom("P", [line("BASE", "0.2", uom="kg", setup_quantity="1.5", scrap_pct="10")])],
    )
    first, second, third = run(md, "P", "10", ("10", "0"), ("10", "0"), ("0", "1"))
    assert first["BASE"] == D("3.700")  # 10 × 0.2 × 1.1 + 1.5 (setup not inflated by scrap)
    assert second["BASE"] == D("2.200")
    assert third["BASE"] == D("0.220")


def test_setup_is_per_operation_not_per_confirmation_of_another_operation() -> None:
    md = master(
        [material("A"), material("B")],
        [
            bom(
                "P",
                [
                    line("A", "1", operation="10", setup_quantity="5"),
                    line("B", "1", operation="20", setup_quantity="3"),
                ],
            )
        ],
    )
    exploded = explode(md, md.bom("P"))
    r10 = confirm(md, exploded, ConsumptionState(), "10", D(1))
    r20 = confirm(md, exploded, r10.state, "20", D(1))
    assert [(p.material, p.quantity, p.setup_included) for p in r10.postings] == [("A", 6, True)]
    assert [(p.material, p.quantity, p.setup_included) for p in r20.postings] == [("B", 4, True)]


def test_two_level_phantom() -> None:
    md = master(
        [
            material("CAP"),
            material("FOIL", uom="m", increment="0.01", rounding="up"),
            material("GLUE", uom="kg", increment="0.001"),
        ],
        [
            bom("FG", [line("CLOSURE", "2", phantom=True, operation="20")]),
            bom(
                "CLOSURE",
                [line("CAP", "1", operation="99"), line("SEAL", "1", phantom=True, operation="99")],
            ),
            bom(
                "SEAL",
                [line("FOIL", "0.25", uom="m"), line("GLUE", "4", uom="g")],
                base_quantity="10",
            ),
        ],
    )
    (posting,) = run(md, "FG", "20", ("100", "0"))
    # 100 FG × 2 closures × (1 cap; 1 seal × 0.025 m foil, 0.4 g glue), at the phantom's operation
    assert posting == {"CAP": D(200), "FOIL": D("5.00"), "GLUE": D("0.080")}


def test_base_quantity_of_one_hundred() -> None:
    md = master(
        [material("LBL", rounding="up")], [bom("P", [line("LBL", "50")], base_quantity="100")]
    )
    postings = run(md, "P", "10", ("1", "0"), ("1", "0"), ("1", "0"))
    # 0.5 label a unit, rounding up, three confirmations of 1 → 1, 0, 1
    assert [p["LBL"] for p in postings] == [1, 0, 1]


def test_negative_correction_gives_compensating_postings() -> None:
    md = master(
        [material("A", uom="kg", increment="0.001")], [bom("P", [line("A", "0.125", uom="kg")])]
    )
    postings = run(md, "P", "10", ("10", "0"), ("-4", "0"))
    assert [p["A"] for p in postings] == [D("1.250"), D("-0.500")]


def test_correction_below_zero_is_refused_and_changes_nothing() -> None:
    md = master([material("A")], [bom("P", [line("A", "1")])])
    exploded = explode(md, md.bom("P"))
    state = confirm(md, exploded, ConsumptionState(), "10", D(3)).state
    with pytest.raises(ConsumptionError, match=r"operation 10: a good correction of -4"):
        confirm(md, exploded, state, "10", D(-4))
    assert state.operation("10").good == 3


def test_weigh_meter_and_manual_lines_are_not_posted_from_a_count() -> None:
    md = master(
        [
            material("A"),
            material("W", uom="kg", increment="0.001"),
            material("M", uom="L", increment="0.1"),
            material("X"),
        ],
        [
            bom(
                "P",
                [
                    line("A", "1"),
                    line("W", "1", uom="kg", method="weigh", tolerance_pct="1"),
                    line("M", "1", uom="L", method="meter"),
                    line("X", "1", method="manual"),
                ],
            )
        ],
    )
    (posting,) = run(md, "P", "10", ("5", "0"))
    assert posting == {"A": 5}


def test_state_round_trips_through_its_persisted_form() -> None:
    md = master([material("A", increment="0.5", rounding="up")], [bom("P", [line("A", "0.3")])])
    exploded = explode(md, md.bom("P"))
    state = confirm(md, exploded, ConsumptionState(), "10", D("3.5"), D("0.25")).state
    again = ConsumptionState.from_dict(state.to_dict())
    assert again.to_dict() == state.to_dict()
    assert again.operation("10") == state.operation("10")
    assert dict(again.components) == dict(state.components)


# ------------------------------------------------------------------------------- properties

increments = st.sampled_from(["1", "0.5", "0.1", "0.01", "0.001", "0.25", "2"])
quantities = st.decimals(min_value=D("0.0001"), max_value=D("500"), places=4)
base_quantities = st.sampled_from(["1", "3", "7", "10", "100", "0.6", "12.5"])
scraps = st.sampled_from(["0", "2", "10", "33.3", "0.5"])
setups = st.sampled_from(["0", "0", "1.5", "0.333", "10"])


@st.composite
def bom_and_confirmations(draw: st.DrawFn) -> tuple[MasterData, list[tuple[Decimal, Decimal]]]:
    n = draw(st.integers(1, 4))
    materials = [
        material(
            f"M{i}",
            uom=draw(st.sampled_from(["kg", "pc", "L", "m"])),
            increment=draw(increments),
            rounding=draw(st.sampled_from([r.value for r in Rounding])),
            density="0.92",
        )
        for i in range(n)
    ]
    lines = []
    for m in materials:
        unit = {"kg": "g", "pc": "pc", "L": "mL", "m": "cm"}[m["uom"]]
        lines.append(
            line(
                m["id"],
                str(draw(quantities)),
                uom=unit,
                scrap_pct=draw(scraps),
                setup_quantity=draw(setups),
            )
        )
    md = load_master_data(
        {
            "materials": materials,
            "boms": [bom("P", lines, base_quantity=draw(base_quantities))],
        }
    )
    steps = draw(
        st.lists(
            st.tuples(
                st.decimals(min_value=-50, max_value=200, places=draw(st.sampled_from([0, 2]))),
                st.decimals(min_value=-10, max_value=20, places=0),
            ),
            min_size=1,
            max_size=12,
        )
    )
    # keep cumulative good and scrap non-negative: a correction never exceeds what was confirmed
    good = scrap = D(0)
    sequence = []
    for step_good, step_scrap in steps:
        dg, ds = max(step_good, -good), max(step_scrap, -scrap)
        good, scrap = good + dg, scrap + ds
        sequence.append((dg, ds))
    return md, sequence


@given(bom_and_confirmations())
def test_no_drift_postings_sum_to_the_rounded_cumulative_theoretical(
    case: tuple[MasterData, list[tuple[Decimal, Decimal]]],
) -> None:
    md, sequence = case
    exploded = explode(md, md.bom("P"))
    state = ConsumptionState()
    totals: dict[str, Decimal] = {}
    for good, scrap in sequence:
        result = confirm(md, exploded, state, "10", good, scrap)
        state = result.state
        for p in result.postings:
            totals[p.material] = totals.get(p.material, D(0)) + p.quantity
            mat = md.materials[p.material]
            # each cumulative issue is the rounded theoretical, never more than a step away
            assert p.issued == totals[p.material]
            assert abs(Fraction(p.issued) - p.theoretical) < Fraction(mat.increment)
    progress = state.operation("10")
    for component in exploded.components:
        mat = md.materials[component.material]
        expected = round_to_increment(theoretical(component, progress), mat.increment, mat.rounding)
        assert totals[component.material] == expected


@given(bom_and_confirmations())
def test_a_sequence_and_its_sum_as_one_confirmation_issue_the_same_total(
    case: tuple[MasterData, list[tuple[Decimal, Decimal]]],
) -> None:
    md, sequence = case
    exploded = explode(md, md.bom("P"))
    state = ConsumptionState()
    for good, scrap in sequence:
        state = confirm(md, exploded, state, "10", good, scrap).state
    one = confirm(
        md,
        exploded,
        ConsumptionState(),
        "10",
        sum((g for g, _ in sequence), D(0)),
        sum((s for _, s in sequence), D(0)),
    )
    assert dict(one.state.components) == dict(state.components)
