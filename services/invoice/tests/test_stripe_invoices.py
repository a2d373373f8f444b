"""A subscription's Stripe invoices (stripe.invoice.* on billing.stripe, as payments normalizes them)
become invoices of ours: one per Stripe invoice, SENT and numbered, Stripe's lines and total to the
cent; a failed charge makes it OVERDUE, payments' payment.succeeded makes it PAID."""

from __future__ import annotations

import asyncio
import random
import re
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from contracts import topics
from contracts.envelope import CloudEvent
from contracts.stripe import StripeEventType, StripeInvoiceLineV1, StripeInvoiceV1
from services.invoice.money import AmountError, stripe_line_price, stripe_totals
from services.invoice.tests.conftest import EventLog, publish
from services.invoice.tests.test_payments_consumed import payment_event, wait_status

FINALIZED_AT = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)


def stripe_line(amount: int, description: str = "1 × Retainer (at €30.00 / month)", quantity: int | None = 1,
                proration: bool = False) -> StripeInvoiceLineV1:
    return StripeInvoiceLineV1(id=f"il_{uuid.uuid4().hex[:12]}", description=description, amount=amount,
                               currency="eur", quantity=quantity, proration=proration,
                               period_start=FINALIZED_AT, period_end=FINALIZED_AT + timedelta(days=31))


def stripe_invoice(client_id: str | None, lines: list[StripeInvoiceLineV1], *, tax: int = 0,
                   total: int | None = None, **fields: Any) -> StripeInvoiceV1:
    subtotal = sum(line.amount for line in lines)
    total = subtotal + tax if total is None else total
    values: dict[str, Any] = {
        "stripe_event_id": f"evt_{uuid.uuid4().hex[:16]}", "stripe_event_type": "invoice.finalized",
        "stripe_event_created": FINALIZED_AT, "invoice_id": f"in_{uuid.uuid4().hex[:16]}",
        "subscription_id": f"sub_{uuid.uuid4().hex[:12]}", "customer_id": "cus_test", "client_id": client_id,
        "status": "open", "number": "STANDIN-0042", "currency": "EUR", "subtotal": subtotal, "tax": tax,
        "total": total, "amount_due": max(total, 0), "amount_paid": 0, "amount_remaining": max(total, 0),
        "billing_reason": "subscription_cycle", "collection_method": "charge_automatically",
        "created": FINALIZED_AT - timedelta(hours=1), "finalized_at": FINALIZED_AT,
        "hosted_invoice_url": "https://invoice.stripe.test/i/1", "lines": lines,
    }
    values.update(fields)
    return StripeInvoiceV1(**values)


def stripe_event(data: StripeInvoiceV1, event_type: StripeEventType) -> CloudEvent:
    """The normalized event as payments publishes it, a new Stripe event id each time (`data` is the
    Stripe invoice as of that event)."""
    stripe_type = event_type.value.removeprefix("stripe.")
    paid = event_type == StripeEventType.INVOICE_PAID
    as_of = data.model_copy(update={
        "stripe_event_id": f"evt_{uuid.uuid4().hex[:16]}", "stripe_event_type": stripe_type,
        "status": "paid" if paid else data.status,
        "amount_paid": data.amount_due if paid else 0, "amount_remaining": 0 if paid else data.amount_due,
        "attempt_count": 1 if event_type != StripeEventType.INVOICE_FINALIZED else 0,
    })
    return CloudEvent.create(source="payments", type=event_type, subject=data.subscription_id or data.invoice_id,
                             data=as_of)


async def send_stripe(producer: AIOKafkaProducer, event: CloudEvent) -> None:
    await publish(producer, topics.STRIPE, event, event.subject or "")


async def invoices_of(api: httpx.AsyncClient, client_id: str) -> list[dict[str, Any]]:
    response = await api.get("/api/invoices", params={"clientId": client_id, "limit": 100})
    assert response.status_code == 200, response.text
    return response.json()["items"]  # type: ignore[no-any-return]


