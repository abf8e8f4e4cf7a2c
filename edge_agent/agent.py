"""The daemon: sources → engine → store (outbox) → uplink, wired in one place.

Start-up opens the store (refusing one it cannot trust), loads the documents, rebuilds the engine
from its committed state, then starts the uplink (outputs first) and the sources last. Shutdown
runs in reverse: the sources stop, the engine commits what is queued, the uplink publishes the
offline status and disconnects. Rows still in the outbox stay there for the next start.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import structlog

from edge_agent.config import Config
from edge_agent.config import OpcUaSource as OpcUaSourceConfig
from edge_agent.documents import load_lots_file, load_master, load_orders_file, read_json
from edge_agent.domain.lots import Lot
from edge_agent.domain.masterdata import (
    MasterData,
    load_master_data,
    merge_master_doc,
    parse_timestamp,
)
from edge_agent.domain.orders import WorkOrder, load_orders
from edge_agent.engine import Engine
from edge_agent.errors import ConfigError, EdgeAgentError, MasterDataError, SignalError
from edge_agent.metrics import AgentMetrics, MetricsServer, registry_for
from edge_agent.sources import Source
from edge_agent.sources.modbus import ModbusSource
from edge_agent.sources.opcua import OpcUaSource
from edge_agent.store import Store
from edge_agent.uplink.mqtt import MqttUplink

log = structlog.get_logger(__name__)

ACK_WRITE_TIMEOUT_S = 5.0
#: a stop that takes longer ends the process (exit 4); below systemd's TimeoutStopSec (30 s)
SHUTDOWN_DEADLINE_S = 20.0
EXIT_SHUTDOWN_TIMED_OUT = 4
_MS = timedelta(milliseconds=1)


@dataclass(frozen=True, slots=True)
class Documents:
    master: MasterData
    orders: Mapping[str, WorkOrder]
    lots: tuple[Lot, ...]
    master_doc: Mapping[str, Any]


async def load_documents(config: Config, store: Store) -> Documents:
    """The master data and orders the agent runs with, cached in the store.

    The store's cache is what the agent runs with: the MES's master-data commands are merged
    into it, and it serves when no file is configured or the network is down. A configured file
    is applied (merged like a command, so it never changes a known revision) only when the file
    itself changed since it was last applied: an old file never undoes what the MES sent.
    Every change is recorded in the audit chain.
    """
    cached_master = await store.get_masterdata("document", "masterdata")
    cached_orders = await store.get_masterdata("document", "orders")
    m = config.masterdata
    if m is None:
        if cached_master is None:
            raise ConfigError(["masterdata.path: required (the store holds no master data yet)"])
        master = load_master_data(cached_master)
        orders = load_orders(cached_orders or {}, master)
        return Documents(master, orders, (), cached_master)
    raw_master = read_json(m.path, "master data")
    raw_orders = read_json(m.orders, "work orders") if m.orders is not None else {"orders": []}
    assert isinstance(raw_master, dict)
    assert isinstance(raw_orders, dict)
    load_master(m.path)  # the file on its own must be valid: its errors name its lines
    applied_file = await store.get_masterdata("file", "masterdata")
    effective = cached_master
    if cached_master is None:
        effective = raw_master
    elif raw_master != applied_file:
        try:
            effective = merge_master_doc(cached_master, raw_master)
        except MasterDataError as exc:
            raise ConfigError([f"masterdata.path: {p}" for p in exc.problems]) from None
    assert effective is not None
    master = load_master_data(effective)
    orders = load_orders_file(m.orders, master) if m.orders is not None else {}
    lots = load_lots_file(m.lots, master) if m.lots is not None else ()
    async with store.transaction() as tx:
        now = datetime.now(UTC).isoformat(timespec="milliseconds")
        if raw_master != applied_file:
            tx.put_masterdata("file", "masterdata", raw_master)
        for key, raw, cached in (
            ("masterdata", effective, cached_master),
            ("orders", raw_orders, cached_orders),
        ):
            if raw != cached:
                tx.put_masterdata("document", key, raw)
                tx.audit(f"document:{key}", key, json.dumps(raw, sort_keys=True).encode(), now)
                log.info("document_loaded", document=key, changed=cached is not None)
    return Documents(master, orders, lots, effective)


class SourceWriter:
    """Routes the engine's acknowledge writes to the source that owns the signal."""

    def __init__(self, sources: Mapping[str, Source]) -> None:
        self._sources = sources

    async def write(self, source: str, signal: str, value: bool | int) -> None:
        try:
            async with asyncio.timeout(ACK_WRITE_TIMEOUT_S):
                await self._sources[source].write(signal, value)
        except TimeoutError:
            raise SignalError(
                f"{source}: writing {signal} timed out after {ACK_WRITE_TIMEOUT_S} s"
            ) from None


def plc_sources(config: Config) -> list[Source]:
    """A source per configured connection, of its kind (OPC UA or Modbus TCP)."""
    return [
        OpcUaSource(s) if isinstance(s, OpcUaSourceConfig) else ModbusSource(s)
        for s in config.sources
    ]


