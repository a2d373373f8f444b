"""Stripe payloads -> the stable contracts of billing.stripe (contracts/stripe.py). Pure functions.

Accepts the shapes of both older and current Stripe API versions (e.g. `invoice.subscription` before
2025-03-31 and `invoice.parent.subscription_details.subscription` after; billing periods on the
subscription before and on its items after).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from contracts.stripe import (
    StripeInvoiceLineV1,
    StripeInvoiceV1,
    StripeSubscriptionItemV1,
    StripeSubscriptionV1,
)


def ts(value: Any) -> datetime | None:
    """Unix seconds -> aware UTC datetime (None stays None)."""
    if value is None or value == "":
        return None
    return datetime.fromtimestamp(int(value), tz=UTC)


def ref_id(value: Any) -> str | None:
    """A Stripe reference that may be an id or an expanded object."""
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("id")
    return str(value)


def upper(value: Any) -> str | None:
    return str(value).upper() if value else None


def str_dict(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items() if v is not None}


def _list_data(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, dict):
        return [d for d in value.get("data") or [] if isinstance(d, dict)]
    if isinstance(value, list):
        return [d for d in value if isinstance(d, dict)]
    return []


def _meta(event: dict[str, Any]) -> dict[str, Any]:
    return {
        "stripe_event_id": event["id"],
        "stripe_event_type": event["type"],
        "stripe_event_created": ts(event["created"]),
        "livemode": bool(event.get("livemode", False)),
    }


def subscription_item(item: dict[str, Any], sub: dict[str, Any]) -> StripeSubscriptionItemV1:
    price = item.get("price") or item.get("plan") or {}
    if not isinstance(price, dict):
        price = {"id": price}
    recurring = price.get("recurring") or {}
    return StripeSubscriptionItemV1(
        id=item.get("id") or "",
        price_id=price.get("id"),
        price_lookup_key=price.get("lookup_key"),
        product_id=ref_id(price.get("product")),
        quantity=item.get("quantity"),
        unit_amount=price.get("unit_amount", price.get("amount")),
        currency=upper(price.get("currency")),
        interval=recurring.get("interval", price.get("interval")),
        interval_count=recurring.get("interval_count", price.get("interval_count")),
        current_period_start=ts(item.get("current_period_start", sub.get("current_period_start"))),
        current_period_end=ts(item.get("current_period_end", sub.get("current_period_end"))),
    )


def subscription(event: dict[str, Any]) -> StripeSubscriptionV1:
    sub = event["data"]["object"]
    items = [subscription_item(i, sub) for i in _list_data(sub.get("items"))]
    first = items[0] if items else None
    metadata = str_dict(sub.get("metadata"))
    return StripeSubscriptionV1(
        **_meta(event),
        subscription_id=sub["id"],
        customer_id=ref_id(sub.get("customer")),
        client_id=metadata.get("client_id"),
        plan_id=metadata.get("plan_id"),
        status=sub.get("status") or "unknown",
        currency=upper(sub.get("currency")) or (first.currency if first else None),
        items=items,
        price_id=first.price_id if first else None,
        price_lookup_key=first.price_lookup_key if first else None,
        quantity=first.quantity if first else None,
        current_period_start=ts(sub.get("current_period_start"))
        or (first.current_period_start if first else None),
        current_period_end=ts(sub.get("current_period_end")) or (first.current_period_end if first else None),
        cancel_at_period_end=bool(sub.get("cancel_at_period_end")),
        cancel_at=ts(sub.get("cancel_at")),
        canceled_at=ts(sub.get("canceled_at")),
        ended_at=ts(sub.get("ended_at")),
        trial_start=ts(sub.get("trial_start")),
        trial_end=ts(sub.get("trial_end")),
        start_date=ts(sub.get("start_date")),
        latest_invoice_id=ref_id(sub.get("latest_invoice")),
        metadata=metadata,
    )


def invoice_subscription_id(inv: dict[str, Any]) -> str | None:
    sub = ref_id(inv.get("subscription"))
    if sub:
        return sub
    parent = inv.get("parent") or {}
    details = parent.get("subscription_details") or {}
    return ref_id(details.get("subscription"))


def _invoice_line(line: dict[str, Any], currency: str) -> StripeInvoiceLineV1:
    price = line.get("price")
    price_id = ref_id(price)
    pricing = line.get("pricing") or {}
    if not price_id and isinstance(pricing.get("price_details"), dict):
        price_id = ref_id(pricing["price_details"].get("price"))
    proration = line.get("proration")
    if proration is None:
        parent = line.get("parent") or {}
        for key in ("subscription_item_details", "invoice_item_details"):
            if isinstance(parent.get(key), dict) and "proration" in parent[key]:
                proration = parent[key]["proration"]
    period = line.get("period") or {}
    return StripeInvoiceLineV1(
        id=line.get("id") or "",
        description=line.get("description"),
        amount=int(line.get("amount") or 0),
        currency=upper(line.get("currency")) or currency,
        quantity=line.get("quantity"),
        price_id=price_id,
        proration=bool(proration),
        period_start=ts(period.get("start")),
        period_end=ts(period.get("end")),
    )


def invoice(event: dict[str, Any]) -> StripeInvoiceV1:
    inv = event["data"]["object"]
    currency = upper(inv.get("currency")) or "XXX"
    metadata = str_dict(inv.get("metadata"))
    parent = inv.get("parent") or {}
    sub_meta = str_dict((parent.get("subscription_details") or {}).get("metadata"))
    sub_meta.update(str_dict(inv.get("subscription_details", {}).get("metadata")
                             if isinstance(inv.get("subscription_details"), dict) else {}))
    transitions = inv.get("status_transitions") or {}
    return StripeInvoiceV1(
        **_meta(event),
        invoice_id=inv["id"],
        subscription_id=invoice_subscription_id(inv),
        customer_id=ref_id(inv.get("customer")),
        client_id=metadata.get("client_id") or sub_meta.get("client_id"),
        plan_id=metadata.get("plan_id") or sub_meta.get("plan_id"),
        status=inv.get("status"),
        number=inv.get("number"),
        currency=currency,
        subtotal=inv.get("subtotal"),
        tax=inv.get("tax"),
        total=inv.get("total"),
        amount_due=int(inv.get("amount_due") or 0),
        amount_paid=int(inv.get("amount_paid") or 0),
        amount_remaining=inv.get("amount_remaining"),
        billing_reason=inv.get("billing_reason"),
        attempt_count=inv.get("attempt_count"),
        next_payment_attempt=ts(inv.get("next_payment_attempt")),
        period_start=ts(inv.get("period_start")),
        period_end=ts(inv.get("period_end")),
        paid_at=ts(transitions.get("paid_at")),
        hosted_invoice_url=inv.get("hosted_invoice_url"),
        invoice_pdf=inv.get("invoice_pdf"),
        lines=[_invoice_line(line, currency) for line in _list_data(inv.get("lines"))],
        metadata=metadata,
    )
