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
from datetime import UTC, date, datetime, timedelta
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
from contracts.stripe import StripeEventType, StripeInvoiceV1
from contracts.subscription import SubscriptionEventType, SubscriptionSnapshotV1, SubscriptionStatus
from kit.clock import utcnow
from kit.consumer import EventHandler
from kit.db import Database, UnitOfWork
from kit.errors import Conflict, NotFound
from services.notifications import repository as repo
from services.notifications.config import NotificationsSettings
from services.notifications.invitations import ACTION_LABEL as INVITATION_ACTION
from services.notifications.invitations import INVITATION_KIND, InvitationContext
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
# subscription.* events that become a short notice (kind `subscription`). trial_will_end and past_due
# have emails of their own (trial_will_end, card_update); the other changes say nothing to the client.
_SUBSCRIPTION_HEADLINES = {
    SubscriptionEventType.CREATED: ("has started", None),
    SubscriptionEventType.ACTIVATED: ("is active", None),
    SubscriptionEventType.CANCELED: ("has been cancelled", None),
}
# Kinds about the client's subscription: their link goes to the portal's subscription page (which
# offers "Manage billing", Stripe's billing portal), and a missing address is asked for at delivery.
SUBSCRIPTION_KINDS = frozenset({NotificationKind.SUBSCRIPTION, NotificationKind.TRIAL_WILL_END,
                                NotificationKind.CARD_UPDATE})
_ACTION_LABELS: dict[str, str] = {
    NotificationKind.CARD_UPDATE: "Update your card",
    NotificationKind.TRIAL_WILL_END: "Manage your subscription",
}


def card_update_key(stripe_invoice_id: str) -> str:
    """One "update your card" per Stripe invoice, whichever event (Stripe's failure, past_due) asks."""
    return f"{NotificationKind.CARD_UPDATE}:{stripe_invoice_id}"


