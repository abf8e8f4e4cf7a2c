"""Counter semantics (rollover, reset, duplicates, re-ordering) and the PLC handshake."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from edge_agent.domain.counters import (
    CounterChange,
    CounterSpec,
    CounterState,
    HandshakeAction,
    HandshakePhase,
    after,
    implausible,
    on_request,
    quantity,
    read_counter,
)
from edge_agent.errors import SignalError

T0 = datetime(2026, 11, 22, 6, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def readings(spec: CounterSpec, *values: int) -> list[tuple[CounterChange, int]]:
    state = CounterState()
    out = []
    for n, v in enumerate(values):
        r = read_counter(spec, state, v, at(n))
        state = r.state
        out.append((r.change, r.counts))
    return out


def test_first_reading_is_a_baseline_then_increases_count() -> None:
    assert readings(CounterSpec(), 1000, 1003, 1010) == [
        (CounterChange.BASELINE, 0),
        (CounterChange.INCREASE, 3),
        (CounterChange.INCREASE, 7),
    ]


@pytest.mark.parametrize("width", [16, 32])
def test_rollover_at_the_counter_width(width: int) -> None:
    top = (1 << width) - 1
    assert readings(CounterSpec(width=width), top - 2, 4) == [
        (CounterChange.BASELINE, 0),
        (CounterChange.ROLLOVER, 7),
    ]


def test_a_smaller_value_far_from_the_wrap_is_a_reset_counting_what_it_shows() -> None:
    assert readings(CounterSpec(width=16), 30000, 12) == [
        (CounterChange.BASELINE, 0),
        (CounterChange.RESET, 12),
    ]


def test_a_counter_without_width_never_wraps() -> None:
    assert readings(CounterSpec(width=None), 5, 2) == [
        (CounterChange.BASELINE, 0),
        (CounterChange.RESET, 2),
    ]


def test_rebased_to_zero_for_a_new_order_counts_from_the_first_reading() -> None:
    r = read_counter(CounterSpec(), CounterState(raw=0, source_time=None), 17, at(1))
    assert (r.change, r.counts) == (CounterChange.INCREASE, 17)


def test_duplicate_counts_nothing() -> None:
    state = read_counter(CounterSpec(), CounterState(), 10, at(0)).state
    r = read_counter(CounterSpec(), state, 10, at(0))
    assert (r.change, r.counts, r.state) == (CounterChange.UNCHANGED, 0, state)


def test_reordered_notification_is_stale_and_changes_nothing() -> None:
    spec = CounterSpec()
    s1 = read_counter(spec, CounterState(), 10, at(0)).state
    s2 = read_counter(spec, s1, 15, at(2)).state
    late = read_counter(spec, s2, 12, at(1))  # older than the last applied reading
    assert (late.change, late.counts, late.state) == (CounterChange.STALE, 0, s2)
    assert read_counter(spec, s2, 16, at(3)).counts == 1


@pytest.mark.parametrize(("width", "raw"), [(16, 65536), (16, -1), (32, 1 << 32)])
def test_value_outside_the_width_is_a_signal_error(width: int, raw: int) -> None:
    with pytest.raises(SignalError, match=f"outside the range of a {width}-bit"):
        read_counter(CounterSpec(width=width), CounterState(), raw, at(0))


def test_scaled_counter_quantity_is_exact() -> None:
    assert quantity(CounterSpec(scale=Decimal("0.001")), 1234) == Decimal("1.234")


def test_bad_spec_is_refused() -> None:
    with pytest.raises(ValueError, match="width must be 16, 32 or 64"):
        CounterSpec(width=8)


@given(
    st.sampled_from([16, 32]),
    st.integers(min_value=0),
    st.lists(st.integers(0, 3000), min_size=1, max_size=60),
    st.data(),
)
def test_polled_counter_deltas_add_up_exactly_whatever_is_missed_repeated_or_reordered(
    width: int, start: int, increments: list[int], data: st.DataObject
) -> None:
    """The PLC counts; the agent sees some of the values, some twice, some late: the counts it
    derives equal what the PLC counted between its first and last applied reading."""
    spec = CounterSpec(width=width)
    modulus = 1 << width
    plc = [start % modulus]
    for inc in increments:
        plc.append((plc[-1] + inc) % modulus)
    seen = sorted(set(data.draw(st.lists(st.integers(0, len(plc) - 1), min_size=1))))
    events: list[int] = []
    for i in seen:
        events.append(i)
        if data.draw(st.booleans()):  # a duplicate or a late, re-ordered notification
            events.append(data.draw(st.sampled_from(seen[: seen.index(i) + 1])))
    state = CounterState()
    total = 0
    for i in events:
        r = read_counter(spec, state, plc[i], at(i))
        assert r.change is not CounterChange.RESET
        state, total = r.state, total + r.counts
    first, last = seen[0], seen[-1]
    assert total == sum(increments[first:last])


# --------------------------------------------------------------------------------- handshake


def test_handshake_happy_path() -> None:
    phase = HandshakePhase.IDLE
    trace = []
    for request in (True, True, False, False):
        action = on_request(phase, request)
        phase = after(phase, action)
        trace.append((action, phase))
    assert trace == [
        (HandshakeAction.PROCESS, HandshakePhase.COMMITTED),
        (HandshakeAction.WRITE_ACK, HandshakePhase.ACKNOWLEDGED),
        (HandshakeAction.CLEAR_ACK, HandshakePhase.IDLE),
        (HandshakeAction.NONE, HandshakePhase.IDLE),
    ]


def test_failed_acknowledge_is_retried_never_reposted() -> None:
    phase = after(HandshakePhase.IDLE, HandshakeAction.PROCESS)
    assert after(phase, HandshakeAction.WRITE_ACK, written=False) is HandshakePhase.COMMITTED
    # after the reconnect the request is read again: the acknowledge is written, not the posting
    assert on_request(HandshakePhase.COMMITTED, True) is HandshakeAction.WRITE_ACK


@given(st.lists(st.tuples(st.booleans(), st.booleans(), st.booleans()), max_size=200))
def test_every_plc_request_is_processed_exactly_once(steps: list[tuple[bool, bool, bool]]) -> None:
    """A PLC raises a request, holds it until it sees the acknowledge, drops it, and waits for
    the acknowledge to clear before the next. The agent sees the request tag (duplicated when
    it likes), its writes fail at random, and it restarts with only its committed phase."""
    plc_request, plc_ack = False, False
    raised = processed = 0
    phase = HandshakePhase.IDLE
    for duplicate, write_ok, plc_moves in steps:
        if plc_moves:
            if not plc_request and not plc_ack:
                plc_request, raised = True, raised + 1
            elif plc_request and plc_ack:
                plc_request = False
        for _ in range(2 if duplicate else 1):
            action = on_request(phase, plc_request)
            if action is HandshakeAction.PROCESS:
                processed += 1
            elif action is HandshakeAction.WRITE_ACK and write_ok:
                plc_ack = True
            elif action is HandshakeAction.CLEAR_ACK and write_ok:
                plc_ack = False
            phase = after(phase, action, written=write_ok)
    assert processed == raised


def test_a_counter_rolling_over_at_a_decimal_limit() -> None:
    """A totalizer showing 0 after 999 999.99 L, counted in 0.01 L."""
    spec = CounterSpec(width=None, scale=Decimal("0.01"), rollover_at=100_000_000)
    at = datetime(2026, 11, 23, tzinfo=UTC)
    last = read_counter(spec, CounterState(), 99_999_950, at)
    wrapped = read_counter(spec, last.state, 25, at + timedelta(seconds=1))
    assert wrapped.change is CounterChange.ROLLOVER
    assert quantity(spec, wrapped.counts) == Decimal("0.75")
    with pytest.raises(SignalError, match="rolling over at 100000000"):
        read_counter(spec, wrapped.state, 100_000_000, at + timedelta(seconds=2))


def test_a_wobble_down_within_the_jitter_counts_nothing_and_keeps_the_last_value() -> None:
    spec = CounterSpec(None, Decimal("0.01"), rollover_at=10_000_000, jitter=2)
    assert readings(spec, 500, 520, 519, 518, 520, 521, 400) == [
        (CounterChange.BASELINE, 0),
        (CounterChange.INCREASE, 20),
        (CounterChange.JITTER, 0),
        (CounterChange.JITTER, 0),
        (CounterChange.UNCHANGED, 0),  # back to 520: the wobble back up counts nothing
        (CounterChange.INCREASE, 1),
        (CounterChange.RESET, 400),  # beyond the jitter: a reset as before
    ]
    with pytest.raises(ValueError, match="jitter"):
        CounterSpec(jitter=-1)


@given(
    st.integers(0, 5),
    st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 5)), min_size=1, max_size=60),
)
def test_a_wobbling_totalizer_counts_exactly_its_rise(
    jitter: int, steps: list[tuple[int, int]]
) -> None:
    """A totalizer that rises and, read by read, may show up to ``jitter`` counts less than it
    reached: what is counted is exactly its highest value less its first, and never a reset."""
    spec = CounterSpec(None, Decimal(1), rollover_at=10**9, jitter=jitter)
    state, total, top = CounterState(), 0, 10_000
    baseline = None
    for n, (rise, wobble) in enumerate(steps):
        top += rise
        shown = top - min(wobble, jitter)
        baseline = shown if baseline is None else baseline
        r = read_counter(spec, state, shown, at(n))
        assert r.change is not CounterChange.RESET
        state, total = r.state, total + r.counts
    r = read_counter(spec, state, top, at(len(steps)))  # the last read shows where it got to
    assert total + r.counts == top - baseline


def test_a_rise_faster_than_the_max_rate_is_implausible() -> None:
    spec = CounterSpec(32, Decimal("0.5"))  # half a unit a count
    t0 = datetime(2026, 11, 23, 6, 0, tzinfo=UTC)
    rate = Decimal(5)  # units a second
    assert not implausible(spec, 10, t0, t0 + timedelta(seconds=1), rate)  # 5 in 1 s
    assert implausible(spec, 11, t0, t0 + timedelta(seconds=1), rate)
    assert not implausible(spec, 10, t0, t0 + timedelta(milliseconds=10), rate)  # ≥ 1 s
    assert not implausible(spec, 1000, t0, t0 + timedelta(seconds=100), rate)  # an outage
    assert not implausible(spec, 10**9, t0, t0, None)  # no limit configured
    assert implausible(spec, 11, None, t0, rate)  # no earlier reading: over one second


@settings(max_examples=200, deadline=None)
@example(counts=5, micros=1_000_000, rate=Decimal(5), scale=Decimal(1))  # at the limit: fine
@example(counts=501, micros=2_500_000, rate=Decimal(2), scale=Decimal("0.01"))
@given(
    counts=st.integers(0, 10**9),
    micros=st.integers(0, 10**11),
    rate=st.decimals(min_value=Decimal("0.001"), max_value=10**6, places=3),
    scale=st.sampled_from([Decimal("0.01"), Decimal(1), Decimal(5)]),
)
def test_implausible_is_exactly_a_rise_above_the_rate_over_at_least_a_second(
    counts: int, micros: int, rate: Decimal, scale: Decimal
) -> None:
    """Held when, and only when, the rise in engineering units exceeds max_rate × the elapsed
    seconds (at least one): computed here in exact fractions, independently of the rule."""
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    spec = CounterSpec(64, scale)
    seconds = max(Fraction(1), Fraction(micros, 10**6))
    held = counts > 0 and Fraction(counts) * Fraction(scale) > Fraction(rate) * seconds
    assert implausible(spec, counts, t0, t0 + timedelta(microseconds=micros), rate) is held
