"""Continuous feeds: time slices of a totalizer, time-window lot binding, held parts, carry.

Worked examples first (a steady flow, change-overs with and without hold-up lag, expired and
quarantined lots, rounding carried over many small slices), then the properties of issue 4: slices
sum to the totalizer delta whatever the boundaries, lot changes and lag, and every part is bound
to the lot an independent oracle finds in the feed at (its window − lag).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.domain.feeds import (
    FeedCarry,
    FeedError,
    FeedSlice,
    FeedStaging,
    SliceOutsideReadings,
    SlicePart,
    SplitCause,
    TotalizerReading,
    due_slices,
    lot_at,
    slice_feed,
    totalizer_at,
)
from edge_agent.domain.lots import HoldReason, Lot, LotStatus
from edge_agent.domain.masterdata import Material
from edge_agent.domain.quantities import Rounding, round_to_increment

from .builders import NOW, master, material

D = Decimal
F = Fraction
T0 = NOW  # 08:00:00 UTC
SECOND = timedelta(seconds=1)
MINUTE = timedelta(minutes=1)
MS = timedelta(milliseconds=1)


def at(seconds: int | str) -> datetime:
    """T0 + seconds (a string for fractional seconds, kept exact)."""
    return T0 + timedelta(microseconds=int(D(str(seconds)) * 1_000_000))


def water(increment: str = "0.1", rounding: str = "half_up") -> Material:
    md = master([material("WATER", uom="L", increment=increment, rounding=rounding)], [])
    return md.materials["WATER"]


def steady(rate: str = "0.25", every: int = 10, until: int = 600, base: str = "1000") -> list:
    """Readings every ``every`` s from T0 at ``rate`` L/s."""
    return [TotalizerReading(at(s), D(base) + D(rate) * s) for s in range(0, until + every, every)]


def lot(
    lid: str,
    qty: str = "100000",
    expiry: datetime | None = None,
    status: LotStatus = LotStatus.RELEASED,
    mat: str = "WATER",
) -> Lot:
    return Lot(lid, mat, D(qty), T0 - timedelta(days=1), expiry, status)


def lots(*items: Lot) -> dict[str, Lot]:
    return {x.lot: x for x in items}


def stage(lid: str, seconds: int, mat: str = "WATER") -> FeedStaging:
    return FeedStaging(lid, mat, at(seconds))


def run(
    readings: list[TotalizerReading],
    bounds: list[datetime],
    staging: list[FeedStaging],
    lag: timedelta,
    carry: FeedCarry,
    mat: Material,
    balances: dict[str, Lot],
) -> list[FeedSlice]:
    """Slice [b0, b1), [b1, b2), ... carrying the rounding and the lot balances."""
    out = []
    current = dict(balances)
    for a, b in pairwise(bounds):
        result = slice_feed(readings, a, b, staging, lag, carry, mat, current)
        carry, current = result.carry, dict(result.lots)
        out.append(result)
    return out


def summary(result: FeedSlice) -> list[tuple[str | None, datetime, datetime, Fraction, Decimal]]:
    return [(p.lot, p.window_from, p.window_to, p.quantity, p.posted) for p in result.parts]


# --------------------------------------------------------------------------- worked examples


def test_steady_flow_over_a_sixty_second_slice() -> None:
    result = slice_feed(
        steady(), at(0), at(60), [stage("A", -3600)], timedelta(0), FeedCarry(), water(),
        lots(lot("A", "500")),
    )  # fmt: skip
    assert summary(result) == [("A", at(0), at(60), F(15), D("15.0"))]
    (part,) = result.parts
    assert part.held is None
    assert part.drawn == D("15.0")
    assert part.cause is SplitCause.SLICE
    assert not result.split
    assert result.lots["A"].quantity == D("485.0")
    assert result.carry == FeedCarry(at(60), F(1015), F(15), D("15.0"))
    assert result.reading_gap == 10 * SECOND


def test_a_slice_between_readings_is_interpolated_exactly() -> None:
    readings = [TotalizerReading(at(0), D(0)), TotalizerReading(at(90), D("1"))]
    assert totalizer_at(readings, at(30)) == F(1, 3)
    result = slice_feed(
        readings, at(30), at(60), [stage("A", -1)], timedelta(0), FeedCarry(),
        water("0.001"), lots(lot("A")),
    )  # fmt: skip
    assert result.quantity == F(1, 3)
    assert result.parts[0].posted == D("0.333")
    assert result.carry.totalizer == F(2, 3)


def test_changeover_without_lag_splits_the_slice_at_the_changeover() -> None:
    result = slice_feed(
        steady(), at(0), at(60), [stage("A", -3600), stage("B", 40)], timedelta(0),
        FeedCarry(), water(), lots(lot("A"), lot("B")),
    )  # fmt: skip
    assert summary(result) == [
        ("A", at(0), at(40), F(10), D("10.0")),
        ("B", at(40), at(60), F(5), D("5.0")),
    ]
    assert [p.cause for p in result.parts] == [SplitCause.SLICE, SplitCause.CHANGEOVER]
    assert result.split


def test_changeover_under_a_lag_reaches_the_meter_in_the_next_slice() -> None:
    # B goes into the tank at 08:00:40; the pipe holds 90 s, so B passes the meter from 08:02:10
    staging = [stage("A", -3600), stage("B", 40)]
    slices = run(
        steady(), [at(0), at(60), at(120), at(180)], staging, 90 * SECOND, FeedCarry(), water(),
        lots(lot("A"), lot("B")),
    )  # fmt: skip
    assert [summary(s) for s in slices] == [
        [("A", at(0), at(60), F(15), D("15.0"))],
        [("A", at(60), at(120), F(15), D("15.0"))],
        [("A", at(120), at(130), F(5, 2), D("2.5")), ("B", at(130), at(180), F(25, 2), D("12.5"))],
    ]
    assert lot_at(staging, at(129), 90 * SECOND) == staging[0]
    assert lot_at(staging, at(130), 90 * SECOND) == staging[1]


def test_lag_longer_than_a_slice_with_two_changeovers_landing_in_one_later_slice() -> None:
    # A → B at 08:00:40 and B → C at 08:01:10 in the feed; 150 s hold-up: 08:03:10 and 08:03:40
    staging = [stage("A", -3600), stage("B", 40), stage("C", 70)]
    bounds = [at(s) for s in range(0, 301, 60)]
    slices = run(
        steady(), bounds, staging, 150 * SECOND, FeedCarry(), water(),
        lots(lot("A"), lot("B"), lot("C")),
    )  # fmt: skip
    assert [[p.lot for p in s.parts] for s in slices] == [
        ["A"],
        ["A"],
        ["A"],
        ["A", "B", "C"],
        ["C"],
    ]
    assert summary(slices[3]) == [
        ("A", at(180), at(190), F(5, 2), D("2.5")),
        ("B", at(190), at(220), F(15, 2), D("7.5")),
        ("C", at(220), at(240), F(5), D("5.0")),
    ]
    # what B was in the feed for (30 s) is what B is drawn for at the meter
    assert sum(p.quantity for s in slices for p in s.parts if p.lot == "B") == F(30) * F(1, 4)


def test_an_expired_lot_is_held_from_its_expiry_on() -> None:
    result = slice_feed(
        steady(), at(0), at(60), [stage("A", -3600)], timedelta(0), FeedCarry(), water(),
        lots(lot("A", expiry=at(30))),
    )  # fmt: skip
    first, second = result.parts
    assert (first.window_to, first.drawn, first.held) == (at(30), D("7.5"), None)
    assert second.cause is SplitCause.EXPIRY
    assert second.held is not None
    assert (second.held.quantity, second.held.reason) == (D("7.5"), HoldReason.EXPIRED)
    assert second.drawn == 0
    assert result.lots["A"].quantity == D("100000") - D("7.5")
    assert result.posted == D("15.0")  # held, not dropped


def test_expiry_is_judged_when_the_material_passes_the_meter() -> None:
    # the material left the tank at 07:59:00 (before expiry) but reaches the meter at 08:00:00
    result = slice_feed(
        steady(), at(0), at(60), [stage("A", -3600)], 60 * SECOND, FeedCarry(), water(),
        lots(lot("A", expiry=at(0))),
    )  # fmt: skip
    (part,) = result.parts
    assert part.held is not None
    assert part.held.reason is HoldReason.EXPIRED


def test_a_quarantined_lot_in_the_feed_is_held_and_the_released_one_drawn() -> None:
    result = slice_feed(
        steady(), at(0), at(60), [stage("A", -3600), stage("Q", 20)], timedelta(0), FeedCarry(),
        water(), lots(lot("A"), lot("Q", status=LotStatus.QUARANTINED)),
    )  # fmt: skip
    a, q = result.parts
    assert (a.lot, a.drawn, a.held) == ("A", D("5.0"), None)
    assert q.held is not None
    assert (q.lot, q.held.quantity, q.held.reason) == ("Q", D("10.0"), HoldReason.QUARANTINED)
    assert result.lots["Q"].quantity == D("100000")


@pytest.mark.parametrize(
    ("staging", "balances", "reason", "detail"),
    [
        ([stage("A", 30)], lots(lot("A")), HoldReason.NO_STAGE, "no lot of WATER"),
        ([stage("X", -1)], lots(lot("A")), HoldReason.NO_STAGE, "not staged for the line"),
        ([stage("S", -1, "SUGAR")], lots(lot("S")), HoldReason.NO_STAGE, "of SUGAR, not WATER"),
        ([stage("S", -1)], lots(lot("S", mat="SUGAR")), HoldReason.NO_STAGE, "is SUGAR"),
        ([stage("B", -1)], lots(lot("B", status=LotStatus.BLOCKED)), HoldReason.BLOCKED, "block"),
        ([stage("E", -1)], lots(lot("E", expiry=at(-1))), HoldReason.EXPIRED, "expired at"),
    ],
)
def test_a_part_that_cannot_be_drawn_is_held_with_the_reason(
    staging: list[FeedStaging], balances: dict[str, Lot], reason: HoldReason, detail: str
) -> None:
    result = slice_feed(
        steady(), at(0), at(30), staging, timedelta(0), FeedCarry(), water(), balances
    )
    first = result.parts[0]
    assert first.held is not None
    assert first.held.reason is reason
    assert detail in first.held.detail
    assert first.held.quantity == first.posted > 0
    assert result.lots == balances


def test_a_lot_is_never_drawn_below_zero_the_rest_is_held_as_insufficient() -> None:
    slices = run(
        steady(), [at(0), at(60), at(120)], [stage("A", -1)], timedelta(0), FeedCarry(), water(),
        lots(lot("A", "10")),
    )  # fmt: skip
    first, second = (s.parts[0] for s in slices)
    assert first.drawn == D("10")
    assert first.held is not None
    assert (first.held.quantity, first.held.reason) == (D("5.0"), HoldReason.INSUFFICIENT)
    assert second.held is not None
    assert (second.drawn, second.held.quantity) == (0, D("15.0"))
    assert slices[-1].lots["A"].quantity == 0


@pytest.mark.parametrize("rounding", list(Rounding))
def test_rounding_is_carried_over_many_small_slices(rounding: Rounding) -> None:
    # 0.03 L a minute, posted every minute at an increment of 0.1 L for 100 minutes
    readings = [TotalizerReading(at(60 * k), D("0.03") * k) for k in range(101)]
    bounds = [at(60 * k) for k in range(101)]
    slices = run(
        readings, bounds, [stage("A", -1)], timedelta(0), FeedCarry(), water("0.1", rounding),
        lots(lot("A")),
    )  # fmt: skip
    posted = [s.posted for s in slices]
    assert all(p in (D("0.0"), D("0.1")) for p in posted)  # never 0.03 rounded on its own
    assert sum(posted, D(0)) == D("3.0")
    assert slices[-1].carry.measured == 3
    expected = {Rounding.HALF_UP: "0.0 0.1 0.0 0.0 0.1", Rounding.UP: "0.1 0.0 0.0 0.1 0.0"}
    expected[Rounding.DOWN] = "0.0 0.0 0.0 0.1 0.0"
    assert " ".join(str(p) for p in posted[:5]) == expected[rounding]


def test_the_carry_survives_json_and_a_restart_that_dropped_old_readings() -> None:
    staging, mat, balances = [stage("A", -1), stage("B", 50)], water("1"), lots(lot("A"), lot("B"))
    readings = [
        TotalizerReading(at(s), D(v)) for s, v in [(0, 0), (7, 2), (45, 20), (71, 31), (130, 50)]
    ]
    first = slice_feed(readings, at(0), at(60), staging, timedelta(0), FeedCarry(), mat, balances)
    carry = FeedCarry.from_dict(json.loads(json.dumps(first.carry.to_dict())))
    assert carry == first.carry
    assert first.carry.to_dict()["totalizer"] == "685/26"  # 20 + 11 × 15/26, exact
    kept = slice_feed(readings, at(60), at(120), staging, timedelta(0), carry, mat, first.lots)
    restarted = slice_feed(
        readings[3:], at(60), at(120), staging, timedelta(0), carry, mat, first.lots
    )
    assert restarted == kept


def test_readings_that_disagree_with_the_carried_totalizer_are_refused() -> None:
    carry = FeedCarry(at(60), F(1014), F(14), D("14.0"))
    with pytest.raises(FeedError, match="the totalizer series was changed"):
        slice_feed(steady(), at(60), at(120), [], timedelta(0), carry, water(), {})


def test_the_readings_gap_a_slice_was_interpolated_over_is_reported() -> None:
    readings = [TotalizerReading(at(s), D(s)) for s in (0, 10, 600, 610)]
    result = slice_feed(readings, at(0), at(60), [], timedelta(0), FeedCarry(), water(), {})
    assert result.reading_gap == 590 * SECOND


def test_an_empty_slice_posts_nothing_and_anchors_the_carry() -> None:
    result = slice_feed(steady(), at(5), at(5), [], timedelta(0), FeedCarry(), water(), {})
    assert result.parts == ()
    assert result.carry == FeedCarry(at(5), F("1001.25"), F(0), D(0))


# --------------------------------------------------------------------------- refused input


def test_slicing_outside_the_readings_is_refused_with_the_moments() -> None:
    readings = steady(until=60)
    with pytest.raises(SliceOutsideReadings) as caught:
        slice_feed(readings, at(60), at(120), [], timedelta(0), FeedCarry(), water(), {})
    assert (caught.value.at, caught.value.first, caught.value.last) == (at(120), at(0), at(60))
    with pytest.raises(SliceOutsideReadings, match="not known"):
        totalizer_at(readings, at(-1))
    with pytest.raises(SliceOutsideReadings, match="no readings"):
        totalizer_at([], at(0))


@pytest.mark.parametrize(
    ("readings", "message"),
    [
        ([(0, "5"), (10, "4.999")], "went down"),
        ([(0, "5"), (0, "6")], "strictly increasing"),
        ([(10, "5"), (0, "6")], "strictly increasing"),
    ],
)
def test_readings_out_of_order_or_going_down_are_refused(
    readings: list[tuple[int, str]], message: str
) -> None:
    with pytest.raises(FeedError, match=message):
        totalizer_at([TotalizerReading(at(s), D(v)) for s, v in readings], at(0))


def test_a_slice_must_start_where_the_last_one_ended() -> None:
    first = slice_feed(steady(), at(0), at(60), [], timedelta(0), FeedCarry(), water(), {})
    for start in (at(59), at(61)):
        with pytest.raises(FeedError, match="lose or double material"):
            slice_feed(steady(), start, at(120), [], timedelta(0), first.carry, water(), {})


def test_other_refusals() -> None:
    naive = datetime(2026, 11, 22, 8, 0)  # noqa: DTZ001  (naive on purpose)
    with pytest.raises(FeedError, match="timezone-aware"):
        TotalizerReading(naive, D(1))
    with pytest.raises(FeedError, match="timezone-aware"):
        FeedStaging("A", "WATER", naive)
    with pytest.raises(FeedError, match="exact"):
        TotalizerReading(at(0), 1.5)  # type: ignore[arg-type]
    with pytest.raises(FeedError, match="finite"):
        TotalizerReading(at(0), D("NaN"))
    with pytest.raises(FeedError, match="negative"):
        slice_feed(steady(), at(0), at(60), [], -SECOND, FeedCarry(), water(), {})
    with pytest.raises(FeedError, match="before it starts"):
        slice_feed(steady(), at(60), at(0), [], timedelta(0), FeedCarry(), water(), {})
    with pytest.raises(FeedError, match="both staged"):
        slice_feed(steady(), at(0), at(60), [stage("A", 1), stage("B", 1)], timedelta(0),
                   FeedCarry(), water(), {})  # fmt: skip
    with pytest.raises(FeedError, match="more than its measured quantity"):
        slice_feed(steady(), at(0), at(1), [], timedelta(0), FeedCarry(issued=D(9)), water(), {})
    with pytest.raises(FeedError, match="fraction"):
        FeedCarry.from_dict({"measured": 0.5})
    with pytest.raises(FeedError, match="fraction"):
        FeedCarry.from_dict({"totalizer": "1/0"})


def test_a_lot_staged_again_after_itself_is_not_a_changeover() -> None:
    result = slice_feed(
        steady(), at(0), at(60), [stage("A", -1), stage("A", 30)], timedelta(0), FeedCarry(),
        water(), lots(lot("A")),
    )  # fmt: skip
    assert summary(result) == [("A", at(0), at(60), F(15), D("15.0"))]


# --------------------------------------------------------------------------- when slices are due


def test_due_slices_on_the_minute_and_at_extra_boundaries() -> None:
    assert due_slices(at(0), at(210), MINUTE) == (
        (at(0), at(60)),
        (at(60), at(120)),
        (at(120), at(180)),
    )
    extra = [at(77), at(190), at(120), at(-5), at(0), at(211)]
    assert due_slices(at(0), at(210), MINUTE, extra) == (
        (at(0), at(60)),
        (at(60), at(77)),
        (at(77), at(120)),
        (at(120), at(180)),
        (at(180), at(190)),
    )
    # after an off-grid boundary the grid is kept: the next slice still ends on the minute
    assert due_slices(at(17), at(130), MINUTE) == ((at(17), at(60)), (at(60), at(120)))
    assert due_slices(at(17), at(59), MINUTE) == ()
    assert due_slices(at(17), at(17), MINUTE) == ()
    with pytest.raises(FeedError, match="greater than zero"):
        due_slices(at(0), at(60), timedelta(0))


@given(
    last=st.integers(-(10**6), 10**6),
    span=st.integers(0, 10**6),
    every=st.integers(1_000, 100_000),
    extra=st.lists(st.integers(-2 * 10**6, 2 * 10**6), max_size=8),
)
def test_due_slices_tile_from_the_last_end_and_end_on_every_boundary(
    last: int, span: int, every: int, extra: list[int]
) -> None:
    start, now, length = T0 + last * MS, T0 + (last + span) * MS, every * MS
    moments = [T0 + e * MS for e in extra]
    slices = due_slices(start, now, length, moments)
    ends = [b for _, b in slices]
    assert [a for a, _ in slices] == [start, *ends[:-1]][: len(slices)]
    assert all(a < b <= now and b - a <= length for a, b in slices)
    epoch = datetime(1970, 1, 1, tzinfo=T0.tzinfo)
    grid = {
        epoch + k * length
        for k in range((start - epoch) // length, (now - epoch) // length + 1)
        if start < epoch + k * length <= now
    }
    assert set(ends) == grid | {m for m in moments if start < m <= now}


# --------------------------------------------------------------------------- the properties


@dataclass(frozen=True)
class Scenario:
    readings: list[TotalizerReading]
    bounds: list[datetime]
    staging: list[FeedStaging]
    lag: timedelta
    balances: dict[str, Lot]
    material: Material
    measured: Fraction


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    gaps = draw(st.lists(st.integers(1, 120_000), min_size=1, max_size=10))
    moments = [0]
    for g in gaps:
        moments.append(moments[-1] + g)
    increments = draw(
        st.lists(
            st.decimals(min_value=0, max_value=50, places=3),
            min_size=len(gaps),
            max_size=len(gaps),
        )
    )
    base = draw(st.decimals(min_value=0, max_value=10**6, places=2))
    values = [base]
    for inc in increments:
        values.append(values[-1] + inc)
    readings = [TotalizerReading(T0 + m * MS, v) for m, v in zip(moments, values, strict=True)]
    span = moments[-1]
    cuts = draw(st.lists(st.integers(0, span), min_size=2, max_size=8, unique=True))
    bounds = [T0 + c * MS for c in sorted(cuts)]
    lag = draw(st.integers(0, 300_000)) * MS
    staging = [
        FeedStaging(lid, mat, T0 + m * MS)
        for lid, mat, m in draw(
            st.lists(
                st.tuples(
                    st.sampled_from("ABCABCD"),  # D is not staged for the line
                    st.sampled_from([*["WATER"] * 7, "SUGAR"]),
                    st.integers(-400_000, span),
                ),
                max_size=6,
                unique_by=lambda s: s[2],
            )
        )
    ]
    balances = {}
    for lid in "ABC":
        expiry = draw(st.none() | st.integers(0, span) | st.integers(-100_000, span + 100_000))
        balances[lid] = Lot(
            lid,
            draw(st.sampled_from([*["WATER"] * 7, "SUGAR"])),
            draw(st.decimals(min_value=0, max_value=500, places=1)),
            T0,
            None if expiry is None else T0 + expiry * MS,
            draw(st.sampled_from([*[LotStatus.RELEASED] * 4, *LotStatus])),
        )
    mat = Material(
        "WATER",
        "L",
        draw(st.sampled_from([D("0.001"), D("0.1"), D("0.5"), D("1"), D("5")])),
        draw(st.sampled_from(list(Rounding))),
    )
    measured = draw(st.fractions(min_value=0, max_value=100, max_denominator=1000))
    return Scenario(readings, bounds, staging, lag, balances, mat, measured)


def oracle_q(readings: list[TotalizerReading], moment: datetime) -> Fraction:
    """The totalizer at ``moment`` by a linear scan of the readings."""
    for r0, r1 in pairwise(readings):
        if r0.at <= moment <= r1.at:
            step = (moment - r0.at) // timedelta(microseconds=1)
            whole = (r1.at - r0.at) // timedelta(microseconds=1)
            return F(r0.cumulative) + (F(r1.cumulative) - F(r0.cumulative)) * F(step, whole)
    assert len(readings) == 1
    assert readings[0].at == moment
    return F(readings[0].cumulative)


def oracle_staged(staging: list[FeedStaging], moment: datetime) -> FeedStaging | None:
    """The staging in the feed at ``moment``, by brute force."""
    before = [s for s in staging if s.from_ <= moment]
    return max(before, key=lambda s: s.from_) if before else None


def initial_carry(sc: Scenario) -> FeedCarry:
    rounded = round_to_increment(sc.measured, sc.material.increment, sc.material.rounding)
    return FeedCarry(measured=sc.measured, issued=rounded)


def rounded(sc: Scenario, value: Fraction) -> Decimal:
    return round_to_increment(value, sc.material.increment, sc.material.rounding)


@given(scenarios(), st.booleans())
def test_slices_sum_to_the_totalizer_delta_and_postings_to_its_rounded_delta(
    sc: Scenario, drop_sliced_readings: bool
) -> None:
    carry = initial_carry(sc)
    balances = dict(sc.balances)
    slices = []
    for a, b in pairwise(sc.bounds):
        # after a restart the engine may have kept only the readings after the last slice
        readings = [
            r for r in sc.readings if not (drop_sliced_readings and carry.until) or r.at > a
        ]
        result = slice_feed(readings, a, b, sc.staging, sc.lag, carry, sc.material, balances)
        # (a) per slice and (b) per slice: exact delta, rounded delta with the carry
        assert sum(p.quantity for p in result.parts) == result.quantity
        assert result.quantity == oracle_q(sc.readings, b) - oracle_q(sc.readings, a)
        assert result.posted == rounded(sc, result.carry.measured) - carry.issued
        assert result.carry.issued == rounded(sc, result.carry.measured)
        carry, balances = result.carry, dict(result.lots)
        slices.append(result)
    start, end = sc.bounds[0], sc.bounds[-1]
    total = oracle_q(sc.readings, end) - oracle_q(sc.readings, start)
    # (a) no material created or lost by slicing and splitting
    assert sum(p.quantity for s in slices for p in s.parts) == total
    # (b) postings add up to the rounded cumulative quantity, whatever the boundaries
    issued_before = rounded(sc, sc.measured)
    assert sum((s.posted for s in slices), D(0)) == rounded(sc, sc.measured + total) - issued_before
    for s in slices:
        for p in s.parts:
            assert p.posted >= 0
            assert (p.posted / sc.material.increment) % 1 == 0, "a multiple of the increment"
            assert abs(F(p.posted) - p.quantity) < F(sc.material.increment)
            assert p.window_from < p.window_to
    # the parts tile [start, end) without gap or overlap
    windows = [(p.window_from, p.window_to) for s in slices for p in s.parts]
    assert [w[0] for w in windows[1:]] == [w[1] for w in windows[:-1]]
    if windows:
        assert (windows[0][0], windows[-1][1]) == (start, end)


def contents(staged: FeedStaging | None) -> tuple[str, str] | None:
    return None if staged is None else (staged.lot, staged.material)


def oracle_per_lot(sc: Scenario) -> dict[str | None, Fraction]:
    """Exact quantity per lot over the whole run, from the feed's staging windows shifted by the
    lag: what was metered while each lot's material was reaching the meter."""
    start, end = sc.bounds[0], sc.bounds[-1]
    ordered = sorted(sc.staging, key=lambda s: s.from_)
    reach = [s.from_ + sc.lag for s in ordered]
    windows = [(None, start - timedelta(days=1), reach[0] if reach else end)]
    windows += [
        (s.lot, lo, hi) for s, (lo, hi) in zip(ordered, pairwise([*reach, end]), strict=True)
    ]
    totals: defaultdict[str | None, Fraction] = defaultdict(Fraction)
    for lid, lo, hi in windows:
        a, b = max(lo, start), min(hi, end)
        if a < b:
            totals[lid] += oracle_q(sc.readings, b) - oracle_q(sc.readings, a)
    return {k: v for k, v in totals.items() if v}


