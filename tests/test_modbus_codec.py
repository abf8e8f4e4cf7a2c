"""Modbus decoding, encoding and read planning, built from raw register values (no I/O).

Every data type in both word orders and both byte orders (ABCD, CDAB, BADC, DCBA) from known
vectors, scaling and offset, a float32 to its resolution without printing it, a float32
totalizer rolling over, strings, bits of a register, NaN refused; hypothesis round trips for
every type and order; and which requests a device's signals are read with.
"""

from __future__ import annotations

import random
import string
import struct
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.domain.counters import (
    CounterChange,
    CounterSpec,
    CounterState,
    quantity,
    read_counter,
)
from edge_agent.sources.modbus_codec import (
    MAX_READ_BITS,
    MAX_READ_REGISTERS,
    DataType,
    DecodeError,
    Field,
    Order,
    Role,
    Table,
    decode,
    decode_raw,
    encode,
    encode_raw,
    exception_code,
    exception_name,
    plan_reads,
)

ORDERS: list[tuple[Order, Order]] = [
    ("big", "big"),  # ABCD
    ("little", "big"),  # CDAB: low word first
    ("big", "little"),  # BADC: bytes swapped in each register
    ("little", "little"),  # DCBA
]


def field(
    type_: DataType = "uint16",
    role: Role = Role.QUANTITY,
    *,
    table: Table = "holding",
    address: int = 0,
    word_order: Order = "big",
    byte_order: Order = "big",
    **extra: Any,
) -> Field:
    return Field(
        signal=extra.pop("signal", "x"),
        table=table,
        address=address,
        type=type_,
        role=role,
        word_order=word_order,
        byte_order=byte_order,
        **extra,
    )


# ------------------------------------------------------------------------ known vectors

# (type, value, registers in ABCD, CDAB, BADC, DCBA)
VECTORS: list[tuple[DataType, int | float, list[list[int]]]] = [
    ("uint16", 0x1234, [[0x1234], [0x1234], [0x3412], [0x3412]]),
    ("int16", -2, [[0xFFFE], [0xFFFE], [0xFEFF], [0xFEFF]]),
    (
        "uint32",
        0x12345678,
        [[0x1234, 0x5678], [0x5678, 0x1234], [0x3412, 0x7856], [0x7856, 0x3412]],
    ),
    ("int32", -2, [[0xFFFF, 0xFFFE], [0xFFFE, 0xFFFF], [0xFFFF, 0xFEFF], [0xFEFF, 0xFFFF]]),
    (
        "float32",
        struct.unpack(">f", bytes.fromhex("449A522B"))[0],  # 1234.5678 as a float32
        [[0x449A, 0x522B], [0x522B, 0x449A], [0x9A44, 0x2B52], [0x2B52, 0x9A44]],
    ),
    (
        "float32",
        struct.unpack(">f", bytes.fromhex("BDCCCCCD"))[0],  # -0.1 as a float32
        [[0xBDCC, 0xCCCD], [0xCCCD, 0xBDCC], [0xCCBD, 0xCDCC], [0xCDCC, 0xCCBD]],
    ),
    (
        "uint64",
        0x0102030405060708,
        [
            [0x0102, 0x0304, 0x0506, 0x0708],
            [0x0708, 0x0506, 0x0304, 0x0102],
            [0x0201, 0x0403, 0x0605, 0x0807],
            [0x0807, 0x0605, 0x0403, 0x0201],
        ],
    ),
    (
        "int64",
        -2,
        [
            [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE],
            [0xFFFE, 0xFFFF, 0xFFFF, 0xFFFF],
            [0xFFFF, 0xFFFF, 0xFFFF, 0xFEFF],
            [0xFEFF, 0xFFFF, 0xFFFF, 0xFFFF],
        ],
    ),
]


@pytest.mark.parametrize(("type_", "value", "registers"), VECTORS)
@pytest.mark.parametrize("orders", range(4), ids=["ABCD", "CDAB", "BADC", "DCBA"])
def test_every_type_decodes_in_every_word_and_byte_order(
    type_: DataType, value: float, registers: list[list[int]], orders: int
) -> None:
    word_order, byte_order = ORDERS[orders]
    f = field(
        type_,
        Role.ANALOG if type_ == "float32" else Role.QUANTITY,
        word_order=word_order,
        byte_order=byte_order,
        resolution=Decimal("0.0001") if type_ == "float32" else None,
    )
    assert decode_raw(f, registers[orders]) == value
    assert encode_raw(f, value) == registers[orders]


