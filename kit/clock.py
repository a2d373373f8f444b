"""The one clock of the platform: timezone-aware UTC, so a naive datetime never slips into a comparison."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)


def from_unix(value: int | None) -> datetime | None:
    """A Unix timestamp (as Stripe sends them) as an aware UTC datetime; None and 0 stay None."""
    return datetime.fromtimestamp(int(value), tz=UTC) if value else None
