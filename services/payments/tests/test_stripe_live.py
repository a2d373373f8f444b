"""Opt-in: the same code against real Stripe test mode (seed T6). Never a live key, never a real card.

Runs only when STRIPE_SECRET_KEY holds a Stripe-issued test key (sk_test_ + a long random part);
otherwise the whole module is skipped and pytest prints why (`-ra`). It needs the internet.

    STRIPE_SECRET_KEY=sk_test_... pytest services/payments/tests/test_stripe_live.py -ra

What it does in the test account: creates a customer and Checkout Sessions (which expire by
themselves; the test expires one at once), reads Stripe's own events back through the Events API and
feeds them, re-signed with the local webhook secret, through /webhooks/stripe, so our handling is
checked against payloads Stripe really produced (Stripe cannot deliver webhooks to this machine).
The setup command runs with --dry-run (read only) unless STRIPE_LIVE_SETUP_WEBHOOK_URL is set, in
which case it really runs twice and the second run must change nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import stripe

from kit.stripe import looks_like_real_test_key
from services.payments.app import create_app
from services.payments.config import PaymentsSettings
from services.payments.tests.conftest import (
    ADMIN,
    FakeInvoiceReader,
    post_webhook,
    publish_invoice,
    snapshot,
    wait_for_copy,
    wait_processed,
)

KEY = os.environ.get("STRIPE_SECRET_KEY", "")
if not KEY.startswith("sk_test_") or not looks_like_real_test_key(KEY):
    reason = (
        "real Stripe test mode not exercised: set STRIPE_SECRET_KEY=sk_test_... (a key from the Stripe "
        "dashboard) to run it" + (f"; '{KEY[:12]}…' is a local placeholder" if KEY else "; no key is set")
    )
    print(f"\n[payments] {reason}")
    pytest.skip(reason, allow_module_level=True)

LIVE_SECRET = "whsec_live_test_resigned"


@pytest.fixture(scope="module")
async def live_api(
    kafka: Any, database_url_factory: Callable[[str], str]
) -> AsyncIterator[httpx.AsyncClient]:
    settings = PaymentsSettings(
        database_url=database_url_factory("payments_live"),
        kafka_bootstrap=kafka.bootstrap,
        stripe_secret_key=KEY,
        stripe_api_base=None,
        stripe_webhook_secret=LIVE_SECRET,
        public_url="https://billing.example.invalid",
        portal_url="https://billing.example.invalid/portal",
        consumer_group="payments-live-test",
        webhook_worker_poll_interval=0.2,
    )
    assert not settings.local_stripe
    app = create_app(settings, invoice_reader=FakeInvoiceReader())
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=transport, base_url="http://payments", headers=ADMIN
    ) as client:
        client.app = app  # type: ignore[attr-defined]
        yield client


@pytest.fixture(scope="module")
def sdk() -> stripe.StripeClient:
    return stripe.StripeClient(KEY)


async def _events_for(sdk: stripe.StripeClient, object_id: str, event_type: str, since: int) -> list[dict[str, Any]]:
    for _ in range(30):  # the Events API is eventually consistent
        page = await sdk.v1.events.list_async(params={"type": event_type, "created": {"gte": since - 5},
                                                      "limit": 100})
        found = [e.to_dict() for e in page.data if e.data.object.get("id") == object_id]
        if found:
            return found
        await asyncio.sleep(2)
    raise AssertionError(f"Stripe produced no {event_type} for {object_id}")


async def test_checkout_session_in_test_mode(
    live_api: httpx.AsyncClient, sdk: stripe.StripeClient, producer: Any
) -> None:
    db = live_api.app.state.payments.db  # type: ignore[attr-defined]
    snap = snapshot(total=2_345)
    await publish_invoice(producer, snap)
    await wait_for_copy(db, snap.id, snap.version)
    since = int(time.time())

    response = await live_api.post(f"/api/invoices/{snap.id}/checkout")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["url"].startswith("https://checkout.stripe.com/")
    again = await live_api.post(f"/api/invoices/{snap.id}/checkout")
    assert again.json()["sessionId"] == body["sessionId"]  # double click: one session

    session = (await sdk.v1.checkout.sessions.retrieve_async(body["sessionId"])).to_dict()
    assert session["client_reference_id"] == snap.id
    assert session["metadata"]["invoice_id"] == snap.id
    assert session["amount_total"] == 2_345 and session["currency"] == "eur" and session["mode"] == "payment"
    assert session["livemode"] is False

    # expire it for real, read Stripe's own event back and run it through our webhook path
    await sdk.v1.checkout.sessions.expire_async(body["sessionId"])
    [expired] = await _events_for(sdk, body["sessionId"], "checkout.session.expired", since)
    response = await post_webhook(live_api, expired, secret=LIVE_SECRET)
    assert response.status_code == 200, response.text
    [row] = await wait_processed(db, [expired["id"]])
    assert row.status == "processed", row.outcome
    status = (await live_api.get(f"/api/payments/checkout-sessions/{body['sessionId']}")).json()
    assert status["sessionStatus"] == "expired" and status["paymentStatus"] == "expired"


async def test_failed_payment_intent_event_from_stripe(
    live_api: httpx.AsyncClient, sdk: stripe.StripeClient
) -> None:
    """A declined test card (pm_card_chargeDeclined) on a PaymentIntent carrying our metadata."""
    db = live_api.app.state.payments.db  # type: ignore[attr-defined]
    since = int(time.time())
    invoice_id = snapshot().id
    intent = await sdk.v1.payment_intents.create_async(params={
        "amount": 1_000, "currency": "eur", "payment_method_types": ["card"],
        "metadata": {"invoice_id": invoice_id},
    })
    with pytest.raises(stripe.CardError):
        await sdk.v1.payment_intents.confirm_async(intent.id, params={"payment_method": "pm_card_chargeDeclined"})
    [failed] = await _events_for(sdk, intent.id, "payment_intent.payment_failed", since)
    assert (await post_webhook(live_api, failed, secret=LIVE_SECRET)).status_code == 200
    [row] = await wait_processed(db, [failed["id"]])
    assert row.status == "processed", row.outcome


async def test_setup_command_against_test_mode() -> None:
    from services.payments.stripe.setup import run

    url = os.environ.get("STRIPE_LIVE_SETUP_WEBHOOK_URL")
    settings = PaymentsSettings(stripe_secret_key=KEY, stripe_api_base=None)
    args = argparse.Namespace(dry_run=url is None, webhook_url=url or "https://billing.example.invalid/webhooks/stripe",
                              portal_return_url="https://billing.example.invalid/portal", catalog=None, json=False)
    first = await run(args, settings)
    assert {a.kind for a in first.actions} >= {"webhook_endpoint", "product", "price", "portal_configuration"}
    if url:
        second = await run(args, settings)
        assert second.writes == 0, second.lines()