def per_lot(slices: list[FeedSlice]) -> dict[str | None, Fraction]:
    totals: defaultdict[str | None, Fraction] = defaultdict(Fraction)
    for s in slices:
        for p in s.parts:
            totals[p.lot] += p.quantity
    return {k: v for k, v in totals.items() if v}


@given(scenarios())
def test_every_part_is_bound_to_the_lot_in_the_feed_at_its_window_minus_the_lag(
    sc: Scenario,
) -> None:
    slices = run(
        sc.readings, sc.bounds, sc.staging, sc.lag, initial_carry(sc), sc.material, sc.balances
    )
    drawn: defaultdict[str, Decimal] = defaultdict(Decimal)
    for s in slices:
        for p in s.parts:
            # (c) the lot in the feed at the part's midpoint − lag ...
            staged = oracle_staged(
                sc.staging, p.window_from + (p.window_to - p.window_from) / 2 - sc.lag
            )
            assert p.lot == (staged.lot if staged else None)
            # ... is the lot over the whole window: at its start and at every change-over within
            inside = [c.from_ + sc.lag for c in sc.staging]
            for moment in [p.window_from, *(m for m in inside if p.window_from < m < p.window_to)]:
                assert contents(oracle_staged(sc.staging, moment - sc.lag)) == contents(staged)
            check_eligibility(sc, p, staged)
            if p.lot is not None:
                drawn[p.lot] += p.drawn
    # each lot gets exactly what was metered while its material reached the meter
    assert per_lot(slices) == oracle_per_lot(sc)
    # never below zero, and every draw is what the lot lost
    final = slices[-1].lots if slices else sc.balances
    for lid, original in sc.balances.items():
        assert final[lid].quantity >= 0
        assert original.quantity - final[lid].quantity == drawn[lid]


