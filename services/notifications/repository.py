"""Data access for the notifications service (SQLAlchemy 2 async, PostgreSQL)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Row, func, literal, select, text, update
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.ext.asyncio import AsyncSession

from contracts.invoice import OPEN_STATUSES, InvoiceSnapshotV1, InvoiceStatus
from kit.pagination import PageRequest, PageResult, SortKey, paginate
from kit.replica import upsert_if_newer
from services.notifications.models import (
    OPEN_SQL_LIST,
    DeliveryAttempt,
    InvoiceCopy,
    Notification,
    PaidStripeInvoice,
    Reminder,
    SettlingPayment,
)

# ----------------------------------------------------------------------------------------------
# invoices (the local copy)


async def upsert_invoice(session: AsyncSession, snap: InvoiceSnapshotV1, raw: dict[str, Any]) -> bool:
    """Keep the copy by the platform's rule (kit.replica: only a strictly newer version is stored).

    True when the snapshot is the copy's state now: stored, or the same version already held (the
    same state announced again, e.g. an invoice re-sent). False when the copy already holds a newer
    version: this snapshot arrived late and must not drive anything (no email from the past).
    """
    values = {
        "id": snap.id,
        "version": snap.version,
        "status": snap.status,
        "invoice_number": snap.invoice_number,
        "currency": snap.currency,
        "client_id": snap.client_id,
        "client_name": snap.client_name,
        "client_email": snap.client_email,
        "total": snap.total,
        "amount_paid": snap.amount_paid,
        "amount_due": snap.amount_due,
        "issue_date": snap.issue_date,
        "due_date": snap.due_date,
        "paid_at": snap.paid_at,
        "stripe_invoice_id": snap.stripe_invoice_id,
        "snapshot": raw,
    }
    if await upsert_if_newer(session, InvoiceCopy, values):
        return True
    held = await session.scalar(select(InvoiceCopy.version).where(InvoiceCopy.id == snap.id))
    return held == snap.version


async def get_invoice(session: AsyncSession, invoice_id: str) -> InvoiceCopy | None:
    return await session.get(InvoiceCopy, invoice_id)


@dataclass(frozen=True)
class InvoiceInfo:
    """What delivery needs of an invoice copy (a plain value, no ORM state)."""

    id: str
    status: InvoiceStatus
    amount_due: int
    client_email: str | None
    client_name: str | None
    snapshot: dict[str, Any]

    @property
    def open_for_reminders(self) -> bool:
        return self.status in OPEN_STATUSES and self.amount_due > 0


async def get_invoice_infos(session: AsyncSession, invoice_ids: Sequence[str]) -> dict[str, InvoiceInfo]:
    """The copies of several invoices in one query."""
    if not invoice_ids:
        return {}
    c = InvoiceCopy
    stmt = select(c.id, c.status, c.amount_due, c.client_email, c.client_name, c.snapshot).where(
        c.id.in_(list(invoice_ids))
    )
    return {row.id: InvoiceInfo(*row) for row in (await session.execute(stmt)).all()}


async def invoice_info_of_stripe(session: AsyncSession, stripe_invoice_id: str) -> InvoiceInfo | None:
    """Our invoice (its copy) of a subscription's Stripe invoice, if its events have arrived."""
    c = InvoiceCopy
    stmt = select(c.id, c.status, c.amount_due, c.client_email, c.client_name, c.snapshot).where(
        c.stripe_invoice_id == stripe_invoice_id
    )
    row = (await session.execute(stmt)).first()
    return InvoiceInfo(*row) if row is not None else None


# ----------------------------------------------------------------------------------------------
# Stripe invoices that are paid (no "update your card" about them)


async def mark_stripe_invoice_paid(session: AsyncSession, stripe_invoice_id: str, paid_at: datetime | None) -> None:
    await session.execute(
        insert(PaidStripeInvoice).values(stripe_invoice_id=stripe_invoice_id, paid_at=paid_at)
        .on_conflict_do_nothing(index_elements=[PaidStripeInvoice.stripe_invoice_id])
    )


async def stripe_invoice_paid(session: AsyncSession, stripe_invoice_id: str) -> bool:
    """Paid, as Stripe said (stripe.invoice.paid) or as our invoice of it says (PAID)."""
    if await session.get(PaidStripeInvoice, stripe_invoice_id) is not None:
        return True
    status = await session.scalar(
        select(InvoiceCopy.status).where(InvoiceCopy.stripe_invoice_id == stripe_invoice_id).limit(1)
    )
    return status == InvoiceStatus.PAID


