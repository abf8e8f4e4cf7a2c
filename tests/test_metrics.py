"""The Prometheus endpoint: scraped over real HTTP while a real agent runs against the OPC UA line
PLC simulator, a real broker and the MES simulator; the figures must move by what the PLC and
the MES did, and the figures derived from the store must be the same after a restart.

Every scrape runs on a thread (``asyncio.to_thread``): the endpoint waits for the event loop to
take its snapshot, so a scrape from the event loop itself would wait for ever.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import socket
import time
import tomllib
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.agent import Agent, load_documents
from edge_agent.cli import main
from edge_agent.config import Config, parse_config
from edge_agent.engine import CommandEvent, Engine
from edge_agent.errors import ConfigError
from edge_agent.messages import MaterialConsumed
from edge_agent.metrics import AgentMetrics, LatencyHistogram, registry_for
from edge_agent.sources import Quality, SignalEvent
from edge_agent.store import Store, UnitOfWork
from simulators.broker import EmbeddedBroker, free_port
from simulators.mes import MesSimulator
from simulators.opcua_plc import LinePlc
from tests.support.broker import Broker
from tests.test_mes_contract import example_line, received, reply
from tests.test_mes_contract import wait as mes_wait

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
DASHBOARD = CONFIG_DIR / "grafana-dashboard.json"
MIX, FILL = "MIX-1", "FILL-1"


# ----------------------------------------------------------------------------- scraping


@dataclass(frozen=True)
class Scrape:
    """One scrape, parsed by prometheus-client's own parser."""

    families: frozenset[str]
    samples: tuple[tuple[str, dict[str, str], float], ...]
    #: the names the text declares (``# TYPE name kind``), samples or none
    declared: frozenset[str]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called ``name`` whose labels include ``labels``."""
        return sum(
            v
            for n, got, v in self.samples
            if n == name and all(got.get(k) == x for k, x in labels.items())
        )

    def has(self, name: str, **labels: str) -> bool:
        return any(
            n == name and all(got.get(k) == x for k, x in labels.items())
            for n, got, _ in self.samples
        )

    def by(self, name: str, label: str) -> dict[str, float]:
        return {got[label]: v for n, got, v in self.samples if n == name}

    def nonzero(self, name: str, label: str) -> dict[str, float]:
        return {k: v for k, v in self.by(name, label).items() if v}

    def exposes(self, name: str) -> bool:
        """``name`` is a sample name of the scrape, whether or not it has samples now."""
        if name in self.declared or any(n == name for n, _, _ in self.samples):
            return True
        base, _, suffix = name.rpartition("_")
        return suffix in ("bucket", "sum", "count") and base in self.declared


def parse(text: str) -> Scrape:
    families = list(text_string_to_metric_families(text))
    return Scrape(
        frozenset(f.name for f in families),
        tuple((s.name, dict(s.labels), s.value) for f in families for s in f.samples),
        frozenset(re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE)),
    )


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        body: bytes = response.read()
    return body.decode()


async def scrape(url: str) -> Scrape:
    return parse(await asyncio.to_thread(_get, url))


async def until(
    url: str, predicate: Callable[[Scrape], bool], what: str, timeout: float = 15.0
) -> Scrape:
    """Scrape until ``predicate`` holds; the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        s = await scrape(url)
        if predicate(s):
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


# ----------------------------------------------------------------------------- the set-up


def agent_config(
    tmp_path: Path, mqtt_port: int, protocol: str, plc_port: int, metrics_port: int
) -> Config:
    """The example line: its PLCs on ``plc_port``, no PK-CAP lot staged (caps are held until
    the test stages one), the metrics endpoint on ``metrics_port``."""
    data = example_line(tmp_path, "PK-CAP")
    data["mqtt"].update(
        {
            "port": mqtt_port,
            "protocol": protocol,
            "reconnect_min_ms": 100,
            "reconnect_max_ms": 1000,
            "status_interval_s": 1,
        }
    )
    for source in data["sources"]:
        source.update(
            {
                "endpoint": f"opc.tcp://127.0.0.1:{plc_port}/edge-agent/sim/",
                "reconnect_min_ms": 50,
                "reconnect_max_ms": 400,
            }
        )
    data["metrics"] = {"listen": f"127.0.0.1:{metrics_port}"}
    return parse_config(data)


