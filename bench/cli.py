"""``python -m bench``: the raw stack and the agent, one table of ratios (docs/benchmarks.md).

Each stage runs in a worker process of its own (bench/worker.py) against a mosquitto started
here on a free loopback port; the MES side (a persistent MQTT 5 session subscribed at QoS 1 that
counts arrivals) runs in this process. Traffic never leaves 127.0.0.1, and the machine's own
broker on port 1883 is never touched.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Table

from bench.e2e import OUT_TOPIC, MatchError, latency_figures, match, messages_per_change, parse
from bench.figures import catalogue, changes, rows
from bench.payload import CONFIG_DIR, Template, material_consumed
from simulators.broker import free_port
from simulators.mosquitto import Broker, has_mosquitto

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("sqlite", "paho", "asyncua", "backlog", "e2e")


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    single_commits: int
    grouped_rows: int
    paho: int
    asyncua: int
    backlogs: tuple[int, ...]
    #: end to end: counter changes of each throughput run (BOM 10; the BOM 100 run makes as
    #: many messages), and the seconds of each paced latency phase
    e2e_changes: int
    latency_s: float

    def scaled(self, scale: float) -> Profile:
        def s(n: int) -> int:
            return max(10, int(n * scale))

        return Profile(
            self.name,
            s(self.single_commits),
            s(self.grouped_rows),
            s(self.paho),
            s(self.asyncua),
            tuple(s(n) for n in self.backlogs),
            s(self.e2e_changes),
            self.latency_s * scale,
        )


QUICK = Profile("quick", 1_000, 20_000, 20_000, 20_000, (100_000,), 1_000, 4.0)
FULL = Profile("full", 5_000, 200_000, 100_000, 100_000, (100_000, 1_000_000), 6_000, 30.0)
#: work centres of the latency runs (the issue names none; 4 is the middle of 1, 4, 16)
LATENCY_WCS = 4
LATENCY_RATES = (100, 500)


@dataclass(frozen=True, slots=True)
class E2eRun:
    """One agent process: ``work_centres`` sources, a ``bom_lines`` BOM, phases in turn; each
    phase is (name, changes, rate): ``rate`` changes/s in all, None: as fast as written."""

    name: str
    work_centres: int
    bom_lines: int
    phases: tuple[tuple[str, int, float | None], ...]


def e2e_runs(profile: Profile) -> list[E2eRun]:
    n = profile.e2e_changes
    per10, per100 = messages_per_change(10), messages_per_change(100)
    runs = [E2eRun(f"wc{wc}", wc, 10, (("throughput", n, None),)) for wc in (1, 4, 16)]
    runs.append(E2eRun("bom100", 4, 100, (("throughput", max(4, n * per10 // per100), None),)))
    runs.append(
        E2eRun(
            "latency",
            LATENCY_WCS,
            10,
            tuple(
                (f"latency{rate}", max(4, round(rate * profile.latency_s)), float(rate))
                for rate in LATENCY_RATES
            ),
        )
    )
    return runs


def inflight_window() -> int:
    """The agent's in-flight window, from the example line's configuration."""
    data = tomllib.loads((CONFIG_DIR / "line.toml").read_text())
    return int(data["mqtt"].get("inflight_window", 100))


# ---------------------------------------------------------------------------- the MES side


class Counter:
    """The MES: a persistent MQTT 5 session subscribed at QoS 1, counting what arrives; with
    ``record``, also each message's receipt time (``time.time()``, taken in paho's callback),
    topic and payload, parsed only after the run so the parsing takes no CPU from it."""

    def __init__(self, port: int, topic: str, client_id: str, record: bool = False) -> None:
        self.count = 0
        self.records: list[tuple[float, str, bytes]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self.client.reconnect_delay_set(1, 1)
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho: unannotated
        props.SessionExpiryInterval = 3600

        def on_connect(c: mqtt.Client, *_: Any) -> None:
            c.subscribe(topic, qos=1)

        def on_message(_c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
            at = time.time()
            with self._lock:
                if record:
                    self.records.append((at, message.topic, bytes(message.payload)))
                self.count += 1

        self.client.on_connect = on_connect
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = on_message
        self.client.connect("127.0.0.1", port, clean_start=False, properties=props)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("the MES subscriber could not subscribe")

    def recorded(self) -> list[tuple[float, str, bytes]]:
        """What ``record`` kept so far: (receipt time, topic, payload), in order of arrival."""
        with self._lock:
            return list(self.records)

    def wait_for(self, n: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.count < n and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.count

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.client._reset_sockets()  # paho closes its wake-up pair only in __del__


@contextmanager
def mosquitto(workdir: Path) -> Iterator[Broker]:
    broker = Broker(workdir)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


# ---------------------------------------------------------------------------- running stages


class Runner:
    def __init__(self, workdir: Path, progress: Progress, template: Template) -> None:
        self.workdir = workdir
        self.progress = progress
        self.template = template
        self.values: dict[str, float] = {}
        self.notes: dict[str, str] = {}
        self.details: dict[str, Any] = {}

    def worker(
        self,
        stage: str,
        params: dict[str, Any],
        task: TaskID,
        on_event: Callable[[dict[str, Any], subprocess.Popen[str]], None] = lambda _m, _p: None,
    ) -> dict[str, Any]:
        """Run one worker process; its progress lines move ``task``; its events go to
        ``on_event`` (which may answer on the worker's stdin); its result is returned."""
        stderr = (self.workdir / f"{stage}.stderr").open("w")
        params = {"workdir": str(self.workdir), "template": self.template.to_json(), **params}
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.worker", stage, json.dumps(params)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            cwd=ROOT,
        )
        result: dict[str, Any] | None = None
        assert proc.stdout is not None
        with proc, stderr:
            for line in proc.stdout:
                msg = json.loads(line)
                if "progress" in msg:
                    self.progress.update(
                        task,
                        completed=msg["progress"],
                        total=msg["total"],
                        description=f"{stage}: {msg['task']}",
                    )
                elif "event" in msg:
                    on_event(msg, proc)
                elif "result" in msg:
                    result = msg["result"]
        if proc.returncode != 0 or result is None:
            tail = (self.workdir / f"{stage}.stderr").read_text()[-2000:]
            raise RuntimeError(f"bench worker {stage} failed (exit {proc.returncode}):\n{tail}")
        return result

    def sqlite(self, profile: Profile) -> None:
        task = self.progress.add_task("sqlite", total=None)
        r = self.worker(
            "sqlite",
            {"single_commits": profile.single_commits, "grouped_rows": profile.grouped_rows},
            task,
        )
        self.values.update(r)
        self.progress.update(task, description="sqlite: done")
        self.progress.stop_task(task)

    def paho(self, profile: Profile, window: int) -> None:
        task = self.progress.add_task("paho", total=profile.paho)
        topic = self.template.topic
        with mosquitto(self.workdir / "broker-paho") as broker:
            mes = Counter(broker.port, topic, "bench-mes-paho")
            try:
                r = self.worker("paho", {"port": broker.port, "n": profile.paho, "window": window},
                                task)  # fmt: skip
                arrived = mes.wait_for(profile.paho, 60)
            finally:
                mes.close()
        self.values["raw.paho_qos1"] = r["raw.paho_qos1"]
        self.details["paho"] = {"arrived": arrived, "sent": profile.paho, "window": window,
                                "refused": r["refused"]}  # fmt: skip
        if arrived < profile.paho:
            raise RuntimeError(f"raw paho: the MES got {arrived} of {profile.paho}")
        self.progress.update(task, description="paho: done")
        self.progress.stop_task(task)

    def asyncua(self, profile: Profile) -> None:
        task = self.progress.add_task("asyncua", total=profile.asyncua)
        r = self.worker("asyncua", {"n": profile.asyncua, "nodes": 10, "port": free_port()}, task)
        self.values["raw.asyncua"] = r["raw.asyncua"]
        self.details["asyncua"] = {"received": r["received"], "written": r["written"]}
        if r["received"] < r["written"]:
            self.notes["raw.asyncua"] = f"{r['received']} of {r['written']} notified"
        self.progress.update(task, description="asyncua: done")
        self.progress.stop_task(task)

    def backlog(self, n: int, window: int) -> None:
        task = self.progress.add_task(f"backlog {n:,}", total=n)
        with mosquitto(self.workdir / f"broker-backlog-{n}") as broker:
            mes = Counter(broker.port, self.template.topic, f"bench-mes-{n}")
            try:
                broker.stop()  # the broker is down while the outbox fills

                def filled(msg: dict[str, Any], _proc: object) -> None:
                    if msg["event"] == "filled":
                        broker.start()  # the MES session (persistent) comes back with it

                r = self.worker("backlog", {"port": broker.port, "n": n, "window": window},
                                task, filled)  # fmt: skip
                arrived = mes.wait_for(n, 120)
            finally:
                mes.close()
        b = f"backlog.{n}"
        self.values.update({
            f"{b}.fill": r["fill"], f"{b}.drain": r["drain"], f"{b}.rss_fill": r["rss_fill"],
            f"{b}.rss_drain": r["rss_drain"], f"{b}.cpu_drain": r["cpu_drain_per_1000"],
        })  # fmt: skip
        self.details[b] = {**r, "arrived": arrived}
        if arrived < n or r["depth_after"]:
            raise RuntimeError(
                f"backlog {n}: the MES got {arrived} of {n}, {r['depth_after']} left in the outbox"
            )
        self.progress.update(task, description=f"backlog {n:,}: done")
        self.progress.stop_task(task)

    def e2e(self, runs: list[E2eRun]) -> None:
        """The agent runs in turn, against one PLC simulator (a worker) and the MES (here)."""
        tasks = {r.name: self.progress.add_task(f"e2e {r.name}: waiting", total=None) for r in runs}
        first = tasks[runs[0].name]
        self.progress.update(first, description="e2e: simulator starting")
        with mosquitto(self.workdir / "broker-e2e") as broker:
            mes = Counter(broker.port, OUT_TOPIC, "bench-mes-e2e", record=True)
            try:
                expected = [0]  # messages of every phase so far

                def on_event(msg: dict[str, Any], proc: subprocess.Popen[str]) -> None:
                    task = tasks[msg["run"]]
                    if msg["event"] == "run":
                        self.progress.update(task, description=f"e2e {msg['run']}: agent starting")
                        self.progress.start_task(task)
                        return
                    if msg["event"] != "phase":
                        return
                    before, n = expected[0], int(msg["messages"])
                    expected[0] += n
                    self.progress.update(task, description=f"e2e {msg['run']}: {msg['phase']}",
                                         completed=0, total=n)  # fmt: skip
                    # the agent needs far less than a second per 100 messages on any machine
                    deadline = time.monotonic() + 30 + n / 100
                    answer = "arrived"
                    while mes.count < expected[0]:
                        if proc.poll() is not None:
                            return
                        if time.monotonic() > deadline:
                            answer = f"timeout: the MES got {mes.count - before} of {n}"
                            break
                        self.progress.update(task, completed=mes.count - before)
                        time.sleep(0.02)
                    self.progress.update(task, completed=mes.count - before)
                    assert proc.stdin is not None
                    proc.stdin.write(answer + "\n")
                    proc.stdin.flush()

                params = {
                    "plc_port": free_port(),
                    "broker_port": broker.port,
                    "runs": [
                        {
                            "run": r.name,
                            "work_centres": r.work_centres,
                            "bom_lines": r.bom_lines,
                            "phases": [
                                {"name": p, "events": e, "rate": rate} for p, e, rate in r.phases
                            ],
                        }
                        for r in runs
                    ],
                }
                result = self.worker("e2e", params, first, on_event)
                time.sleep(0.5)  # anything more than the phases made (nothing should come)
                records = mes.recorded()
            finally:
                mes.close()
        total = expected[0]
        if len(records) != total:
            raise RuntimeError(f"e2e: the MES got {len(records)} messages, not {total}")
        start = 0
        for run, r in zip(runs, result["runs"], strict=True):
            n = sum(ph["changes"] for ph in r["phases"]) * r["messages_per_change"]
            self._e2e_figures(run, r, records[start : start + n])
            start += n
            self.progress.update(tasks[run.name], description=f"e2e {run.name}: done")
            self.progress.stop_task(tasks[run.name])

    def _e2e_figures(
        self, run: E2eRun, r: dict[str, Any], records: list[tuple[float, str, bytes]]
    ) -> None:
        per_change = int(r["messages_per_change"])
        if r["agent_exit"] != 0 or r["agent_log_problems"]:
            raise RuntimeError(
                f"e2e {run.name}: the agent exited with {r['agent_exit']}; its log: "
                + " | ".join(r["agent_log_problems"][:5])
            )
        received = [parse(*rec) for rec in records]
        detail: dict[str, Any] = {
            k: r[k]
            for k in ("work_centres", "bom_lines", "messages_per_change", "startup_s",
                      "rss_hwm", "rss_sampled_peak", "subscription")
        }  # fmt: skip
        detail["phases"] = {}
        start = 0
        for ph in r["phases"]:
            n = ph["changes"] * per_change
            mine, start = received[start : start + n], start + n
            changed = json.loads(
                (self.workdir / run.name / f"{ph['name']}.changes.json").read_text()
            )
            try:
                matched = match([(wc, v, t) for wc, v, t in changed], mine, per_change)
            except MatchError as exc:
                raise RuntimeError(f"e2e {run.name} {ph['name']}: {exc}") from None
            last = max(m.at for m in mine)
            seconds = last - ph["first_change"]
            arrivals = _arrivals(ph["first_change"], sorted(m.at for m in mine))
            d: dict[str, Any] = {
                "changes": ph["changes"],
                "messages": n,
                "offered_rate": ph["rate"],
                "write_s": ph["write_s"],
                "seconds": seconds,
                "msg_per_s": n / seconds,
                "changes_per_s": ph["changes"] / seconds,
                "cpu_s": ph["cpu_s"],
                "cpu_per_1000_changes": 1000 * ph["cpu_s"] / ph["changes"],
                "rss_peak": ph["rss_peak"],
                # from the MES having the last message to the agent's outbox being empty
                "outbox_emptied_s": ph["outbox_emptied_s"],
                "arrivals": arrivals,
                # the agent's RSS during the phase: (seconds since the first change, MB)
                "rss": [
                    (round(t + ph["rss_from"], 3), mb)
                    for t, phase, mb in r["rss_series"]
                    if phase == ph["name"]
                ],
            }
            if ph["rate"] is not None:
                lat = latency_figures(matched)
                d["latency"] = lat
                d["latency_first_ms"] = [round(1000 * (m.first_at - m.changed_at), 3)
                                         for m in matched]  # fmt: skip
                rate = int(ph["rate"])
                for q in ("p50", "p99", "max"):
                    self.values[f"e2e.latency.{rate}.{q}"] = lat[q]
                    if d["changes_per_s"] < 0.9 * rate:  # the queue grows all along the phase
                        self.notes[f"e2e.latency.{rate}.{q}"] = (
                            f"agent took {d['changes_per_s']:.0f}/s"
                        )
            detail["phases"][ph["name"]] = d
        self.details[f"e2e.{run.name}"] = detail
        if run.name != "latency":
            d = detail["phases"]["throughput"]
            if run.name.startswith("wc"):
                self.values[f"e2e.throughput.{run.name}"] = d["msg_per_s"]
            self.values[f"cost.cpu.{run.name}"] = d["cpu_per_1000_changes"]
            self.values[f"cost.rss.{run.name}"] = r["rss_hwm"]


