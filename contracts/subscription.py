"""subscription.* events (topic billing.subscription, key = our subscription id).

The subscriptions service mirrors each Stripe subscription (Stripe Billing owns periods, renewals,
retries and prorations) and publishes every change of its mirror as a full snapshot with a
`version` bumped once per change, so a copy keeps the newest (kit.replica.upsert_if_newer).
`subscription.trial_will_end` is a notice: it carries the current snapshot without a new version.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from contracts.base import ContractModel

SCHEMA_V1 = "urn:billing:subscription:v1"


class SubscriptionStatus(StrEnum):
    """Stripe's subscription statuses, all of them (the mirror shows what Stripe says)."""

    INCOMPLETE = "incomplete"
    INCOMPLETE_EXPIRED = "incomplete_expired"
    TRIALING = "trialing"
    ACTIVE = "active"
    PAST_DUE = "past_due"
    CANCELED = "canceled"
    UNPAID = "unpaid"
    PAUSED = "paused"


# Stripe never moves a subscription out of these.
TERMINAL_STATUSES = frozenset({SubscriptionStatus.CANCELED, SubscriptionStatus.INCOMPLETE_EXPIRED})
# The client has (paid or trial) access in these.
SERVING_STATUSES = frozenset({SubscriptionStatus.TRIALING, SubscriptionStatus.ACTIVE, SubscriptionStatus.PAST_DUE})


class SubscriptionEventType(StrEnum):
    CREATED = "subscription.created"
    TRIAL_WILL_END = "subscription.trial_will_end"
    ACTIVATED = "subscription.activated"
    CHANGED = "subscription.changed"
    RENEWED = "subscription.renewed"
    PAST_DUE = "subscription.past_due"
    CANCELED = "subscription.canceled"


class BillingInterval(StrEnum):
    MONTH = "month"
    YEAR = "year"


class CollectionMethod(StrEnum):
    CHARGE_AUTOMATICALLY = "charge_automatically"
    SEND_INVOICE = "send_invoice"


class PendingChangeV1(ContractModel):
    """A downgrade that takes effect at the end of the current period (at the renewal)."""

    price_id: str
    plan_id: str | None = None
    quantity: int
    effective_at: datetime


class SubscriptionSnapshotV1(ContractModel):
    """The mirror right after the change the event reports. Amounts in minor units."""

    id: str
    version: int
    client_id: str
    client_name: str | None = None
    client_email: str | None = None
    plan_id: str | None = None
    plan_name: str | None = None
    price_id: str | None = None
    status: SubscriptionStatus
    quantity: int
    currency: str | None = None  # ISO 4217, upper case
    unit_amount: int | None = None
    interval: BillingInterval | None = None
    interval_count: int | None = None
    collection_method: CollectionMethod | None = None
    current_period_start: datetime | None = None
    current_period_end: datetime | None = None
    trial_start: datetime | None = None
    trial_end: datetime | None = None
    cancel_at_period_end: bool = False
    cancel_at: datetime | None = None
    canceled_at: datetime | None = None
    ended_at: datetime | None = None
    # Paid-through (or trial-through) date: the client has access until then.
    access_until: datetime | None = None
    # Monthly recurring revenue of this subscription, minor units; 0 unless active or past_due.
    mrr: int = 0
    pending_change: PendingChangeV1 | None = None
    stripe_subscription_id: str
    stripe_customer_id: str | None = None
    latest_stripe_invoice_id: str | None = None
    # What caused this version: a Stripe event id, or "api:<action>".
    cause_id: str | None = None
    occurred_at: datetime
