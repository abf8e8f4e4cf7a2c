"""Modbus registers ↔ signal values, and which registers to read in one request: pure, no I/O.

The decoding half of the Modbus adapter (Telegraf's ``type_conversions.go``): the source
(:mod:`edge_agent.sources.modbus`) moves registers; this module says what they mean. No asyncio,
no sockets, no pymodbus, no clock.

- **Tables and addresses.** ``holding`` and ``input`` registers (16 bits each), ``coil`` and
  ``discrete`` inputs (one bit each). Addresses are the 0-based protocol (PDU) addresses: holding
  register 40001 in the Modicon notation of many manuals is ``holding`` address 0, 40041 is 40.
- **Data types.** ``bool`` (a coil or discrete input, or ``bit`` 0..15 of a register),
  ``uint16``/``int16`` (one register), ``uint32``/``int32``/``float32`` (two), ``uint64``/
  ``int64`` (four) and ``string`` (``length`` registers, two ASCII characters each, trailing NULs
  and spaces stripped).
- **Word and byte order.** ``word_order`` "big" puts the most significant register first
  ("little": last); ``byte_order`` "big" puts the high byte first within each register
  ("little": swapped). All four combinations occur in the field (ABCD, CDAB, BADC, DCBA). A string
  takes ``byte_order`` only (its registers are in text order); a ``bit`` is bit n of the register
  value after ``byte_order``.
- **Scaling.** An engineering value is ``raw × scale + offset``, in exact Decimal arithmetic. A
  ``float32`` becomes a Decimal without ever printing the float: its exact binary value (a
  Fraction) is scaled and rounded half-up to the signal's ``resolution`` (0.1f at 0.001 is
  0.100). NaN and infinity are passed on as they are (``Decimal("NaN")``, ``Decimal("Infinity")``),
  and so is a float32 totalizer below zero (its value, not counts): the values the device
  sent, which the engine refuses as invalid (``signal_invalid``, naming them), never a count.
- **Roles.** What a signal is for decides the Python type the engine gets: a counter → ``int``
  counts (the raw integer; a ``float32`` totalizer as its value / resolution, rounded half-up), a
  handshake quantity → ``int``, an analog value (weight, tare) → ``Decimal``, a flag → ``bool``
  (an integer register: non-zero is True), the order → ``str``. Never a float.
- **Read planning.** :func:`plan_reads` coalesces the signals of one device per (unit id,
  table) into as few requests as the protocol allows (125 registers, 2000 bits per read),
  bridging gaps of up to ``max_gap`` registers (``16 × max_gap`` bits). A device that refuses
  reads across undefined addresses needs ``max_gap = 0``.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from fractions import Fraction
from typing import Final, Literal

from edge_agent.domain.quantities import Rounding, round_to_increment
from edge_agent.sources import SignalValue

Table = Literal["holding", "input", "coil", "discrete"]
DataType = Literal[
    "bool", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float32", "string"
]
Order = Literal["big", "little"]

REGISTER_TABLES: Final[tuple[Table, ...]] = ("holding", "input")
BIT_TABLES: Final[tuple[Table, ...]] = ("coil", "discrete")
#: the tables a client can write
WRITABLE_TABLES: Final[tuple[Table, ...]] = ("holding", "coil")
TABLES: Final[tuple[Table, ...]] = ("holding", "input", "coil", "discrete")

#: protocol limits of one read (Modbus Application Protocol v1.1b3, 6.1-6.4)
MAX_READ_REGISTERS: Final = 125
MAX_READ_BITS: Final = 2000
DEFAULT_MAX_GAP: Final = 8

INTEGER_TYPES: Final[tuple[DataType, ...]] = (
    "uint16",
    "int16",
    "uint32",
    "int32",
    "uint64",
    "int64",
)
UNSIGNED_TYPES: Final[tuple[DataType, ...]] = ("uint16", "uint32", "uint64")
#: registers per value (a string's is its ``length``)
REGISTERS: Final[dict[DataType, int]] = {
    "bool": 1,
    "uint16": 1,
    "int16": 1,
    "uint32": 2,
    "int32": 2,
    "uint64": 4,
    "int64": 4,
    "float32": 2,
}
WIDTH: Final[dict[DataType, int]] = {"uint16": 16, "uint32": 32, "uint64": 64}
_STRUCT: Final[dict[DataType, str]] = {
    "uint16": "H",
    "int16": "h",
    "uint32": "I",
    "int32": "i",
    "uint64": "Q",
    "int64": "q",
    "float32": "f",
}

#: exception codes of an exception response → the names events and errors carry
EXCEPTION_NAMES: Final[dict[int, str]] = {
    0x01: "IllegalFunction",
    0x02: "IllegalDataAddress",
    0x03: "IllegalDataValue",
    0x04: "DeviceFailure",
    0x05: "Acknowledge",
    0x06: "DeviceBusy",
    0x07: "NegativeAcknowledge",
    0x08: "MemoryParityError",
    0x0A: "GatewayPathUnavailable",
    0x0B: "GatewayTargetFailedToRespond",
}
_EXCEPTION_CODES: Final = {name: code for code, name in EXCEPTION_NAMES.items()}


def exception_name(code: int) -> str:
    """The name of a Modbus exception code (``0x02`` → ``IllegalDataAddress``)."""
    return EXCEPTION_NAMES.get(code, f"Exception0x{code:02X}")


def exception_code(name: str) -> int:
    """The code of a Modbus exception name; ValueError naming the known ones."""
    try:
        return _EXCEPTION_CODES[name]
    except KeyError:
        raise ValueError(
            f"unknown Modbus exception {name!r} (known: {', '.join(_EXCEPTION_CODES)})"
        ) from None


class Role(StrEnum):
    """What a signal is for; decides the type of its value."""

    COUNTER = "counter"  # cumulative counts → int
    QUANTITY = "quantity"  # a handshake quantity → int
    ANALOG = "analog"  # a measurement (weight, tare) → Decimal
    FLAG = "flag"  # → bool
    TEXT = "text"  # the order id → str


class DecodeError(ValueError):
    """Registers that cannot be a value of their signal; ``status`` names why (the event's
    status, with bad quality): ``InvalidString``, ``ShortResponse``."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


