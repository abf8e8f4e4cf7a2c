"""One benchmark stage in a process of its own: ``python -m bench.worker STAGE PARAMS_JSON``.

Each stage runs in a fresh process so its memory and CPU figures are its own (not the bench's,
nor another stage's) and the subscriber counting arrivals (in the bench process) does not share
its interpreter lock. The worker talks to the bench over stdout, one JSON object a line:
``{"progress": done, "total": n}``, ``{"event": "filled"}`` (backlog: start the broker now) and
finally ``{"result": {...}}``. Logs go to stderr, warnings and above only.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import resource
import sqlite3
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import structlog

from bench.payload import CONFIG_DIR, Template
from edge_agent.store import UnitOfWork  # bench.payload imports the store anyway

GROUP = 500  # rows per commit when grouped: the engine's batch limit (docs/runtime.md)
MB = 1024 * 1024
#: raw paho: messages handed to paho and not yet acknowledged, at most (below its 65,535 ids)
MAX_OUTSTANDING = 30_000


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


class Progress:
    """Reports progress to the bench at most every 0.2 s."""

    def __init__(self, total: int, task: str) -> None:
        self.total, self.task, self._last = total, task, 0.0

    def __call__(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last > 0.2:
            self._last = now
            emit(progress=done, total=self.total, task=self.task)


class Memory:
    """Samples a process's resident memory every 20 ms (this one's by default); the peak per
    phase, and every 0.1 s a point (seconds since start, MB, and ``depth()`` if given) of the
    time series the plots draw."""

    def __init__(
        self,
        proc: psutil.Process | None = None,
        depth: Callable[[], int] | None = None,
        every: float = 0.02,
        series_every: float = 0.1,
    ) -> None:
        self._proc = proc or psutil.Process()
        self._depth = depth
        self._every = every
        self._series_every = series_every
        self.phase = "start"
        self.peaks: dict[str, int] = {}
        self.series: list[tuple[float, str, float, int | None]] = []
        self.t0 = time.perf_counter()
        self.started_at = time.time()  # the series' zero, on the clock the bench uses too
        self._next_point = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench.rss", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self.sample()

    def sample(self) -> None:
        try:
            rss = self._proc.memory_info().rss
        except psutil.NoSuchProcess:
            return
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)
        now = time.perf_counter() - self.t0
        if now >= self._next_point:
            self._next_point = now + self._series_every
            depth = self._depth() if self._depth is not None else None
            self.series.append((round(now, 3), self.phase, round(rss / MB, 2), depth))

    def enter(self, phase: str) -> None:
        self.sample()
        self.phase = phase
        self._next_point = 0.0  # a point at every phase change
        self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._next_point = 0.0  # the series ends with the state at the stop
        self.sample()


def cpu_seconds() -> float:
    t = psutil.Process().cpu_times()
    return float(t.user + t.system)


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


# ---------------------------------------------------------------------------- SQLite


def enqueued(template: Template, first: int, stop: int, created: str) -> list[UnitOfWork]:
    """Units of work queueing benchmark messages ``first`` … ``stop - 1``, one each."""
    units = []
    for i in range(first, stop):
        uow = UnitOfWork()
        message_id, payload = template.message(i)
        uow.enqueue(message_id, template.topic, payload, created)
        units.append(uow)
    return units


async def stage_sqlite(p: dict[str, Any]) -> dict[str, Any]:
    """Commits/s at the agent's synchronous setting (FULL): raw sqlite3 and the Store."""
    from edge_agent.store import Store

    work, template = Path(p["workdir"]), Template.from_json(p["template"])
    singles, grouped = int(p["single_commits"]), int(p["grouped_rows"])
    progress = Progress(2 * singles + 2 * grouped, "sqlite")
    done = 0
    created = "2026-11-23T06:00:00.000Z"

    def raw(path: Path, n: int, group: int) -> float:
        nonlocal done
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(
            "CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, message_id TEXT UNIQUE "
            "NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL, created_at TEXT NOT NULL)"
        )
        start = time.perf_counter()
        for first in range(0, n, group):
            rows = [(*template.message(i), created) for i in range(first, min(n, first + group))]
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "INSERT INTO outbox (message_id, payload, created_at, topic) VALUES (?, ?, ?, '"
                + template.topic
                + "')",
                rows,
            )
            db.execute("COMMIT")
            done += len(rows)
            progress(done)
        elapsed = time.perf_counter() - start
        db.close()
        return elapsed

    async def store(path: Path, n: int, group: int) -> float:
        nonlocal done
        async with Store.open(path, "FULL") as s:
            start = time.perf_counter()
            for first in range(0, n, group):
                units = enqueued(template, first, min(n, first + group), created)
                if group == 1:  # as the engine's single commit: its state row too
                    units[0].put_state("engine", {"sequence": first})
                await s.commit_units(units)
                done += len(units)
                progress(done)
            return time.perf_counter() - start

    raw_single = raw(work / "raw-single.db", singles, 1)
    raw_grouped = raw(work / "raw-grouped.db", grouped, GROUP)
    store_single = await store(work / "store-single.db", singles, 1)
    store_grouped = await store(work / "store-grouped.db", grouped, GROUP)
    progress(done, force=True)
    return {
        "raw.sqlite3_commit": singles / raw_single,
        "raw.sqlite3_grouped": grouped / raw_grouped,
        "store.commit": singles / store_single,
        "store.grouped": grouped / store_grouped,
    }


