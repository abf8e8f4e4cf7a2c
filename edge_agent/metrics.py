"""The Prometheus endpoint: what the agent counts and holds, read when Prometheus scrapes.

Nothing here runs per message, except the one histogram observation per PUBACK (publish →
PUBACK latency, :class:`LatencyHistogram`: a bisect and two additions, no lock). Every other
figure is read at scrape time from state that exists anyway: the engine's and the uplink's
counters, the figures of the retained status (outbox depth, oldest unacknowledged age, sources,
open exceptions: the same ``status`` coroutine, never computed a second way) and the orders the
engine keeps (held requirements, reversals, and for closed orders variance and genealogy).

prometheus-client serves HTTP on threads of its own; the engine, the uplink and aiosqlite belong
to the event loop. So a scrape does not read them from its thread: :meth:`AgentMetrics.collect`
hands :meth:`AgentMetrics.snapshot` to the event loop (``run_coroutine_threadsafe``) and turns the
plain values it returns into metric families. An event loop that does not answer within
``SNAPSHOT_TIMEOUT_S`` gets the previous snapshot served, with its age
(``edge_agent_metrics_snapshot_age_seconds``), and a warning in the log.

What survives a restart: the gauges (outbox, held requirements, open exceptions, connections)
and the figures derived from the store (reversals, closed orders, variance, genealogy) are right
from the first scrape after a start. The counters of events, messages, exceptions, reconnects
and the latency histogram count from the start of the process (Prometheus's ``rate`` and
``increase`` handle the reset). Every label value known up front (each message kind, exception
code, source and material of the master data) is exposed from the start, at 0 until it moves:
``increase`` cannot see the first value of a series that appears later. docs/metrics.md lists
every metric.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import socket
import threading
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final, Literal

import structlog
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector

from edge_agent import __version__
from edge_agent.config import Config, MetricsSection
from edge_agent.domain.masterdata import parse_decimal
from edge_agent.errors import ConfigError
from edge_agent.messages import ExceptionCode, Kind

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from edge_agent.engine import Engine, OrderState
    from edge_agent.uplink.mqtt import MqttUplink

log = structlog.get_logger(__name__)

#: publish → PUBACK buckets, in seconds: loopback is around a millisecond, a busy broker tens
LATENCY_BUCKETS_S: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
#: how long a scrape waits for the event loop to take its snapshot (Prometheus's default
#: scrape timeout is 10 s)
SNAPSHOT_TIMEOUT_S: Final = 5.0

_ZERO = Decimal(0)


class LatencyHistogram:
    """A Prometheus histogram kept by hand: ``observe`` is a bisect and two additions.

    Touched by the event loop only (the uplink's PUBACK handling); a scrape reads a copy taken
    on the event loop (:meth:`copy`), so it needs no lock. prometheus-client's own Histogram
    takes a lock and walks every bucket on each observation.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Iterable[float] = LATENCY_BUCKETS_S) -> None:
        self.bounds = tuple(bounds)
        #: one count per bucket (a value ≤ bounds[i], > bounds[i-1]), the last: above them all
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def copy(self) -> tuple[tuple[tuple[str, float], ...], float]:
        """Cumulative buckets as Prometheus exposes them (``le``, count), and the sum."""
        out = []
        total = 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            total += count
            out.append((bound, float(total)))
        return tuple(out), self.sum


# ----------------------------------------------------------------------------- orders


def genealogy_complete(state: OrderState) -> bool:
    """An order has full component-lot linkage when nothing it posted waits for a lot: every
    component's posted quantity is bound to staged lots (its binding holds nothing), net of
    returns and reversals. An order that posted nothing has nothing unlinked. The finished lot
    is not part of it (an order from the orders file has none)."""
    return all(b.held <= 0 for b in state.bindings.values())


