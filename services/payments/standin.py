"""Local stand-in for Stripe's hosted Checkout page (only in local mode, see PaymentsSettings.stand_in_checkout).

stripe-mock answers a Checkout Session without a usable URL, so offline nobody could pay. This page
lets a person click Pay (or simulate a declined card); the service then builds the webhook event
Stripe would send, signs it with STRIPE_WEBHOOK_SECRET and posts it to its own /webhooks/stripe, so
the payment goes through exactly the same path as a real one. The router is not even mounted when a
real Stripe key is configured.
"""

from __future__ import annotations

import hashlib
import html
import time
from decimal import Decimal

import httpx
import structlog
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from kit.errors import NotFound
from services.payments.models import CheckoutSession
from services.payments.repository import Repository
from services.payments.stripe import testing as stripe_events

log = structlog.get_logger(__name__)

ZERO_DECIMAL = {"BIF", "CLP", "DJF", "GNF", "JPY", "KMF", "KRW", "MGA", "PYG", "RWF", "UGX", "VND", "VUV",
                "XAF", "XOF", "XPF"}

router = APIRouter(prefix="/portal/checkout", tags=["local checkout (stand-in)"], include_in_schema=False)


def format_amount(amount: int, currency: str) -> str:
    if currency.upper() in ZERO_DECIMAL:
        return f"{amount:,} {currency.upper()}"
    return f"{Decimal(amount) / 100:,.2f} {currency.upper()}"


def local_payment_intent(session_id: str) -> str:
    """One PaymentIntent id per session (stripe-mock hands every session the same fixture id)."""
    return "pi_local_" + hashlib.sha256(session_id.encode()).hexdigest()[:24]


async def _session(request: Request, session_id: str) -> CheckoutSession:
    runtime = request.app.state.runtime
    async with runtime.db.sessionmaker() as session:  # read only; closing keeps the loaded row usable
        row = await Repository(session).get_session(session_id)
    if row is None or not row.stand_in:
        raise NotFound("No such checkout session.")
    return row


async def _deliver(request: Request, event: dict) -> None:
    """POST the signed event to this same app's /webhooks/stripe (the path Stripe's deliveries take)."""
    secret = request.app.state.payments.settings.stripe_webhook_secret
    body, headers = stripe_events.signed_request(event, secret)
    transport = httpx.ASGITransport(app=request.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://payments.local") as client:
        response = await client.post("/webhooks/stripe", content=body, headers=headers)
    if response.status_code != 200:
        log.error("stand_in_webhook_refused", status=response.status_code, body=response.text[:300])
        raise RuntimeError(f"own webhook endpoint answered {response.status_code}")


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Checkout (local test mode)</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body {{ font-family: system-ui, sans-serif; background: #f6f9fc; margin: 0; }}
 main {{ max-width: 420px; margin: 8vh auto; background: #fff; border-radius: 8px; padding: 32px;
        box-shadow: 0 2px 12px rgba(0,0,0,.08); }}
 .banner {{ background: #fff4d6; color: #6b4e00; padding: 8px 12px; border-radius: 4px; font-size: 13px; }}
 h1 {{ font-size: 20px; margin: 20px 0 4px; }}
 .amount {{ font-size: 32px; font-weight: 600; margin: 8px 0 24px; }}
 button {{ width: 100%; padding: 12px; font-size: 16px; border-radius: 6px; border: 0; cursor: pointer;
          margin-top: 10px; }}
 .pay {{ background: #635bff; color: #fff; }}
 .decline {{ background: #fff; color: #b42318; border: 1px solid #f3c5c0; }}
 .cancel {{ background: #fff; color: #425466; border: 1px solid #d8dee4; }}
 .muted {{ color: #697386; font-size: 13px; }}
</style></head>
<body><main>
 <div class="banner">Local test mode: no real payment is made. Stripe's hosted Checkout replaces this page
 when a Stripe test key is configured.</div>
 <h1>{label}</h1>
 <div class="amount" data-testid="amount">{amount}</div>
 {body}
 <p class="muted">Session {session_id}</p>
</main></body></html>"""

OPEN_BODY = """
 <form method="post" action="{base}/pay">
  <button class="pay" type="submit" data-testid="pay">Pay {amount}</button></form>
 <form method="post" action="{base}/decline">
  <button class="decline" type="submit" data-testid="decline">Simulate a declined card</button></form>
 <form method="post" action="{base}/cancel">
  <button class="cancel" type="submit" data-testid="cancel">Cancel</button></form>"""


@router.get("/{session_id}", response_class=HTMLResponse)
async def checkout_page(session_id: str, request: Request) -> Response:
    row = await _session(request, session_id)
    amount = format_amount(row.amount, row.currency)
    if row.status == "open":
        base = html.escape(request.url.path.rstrip("/"))
        body = OPEN_BODY.format(base=base, amount=html.escape(amount))
    else:
        body = f'<p data-testid="closed">This checkout is {html.escape(row.status)}.</p>'
    return HTMLResponse(PAGE.format(
        label=html.escape(f"Invoice {row.invoice_id[:8]}"),
        amount=html.escape(amount),
        body=body,
        session_id=html.escape(row.id),
    ))


@router.post("/{session_id}/pay")
async def pay(session_id: str, request: Request) -> Response:
    row = await _session(request, session_id)
    if row.status == "open":
        session = stripe_events.checkout_session(
            invoice_id=row.invoice_id,
            client_id=row.client_id,
            amount_total=row.amount,
            currency=row.currency,
            session_id=row.id,
            payment_status="paid",
            status="complete",
            payment_intent=local_payment_intent(row.id),
            customer=row.stripe_customer_id,
        )
        await _deliver(request, stripe_events.build_event("checkout.session.completed", session))
        log.info("stand_in_checkout_paid", session_id=row.id, invoice_id=row.invoice_id)
    return RedirectResponse(row.success_url, status_code=303)


@router.post("/{session_id}/decline")
async def decline(session_id: str, request: Request) -> Response:
    row = await _session(request, session_id)
    if row.status == "open":
        intent = stripe_events.payment_intent(
            amount=row.amount, currency=row.currency, invoice_id=row.invoice_id, client_id=row.client_id,
            intent_id=local_payment_intent(row.id),
        )
        await _deliver(request, stripe_events.build_event("payment_intent.payment_failed", intent,
                                                          created=int(time.time())))
        log.info("stand_in_checkout_declined", session_id=row.id, invoice_id=row.invoice_id)
    return RedirectResponse(row.url, status_code=303)


@router.post("/{session_id}/cancel")
async def cancel(session_id: str, request: Request) -> Response:
    row = await _session(request, session_id)
    return RedirectResponse(row.cancel_url, status_code=303)