def _arrivals(start: float, times: list[float], step: float = 0.1) -> list[tuple[float, int]]:
    """(seconds since ``start``, messages the MES had by then), every ``step`` s and at the end."""
    out, i, t = [], 0, step
    while i < len(times):
        while i < len(times) and times[i] - start <= t:
            i += 1
        out.append((round(t, 3), i))
        t += step
    return out


def machine() -> dict[str, Any]:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        mosq = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, check=False)
        broker = mosq.stdout.splitlines()[0] if mosq.stdout else ""
    except OSError:
        broker = ""
    return {
        "cpus": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mosquitto": broker,
        "loadavg_start": os.getloadavg()[0],
    }


def run(
    profile: Profile, only: set[str], console: Console, e2e_only: set[str] | None = None
) -> dict[str, Any]:
    window = inflight_window()
    info = machine()
    started = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="edge-agent-bench-") as tmp:
        workdir = Path(tmp)
        template = asyncio.run(material_consumed(workdir))
        progress = Progress(
            TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.elapsed:>6.1f} s"), console=console, transient=False,
        )  # fmt: skip
        runner = Runner(workdir, progress, template)
        with progress:
            if "sqlite" in only:
                runner.sqlite(profile)
            if "paho" in only:
                runner.paho(profile, window)
            if "asyncua" in only:
                runner.asyncua(profile)
            if "backlog" in only:
                for n in profile.backlogs:
                    runner.backlog(n, window)
            if "e2e" in only:
                runner.e2e([r for r in e2e_runs(profile) if e2e_only is None or r.name in e2e_only])
    values = runner.values
    raws = [values.get(k) for k in ("raw.asyncua", "raw.paho_qos1", "raw.sqlite3_grouped")]
    if all(v is not None for v in raws):
        values["raw.slowest"] = min(v for v in raws if v is not None)
    small, big = values.get("backlog.100000.rss_drain"), values.get("backlog.1000000.rss_drain")
    if small and big:  # the full run's two backlogs (not when --only leaves the stage out)
        values["backlog.rss_growth"] = big / small
    specs = catalogue(profile.backlogs)
    table = rows(specs, values, runner.notes)
    info["loadavg_end"] = os.getloadavg()[0]
    return {
        "profile": profile.name,
        "started": started.isoformat(timespec="seconds"),
        "seconds": round((datetime.now(UTC) - started).total_seconds(), 1),
        "stages": sorted(only),
        "machine": info,
        "payload_bytes": len(template.payload),
        "inflight_window": window,
        "sizes": {
            "single_commits": profile.single_commits,
            "grouped_rows": profile.grouped_rows,
            "paho": profile.paho,
            "asyncua": profile.asyncua,
            "backlogs": list(profile.backlogs),
            "e2e_changes": profile.e2e_changes,
            "latency_s": profile.latency_s,
        },
        "details": runner.details,
        "figures": [r.to_json() for r in table],
    }


