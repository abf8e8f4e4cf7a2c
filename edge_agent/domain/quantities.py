"""Units of measure, exact conversion and rounding to an issue increment.

Quantities are :class:`~decimal.Decimal`. Conversion factors and rates are held as exact
:class:`~fractions.Fraction` values, so that a chain such as "per base quantity of 3, at a density
of 0.92 kg/L" is exact until the one place where rounding is meant to happen: rounding a cumulative
quantity to a material's issue increment. Every quantity that leaves the domain is a Decimal.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from fractions import Fraction
from types import MappingProxyType
from typing import Final

from edge_agent.errors import UnitError

Exact = Decimal | Fraction | int


class Dimension(StrEnum):
    """A family of units that convert into each other by a fixed factor."""

    MASS = "mass"
    VOLUME = "volume"
    COUNT = "count"
    LENGTH = "length"


@dataclass(frozen=True, slots=True)
class Unit:
    """A unit of measure: its code, family and exact factor to the family's base unit."""

    code: str
    dimension: Dimension
    factor: Decimal


def _units(*units: Unit) -> MappingProxyType[str, Unit]:
    return MappingProxyType({u.code: u for u in units})


#: Every unit the agent knows. Base units: kg, L, pc, m. Factors are exact by definition
#: (the international yard and pound agreement for lb/oz/in/ft, the US gallon).
UNITS: Final = _units(
    Unit("kg", Dimension.MASS, Decimal("1")),
    Unit("g", Dimension.MASS, Decimal("0.001")),
    Unit("mg", Dimension.MASS, Decimal("0.000001")),
    Unit("t", Dimension.MASS, Decimal("1000")),
    Unit("lb", Dimension.MASS, Decimal("0.45359237")),
    Unit("oz", Dimension.MASS, Decimal("0.028349523125")),
    Unit("L", Dimension.VOLUME, Decimal("1")),
    Unit("mL", Dimension.VOLUME, Decimal("0.001")),
    Unit("hL", Dimension.VOLUME, Decimal("100")),
    Unit("m3", Dimension.VOLUME, Decimal("1000")),
    Unit("gal", Dimension.VOLUME, Decimal("3.785411784")),
    Unit("pc", Dimension.COUNT, Decimal("1")),
    Unit("ea", Dimension.COUNT, Decimal("1")),
    Unit("dz", Dimension.COUNT, Decimal("12")),
    Unit("m", Dimension.LENGTH, Decimal("1")),
    Unit("mm", Dimension.LENGTH, Decimal("0.001")),
    Unit("cm", Dimension.LENGTH, Decimal("0.01")),
    Unit("km", Dimension.LENGTH, Decimal("1000")),
    Unit("in", Dimension.LENGTH, Decimal("0.0254")),
    Unit("ft", Dimension.LENGTH, Decimal("0.3048")),
)


def unit(code: str) -> Unit:
    """The unit with this code (case-sensitive: ``mL`` and ``ml`` are not both accepted)."""
    try:
        return UNITS[code]
    except KeyError:
        known = ", ".join(UNITS)
        raise UnitError(f"unknown unit {code!r} (known units: {known})") from None


def needs_density(from_uom: str, to_uom: str) -> bool:
    """True when converting between these units crosses mass and volume."""
    dims = {unit(from_uom).dimension, unit(to_uom).dimension}
    return dims == {Dimension.MASS, Dimension.VOLUME}


def conversion_factor(from_uom: str, to_uom: str, density: Decimal | None = None) -> Fraction:
    """Exact factor f such that ``amount_in_to_uom = amount_in_from_uom × f``.

    Mass and volume convert only through ``density`` in kg per L. Any other change of family is
    refused, as is a mass↔volume conversion without a density.
    """
    src, dst = unit(from_uom), unit(to_uom)
    factor = Fraction(src.factor) / Fraction(dst.factor)
    if src.dimension == dst.dimension:
        return factor
    if {src.dimension, dst.dimension} == {Dimension.MASS, Dimension.VOLUME}:
        if density is None:
            raise UnitError(f"converting {from_uom} to {to_uom} needs a density (kg/L)")
        if density <= 0:
            raise UnitError(f"density must be greater than zero (got {density})")
        # base units are kg and L, and density is kg per L
        d = Fraction(density)
        return factor * d if src.dimension is Dimension.VOLUME else factor / d
    raise UnitError(f"cannot convert {from_uom} ({src.dimension}) to {to_uom} ({dst.dimension})")