async def the_mirror(api: httpx.AsyncClient, client_id: str, stripe_invoice_id: str,
                     timeout: float = 20) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        found = [i for i in await invoices_of(api, client_id) if i["stripeInvoiceId"] == stripe_invoice_id]
        if found and found[0]["status"] != "DRAFT":
            return found[0]
        await asyncio.sleep(0.1)
    raise AssertionError(f"no invoice for Stripe invoice {stripe_invoice_id}")


# -- pure: the rule for Stripe's amounts ---------------------------------------------------------


def test_stripe_line_prices_multiply_back_to_the_line_amount() -> None:
    assert stripe_line_price(3_000, 3) == (Decimal(3), 1_000)
    assert stripe_line_price(-999, 3) == (Decimal(3), -333)
    assert stripe_line_price(-1_001, 3) == (Decimal(1), -1_001)  # a fraction of a cent per unit
    assert stripe_line_price(500, None) == (Decimal(1), 500)
    assert stripe_line_price(0, 2) == (Decimal(2), 0)
    for amount in range(-50, 50):
        for quantity in (None, 1, 2, 3, 7):
            q, unit = stripe_line_price(amount, quantity)
            assert q * unit == amount


def test_stripe_totals_keep_stripes_total_and_our_identity() -> None:
    totals = stripe_totals([-500, 1_500, 3_000], tax=0, total=4_000)
    assert (totals.subtotal, totals.discount_amount, totals.tax_amount, totals.total) == (4_000, 0, 0, 4_000)
    coupon = stripe_totals([-500, 1_500, 3_000], tax=380, total=3_980)  # 400 off, then tax
    assert coupon.discount_amount == 400
    assert coupon.total == coupon.subtotal - coupon.discount_amount + coupon.tax_amount
    with pytest.raises(AmountError):
        stripe_totals([1_000], tax=0, total=1_001)


# -- on Kafka --------------------------------------------------------------------------------------


async def test_a_finalized_stripe_invoice_becomes_one_sent_numbered_invoice_then_paid(
    api: httpx.AsyncClient, customer: dict, producer: AIOKafkaProducer, invoice_events: EventLog
) -> None:
    data = stripe_invoice(customer["id"], [stripe_line(3_000, quantity=1)])
    finalized = stripe_event(data, StripeEventType.INVOICE_FINALIZED)
    paid = stripe_event(data, StripeEventType.INVOICE_PAID)
    # Each delivered twice (the same event id again, and the same Stripe event republished under a
    # new id), in a shuffled order: paid may come first.
    deliveries = [finalized, finalized, paid, paid, stripe_event(data, StripeEventType.INVOICE_FINALIZED)]
    random.Random(9).shuffle(deliveries)
    for event in deliveries:
        await send_stripe(producer, event)

    invoice = await the_mirror(api, customer["id"], data.invoice_id)
    assert invoice["status"] == "SENT" and re.fullmatch(r"\d{4}-\d{4}", invoice["invoiceNumber"])
    assert invoice["total"] == 3_000 and invoice["amountDue"] == 3_000 and invoice["currency"] == "EUR"
    assert invoice["projectId"] is None and invoice["clientId"] == customer["id"]
    assert invoice["issueDate"] == invoice["dueDate"] == "2026-03-01"  # charged on finalization: due then
    [item] = invoice["items"]
    assert (item["description"], item["quantity"], item["unitPrice"], item["amount"]) == (
        "1 × Retainer (at €30.00 / month)", "1.0000", 3_000, 3_000)
    [sent] = await invoice_events.wait_for(invoice["id"], "invoice.sent")
    assert sent.data["stripeInvoiceId"] == data.invoice_id and sent.data["invoiceNumber"] == invoice["invoiceNumber"]

    # payments records Stripe's charge against our invoice (found by stripeInvoiceId): PAID.
    await publish(producer, topics.PAYMENT, payment_event(invoice, 3_000, "payment.succeeded", method="card",
                                                          stripe_event_id=paid.data["stripeEventId"]),
                  invoice["id"])
    done = await wait_status(api, invoice["id"], "PAID")
    assert done["amountPaid"] == 3_000 and done["amountDue"] == 0
    [paid_event] = await invoice_events.wait_for(invoice["id"], "invoice.paid")
    assert paid_event.data["stripeInvoiceId"] == data.invoice_id

    await send_stripe(producer, stripe_event(data, StripeEventType.INVOICE_PAID))  # yet another delivery
    await invoice_events.settle()
    assert [i["id"] for i in await invoices_of(api, customer["id"])] == [invoice["id"]]
    assert len(invoice_events.matching(invoice["id"], "invoice.sent")) == 1
    assert len(invoice_events.matching(invoice["id"], "invoice.created")) == 1


