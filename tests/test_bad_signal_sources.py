"""Bad signal values through the real sources into the engine: a real asyncua server and a real
pymodbus server on loopback (the line simulators), the real sources, the engine applying what
they emit.

The PLC publishes values of the wrong variant type (text or a boolean on a counter, a negative
Int32 on a UInt32 counter node, text on the weight), NaN and infinity on the scale and on a
float32 totalizer, a negative value in a signed handshake register. Nothing is posted from
them, the source keeps running, each signal raises one ``signal_invalid`` naming its node or
register and the value, and once valid values return counting resumes from the last valid one.
"""

from __future__ import annotations

import math
import struct
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from asyncua import ua

from edge_agent.config import Config
from edge_agent.config import ModbusSource as ModbusSourceConfig
from edge_agent.engine import Engine
from edge_agent.messages import ExceptionMessage, ProductionConfirmation
from edge_agent.sources import SignalEvent, SourceStatus
from edge_agent.sources.modbus import ModbusSource
from edge_agent.sources.opcua import OpcUaSource
from simulators.modbus_plc import ModbusPlc
from simulators.opcua_plc import LinePlc
from tests.support.broker import free_port
from tests.support.modbus import modbus_config, polls
from tests.support.plc import Item, Recorder, line_config, running
from tests.test_engine import LOTS, MASTER, ORDERS
from tests.test_engine_commands import MASTER_DOC

pytestmark = pytest.mark.asyncio
MIX, FILL = "MIX-1", "FILL-1"


def engine_for(config: Config) -> tuple[Engine, Recorder]:
    """An engine (no store: its outgoing messages are looked at) fed by a recorder."""
    engine = Engine(config, MASTER, ORDERS, LOTS, lambda: datetime.now(UTC), MASTER_DOC)

    async def apply(item: Item) -> None:
        engine.apply(item)

    return engine, Recorder(apply)


def outgoing(engine: Engine) -> list[Any]:
    return [o.message for o in engine._outgoing]


def invalid(engine: Engine, signal: str) -> list[ExceptionMessage]:
    return [
        m
        for m in outgoing(engine)
        if isinstance(m, ExceptionMessage)
        and m.code.value == "signal_invalid"
        and (m.details.get("signal") == signal or signal in m.text)
    ]


def confirmed_good(engine: Engine) -> Decimal:
    return sum(
        (m.good for m in outgoing(engine) if isinstance(m, ProductionConfirmation)), Decimal(0)
    )


def disconnects(recorder: Recorder) -> list[Item]:
    return [i for i in recorder.items if isinstance(i, SourceStatus) and not i.connected]


# ------------------------------------------------------------------------------------ OPC UA


@pytest.fixture
def opcua_config(tmp_path: Path) -> Config:
    return line_config(free_port(), tmp_path)


@pytest_asyncio.fixture
async def opcua_plc(opcua_config: Config) -> AsyncIterator[LinePlc]:
    port = int(opcua_config.sources[0].endpoint.split(":")[2].split("/")[0])
    async with LinePlc(opcua_config, port=port) as line:
        yield line


async def test_opcua_values_of_the_wrong_type_nan_and_negatives_post_nothing(
    opcua_plc: LinePlc, opcua_config: Config
) -> None:
    plc, config = opcua_plc, opcua_config
    await plc.set_order(MIX, "WO-7")
    await plc.produce(MIX, good=5)
    engine, rec = engine_for(config)
    (mix_config,) = [s for s in config.sources if s.work_centre == MIX]
    async with running(OpcUaSource(mix_config), rec):
        await rec.wait_value("good", 5)
        garbage: list[tuple[str, Any, ua.VariantType]] = [
            ("good", "abc", ua.VariantType.String),
            ("good", -5, ua.VariantType.Int32),
            ("good", True, ua.VariantType.Boolean),
            ("good", 7.5, ua.VariantType.Double),
            ("scale.weight", math.nan, ua.VariantType.Double),
            ("scale.weight", math.inf, ua.VariantType.Double),
            ("scale.weight", "heavy", ua.VariantType.String),
            ("scale.tare", -math.inf, ua.VariantType.Float),
        ]
        for signal, value, vtype in garbage:
            mark = rec.mark()
            await plc.set_raw(MIX, signal, value, vtype)
            await rec.wait_for(
                lambda i, s=signal: isinstance(i, SignalEvent) and i.signal == s, after=mark
            )
        assert confirmed_good(engine) == 5
        assert engine.work_centres[MIX].counters["good"].raw == 5  # the last valid one stands
        await plc.produce(MIX, good=3)  # the node's own value again: 8
        await rec.wait_value("good", 8)
        await plc.weigh(MIX, Decimal("1.754"), Decimal("0.5"))
        await rec.wait_value("scale.stable", True)
        assert disconnects(rec) == []

    assert confirmed_good(engine) == 8  # the delta from the last valid value, once
    raised, resolved = invalid(engine, "good")
    assert "ns=2;s=MIX-1.Good" in raised.text
    assert raised.details["value"] == "'abc'"
    assert resolved.resolves == raised.message_id
    (weight, weight_ok) = invalid(engine, "scale.weight")
    assert "ns=2;s=MIX-1.Scale.Gross" in weight.text
    assert weight.details["value"] == "NaN"
    assert weight_ok.resolves == weight.message_id
    (tare, tare_ok) = invalid(engine, "scale.tare")
    assert tare.details["value"] == "-Infinity"
    assert tare_ok.resolves == tare.message_id
    assert engine.open_exceptions == {}


