"""A real ``material-consumed`` message, made by the engine on the example line.

The benchmarks publish and store messages of the size the agent really sends, not a made-up
blob: the example line's engine confirms a count, and one of its postings (the median size) is
the template. Each benchmark message is the template with its own message id (same length), so
the size is the same and every message is distinct for the broker and the store.
"""

from __future__ import annotations

import asyncio
import copy
import json
import tomllib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from edge_agent.config import parse_config
from edge_agent.documents import load_lots_file, load_master, load_orders_file
from edge_agent.engine import Engine
from edge_agent.sources import Origin, Quality, SignalEvent
from edge_agent.store import Store, UnitOfWork

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
T0 = datetime(2026, 11, 23, 6, 0, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Template:
    """One real message: its topic, payload and the message id inside the payload."""

    topic: str
    payload: bytes
    message_id: str

    def message(self, n: int) -> tuple[str, bytes]:
        """The ``n``-th benchmark message: a fresh id of the same length, the same size."""
        message_id = str(uuid.UUID(int=n + 1))
        return message_id, self.payload.replace(self.message_id.encode(), message_id.encode())

    def to_json(self) -> str:
        return json.dumps(
            {"topic": self.topic, "payload": self.payload.decode(), "message_id": self.message_id}
        )

    @classmethod
    def from_json(cls, text: str) -> Template:
        data = json.loads(text)
        return cls(data["topic"], data["payload"].encode(), data["message_id"])


def _event(wc: str, signal: str, value: object, at: datetime) -> SignalEvent:
    return SignalEvent(
        source="mix-plc",
        work_centre=wc,
        signal=signal,
        address=f"ns=2;s={wc}.{signal}",
        value=value,  # type: ignore[arg-type]  # the engine takes any PLC value and checks it
        quality=Quality.GOOD,
        status="Good",
        source_time=at,
        received_at=at,
        origin=Origin.CHANGE,
    )


async def material_consumed(workdir: Path) -> Template:
    """Confirm 10 units of WO-7 at MIX-1 on the example line; the median-size posting."""
    data = copy.deepcopy(tomllib.loads((CONFIG_DIR / "line.toml").read_text()))
    data["store"]["path"] = str(workdir / "payload.db")
    config = parse_config(data, CONFIG_DIR)
    master = load_master(CONFIG_DIR / "masterdata.json")
    lots = load_lots_file(CONFIG_DIR / "lots.json", master)
    orders = load_orders_file(CONFIG_DIR / "orders.json", master)
    async with Store.open(workdir / "payload.db") as store:
        engine = await Engine.load(config, store, master, orders, lots, lambda: T0)
        engine.connected = dict.fromkeys(engine.connected, True)
        for step, (signal, value) in enumerate((("order", "WO-7"), ("good", 0), ("good", 10))):
            engine.apply(_event("MIX-1", signal, value, T0 + timedelta(milliseconds=10 * step)))
        uow = UnitOfWork()
        engine.stage(uow)
        await store.commit_units([uow])
        rows = [r for r in await store.outbox_batch(1000) if r.topic.endswith("/material-consumed")]
    rows.sort(key=lambda r: len(r.payload))
    row = rows[(len(rows) - 1) // 2]
    return Template(row.topic, row.payload, row.message_id)


if __name__ == "__main__":  # pragma: no cover - a look at the template
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        t = asyncio.run(material_consumed(Path(d)))
        print(t.topic, len(t.payload), "bytes")
        print(t.payload.decode())
