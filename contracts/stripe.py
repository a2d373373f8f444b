"""stripe.* events (topic billing.stripe, key = the Stripe subscription id).

The payments service receives Stripe's webhooks, verifies and deduplicates them by Stripe event id,
and republishes the subscription and Stripe-invoice ones here in a stable shape, so other services
never parse Stripe payloads (whose shape depends on the Stripe API version). A Stripe invoice that
belongs to no subscription is keyed by its own id (in_...).

Deliveries older than one already republished for the same Stripe object are dropped before they get
here; so is a Stripe invoice event of the same second that would move the invoice back (a `created`
draft after its `finalized` or `paid`). Two events of one object with the same `stripeEventCreated`
(Stripe has one-second resolution) may still arrive in either order: consumers compare
`stripeEventCreated` and keep the newest, and treat a `deleted` subscription and a `paid` or `void`
invoice as final.

A subscription's Stripe invoice goes `stripe.invoice.created` (a draft: no number yet) ->
`stripe.invoice.finalized` (open, numbered, `hostedInvoiceUrl` set) -> `stripe.invoice.paid` or
`stripe.invoice.payment_failed` (then retried). Every one carries the whole invoice and its lines.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from enum import StrEnum

from contracts.base import ContractModel

SCHEMA_SUBSCRIPTION_V1 = "urn:billing:stripe:subscription:v1"
SCHEMA_INVOICE_V1 = "urn:billing:stripe:invoice:v1"


class StripeEventType(StrEnum):
    SUBSCRIPTION_CREATED = "stripe.customer.subscription.created"
    SUBSCRIPTION_UPDATED = "stripe.customer.subscription.updated"
    SUBSCRIPTION_DELETED = "stripe.customer.subscription.deleted"
    SUBSCRIPTION_TRIAL_WILL_END = "stripe.customer.subscription.trial_will_end"
    # Optional additions: a trial that ends without a payment method may pause the subscription.
    SUBSCRIPTION_PAUSED = "stripe.customer.subscription.paused"
    SUBSCRIPTION_RESUMED = "stripe.customer.subscription.resumed"
    INVOICE_CREATED = "stripe.invoice.created"
    INVOICE_FINALIZED = "stripe.invoice.finalized"
    INVOICE_PAID = "stripe.invoice.paid"
    INVOICE_PAYMENT_FAILED = "stripe.invoice.payment_failed"


SUBSCRIPTION_EVENT_TYPES = frozenset(
    {
        StripeEventType.SUBSCRIPTION_CREATED,
        StripeEventType.SUBSCRIPTION_UPDATED,
        StripeEventType.SUBSCRIPTION_DELETED,
        StripeEventType.SUBSCRIPTION_TRIAL_WILL_END,
        StripeEventType.SUBSCRIPTION_PAUSED,
        StripeEventType.SUBSCRIPTION_RESUMED,
    }
)
INVOICE_EVENT_TYPES = frozenset(
    {
        StripeEventType.INVOICE_CREATED,
        StripeEventType.INVOICE_FINALIZED,
        StripeEventType.INVOICE_PAID,
        StripeEventType.INVOICE_PAYMENT_FAILED,
    }
)


class StripeEventMeta(ContractModel):
    """Where the normalized payload came from."""

    stripe_event_id: str
    stripe_event_type: str  # Stripe's own type, e.g. customer.subscription.updated
    stripe_event_created: datetime
    livemode: bool = False


class StripeSubscriptionItemV1(ContractModel):
    id: str
    price_id: str | None = None
    price_lookup_key: str | None = None
    product_id: str | None = None
    quantity: int | None = None
    unit_amount: int | None = None  # minor units
    currency: str | None = None  # ISO 4217, upper case
    interval: str | None = None  # day, week, month, year
    interval_count: int | None = None
    current_period_start: datetime | None = None
    current_period_end: datetime | None = None


class StripeSubscriptionV1(StripeEventMeta):
    """A Stripe subscription as of the event (customer.subscription.*)."""

    subscription_id: str
    customer_id: str | None = None
    client_id: str | None = None  # metadata.client_id
    plan_id: str | None = None  # metadata.plan_id
    status: str  # incomplete, incomplete_expired, trialing, active, past_due, canceled, unpaid, paused
    currency: str | None = None
    items: list[StripeSubscriptionItemV1] = []
    # Convenience copies of the first item (a one-plan subscription has exactly one).
    price_id: str | None = None
    price_lookup_key: str | None = None
    quantity: int | None = None
    current_period_start: datetime | None = None
    current_period_end: datetime | None = None
    cancel_at_period_end: bool = False
    cancel_at: datetime | None = None
    canceled_at: datetime | None = None
    ended_at: datetime | None = None
    trial_start: datetime | None = None
    trial_end: datetime | None = None
    start_date: datetime | None = None
    latest_invoice_id: str | None = None
    metadata: dict[str, str] = {}
    # Optional additions (older producers leave them unset): how Stripe collects the invoices.
    collection_method: str | None = None  # charge_automatically, send_invoice
    days_until_due: int | None = None


class StripeInvoiceLineV1(ContractModel):
    id: str
    description: str | None = None
    amount: int  # minor units
    currency: str
    quantity: int | None = None
    price_id: str | None = None
    proration: bool = False
    period_start: datetime | None = None
    period_end: datetime | None = None
    # Optional additions (older producers leave them unset). The unit price in minor units, exactly as
    # Stripe states it (a proration's may have a fraction of a cent), and rounded half up.
    unit_amount_decimal: Decimal | None = None
    unit_amount: int | None = None


class StripeInvoiceV1(StripeEventMeta):
    """A Stripe invoice (subscription billing) as of invoice.created / .finalized / .paid / .payment_failed."""

    invoice_id: str  # Stripe's in_...
    subscription_id: str | None = None
    customer_id: str | None = None
    client_id: str | None = None  # subscription or invoice metadata.client_id
    plan_id: str | None = None
    status: str | None = None  # draft, open, paid, uncollectible, void
    number: str | None = None
    currency: str  # upper case
    subtotal: int | None = None
    tax: int | None = None
    total: int | None = None
    amount_due: int
    amount_paid: int
    amount_remaining: int | None = None
    billing_reason: str | None = None  # subscription_create, subscription_cycle, subscription_update, ...
    attempt_count: int | None = None
    next_payment_attempt: datetime | None = None
    period_start: datetime | None = None
    period_end: datetime | None = None
    paid_at: datetime | None = None
    hosted_invoice_url: str | None = None
    invoice_pdf: str | None = None
    lines: list[StripeInvoiceLineV1] = []
    metadata: dict[str, str] = {}
    # Optional additions (older producers leave them unset).
    price_id: str | None = None  # the Stripe price of the subscription's item (its line for the period)
    subscription_metadata: dict[str, str] = {}  # ours: client_id, plan_id, price_id (our price)
    collection_method: str | None = None  # charge_automatically, send_invoice
    created: datetime | None = None
    finalized_at: datetime | None = None
    due_date: datetime | None = None  # send_invoice only
