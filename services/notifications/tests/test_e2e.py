"""Two real replicas (`python -m services.notifications`) on real Kafka, PostgreSQL and the SMTP sink.

Events go in through an aiokafka producer; emails come out in the sink's directory; notification.*
events come out on Kafka.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from deploy.infra import MailSink, ServiceProcess, free_ports
from deploy.services import InfraEndpoints, make_service_process, service_by_name
from services.notifications.tests.conftest import (
    FAKE_PDF,
    FakeInvoiceService,
    Mailbox,
    TopicReader,
    invoice_event,
    payment_event,
    publish,
    snapshot,
)

SPEC = service_by_name("notifications")


class Replicas:
    def __init__(self, processes: list[ServiceProcess], token: str) -> None:
        self.processes = processes
        self.headers = {"X-Actor-Role": "admin", "X-Actor-User-Id": "admin-1", "X-Internal-Token": token}

    def client(self, index: int) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.processes[index].url, headers=self.headers, timeout=20)

    async def log(self, invoice_id: str) -> list[dict[str, Any]]:
        async with self.client(0) as http:
            response = await http.get(f"/api/notifications/invoices/{invoice_id}")
            assert response.status_code == 200, response.text
            return response.json()["items"]  # type: ignore[no-any-return]

    async def wait_log(
        self, invoice_id: str, predicate: Callable[[list[dict[str, Any]]], bool], what: str, timeout: float = 40
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            items = await self.log(invoice_id)
            if predicate(items):
                return items
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {items}")
            await asyncio.sleep(0.2)


@pytest.fixture(scope="module")
def replicas(
    kafka: Any,
    database_url_factory: Callable[[str], str],
    mail_sink: MailSink,
    fake_invoice_service: FakeInvoiceService,
    infra_dir: Path,
) -> Iterator[Replicas]:
    port_a, port_b = free_ports(2)
    infra = InfraEndpoints(
        kafka_bootstrap=kafka.bootstrap,
        database_urls={"notifications": database_url_factory("notifications_e2e")},
        stripe_api_base="http://127.0.0.1:9",
        smtp_host=mail_sink.host,
        smtp_port=mail_sink.port,
        mail_dir=mail_sink.directory,
        ports={"notifications": port_a},
    )
    extra = {
        "NOTIFICATIONS_INVOICE_URL": fake_invoice_service.url,
        # Own consumer group: another notifications instance in this test session must not take our events.
        "NOTIFICATIONS_CONSUMER_GROUP": f"notifications-e2e-{uuid.uuid4().hex[:8]}",
        "NOTIFICATIONS_SCAN_INTERVAL": "0",
        "NOTIFICATIONS_RETRY_BASE_DELAY": "0.3",
        "NOTIFICATIONS_RETRY_MAX_DELAY": "1.5",
        "NOTIFICATIONS_MAX_ATTEMPTS": "40",
        "NOTIFICATIONS_DELIVERY_POLL_INTERVAL": "0.3",
        "NOTIFICATIONS_OUTBOX_POLL_INTERVAL": "0.3",
        "NOTIFICATIONS_PUBLIC_URL": "http://gateway.example.com",
        "NOTIFICATIONS_DB_POOL_SIZE": "4",
        "MAIL_FROM": "Agency Billing <billing@agency.example.com>",
    }
    processes = [
        make_service_process(SPEC, infra, infra_dir / "logs", name=f"notifications-{name}", port=port, extra_env=extra)
        for name, port in (("a", port_a), ("b", port_b))
    ]
    started: list[ServiceProcess] = []
    try:
        for process in processes:
            process.start(timeout=90)
            started.append(process)
        yield Replicas(processes, infra.internal_token)
    finally:
        for process in started:
            process.stop()


def tracking_paths(mail: Any) -> tuple[str, str]:
    html = mail.get_body(("html",)).get_content()
    pixel = re.search(r'src="http://gateway\.example\.com(/t/o/[A-Za-z0-9_-]+\.gif)"', html)
    link = re.search(r'href="http://gateway\.example\.com(/t/l/[A-Za-z0-9_-]+)"', html)
    assert pixel and link
    return pixel.group(1), link.group(1)


async def test_invoice_sent_on_kafka_gives_one_email_with_pdf_and_one_open_event(
    replicas: Replicas, producer: AIOKafkaProducer, mailbox: Mailbox, notification_events: TopicReader
) -> None:
    snap = snapshot(number="2026-0901", email_="e2e-open@acme.example.com", name="E2E Client")
    event = invoice_event("invoice.sent", snap)
    await publish(producer, "billing.invoice", event, snap["id"])
    await publish(producer, "billing.invoice", event, snap["id"])  # a duplicate delivery

    await mailbox.wait(lambda ms: bool(mailbox.for_invoice(snap["id"])), "the invoice email", timeout=60)
    [mail] = mailbox.for_invoice(snap["id"])
    assert mail["From"] == "Agency Billing <billing@agency.example.com>"
    assert [a.get_content() for a in mail.iter_attachments()] == [FAKE_PDF]
    sent = await notification_events.wait_for(event_type="notification.sent", invoiceId=snap["id"])
    assert sent[0].data["smtpMessageId"] == mail["Message-ID"]

    pixel, _ = tracking_paths(mail)
    async with replicas.client(1) as http:  # opened through the other replica
        response = await http.get(pixel, headers={})
        assert response.status_code == 200 and response.headers["content-type"] == "image/gif"
    [opened] = await notification_events.wait_for(event_type="notification.opened", invoiceId=snap["id"])
    assert opened.subject == snap["id"]
    assert opened.data["recipient"] == "e2e-open@acme.example.com" and opened.data["kind"] == "invoice_sent"
    async with replicas.client(0) as http:
        again = await http.get(pixel, headers={})
        assert again.status_code == 200
    await asyncio.sleep(2.0)  # a second open would have been relayed by now
    assert len(notification_events.matching(event_type="notification.opened", invoiceId=snap["id"])) == 1
    assert len(mailbox.for_invoice(snap["id"])) == 1  # two replicas, a duplicate event: one email
    [logged] = await replicas.log(snap["id"])
    assert logged["openedAt"] and logged["status"] == "sent"


async def test_reminders_with_two_replicas_scanning_at_once(
    replicas: Replicas, producer: AIOKafkaProducer, mailbox: Mailbox
) -> None:
    as_of = date(2027, 2, 10)
    soon = snapshot(number="2027-0001", due=as_of + timedelta(days=7), issue=date(2027, 1, 10),
                    email_="e2e-soon@acme.example.com")
    late = snapshot(number="2027-0002", due=as_of - timedelta(days=1), issue=date(2027, 1, 1),
                    email_="e2e-late@acme.example.com")
    paid = snapshot(number="2027-0003", due=as_of + timedelta(days=7), issue=date(2027, 1, 10),
                    email_="e2e-paid@acme.example.com")
    for snap in (soon, late, paid):
        await publish(producer, "billing.invoice", invoice_event("invoice.sent", snap), snap["id"])
    # The invoice service marks 'late' OVERDUE (its own job); 'paid' gets paid.
    await publish(producer, "billing.invoice",
                  invoice_event("invoice.overdue", {**late, "status": "OVERDUE", "version": 3}), late["id"])
    await publish(producer, "billing.payment", payment_event("payment.succeeded", paid["id"], 120_00), paid["id"])
    await publish(producer, "billing.invoice", invoice_event(
        "invoice.paid", {**paid, "status": "PAID", "amountPaid": 120_00, "amountDue": 0, "version": 3}), paid["id"])
    await replicas.wait_log(late["id"], lambda items: any(i["status"] == "sent" for i in items), "late invoice sent")
    await replicas.wait_log(paid["id"], lambda items: len([i for i in items if i["status"] == "sent"]) == 2,
                            "paid invoice: invoice email and receipt")
    await replicas.wait_log(soon["id"], lambda items: any(i["status"] == "sent" for i in items), "soon invoice sent")

    async def run(index: int) -> dict[str, Any]:
        async with replicas.client(index) as http:
            response = await http.post("/api/reminders/run", json={"asOf": as_of.isoformat()})
            assert response.status_code == 200, response.text
            return response.json()  # type: ignore[no-any-return]

    results = await asyncio.gather(run(0), run(1), run(0), run(1))
    created = [(r["invoiceId"], r["kind"], r["sequence"]) for res in results for r in res["reminders"]
               if r["invoiceId"] in (soon["id"], late["id"], paid["id"])]
    assert sorted(created) == sorted([(soon["id"], "reminder_before_due", 7), (late["id"], "reminder_overdue", 1)])

    await mailbox.wait(lambda ms: len(mailbox.to("e2e-soon@acme.example.com")) >= 2
                       and len(mailbox.to("e2e-late@acme.example.com")) >= 2, "the reminders", timeout=40)
    again = await asyncio.gather(run(1), run(0))
    assert [r for res in again for r in res["reminders"] if r["invoiceId"] in (soon["id"], late["id"])] == []
    await asyncio.sleep(1.5)
    assert sorted(m["X-Billing-Kind"] for m in mailbox.to("e2e-soon@acme.example.com")) == [
        "invoice_sent", "reminder_before_due"]
    late_mail = sorted(mailbox.to("e2e-late@acme.example.com"), key=lambda m: m["X-Billing-Kind"])
    assert [m["X-Billing-Kind"] for m in late_mail] == ["invoice_sent", "reminder_overdue"]
    assert "1 day overdue" in late_mail[1].get_body(("plain",)).get_content()
    assert sorted(m["X-Billing-Kind"] for m in mailbox.to("e2e-paid@acme.example.com")) == [
        "invoice_sent", "payment_receipt"]


async def test_smtp_refusing_for_a_while_loses_no_email(
    replicas: Replicas, producer: AIOKafkaProducer, mailbox: Mailbox, notification_events: TopicReader
) -> None:
    snap = snapshot(number="2027-0100", email_="e2e-451@acme.example.com")
    mailbox.sink.fail_always()
    try:
        await publish(producer, "billing.invoice", invoice_event("invoice.sent", snap), snap["id"])
        items = await replicas.wait_log(snap["id"], lambda items: bool(items) and items[0]["attempts"] >= 3,
                                        "three refused attempts")
        assert items[0]["status"] in ("pending", "sending") and "451" in items[0]["lastError"]
        assert mailbox.for_invoice(snap["id"]) == []
    finally:
        mailbox.sink.recover()
    await mailbox.wait(lambda ms: bool(mailbox.for_invoice(snap["id"])), "the email after recovery", timeout=30)
    [item] = await replicas.wait_log(snap["id"], lambda items: items[0]["status"] == "sent", "sent")
    async with replicas.client(1) as http:
        detail = (await http.get(f"/api/notifications/{item['id']}")).json()
    outcomes = [(a["outcome"], a["smtpCode"]) for a in detail["deliveryAttempts"]]
    assert outcomes[-1] == ("sent", None) and outcomes.count(("retry", 451)) >= 3
    assert len(mailbox.for_invoice(snap["id"])) == 1
    await notification_events.wait_for(event_type="notification.sent", invoiceId=snap["id"])


async def test_a_name_with_cr_lf_fails_its_email_at_once_visibly_and_can_be_retried_once_fixed(
    replicas: Replicas, producer: AIOKafkaProducer, mailbox: Mailbox, notification_events: TopicReader
) -> None:
    """A client name that cannot go into a header (published as is, past the invoice service's 422):
    failed at once with 0 attempts and the reason in the log, never retried by itself; once the
    name is fixed (a newer copy), a retry by hand sends it with the same Message-ID."""
    snap = snapshot(number="2027-0200", email_="e2e-crlf@acme.example.com", name="Evil Ltd\r\nBcc: victim@example.com")
    await publish(producer, "billing.invoice", invoice_event("invoice.sent", snap), snap["id"])
    [item] = await replicas.wait_log(snap["id"], lambda items: bool(items) and items[0]["status"] == "failed",
                                     "the message failed at once", timeout=30)
    assert item["attempts"] == 0
    assert "recipient's name contains a control character (U+000D)" in item["lastError"]
    await notification_events.wait_for(event_type="notification.failed", invoiceId=snap["id"])
    await asyncio.sleep(2.0)  # several delivery polls: nothing retries it by itself
    async with replicas.client(1) as http:
        detail = (await http.get(f"/api/notifications/{item['id']}")).json()
    assert (detail["status"], detail["attempts"]) == ("failed", 0)
    assert [(a["outcome"], a["attempt"]) for a in detail["deliveryAttempts"]] == [("failed", 0)]
    assert "U+000D" in detail["deliveryAttempts"][0]["error"]
    assert mailbox.for_invoice(snap["id"]) == []

    fixed = {**snap, "clientName": "Evil Ltd", "status": "VIEWED", "version": snap["version"] + 1}
    await publish(producer, "billing.invoice", invoice_event("invoice.viewed", fixed), snap["id"])
    await asyncio.sleep(1.0)  # the copy takes the fixed name
    async with replicas.client(0) as http:
        response = await http.post(f"/api/notifications/{item['id']}/retry")
        assert response.status_code == 200, response.text
    await mailbox.wait(lambda ms: bool(mailbox.for_invoice(snap["id"])), "the email after the fix", timeout=30)
    [mail] = mailbox.for_invoice(snap["id"])
    assert mail["Message-ID"] == item["smtpMessageId"]
    assert [(a.display_name, a.addr_spec) for a in mail["To"].addresses] == [("Evil Ltd", "e2e-crlf@acme.example.com")]
    assert mail["Bcc"] is None


async def test_a_stale_payment_failure_of_a_paid_invoice_mails_nothing(
    replicas: Replicas, producer: AIOKafkaProducer, mailbox: Mailbox
) -> None:
    """Paid with one PaymentIntent, then the failure of an earlier one arrives (payments records it
    and publishes payment.failed): no "please try again", whether the invoice's copy says PAID yet
    or only the payment.succeeded has been seen."""
    paid = snapshot(number="2027-0300", email_="e2e-stale-paid@acme.example.com")
    early = snapshot(number="2027-0301", email_="e2e-stale-early@acme.example.com")
    for snap in (paid, early):
        await publish(producer, "billing.invoice", invoice_event("invoice.sent", snap), snap["id"])
        await publish(producer, "billing.payment", payment_event(
            "payment.succeeded", snap["id"], 120_00, stripePaymentIntentId="pi_second"), snap["id"])
    await publish(producer, "billing.invoice", invoice_event(
        "invoice.paid", {**paid, "status": "PAID", "amountPaid": 120_00, "amountDue": 0, "version": 3}), paid["id"])
    await replicas.wait_log(paid["id"], lambda items: len([i for i in items if i["status"] == "sent"]) == 2,
                            "invoice email and receipt")
    for snap in (paid, early):  # the first PaymentIntent's failure, late
        await publish(producer, "billing.payment", payment_event(
            "payment.failed", snap["id"], 120_00, stripePaymentIntentId="pi_first",
            failureReason="Your card was declined."), snap["id"])
    for snap in (paid, early):
        items = await replicas.wait_log(snap["id"], lambda items: any(i["kind"] == "payment_failed" for i in items),
                                        "the failure logged")
        [failure] = [i for i in items if i["kind"] == "payment_failed"]
        assert failure["status"] == "skipped" and "paid" in failure["lastError"].lower(), failure
    await publish(producer, "billing.invoice", invoice_event(
        "invoice.paid", {**early, "status": "PAID", "amountPaid": 120_00, "amountDue": 0, "version": 3}), early["id"])
    await asyncio.sleep(2.0)  # anything queued would have gone out by now
    for snap in (paid, early):
        assert sorted(m["X-Billing-Kind"] for m in mailbox.for_invoice(snap["id"])) == [
            "invoice_sent", "payment_receipt"]
