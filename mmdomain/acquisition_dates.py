"""Multi-temporal samples (several acquisitions of one place): media put in date order, each marker followed by its date."""
from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any


def _parse(text: Any, index: int) -> datetime:
    if not isinstance(text, str):
        raise ValueError(f"dates[{index}] is {text!r}, not a date string; write ISO dates, e.g. \"2021-05-01\"")
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"dates[{index}] {text!r} is not an ISO date; write e.g. \"2021-05-01\" or \"2021-05-01T10:30:00Z\"") from None
    # Dates with and without a time zone compare as UTC (a date alone is taken as UTC midnight).
    return when.astimezone(timezone.utc).replace(tzinfo=None) if when.tzinfo else when


def order_by_dates(media: list[Any], dates: Any) -> tuple[list[Any], list[str]]:
    """``media`` and their ``dates`` sorted by date (equal dates keep their given order); ValueError on bad dates."""
    if not isinstance(dates, list):
        raise ValueError(f"'dates' must be a list with one ISO date per media item, got {dates!r}")
    if len(dates) != len(media):
        raise ValueError(f"{len(dates)} dates for {len(media)} media items; give one date per media item, in the same order")
    order = sorted(range(len(media)), key=lambda i: _parse(dates[i], i))
    return [media[i] for i in order], [dates[i].strip() for i in order]


def mark_with_dates(turns: list[dict[str, Any]], marker: re.Pattern, dates: list[str]) -> None:
    """Write `` (date)`` after each marker, in order (the media are already in date order)."""
    pending = iter(dates)
    for turn in turns:
        turn["content"] = marker.sub(lambda m: f"{m.group(0)} ({next(pending)})", turn["content"])
