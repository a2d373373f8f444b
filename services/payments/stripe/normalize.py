"""What payments publishes on billing.stripe for other services: typed Stripe objects -> the stable
contracts of contracts/stripe.py. Pure functions.

Other services never parse Stripe payloads (their shape depends on the API version); the shapes of
the versions we accept are resolved in `events.py`, and this module only picks the fields.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

from contracts.stripe import (
    StripeInvoiceLineV1,
    StripeInvoiceV1,
    StripeSubscriptionItemV1,
    StripeSubscriptionV1,
)
from services.payments.stripe.events import Event, Invoice, InvoiceLine, Price, Subscription, SubscriptionItem

UNKNOWN_CURRENCY = "XXX"  # ISO 4217 "no currency": a Stripe invoice always has one


def subscription_item(item: SubscriptionItem, sub: Subscription) -> StripeSubscriptionItemV1:
    price = item.price or item.plan or Price()
    recurring = price.recurring
    return StripeSubscriptionItemV1(
        id=item.id,
        price_id=price.id,
        price_lookup_key=price.lookup_key,
        product_id=price.product,
        quantity=item.quantity,
        unit_amount=price.unit_amount if price.unit_amount is not None else price.amount,
        currency=price.currency,
        interval=recurring.interval if recurring else price.interval,
        interval_count=recurring.interval_count if recurring else price.interval_count,
        # Billing periods moved from the subscription to its items in API 2025-03-31.
        current_period_start=item.current_period_start or sub.current_period_start,
        current_period_end=item.current_period_end or sub.current_period_end,
    )


def subscription(event: Event[Subscription]) -> StripeSubscriptionV1:
    sub = event.object
    items = [subscription_item(item, sub) for item in sub.items]
    first = items[0] if items else None
    return StripeSubscriptionV1(
        stripe_event_id=event.id,
        stripe_event_type=event.type,
        stripe_event_created=event.created_at,
        livemode=event.livemode,
        subscription_id=sub.id,
        customer_id=sub.customer,
        client_id=sub.metadata.client_id,
        plan_id=sub.metadata.plan_id,
        status=sub.status or "unknown",
        currency=sub.currency or (first.currency if first else None),
        items=items,
        price_id=first.price_id if first else None,
        price_lookup_key=first.price_lookup_key if first else None,
        quantity=first.quantity if first else None,
        current_period_start=sub.current_period_start or (first.current_period_start if first else None),
        current_period_end=sub.current_period_end or (first.current_period_end if first else None),
        cancel_at_period_end=sub.cancel_at_period_end,
        cancel_at=sub.cancel_at,
        canceled_at=sub.canceled_at,
        ended_at=sub.ended_at,
        trial_start=sub.trial_start,
        trial_end=sub.trial_end,
        start_date=sub.start_date,
        latest_invoice_id=sub.latest_invoice,
        metadata=sub.metadata.as_dict(),
    )


def _whole(amount: Decimal | None) -> int | None:
    return None if amount is None else int(amount.to_integral_value(rounding=ROUND_HALF_UP))


def _invoice_line(line: InvoiceLine, currency: str) -> StripeInvoiceLineV1:
    unit = line.unit_amount_decimal
    return StripeInvoiceLineV1(
        id=line.id,
        description=line.description,
        amount=line.amount,
        currency=line.currency or currency,
        quantity=line.quantity,
        price_id=line.price_id,
        proration=line.is_proration,
        period_start=line.period.start,
        period_end=line.period.end,
        unit_amount_decimal=unit,
        unit_amount=_whole(unit),
    )


def invoice(event: Event[Invoice], *, customer_client_id: str | None = None) -> StripeInvoiceV1:
    """`customer_client_id`: our client of the invoice's customer (its metadata), for an invoice whose
    subscription carries none (one made in Stripe's dashboard); the handler looks it up."""
    inv = event.object
    currency = inv.currency or UNKNOWN_CURRENCY
    sub_meta = inv.subscription_metadata
    return StripeInvoiceV1(
        stripe_event_id=event.id,
        stripe_event_type=event.type,
        stripe_event_created=event.created_at,
        livemode=event.livemode,
        invoice_id=inv.id,
        subscription_id=inv.subscription_id,
        customer_id=inv.customer,
        client_id=inv.metadata.client_id or sub_meta.client_id or customer_client_id,
        plan_id=inv.metadata.plan_id or sub_meta.plan_id,
        status=inv.status,
        number=inv.number,
        currency=currency,
        subtotal=inv.subtotal,
        tax=inv.tax,
        total=inv.total,
        amount_due=inv.amount_due,
        amount_paid=inv.amount_paid,
        amount_remaining=inv.amount_remaining,
        billing_reason=inv.billing_reason,
        attempt_count=inv.attempt_count,
        next_payment_attempt=inv.next_payment_attempt,
        period_start=inv.period_start,
        period_end=inv.period_end,
        paid_at=inv.status_transitions.paid_at,
        hosted_invoice_url=inv.hosted_invoice_url,
        invoice_pdf=inv.invoice_pdf,
        lines=[_invoice_line(line, currency) for line in inv.lines],
        metadata=inv.metadata.as_dict(),
        price_id=inv.price_id,
        subscription_metadata=sub_meta.as_dict(),
        collection_method=inv.collection_method,
        created=inv.created,
        finalized_at=inv.status_transitions.finalized_at,
        due_date=inv.due_date,
    )