@asynccontextmanager
async def running(config: Config) -> AsyncIterator[Agent]:
    """The agent until the block ends, once its sources and the broker are connected; stopped
    as on SIGTERM."""
    agent = Agent(config)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop), name="agent")
    try:
        async with asyncio.timeout(15):
            while not (
                agent.uplink is not None
                and agent.uplink.connected
                and agent.engine is not None
                and all(agent.engine.connected.values())
            ):
                if task.done():
                    task.result()
                    pytest.fail("the agent ended by itself")
                await asyncio.sleep(0.02)
        yield agent
    finally:
        stop.set()
        async with asyncio.timeout(20):
            await task


def delta(after: Scrape, before: Scrape, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


async def drained(url: str, mes: MesSimulator) -> Scrape:
    """Scrape until the outbox is empty and the MES has every message the agent queued."""

    def done(s: Scrape) -> bool:
        queued = s.value("edge_agent_messages_queued_total")
        return (
            s.value("edge_agent_outbox_depth") == 0
            and sum(mes.received_by_kind().values()) == queued
            and s.value("edge_agent_messages_published_total") == queued
        )

    return await until(url, done, "the outbox to drain to the MES")


def count(s: Scrape, name: str) -> float:
    return s.value(f"{name}_count")


# ----------------------------------------------------------------------------- the agent, live


@pytest.mark.asyncio
async def test_the_figures_move_as_the_plc_produces_and_survive_a_restart(
    broker: Broker | EmbeddedBroker, tmp_path: Path
) -> None:
    protocol = "5" if "5" in broker.protocols else "3.1.1"
    plc_port, metrics_port = free_port(), free_port()
    config = agent_config(tmp_path, broker.port, protocol, plc_port, metrics_port)
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    plc = LinePlc(config, port=plc_port)
    await plc.start()
    mes = MesSimulator.for_agent(config, tmp_path / "mes.db", client_id="mes-metrics")
    mes.start()
    try:
        await plc.set_order(MIX, "WO-7")
        await plc.set_order(FILL, "WO-7")
        async with running(config):
            before = await drained(url, mes)
            assert before.value("edge_agent_source_connected", source="fill-plc") == 1
            assert before.value("edge_agent_mqtt_connected") == 1

            # -- three operation completes at the filler: one confirmation each
            for good in (10, 11, 12):
                await plc.complete(FILL, good=good, scrap=1)
            after = await drained(url, mes)
            assert delta(after, before, "edge_agent_messages_queued_total",
                         kind="production-confirmation") == 3  # fmt: skip
            # each handshake is at least the request raised and dropped
            assert delta(after, before, "edge_agent_events_total", kind="signal") >= 6
            assert after.value("edge_agent_events_total", kind="connection") == 2  # two sources
            # what the MES received, by kind, is what the agent says it queued and published
            by_kind = mes.received_by_kind()
            assert after.nonzero("edge_agent_messages_queued_total", "kind") == by_kind
            # every kind is there from the start, at 0 until it moves (increase() needs that)
            assert before.value("edge_agent_messages_queued_total", kind="genealogy") == 0
            published = delta(after, before, "edge_agent_messages_published_total")
            assert published == sum(by_kind.values()) - sum(
                before.by("edge_agent_messages_queued_total", "kind").values()
            )
            assert published > 3
            # one latency observation per published row (no reconnect in between)
            latency = "edge_agent_publish_latency_seconds"
            assert count(after, latency) - count(before, latency) == published
            assert after.value(f"{latency}_bucket", le="+Inf") == count(after, latency)
            assert after.value(f"{latency}_sum") > 0

            # -- no cap lot staged: the caps are held, as the postings' held parts say
            caps = [m for m in received(mes, MaterialConsumed) if m.material == "PK-CAP"]
            held = sum((m.held.quantity for m in caps if m.held), Decimal(0))
            assert held > 0
            assert after.value("edge_agent_held_requirements", material="PK-CAP") == 1
            assert after.value(
                "edge_agent_held_quantity", work_centre=FILL, material="PK-CAP", uom="pc"
            ) == float(held)
            assert after.value("edge_agent_open_exceptions", code="lot_held") == 1
            assert after.value("edge_agent_exceptions_raised_total", code="lot_held") == 1
            staged = mes.stage_lot("CAP-9001", "PK-CAP", 1000)
            assert (await reply(mes, staged)).result == "accepted"
            bound = await until(
                url,
                lambda s: not s.has("edge_agent_held_requirements", material="PK-CAP"),
                "the held caps to be bound",
            )
            assert bound.value("edge_agent_open_exceptions", code="lot_held") == 0
            assert bound.value("edge_agent_exceptions_resolved_total", code="lot_held") == 1

            # -- a reversal, counted from the order's state
            tube = next(m for m in received(mes, MaterialConsumed) if m.material == "PK-TUBE")
            reversal = await reply(mes, mes.reverse(tube.message_id, "WRONG_COUNT", "jdoe"))
            assert reversal.result == "accepted", reversal.reason
            reversed_ = await until(
                url, lambda s: s.value("edge_agent_reversals_total") == 1, "the reversal"
            )
            assert reversed_.value("edge_agent_reversed_quantity_total", material="PK-TUBE") == (
                float(tube.quantity)
            )

            # -- the PLC connections drop: each source reconnects, and says so
            assert plc.drop_connections() >= 2

            def reconnected(s: Scrape) -> bool:
                return all(
                    s.value("edge_agent_source_reconnects_total", source=name)
                    - before.value("edge_agent_source_reconnects_total", source=name)
                    >= 1
                    and s.value("edge_agent_source_connected", source=name) == 1
                    for name in ("mix-plc", "fill-plc")
                )

            await until(url, reconnected, "both sources to reconnect")

            # -- the broker goes away: the outbox fills and ages; it drains when it is back
            broker.stop()
            await until(url, lambda s: s.value("edge_agent_mqtt_connected") == 0, "disconnect")
            await plc.complete(FILL, good=5)
            outage = await until(
                url,
                lambda s: (
                    s.value("edge_agent_outbox_depth") > 0
                    and s.value("edge_agent_oldest_unacknowledged_age_seconds") > 0
                ),
                "the outbox to fill while the broker is down",
            )
            assert outage.value("edge_agent_mqtt_reconnects_total") == (
                before.value("edge_agent_mqtt_reconnects_total") + 1
            )
            broker.start()
            back = await drained(url, mes)
            assert back.value("edge_agent_mqtt_connected") == 1
            assert back.value("edge_agent_oldest_unacknowledged_age_seconds") == 0
            assert back.nonzero("edge_agent_messages_queued_total", "kind") == (
                mes.received_by_kind()
            )
            assert count(back, latency) > count(after, latency)

            # -- the order closes: variance by material, genealogy complete (caps were bound)
            closed = await reply(mes, mes.close_order("WO-7"))
            assert closed.result == "accepted", closed.reason
            await mes_wait(mes, lambda m: bool(m.ledger.variances("WO-7")))
            (variance,) = mes.ledger.variances("WO-7")
            final = await until(
                url,
                lambda s: s.value("edge_agent_orders_closed_total") == 1,
                "the close in the figures",
            )
        expected_used: dict[str, Decimal] = {}
        expected_theoretical: dict[str, Decimal] = {}
        for line in variance.lines:
            expected_theoretical[line.material] = (
                expected_theoretical.get(line.material, Decimal(0)) + line.theoretical
            )
            expected_used[line.material] = (
                expected_used.get(line.material, Decimal(0)) + line.theoretical + line.variance
            )
        assert final.nonzero("edge_agent_material_theoretical_total", "material") == {
            m: float(q) for m, q in expected_theoretical.items() if q
        }
        assert final.nonzero("edge_agent_material_used_total", "material") == {
            m: float(q) for m, q in expected_used.items() if q
        }
        # every material of the master data has its series, 0 where nothing was closed
        assert final.value("edge_agent_material_used_total", material="DOC-IFU") == 0
        ratios = final.by("edge_agent_usage_variance_ratio", "material")
        assert ratios  # the filler's components were consumed
        assert ratios == {
            m: float((expected_used[m] - t) / t) for m, t in expected_theoretical.items() if t
        }
        assert final.value("edge_agent_orders_closed_total", genealogy="complete") == 1
        assert final.value("edge_agent_genealogy_completeness_ratio") == 1.0

        # -- a restart: what derives from the store is the same; counters start again
        async with running(config):
            # what the restart itself queues (the sources' reconnect messages) is delivered
            # first: then the outbox is empty again
            again = await until(
                url, lambda x: x.value("edge_agent_outbox_depth") == 0, "the outbox drained"
            )
        for name in (
            "edge_agent_orders_closed_total",
            "edge_agent_genealogy_completeness_ratio",
            "edge_agent_material_theoretical_total",
            "edge_agent_material_used_total",
            "edge_agent_usage_variance_ratio",
            "edge_agent_reversals_total",
            "edge_agent_reversed_quantity_total",
        ):
            assert [x for x in again.samples if x[0] == name] == [
                x for x in final.samples if x[0] == name
            ], name
        assert again.value("edge_agent_messages_published_total") < published
    finally:
        mes.close()
        await plc.stop()


# ----------------------------------------------------------------------------- the dashboard


def dashboard_metrics() -> set[str]:
    """Every edge_agent_* name the dashboard's queries and variables use."""
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "query", "definition") and isinstance(value, str):
                    names.update(re.findall(r"\bedge_agent_[a-z_]+", value))
                elif isinstance(value, dict | list):
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(json.loads(DASHBOARD.read_text()))
    return names