# ---------------------------------------------------------------------------- paho


def stage_paho(p: dict[str, Any]) -> dict[str, Any]:
    """Raw paho QoS 1 publishes/s (MQTT 5) with the agent's window and payload size."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    template = Template.from_json(p["template"])
    n, window = int(p["n"]), int(p["window"])
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-raw", protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(window)
    client.max_queued_messages_set(0)
    acked = 0
    refused = 0
    all_acked = threading.Event()
    connected = threading.Event()
    # paho numbers its messages 1..65535 and refuses a publish whose number is still queued (it
    # returns MQTT_ERR_QUEUE_SIZE and sends nothing): never more than this many outstanding
    outstanding = threading.BoundedSemaphore(MAX_OUTSTANDING)

    def on_publish(_c: Any, _u: Any, _mid: int, rc: Any, _p: Any) -> None:
        nonlocal acked, refused
        acked += 1
        refused += int(rc.value >= 0x80)
        outstanding.release()
        if acked == n:
            all_acked.set()

    client.on_publish = on_publish
    client.on_connect = lambda *_: connected.set()
    client.connect("127.0.0.1", int(p["port"]))
    client.loop_start()
    progress = Progress(n, "paho")
    try:
        if not connected.wait(10):
            raise RuntimeError("raw paho: no connection to the broker")
        messages = [template.message(i)[1] for i in range(n)]
        start = time.perf_counter()
        for payload in messages:
            if not outstanding.acquire(timeout=60):
                raise RuntimeError(f"raw paho: no acknowledgement for 60 s ({acked} of {n})")
            info = client.publish(template.topic, payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise RuntimeError(
                    f"raw paho: publish refused by paho: {mqtt.error_string(info.rc)}"
                )
        while not all_acked.wait(0.1):
            progress(acked)
            if time.perf_counter() - start > 600:
                raise RuntimeError(f"raw paho: {acked} of {n} acknowledged after 600 s")
        elapsed = time.perf_counter() - start
        progress(acked, force=True)
    finally:
        client.disconnect()
        client.loop_stop()
    return {"raw.paho_qos1": n / elapsed, "refused": refused}


# ---------------------------------------------------------------------------- asyncua


async def stage_asyncua(p: dict[str, Any]) -> dict[str, Any]:
    """asyncua server → client DataChange notifications/s over a fixed number of writes."""
    from asyncua import ua
    from asyncua.client.client import Client
    from asyncua.server.server import Server

    n, nodes = int(p["n"]), int(p["nodes"])
    port = int(p["port"])
    endpoint = f"opc.tcp://127.0.0.1:{port}/bench/"
    server = Server()
    await server.init()
    server.set_endpoint(endpoint)
    idx = await server.register_namespace("urn:edge-agent:bench")
    folder = await server.nodes.objects.add_folder(idx, "Bench")
    variables = [
        await folder.add_variable(
            ua.NodeId(ua.String(f"Counter{i}"), ua.Int16(idx)), f"Counter{i}", ua.UInt32(0)
        )
        for i in range(nodes)
    ]
    received = 0
    last_at = 0.0
    done = asyncio.Event()
    baseline = len(variables)  # each monitored item reports its initial value once

    class Handler:
        def datachange_notification(self, _node: Any, _val: Any, _data: Any) -> None:
            nonlocal received, last_at
            received += 1
            last_at = time.perf_counter()
            if received >= n + baseline:
                done.set()

    progress = Progress(n, "asyncua")
    async with server:
        client = Client(endpoint)
        async with client:
            sub = await client.create_subscription(
                ua.CreateSubscriptionParameters(
                    RequestedPublishingInterval=10,
                    RequestedMaxKeepAliveCount=100,
                    RequestedLifetimeCount=1000,
                    MaxNotificationsPerPublish=0,
                    PublishingEnabled=True,
                ),
                Handler(),
            )
            await sub.subscribe_data_change(
                [client.get_node(v.nodeid) for v in variables],
                sampling_interval=ua.Double(0),
                queuesize=max(1000, n // nodes + 1),
            )
            while received < baseline:
                await asyncio.sleep(0.01)
            start = time.perf_counter()
            for i in range(n):
                await server.write_attribute_value(
                    variables[i % nodes].nodeid,
                    ua.DataValue(ua.Variant(i // nodes + 1, ua.VariantType.UInt32)),
                )
                if i % 200 == 199:
                    progress(received - baseline)
                    await asyncio.sleep(0)  # let the client side take its notifications
            quiet = 0
            while not done.is_set() and quiet < 3:  # none for 3 s: the rest is lost
                before = received
                with_timeout = asyncio.wait_for(done.wait(), 1.0)
                try:
                    await with_timeout
                except TimeoutError:
                    quiet = quiet + 1 if received == before else 0
                progress(received - baseline)
            progress(received - baseline, force=True)
            await sub.delete()
    got = received - baseline
    return {"raw.asyncua": got / (last_at - start), "received": got, "written": n}


# ---------------------------------------------------------------------------- backlog


def _uplink_config(port: int, store: Path, window: int) -> Any:
    from edge_agent.config import parse_config

    data = copy.deepcopy(tomllib.loads((CONFIG_DIR / "line.toml").read_text()))
    data["store"]["path"] = str(store)
    data["mqtt"].update(
        {
            "host": "127.0.0.1",
            "port": port,
            "inflight_window": window,
            "reconnect_min_ms": 100,
            "reconnect_max_ms": 1000,
        }
    )
    return parse_config(data, CONFIG_DIR)


async def stage_backlog(p: dict[str, Any]) -> dict[str, Any]:
    """The broker is down while N messages fill the real store's outbox (grouped commits, as the
    engine does under load); then the broker comes up and the real MqttUplink drains it."""
    from edge_agent.store import Store
    from edge_agent.uplink.mqtt import MqttUplink

    template = Template.from_json(p["template"])
    n, window = int(p["n"]), int(p["window"])
    db = Path(p["workdir"]) / f"backlog-{n}.db"
    config = _uplink_config(int(p["port"]), db, window)
    created = "2026-11-23T06:00:00.000Z"
    committed = 0
    async with Store.open(db, "FULL") as store, MqttUplink(config, store) as uplink:
        # the outbox depth for the time series, counted (committed − acknowledged and deleted),
        # not queried: a count(*) now and then would take time from the drain it measures
        memory = Memory(depth=lambda: committed - uplink.published)
        pump = asyncio.create_task(uplink.run(), name="bench.uplink")
        memory.enter("fill")
        fill_progress = Progress(n, "fill")
        cpu0, start = cpu_seconds(), time.perf_counter()
        for first in range(0, n, GROUP):
            units = enqueued(template, first, min(n, first + GROUP), created)
            await store.commit_units(units)
            committed += len(units)
            uplink.notify()
            fill_progress(committed)
        fill_s, fill_cpu = time.perf_counter() - start, cpu_seconds() - cpu0
        fill_progress(n, force=True)
        memory.enter("wait")
        emit(event="filled")
        await uplink.wait_connected(60)
        memory.enter("drain")
        drain_progress = Progress(n, "drain")
        cpu0, start = cpu_seconds(), time.perf_counter()
        while uplink.published < n:
            await asyncio.sleep(0.01)
            drain_progress(uplink.published)
            if time.perf_counter() - start > 1800:
                raise RuntimeError(f"backlog: {uplink.published} of {n} drained after 30 min")
        drain_s, drain_cpu = time.perf_counter() - start, cpu_seconds() - cpu0
        drain_progress(n, force=True)
        memory.stop()
        pump.cancel()
        with_suppressed = asyncio.gather(pump, return_exceptions=True)
        await with_suppressed
        depth = await store.outbox_depth()
    return {
        "fill": n / fill_s,
        "drain": n / drain_s,
        "rss_fill": memory.peaks.get("fill", 0) / MB,
        "rss_drain": memory.peaks.get("drain", 0) / MB,
        "rss_start": memory.peaks.get("start", 0) / MB,
        "max_rss": max_rss_bytes() / MB,
        "cpu_fill_per_1000": 1000 * fill_cpu / n,
        "cpu_drain_per_1000": 1000 * drain_cpu / n,
        "fill_s": fill_s,
        "drain_s": drain_s,
        "depth_after": depth,
        "reconnects": uplink.reconnects,
        # every 0.1 s: seconds since the worker started sampling, phase, RSS in MB, outbox depth
        "series": memory.series,
    }


# ---------------------------------------------------------------------------- end to end


def _high_water_mark(pid: int) -> int:
    """The kernel's peak resident set of a process (VmHWM in /proc/PID/status), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


