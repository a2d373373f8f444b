"""HTTP API of the payments service on real PostgreSQL, Kafka and the Stripe stand-in: Pay Now (paid on
the stand-in's hosted checkout page, confirmed by its signed webhook), manual payments, payment history."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from contracts.invoice import InvoiceEventType
from contracts.payment import PaymentEventType, PaymentEventV1
from deploy.infra import StripeStandin
from services.payments.models import CheckoutSession, StripeCustomer
from services.payments.tests.conftest import (
    ADMIN,
    EventLog,
    FakeInvoiceReader,
    client_headers,
    payments_of,
    publish_invoice,
    snapshot,
    wait_for_copy,
)

# -- Pay Now --------------------------------------------------------------------------------------


async def test_checkout_creates_a_stripe_session_through_the_stripe_standin(
    api: httpx.AsyncClient, db: Any, sent_invoice: Any, stripe_standin: StripeStandin
) -> None:
    response = await api.post(f"/api/invoices/{sent_invoice.id}/checkout",
                              headers=client_headers(sent_invoice.client_id))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["sessionId"].startswith("cs_")  # minted by the stand-in
    assert body["amount"] == 12_000 and body["currency"] == "EUR" and body["reused"] is False
    # the session's own URL, as Stripe answers it: here the stand-in's hosted page
    assert body["url"] == f"{stripe_standin.url}/checkout/{body['sessionId']}"
    assert body["stripeInvoiceId"] is None
    async with db.sessionmaker() as s:
        row = await s.get(CheckoutSession, body["sessionId"])
        assert row is not None and row.invoice_id == sent_invoice.id and row.url == body["url"]
        assert row.success_url == (f"http://gateway.test/portal/invoices/{sent_invoice.id}"
                                   f"?checkout=success&session_id={body['sessionId']}")
        customer = await s.get(StripeCustomer, sent_invoice.client_id)
        assert customer is not None and customer.stripe_customer_id.startswith("cus_")
        assert row.stripe_customer_id == customer.stripe_customer_id


async def test_checkout_double_click_gives_one_session(api: httpx.AsyncClient, db: Any, sent_invoice: Any) -> None:
    url = f"/api/invoices/{sent_invoice.id}/checkout"
    first, second = await asyncio.gather(api.post(url), api.post(url))
    assert first.status_code == second.status_code == 200
    assert first.json()["sessionId"] == second.json()["sessionId"]
    third = await api.post(url)
    assert third.json()["sessionId"] == first.json()["sessionId"] and third.json()["reused"] is True
    async with db.sessionmaker() as s:
        rows = (await s.scalars(select(CheckoutSession).where(CheckoutSession.invoice_id == sent_invoice.id))).all()
    assert len(rows) == 1


async def test_checkout_params_sent_to_stripe(db: Any, sent_invoice: Any, api: httpx.AsyncClient) -> None:
    """What goes to Stripe (recorded by a spy around the real adapter talking to stripe-mock)."""
    ctx = api.app.state.payments  # type: ignore[attr-defined]
    real = ctx.stripe
    seen: list[tuple[dict[str, Any], str]] = []

    class Spy:
        async def create_customer(self, params: dict[str, Any], *, idempotency_key: str) -> dict[str, Any]:
            return await real.create_customer(params, idempotency_key=idempotency_key)

        async def create_checkout_session(self, params: dict[str, Any], *, idempotency_key: str) -> dict[str, Any]:
            seen.append((params, idempotency_key))
            return await real.create_checkout_session(params, idempotency_key=idempotency_key)

    ctx.stripe = Spy()
    try:
        response = await api.post(f"/api/invoices/{sent_invoice.id}/checkout")
        assert response.status_code == 200, response.text
    finally:
        ctx.stripe = real
    [(params, key)] = seen
    assert params["mode"] == "payment"
    assert params["client_reference_id"] == sent_invoice.id
    assert params["metadata"]["invoice_id"] == sent_invoice.id
    assert params["metadata"]["client_id"] == sent_invoice.client_id
    assert params["payment_intent_data"]["metadata"]["invoice_id"] == sent_invoice.id
    assert params["line_items"][0]["price_data"] == {
        "currency": "eur", "unit_amount": 12_000, "product_data": {"name": "Invoice 2026-0001"}}
    assert params["payment_method_types"] == ["card"]
    assert params["success_url"].startswith(f"http://gateway.test/portal/invoices/{sent_invoice.id}?checkout=success")
    assert "{CHECKOUT_SESSION_ID}" in params["success_url"]
    assert params["cancel_url"] == f"http://gateway.test/portal/invoices/{sent_invoice.id}?checkout=cancelled"
    assert key.startswith(f"checkout:{sent_invoice.id}:v2:12000:EUR:")


async def test_checkout_refused_for_draft_paid_cancelled(api: httpx.AsyncClient, producer: Any, db: Any) -> None:
    for status in ("DRAFT", "PAID", "CANCELLED"):
        snap = snapshot(status=status, amount_paid=12_000 if status == "PAID" else 0)
        await publish_invoice(producer, snap)
        await wait_for_copy(db, snap.id, snap.version)
        response = await api.post(f"/api/invoices/{snap.id}/checkout")
        assert response.status_code == 409, (status, response.text)
        error = response.json()["error"]
        assert error["code"] == "invoice_not_payable" and error["details"] == {"status": status}


async def test_checkout_of_someone_elses_or_unknown_invoice_is_404(
    api: httpx.AsyncClient, sent_invoice: Any, invoice_reader: FakeInvoiceReader
) -> None:
    other = client_headers(str(uuid.uuid4()))
    response = await api.post(f"/api/invoices/{sent_invoice.id}/checkout", headers=other)
    assert response.status_code == 404
    unknown = str(uuid.uuid4())
    response = await api.post(f"/api/invoices/{unknown}/checkout")
    assert response.status_code == 404 and unknown in invoice_reader.calls  # asked the invoice service first
    assert (await api.post("/api/invoices/not-a-uuid/checkout")).status_code == 422


async def test_checkout_of_an_invoice_only_the_invoice_service_knows(
    api: httpx.AsyncClient, invoice_reader: FakeInvoiceReader
) -> None:
    snap = snapshot()
    invoice_reader.invoices[snap.id] = snap  # no event yet: the HTTP fallback serves it
    response = await api.post(f"/api/invoices/{snap.id}/checkout")
    assert response.status_code == 200, response.text


async def test_the_standin_checkout_page_pays_through_its_signed_webhook(
    api: httpx.AsyncClient, db: Any, sent_invoice: Any, payment_events: EventLog, standin: StripeStandin
) -> None:
    checkout = (await api.post(f"/api/invoices/{sent_invoice.id}/checkout")).json()
    async with httpx.AsyncClient(timeout=20) as browser:  # a person on the hosted page: no login
        page = await browser.get(checkout["url"])
        assert page.status_code == 200 and "€120.00" in page.text and 'data-testid="pay"' in page.text

        pay_url = f"{checkout['url']}/pay"
        first, second = await asyncio.gather(browser.post(pay_url), browser.post(pay_url))  # double click
        for response in (first, second):
            assert response.status_code == 303
            assert response.headers["location"] == (f"http://gateway.test/portal/invoices/{sent_invoice.id}"
                                                    f"?checkout=success&session_id={checkout['sessionId']}")
        # the stand-in's delivery, signed as Stripe signs, reached /webhooks/stripe: one payment
        [event] = await payment_events.wait_for(sent_invoice.id, PaymentEventType.SUCCEEDED)
        data = event.data_as(PaymentEventV1)
        assert data.stripe_checkout_session_id == checkout["sessionId"] and data.amount == 12_000
        assert data.method == "card" and data.stripe_payment_intent_id

        status = await api.get(f"/api/payments/checkout-sessions/{checkout['sessionId']}",
                               headers=client_headers(sent_invoice.client_id))
        assert status.status_code == 200 and status.json()["paymentStatus"] == "paid"
        assert await asyncio.to_thread(standin.flush, 10)
        await payment_events.settle()
        assert len(payment_events.matching(sent_invoice.id, PaymentEventType.SUCCEEDED)) == 1
        closed = await browser.get(checkout["url"])
        assert 'data-testid="closed"' in closed.text
    [completed] = await asyncio.to_thread(standin.events, "checkout.session.completed", checkout["sessionId"])
    assert [d["status"] for d in completed["deliveries"]] == ["delivered"]


async def test_the_standin_decline_publishes_payment_failed(
    api: httpx.AsyncClient, sent_invoice: Any, payment_events: EventLog, standin: StripeStandin
) -> None:
    checkout = (await api.post(f"/api/invoices/{sent_invoice.id}/checkout")).json()
    status = await api.get(f"/api/payments/checkout-sessions/{checkout['sessionId']}")
    assert status.json()["paymentStatus"] == "processing"
    async with httpx.AsyncClient(timeout=20) as browser:
        response = await browser.post(f"{checkout['url']}/decline")
        assert response.status_code == 303 and response.headers["location"] == f"{checkout['url']}?declined=1"
        [failed] = await payment_events.wait_for(sent_invoice.id, PaymentEventType.FAILED)
        assert failed.data_as(PaymentEventV1).invoice_id == sent_invoice.id
        cancel = await browser.post(f"{checkout['url']}/cancel")
        assert cancel.status_code == 303 and cancel.headers["location"].endswith("?checkout=cancelled")


async def test_no_checkout_page_lives_in_the_payments_service(
    api: httpx.AsyncClient, stripe_standin: StripeStandin
) -> None:
    assert (await api.get("/portal/checkout/cs_test_nope", headers={})).status_code == 404
    assert (await api.post("/portal/checkout/cs_test_nope/pay", headers={})).status_code == 404
    async with httpx.AsyncClient(timeout=20) as browser:  # the stand-in's page for a session it never made
        assert (await browser.get(f"{stripe_standin.url}/checkout/cs_test_nope")).status_code == 404
        assert (await browser.post(f"{stripe_standin.url}/checkout/cs_test_nope/pay")).status_code == 404


# -- manual payments ------------------------------------------------------------------------------


async def test_mark_paid_partial_then_rest_and_overpayment_refused(
    api: httpx.AsyncClient, db: Any, sent_invoice: Any, payment_events: EventLog
) -> None:
    url = f"/api/invoices/{sent_invoice.id}/mark-paid"
    response = await api.post(url, json={"amount": 5_000, "method": "bank_transfer", "reference": "SEPA 42"})
    assert response.status_code == 201, response.text
    first = response.json()
    assert first["amount"] == 5_000 and first["currency"] == "EUR" and first["method"] == "bank_transfer"
    assert first["source"] == "manual" and first["status"] == "succeeded" and first["flags"] == ["partial"]
    [event] = await payment_events.wait_for(sent_invoice.id, PaymentEventType.RECORDED)
    data = event.data_as(PaymentEventV1)
    assert data.payment_id == first["id"] and data.amount == 5_000 and data.reference == "SEPA 42"

    # the invoice service has not applied it yet (no snapshot): 7000 is what is left, not 12000
    response = await api.post(url, json={"amount": 7_001, "method": "cash"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "overpayment" and error["details"]["amountDue"] == 7_000
    assert error["details"]["pending"] == 5_000

    response = await api.post(url, json={"amount": 7_000, "method": "cheque", "paidAt": "2026-03-01T10:00:00Z"})
    assert response.status_code == 201 and response.json()["flags"] == []
    assert response.json()["paidAt"] == "2026-03-01T10:00:00Z"
    response = await api.post(url, json={"amount": 1, "method": "other"})
    assert response.status_code == 422 and response.json()["error"]["code"] == "overpayment"
    assert len(await payments_of(db, sent_invoice.id)) == 2


async def test_mark_paid_concurrent_requests_never_overpay(
    api: httpx.AsyncClient, db: Any, sent_invoice: Any
) -> None:
    url = f"/api/invoices/{sent_invoice.id}/mark-paid"
    responses = await asyncio.gather(*[api.post(url, json={"amount": 5_000, "method": "cash"}) for _ in range(4)])
    assert sorted(r.status_code for r in responses) == [201, 201, 422, 422]
    assert sum(p.amount for p in await payments_of(db, sent_invoice.id)) == 10_000


async def test_mark_paid_counts_applied_payments_once(
    api: httpx.AsyncClient, db: Any, producer: Any, sent_invoice: Any
) -> None:
    url = f"/api/invoices/{sent_invoice.id}/mark-paid"
    first = (await api.post(url, json={"amount": 4_000, "method": "cash"})).json()
    applied = snapshot(invoice_id=sent_invoice.id, client_id=sent_invoice.client_id, status="PARTIAL",
                       amount_paid=4_000, version=4, cause_id=first["id"])
    await publish_invoice(producer, applied, InvoiceEventType.PARTIALLY_PAID)
    await wait_for_copy(db, sent_invoice.id, 4)
    for _ in range(100):
        listed = (await api.get("/api/payments", params={"invoiceId": sent_invoice.id})).json()["items"]
        if listed[0]["applied"]:
            break
        await asyncio.sleep(0.05)
    assert listed[0]["applied"] is True
    # amountPaid 4000 (applied) + nothing pending: 8000 left
    assert (await api.post(url, json={"amount": 8_001, "method": "cash"})).status_code == 422
    assert (await api.post(url, json={"amount": 8_000, "method": "cash"})).status_code == 201


async def test_mark_paid_refusals(api: httpx.AsyncClient, producer: Any, db: Any, sent_invoice: Any) -> None:
    for status in ("DRAFT", "PAID", "CANCELLED"):
        snap = snapshot(status=status, amount_paid=12_000 if status == "PAID" else 0)
        await publish_invoice(producer, snap)
        await wait_for_copy(db, snap.id, snap.version)
        response = await api.post(f"/api/invoices/{snap.id}/mark-paid", json={"amount": 100, "method": "cash"})
        assert response.status_code == 409, (status, response.text)
        assert response.json()["error"]["code"] == "invoice_not_payable"

    url = f"/api/invoices/{sent_invoice.id}/mark-paid"
    assert (await api.post(f"/api/invoices/{uuid.uuid4()}/mark-paid",
                           json={"amount": 100, "method": "cash"})).status_code == 404
    bad_bodies = [
        {"amount": 0, "method": "cash"},
        {"amount": -5, "method": "cash"},
        {"amount": 10.5, "method": "cash"},
        {"amount": "100", "method": "cash"},
        {"amount": 100, "method": "bitcoin"},
        {"amount": 100},
        {"method": "cash"},
        {"amount": 100, "method": "cash", "paidAt": "yesterday"},
        {"amount": 100, "method": "cash", "paidAt": "2026-03-01T10:00:00"},  # no timezone
        {"amount": 100, "method": "cash", "paidAt": "2999-01-01T00:00:00Z"},
        {"amount": 100, "method": "cash", "currency": "USD"},
        {"amount": 100, "method": "cash", "reference": "x" * 201},
        {"amount": 100, "method": "cash", "unexpected": True},
        {"amount": 10**15, "method": "cash"},
    ]
    for body in bad_bodies:
        response = await api.post(url, json=body)
        assert response.status_code == 422, (body, response.status_code, response.text)
        assert "error" in response.json()
    response = await api.post(url, content=b"not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    # clients cannot record payments
    response = await api.post(url, json={"amount": 100, "method": "cash"},
                              headers=client_headers(sent_invoice.client_id))
    assert response.status_code == 403
    assert await payments_of(db, sent_invoice.id) == []


# -- history --------------------------------------------------------------------------------------


async def test_history_per_invoice_and_per_client_with_isolation(
    api: httpx.AsyncClient, producer: Any, db: Any
) -> None:
    client_a, client_b = str(uuid.uuid4()), str(uuid.uuid4())
    a1 = snapshot(client_id=client_a)
    a2 = snapshot(client_id=client_a)
    b1 = snapshot(client_id=client_b)
    for snap in (a1, a2, b1):
        await publish_invoice(producer, snap)
        await wait_for_copy(db, snap.id, snap.version)
    for snap, amounts in ((a1, [1_000, 2_000, 3_000]), (a2, [500]), (b1, [700])):
        for amount in amounts:
            r = await api.post(f"/api/invoices/{snap.id}/mark-paid", json={"amount": amount, "method": "cash"})
            assert r.status_code == 201

    page = (await api.get("/api/payments", params={"invoiceId": a1.id})).json()
    assert page["total"] == 3 and [p["amount"] for p in page["items"]] == [3_000, 2_000, 1_000]
    page = (await api.get("/api/payments", params={"clientId": client_a, "limit": 2})).json()
    assert page["total"] == 4 and len(page["items"]) == 2 and page["hasMore"] is True
    page2 = (await api.get("/api/payments", params={"clientId": client_a, "limit": 2,
                                                    "cursor": page["nextCursor"]})).json()
    assert {p["id"] for p in page["items"]}.isdisjoint({p["id"] for p in page2["items"]})
    assert len(page2["items"]) == 2 and page2["hasMore"] is False and page2["nextCursor"] is None

    as_a = client_headers(client_a)
    mine = (await api.get("/api/payments", headers=as_a)).json()
    assert mine["total"] == 4 and {p["clientId"] for p in mine["items"]} == {client_a}
    assert (await api.get("/api/payments", params={"invoiceId": b1.id}, headers=as_a)).status_code == 404
    assert (await api.get("/api/payments", params={"clientId": client_b}, headers=as_a)).status_code == 404
    b_payment = (await api.get("/api/payments", params={"invoiceId": b1.id})).json()["items"][0]
    assert (await api.get(f"/api/payments/{b_payment['id']}", headers=as_a)).status_code == 404
    assert (await api.get(f"/api/payments/{b_payment['id']}", headers=ADMIN)).status_code == 200
    assert (await api.get("/api/payments", params={"limit": 0})).status_code == 422
    assert (await api.get("/api/payments", params={"pageSize": 2})).status_code == 400  # unknown, named
    # a cursor belongs to its filters
    other = await api.get("/api/payments", params={"clientId": client_b, "cursor": page["nextCursor"]})
    assert other.status_code == 400 and other.json()["error"]["code"] == "invalid_cursor"
    assert (await api.get("/api/payments", params={"invoiceId": "nope"})).status_code == 422


async def test_a_lagging_copy_is_refreshed_from_the_invoice_service_before_refusing(
    api: httpx.AsyncClient, producer: Any, db: Any, invoice_reader: FakeInvoiceReader
) -> None:
    """The invoice.sent event is still on its way (the copy says DRAFT) when the admin records a
    payment: the service re-reads the invoice (and its ledger) instead of refusing."""
    draft = snapshot(status="DRAFT", version=1)
    await publish_invoice(producer, draft, InvoiceEventType.CREATED)
    await wait_for_copy(db, draft.id, 1)
    url = f"/api/invoices/{draft.id}/mark-paid"
    first = await api.post(url, json={"amount": 2_000, "method": "cash"})
    assert first.status_code == 409  # nobody knows better yet

    invoice_reader.invoices[draft.id] = snapshot(invoice_id=draft.id, client_id=draft.client_id, status="SENT",
                                                 version=2)
    first = await api.post(url, json={"amount": 2_000, "method": "cash"})
    assert first.status_code == 201, first.text
    # the invoice service applied it (its ledger says so) but the PARTIAL event has not arrived
    invoice_reader.invoices[draft.id] = snapshot(invoice_id=draft.id, client_id=draft.client_id,
                                                 status="PARTIAL", amount_paid=2_000, version=3)
    invoice_reader.ledgers[draft.id] = [(first.json()["id"], "payment")]
    assert (await api.post(url, json={"amount": 10_001, "method": "cash"})).status_code == 422
    assert (await api.post(url, json={"amount": 10_000, "method": "cash"})).status_code == 201


async def test_the_invoice_service_is_asked_before_any_lock_is_taken(
    api: httpx.AsyncClient, producer: Any, db: Any, invoice_reader: FakeInvoiceReader
) -> None:
    """mark-paid and Pay Now re-read a lagging copy (and fetch a missing one) over HTTP: while the
    invoice service answers, neither the copy's row nor the checkout lock of the invoice is held."""
    lagging = [snapshot(status="DRAFT", version=1) for _ in range(2)]
    for snap in lagging:
        await publish_invoice(producer, snap, InvoiceEventType.CREATED)
        await wait_for_copy(db, snap.id, 1)
        invoice_reader.invoices[snap.id] = snapshot(invoice_id=snap.id, client_id=snap.client_id, version=2)
    unseen = snapshot()  # no event yet: only the invoice service knows it
    invoice_reader.invoices[unseen.id] = unseen
    held: list[tuple[str, str]] = []

    async def probe(invoice_id: str) -> None:
        try:  # NOWAIT: fails at once if the request's transaction holds the row
            async with db.sessionmaker() as s, s.begin():
                await s.execute(text("SELECT 1 FROM invoices WHERE id = :id FOR UPDATE NOWAIT"), {"id": invoice_id})
        except DBAPIError:
            held.append((invoice_id, "invoice row"))
        async with db.sessionmaker() as s, s.begin():
            free = await s.scalar(text("SELECT pg_try_advisory_xact_lock(hashtextextended(:k, 0))"),
                                  {"k": f"checkout:{invoice_id}"})
        if not free:
            held.append((invoice_id, "checkout lock"))

    invoice_reader.probe = probe
    calls = len(invoice_reader.calls)
    try:
        paid = await api.post(f"/api/invoices/{lagging[0].id}/mark-paid", json={"amount": 100, "method": "cash"})
        checkout = await api.post(f"/api/invoices/{lagging[1].id}/checkout")
        unseen_paid = await api.post(f"/api/invoices/{unseen.id}/mark-paid", json={"amount": 100, "method": "cash"})
    finally:
        invoice_reader.probe = None
    assert (paid.status_code, checkout.status_code, unseen_paid.status_code) == (201, 200, 201), checkout.text
    assert len(invoice_reader.calls) - calls == 3  # each was asked
    assert held == []
