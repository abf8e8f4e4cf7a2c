"""Modbus TCP signal source (pymodbus): one device or gateway, polled, one work centre.

An adapter only: it polls, writes and reports quality; what a value means (a counter delta, a
handshake edge, a weighing) is decided by the engine, which cannot tell these events from the
OPC UA source's. What registers mean is decoded by :mod:`edge_agent.sources.modbus_codec`.

- **Requests.** The signals are read in the coalesced requests of
  :func:`~edge_agent.sources.modbus_codec.plan_reads` (per unit id and table, up to 125 registers
  or 2000 bits, bridging up to ``max_gap`` unused registers): one request per block, never one
  per signal. The requests of one poll go one after the other (a Modbus device answers one
  transaction at a time; pymodbus serialises them anyway).
- **Connect.** A fresh :class:`pymodbus.client.AsyncModbusTcpClient` per connection, with
  pymodbus's own reconnect and retries off (this module decides). The first complete poll after
  each (re)connect is emitted with ``Origin.READ``, every signal, after
  ``SourceStatus(connected=True)``, in :data:`~edge_agent.sources.SIGNAL_ORDER` (the order
  first, ``complete_request`` last), so a delta missed while away is counted once.
- **Polls.** Then every ``poll_interval_ms`` (a late poll is not made up for: no bursts), and
  only what changed since the last poll is emitted, value or quality (``Origin.CHANGE``), in
  the same order. A poll can miss intermediate values; counters are cumulative, so the next
  value still carries the whole delta. A poll sees states, not edges: a flag that drops and
  rises again between two polls is not seen to drop (a scale's stable flag stays low while the
  load moves, far longer than a poll interval; keep ``poll_interval_ms`` below that).
  One exception: the flow totalizer, which says nothing while it stands still, though the
  engine needs a reading at or after the end of a time slice to post it. A ``flow`` that is
  Good and unchanged is emitted again (``Origin.REFRESH``, same value) by the first poll at
  least :data:`~edge_agent.sources.REFRESH_S` after the last flow event of this connection
  (READ, CHANGE or REFRESH; measured on the monotonic clock between poll starts): "at this
  poll the totalizer still had this value". Never while it is Bad, never for another signal.
- **Time.** Modbus carries no timestamps: ``source_time`` is the moment the poll started (the
  same for every event of one poll, strictly increasing from poll to poll even if the clock
  steps back), ``received_at`` the moment its last response arrived.
- **Values.** Counters as ``int`` counts, flags ``bool``, measurements ``Decimal``, the order
  ``str``: never a float. Registers that cannot be a value (a string that is not ASCII) give
  ``None`` with ``Quality.BAD`` and the codec's status (``InvalidString``, ...). A float32 NaN
  or infinity is passed on as ``Decimal("NaN")``/``Decimal("Infinity")`` with good quality (and
  a float32 totalizer below zero as its Decimal value): the device sent it, the engine refuses
  it as an invalid value (``signal_invalid``) naming the signal, the register and the value.
- **Exception responses.** A request answered with a Modbus exception (illegal address, device
  busy, ...) gives ``Quality.BAD`` events for every signal of that request, the status naming
  the exception (``IllegalDataAddress``, ``DeviceBusy``, ...) and ``address`` each signal's
  register (``holding:40``); the connection stays up, and the next good answer is emitted as
  a change. Never a value, so never a posting.
- **Reconnect.** A transport failure (refused, reset, closed by the device, a request not
  answered within ``timeout_ms``) emits ``SourceStatus(connected=False)`` (once, not once per
  attempt); the client is closed and a new one connects after a back-off from
  ``reconnect_min_ms``, doubling to ``reconnect_max_ms``, with jitter; then the READ poll again.
  It never gives up while running; cancelling :meth:`ModbusSource.run` closes the socket and
  leaves no task behind.
- **Writes.** :meth:`ModbusSource.write` writes a coil (function 5), a register (6), several
  registers (16), or one bit of a holding register with mask write (22, so the device's other
  bits in that register are left as they are), and raises
  :class:`~edge_agent.errors.SignalError` naming the signal and register when not connected, on
  an exception response, or when no answer comes within ``timeout_ms``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Final

import structlog
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException
from pymodbus.pdu import ModbusPDU

from edge_agent.config import ModbusCounter, ModbusRegister
from edge_agent.config import ModbusSource as ModbusSourceConfig
from edge_agent.errors import SignalError
from edge_agent.sources import (
    REFRESH_S,
    SIGNAL_ORDER,
    Emit,
    Origin,
    Quality,
    SignalEvent,
    SignalValue,
    SourceStatus,
    backoff_delay,
    run_delivering,
)
from edge_agent.sources.modbus_codec import (
    WRITABLE_TABLES,
    Data,
    DecodeError,
    Field,
    ReadRequest,
    Role,
    decode,
    encode,
    encode_raw,
    exception_name,
    plan_reads,
)

log = structlog.get_logger(__name__)

#: what each signal is for, which decides the type of its values
ROLES: Final[dict[str, Role]] = {
    "order": Role.TEXT,
    "feed_lot": Role.TEXT,
    "good": Role.COUNTER,
    "scrap": Role.COUNTER,
    "flow": Role.COUNTER,
    "complete_good": Role.QUANTITY,
    "complete_scrap": Role.QUANTITY,
    "scale.tare": Role.ANALOG,
    "scale.weight": Role.ANALOG,
    "scale.stable": Role.FLAG,
    "complete_ack": Role.FLAG,
    "complete_request": Role.FLAG,
}

_GOOD: Final = "Good"
#: the signal re-emitted while it stands still (Origin.REFRESH)
REFRESHED: Final = "flow"
_TICK: Final = timedelta(microseconds=1)

# Library errors that mean "this connection failed"; anything else is a bug and is logged.
# pymodbus raises ModbusIOException for an unanswered request, ConnectionException when the
# socket is gone; OSError covers refused and reset connections.
_TRANSPORT_ERRORS: Final = (OSError, TimeoutError, ModbusException)

_Reading = tuple[SignalValue, Quality, str]


def signal_fields(config: ModbusSourceConfig) -> dict[str, Field]:
    """The configured signals as codec fields, in :data:`SIGNAL_ORDER`.

    A float32 weight or tare without a resolution of its own is rounded to the scale's.
    """
    registers = config.signals.registers()
    scale = config.signals.scale
    fields = {}
    for name in SIGNAL_ORDER:
        register = registers.get(name)
        if register is None:
            continue
        role = ROLES[name]
        resolution = register.resolution
        if role is Role.ANALOG and register.type == "float32" and resolution is None:
            assert scale is not None
            resolution = scale.resolution
        fields[name] = _field(config, name, register, role, resolution)
    return fields


def _field(
    config: ModbusSourceConfig,
    name: str,
    register: ModbusRegister,
    role: Role,
    resolution: Decimal | None,
) -> Field:
    assert register.type is not None
    modulus = register.counter_spec().modulus if isinstance(register, ModbusCounter) else None
    return Field(
        signal=name,
        table=register.table,
        address=register.address,
        type=register.type,
        role=role,
        unit=config.device_id if register.unit is None else register.unit,
        word_order=register.word_order,
        byte_order=register.byte_order,
        bit=register.bit,
        length=register.length,
        scale=register.scale,
        offset=register.offset,
        resolution=resolution,
        modulus=modulus,
    )


def _now() -> datetime:
    return datetime.now(UTC)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


#: signals that say "the values beside me are ready": read before those values in every poll
TRIGGERS = frozenset({"complete_request", "scale.stable"})


def _same(last: _Reading | None, reading: _Reading) -> bool:
    """Whether a reading repeats the last one: a NaN, never equal to itself, is the same NaN
    again (not a change to emit at every poll)."""
    return last == reading or (last is not None and repr(last) == repr(reading))


def triggers_first(requests: list[ReadRequest]) -> list[ReadRequest]:
    """The poll order: the blocks holding a trigger (``complete_request``, ``scale.stable``)
    first, then the rest.

    A poll of several requests is not one snapshot. The PLC writes the handshake quantities
    before it raises the request and keeps them until the acknowledge (a scale indicator its
    weight before it reports stable), so values read *after* a trigger was seen are the ones it
    belongs to. Read the other way round, the PLC could write new quantities and raise the
    request between the two reads, and the agent would confirm the previous quantities (found by
    the end-to-end shift: a handshake of 10 units posted as 0).
    """
    return sorted(requests, key=lambda r: not any(f.signal in TRIGGERS for f in r.fields))


class ModbusSource:
    """One Modbus TCP connection serving one work centre; implements the ``Source`` protocol."""

    def __init__(self, config: ModbusSourceConfig, *, rng: random.Random | None = None) -> None:
        self.name = config.name
        self.config = config
        self._rng = rng or random.Random()
        self._timeout_s = config.timeout_ms / 1000
        self._fields = signal_fields(config)
        self._requests = triggers_first(plan_reads(self._fields.values(), config.max_gap))
        self._connection: _Connection | None = None
        self._last_stamp = datetime.min.replace(tzinfo=UTC)

    @property
    def endpoint(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    @property
    def signals(self) -> dict[str, str]:
        """Signal name → register (``holding:40``), in :data:`SIGNAL_ORDER`."""
        return {name: self._address(field) for name, field in self._fields.items()}

    @property
    def requests(self) -> list[ReadRequest]:
        """The reads of one poll."""
        return list(self._requests)

    @property
    def connected(self) -> bool:
        return self._connection is not None and self._connection.usable

    def _address(self, field: Field) -> str:
        if field.unit == self.config.device_id:
            return field.label
        return f"{field.label} (unit {field.unit})"

    def _stamp(self) -> datetime:
        now = _now()
        self._last_stamp = now if now > self._last_stamp else self._last_stamp + _TICK
        return self._last_stamp

    # ------------------------------------------------------------------ run

    async def run(self, emit: Emit) -> None:
        """Connect, poll and emit until cancelled; reconnect with back-off."""
        await run_delivering(f"modbus[{self.name}]", self._connect_loop, emit)

    async def _connect_loop(self, push: Callable[[SignalEvent | SourceStatus], None]) -> None:
        reported: bool | None = None  # the connection state last emitted
        attempt = 0
        while True:
            connection = _Connection(self)
            try:
                reads = await connection.open()
            except Exception as exc:  # whatever failed, try again: never give up
                connection.close()
                if not isinstance(exc, _TRANSPORT_ERRORS):
                    log.error("modbus_connect_error", source=self.name, exc_info=exc)
                detail = f"cannot connect to {self.endpoint}: {_describe(exc)}"
                if reported is not False:
                    push(SourceStatus(self.name, connected=False, detail=detail, at=_now()))
                    reported = False
                delay = self._backoff(attempt)
                attempt += 1
                log.warning(
                    "modbus_connect_failed",
                    source=self.name,
                    endpoint=self.endpoint,
                    error=_describe(exc),
                    retry_in_s=round(delay, 3),
                )
                await asyncio.sleep(delay)
                continue
            except BaseException:
                connection.close()
                raise

            push(
                SourceStatus(
                    self.name, connected=True, detail=f"connected to {self.endpoint}", at=_now()
                )
            )
            reported = True
            for event in reads:
                push(event)
            log.info(
                "modbus_connected",
                source=self.name,
                endpoint=self.endpoint,
                requests=[r.label for r in self._requests],
            )
            self._connection = connection
            try:
                reason = await connection.serve(push)
            finally:
                self._connection = None
                connection.close()
            push(SourceStatus(self.name, connected=False, detail=reason, at=_now()))
            reported = False
            delay = self._backoff(0)
            attempt = 1
            log.warning(
                "modbus_connection_lost",
                source=self.name,
                endpoint=self.endpoint,
                reason=reason,
                retry_in_s=round(delay, 3),
            )
            await asyncio.sleep(delay)

    def _backoff(self, attempt: int) -> float:
        c = self.config
        return backoff_delay(attempt, c.reconnect_min_ms, c.reconnect_max_ms, self._rng)

    # ------------------------------------------------------------------ write

    async def write(self, signal: str, value: bool | int) -> None:
        """Write ``value`` to the register or coil of ``signal`` (the agent writes
        ``complete_ack``)."""
        field = self._fields.get(signal)
        if field is None:
            raise SignalError(
                f"{self.name}: no signal {signal!r} is configured "
                f"(configured: {', '.join(self._fields)})"
            )
        what = f"cannot write {signal} ({self._address(field)}) on {self.name}"
        if field.table not in WRITABLE_TABLES:
            raise SignalError(f"{what}: a {field.table} is read-only")
        connection = self._connection
        if connection is None or not connection.usable:
            raise SignalError(f"{what}: not connected to {self.endpoint}")
        try:
            encode(field, value)
        except ValueError as exc:
            raise SignalError(f"{what}: {exc}") from None
        try:
            async with asyncio.timeout(self._timeout_s):
                response = await connection.write(field, value)
        except TimeoutError:
            raise SignalError(f"{what}: no answer within {self._timeout_s} s") from None
        except _TRANSPORT_ERRORS as exc:
            raise SignalError(f"{what}: {_describe(exc)}") from exc
        if response.isError():
            name = exception_name(response.exception_code)
            raise SignalError(f"{what}: the device refused it ({name})")
        log.debug(
            "modbus_written",
            source=self.name,
            signal=signal,
            register=self._address(field),
            value=value,
        )


class _Connection:
    """One pymodbus client's lifetime: connect, first poll, poll until lost, close."""

    def __init__(self, source: ModbusSource) -> None:
        self._source = source
        self._config = source.config
        self._client: AsyncModbusTcpClient | None = None
        self._lost = asyncio.Event()
        self._reason = ""
        self._last: dict[str, _Reading] = {}
        self._refused: dict[ReadRequest, str] = {}  # requests answering an exception now
        self._refreshed_at = -math.inf  # the loop time of the poll that last emitted the flow

    @property
    def usable(self) -> bool:
        client = self._client
        return client is not None and client.connected and not self._lost.is_set()

    def _lose(self, reason: str) -> None:
        if not self._lost.is_set():
            self._reason = reason
            self._lost.set()

    def _on_connect(self, connected: bool) -> None:
        # pymodbus calls this from its protocol; a close of our own does not come here
        if not connected:
            self._lose("connection closed by the device")

    async def open(self) -> list[SignalEvent]:
        """Connect and poll once; returns the READ events (not yet emitted)."""
        source = self._source
        client = AsyncModbusTcpClient(
            self._config.host,
            port=self._config.port,
            name=f"edge-agent {source.name}",
            # this module times requests out, retries and reconnects; pymodbus's own timeout
            # is a backstop that must never fire first
            timeout=source._timeout_s * 2,
            retries=0,
            reconnect_delay=0,
            trace_connect=self._on_connect,
        )
        self._client = client
        async with asyncio.timeout(source._timeout_s):
            connected = await client.connect()
        if not connected:
            raise ConnectionRefusedError("refused or unreachable")
        return await self.poll(Origin.READ)

    async def serve(self, push: Callable[[SignalEvent | SourceStatus], None]) -> str:
        """Poll until the connection is lost; returns why it was."""
        poller = asyncio.create_task(
            self._poll_loop(push), name=f"modbus[{self._source.name}].poll"
        )
        lost = asyncio.create_task(self._lost.wait(), name=f"modbus[{self._source.name}].lost")
        try:
            # a loss seen by pymodbus ends a poll waiting for its answer at once
            await asyncio.wait({poller, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (poller, lost):
                task.cancel()
            for task in (poller, lost):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        return self._reason

    async def _poll_loop(self, push: Callable[[SignalEvent | SourceStatus], None]) -> None:
        loop = asyncio.get_running_loop()
        interval = self._config.poll_interval_ms / 1000
        due = loop.time()
        while True:
            due = max(due + interval, loop.time())
            await asyncio.sleep(due - loop.time())
            try:
                events = await self.poll(Origin.CHANGE)
            except _TRANSPORT_ERRORS as exc:
                self._lose(f"connection lost: {_describe(exc)}")
                return
            except Exception as exc:
                log.error("modbus_poll_failed", source=self._source.name, exc_info=exc)
                self._lose(f"poll failed: {_describe(exc)}")
                return
            for event in events:
                push(event)

    async def poll(self, origin: Origin) -> list[SignalEvent]:
        """Read every request once; the events of what changed (everything for a READ), and
        the flow again while it stands still (REFRESH)."""
        source = self._source
        started = source._stamp()
        moment = asyncio.get_running_loop().time()
        readings: dict[str, _Reading] = {}
        for request in source._requests:
            readings.update(await self._read(request))
        received_at = _now()
        events = []
        for name, field in source._fields.items():
            reading = readings[name]
            emitted: Origin | None = None
            if origin is Origin.READ or not _same(self._last.get(name), reading):
                emitted = origin
            elif (
                name == REFRESHED
                and reading[1] is Quality.GOOD
                and moment - self._refreshed_at >= REFRESH_S
            ):
                emitted = Origin.REFRESH
            if emitted is not None:
                if name == REFRESHED:
                    self._refreshed_at = moment
                value, quality, status = reading
                events.append(
                    SignalEvent(
                        source=source.name,
                        work_centre=self._config.work_centre,
                        signal=name,
                        address=source._address(field),
                        value=value,
                        quality=quality,
                        status=status,
                        source_time=started,
                        device_time=False,
                        received_at=received_at,
                        origin=emitted,
                    )
                )
            self._last[name] = reading
        return events

    async def _read(self, request: ReadRequest) -> dict[str, _Reading]:
        client = self._client
        assert client is not None
        read = {
            "holding": client.read_holding_registers,
            "input": client.read_input_registers,
            "coil": client.read_coils,
            "discrete": client.read_discrete_inputs,
        }[request.table]
        async with asyncio.timeout(self._source._timeout_s):
            response = await read(request.address, count=request.count, device_id=request.unit)
        if response.isError():
            return self._refusal(request, exception_name(response.exception_code))
        data = response.bits if request.table in ("coil", "discrete") else response.registers
        if len(data) < request.count:
            return self._refusal(request, "ShortResponse")
        if self._refused.pop(request, None) is not None:
            log.info("modbus_exception_cleared", source=self._source.name, request=request.label)
        return {
            field.signal: self._decode(field, request.data_of(field, data))
            for field in request.fields
        }

    def _refusal(self, request: ReadRequest, status: str) -> dict[str, _Reading]:
        if self._refused.get(request) != status:
            self._refused[request] = status
            log.warning(
                "modbus_exception_response",
                source=self._source.name,
                request=request.label,
                status=status,
                signals=[f.signal for f in request.fields],
            )
        return {field.signal: (None, Quality.BAD, status) for field in request.fields}

    def _decode(self, field: Field, data: Data) -> _Reading:
        try:
            return decode(field, data), Quality.GOOD, _GOOD
        except DecodeError as exc:
            if self._last.get(field.signal, (None, None, None))[2] != exc.status:
                log.warning(
                    "modbus_decode_failed",
                    source=self._source.name,
                    signal=field.signal,
                    register=field.label,
                    status=exc.status,
                    error=str(exc),
                )
            return None, Quality.BAD, exc.status

    async def write(self, field: Field, value: bool | int) -> ModbusPDU:
        client = self._client
        assert client is not None
        unit = field.unit
        if field.table == "coil":
            return await client.write_coil(field.address, bool(value), device_id=unit)
        if field.type == "bool":
            # one bit of a holding register: mask write leaves the device's other bits alone
            (bit,) = encode_raw(field, True)
            mask = int(bit)
            return await client.mask_write_register(
                address=field.address,
                and_mask=0xFFFF ^ mask,
                or_mask=mask if value else 0,
                device_id=unit,
            )
        words = [int(w) for w in encode(field, value)]
        if len(words) == 1:
            return await client.write_register(field.address, words[0], device_id=unit)
        return await client.write_registers(field.address, words, device_id=unit)

    def close(self) -> None:
        """Close the socket (pymodbus closes it on the next loop iteration)."""
        client, self._client = self._client, None
        if client is not None:
            client.close()