# ----------------------------------------------------------------------------------------------
# payments that settled an invoice (no "please try again" once it is paid)


async def record_settling_payment(session: AsyncSession, payment_id: str, invoice_id: str, amount: int) -> None:
    """A payment (amount > 0) or a refund (amount < 0) of the invoice, once per payment (refund) id."""
    await session.execute(
        insert(SettlingPayment).values(payment_id=payment_id, invoice_id=invoice_id, amount=amount)
        .on_conflict_do_nothing(index_elements=[SettlingPayment.payment_id])
    )


async def invoice_paid_reason(session: AsyncSession, invoice_id: str) -> str | None:
    """Why the invoice needs no more money, or None: its copy says PAID, or the payments seen for it
    (payment.succeeded / payment.recorded, less payment.refunded) cover its total, the invoice's own
    events not having caught up yet. Without a copy: None (nothing known to be due)."""
    copy = (await session.execute(
        select(InvoiceCopy.status, InvoiceCopy.total).where(InvoiceCopy.id == invoice_id)
    )).first()
    if copy is None:
        return None
    if copy.status == InvoiceStatus.PAID:
        return "invoice is PAID"
    settled = await session.scalar(
        select(func.coalesce(func.sum(SettlingPayment.amount), 0)).where(SettlingPayment.invoice_id == invoice_id)
    )
    if copy.total > 0 and int(settled or 0) >= copy.total:
        return "invoice paid (the payments seen for it cover its total)"
    return None


async def skip_pending(session: AsyncSession, dedupe_key: str, why: str) -> bool:
    """A queued message that no longer applies is not sent (one being sent right now still goes)."""
    stmt = (
        update(Notification)
        .where(Notification.dedupe_key == dedupe_key, Notification.status == "pending")
        .values(status="skipped", last_error=why, updated_at=func.now())
        .returning(Notification.id)
    )
    return (await session.execute(stmt)).first() is not None


async def complete_pending(
    session: AsyncSession, dedupe_key: str, part: str, details: dict[str, Any], *,
    invoice_id: str | None = None, send_now: bool = False,
) -> bool:
    """A message not sent yet takes what a later event knows (its non-null `details` merged into
    `context[part]`, the invoice when it had none), and goes now if `send_now`. A message being sent
    is left alone: the delivery's claim holds the row, and it is no longer pending once that is done."""
    merged = func.coalesce(Notification.context[part], text("'{}'::jsonb")).op("||")(
        func.jsonb_strip_nulls(literal(details, JSONB))
    )
    values: dict[str, Any] = {
        "context": Notification.context.op("||")(func.jsonb_build_object(part, merged)),
        "invoice_id": func.coalesce(Notification.invoice_id, invoice_id),
        "updated_at": func.now(),
    }
    if send_now:
        values["next_attempt_at"] = func.least(Notification.next_attempt_at, func.now())
    stmt = (
        update(Notification)
        .where(Notification.dedupe_key == dedupe_key, Notification.status == "pending")
        .values(**values)
        .returning(Notification.id)
    )
    return (await session.execute(stmt)).first() is not None


# ----------------------------------------------------------------------------------------------
# notifications


async def insert_notification(session: AsyncSession, values: dict[str, Any]) -> uuid.UUID | None:
    """Insert one message unless its dedupe key exists. Returns its id, or None for a duplicate."""
    stmt = (
        insert(Notification)
        .values(**values)
        .on_conflict_do_nothing(index_elements=[Notification.dedupe_key])
        .returning(Notification.id)
    )
    return (await session.execute(stmt)).scalar()