def test_known_vectors_as_engineering_values() -> None:
    f32 = field("float32", Role.ANALOG, resolution=Decimal("0.001"))
    assert decode(f32, [0x449A, 0x522B]) == Decimal("1234.568")  # 1234.5677490234375
    assert str(decode(f32, [0xBDCC, 0xCCCD])) == "-0.100"
    fine = field("float32", Role.ANALOG, resolution=Decimal("0.0001"))
    assert str(decode(fine, [0x449A, 0x522B])) == "1234.5677"
    assert decode(field("int32"), [0xFFFF, 0xFFFE]) == -2
    assert decode(field("uint32", Role.COUNTER), [0x1234, 0x5678]) == 0x12345678
    assert type(decode(field("uint32", Role.COUNTER), [0, 5])) is int


def test_a_float32_becomes_a_decimal_at_its_resolution_never_by_printing_it() -> None:
    f = field("float32", Role.ANALOG, resolution=Decimal("0.001"))
    tenth = encode_raw(f, struct.unpack(">f", struct.pack(">f", 0.1))[0])
    value = decode(f, tenth)  # 0.100000001490116119384765625 exactly
    assert isinstance(value, Decimal)
    assert str(value) == "0.100"
    # half-up on the exact binary value: 2.0005f is 2.000499963760376 → 2.000 (its shortest
    # repr, "2.0005", would have rounded to 2.001)
    assert decode(f, encode_raw(f, 2.0005)) == Decimal("2.000")
    assert decode(f, encode_raw(f, 2.0025)) == Decimal("2.003")  # 2.00250005722045898438
    coarse = field("float32", Role.ANALOG, resolution=Decimal("0.5"))
    assert str(decode(coarse, encode_raw(coarse, 12.25))) == "12.5"  # a tie rounds up


def test_scaling_and_offset_are_exact() -> None:
    raw = field("uint16", Role.ANALOG, scale=Decimal("0.01"), offset=Decimal("-10"))
    assert decode(raw, [12345]) == Decimal("113.45")
    signed = field("int16", Role.ANALOG, scale=Decimal("0.1"))
    assert str(decode(signed, [0xFF06])) == "-25.0"  # -250 × 0.1
    wide = field("uint32", Role.ANALOG, scale=Decimal("0.001"), offset=Decimal("0.5"))
    assert decode(wide, [0x0001, 0x0000]) == Decimal("66.036")  # 65536 × 0.001 + 0.5
    f32 = field(
        "float32", Role.ANALOG, scale=Decimal("1000"), offset=Decimal(1), resolution=Decimal(1)
    )
    assert decode(f32, encode_raw(f32, 1.5)) == Decimal(1501)  # m³ → L, then + 1
    # and back: the raw value an engineering value needs
    assert encode(raw, Decimal("113.45")) == [12345]
    with pytest.raises(ValueError, match=r"not a whole number of steps of 0\.01"):
        encode(raw, Decimal("113.455"))


def test_a_float32_totalizer_rolls_over_as_counts_of_its_resolution() -> None:
    # a totalizer in litres at 0.01 L that shows 0 again after 1000.00 L
    spec = CounterSpec(None, Decimal("0.01"), rollover_at=100_000)
    total = field("float32", Role.COUNTER, resolution=Decimal("0.01"), modulus=spec.modulus)
    before = decode(total, encode_raw(total, 999.99))
    after = decode(total, encode_raw(total, 0.03))
    assert (before, after) == (99_999, 3)
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    first = read_counter(spec, CounterState(), before, t0)
    second = read_counter(spec, first.state, after, t0 + timedelta(seconds=1))
    assert second.change is CounterChange.ROLLOVER
    assert quantity(spec, second.counts) == Decimal("0.04")
    # a value that rounds to the rollover itself is the rollover: 0
    assert decode(total, encode_raw(total, 1000.0)) == 0
    assert decode(total, encode_raw(total, 999.996)) == 0
    # below zero is no count: its value, a Decimal, for the engine to refuse by name
    assert decode(total, encode_raw(total, -0.5)) == Decimal("-0.50")
    # and an integer totalizer at its width, as for OPC UA
    counts = field("uint16", Role.COUNTER)
    spec16 = CounterSpec(16, Decimal("0.01"))
    state = read_counter(spec16, CounterState(), decode_int(counts, [65534]), t0).state
    wrapped = read_counter(spec16, state, decode_int(counts, [2]), t0 + timedelta(seconds=1))
    assert (wrapped.change, wrapped.counts) == (CounterChange.ROLLOVER, 4)