async def _drive(
    plc: Any, wcs: list[str], events: int, rate: float | None
) -> list[tuple[str, int, float]]:
    """``events`` good-counter changes (+1), round robin over the work centres: at ``rate``
    changes/s in all (paced on the loop's clock: a late change is not made up for), or as fast
    as the simulator writes (None). Each is (work centre, new value, time.time() of the write)."""
    loop = asyncio.get_running_loop()
    values = {wc: int(plc.value(wc, "good")) for wc in wcs}
    changes = []
    start = loop.time()
    for i in range(events):
        wc = wcs[i % len(wcs)]
        if rate is not None:
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        elif i % 50 == 49:
            await asyncio.sleep(0)  # let the server's publish loop run
        values[wc] += 1
        changes.append((wc, values[wc], time.time()))
        await plc.produce(wc, good=1)
    return changes


async def _outbox_emptied(store: Path, agent: Any, timeout: float = 30.0) -> None:
    """Until the agent's outbox is empty: what the MES has, the broker acknowledged, and the
    agent deletes it then (read beside the running agent, as simulators/shift.py does: WAL
    readers do not block its writer)."""
    async with asyncio.timeout(timeout):
        while True:
            agent.check()
            with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as db:
                if db.execute("SELECT count(*) FROM outbox").fetchone()[0] == 0:
                    return
            await asyncio.sleep(0.02)