async def test_proration_credit_lines_are_copied_signed_and_the_total_is_stripes(
    api: httpx.AsyncClient, customer: dict, producer: AIOKafkaProducer
) -> None:
    lines = [
        stripe_line(-500, "Unused time on 1 × Basic after 15 Mar 2026", proration=True),
        stripe_line(1_500, "Remaining time on 1 × Pro after 15 Mar 2026", proration=True),
        stripe_line(9_000, "3 × Pro (at €30.00 / month)", quantity=3),
        stripe_line(-1_001, "Unused time on 3 × Pro after 20 Mar 2026", quantity=3, proration=True),
    ]
    # 8,999 of lines, a 899 coupon, 1,539 tax: Stripe's total 9,639.
    data = stripe_invoice(customer["id"], lines, tax=1_539, total=9_639, billing_reason="subscription_update")
    await send_stripe(producer, stripe_event(data, StripeEventType.INVOICE_FINALIZED))
    invoice = await the_mirror(api, customer["id"], data.invoice_id)
    assert invoice["status"] == "SENT"
    assert [(i["description"], i["quantity"], i["unitPrice"], i["amount"]) for i in invoice["items"]] == [
        ("Unused time on 1 × Basic after 15 Mar 2026", "1.0000", -500, -500),
        ("Remaining time on 1 × Pro after 15 Mar 2026", "1.0000", 1_500, 1_500),
        ("3 × Pro (at €30.00 / month)", "3.0000", 3_000, 9_000),
        ("Unused time on 3 × Pro after 20 Mar 2026", "1.0000", -1_001, -1_001),
    ]
    assert (invoice["subtotal"], invoice["discountAmount"], invoice["taxAmount"], invoice["total"]) == (
        8_999, 899, 1_539, 9_639)
    assert invoice["total"] == data.total and invoice["amountDue"] == data.amount_due
    # The PDF renders a credit line too.
    pdf = await api.get(f"/api/invoices/{invoice['id']}/pdf")
    assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF")


async def test_a_truncated_line_list_still_adds_up_to_stripes_subtotal(
    api: httpx.AsyncClient, customer: dict, producer: AIOKafkaProducer
) -> None:
    data = stripe_invoice(customer["id"], [stripe_line(1_000)], subtotal=4_500, total=4_500, amount_due=4_500)
    await send_stripe(producer, stripe_event(data, StripeEventType.INVOICE_PAID))
    invoice = await the_mirror(api, customer["id"], data.invoice_id)
    assert [i["amount"] for i in invoice["items"]] == [1_000, 3_500]
    assert invoice["items"][1]["description"] == "Further items of Stripe invoice STANDIN-0042"
    assert invoice["total"] == 4_500