# ---------------------------------------------------------------------------- output


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return ""
    if unit in ("MB", "s", "ms", "×") or abs(value) < 100:
        return f"{value:,.2f}" if abs(value) < 10 else f"{value:,.1f}"
    return f"{value:,.0f}"


def print_table(report: dict[str, Any], console: Console) -> None:
    m = report["machine"]
    table = Table(
        title=f"edge-agent bench ({report['profile']}, {report['seconds']} s): "
        f"{m['cpus']} × {m['cpu_model']}, Python {m['python']}, "
        f"payload {report['payload_bytes']} B, window {report['inflight_window']}",
        title_justify="left",
    )
    for col, justify in (("figure", "left"), ("value", "right"), ("unit", "left"),
                         ("raw-stack reference", "right"), ("ratio", "right"),
                         ("target", "left"), ("result", "left")):  # fmt: skip
        table.add_column(col, justify=justify, no_wrap=col != "result")  # type: ignore[arg-type]  # rich: a Literal
    style = {"pass": "green", "FAIL": "bold red", "not measured yet": "dim"}
    for f in report["figures"]:
        ratio = f"{100 * f['ratio']:.0f} %" if f["ratio"] is not None else ""
        ref = fmt(f["reference"], f["unit"])
        if f["reference_key"]:
            ref = f"{ref} ({f['reference_key']})" if ref else f"({f['reference_key']})"
        result = f["status"] + (f": {f['note']}" if f["note"] else "")
        table.add_row(
            f["label"], fmt(f["value"], f["unit"]), f["unit"], ref, ratio, f["target"] or "",
            result, style=style.get(f["status"]),
        )  # fmt: skip
    console.print(table)


