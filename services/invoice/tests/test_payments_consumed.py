"""payment.* events from Kafka move invoices to PARTIAL / PAID / OVERDUE, each payment exactly once."""

from __future__ import annotations

import asyncio
import uuid
from datetime import date, timedelta
from typing import Any

import httpx
from aiokafka import AIOKafkaProducer

from contracts import topics
from contracts.envelope import CloudEvent
from contracts.payment import PaymentEventV1
from services.invoice.tests.conftest import EventLog, client_headers, line, publish


async def sent_invoice(api: httpx.AsyncClient, client_id: str, unit_price: int = 10_000, **fields: Any) -> dict:
    created = await api.post(
        "/api/invoices", json={"clientId": client_id, "items": [line(quantity="1", unit_price=unit_price)], **fields}
    )
    assert created.status_code == 201, created.text
    sent = await api.post(f"/api/invoices/{created.json()['id']}/send")
    assert sent.status_code == 200, sent.text
    return sent.json()


def payment_event(invoice: dict, amount: int, event_type: str = "payment.recorded", **extra: Any) -> CloudEvent:
    data = PaymentEventV1(
        payment_id=extra.pop("payment_id", f"pay_{uuid.uuid4().hex[:12]}"),
        invoice_id=invoice["id"],
        client_id=invoice["clientId"],
        amount=amount,
        currency=extra.pop("currency", invoice["currency"]),
        method=extra.pop("method", "bank_transfer"),
        status="failed" if event_type == "payment.failed" else "succeeded",
        **extra,
    )
    return CloudEvent.create(source="payments", type=event_type, subject=invoice["id"], data=data)


async def wait_status(api: httpx.AsyncClient, invoice_id: str, status: str, timeout: float = 20) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout
    body: dict = {}
    while asyncio.get_running_loop().time() < deadline:
        body = (await api.get(f"/api/invoices/{invoice_id}")).json()
        if body["status"] == status:
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"invoice stayed {body.get('status')}, expected {status}: {body}")


async def test_partial_then_full_payment(
    api: httpx.AsyncClient, customer: dict, producer: AIOKafkaProducer, invoice_events: EventLog
) -> None:
    invoice = await sent_invoice(api, customer["id"])
    await publish(producer, topics.PAYMENT, payment_event(invoice, 4_000), invoice["id"])
    partial = await wait_status(api, invoice["id"], "PARTIAL")
    assert partial["amountPaid"] == 4_000 and partial["amountDue"] == invoice["total"] - 4_000
    await publish(producer, topics.PAYMENT, payment_event(invoice, invoice["total"] - 4_000), invoice["id"])
    paid = await wait_status(api, invoice["id"], "PAID")
    assert paid["amountDue"] == 0 and paid["paidAt"] is not None
    await invoice_events.wait_for(invoice["id"], "invoice.partially_paid")
    [paid_event] = await invoice_events.wait_for(invoice["id"], "invoice.paid")
    assert paid_event.data["amountPaid"] == invoice["total"]
    history = (await api.get(f"/api/invoices/{invoice['id']}/payments")).json()["items"]
    assert [p["amount"] for p in history] == [4_000, invoice["total"] - 4_000]


async def test_duplicate_deliveries_apply_once(
    api: httpx.AsyncClient, customer: dict, producer: AIOKafkaProducer, invoice_events: EventLog
) -> None:
    invoice = await sent_invoice(api, customer["id"])
    event = payment_event(invoice, 2_500)
    for _ in range(3):  # the very same event (same id) delivered three times
        await publish(producer, topics.PAYMENT, event, invoice["id"])
    # the same payment re-emitted under a new event id (e.g. a producer retry upstream)
    again = payment_event(invoice, 2_500, payment_id=event.data["paymentId"])
    await publish(producer, topics.PAYMENT, again, invoice["id"])
    await wait_status(api, invoice["id"], "PARTIAL")
    await asyncio.sleep(1.5)
    body = (await api.get(f"/api/invoices/{invoice['id']}")).json()
    assert body["amountPaid"] == 2_500
    assert len(invoice_events.matching(invoice["id"], "invoice.partially_paid")) == 1


async def test_failed_payment_makes_invoice_overdue_and_paid_never_goes_back(
    api: httpx.AsyncClient, customer: dict, producer: AIOKafkaProducer
) -> None:
    invoice = await sent_invoice(api, customer["id"])
    await publish(producer, topics.PAYMENT, payment_event(invoice, invoice["total"], "payment.failed",
                                                          failure_reason="card_declined"), invoice["id"])
    await wait_status(api, invoice["id"], "OVERDUE")
    await publish(producer, topics.PAYMENT, payment_event(invoice, invoice["total"]), invoice["id"])
    await wait_status(api, invoice["id"], "PAID")
    # a stale failure arriving after the payment must not move it back
    await publish(producer, topics.PAYMENT, payment_event(invoice, invoice["total"], "payment.failed"), invoice["id"])
    await asyncio.sleep(1.5)
    assert (await api.get(f"/api/invoices/{invoice['id']}")).json()["status"] == "PAID"


