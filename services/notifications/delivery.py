"""The delivery worker: claims due messages, fetches the PDF, renders, sends over SMTP, records.

Crash safety: a message is claimed (status 'sending', lease until `next_attempt_at`) in its own
transaction before anything is sent; right before SMTP the send is marked on it (`send_attempt_id`,
a tiny transaction of its own), and its outcome is recorded after against that mark. Recording the
outcome of a send is retried (kit.worker.backoff_delay) until the database answers: the send itself
is never repeated for a lost commit. A replica that dies between the send and the record leaves the
lease to expire; the takeover sees the mark (logged as an `unknown` attempt) and sends again with the
same Message-ID (a late record of the first send that lands before the takeover's own send starts
stops it). SMTP failures are retried with the platform's backoff; after `max_attempts` the
message is marked failed (and notification.failed published), never dropped. A message that cannot
be built (a control character in a header, a template error, ...) fails at once: no retry can fix
it, a person can (`POST /api/notifications/{id}/retry`).

The loop itself is kit's PollingWorker: woken in-process when messages are queued, polling otherwise,
backing off while the database is down.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
import uuid
from datetime import timedelta
from typing import Any

import asyncpg
import structlog
from sqlalchemy import exc as sa_exc
from sqlalchemy import func

from contracts import topics
from contracts.envelope import CloudEvent
from contracts.invoice import InvoiceStatus
from contracts.notification import SCHEMA_V1, NotificationEventType, NotificationEventV1, NotificationKind
from kit.clock import utcnow
from kit.db import Database, UnitOfWork
from kit.errors import ServiceUnavailable
from kit.worker import PollingWorker, backoff_delay
from services.notifications import repository as repo
from services.notifications.config import NotificationsSettings
from services.notifications.invoices import ClientDirectory
from services.notifications.mailer import Attachment, SmtpMailer, SmtpSendError, build_message, prepare
from services.notifications.models import Notification
from services.notifications.pdf import PdfFetcher, PdfUnavailable
from services.notifications.service import SOURCE, SUBSCRIPTION_KINDS, NotificationService

log = structlog.get_logger(__name__)

_REMINDERS = {NotificationKind.REMINDER_BEFORE_DUE.value, NotificationKind.REMINDER_OVERDUE.value}
_FROM_EVENT_SNAPSHOT = {NotificationKind.INVOICE_SENT.value, NotificationKind.INVOICE_CANCELLED.value}
_UNSAFE_FILENAME = re.compile(r"[^A-Za-z0-9._-]+")
_RECORD_RETRY_INITIAL = 0.2  # seconds before the first retry of recording a send's outcome
_RECORD_RETRY_MAX = 5.0


def database_unavailable(exc: BaseException) -> bool:
    """A connection-level failure (down, restarting, connection lost): worth retrying as is."""
    seen: BaseException | None = exc
    for _ in range(10):  # the exception and what it wraps
        if seen is None:
            return False
        if isinstance(seen, sa_exc.DBAPIError) and seen.connection_invalidated:
            return True
        if isinstance(seen, OSError | TimeoutError | sa_exc.DisconnectionError | sa_exc.OperationalError
                      | sa_exc.InterfaceError | asyncpg.PostgresConnectionError | asyncpg.CannotConnectNowError
                      | asyncpg.InterfaceError):
            return True
        seen = getattr(seen, "orig", None) or seen.__cause__
    return False


class DeliveryWorker(PollingWorker):
    name = "notification-delivery"

    def __init__(
        self,
        db: Database,
        service: NotificationService,
        mailer: SmtpMailer,
        pdf: PdfFetcher | None,
        settings: NotificationsSettings | None = None,
        clients: ClientDirectory | None = None,
    ) -> None:
        settings = settings or service.settings
        # One loop claims a batch; its messages go out `delivery_concurrency` at a time (the slots).
        super().__init__(poll_interval=settings.delivery_poll_interval, batch_size=settings.delivery_batch_size)
        self.db = db
        self.service = service
        self.settings = settings
        self.mailer = mailer
        self.pdf = pdf
        # Asked for the address of a subscription email that has none (None: such an email fails).
        self.clients = clients
        self._stopping = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._slots = asyncio.Semaphore(max(1, settings.delivery_concurrency))

    # ------------------------------------------------------------------------------------------
    # lifecycle

    async def stop(self) -> None:
        """Finish the sends in flight (claims not started yet are released), then stop."""
        self._stopping = True
        if self.running:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout=self.settings.smtp_timeout + 5)
            except TimeoutError:
                log.warning("delivery_stop_timeout", waited=self.settings.smtp_timeout + 5)
        await super().stop()
        await self.mailer.close()
        if self.pdf is not None:
            await self.pdf.close()

    async def drain(self, max_rounds: int = 10_000) -> int:
        """Deliver everything due now (tests, bench). Returns how many messages were handled."""
        total = 0
        for _ in range(max_rounds):
            handled = await self.run_once()
            total += handled
            if handled == 0:
                break
        return total

    # ------------------------------------------------------------------------------------------
    # one round

    async def run_once(self) -> int:
        if self._stopping:
            return 0
        self._idle.clear()
        try:
            return await self._round()
        finally:
            self._idle.set()

    async def _round(self) -> int:
        token = uuid.uuid4()
        async with self.db.transaction() as uow:
            claimed = await repo.claim_batch(
                uow.session,
                limit=self.settings.delivery_batch_size,
                lease=timedelta(seconds=self.settings.lease_seconds),
                claim_token=token,
            )
        if not claimed:
            return 0
        claimed_at = time.monotonic()
        async with self.db.transaction() as uow:
            invoices = await repo.get_invoice_infos(uow.session, list({n.invoice_id for n in claimed if n.invoice_id}))
        await asyncio.gather(
            *(self._deliver_guarded(n, token, claimed_at, invoices.get(n.invoice_id or "")) for n in claimed)
        )
        return len(claimed)

    def retry_delay(self, attempt: int, initial: float) -> timedelta:
        """How long before try `attempt + 1`: the platform's one backoff policy, capped by our settings."""
        return timedelta(seconds=backoff_delay(attempt, initial=initial, maximum=self.settings.retry_max_delay))

    async def _deliver_guarded(
        self, n: Notification, token: uuid.UUID, claimed_at: float, invoice: repo.InvoiceInfo | None
    ) -> None:
        async with self._slots:
            s = self.settings
            # Never start a send that could outlive the lease (another replica would take it over).
            budget = max(s.lease_seconds / 2, s.lease_seconds - (s.smtp_timeout * 2 + s.pdf_timeout + 5))
            if self._stopping or time.monotonic() - claimed_at > budget:
                await self._finish(n, token, "released", None, status="pending", next_attempt_at=func.now())
                return
            try:
                await self.deliver(n, token, invoice)
            except Exception as exc:  # a bug or the DB: the lease expires and it is retried
                log.exception("delivery_error", notification_id=str(n.id), error=str(exc))

    async def deliver(self, n: Notification, token: uuid.UUID, invoice: repo.InvoiceInfo | None) -> str:
        """Handle one claimed message (`invoice`: its invoice's copy, if any); returns the outcome."""
        s = self.settings
        # A send before this claim began and its outcome is not recorded (its replica died, or is
        # still waiting for the database to record it): it may have gone out. Counted as an attempt;
        # the mark stays until our own send starts, so a late record of it still stops ours.
        unknown = n.send_attempt_id is not None
        if unknown and n.attempts + 1 >= s.max_attempts:
            return await self._fail(n, token, "the outcome of the last send is unknown (its sender stopped "
                                    "mid-send) and no attempts are left", attempts=n.attempts + 1)

        # Reminders only while the invoice still expects money (paid/cancelled since the scan: skip).
        if n.kind in _REMINDERS and (invoice is None or not invoice.open_for_reminders):
            why = f"invoice is {invoice.status}" if invoice else "invoice unknown"
            return await self._finish(n, token, "skipped", why, status="skipped", claim_token=None, last_error=why)

        context = n.context or {}
        if n.kind == NotificationKind.CARD_UPDATE.value:
            stripe_invoice_id = (context.get("card") or {}).get("stripe_invoice_id")
            if stripe_invoice_id:
                async with self.db.transaction() as uow:
                    paid = await repo.stripe_invoice_paid(uow.session, stripe_invoice_id)
                    invoice = invoice or await repo.invoice_info_of_stripe(uow.session, stripe_invoice_id)
                if paid:  # paid since it was queued (a retry went through): never "update your card"
                    return await self._finish(n, token, "skipped", "invoice paid", status="skipped",
                                              claim_token=None, last_error="invoice paid")
        if n.kind in _FROM_EVENT_SNAPSHOT and context.get("invoice"):
            announced: dict[str, Any] = context["invoice"]
            snapshot: dict[str, Any] | None = announced
            if (n.kind == NotificationKind.INVOICE_SENT.value and invoice is not None
                    and invoice.status == InvoiceStatus.PAID
                    and int(invoice.snapshot.get("version") or 0) > int(announced.get("version") or 0)):
                # Paid before its email went out (a card charged right away): a receipt, not "please pay".
                snapshot = invoice.snapshot
        else:
            snapshot = invoice.snapshot if invoice is not None else context.get("invoice")
        recipient = n.recipient or (invoice.client_email if invoice else None)
        recipient_name = n.recipient_name or (invoice.client_name if invoice else None)
        if not recipient and n.kind in SUBSCRIPTION_KINDS and n.client_id and self.clients is not None:
            try:
                contact = await self.clients.client_contact(n.client_id)
            except ServiceUnavailable as exc:
                if n.defer_count < s.recipient_wait_attempts:
                    delay = self.retry_delay(n.defer_count + 1, s.retry_base_delay)
                    return await self._finish(
                        n, token, "deferred", f"waiting for the client's address: {exc.message}",
                        status="pending", defer_count=n.defer_count + 1, next_attempt_at=func.now() + delay,
                    )
                contact = None
            if contact is not None:
                recipient, recipient_name = contact.email, recipient_name or contact.name

        if not recipient or (n.invoice_id and snapshot is None):
            # A payment event can overtake its invoice's events: wait for the invoice copy a while.
            if n.invoice_id and invoice is None and n.defer_count < s.recipient_wait_attempts:
                delay = self.retry_delay(n.defer_count + 1, s.retry_base_delay)
                return await self._finish(
                    n, token, "deferred", "waiting for the invoice (no copy yet)", status="pending",
                    defer_count=n.defer_count + 1, next_attempt_at=func.now() + delay,
                )
            return await self._fail(n, token, "no recipient address", attempts=n.attempts)

        attachments: tuple[Attachment, ...] = ()
        pdf_attempts = n.pdf_attempts
        attachment_missing = False
        if self._needs_pdf(n):
            if pdf_attempts >= s.pdf_max_attempts:
                attachment_missing = True
            else:
                try:
                    assert self.pdf is not None and n.invoice_id is not None
                    content = await self.pdf.fetch(n.invoice_id)
                    number = (snapshot or {}).get("invoiceNumber") or n.invoice_id
                    filename = f"invoice-{_UNSAFE_FILENAME.sub('-', str(number))}.pdf"
                    attachments = (Attachment(filename=filename, content=content),)
                except PdfUnavailable as exc:
                    pdf_attempts += 1
                    if pdf_attempts < s.pdf_max_attempts:
                        delay = self.retry_delay(pdf_attempts, s.pdf_retry_base_delay)
                        return await self._finish(
                            n, token, "pdf_retry", str(exc), status="pending", pdf_attempts=pdf_attempts,
                            next_attempt_at=func.now() + delay, last_error=str(exc),
                        )
                    log.warning("pdf_missing_sending_without", notification_id=str(n.id), error=str(exc))
                    await self._attempt(n, "pdf_missing", str(exc))
                    attachment_missing = True

        ctx = self.service.email_context(
            kind=n.kind,
            token=n.tracking_token,
            invoice_id=n.invoice_id,
            recipient=recipient,
            recipient_name=recipient_name,
            context=context,
            invoice_snapshot=snapshot,
            attachment_missing=attachment_missing,
        )
        headers = {"X-Billing-Notification-Id": str(n.id), "X-Billing-Kind": n.kind}
        if n.invoice_id:
            headers["X-Billing-Invoice-Id"] = n.invoice_id
        try:
            content_ = self.service.renderer.render(n.kind, ctx)
            message = build_message(
                mail_from=s.mail_from,
                recipient=recipient,
                recipient_name=recipient_name,
                content=content_,
                message_id=n.smtp_message_id,
                attachments=attachments,
                headers=headers,
            )
            if not recipient.isascii():
                raise ValueError(f"non-ASCII address {recipient!r} (SMTPUTF8 is not supported)")
            outgoing = prepare(message)  # serialized now: what cannot be written fails here, not mid-send
        except Exception as exc:  # noqa: BLE001 - retrying cannot fix a message that cannot be built
            log.warning("message_build_failed", notification_id=str(n.id), error=f"{type(exc).__name__}: {exc}")
            return await self._fail(n, token, f"cannot build the message: {exc}", attempts=n.attempts,
                                    recipient=recipient, recipient_name=recipient_name)
        attempts = n.attempts + (1 if unknown else 0) + 1
        common: dict[str, Any] = {
            "subject": content_.subject, "recipient": recipient, "recipient_name": recipient_name,
            "attempts": attempts, "pdf_attempts": pdf_attempts, "attachment_missing": attachment_missing,
        }
        attempt_id = uuid.uuid4()
        if (outcome := await self._start_send(n, token, attempt_id)) is not None:
            return outcome
        try:
            await self.mailer.send(outgoing)
        except SmtpSendError as exc:
            error = str(exc)
            if attempts >= s.max_attempts:
                return await self._record_send(n, attempt_id, "failed", error, smtp_code=exc.code,
                                               event=self._failed_event(n, error, **common),
                                               status="failed", failed_at=utcnow(), last_error=error,
                                               claim_token=None, **common)
            delay = self.retry_delay(attempts, s.retry_base_delay)
            log.warning("smtp_send_retry", notification_id=str(n.id), attempt=attempts, error=error,
                        retry_in=round(delay.total_seconds(), 1))
            return await self._record_send(
                n, attempt_id, "retry", error, smtp_code=exc.code, status="pending", last_error=error,
                next_attempt_at=func.now() + delay, **common,
            )
        now = utcnow()
        outcome = await self._record_send(
            n, attempt_id, "sent", None, status="sent", sent_at=now, claim_token=None,
            event=self._event(n, NotificationEventType.SENT, recipient, content_.subject, attempts,
                              sent_at=now, attachment_missing=attachment_missing),
            **common,
        )
        log.info("notification_sent", notification_id=str(n.id), kind=n.kind, invoice_id=n.invoice_id,
                 attempt=attempts, recorded=outcome)
        return "sent"

    # ------------------------------------------------------------------------------------------
    # around the send

    async def _start_send(self, n: Notification, token: uuid.UUID, attempt_id: uuid.UUID) -> str | None:
        """Mark the send as begun, in its own transaction, just before SMTP (None: go ahead). Also
        the last look at whether it still applies: no "please try again" for an invoice paid by now.
        A send of unknown outcome before this claim is logged here, as the mark is replaced."""
        async with self.db.transaction() as uow:
            if n.kind == NotificationKind.PAYMENT_FAILED.value and n.invoice_id:
                why = await repo.invoice_paid_reason(uow.session, n.invoice_id)
                if why is not None:
                    if not await repo.finish_claim(uow.session, n.id, token, status="skipped", claim_token=None,
                                                   last_error=why):
                        return "lease_lost"
                    await repo.add_attempt(uow.session, n.id, n.attempts, "skipped", why)
                    log.info("payment_failed_skipped_paid", notification_id=str(n.id), invoice_id=n.invoice_id)
                    return "skipped"
            previous = n.send_attempt_id
            if not await repo.start_send(uow.session, n.id, token, attempt_id, previous):
                log.warning("delivery_lease_lost", notification_id=str(n.id), outcome="not sent")
                return "lease_lost"
            if previous is not None:
                started = n.send_started_at.isoformat() if n.send_started_at else "?"
                await repo.add_attempt(uow.session, n.id, n.attempts + 1, "unknown",
                                       f"a send began at {started} and its outcome was never recorded; "
                                       "sending again, same Message-ID")
                log.warning("delivery_outcome_unknown", notification_id=str(n.id), started=started)
        return None

    async def _record_send(
        self,
        n: Notification,
        attempt_id: uuid.UUID,
        outcome: str,
        error: str | None,
        *,
        smtp_code: int | None = None,
        event: CloudEvent | None = None,
        **values: Any,
    ) -> str:
        """Record what our SMTP send did, retrying while the database does not answer: the message
        went out (or not) already, only its bookkeeping is left, and giving up would send it again
        once the lease expires. Lands even after a takeover claimed it, unless that one is sending."""
        for retry in itertools.count(1):
            try:
                async with self.db.transaction() as uow:
                    if not await repo.finish_send(uow.session, n.id, attempt_id, **values):
                        log.warning("delivery_taken_over_mid_send", notification_id=str(n.id), outcome=outcome)
                        return "lease_lost"
                    await repo.add_attempt(uow.session, n.id, int(values.get("attempts", n.attempts)), outcome,
                                           error, smtp_code)
                    if event is not None:
                        self._publish(uow, n, event)
                return outcome
            except Exception as exc:
                if not database_unavailable(exc):
                    raise
                delay = backoff_delay(retry, initial=_RECORD_RETRY_INITIAL, maximum=_RECORD_RETRY_MAX)
                log.warning("delivery_record_retry", notification_id=str(n.id), outcome=outcome, retry=retry,
                            retry_in=round(delay, 2), error=f"{type(exc).__name__}: {exc}"[:300])
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------------------------------
    # helpers

    def _needs_pdf(self, n: Notification) -> bool:
        if self.pdf is None or not n.invoice_id:
            return False
        return n.kind == NotificationKind.INVOICE_SENT.value or n.kind in self.settings.reminder_kinds_with_pdf

    def _failed_event(self, n: Notification, error: str, **values: Any) -> CloudEvent:
        log.error("notification_failed", notification_id=str(n.id), kind=n.kind, error=error)
        return self._event(
            n, NotificationEventType.FAILED, values.get("recipient") or n.recipient or "",
            values.get("subject") or n.subject or "", int(values.get("attempts", n.attempts)), failed_at=utcnow(),
            error=error, attachment_missing=bool(values.get("attachment_missing")),
        )

    async def _fail(
        self, n: Notification, token: uuid.UUID, error: str, smtp_code: int | None = None, **values: Any
    ) -> str:
        """Failed before any send (nothing to build it from, or it cannot be built)."""
        values.setdefault("attempts", n.attempts)
        return await self._finish(
            n, token, "failed", error, smtp_code=smtp_code, status="failed", failed_at=utcnow(), last_error=error,
            claim_token=None, event=self._failed_event(n, error, **values), **values,
        )

    async def _finish(
        self,
        n: Notification,
        token: uuid.UUID,
        outcome: str,
        error: str | None,
        *,
        smtp_code: int | None = None,
        event: CloudEvent | None = None,
        **values: Any,
    ) -> str:
        async with self.db.transaction() as uow:
            if not await repo.finish_claim(uow.session, n.id, token, **values):
                log.warning("delivery_lease_lost", notification_id=str(n.id), outcome=outcome)
                return "lease_lost"
            await repo.add_attempt(
                uow.session, n.id, int(values.get("attempts", n.attempts)), outcome, error, smtp_code
            )
            if event is not None:
                self._publish(uow, n, event)
        return outcome

    async def _attempt(self, n: Notification, outcome: str, error: str | None) -> None:
        async with self.db.transaction() as uow:
            await repo.add_attempt(uow.session, n.id, n.attempts, outcome, error)

    def _event(
        self,
        n: Notification,
        type_: NotificationEventType,
        recipient: str,
        subject: str,
        attempts: int,
        **extra: Any,
    ) -> CloudEvent:
        data = NotificationEventV1(
            message_id=str(n.id),
            smtp_message_id=n.smtp_message_id,
            invoice_id=n.invoice_id,
            kind=n.kind,
            recipient=recipient,
            subject=subject,
            attempts=attempts,
            reminder_sequence=n.reminder_sequence,
            **extra,
        )
        return CloudEvent.create(
            source=SOURCE, type=type_.value, subject=n.invoice_id or str(n.id), data=data,
            correlation_id=n.correlation_id, dataschema=SCHEMA_V1,
        )

    def _publish(self, uow: UnitOfWork, n: Notification, event: CloudEvent) -> None:
        uow.publish(event, topic=topics.NOTIFICATION, key=n.invoice_id or str(n.id))
