"""The end-to-end stage's line: generated files, and what the MES received, matched to changes.

A bench line has ``work_centres`` work centres (``WC-01`` …), each with its own OPC UA source
(order and good counter only) on one PLC simulator, all making one product whose BOM has
``bom_lines`` backflush lines at operation 10, one piece of its own material per unit made. So
every good-counter change (+1) is one engine step that produces exactly ``1 + bom_lines``
messages: a ``production-confirmation`` and one ``material-consumed`` per line (1 pc, increment 1:
never a zero posting that is not sent). Each work centre runs its own order; every material has
one lot staged with far more than any run draws, so nothing is held.

One PLC simulator serves every run in turn (its start-up is the slowest part of a run); each run
is an agent with a new store and its own orders, set on the PLC before the agent starts.

Every message of a step carries the work centre and, in ``trigger.value``, the counter value the
agent read: (work centre, value) names the change that caused it. Nothing in the agent is
changed for the bench.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import tomli_w

from edge_agent.config import Config, parse_config

AGENT_ID = "bench-edge"
TOPIC_ROOT = "bench"
PRODUCT = "FG-BENCH"
OPERATION = "10"
#: the OPC UA subscription of every bench source: publishing every 10 ms (the smallest the
#: configuration allows, as the raw asyncua stage), sampling 0 (each write reported), a queue
#: that holds a whole burst (the largest allowed), so no change is coalesced or lost
SUBSCRIPTION = {"publishing_interval_ms": 10, "sampling_interval_ms": 0, "queue_size": 10_000}
#: an order's planned quantity and each lot's stock: far beyond any run
PLENTY = 1_000_000_000


def work_centre(i: int) -> str:
    return f"WC-{i + 1:02d}"


def order_of(run: str, wc: str) -> str:
    """Each run's own order at each work centre: set (counters zeroed) before its agent starts,
    so the agent's first read is the order's start, and nothing is counted from earlier runs."""
    return f"WO-{run}-{wc}"


def material(i: int) -> str:
    return f"RM-{i + 1:03d}"


def messages_per_change(bom_lines: int) -> int:
    return 1 + bom_lines


def write_line(
    workdir: Path, run: str, work_centres: int, bom_lines: int, plc_port: int, broker_port: int
) -> tuple[Config, Path]:
    """Master data, orders, lots and the agent's configuration in ``workdir``; the parsed
    configuration and its file."""
    workdir.mkdir(parents=True, exist_ok=True)
    materials = [material(i) for i in range(bom_lines)]
    wcs = [work_centre(i) for i in range(work_centres)]
    master = {
        "materials": [
            {"id": m, "uom": "pc", "increment": "1", "rounding": "up"} for m in materials
        ],
        "boms": [
            {
                "product": PRODUCT,
                "revision": "A",
                "effective_from": "2000-01-01",
                "base_quantity": "1",
                "uom": "pc",
                "lines": [
                    {"material": m, "quantity": "1", "uom": "pc", "operation": OPERATION}
                    for m in materials
                ],
            }
        ],
    }
    orders = {
        "orders": [
            {"order": order_of(run, wc), "product": PRODUCT, "quantity": str(PLENTY)} for wc in wcs
        ]
    }
    lots = {
        "lots": [
            {
                "lot": f"LOT-{m}",
                "material": m,
                "quantity": str(PLENTY),
                "staged_at": "2000-01-01T00:00:00Z",
            }
            for m in materials
        ]
    }
    for name, doc in (("masterdata", master), ("orders", orders), ("lots", lots)):
        (workdir / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    endpoint = f"opc.tcp://127.0.0.1:{plc_port}/edge-agent/sim/"
    data: dict[str, Any] = {
        "agent": {"id": AGENT_ID},
        "place": {"site": "bench", "area": "bench", "line": "line-1", "work_centres": wcs},
        "store": {"path": str(workdir / "agent.db"), "synchronous": "FULL"},
        "mqtt": {
            "host": "127.0.0.1",
            "port": broker_port,
            "protocol": "5",
            "delivery": "broker",
            "topic_root": TOPIC_ROOT,
            "inflight_window": 100,
            "reconnect_min_ms": 100,
            "reconnect_max_ms": 1000,
        },
        "masterdata": {
            "path": str(workdir / "masterdata.json"),
            "orders": str(workdir / "orders.json"),
            "lots": str(workdir / "lots.json"),
        },
        "sources": [
            {
                "kind": "opcua",
                "name": f"plc-{wc}",
                "endpoint": endpoint,
                "work_centre": wc,
                "operation": OPERATION,
                "reconnect_min_ms": 200,
                "reconnect_max_ms": 1000,
                "subscription": dict(SUBSCRIPTION),
                "signals": {
                    "order": {"node": f"ns=2;s={wc}.OrderId"},
                    "good": {"node": f"ns=2;s={wc}.Good", "width": 32},
                },
            }
            for wc in wcs
        ],
    }
    path = workdir / "line.toml"
    path.write_text(tomli_w.dumps(data))
    return parse_config(data), path


#: what the MES subscribes to: every message the agent sends (not its retained status); the
#: agent's ``topic_base`` is {topic_root}/{site}/{area}/{line}/{agent}
OUT_TOPIC = f"{TOPIC_ROOT}/bench/bench/line-1/{AGENT_ID}/out/#"


# ---------------------------------------------------------------------------- the MES's side


@dataclass(frozen=True, slots=True)
class Received:
    """One message as the MES got it: receipt time (``time.time()``) and what names its cause."""

    at: float
    kind: str
    message_id: str
    work_centre: str | None
    value: str | None
    source_time: str | None  # the PLC's SourceTimestamp of the change (ms)
    received_at: str | None  # when the agent's source took the notification (ms)
    created_at: str | None  # when the engine applied it (ms)


def parse(at: float, topic: str, payload: bytes) -> Received:
    msg = json.loads(payload)
    trigger = msg.get("trigger") or {}
    return Received(
        at,
        topic.rsplit("/", 1)[-1],
        msg["message_id"],
        msg.get("work_centre"),
        trigger.get("value"),
        trigger.get("source_time"),
        trigger.get("received_at"),
        msg.get("created_at"),
    )


@dataclass(frozen=True, slots=True)
class Matched:
    """Per change: when the simulator wrote it, and when the MES got its first and last message."""

    work_centre: str
    value: int
    changed_at: float
    first_at: float
    last_at: float
    messages: int
    #: from the messages (ms resolution, the agent's clock, the same as ours): when the
    #: agent's source took the change, and when its engine applied it
    source_at: float | None
    applied_at: float | None


class MatchError(RuntimeError):
    pass


def match(
    changes: Sequence[tuple[str, int, float]], received: Sequence[Received], per_change: int
) -> list[Matched]:
    """Each change (work centre, counter value, time.time() of the write) with the messages it
    caused. Raises MatchError unless every change has exactly ``per_change`` messages, every
    message belongs to a change, none came twice, and none is an exception."""
    problems: list[str] = []
    ids: set[str] = set()
    by_change: dict[tuple[str, str], list[Received]] = {}
    for r in received:
        if r.message_id in ids:
            problems.append(f"message {r.message_id} arrived twice")
            continue
        ids.add(r.message_id)
        if r.kind == "exception":
            problems.append(f"the agent raised an exception (message {r.message_id})")
            continue
        if r.work_centre is None or r.value is None:
            problems.append(f"a {r.kind} message with no work centre or trigger value")
            continue
        by_change.setdefault((r.work_centre, r.value), []).append(r)
    out = []
    for wc, value, at in changes:
        got = by_change.pop((wc, str(value)), [])
        if len(got) != per_change:
            problems.append(f"{wc} = {value}: {len(got)} messages, not {per_change}")
            if len(problems) > 20:
                break
            continue
        times = [r.at for r in got]
        first = got[0]
        out.append(
            Matched(
                wc,
                value,
                at,
                min(times),
                max(times),
                len(got),
                _epoch(first.received_at),
                _epoch(first.created_at),
            )
        )
    if by_change:
        problems.append(f"{len(by_change)} messages name no change the simulator made")
    if problems:
        raise MatchError("; ".join(problems[:10]))
    return out


def _epoch(stamp: str | None) -> float | None:
    if stamp is None:
        return None
    return datetime.fromisoformat(stamp).timestamp()


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile (q in 0..100) of values sorted ascending."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _stats(values: Sequence[float]) -> dict[str, float]:
    v = sorted(values)
    return {"p50": percentile(v, 50), "p99": percentile(v, 99), "max": v[-1], "min": v[0]}


def latency_figures(matched: Sequence[Matched]) -> dict[str, Any]:
    """In ms: the latency of each change's first message and of its last (p50, p99, max, min),
    and where the first message's time went, by the times the messages carry (ms resolution):
    simulator → the agent's source, source → engine, engine → MES."""
    out: dict[str, Any] = {"changes": len(matched)}
    out.update(_stats([1000 * (m.first_at - m.changed_at) for m in matched]))
    out["last"] = _stats([1000 * (m.last_at - m.changed_at) for m in matched])
    steps = [
        (m.changed_at, m.source_at, m.applied_at, m.first_at)
        for m in matched
        if m.source_at is not None and m.applied_at is not None
    ]
    if steps:
        out["to_source"] = _stats([1000 * (s - c) for c, s, _a, _f in steps])
        out["to_engine"] = _stats([1000 * (a - s) for _c, s, a, _f in steps])
        out["to_mes"] = _stats([1000 * (f - a) for _c, _s, a, f in steps])
    return out
