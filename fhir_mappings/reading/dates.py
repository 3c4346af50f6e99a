"""FHIR dates, dateTimes, instants and Periods as bounded calendar spans.

A FHIR date may be partial: "2008" is some day of 2008, "2008-05" some day of May 2008. Reading either as
the 1st of January (or of May) turns missing data into a value. Here a date is a `DateSpan` — the earliest
and latest calendar day it can stand for — and every comparison built on it is taken only when it holds at
both ends (`DateSpan.age_days`, `Bounds`).
"""

from __future__ import annotations

import calendar
import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any

from fhir_mappings.model import Bounds

_DATE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?(?:T.*)?$")


@dataclass(frozen=True, order=True)
class DateSpan:
    """The calendar days a FHIR date can stand for: `low` == `high` for a full date."""

    low: date
    high: date
    text: str = ""

    @property
    def exact(self) -> bool:
        return self.low == self.high

    def age_days(self, today: date) -> Bounds:
        """How many days before `today` this was (negative in the future), as bounds."""
        return Bounds((today - self.high).days, (today - self.low).days)

    def __str__(self) -> str:
        return self.text or (self.low.isoformat() if self.exact else f"{self.low.isoformat()}…{self.high.isoformat()}")


def parse_span(value: Any) -> DateSpan | None:
    """The span of a FHIR date/dateTime/instant string; None when it is not one (or not a real date)."""
    if not isinstance(value, str):
        return None
    return _parse_text(value)


@functools.lru_cache(maxsize=8192)
def _parse_text(value: str) -> DateSpan | None:
    """Memoised by the exact text: DateSpan is immutable, and a record (and every call) repeats its dates."""
    m = _DATE.match(value.strip())
    if not m:
        return None
    year = int(m.group(1))
    try:
        if m.group(3):
            day = date(year, int(m.group(2)), int(m.group(3)))
            return DateSpan(day, day, value)
        if m.group(2):
            month = int(m.group(2))
            last = calendar.monthrange(year, month)[1]
            return DateSpan(date(year, month, 1), date(year, month, last), value)
        return DateSpan(date(year, 1, 1), date(year, 12, 31), value)
    except ValueError:
        return None


def first_span(resource: Mapping[str, Any], paths: Iterable[str]) -> tuple[DateSpan | None, str | None]:
    """The first dotted path (e.g. "effectivePeriod.start") holding a date, with the path it came from."""
    for path in paths:
        node: Any = resource
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        span = parse_span(node)
        if span is not None:
            return span, path
    return None, None


def span_union(spans: Iterable[DateSpan | None]) -> DateSpan | None:
    """The earliest low and latest high of several spans (None ignored)."""
    found = [s for s in spans if s is not None]
    if not found:
        return None
    return DateSpan(min(s.low for s in found), max(s.high for s in found))


def days_between(start: DateSpan, end: DateSpan) -> Bounds:
    """Days from `start` to `end` (never below 0), as bounds over both spans."""
    return Bounds(max(0, (end.low - start.high).days), max(0, (end.high - start.low).days))