# ------------------------------------------------------------------------------------ Modbus

#: FILL-1's handshake quantities as signed registers (a PLC's INT/DINT)
SIGNED_FILL = {
    "complete_good": {"address": 10, "type": "int32"},
    "complete_scrap": {"address": 12, "type": "int16"},
}


@pytest.fixture
def modbus_cfg(tmp_path: Path) -> Config:
    return modbus_config(free_port(), tmp_path, fill_signals=SIGNED_FILL)


@pytest_asyncio.fixture
async def modbus_plc(modbus_cfg: Config) -> AsyncIterator[ModbusPlc]:
    source = modbus_cfg.sources[0]
    assert isinstance(source, ModbusSourceConfig)
    async with ModbusPlc(modbus_cfg, port=source.port) as line:
        yield line


def float32_little(value: float) -> list[int]:
    """A float32 low word first, as the example's scale and totalizer hold it."""
    high, low = struct.unpack(">HH", struct.pack(">f", value))
    return [low, high]


async def test_modbus_nan_totalizer_nan_weight_and_negative_signed_values_post_nothing(
    modbus_plc: ModbusPlc, modbus_cfg: Config
) -> None:
    plc, config = modbus_plc, modbus_cfg
    await plc.set_order(MIX, "WO-7")
    await plc.produce(MIX, good=5)
    await plc.flow(MIX, 250)  # 2.50 L
    engine, rec = engine_for(config)
    mix, fill = (
        ModbusSource(s)  # type: ignore[arg-type]
        for s in sorted(config.sources, key=lambda s: s.work_centre != MIX)
    )
    async with running(mix, rec), running(fill, rec):
        await rec.wait_value("good", 5)
        await rec.wait_value("flow", 250)
        mark = rec.mark()
        await plc.set_registers(MIX, "flow", float32_little(math.nan))
        await plc.set_registers(MIX, "scale.weight", float32_little(math.inf))
        await plc.set_registers(FILL, "complete_good", [0xFFFF, 0xFFFD])  # -3
        await plc.set_registers(FILL, "complete_scrap", [0xFFFE])  # -2
        for signal in ("flow", "scale.weight", "complete_good", "complete_scrap"):
            await rec.wait_for(
                lambda i, s=signal: isinstance(i, SignalEvent) and i.signal == s, after=mark
            )
        await polls(plc, 10)  # the same garbage polled again: no new events, no new exceptions
        assert engine.work_centres[MIX].counters["flow"].raw == 250
        assert engine.work_centres[FILL].complete_good == 0  # the last valid value
        await plc.set_registers(MIX, "flow", float32_little(3.0))  # 3.00 L: 300 counts
        await rec.wait_value("flow", 300)
        await plc.produce(MIX, good=3)
        await rec.wait_value("good", 8)
        assert disconnects(rec) == []

    assert confirmed_good(engine) == 8
    assert len([i for i in rec.items if isinstance(i, SignalEvent) and i.signal == "flow"]) == 3
    (flow, flow_ok) = invalid(engine, "flow")
    assert flow.details["value"] == "NaN"
    assert flow.details["address"] in flow.text
    assert flow_ok.resolves == flow.message_id
    (weight,) = invalid(engine, "scale.weight")  # still invalid: open
    assert weight.details["value"] == "Infinity"
    (good,) = invalid(engine, "complete_good")
    assert good.details["value"] == "-3"
    assert "cannot be negative" in good.text
    (scrap,) = invalid(engine, "complete_scrap")
    assert scrap.details["value"] == "-2"
    assert sorted(e["code"] for e in engine.open_exceptions.values()) == ["signal_invalid"] * 3
