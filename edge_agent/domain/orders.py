"""Work orders: what an order id read from the PLC means (product, planned quantity, BOM).

The document ``{"orders": [{"order": "WO-7", "product": "FG-100", "quantity": "250"}]}`` names each
order the line may run. ``revision`` pins a BOM revision; without it the revision in effect when
the agent first sees the order on the line is used, and then kept for the whole order (a BOM
change mid-order never changes what was already posted).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from edge_agent.domain.masterdata import DecimalStr, MasterData, parse_document
from edge_agent.errors import InvalidDocumentError, MasterDataError


class OrderDataError(InvalidDocumentError):
    """The work-orders document failed validation."""


@dataclass(frozen=True, slots=True)
class WorkOrder:
    order: str
    product: str
    quantity: Decimal  # planned, in the BOM's unit
    revision: str | None = None
    #: the lot the order produces (genealogy), when the MES released one
    finished_lot: str | None = None
    #: the work centre the MES released the order for (None: where the PLC shows it)
    work_centre: str | None = None


class OrderDoc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    order: str = Field(min_length=1)
    product: str = Field(min_length=1)
    quantity: DecimalStr = Field(gt=0)
    revision: str | None = Field(default=None, min_length=1)


class OrdersDoc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    orders: tuple[OrderDoc, ...] = ()


def load_orders(
    data: Mapping[str, Any] | str | bytes, master: MasterData
) -> Mapping[str, WorkOrder]:
    """Parse the work-orders document; every order must name a product with a BOM (and, when
    pinned, an existing revision)."""
    doc = parse_document(OrdersDoc, data, OrderDataError)
    problems: list[str] = []
    orders: dict[str, WorkOrder] = {}
    for i, d in enumerate(doc.orders):
        at = f"orders[{i}] ({d.order})"
        if d.order in orders:
            problems.append(f"{at} › order: duplicate order {d.order!r}")
        try:
            master.bom(d.product, d.revision)
        except MasterDataError as exc:
            field = "revision" if d.revision and master.revisions(d.product) else "product"
            problems += [f"{at} › {field}: {p}" for p in exc.problems]
            continue
        orders[d.order] = WorkOrder(d.order, d.product, d.quantity, d.revision)
    if problems:
        raise OrderDataError(problems)
    return orders
