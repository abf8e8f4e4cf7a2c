"""Small builders for master data in tests: dicts in the wire format, loaded the real way."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from edge_agent.domain.masterdata import MasterData, load_master_data

NOW = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)


def material(
    mid: str, uom: str = "pc", increment: str = "1", rounding: str = "half_up", **extra: Any
) -> dict[str, Any]:
    return {"id": mid, "uom": uom, "increment": increment, "rounding": rounding, **extra}


def line(
    mat: str, quantity: str, uom: str = "pc", operation: str = "10", **extra: Any
) -> dict[str, Any]:
    return {"material": mat, "quantity": quantity, "uom": uom, "operation": operation, **extra}


def bom(
    product: str,
    lines: list[dict[str, Any]],
    revision: str = "A",
    uom: str = "pc",
    base_quantity: str = "1",
    **extra: Any,
) -> dict[str, Any]:
    return {
        "product": product,
        "revision": revision,
        "uom": uom,
        "base_quantity": base_quantity,
        "lines": lines,
        **extra,
    }


def master(materials: list[dict[str, Any]], boms: list[dict[str, Any]]) -> MasterData:
    return load_master_data({"materials": materials, "boms": boms})
