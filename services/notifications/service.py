"""Notifications domain: which events become which emails, the reminder scan, open tracking.

No HTTP and no SMTP here: messages are rows (the log and the delivery queue at once) that the
delivery worker (delivery.py) sends.
"""

from __future__ import annotations

import re
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

import structlog
from sqlalchemy.exc import DBAPIError

from contracts import topics
from contracts.envelope import CloudEvent
from contracts.invoice import InvoiceEventType, InvoiceSnapshotV1
from contracts.notification import (
    SCHEMA_V1,
    NotificationEventType,
    NotificationKind,
    NotificationOpenedV1,
)
from contracts.payment import PaymentEventType, PaymentEventV1
from kit.clock import utcnow
from kit.consumer import EventHandler
from kit.db import Database, UnitOfWork
from kit.errors import Conflict, NotFound
from services.notifications import repository as repo
from services.notifications.config import NotificationsSettings
from services.notifications.invoices import OverdueAuthority
from services.notifications.mailer import new_message_id
from services.notifications.models import DeliveryAttempt, Notification
from services.notifications.rendering import Renderer, invoice_view, long_date, money

log = structlog.get_logger(__name__)

SOURCE = "notifications"
CONSUMER_NAME = "notifications"

# A transparent 1x1 GIF, answered for every pixel request, good token or not.
PIXEL_GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{20,64}$")

REMINDER_KINDS = {
    "before_due": NotificationKind.REMINDER_BEFORE_DUE,
    "overdue": NotificationKind.REMINDER_OVERDUE,
}
# Kinds whose "View and pay" button makes sense while money is still due.
_PAY_KINDS = {
    NotificationKind.INVOICE_SENT,
    NotificationKind.PAYMENT_FAILED,
    NotificationKind.REMINDER_BEFORE_DUE,
    NotificationKind.REMINDER_OVERDUE,
}
_METHOD_LABELS = {
    "card": "card",
    "bank_transfer": "bank transfer",
    "cash": "cash",
    "cheque": "cheque",
    "other": "other",
}
_SUBSCRIPTION_HEADLINES = {
    "subscription.created": ("has started", None),
    "subscription.activated": ("is active", None),
    "subscription.updated": ("has been updated", None),
    "subscription.plan_changed": ("has changed plan", None),
    "subscription.cancelled": ("has been cancelled", None),
    "subscription.canceled": ("has been cancelled", None),
    "subscription.trial_will_end": ("trial ends soon", "Add a payment method to keep your service running."),
    "subscription.past_due": ("is past due", "Please update your payment method."),
}


def new_token() -> str:
    """An unguessable tracking token (192 random bits, URL-safe)."""
    return secrets.token_urlsafe(24)


def valid_token(token: str) -> bool:
    return bool(_TOKEN_RE.match(token))


def _iso(value: Any) -> Any:
    return value.isoformat() if isinstance(value, date | datetime) else value


@dataclass
class ScanResult:
    as_of: date
    created: list[dict[str, Any]] = field(default_factory=list)


