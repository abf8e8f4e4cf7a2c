"""wire_time is formatted by hand for speed: it must equal the isoformat it replaced."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from edge_agent.messages import wire_time


def reference(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@given(
    st.datetimes(
        min_value=datetime(1900, 1, 2),  # noqa: DTZ001 - naive bounds; the zone is drawn below
        max_value=datetime(9999, 12, 30),  # noqa: DTZ001
    ),
    st.one_of(
        st.just(UTC),
        st.builds(lambda m: timezone(timedelta(minutes=m)), st.integers(-14 * 60, 14 * 60)),
    ),
)
def test_wire_time_is_utc_iso_8601_with_milliseconds(moment: datetime, tz: timezone) -> None:
    aware = moment.replace(tzinfo=tz)
    assert wire_time(aware) == reference(aware)


def test_wire_time_examples() -> None:
    assert wire_time(datetime(2026, 11, 29, 6, 0, 0, 999_999, tzinfo=UTC)) == (
        "2026-11-29T06:00:00.999Z"
    )
    cet = timezone(timedelta(hours=1))
    assert wire_time(datetime(2026, 1, 1, 0, 30, tzinfo=cet)) == "2025-12-31T23:30:00.000Z"