def _every(interval: str | None, count: int | None) -> str:
    """'month', '3 months', 'year'."""
    if not interval:
        return ""
    return interval if not count or count == 1 else f"{count} {interval}s"


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
        """The dispatch table: event type -> its handler (the consumer's allow list)."""
        handlers: dict[str, EventHandler] = {t.value: self.on_invoice_event for t in InvoiceEventType}
        handlers |= {
            PaymentEventType.SUCCEEDED: self.on_payment_event,
            PaymentEventType.RECORDED: self.on_payment_event,
            PaymentEventType.FAILED: self.on_payment_event,
            PaymentEventType.REFUNDED: self.on_payment_refunded,
            SubscriptionEventType.TRIAL_WILL_END: self.on_trial_will_end,
            SubscriptionEventType.PAST_DUE: self.on_subscription_past_due,
            StripeEventType.INVOICE_PAYMENT_FAILED: self.on_stripe_payment_failed,
            StripeEventType.INVOICE_PAID: self.on_stripe_invoice_paid,
        }
        handlers |= {t: self.on_subscription_notice for t in _SUBSCRIPTION_HEADLINES}
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
        failed = event.type == PaymentEventType.FAILED.value
        kind = NotificationKind.PAYMENT_FAILED if failed else NotificationKind.PAYMENT_RECEIPT
        if not failed:  # money settled: kept, so a stale failure of this invoice mails nothing
            await repo.record_settling_payment(uow.session, payment.payment_id, payment.invoice_id, payment.amount)
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
        # An older attempt's failure (another PaymentIntent) after the invoice was paid: payments has
        # recorded it; "please try again" would be wrong. Logged as skipped; delivery checks again.
        if failed and (why := await repo.invoice_paid_reason(uow.session, payment.invoice_id)) is not None:
            values |= {"status": "skipped", "last_error": why}
        await self._add(uow, values)

    async def on_payment_refunded(self, uow: UnitOfWork, event: CloudEvent) -> None:
        """No email; money back off the invoice (a later failure may be worth a "please try again")."""
        refund = event.data_as(PaymentEventV1)
        await repo.record_settling_payment(uow.session, refund.payment_id, refund.invoice_id, -abs(refund.amount))

    async def on_subscription_notice(self, uow: UnitOfWork, event: CloudEvent) -> None:
        """subscription.created/.activated/.canceled: a short notice, one per event."""
        sub = event.data_as(SubscriptionSnapshotV1)
        headline, detail = _SUBSCRIPTION_HEADLINES[SubscriptionEventType(event.type)]
        context = {"subscription": {"id": sub.id, "plan_name": sub.plan_name, "headline": headline,
                                    "detail": detail}, "eventType": event.type}
        await self._add(uow, self._subscription_message(
            NotificationKind.SUBSCRIPTION, f"{NotificationKind.SUBSCRIPTION}:{event.id}", sub, context, event))

    async def on_trial_will_end(self, uow: UnitOfWork, event: CloudEvent) -> None:
        """Stripe's notice before a trial ends: "your trial ends on <date>", once per subscription and
        trial end (a trial extended to a new end gets its own)."""
        sub = event.data_as(SubscriptionSnapshotV1)
        if sub.trial_end is None or sub.status != SubscriptionStatus.TRIALING:
            log.info("trial_notice_not_applicable", subscription=sub.id, status=sub.status)
            return
        context = {"subscription": {
            "id": sub.id, "plan_name": sub.plan_name, "trial_end": sub.trial_end.isoformat(),
            "amount": sub.unit_amount * sub.quantity if sub.unit_amount is not None else None,
            "currency": sub.currency, "interval": sub.interval, "interval_count": sub.interval_count,
        }, "eventType": event.type}
        # Keyed by Stripe's subscription and the trial end to the second in UTC: two snapshots of one
        # Stripe subscription (e.g. mirrored twice under load) must not mail the client twice.
        trial_end = sub.trial_end.astimezone(UTC).replace(microsecond=0).isoformat()
        key = f"{NotificationKind.TRIAL_WILL_END}:{sub.stripe_subscription_id}:{trial_end}"
        await self._add(uow, self._subscription_message(NotificationKind.TRIAL_WILL_END, key, sub, context, event))

    async def on_subscription_past_due(self, uow: UnitOfWork, event: CloudEvent) -> None:
        """The subscription went past_due (a renewal could not be charged): "update your card", once
        per Stripe invoice (Stripe's own payment_failed may have asked already)."""
        sub = event.data_as(SubscriptionSnapshotV1)
        stripe_invoice_id = sub.latest_stripe_invoice_id
        if stripe_invoice_id and await repo.stripe_invoice_paid(uow.session, stripe_invoice_id):
            log.info("card_update_invoice_paid", subscription=sub.id, stripe_invoice=stripe_invoice_id)
            return
        # Without the invoice's id (an older producer): once per subscription and billing period.
        period = sub.current_period_start.isoformat() if sub.current_period_start else str(sub.version)
        key = card_update_key(stripe_invoice_id or f"subscription:{sub.id}:{period}")
        card = {"stripe_invoice_id": stripe_invoice_id, "plan_name": sub.plan_name}
        values = self._subscription_message(NotificationKind.CARD_UPDATE, key, sub,
                                            {"card": card, "eventType": event.type}, event)
        # Stripe's failure event (another topic, in no order with this one) knows the amount and the
        # retry date: the message waits a little for it, and goes at once when it comes.
        values["next_attempt_at"] = utcnow() + timedelta(seconds=self.settings.card_update_wait)
        if not await self._add(uow, values):
            # Stripe's came first and queued the message: the plan's name is ours to add.
            await repo.complete_pending(uow.session, key, "card", card)

    async def on_stripe_payment_failed(self, uow: UnitOfWork, event: CloudEvent) -> None:
        """Stripe could not charge a subscription's invoice: "update your card", once per Stripe
        invoice, never once it is paid, never to a Stripe customer that is no client of ours."""
        data = event.data_as(StripeInvoiceV1)
        if data.subscription_id is None or not data.client_id:
            log.info("card_update_no_client", stripe_invoice=data.invoice_id, customer=data.customer_id)
            return
        if data.status == "paid" or await repo.stripe_invoice_paid(uow.session, data.invoice_id):
            log.info("card_update_invoice_paid", stripe_invoice=data.invoice_id)
            return
        ours = await repo.invoice_info_of_stripe(uow.session, data.invoice_id)
        card = {
            "stripe_invoice_id": data.invoice_id, "amount": data.amount_remaining or data.amount_due,
            "currency": data.currency, "next_attempt": _iso(data.next_payment_attempt),
        }
        key = card_update_key(data.invoice_id)
        values = self.message_values(
            kind=NotificationKind.CARD_UPDATE,
            dedupe_key=key,
            invoice_id=ours.id if ours else None,
            client_id=data.client_id,
            # Unknown yet when Stripe's event overtakes our invoice's: resolved at delivery.
            recipient=ours.client_email if ours else None,
            recipient_name=ours.client_name if ours else None,
            context={"card": card, "eventType": event.type},
            invoice_snapshot=ours.snapshot if ours else None,
            correlation_id=event.correlationid,
        )
        if not await self._add(uow, values) and await repo.complete_pending(
            uow.session, key, "card", card, invoice_id=ours.id if ours else None, send_now=True,
        ):
            # past_due came first: its message, still waiting, now has the amount and the retry date.
            log.info("card_update_completed", stripe_invoice=data.invoice_id)

    async def on_stripe_invoice_paid(self, uow: UnitOfWork, event: CloudEvent) -> None:
        """Paid (a retry went through, or the client paid): no "update your card" about it any more."""
        data = event.data_as(StripeInvoiceV1)
        await repo.mark_stripe_invoice_paid(uow.session, data.invoice_id, data.paid_at)
        if await repo.skip_pending(uow.session, card_update_key(data.invoice_id), "invoice paid"):
            log.info("card_update_skipped_paid", stripe_invoice=data.invoice_id)

    def _subscription_message(self, kind: NotificationKind, dedupe_key: str, sub: SubscriptionSnapshotV1,
                              context: dict[str, Any], event: CloudEvent) -> dict[str, Any]:
        return self.message_values(
            kind=kind,
            dedupe_key=dedupe_key,
            invoice_id=None,
            client_id=sub.client_id,
            # The subscriptions service knows the address when it has the Stripe customer's; else the
            # invoice service is asked at delivery.
            recipient=sub.client_email,
            recipient_name=sub.client_name,
            context=context,
            invoice_snapshot=None,
            correlation_id=event.correlationid,
        )

    async def _add(self, uow: UnitOfWork, values: dict[str, Any]) -> bool:
        """Queue a message; False when its dedupe key was queued before (nothing new is written)."""
        notification_id = await repo.insert_notification(uow.session, values)
        if notification_id is None:
            log.info("notification_duplicate_skipped", dedupe_key=values["dedupe_key"])
            return False
        if values["status"] == "skipped":
            log.info("notification_not_applicable", kind=values["kind"], invoice_id=values["invoice_id"],
                     notification_id=str(notification_id), why=values.get("last_error"))
        else:
            log.info("notification_queued", kind=values["kind"], invoice_id=values["invoice_id"],
                     notification_id=str(notification_id))
        return True

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
        """Queue a failed message again (same Message-ID, attempts counted afresh); only a failed one.

        An invoice's message takes the client's name and address from the invoice's copy as it is now:
        a retry after the cause was fixed (a name that could not go into a header, a wrong address)
        uses the fixed one."""
        n = await repo.requeue_failed(uow.session, notification_id)
        if n is None:
            if await repo.get_notification(uow.session, notification_id) is None:
                raise NotFound("No such notification.")
            raise Conflict("Only a failed notification can be retried.")
        copy = await repo.get_invoice(uow.session, n.invoice_id) if n.invoice_id else None
        if copy is not None and copy.client_email:
            n.recipient, n.recipient_name = copy.client_email, copy.client_name
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
        return self.link_target(n.invoice_id, n.kind)

    def link_target(self, invoice_id: str | None, kind: str | None = None) -> str:
        portal = (self.settings.portal_url or "").rstrip("/")
        if kind in SUBSCRIPTION_KINDS:
            return f"{portal}/subscription"
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
        subscription = context.get("subscription")
        if subscription and kind == NotificationKind.TRIAL_WILL_END:
            subscription = {**subscription, "trial_ends_on": long_date(subscription.get("trial_end")),
                            "price": money(subscription.get("amount"), subscription.get("currency")),
                            "every": _every(subscription.get("interval"), subscription.get("interval_count"))}
        card = context.get("card")
        if card:
            card = {**card, "amount": money(card.get("amount"), card.get("currency")),
                    "next_attempt": long_date(card.get("next_attempt"))}
        view_url = f"{public}/t/l/{token}"
        invitation = None
        if kind == INVITATION_KIND:
            invitation = InvitationContext.model_validate(context["invitation"])
            # The link itself, not the tracked redirect: it is a one-time credential (opens are
            # still seen through the pixel).
            view_url = invitation.link
        return {
            "company": self.settings.company_name,
            "kind": kind,
            "recipient": recipient or "",
            "recipient_name": recipient_name,
            "invoice": invoice,
            "invoice_id": invoice_id,
            "payment": payment,
            "reminder": reminder,
            "subscription": subscription,
            "card": card,
            "reason": context.get("reason"),
            "invitation": invitation,
            "view_url": view_url,
            "pixel_url": f"{public}/t/o/{token}.gif",
            "show_pay_button": show_pay,
            "action_label": INVITATION_ACTION if invitation else _ACTION_LABELS.get(kind),
            "attachment_missing": attachment_missing,
        }