def decode_int(f: Field, registers: list[int]) -> int:
    value = decode(f, registers)
    assert isinstance(value, int)
    return value


def test_strings_are_ascii_with_trailing_nuls_and_spaces_stripped() -> None:
    order = field("string", Role.TEXT, length=4)
    assert decode(order, [0x574F, 0x2D31, 0x3233, 0x3400]) == "WO-1234"
    swapped = field("string", Role.TEXT, length=4, byte_order="little")
    assert decode(swapped, [0x4F57, 0x312D, 0x3332, 0x0034]) == "WO-1234"
    # word order does not apply to text: its registers are in reading order
    words = field("string", Role.TEXT, length=4, word_order="little")
    assert decode(words, [0x574F, 0x2D31, 0x3233, 0x3400]) == "WO-1234"
    assert decode(order, [0x4142, 0x2020, 0x2000, 0x0000]) == "AB"
    assert decode(order, [0, 0, 0, 0]) == ""
    assert encode(order, "WO-1") == [0x574F, 0x2D31, 0, 0]
    with pytest.raises(DecodeError) as exc:
        decode(order, [0xC3A9, 0, 0, 0])
    assert exc.value.status == "InvalidString"
    with pytest.raises(ValueError, match="longer than 8 characters"):
        encode(order, "WO-123456")


def test_bits_of_a_register_coils_and_flag_registers() -> None:
    status = [0b0000_0000_0010_0100]
    assert [decode(field("bool", Role.FLAG, bit=b), status) for b in range(6)] == [
        False,
        False,
        True,
        False,
        False,
        True,
    ]
    # byte order applies before the bit is taken: bit 2 of a byte-swapped register
    assert decode(field("bool", Role.FLAG, bit=2, byte_order="little"), [0x0400]) is True
    assert decode(field("bool", Role.FLAG, table="coil"), [True]) is True
    assert decode(field("bool", Role.FLAG, table="discrete"), [False]) is False
    assert decode(field("uint16", Role.FLAG), [7]) is True
    assert decode(field("int16", Role.FLAG), [0]) is False
    # writing a bit keeps the register's other bits
    assert encode(field("bool", Role.FLAG, bit=1), True, word=0b100) == [0b110]
    assert encode(field("bool", Role.FLAG, bit=2), False, word=0b110) == [0b010]
    assert encode(field("bool", Role.FLAG, bit=0, byte_order="little"), True) == [0x0100]
    assert encode(field("uint16", Role.FLAG), True) == [1]
    with pytest.raises(ValueError, match="True or False"):
        encode(field("uint16", Role.FLAG), 1)


@pytest.mark.parametrize(
    ("pattern", "shown"),
    [("7FC00000", "NaN"), ("FFC00000", "NaN"), ("7F800000", "Infinity"), ("FF800000", "-Infinity")],
)
def test_nan_and_infinity_are_passed_on_as_they_are_never_as_counts(
    pattern: str, shown: str
) -> None:
    """The device's value, for the engine to refuse by name (signal_invalid); never an int a
    counter would count."""
    registers = [int(pattern[:4], 16), int(pattern[4:], 16)]
    for f in (
        field("float32", Role.ANALOG, resolution=Decimal("0.001")),
        field("float32", Role.COUNTER, resolution=Decimal("0.01")),
    ):
        value = decode(f, registers)
        assert isinstance(value, Decimal)
        assert str(value) == shown


def test_a_short_response_and_values_that_do_not_fit_are_refused() -> None:
    with pytest.raises(DecodeError) as exc:
        decode(field("uint32"), [1])
    assert exc.value.status == "ShortResponse"
    with pytest.raises(ValueError, match="does not fit a uint16"):
        encode(field("uint16"), 65536)
    with pytest.raises(ValueError, match="does not fit a int16"):
        encode(field("int16"), -32769)
    with pytest.raises(ValueError, match="counts are an int"):
        encode(field("uint16", Role.COUNTER), True)


