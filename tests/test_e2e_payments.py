"""Issue 3 end to end, through the gateway on real Kafka, Postgres and the Stripe stand-in (in front of
stripe-mock): Pay Now on the stand-in's hosted checkout page, whose signed webhook reaches payments,
Stripe-signed webhooks (repeated, out of order, failed) moving the invoice, and the payment history;
a subscription's Stripe invoice charged in the stand-in becomes our invoice, PAID through payments, and
Pay now on one opens Stripe's hosted invoice page."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import pytest
import stripe

from deploy.infra import ServiceProcess, StripeStandin
from deploy.services import GATEWAY, InfraEndpoints
from services.payments.stripe import testing as stripe_events
from tests.conftest import TopicWatcher, login, wait_until

# stripe-python's HTTPXClient passes the form body as `data=`; httpx warns about it on every call.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")


async def _sent_invoice(admin: httpx.AsyncClient, amount: int = 25_000) -> tuple[dict[str, Any], dict[str, Any]]:
    client = (await admin.post("/api/clients", json={"name": f"Pay {uuid.uuid4().hex[:6]}",
                                                     "email": "pay@pay.example.com", "currency": "EUR"})).json()
    invoice = (await admin.post("/api/invoices", json={
        "clientId": client["id"], "items": [{"description": "Work", "quantity": "1", "unitPrice": amount}],
    })).json()
    sent = await admin.post(f"/api/invoices/{invoice['id']}/send")
    assert sent.status_code == 200, sent.text
    return client, sent.json()


async def _client_login(admin: httpx.AsyncClient, gateway_url: str, client_id: str) -> httpx.AsyncClient:
    email = f"u-{uuid.uuid4().hex[:8]}@pay.example.com"
    created = await admin.post("/api/users", json={"email": email, "password": "pay-pass-123", "role": "client",
                                                   "clientId": client_id})
    assert created.status_code == 201, created.text
    return await login(gateway_url, email, "pay-pass-123")


async def test_pay_now_on_the_standin_checkout_turns_the_invoice_paid(
    admin: httpx.AsyncClient, stack: dict[str, ServiceProcess], kafka_events: TopicWatcher,
    services_standin: StripeStandin,
) -> None:
    client, invoice = await _sent_invoice(admin)
    me = await _client_login(admin, stack[GATEWAY].url, client["id"])
    try:
        first = await me.post(f"/api/invoices/{invoice['id']}/checkout")
        second = await me.post(f"/api/invoices/{invoice['id']}/checkout")  # double click
        assert first.status_code == 200, first.text
        checkout = first.json()
        assert second.json()["sessionId"] == checkout["sessionId"]
        # Stripe's hosted page: the stand-in's, the only thing that differs from Stripe's test mode
        assert checkout["url"] == f"{services_standin.url}/checkout/{checkout['sessionId']}"

        async with httpx.AsyncClient(timeout=20) as browser:  # no login: the page is public
            page = await browser.get(checkout["url"])
            assert page.status_code == 200 and "€250.00" in page.text
            paid = await browser.post(f"{checkout['url']}/pay")
            assert paid.status_code == 303
            assert paid.headers["location"] == (f"{stack[GATEWAY].url}/portal/invoices/{invoice['id']}"
                                                f"?checkout=success&session_id={checkout['sessionId']}")

        status = await wait_until(me, f"/api/payments/checkout-sessions/{checkout['sessionId']}",
                                  lambda b: b["paymentStatus"] == "paid")
        assert status["invoiceId"] == invoice["id"]
        done = await wait_until(me, f"/api/invoices/{invoice['id']}", lambda b: b["status"] == "PAID")
        assert done["amountPaid"] == 25_000 and done["amountDue"] == 0
        history = (await me.get("/api/payments", params={"invoiceId": invoice["id"]})).json()
        assert [(p["amount"], p["status"], p["source"]) for p in history["items"]] == [(25_000, "succeeded", "stripe")]
        assert (await me.post(f"/api/invoices/{invoice['id']}/checkout")).status_code == 409  # already paid
    finally:
        await me.aclose()
    await kafka_events.wait_for(invoice["id"], "invoice.paid")
    assert len(kafka_events.matching(invoice["id"], "payment.succeeded")) == 1


async def test_signed_webhooks_repeated_and_out_of_order(
    admin: httpx.AsyncClient, stack: dict[str, ServiceProcess], infra_endpoints: InfraEndpoints,
    kafka_events: TopicWatcher,
) -> None:
    _, invoice = await _sent_invoice(admin, amount=40_000)
    secret = infra_endpoints.stripe_webhook_secret
    session_id, pi = f"cs_test_{uuid.uuid4().hex}", f"pi_{uuid.uuid4().hex}"
    now = int(time.time())

    def event(event_type: str, payment_status: str, created: int) -> dict[str, Any]:
        session = stripe_events.checkout_session(invoice_id=invoice["id"], amount_total=40_000, currency="eur",
                                                 session_id=session_id, payment_intent=pi,
                                                 payment_status=payment_status)
        return stripe_events.build_event(event_type, session, created=created)

    succeeded = event("checkout.session.async_payment_succeeded", "paid", now)
    completed = event("checkout.session.completed", "unpaid", now - 60)
    late_failure = event("checkout.session.async_payment_failed", "unpaid", now - 30)
    async with httpx.AsyncClient(base_url=stack[GATEWAY].url, timeout=20) as stripe_like:
        async def deliver(e: dict[str, Any]) -> int:
            body, headers = stripe_events.signed_request(e, secret)
            return (await stripe_like.post("/webhooks/stripe", content=body, headers=headers)).status_code

        codes = await asyncio.gather(*[deliver(succeeded) for _ in range(5)])
        assert codes == [200] * 5
        assert await deliver(completed) == 200
        assert await deliver(late_failure) == 200
        forged = stripe_events.signed_request(succeeded, "whsec_not_ours")
        assert (await stripe_like.post("/webhooks/stripe", content=forged[0], headers=forged[1])).status_code == 400

    done = await wait_until(admin, f"/api/invoices/{invoice['id']}", lambda b: b["status"] == "PAID")
    assert done["amountPaid"] == 40_000
    await asyncio.sleep(2)
    assert len(kafka_events.matching(invoice["id"], "payment.succeeded")) == 1
    assert kafka_events.matching(invoice["id"], "payment.failed") == []
    assert (await admin.get(f"/api/invoices/{invoice['id']}")).json()["status"] == "PAID"  # never backwards
    ledger = (await admin.get(f"/api/invoices/{invoice['id']}/payments")).json()["items"]
    assert [p["amount"] for p in ledger] == [40_000]


async def test_failed_payment_makes_the_invoice_overdue_and_a_later_payment_pays_it(
    admin: httpx.AsyncClient, stack: dict[str, ServiceProcess], infra_endpoints: InfraEndpoints,
) -> None:
    _, invoice = await _sent_invoice(admin, amount=10_000)
    pi = f"pi_{uuid.uuid4().hex}"
    intent = stripe_events.payment_intent(amount=10_000, currency="eur", invoice_id=invoice["id"], intent_id=pi)
    async with httpx.AsyncClient(base_url=stack[GATEWAY].url, timeout=20) as stripe_like:
        body, headers = stripe_events.signed_request(
            stripe_events.build_event("payment_intent.payment_failed", intent), infra_endpoints.stripe_webhook_secret)
        assert (await stripe_like.post("/webhooks/stripe", content=body, headers=headers)).status_code == 200
        await wait_until(admin, f"/api/invoices/{invoice['id']}", lambda b: b["status"] == "OVERDUE")

        session = stripe_events.checkout_session(invoice_id=invoice["id"], amount_total=6_000, currency="eur",
                                                 payment_intent=pi)
        body, headers = stripe_events.signed_request(
            stripe_events.build_event("checkout.session.completed", session), infra_endpoints.stripe_webhook_secret)
        assert (await stripe_like.post("/webhooks/stripe", content=body, headers=headers)).status_code == 200
    partial = await wait_until(admin, f"/api/invoices/{invoice['id']}", lambda b: b["amountPaid"] == 6_000)
    assert partial["status"] in ("OVERDUE", "PARTIAL") and partial["amountDue"] == 4_000  # underpaid: partial
    rest = await admin.post(f"/api/invoices/{invoice['id']}/mark-paid", json={"amount": 4_000, "method": "cash"})
    assert rest.status_code == 201, rest.text
    await wait_until(admin, f"/api/invoices/{invoice['id']}", lambda b: b["status"] == "PAID")
    payments = (await admin.get("/api/payments", params={"invoiceId": invoice["id"]})).json()["items"]
    assert sorted((p["amount"], p["status"]) for p in payments) == [(4_000, "succeeded"), (6_000, "succeeded")]
    assert [p["flags"] for p in payments if p["source"] == "stripe"] == [["underpayment"]]


# -- subscription invoices: the stand-in's Stripe Billing -> our invoice -> PAID -----------------------


async def _subscribed_client(admin: httpx.AsyncClient, sdk: Any, *, collection_method: str,
                             trial_days: int | None) -> tuple[dict[str, Any], Any, Any]:
    """A client of ours and, in the stand-in, its customer (on a test clock), a monthly price and a
    subscription carrying our client id, made with the SDK as the subscriptions service does."""
    client = (await admin.post("/api/clients", json={"name": f"Retainer {uuid.uuid4().hex[:6]}",
                                                     "email": "retainer@pay.example.com", "currency": "EUR"})).json()
    clock = await sdk.v1.test_helpers.test_clocks.create_async(params={"frozen_time": int(time.time())})
    customer = await sdk.v1.customers.create_async(params={
        "email": client["email"], "metadata": {"client_id": client["id"]}, "test_clock": clock.id})
    product = await sdk.v1.products.create_async(params={"name": "Maintenance retainer"})
    price = await sdk.v1.prices.create_async(params={
        "product": product.id, "unit_amount": 30_000, "currency": "eur", "recurring": {"interval": "month"}})
    params: dict[str, Any] = {"customer": customer.id, "items": [{"price": price.id}],
                              "metadata": {"client_id": client["id"]}, "collection_method": collection_method}
    if trial_days:
        params["trial_period_days"] = trial_days
    if collection_method == "send_invoice":
        params["days_until_due"] = 14
    await sdk.v1.subscriptions.create_async(params=params)
    return client, clock, customer


async def _our_invoice_of_stripe(admin: httpx.AsyncClient, client_id: str, status: str) -> dict[str, Any]:
    page = await wait_until(admin, f"/api/invoices?clientId={client_id}",
                            lambda b: any(i["stripeInvoiceId"] and i["status"] == status for i in b["items"]))
    [invoice] = [i for i in page["items"] if i["stripeInvoiceId"]]
    return invoice


async def test_a_subscription_invoice_paid_in_the_standin_is_paid_here(
    admin: httpx.AsyncClient, stack: dict[str, ServiceProcess], services_standin: StripeStandin,
    kafka_events: TopicWatcher,
) -> None:
    """Stripe Billing (the stand-in) charges the renewal; payments republishes it, the invoice service makes
    our invoice of it, payments records Stripe's charge against it: PAID, once, even with every delivery
    twice and shuffled."""
    sdk = stripe.StripeClient("sk_test_local", base_addresses={"api": services_standin.url},
                              http_client=stripe.HTTPXClient(timeout=30), max_network_retries=0)
    await asyncio.to_thread(services_standin.configure, duplicate_deliveries=True, shuffle=True)
    try:
        client, clock, _ = await _subscribed_client(admin, sdk, collection_method="charge_automatically",
                                                    trial_days=7)
        await sdk.v1.test_helpers.test_clocks.advance_async(
            clock.id, params={"frozen_time": clock.frozen_time + 7 * 86_400 + 3_600})
        assert await asyncio.to_thread(services_standin.flush, 30)
        invoice = await _our_invoice_of_stripe(admin, client["id"], "PAID")
    finally:
        await asyncio.to_thread(services_standin.configure, duplicate_deliveries=False, shuffle=False)
    assert invoice["invoiceNumber"] and invoice["total"] == 30_000 and invoice["amountPaid"] == 30_000
    # Shuffled: a finalized (or draft) delivered after the same second's paid is stale and not republished.
    published = [e for e in kafka_events.matching(invoiceId=invoice["stripeInvoiceId"])
                 if e.type.startswith("stripe.invoice.")]
    assert published and published[-1].type == "stripe.invoice.paid"
    assert len({e.data["stripeEventId"] for e in published}) == len(published)  # each Stripe event once
    assert all(e.data["clientId"] == client["id"] for e in published)
    ledger = (await admin.get("/api/payments", params={"invoiceId": invoice["id"]})).json()["items"]
    assert [(p["amount"], p["method"], p["source"], p["reference"]) for p in ledger] == [
        (30_000, "card", "stripe", invoice["stripeInvoiceId"])]
    await kafka_events.settle()
    assert len(kafka_events.matching(invoice["id"], "payment.succeeded")) == 1
    assert len(kafka_events.matching(invoice["id"], "invoice.paid")) == 1


async def test_pay_now_on_a_subscription_invoice_pays_stripes_invoice(
    admin: httpx.AsyncClient, stack: dict[str, ServiceProcess], services_standin: StripeStandin,
) -> None:
    """A retainer billed by invoice: Pay now opens the Stripe invoice's hosted page (no second Checkout)."""
    sdk = stripe.StripeClient("sk_test_local", base_addresses={"api": services_standin.url},
                              http_client=stripe.HTTPXClient(timeout=30), max_network_retries=0)
    client, _, _ = await _subscribed_client(admin, sdk, collection_method="send_invoice", trial_days=None)
    invoice = await _our_invoice_of_stripe(admin, client["id"], "SENT")
    me = await _client_login(admin, stack[GATEWAY].url, client["id"])
    try:
        link = await me.post(f"/api/invoices/{invoice['id']}/checkout")
        assert link.status_code == 200, link.text
        body = link.json()
        assert body["url"] == f"{services_standin.url}/invoice/{invoice['stripeInvoiceId']}"
        assert body["stripeInvoiceId"] == invoice["stripeInvoiceId"] and body["sessionId"] is None
        async with httpx.AsyncClient(timeout=20) as browser:
            assert (await browser.post(f"{body['url']}/pay")).status_code == 303
        done = await wait_until(me, f"/api/invoices/{invoice['id']}", lambda b: b["status"] == "PAID")
        assert done["amountPaid"] == 30_000
        assert (await me.post(f"/api/invoices/{invoice['id']}/checkout")).status_code == 409
    finally:
        await me.aclose()
