"""Request and response bodies of the subscriptions API (camelCase JSON, amounts in minor units).

Input is strict: unknown fields are refused (422), text must not contain NUL or other control
characters (PostgreSQL text cannot hold NUL; the rest has no business in a plan name).
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Annotated, Literal

from babel.numbers import list_currencies
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator
from pydantic.alias_generators import to_camel

from contracts.subscription import BillingInterval, CollectionMethod, SubscriptionStatus
from kit.web import UtcDateTime

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_CURRENCIES = frozenset(list_currencies())
MAX_AMOUNT = 99_999_999  # Stripe's limit for a unit amount (8 digits)


class ApiModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, from_attributes=True)


def _no_control(value: object) -> object:
    if isinstance(value, str) and _CONTROL.search(value):
        raise ValueError("text must not contain NUL or control characters")
    if isinstance(value, list):
        for item in value:
            _no_control(item)
    return value


class InputModel(ApiModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid",
                              str_strip_whitespace=True)

    _text = field_validator("*", mode="before")(_no_control)


Name = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Description = Annotated[str, StringConstraints(max_length=2000)]
Feature = Annotated[str, StringConstraints(min_length=1, max_length=200)]
LookupKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.\-]{1,200}$")]
Amount = Annotated[int, Field(ge=0, le=MAX_AMOUNT, strict=True)]
Quantity = Annotated[int, Field(ge=1, le=10_000, strict=True)]
TrialDays = Annotated[int, Field(ge=0, le=730, strict=True)]
CurrencyCode = Annotated[str, StringConstraints(pattern=r"^[A-Za-z]{3}$", to_upper=True)]
Url = Annotated[str, StringConstraints(pattern=r"^https?://[^\s]+$", max_length=2000)]


class PriceIn(InputModel):
    """A price of a plan. In a PUT, an entry with `id` keeps that price (its amount, currency and
    interval cannot change: give a new entry without `id` for a new amount); the others are new."""

    id: uuid.UUID | None = None
    currency: CurrencyCode
    amount: Amount
    interval: BillingInterval
    interval_count: Annotated[int, Field(ge=1, le=36, strict=True)] = 1
    trial_days: TrialDays = 0
    lookup_key: LookupKey | None = None

    @field_validator("currency")
    @classmethod
    def _known_currency(cls, value: str) -> str:
        if value not in _CURRENCIES:
            raise ValueError(f"{value} is not an ISO 4217 currency code")
        return value

    @model_validator(mode="after")
    def _at_most_three_years(self) -> PriceIn:
        months = self.interval_count * (12 if self.interval == BillingInterval.YEAR else 1)
        if months > 36:
            raise ValueError("a billing interval can be at most 3 years (Stripe's limit)")
        return self


class PlanCreate(InputModel):
    name: Name
    description: Description | None = None
    features: Annotated[list[Feature], Field(max_length=50)] = []
    prices: Annotated[list[PriceIn], Field(max_length=20)] = []

    @model_validator(mode="after")
    def _distinct_prices(self) -> PlanCreate:
        seen: set[tuple[str, str, int]] = set()
        for price in self.prices:
            key = (price.currency, price.interval.value, price.interval_count)
            if key in seen:
                raise ValueError(f"two prices for {price.currency} every {price.interval_count} {price.interval}: "
                                 "a plan has one price per currency and interval")
            seen.add(key)
        return self


class PlanUpdate(PlanCreate):
    """Replaces the plan: the same body as the POST; prices as described on PriceIn; an active price
    left out is archived."""


class PriceOut(ApiModel):
    id: uuid.UUID
    plan_id: uuid.UUID
    currency: str
    amount: int
    interval: BillingInterval
    interval_count: int
    trial_days: int
    active: bool
    lookup_key: str
    stripe_price_id: str | None


class PlanOut(ApiModel):
    id: uuid.UUID
    name: str
    description: str | None
    features: list[str]
    active: bool
    prices: list[PriceOut]
    stripe_product_id: str | None
    created_at: datetime
    updated_at: datetime


class CheckoutRequest(InputModel):
    price_id: uuid.UUID
    quantity: Quantity = 1
    trial_days: TrialDays | None = None
    client_id: uuid.UUID | None = None  # admins only: whom the subscription is for


class CheckoutOut(ApiModel):
    url: str
    session_id: str


class SubscriptionCreate(InputModel):
    client_id: uuid.UUID
    price_id: uuid.UUID
    quantity: Quantity = 1
    trial_days: TrialDays | None = None
    collection_method: CollectionMethod = CollectionMethod.CHARGE_AUTOMATICALLY
    days_until_due: Annotated[int, Field(ge=1, le=365, strict=True)] | None = None

    @model_validator(mode="after")
    def _due_days_only_for_invoices(self) -> SubscriptionCreate:
        if self.days_until_due is not None and self.collection_method != CollectionMethod.SEND_INVOICE:
            raise ValueError("daysUntilDue applies to collectionMethod send_invoice only")
        return self


class PendingChangeOut(ApiModel):
    price_id: uuid.UUID
    plan_id: uuid.UUID | None
    quantity: int
    effective_at: datetime


class SubscriptionOut(ApiModel):
    id: uuid.UUID
    client_id: uuid.UUID
    plan_id: uuid.UUID | None
    plan_name: str | None = None
    price_id: uuid.UUID | None
    status: SubscriptionStatus
    quantity: int
    currency: str | None
    unit_amount: int | None
    interval: BillingInterval | None
    interval_count: int | None
    collection_method: CollectionMethod | None
    current_period_start: datetime | None
    current_period_end: datetime | None
    trial_start: datetime | None
    trial_end: datetime | None
    cancel_at_period_end: bool
    canceled_at: datetime | None
    ended_at: datetime | None
    access_until: datetime | None
    mrr: int
    pending_change: PendingChangeOut | None = None
    stripe_subscription_id: str
    stripe_customer_id: str | None
    version: int
    created_at: datetime
    updated_at: datetime


class HistoryOut(ApiModel):
    version: int
    event_type: str
    status: SubscriptionStatus
    cause_id: str | None
    occurred_at: datetime


class PreviewLine(ApiModel):
    description: str | None
    amount: int
    currency: str
    quantity: int | None
    price_id: uuid.UUID | None = Field(default=None, description="Our price id, when the line is of one of ours.")
    proration: bool
    period_start: datetime | None
    period_end: datetime | None


class ChangePreviewOut(ApiModel):
    proration_date: datetime = Field(description="Pass it unchanged to POST …/change: the charge equals this preview.")
    kind: Literal["interval", "upgrade", "downgrade"]
    proration_behavior: str
    effective: Literal["now", "period_end"]
    lines: list[PreviewLine]
    amount_due_now: int
    next_invoice_total: int
    currency: str


class ChangeRequest(InputModel):
    price_id: uuid.UUID
    quantity: Quantity | None = None
    proration_date: datetime


class CancelRequest(InputModel):
    at_period_end: bool = True


class PortalRequest(InputModel):
    return_url: Url | None = None
    client_id: uuid.UUID | None = None  # admins only


class PortalOut(ApiModel):
    url: str


class ClockAdvance(InputModel):
    to: UtcDateTime  # an offset that pushes it past year 9999 in UTC is a 422, not an overflow

    @field_validator("to")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("give a time zone (e.g. 2026-12-01T00:00:00Z)")
        return value


class ClockOut(ApiModel):
    id: str
    frozen_time: datetime | None
    status: str | None
