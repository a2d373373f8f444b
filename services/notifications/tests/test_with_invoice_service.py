"""With the real invoice service: its invoice.sent becomes an email carrying its real PDF, and a pixel
open moves the invoice to VIEWED once.

Runs on a private Kafka: the invoice service's consumer group is fixed ("invoice"), and another
invoice instance in the same test session (its own test suite's) would otherwise take our
notification.opened events.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from deploy.infra import RUN_DIR, KafkaServer, MailSink, ServiceProcess, ensure_kafka_jars, free_ports
from deploy.services import InfraEndpoints, make_service_process, service_by_name
from services.notifications.tests.conftest import Mailbox, TopicReader


@pytest.fixture(scope="module")
def private_kafka(infra_dir: Path) -> Iterator[KafkaServer]:
    port, controller = free_ports(2)
    server = KafkaServer(infra_dir / f"kafka-notif-{port}", port, controller, jars_dir=ensure_kafka_jars(
        RUN_DIR / "kafka-jars"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def services(
    private_kafka: KafkaServer, database_url_factory: Callable[[str], str], mail_sink: MailSink, infra_dir: Path
) -> Iterator[tuple[ServiceProcess, ServiceProcess, str]]:
    invoice_port, notifications_port = free_ports(2)
    infra = InfraEndpoints(
        kafka_bootstrap=private_kafka.bootstrap,
        database_urls={"invoice": database_url_factory("invoice_x"),
                       "notifications": database_url_factory("notifications_x")},
        stripe_api_base="http://127.0.0.1:9",
        smtp_host=mail_sink.host,
        smtp_port=mail_sink.port,
        ports={"invoice": invoice_port, "notifications": notifications_port},
    )
    invoice = make_service_process(
        service_by_name("invoice"), infra, infra_dir / "logs", name="invoice-for-notifications",
        extra_env={"INVOICE_OUTBOX_POLL_INTERVAL": "0.3", "INVOICE_OVERDUE_SCAN_INTERVAL": "3600"},
    )
    notifications = make_service_process(
        service_by_name("notifications"), infra, infra_dir / "logs", name="notifications-with-invoice",
        extra_env={
            "NOTIFICATIONS_INVOICE_URL": infra.url_of("invoice"),
            "NOTIFICATIONS_PUBLIC_URL": "http://gateway.example.com",
            "NOTIFICATIONS_OUTBOX_POLL_INTERVAL": "0.3",
            "NOTIFICATIONS_DELIVERY_POLL_INTERVAL": "0.3",
            "NOTIFICATIONS_SCAN_INTERVAL": "0",
        },
    )
    started = []
    try:
        for process in (invoice, notifications):
            process.start(timeout=90)
            started.append(process)
        yield invoice, notifications, infra.internal_token
    finally:
        for process in reversed(started):
            process.stop()


@pytest.fixture(scope="module")
async def topics(private_kafka: KafkaServer) -> AsyncIterator[dict[str, TopicReader]]:
    readers = {name: TopicReader(private_kafka.bootstrap, name) for name in ("billing.invoice", "billing.notification")}
    for reader in readers.values():
        await reader.start()
    yield readers
    for reader in readers.values():
        await reader.stop()


async def test_real_invoice_email_pdf_and_viewed_once(
    services: tuple[ServiceProcess, ServiceProcess, str], topics: dict[str, TopicReader], mailbox: Mailbox
) -> None:
    invoice_svc, notifications_svc, token = services
    admin = {"X-Actor-Role": "admin", "X-Actor-User-Id": "admin-1", "X-Internal-Token": token}
    email = f"real-{uuid.uuid4().hex[:8]}@client.example.com"
    async with httpx.AsyncClient(base_url=invoice_svc.url, headers=admin, timeout=30) as inv:
        client = await inv.post("/api/clients", json={"name": "Real Client Ltd", "email": email, "currency": "EUR"})
        assert client.status_code == 201, client.text
        created = await inv.post("/api/invoices", json={
            "clientId": client.json()["id"], "items": [{"description": "Design", "quantity": "2", "unitPrice": 45_000}],
        })
        assert created.status_code == 201, created.text
        invoice_id = created.json()["id"]
        sent = await inv.post(f"/api/invoices/{invoice_id}/send")
        assert sent.status_code == 200 and sent.json()["status"] == "SENT", sent.text
        number = sent.json()["invoiceNumber"]

        await mailbox.wait(lambda ms: bool(mailbox.for_invoice(invoice_id)), "the invoice email", timeout=60)
        [mail] = mailbox.for_invoice(invoice_id)
        assert number in mail["Subject"] and email in mail["To"]
        [pdf] = list(mail.iter_attachments())
        assert pdf.get_filename() == f"invoice-{number}.pdf"
        assert pdf.get_content().startswith(b"%PDF")

        html = mail.get_body(("html",)).get_content()
        match = re.search(r'src="http://gateway\.example\.com(/t/o/[A-Za-z0-9_-]+\.gif)"', html)
        assert match
        async with httpx.AsyncClient(base_url=notifications_svc.url, timeout=10) as public:
            assert (await public.get(match.group(1))).status_code == 200
            viewed = await wait_status(inv, invoice_id, "VIEWED")
            assert viewed["status"] == "VIEWED"
            assert (await public.get(match.group(1))).status_code == 200  # opened again
        await asyncio.sleep(2.5)
        assert len(topics["billing.notification"].matching(event_type="notification.opened", invoiceId=invoice_id)) == 1
        assert len(topics["billing.invoice"].matching(invoice_id, "invoice.viewed")) == 1
        assert (await inv.get(f"/api/invoices/{invoice_id}")).json()["status"] == "VIEWED"


async def wait_status(http: httpx.AsyncClient, invoice_id: str, status: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        body = (await http.get(f"/api/invoices/{invoice_id}")).json()
        if body.get("status") == status:
            return body
        await asyncio.sleep(0.2)
    raise AssertionError(f"invoice never reached {status}: {body}")


async def test_reminders_run_past_the_due_date_marks_overdue_first_then_one_notice(
    services: tuple[ServiceProcess, ServiceProcess, str], mailbox: Mailbox
) -> None:
    """The overdue notice and the invoice's status agree: the run as of a date asks the invoice service
    to mark what is past due, and mails an overdue notice only for what it says is OVERDUE."""
    invoice_svc, notifications_svc, token = services
    admin = {"X-Actor-Role": "admin", "X-Actor-User-Id": "admin-1", "X-Internal-Token": token}
    email = f"overdue-{uuid.uuid4().hex[:8]}@client.example.com"
    as_of = date(2027, 3, 11)
    async with httpx.AsyncClient(base_url=invoice_svc.url, headers=admin, timeout=30) as inv:
        client = await inv.post("/api/clients", json={"name": "Late Payer Ltd", "email": email, "currency": "EUR"})
        assert client.status_code == 201, client.text
        ids = {}
        for name, due in (("late", as_of - timedelta(days=1)), ("not_yet", as_of + timedelta(days=29))):
            created = await inv.post("/api/invoices", json={
                "clientId": client.json()["id"], "issueDate": "2027-02-01", "dueDate": due.isoformat(),
                "items": [{"description": "Retainer", "quantity": "1", "unitPrice": 80_000}],
            })
            assert created.status_code == 201, created.text
            ids[name] = created.json()["id"]
            sent = await inv.post(f"/api/invoices/{ids[name]}/send")
            assert sent.status_code == 200 and sent.json()["status"] == "SENT", sent.text
        # Both invoice emails out: the notifications service holds both copies (SENT).
        await mailbox.wait(lambda ms: all(mailbox.for_invoice(i) for i in ids.values()), "the invoice emails",
                           timeout=60)

        async with httpx.AsyncClient(base_url=notifications_svc.url, headers=admin, timeout=60) as notif:
            run = await notif.post("/api/reminders/run", json={"asOf": as_of.isoformat()})
            assert run.status_code == 200, run.text
            mine = [(r["invoiceId"], r["kind"], r["sequence"]) for r in run.json()["reminders"]
                    if r["invoiceId"] in ids.values()]
            assert mine == [(ids["late"], "reminder_overdue", 1)]
            # The invoice service says so too: OVERDUE there, the other one untouched.
            assert (await inv.get(f"/api/invoices/{ids['late']}")).json()["status"] == "OVERDUE"
            assert (await inv.get(f"/api/invoices/{ids['not_yet']}")).json()["status"] == "SENT"

            await mailbox.wait(lambda ms: len(mailbox.for_invoice(ids["late"])) >= 2, "the overdue notice",
                               timeout=60)
            again = await notif.post("/api/reminders/run", json={"asOf": as_of.isoformat()})
            assert again.status_code == 200, again.text
            assert [r for r in again.json()["reminders"] if r["invoiceId"] in ids.values()] == []
        await asyncio.sleep(2.0)  # a second notice would have been sent by now
        assert sorted(m["X-Billing-Kind"] for m in mailbox.for_invoice(ids["late"])) == [
            "invoice_sent", "reminder_overdue"]
        [notice] = [m for m in mailbox.for_invoice(ids["late"]) if m["X-Billing-Kind"] == "reminder_overdue"]
        assert "1 day overdue" in notice.get_body(("plain",)).get_content()
        assert [m["X-Billing-Kind"] for m in mailbox.for_invoice(ids["not_yet"])] == ["invoice_sent"]