def test_exception_codes_have_names() -> None:
    assert exception_name(2) == "IllegalDataAddress"
    assert exception_name(6) == "DeviceBusy"
    assert exception_name(0x42) == "Exception0x42"
    assert exception_code("DeviceBusy") == 6
    with pytest.raises(ValueError, match="unknown Modbus exception 'Busy'"):
        exception_code("Busy")


def test_a_field_that_cannot_be_is_refused() -> None:
    with pytest.raises(ValueError, match="a coil is one bool"):
        field("uint16", table="coil")
    with pytest.raises(ValueError, match="needs its bit"):
        field("bool", Role.FLAG)
    with pytest.raises(ValueError, match="needs a resolution"):
        field("float32", Role.ANALOG)
    with pytest.raises(ValueError, match="does not fit the address space"):
        field("uint32", address=65535)


# ----------------------------------------------------------------------------- round trips

INTEGERS: dict[DataType, st.SearchStrategy[int]] = {
    "uint16": st.integers(0, 2**16 - 1),
    "int16": st.integers(-(2**15), 2**15 - 1),
    "uint32": st.integers(0, 2**32 - 1),
    "int32": st.integers(-(2**31), 2**31 - 1),
    "uint64": st.integers(0, 2**64 - 1),
    "int64": st.integers(-(2**63), 2**63 - 1),
}
orders = st.sampled_from(ORDERS)


@given(st.data(), orders)
def test_every_integer_type_round_trips_in_every_order(
    data: st.DataObject, order: tuple[Order, Order]
) -> None:
    type_ = data.draw(st.sampled_from(list(INTEGERS)))
    value = data.draw(INTEGERS[type_])
    f = field(type_, word_order=order[0], byte_order=order[1])
    registers = encode(f, value)
    assert all(0 <= r <= 0xFFFF for r in registers)
    assert decode(f, registers) == value


@given(st.floats(width=32, allow_nan=False, allow_infinity=False), orders)
def test_float32_round_trips_in_every_order(value: float, order: tuple[Order, Order]) -> None:
    f = field(
        "float32", Role.ANALOG, word_order=order[0], byte_order=order[1], resolution=Decimal(1)
    )
    assert decode_raw(f, encode_raw(f, value)) == value


@given(st.integers(0, 13_107_199), orders)
def test_a_float32_totalizer_gives_its_counts_back_below_its_exact_limit(
    counts: int, order: tuple[Order, Order]
) -> None:
    # 0.01 L steps are kept below 2**17 L (131 072 L), where float32 steps reach 1/128 L
    f = field(
        "float32",
        Role.COUNTER,
        word_order=order[0],
        byte_order=order[1],
        resolution=Decimal("0.01"),
        modulus=13_107_200,
    )
    assert decode(f, encode(f, counts)) == counts


@given(
    st.integers(-(2**31), 2**31 - 1),
    st.decimals(places=3, min_value=-1000, max_value=1000).filter(lambda d: d != 0),
    st.decimals(places=2, min_value=-1000, max_value=1000),
    orders,
)
def test_scaled_integers_round_trip_as_engineering_values(
    raw: int, scale: Decimal, offset: Decimal, order: tuple[Order, Order]
) -> None:
    f = field(
        "int32", Role.ANALOG, scale=scale, offset=offset, word_order=order[0], byte_order=order[1]
    )
    value = decode(f, encode_raw(f, raw))
    assert value == raw * scale + offset
    assert encode(f, value) == encode_raw(f, raw)


@given(
    st.text(alphabet=string.ascii_letters + string.digits + "-_/. ", max_size=16).map(str.rstrip),
    st.sampled_from(["big", "little"]),
)
def test_strings_round_trip(text: str, byte_order: Order) -> None:
    f = field("string", Role.TEXT, length=8, byte_order=byte_order)
    assert decode(f, encode(f, text)) == text


@given(st.integers(0, 15), st.booleans(), st.integers(0, 0xFFFF), st.sampled_from(ORDERS))
def test_bits_round_trip_and_leave_the_other_bits(
    bit: int, value: bool, word: int, order: tuple[Order, Order]
) -> None:
    f = field("bool", Role.FLAG, bit=bit, byte_order=order[1])
    (written,) = encode(f, value, word)
    assert decode(f, [written]) is value
    others = [
        decode(field("bool", Role.FLAG, bit=b, byte_order=order[1]), [w])
        for w in (word, written)
        for b in range(16)
        if b != bit
    ]
    assert others[:15] == others[15:]


