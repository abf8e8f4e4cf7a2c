"""Signal sources: adapters that turn PLC protocols (OPC UA, Modbus TCP) into SignalEvents.

Every source emits the same :class:`SignalEvent`, so the engine cannot tell an OPC UA
notification from a Modbus poll. A source holds no business rule: it reads, writes and reports
quality; the engine decides what a value means.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Final, Protocol

#: The order in which a source emits the values of one read (after a (re)connect) and breaks
#: ties between changes with the same timestamp: the order before a counter zeroed by the same
#: order change, quantities before the handshake request that reports them, the request last.
SIGNAL_ORDER: Final[tuple[str, ...]] = (
    "order",
    "feed_lot",
    "good",
    "scrap",
    "flow",
    "complete_good",
    "complete_scrap",
    "scale.tare",
    "scale.weight",
    "scale.stable",
    "complete_ack",
    "complete_request",
)


def backoff_delay(attempt: int, min_ms: int, max_ms: int, rng: random.Random) -> float:
    """Seconds to wait before reconnect attempt ``attempt`` (0 = the first after a loss).

    ``min_ms`` doubling per attempt up to ``max_ms``, spread by jitter so that many sources
    (or agents) that lost the same PLC do not reconnect in lockstep; never below ``min_ms`` or
    above ``max_ms``.
    """
    base = min(max_ms, min_ms * 2 ** min(attempt, 32))
    low = base if base < max_ms else max(min_ms, max_ms * 0.75)
    high = min(max_ms, base * 1.5)
    return rng.uniform(low, high) / 1000


class Quality(StrEnum):
    """OPC UA's three status severities; Modbus maps exception responses to BAD."""

    GOOD = "good"
    UNCERTAIN = "uncertain"
    BAD = "bad"


class Origin(StrEnum):
    CHANGE = "change"  # a subscription notification or a poll that saw a change
    READ = "read"  # an explicit read after a (re)connect, so a missed delta still counts once
    #: an unchanged flow totalizer read again (about once a second), so the engine knows the
    #: value still held at this moment and can close a time slice while the flow stands still
    REFRESH = "refresh"


#: How often a source re-emits an unchanged flow totalizer (``Origin.REFRESH``), in seconds.
REFRESH_S: Final = 1.0


SignalValue = Decimal | int | bool | str | None


@dataclass(frozen=True, slots=True)
class SignalEvent:
    """One value of one configured signal, with its quality and both timestamps.

    ``signal`` is the name in the configuration's signal map (``good``, ``scrap``, ``order``,
    ``complete_request``, ``complete_good``, ``flow``, ``scale.weight``, ...); ``address`` is the
    OPC UA node id or the Modbus register. Numbers are ints (counters) or Decimals, never floats.
    """

    source: str
    work_centre: str
    signal: str
    address: str
    value: SignalValue
    quality: Quality
    status: str  # the protocol's own status name, e.g. "Good", "BadCommunicationError"
    source_time: datetime | None
    received_at: datetime
    origin: Origin = Origin.CHANGE
    #: True when ``source_time`` is the device's own timestamp (OPC UA); False when it is only
    #: when the agent polled (Modbus), which tells nothing about when the value changed
    device_time: bool = True


@dataclass(frozen=True, slots=True)
class SourceStatus:
    """A source's connection state changed (for the status message and the metrics)."""

    source: str
    connected: bool
    detail: str
    at: datetime


Emit = Callable[[SignalEvent | SourceStatus], Awaitable[None]]
Push = Callable[[SignalEvent | SourceStatus], None]


async def run_delivering(name: str, produce: Callable[[Push], Awaitable[None]], emit: Emit) -> None:
    """Run a source's ``produce(push)`` loop while one task hands what it pushes to ``emit``,
    in order: a slow engine delays delivery, never the protocol's own loop (a poll, asyncua's
    receive path, an acknowledge write the engine makes meanwhile). Until cancelled."""
    queue: asyncio.Queue[SignalEvent | SourceStatus] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            await emit(await queue.get())

    async with asyncio.TaskGroup() as tg:
        tg.create_task(deliver(), name=f"{name}.deliver")
        await produce(queue.put_nowait)


class Source(Protocol):
    """What the engine needs of a source."""

    name: str

    async def run(self, emit: Emit) -> None:
        """Connect, subscribe or poll, and emit events until cancelled; reconnect with backoff.
        After every (re)connect, read every counter explicitly (Origin.READ)."""

    async def write(self, signal: str, value: bool | int) -> None:
        """Write a signal (the operation-complete acknowledge); raise SignalError on failure."""
