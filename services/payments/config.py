"""Settings of the payments service (env prefix PAYMENTS_, Stripe settings from the global STRIPE_*).

The Stripe key rules are kit.stripe's: a live key, or anything that is not a test-mode secret key,
stops the process at start.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from kit.settings import ServiceSettings
from kit.stripe import check_stripe_key

LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}

STRIPE_PAYMENT_METHODS = ("card", "sepa_debit", "us_bank_account", "bacs_debit", "link", "paypal", "ideal",
                          "bancontact", "sofort", "giropay", "eps", "p24", "klarna", "affirm", "acss_debit")


def is_loopback_url(url: str | None) -> bool:
    if not url:
        return False
    host = (urlsplit(url).hostname or "").lower()
    if host in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class PaymentsSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="PAYMENTS_", extra="ignore", populate_by_name=True)

    service_name: str = "payments"
    port: int = 8002
    database_url: str = "postgresql+asyncpg://postgres@127.0.0.1:55432/payments"
    # Kafka consumer group of the invoice.* consumer (every replica shares it).
    consumer_group: str = "payments"
    # The invoice service, for reading an invoice this service has not yet seen in an event.
    invoice_url: str = "http://127.0.0.1:8001"
    # Where the outside world reaches this service: the gateway (webhook URL, portal pages).
    public_url: str = Field(
        default="http://127.0.0.1:8000", validation_alias=AliasChoices("PAYMENTS_PUBLIC_URL", "BILLING_GATEWAY_URL")
    )
    # The client portal (Checkout success and cancel pages); default: public_url + /portal.
    portal_url: str = ""

    # Stripe (global names, shared by every service).
    stripe_secret_key: str = Field(
        default="sk_test_local", validation_alias=AliasChoices("STRIPE_SECRET_KEY", "PAYMENTS_STRIPE_SECRET_KEY")
    )
    stripe_api_base: str | None = Field(
        default=None, validation_alias=AliasChoices("STRIPE_API_BASE", "PAYMENTS_STRIPE_API_BASE")
    )
    stripe_webhook_secret: str = Field(
        default="whsec_local",
        validation_alias=AliasChoices("STRIPE_WEBHOOK_SECRET", "PAYMENTS_STRIPE_WEBHOOK_SECRET"),
    )
    webhook_tolerance: int = 300
    webhook_max_body: int = 512 * 1024
    webhook_intake_pool_size: int = 10
    # Payment methods offered in Checkout (payment_method_types); empty = Stripe's dashboard settings.
    payment_methods: Annotated[list[str], NoDecode] = ["card"]
    checkout_expires_minutes: int = 24 * 60
    stripe_timeout: float = 20.0
    stripe_max_network_retries: int = 2

    # Webhook worker: processes stored Stripe events after the 200 went out.
    webhook_worker_enabled: bool = True
    # "process": the worker runs in a child process of the service (kit.child), so the intake's acks and
    # the worker's processing each have a GIL; "inline": in the service's own event loop.
    webhook_worker_mode: Literal["process", "inline"] = "process"
    webhook_worker_start_delay: float = 0.0
    webhook_worker_poll_interval: float = 1.0
    webhook_worker_batch: int = 50
    # Worker tasks per replica (they claim different rows: FOR UPDATE SKIP LOCKED).
    webhook_worker_concurrency: int = 2
    # Then the event is parked as failed (backoff doubles from 2 s up to an hour: about 10 hours).
    webhook_max_attempts: int = 20
    # Fault injection for the crash test only: sleep this long inside the processing transaction,
    # after the payment and its outbox row are written but before commit.
    webhook_debug_stall_seconds: float = 0.0

    @field_validator("payment_methods", mode="before")
    @classmethod
    def _split_methods(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("payment_methods")
    @classmethod
    def _known_methods(cls, value: list[str]) -> list[str]:
        unknown = [m for m in value if m not in STRIPE_PAYMENT_METHODS]
        if unknown:
            raise ValueError(f"unknown Stripe payment method(s): {', '.join(unknown)}")
        return value

    @model_validator(mode="after")
    def _refuse_live_keys(self) -> PaymentsSettings:
        check_stripe_key(self.stripe_secret_key)
        if not self.portal_url:
            self.portal_url = f"{self.public_url.rstrip('/')}/portal"
        return self

    @property
    def local_stripe(self) -> bool:
        """The SDK talks to something on this machine (the Stripe stand-in, stripe-mock), not to Stripe."""
        return is_loopback_url(self.stripe_api_base)