def check_eligibility(sc: Scenario, p: SlicePart, staged: FeedStaging | None) -> None:
    """The hold reason an oracle expects for the part's lot (the lots' rules, in their order)."""
    assert p.drawn >= 0
    assert p.held is None or 0 < p.held.quantity <= p.posted
    lot = sc.balances.get(staged.lot) if staged else None
    if staged is None or staged.material != "WATER" or lot is None or lot.material != "WATER":
        expected: HoldReason | None = HoldReason.NO_STAGE
    elif lot.expiry is not None and lot.expiry <= p.window_from:
        expected = HoldReason.EXPIRED
    elif lot.status is not LotStatus.RELEASED:
        expected = HoldReason(lot.status.value)
    else:
        # a usable lot is usable over the whole window: an expiry inside splits the part
        assert lot.expiry is None or not p.window_from < lot.expiry < p.window_to
        expected = None
    if expected is None:
        assert p.held is None or p.held.reason is HoldReason.INSUFFICIENT
    elif p.posted > 0:
        assert p.held is not None
        assert (p.held.reason, p.held.quantity) == (expected, p.posted)
    else:
        assert p.held is None


@given(scenarios(), st.data())
def test_splitting_a_slice_in_two_changes_no_lot_total(sc: Scenario, data: st.DataObject) -> None:
    a, b = sc.bounds[0], sc.bounds[-1]
    cut = a + data.draw(st.integers(0, (b - a) // MS)) * MS
    carry = initial_carry(sc)
    whole = run(sc.readings, [a, b], sc.staging, sc.lag, carry, sc.material, sc.balances)
    halves = run(sc.readings, [a, cut, b], sc.staging, sc.lag, carry, sc.material, sc.balances)

    # (d) the same exact quantity per lot, and the same carry at the end
    assert per_lot(whole) == per_lot(halves)
    assert whole[-1].carry == halves[-1].carry
    assert sum((s.posted for s in whole), D(0)) == sum((s.posted for s in halves), D(0))


@given(
    st.none() | st.integers(0, 10**9),
    st.fractions(min_value=0, max_value=10**6),
    st.fractions(min_value=0, max_value=10**6),
    st.decimals(min_value=0, max_value=10**6, places=3),
)
def test_the_carry_round_trips_through_json(
    until: int | None, totalizer: Fraction, measured: Fraction, issued: Decimal
) -> None:
    carry = FeedCarry(None if until is None else T0 + until * MS, totalizer, measured, issued)
    assert FeedCarry.from_dict(json.loads(json.dumps(carry.to_dict()))) == carry


# --------------------------------------------------------------------------- docs/feeds.md


@pytest.mark.parametrize("quarantined", [False, True])
def test_the_worked_example_of_the_docs(quarantined: bool) -> None:
    readings = [
        TotalizerReading(at(s), D(v))
        for s, v in [(0, "1000.00"), (45, "1006.75"), (90, "1013.50"), (150, "1019.50")]
    ]
    staging = [stage("W-0815", -7200), stage("W-0816", 40)]
    status = LotStatus.QUARANTINED if quarantined else LotStatus.RELEASED
    balances = lots(lot("W-0815", "500"), lot("W-0816", "500", status=status))
    # the last reading is at 08:02:30 and operation 20 completed at 08:01:17
    due = due_slices(at(0), at(150), MINUTE, [at(77)])
    assert due == ((at(0), at(60)), (at(60), at(77)), (at(77), at(120)))
    slices = run(
        readings, [at(0), at(60), at(77), at(120)], staging, 30 * SECOND, FeedCarry(), water(),
        balances,
    )  # fmt: skip
    rows = [
        (p.lot, p.window_from, p.window_to, p.quantity, p.posted, p.cause)
        for s in slices for p in s.parts
    ]  # fmt: skip
    assert rows == [
        ("W-0815", at(0), at(60), F(9), D("9.0"), SplitCause.SLICE),
        ("W-0815", at(60), at(70), F("1.5"), D("1.5"), SplitCause.SLICE),
        ("W-0816", at(70), at(77), F("1.05"), D("1.1"), SplitCause.CHANGEOVER),
        ("W-0816", at(77), at(120), F("4.95"), D("4.9"), SplitCause.SLICE),
    ]
    assert [s.totalizer_end for s in slices] == [F(1009), F("1011.55"), F("1016.5")]
    assert slices[-1].carry.to_dict() == {
        "until": "2026-11-22T08:02:00+00:00",
        "totalizer": "2033/2",
        "measured": "33/2",
        "issued": "16.5",
    }
    held = [(p.held.quantity, p.held.reason) for s in slices for p in s.parts if p.held]
    if quarantined:
        assert held == [(D("1.1"), HoldReason.QUARANTINED), (D("4.9"), HoldReason.QUARANTINED)]
        assert slices[-1].lots["W-0816"].quantity == 500
    else:
        assert held == []
        assert slices[-1].lots["W-0816"].quantity == D("494.0")
    assert slices[-1].lots["W-0815"].quantity == D("489.5")