RawValue = bool | int | float | str
Data = Sequence[int] | Sequence[bool]


@dataclass(frozen=True, slots=True)
class Field:
    """One signal's place and encoding in a device.

    ``modulus`` (counters): the count at which the value shows 0 again; a ``float32`` totalizer
    whose value rounds to exactly its rollover shows the rollover, which is 0.
    """

    signal: str
    table: Table
    address: int
    type: DataType
    role: Role
    unit: int = 1
    word_order: Order = "big"
    byte_order: Order = "big"
    bit: int | None = None
    length: int | None = None
    scale: Decimal = Decimal(1)
    offset: Decimal = Decimal(0)
    resolution: Decimal | None = None
    modulus: int | None = None

    def __post_init__(self) -> None:
        # a programming error guard; the configuration explains the same rules to users
        if self.table in BIT_TABLES and (self.type != "bool" or self.bit is not None):
            raise ValueError(f"{self.signal}: a {self.table} is one bool, no bit")
        if self.table in REGISTER_TABLES and (self.type == "bool") != (self.bit is not None):
            raise ValueError(f"{self.signal}: a bool in a register needs its bit, only a bool")
        if self.bit is not None and not 0 <= self.bit <= 15:
            raise ValueError(f"{self.signal}: bit must be 0..15 (got {self.bit})")
        if (self.type == "string") != (self.length is not None):
            raise ValueError(f"{self.signal}: a string needs its length, only a string")
        if self.type == "float32" and self.role is not Role.FLAG and self.resolution is None:
            raise ValueError(f"{self.signal}: a float32 needs a resolution")
        if self.address < 0 or self.end > 65536:
            raise ValueError(f"{self.signal}: {self.label} does not fit the address space")

    @property
    def bits(self) -> bool:
        """A coil or discrete input (one bit), not a register."""
        return self.table in BIT_TABLES

    @property
    def size(self) -> int:
        """Registers (or bits, in a bit table) the value occupies."""
        if self.bits:
            return 1
        if self.type == "string":
            assert self.length is not None
            return self.length
        return REGISTERS[self.type]

    @property
    def end(self) -> int:
        return self.address + self.size

    @property
    def label(self) -> str:
        """``holding:40``, ``holding:40.3`` (a bit), ``coil:5``: what events and errors name."""
        bit = "" if self.bit is None else f".{self.bit}"
        return f"{self.table}:{self.address}{bit}"


# ------------------------------------------------------------------------------- raw values


def _word_bytes(word: int, byte_order: Order) -> bytes:
    return word.to_bytes(2, "big" if byte_order == "big" else "little")


def _bytes_words(data: bytes, byte_order: Order) -> list[int]:
    order: Literal["big", "little"] = "big" if byte_order == "big" else "little"
    return [int.from_bytes(data[i : i + 2], order) for i in range(0, len(data), 2)]


