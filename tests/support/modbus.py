"""Helpers for tests against the Modbus PLC simulator and real Modbus sources.

- :func:`modbus_config`: the example Modbus line (``config/line-modbus.toml``) on a test port,
  polling and reconnecting fast, optionally in another word/byte order or with the handshake
  on two bits of a holding register.
- :func:`polls`: waits until the simulator has served so many more requests (a condition, never
  a fixed sleep).
"""

from __future__ import annotations

import asyncio
import copy
import tomllib
from pathlib import Path
from typing import Any

from edge_agent.config import Config, parse_config
from simulators.modbus_plc import ModbusPlc

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "line-modbus.toml"
_EXAMPLE_DATA = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))

#: the handshake of FILL-1 on bits 0 (request) and 1 (acknowledge) of holding register 20
REGISTER_HANDSHAKE = {
    "complete_request": {"address": 20, "bit": 0},
    "complete_ack": {"address": 20, "bit": 1},
}


def _registers(signals: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name, value in signals.items():
        if name == "scale":
            out += [value[part] for part in ("weight", "stable", "tare") if part in value]
        else:
            out.append(value)
    return out


def modbus_config(
    port: int,
    tmp_path: Path,
    *,
    word_order: str | None = None,
    byte_order: str | None = None,
    fill_signals: dict[str, Any] | None = None,
    **source_extra: Any,
) -> Config:
    """The example Modbus line on ``127.0.0.1:{port}``; ``word_order``/``byte_order`` (if given)
    apply to every register signal; ``fill_signals`` replace FILL-1's."""
    data = copy.deepcopy(_EXAMPLE_DATA)
    for source in data["sources"]:
        source.update(
            {
                "host": "127.0.0.1",
                "port": port,
                "poll_interval_ms": 20,
                "timeout_ms": 500,
                "reconnect_min_ms": 50,
                "reconnect_max_ms": 400,
                **source_extra,
            }
        )
        if source["work_centre"] == "FILL-1" and fill_signals:
            source["signals"].update(copy.deepcopy(fill_signals))
        for register in _registers(source["signals"]):
            if register.get("table", "holding") in ("coil", "discrete"):
                continue
            if word_order is not None:
                register["word_order"] = word_order
            if byte_order is not None:
                register["byte_order"] = byte_order
    data["store"]["path"] = str(tmp_path / "agent.db")
    data.pop("masterdata", None)
    return parse_config(data)


async def polls(plc: ModbusPlc, requests: int, timeout: float = 10.0) -> None:
    """Until the simulator has answered ``requests`` more requests."""
    target = len(plc.requests) + requests
    async with asyncio.timeout(timeout):
        while len(plc.requests) < target:
            await asyncio.sleep(0.005)
