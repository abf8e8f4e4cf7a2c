"""Lot binding: FEFO/FIFO, eligibility, never below zero, held requirements, substitution."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from fractions import Fraction
from unittest.mock import patch

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from edge_agent.domain.lots import (
    BindingState,
    Fill,
    HoldReason,
    Lot,
    LotDraw,
    LotStatus,
    bind,
    fefo_order,
    load_lots,
    retry_held,
    reverse_posting,
)
from edge_agent.domain.masterdata import Alternate, MasterData
from edge_agent.domain.quantities import round_to_increment
from edge_agent.errors import ConsumptionError, LotDataError

from .builders import NOW, bom, line, master, material

D = Decimal
DAY = timedelta(days=1)


def md(**primary: object) -> MasterData:
    return master(
        [
            material("P", uom="kg", increment="0.001", **primary),
            material("ALT-G", uom="g", increment="1", rounding="up"),
            material("ALT-KG", uom="kg", increment="0.01", rounding="half_up"),
        ],
        [
            bom(
                "FG",
                [
                    line(
                        "P",
                        "1",
                        uom="kg",
                        alternates=["ALT-G", {"material": "ALT-KG", "factor": "1.05"}],
                    )
                ],
            )
        ],
    )


ALTS = (Alternate("ALT-G"), Alternate("ALT-KG", D("1.05")))


def lot(
    lid: str,
    qty: str,
    material: str = "P",
    expiry_days: int | None = None,
    staged_days: int = -1,
    status: LotStatus = LotStatus.RELEASED,
) -> Lot:
    return Lot(
        lid,
        material,
        D(qty),
        NOW + staged_days * DAY,
        None if expiry_days is None else NOW + expiry_days * DAY,
        status,
    )


def test_fefo_then_fifo_no_expiry_last() -> None:
    lots = [
        lot("none-old", "1", staged_days=-9),
        lot("late", "1", expiry_days=90),
        lot("early", "1", expiry_days=30, staged_days=-1),
        lot("early-older", "1", expiry_days=30, staged_days=-5),
        lot("none-new", "1"),
    ]
    assert [x.lot for x in fefo_order(lots)] == [
        "early-older",
        "early",
        "late",
        "none-old",
        "none-new",
    ]


def test_splits_across_lots_in_fefo_order() -> None:
    b = bind(
        md(),
        [lot("L2", "5", expiry_days=60), lot("L1", "2", expiry_days=10)],
        BindingState(),
        "P",
        D("6"),
        NOW,
    )
    assert [(d.lot, d.quantity) for d in b.draws] == [("L1", D(2)), ("L2", D(4))]
    assert {x.lot: x.quantity for x in b.lots} == {"L1": 0, "L2": 1}
    assert b.held is None


def test_expired_quarantined_and_blocked_lots_are_never_drawn() -> None:
    lots = [
        lot("EXP", "9", expiry_days=0),
        lot("QUA", "9", status=LotStatus.QUARANTINED),
        lot("BLK", "9", status=LotStatus.BLOCKED),
        lot("OK", "1", expiry_days=1),
    ]
    b = bind(md(), lots, BindingState(), "P", D("3"), NOW)
    assert [(d.lot, d.quantity) for d in b.draws] == [("OK", D(1))]
    assert b.held is not None
    assert b.held.quantity == 2
    # the stock that is left is unusable: the reason says why, the detail names every lot
    assert b.held.reason is HoldReason.EXPIRED
    assert "EXP expired, QUA quarantined, BLK blocked" in b.held.detail


@pytest.mark.parametrize(
    ("lots", "reason"),
    [
        ([], HoldReason.NO_STAGE),
        ([lot("X", "5", material="ALT-G")], HoldReason.NO_STAGE),
        ([lot("E", "5", expiry_days=-1)], HoldReason.EXPIRED),
        ([lot("Q", "5", status=LotStatus.QUARANTINED)], HoldReason.QUARANTINED),
        ([lot("B", "5", status=LotStatus.BLOCKED)], HoldReason.BLOCKED),
        ([lot("Z", "0")], HoldReason.INSUFFICIENT),
    ],
)
def test_held_requirement_names_the_reason(lots: list[Lot], reason: HoldReason) -> None:
    b = bind(md(), lots, BindingState(), "P", D("1.5"), NOW)
    assert b.draws == ()
    assert b.held is not None
    assert (b.held.quantity, b.held.reason) == (D("1.5"), reason)
    assert b.state.held == D("1.5")


def test_held_requirement_posts_once_a_lot_is_staged() -> None:
    m = md()
    held = bind(m, [], BindingState(), "P", D("1.5"), NOW)
    assert held.held is not None
    staged = [*held.lots, lot("NEW", "10")]
    nothing = retry_held(m, [], held.state, "P", NOW)
    assert nothing.draws == ()
    assert nothing.state.held == D("1.5")
    posted = retry_held(m, staged, held.state, "P", NOW)
    assert [(d.lot, d.quantity) for d in posted.draws] == [("NEW", D("1.5"))]
    assert posted.state.held == 0
    assert posted.held is None


def test_alternate_is_drawn_when_the_primary_has_no_eligible_stock() -> None:
    b = bind(
        md(),
        [lot("P1", "1"), lot("G1", "5000", material="ALT-G")],
        BindingState(),
        "P",
        D("1.2345"),
        NOW,
        ALTS,
    )
    # 1 kg from the primary, the rest 0.2345 kg = 234.5 g → 235 g (ALT-G rounds up)
    assert [(d.lot, d.quantity, d.substitution) for d in b.draws] == [
        ("P1", D(1), False),
        ("G1", D(235), True),
    ]
    assert b.substitution
    assert b.state.substituted["ALT-G"] == D("0.2345")


def test_an_alternate_that_cannot_cover_the_rest_is_skipped_for_the_next() -> None:
    lots = [lot("G1", "100", material="ALT-G"), lot("K1", "5", material="ALT-KG")]
    b = bind(md(), lots, BindingState(), "P", D("2"), NOW, ALTS)
    assert [(d.lot, d.quantity) for d in b.draws] == [("K1", D("2.10"))]  # factor 1.05


def test_substitution_rounding_is_carried() -> None:
    m = md()
    lots: tuple[Lot, ...] = (lot("G1", "5000", material="ALT-G"),)
    state = BindingState()
    drawn = D(0)
    for _ in range(10):
        b = bind(m, lots, state, "P", D("0.0004"), NOW, ALTS)  # 0.4 g each, rounding up
        state, lots = b.state, b.lots
        drawn += sum((d.quantity for d in b.draws), D(0))
    assert drawn == 4  # 4 g in all, not 10 × 1 g


def test_single_lot_per_operation_holds_a_deviation_instead_of_splitting() -> None:
    m = md(single_lot_per_operation=True)
    lots = [lot("L1", "2", expiry_days=10), lot("L2", "50", expiry_days=20)]
    first = bind(m, lots, BindingState(), "P", D("1.5"), NOW)
    assert [d.lot for d in first.draws] == ["L1"]
    second = bind(m, first.lots, first.state, "P", D("1"), NOW)
    assert second.draws == ()
    assert second.held is not None
    assert second.held.reason is HoldReason.SINGLE_LOT_DEVIATION


def test_correction_cancels_held_first_then_returns_last_drawn_first() -> None:
    m = md()
    b1 = bind(
        m,
        [lot("L1", "1", expiry_days=1), lot("L2", "1", expiry_days=2)],
        BindingState(),
        "P",
        D("3"),
        NOW,
    )
    assert b1.state.held == 1
    b2 = bind(m, b1.lots, b1.state, "P", D("-1.5"), NOW)
    assert b2.held_cancelled == 1
    assert [(d.lot, d.quantity) for d in b2.draws] == [("L2", D("-0.5"))]
    b3 = bind(m, b2.lots, b2.state, "P", D("-1.5"), NOW)
    assert [(d.lot, d.quantity) for d in b3.draws] == [("L2", D("-0.5")), ("L1", D(-1))]
    assert {x.lot: x.quantity for x in b3.lots} == {"L1": 1, "L2": 1}
    with pytest.raises(ConsumptionError, match="exceeds what is bound"):
        bind(m, b3.lots, b3.state, "P", D("-0.001"), NOW)


def test_lots_document_is_validated_against_master_data() -> None:
    m = md()
    lots = load_lots(
        {
            "lots": [
                {
                    "lot": "L1",
                    "material": "P",
                    "quantity": "2.5",
                    "uom": "kg",
                    "expiry": "2027-01-31",
                    "staged_at": "2026-11-21T22:00:00Z",
                }
            ]
        },
        m,
    )
    assert lots[0].quantity == D("2.5")
    with pytest.raises(LotDataError) as exc:
        load_lots(
            {
                "lots": [
                    {"lot": "L3", "material": "P", "quantity": "-1", "staged_at": "2026-11-21"},
                ]
            },
            m,
        )
    assert exc.value.problems[0].startswith("lots[0] (L3) › quantity")
    with pytest.raises(LotDataError) as exc:
        load_lots(
            {
                "lots": [
                    {"lot": "L1", "material": "NOPE", "quantity": "1", "staged_at": "2026-11-21"},
                    {
                        "lot": "L2",
                        "material": "P",
                        "quantity": "1",
                        "uom": "g",
                        "staged_at": "2026-11-21",
                    },
                    {"lot": "L2", "material": "P", "quantity": "1", "staged_at": "2026-11-21"},
                ]
            },
            m,
        )
    assert exc.value.problems == (
        "lots[0] (L1) › material: unknown material 'NOPE'",
        "lots[1] (L2) › uom: lot quantities are in the material's issue unit 'kg' (got 'g')",
        "lots[2] (L2) › lot: duplicate lot 'L2'",
    )


# ------------------------------------------------------------------------------- properties

lot_strategy = st.builds(
    lambda i, material, qty, expiry, staged, status: Lot(
        f"{material}-{i}",
        material,
        qty,
        NOW + staged * DAY,
        None if expiry is None else NOW + expiry * DAY,
        status,
    ),
    st.integers(0, 10**6),
    st.sampled_from(["P", "P", "P", "ALT-G", "ALT-KG"]),
    st.decimals(min_value=0, max_value=5, places=3),
    st.one_of(st.none(), st.integers(-3, 30)),
    st.integers(-10, 0),
    st.sampled_from([LotStatus.RELEASED] * 4 + [LotStatus.QUARANTINED, LotStatus.BLOCKED]),
)
steps = st.lists(
    st.one_of(st.decimals(min_value=D("-3"), max_value=D("3"), places=3), st.just("retry")),
    min_size=1,
    max_size=15,
)


@given(st.lists(lot_strategy, max_size=8, unique_by=lambda x: x.lot), steps, st.booleans())
def test_binding_never_goes_below_zero_never_touches_an_ineligible_lot_and_conserves(
    initial: list[Lot], sequence: list[Decimal | str], single_lot: bool
) -> None:
    m = md(single_lot_per_operation=single_lot)
    lots: tuple[Lot, ...] = tuple(initial)
    start = {x.lot: x for x in initial}
    state = BindingState()
    required = D(0)
    for step in sequence:
        before = {x.lot: x for x in lots}
        if step == "retry":
            b = retry_held(m, lots, state, "P", NOW, ALTS)
        else:
            assert isinstance(step, Decimal)
            q = max(step, -required)  # a correction never exceeds what was required
            required += q
            b = bind(m, lots, state, "P", q, NOW, ALTS)
        lots, state = b.lots, b.state
        after = {x.lot: x for x in lots}
        event(f"held {b.held.reason.value}" if b.held else "not held")
        if b.substitution:
            event("substitution")
        if any(d.quantity < 0 for d in b.draws):
            event("returned to a lot")
        assert all(x.quantity >= 0 for x in lots), "never below zero"
        for d in b.draws:
            if d.quantity > 0:
                assert before[d.lot].is_eligible(NOW), f"drew from ineligible lot {d.lot}"
                assert d.quantity <= before[d.lot].quantity
        primary_draws = [d for d in b.draws if d.quantity > 0 and d.material == "P"]
        if primary_draws and not single_lot:
            # FEFO: every eligible primary lot ahead of the last one drawn was emptied first
            order = [
                x.lot
                for x in fefo_order(
                    v for v in before.values() if v.material == "P" and v.is_eligible(NOW)
                )
            ]
            last = order.index(primary_draws[-1].lot)
            assert all(after[lid].quantity == 0 for lid in order[:last])
        if b.held is not None and not single_lot:
            assert not any(x.material == "P" and x.is_eligible(NOW) for x in lots), (
                "held while an eligible primary lot still has stock"
            )
        # conservation: what was required is bound to lots or held, nothing else
        assert state.drawn + state.held == required
        for x in lots:
            drawn_from_lot = start[x.lot].quantity - x.quantity
            assert drawn_from_lot >= 0
        for alt, factor in (("ALT-G", Fraction(1000)), ("ALT-KG", Fraction("1.05"))):
            drawn = sum(
                (start[x.lot].quantity - x.quantity for x in lots if x.material == alt), D(0)
            )
            assert drawn == state.alternate_issued.get(alt, 0)
            mat = m.materials[alt]
            assert drawn == round_to_increment(
                Fraction(state.substituted.get(alt, D(0))) * factor, mat.increment, mat.rounding
            )
        primary_drawn = sum(
            (start[x.lot].quantity - x.quantity for x in lots if x.material == "P"), D(0)
        )
        assert primary_drawn + sum(state.substituted.values(), D(0)) == state.drawn


def test_correction_after_a_substitution_returns_the_alternate_first() -> None:
    m = md()
    b1 = bind(
        m,
        [lot("P1", "1"), lot("G1", "5000", material="ALT-G")],
        BindingState(),
        "P",
        D("1.2345"),
        NOW,
        ALTS,
    )
    b2 = bind(m, b1.lots, b1.state, "P", D("-0.5"), NOW)
    # the substitution was drawn last: 0.2345 kg of cover → its 235 g go back, then 0.2655 kg
    assert [(d.lot, d.quantity, d.substitution) for d in b2.draws] == [
        ("G1", D(-235), True),
        ("P1", D("-0.2655"), False),
    ]
    assert {x.lot: x.quantity for x in b2.lots} == {"P1": D("0.2655"), "G1": D(5000)}
    assert b2.state.substituted["ALT-G"] == 0
    assert b2.state.alternate_issued["ALT-G"] == 0


def test_partial_return_of_a_substitution_keeps_its_rounding_carry() -> None:
    m = md()
    lots: tuple[Lot, ...] = (lot("G1", "5000", material="ALT-G"),)
    state = BindingState()
    for _ in range(10):  # 10 × 0.4 g, rounding up cumulatively: 4 g drawn
        b = bind(m, lots, state, "P", D("0.0004"), NOW, ALTS)
        state, lots = b.state, b.lots
    back = bind(m, lots, state, "P", D("-0.0025"), NOW)
    # 1.5 g stays substituted → 2 g rounded up, so 2 of the 4 g go back
    assert [(d.lot, d.quantity) for d in back.draws] == [("G1", D(-2))]
    assert back.state.alternate_issued["ALT-G"] == 2
    assert {x.lot: x.quantity for x in back.lots} == {"G1": D(4998)}


postings = st.lists(st.decimals(min_value=D("0.001"), max_value=D("3"), places=3), max_size=8)


@given(
    st.lists(lot_strategy, max_size=8, unique_by=lambda x: x.lot),
    postings,
    st.integers(0, 7),
)
def test_a_reversal_gives_back_exactly_what_its_posting_drew(
    initial: list[Lot], quantities: list[Decimal], pick: int
) -> None:
    m = md()
    lots: tuple[Lot, ...] = tuple(initial)
    state = BindingState()
    made = []
    for q in quantities:
        b = bind(m, lots, state, "P", q, NOW)  # no alternates: a reversal refuses those
        lots, state = b.lots, b.state
        made.append(b)
    if not made:
        return
    target = made[pick % len(made)]
    held = target.held.quantity if target.held else D(0)
    if held > state.held:
        event("refused: its held part was bound since")
        return
    before = {x.lot: x.quantity for x in lots}
    undone = reverse_posting(lots, state, target.draws, held)
    after = {x.lot: x.quantity for x in undone.lots}
    given_back = {d.lot: D(0) for d in target.draws}
    for d in target.draws:
        given_back[d.lot] += d.quantity
    assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == {
        k: v for k, v in given_back.items() if v
    }
    assert undone.state.drawn == state.drawn - sum(given_back.values(), D(0))
    assert undone.state.held == state.held - held
    assert [(d.lot, -d.quantity) for d in undone.draws] == [
        (d.lot, d.quantity) for d in target.draws
    ]


@given(
    st.lists(lot_strategy, max_size=8, unique_by=lambda x: x.lot),
    st.decimals(min_value=D("0.001"), max_value=D("3"), places=3),
    st.decimals(min_value=D("0"), max_value=D("3"), places=3),
    st.integers(0, 7),
)
def test_what_is_held_for_one_lot_is_only_ever_drawn_from_that_lot(
    initial: list[Lot], any_lot: Decimal, for_lot: Decimal, pick: int
) -> None:
    m = md()
    primary = [x for x in initial if x.material == "P"]
    lot_id = primary[pick % len(primary)].lot if primary else "P-feed"
    state = BindingState(held=any_lot + for_lot, held_lots={lot_id: for_lot} if for_lot else {})
    b = retry_held(m, initial, state, "P", NOW)
    from_lot = sum((d.quantity for d in b.draws if d.lot == lot_id), D(0))
    elsewhere = sum((d.quantity for d in b.draws if d.lot != lot_id), D(0))
    assert from_lot <= for_lot + any_lot
    assert elsewhere <= any_lot  # a lot-bound hold never moves to another lot
    assert b.state.held + b.state.drawn == state.held  # nothing created or lost
    assert b.state.held_lots.get(lot_id, D(0)) <= for_lot
    assert all(x.quantity >= 0 for x in b.lots)
    target = next((x for x in initial if x.lot == lot_id), None)
    if target is not None and target.is_eligible(NOW) and target.quantity >= for_lot:
        event("lot-bound hold fully bound")
        assert lot_id not in b.state.held_lots


def _plain_append(fills: list[Fill], fill: Fill) -> None:
    fills.append(fill)


def _genealogy_of(state: BindingState) -> dict[tuple[str, str, bool], Decimal]:
    drawn: dict[tuple[str, str, bool], Decimal] = {}
    for fill in state.fills:
        for d in fill.draws:
            key = (d.material, d.lot, d.substitution)
            drawn[key] = drawn.get(key, D(0)) + d.quantity
    return {k: v for k, v in drawn.items() if v}


def _run_binding_steps(
    m: MasterData, initial: list[Lot], sequence: list[object]
) -> list[tuple[object, ...]]:
    """What each step of ``sequence`` did, as everything a caller can observe."""
    lots: tuple[Lot, ...] = tuple(initial)
    state = BindingState()
    required = D(0)
    made: list[tuple[tuple[LotDraw, ...], Decimal]] = []
    seen: list[tuple[object, ...]] = []
    for step in sequence:
        try:
            if step == "retry":
                b = retry_held(m, lots, state, "P", NOW, ALTS)
            elif isinstance(step, int):  # reverse an earlier posting by the MES
                if not made:
                    continue
                draws, held = made[step % len(made)]
                b = reverse_posting(lots, state, draws, held)
            else:
                assert isinstance(step, Decimal)
                q = max(step, -required)
                b = bind(m, lots, state, "P", q, NOW, ALTS)
                required += q
                if q > 0:
                    made.append((b.draws, b.held.quantity if b.held else D(0)))
        except ConsumptionError as exc:
            seen.append(("refused", str(exc)))
            continue
        lots, state = b.lots, b.state
        seen.append(
            (
                tuple(sorted((x.lot, x.quantity) for x in lots)),
                b.draws,
                b.held,
                b.held_cancelled,
                state.drawn,
                state.held,
                dict(state.substituted),
                dict(state.alternate_issued),
                dict(state.held_lots),
                _genealogy_of(state),  # what each lot gave, net (single-lot mode acts on it)
            )
        )
    return seen


@given(
    st.lists(lot_strategy, max_size=6, unique_by=lambda x: x.lot),
    st.lists(
        st.one_of(
            st.decimals(min_value=D("-3"), max_value=D("3"), places=3),
            st.just("retry"),
            st.integers(0, 20),
        ),
        min_size=1,
        max_size=25,
    ),
    st.booleans(),
)
def test_merged_fills_behave_exactly_as_one_fill_per_posting(
    initial: list[Lot], sequence: list[object], single_lot: bool
) -> None:
    """The binding merges a posting's fill into the last one (its state stays small however
    long the order runs); every step must do exactly what it did with one fill per posting."""
    m = md(single_lot_per_operation=single_lot)
    # a primary that runs out early, and alternates to substitute it: every kind of fill
    initial = [*initial, lot("P-short", "1.5", staged_days=-20), lot("ALT-KG-x", "50", "ALT-KG")]
    merged = _run_binding_steps(m, initial, sequence)
    with patch("edge_agent.domain.lots._add_fill", _plain_append):
        plain = _run_binding_steps(m, initial, sequence)
    assert merged == plain


def test_a_long_order_keeps_its_binding_small() -> None:
    m = md()
    lots: tuple[Lot, ...] = (lot("L1", "1000"), lot("L2", "1000"))
    state = BindingState()
    for _ in range(1500):  # crosses from L1 into L2
        b = bind(m, lots, state, "P", D("1"), NOW, ALTS)
        lots, state = b.lots, b.state
    assert len(state.fills) == 1
    assert [(d.lot, d.quantity) for d in state.fills[0].draws] == [("L1", D(1000)), ("L2", D(500))]