async def _wait_log(agent: Any, event: str, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while f'"event": "{event}"'.encode() not in agent.last_log():
            agent.check()
            await asyncio.sleep(0.05)


def _log_problems(log: str) -> list[str]:
    """What in the agent's JSON log says the run was not clean: an error anywhere, a warning
    before its shutdown began (an exception raised, a connection lost or refused; the shutdown's
    own "mqtt_disconnected" is not one), a line that is not JSON (a traceback), and an outbox
    not empty at the stop."""
    problems = []
    stopping = False
    outbox_left: object = "no agent_stopped line"
    for line in log.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            problems.append(line[:300])
            continue
        event, level = entry.get("event"), entry.get("level")
        stopping = stopping or event == "agent_stopping"
        if event == "agent_stopped":
            outbox_left = entry.get("outbox")
        if level in ("error", "critical") or (level == "warning" and not stopping):
            problems.append(line[:300])
    if outbox_left != 0:
        problems.append(f"the agent stopped with {outbox_left} messages in its outbox")
    return problems


async def stage_e2e(p: dict[str, Any]) -> dict[str, Any]:
    """The PLC simulator (here, serving every work centre any run needs) → a real agent process
    per run → mosquitto → the MES (the bench).

    Each run starts an agent with its own store, configuration and orders (set on the PLC, the
    counters zeroed, before the agent's first read). For each phase of a run
    ``{"event": "phase", ...}`` is emitted, the changes are made, and the bench answers
    ``arrived`` on stdin once the MES has every message of the phase; the agent's CPU seconds
    are read from the OS before the first change and after that answer."""
    from bench.e2e import write_line
    from simulators.opcua_plc import LinePlc

    plc_port, broker_port = int(p["plc_port"]), int(p["broker_port"])
    most = max(int(r["work_centres"]) for r in p["runs"])
    plc_dir = Path(p["workdir"]) / "e2e-plc"
    plc_config, _ = write_line(plc_dir, "plc", most, 1, plc_port, broker_port)
    results = []
    async with LinePlc(plc_config, port=plc_port) as plc:
        for run in p["runs"]:
            emit(event="run", run=run["run"])
            results.append(await _agent_run(plc, Path(p["workdir"]), run, broker_port))
    return {"runs": results}


async def _agent_run(
    plc: Any, workdir: Path, run: dict[str, Any], broker_port: int
) -> dict[str, Any]:
    from bench.e2e import messages_per_change, order_of, write_line
    from simulators.shift import AgentProcess

    name = str(run["run"])
    run_dir = workdir / name
    wc_count, bom = int(run["work_centres"]), int(run["bom_lines"])
    per_change = messages_per_change(bom)
    config, path = write_line(run_dir, name, wc_count, bom, plc.port, broker_port)
    wcs = [s.work_centre for s in config.sources]
    for wc in wcs:  # this run's orders, counters zeroed, before its agent's first read
        await plc.set_order(wc, order_of(name, wc))
    phases: list[dict[str, Any]] = []
    agent = AgentProcess(path, run_dir / "agent.log")
    started = time.perf_counter()
    agent.start()
    try:
        await agent.wait_connected(len(config.sources), timeout=120)
        await _wait_log(agent, "mqtt_connected")
        startup_s = time.perf_counter() - started
        assert agent.process is not None
        pid = agent.process.pid
        proc = psutil.Process(pid)
        memory = Memory(proc)
        for phase in run["phases"]:
            phase_name, events = str(phase["name"]), int(phase["events"])
            rate = None if phase.get("rate") is None else float(phase["rate"])
            emit(event="phase", run=name, phase=phase_name, messages=events * per_change)
            memory.enter(phase_name)
            t = proc.cpu_times()
            cpu0 = t.user + t.system
            changes = await _drive(plc, wcs, events, rate)  # the bench shows the MES's count
            written = time.time()
            answer = await asyncio.to_thread(sys.stdin.readline)
            if answer.strip() != "arrived":
                raise RuntimeError(f"{name} {phase_name}: the bench answered {answer.strip()!r}")
            t = proc.cpu_times()
            agent.check()
            arrived = time.perf_counter()
            await _outbox_emptied(Path(config.store.path), agent)
            emptied = time.perf_counter() - arrived
            (run_dir / f"{phase_name}.changes.json").write_text(json.dumps(changes))
            phases.append({
                "name": phase_name,
                "changes": events,
                "rate": rate,
                "first_change": changes[0][2],
                "write_s": written - changes[0][2],
                "cpu_s": t.user + t.system - cpu0,
                "rss_peak": memory.peaks.get(phase_name, 0) / MB,
                "rss_from": memory.started_at - changes[0][2],  # the series' zero, from here
                "outbox_emptied_s": emptied,
            })  # fmt: skip
            memory.enter("idle")
        hwm = _high_water_mark(pid)
        memory.stop()
    finally:
        code = agent.stop()
    problems = _log_problems((run_dir / "agent.log").read_text(errors="replace"))
    return {
        "run": name,
        "work_centres": wc_count,
        "bom_lines": bom,
        "messages_per_change": per_change,
        "startup_s": startup_s,
        "phases": phases,
        "rss_hwm": hwm / MB,
        "rss_sampled_peak": max(memory.peaks.values(), default=0) / MB,
        # every 0.1 s: seconds since sampling started, phase, the agent's RSS in MB
        "rss_series": [(t, phase, mb) for t, phase, mb, _ in memory.series],
        "agent_exit": code,
        "agent_log_problems": problems,
        "subscription": config.sources[0].subscription.model_dump(mode="json"),  # type: ignore[union-attr]  # every bench source is OPC UA
    }


STAGES: dict[str, Callable[[dict[str, Any]], Any]] = {
    "sqlite": stage_sqlite,
    "paho": stage_paho,
    "asyncua": stage_asyncua,
    "backlog": stage_backlog,
    "e2e": stage_e2e,
}


def main(argv: list[str]) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    stage, params = argv[0], json.loads(argv[1])
    result = STAGES[stage](params)
    if asyncio.iscoroutine(result):
        result = asyncio.run(result)
    emit(result=result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
