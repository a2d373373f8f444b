"""Days and months in the reporting time zone, and the date ranges a report accepts.

An instant belongs to the calendar day it falls on in the zone; "as of" a day means up to the end of
that day there. Dates outside [MIN_DATE, MAX_DATE] are refused before any arithmetic (0001-01-01
minus an offset, or 9999-12-31 plus a day, would overflow).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from kit.clock import utcnow
from kit.errors import InvalidInput

MIN_DATE = date(1970, 1, 1)
MAX_DATE = date(2100, 12, 31)
MAX_MONTHS = 36


@dataclass(frozen=True)
class Zone:
    name: str

    @property
    def info(self) -> ZoneInfo:
        return ZoneInfo(self.name)

    def today(self) -> date:
        return utcnow().astimezone(self.info).date()

    def day_of(self, instant: datetime) -> date:
        return instant.astimezone(self.info).date()

    def start_of(self, day: date) -> datetime:
        """The first instant of `day` in the zone, in UTC."""
        return datetime.combine(day, time(), tzinfo=self.info).astimezone(UTC)

    def end_of(self, day: date) -> datetime:
        """The first instant after `day` in the zone, in UTC."""
        return self.start_of(day + timedelta(days=1))


def month_start(day: date) -> date:
    return day.replace(day=1)


def month_end(day: date) -> date:
    return next_month(day) - timedelta(days=1)


def next_month(day: date) -> date:
    return date(day.year + day.month // 12, day.month % 12 + 1, 1)


def months(start: date, end: date) -> list[date]:
    """First days of the months from the month of `start` to the month of `end`, both included."""
    out, current = [], month_start(start)
    while current <= end:
        out.append(current)
        current = next_month(current)
    return out


def month_label(day: date) -> str:
    return f"{day.year:04d}-{day.month:02d}"


def check_date(name: str, value: date) -> date:
    if not MIN_DATE <= value <= MAX_DATE:
        raise InvalidInput(f"{name} must be between {MIN_DATE} and {MAX_DATE}.",
                           details=[{"field": name, "message": "out of range"}])
    return value


@dataclass(frozen=True)
class Period:
    """An inclusive range of days."""

    start: date
    end: date

    @property
    def days(self) -> int:
        return (self.end - self.start).days + 1

    def month_starts(self) -> list[date]:
        return months(self.start, self.end)


def period(start: date | None, end: date | None, *, default_start: date, default_end: date,
           whole_months: bool = False) -> Period:
    """The `from`/`to` of a report, checked: in range, in order, at most MAX_MONTHS months."""
    first = check_date("from", start) if start is not None else default_start
    last = check_date("to", end) if end is not None else default_end
    if first > last:
        raise InvalidInput(f"from ({first}) is after to ({last}).",
                           details=[{"field": "from", "message": "after to"}])
    if whole_months:
        first, last = month_start(first), month_end(last)
    if len(months(first, last)) > MAX_MONTHS:
        raise InvalidInput(f"The range {first} to {last} is longer than {MAX_MONTHS} months.",
                           details=[{"field": "to", "message": f"more than {MAX_MONTHS} months after from"}])
    return Period(first, last)


def as_of_day(value: date | None, today: date) -> date:
    """An `asOf` date: today by default, never in the future (figures for tomorrow do not exist yet)."""
    if value is None:
        return today
    check_date("asOf", value)
    if value > today:
        raise InvalidInput(f"asOf ({value}) is in the future (today is {today}).",
                           details=[{"field": "asOf", "message": "in the future"}])
    return value