def _words(field: Field, data: Data) -> list[int]:
    if len(data) < field.size:
        raise DecodeError(
            "ShortResponse",
            f"{field.signal} ({field.label}): {field.size} registers expected, got {len(data)}",
        )
    words = [int(w) for w in data[: field.size]]
    if any(not 0 <= w <= 0xFFFF for w in words):
        raise ValueError(f"{field.signal}: registers are 16-bit values (got {words})")
    return words


def decode_raw(field: Field, data: Data) -> RawValue:
    """The registers (or bit) of ``field`` as the device's value: bool, int, float or str."""
    if field.bits:
        if not data:
            raise DecodeError("ShortResponse", f"{field.signal} ({field.label}): no bit")
        return bool(data[0])
    words = _words(field, data)
    if field.type == "bool":
        assert field.bit is not None
        word = int.from_bytes(_word_bytes(words[0], field.byte_order), "big")
        return bool(word >> field.bit & 1)
    if field.type == "string":
        raw = b"".join(_word_bytes(w, field.byte_order) for w in words).rstrip(b"\x00 ")
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise DecodeError(
                "InvalidString", f"{field.signal} ({field.label}): not ASCII text: {raw!r}"
            ) from None
    if field.word_order == "little":
        words.reverse()
    packed = b"".join(_word_bytes(w, field.byte_order) for w in words)
    value: int | float = struct.unpack(">" + _STRUCT[field.type], packed)[0]
    return value


def encode_raw(field: Field, value: RawValue, word: int = 0) -> list[int] | list[bool]:
    """The registers (or bit) that hold ``value``; ValueError if it does not fit the type.

    A bool in a register is merged into ``word`` (the register's other bits are kept).
    """
    if field.bits:
        if not isinstance(value, bool):
            raise ValueError(f"{field.signal}: a {field.table} holds a bool (got {value!r})")
        return [value]
    if field.type == "bool":
        assert field.bit is not None
        if not isinstance(value, bool):
            raise ValueError(f"{field.signal}: bit {field.bit} holds a bool (got {value!r})")
        swapped = int.from_bytes(_word_bytes(word, field.byte_order), "big")
        swapped = swapped | 1 << field.bit if value else swapped & ~(1 << field.bit)
        return _bytes_words(swapped.to_bytes(2, "big"), field.byte_order)
    if field.type == "string":
        assert field.length is not None
        if not isinstance(value, str):
            raise ValueError(f"{field.signal}: a string register holds text (got {value!r})")
        try:
            text = value.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError(f"{field.signal}: not ASCII text: {value!r}") from None
        if len(text) > 2 * field.length:
            raise ValueError(
                f"{field.signal}: {value!r} is longer than {2 * field.length} characters"
            )
        return _bytes_words(text.ljust(2 * field.length, b"\x00"), field.byte_order)
    if isinstance(value, bool | str) or (field.type != "float32" and isinstance(value, float)):
        raise ValueError(f"{field.signal}: a {field.type} cannot hold {value!r}")
    try:
        packed = struct.pack(">" + _STRUCT[field.type], value)
    except (struct.error, OverflowError):
        raise ValueError(f"{field.signal}: {value!r} does not fit a {field.type}") from None
    words = _bytes_words(packed, field.byte_order)
    if field.word_order == "little":
        words.reverse()
    return words


# --------------------------------------------------------------------- engineering values


def engineering(field: Field, raw: int | float) -> Decimal:
    """``raw × scale + offset``, exactly; a float rounded half-up to the resolution (NaN and
    infinity as they are: not a measurement, for the engine to refuse)."""
    if isinstance(raw, float):
        assert field.resolution is not None
        if not math.isfinite(raw):
            return Decimal(raw)
        # exact: the float's binary value, never its printed digits
        exact = Fraction(raw) * Fraction(field.scale) + Fraction(field.offset)
        return round_to_increment(exact, field.resolution, Rounding.HALF_UP)
    return Decimal(raw) * field.scale + field.offset


def counts(field: Field, raw: int | float) -> int | Decimal:
    """A counter's raw value as counts: an integer as is; a float32 totalizer as its value /
    resolution, rounded half-up (at exactly its modulus it shows 0). A float32 that is not a
    count (NaN, infinity, below zero) is its engineering value, a Decimal: the engine refuses
    it by name, where an int would be taken for counts."""
    if not isinstance(raw, float):
        return raw
    assert field.resolution is not None
    if not math.isfinite(raw):
        return Decimal(raw)
    steps = Fraction(raw) * Fraction(field.scale) / Fraction(field.resolution)
    if steps < 0:
        return engineering(field, raw)
    whole, rest = divmod(steps.numerator, steps.denominator)
    if 2 * rest >= steps.denominator:
        whole += 1
    if field.modulus is not None and whole == field.modulus:
        return 0
    return whole


