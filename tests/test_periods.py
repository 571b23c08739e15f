"""Calendar-month periods in the billing time zone, at their edges."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metering.periods import PeriodError, parse_period, period_of, zone


def test_utc_evening_of_the_last_day_is_already_next_month_in_shanghai() -> None:
    assert period_of(datetime(2026, 11, 30, 15, 59, 59, 999999, tzinfo=UTC)).name == "2026-11"
    assert period_of(datetime(2026, 11, 30, 16, 0, 0, tzinfo=UTC)).name == "2026-12"


def test_year_end() -> None:
    assert period_of(datetime(2026, 12, 31, 16, 0, tzinfo=UTC)).name == "2027-01"
    december = parse_period("2026-12")
    assert december.start == datetime(2026, 11, 30, 16, 0, tzinfo=UTC)
    assert december.end == datetime(2026, 12, 31, 16, 0, tzinfo=UTC)
    assert december.next().name == "2027-01"
    assert parse_period("2027-01").previous().name == "2026-12"


def test_february_of_a_leap_year_has_29_days() -> None:
    february = parse_period("2028-02")
    assert february.end - february.start == timedelta(days=29)
    assert parse_period("2027-02").end - parse_period("2027-02").start == timedelta(days=28)


def test_other_zone() -> None:
    utc = zone("UTC")
    assert period_of(datetime(2026, 11, 30, 16, 0, tzinfo=UTC), utc).name == "2026-11"


def test_seconds_left_is_the_retry_after_of_an_exhausted_allowance() -> None:
    november = parse_period("2026-11")
    assert november.seconds_left(datetime(2026, 11, 30, 15, 59, 0, tzinfo=UTC)) == 60
    assert november.seconds_left(datetime(2026, 11, 30, 15, 59, 59, 500000, tzinfo=UTC)) == 1


@pytest.mark.parametrize("bad", ["2026-13", "2026-00", "26-11", "2026/11", "", "2026-1"])
def test_bad_names(bad: str) -> None:
    with pytest.raises(PeriodError):
        parse_period(bad)


def test_naive_instants_and_unknown_zones_are_refused() -> None:
    with pytest.raises(PeriodError):
        period_of(datetime(2026, 11, 30))  # noqa: DTZ001 - the point of the test
    with pytest.raises(PeriodError):
        zone("Mars/Olympus_Mons")


# hypothesis takes naive bounds and attaches the zone itself
LOW, HIGH = datetime(2000, 1, 1), datetime(2100, 1, 1)  # noqa: DTZ001


@given(st.datetimes(min_value=LOW, max_value=HIGH, timezones=st.just(UTC)))
def test_every_instant_is_in_exactly_its_period(instant: datetime) -> None:
    period = period_of(instant)
    assert period.contains(instant)
    assert not period.next().contains(instant)
    assert not period.previous().contains(instant)
    assert period.previous().end == period.start
