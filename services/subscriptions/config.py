"""Settings of the subscriptions service (env prefix SUBSCRIPTIONS_, Stripe settings from the global STRIPE_*).

The Stripe key rules are kit.stripe's: a live key, or anything that is not a test-mode secret key,
stops the process at start.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import SettingsConfigDict

from kit.settings import ServiceSettings
from kit.stripe import check_stripe_key, is_test_mode_key

UpgradeBehavior = Literal["always_invoice", "create_prorations"]
DowngradeBehavior = Literal["create_prorations", "at_period_end"]
TrialEndBehavior = Literal["cancel", "pause", "create_invoice"]


class SubscriptionsSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SUBSCRIPTIONS_", extra="ignore", populate_by_name=True)

    service_name: str = "subscriptions"
    port: int = 8003
    database_url: str = "postgresql+asyncpg://postgres@127.0.0.1:55432/subscriptions"
    consumer_group: str = "subscriptions"
    # The invoice service: names and emails of clients (for the Stripe customer and the emails).
    invoice_url: str = "http://127.0.0.1:8001"
    # Where browsers come back from Checkout and the billing portal: the gateway's client portal.
    public_url: str = Field(
        default="http://127.0.0.1:8000",
        validation_alias=AliasChoices("SUBSCRIPTIONS_PUBLIC_URL", "BILLING_GATEWAY_URL"),
    )
    portal_url: str = ""  # default: public_url + /portal

    # Stripe (global names, shared by every service).
    stripe_secret_key: str = Field(
        default="sk_test_local",
        validation_alias=AliasChoices("STRIPE_SECRET_KEY", "SUBSCRIPTIONS_STRIPE_SECRET_KEY"),
    )
    stripe_api_base: str | None = Field(
        default=None, validation_alias=AliasChoices("STRIPE_API_BASE", "SUBSCRIPTIONS_STRIPE_API_BASE")
    )
    stripe_timeout: float = 20.0
    stripe_max_network_retries: int = 2

    # Plan changes (Stripe's proration_behavior). An interval change always restarts the cycle now.
    upgrade_behavior: UpgradeBehavior = "always_invoice"
    downgrade_behavior: DowngradeBehavior = "create_prorations"
    # A trial that ends without a payment method (Checkout collects one unless told otherwise).
    trial_end_behavior: TrialEndBehavior = "cancel"
    # Customers are created on the platform's Stripe test clock (test mode only), so that
    # POST /api/test-clock/advance moves their subscriptions. Off: real time for everyone.
    test_clock_enabled: bool = True
    checkout_expires_minutes: int = 24 * 60

    @model_validator(mode="after")
    def _check(self) -> SubscriptionsSettings:
        check_stripe_key(self.stripe_secret_key)
        if not self.portal_url:
            self.portal_url = f"{self.public_url.rstrip('/')}/portal"
        return self

    @property
    def test_mode(self) -> bool:
        return is_test_mode_key(self.stripe_secret_key)

    @property
    def uses_test_clock(self) -> bool:
        return self.test_mode and self.test_clock_enabled
