"""Delivery over real SMTP (the mail sink), PDFs from an HTTP invoice stand-in, on a real PostgreSQL.

Events enter through the real consumer path (inbox + handlers); Kafka itself is in test_e2e.py.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from deploy.infra import MailSink, free_port
from kit.db import Database
from kit.pagination import PageRequest
from services.notifications import repository as repo
from services.notifications.config import NotificationsSettings
from services.notifications.consumers import NotificationConsumer
from services.notifications.delivery import DeliveryWorker
from services.notifications.mailer import SmtpMailer
from services.notifications.models import DeliveryAttempt, Notification, OutboxMessage
from services.notifications.pdf import PdfFetcher
from services.notifications.service import CONSUMER_NAME, NotificationService
from services.notifications.tests.conftest import (
    FAKE_PDF,
    FakeInvoiceService,
    Mailbox,
    OverdueMarker,
    invoice_event,
    migrated_db,
    payment_event,
    snapshot,
)


@dataclass
class Harness:
    settings: NotificationsSettings
    db: Database
    service: NotificationService
    consumer: NotificationConsumer
    worker: DeliveryWorker

    async def message(self, **where: Any) -> Notification:
        async with self.db.unit_of_work() as uow:
            stmt = select(Notification).filter_by(**where)
            [n] = (await uow.session.scalars(stmt)).all()
            uow.session.expunge_all()
            return n

    async def attempts(self, notification_id: uuid.UUID) -> list[tuple[str, int | None]]:
        async with self.db.unit_of_work() as uow:
            return [(a.outcome, a.smtp_code) for a in await repo.list_attempts(uow.session, notification_id)]

    async def outbox(self, event_type: str) -> list[bytes]:
        async with self.db.unit_of_work() as uow:
            stmt = select(OutboxMessage.payload).where(OutboxMessage.event_type == event_type)
            return list((await uow.session.scalars(stmt)).all())

    async def until(self, predicate: Callable[[Notification], bool], timeout: float = 20, **where: Any) -> Notification:
        deadline = time.monotonic() + timeout
        while True:
            n = await self.message(**where)
            if predicate(n):
                return n
            if time.monotonic() > deadline:
                raise AssertionError(f"message stuck: status={n.status} attempts={n.attempts} error={n.last_error}")
            await asyncio.sleep(0.1)


async def make_harness(settings: NotificationsSettings) -> Harness:
    db = await migrated_db(settings)
    service = NotificationService(settings, invoices=OverdueMarker(db))
    worker = DeliveryWorker(
        db, service, SmtpMailer(settings),
        PdfFetcher(settings.invoice_url, settings.internal_token, timeout=settings.pdf_timeout),
    )
    service.on_new_messages = worker.wake
    consumer = NotificationConsumer(db, CONSUMER_NAME, service.handlers(), after_commit=worker.wake)
    return Harness(settings, db, service, consumer, worker)


@pytest.fixture
async def idle_harness(
    make_settings: Callable[..., NotificationsSettings], fake_invoice_service: FakeInvoiceService
) -> AsyncIterator[Harness]:
    """A harness whose worker sends only when the test calls drain()."""
    h = await make_harness(make_settings(invoice_url=fake_invoice_service.url, internal_token="internal-secret"))
    yield h
    await h.worker.stop()
    await h.db.dispose()


@pytest.fixture
async def harness(idle_harness: Harness) -> Harness:
    """A harness whose worker runs in the background, woken by new messages."""
    await idle_harness.worker.start()
    return idle_harness


async def test_invoice_sent_delivers_one_email_with_the_pdf(
    harness: Harness, mailbox: Mailbox, fake_invoice_service: FakeInvoiceService
) -> None:
    snap = snapshot(number="2026-0101", name="Acme Ltd", email_="ap@acme.example.com")
    event = invoice_event("invoice.sent", snap)
    assert await harness.consumer.apply(event)
    assert not await harness.consumer.apply(event)  # redelivered: the inbox skips it

    await mailbox.wait(lambda ms: bool(mailbox.for_invoice(snap["id"])), "the invoice email")
    [mail] = mailbox.for_invoice(snap["id"])
    assert "ap@acme.example.com" in mail["To"] and "Acme Ltd" in mail["To"]
    assert mail["Subject"] == "Invoice 2026-0101 from Billing"
    [pdf] = list(mail.iter_attachments())
    assert pdf.get_content_type() == "application/pdf"
    assert pdf.get_filename() == "invoice-2026-0101.pdf"
    assert pdf.get_content() == FAKE_PDF
    html = mail.get_body(("html",)).get_content()
    assert "View and pay" in html and "/t/o/" in html and "/t/l/" in html
    # The PDF was asked for as a system call: internal token, no actor headers.
    [(asked, headers)] = [r for r in fake_invoice_service.requests if r[0] == snap["id"]]
    assert headers.get("x-internal-token") == "internal-secret"
    assert not any(h.startswith("x-actor") for h in headers)

    n = await harness.until(lambda n: n.status == "sent", invoice_id=snap["id"])
    assert n.smtp_message_id == mail["Message-ID"]
    assert (n.attempts, n.attachment_missing, n.sent_at is not None) == (1, False, True)
    assert len(await harness.outbox("notification.sent")) == 1
    await asyncio.sleep(0.5)
    assert len(mailbox.for_invoice(snap["id"])) == 1


async def test_payment_cancel_and_failure_emails(harness: Harness, mailbox: Mailbox) -> None:
    snap = snapshot(number="2026-0102")
    await harness.consumer.apply(invoice_event("invoice.sent", snap))
    # A part paid: the failure of a card payment for the rest still asks to try again (after a
    # payment of the whole amount it would not: test_stale_payment_failure_of_a_paid_invoice_mails_nothing).
    pay = payment_event("payment.succeeded", snap["id"], 50_00)
    await harness.consumer.apply(pay)
    # The same payment announced again under another event id: still one receipt.
    again = payment_event("payment.succeeded", snap["id"], 50_00, payment_id=pay.data["paymentId"])
    await harness.consumer.apply(again)
    await harness.consumer.apply(
        payment_event("payment.failed", snap["id"], 120_00, failureReason="Your card was declined.")
    )
    await harness.consumer.apply(invoice_event("invoice.cancelled", {**snap, "status": "CANCELLED", "version": 5}))
    messages = await mailbox.wait(lambda ms: len([m for m in ms if m.get("X-Billing-Invoice-Id") == snap["id"]]) >= 4,
                                  "four emails")
    kinds = sorted(m["X-Billing-Kind"] for m in messages if m.get("X-Billing-Invoice-Id") == snap["id"])
    assert kinds == ["invoice_cancelled", "invoice_sent", "payment_failed", "payment_receipt"]
    failed = next(m for m in messages if m.get("X-Billing-Kind") == "payment_failed")
    assert "please try again" in failed["Subject"]
    assert "Your card was declined." in failed.get_body(("plain",)).get_content()
    # Only the invoice email carries the PDF.
    for m in messages:
        if m.get("X-Billing-Invoice-Id") == snap["id"]:
            assert bool(list(m.iter_attachments())) == (m["X-Billing-Kind"] == "invoice_sent")


async def test_payment_event_before_the_invoice_waits_for_it(harness: Harness, mailbox: Mailbox) -> None:
    snap = snapshot(number="2026-0103", email_="late@acme.example.com")
    await harness.consumer.apply(payment_event("payment.succeeded", snap["id"], 50_00))
    await harness.until(lambda n: n.defer_count >= 1, kind="payment_receipt", invoice_id=snap["id"])
    await harness.consumer.apply(invoice_event("invoice.partially_paid", {**snap, "status": "PARTIAL",
                                                                          "amountPaid": 50_00, "amountDue": 70_00}))
    n = await harness.until(lambda n: n.status == "sent", kind="payment_receipt", invoice_id=snap["id"])
    assert n.recipient == "late@acme.example.com"
    [mail] = mailbox.for_invoice(snap["id"])
    assert "A balance of €70.00 remains" in mail.get_body(("plain",)).get_content()


async def test_pdf_unavailable_is_retried_then_sent_without_and_flagged(
    harness: Harness, mailbox: Mailbox, fake_invoice_service: FakeInvoiceService
) -> None:
    snap = snapshot(number="2026-0104")
    fake_invoice_service.missing.add(snap["id"])
    await harness.consumer.apply(invoice_event("invoice.sent", snap))
    n = await harness.until(lambda n: n.status == "sent", invoice_id=snap["id"])
    assert n.attachment_missing is True and n.pdf_attempts == harness.settings.pdf_max_attempts
    assert [o for o, _ in await harness.attempts(n.id)] == ["pdf_retry", "pdf_missing", "sent"]
    [mail] = mailbox.for_invoice(snap["id"])
    assert list(mail.iter_attachments()) == []
    assert "could not be attached" in mail.get_body(("plain",)).get_content()


async def test_pdf_that_comes_back_is_attached(
    harness: Harness, mailbox: Mailbox, fake_invoice_service: FakeInvoiceService
) -> None:
    snap = snapshot(number="2026-0105")
    fake_invoice_service.broken.add(snap["id"])  # 503 at first
    await harness.consumer.apply(invoice_event("invoice.sent", snap))
    await harness.until(lambda n: n.pdf_attempts == 1, invoice_id=snap["id"])
    fake_invoice_service.broken.discard(snap["id"])
    n = await harness.until(lambda n: n.status == "sent", invoice_id=snap["id"])
    assert n.attachment_missing is False
    [mail] = mailbox.for_invoice(snap["id"])
    assert [a.get_filename() for a in mail.iter_attachments()] == ["invoice-2026-0105.pdf"]


async def test_smtp_451_is_retried_with_backoff_and_logged(harness: Harness, mailbox: Mailbox) -> None:
    mailbox.sink.fail_next(3)
    snap = snapshot(number="2026-0106")
    await harness.consumer.apply(invoice_event("invoice.sent", snap))
    n = await harness.until(lambda n: n.status == "sent", invoice_id=snap["id"])
    assert n.attempts == 4
    assert await harness.attempts(n.id) == [("retry", 451), ("retry", 451), ("retry", 451), ("sent", None)]
    assert len(mailbox.for_invoice(snap["id"])) == 1


async def test_smtp_server_down_loses_nothing(
    make_settings: Callable[..., NotificationsSettings], fake_invoice_service: FakeInvoiceService, tmp_path: Path
) -> None:
    """Nothing listens on the SMTP port for a while; then a server comes up and the mail arrives."""
    port = free_port()
    h = await make_harness(make_settings(smtp_port=port, invoice_url=fake_invoice_service.url))
    await h.worker.start()
    sink = MailSink(tmp_path / "mail", port, log_path=tmp_path / "sink.log")
    try:
        snaps = [snapshot(number=f"2026-02{i:02d}") for i in range(3)]
        for snap in snaps:
            await h.consumer.apply(invoice_event("invoice.sent", snap))
        for snap in snaps:
            await h.until(lambda n: n.attempts >= 2, invoice_id=snap["id"])
        n = await h.message(invoice_id=snaps[0]["id"])
        assert n.status in ("pending", "sending") and n.sent_at is None and n.last_error
        sink.start()
        for snap in snaps:
            await h.until(lambda n: n.status == "sent", invoice_id=snap["id"], timeout=30)
        delivered = Mailbox(sink).all()
        assert sorted(m["X-Billing-Invoice-Id"] for m in delivered) == sorted(s["id"] for s in snaps)
        outcomes = [o for o, _ in await h.attempts(n.id)]
        assert outcomes[-1] == "sent" and outcomes.count("retry") >= 2
    finally:
        await h.worker.stop()
        await h.db.dispose()
        sink.stop()


async def test_a_message_that_keeps_failing_is_marked_failed_visible_and_retryable(
    make_settings: Callable[..., NotificationsSettings], mailbox: Mailbox
) -> None:
    h = await make_harness(make_settings(max_attempts=3))
    await h.worker.start()
    try:
        mailbox.sink.fail_always()
        snap = snapshot(number="2026-0107")
        await h.consumer.apply(invoice_event("invoice.cancelled", {**snap, "status": "CANCELLED"}))
        n = await h.until(lambda n: n.status == "failed", invoice_id=snap["id"])
        assert n.attempts == 3 and "451" in (n.last_error or "") and n.failed_at is not None
        assert [o for o, _ in await h.attempts(n.id)] == ["retry", "retry", "failed"]
        [failed_event] = await h.outbox("notification.failed")
        assert snap["id"].encode() in failed_event
        async with h.db.unit_of_work() as uow:
            page = await repo.list_notifications(
                uow.session, repo.NotificationFilter(status="failed"), PageRequest(limit=10)
            )
            assert page.total == 1 and page.items[0].id == n.id
        mailbox.sink.recover()
        async with h.db.unit_of_work() as uow:
            assert await repo.requeue_failed(uow.session, n.id) is not None
            await uow.commit()
        h.worker.wake()
        sent = await h.until(lambda n: n.status == "sent", invoice_id=snap["id"])
        assert sent.smtp_message_id == n.smtp_message_id
        assert len(mailbox.for_invoice(snap["id"])) == 1
    finally:
        mailbox.sink.recover()
        await h.worker.stop()
        await h.db.dispose()


async def test_a_replica_dying_mid_send_is_taken_over_after_its_lease(
    make_settings: Callable[..., NotificationsSettings], mailbox: Mailbox
) -> None:
    """A claim whose owner died is retried only after the lease, with the same Message-ID."""
    h = await make_harness(make_settings(lease_seconds=1.5))
    try:
        snap = snapshot(number="2026-0108")
        await h.consumer.apply(invoice_event("invoice.cancelled", {**snap, "status": "CANCELLED"}))
        # "Replica A" claims it and dies before sending (no finish).
        async with h.db.unit_of_work() as uow:
            [claimed] = await repo.claim_batch(uow.session, limit=10, lease=timedelta(seconds=1.5),
                                               claim_token=uuid.uuid4())
            await uow.commit()
        assert await h.worker.run_once() == 0  # the lease holds: nobody else takes it
        await asyncio.sleep(1.6)
        assert await h.worker.run_once() == 1  # lease expired: taken over and sent
        [mail] = mailbox.for_invoice(snap["id"])
        assert mail["Message-ID"] == claimed.smtp_message_id
        n = await h.message(invoice_id=snap["id"])
        assert n.status == "sent" and n.attempts == 1
    finally:
        await h.worker.stop()
        await h.db.dispose()


async def test_reminders_end_to_end_through_smtp_none_after_payment(idle_harness: Harness, mailbox: Mailbox) -> None:
    harness = idle_harness
    due = date(2026, 6, 30)
    unpaid = snapshot(number="2026-0110", due=due, issue=date(2026, 6, 1), email_="unpaid@acme.example.com")
    paid = snapshot(number="2026-0111", due=due, issue=date(2026, 6, 1), email_="paid@acme.example.com")
    paid_later = snapshot(number="2026-0112", due=due, issue=date(2026, 6, 1), email_="later@acme.example.com")
    for snap in (unpaid, paid, paid_later):
        await harness.consumer.apply(invoice_event("invoice.sent", snap))
    await harness.consumer.apply(invoice_event("invoice.paid", {**paid, "status": "PAID", "amountPaid": 120_00,
                                                                "amountDue": 0, "version": 3}))
    await harness.worker.drain()
    # Scan, then 'paid_later' is paid before the worker gets to it: its queued reminder is skipped.
    result = await harness.service.scan_reminders(harness.db, due - timedelta(days=7))
    assert sorted(r["invoiceId"] for r in result.created) == sorted([unpaid["id"], paid_later["id"]])
    await harness.consumer.apply(invoice_event("invoice.paid", {**paid_later, "status": "PAID",
                                                                "amountPaid": 120_00, "amountDue": 0, "version": 3}))
    await harness.worker.drain()
    skipped = await harness.message(invoice_id=paid_later["id"], kind="reminder_before_due")
    assert (skipped.status, skipped.last_error) == ("skipped", "invoice is PAID")
    assert await harness.attempts(skipped.id) == [("skipped", None)]
    # Overdue notice the day after the due date, for the unpaid one only; the same day twice: nothing.
    await harness.service.scan_reminders(harness.db, due + timedelta(days=1))
    assert (await harness.service.scan_reminders(harness.db, due + timedelta(days=1))).created == []
    await harness.worker.drain()
    to_unpaid = sorted(m["X-Billing-Kind"] for m in mailbox.to("unpaid@acme.example.com"))
    assert to_unpaid == ["invoice_sent", "reminder_before_due", "reminder_overdue"]
    assert [m["X-Billing-Kind"] for m in mailbox.to("paid@acme.example.com")] == ["invoice_sent"]
    assert [m["X-Billing-Kind"] for m in mailbox.to("later@acme.example.com")] == ["invoice_sent"]
    overdue = next(m for m in mailbox.to("unpaid@acme.example.com") if m["X-Billing-Kind"] == "reminder_overdue")
    assert overdue["Subject"].startswith("Overdue: invoice 2026-0110")
    assert "1 day overdue" in overdue.get_body(("plain",)).get_content()
    async with harness.db.unit_of_work() as uow:
        count = await uow.session.scalar(
            select(func.count()).select_from(DeliveryAttempt).where(DeliveryAttempt.outcome == "skipped")
        )
        assert count == 1


async def test_smtp_credentials_from_settings_are_used(
    make_settings: Callable[..., NotificationsSettings], mailbox: Mailbox
) -> None:
    h = await make_harness(make_settings(smtp_username="apikey", smtp_password="s3cret"))
    try:
        snap = snapshot(number="2026-0120")
        await h.consumer.apply(invoice_event("invoice.cancelled", {**snap, "status": "CANCELLED"}))
        assert await h.worker.drain() == 1
        n = await h.message(invoice_id=snap["id"])
        assert n.status == "sent", n.last_error
        assert len(mailbox.for_invoice(snap["id"])) == 1
    finally:
        await h.worker.stop()
        await h.db.dispose()


async def test_payment_failure_queued_before_the_invoice_was_paid_is_skipped_just_before_sending(
    idle_harness: Harness, mailbox: Mailbox
) -> None:
    h = idle_harness
    snap = snapshot(number="2026-0130")
    await h.consumer.apply(invoice_event("invoice.sent", snap))
    await h.consumer.apply(payment_event("payment.failed", snap["id"], 120_00, failureReason="Declined."))
    failure = await h.message(invoice_id=snap["id"], kind="payment_failed")
    assert failure.status == "pending"  # nothing said it was paid when it was queued
    await h.consumer.apply(invoice_event("invoice.paid", {**snap, "status": "PAID", "amountPaid": 120_00,
                                                          "amountDue": 0, "version": 3}))
    await h.worker.drain()
    failure = await h.message(id=failure.id)
    assert (failure.status, failure.last_error) == ("skipped", "invoice is PAID")
    assert await h.attempts(failure.id) == [("skipped", None)]
    assert [m["X-Billing-Kind"] for m in mailbox.for_invoice(snap["id"])] == ["invoice_sent"]


async def test_payment_failure_after_a_refund_still_asks_to_try_again(idle_harness: Harness, mailbox: Mailbox) -> None:
    """Paid, then refunded (the invoice's own events not arrived yet): money is due again, so the
    failure of the next attempt is mailed."""
    h = idle_harness
    snap = snapshot(number="2026-0131")
    await h.consumer.apply(invoice_event("invoice.sent", snap))
    await h.consumer.apply(payment_event("payment.succeeded", snap["id"], 120_00))
    await h.consumer.apply(payment_event("payment.refunded", snap["id"], 120_00, status="refunded"))
    await h.consumer.apply(payment_event("payment.failed", snap["id"], 120_00, failureReason="Declined."))
    await h.worker.drain()
    failure = await h.message(invoice_id=snap["id"], kind="payment_failed")
    assert failure.status == "sent"
    assert "please try again" in next(m for m in mailbox.for_invoice(snap["id"])
                                      if m["X-Billing-Kind"] == "payment_failed")["Subject"]


async def test_a_send_of_unknown_outcome_is_logged_and_sent_again_with_the_same_message_id(
    make_settings: Callable[..., NotificationsSettings], mailbox: Mailbox
) -> None:
    """Replica A marked its send and died before recording it: after the lease, the takeover logs an
    `unknown` attempt (counted) and sends again, same Message-ID (at least once, never lost)."""
    h = await make_harness(make_settings(lease_seconds=1.5))
    try:
        snap = snapshot(number="2026-0140")
        await h.consumer.apply(invoice_event("invoice.cancelled", {**snap, "status": "CANCELLED"}))
        token = uuid.uuid4()
        async with h.db.transaction() as uow:
            [claimed] = await repo.claim_batch(uow.session, limit=10, lease=timedelta(seconds=1.5), claim_token=token)
        async with h.db.transaction() as uow:
            assert await repo.start_send(uow.session, claimed.id, token, uuid.uuid4(), None)
        await asyncio.sleep(1.6)
        assert await h.worker.run_once() == 1
        n = await h.message(id=claimed.id)
        assert (n.status, n.attempts, n.send_attempt_id) == ("sent", 2, None)
        outcomes = await h.attempts(n.id)
        assert outcomes == [("unknown", None), ("sent", None)]
        [mail] = mailbox.for_invoice(snap["id"])
        assert mail["Message-ID"] == claimed.smtp_message_id
    finally:
        await h.worker.stop()
        await h.db.dispose()


async def test_a_late_record_of_a_send_stops_the_takeover_that_has_not_sent_yet(idle_harness: Harness) -> None:
    """A's record lands after its lease expired and B claimed the message, before B's send starts:
    the message is sent (A's), and B sends nothing."""
    h = idle_harness
    snap = snapshot(number="2026-0141")
    await h.consumer.apply(invoice_event("invoice.cancelled", {**snap, "status": "CANCELLED"}))
    token_a, token_b, send_a = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    async with h.db.transaction() as uow:
        [claimed] = await repo.claim_batch(uow.session, limit=10, lease=timedelta(seconds=0), claim_token=token_a)
        assert await repo.start_send(uow.session, claimed.id, token_a, send_a, None)
    async with h.db.transaction() as uow:  # A's lease is over: B takes it
        [taken] = await repo.claim_batch(uow.session, limit=10, lease=timedelta(seconds=60), claim_token=token_b)
        assert taken.id == claimed.id and taken.send_attempt_id == send_a
    async with h.db.transaction() as uow:  # A's record, retried until the database answered, lands
        assert await repo.finish_send(uow.session, claimed.id, send_a, status="sent", attempts=1, claim_token=None)
    async with h.db.transaction() as uow:  # B is about to send: not any more
        assert not await repo.start_send(uow.session, claimed.id, token_b, uuid.uuid4(), send_a)
    n = await h.message(id=claimed.id)
    assert (n.status, n.attempts, n.send_attempt_id) == ("sent", 1, None)