@dataclass
class ClosedOrders:
    """Sums over the closed orders of the store; a closed order never changes, so each is
    added once (the first snapshot after a start adds all that the store holds)."""

    seen: set[str] = field(default_factory=set)
    closed: int = 0
    complete: int = 0
    reversals: int = 0
    reversed: dict[tuple[str, str], Decimal] = field(default_factory=dict)
    theoretical: dict[tuple[str, str], Decimal] = field(default_factory=dict)
    used: dict[tuple[str, str], Decimal] = field(default_factory=dict)
    flagged: Counter[str] = field(default_factory=Counter)

    def add(self, state: OrderState, uom_of: Callable[[str], str]) -> None:
        self.seen.add(state.order)
        self.closed += 1
        self.complete += genealogy_complete(state)
        self.reversals += len(state.reversals)
        _add_reversed(self.reversed, state, uom_of)
        for line in state.variance or ():
            key = (line["material"], line["uom"])
            theoretical = parse_decimal(line["theoretical"])
            used = theoretical + parse_decimal(line["variance"])
            self.theoretical[key] = self.theoretical.get(key, _ZERO) + theoretical
            self.used[key] = self.used.get(key, _ZERO) + used
            self.flagged[line["material"]] += bool(line["flagged"])


def _add_reversed(
    into: dict[tuple[str, str], Decimal], state: OrderState, uom_of: Callable[[str], str]
) -> None:
    for (_, material, _), quantity in state.reversed.items():
        key = (material, uom_of(material))
        into[key] = into.get(key, _ZERO) + quantity


# ----------------------------------------------------------------------------- the snapshot


@dataclass(frozen=True)
class Snapshot:
    """Plain values taken on the event loop; families are built from it on the HTTP thread."""

    taken_at: float  # time.monotonic()
    status: Mapping[str, Any] = field(default_factory=dict)
    events: Mapping[str, int] = field(default_factory=dict)
    messages: Mapping[str, int] = field(default_factory=dict)
    exceptions: Mapping[str, int] = field(default_factory=dict)
    resolved: Mapping[str, int] = field(default_factory=dict)
    batches: int = 0
    source_reconnects: Mapping[str, int] = field(default_factory=dict)
    #: (work centre, material, uom) → (components held, quantity held), open orders
    held: Mapping[tuple[str, str, str], tuple[int, Decimal]] = field(default_factory=dict)
    reversals: int = 0
    reversed: Mapping[tuple[str, str], Decimal] = field(default_factory=dict)
    closed: int = 0
    complete: int = 0
    theoretical: Mapping[tuple[str, str], Decimal] = field(default_factory=dict)
    used: Mapping[tuple[str, str], Decimal] = field(default_factory=dict)
    flagged: Mapping[str, int] = field(default_factory=dict)
    #: every material of the master data → its unit (each material's series exist from 0)
    materials: Mapping[str, str] = field(default_factory=dict)
    uplink: bool = False
    mqtt_connected: bool = False
    published: int = 0
    mqtt_reconnects: int = 0
    refused: bool = False
    latency: tuple[tuple[tuple[str, float], ...], float] = ((), 0.0)


