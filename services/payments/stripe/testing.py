"""Build and sign Stripe webhook events exactly as Stripe does.

Used by the tests and the bench (the Stripe stand-in, deploy/stripe_standin, signs its own deliveries
the same way). A request made with these helpers
goes through the same verification (`stripe.WebhookSignature`) as one from Stripe:

    body, headers = signed_request(build_event("checkout.session.completed", session), secret)

Signature scheme (Stripe docs, "Verify signatures manually"): header
``Stripe-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from typing import Any

SIGNATURE_HEADER = "Stripe-Signature"
API_VERSION = "2026-10-28.endive"  # the version stripe-python 16 pins; only informative here


def _rand(n: int = 24) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(n))


def stripe_id(prefix: str) -> str:
    """A Stripe-looking id: ``stripe_id("evt")`` -> ``evt_1A2b...``."""
    return f"{prefix}_{_rand()}"


def sign_payload(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    """The Stripe-Signature header value for ``payload`` signed with ``secret`` at ``timestamp``."""
    ts = int(time.time()) if timestamp is None else int(timestamp)
    mac = hmac.new(secret.encode(), f"{ts}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={ts},v1={mac}"


def build_event(
    type: str,
    obj: dict[str, Any],
    *,
    created: int | None = None,
    event_id: str | None = None,
    livemode: bool = False,
    previous_attributes: dict[str, Any] | None = None,
    api_version: str = API_VERSION,
) -> dict[str, Any]:
    """A Stripe Event object (`object: "event"`) wrapping ``obj``."""
    data: dict[str, Any] = {"object": obj}
    if previous_attributes is not None:
        data["previous_attributes"] = previous_attributes
    return {
        "id": event_id or stripe_id("evt"),
        "object": "event",
        "api_version": api_version,
        "created": int(time.time()) if created is None else int(created),
        "data": data,
        "livemode": livemode,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": type,
    }


def encode_event(event: dict[str, Any]) -> bytes:
    """Serialize like Stripe (pretty-printed JSON); the signature covers these exact bytes."""
    return json.dumps(event, indent=2).encode()


def signed_request(
    event: dict[str, Any], secret: str, *, timestamp: int | None = None
) -> tuple[bytes, dict[str, str]]:
    """Body and headers of a webhook delivery of ``event``."""
    body = encode_event(event)
    return body, {
        SIGNATURE_HEADER: sign_payload(body, secret, timestamp),
        "Content-Type": "application/json; charset=utf-8",
        "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
    }


# -- Stripe objects, shaped like the API's (the fields this platform reads, plus the usual ones) ------


def checkout_session(
    *,
    invoice_id: str | None,
    amount_total: int,
    currency: str,
    session_id: str | None = None,
    payment_status: str = "paid",
    status: str = "complete",
    payment_intent: str | None = None,
    customer: str | None = None,
    client_id: str | None = None,
    mode: str = "payment",
    created: int | None = None,
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    meta = dict(metadata or {})
    if invoice_id is not None:
        meta.setdefault("invoice_id", invoice_id)
    if client_id is not None:
        meta.setdefault("client_id", client_id)
    now = int(time.time()) if created is None else created
    return {
        "id": session_id or f"cs_test_{_rand(40)}",
        "object": "checkout.session",
        "amount_subtotal": amount_total,
        "amount_total": amount_total,
        "client_reference_id": invoice_id,
        "created": now,
        "currency": currency.lower(),
        "customer": customer,
        "expires_at": now + 24 * 3600,
        "livemode": False,
        "metadata": meta,
        "mode": mode,
        "payment_intent": payment_intent if payment_intent is not None else stripe_id("pi"),
        "payment_method_types": ["card"],
        "payment_status": payment_status,
        "status": status,
        "subscription": None,
        "url": None,
    }


def payment_intent(
    *,
    amount: int,
    currency: str,
    invoice_id: str | None,
    intent_id: str | None = None,
    status: str = "requires_payment_method",
    failure_code: str | None = "card_declined",
    failure_message: str | None = "Your card was declined.",
    client_id: str | None = None,
) -> dict[str, Any]:
    meta: dict[str, str] = {}
    if invoice_id is not None:
        meta["invoice_id"] = invoice_id
    if client_id is not None:
        meta["client_id"] = client_id
    error = None
    if failure_code or failure_message:
        error = {"type": "card_error", "code": failure_code, "decline_code": "generic_decline",
                 "message": failure_message}
    return {
        "id": intent_id or stripe_id("pi"),
        "object": "payment_intent",
        "amount": amount,
        "amount_received": 0,
        "currency": currency.lower(),
        "created": int(time.time()),
        "last_payment_error": error,
        "livemode": False,
        "metadata": meta,
        "payment_method_types": ["card"],
        "status": status,
    }


def charge(
    *,
    amount: int,
    amount_refunded: int,
    currency: str,
    payment_intent: str,
    charge_id: str | None = None,
    invoice_id: str | None = None,
) -> dict[str, Any]:
    return {
        "id": charge_id or stripe_id("ch"),
        "object": "charge",
        "amount": amount,
        "amount_captured": amount,
        "amount_refunded": amount_refunded,
        "captured": True,
        "created": int(time.time()),
        "currency": currency.lower(),
        "livemode": False,
        "metadata": {"invoice_id": invoice_id} if invoice_id else {},
        "paid": True,
        "payment_intent": payment_intent,
        "refunded": amount_refunded >= amount,
        "status": "succeeded",
    }


def subscription(
    *,
    subscription_id: str | None = None,
    status: str = "active",
    customer: str | None = None,
    client_id: str | None = None,
    plan_id: str | None = None,
    price_id: str = "price_basic_monthly",
    lookup_key: str | None = "maintenance_basic_monthly",
    unit_amount: int = 4900,
    currency: str = "eur",
    period_start: int | None = None,
    period_end: int | None = None,
    cancel_at_period_end: bool = False,
    trial_end: int | None = None,
) -> dict[str, Any]:
    start = int(time.time()) if period_start is None else period_start
    end = start + 30 * 86400 if period_end is None else period_end
    meta: dict[str, str] = {}
    if client_id:
        meta["client_id"] = client_id
    if plan_id:
        meta["plan_id"] = plan_id
    sub_id = subscription_id or stripe_id("sub")
    return {
        "id": sub_id,
        "object": "subscription",
        "cancel_at": None,
        "cancel_at_period_end": cancel_at_period_end,
        "canceled_at": None,
        "created": start,
        "currency": currency,
        "customer": customer or stripe_id("cus"),
        "ended_at": None,
        "items": {
            "object": "list",
            "data": [
                {
                    "id": stripe_id("si"),
                    "object": "subscription_item",
                    "current_period_start": start,
                    "current_period_end": end,
                    "price": {
                        "id": price_id,
                        "object": "price",
                        "currency": currency,
                        "lookup_key": lookup_key,
                        "product": "prod_billing_maintenance_basic",
                        "recurring": {"interval": "month", "interval_count": 1},
                        "unit_amount": unit_amount,
                    },
                    "quantity": 1,
                    "subscription": sub_id,
                }
            ],
        },
        "latest_invoice": None,
        "livemode": False,
        "metadata": meta,
        "start_date": start,
        "status": status,
        "trial_end": trial_end,
        "trial_start": None if trial_end is None else start,
    }


def stripe_invoice(
    *,
    subscription_id: str | None,
    amount_due: int = 4900,
    amount_paid: int | None = None,
    currency: str = "eur",
    status: str = "paid",
    customer: str | None = None,
    client_id: str | None = None,
    invoice_id: str | None = None,
    billing_reason: str = "subscription_cycle",
    price_id: str = "price_maintenance_monthly",
    collection_method: str = "charge_automatically",
    created: int | None = None,
    lines: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A subscription's Stripe invoice in the current API shape (subscription at
    `parent.subscription_details`, lines with `pricing` and `parent.subscription_item_details`).
    `lines` replaces the one line for the period (see `stripe_invoice_line`)."""
    now = int(time.time()) if created is None else created
    paid = amount_due if amount_paid is None else amount_paid
    if status in ("draft", "open"):
        paid = 0 if amount_paid is None else amount_paid
    sub_meta = {"client_id": client_id} if client_id else {}
    finalized = status != "draft"
    return {
        "id": invoice_id or stripe_id("in"),
        "object": "invoice",
        "amount_due": amount_due,
        "amount_paid": paid,
        "amount_remaining": amount_due - paid,
        "attempt_count": 1 if finalized else 0,
        "billing_reason": billing_reason,
        "collection_method": collection_method,
        "created": now,
        "currency": currency,
        "customer": customer or stripe_id("cus"),
        "due_date": now + 30 * 86400 if collection_method == "send_invoice" else None,
        "hosted_invoice_url": f"https://invoice.stripe.com/i/acct_test/{_rand(12)}" if finalized else None,
        "invoice_pdf": None,
        "lines": {
            "object": "list",
            "data": lines if lines is not None else [
                stripe_invoice_line(amount_due, currency=currency, price_id=price_id,
                                    subscription_id=subscription_id, start=now, end=now + 30 * 86400),
            ],
        },
        "livemode": False,
        "metadata": {},
        "next_payment_attempt": None,
        "number": f"ABC-{_rand(4).upper()}" if finalized else None,
        "parent": {
            "type": "subscription_details",
            "subscription_details": {"metadata": sub_meta, "subscription": subscription_id},
        } if subscription_id else None,
        "period_end": now,
        "period_start": now - 30 * 86400,
        "status": status,
        "status_transitions": {"finalized_at": now if finalized else None,
                               "paid_at": now if status == "paid" else None},
        "subtotal": amount_due,
        "total": amount_due,
    }


def stripe_invoice_line(
    amount: int,
    *,
    currency: str = "eur",
    quantity: int = 1,
    unit_amount_decimal: str | None = None,
    price_id: str = "price_maintenance_monthly",
    subscription_id: str | None = None,
    proration: bool = False,
    description: str = "1 × Maintenance (at €49.00 / month)",
    start: int | None = None,
    end: int | None = None,
) -> dict[str, Any]:
    """One line of a subscription invoice (current API shape)."""
    now = int(time.time())
    return {
        "id": stripe_id("il"),
        "object": "line_item",
        "amount": amount,
        "currency": currency,
        "description": description,
        "parent": {
            "type": "subscription_item_details",
            "subscription_item_details": {"proration": proration, "subscription": subscription_id,
                                          "subscription_item": stripe_id("si"), "invoice_item": None},
        },
        "period": {"start": now if start is None else start, "end": now + 30 * 86400 if end is None else end},
        "pricing": {"type": "price_details", "price_details": {"price": price_id, "product": "prod_maintenance"},
                    "unit_amount_decimal": unit_amount_decimal or str(amount // max(quantity, 1))},
        "quantity": quantity,
    }
