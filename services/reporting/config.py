"""Settings of the reporting service (env prefix `REPORTING_`)."""

from __future__ import annotations

from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import field_validator
from pydantic_settings import SettingsConfigDict

from contracts import topics
from kit.settings import ServiceSettings


class ReportingSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="REPORTING_", extra="ignore")

    service_name: str = "reporting"
    port: int = 8005
    database_url: str = "postgresql+asyncpg://postgres@127.0.0.1:55432/reporting"
    # IANA name of the zone whose calendar months and days the reports use. Read models are built
    # for one zone (kept in the schema): a new value takes effect with `python -m services.reporting rebuild`.
    timezone: str = "UTC"
    # This replica consumes events into the read models (off for HTTP-only replicas).
    feed_enabled: bool = True
    # Events applied per database transaction, live and during a rebuild.
    feed_batch_size: int = 2000
    rebuild_batch_size: int = 5000
    # Identical report requests within this many seconds share one computation (0: off); see cache.py.
    report_cache_seconds: float = 1.0
    # The topics read. Only a test (or a staging copy of the platform's log) points them elsewhere.
    invoice_topic: str = topics.INVOICE
    payment_topic: str = topics.PAYMENT
    subscription_topic: str = topics.SUBSCRIPTION

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (an IANA name such as UTC or Europe/Berlin)") from None
        return value

    @property
    def topics(self) -> tuple[str, str, str]:
        return (self.invoice_topic, self.payment_topic, self.subscription_topic)