class AgentMetrics(Collector):
    """The agent's metrics, for a registry of its own (never the global one: several agents,
    or tests, in one process must not clash). The agent sets ``engine``, ``status`` and
    ``uplink`` as it starts them; a scrape before that shows what exists."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.engine: Engine | None = None
        self.uplink: MqttUplink | None = None
        #: the retained status's figures (edge_agent.agent: outbox, sources, exceptions)
        self.status: Callable[[], Awaitable[dict[str, Any]]] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._closed = ClosedOrders()
        self._last: Snapshot | None = None
        #: operation → work centre, for the held requirements' label
        self._work_centre_of: dict[str, str] = {}
        for source in config.sources:
            self._work_centre_of.setdefault(source.operation, source.work_centre)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop whose state this reads (call it on that loop)."""
        self._loop = loop
        self._loop_thread = threading.get_ident()

    def describe(self) -> Iterable[Metric]:
        return ()  # registering must not take a snapshot; names are not checked for clashes

    # ------------------------------------------------------------------ on the event loop

    def prime(self) -> None:
        """Sum the closed orders the store holds now, at start-up, before the sources run:
        with years of orders that is a pass the first scrape would otherwise make while the
        line runs (about 30 µs an order)."""
        if self.engine is not None:
            self._orders(self.engine)

    async def snapshot(self) -> Snapshot:
        """Every figure, read on the event loop: ``status`` first (it awaits the store), then
        the engine and the uplink without an await in between (one consistent moment)."""
        if self.status is not None:
            status = dict(await self.status())
        else:  # the store is not open (yet, or any more): the last figures it gave
            status = dict(self._last.status) if self._last is not None else {}
        engine, uplink = self.engine, self.uplink
        fields: dict[str, Any] = {"taken_at": time.monotonic(), "status": status}
        if engine is not None:
            stats = engine.stats
            fields.update(
                events={
                    "signal": stats.events - stats.commands - stats.connection_changes,
                    "command": stats.commands,
                    "connection": stats.connection_changes,
                },
                messages=dict(stats.messages),
                exceptions=dict(stats.exceptions),
                resolved=dict(stats.resolved),
                batches=stats.batches,
                source_reconnects=dict(stats.reconnects),
                **self._orders(engine),
            )
        if uplink is not None:
            fields.update(
                uplink=True,
                mqtt_connected=uplink.connected,
                published=uplink.published,
                mqtt_reconnects=uplink.reconnects,
                refused=uplink.refusal is not None,
                latency=uplink.publish_latency.copy(),
            )
        return Snapshot(**fields)

    def _orders(self, engine: Engine) -> dict[str, Any]:
        materials = engine.master.materials

        def uom_of(material: str) -> str:
            m = materials.get(material)
            return m.uom if m is not None else ""

        closed = self._closed
        for order, state in engine.order_states.items():
            if state.status == "closed" and order not in closed.seen:
                closed.add(state, uom_of)
        held: dict[tuple[str, str, str], tuple[int, Decimal]] = {}
        reversals = closed.reversals
        reversed_ = dict(closed.reversed)
        for state in engine.order_states.values():
            if state.status == "closed":
                continue
            reversals += len(state.reversals)
            _add_reversed(reversed_, state, uom_of)
            for (operation, material, _), binding in state.bindings.items():
                if binding.held > 0:
                    key = (self._work_centre_of.get(operation, ""), material, uom_of(material))
                    n, quantity = held.get(key, (0, _ZERO))
                    held[key] = (n + 1, quantity + binding.held)
        return {
            "materials": {m.id: m.uom for m in materials.values()},
            "held": held,
            "reversals": reversals,
            "reversed": reversed_,
            "closed": closed.closed,
            "complete": closed.complete,
            "theoretical": dict(closed.theoretical),
            "used": dict(closed.used),
            "flagged": dict(closed.flagged),
        }

    # ------------------------------------------------------------------ on the HTTP thread

    def collect(self) -> Iterator[Metric]:
        snapshot, age = self._fresh()
        yield from self._families(snapshot, age)

    def _fresh(self) -> tuple[Snapshot, float]:
        loop = self._loop
        if loop is None or loop.is_closed():
            return self._stale("the agent is not running")
        if threading.get_ident() == self._loop_thread:
            raise RuntimeError("collect() waits for the event loop: call it from another thread")
        future = asyncio.run_coroutine_threadsafe(self.snapshot(), loop)
        try:
            snapshot = future.result(SNAPSHOT_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            future.cancel()
            return self._stale(f"the event loop did not answer within {SNAPSHOT_TIMEOUT_S} s")
        except Exception as exc:  # a store that cannot be read: the last figures, and say so
            return self._stale(f"{type(exc).__name__}: {exc}")
        self._last = snapshot
        return snapshot, time.monotonic() - snapshot.taken_at

    def _stale(self, reason: str) -> tuple[Snapshot, float]:
        log.warning("metrics_snapshot_failed", reason=reason, stale=self._last is not None)
        last = self._last or Snapshot(taken_at=time.monotonic())
        return last, time.monotonic() - last.taken_at

    def _families(self, s: Snapshot, age: float) -> Iterator[Metric]:
        agent = self.config.agent.id
        yield from self._throughput(s, age, agent)
        yield from self._state(s, agent)
        yield from self._connections(s, agent)
        yield from self._exceptions(s, agent)
        yield from self._orders_closed(s, agent)

    def _throughput(self, s: Snapshot, age: float, agent: str) -> Iterator[Metric]:
        p = self.config.place
        info = InfoMetricFamily(
            "edge_agent", "The agent and its place (ISA-95); always 1", labels=["agent"]
        )
        info.add_metric(
            [agent],
            {"site": p.site, "area": p.area, "line": p.line, "version": __version__},
        )
        yield info
        yield _gauge(
            "edge_agent_metrics_snapshot_age_seconds",
            "Age of the figures served: above a few seconds the event loop did not answer",
            agent,
            age,
        )

        yield _by_label(
            "counter",
            "edge_agent_events",
            "Events the engine applied since start, by kind (signal, command, connection)",
            agent,
            "kind",
            s.events,
        )
        yield _by_label(
            "counter",
            "edge_agent_messages_queued",
            "Messages the engine committed to the outbox since start, by kind",
            agent,
            "kind",
            _from_zero(s.messages, Kind),
        )
        yield _counter(
            "edge_agent_messages_published",
            "Messages acknowledged (broker PUBACK, or the MES in mes-ack delivery) and removed "
            "from the outbox since start",
            agent,
            s.published,
        )
        yield _counter(
            "edge_agent_engine_batches",
            "Batches the engine committed (one SQLite transaction each) since start",
            agent,
            s.batches,
        )

    def _state(self, s: Snapshot, agent: str) -> Iterator[Metric]:
        st = s.status
        yield _gauge(
            "edge_agent_outbox_depth",
            "Messages in the outbox, waiting for their acknowledgement",
            agent,
            st.get("outbox_depth") or 0,
        )
        yield _gauge(
            "edge_agent_oldest_unacknowledged_age_seconds",
            "Age of the oldest message in the outbox (0: the outbox is empty)",
            agent,
            st.get("oldest_unacknowledged_s") or 0,
        )
        yield _gauge(
            "edge_agent_held_for_clock_postings",
            "Postings held while the agent's clock is not trusted (not in the outbox yet)",
            agent,
            st.get("held_for_clock") or 0,
        )
        yield _gauge(
            "edge_agent_clock_trusted",
            "1 while the agent's clock is trusted (postings flow), 0 while postings are held",
            agent,
            1 if st.get("clock_trusted", True) else 0,
        )
        yield _gauge(
            "edge_agent_store_fault",
            "1 while the store cannot commit (no new work is taken)",
            agent,
            1 if st.get("store_fault") else 0,
        )

        requirements = GaugeMetricFamily(
            "edge_agent_held_requirements",
            "Components of open orders with a posted quantity held for want of an eligible lot",
            labels=["agent", "work_centre", "material"],
        )
        quantity = GaugeMetricFamily(
            "edge_agent_held_quantity",
            "Quantity held for want of an eligible lot (open orders), in the material's unit",
            labels=["agent", "work_centre", "material", "uom"],
        )
        for (wc, material, uom), (n, q) in sorted(s.held.items()):
            requirements.add_metric([agent, wc, material], n)
            quantity.add_metric([agent, wc, material, uom], float(q))
        yield requirements
        yield quantity

    def _connections(self, s: Snapshot, agent: str) -> Iterator[Metric]:
        connected = GaugeMetricFamily(
            "edge_agent_source_connected",
            "1 while the PLC connection is up",
            labels=["agent", "source", "work_centre"],
        )
        reconnects = CounterMetricFamily(
            "edge_agent_source_reconnects",
            "Established PLC connections lost since start (each is followed by a reconnect)",
            labels=["agent", "source", "work_centre"],
        )
        sources = s.status.get("sources") or {}
        for source in self.config.sources:
            labels = [agent, source.name, source.work_centre]
            up = sources.get(source.name, {}).get("connected", False)
            connected.add_metric(labels, 1 if up else 0)
            reconnects.add_metric(labels, s.source_reconnects.get(source.name, 0))
        yield connected
        yield reconnects
        if s.uplink:
            yield _gauge(
                "edge_agent_mqtt_connected",
                "1 while the broker connection is up",
                agent,
                1 if s.mqtt_connected else 0,
            )
            yield _counter(
                "edge_agent_mqtt_reconnects",
                "Established broker connections lost since start",
                agent,
                s.mqtt_reconnects,
            )
            yield _gauge(
                "edge_agent_mqtt_publish_refused",
                "1 while the broker refuses a publish (the outbox is held, order kept)",
                agent,
                1 if s.refused else 0,
            )
            buckets, total = s.latency
            histogram = HistogramMetricFamily(
                "edge_agent_publish_latency_seconds",
                "From handing an outbox message to the MQTT client to its PUBACK on the event "
                "loop, since start",
                labels=["agent"],
            )
            histogram.add_metric([agent], list(buckets), total)
            yield histogram

    def _exceptions(self, s: Snapshot, agent: str) -> Iterator[Metric]:
        yield _by_label(
            "counter",
            "edge_agent_exceptions_raised",
            "Exception messages raised since start, by code (lot_held: a posting blocked for "
            "want of a lot; order_held, order_closed, unknown_order, counter_jump: counts kept, "
            "not posted; ...)",
            agent,
            "code",
            _from_zero(s.exceptions, ExceptionCode),
        )
        yield _by_label(
            "counter",
            "edge_agent_exceptions_resolved",
            "Exceptions resolved since start, by code",
            agent,
            "code",
            _from_zero(s.resolved, ExceptionCode),
        )
        now_open = Counter(e["code"] for e in s.status.get("open_exceptions", ()))
        yield _by_label(
            "gauge",
            "edge_agent_open_exceptions",
            "Exceptions open now (the retained status lists them), by code",
            agent,
            "code",
            _from_zero(now_open, ExceptionCode),
        )

        yield _counter(
            "edge_agent_reversals",
            "Postings reversed at the MES's request (all orders in the store)",
            agent,
            s.reversals,
        )
        reversed_ = CounterMetricFamily(
            "edge_agent_reversed_quantity",
            "Quantity reversed (all orders in the store), in the material's unit",
            labels=["agent", "material", "uom"],
        )
        for (material, uom), q in sorted(_by_material(s.reversed, s.materials).items()):
            reversed_.add_metric([agent, material, uom], float(q))
        yield reversed_

    def _orders_closed(self, s: Snapshot, agent: str) -> Iterator[Metric]:
        orders = CounterMetricFamily(
            "edge_agent_orders_closed",
            "Orders closed (all in the store), by genealogy: complete when every posted "
            "component quantity is bound to lots",
            labels=["agent", "genealogy"],
        )
        orders.add_metric([agent, "complete"], s.complete)
        orders.add_metric([agent, "incomplete"], s.closed - s.complete)
        yield orders
        ratio = GaugeMetricFamily(
            "edge_agent_genealogy_completeness_ratio",
            "Share of closed orders with full component-lot linkage (no sample: none closed)",
            labels=["agent"],
        )
        if s.closed:
            ratio.add_metric([agent], s.complete / s.closed)
        yield ratio

        theoretical = CounterMetricFamily(
            "edge_agent_material_theoretical",
            "Theoretical consumption of closed orders (what the confirmations imply), summed "
            "from their close variance, in the material's unit",
            labels=["agent", "material", "uom"],
        )
        used = CounterMetricFamily(
            "edge_agent_material_used",
            "Actual consumption of closed orders (issued, less remnants when counted at close), "
            "in the material's unit",
            labels=["agent", "material", "uom"],
        )
        variance = GaugeMetricFamily(
            "edge_agent_usage_variance_ratio",
            "(used − theoretical) / theoretical over the closed orders in the store",
            labels=["agent", "material"],
        )
        for (material, uom), theo in sorted(_by_material(s.theoretical, s.materials).items()):
            u = s.used.get((material, uom), _ZERO)
            theoretical.add_metric([agent, material, uom], float(theo))
            used.add_metric([agent, material, uom], float(u))
            if theo:
                variance.add_metric([agent, material], float((u - theo) / theo))
        yield theoretical
        yield used
        yield variance
        yield _by_label(
            "counter",
            "edge_agent_variance_lines_flagged",
            "Close-variance lines beyond orders.variance_threshold_pct (closed orders in the "
            "store)",
            agent,
            "material",
            _from_zero(s.flagged, s.materials),
        )


def _from_zero(counts: Mapping[str, int], known: Iterable[str]) -> dict[str, int]:
    """``counts`` with every ``known`` label value, 0 where it has none."""
    return {**dict.fromkeys(map(str, known), 0), **counts}


def _by_material(
    quantities: Mapping[tuple[str, str], Decimal], materials: Mapping[str, str]
) -> dict[tuple[str, str], Decimal]:
    """``quantities`` by (material, uom) with every material of the master data, 0 where it
    has none."""
    return {**dict.fromkeys(materials.items(), _ZERO), **quantities}


def _by_label(
    kind: Literal["counter", "gauge"],
    name: str,
    doc: str,
    agent: str,
    label: str,
    values: Mapping[str, int],
) -> Metric:
    """A family with one sample per value of ``label``, in order."""
    family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
        name, doc, labels=["agent", label]
    )
    for value, n in sorted(values.items()):
        family.add_metric([agent, value], n)
    return family


