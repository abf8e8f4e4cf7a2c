"""Units and rounding: exact factors, density-only mass↔volume, cumulative rounding."""

from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.domain.quantities import (
    UNITS,
    Dimension,
    Rounding,
    conversion_factor,
    convert,
    fmt,
    is_multiple,
    round_to_increment,
    to_decimal,
)
from edge_agent.errors import UnitError

D = Decimal

amounts = st.decimals(min_value=D("-1e9"), max_value=D("1e9"), places=6, allow_nan=False)
densities = st.decimals(min_value=D("0.001"), max_value=D("25"), places=4).filter(lambda d: d > 0)
unit_codes = st.sampled_from(sorted(UNITS))


def same_family_pairs() -> st.SearchStrategy[tuple[str, str]]:
    return unit_codes.flatmap(
        lambda u: st.tuples(
            st.just(u),
            st.sampled_from(
                sorted(c for c, x in UNITS.items() if x.dimension == UNITS[u].dimension)
            ),
        )
    )


def test_worked_example_grams_to_kilograms() -> None:
    assert convert(300, "g", "kg") == Fraction(3, 10)


def test_worked_example_litres_of_liquid_to_kilograms_through_density() -> None:
    assert convert(D("5"), "L", "kg", D("0.92")) == Fraction(46, 10)


def test_mass_to_volume_divides_by_density_exactly() -> None:
    assert convert(D("1"), "kg", "L", D("0.92")) == Fraction(100, 92)


def test_mass_volume_without_density_is_refused_naming_both_units() -> None:
    with pytest.raises(UnitError, match=r"converting L to kg needs a density"):
        conversion_factor("L", "kg")


@pytest.mark.parametrize(("a", "b"), [("pc", "kg"), ("m", "L"), ("kg", "m")])
def test_other_families_never_convert(a: str, b: str) -> None:
    with pytest.raises(UnitError, match="cannot convert"):
        conversion_factor(a, b, D("1"))


def test_unknown_unit_names_the_unit() -> None:
    with pytest.raises(UnitError, match="unknown unit 'KG'"):
        conversion_factor("KG", "kg")


def test_imperial_factors_are_exact_by_definition() -> None:
    assert convert(1, "lb", "g") == Fraction("453.59237")
    assert convert(16, "oz", "lb") == 1
    assert convert(12, "in", "ft") == 1


@given(same_family_pairs(), amounts)
def test_conversion_round_trips_exactly_within_a_family(pair: tuple[str, str], x: Decimal) -> None:
    a, b = pair
    assert convert(convert(x, a, b), b, a) == x


@given(
    st.sampled_from(["kg", "g", "t", "lb"]),
    st.sampled_from(["L", "mL", "m3", "gal"]),
    amounts,
    densities,
)
def test_mass_volume_round_trips_exactly_through_density(
    mass: str, volume: str, x: Decimal, density: Decimal
) -> None:
    assert convert(convert(x, mass, volume, density), volume, mass, density) == x
    assert convert(convert(x, volume, mass, density), mass, volume, density) == x


@given(amounts)
def test_to_a_finer_decimal_unit_and_back_stays_an_exact_decimal(x: Decimal) -> None:
    grams = convert(x, "kg", "g")
    assert to_decimal(grams) == x * 1000
    assert to_decimal(convert(to_decimal(grams), "g", "kg")) == x


@pytest.mark.parametrize(
    ("value", "increment", "mode", "expected"),
    [
        (Fraction(1, 2), "1", Rounding.UP, "1"),
        (Fraction(1, 2), "1", Rounding.DOWN, "0"),
        (Fraction(1, 2), "1", Rounding.HALF_UP, "1"),
        (Fraction(3, 10), "0.001", Rounding.HALF_UP, "0.300"),
        (Fraction(2, 3), "0.01", Rounding.HALF_UP, "0.67"),
        (Fraction(2, 3), "0.01", Rounding.DOWN, "0.66"),
        (Fraction(-1, 2), "1", Rounding.HALF_UP, "-1"),
        (Fraction(-1, 3), "1", Rounding.UP, "-1"),
        (Fraction(7), "0.5", Rounding.UP, "7.0"),
        (Fraction(26), "1E+1", Rounding.HALF_UP, "3E+1"),
    ],
)
def test_round_to_increment(value: Fraction, increment: str, mode: Rounding, expected: str) -> None:
    result = round_to_increment(value, D(increment), mode)
    assert result == D(expected)
    assert str(result) == expected  # carries the increment's exponent: 0.300, not 0.3


increments = st.sampled_from(["1", "0.5", "0.1", "0.01", "0.001", "0.25", "5", "0.0001"]).map(D)
exact_values = st.fractions(min_value=-(10**6), max_value=10**6, max_denominator=10**6)


@given(exact_values, increments, st.sampled_from(list(Rounding)))
def test_rounding_lands_on_the_increment_within_one_step_in_the_mode_direction(
    x: Fraction, inc: Decimal, mode: Rounding
) -> None:
    r = round_to_increment(x, inc, mode)
    assert is_multiple(r, inc)
    error = Fraction(r) - x
    assert abs(error) < Fraction(inc)
    if mode is Rounding.UP:
        assert abs(Fraction(r)) >= abs(x)
    elif mode is Rounding.DOWN:
        assert abs(Fraction(r)) <= abs(x)
    else:
        assert abs(error) <= Fraction(inc) / 2


def test_rounding_does_not_lose_digits_beyond_the_decimal_context() -> None:
    # 30 significant digits: Decimal's default 28-digit context would round this
    x = Fraction("123456789012345678.123456789012")
    assert round_to_increment(x, D("0.000000000001"), Rounding.DOWN) == D(
        "123456789012345678.123456789012"
    )


def test_display_of_a_value_without_a_finite_decimal_expansion() -> None:
    assert fmt(Fraction(1, 3)) == "0.333333333333"
    assert fmt(Fraction(46, 10)) == "4.6"
    assert fmt(D("1E+1")) == "10"
    assert fmt(D("0E-3")) == "0.000"


def test_every_family_has_its_base_unit() -> None:
    bases = {u.dimension: u.code for u in UNITS.values() if u.factor == 1 and u.code != "ea"}
    assert bases == {
        Dimension.MASS: "kg",
        Dimension.VOLUME: "L",
        Dimension.COUNT: "pc",
        Dimension.LENGTH: "m",
    }


def test_to_decimal_keeps_at_most_twelve_places() -> None:
    """A terminating value with a longer expansion (an interpolated totalizer: 1/2**20 L) is
    rounded for display like a repeating one, so it fits the wire's 12 places."""
    assert to_decimal(Fraction(1, 8)) == Decimal("0.125")
    assert to_decimal(Fraction(1, 2**20)) == Decimal("0.000000953674")
    assert to_decimal(Fraction(1, 3)) == Decimal("0.333333333333")