# --------------------------------------------------------------------------- read planning


def test_neighbouring_signals_are_read_in_one_request_not_one_per_signal() -> None:
    fields = [
        field("string", Role.TEXT, address=0, length=8, signal="order"),
        field("uint32", Role.COUNTER, address=10, signal="good"),
        field("uint16", Role.COUNTER, address=12, signal="scrap"),
        field("float32", Role.ANALOG, address=20, resolution=Decimal("0.001"), signal="weight"),
        field("bool", Role.FLAG, address=22, bit=0, signal="stable"),
        field("bool", Role.FLAG, address=22, bit=1, signal="request"),
    ]
    (request,) = plan_reads(fields, max_gap=8)
    assert (request.table, request.address, request.count) == ("holding", 0, 23)
    assert [f.signal for f in request.fields] == [
        "order",
        "good",
        "scrap",
        "weight",
        "stable",
        "request",
    ]
    assert request.label == "holding:0..22 (unit 1)"
    # each signal's share of the response
    response = [0] * 23
    response[10:13] = [0, 7, 3]
    response[22] = 0b10
    values = {f.signal: decode(f, request.data_of(f, response)) for f in request.fields}
    assert (values["good"], values["scrap"], values["stable"], values["request"]) == (
        7,
        3,
        False,
        True,
    )


def test_a_gap_wider_than_max_gap_starts_another_request() -> None:
    a = field("uint16", address=0, signal="a")
    b = field("uint16", address=10, signal="b")  # 9 unused registers in between
    assert [(r.address, r.count) for r in plan_reads([a, b], max_gap=9)] == [(0, 11)]
    assert [(r.address, r.count) for r in plan_reads([a, b], max_gap=8)] == [(0, 1), (10, 1)]
    c = field("uint16", address=1, signal="c")
    assert [(r.address, r.count) for r in plan_reads([a, c], max_gap=0)] == [(0, 2)]
    d = field("uint16", address=2, signal="d")
    assert [(r.address, r.count) for r in plan_reads([a, d], max_gap=0)] == [(0, 1), (2, 1)]


def test_a_request_never_exceeds_the_protocol_limits() -> None:
    first = field("uint16", address=0, signal="first")
    last = field("uint16", address=124, signal="last")
    assert [r.count for r in plan_reads([first, last], max_gap=124)] == [MAX_READ_REGISTERS]
    wider = field("uint32", address=124, signal="wider")  # would make 126
    assert [(r.address, r.count) for r in plan_reads([first, wider], max_gap=124)] == [
        (0, 1),
        (124, 2),
    ]
    many = [field("uint16", address=a, signal=f"r{a}") for a in range(300)]
    requests = plan_reads(many, max_gap=0)
    assert [(r.address, r.count) for r in requests] == [(0, 125), (125, 125), (250, 50)]
    coils = [
        field("bool", Role.FLAG, table="coil", address=a, signal=f"c{a}")
        for a in (0, 1000, 1999, 2000)
    ]
    # max_gap counts registers: 124 of them bridge 1984 unused bits
    plan = plan_reads(coils, max_gap=124)
    assert [(r.address, r.count) for r in plan] == [(0, MAX_READ_BITS), (2000, 1)]
    with pytest.raises(ValueError, match="more than one read"):
        plan_reads([field("string", Role.TEXT, length=126)])


def test_requests_are_per_unit_and_table_and_do_not_depend_on_the_signal_order() -> None:
    fields = [
        field("uint16", address=0, signal="h"),
        field("uint16", table="input", address=0, signal="i"),
        field("bool", Role.FLAG, table="coil", address=3, signal="c"),
        field("bool", Role.FLAG, table="discrete", address=3, signal="d"),
        field("uint16", address=1, unit=2, signal="h2"),
        field("uint16", address=2, signal="h1"),
    ]
    plan = plan_reads(fields)
    assert [(r.unit, r.table, r.address, r.count) for r in plan] == [
        (1, "holding", 0, 3),
        (1, "input", 0, 1),
        (1, "coil", 3, 1),
        (1, "discrete", 3, 1),
        (2, "holding", 1, 1),
    ]
    shuffled = list(fields)
    random.Random(4).shuffle(shuffled)
    assert plan_reads(shuffled) == plan
