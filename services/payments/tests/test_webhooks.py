"""Stripe webhooks end to end inside the payments service: signed delivery -> real PostgreSQL ->
outbox -> real Kafka (read back with an aiokafka consumer on billing.payment / billing.stripe)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
from sqlalchemy import func, select

from contracts.invoice import InvoiceEventType, InvoiceStatus
from contracts.payment import PaymentEventType, PaymentEventV1
from contracts.stripe import StripeInvoiceV1, StripeSubscriptionV1
from services.payments.models import OutboxMessage, Payment, StripeEvent
from services.payments.service import apply_invoice_snapshot
from services.payments.stripe import testing as stripe_events
from services.payments.tests.conftest import (
    WEBHOOK_SECRET,
    EventLog,
    completed_event,
    payments_of,
    post_webhook,
    publish_invoice,
    snapshot,
    wait_for_copy,
    wait_processed,
)


async def test_checkout_completed_becomes_one_payment_succeeded_on_kafka(
    api: httpx.AsyncClient, db: Any, sent_invoice: Any, payment_events: EventLog
) -> None:
    event = completed_event(sent_invoice)
    response = await post_webhook(api, event)
    assert response.status_code == 200, response.text
    assert response.json() == {"received": True, "duplicate": False, "ignored": False}

    [published] = await payment_events.wait_for(sent_invoice.id, PaymentEventType.SUCCEEDED)
    data = published.data_as(PaymentEventV1)
    assert data.invoice_id == sent_invoice.id
    assert data.amount == 12_000 and data.currency == "EUR" and data.method == "card"
    assert data.stripe_checkout_session_id == event["data"]["object"]["id"]
    assert data.stripe_payment_intent_id == event["data"]["object"]["payment_intent"]
    assert data.stripe_event_id == event["id"]
    assert payment_events.keys(sent_invoice.id) == [sent_invoice.id]  # key = invoice id

    [payment] = await payments_of(db, sent_invoice.id)
    assert payment.status == "succeeded" and payment.flags == [] and not payment.held
    [row] = await wait_processed(db, [event["id"]])
    assert row.status == "processed" and row.payload == stripe_events.encode_event(event)


async def test_same_webhook_five_times_gives_one_payment(
    api: httpx.AsyncClient, db: Any, sent_invoice: Any, payment_events: EventLog
) -> None:
    event = completed_event(sent_invoice)
    responses = await asyncio.gather(*[post_webhook(api, event) for _ in range(5)])
    assert [r.status_code for r in responses] == [200] * 5
    assert sum(1 for r in responses if r.json()["duplicate"]) == 4
    # and once more later, after it was processed (Stripe retries for days)
    await wait_processed(db, [event["id"]])
    again = await post_webhook(api, event)
    assert again.status_code == 200 and again.json()["duplicate"] is True

    await payment_events.wait_for(sent_invoice.id, PaymentEventType.SUCCEEDED)
    await payment_events.settle()
    assert len(payment_events.matching(sent_invoice.id, PaymentEventType.SUCCEEDED)) == 1
    assert len(await payments_of(db, sent_invoice.id)) == 1


async def test_distinct_events_for_the_same_session_give_one_payment(
    api: httpx.AsyncClient, db: Any, sent_invoice: Any, payment_events: EventLog
) -> None:
    """Stripe may send completed and async_payment_succeeded, each with its own event id."""
    session_id, pi = f"cs_test_{uuid.uuid4().hex}", f"pi_{uuid.uuid4().hex}"
    events = [
        completed_event(sent_invoice, session_id=session_id, payment_intent=pi),
        completed_event(sent_invoice, session_id=session_id, payment_intent=pi,
                        event_type="checkout.session.async_payment_succeeded"),
        completed_event(sent_invoice, session_id=session_id, payment_intent=pi),  # new id, same content
    ]
    for response in await asyncio.gather(*[post_webhook(api, e) for e in events]):
        assert response.status_code == 200
    await wait_processed(db, [e["id"] for e in events])
    await payment_events.wait_for(sent_invoice.id, PaymentEventType.SUCCEEDED)
    await payment_events.settle()
    assert len(payment_events.matching(sent_invoice.id, PaymentEventType.SUCCEEDED)) == 1
    assert len(await payments_of(db, sent_invoice.id)) == 1


async def test_out_of_order_succeeded_before_completed_then_stale_failure(
    api: httpx.AsyncClient, db: Any, sent_invoice: Any, payment_events: EventLog
) -> None:
    """Async payment method: succeeded arrives before completed(unpaid); then an old failure."""
    session_id, pi = f"cs_test_{uuid.uuid4().hex}", f"pi_{uuid.uuid4().hex}"
    now = int(time.time())
    completed = completed_event(sent_invoice, session_id=session_id, payment_intent=pi, payment_status="unpaid",
                                created=now - 60)
    succeeded = completed_event(sent_invoice, session_id=session_id, payment_intent=pi, created=now,
                                event_type="checkout.session.async_payment_succeeded")
    failed = completed_event(sent_invoice, session_id=session_id, payment_intent=pi, payment_status="unpaid",
                             created=now - 30, event_type="checkout.session.async_payment_failed")
    assert (await post_webhook(api, succeeded)).status_code == 200
    await wait_processed(db, [succeeded["id"]])
    assert (await post_webhook(api, completed)).status_code == 200
    assert (await post_webhook(api, failed)).status_code == 200
    rows = {r.id: r for r in await wait_processed(db, [completed["id"], failed["id"]])}
    assert rows[failed["id"]].status == "ignored" and "stale" in (rows[failed["id"]].outcome or "")

    [payment] = await payments_of(db, sent_invoice.id)
    assert payment.status == "succeeded"
    await payment_events.settle()
    assert [e.type for e in payment_events.matching(sent_invoice.id)] == [PaymentEventType.SUCCEEDED]


async def test_async_payment_pending_then_failed_publishes_failed_with_invoice_id(
    api: httpx.AsyncClient, db: Any, sent_invoice: Any, payment_events: EventLog
) -> None:
    session_id, pi = f"cs_test_{uuid.uuid4().hex}", f"pi_{uuid.uuid4().hex}"
    pending = completed_event(sent_invoice, session_id=session_id, payment_intent=pi, payment_status="unpaid")
    assert (await post_webhook(api, pending)).status_code == 200
    await wait_processed(db, [pending["id"]])
    [payment] = await payments_of(db, sent_invoice.id)
    assert payment.status == "pending"

    failed = completed_event(sent_invoice, session_id=session_id, payment_intent=pi, payment_status="unpaid",
                             event_type="checkout.session.async_payment_failed")
    assert (await post_webhook(api, failed)).status_code == 200
    [event] = await payment_events.wait_for(sent_invoice.id, PaymentEventType.FAILED)
    data = event.data_as(PaymentEventV1)
    assert data.invoice_id == sent_invoice.id and data.status == "failed" and data.payment_id == str(payment.id)
    # a repeat of the failure (new event id) does not publish again
    again = completed_event(sent_invoice, session_id=session_id, payment_intent=pi, payment_status="unpaid",
                            event_type="checkout.session.async_payment_failed")
    await post_webhook(api, again)
    await wait_processed(db, [again["id"]])
    await payment_events.settle()
    assert len(payment_events.matching(sent_invoice.id, PaymentEventType.FAILED)) == 1


async def test_card_declined_then_paid_in_the_same_session(
    api: httpx.AsyncClient, db: Any, sent_invoice: Any, payment_events: EventLog
) -> None:
    """payment_intent.payment_failed (metadata.invoice_id from payment_intent_data) -> payment.failed;
    the customer retries with another card in the same session -> payment.succeeded, same payment."""
    pi = f"pi_{uuid.uuid4().hex}"
    intent = stripe_events.payment_intent(amount=sent_invoice.amount_due, currency="eur",
                                          invoice_id=sent_invoice.id, intent_id=pi)
    declined = stripe_events.build_event("payment_intent.payment_failed", intent)
    assert (await post_webhook(api, declined)).status_code == 200
    [failed] = await payment_events.wait_for(sent_invoice.id, PaymentEventType.FAILED)
    assert failed.data_as(PaymentEventV1).failure_reason == "Your card was declined."

    paid = completed_event(sent_invoice, payment_intent=pi)
    assert (await post_webhook(api, paid)).status_code == 200
    [succeeded] = await payment_events.wait_for(sent_invoice.id, PaymentEventType.SUCCEEDED)
    assert succeeded.data_as(PaymentEventV1).payment_id == failed.data_as(PaymentEventV1).payment_id
    [payment] = await payments_of(db, sent_invoice.id)
    assert payment.status == "succeeded" and payment.failure_code is None

    # the decline delivered again late (a new delivery of an old event) is stale now
    late = stripe_events.build_event("payment_intent.payment_failed", intent, created=paid["created"] - 10)
    await post_webhook(api, late)
    [row] = await wait_processed(db, [late["id"]])
    assert row.status == "ignored"
    await payment_events.settle()
    assert len(payment_events.matching(sent_invoice.id, PaymentEventType.FAILED)) == 1


async def test_bad_deliveries_are_refused_and_change_nothing(
    api: httpx.AsyncClient, db: Any, sent_invoice: Any, payment_events: EventLog
) -> None:
    async def counts() -> tuple[int, int, int]:
        async with db.sessionmaker() as s:
            return (
                int(await s.scalar(select(func.count()).select_from(StripeEvent)) or 0),
                int(await s.scalar(select(func.count()).select_from(Payment)) or 0),
                int(await s.scalar(select(func.count()).select_from(OutboxMessage)) or 0),
            )

    before = await counts()
    event = completed_event(sent_invoice)
    body = stripe_events.encode_event(event)
    now = int(time.time())
    good_header = stripe_events.sign_payload(body, WEBHOOK_SECRET, now)
    forged = good_header[:-4] + ("0000" if not good_header.endswith("0000") else "1111")
    cases: dict[str, tuple[bytes, dict[str, str]]] = {
        "forged signature": (body, {"Stripe-Signature": forged}),
        "wrong secret": (body, {"Stripe-Signature": stripe_events.sign_payload(body, "whsec_other", now)}),
        "older than tolerance": (body, {"Stripe-Signature": stripe_events.sign_payload(body, WEBHOOK_SECRET,
                                                                                       now - 301)}),
        "missing header": (body, {}),
        "garbage header": (body, {"Stripe-Signature": "hello"}),
        "body changed after signing": (body.replace(b"12000", b"99000"), {"Stripe-Signature": good_header}),
        "signed non-JSON": (b"not json at all", {"Stripe-Signature": stripe_events.sign_payload(
            b"not json at all", WEBHOOK_SECRET, now)}),
        "signed non-UTF-8": (b"\xff\xfe\x00", {"Stripe-Signature": stripe_events.sign_payload(
            b"\xff\xfe\x00", WEBHOOK_SECRET, now)}),
        "signed JSON that is no event": (b'{"hello": 1}', {"Stripe-Signature": stripe_events.sign_payload(
            b'{"hello": 1}', WEBHOOK_SECRET, now)}),
        "signed JSON array": (b"[1,2]", {"Stripe-Signature": stripe_events.sign_payload(b"[1,2]", WEBHOOK_SECRET,
                                                                                          now)}),
    }
    for name, (payload, headers) in cases.items():
        response = await api.post("/webhooks/stripe", content=payload, headers=headers)
        assert response.status_code == 400, (name, response.status_code, response.text)
        assert response.json()["error"]["code"] in ("missing_signature", "invalid_signature", "invalid_payload"), name

    too_big = b"{" + b" " * (600 * 1024) + b"}"
    response = await api.post("/webhooks/stripe", content=too_big,
                              headers={"Stripe-Signature": stripe_events.sign_payload(too_big, WEBHOOK_SECRET)})
    assert response.status_code == 413

    assert await counts() == before

    # an unknown event type, correctly signed: 200 (Stripe must stop retrying) and ignored
    unknown = stripe_events.build_event("customer.tax_id.created", {"id": "txi_123", "object": "tax_id"})
    response = await post_webhook(api, unknown)
    assert response.status_code == 200 and response.json()["ignored"] is True
    # a live-mode event on this test-mode integration: 200, ignored
    live = completed_event(sent_invoice)
    live["livemode"] = True
    response = await post_webhook(api, live)
    assert response.status_code == 200 and response.json()["ignored"] is True

    await payment_events.settle(1.0)
    after = await counts()
    assert after[1:] == before[1:]  # no payment, no outbox event
    assert payment_events.matching(sent_invoice.id) == []


async def test_currency_mismatch_is_recorded_and_held(
    api: httpx.AsyncClient, db: Any, sent_invoice: Any, payment_events: EventLog
) -> None:
    event = completed_event(sent_invoice, currency="usd")
    await post_webhook(api, event)
    [row] = await wait_processed(db, [event["id"]])
    assert "HELD" in (row.outcome or "")
    [payment] = await payments_of(db, sent_invoice.id)
    assert payment.status == "succeeded" and payment.held
    assert payment.currency == "USD" and payment.amount == 12_000 and "currency_mismatch" in payment.flags
    await payment_events.settle()
    assert payment_events.matching(sent_invoice.id) == []  # nothing sent to the invoice service

    response = await api.get("/api/payments", params={"invoiceId": sent_invoice.id})
    [item] = response.json()["items"]
    assert item["held"] is True and item["flags"] == ["currency_mismatch"]


async def test_underpayment_is_a_partial_payment_of_the_exact_amount(
    api: httpx.AsyncClient, db: Any, sent_invoice: Any, payment_events: EventLog
) -> None:
    event = completed_event(sent_invoice, amount=11_999)
    await post_webhook(api, event)
    [published] = await payment_events.wait_for(sent_invoice.id, PaymentEventType.SUCCEEDED)
    assert published.data_as(PaymentEventV1).amount == 11_999
    [payment] = await payments_of(db, sent_invoice.id)
    assert payment.flags == ["underpayment"]


async def test_overpayment_is_recorded_in_full_and_flagged(
    api: httpx.AsyncClient, db: Any, sent_invoice: Any, payment_events: EventLog
) -> None:
    event = completed_event(sent_invoice, amount=12_001)
    await post_webhook(api, event)
    [published] = await payment_events.wait_for(sent_invoice.id, PaymentEventType.SUCCEEDED)
    assert published.data_as(PaymentEventV1).amount == 12_001
    [payment] = await payments_of(db, sent_invoice.id)
    assert payment.flags == ["overpayment"]


async def test_refunds_publish_each_increase_once(
    api: httpx.AsyncClient, db: Any, sent_invoice: Any, payment_events: EventLog
) -> None:
    pi = f"pi_{uuid.uuid4().hex}"
    # the first refund arrives before the payment it refunds: deferred, then applied
    first = stripe_events.build_event("charge.refunded", stripe_events.charge(
        amount=12_000, amount_refunded=2_000, currency="eur", payment_intent=pi, invoice_id=sent_invoice.id))
    await post_webhook(api, first)
    await asyncio.sleep(0.5)
    async with db.sessionmaker() as s:
        row = await s.get(StripeEvent, first["id"])
        assert row is not None and row.status == "pending" and row.attempts >= 1

    await post_webhook(api, completed_event(sent_invoice, payment_intent=pi))
    await payment_events.wait_for(sent_invoice.id, PaymentEventType.SUCCEEDED)
    # speed the deferred one up (its backoff is seconds)
    async with db.sessionmaker() as s, s.begin():
        row = await s.get(StripeEvent, first["id"])
        assert row is not None
        row.next_attempt_at = func.now()
    api.app.state.payments.worker.wake()  # type: ignore[attr-defined]
    [r1] = await payment_events.wait_for(sent_invoice.id, PaymentEventType.REFUNDED)
    assert r1.data_as(PaymentEventV1).amount == 2_000

    second = stripe_events.build_event("charge.refunded", stripe_events.charge(
        amount=12_000, amount_refunded=5_000, currency="eur", payment_intent=pi, invoice_id=sent_invoice.id))
    old_again = stripe_events.build_event("charge.refunded", stripe_events.charge(
        amount=12_000, amount_refunded=2_000, currency="eur", payment_intent=pi, invoice_id=sent_invoice.id))
    for e in (second, second, old_again):
        await post_webhook(api, e)
    await wait_processed(db, [second["id"], old_again["id"]])
    refunds = await payment_events.wait_for(sent_invoice.id, PaymentEventType.REFUNDED, count=2)
    await payment_events.settle()
    refunds = payment_events.matching(sent_invoice.id, PaymentEventType.REFUNDED)
    amounts = [e.data_as(PaymentEventV1).amount for e in refunds]
    assert amounts == [2_000, 3_000]
    # each refund has its own id (the invoice ledger applies each id once)
    assert len({e.data_as(PaymentEventV1).payment_id for e in refunds}) == 2
    [payment] = await payments_of(db, sent_invoice.id)
    assert payment.status == "partially_refunded" and payment.amount_refunded == 5_000


async def test_subscription_events_are_republished_normalized_and_stale_ones_dropped(
    api: httpx.AsyncClient, db: Any, stripe_topic: EventLog
) -> None:
    client_id = str(uuid.uuid4())
    sub = stripe_events.subscription(client_id=client_id, plan_id="plan_basic", status="trialing",
                                     trial_end=int(time.time()) + 3 * 86400)
    now = int(time.time())
    created = stripe_events.build_event("customer.subscription.created", sub, created=now - 100)
    sub_active = {**sub, "status": "active"}
    updated = stripe_events.build_event("customer.subscription.updated", sub_active, created=now - 50,
                                        previous_attributes={"status": "trialing"})
    trial = stripe_events.build_event("customer.subscription.trial_will_end", sub, created=now - 120)
    deleted = stripe_events.build_event("customer.subscription.deleted", {**sub, "status": "canceled"},
                                        created=now)
    # Delivered out of order: deleted first and handled, then the older ones. (The worker's tasks
    # handle stored events side by side: an older event handled before the newer one is committed is
    # not stale yet and is published first, which is its right order. So the test waits.)
    assert (await post_webhook(api, deleted)).status_code == 200
    await wait_processed(db, [deleted["id"]])
    for e in (created, updated, trial):
        assert (await post_webhook(api, e)).status_code == 200
    rows = {r.id: r for r in await wait_processed(db, [deleted["id"], created["id"], updated["id"], trial["id"]])}
    assert rows[created["id"]].status == "ignored" and rows[updated["id"]].status == "ignored"
    assert rows[trial["id"]].status == "processed"  # a notice, never stale

    await stripe_topic.wait_for(sub["id"], "stripe.customer.subscription.trial_will_end")
    [gone] = await stripe_topic.wait_for(sub["id"], "stripe.customer.subscription.deleted")
    data = gone.data_as(StripeSubscriptionV1)
    assert data.status == "canceled" and data.client_id == client_id and data.plan_id == "plan_basic"
    assert data.price_lookup_key == "maintenance_basic_monthly" and data.items[0].unit_amount == 4900
    assert data.current_period_end is not None and data.stripe_event_id == deleted["id"]
    assert set(stripe_topic.keys(sub["id"])) == {sub["id"]}
    await stripe_topic.settle(1.0)
    assert {e.type for e in stripe_topic.matching(sub["id"])} == {
        "stripe.customer.subscription.deleted", "stripe.customer.subscription.trial_will_end"}


async def test_stripe_invoice_events_are_republished_keyed_by_subscription(
    api: httpx.AsyncClient, db: Any, stripe_topic: EventLog
) -> None:
    sub_id = stripe_events.stripe_id("sub")
    client_id = str(uuid.uuid4())
    failed = stripe_events.build_event("invoice.payment_failed", stripe_events.stripe_invoice(
        subscription_id=sub_id, status="open", amount_paid=0, client_id=client_id), created=int(time.time()) - 5)
    paid = stripe_events.build_event("invoice.paid", stripe_events.stripe_invoice(
        subscription_id=sub_id, client_id=client_id))
    for e in (failed, paid):
        await post_webhook(api, e)
    [f] = await stripe_topic.wait_for(sub_id, "stripe.invoice.payment_failed")
    [p] = await stripe_topic.wait_for(sub_id, "stripe.invoice.paid")
    assert f.data_as(StripeInvoiceV1).amount_paid == 0
    inv = p.data_as(StripeInvoiceV1)
    assert inv.subscription_id == sub_id and inv.client_id == client_id and inv.currency == "EUR"
    assert inv.amount_paid == 4900 and inv.paid_at is not None and inv.lines[0].amount == 4900
    assert set(stripe_topic.keys(sub_id)) == {sub_id}


async def test_invoice_snapshots_keep_the_highest_version_and_mark_payments_applied(
    api: httpx.AsyncClient, db: Any, producer: Any, payment_events: EventLog
) -> None:
    from services.payments.models import InvoiceCopy

    snap = snapshot(version=3)
    await publish_invoice(producer, snap)
    await wait_for_copy(db, snap.id, 3)
    event = completed_event(snap)
    await post_webhook(api, event)
    [published] = await payment_events.wait_for(snap.id, PaymentEventType.SUCCEEDED)
    payment_id = published.data_as(PaymentEventV1).payment_id

    # the invoice service applies it (v5, PAID, cause = our payment id); an older v4 arrives after it
    paid = snapshot(invoice_id=snap.id, client_id=snap.client_id, status="PAID", amount_paid=snap.total,
                    version=5, cause_id=payment_id)
    older = snapshot(invoice_id=snap.id, client_id=snap.client_id, status="VIEWED", version=4)
    await publish_invoice(producer, paid, InvoiceEventType.PAID)
    await publish_invoice(producer, older, InvoiceEventType.VIEWED)
    await wait_for_copy(db, snap.id, 5)
    await asyncio.sleep(1.0)
    async with db.sessionmaker() as s:
        copy = await s.get(InvoiceCopy, snap.id)
        assert copy is not None and copy.version == 5 and copy.status == "PAID" and copy.amount_paid == snap.total
        payment = await s.get(Payment, uuid.UUID(payment_id))
        assert payment is not None and payment.applied_at is not None


async def test_an_equal_or_older_invoice_snapshot_changes_nothing(db: Any) -> None:
    """kit.replica's rule for the copy: only a strictly newer version replaces it. An equal version is
    a redelivery (even if it says something else), an older one arrived out of order."""
    from services.payments.models import InvoiceCopy

    snap = snapshot(version=3)
    async with db.transaction() as uow:
        assert await apply_invoice_snapshot(uow, InvoiceEventType.SENT, snap) is True
    equal = snap.model_copy(update={"status": InvoiceStatus.VIEWED, "amount_paid": 1_000})
    older = snap.model_copy(update={"version": 2, "status": InvoiceStatus.DRAFT})
    for stale in (equal, older):
        async with db.transaction() as uow:
            assert await apply_invoice_snapshot(uow, InvoiceEventType.UPDATED, stale) is False
    async with db.sessionmaker() as s:
        copy = await s.get(InvoiceCopy, snap.id)
        assert copy is not None and (copy.version, copy.status, copy.amount_paid) == (3, InvoiceStatus.SENT, 0)
    newer = snap.model_copy(update={"version": 4, "status": InvoiceStatus.VIEWED})
    async with db.transaction() as uow:
        assert await apply_invoice_snapshot(uow, InvoiceEventType.VIEWED, newer) is True
    async with db.sessionmaker() as s:
        copy = await s.get(InvoiceCopy, snap.id)
        assert copy is not None and (copy.version, copy.status) == (4, InvoiceStatus.VIEWED)


async def test_one_bad_event_does_not_hold_back_its_batch(
    api: httpx.AsyncClient, db: Any, producer: Any, payment_events: EventLog
) -> None:
    """A batch with a malformed event: the good ones are handled, the bad one is retried, then parked."""
    worker = api.app.state.payments.worker  # type: ignore[attr-defined]
    await worker.stop()
    try:
        snaps = [snapshot() for _ in range(3)]
        for snap in snaps:
            await publish_invoice(producer, snap)
        for snap in snaps:
            await wait_for_copy(db, snap.id, snap.version)
        good = [completed_event(s) for s in snaps]
        bad = completed_event(snaps[0], session_id=f"cs_test_{uuid.uuid4().hex}")
        bad["data"]["object"]["amount_total"] = "twelve thousand"  # Stripe never sends this
        for e in (good[0], bad, good[1], good[2]):
            assert (await post_webhook(api, e)).status_code == 200
        assert await worker.run_once() == 4
    finally:
        await worker.start()
    rows = {r.id: r for r in await wait_processed(db, [e["id"] for e in good])}
    assert {r.status for r in rows.values()} == {"processed"}
    async with db.sessionmaker() as s:
        row = await s.get(StripeEvent, bad["id"])
        assert row is not None and row.status == "pending" and row.attempts == 1 and "ValueError" in row.last_error
    for snap in snaps:
        await payment_events.wait_for(snap.id, PaymentEventType.SUCCEEDED)
    assert len(await payments_of(db, snaps[0].id)) == 1
