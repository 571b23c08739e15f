"""Billing periods: calendar months in the billing time zone (default
``Asia/Shanghai``), half-open ``[start, end)``, carried as UTC instants.

A period is named by its month, ``YYYY-MM``. Counters are keyed by that name,
so nothing resets on a timer: a call at 2026-11-30T16:00:00Z is already on
1 December in Shanghai and lands in ``2026-12``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DEFAULT_ZONE = "Asia/Shanghai"
#: ASCII digits only (``\d`` would take any script's digits, e.g. fullwidth).
_NAME = re.compile(r"([0-9]{4})-(0[1-9]|1[0-2])")


class PeriodError(ValueError):
    """Not a period name (``YYYY-MM``) or not a known time zone."""


def zone(name: str = DEFAULT_ZONE) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise PeriodError(f"unknown time zone {name!r}") from exc


@dataclass(frozen=True, slots=True)
class Period:
    year: int
    month: int
    tz: ZoneInfo

    @property
    def name(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"

    @property
    def start(self) -> datetime:
        """First instant of the period, in UTC."""
        return _month_start(self.year, self.month, self.tz)

    @property
    def end(self) -> datetime:
        """First instant of the next period, in UTC (exclusive end)."""
        following = self.next()
        return _month_start(following.year, following.month, self.tz)

    def next(self) -> Period:
        year, month = (self.year + 1, 1) if self.month == 12 else (self.year, self.month + 1)
        return Period(year, month, self.tz)

    def previous(self) -> Period:
        year, month = (self.year - 1, 12) if self.month == 1 else (self.year, self.month - 1)
        return Period(year, month, self.tz)

    def contains(self, instant: datetime) -> bool:
        return self.start <= instant < self.end

    def seconds_left(self, instant: datetime) -> int:
        """Whole seconds from ``instant`` to the next period, at least 1."""
        return max(1, int((self.end - instant).total_seconds() + 0.999999))


@functools.lru_cache(maxsize=256)
def _month_start(year: int, month: int, tz: ZoneInfo) -> datetime:
    # Every data call asks for its period's bounds: worth remembering.
    return datetime(year, month, 1, tzinfo=tz).astimezone(UTC)


def period_of(instant: datetime, tz: ZoneInfo | None = None) -> Period:
    """The period holding ``instant`` (timezone-aware)."""
    if instant.tzinfo is None:
        raise PeriodError("period_of needs a timezone-aware instant")
    tz = tz or zone()
    local = instant.astimezone(tz)
    return Period(local.year, local.month, tz)


def parse_period(name: str, tz: ZoneInfo | None = None) -> Period:
    match = _NAME.fullmatch(name.strip())
    if not match:
        raise PeriodError(f"period must be YYYY-MM, not {name!r}")
    period = Period(int(match.group(1)), int(match.group(2)), tz or zone())
    try:
        # Both edges must be instants Python can hold (not year 0 or 10000).
        period.start, period.end  # noqa: B018
    except (ValueError, OverflowError) as exc:
        raise PeriodError(f"period {name!r} is out of range") from exc
    return period