def _gauge(name: str, doc: str, agent: str, value: float | Decimal) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=["agent"])
    g.add_metric([agent], float(value))
    return g


def _counter(name: str, doc: str, agent: str, value: float) -> CounterMetricFamily:
    c = CounterMetricFamily(name, doc, labels=["agent"])
    c.add_metric([agent], value)
    return c


# ----------------------------------------------------------------------------- the server


class MetricsServer:
    """prometheus-client's HTTP server on ``section.listen``, on a thread of its own.

    Binding happens here, first thing at start-up: a port in use (another agent on this PC
    with the same port) or an address this machine does not have is a ConfigError naming
    ``metrics.listen``, before anything else starts."""

    def __init__(self, section: MetricsSection, registry: CollectorRegistry) -> None:
        self.section = section
        try:
            self._httpd, self._thread = start_http_server(
                section.port, section.host, registry=registry
            )
        except OSError as exc:
            raise ConfigError([f"metrics.listen: {_bind_error(section.listen, exc)}"]) from None
        log.info("metrics_listening", listen=section.listen, url=self.url)

    @property
    def url(self) -> str:
        host, port = str(self._httpd.server_address[0]), self._httpd.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/metrics"

    def close(self) -> None:
        """Stop serving (blocks up to half a second: serve_forever's poll) and free the port."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def _bind_error(listen: str, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (
            f"cannot listen on {listen}: the port is in use (another agent on this PC? "
            "each agent needs its own metrics port)"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {listen}: this machine has no such address"
    if isinstance(exc, socket.gaierror):
        return f"cannot listen on {listen}: the host name does not resolve ({exc.strerror})"
    if exc.errno == errno.EACCES:
        return f"cannot listen on {listen}: permission denied (a port below 1024?)"
    return f"cannot listen on {listen}: {exc.strerror or exc}"


def registry_for(metrics: AgentMetrics) -> CollectorRegistry:
    """A registry of the agent's own, holding only ``metrics``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)
    return registry