def test_the_dashboard_is_a_grafana_dashboard_of_the_agents_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36
    (source,) = [x for x in dashboard["__inputs"] if x["type"] == "datasource"]
    assert source["name"] == "DS_PROMETHEUS"
    assert source["pluginId"] == "prometheus"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"line", "agent"} <= variables
    assert len(dashboard_metrics()) >= 15


@pytest.mark.asyncio
async def test_every_metric_the_dashboard_uses_is_in_a_scrape(tmp_path: Path) -> None:
    """The agent without PLCs and with no broker listening: every family is exposed all the
    same (some without samples), so a renamed metric fails here, not on a plant's wall."""
    data = copy.deepcopy(tomllib.loads((CONFIG_DIR / "line.toml").read_text()))
    data["masterdata"] = {"path": str(CONFIG_DIR / "masterdata.json")}
    data["store"]["path"] = str(tmp_path / "agent.db")
    data["mqtt"]["port"] = free_port()  # nothing listens there
    port = free_port()
    data["metrics"] = {"listen": f"127.0.0.1:{port}"}
    config = parse_config(data)
    agent = Agent(config, make_sources=lambda c: [])
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        async with asyncio.timeout(10):
            while agent.uplink is None:
                assert not task.done()
                await asyncio.sleep(0.02)
        s = await scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        stop.set()
        async with asyncio.timeout(20):
            await task
    assert {name for name in dashboard_metrics() if not s.exposes(name)} == set()
    assert not s.exposes("edge_agent_no_such_metric")
    assert s.value("edge_agent_mqtt_connected") == 0
    assert s.has("edge_agent_info", agent="line1-edge", line="line-1", site="hamburg")


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("9464", "must be HOST:PORT"),
        ("127.0.0.1:http", "must be HOST:PORT"),
        ("127.0.0.1:0", "must be HOST:PORT with a port from 1 to 65535"),
        ("127.0.0.1:70000", "must be HOST:PORT with a port from 1 to 65535"),
        ("::1:9464", "an IPv6 address is written in brackets"),
        ("0.0.0.0:9464", "0.0.0.0 is not a loopback address"),
        ("plc-pc.example:9464", "plc-pc.example is not a loopback address"),
    ],
)
def test_a_bad_listen_address_is_named(listen: str, expected: str) -> None:
    data = tomllib.loads((CONFIG_DIR / "line.toml").read_text())
    data["metrics"] = {"listen": listen}
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    (problem,) = exc.value.problems
    assert problem.startswith(f"metrics.listen: {expected}"), problem


