"""Settings: NOTIFICATIONS_* for the service, plus the deployment-wide SMTP_* / MAIL_FROM variables."""

from __future__ import annotations

from typing import Annotated

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from kit.settings import ServiceSettings


def _alias(name: str) -> AliasChoices:
    """The global variable (SMTP_HOST) or the service-scoped one (NOTIFICATIONS_SMTP_HOST)."""
    return AliasChoices(name, f"NOTIFICATIONS_{name}", name.lower())


class NotificationsSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="NOTIFICATIONS_", extra="ignore", populate_by_name=True)

    service_name: str = "notifications"
    port: int = 8004
    database_url: str = "postgresql+asyncpg://postgres@127.0.0.1:55432/notifications"

    # Kafka consumer group shared by all replicas (tests running side by side use their own).
    consumer_group: str = "notifications"

    # The invoice service: PDFs, and the OVERDUE status the reminder scan asks for before any overdue notice.
    invoice_url: str = "http://127.0.0.1:8001"
    invoice_timeout: float = 30.0  # seconds for one mark-overdue call
    # Pixel and tracked links: {public_url}/t/... (the gateway). Falls back to BILLING_GATEWAY_URL.
    public_url: str = Field(
        default="http://127.0.0.1:8000",
        validation_alias=AliasChoices("NOTIFICATIONS_PUBLIC_URL", "BILLING_GATEWAY_URL", "public_url"),
    )
    # "View and pay" goes (through the tracked link) to {portal_url}/invoices/{id}; default {public_url}/portal.
    portal_url: str | None = None

    # Reminder schedule (R1-R4).
    reminder_days_before: Annotated[list[int], NoDecode] = Field(default_factory=lambda: [7, 1])
    overdue_repeat_days: int = Field(default=7, ge=1)
    overdue_max_notices: int = Field(default=4, ge=0)
    scan_interval: float = 300.0  # seconds between scheduled scans; 0 disables the schedule
    reminder_timezone: str = "UTC"  # "today" for the scheduled scan
    reminder_kinds_with_pdf: Annotated[list[str], NoDecode] = Field(default_factory=list)  # e.g. "reminder_overdue"

    # Delivery.
    delivery_poll_interval: float = 1.0
    delivery_batch_size: int = 50
    delivery_concurrency: int = 4  # SMTP connections per replica
    max_attempts: int = 10  # SMTP attempts before a message is marked failed
    retry_base_delay: float = 5.0  # backoff (kit.worker.backoff_delay): base * 2**(attempt-1), capped
    retry_max_delay: float = 600.0
    lease_seconds: float = 120.0  # a claimed message not finished by then is retried (crash)
    pdf_max_attempts: int = 6  # PDF fetches before sending without the attachment
    pdf_retry_base_delay: float = 10.0
    pdf_timeout: float = 15.0
    recipient_wait_attempts: int = 10  # tries to find the invoice copy for a payment email
    # How long an "update your card" that past_due asked for waits for Stripe's failure event, which
    # travels on another topic and alone knows the amount and the retry date. Stripe's event, when it
    # comes, completes the waiting message and sends it at once.
    card_update_wait: float = Field(default=60.0, ge=0, le=86_400)

    # SMTP (deployment-wide variables; NOTIFICATIONS_SMTP_* also accepted).
    smtp_host: str = Field(default="127.0.0.1", validation_alias=_alias("SMTP_HOST"))
    smtp_port: int = Field(default=1025, validation_alias=_alias("SMTP_PORT"))
    smtp_username: str | None = Field(default=None, validation_alias=_alias("SMTP_USERNAME"))
    smtp_password: str | None = Field(default=None, validation_alias=_alias("SMTP_PASSWORD"))
    smtp_starttls: bool = Field(default=False, validation_alias=_alias("SMTP_STARTTLS"))
    smtp_tls: bool = Field(default=False, validation_alias=_alias("SMTP_TLS"))  # implicit TLS (465)
    smtp_timeout: float = Field(default=30.0, validation_alias=_alias("SMTP_TIMEOUT"))
    smtp_validate_certs: bool = Field(default=True, validation_alias=_alias("SMTP_VALIDATE_CERTS"))
    mail_from: str = Field(default="Billing <billing@example.com>", validation_alias=_alias("MAIL_FROM"))
    company_name: str = "Billing"

    @field_validator("reminder_days_before", mode="before")
    @classmethod
    def _parse_days(cls, value: object) -> object:
        if isinstance(value, int):
            value = [value]
        if isinstance(value, str):
            text = value.strip().strip("[]")
            value = [int(part) for part in text.replace(";", ",").split(",") if part.strip()]
        if isinstance(value, list | tuple):
            days = sorted({int(v) for v in value}, reverse=True)
            if any(d <= 0 for d in days):
                raise ValueError("reminder days before due must be positive")
            return days
        return value

    @field_validator("reminder_kinds_with_pdf", mode="before")
    @classmethod
    def _parse_kinds(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip().strip("[]")
            return [part.strip().strip('"') for part in text.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _derive_portal(self) -> NotificationsSettings:
        self.public_url = self.public_url.rstrip("/")
        if not self.portal_url:
            self.portal_url = f"{self.public_url}/portal"
        self.portal_url = self.portal_url.rstrip("/")
        return self