async def cancel_until_done(tasks: Sequence[asyncio.Task[None]], every_s: float = 0.5) -> None:
    """Cancel ``tasks`` and cancel again until they have ended.

    A library may swallow a cancellation (asyncua's ``Client.disconnect`` does; on Python 3.11
    ``asyncio.timeout`` can turn a cancellation that lands as its deadline expires into a
    TimeoutError, which a source takes for a lost connection and reconnects): one cancel is
    then not enough to stop a source, and shutdown would hang.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    while pending := [t for t in tasks if not t.done()]:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=every_s)
        if loop.time() - started > 5 * every_s and any(not t.done() for t in pending):
            log.warning("task_slow_to_stop", tasks=[t.get_name() for t in pending if not t.done()])
            started = loop.time()


class Agent:
    """One agent run. ``await agent.run(stop)`` until ``stop`` is set (SIGTERM, SIGINT)."""

    def __init__(
        self,
        config: Config,
        make_sources: Callable[[Config], Sequence[Source]] = plc_sources,
    ) -> None:
        self.config = config
        self._make_sources = make_sources
        self.engine: Engine | None = None
        self.uplink: MqttUplink | None = None
        self.store: Store | None = None
        self.metrics = AgentMetrics(config)

    async def run(self, stop: asyncio.Event) -> None:
        """The metrics endpoint binds first (a port in use stops start-up before anything
        else starts) and closes last; it reads the store only while the store is open."""
        metrics = self.metrics
        metrics.bind(asyncio.get_running_loop())
        m = self.config.metrics
        server = MetricsServer(m, registry_for(metrics)) if m is not None else None
        try:
            await self._run(stop)
        finally:
            metrics.status = None
            if server is not None:
                await asyncio.to_thread(server.close)

    async def _run(self, stop: asyncio.Event) -> None:
        config = self.config
        metrics = self.metrics
        Path(config.store.path).parent.mkdir(parents=True, exist_ok=True)
        async with Store.open(Path(config.store.path), config.store.synchronous) as store:
            self.store = store
            docs = await load_documents(config, store)
            engine = await Engine.load(
                config, store, docs.master, docs.orders, docs.lots, master_doc=docs.master_doc
            )
            self.engine = engine
            metrics.engine = engine
            if config.metrics is not None:
                metrics.prime()
            log.info(
                "agent_starting",
                agent=config.agent.id,
                store=str(config.store.path),
                outbox=await store.outbox_depth(),
                sequence=engine.sequence,
            )
            sources = {s.name: s for s in self._make_sources(config)}

            async def status() -> dict[str, Any]:
                oldest = await store.oldest_pending()
                age = (
                    Decimal(str((datetime.now(UTC) - parse_timestamp(oldest.created_at)) // _MS))
                    / 1000
                    if oldest is not None
                    else None
                )
                head = store.audit_head
                return {
                    "outbox_depth": await store.outbox_depth(),
                    "oldest_unacknowledged_s": age,
                    "audit_head": {"seq": head[0], "hash": head[1]} if head else None,
                    **engine.status_figures(),
                }

            metrics.status = status  # the same figures, never computed a second way
            async with MqttUplink(
                config, store, on_command=engine.submit_command, status=status
            ) as uplink:
                self.uplink = uplink
                metrics.uplink = uplink
                async with asyncio.TaskGroup() as tg:
                    uplink_task = tg.create_task(uplink.run(), name="uplink")
                    engine_task = tg.create_task(
                        engine.run(
                            store,
                            SourceWriter(sources),
                            uplink.notify,
                            on_alarm=uplink.status_changed,
                        ),
                        name="engine",
                    )
                    source_tasks = [
                        tg.create_task(s.run(engine.submit), name=f"source[{name}]")
                        for name, s in sources.items()
                    ]
                    log.info("agent_running", sources=list(sources))
                    stopped = asyncio.create_task(stop.wait())
                    await asyncio.wait(
                        [stopped, engine_task, uplink_task, *source_tasks],
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    stopped.cancel()
                    log.info("agent_stopping")
                    await cancel_until_done(source_tasks)
                    log.info("sources_stopped")
                    if not engine_task.done():
                        engine.stop()
                        await engine_task
                    await cancel_until_done([uplink_task])
            log.info("agent_stopped", outbox=await store.outbox_depth())
            metrics.status = None  # the store closes: a scrape shows its last figures from here


def serve(config: Config) -> int:
    """``edge-agent run``: run until SIGTERM/SIGINT; the exit code says how it ended."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def request_stop() -> None:
            if not stop.is_set():
                stop.set()
                # the last resort: what is committed is safe on disk, so a shutdown that hangs
                # (a library that ignores cancellation) ends the process rather than wait forever
                watchdog = threading.Timer(SHUTDOWN_DEADLINE_S, _give_up)
                watchdog.daemon = True  # a clean exit does not wait for it
                watchdog.start()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, request_stop)
        await Agent(config).run(stop)

    try:
        asyncio.run(main())
    except BaseExceptionGroup as group:
        # a task of the TaskGroup failed: the first of our own errors says why
        cause = _first_leaf(group)
        log.error("agent_failed", error=str(cause), error_type=type(cause).__name__)
        if isinstance(cause, EdgeAgentError):
            raise cause from None
        raise
    return 0


def _give_up() -> None:
    log.error("shutdown_timed_out", after_s=SHUTDOWN_DEADLINE_S)
    os._exit(EXIT_SHUTDOWN_TIMED_OUT)


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first
