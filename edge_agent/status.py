"""``edge-agent status``: what the agent's store holds, for the person on the line.

Read-only (except that opening a store whose audit chain was cut short records that it was
found, see ``Store``): the outbox (depth, oldest waiting message), the engine sequence, each work
centre's order, handshake phase and last counter values, each order's confirmed quantities, and
whether the audit chain is intact.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from edge_agent.config import Config
from edge_agent.engine import OrderState, WorkCentreState
from edge_agent.store import Store


def show_status(config: Config, out: Console) -> int:
    path = Path(config.store.path)
    if not path.exists():
        out.print(f"store {path} does not exist yet: the agent has not run", markup=False)
        return 0
    return asyncio.run(_show(path, out))


async def _show(path: Path, out: Console) -> int:
    async with Store.open(path) as store:
        state = await store.all_state()
        depth = await store.outbox_depth()
        oldest = await store.oldest_pending()
        audit = await store.verify_audit()
    age = ""
    if oldest is not None:
        waited = datetime.now(UTC) - datetime.fromisoformat(oldest.created_at)
        age = f", oldest waiting {waited.total_seconds():.0f} s ({oldest.topic})"
    out.print(f"store {path}", markup=False)
    out.print(
        f"  engine sequence {state.get('engine', {}).get('sequence', 0)}; "
        f"outbox {depth} message(s) waiting{age}",
        markup=False,
    )
    out.print(
        "  audit chain "
        + (
            f"intact ({audit.entries} entries)"
            if audit.ok
            else f"BROKEN at entry {audit.first_broken_seq}: {audit.reason}"
        ),
        markup=False,
    )
    wcs = Table(title="work centres", title_justify="left")
    for col in ("work centre", "order", "handshake", "counters"):
        wcs.add_column(col)
    for key, value in state.items():
        if key.startswith("wc/"):
            wc = WorkCentreState.from_dict(value)
            counters = ", ".join(f"{k}={c.raw}" for k, c in wc.counters.items())
            wcs.add_row(key[3:], wc.order or "—", wc.handshake.value, counters or "—")
    out.print(wcs)
    orders = Table(title="orders", title_justify="left")
    for col in ("order", "product", "rev", "status", "operation", "good", "scrap", "pending"):
        orders.add_column(col, justify="right" if col in ("good", "scrap", "pending") else "left")
    for key, value in state.items():
        if key.startswith("order/"):
            o = OrderState.from_dict(value)
            head = (o.order, o.product or "unknown", o.revision or "—", o.status)
            ops = o.consumption.operations or {}
            if not ops:
                orders.add_row(*head, "—", "", "", str(len(o.pending)))
            for op, progress in ops.items():
                orders.add_row(
                    *head, op, str(progress.good), str(progress.scrap), str(len(o.pending))
                )
    out.print(orders)
    _exceptions(state, out)
    return 0 if audit.ok else 1


def _exceptions(state: dict[str, dict[str, Any]], out: Console) -> None:
    """The clock hold and the open exceptions, when there are any."""
    clock = state.get("clock", {})
    if clock and not clock.get("trusted", True):
        out.print(
            f"  clock NOT trusted (MES offset {clock.get('mes_offset_s')} s): "
            f"{len(clock.get('held', []))} posting(s) held until it is",
            markup=False,
        )
    open_exceptions = state.get("exceptions", {}).get("open", {})
    if open_exceptions:
        exc = Table(title="open exceptions", title_justify="left")
        for col in ("since", "code", "order", "material", "message id"):
            exc.add_column(col)
        for e in open_exceptions.values():
            exc.add_row(
                e["since"], e["code"], e["order"] or "—", e["material"] or "—", e["message_id"]
            )
        out.print(exc)


def verify_audit(config: Config, out: Console, head: tuple[int, str] | None = None) -> int:
    """``edge-agent audit verify``: 0 when the chain is intact, 1 when broken (named)."""
    path = Path(config.store.path)
    if not path.exists():
        if head is not None:
            out.print(f"audit chain of {path}: BROKEN: the store is gone, its end was kept")
            return 1
        out.print(f"store {path} does not exist yet: the agent has not run", markup=False)
        return 0
    return asyncio.run(_verify(path, out, head))


async def _verify(path: Path, out: Console, head: tuple[int, str] | None) -> int:
    async with Store.open(path) as store:
        report = await store.verify_audit(outbox=True)
        if report.ok and head is not None:
            report = await store.verify_head(*head) or report
        depth = await store.outbox_depth()
    if report.ok:
        out.print(
            f"audit chain of {path}: intact, {report.entries} entries, ending where the last "
            f"commit recorded; the {depth} message(s) waiting match their entries"
            + (f"; entry {head[0]} is the one kept outside the store" if head else ""),
            markup=False,
        )
        return 0
    where = f"entry {report.first_broken_seq}" if report.first_broken_seq else "the outbox"
    out.print(f"audit chain of {path}: BROKEN at {where}: {report.reason}", markup=False)
    return 1
