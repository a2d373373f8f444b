"""Queries of the payments database. No business decisions here."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import BigInteger, String, and_, bindparam, case, func, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from contracts.invoice import InvoiceSnapshotV1
from kit.pagination import PageRequest, PageResult, SortKey, paginate
from kit.replica import upsert_if_newer
from services.payments.models import (
    CheckoutSession,
    InvoiceCopy,
    Payment,
    Refund,
    StripeCustomer,
    StripeEvent,
    StripeInvoiceCharge,
    StripeObjectState,
)

SETTLED = ("succeeded", "refunded", "partially_refunded")

# The statements of the webhook path, built once with bound values: building select(...).where(...) per
# call was most of each repository call's CPU, about a quarter of payments' samples under the webhook
# bench (bench.profile). SQLAlchemy caches their compiled form by the statement object.
_INVOICE = select(InvoiceCopy).where(InvoiceCopy.id == bindparam("invoice_id"))
# The locked row's current values, also over a copy this session read before the lock.
_INVOICE_FOR_UPDATE = _INVOICE.with_for_update().execution_options(populate_existing=True)
_SESSION = select(CheckoutSession).where(CheckoutSession.id == bindparam("session_id"))
# The locked row's current values: complete_session() writes the row without going through its object.
_SESSION_FOR_UPDATE = _SESSION.with_for_update().execution_options(populate_existing=True)


def _complete_session() -> Any:
    """Lock and complete a session in one UPDATE ... RETURNING (a SELECT ... FOR UPDATE, then an UPDATE at
    the next flush, were two round trips). The same rules as the attribute writes they replace, and
    updated_at moves only when a value does (as the ORM's onupdate)."""
    t = CheckoutSession
    intent = bindparam("payment_intent", type_=String)
    payment_status = bindparam("payment_status", type_=String)
    created = bindparam("created", type_=BigInteger)
    # The intent is set once, from the first event that names one.
    new_intent = case((and_(func.coalesce(intent, "") != "", func.coalesce(t.stripe_payment_intent_id, "") == ""),
                       intent), else_=t.stripe_payment_intent_id)
    # A paid session stays paid; an event without a payment status leaves it.
    new_payment_status = case((and_(func.coalesce(payment_status, "") != "", t.payment_status != "paid"),
                               payment_status), else_=t.payment_status)
    new_created = func.greatest(t.last_event_created, created)
    changed = or_(new_intent.is_distinct_from(t.stripe_payment_intent_id), t.status != "complete",
                  new_payment_status != t.payment_status, new_created != t.last_event_created)
    return (
        update(t).where(t.id == bindparam("session_id"))
        .values(stripe_payment_intent_id=new_intent, status="complete", payment_status=new_payment_status,
                last_event_created=new_created, updated_at=case((changed, func.now()), else_=t.updated_at))
        .returning(t.client_id, t.amount, t.currency)
        # ORM-enabled (pending changes of this session are flushed first), objects not synchronized: a
        # later locked read of the row loads it again (_SESSION_FOR_UPDATE).
        .execution_options(synchronize_session=False)
    )


_COMPLETE_SESSION = _complete_session()


def _stripe_payment(by_intent: bool, by_session: bool, for_update: bool) -> Any:
    conds = []
    if by_intent:
        conds.append(Payment.stripe_payment_intent_id == bindparam("payment_intent"))
    if by_session:
        conds.append(Payment.stripe_checkout_session_id == bindparam("session_id"))
    stmt = select(Payment).where(or_(*conds)).order_by(Payment.created_at).limit(1)
    return stmt.with_for_update() if for_update else stmt


_STRIPE_PAYMENT = {
    (by_intent, by_session, for_update): _stripe_payment(by_intent, by_session, for_update)
    for by_intent in (False, True) for by_session in (False, True) for for_update in (False, True)
    if by_intent or by_session
}
_UNAPPLIED_PAID = (
    select(func.coalesce(func.sum(Payment.amount), 0))
    .where(
        Payment.invoice_id == bindparam("invoice_id"),
        Payment.applied_at.is_(None),
        Payment.held.is_(False),
        Payment.status.in_(SETTLED),
    )
    .scalar_subquery()
)
_UNAPPLIED_REFUNDED = (
    select(func.coalesce(func.sum(Refund.amount), 0))
    .join(Payment, Payment.id == Refund.payment_id)
    .where(Refund.invoice_id == bindparam("invoice_id"), Refund.applied_at.is_(None), Payment.held.is_(False))
    .scalar_subquery()
)
_UNAPPLIED_NET = select(_UNAPPLIED_PAID - _UNAPPLIED_REFUNDED)
# Objects of this session are not synchronized: nothing reads applied_at of a loaded one afterwards.
_MARK_APPLIED = {
    model: update(model).where(model.id == bindparam("cause"), model.applied_at.is_(None))
    .values(applied_at=func.now()).execution_options(synchronize_session=False)
    for model in (Payment, Refund)
}


@dataclass(frozen=True)
class PaymentFilter:
    invoice_id: str | None = None
    client_id: str | None = None
    statuses: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    source: str | None = None

    def scope(self) -> str:
        """Binds a list cursor to these filters: a cursor of another filter is refused, not misread."""
        return (f"payments:-createdAt:{self.invoice_id}:{self.client_id}:{','.join(sorted(self.statuses))}:"
                f"{','.join(sorted(self.methods))}:{self.source}")


def _as_uuid(value: str | None) -> uuid.UUID | None:
    if not value:
        return None
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


class CheckoutTerms(NamedTuple):
    """What a completed Checkout Session asked for, as the payment of it is judged against."""

    client_id: str | None
    amount: int
    currency: str


class Repository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    # -- invoice copies --------------------------------------------------------------------------
    async def get_invoice(self, invoice_id: str, *, for_update: bool = False) -> InvoiceCopy | None:
        stmt = _INVOICE_FOR_UPDATE if for_update else _INVOICE
        return (await self.session.scalars(stmt, {"invoice_id": invoice_id})).first()

    async def upsert_invoice(self, snap: InvoiceSnapshotV1, *, source: str = "event") -> bool:
        """Keep the snapshot if it is strictly newer than the copy (or the first one): kit.replica's rule,
        so an equal version (a redelivery) or an older one (out of order) changes nothing. True when stored."""
        values: dict[str, Any] = {
            "id": snap.id,
            "client_id": snap.client_id,
            "invoice_number": snap.invoice_number,
            "status": snap.status,
            "currency": snap.currency.upper(),
            "total": snap.total,
            "amount_paid": snap.amount_paid,
            "amount_due": snap.amount_due,
            "due_date": snap.due_date,
            "client_name": snap.client_name,
            "client_email": snap.client_email,
            "version": snap.version,
            "stripe_invoice_id": snap.stripe_invoice_id,
            "source": source,
        }
        return await upsert_if_newer(self.session, InvoiceCopy, values)

    async def invoice_of_stripe_invoice(
        self, stripe_invoice_id: str, *, for_update: bool = False
    ) -> InvoiceCopy | None:
        """Our invoice that copies this Stripe invoice (the invoice service keeps one per Stripe invoice)."""
        stmt = (select(InvoiceCopy).where(InvoiceCopy.stripe_invoice_id == stripe_invoice_id)
                .order_by(InvoiceCopy.id).limit(1))
        if for_update:
            stmt = stmt.with_for_update().execution_options(populate_existing=True)
        return (await self.session.scalars(stmt)).first()

    async def lock_stripe_invoice(self, stripe_invoice_id: str) -> None:
        """Serialize the two sides that meet on a Stripe invoice (its charge from the webhook worker, our
        copy from the invoice.* consumer), so the second always sees the first. Taken before either row."""
        await self.session.execute(
            text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"), {"k": f"stripe-invoice:{stripe_invoice_id}"}
        )

    async def mark_applied(self, cause_id: str | None, *, refund: bool) -> int:
        """The invoice service reports (via a snapshot's cause_id) that it applied this payment/refund."""
        cause = _as_uuid(cause_id)
        if cause is None:
            return 0
        result = await self.session.execute(_MARK_APPLIED[Refund if refund else Payment], {"cause": cause})
        return int(result.rowcount or 0)  # type: ignore[attr-defined]

    async def unapplied_net(self, invoice_id: str) -> int:
        """Money this service recorded for the invoice that the invoice's amountPaid does not show yet
        (payments minus refunds, neither applied so far; held payments never are)."""
        return int(await self.session.scalar(_UNAPPLIED_NET, {"invoice_id": invoice_id}) or 0)

    async def lock_invoice_key(self, invoice_id: str) -> None:
        """Serialize checkouts of one invoice without holding its row (a transaction advisory lock)."""
        await self.session.execute(
            text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"), {"k": f"checkout:{invoice_id}"}
        )

    # -- payments --------------------------------------------------------------------------------
    async def get_payment(self, payment_id: uuid.UUID) -> Payment | None:
        return await self.session.get(Payment, payment_id)

    async def find_stripe_payment(
        self, *, payment_intent: str | None, session_id: str | None, for_update: bool = False
    ) -> Payment | None:
        if not payment_intent and not session_id:
            return None
        stmt = _STRIPE_PAYMENT[(bool(payment_intent), bool(session_id), for_update)]
        params = {"payment_intent": payment_intent, "session_id": session_id}
        return (await self.session.scalars(stmt, {k: v for k, v in params.items() if v})).first()

    async def payment_of_stripe_invoice(self, stripe_invoice_id: str, *, for_update: bool = False) -> Payment | None:
        stmt = select(Payment).where(Payment.stripe_invoice_id == stripe_invoice_id)
        if for_update:
            stmt = stmt.with_for_update()
        return (await self.session.scalars(stmt)).first()

    async def search_payments(self, f: PaymentFilter, page: PageRequest) -> PageResult[Payment]:
        """Newest first, one page after `page.cursor`, with the count of all matches (the lists are per
        invoice or per client, both indexed, so the count is cheap)."""
        stmt = select(Payment)
        if f.invoice_id:
            stmt = stmt.where(Payment.invoice_id == f.invoice_id)
        if f.client_id:
            stmt = stmt.where(Payment.client_id == f.client_id)
        if f.statuses:
            stmt = stmt.where(Payment.status.in_(f.statuses))
        if f.methods:
            stmt = stmt.where(Payment.method.in_(f.methods))
        if f.source:
            stmt = stmt.where(Payment.source == f.source)
        order = [SortKey(Payment.created_at, descending=True), SortKey(Payment.id)]
        return await paginate(self.session, stmt, order=order, page=page, scope=f.scope(), with_total=True)

    async def refunds_of(self, payment_ids: list[uuid.UUID]) -> dict[uuid.UUID, list[Refund]]:
        if not payment_ids:
            return {}
        rows = (
            await self.session.scalars(
                select(Refund).where(Refund.payment_id.in_(payment_ids)).order_by(Refund.created_at)
            )
        ).all()
        out: dict[uuid.UUID, list[Refund]] = {}
        for r in rows:
            out.setdefault(r.payment_id, []).append(r)
        return out

    # -- checkout sessions -----------------------------------------------------------------------
    async def get_session(self, session_id: str, *, for_update: bool = False) -> CheckoutSession | None:
        stmt = _SESSION_FOR_UPDATE if for_update else _SESSION
        return (await self.session.scalars(stmt, {"session_id": session_id})).first()

    async def complete_session(
        self, session_id: str, *, payment_intent: str | None, payment_status: str | None, created: int
    ) -> CheckoutTerms | None:
        """Mark our session complete (complete is final: an older "expired" never comes after it), with
        its payment intent and payment status as the event tells them; None when it is not ours."""
        row = (await self.session.execute(_COMPLETE_SESSION, {
            "session_id": session_id, "payment_intent": payment_intent, "payment_status": payment_status,
            "created": created,
        })).first()
        return None if row is None else CheckoutTerms(row.client_id, row.amount, row.currency)

    async def reusable_session(
        self, invoice_id: str, amount: int, currency: str, valid_until: datetime
    ) -> CheckoutSession | None:
        stmt = (
            select(CheckoutSession)
            .where(
                CheckoutSession.invoice_id == invoice_id,
                CheckoutSession.status == "open",
                CheckoutSession.amount == amount,
                CheckoutSession.currency == currency,
                CheckoutSession.expires_at > valid_until,
            )
            .order_by(CheckoutSession.created_at.desc())
            .limit(1)
        )
        return (await self.session.scalars(stmt)).first()

    async def count_sessions(self, invoice_id: str) -> int:
        return int(
            await self.session.scalar(
                select(func.count()).select_from(CheckoutSession).where(CheckoutSession.invoice_id == invoice_id)
            )
            or 0
        )

    async def add_session(self, values: dict[str, Any]) -> CheckoutSession:
        """Insert (a Stripe idempotent replay returns the same session id: keep the first row)."""
        await self.session.execute(insert(CheckoutSession).values(**values).on_conflict_do_nothing())
        row = await self.get_session(values["id"])
        assert row is not None
        return row

    async def session_for_intent(self, payment_intent: str) -> CheckoutSession | None:
        stmt = select(CheckoutSession).where(CheckoutSession.stripe_payment_intent_id == payment_intent).limit(1)
        return (await self.session.scalars(stmt)).first()

    # -- Stripe invoice charges -------------------------------------------------------------------
    async def get_invoice_charge(self, stripe_invoice_id: str) -> StripeInvoiceCharge | None:
        stmt = (select(StripeInvoiceCharge).where(StripeInvoiceCharge.stripe_invoice_id == stripe_invoice_id)
                .with_for_update().execution_options(populate_existing=True))
        return (await self.session.scalars(stmt)).first()

    # -- customers -------------------------------------------------------------------------------
    async def get_customer(self, client_id: str) -> StripeCustomer | None:
        return await self.session.get(StripeCustomer, client_id)

    async def client_of_customer(self, stripe_customer_id: str) -> str | None:
        """Our client of a Stripe customer this service created."""
        return await self.session.scalar(
            select(StripeCustomer.client_id).where(StripeCustomer.stripe_customer_id == stripe_customer_id)
        )

    async def add_customer(self, client_id: str, stripe_customer_id: str, email: str | None) -> StripeCustomer:
        await self.session.execute(
            insert(StripeCustomer)
            .values(client_id=client_id, stripe_customer_id=stripe_customer_id, email=email)
            .on_conflict_do_nothing()
        )
        row = (await self.session.scalars(
            select(StripeCustomer).where(StripeCustomer.client_id == client_id)
            .execution_options(populate_existing=True)
        )).first()
        assert row is not None
        return row

    # -- Stripe events ---------------------------------------------------------------------------
    async def claim_events(self, limit: int) -> list[StripeEvent]:
        stmt = (
            select(StripeEvent)
            .where(StripeEvent.status == "pending", StripeEvent.next_attempt_at <= func.now())
            .order_by(StripeEvent.received_at, StripeEvent.created)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return list((await self.session.scalars(stmt)).all())

    async def advance_object(
        self, object_id: str, object_type: str, created: int, event_id: str, state: dict[str, Any] | None = None,
        *, rank: int = 0,
    ) -> bool:
        """Record `created` as the newest event of a Stripe object; False if a newer one was applied, or one
        of the same second with a higher `rank` (how far along the object's life it is: Stripe's
        timestamps have one-second resolution, a draft and its payment often share one)."""
        stmt = insert(StripeObjectState).values(
            object_id=object_id, object_type=object_type, last_event_created=created,
            last_event_id=event_id, state={**(state or {}), "rank": rank},
        )
        stored_rank = func.coalesce(StripeObjectState.state["rank"].as_integer(), 0)
        upsert = stmt.on_conflict_do_update(
            index_elements=[StripeObjectState.object_id],
            set_={
                "last_event_created": stmt.excluded.last_event_created,
                "last_event_id": stmt.excluded.last_event_id,
                "state": stmt.excluded.state,
                "updated_at": func.now(),
            },
            where=or_(
                StripeObjectState.last_event_created < stmt.excluded.last_event_created,
                and_(StripeObjectState.last_event_created == stmt.excluded.last_event_created, stored_rank <= rank),
            ),
        ).returning(StripeObjectState.object_id)
        return (await self.session.execute(upsert)).first() is not None