def decode(field: Field, data: Data) -> SignalValue:
    """The signal value the engine gets from ``field``'s registers (see the module's roles);
    raises :class:`DecodeError` for registers that cannot be one."""
    raw = decode_raw(field, data)
    role = field.role
    if role is Role.FLAG:
        return raw if isinstance(raw, bool) else raw != 0
    if role is Role.TEXT:
        assert isinstance(raw, str)
        return raw
    assert isinstance(raw, int | float)
    assert not isinstance(raw, bool)
    if role is Role.COUNTER:
        return counts(field, raw)
    if role is Role.QUANTITY:
        assert isinstance(raw, int)  # the configuration allows integer types only
        return raw
    return engineering(field, raw)


def encode(field: Field, value: SignalValue, word: int = 0) -> list[int] | list[bool]:
    """The registers that :func:`decode` reads back as ``value`` (the simulator writes these;
    the source writes the acknowledge with them). ValueError if no register value decodes to
    it exactly (an analog value between two raw steps, a count beyond the type)."""
    words = encode_raw(field, _raw(field, value), word)
    if field.type == "float32" and decode(field, words) != value:
        raise ValueError(f"{field.signal}: {value} has no float32 that reads back as it")
    return words


def _raw(field: Field, value: SignalValue) -> RawValue:
    role = field.role
    if role is Role.FLAG:
        if not isinstance(value, bool):
            raise ValueError(f"{field.signal}: a flag is True or False (got {value!r})")
        return value if field.type == "bool" else int(value)
    if role is Role.TEXT:
        if not isinstance(value, str):
            raise ValueError(f"{field.signal}: text expected (got {value!r})")
        return value
    if role in (Role.COUNTER, Role.QUANTITY):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{field.signal}: counts are an int (got {value!r})")
        if field.type != "float32":
            return value
        assert field.resolution is not None
        return float(Fraction(value) * Fraction(field.resolution) / Fraction(field.scale))
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise ValueError(f"{field.signal}: a number expected (got {value!r})")
    steps = (Fraction(value) - Fraction(field.offset)) / Fraction(field.scale)
    if field.type == "float32":
        return float(steps)
    if steps.denominator != 1:
        raise ValueError(f"{field.signal}: {value} is not a whole number of steps of {field.scale}")
    return int(steps)


# ---------------------------------------------------------------------------- read planning


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """One read of ``count`` registers (or bits) from ``address`` of one table of one unit,
    and the signals it carries."""

    unit: int
    table: Table
    address: int
    count: int
    fields: tuple[Field, ...]

    @property
    def label(self) -> str:
        """``holding:40..52`` (unit 1): the range, for logs and errors."""
        last = self.address + self.count - 1
        span = f"{self.address}" if last == self.address else f"{self.address}..{last}"
        return f"{self.table}:{span} (unit {self.unit})"

    def data_of(self, field: Field, data: Data) -> Data:
        """``field``'s share of this request's response."""
        start = field.address - self.address
        return data[start : start + field.size]


def plan_reads(fields: Iterable[Field], max_gap: int = DEFAULT_MAX_GAP) -> list[ReadRequest]:
    """The reads that cover ``fields``: per (unit, table), in address order, a field joins the
    current request when at most ``max_gap`` unused registers (``16 × max_gap`` bits) lie
    between them and the request stays within the protocol limit. Deterministic: the same
    fields in any order give the same requests."""
    if max_gap < 0:
        raise ValueError(f"max_gap must not be negative (got {max_gap})")
    groups: dict[tuple[int, Table], list[Field]] = {}
    for field in fields:
        groups.setdefault((field.unit, field.table), []).append(field)
    requests: list[ReadRequest] = []
    for unit, table in sorted(groups, key=lambda k: (k[0], TABLES.index(k[1]))):
        bits = table in BIT_TABLES
        limit = MAX_READ_BITS if bits else MAX_READ_REGISTERS
        gap = max_gap * 16 if bits else max_gap
        ordered = sorted(
            groups[unit, table], key=lambda f: (f.address, f.end, f.bit or 0, f.signal)
        )
        block: list[Field] = []
        start = end = 0
        for field in ordered:
            if field.size > limit:
                raise ValueError(
                    f"{field.signal} ({field.label}) is {field.size} wide: more than one read "
                    f"({limit})"
                )
            if block and field.address - end <= gap and max(end, field.end) - start <= limit:
                block.append(field)
                end = max(end, field.end)
                continue
            if block:
                requests.append(ReadRequest(unit, table, start, end - start, tuple(block)))
            block, start, end = [field], field.address, field.end
        if block:
            requests.append(ReadRequest(unit, table, start, end - start, tuple(block)))
    return requests