@pytest.mark.parametrize(
    ("metrics", "host", "port"),
    [
        ({}, "127.0.0.1", 9464),
        ({"listen": "[::1]:9500"}, "::1", 9500),
        ({"listen": "localhost:9501"}, "localhost", 9501),
        ({"listen": "0.0.0.0:9464", "allow_remote": True}, "0.0.0.0", 9464),
    ],
)
def test_loopback_unless_remote_is_allowed(metrics: dict[str, Any], host: str, port: int) -> None:
    data = tomllib.loads((CONFIG_DIR / "line.toml").read_text())
    assert parse_config(data).metrics is None  # off unless configured
    data["metrics"] = metrics
    section = parse_config(data).metrics
    assert section is not None
    assert (section.host, section.port) == (host, port)


def test_a_port_in_use_stops_run_with_a_clear_error_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = copy.deepcopy(tomllib.loads((CONFIG_DIR / "line.toml").read_text()))
    data["masterdata"] = {"path": str(CONFIG_DIR / "masterdata.json")}
    data["store"]["path"] = str(tmp_path / "agent.db")
    with socket.socket() as taken:  # another agent on this PC, say
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        data["metrics"] = {"listen": f"127.0.0.1:{port}"}
        path = tmp_path / "line.toml"
        path.write_text(tomli_w.dumps(data))
        assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"metrics.listen: cannot listen on 127.0.0.1:{port}: the port is in use" in err
    assert "Traceback" not in err
    assert not (tmp_path / "agent.db").exists()  # nothing was started