def print_compare(old: dict[str, Any], new: dict[str, Any], console: Console) -> None:
    table = Table(
        title=f"change since {old.get('started', '?')} ({old.get('profile', '?')})",
        title_justify="left",
    )
    for col in ("figure", "before", "now", "change"):
        table.add_column(col, justify="left" if col == "figure" else "right")
    for _key, label, a, b, pct in changes(old, new):
        ratio = label.endswith("(ratio)")
        table.add_row(
            label,
            f"{100 * a:.0f} %" if ratio else fmt(a),
            f"{100 * b:.0f} %" if ratio else fmt(b),
            f"{pct:+.1f} %",
        )
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Benchmarks against the raw stack (issue 7)."
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the quick run (default, ≤ 3 min)")
    size.add_argument("--full", action="store_true", help="the full run (1,000,000 backlog)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the report as JSON")
    parser.add_argument("--plots", type=Path, metavar="DIR",
                        help="draw the PNG plots into DIR (needs matplotlib; make bench-full "
                        "sets it)")  # fmt: skip
    parser.add_argument("--compare", type=Path, metavar="OLD.json",
                        help="print each figure's change against an earlier report")  # fmt: skip
    parser.add_argument("--only", metavar="STAGE[,STAGE]",
                        help=f"run only these stages: {', '.join(STAGES)}")  # fmt: skip
    parser.add_argument("--e2e-runs", metavar="RUN[,RUN]",
                        help="of the e2e stage, only these agent runs: "
                        + ", ".join(r.name for r in e2e_runs(QUICK)))  # fmt: skip
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every count (tests use a small one; figures shrink in "
                        "meaning with it)")  # fmt: skip
    args = parser.parse_args(argv)
    structlog.configure(  # the engine that makes the payload logs; the table is the output
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    console = Console()
    if not console.is_terminal:  # make's output in a log: no wrapping of the table
        console = Console(width=max(console.width, 170))
    only = set(STAGES) if not args.only else set(args.only.split(","))
    unknown = only - set(STAGES)
    if unknown:
        parser.error(f"unknown stage {', '.join(sorted(unknown))}: choose from {', '.join(STAGES)}")
    if only & {"paho", "backlog", "e2e"} and not has_mosquitto():
        parser.error("the paho, backlog and e2e stages need mosquitto (apt-get install mosquitto)")
    old = json.loads(args.compare.read_text()) if args.compare else None
    profile = (FULL if args.full else QUICK).scaled(args.scale)
    e2e_only = set(args.e2e_runs.split(",")) if args.e2e_runs else None
    if e2e_only and e2e_only - {r.name for r in e2e_runs(QUICK)}:
        parser.error(f"unknown e2e run in {args.e2e_runs}")
    report = run(profile, only, console, e2e_only)
    report["scale"] = args.scale
    print_table(report, console)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"written: {args.json}")
    if args.plots:
        from bench.plots import draw  # noqa: PLC0415  # matplotlib only when plots are asked for

        for path in draw(report, args.plots):
            console.print(f"plot: {path}")
    if old is not None:
        print_compare(old, report, console)
    return 0  # a report, not a gate: a shared machine's noise must not fail a build
