"""Cumulative PLC counters → deltas, and the operation-complete request/acknowledge handshake.

Counters are read as cumulative values (good parts, scrap, totalizer counts), because a
cumulative value read after an outage still yields the whole delta, and a value seen twice yields
it once. What a new reading means is decided explicitly here:

- **baseline**: the first value seen (or the first after a rebase): nothing is counted, because
  where counting started is unknown; the engine rebases to 0 when it knows the PLC zeroed the
  counter (a new order).
- **increase**: the difference from the last value.
- **unchanged** (a duplicate) and **stale** (a source timestamp older than the last applied
  reading: a re-ordered notification) count nothing and leave the state as it was.
- **rollover**: a smaller value within the rollover window of the counter's width wraps
  (serial-number arithmetic, RFC 1982: by default half the range).
- **jitter**: a value smaller by at most the counter's ``jitter`` (a float totalizer that
  wobbles down by a step) counts nothing and keeps the last value, so the wobble back up is not
  counted either; only what rises past the last value counts.
- **reset**: a smaller value outside that window is a counter restarted from zero (PLC restart,
  order change): what it shows now is counted, and the reading is flagged so the caller raises an
  exception (counts between the last reading and the reset cannot be known).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum

from edge_agent.errors import SignalError


class CounterChange(StrEnum):
    BASELINE = "baseline"
    INCREASE = "increase"
    UNCHANGED = "unchanged"
    STALE = "stale"
    ROLLOVER = "rollover"
    JITTER = "jitter"
    RESET = "reset"


@dataclass(frozen=True, slots=True)
class CounterSpec:
    """A cumulative counter: its width in bits (None: never wraps), engineering units per
    count, and how far a wrap may reach before a smaller value counts as a reset.

    ``rollover_at`` (counts) overrides the width for a counter that wraps at a value that is not
    a power of two, e.g. a totalizer that shows 0 after 999 999.99 L (``rollover_at`` =
    100 000 000 counts of 0.01 L).
    """

    width: int | None = 32
    scale: Decimal = Decimal(1)
    rollover_window: int | None = None  # default: half the range
    rollover_at: int | None = None
    #: a decrease of at most this many counts is noise, not a rollover or a reset
    jitter: int = 0

    def __post_init__(self) -> None:
        if self.jitter < 0:
            raise ValueError(f"a counter's jitter cannot be negative (got {self.jitter})")
        if self.width is not None and self.width not in (16, 32, 64):
            raise ValueError(f"counter width must be 16, 32 or 64 bits (got {self.width})")
        if self.scale <= 0:
            raise ValueError(f"counter scale must be greater than zero (got {self.scale})")
        if self.rollover_at is not None and self.rollover_at < 2:
            raise ValueError(f"a counter must roll over at 2 or more (got {self.rollover_at})")

    @property
    def modulus(self) -> int | None:
        if self.rollover_at is not None:
            return self.rollover_at
        return None if self.width is None else 1 << self.width

    @property
    def window(self) -> int:
        if self.rollover_window is not None:
            return self.rollover_window
        return 0 if self.modulus is None else self.modulus // 2


@dataclass(frozen=True, slots=True)
class CounterState:
    """The last reading applied; persisted with the postings it produced."""

    raw: int | None = None
    source_time: datetime | None = None


@dataclass(frozen=True, slots=True)
class CounterReading:
    state: CounterState
    change: CounterChange
    counts: int

    @property
    def counted(self) -> bool:
        return self.counts != 0


def read_counter(
    spec: CounterSpec, state: CounterState, raw: int, source_time: datetime
) -> CounterReading:
    """Interpret one reading of a cumulative counter against the last one applied."""
    if raw < 0 or (spec.modulus is not None and raw >= spec.modulus):
        limit = (
            f"a {spec.width}-bit unsigned counter"
            if spec.rollover_at is None
            else f"a counter rolling over at {spec.rollover_at}"
        )
        raise SignalError(f"counter value {raw} is outside the range of {limit}")
    if state.source_time is not None and source_time < state.source_time:
        return CounterReading(state, CounterChange.STALE, 0)
    new = CounterState(raw, source_time)
    if state.raw is None:
        return CounterReading(new, CounterChange.BASELINE, 0)
    if raw == state.raw:
        return CounterReading(new, CounterChange.UNCHANGED, 0)
    if raw > state.raw:
        return CounterReading(new, CounterChange.INCREASE, raw - state.raw)
    return _decrease(spec, state, new)


def _decrease(spec: CounterSpec, state: CounterState, new: CounterState) -> CounterReading:
    """A value below the last: a wobble, a rollover or a reset."""
    assert state.raw is not None
    assert new.raw is not None
    if state.raw - new.raw <= spec.jitter:
        return CounterReading(state, CounterChange.JITTER, 0)
    if spec.modulus is not None:
        wrapped = spec.modulus - state.raw + new.raw
        if wrapped <= spec.window:
            return CounterReading(new, CounterChange.ROLLOVER, wrapped)
    return CounterReading(new, CounterChange.RESET, new.raw)


_MICROSECOND = timedelta(microseconds=1)


def implausible(
    spec: CounterSpec,
    counts: int,
    since: datetime | None,
    at: datetime,
    max_rate: Decimal | None,
) -> bool:
    """Whether ``counts`` counted between a reading at ``since`` and one at ``at`` rose faster
    than ``max_rate`` engineering units a second (over at least one second: two readings close
    together prove no rate). A glitch, a bit flip, a counter set by hand: not production."""
    if max_rate is None or counts <= 0:
        return False
    micros = (at - since) // _MICROSECOND if since is not None else 0
    seconds = max(Decimal(1), Decimal(micros) / 1_000_000)
    return Decimal(counts) * spec.scale > max_rate * seconds


def quantity(spec: CounterSpec, counts: int) -> Decimal:
    """Counts in engineering units, exactly."""
    return Decimal(counts) * spec.scale


# ----------------------------------------------------------------------- operation complete


class HandshakePhase(StrEnum):
    IDLE = "idle"  # no request outstanding
    COMMITTED = "committed"  # the request's result is committed; the acknowledge is not written
    ACKNOWLEDGED = "acknowledged"  # acknowledge written; waiting for the PLC to drop the request


class HandshakeAction(StrEnum):
    NONE = "none"
    PROCESS = "process"  # a new request: compute and commit its result with phase COMMITTED
    WRITE_ACK = "write_ack"  # set the acknowledge tag (again, after a failed write)
    CLEAR_ACK = "clear_ack"  # the PLC dropped its request: clear the acknowledge tag


def on_request(phase: HandshakePhase, request: bool, ack: bool | None = None) -> HandshakeAction:
    """What to do when the PLC's request tag is seen with this value (``ack``: the acknowledge
    tag as last written or read, None when not known).

    A request is processed once: seen again (a duplicate notification, a re-read after a
    reconnect, a restart after the commit but before the acknowledge) it only has its
    acknowledge (re)written, because the phase committed with its result says it was processed.

    Clearing is write-ahead: the caller commits the phase IDLE *before* it clears the
    acknowledge (:func:`clearing`). The PLC raises its next request only once it sees the
    acknowledge low, so a request seen while the committed phase is not IDLE is always the one
    already processed, whatever the agent went through (a restart after the acknowledge was
    cleared but before that was committed would otherwise take the next request for it and
    acknowledge it unposted). An acknowledge left high in IDLE with no request (the agent
    stopped between that commit and the write) is cleared again: clearing never posts.
    """
    if request:
        if phase is HandshakePhase.IDLE:
            return HandshakeAction.PROCESS
        if phase is HandshakePhase.COMMITTED:
            return HandshakeAction.WRITE_ACK
        return HandshakeAction.NONE
    if phase is HandshakePhase.IDLE:
        return HandshakeAction.CLEAR_ACK if ack else HandshakeAction.NONE
    return HandshakeAction.CLEAR_ACK


def clearing(phase: HandshakePhase, action: HandshakeAction) -> HandshakePhase:
    """The phase to commit before ``action`` is written: IDLE before an acknowledge is
    cleared (write-ahead, see :func:`on_request`), else the phase as it is."""
    return HandshakePhase.IDLE if action is HandshakeAction.CLEAR_ACK else phase


def after(phase: HandshakePhase, action: HandshakeAction, written: bool = True) -> HandshakePhase:
    """The phase once ``action`` is done; a failed acknowledge write (``written`` False) leaves
    the phase as it was, so the write is retried, never the posting."""
    if action is HandshakeAction.PROCESS:
        return HandshakePhase.COMMITTED
    if not written:
        return phase
    if action is HandshakeAction.WRITE_ACK:
        return HandshakePhase.ACKNOWLEDGED
    if action is HandshakeAction.CLEAR_ACK:
        return HandshakePhase.IDLE
    return phase
