"""Continuous feeds: a flow-meter totalizer posted per time slice, bound to lots by time window.

A ``meter`` BOM line fed from a tank, silo or IBC is read as a cumulative totalizer (exact, in
the material's issue unit, already unwrapped from rollover). It is posted per time slice (every
60 s, at an operation complete, at order close), never per reading:

- **Slicing.** Between two readings the totalizer is taken to rise linearly, so its value Q(t) at
  any moment between them is the exact linear interpolation (a Fraction). A slice [start, end)
  holds Q(end) − Q(start), so slices at any boundaries add up exactly to the totalizer delta over
  their union. Q is not defined outside the readings: slicing there is refused
  (:class:`SliceOutsideReadings`) and the caller slices once it has read at or past the slice's
  end. A totalizer that goes down is refused too (:class:`FeedError`): a correction is a reversal,
  not a slice.
- **Time-window lot binding.** Material passing the meter at t left the feed at t − lag (hold-up in
  the piping), so it belongs to the lot staged to the feed at t − lag. A change-over at c in the
  feed reaches the meter at c + lag; a slice containing that moment is split there, and so is a
  part at the moment its lot expires. Every part names its lot, its window [from, to) in meter
  time and its exact quantity.
- **Eligibility.** A part is drawn from its lot only when the lot is staged for the line, of the
  metered material, released and not expired when the material passed the meter, and never below
  the lot's remaining quantity. Whatever is not drawn is **held** with a
  :class:`~edge_agent.domain.lots.HoldReason`, never dropped.
- **Rounding.** The issue increment is applied to the cumulative metered quantity at every part
  boundary and each part posts the difference, so postings add up to the rounded cumulative
  quantity whatever the slices and splits. The carry (:class:`FeedCarry`) is a small immutable
  value the caller persists; it also anchors the next slice at the totalizer value where the last
  one ended, so no material falls between two slices, even across a restart.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from fractions import Fraction
from itertools import pairwise
from types import MappingProxyType
from typing import Any, Final

from edge_agent.domain.lots import BindingState, Fill, Held, HoldReason, Lot, LotDraw, LotStatus
from edge_agent.domain.masterdata import Material, parse_decimal, parse_timestamp
from edge_agent.domain.quantities import Exact, fmt, round_to_increment
from edge_agent.errors import ConsumptionError

ZERO = Decimal(0)
NO_LAG: Final = timedelta(0)

#: Where the regular slice grid is anchored: slices end on whole multiples of the slice length
#: since this moment (every minute on the minute for 60 s), whatever extra boundaries came between.
EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


class FeedError(ConsumptionError):
    """A feed cannot be sliced as asked: readings out of order or going down, a slice that does
    not start where the last one ended, a naive timestamp, a negative lag."""


class SliceOutsideReadings(FeedError):
    """The totalizer is not known at ``at``: it lies before the first or after the last reading.

    Not a fault when ``at`` is after the last reading: the slice is simply not due yet; slice it
    once a reading at or after ``at`` is in.
    """

    def __init__(self, at: datetime, first: datetime | None, last: datetime | None) -> None:
        self.at, self.first, self.last = at, first, last
        known = "no readings" if first is None else f"readings from {first} to {last}"
        super().__init__(f"the totalizer is not known at {at}: there are {known}")


@dataclass(frozen=True, slots=True)
class TotalizerReading:
    """A cumulative totalizer value at a moment: issue unit, exact, unwrapped from rollover."""

    at: datetime
    cumulative: Exact

    def __post_init__(self) -> None:
        _aware(self.at, "a totalizer reading's time")
        value = self.cumulative
        if isinstance(value, bool) or not isinstance(value, Decimal | Fraction | int):
            raise FeedError(
                f"a totalizer reading must be an exact Decimal, Fraction or int "
                f"(got {type(value).__name__} {value!r})"
            )
        if isinstance(value, Decimal) and not value.is_finite():
            raise FeedError(f"a totalizer reading must be finite (got {value})")


@dataclass(frozen=True, slots=True)
class FeedStaging:
    """Lot ``lot`` of ``material`` is in the feed from ``from_`` (until the next staging)."""

    lot: str
    material: str
    from_: datetime

    def __post_init__(self) -> None:
        _aware(self.from_, f"the staging time of lot {self.lot}")


class SplitCause(StrEnum):
    """Why a part starts where it starts."""

    SLICE = "slice"  # the slice's own start
    CHANGEOVER = "changeover"  # a lot change-over in the feed, reaching the meter after the lag
    EXPIRY = "expiry"  # the part's lot expires here


@dataclass(frozen=True, slots=True)
class SlicePart:
    """One lot's share of a slice: material that passed the meter in [window_from, window_to).

    ``quantity`` is exact (issue unit); ``posted`` is its share of the rounded cumulative quantity.
    ``held`` is what of ``posted`` is not drawn from the lot, and why; the rest is ``drawn``.
    ``lot`` is the lot in the feed at window − lag (None: nothing was staged).
    """

    lot: str | None
    material: str
    window_from: datetime
    window_to: datetime
    quantity: Fraction
    posted: Decimal
    held: Held | None = None
    cause: SplitCause = SplitCause.SLICE

    @property
    def drawn(self) -> Decimal:
        return self.posted - (self.held.quantity if self.held else ZERO)


@dataclass(frozen=True, slots=True)
class FeedCarry:
    """What one feed's postings carry from slice to slice; the caller persists it.

    ``until`` is where the last slice ended and ``totalizer`` the totalizer's value there: the next
    slice starts at that moment and that value (None: nothing sliced yet). ``measured`` is the exact
    cumulative quantity sliced and ``issued`` what has been posted of it, rounded.
    """

    until: datetime | None = None
    totalizer: Fraction = Fraction(0)
    measured: Fraction = Fraction(0)
    issued: Decimal = ZERO

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form: ISO-8601 time, exact fractions as "p/q", decimal strings."""
        return {
            "until": self.until.isoformat() if self.until else None,
            "totalizer": str(self.totalizer),
            "measured": str(self.measured),
            "issued": str(self.issued),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeedCarry:
        until = data.get("until")
        return cls(
            None if until is None else parse_timestamp(until),
            _parse_fraction(data.get("totalizer", "0"), "totalizer"),
            _parse_fraction(data.get("measured", "0"), "measured"),
            parse_decimal(data.get("issued", "0")),
        )


@dataclass(frozen=True, slots=True)
class FeedSlice:
    """The outcome of one slice: its parts, the new carry and the lot balances after the draws.

    ``reading_gap`` is the longest interval between the readings the slice was interpolated from:
    a long one means the flow, and so the split at a change-over, was assumed even over it.
    """

    start: datetime
    end: datetime
    totalizer_start: Fraction
    totalizer_end: Fraction
    parts: tuple[SlicePart, ...]
    carry: FeedCarry
    lots: Mapping[str, Lot] = field(default_factory=lambda: MappingProxyType({}))
    reading_gap: timedelta = NO_LAG

    @property
    def quantity(self) -> Fraction:
        return self.totalizer_end - self.totalizer_start

    @property
    def posted(self) -> Decimal:
        return sum((p.posted for p in self.parts), ZERO)

    @property
    def held(self) -> Decimal:
        return sum((p.held.quantity for p in self.parts if p.held), ZERO)

    @property
    def split(self) -> bool:
        return len(self.parts) > 1


# --------------------------------------------------------------------------- the totalizer


@dataclass(frozen=True, slots=True)
class _Timeline:
    times: tuple[datetime, ...]
    values: tuple[Fraction, ...]

    def covers(self, at: datetime) -> bool:
        return bool(self.times) and self.times[0] <= at <= self.times[-1]

    def at(self, at: datetime) -> Fraction:
        if not self.covers(at):
            first, last = (self.times[0], self.times[-1]) if self.times else (None, None)
            raise SliceOutsideReadings(at, first, last)
        i = bisect_right(self.times, at) - 1
        if self.times[i] == at:
            return self.values[i]
        t0, t1 = self.times[i], self.times[i + 1]
        v0, v1 = self.values[i], self.values[i + 1]
        return v0 + (v1 - v0) * Fraction(_micros(at - t0), _micros(t1 - t0))

    def longest_gap(self, start: datetime, end: datetime) -> timedelta:
        gaps = [b - a for a, b in pairwise(self.times) if a < end and b > start]
        return max(gaps, default=NO_LAG)


def _timeline(points: Iterable[tuple[datetime, Fraction]]) -> _Timeline:
    pts = list(points)
    for (t0, v0), (t1, v1) in pairwise(pts):
        if t1 <= t0:
            raise FeedError(
                f"totalizer readings must be in strictly increasing time ({t1} after {t0})"
            )
        if v1 < v0:
            raise FeedError(
                f"the totalizer went down from {fmt(v0)} at {t0} to {fmt(v1)} at {t1}: unwrap "
                "rollovers and resets before slicing; a correction is a reversal, not a slice"
            )
    return _Timeline(tuple(t for t, _ in pts), tuple(v for _, v in pts))


def _readings(readings: Sequence[TotalizerReading]) -> _Timeline:
    return _timeline((r.at, Fraction(r.cumulative)) for r in readings)


def reading_gap(readings: Sequence[TotalizerReading], start: datetime, end: datetime) -> timedelta:
    """The longest interval between readings that overlaps [start, end): how long the flow was
    taken as even there (what :attr:`FeedSlice.reading_gap` reports)."""
    return _readings(readings).longest_gap(start, end)


def totalizer_at(readings: Sequence[TotalizerReading], at: datetime) -> Fraction:
    """The totalizer at ``at``: a reading's value, or the exact linear interpolation between the
    readings either side. Outside the readings it is not known (:class:`SliceOutsideReadings`)."""
    _aware(at, "the moment asked for")
    return _readings(readings).at(at)


# --------------------------------------------------------------------------- lots in the feed


def _history(staging: Sequence[FeedStaging]) -> tuple[FeedStaging, ...]:
    """Stagings in time order; a lot re-staged after itself is one window, not a change-over."""
    ordered = sorted(staging, key=lambda s: s.from_)
    for a, b in pairwise(ordered):
        if a.from_ == b.from_:
            raise FeedError(f"lots {a.lot} and {b.lot} are both staged to the feed at {a.from_}")
    merged: list[FeedStaging] = []
    for s in ordered:
        if merged and (merged[-1].lot, merged[-1].material) == (s.lot, s.material):
            continue
        merged.append(s)
    return tuple(merged)


def _staged(history: Sequence[FeedStaging], moment: datetime) -> FeedStaging | None:
    i = bisect_right([s.from_ for s in history], moment) - 1
    return history[i] if i >= 0 else None


def lot_at(
    staging: Sequence[FeedStaging], at: datetime, lag: timedelta = NO_LAG
) -> FeedStaging | None:
    """The staging whose material passes the meter at ``at``: the one in the feed at ``at − lag``
    (None when nothing was staged by then)."""
    _aware(at, "the moment asked for")
    return _staged(_history(staging), at - _lag(lag))


# --------------------------------------------------------------------------- slicing


def slice_feed(
    readings: Sequence[TotalizerReading],
    start: datetime,
    end: datetime,
    staging: Sequence[FeedStaging],
    lag: timedelta,
    carry: FeedCarry,
    material: Material,
    lots: Mapping[str, Lot],
) -> FeedSlice:
    """Post the slice [start, end) of a feed's totalizer, split by lot and bound to lots.

    ``readings`` must cover [start, end) (the carry stands in for the readings up to its
    ``until``, so the caller may drop those); ``start`` must be the carry's ``until`` once there is
    one. ``lots`` are the lots staged for the order/line by id, with their remaining quantities;
    the returned :attr:`FeedSlice.lots` has them after this slice's draws.
    """
    for moment, what in ((start, "the slice start"), (end, "the slice end")):
        _aware(moment, what)
    if end < start:
        raise FeedError(f"a slice cannot end ({end}) before it starts ({start})")
    lag = _lag(lag)
    timeline = _readings(readings)
    if carry.until is not None:
        if start != carry.until:
            raise FeedError(
                f"the slice starts at {start} but the last slice ended at {carry.until}: a gap "
                "or an overlap would lose or double material"
            )
        if timeline.covers(carry.until) and timeline.at(carry.until) != carry.totalizer:
            raise FeedError(
                f"the readings give {fmt(timeline.at(carry.until))} at {carry.until}, where the "
                f"last slice ended at {fmt(carry.totalizer)}: the totalizer series was changed"
            )
        later = [(t, v) for t, v in zip(timeline.times, timeline.values, strict=True) if t > start]
        timeline = _timeline([(start, carry.totalizer), *later])
    q_start, q_end = timeline.at(start), timeline.at(end)

    history = _history(staging)
    balances = dict(lots)
    measured, issued = carry.measured, carry.issued
    parts: list[SlicePart] = []
    q_from = q_start
    for a, b, staged, cause in _pieces(history, start, end, lag, lots, material):
        q_to = timeline.at(b)
        measured += q_to - q_from
        now_issued = round_to_increment(measured, material.increment, material.rounding)
        posted = now_issued - issued
        if posted < 0:  # the totalizer never goes down: only a carry issued ahead can do this
            raise FeedError(
                f"the carry has {carry.issued} issued, more than its measured quantity "
                f"{fmt(carry.measured)} rounds to (another feed's carry, or a changed increment?)"
            )
        held = _draw(balances, staged, material, a, posted)
        lot = staged.lot if staged else None
        parts.append(SlicePart(lot, material.id, a, b, q_to - q_from, posted, held, cause))
        q_from, issued = q_to, now_issued
    return FeedSlice(
        start,
        end,
        q_start,
        q_end,
        tuple(parts),
        FeedCarry(end, q_end, measured, issued),
        MappingProxyType(balances),
        timeline.longest_gap(start, end),
    )


def _pieces(
    history: Sequence[FeedStaging],
    start: datetime,
    end: datetime,
    lag: timedelta,
    lots: Mapping[str, Lot],
    material: Material,
) -> list[tuple[datetime, datetime, FeedStaging | None, SplitCause]]:
    """[start, end) cut at every change-over reaching the meter and at every expiry within."""
    if start == end:
        return []
    cuts = sorted({s.from_ + lag for s in history if start < s.from_ + lag < end})
    pieces = []
    for a, b in pairwise([start, *cuts, end]):
        staged = _staged(history, a - lag)
        cause = SplitCause.SLICE if a == start else SplitCause.CHANGEOVER
        lot = lots.get(staged.lot) if staged else None
        expiry = lot.expiry if lot and _unusable(staged, lot, material, a) is None else None
        if expiry is not None and a < expiry < b:
            pieces += [(a, expiry, staged, cause), (expiry, b, staged, SplitCause.EXPIRY)]
        else:
            pieces.append((a, b, staged, cause))
    return pieces


def _unusable(
    staged: FeedStaging | None, lot: Lot | None, material: Material, at: datetime
) -> tuple[HoldReason, str] | None:
    """Why a feed's lot cannot be drawn for material passing the meter at ``at`` (None: it can,
    as far as its status and expiry go)."""
    if staged is None or not staged.lot:
        return HoldReason.NO_STAGE, f"no lot of {material.id} was staged to the feed by then"
    if staged.material != material.id:
        return HoldReason.NO_STAGE, (
            f"the feed held lot {staged.lot} of {staged.material}, not {material.id}"
        )
    if lot is None:
        return HoldReason.NO_STAGE, f"lot {staged.lot} in the feed is not staged for the line"
    if lot.material != material.id:
        return (
            HoldReason.NO_STAGE,
            f"lot {lot.lot} in the feed is {lot.material}, not {material.id}",
        )
    return _ineligible(lot, at)


def _ineligible(lot: Lot, at: datetime) -> tuple[HoldReason, str] | None:
    if lot.is_expired(at):
        return HoldReason.EXPIRED, f"lot {lot.lot} expired at {lot.expiry}"
    if lot.status is not LotStatus.RELEASED:
        # quarantined or blocked: the hold reason has the status's name
        return HoldReason(lot.status.value), f"lot {lot.lot} is {lot.status.value}"
    return None


def _draw(
    balances: dict[str, Lot],
    staged: FeedStaging | None,
    material: Material,
    at: datetime,
    posted: Decimal,
) -> Held | None:
    """Draw ``posted`` from the part's lot (updating ``balances``); what cannot be is held."""
    lot = balances.get(staged.lot) if staged else None
    why = _unusable(staged, lot, material, at)
    if why is not None:
        return Held(posted, *why) if posted > 0 else None
    assert lot is not None
    take = min(posted, max(lot.quantity, ZERO))
    balances[lot.lot] = replace(lot, quantity=lot.quantity - take)
    if take == posted:
        return None
    return Held(
        posted - take,
        HoldReason.INSUFFICIENT,
        f"lot {lot.lot} has only {lot.quantity} {material.uom} left of {posted} {material.uom}",
    )


def record_slice(state: BindingState, feed_slice: FeedSlice) -> BindingState:
    """The component's binding state with a slice's draws and holds added: one fill per part
    drawn from a lot (so a later reversal returns it to that lot), what was held added to
    ``held``."""
    fills = [
        Fill(p.material, p.drawn, (LotDraw(p.lot, p.material, p.drawn),))
        for p in feed_slice.parts
        if p.lot and p.drawn > 0
    ]
    held_lots = dict(state.held_lots)
    for p in feed_slice.parts:
        if p.lot and p.held is not None and p.held.quantity > 0:
            held_lots[p.lot] = held_lots.get(p.lot, ZERO) + p.held.quantity
    return replace(
        state,
        fills=(*state.fills, *fills),
        held=state.held + feed_slice.held,
        held_lots=MappingProxyType(held_lots),
    )


# --------------------------------------------------------------------------- when to slice


def due_slices(
    last_end: datetime,
    now: datetime,
    every: timedelta,
    extra: Iterable[datetime] = (),
    origin: datetime = EPOCH,
) -> tuple[tuple[datetime, datetime], ...]:
    """The slices (start, end) due after ``last_end``, in order, each ending at or before ``now``.

    Boundaries are the regular grid (multiples of ``every`` from ``origin``) and the ``extra``
    boundaries (operation completes, order close) after ``last_end``. ``now`` should be the time
    of the latest totalizer reading, so every slice returned can be sliced; an extra boundary
    after ``now`` is due later, one at or before ``last_end`` is past and ignored.
    """
    for moment, what in ((last_end, "the last slice end"), (now, "now"), (origin, "the origin")):
        _aware(moment, what)
    if every <= NO_LAG:
        raise FeedError(f"the slice length must be greater than zero (got {every})")
    bounds: set[datetime] = set()
    for moment in extra:
        _aware(moment, "a slice boundary")
        if last_end < moment <= now:
            bounds.add(moment)
    grid = origin + ((last_end - origin) // every + 1) * every
    while grid <= now:
        bounds.add(grid)
        grid += every
    return tuple(pairwise([last_end, *sorted(bounds)]))


# --------------------------------------------------------------------------- helpers


def _aware(moment: datetime, what: str) -> None:
    if not isinstance(moment, datetime) or moment.utcoffset() is None:
        raise FeedError(f"{what} must be a timezone-aware datetime (got {moment!r})")


def _lag(lag: timedelta) -> timedelta:
    if lag < NO_LAG:
        raise FeedError(f"the hold-up lag cannot be negative (got {lag})")
    return lag


def _micros(span: timedelta) -> int:
    """A timedelta in whole microseconds, exactly (its own resolution)."""
    return (span.days * 86_400 + span.seconds) * 1_000_000 + span.microseconds


def _parse_fraction(value: object, name: str) -> Fraction:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise FeedError(f'{name} must be an exact fraction string such as "7/3" (got {value!r})')
    try:
        return Fraction(value)
    except (ValueError, ZeroDivisionError):
        raise FeedError(
            f'{name} must be an exact fraction string such as "7/3" (got {value!r})'
        ) from None
