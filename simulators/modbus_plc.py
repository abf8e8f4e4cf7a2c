"""A line PLC over Modbus TCP (pymodbus server) for the tests and the demo.

It serves every register the Modbus sources of an agent configuration name, encoded as each
signal's configuration says (type, word order, byte order, scale, resolution), so the agent and
the simulator share one config file: ``ModbusPlc(config, port=...)`` listens on
``{host}:{port}`` and answers for every unit id the configuration uses (sources with different
hosts or ports in the file are all served here). Its Python API is
:class:`simulators.opcua_plc.LinePlc`'s wherever it applies, so one scripted shift drives either.

- **Memory.** Each (unit id, table) holds the registers (or bits) from address 0 to the last one
  configured: a read inside answers (gaps read as 0, as in a PLC's memory area), a read past the
  end answers IllegalDataAddress. A value is written through
  :func:`~edge_agent.sources.modbus_codec.encode`, so what the agent decodes is what was set.
- **Writes.** Clients may write ``complete_ack`` only (a coil, a register, or a bit of one with
  mask write); a write anywhere else answers IllegalDataAddress, as a PLC protecting its memory.
- **Faults.** :meth:`ModbusPlc.set_exception` makes every read touching a signal's registers
  answer a Modbus exception (``IllegalDataAddress``, ``DeviceBusy``, ...) until cleared. In a
  coil or discrete table the fault covers the 16 bits around the signal (pymodbus hands its
  datastore whole registers of bits).
- **Requests.** :attr:`ModbusPlc.requests` lists every request served (unit, function, table,
  address, count), so a test can count them.
- **Power cycle.** :meth:`ModbusPlc.stop` closes the listener and every connection; values
  survive into the next :meth:`ModbusPlc.start` unless it is told to reset. While stopped, the
  PLC keeps counting: a value set meanwhile is what a client reads after the restart.
- **Totals.** :attr:`ModbusPlc.totals` is what the PLC counted per (order, work centre), the
  same :class:`~simulators.opcua_plc.Tally` as the OPC UA simulator's: counter increments,
  acknowledged handshakes, totalizer counts (at the totalizer's resolution for a float32) and
  weighings. :meth:`set_counter` and an order change's reset are not production.
- **Weighing.** A poll sees states, not edges: :meth:`ModbusPlc.weigh` keeps the scale's stable
  flag low, then high, until a client has read it (as a scale does while the load moves, then
  rests), so the rising edge the engine takes as the weighing is seen.
- **Flow.** :meth:`ModbusPlc.set_flow_rate` runs the flow meter at a rate (counts per second)
  until set to 0; :meth:`ModbusPlc.change_lot` writes a new tank (feed) lot to ``feed_lot`` (when
  configured) and records it with the moment and the totalizer reading, in
  :attr:`ModbusPlc.lot_changes`; :meth:`ModbusPlc.meter_history` is every write of the
  totalizer with the counts metered so far, so :func:`simulators.feeds.expected_by_lot` can tell
  which lot the flow belongs to. The moments are the simulator's own clock: the agent sees a
  change only at its next poll.

Run it on its own: ``python -m simulators.modbus_plc --config config/line-modbus.toml``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Final

from pymodbus.constants import ExcCodes
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice
from rich.table import Table as RichTable

from edge_agent.config import Config
from edge_agent.config import ModbusSource as ModbusSourceConfig
from edge_agent.sources import SignalValue
from edge_agent.sources.modbus import signal_fields
from edge_agent.sources.modbus_codec import (
    BIT_TABLES,
    TABLES,
    Field,
    Role,
    Table,
    decode,
    encode,
    exception_code,
)
from simulators.cli import run_simulator
from simulators.feeds import FlowMeter, LotChange, MeterStep
from simulators.opcua_plc import Tally, _port, _positive, _wait_port_free, produce_units

COUNTERS: Final = ("good", "scrap", "flow")
_TICK: Final = timedelta(microseconds=1)
#: function code → the table it works on
_TABLE_OF: Final[dict[int, Table]] = {
    1: "coil",
    5: "coil",
    15: "coil",
    2: "discrete",
    3: "holding",
    6: "holding",
    16: "holding",
    22: "holding",
    23: "holding",
    4: "input",
}
_INITIAL: Final[dict[Role, SignalValue]] = {
    Role.TEXT: "",
    Role.FLAG: False,
    Role.COUNTER: 0,
    Role.QUANTITY: 0,
    Role.ANALOG: Decimal(0),
}


@dataclass(frozen=True, slots=True)
class ServedRequest:
    """One request the simulator answered (or refused)."""

    unit: int
    function: int
    table: Table | None
    address: int
    count: int


@dataclass(frozen=True, slots=True)
class _Fault:
    table: Table
    start: int
    end: int
    code: int


@dataclass
class _Device:
    """The memory of one unit id: registers (holding, input) and bits (coil, discrete)."""

    unit: int
    memory: dict[Table, list[int]]
    faults: dict[tuple[str, str], _Fault] = field(default_factory=dict)  # (wc, signal) → fault


@dataclass
class _WorkCentre:
    source: ModbusSourceConfig
    fields: dict[str, Field]
    values: dict[str, SignalValue]
    ack_changed: asyncio.Event = field(default_factory=asyncio.Event)
    handshake: asyncio.Lock = field(default_factory=asyncio.Lock)
    state: str = "idle"
    meter: FlowMeter | None = None  # once a flow rate was set
    metered: int = 0  # totalizer counts added, in all (not wrapped, not reset)
    history: list[MeterStep] = field(default_factory=list)  # every write of the totalizer

    @property
    def name(self) -> str:
        return self.source.work_centre


class ModbusPlc:
    """The line's Modbus PLCs as one Modbus TCP server; an async context manager."""

    def __init__(self, config: Config, host: str = "127.0.0.1", port: int = 5020) -> None:
        self.config = config
        self.host = host
        self.port = port
        self.requests: list[ServedRequest] = []
        self.lot_changes: list[LotChange] = []
        self._read_waiters: list[tuple[int, Table, int, asyncio.Event]] = []
        self._server: ModbusTcpServer | None = None
        self._last_stamp = datetime.now(UTC) - timedelta(seconds=1)
        self._work_centres: dict[str, _WorkCentre] = {}
        self._devices: dict[int, _Device] = {}
        #: (unit, table, address) → the signals in it (several bits of one register)
        self._owners: dict[tuple[int, Table, int], list[tuple[_WorkCentre, str]]] = {}
        self._totals: dict[tuple[str, str], Tally] = {}
        sources = [s for s in config.sources if isinstance(s, ModbusSourceConfig)]
        if not sources:
            raise ValueError('the configuration has no Modbus source (kind = "modbus")')
        for source in sources:
            if source.work_centre in self._work_centres:
                raise ValueError(f"work centre {source.work_centre!r} has two sources")
            fields = signal_fields(source)
            wc = _WorkCentre(source, fields, {})
            self._work_centres[source.work_centre] = wc
            for name, f in fields.items():
                self._claim(wc, name, f)
        for device in self._devices.values():
            for table in TABLES:
                device.memory.setdefault(table, [])
        for wc in self._work_centres.values():
            for name, f in wc.fields.items():
                self._put(wc, name, _INITIAL[f.role])

    def _claim(self, wc: _WorkCentre, name: str, f: Field) -> None:
        device = self._devices.setdefault(f.unit, _Device(f.unit, {}))
        memory = device.memory.setdefault(f.table, [])
        if len(memory) < f.end:
            memory.extend([0] * (f.end - len(memory)))
        for address in range(f.address, f.end):
            owners = self._owners.setdefault((f.unit, f.table, address), [])
            for other_wc, other in owners:
                if f.bit is None or other_wc.fields[other].bit in (None, f.bit):
                    raise ValueError(
                        f"{wc.name} {name} and {other_wc.name} {other} share "
                        f"{f.table}:{address} of unit {f.unit}"
                    )
            owners.append((wc, name))

    # ------------------------------------------------------------------ lifecycle

    @property
    def work_centres(self) -> list[str]:
        """The work centres this simulator serves."""
        return list(self._work_centres)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    async def __aenter__(self) -> ModbusPlc:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for wc in self._work_centres.values():
            if wc.meter is not None:
                await wc.meter.stop()
        await self.stop()

    async def start(self, reset: bool = False) -> None:
        """Power on: serve every register with the values it had (initial values if
        ``reset``); OSError if the port cannot be bound."""
        if self._server is not None:
            return
        if reset:
            for wc in self._work_centres.values():
                for name, f in wc.fields.items():
                    self._put(wc, name, _INITIAL[f.role])
        devices = [self._sim_device(device) for device in self._devices.values()]
        server = ModbusTcpServer(devices, address=(self.host, self.port), trace_pdu=self._trace)
        try:
            await server.serve_forever(background=True)
        except RuntimeError as exc:  # pymodbus reports a failed bind so
            await server.shutdown()  # type: ignore[no-untyped-call]  # pymodbus leaves it untyped
            raise OSError(f"cannot listen on {self.endpoint}: {exc}") from None
        self._server = server

    def _sim_device(self, device: _Device) -> SimDevice:
        blocks: list[list[SimData]] = []
        for table in ("coil", "discrete", "holding", "input"):
            size = len(device.memory[table])
            if table in BIT_TABLES:
                # pymodbus wants every table defined: an unused bit table is 16 bits at the top
                blocks.append(
                    [SimData(0, values=[False] * size, datatype=DataType.BITS)]
                    if size
                    else [SimData(65520, values=[False] * 16, datatype=DataType.BITS)]
                )
            else:
                blocks.append(
                    [SimData(0, count=size, values=0, datatype=DataType.REGISTERS)]
                    if size
                    else [SimData(0, datatype=DataType.INVALID)]
                )
        coils, discrete, holding, inputs = blocks
        return SimDevice(
            device.unit,
            simdata=(coils, discrete, holding, inputs),
            action=functools.partial(self._action, device),
        )

    async def stop(self) -> None:
        """Power off: close the listener and every connection; the port is free after."""
        server, self._server = self._server, None
        if server is None:
            return
        await server.shutdown()  # type: ignore[no-untyped-call]  # pymodbus leaves it untyped
        await _wait_port_free(self.host, self.port)

    async def restart(self, reset: bool = False) -> None:
        """A power cycle."""
        await self.stop()
        await self.start(reset=reset)

    def _connections(self) -> list[asyncio.Transport]:
        if self._server is None:
            return []
        handlers = list(self._server.active_connections.values())
        return [h.transport for h in handlers if isinstance(h.transport, asyncio.Transport)]

    def drop_connections(self) -> int:
        """Cut every client connection (a network fault); the PLC keeps listening.
        Returns how many were cut."""
        transports = self._connections()
        for transport in transports:
            transport.close()
        return len(transports)

    def hang_connections(self) -> int:
        """Stop answering on every open connection without closing it (a hung CPU or a
        half-open path). New connections are served. Returns how many hang."""
        transports = self._connections()
        for transport in transports:
            transport.pause_reading()
        return len(transports)

    # ------------------------------------------------------------------ the server's side

    def _trace(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if not sending:
            count = pdu.count or len(pdu.bits) or len(pdu.registers)
            self.requests.append(
                ServedRequest(
                    pdu.dev_id,
                    pdu.function_code,
                    _TABLE_OF.get(pdu.function_code),
                    pdu.address,
                    count,
                )
            )
        return pdu

    async def _action(
        self,
        device: _Device,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """pymodbus's datastore hook: answer from (and write to) this simulator's memory.

        For a bit table ``address`` is the first bit and ``count`` the registers of 16 bits
        pymodbus holds them in."""
        table = _TABLE_OF.get(function_code)
        if table is None:
            return ExcCodes.ILLEGAL_FUNCTION
        bits = table in BIT_TABLES
        if set_values is not None:
            return self._written(device, table, address, set_values)
        first, last = (address, address + 16 * count) if bits else (address, address + count)
        for fault in device.faults.values():
            if fault.table == table and fault.start < last and first < fault.end:
                return ExcCodes(fault.code)
        for unit, waited_table, waited, seen in self._read_waiters:
            if unit == device.unit and waited_table == table and first <= waited < last:
                seen.set()
        memory = device.memory[table]
        if bits:
            word = address // 16
            for i in range(count):
                chunk = memory[16 * (word + i) : 16 * (word + i + 1)]
                registers[word + i - start_address] = sum(
                    1 << n for n, on in enumerate(chunk) if on
                )
        else:
            registers[address - start_address : address - start_address + count] = memory[
                address : address + count
            ]
        return None

    def _written(
        self, device: _Device, table: Table, address: int, values: list[int] | list[bool]
    ) -> ExcCodes | None:
        touched = [
            self._owners.get((device.unit, table, a), [])
            for a in range(address, address + len(values))
        ]
        if not all(any(signal == "complete_ack" for _, signal in owners) for owners in touched):
            return ExcCodes.ILLEGAL_ADDRESS
        memory = device.memory[table]
        memory[address : address + len(values)] = [int(v) for v in values]
        for wc, signal in {
            (wc.name, s): (wc, s) for owners in touched for wc, s in owners
        }.values():
            f = wc.fields[signal]
            wc.values[signal] = decode(f, memory[f.address : f.end])
            wc.ack_changed.set()
        return None

    # ------------------------------------------------------------------ values

    def _stamp(self) -> datetime:
        now = datetime.now(UTC)
        self._last_stamp = now if now > self._last_stamp else self._last_stamp + _TICK
        return self._last_stamp

    def _put(self, wc: _WorkCentre, signal: str, value: SignalValue) -> None:
        f = wc.fields[signal]
        memory = self._devices[f.unit].memory[f.table]
        words = encode(f, value, word=memory[f.address])
        memory[f.address : f.address + len(words)] = [int(w) for w in words]
        wc.values[signal] = value
        if signal == "flow":
            wc.history.append(MeterStep(self._stamp(), wc.metered))

    def _wc(self, work_centre: str) -> _WorkCentre:
        try:
            return self._work_centres[work_centre]
        except KeyError:
            raise ValueError(
                f"no work centre {work_centre!r} (known: {', '.join(self._work_centres)})"
            ) from None

    def _field(self, wc: _WorkCentre, signal: str) -> Field:
        try:
            return wc.fields[signal]
        except KeyError:
            raise ValueError(
                f"{wc.name} has no {signal!r} signal (configured: {', '.join(wc.fields)})"
            ) from None

    def _tally(self, wc: _WorkCentre) -> Tally:
        key = (str(wc.values["order"]), wc.name)
        return self._totals.setdefault(key, Tally())

    @property
    def totals(self) -> dict[tuple[str, str], Tally]:
        """(order, work centre) → what the PLC counted (a copy)."""
        return {key: replace(t, weighings=list(t.weighings)) for key, t in self._totals.items()}

    def value(self, work_centre: str, signal: str) -> SignalValue:
        """The value a signal holds now, as the agent decodes it (counts for a counter)."""
        wc = self._wc(work_centre)
        self._field(wc, signal)
        return wc.values[signal]

    async def set_registers(self, work_centre: str, signal: str, registers: list[int]) -> None:
        """Write raw registers (or a bit) of a signal, whatever they mean: a NaN weight, a
        string that is not ASCII, a value the configuration's encoding would not produce."""
        wc = self._wc(work_centre)
        f = self._field(wc, signal)
        if len(registers) != f.size:
            raise ValueError(f"{signal} is {f.size} registers wide (got {len(registers)})")
        memory = self._devices[f.unit].memory[f.table]
        memory[f.address : f.end] = registers
        try:
            wc.values[signal] = decode(f, registers)
        except ValueError:
            wc.values[signal] = None

    def registers(self, work_centre: str, signal: str) -> list[int]:
        """The raw registers (or bit) of a signal, as a client reads them."""
        wc = self._wc(work_centre)
        f = self._field(wc, signal)
        return list(self._devices[f.unit].memory[f.table][f.address : f.end])

    # ------------------------------------------------------------------ the line's actions

    async def set_order(self, work_centre: str, order_id: str, reset_counters: bool = True) -> None:
        """A new order at the work centre: the order id, then the counters zeroed (a poll may
        see both at once)."""
        wc = self._wc(work_centre)
        self._put(wc, "order", order_id)
        if reset_counters:
            for name in COUNTERS:
                if name in wc.fields:
                    self._put(wc, name, 0)

    async def produce(self, work_centre: str, good: int = 0, scrap: int = 0) -> None:
        """Count parts on the cumulative counters (wrapping at their rollover)."""
        wc = self._wc(work_centre)
        for name, count in (("good", good), ("scrap", scrap)):
            if count < 0:
                raise ValueError(f"{name} must not be negative (got {count})")
            if count:
                self._increment(wc, self._field(wc, name), count)
        tally = self._tally(wc)
        tally.good += good
        tally.scrap += scrap

    async def flow(self, work_centre: str, counts: int) -> None:
        """Add totalizer counts (of its resolution for a float32), wrapping at its rollover."""
        if counts < 0:
            raise ValueError(f"counts must not be negative (got {counts})")
        wc = self._wc(work_centre)
        f = self._field(wc, "flow")
        wc.metered += counts  # before the write, which records the step
        self._increment(wc, f, counts)
        self._tally(wc).flow += counts

    def _increment(self, wc: _WorkCentre, f: Field, count: int) -> None:
        assert f.modulus is not None
        current = wc.values[f.signal]
        assert isinstance(current, int)
        self._put(wc, f.signal, (current + count) % f.modulus)

    async def set_counter(self, work_centre: str, signal: str, raw: int) -> None:
        """Set a counter to any count (a rollover or reset test); not counted as production."""
        wc = self._wc(work_centre)
        if signal not in COUNTERS:
            raise ValueError(f"{signal!r} is not a counter ({', '.join(COUNTERS)})")
        f = self._field(wc, signal)
        assert f.modulus is not None
        if not 0 <= raw < f.modulus:
            raise ValueError(f"{signal} rolls over at {f.modulus}: {raw} does not fit")
        self._put(wc, signal, raw)

    async def weigh(
        self,
        work_centre: str,
        gross: Decimal,
        tare: Decimal = Decimal(0),
        settle: float = 2.0,
    ) -> None:
        """A weighing: stable drops, gross and tare are written, stable rises (the agent takes
        the weighing on that rising edge).

        A poll sees states, not edges: a drop and a rise between two polls would not be seen.
        As a scale does while the load moves and then rests, stable stays low, and then high,
        until a client has read it (at most ``settle`` seconds each; not at all while no client
        is connected)."""
        wc = self._wc(work_centre)
        stable = self._field(wc, "scale.stable")
        self._field(wc, "scale.weight")
        if "scale.tare" not in wc.fields and tare:
            raise ValueError(f"{wc.name} has no scale.tare signal: tare must be 0")
        self._put(wc, "scale.stable", False)
        if self._connections():
            await self._read_by_a_client(stable, settle)
        self._put(wc, "scale.weight", gross)
        if "scale.tare" in wc.fields:
            self._put(wc, "scale.tare", tare)
        self._put(wc, "scale.stable", True)
        self._tally(wc).weighings.append((gross, tare))
        if self._connections():
            await self._read_by_a_client(stable, settle)

    async def complete(
        self, work_centre: str, good: int, scrap: int = 0, timeout: float | None = 10.0
    ) -> None:
        """The operation-complete handshake, as a PLC does it (see
        :meth:`simulators.opcua_plc.LinePlc.complete`): wait for complete_ack low, write the
        quantities, raise complete_request, wait for complete_ack = True (then it counts), drop
        the request, wait for complete_ack low. TimeoutError if the agent does not answer in
        ``timeout`` seconds (the request is then withdrawn and nothing is counted)."""
        wc = self._wc(work_centre)
        self._field(wc, "complete_request")
        self._field(wc, "complete_ack")
        quantities = (("complete_good", good), ("complete_scrap", scrap))
        for name, count in quantities:
            if count < 0 or (count and name not in wc.fields):
                raise ValueError(f"{wc.name}: cannot report {name} = {count}")
        async with wc.handshake:
            state = wc.state
            try:
                wc.state = "waiting for ack low"
                await self._wait_ack(wc, False, timeout)
                for name, count in quantities:
                    if name in wc.fields:
                        self._put(wc, name, count)
                self._put(wc, "complete_request", True)
                wc.state = "waiting for ack"
                try:
                    await self._wait_ack(wc, True, timeout)
                except TimeoutError as exc:
                    self._put(wc, "complete_request", False)  # withdrawn
                    if wc.values["complete_ack"] is not True:
                        raise TimeoutError(f"{exc}; request withdrawn") from None
                    self._count_handshake(wc, good, scrap)
                else:
                    self._count_handshake(wc, good, scrap)
                    self._put(wc, "complete_request", False)
                wc.state = "waiting for ack low"
                await self._wait_ack(wc, False, timeout)
            finally:
                wc.state = state

    async def _read_by_a_client(self, f: Field, timeout: float) -> None:
        """Until a read covering ``f`` has been answered (or ``timeout`` seconds passed)."""
        seen = asyncio.Event()
        waiter = (f.unit, f.table, f.address, seen)
        self._read_waiters.append(waiter)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await seen.wait()
        finally:
            self._read_waiters.remove(waiter)

    def _count_handshake(self, wc: _WorkCentre, good: int, scrap: int) -> None:
        tally = self._tally(wc)
        tally.confirmed_good += good
        tally.confirmed_scrap += scrap
        tally.handshakes += 1

    async def _wait_ack(self, wc: _WorkCentre, target: bool, timeout: float | None) -> None:
        try:
            async with asyncio.timeout(timeout):
                while wc.values["complete_ack"] is not target:
                    wc.ack_changed.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.05):
                            await wc.ack_changed.wait()
        except TimeoutError:
            raise TimeoutError(
                f"{wc.name}: complete_ack did not become {target} within {timeout} s"
            ) from None

    async def set_exception(self, work_centre: str, signal: str, exception: str | None) -> None:
        """Make every read touching ``signal``'s registers answer the Modbus exception named
        (``IllegalDataAddress``, ``DeviceBusy``, ...); None clears it."""
        wc = self._wc(work_centre)
        f = self._field(wc, signal)
        device = self._devices[f.unit]
        if exception is None:
            device.faults.pop((wc.name, signal), None)
            return
        code = exception_code(exception)
        start, end = (
            (f.address // 16 * 16, f.address // 16 * 16 + 16)
            if f.bits
            else (
                f.address,
                f.end,
            )
        )
        device.faults[wc.name, signal] = _Fault(f.table, start, end, code)

    def clear_exceptions(self) -> None:
        for device in self._devices.values():
            device.faults.clear()

    # ------------------------------------------------------------------ flow meter, tank lots

    async def set_flow_rate(self, work_centre: str, counts_per_s: Decimal | Fraction | int) -> None:
        """Run the flow meter at ``counts_per_s`` (0 stops it); counted as :meth:`flow`."""
        wc = self._wc(work_centre)
        self._field(wc, "flow")
        if wc.meter is None:
            wc.meter = FlowMeter(
                functools.partial(self.flow, wc.name), name=f"modbus-plc[{wc.name}].meter"
            )
        await wc.meter.set_rate(counts_per_s)

    async def change_lot(self, work_centre: str, lot: str) -> LotChange:
        """A new lot feeds the work centre's flow meter (a tank switched over): written to the
        ``feed_lot`` register when configured (encoded as the order id is), and recorded with
        the moment and the totalizer's counts, in :attr:`lot_changes`. ValueError (and nothing
        written or recorded) for a lot id the register cannot hold."""
        wc = self._wc(work_centre)
        self._field(wc, "flow")
        flow = wc.source.signals.flow
        assert flow is not None
        if "feed_lot" in wc.fields:
            self._put(wc, "feed_lot", lot)
        totalizer = wc.values["flow"]
        assert isinstance(totalizer, int)
        change = LotChange(self._stamp(), wc.name, flow.material, lot, totalizer)
        self.lot_changes.append(change)
        return change

    def meter_history(self, work_centre: str) -> list[MeterStep]:
        """Every write of the work centre's totalizer, with the counts metered by then (a copy):
        see :class:`simulators.feeds.MeterStep`."""
        wc = self._wc(work_centre)
        self._field(wc, "flow")
        return list(wc.history)

    # ------------------------------------------------------------------ production

    async def run_production(
        self,
        work_centre: str,
        units: int | None,
        rate_per_s: float,
        scrap_every: int = 0,
        *,
        batch: int = 1,
        flow_per_unit: int = 0,
        ack_timeout: float | None = None,
    ) -> None:
        """Produce ``units`` (None: until cancelled) at about ``rate_per_s``, as
        :meth:`simulators.opcua_plc.LinePlc.run_production`."""
        if rate_per_s <= 0:
            raise ValueError(f"rate_per_s must be positive (got {rate_per_s})")
        wc = self._wc(work_centre)
        wc.state = "producing"
        try:
            await produce_units(
                self,
                wc.name,
                set(wc.fields),
                units,
                rate_per_s,
                scrap_every,
                batch,
                flow_per_unit,
                ack_timeout,
            )
        finally:
            wc.state = "idle"

    # ------------------------------------------------------------------ display

    def table(self) -> RichTable:
        """The live state of every work centre, for the command line."""
        state = "running" if self.running else "stopped"
        table = RichTable(title=f"Modbus PLC simulator · {self.endpoint} · {state}")
        for column in (
            "work centre",
            "order",
            "good",
            "scrap",
            "confirmed",
            "flow",
            "weighings",
            "requests",
            "state",
        ):
            table.add_column(
                column, justify="left" if column in ("work centre", "order", "state") else "right"
            )
        for wc in self._work_centres.values():
            order = str(wc.values["order"])
            tally = self._totals.get((order, wc.name), Tally())
            units = {f.unit for f in wc.fields.values()}
            served = sum(1 for r in self.requests if r.unit in units)
            table.add_row(
                wc.name,
                order or "-",
                str(tally.good),
                str(tally.scrap),
                f"{tally.confirmed_good}+{tally.confirmed_scrap}",
                str(tally.flow),
                str(len(tally.weighings)),
                str(served),
                wc.state,
            )
        return table


# ---------------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simulators.modbus_plc",
        description="Serve the Modbus registers of an agent configuration and produce on every "
        "work centre until Ctrl-C.",
    )
    parser.add_argument("--config", type=Path, required=True, help="agent configuration (TOML)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=_port, default=5020, help="port (default 5020)")
    parser.add_argument("--order", default="WO-1", help="order id set on every work centre")
    parser.add_argument(
        "--rate", type=_positive, default=5.0, help="units per second per work centre"
    )
    parser.add_argument("--scrap-every", type=int, default=0, help="every N-th unit is scrap")
    parser.add_argument("--flow-per-unit", type=int, default=100, help="totalizer counts per unit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_simulator(
        build_parser(), argv, lambda c, h, p: ModbusPlc(c, host=h, port=p), "pymodbus"
    )


if __name__ == "__main__":
    sys.exit(main())