class NotificationService:
    def __init__(
        self,
        settings: NotificationsSettings,
        renderer: Renderer | None = None,
        *,
        invoices: OverdueAuthority,
        on_new_messages: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.renderer = renderer or Renderer()
        self.invoices = invoices
        self.on_new_messages = on_new_messages

    # ------------------------------------------------------------------------------------------
    # new messages

    def message_values(
        self,
        *,
        kind: str,
        dedupe_key: str,
        invoice_id: str | None,
        client_id: str | None,
        recipient: str | None,
        recipient_name: str | None,
        context: dict[str, Any],
        invoice_snapshot: dict[str, Any] | None,
        correlation_id: str | None = None,
        reminder_id: int | None = None,
        reminder_sequence: int | None = None,
    ) -> dict[str, Any]:
        token = new_token()
        values: dict[str, Any] = {
            "id": uuid.uuid4(),
            "kind": str(kind),
            "status": "pending",
            "dedupe_key": dedupe_key,
            "invoice_id": invoice_id,
            "client_id": client_id,
            "recipient": recipient,
            "recipient_name": recipient_name,
            "smtp_message_id": new_message_id(self.settings.mail_from),
            "tracking_token": token,
            "context": context,
            "correlation_id": correlation_id,
            "reminder_id": reminder_id,
            "reminder_sequence": reminder_sequence,
        }
        # The subject now, for the log; it is rendered again (identically) when the message is sent.
        try:
            values["subject"] = self.renderer.subject(
                str(kind), self.email_context_for(values, invoice_snapshot)
            )
        except Exception as exc:  # noqa: BLE001 - a template problem must not lose the message
            log.warning("subject_render_failed", kind=str(kind), error=str(exc))
            values["subject"] = None
        return values

    # ------------------------------------------------------------------------------------------
    # event handlers (each runs inside the consumer's unit of work, with the inbox claim)

    def handlers(self) -> dict[str, EventHandler]:
        handlers: dict[str, EventHandler] = {t.value: self.on_invoice_event for t in InvoiceEventType}
        for t in (PaymentEventType.SUCCEEDED, PaymentEventType.RECORDED, PaymentEventType.FAILED):
            handlers[t.value] = self.on_payment_event
        for name in _SUBSCRIPTION_HEADLINES:
            handlers[name] = self.on_subscription_event
        return handlers

    async def on_invoice_event(self, uow: UnitOfWork, event: CloudEvent) -> None:
        snap = event.data_as(InvoiceSnapshotV1)
        # `current`: this snapshot is the copy's version (newer, or the same one announced again, as a
        # re-send is); an older one arrived late and sends nothing.
        current = await repo.upsert_invoice(uow.session, snap, event.data)
        kind = {
            InvoiceEventType.SENT.value: NotificationKind.INVOICE_SENT,
            InvoiceEventType.CANCELLED.value: NotificationKind.INVOICE_CANCELLED,
        }.get(event.type)
        if kind is None:
            return
        if not current:
            log.info("stale_invoice_event_no_email", invoice_id=snap.id, version=snap.version, type=event.type)
            return
        values = self.message_values(
            kind=kind,
            dedupe_key=f"{kind}:{event.id}",
            invoice_id=snap.id,
            client_id=snap.client_id,
            recipient=snap.client_email,
            recipient_name=snap.client_name,
            context={"invoice": event.data, "reason": snap.reason, "eventType": event.type},
            invoice_snapshot=event.data,
            correlation_id=event.correlationid,
        )
        await self._add(uow, values)

    async def on_payment_event(self, uow: UnitOfWork, event: CloudEvent) -> None:
        payment = event.data_as(PaymentEventV1)
        kind = (
            NotificationKind.PAYMENT_FAILED
            if event.type == PaymentEventType.FAILED.value
            else NotificationKind.PAYMENT_RECEIPT
        )
        invoice = await repo.get_invoice(uow.session, payment.invoice_id)
        values = self.message_values(
            kind=kind,
            # One receipt (or one "please retry") per payment, however many events announce it.
            dedupe_key=f"{kind}:{payment.payment_id}",
            invoice_id=payment.invoice_id,
            client_id=payment.client_id or (invoice.client_id if invoice else None),
            # Unknown yet when the payment event overtakes the invoice's: resolved at delivery.
            recipient=invoice.client_email if invoice else None,
            recipient_name=invoice.client_name if invoice else None,
            context={"payment": event.data, "eventType": event.type},
            invoice_snapshot=invoice.snapshot if invoice else None,
            correlation_id=event.correlationid,
        )
        await self._add(uow, values)

    async def on_subscription_event(self, uow: UnitOfWork, event: CloudEvent) -> None:
        """subscription.* carry no contract yet: read what is there, email only with an address."""
        data = event.data
        email = data.get("clientEmail") or data.get("email") or data.get("customerEmail")
        if not email:
            log.info("subscription_event_no_email", type=event.type, subject=event.subject)
            return
        headline, detail = _SUBSCRIPTION_HEADLINES.get(event.type, ("has changed", None))
        subscription_id = data.get("subscriptionId") or data.get("id") or event.subject
        values = self.message_values(
            kind=NotificationKind.SUBSCRIPTION,
            dedupe_key=f"{NotificationKind.SUBSCRIPTION}:{event.id}",
            invoice_id=None,
            client_id=data.get("clientId"),
            recipient=email,
            recipient_name=data.get("clientName"),
            context={
                "subscription": {
                    "id": subscription_id,
                    "plan_name": data.get("planName") or data.get("plan"),
                    "headline": headline,
                    "detail": detail,
                },
                "eventType": event.type,
            },
            invoice_snapshot=None,
            correlation_id=event.correlationid,
        )
        await self._add(uow, values)

    async def _add(self, uow: UnitOfWork, values: dict[str, Any]) -> None:
        notification_id = await repo.insert_notification(uow.session, values)
        if notification_id is None:
            log.info("notification_duplicate_skipped", dedupe_key=values["dedupe_key"])
        else:
            log.info("notification_queued", kind=values["kind"], invoice_id=values["invoice_id"],
                     notification_id=str(notification_id))

    # ------------------------------------------------------------------------------------------
    # the message log

    async def notification_detail(
        self, uow: UnitOfWork, notification_id: uuid.UUID
    ) -> tuple[Notification, list[DeliveryAttempt]]:
        n = await repo.get_notification(uow.session, notification_id)
        if n is None:
            raise NotFound("No such notification.")
        return n, await repo.list_attempts(uow.session, notification_id)

    async def retry(self, uow: UnitOfWork, notification_id: uuid.UUID) -> Notification:
        """Queue a failed message again (same Message-ID, attempts counted afresh); only a failed one."""
        n = await repo.requeue_failed(uow.session, notification_id)
        if n is None:
            if await repo.get_notification(uow.session, notification_id) is None:
                raise NotFound("No such notification.")
            raise Conflict("Only a failed notification can be retried.")
        return n

    # ------------------------------------------------------------------------------------------
    # reminders (R1-R4)

    def today(self) -> date:
        return utcnow().astimezone(ZoneInfo(self.settings.reminder_timezone)).date()

    def window(self, as_of: date, overdue_ids: frozenset[str] = frozenset()) -> repo.ReminderWindow:
        s = self.settings
        return repo.ReminderWindow(
            as_of=as_of,
            days_before=tuple(s.reminder_days_before),
            repeat=s.overdue_repeat_days,
            max_notices=s.overdue_max_notices,
            overdue_ids=overdue_ids,
        )

    async def scan_reminders(self, db: Database, as_of: date | None = None, *, batch_size: int = 1000) -> ScanResult:
        """Claim and queue every reminder due as of `as_of` (today by default). Idempotent.

        First the invoice service marks what is past due as of that day: "overdue" is its word, so an
        overdue notice goes only to an invoice it says is OVERDUE (in this answer, or in the copy once
        its invoice.overdue event has arrived). Unreachable, the scan fails before queueing anything
        (`ServiceUnavailable`, a 503 on `POST /api/reminders/run`).

        Then each batch is one transaction: find due reminders, claim them in `reminders` (unique per
        invoice, kind and sequence), queue their messages. Several scans may run at once: each
        reminder is claimed by exactly one, and a crash before commit claims nothing.
        """
        as_of = as_of or self.today()
        window = self.window(as_of, await self.invoices.mark_overdue(as_of))
        result = ScanResult(as_of=as_of)
        while True:
            for attempt in range(5):
                try:
                    found, created = await self._scan_batch(db, window, batch_size)
                    break
                except DBAPIError as exc:  # deadlock/serialization with a concurrent scan: redo
                    code = getattr(getattr(exc, "orig", None), "sqlstate", None) or getattr(
                        getattr(exc.orig, "__cause__", None), "sqlstate", None
                    )
                    if code not in ("40P01", "40001") or attempt == 4:
                        raise
                    log.warning("reminder_scan_retry", sqlstate=code)
            result.created.extend(created)
            if created:
                self.on_new_messages()
            if found < batch_size:
                break
        log.info("reminder_scan_done", as_of=as_of.isoformat(), created=len(result.created))
        return result

    async def _scan_batch(
        self, db: Database, window: repo.ReminderWindow, batch_size: int
    ) -> tuple[int, list[dict[str, Any]]]:
        async with db.transaction() as uow:
            found = await repo.find_due_reminders(uow.session, window, limit=batch_size)
            claimed = await repo.claim_reminders(uow.session, window.as_of, found)
            rows = []
            created = []
            for r in claimed:
                kind = REMINDER_KINDS[r.kind]
                values = self.message_values(
                    kind=kind,
                    dedupe_key=f"reminder:{r.invoice_id}:{r.kind}:{r.sequence}",
                    invoice_id=r.invoice_id,
                    client_id=r.client_id,
                    recipient=r.client_email,
                    recipient_name=r.client_name,
                    context={"reminder": {"kind": r.kind, "sequence": r.sequence, "asOf": window.as_of.isoformat()}},
                    invoice_snapshot=r.snapshot,
                    reminder_id=r.reminder_id,
                    reminder_sequence=r.sequence,
                )
                rows.append(values)
                created.append(
                    {"invoiceId": r.invoice_id, "kind": str(kind), "sequence": r.sequence,
                     "notificationId": str(values["id"])}
                )
            await repo.insert_notifications(uow.session, rows)
        return len(found), created

    # ------------------------------------------------------------------------------------------
    # open tracking (R5)

    async def record_open(self, uow: UnitOfWork, token: str, via: str = "pixel") -> bool:
        """First open of a message: record it and publish notification.opened, in `uow` (atomically).

        False (and nothing recorded) for a malformed or unknown token, or a message opened before.
        """
        if not valid_token(token):
            return False
        now = utcnow()
        n = await repo.record_open(uow.session, token, via, now)
        if n is None:
            return False
        self.publish_opened(uow, n, now, via)
        log.info("notification_opened", notification_id=str(n.id), invoice_id=n.invoice_id, via=via)
        return True

    async def follow_link(self, uow: UnitOfWork, token: str) -> str:
        """Where a tracked link goes; a click also counts as an open. Bad tokens go to the portal."""
        portal = (self.settings.portal_url or "").rstrip("/")
        if not valid_token(token):
            return portal
        now = utcnow()
        n = await repo.record_click(uow.session, token, now)
        if n is None:
            return portal
        opened = await repo.record_open(uow.session, token, "link", now)
        if opened is not None:
            self.publish_opened(uow, opened, now, "link")
        return self.link_target(n.invoice_id)

    def link_target(self, invoice_id: str | None) -> str:
        portal = (self.settings.portal_url or "").rstrip("/")
        return f"{portal}/invoices/{invoice_id}" if invoice_id else portal

    def publish_opened(self, uow: UnitOfWork, n: Notification, now: datetime, via: str) -> None:
        data = NotificationOpenedV1(
            message_id=str(n.id),
            invoice_id=n.invoice_id,
            kind=n.kind,
            opened_at=now,
            recipient=n.recipient or "",
            via=via,
        )
        event = CloudEvent.create(
            source=SOURCE,
            type=NotificationEventType.OPENED.value,
            subject=n.invoice_id or str(n.id),
            data=data,
            correlation_id=n.correlation_id,
            dataschema=SCHEMA_V1,
        )
        uow.publish(event, topic=topics.NOTIFICATION, key=n.invoice_id or str(n.id))

    # ------------------------------------------------------------------------------------------
    # email content

    def email_context_for(self, values: dict[str, Any], invoice_snapshot: dict[str, Any] | None) -> dict[str, Any]:
        return self.email_context(
            kind=values["kind"],
            token=values["tracking_token"],
            invoice_id=values["invoice_id"],
            recipient=values["recipient"],
            recipient_name=values["recipient_name"],
            context=values["context"] or {},
            invoice_snapshot=invoice_snapshot,
        )

    def email_context(
        self,
        *,
        kind: str,
        token: str,
        invoice_id: str | None,
        recipient: str | None,
        recipient_name: str | None,
        context: dict[str, Any],
        invoice_snapshot: dict[str, Any] | None,
        attachment_missing: bool = False,
    ) -> dict[str, Any]:
        public = self.settings.public_url.rstrip("/")
        invoice = invoice_view(invoice_snapshot)
        reminder = context.get("reminder")
        if reminder:
            reminder = dict(reminder)
            due_raw = (invoice_snapshot or {}).get("dueDate")
            if due_raw and reminder.get("asOf"):
                due, as_of = date.fromisoformat(due_raw), date.fromisoformat(reminder["asOf"])
                reminder["days_until_due"] = (due - as_of).days
                reminder["days_overdue"] = (as_of - due).days
            else:
                reminder.setdefault("days_until_due", reminder.get("sequence"))
                reminder.setdefault("days_overdue", 1)
        payment = context.get("payment")
        if payment:
            payment = {
                "amount": money(payment.get("amount"), payment.get("currency")),
                "method": _METHOD_LABELS.get(payment.get("method") or "", payment.get("method")),
                "paid_at": long_date(payment.get("paidAt")),
                "reference": payment.get("reference"),
                "failure_reason": payment.get("failureReason"),
            }
        show_pay = kind in _PAY_KINDS and invoice is not None and invoice["amount_due_minor"] > 0
        return {
            "company": self.settings.company_name,
            "kind": kind,
            "recipient": recipient or "",
            "recipient_name": recipient_name,
            "invoice": invoice,
            "invoice_id": invoice_id,
            "payment": payment,
            "reminder": reminder,
            "subscription": context.get("subscription"),
            "reason": context.get("reason"),
            "view_url": f"{public}/t/l/{token}",
            "pixel_url": f"{public}/t/o/{token}.gif",
            "show_pay_button": show_pay,
            "attachment_missing": attachment_missing,
        }
