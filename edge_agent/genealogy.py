"""``edge-agent genealogy``: the component lots that went into an order (or a finished lot).

Read from the store, as the agent last committed it: each backflushed component of the order
(operation, material) and the lots it drew from, net of returns and reversals, with the
quantity held (waiting for a lot) where there is one. The same figures the ``genealogy`` message
carries at the order's close, available at any time, while the daemon runs too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from pathlib import Path

from rich.console import Console
from rich.tree import Tree

from edge_agent.config import Config
from edge_agent.domain.masterdata import MasterData, load_master_data
from edge_agent.domain.orders import load_orders
from edge_agent.domain.quantities import fmt
from edge_agent.engine import OrderState
from edge_agent.errors import EdgeAgentError
from edge_agent.store import Store


def show_genealogy(
    config: Config, out: Console, order: str | None, finished_lot: str | None
) -> int:
    """0 when the order is known to the store, 1 when not (named)."""
    path = Path(config.store.path)
    if not path.exists():
        out.print(f"store {path} does not exist yet: the agent has not run", markup=False)
        return 1
    return asyncio.run(_show(path, out, order, finished_lot))


async def _show(path: Path, out: Console, order: str | None, finished_lot: str | None) -> int:
    async with Store.open(path) as store:
        states = {
            key.removeprefix("order/"): OrderState.from_dict(value)
            for key, value in (await store.all_state("order/")).items()
        }
        master_doc = await store.get_masterdata("document", "masterdata")
        orders_doc = await store.get_masterdata("document", "orders")
    master = _master(master_doc)
    lots_of = _finished_lots(states, master, orders_doc)
    if finished_lot is not None:
        made = [o for o, lot in lots_of.items() if lot == finished_lot]
        if not made:
            out.print(f"no order of this store makes finished lot {finished_lot}", markup=False)
            return 1
        order = made[0]
    assert order is not None
    state = states.get(order)
    if state is None:
        out.print(f"order {order} is not in the store: the agent has not counted it", markup=False)
        return 1
    out.print(_tree(state, master, lots_of.get(order)))
    return 0


def _master(doc: Mapping[str, object] | None) -> MasterData | None:
    if doc is None:
        return None
    try:
        return load_master_data(dict(doc))
    except EdgeAgentError:
        return None  # units are then left out; the lots and quantities are the store's own


def _finished_lots(
    states: Mapping[str, OrderState],
    master: MasterData | None,
    orders_doc: Mapping[str, object] | None,
) -> dict[str, str | None]:
    """Each order's finished lot: from the MES's release (in the order's state), else from the
    orders document the agent cached."""
    lots: dict[str, str | None] = {}
    if orders_doc is not None and master is not None:
        with contextlib.suppress(EdgeAgentError):
            lots.update(
                {o: wo.finished_lot for o, wo in load_orders(dict(orders_doc), master).items()}
            )
    for order, state in states.items():
        if state.work_order is not None:
            lots[order] = state.work_order.get("finished_lot")
    return lots


def _tree(state: OrderState, master: MasterData | None, finished_lot: str | None) -> Tree:
    def uom(material: str) -> str:
        known = master.materials.get(material) if master is not None else None
        return f" {known.uom}" if known is not None else ""

    product = f"{state.product or '?'} rev {state.revision or '?'}"
    tree = Tree(
        f"order {state.order}: {product}, finished lot {finished_lot or '(none released)'}, "
        f"{state.status}"
    )
    for (operation, material, method), binding in sorted(state.bindings.items()):
        given = binding.given_by_lot()
        branch = tree.add(f"operation {operation}: {material} ({method.value})")
        for (lot_material, lot, substitution), quantity in sorted(given.items()):
            alt = f" (substitutes {material})" if substitution else ""
            branch.add(f"lot {lot}: {fmt(quantity)}{uom(lot_material)} of {lot_material}{alt}")
        if binding.held > 0:
            branch.add(f"held, no lot yet: {fmt(binding.held)}{uom(material)}")
        if not given and binding.held <= 0:
            branch.add("nothing drawn (returned or reversed)")
    if not state.bindings:
        tree.add("no component posted yet")
    return tree