async def insert_notifications(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> None:
    if rows:
        await session.execute(insert(Notification), list(rows))


async def claim_batch(
    session: AsyncSession, *, limit: int, lease: timedelta, claim_token: uuid.UUID
) -> list[Notification]:
    """Take up to `limit` messages that are due (pending, or sending with an expired lease).

    Rows locked by another replica are skipped; the claim itself is the lease: status 'sending',
    `next_attempt_at` pushed past the lease, our `claim_token` recorded.
    """
    due = (
        select(Notification.id)
        .where(Notification.status.in_(("pending", "sending")), Notification.next_attempt_at <= func.now())
        .order_by(Notification.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    stmt = (
        update(Notification)
        .where(Notification.id.in_(due))
        .values(
            status="sending",
            next_attempt_at=func.now() + lease,
            claim_token=claim_token,
            updated_at=func.now(),
        )
        .returning(Notification)
    )
    return list((await session.scalars(stmt)).all())


async def finish_claim(
    session: AsyncSession, notification_id: uuid.UUID, held_token: uuid.UUID, /, **values: Any
) -> bool:
    """Update a claimed message if we still hold its lease. False when the lease was lost."""
    stmt = (
        update(Notification)
        .where(Notification.id == notification_id, Notification.claim_token == held_token)
        .values(updated_at=func.now(), **values)
        .returning(Notification.id)
    )
    return (await session.execute(stmt)).first() is not None


async def start_send(
    session: AsyncSession, notification_id: uuid.UUID, held_token: uuid.UUID, attempt_id: uuid.UUID,
    previous: uuid.UUID | None, /,
) -> bool:
    """Mark a send as begun (just before SMTP) if we still hold the claim and nothing recorded an
    outcome meanwhile (`previous`: the mark of an earlier send of unknown outcome found on the claim,
    replaced now and counted as an attempt). False: not ours to send any more."""
    stmt = (
        update(Notification)
        .where(Notification.id == notification_id, Notification.claim_token == held_token,
               Notification.status == "sending", Notification.send_attempt_id.is_not_distinct_from(previous))
        .values(send_attempt_id=attempt_id, send_started_at=func.now(), updated_at=func.now(),
                attempts=Notification.attempts + (1 if previous is not None else 0))
        .returning(Notification.id)
    )
    return (await session.execute(stmt)).first() is not None


async def finish_send(session: AsyncSession, notification_id: uuid.UUID, attempt_id: uuid.UUID, /,
                      **values: Any) -> bool:
    """Record the outcome of our send: matched on the send's mark, not the claim, so it still lands
    when a takeover has claimed the message but not started its own send (which then finds the
    outcome and sends nothing). False: a takeover has started its own send."""
    stmt = (
        update(Notification)
        .where(Notification.id == notification_id, Notification.send_attempt_id == attempt_id)
        .values(send_attempt_id=None, updated_at=func.now(), **values)
        .returning(Notification.id)
    )
    return (await session.execute(stmt)).first() is not None


async def add_attempt(
    session: AsyncSession,
    notification_id: uuid.UUID,
    attempt: int,
    outcome: str,
    error: str | None = None,
    smtp_code: int | None = None,
) -> None:
    await session.execute(
        insert(DeliveryAttempt).values(
            notification_id=notification_id, attempt=attempt, outcome=outcome, error=error, smtp_code=smtp_code
        )
    )


async def record_open(session: AsyncSession, token: str, via: str, now: datetime) -> Notification | None:
    """Record the first open of a message. None when the token is unknown or it was opened before."""
    values: dict[str, Any] = {"opened_at": now, "opened_via": via, "updated_at": func.now()}
    stmt = (
        update(Notification)
        .where(Notification.tracking_token == token, Notification.opened_at.is_(None))
        .values(**values)
        .returning(Notification)
    )
    return (await session.scalars(stmt)).first()


async def record_click(session: AsyncSession, token: str, now: datetime) -> Notification | None:
    """The message behind a tracked link (its first click time recorded); None for a bad token."""
    stmt = (
        update(Notification)
        .where(Notification.tracking_token == token)
        .values(clicked_at=func.coalesce(Notification.clicked_at, now))
        .returning(Notification)
    )
    return (await session.scalars(stmt)).first()


@dataclass
class NotificationFilter:
    invoice_id: str | None = None
    client_id: str | None = None
    kind: str | None = None
    status: str | None = None
    recipient: str | None = None
    opened: bool | None = None
    created_from: datetime | None = None
    created_to: datetime | None = None

    def scope(self) -> str:
        """The filters as text: a cursor of one filtered list is refused by another."""
        return repr(sorted((k, str(v)) for k, v in vars(self).items() if v is not None))


def notification_conditions(f: NotificationFilter) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if f.invoice_id:
        conditions.append(Notification.invoice_id == f.invoice_id)
    if f.client_id:
        conditions.append(Notification.client_id == f.client_id)
    if f.kind:
        conditions.append(Notification.kind == f.kind)
    if f.status:
        conditions.append(Notification.status == f.status)
    if f.recipient:
        conditions.append(func.lower(Notification.recipient) == f.recipient.lower())
    if f.opened is True:
        conditions.append(Notification.opened_at.is_not(None))
    elif f.opened is False:
        conditions.append(Notification.opened_at.is_(None))
    if f.created_from:
        conditions.append(Notification.created_at >= f.created_from)
    if f.created_to:
        conditions.append(Notification.created_at < f.created_to)
    return conditions


async def list_notifications(
    session: AsyncSession, f: NotificationFilter, page: PageRequest, *, with_total: bool = True
) -> PageResult[Notification]:
    """The message log, newest first (the id breaks ties), one page after `page.cursor`."""
    order = [SortKey(Notification.created_at, descending=True), SortKey(Notification.id, descending=True)]
    stmt = select(Notification).where(*notification_conditions(f))
    return await paginate(session, stmt, order=order, page=page, scope=f"notifications:{f.scope()}",
                          with_total=with_total)


async def get_notification(session: AsyncSession, notification_id: uuid.UUID) -> Notification | None:
    return await session.get(Notification, notification_id)


async def get_notification_by_dedupe_key(session: AsyncSession, dedupe_key: str) -> Notification | None:
    return (await session.scalars(select(Notification).where(Notification.dedupe_key == dedupe_key))).one_or_none()


async def list_attempts(session: AsyncSession, notification_id: uuid.UUID) -> list[DeliveryAttempt]:
    stmt = (
        select(DeliveryAttempt)
        .where(DeliveryAttempt.notification_id == notification_id)
        .order_by(DeliveryAttempt.id)
    )
    return list((await session.scalars(stmt)).all())


async def requeue_failed(session: AsyncSession, notification_id: uuid.UUID) -> Notification | None:
    stmt = (
        update(Notification)
        .where(Notification.id == notification_id, Notification.status == "failed")
        .values(
            status="pending", attempts=0, pdf_attempts=0, defer_count=0, failed_at=None,
            next_attempt_at=func.now(), claim_token=None, send_attempt_id=None, updated_at=func.now(),
        )
        .returning(Notification)
    )
    return (await session.scalars(stmt)).first()


# ----------------------------------------------------------------------------------------------
# reminders

# Open invoices whose due date falls in [lo, hi] (the partial index ix_invoices_open_due), with the
# reminder each one is due for as of :as_of, minus those already claimed. The predicate on status and
# amount_due repeats the partial index's own, so the planner can use it. An overdue notice goes only
# to an invoice the invoice service says is OVERDUE: its copy says so, or the invoice service has just
# answered so (:overdue_ids, before its invoice.overdue event has reached the copy).
_FIND_DUE_SQL = text(
    f"""
    WITH c AS (
        SELECT i.id, i.due_date, i.issue_date, i.status,
               CASE WHEN i.due_date > CAST(:as_of AS date) THEN 'before_due' ELSE 'overdue' END AS kind,
               CASE WHEN i.due_date > CAST(:as_of AS date)
                    THEN (SELECT min(t) FROM unnest(CAST(:days AS integer[])) AS t
                          WHERE t >= i.due_date - CAST(:as_of AS date))
                    ELSE LEAST(CAST(:max_notices AS integer),
                               1 + (CAST(:as_of AS date) - i.due_date - 1) / CAST(:repeat AS integer))
               END AS sequence
        FROM invoices i
        WHERE i.status IN ({OPEN_SQL_LIST}) AND i.amount_due > 0
          AND i.due_date BETWEEN CAST(:lo AS date) AND CAST(:hi AS date)
          AND i.due_date <> CAST(:as_of AS date)
    )
    SELECT c.id AS invoice_id, c.kind, c.sequence, c.due_date
    FROM c
    WHERE c.sequence > 0
      AND (c.kind = 'overdue' OR c.issue_date IS NULL OR c.due_date - c.sequence > c.issue_date)
      AND (c.kind = 'before_due' OR c.status = '{InvoiceStatus.OVERDUE.value}'
           OR c.id = ANY(CAST(:overdue_ids AS varchar[])))
      AND NOT EXISTS (SELECT 1 FROM reminders r
                      WHERE r.invoice_id = c.id AND r.kind = c.kind AND r.sequence = c.sequence)
    ORDER BY c.due_date, c.id
    LIMIT :limit
    """
)

# Claim the reminders found above: the unique (invoice_id, kind, sequence) lets exactly one scan win
# each; a concurrent scan blocks on the same keys until the winner commits, then inserts nothing.
_CLAIM_SQL = text(
    """
    WITH ins AS (
        INSERT INTO reminders (invoice_id, kind, sequence, due_date, as_of)
        SELECT x.invoice_id, x.kind, x.sequence, x.due_date, CAST(:as_of AS date)
        FROM unnest(CAST(:invoice_ids AS varchar[]), CAST(:kinds AS varchar[]),
                    CAST(:sequences AS integer[]), CAST(:due_dates AS date[]))
             AS x(invoice_id, kind, sequence, due_date)
        ORDER BY x.due_date, x.invoice_id
        ON CONFLICT (invoice_id, kind, sequence) DO NOTHING
        RETURNING id, invoice_id, kind, sequence
    )
    SELECT ins.id AS reminder_id, ins.kind, ins.sequence, i.id AS invoice_id, i.client_id, i.client_email,
           i.client_name, i.snapshot
    FROM ins JOIN invoices i ON i.id = ins.invoice_id
    """
)


@dataclass(frozen=True)
class ReminderWindow:
    """The due-date range the scan must look at, as of one day."""

    as_of: date
    days_before: tuple[int, ...]
    repeat: int
    max_notices: int
    # Invoices the invoice service has just said are OVERDUE (their copies may not know it yet).
    overdue_ids: frozenset[str] = frozenset()

    @property
    def lo(self) -> date:
        return self.as_of - timedelta(days=self.max_notices * self.repeat)

    @property
    def hi(self) -> date:
        return self.as_of + timedelta(days=max(self.days_before, default=0))

    def params(self) -> dict[str, Any]:
        return {
            "as_of": self.as_of,
            "days": list(self.days_before),
            "repeat": self.repeat,
            "max_notices": self.max_notices,
            "lo": self.lo,
            "hi": self.hi,
            "overdue_ids": sorted(self.overdue_ids),
        }


async def find_due_reminders(session: AsyncSession, window: ReminderWindow, *, limit: int) -> list[Row[Any]]:
    result = await session.execute(_FIND_DUE_SQL, {**window.params(), "limit": limit})
    return list(result.all())


async def claim_reminders(session: AsyncSession, as_of: date, found: Sequence[Row[Any]]) -> list[Row[Any]]:
    if not found:
        return []
    result = await session.execute(
        _CLAIM_SQL,
        {
            "as_of": as_of,
            "invoice_ids": [r.invoice_id for r in found],
            "kinds": [r.kind for r in found],
            "sequences": [r.sequence for r in found],
            "due_dates": [r.due_date for r in found],
        },
    )
    return list(result.all())


@dataclass(frozen=True)
class ReminderListed:
    reminder: Reminder
    notification_id: uuid.UUID | None
    notification_status: str | None
    sent_at: datetime | None


async def list_reminders(
    session: AsyncSession, *, invoice_id: str | None, page: PageRequest
) -> PageResult[ReminderListed]:
    """Claimed reminders, newest first, each with the message it queued (if any)."""
    stmt = select(Reminder)
    if invoice_id:
        stmt = stmt.where(Reminder.invoice_id == invoice_id)
    result = await paginate(session, stmt, order=[SortKey(Reminder.id, descending=True)], page=page,
                            scope=f"reminders:{invoice_id or ''}", with_total=True)
    reminders: list[Reminder] = result.items
    messages = {}
    if reminders:
        rows = await session.execute(
            select(Notification.reminder_id, Notification.id, Notification.status, Notification.sent_at)
            .where(Notification.reminder_id.in_([r.id for r in reminders]))
        )
        messages = {row.reminder_id: (row.id, row.status, row.sent_at) for row in rows}
    items = [ReminderListed(r, *messages.get(r.id, (None, None, None))) for r in reminders]
    return PageResult(items=items, next_cursor=result.next_cursor, has_more=result.has_more, total=result.total)