def convert(amount: Exact, from_uom: str, to_uom: str, density: Decimal | None = None) -> Fraction:
    """``amount`` in ``from_uom`` expressed exactly in ``to_uom``."""
    return Fraction(amount) * conversion_factor(from_uom, to_uom, density)


class Rounding(StrEnum):
    """How a quantity is rounded to a material's issue increment.

    ``up`` rounds away from zero, ``down`` toward zero, ``half_up`` to the nearest with ties away
    from zero: the meaning of Decimal's ROUND_UP, ROUND_DOWN and ROUND_HALF_UP.
    """

    UP = "up"
    HALF_UP = "half_up"
    DOWN = "down"


def round_to_increment(value: Exact, increment: Decimal, mode: Rounding) -> Decimal:
    """``value`` rounded to a whole multiple of ``increment``, exactly, as a Decimal.

    The result carries the increment's exponent, so 0.3 at an increment of 0.001 is ``0.300``.
    """
    if increment <= 0:
        raise ValueError(f"increment must be greater than zero (got {increment})")
    steps = Fraction(value) / Fraction(increment)
    sign = -1 if steps < 0 else 1
    magnitude = abs(steps)
    whole, rest = divmod(magnitude.numerator, magnitude.denominator)
    if rest and (
        mode is Rounding.UP or (mode is Rounding.HALF_UP and 2 * rest >= magnitude.denominator)
    ):
        whole += 1
    return _scaled(sign * whole * _coefficient(increment), _exponent(increment))


def _exponent(d: Decimal) -> int:
    exp = d.as_tuple().exponent
    assert isinstance(exp, int), "quantities are finite"
    return exp


def _coefficient(d: Decimal) -> int:
    """The integer c such that d = c × 10^exponent."""
    sign, digits, _ = d.as_tuple()
    value = int("".join(map(str, digits)))
    return -value if sign else value


def _scaled(coefficient: int, exponent: int) -> Decimal:
    """coefficient × 10^exponent, built from its digits so no context precision can round it."""
    return Decimal(f"{coefficient}E{exponent}")


def is_multiple(value: Exact, increment: Decimal) -> bool:
    """True when ``value`` is a whole number of ``increment`` steps."""
    return (Fraction(value) / Fraction(increment)).denominator == 1


#: Decimal places shown for a value that has no finite decimal expansion (e.g. 1/3).
DISPLAY_PLACES: Final = 12


def to_decimal(value: Exact) -> Decimal:
    """An exact value as a Decimal: exact when its decimal expansion ends within 12 places,
    else rounded (half up) to 12 places.

    Only for display and reporting of theoretical values (an unrounded 1/3 kg has no exact decimal
    form); postings are always exact multiples of an increment and never pass through here.
    """
    f = Fraction(value)
    den = f.denominator
    for p in (2, 5):
        while den % p == 0:
            den //= p
    if den == 1:
        # terminating: find the exponent that makes it an integer
        places = 0
        scaled = f
        while scaled.denominator != 1 and places < DISPLAY_PLACES:
            scaled *= 10
            places += 1
        if scaled.denominator == 1:
            return _scaled(scaled.numerator, -places)
    return round_to_increment(f, Decimal(1).scaleb(-DISPLAY_PLACES), Rounding.HALF_UP)


def fmt(value: Exact) -> str:
    """Decimal string for the wire: plain notation, never an exponent."""
    d = value if isinstance(value, Decimal) else to_decimal(value)
    return format(d, "f")