# ----------------------------------------------------------------------------- without a network


@pytest.mark.asyncio
async def test_an_order_closed_with_caps_held_is_an_incomplete_genealogy(tmp_path: Path) -> None:
    """The engine alone (no sources, no uplink): a close with a posted quantity still waiting
    for a lot is not full linkage; held requirements and variance come from the same state."""
    data = example_line(tmp_path, "PK-CAP")
    config = parse_config(data)
    async with Store.open(tmp_path / "agent.db") as store:
        docs = await load_documents(config, store)
        engine = await Engine.load(config, store, docs.master, docs.orders, docs.lots)
        metrics = AgentMetrics(config)
        metrics.bind(asyncio.get_running_loop())
        metrics.engine = engine
        at = datetime(2026, 11, 23, 6, 0, tzinfo=UTC)
        for n, (signal, value) in enumerate(
            (
                ("order", "WO-7"),
                ("complete_good", 40),
                ("complete_scrap", 2),
                ("complete_request", True),
            )
        ):
            t = at + timedelta(seconds=n)
            engine.apply(SignalEvent("fill-plc", FILL, signal, "n", value, Quality.GOOD, "G", t, t))
        s = await _scrape_registry(metrics)
        assert s.value("edge_agent_held_requirements", work_centre=FILL, material="PK-CAP") == 1
        assert s.value("edge_agent_held_quantity", material="PK-CAP") == 42
        close = {"schema": "edge-agent/work-order", "version": 1, "command_id": "c-1"}
        engine.apply(
            CommandEvent(
                "work-order", json.dumps({**close, "action": "close", "order": "WO-7"}).encode(), at
            )
        )
        uow = UnitOfWork()
        engine.stage(uow)
        await store.commit_units([uow])
        s = await _scrape_registry(metrics)
        assert s.value("edge_agent_orders_closed_total", genealogy="incomplete") == 1
        assert s.value("edge_agent_orders_closed_total", genealogy="complete") == 0
        assert s.value("edge_agent_genealogy_completeness_ratio") == 0
        assert not s.has("edge_agent_held_requirements")  # a closed order waits for nothing
        assert s.value("edge_agent_material_theoretical_total", material="PK-CAP") == 42
        # the close's variance counts what was drawn from lots: the held caps were not
        assert s.value("edge_agent_material_used_total", material="PK-CAP") == 0
        assert s.value("edge_agent_usage_variance_ratio", material="PK-CAP") == -1
        assert s.value("edge_agent_events_total", kind="signal") == 4
        assert s.value("edge_agent_events_total", kind="command") == 1


async def _scrape_registry(metrics: AgentMetrics) -> Scrape:
    registry = registry_for(metrics)
    return parse((await asyncio.to_thread(generate_latest, registry)).decode())


# ----------------------------------------------------------------------------- the histogram


def test_the_latency_histogram_buckets_as_prometheus_does() -> None:
    h = LatencyHistogram((0.01, 0.1))
    for seconds in (0.005, 0.01, 0.05, 0.1, 0.5):
        h.observe(seconds)
    buckets, total = h.copy()
    assert buckets == (("0.01", 2.0), ("0.1", 4.0), ("+Inf", 5.0))  # le: at or below
    assert total == pytest.approx(0.665)
