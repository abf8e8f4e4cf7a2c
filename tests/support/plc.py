"""Helpers for tests against the OPC UA line PLC simulator and real OPC UA sources.

- :func:`line_config`: the example configuration (``config/line.toml``) with every OPC UA
  endpoint pointed at a test port, reconnecting fast.
- :class:`Recorder`: an ``emit`` callable that keeps what a source emitted and lets a test wait
  for a condition (with a timeout, never a fixed sleep); it can play the engine (``on_event``).
- :func:`running`: runs a source for the duration of a ``with`` block and checks that cancelling
  it ends it cleanly.
"""

from __future__ import annotations

import asyncio
import copy
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

from edge_agent.config import Config, parse_config
from edge_agent.sources import Origin, SignalEvent, Source, SourceStatus

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "line.toml"
_EXAMPLE_DATA = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))

Item = SignalEvent | SourceStatus


def line_config(port: int, tmp_path: Path, **source_extra: Any) -> Config:
    """The example line with its OPC UA sources on ``opc.tcp://127.0.0.1:{port}``."""
    data = copy.deepcopy(_EXAMPLE_DATA)
    for source in data["sources"]:
        source.update(
            {
                "endpoint": f"opc.tcp://127.0.0.1:{port}/edge-agent/sim/",
                "reconnect_min_ms": 50,
                "reconnect_max_ms": 400,
                **source_extra,
            }
        )
    data["store"]["path"] = str(tmp_path / "agent.db")
    data.pop("masterdata", None)
    return parse_config(data)


class Recorder:
    """Keeps every item a source emits; ``on_event`` (if given) runs for each, as an engine."""

    def __init__(self, on_event: Callable[[Item], Awaitable[None]] | None = None) -> None:
        self.items: list[Item] = []
        self.on_event = on_event
        self._changed = asyncio.Event()

    async def __call__(self, item: Item) -> None:
        self.items.append(item)
        self._changed.set()
        if self.on_event is not None:
            await self.on_event(item)

    def mark(self) -> int:
        """A position: ``wait_for(..., after=mark)`` looks only at what came later."""
        return len(self.items)

    def events(
        self, signal: str | None = None, origin: Origin | None = None, after: int = 0
    ) -> list[SignalEvent]:
        return [
            item
            for item in self.items[after:]
            if isinstance(item, SignalEvent)
            and (signal is None or item.signal == signal)
            and (origin is None or item.origin == origin)
        ]

    def statuses(self, after: int = 0) -> list[SourceStatus]:
        return [item for item in self.items[after:] if isinstance(item, SourceStatus)]

    async def wait_for(
        self, predicate: Callable[[Item], bool], after: int = 0, timeout: float = 10.0
    ) -> Item:
        """The first item from position ``after`` on that satisfies ``predicate``."""
        seen = after
        async with asyncio.timeout(timeout):
            while True:
                for item in self.items[seen:]:
                    if predicate(item):
                        return item
                seen = len(self.items)
                self._changed.clear()
                await self._changed.wait()

    async def wait_value(
        self,
        signal: str,
        value: object,
        after: int = 0,
        origin: Origin | None = None,
        timeout: float = 10.0,
    ) -> SignalEvent:
        item = await self.wait_for(
            lambda i: (
                isinstance(i, SignalEvent)
                and i.signal == signal
                and i.value == value
                and (origin is None or i.origin == origin)
            ),
            after=after,
            timeout=timeout,
        )
        assert isinstance(item, SignalEvent)
        return item

    async def wait_status(
        self, connected: bool, source: str | None = None, after: int = 0, timeout: float = 10.0
    ) -> SourceStatus:
        item = await self.wait_for(
            lambda i: (
                isinstance(i, SourceStatus)
                and i.connected is connected
                and (source is None or i.source == source)
            ),
            after=after,
            timeout=timeout,
        )
        assert isinstance(item, SourceStatus)
        return item


@asynccontextmanager
async def running(source: Source, emit: Recorder) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``source`` in a task; on exit cancel it and check it ended by that cancellation."""
    task = asyncio.create_task(source.run(emit), name=f"test-run[{source.name}]")
    try:
        yield task
    finally:
        task.cancel()
        # a cancellation swallowed somewhere would leave run() running: fail, do not hang
        async with asyncio.timeout(10):
            with suppress(asyncio.CancelledError):
                await task
        assert task.cancelled(), "run() must end by its cancellation"
