"""A subscription's Stripe invoices on real Kafka, PostgreSQL and the Stripe stand-in: republished
normalized on billing.stripe (created, finalized, paid, payment_failed) with what the invoice service
needs for our copy; a paid one becomes one card payment of our invoice of it, whichever of the two
(Stripe's charge, our copy) comes first; Pay now on such an invoice opens Stripe's hosted invoice page.

The flows through the stand-in create the customer, price and subscription with the SDK (as the
subscriptions service does), advance the customer's test clock, and play the invoice service's part
by publishing our invoice's snapshot with its `stripeInvoiceId`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
import stripe
from aiokafka import AIOKafkaProducer
from sqlalchemy import select

from contracts.invoice import InvoiceEventType
from contracts.payment import PaymentEventType, PaymentEventV1
from contracts.stripe import StripeInvoiceV1
from deploy.infra import StripeStandin
from services.payments.models import CheckoutSession, Payment, StripeEvent
from services.payments.stripe import testing as stripe_events
from services.payments.tests.conftest import (
    EventLog,
    client_headers,
    payments_of,
    post_webhook,
    publish_invoice,
    snapshot,
    wait_for_copy,
    wait_processed,
)

DAY = 86_400
Sdk = Any  # stripe.StripeClient; its TypedDict params would need a cast on every call


# -- hand-built deliveries --------------------------------------------------------------------------


async def test_created_and_finalized_are_republished_with_what_our_copy_needs(
    api: httpx.AsyncClient, db: Any, stripe_topic: EventLog
) -> None:
    sub_id, client_id, now = stripe_events.stripe_id("sub"), str(uuid.uuid4()), int(time.time())
    lines = [
        stripe_events.stripe_invoice_line(-500, unit_amount_decimal="-500", proration=True, subscription_id=sub_id,
                                          description="Unused time on Basic", price_id="price_basic"),
        stripe_events.stripe_invoice_line(2_997, quantity=3, unit_amount_decimal="999.0033",
                                          subscription_id=sub_id, price_id="price_pro"),
    ]
    draft = stripe_events.stripe_invoice(subscription_id=sub_id, client_id=client_id, status="draft",
                                         amount_due=2_497, lines=lines, created=now,
                                         collection_method="send_invoice", billing_reason="subscription_update")
    draft["parent"]["subscription_details"]["metadata"].update({"plan_id": "plan-pro", "price_id": "our-price"})
    final = {**draft, "status": "open", "number": "ABC-0001",
             "hosted_invoice_url": "https://invoice.stripe.com/i/acct_1/in_1",
             "status_transitions": {"finalized_at": now, "paid_at": None}}
    created = stripe_events.build_event("invoice.created", draft, created=now)
    finalized = stripe_events.build_event("invoice.finalized", final, created=now)
    # the same second, out of order: the draft after its finalization is stale (it would move it back)
    for event in (finalized, created):
        assert (await post_webhook(api, event)).status_code == 200
    rows = {r.id: r for r in await wait_processed(db, [created["id"], finalized["id"]])}
    assert rows[finalized["id"]].status == "processed"
    assert rows[created["id"]].status == "ignored" and "stale" in (rows[created["id"]].outcome or "")

    [event] = await stripe_topic.wait_for(sub_id, "stripe.invoice.finalized")
    data = event.data_as(StripeInvoiceV1)
    assert (data.invoice_id, data.number, data.status, data.subscription_id) == (final["id"], "ABC-0001", "open",
                                                                                 sub_id)
    assert (data.client_id, data.plan_id, data.price_id) == (client_id, "plan-pro", "price_pro")
    assert data.subscription_metadata == {"client_id": client_id, "plan_id": "plan-pro", "price_id": "our-price"}
    assert (data.currency, data.subtotal, data.total, data.amount_due, data.amount_paid) == ("EUR", 2_497, 2_497,
                                                                                            2_497, 0)
    assert data.created is not None and data.finalized_at == data.created and data.due_date is not None
    assert data.period_start is not None and data.period_end is not None
    assert (data.billing_reason, data.collection_method) == ("subscription_update", "send_invoice")
    assert data.hosted_invoice_url == "https://invoice.stripe.com/i/acct_1/in_1"
    credit, debit = data.lines
    assert (credit.amount, credit.quantity, credit.unit_amount, credit.proration, credit.price_id) == (
        -500, 1, -500, True, "price_basic")
    assert (debit.amount, debit.quantity, debit.unit_amount, debit.unit_amount_decimal, debit.proration) == (
        2_997, 3, 999, Decimal("999.0033"), False)
    assert debit.description and debit.period_start is not None and debit.period_end is not None
    await stripe_topic.settle(1.0)
    assert stripe_topic.matching(sub_id, "stripe.invoice.created") == []


async def _stripe_paid_invoice(api: httpx.AsyncClient, db: Any, snap: Any, *, amount: int = 12_000,
                               event_type: str = "invoice.paid", created: int | None = None,
                               stripe_invoice_id: str | None = None) -> dict[str, Any]:
    status = "paid" if event_type == "invoice.paid" else "open"
    obj = stripe_events.stripe_invoice(subscription_id=f"sub_{snap.id[:8]}", client_id=snap.client_id,
                                       amount_due=amount, status=status, invoice_id=stripe_invoice_id,
                                       created=created)
    event = stripe_events.build_event(event_type, obj, created=created)
    assert (await post_webhook(api, event)).status_code == 200
    await wait_processed(db, [event["id"]])
    return event


async def test_paid_before_our_copy_exists_becomes_one_card_payment_when_it_arrives(
    api: httpx.AsyncClient, db: Any, producer: AIOKafkaProducer, payment_events: EventLog, stripe_topic: EventLog
) -> None:
    stripe_invoice_id = stripe_events.stripe_id("in")
    snap = snapshot(stripe_invoice_id=stripe_invoice_id)
    paid = await _stripe_paid_invoice(api, db, snap, stripe_invoice_id=stripe_invoice_id)
    # republished at once, whether or not our invoice exists yet; no payment without our invoice
    await stripe_topic.wait_for(paid["data"]["object"]["parent"]["subscription_details"]["subscription"],
                                "stripe.invoice.paid")
    assert await payments_of(db, snap.id) == []
    async with db.sessionmaker() as s:
        row = await s.get(StripeEvent, paid["id"])
    assert row is not None and row.status == "processed" and "when our invoice of it arrives" in (row.outcome or "")

    await publish_invoice(producer, snap)  # the invoice service made our copy: its snapshot names Stripe's
    [event] = await payment_events.wait_for(snap.id, PaymentEventType.SUCCEEDED)
    data = event.data_as(PaymentEventV1)
    assert (data.amount, data.currency, data.method, data.reference) == (12_000, "EUR", "card", stripe_invoice_id)
    assert data.client_id == snap.client_id and data.stripe_event_id == paid["id"]

    # Stripe repeats itself, the snapshot comes again and a newer one: still one payment
    assert (await post_webhook(api, paid)).status_code == 200
    again = stripe_events.build_event("invoice.paid", paid["data"]["object"])
    assert (await post_webhook(api, again)).status_code == 200
    await wait_processed(db, [again["id"]])
    await publish_invoice(producer, snap)
    await publish_invoice(producer, snap.model_copy(update={"version": snap.version + 1}), InvoiceEventType.VIEWED)
    await wait_for_copy(db, snap.id, snap.version + 1)
    await payment_events.settle()
    assert len(payment_events.matching(snap.id, PaymentEventType.SUCCEEDED)) == 1
    [payment] = await payments_of(db, snap.id)
    assert (payment.source, payment.method, payment.status, payment.stripe_invoice_id) == (
        "stripe", "card", "succeeded", stripe_invoice_id)
    assert payment.flags == [] and not payment.held


async def test_copy_first_a_failed_attempt_then_the_payment_and_a_late_failure(
    api: httpx.AsyncClient, db: Any, producer: AIOKafkaProducer, payment_events: EventLog, stripe_topic: EventLog
) -> None:
    stripe_invoice_id = stripe_events.stripe_id("in")
    snap = snapshot(stripe_invoice_id=stripe_invoice_id, total=4_900)
    await publish_invoice(producer, snap)
    await wait_for_copy(db, snap.id, snap.version)
    now = int(time.time())
    await _stripe_paid_invoice(api, db, snap, amount=4_900, event_type="invoice.payment_failed",
                               created=now - 60, stripe_invoice_id=stripe_invoice_id)
    [attempt] = await payments_of(db, snap.id)
    assert (attempt.status, attempt.amount, attempt.failure_code) == ("failed", 4_900, "invoice_payment_failed")
    # recorded only: the invoice service and notifications act on stripe.invoice.payment_failed
    sub_id = f"sub_{snap.id[:8]}"
    await stripe_topic.wait_for(sub_id, "stripe.invoice.payment_failed")
    assert payment_events.matching(snap.id, PaymentEventType.FAILED) == []

    await _stripe_paid_invoice(api, db, snap, amount=4_900, created=now, stripe_invoice_id=stripe_invoice_id)
    [event] = await payment_events.wait_for(snap.id, PaymentEventType.SUCCEEDED)
    assert event.data_as(PaymentEventV1).amount == 4_900
    late = await _stripe_paid_invoice(api, db, snap, amount=4_900, event_type="invoice.payment_failed",
                                      created=now - 30, stripe_invoice_id=stripe_invoice_id)
    async with db.sessionmaker() as s:
        row = await s.get(StripeEvent, late["id"])
    assert row is not None and row.status == "ignored"  # stale: the invoice is paid
    [payment] = await payments_of(db, snap.id)
    assert payment.id == attempt.id and payment.status == "succeeded" and payment.failure_code is None
    await payment_events.settle()
    assert len(payment_events.matching(snap.id, PaymentEventType.SUCCEEDED)) == 1
    assert payment_events.matching(snap.id, PaymentEventType.FAILED) == []


async def test_a_paid_invoice_in_another_currency_is_held(
    api: httpx.AsyncClient, db: Any, producer: AIOKafkaProducer, payment_events: EventLog
) -> None:
    stripe_invoice_id = stripe_events.stripe_id("in")
    snap = snapshot(stripe_invoice_id=stripe_invoice_id, currency="USD")
    await publish_invoice(producer, snap)
    await wait_for_copy(db, snap.id, snap.version)
    await _stripe_paid_invoice(api, db, snap, stripe_invoice_id=stripe_invoice_id)  # in EUR
    [payment] = await payments_of(db, snap.id)
    assert payment.held and payment.flags == ["currency_mismatch"] and payment.status == "succeeded"
    await payment_events.settle()
    assert payment_events.matching(snap.id) == []


# -- through the Stripe stand-in ----------------------------------------------------------------------


@pytest.fixture
async def sdk(standin: StripeStandin) -> AsyncIterator[Sdk]:
    client = stripe.StripeClient("sk_test_local", base_addresses={"api": standin.url},
                                 http_client=stripe.HTTPXClient(timeout=30), max_network_retries=0)
    yield client


async def _subscribed(sdk: Sdk, client_id: str, *, amount: int = 4_900, trial_days: int | None = 7,
                      collection_method: str = "charge_automatically") -> tuple[Any, Any, Any]:
    """A customer on a test clock, a monthly price and a subscription carrying our client id."""
    clock = await sdk.v1.test_helpers.test_clocks.create_async(params={"frozen_time": int(time.time())})
    customer = await sdk.v1.customers.create_async(params={
        "email": "billing@acme.test", "metadata": {"client_id": client_id}, "test_clock": clock.id})
    product = await sdk.v1.products.create_async(params={"name": f"Maintenance {uuid.uuid4().hex[:6]}"})
    price = await sdk.v1.prices.create_async(params={
        "product": product.id, "unit_amount": amount, "currency": "eur", "recurring": {"interval": "month"}})
    params: dict[str, Any] = {"customer": customer.id, "items": [{"price": price.id}],
                              "metadata": {"client_id": client_id, "plan_id": "plan-maintenance"},
                              "collection_method": collection_method}
    if trial_days:
        params["trial_period_days"] = trial_days
    if collection_method == "send_invoice":
        params["days_until_due"] = 14
    subscription = await sdk.v1.subscriptions.create_async(params=params)
    return clock, price, subscription


async def _advance(sdk: Sdk, standin: StripeStandin, clock: Any, seconds: int) -> Any:
    current = await sdk.v1.test_helpers.test_clocks.retrieve_async(clock.id)
    clock = await sdk.v1.test_helpers.test_clocks.advance_async(
        clock.id, params={"frozen_time": current.frozen_time + seconds})
    assert await asyncio.to_thread(standin.flush, 20)
    return clock


async def test_a_subscription_invoice_paid_in_the_standin_is_a_payment_of_our_invoice(
    sdk: Sdk, standin: StripeStandin, db: Any, producer: AIOKafkaProducer, payment_events: EventLog,
    stripe_topic: EventLog,
) -> None:
    client_id = str(uuid.uuid4())
    clock, price, subscription = await _subscribed(sdk, client_id)
    clock = await _advance(sdk, standin, clock, 7 * DAY + 3600)  # past the trial: the first invoice, charged

    [finalized] = await stripe_topic.wait_for(subscription.id, "stripe.invoice.finalized")
    data = finalized.data_as(StripeInvoiceV1)
    assert data.client_id == client_id and data.plan_id == "plan-maintenance" and data.price_id == price.id
    assert data.number and data.status == "open" and data.hosted_invoice_url and data.customer_id
    assert (data.total, data.currency, data.billing_reason) == (4_900, "EUR", "subscription_cycle")
    assert data.collection_method == "charge_automatically" and data.finalized_at is not None
    [line] = data.lines
    assert (line.amount, line.quantity, line.unit_amount, line.price_id, line.proration) == (
        4_900, 1, 4_900, price.id, False)
    assert line.period_end is not None and line.period_start is not None
    assert line.period_end - line.period_start >= timedelta(days=28)
    [paid] = await stripe_topic.wait_for(subscription.id, "stripe.invoice.paid")
    assert paid.data_as(StripeInvoiceV1).amount_paid == 4_900

    # our invoice of it (what the invoice service publishes): the payment is recorded against it
    ours = snapshot(client_id=client_id, total=4_900, stripe_invoice_id=data.invoice_id, number="2026-0042")
    await publish_invoice(producer, ours)
    [event] = await payment_events.wait_for(ours.id, PaymentEventType.SUCCEEDED)
    payment = event.data_as(PaymentEventV1)
    assert (payment.amount, payment.method, payment.reference) == (4_900, "card", data.invoice_id)

    # the renewal, every delivery twice and shuffled: still one payment for its invoice of ours
    await asyncio.to_thread(standin.configure, duplicate_deliveries=True, shuffle=True)
    renewal_ours = str(uuid.uuid4())
    await _advance(sdk, standin, clock, 31 * DAY)
    renewals = await stripe_topic.wait_for(subscription.id, "stripe.invoice.paid", count=2)
    renewal = next(e.data_as(StripeInvoiceV1) for e in renewals
                   if e.data_as(StripeInvoiceV1).invoice_id != data.invoice_id)
    assert renewal.billing_reason == "subscription_cycle" and renewal.amount_paid == 4_900
    snap = snapshot(invoice_id=renewal_ours, client_id=client_id, total=4_900, stripe_invoice_id=renewal.invoice_id)
    for _ in range(2):
        await publish_invoice(producer, snap)
    await payment_events.wait_for(renewal_ours, PaymentEventType.SUCCEEDED)
    assert await asyncio.to_thread(standin.flush, 20)
    await payment_events.settle(2.0)
    assert len(payment_events.matching(renewal_ours, PaymentEventType.SUCCEEDED)) == 1
    assert len(payment_events.matching(ours.id, PaymentEventType.SUCCEEDED)) == 1
    async with db.sessionmaker() as s:
        rows = (await s.scalars(select(Payment).where(
            Payment.stripe_invoice_id.in_([data.invoice_id, renewal.invoice_id])))).all()
    assert sorted((r.invoice_id, r.amount, r.status) for r in rows) == sorted(
        [(ours.id, 4_900, "succeeded"), (renewal_ours, 4_900, "succeeded")])
    # every stripe.invoice.* of the renewal went out once per Stripe event, and never backwards
    published = [e for e in stripe_topic.matching(subscription.id, invoiceId=renewal.invoice_id)
                 if e.type.startswith("stripe.invoice.")]
    ids = [e.data_as(StripeInvoiceV1).stripe_event_id for e in published]
    assert len(ids) == len(set(ids))
    assert published[-1].type == "stripe.invoice.paid"


async def test_pay_now_on_a_stripe_backed_invoice_opens_stripes_hosted_invoice_page(
    sdk: Sdk, standin: StripeStandin, api: httpx.AsyncClient, db: Any, producer: AIOKafkaProducer,
    payment_events: EventLog, stripe_topic: EventLog,
) -> None:
    client_id = str(uuid.uuid4())
    _, _, subscription = await _subscribed(sdk, client_id, trial_days=None, collection_method="send_invoice")
    [finalized] = await stripe_topic.wait_for(subscription.id, "stripe.invoice.finalized")
    stripe_invoice = finalized.data_as(StripeInvoiceV1)
    assert stripe_invoice.status == "open" and stripe_invoice.due_date is not None
    ours = snapshot(client_id=client_id, total=4_900, stripe_invoice_id=stripe_invoice.invoice_id)
    await publish_invoice(producer, ours)
    await wait_for_copy(db, ours.id, ours.version)

    first = await api.post(f"/api/invoices/{ours.id}/checkout", headers=client_headers(client_id))
    assert first.status_code == 200, first.text
    link = first.json()
    assert link["url"] == stripe_invoice.hosted_invoice_url == f"{standin.url}/invoice/{stripe_invoice.invoice_id}"
    assert (link["stripeInvoiceId"], link["sessionId"], link["expiresAt"]) == (stripe_invoice.invoice_id, None, None)
    assert (link["amount"], link["currency"]) == (4_900, "EUR")
    async with db.sessionmaker() as s:  # never a second way to pay it
        sessions = (await s.scalars(select(CheckoutSession).where(CheckoutSession.invoice_id == ours.id))).all()
    assert sessions == []

    async with httpx.AsyncClient(timeout=20) as browser:  # the person pays on Stripe's page
        page = await browser.get(link["url"])
        assert page.status_code == 200 and "€49.00" in page.text
        assert (await browser.post(f"{link['url']}/pay")).status_code == 303
    [event] = await payment_events.wait_for(ours.id, PaymentEventType.SUCCEEDED)
    assert event.data_as(PaymentEventV1).reference == stripe_invoice.invoice_id
    again = await api.post(f"/api/invoices/{ours.id}/checkout", headers=client_headers(client_id))
    assert again.status_code == 409 and again.json()["error"]["code"] == "nothing_due"


async def test_the_client_comes_from_the_customer_when_the_subscription_names_none(
    sdk: Sdk, standin: StripeStandin, api: httpx.AsyncClient, db: Any, stripe_topic: EventLog
) -> None:
    """A subscription made in Stripe's dashboard has no metadata; its customer may carry our client id."""
    client_id = str(uuid.uuid4())
    customer = await sdk.v1.customers.create_async(params={"metadata": {"client_id": client_id}})
    sub_id = stripe_events.stripe_id("sub")
    obj = stripe_events.stripe_invoice(subscription_id=sub_id, customer=customer.id)
    event = stripe_events.build_event("invoice.paid", obj)
    assert (await post_webhook(api, event)).status_code == 200
    [published] = await stripe_topic.wait_for(sub_id, "stripe.invoice.paid")
    assert published.data_as(StripeInvoiceV1).client_id == client_id