async def test_a_failed_renewal_makes_the_invoice_overdue_then_a_payment_makes_it_paid(
    api: httpx.AsyncClient, customer: dict, producer: AIOKafkaProducer, invoice_events: EventLog
) -> None:
    data = stripe_invoice(customer["id"], [stripe_line(3_000)])
    failed = stripe_event(data, StripeEventType.INVOICE_PAYMENT_FAILED)
    # The failure overtakes the finalization: the invoice is created by it, then moved to OVERDUE.
    for event in (failed, stripe_event(data, StripeEventType.INVOICE_FINALIZED), failed,
                  stripe_event(data, StripeEventType.INVOICE_PAYMENT_FAILED)):
        await send_stripe(producer, event)
    invoice = await the_mirror(api, customer["id"], data.invoice_id)
    overdue = await wait_status(api, invoice["id"], "OVERDUE")
    assert overdue["invoiceNumber"] and overdue["amountDue"] == 3_000
    [moved] = await invoice_events.wait_for(invoice["id"], "invoice.overdue")
    assert moved.data["reason"] == "payment_failed" and moved.data["stripeInvoiceId"] == data.invoice_id

    await publish(producer, topics.PAYMENT, payment_event(invoice, 3_000, "payment.succeeded", method="card"),
                  invoice["id"])
    await wait_status(api, invoice["id"], "PAID")
    await send_stripe(producer, stripe_event(data, StripeEventType.INVOICE_PAYMENT_FAILED))  # a late retry notice
    await invoice_events.settle()
    assert (await api.get(f"/api/invoices/{invoice['id']}")).json()["status"] == "PAID"
    assert len(invoice_events.matching(invoice["id"], "invoice.overdue")) == 1


async def test_send_invoice_collection_takes_stripes_due_date(
    api: httpx.AsyncClient, customer: dict, producer: AIOKafkaProducer
) -> None:
    data = stripe_invoice(customer["id"], [stripe_line(12_000)], collection_method="send_invoice",
                          due_date=FINALIZED_AT + timedelta(days=14))
    await send_stripe(producer, stripe_event(data, StripeEventType.INVOICE_FINALIZED))
    invoice = await the_mirror(api, customer["id"], data.invoice_id)
    assert (invoice["issueDate"], invoice["dueDate"]) == ("2026-03-01", (date(2026, 3, 15)).isoformat())


async def test_what_is_not_ours_to_bill_becomes_no_invoice(
    api: httpx.AsyncClient, customer: dict, producer: AIOKafkaProducer, invoice_events: EventLog
) -> None:
    subscription = f"sub_{uuid.uuid4().hex[:12]}"
    ignored = [
        stripe_invoice(None, [stripe_line(3_000)], subscription_id=subscription),  # customer maps to no client
        stripe_invoice(str(uuid.uuid4()), [stripe_line(3_000)], subscription_id=subscription),  # unknown client
        stripe_invoice("not-a-uuid", [stripe_line(3_000)], subscription_id=subscription),
        # a trial's $0 invoice at signup: nothing to pay, no number, no email
        stripe_invoice(customer["id"], [stripe_line(0, "Trial period for Retainer")], subscription_id=subscription,
                       billing_reason="subscription_create"),
        stripe_invoice(customer["id"], [stripe_line(3_000)], subscription_id=None),  # not a subscription's
    ]
    for data in ignored:
        for event_type in (StripeEventType.INVOICE_FINALIZED, StripeEventType.INVOICE_PAID,
                           StripeEventType.INVOICE_PAYMENT_FAILED):
            await send_stripe(producer, stripe_event(data, event_type))
    # A Stripe draft is never billed (only its finalization is), nor a void invoice.
    draft = stripe_invoice(customer["id"], [stripe_line(3_000)], subscription_id=subscription, status="draft")
    await send_stripe(producer, stripe_event(draft, StripeEventType.INVOICE_CREATED))
    void = stripe_invoice(customer["id"], [stripe_line(3_000)], subscription_id=subscription, status="void")
    await send_stripe(producer, stripe_event(void, StripeEventType.INVOICE_FINALIZED))
    ignored += [draft, void]
    # The same partition (key = subscription): once this one is billed, those before it were handled.
    last = stripe_invoice(customer["id"], [stripe_line(700)], subscription_id=subscription)
    await send_stripe(producer, stripe_event(last, StripeEventType.INVOICE_FINALIZED))
    invoice = await the_mirror(api, customer["id"], last.invoice_id)
    await invoice_events.settle()  # the one that is not a subscription's is keyed (partitioned) apart
    assert [i["id"] for i in await invoices_of(api, customer["id"])] == [invoice["id"]]
    ignored_ids = {data.invoice_id for data in ignored}
    assert not [e for e in invoice_events.events if e.data.get("stripeInvoiceId") in ignored_ids]