async def test_payment_for_cancelled_or_wrong_currency_changes_nothing(
    api: httpx.AsyncClient, customer: dict, producer: AIOKafkaProducer
) -> None:
    cancelled = await sent_invoice(api, customer["id"])
    await api.post(f"/api/invoices/{cancelled['id']}/cancel")
    other = await sent_invoice(api, customer["id"])
    await publish(producer, topics.PAYMENT, payment_event(cancelled, 1_000), cancelled["id"])
    await publish(producer, topics.PAYMENT, payment_event(other, 1_000, currency="JPY"), other["id"])
    await publish(producer, topics.PAYMENT, payment_event(other, 1_000), other["id"])  # a good one after
    await wait_status(api, other["id"], "PARTIAL")
    body = (await api.get(f"/api/invoices/{other['id']}")).json()
    assert body["amountPaid"] == 1_000
    gone = (await api.get(f"/api/invoices/{cancelled['id']}")).json()
    assert gone["status"] == "CANCELLED" and gone["amountPaid"] == 0


async def test_overdue_scan_and_partial_payment_on_overdue(
    api: httpx.AsyncClient, customer: dict, producer: AIOKafkaProducer, invoice_events: EventLog
) -> None:
    past = date.today() - timedelta(days=40)
    invoice = await sent_invoice(api, customer["id"], issueDate=past.isoformat(),
                                 dueDate=(past + timedelta(days=10)).isoformat())
    # two scans at once (as two replicas would): the invoice turns OVERDUE once
    results = await asyncio.gather(*(api.post("/api/invoices/mark-overdue", json={}) for _ in range(2)))
    assert sum(r.json()["markedOverdue"] for r in results) >= 1
    await wait_status(api, invoice["id"], "OVERDUE")
    await invoice_events.wait_for(invoice["id"], "invoice.overdue")
    await asyncio.sleep(1.0)
    assert len(invoice_events.matching(invoice["id"], "invoice.overdue")) == 1
    await publish(producer, topics.PAYMENT, payment_event(invoice, 1_000), invoice["id"])
    await invoice_events.wait_for(invoice["id"], "invoice.partially_paid")
    body = (await api.get(f"/api/invoices/{invoice['id']}")).json()
    assert body["status"] == "OVERDUE" and body["amountPaid"] == 1_000  # still past due


async def test_notification_opened_marks_viewed(
    api: httpx.AsyncClient, customer: dict, producer: AIOKafkaProducer
) -> None:
    invoice = await sent_invoice(api, customer["id"])
    opened = CloudEvent(source="notifications", type="notification.opened", subject=invoice["id"],
                        data={"invoiceId": invoice["id"], "messageId": "msg-1"})
    await publish(producer, topics.NOTIFICATION, opened, invoice["id"])
    await wait_status(api, invoice["id"], "VIEWED")


def refund_event(invoice: dict, amount: int) -> CloudEvent:
    # Each refund has its own id: the ledger applies each (id, kind) once.
    return payment_event(invoice, amount, "payment.refunded", payment_id=f"re_{uuid.uuid4().hex[:12]}")


async def wait_version(api: httpx.AsyncClient, invoice_id: str, version: int, timeout: float = 20) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout
    body: dict = {}
    while asyncio.get_running_loop().time() < deadline:
        body = (await api.get(f"/api/invoices/{invoice_id}")).json()
        if body["version"] >= version:
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"invoice stayed at version {body.get('version')}, expected {version}: {body}")


async def test_every_change_bumps_the_version_by_exactly_one(
    api: httpx.AsyncClient, customer: dict, producer: AIOKafkaProducer, invoice_events: EventLog
) -> None:
    """One change, one version, one event: payments that change the status included."""
    created = await api.post("/api/invoices", json={"clientId": customer["id"], "items": [line(quantity="1")]})
    invoice = created.json()
    assert invoice["version"] == 1
    edited = (await api.put(f"/api/invoices/{invoice['id']}", json={"notes": "v2"})).json()
    assert edited["version"] == 2
    sent = (await api.post(f"/api/invoices/{invoice['id']}/send")).json()
    assert sent["version"] == 3
    viewed = (await api.get(f"/api/invoices/{invoice['id']}", headers=client_headers(customer["id"]))).json()
    assert viewed["status"] == "VIEWED" and viewed["version"] == 4
    await publish(producer, topics.PAYMENT, payment_event(sent, 4_000), sent["id"])  # VIEWED -> PARTIAL
    partial = await wait_status(api, sent["id"], "PARTIAL")
    assert partial["version"] == 5
    await publish(producer, topics.PAYMENT, payment_event(sent, 1_000), sent["id"])  # stays PARTIAL
    assert (await wait_version(api, sent["id"], 6))["version"] == 6
    await publish(producer, topics.PAYMENT, payment_event(sent, sent["total"] - 5_000), sent["id"])  # -> PAID
    paid = await wait_status(api, sent["id"], "PAID")
    assert paid["version"] == 7
    await invoice_events.wait_for(sent["id"], "invoice.paid")
    versions = [e.data["version"] for e in invoice_events.matching(sent["id"])]
    assert versions == [1, 2, 3, 4, 5, 6, 7], versions  # one event per version, in order
    assert [e.type for e in invoice_events.matching(sent["id"])] == [
        "invoice.created", "invoice.updated", "invoice.sent", "invoice.viewed",
        "invoice.partially_paid", "invoice.partially_paid", "invoice.paid",
    ]


