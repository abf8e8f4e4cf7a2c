"""Weighing (stable, net of tare, in tolerance → actual) and metering (totalizer deltas)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.domain.backflush import (
    ConsumptionState,
    ScaleReading,
    WeighingRejection,
    meter,
    weigh,
    weighing_target,
)
from edge_agent.domain.explosion import Component, explode
from edge_agent.domain.masterdata import MasterData, PostingMethod
from edge_agent.domain.quantities import Rounding, round_to_increment
from edge_agent.errors import ConsumptionError

from .builders import bom, line, master, material

D = Decimal


def setup() -> tuple[MasterData, Component, Component]:
    md = master(
        [
            material("API", uom="kg", increment="0.001", potency_managed=True),
            material("WATER", uom="L", increment="0.1", density="1"),
        ],
        [
            bom(
                "P",
                [
                    line("API", "0.5", uom="kg", method="weigh", tolerance_pct="2"),
                    line("WATER", "3", uom="L", method="meter"),
                ],
            )
        ],
    )
    exploded = explode(md, md.bom("P"))
    api = exploded.component("10", "API", PostingMethod.WEIGH)
    water = exploded.component("10", "WATER", PostingMethod.METER)
    assert api is not None
    assert water is not None
    return md, api, water


def test_stable_in_tolerance_reading_posts_the_actual_net_quantity() -> None:
    md, api, _ = setup()
    target = D(str(weighing_target(api, D(100), with_setup=False)))  # 50 kg
    out = weigh(
        md, ConsumptionState(), api, ScaleReading(D("52.730"), D("2.100"), "kg", True), target
    )
    assert out.accepted
    assert out.posting is not None
    assert out.posting.quantity == D("50.630")
    assert out.state.component(api.key).issued == D("50.630")


def test_reading_in_grams_converts_to_the_issue_unit() -> None:
    md, api, _ = setup()
    out = weigh(md, ConsumptionState(), api, ScaleReading(D("1003"), D("0"), "g", True), D(1))
    assert out.posting is not None
    assert out.posting.quantity == D("1.003")


@pytest.mark.parametrize(
    ("reading", "why"),
    [
        (ScaleReading(D("50"), D("0"), "kg", False), WeighingRejection.UNSTABLE),
        (ScaleReading(D("2"), D("2"), "kg", True), WeighingRejection.NOT_POSITIVE),
        (ScaleReading(D("51.001"), D("0"), "kg", True), WeighingRejection.OUT_OF_TOLERANCE),
        (ScaleReading(D("48.999"), D("0"), "kg", True), WeighingRejection.OUT_OF_TOLERANCE),
    ],
)
def test_rejected_reading_posts_nothing_and_keeps_the_state(
    reading: ScaleReading, why: WeighingRejection
) -> None:
    md, api, _ = setup()
    state = ConsumptionState()
    out = weigh(md, state, api, reading, D(50))
    assert not out.accepted
    assert out.rejection is why
    assert out.posting is None
    assert out.state is state
    assert out.net == reading.net


def test_tolerance_bounds_are_inclusive() -> None:
    md, api, _ = setup()
    for gross in ("51", "49"):
        out = weigh(md, ConsumptionState(), api, ScaleReading(D(gross), D(0), "kg", True), D(50))
        assert out.accepted, gross


def test_weighing_a_line_that_is_not_weighed_is_refused() -> None:
    md, _, water = setup()
    with pytest.raises(ConsumptionError, match="posted by 'meter', not by weighing"):
        weigh(md, ConsumptionState(), water, ScaleReading(D(1), D(0), "kg", True), D(1))


def test_meter_posts_the_totalizer_delta_in_the_issue_unit() -> None:
    md, _, water = setup()
    state, posting = meter(md, ConsumptionState(), water, D("1250"), "mL")
    assert posting.quantity == D("1.3")  # 1.25 L, half_up to 0.1 L
    state, posting = meter(md, state, water, D("1250"), "mL")
    assert posting.quantity == D("1.2")  # cumulative 2.5 L → 2.5: carried, not 1.3 again
    state, posting = meter(md, state, water, D("2"), "kg")  # through the density 1 kg/L
    assert posting.quantity == D("2.0")


@given(st.lists(st.decimals(min_value=D("0"), max_value=D("99.999"), places=3), max_size=30))
def test_metered_slices_sum_to_the_rounded_totalizer_delta(slices: list[Decimal]) -> None:
    md, _, water = setup()
    state = ConsumptionState()
    total = D(0)
    for s in slices:
        state, posting = meter(md, state, water, s, "L")
        total += posting.quantity
    assert total == round_to_increment(sum(slices, D(0)), D("0.1"), water_rounding(md))


def water_rounding(md: MasterData) -> Rounding:
    return md.materials["WATER"].rounding
