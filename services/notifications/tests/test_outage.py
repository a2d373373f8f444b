"""The database goes away between a successful SMTP send and the record of it (a PostgreSQL crash of
this test's own server, right after the sink accepted the message): the record is retried until the
database answers, the message is not sent again when its lease expires, and delivery is back to
in-process wake-up speed afterwards. Real SMTP sink, real PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from deploy.infra import MailSink, PostgresServer
from services.notifications.config import NotificationsSettings
from services.notifications.mailer import SmtpMailer
from services.notifications.tests.conftest import FakeInvoiceService, Mailbox, invoice_event, snapshot, stop_immediately
from services.notifications.tests.test_delivery import Harness, make_harness

LEASE = 1.5  # seconds: an unrecorded send would be taken over (and sent again) soon after the outage
OUTAGE = 3.0  # seconds the database is away, longer than the lease
POLL = 5.0  # the delivery worker's poll interval: a send within a second of its event was woken in-process


class CrashAfterSend(SmtpMailer):
    """Sends for real; after the first send PostgreSQL crashes before the worker can record it, and
    comes back `OUTAGE` seconds later."""

    def __init__(self, settings: NotificationsSettings, server: PostgresServer) -> None:
        super().__init__(settings)
        self.server = server
        self.crashes = 1
        self.restarted: asyncio.Task[None] | None = None
        self.sent: list[Any] = []

    async def send(self, mail: Any) -> str:  # mailer.Outgoing
        reply = await super().send(mail)
        self.sent.append(mail)
        if self.crashes:
            self.crashes -= 1
            await asyncio.to_thread(stop_immediately, self.server)
            self.restarted = asyncio.create_task(self._restart())
        return reply

    async def _restart(self) -> None:
        await asyncio.sleep(OUTAGE)
        await asyncio.to_thread(self.server.start)


async def _message_when_db_answers(h: Harness, invoice_id: str, predicate: Callable[[object], bool],
                                   timeout: float) -> object:
    deadline = time.monotonic() + timeout
    while True:
        try:
            n = await h.message(invoice_id=invoice_id)
            if predicate(n):
                return n
        except Exception:  # noqa: BLE001 - the database is down for a while: ask again
            pass
        assert time.monotonic() < deadline, "the message never got its outcome recorded"
        await asyncio.sleep(0.2)


async def test_a_crash_between_send_and_record_sends_the_email_once(
    own_postgres: PostgresServer,
    make_settings: Callable[..., NotificationsSettings],
    fake_invoice_service: FakeInvoiceService,
    fresh_mail_sink: MailSink,
) -> None:
    url = own_postgres.create_database("notifications_outage")
    settings = make_settings(database_url=url, lease_seconds=LEASE, delivery_poll_interval=POLL,
                             invoice_url=fake_invoice_service.url)
    h = await make_harness(settings)
    mailer = CrashAfterSend(settings, own_postgres)
    h.worker.mailer = mailer
    await h.worker.start()
    mailbox = Mailbox(fresh_mail_sink)
    try:
        snap = snapshot(number="2026-0901")
        await h.consumer.apply(invoice_event("invoice.cancelled", {**snap, "status": "CANCELLED"}))
        n = await _message_when_db_answers(h, snap["id"], lambda n: getattr(n, "status", None) == "sent",
                                           timeout=OUTAGE + 20)
        assert mailer.restarted is not None and mailer.restarted.done()
        # Long past the lease and a poll: a takeover would have sent it again by now.
        await asyncio.sleep(LEASE + POLL + 1)
        n = await h.message(invoice_id=snap["id"])
        same = [m for m in mailbox.all() if m["Message-ID"] == n.smtp_message_id]
        assert len(same) == 1, f"{len(same)} emails with Message-ID {n.smtp_message_id}"
        assert len(mailer.sent) == 1
        assert (n.status, n.attempts, n.send_attempt_id) == ("sent", 1, None)
        assert await h.attempts(n.id) == [("sent", None)]
        assert len(await h.outbox("notification.sent")) == 1

        # Back to speed: the next event's email goes out on the in-process wake-up, not a 5 s poll.
        other = snapshot(number="2026-0902")
        started = time.monotonic()
        await h.consumer.apply(invoice_event("invoice.cancelled", {**other, "status": "CANCELLED"}))
        await mailbox.wait(lambda _: bool(mailbox.for_invoice(other["id"])), "the next email", timeout=POLL * 2)
        assert time.monotonic() - started < 1.0
    finally:
        if mailer.restarted is not None:
            await mailer.restarted
        await h.worker.stop()
        await h.db.dispose()