async def test_refund_of_a_paid_invoice_reopens_it_through_the_refund_moves(
    api: httpx.AsyncClient, customer: dict, producer: AIOKafkaProducer, invoice_events: EventLog
) -> None:
    invoice = await sent_invoice(api, customer["id"])
    await publish(producer, topics.PAYMENT, payment_event(invoice, invoice["total"]), invoice["id"])
    paid = await wait_status(api, invoice["id"], "PAID")
    part = refund_event(invoice, 3_000)
    await publish(producer, topics.PAYMENT, part, invoice["id"])
    partial = await wait_status(api, invoice["id"], "PARTIAL")  # PAID -> PARTIAL: something stays paid
    assert partial["version"] == paid["version"] + 1
    assert partial["amountPaid"] == invoice["total"] - 3_000 and partial["paidAt"] is None
    [event] = await invoice_events.wait_for(invoice["id"], "invoice.updated")
    assert event.data["status"] == "PARTIAL" and event.data["reason"] == "refunded"
    assert event.data["causeId"] == part.data["paymentId"] and event.data["version"] == partial["version"]

    # PARTIAL -> the open state once nothing stays paid (never opened by the client: SENT)
    await publish(producer, topics.PAYMENT, refund_event(invoice, invoice["total"] - 3_000), invoice["id"])
    reopened = await wait_status(api, invoice["id"], "SENT")
    assert reopened["amountPaid"] == 0 and reopened["version"] == partial["version"] + 1
    updates = await invoice_events.wait_for(invoice["id"], "invoice.updated", count=2)
    assert updates[-1].data["status"] == "SENT" and updates[-1].data["reason"] == "refunded"


async def test_full_refund_of_a_paid_invoice_goes_back_to_viewed_or_overdue(
    api: httpx.AsyncClient, customer: dict, producer: AIOKafkaProducer
) -> None:
    viewed = await sent_invoice(api, customer["id"])
    await api.get(f"/api/invoices/{viewed['id']}", headers=client_headers(customer["id"]))
    past = date.today() - timedelta(days=40)
    late = await sent_invoice(api, customer["id"], issueDate=past.isoformat(),
                              dueDate=(past + timedelta(days=10)).isoformat())
    for invoice in (viewed, late):
        await publish(producer, topics.PAYMENT, payment_event(invoice, invoice["total"]), invoice["id"])
        await wait_status(api, invoice["id"], "PAID")
        await publish(producer, topics.PAYMENT, refund_event(invoice, invoice["total"]), invoice["id"])
    assert (await wait_status(api, viewed["id"], "VIEWED"))["amountPaid"] == 0  # PAID -> VIEWED
    assert (await wait_status(api, late["id"], "OVERDUE"))["amountPaid"] == 0  # PAID -> OVERDUE (past due)


async def test_illegal_moves_are_still_409(api: httpx.AsyncClient, customer: dict, producer: AIOKafkaProducer) -> None:
    invoice = await sent_invoice(api, customer["id"])
    await publish(producer, topics.PAYMENT, payment_event(invoice, 1_000), invoice["id"])
    partial = await wait_status(api, invoice["id"], "PARTIAL")
    refused = await api.post(f"/api/invoices/{invoice['id']}/cancel")  # PARTIAL -> CANCELLED
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "invalid_transition"
    assert refused.json()["error"]["details"] == {"from": "PARTIAL", "to": "CANCELLED"}
    await publish(producer, topics.PAYMENT, payment_event(invoice, invoice["total"] - 1_000), invoice["id"])
    paid = await wait_status(api, invoice["id"], "PAID")
    assert (await api.post(f"/api/invoices/{invoice['id']}/cancel")).status_code == 409  # PAID -> CANCELLED
    again = await api.post(f"/api/invoices/{invoice['id']}/send")
    assert again.status_code == 409 and again.json()["error"]["code"] == "invalid_transition"
    after = (await api.get(f"/api/invoices/{invoice['id']}")).json()
    assert after["status"] == "PAID" and after["version"] == paid["version"] == partial["version"] + 1
