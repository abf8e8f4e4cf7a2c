"""Reading the user's documents (master data, staged lots, work orders) from files.

The one place that turns a path into validated domain values; every failure is an InputError
naming the file and, for content, the document, the line and the field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from edge_agent.domain.lots import Lot, load_lots
from edge_agent.domain.masterdata import MasterData, load_master_data
from edge_agent.domain.orders import OrderDataError, WorkOrder, load_orders
from edge_agent.errors import InputError, LotDataError, MasterDataError


def read_json(path: Path, what: str) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read {what} file {str(path)!r}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{what} file {str(path)!r} is not UTF-8 text (byte {exc.start}: "
            f"{exc.object[exc.start]:#04x})"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{what} file {str(path)!r} is not valid JSON: {exc.msg} at line {exc.lineno} "
            f"column {exc.colno}"
        ) from None
    except RecursionError:
        raise InputError(f"{what} file {str(path)!r} is nested too deeply to be read") from None


def load_master(path: Path) -> MasterData:
    data = read_json(path, "master data")
    if not isinstance(data, dict):
        raise MasterDataError([f"{path}: expected a JSON object with 'materials' and 'boms'"])
    try:
        return load_master_data(data)
    except MasterDataError as exc:
        raise MasterDataError([f"{path}: {p}" for p in exc.problems]) from None


def load_lots_file(path: Path, master: MasterData) -> tuple[Lot, ...]:
    data = read_json(path, "lots")
    if not isinstance(data, dict):
        raise LotDataError([f"{path}: expected a JSON object with 'lots'"])
    try:
        return load_lots(data, master)
    except LotDataError as exc:
        raise LotDataError([f"{path}: {p}" for p in exc.problems]) from None


def load_orders_file(path: Path, master: MasterData) -> Mapping[str, WorkOrder]:
    data = read_json(path, "work orders")
    if not isinstance(data, dict):
        raise OrderDataError([f"{path}: expected a JSON object with 'orders'"])
    try:
        return load_orders(data, master)
    except OrderDataError as exc:
        raise OrderDataError([f"{path}: {p}" for p in exc.problems]) from None
