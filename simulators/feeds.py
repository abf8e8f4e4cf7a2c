"""Continuous feeds in the PLC simulators: the tank's lot changes, the flow meter's history, and
which lot the metered flow belongs to.

Both simulators (:mod:`simulators.opcua_plc`, :mod:`simulators.modbus_plc`) record the same two
things per work centre, stamped with their own strictly increasing clock:

- :class:`LotChange`: a new lot in the feed (tank, silo, IBC) of the flow meter, with the
  totalizer reading at that moment;
- :class:`MeterStep`: every write of the totalizer (a flow increment, an order change's reset,
  a test's ``set_counter``) with the counts metered so far, **cumulative**: not wrapped and not
  reset, so a rollover or an order change does not break the history.

From these alone, with no knowledge of the agent, :func:`expected_by_lot` says how much of the
metered flow belongs to each lot, by the rules of docs/feeds.md: the totalizer rises linearly
between two of its values (rule 1: the agent reads a step the same way, between its readings),
and a change-over at c reaches the meter at c + lag (rule 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from bisect import bisect_right
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from itertools import pairwise
from typing import Final

#: how often a running flow meter (:class:`FlowMeter`) adds its counts, in seconds
METER_PERIOD_S: Final = 0.05
_MICROSECOND: Final = timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class LotChange:
    """A feed (tank, silo, IBC) lot change at a work centre's flow meter."""

    at: datetime
    work_centre: str
    material: str
    lot: str
    totalizer: int  # the totalizer's counts at the change


@dataclass(frozen=True, slots=True)
class MeterStep:
    """The totalizer was written at ``at``; ``cumulative`` counts had been metered by then.

    Cumulative since the simulator was made: a rollover or an order change's reset (also a
    step, with no counts added) leaves it alone, so the steps of a whole shift are one history.
    """

    at: datetime
    cumulative: int


class FlowMeter:
    """A flow meter running at a rate: ``add`` gets the whole counts about every
    :data:`METER_PERIOD_S`, the fractions carried to the next time, so none is lost."""

    def __init__(self, add: Callable[[int], Awaitable[None]], name: str) -> None:
        self._add = add
        self._name = name
        self._rate = Fraction(0)
        self._task: asyncio.Task[None] | None = None

    @property
    def rate(self) -> Fraction:
        """Counts per second (0: standing still)."""
        return self._rate

    async def set_rate(self, counts_per_s: Decimal | Fraction | int) -> None:
        """Run at ``counts_per_s`` from now on; 0 stops the meter."""
        rate = Fraction(counts_per_s)
        if rate < 0:
            raise ValueError(f"a flow rate must not be negative (got {counts_per_s})")
        if not rate:
            await self.stop()
            return
        self._rate = rate
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        self._rate = Fraction(0)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        carry = Fraction(0)
        last = loop.time()
        while True:
            await asyncio.sleep(METER_PERIOD_S)
            now = loop.time()
            carry += self._rate * Fraction(now - last)
            last = now
            whole = math.floor(carry)
            if whole:
                carry -= whole
                await self._add(whole)


def expected_by_lot(
    history: Sequence[MeterStep],
    changes: Sequence[LotChange],
    lag_s: Decimal | Fraction | int = 0,
    per_count: Decimal | Fraction | int = 1,
    initial: str | None = None,
) -> dict[str | None, Fraction]:
    """Per lot, the flow (counts × ``per_count``: engineering units) metered while the lot was
    at the meter; exact, a fraction (a step split at a change-over rarely ends on a decimal).

    ``history`` and ``changes`` are one work centre's (a simulator's :meth:`meter_history` and
    its ``lot_changes`` of that work centre). Between two steps the totalizer rises linearly
    (docs/feeds.md, rule 1); before the first step and after the last it stands still. A
    change-over at c reaches the meter at c + ``lag_s`` (seconds) and splits whatever step it
    falls in there; with a lag, a change-over may reach the meter after a later change-over was
    made, or after the history ends (the lot then gets 0). What is metered before the first
    change-over reaches the meter belongs to ``initial``, the lot in the tank before (None: not
    known). Every lot named gets a key, 0 if nothing was metered while it was at the meter;
    the None key only when something was. A lot changed to again right after itself is one
    stay at the meter. The values add up to everything the history metered.

    This is the agent's own reading of the same steps, so the two agree to the issue increment
    when the agent saw each step at its moment (OPC UA: the SourceTimestamps these stamps are).
    They differ, by at most the step split, where the agent's readings are not these steps: a
    Modbus poll sees a step or a change-over up to a poll interval late, and a refresh read of a
    meter standing still (about every second) tells the agent the step came after it.
    """
    lag = Fraction(lag_s)
    if lag < 0:
        raise ValueError(f"a lag must not be negative (got {lag_s})")
    work_centres = {c.work_centre for c in changes}
    if len(work_centres) > 1:
        raise ValueError(f"lot changes of one work centre expected (got {sorted(work_centres)})")
    for a, b in pairwise(history):
        if b.at <= a.at or b.cumulative < a.cumulative:
            raise ValueError(
                f"the meter history must go forward in time and never down (step at {b.at}, "
                f"{b.cumulative} counts, after {a.at}, {a.cumulative} counts)"
            )
    ordered = sorted(changes, key=lambda c: c.at)
    for before, after in pairwise(ordered):
        if before.at == after.at:
            raise ValueError(f"lots {before.lot} and {after.lot} both changed to at {after.at}")
    out: dict[str | None, Fraction] = {}
    if initial is not None:
        out[initial] = Fraction(0)
    for change in ordered:
        out.setdefault(change.lot, Fraction(0))
    if not history:
        return out
    origin = history[0].at
    points = [(_seconds(s.at, origin), Fraction(s.cumulative)) for s in history]
    # lot i is at the meter from arrivals[i] to arrivals[i + 1] (None: before / after it all)
    arrivals: list[Fraction | None] = [None, *(_seconds(c.at, origin) + lag for c in ordered)]
    lots = [initial, *(c.lot for c in ordered)]
    scale = Fraction(per_count)
    for i, lot in enumerate(lots):
        start, end = arrivals[i], arrivals[i + 1] if i + 1 < len(arrivals) else None
        counts = (points[-1][1] if end is None else _total_at(points, end)) - (
            points[0][1] if start is None else _total_at(points, start)
        )
        if counts or lot is not None:
            out[lot] = out.get(lot, Fraction(0)) + counts * scale
    return out


def _seconds(at: datetime, origin: datetime) -> Fraction:
    """``at`` as exact seconds after ``origin`` (datetimes resolve microseconds)."""
    return Fraction((at - origin) // _MICROSECOND, 1_000_000)


def _total_at(points: Sequence[tuple[Fraction, Fraction]], moment: Fraction) -> Fraction:
    """The cumulative counts at ``moment``, linear between points, standing still outside."""
    if moment <= points[0][0]:
        return points[0][1]
    if moment >= points[-1][0]:
        return points[-1][1]
    i = bisect_right([t for t, _ in points], moment)  # points[i - 1] <= moment < points[i]
    (t0, q0), (t1, q1) = points[i - 1], points[i]
    return q0 + (q1 - q0) * (moment - t0) / (t1 - t0)


def changes_at(changes: Iterable[LotChange], work_centre: str) -> list[LotChange]:
    """The lot changes of one work centre, in the order they were made."""
    return [c for c in changes if c.work_centre == work_centre]
