"""Payments domain logic: Pay Now (Checkout), manual payments, Stripe event handling. No HTTP.

Money rules:
* A payment is one row per Stripe PaymentIntent (else per Checkout Session), or one per manual
  record. A Stripe payment that reaches `succeeded` never goes back; a later failure for it is stale.
* What is still due = invoice total − the invoice's amountPaid − what this service recorded that the
  invoice service has not applied yet (it tells us through the snapshot's causeId).
* Amounts are recorded exactly as Stripe reports them, never rounded: an underpayment is a partial
  payment, an overpayment is recorded in full, both flagged; a payment in another currency than the
  invoice is recorded, flagged and held (not sent to the invoice service) for a human to resolve.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from contracts import topics
from contracts.envelope import CloudEvent
from contracts.invoice import InvoiceEventType, InvoiceSnapshotV1
from contracts.payment import SCHEMA_V1 as PAYMENT_SCHEMA
from contracts.payment import PaymentEventType, PaymentEventV1
from contracts.stripe import SCHEMA_INVOICE_V1, SCHEMA_SUBSCRIPTION_V1
from kit.actor import Actor
from kit.db import UnitOfWork
from kit.errors import Conflict, InvalidInput, NotFound
from kit.logging import current_correlation_id
from services.payments import normalize
from services.payments.config import PaymentsSettings
from services.payments.invoice_client import InvoiceReader, InvoiceServiceUnavailable
from services.payments.models import CheckoutSession, InvoiceCopy, Payment, Refund, StripeEvent
from services.payments.repository import SETTLED, PaymentFilter, Repository
from services.payments.schemas import MarkPaidRequest
from services.payments.stripe_gateway import StripeGateway, StripeUnavailable

log = structlog.get_logger(__name__)
SOURCE = "payments"

NOT_PAYABLE = {"DRAFT": "a draft", "PAID": "already paid", "CANCELLED": "cancelled"}

# Stripe event types this service handles (others are acknowledged and ignored).
CHECKOUT_EVENTS = frozenset({
    "checkout.session.completed",
    "checkout.session.async_payment_succeeded",
    "checkout.session.async_payment_failed",
    "checkout.session.expired",
})
PAYMENT_EVENTS = frozenset({"payment_intent.payment_failed", "charge.refunded"})
SUBSCRIPTION_EVENTS = frozenset({
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "customer.subscription.trial_will_end",
})
STRIPE_INVOICE_EVENTS = frozenset({"invoice.paid", "invoice.payment_failed"})
HANDLED_EVENTS = CHECKOUT_EVENTS | PAYMENT_EVENTS | SUBSCRIPTION_EVENTS | STRIPE_INVOICE_EVENTS


def utcnow() -> datetime:
    return datetime.now(UTC)


def from_unix(value: int | None) -> datetime | None:
    return datetime.fromtimestamp(int(value), tz=UTC) if value else None


class RetryLater(Exception):
    """The event cannot be handled yet (e.g. a refund before its payment): try again later."""


@dataclass(frozen=True)
class Assessment:
    flags: list[str]
    held: bool
    amount_due: int | None


def payment_event(
    payment: Payment,
    event_type: PaymentEventType,
    *,
    amount: int | None = None,
    payment_id: str | None = None,
    reference: str | None = None,
    stripe_event_id: str | None = None,
) -> CloudEvent:
    data = PaymentEventV1(
        payment_id=payment_id or str(payment.id),
        invoice_id=payment.invoice_id,
        client_id=payment.client_id,
        amount=payment.amount if amount is None else amount,
        currency=payment.currency,
        method=payment.method,
        status={
            PaymentEventType.SUCCEEDED: "succeeded",
            PaymentEventType.RECORDED: "succeeded",
            PaymentEventType.FAILED: "failed",
            PaymentEventType.REFUNDED: "refunded",
        }[event_type],
        paid_at=payment.paid_at,
        reference=reference if reference is not None else payment.reference,
        failure_reason=payment.failure_message if event_type == PaymentEventType.FAILED else None,
        stripe_payment_intent_id=payment.stripe_payment_intent_id,
        stripe_checkout_session_id=payment.stripe_checkout_session_id,
        stripe_event_id=stripe_event_id,
    )
    return CloudEvent.create(
        source=SOURCE,
        type=event_type,
        subject=payment.invoice_id,
        data=data,
        correlation_id=current_correlation_id(),
        dataschema=PAYMENT_SCHEMA,
    )


class InvoiceCopies:
    """The local copy of invoices, with the HTTP fallback for one not seen in an event yet."""

    def __init__(self, repo: Repository, reader: InvoiceReader) -> None:
        self.repo = repo
        self.reader = reader

    async def get(self, invoice_id: str, *, for_update: bool = False) -> InvoiceCopy | None:
        copy = await self.repo.get_invoice(invoice_id, for_update=for_update)
        if copy is not None:
            return copy
        snap = await self.reader.fetch(invoice_id)
        if snap is None:
            return None
        await self.repo.upsert_invoice(snap, source="http")
        return await self.repo.get_invoice(invoice_id, for_update=for_update)

    async def refresh(self, copy: InvoiceCopy) -> InvoiceCopy:
        """Re-read the invoice (and which of our payments its ledger holds) from the invoice service when
        the copy may lag behind its events, say the invoice.sent event is still on its way. Used before
        refusing something; if the invoice service cannot answer, the copy stands."""
        try:
            # The ledger first: a payment applied in between then shows in amountPaid and still counts
            # as pending here, which errs towards refusing, never towards an overpayment.
            applied = await self.reader.applied(copy.id)
            snap = await self.reader.fetch(copy.id)
        except InvoiceServiceUnavailable as exc:
            log.warning("invoice_refresh_failed", invoice_id=copy.id, error=exc.message)
            return copy
        if snap is None:
            return copy
        # Everything in that ledger is in the snapshot's amountPaid, so in the copy's once it is stored.
        await self.repo.upsert_invoice(snap, source="http")
        for payment_id, kind in applied:
            await self.repo.mark_applied(payment_id, refund=kind == "refund")
        await self.repo.session.refresh(copy)
        log.info("invoice_copy_refreshed", invoice_id=copy.id, version=copy.version, status=copy.status)
        return copy

    async def outstanding(self, copy: InvoiceCopy) -> int:
        return copy.total - copy.amount_paid - await self.repo.unapplied_net(copy.id)


async def apply_invoice_snapshot(uow: UnitOfWork, event_type: str, snap: InvoiceSnapshotV1) -> bool:
    """invoice.* consumer: keep the newest snapshot; note which of our payments it reports applied."""
    repo = Repository(uow.session)
    stored = await repo.upsert_invoice(snap)
    if snap.cause_id:
        if event_type in (InvoiceEventType.PAID, InvoiceEventType.PARTIALLY_PAID):
            await repo.mark_applied(snap.cause_id, refund=False)
        elif event_type == InvoiceEventType.UPDATED and snap.reason == "refunded":
            await repo.mark_applied(snap.cause_id, refund=True)
    return stored


class PaymentsService:
    """What the HTTP API does: Pay Now, manual payments, history."""

    def __init__(
        self,
        uow: UnitOfWork,
        settings: PaymentsSettings,
        stripe: StripeGateway,
        invoices: InvoiceReader,
    ) -> None:
        self.uow = uow
        self.settings = settings
        self.stripe = stripe
        self.repo = Repository(uow.session)
        self.copies = InvoiceCopies(self.repo, invoices)

    # -- Pay Now ---------------------------------------------------------------------------------
    async def checkout(self, invoice_id: str, actor: Actor) -> tuple[CheckoutSession, bool]:
        """A Checkout Session for what is due; (session, reused). A repeat while one is open gets it back."""
        await self.repo.lock_invoice_key(invoice_id)
        copy = await self.copies.get(invoice_id)
        if copy is None or not actor.can_see_client(copy.client_id):
            raise NotFound(f"Invoice {invoice_id} not found.")
        if copy.status in NOT_PAYABLE or await self.copies.outstanding(copy) <= 0:
            copy = await self.copies.refresh(copy)
        if copy.status in NOT_PAYABLE:
            raise Conflict(
                f"Invoice {copy.invoice_number or invoice_id} is {NOT_PAYABLE[copy.status]} and cannot be paid online.",
                code="invoice_not_payable",
                details={"status": copy.status},
            )
        due = await self.copies.outstanding(copy)
        if due <= 0:
            raise Conflict(
                "Nothing is left to pay on this invoice (a payment may still be processing).",
                code="nothing_due",
                details={"amountDue": max(due, 0)},
            )
        now = utcnow()
        reusable = await self.repo.reusable_session(invoice_id, due, copy.currency, now + timedelta(minutes=10))
        if reusable is not None:
            return reusable, True

        customer_id = await self._customer(copy)
        attempt = await self.repo.count_sessions(invoice_id)
        idempotency_key = f"checkout:{invoice_id}:v{copy.version}:{due}:{copy.currency}:{attempt}"
        expires_at = now + timedelta(minutes=max(30, min(self.settings.checkout_expires_minutes, 24 * 60)))
        label = f"Invoice {copy.invoice_number}" if copy.invoice_number else f"Invoice {invoice_id[:8]}"
        portal = self.settings.portal_url.rstrip("/")
        success_url = f"{portal}/invoices/{invoice_id}?checkout=success&session_id={{CHECKOUT_SESSION_ID}}"
        cancel_url = f"{portal}/invoices/{invoice_id}?checkout=cancelled"
        metadata = {"invoice_id": invoice_id, "client_id": copy.client_id}
        if copy.invoice_number:
            metadata["invoice_number"] = copy.invoice_number
        params: dict[str, Any] = {
            "mode": "payment",
            "client_reference_id": invoice_id,
            "metadata": metadata,
            "line_items": [
                {
                    "price_data": {
                        "currency": copy.currency.lower(),
                        "unit_amount": due,
                        "product_data": {"name": label},
                    },
                    "quantity": 1,
                }
            ],
            "payment_intent_data": {"metadata": metadata, "description": label},
            "success_url": success_url,
            "cancel_url": cancel_url,
            "expires_at": int(expires_at.timestamp()),
        }
        if customer_id:
            params["customer"] = customer_id
        if self.settings.payment_methods:
            params["payment_method_types"] = list(self.settings.payment_methods)
        session = await self.stripe.create_checkout_session(params, idempotency_key=idempotency_key)
        session_id = session.get("id")
        if not session_id:
            raise StripeUnavailable("Stripe returned a checkout session without an id.")
        stand_in = self.settings.stand_in_checkout
        if stand_in:
            url = f"{self.settings.public_url.rstrip('/')}/portal/checkout/{session_id}"
        else:
            url = session.get("url") or ""
            if not url:
                raise StripeUnavailable("Stripe returned a checkout session without a URL.")
        returned_expiry = from_unix(session.get("expires_at"))
        row = await self.repo.add_session(
            {
                "id": session_id,
                "invoice_id": invoice_id,
                "client_id": copy.client_id,
                "amount": due,
                "currency": copy.currency,
                "status": "open",
                "payment_status": "unpaid",
                "url": url,
                "success_url": success_url.replace("{CHECKOUT_SESSION_ID}", session_id),
                "cancel_url": cancel_url,
                "idempotency_key": idempotency_key,
                "invoice_version": copy.version,
                "stripe_customer_id": customer_id,
                "stand_in": stand_in,
                "expires_at": returned_expiry if returned_expiry and returned_expiry > now else expires_at,
            }
        )
        log.info("checkout_session_created", invoice_id=invoice_id, session_id=session_id, amount=due,
                 currency=copy.currency, stand_in=stand_in)
        return row, False

    async def _customer(self, copy: InvoiceCopy) -> str | None:
        existing = await self.repo.get_customer(copy.client_id)
        if existing is not None:
            return existing.stripe_customer_id
        params: dict[str, Any] = {"metadata": {"client_id": copy.client_id}}
        if copy.client_email:
            params["email"] = copy.client_email
        if copy.client_name:
            params["name"] = copy.client_name
        customer = await self.stripe.create_customer(params, idempotency_key=f"customer:{copy.client_id}")
        if not customer.get("id"):
            return None
        row = await self.repo.add_customer(copy.client_id, customer["id"], copy.client_email)
        return row.stripe_customer_id

    async def checkout_status(self, session_id: str, actor: Actor) -> tuple[CheckoutSession, str, Payment | None]:
        row = await self.repo.get_session(session_id)
        if row is None or not actor.can_see_client(row.client_id or ""):
            raise NotFound(f"Checkout session {session_id} not found.")
        payment = await self.repo.find_stripe_payment(
            payment_intent=row.stripe_payment_intent_id, session_id=row.id
        )
        if payment is not None and payment.status in SETTLED:
            state = "paid"
        elif payment is not None and payment.status == "failed":
            state = "failed"
        elif row.status == "expired":
            state = "expired"
        else:
            state = "processing"
        return row, state, payment

    # -- manual payments -------------------------------------------------------------------------
    async def mark_paid(self, invoice_id: str, body: MarkPaidRequest, actor: Actor) -> Payment:
        copy = await self.copies.get(invoice_id, for_update=True)
        if copy is None:
            raise NotFound(f"Invoice {invoice_id} not found.")
        if copy.status in NOT_PAYABLE or body.amount > await self.copies.outstanding(copy):
            copy = await self.copies.refresh(copy)
        if copy.status in NOT_PAYABLE:
            raise Conflict(
                f"Invoice {copy.invoice_number or invoice_id} is {NOT_PAYABLE[copy.status]}; "
                "no payment can be recorded.",
                code="invoice_not_payable",
                details={"status": copy.status},
            )
        if body.currency and body.currency != copy.currency:
            raise InvalidInput(
                f"The invoice is in {copy.currency}; a payment in {body.currency} cannot be recorded against it.",
                code="currency_mismatch",
                details=[{"field": "currency", "message": f"must be {copy.currency}"}],
            )
        paid_at = body.paid_at or utcnow()
        if paid_at > utcnow() + timedelta(days=1):
            raise InvalidInput("paidAt is in the future.", details=[{"field": "paidAt", "message": "in the future"}])
        due = await self.copies.outstanding(copy)
        if body.amount > due:
            pending = copy.total - copy.amount_paid - due
            raise InvalidInput(
                f"Overpayment refused: {body.amount} exceeds the {max(due, 0)} still due"
                + (f" ({pending} already recorded and being applied)." if pending else "."),
                code="overpayment",
                details={"amountDue": max(due, 0), "requested": body.amount, "currency": copy.currency,
                         "pending": pending},
            )
        payment = Payment(
            id=uuid.uuid4(),
            invoice_id=invoice_id,
            client_id=copy.client_id,
            amount=body.amount,
            currency=copy.currency,
            method=body.method.value,
            source="manual",
            status="succeeded",
            amount_refunded=0,
            paid_at=paid_at,
            reference=body.reference,
            flags=[] if body.amount == due else ["partial"],
            held=False,
            recorded_by=actor.user_id or actor.role,
        )
        self.uow.session.add(payment)
        await self.uow.session.flush()
        self.uow.publish(payment_event(payment, PaymentEventType.RECORDED), topic=topics.PAYMENT, key=invoice_id)
        log.info("manual_payment_recorded", invoice_id=invoice_id, payment_id=str(payment.id), amount=body.amount,
                 method=payment.method)
        return payment

    # -- history ---------------------------------------------------------------------------------
    async def search(
        self, f: PaymentFilter, actor: Actor, *, page: int, page_size: int
    ) -> tuple[list[Payment], dict[uuid.UUID, list[Refund]], int]:
        if not actor.is_admin:
            if f.client_id and f.client_id != actor.client_id:
                raise NotFound(f"Client {f.client_id} not found.")
            if f.invoice_id:
                copy = await self.repo.get_invoice(f.invoice_id)
                if copy is not None and copy.client_id != actor.client_id:
                    raise NotFound(f"Invoice {f.invoice_id} not found.")
            f = PaymentFilter(invoice_id=f.invoice_id, client_id=actor.client_id, statuses=f.statuses,
                              methods=f.methods, source=f.source)
        rows, total = await self.repo.search_payments(f, page=page, page_size=page_size)
        refunds = await self.repo.refunds_of([p.id for p in rows])
        return rows, refunds, total

    async def get(self, payment_id: uuid.UUID, actor: Actor) -> tuple[Payment, list[Refund]]:
        payment = await self.repo.get_payment(payment_id)
        if payment is None or not actor.can_see_client(payment.client_id or ""):
            raise NotFound(f"Payment {payment_id} not found.")
        refunds = await self.repo.refunds_of([payment.id])
        return payment, refunds.get(payment.id, [])


class StripeEventProcessor:
    """Turns one stored Stripe event into its effects (payments, outbox events), in the caller's
    transaction. Returns a short outcome for the event row; raises RetryLater to try again later."""

    def __init__(self, uow: UnitOfWork, invoices: InvoiceReader) -> None:
        self.uow = uow
        self.repo = Repository(uow.session)
        self.copies = InvoiceCopies(self.repo, invoices)

    async def process(self, row: StripeEvent, event: dict[str, Any]) -> tuple[str, str]:
        """(status, outcome) with status "processed" or "ignored"."""
        etype = event.get("type", "")
        obj = (event.get("data") or {}).get("object") or {}
        ctx = _Ctx(event_id=row.id, created=int(event.get("created") or row.created), type=etype)
        if etype in ("checkout.session.completed", "checkout.session.async_payment_succeeded"):
            return await self._session_paid_or_pending(ctx, obj)
        if etype == "checkout.session.async_payment_failed":
            return await self._session_failed(ctx, obj)
        if etype == "checkout.session.expired":
            return await self._session_expired(ctx, obj)
        if etype == "payment_intent.payment_failed":
            return await self._intent_failed(ctx, obj)
        if etype == "charge.refunded":
            return await self._charge_refunded(ctx, obj)
        if etype in SUBSCRIPTION_EVENTS:
            return await self._republish_subscription(ctx, event)
        if etype in STRIPE_INVOICE_EVENTS:
            return await self._republish_invoice(ctx, event)
        return "ignored", f"event type {etype} is not handled"

    # -- Checkout ----------------------------------------------------------------------------------
    async def _session_paid_or_pending(self, ctx: _Ctx, obj: dict[str, Any]) -> tuple[str, str]:
        if obj.get("mode") not in (None, "payment"):
            return "ignored", (f"checkout session in {obj.get('mode')} mode "
                               "(subscriptions arrive as customer.subscription.*)")
        invoice_id = _invoice_id(obj)
        if not invoice_id:
            return "ignored", "checkout session for no invoice of ours"
        session_id = obj.get("id")
        pi = normalize.ref_id(obj.get("payment_intent"))
        session_row = await self._touch_session(ctx, session_id, status="complete", payment_intent=pi,
                                                payment_status=obj.get("payment_status"))
        paid = ctx.type == "checkout.session.async_payment_succeeded" or obj.get("payment_status") in (
            "paid", "no_payment_required")
        if not paid:
            return await self._payment_pending(ctx, obj, invoice_id, session_id, pi)
        return await self._settle(
            ctx,
            invoice_id=invoice_id,
            client_id=(obj.get("metadata") or {}).get("client_id") or (session_row.client_id if session_row else None),
            amount=obj.get("amount_total"),
            currency=obj.get("currency"),
            session_id=session_id,
            payment_intent=pi,
            customer=normalize.ref_id(obj.get("customer")),
            method=_method(obj.get("payment_method_types")),
            session_row=session_row,
        )

    async def _payment_pending(
        self, ctx: _Ctx, obj: dict[str, Any], invoice_id: str, session_id: str | None, pi: str | None
    ) -> tuple[str, str]:
        payment = await self.repo.find_stripe_payment(payment_intent=pi, session_id=session_id, for_update=True)
        if payment is not None:
            return "processed", f"payment {payment.id} already {payment.status}; nothing to do for an unpaid completion"
        copy = await self.copies.get(invoice_id)
        payment = Payment(
            id=uuid.uuid4(),
            invoice_id=invoice_id,
            client_id=(obj.get("metadata") or {}).get("client_id") or (copy.client_id if copy else None),
            amount=int(obj.get("amount_total") or 0),
            currency=(obj.get("currency") or "").upper() or (copy.currency if copy else "XXX"),
            method=_method(obj.get("payment_method_types")),
            source="stripe",
            status="pending",
            amount_refunded=0,
            flags=[],
            held=False,
            stripe_checkout_session_id=session_id,
            stripe_payment_intent_id=pi,
            stripe_customer_id=normalize.ref_id(obj.get("customer")),
            last_stripe_event_id=ctx.event_id,
            last_stripe_event_created=ctx.created,
        )
        self.uow.session.add(payment)
        await self.uow.session.flush()
        return "processed", f"payment {payment.id} pending (asynchronous payment method)"

    async def _settle(
        self,
        ctx: _Ctx,
        *,
        invoice_id: str,
        client_id: str | None,
        amount: Any,
        currency: Any,
        session_id: str | None,
        payment_intent: str | None,
        customer: str | None,
        method: str,
        session_row: CheckoutSession | None,
    ) -> tuple[str, str]:
        payment = await self.repo.find_stripe_payment(
            payment_intent=payment_intent, session_id=session_id, for_update=True
        )
        if payment is not None and payment.status in SETTLED:
            return "processed", f"duplicate: payment {payment.id} already {payment.status}"
        copy = await self.copies.get(invoice_id, for_update=True)
        amount_int = int(amount or 0)
        currency_code = (str(currency or "")).upper() or (copy.currency if copy else "XXX")
        verdict = await self._assess(copy, amount_int, currency_code, session_row)
        if payment is None:
            payment = Payment(id=uuid.uuid4(), invoice_id=invoice_id, source="stripe", amount_refunded=0)
            self.uow.session.add(payment)
        payment.client_id = client_id or (copy.client_id if copy else None)
        payment.amount = amount_int
        payment.currency = currency_code
        payment.method = method
        payment.status = "succeeded"
        payment.paid_at = from_unix(ctx.created) or utcnow()
        payment.failure_code = None
        payment.failure_message = None
        payment.flags = verdict.flags
        payment.held = verdict.held
        payment.stripe_checkout_session_id = session_id or payment.stripe_checkout_session_id
        payment.stripe_payment_intent_id = payment_intent or payment.stripe_payment_intent_id
        payment.stripe_customer_id = customer or payment.stripe_customer_id
        payment.last_stripe_event_id = ctx.event_id
        payment.last_stripe_event_created = ctx.created
        await self.uow.session.flush()
        if verdict.held:
            log.warning("stripe_payment_held", payment_id=str(payment.id), invoice_id=invoice_id, flags=verdict.flags)
            return "processed", f"payment {payment.id} recorded and HELD for review: {', '.join(verdict.flags)}"
        self.uow.publish(
            payment_event(payment, PaymentEventType.SUCCEEDED, stripe_event_id=ctx.event_id),
            topic=topics.PAYMENT, key=invoice_id,
        )
        if verdict.flags:
            log.warning("stripe_payment_flagged", payment_id=str(payment.id), invoice_id=invoice_id,
                        flags=verdict.flags, amount=amount_int, amount_due=verdict.amount_due)
        extra = f" (flags: {', '.join(verdict.flags)})" if verdict.flags else ""
        return "processed", f"payment {payment.id} succeeded: {amount_int} {currency_code}{extra}"

    async def _assess(
        self, copy: InvoiceCopy | None, amount: int, currency: str, session_row: CheckoutSession | None
    ) -> Assessment:
        flags: list[str] = []
        if session_row is not None and (amount != session_row.amount or currency != session_row.currency):
            flags.append("amount_differs_from_checkout")
        if copy is None:
            return Assessment(flags=[*flags, "unknown_invoice"], held=False, amount_due=None)
        if currency != copy.currency:
            return Assessment(flags=[*flags, "currency_mismatch"], held=True, amount_due=None)
        due = await self.copies.outstanding(copy)
        if copy.status == "CANCELLED":
            flags.append("invoice_cancelled")
        elif copy.status == "PAID" or due <= 0:
            flags.append("invoice_already_paid")
        if amount < due:
            flags.append("underpayment")
        elif amount > due:
            flags.append("overpayment")
        return Assessment(flags=flags, held=False, amount_due=due)

    async def _session_failed(self, ctx: _Ctx, obj: dict[str, Any]) -> tuple[str, str]:
        invoice_id = _invoice_id(obj)
        if not invoice_id or obj.get("mode") not in (None, "payment"):
            return "ignored", "checkout session for no invoice of ours"
        session_id = obj.get("id")
        pi = normalize.ref_id(obj.get("payment_intent"))
        await self._touch_session(ctx, session_id, status="complete", payment_intent=pi, payment_status="unpaid")
        return await self._fail(
            ctx, invoice_id=invoice_id, client_id=(obj.get("metadata") or {}).get("client_id"),
            amount=obj.get("amount_total"), currency=obj.get("currency"), session_id=session_id,
            payment_intent=pi, code="async_payment_failed",
            message="The payment could not be completed.", method=_method(obj.get("payment_method_types")),
        )

    async def _intent_failed(self, ctx: _Ctx, obj: dict[str, Any]) -> tuple[str, str]:
        pi = obj.get("id")
        metadata = obj.get("metadata") or {}
        invoice_id = metadata.get("invoice_id")
        session_row = None
        if not invoice_id and pi:
            session_row = await self.repo.session_for_intent(pi)
            payment = await self.repo.find_stripe_payment(payment_intent=pi, session_id=None)
            invoice_id = (session_row.invoice_id if session_row else None) or (payment.invoice_id if payment else None)
        if not invoice_id:
            return "ignored", "payment intent for no invoice of ours"
        error = obj.get("last_payment_error") or {}
        return await self._fail(
            ctx, invoice_id=invoice_id, client_id=metadata.get("client_id"), amount=obj.get("amount"),
            currency=obj.get("currency"), session_id=None, payment_intent=pi,
            code=error.get("decline_code") or error.get("code") or "payment_failed",
            message=error.get("message") or "The payment failed.",
            method=_method(obj.get("payment_method_types")),
        )

    async def _fail(
        self,
        ctx: _Ctx,
        *,
        invoice_id: str,
        client_id: str | None,
        amount: Any,
        currency: Any,
        session_id: str | None,
        payment_intent: str | None,
        code: str,
        message: str,
        method: str,
    ) -> tuple[str, str]:
        payment = await self.repo.find_stripe_payment(payment_intent=payment_intent, session_id=session_id,
                                                      for_update=True)
        if payment is not None and payment.status in SETTLED:
            return "ignored", f"stale: payment {payment.id} already {payment.status}; a failure cannot undo it"
        if payment is not None and payment.status == "failed":
            if (payment.last_stripe_event_created or 0) <= ctx.created:
                payment.failure_code, payment.failure_message = code, message
                payment.last_stripe_event_id, payment.last_stripe_event_created = ctx.event_id, ctx.created
            return "processed", f"payment {payment.id} already failed; failure details updated"
        copy = await self.copies.get(invoice_id)
        if payment is None:
            payment = Payment(id=uuid.uuid4(), invoice_id=invoice_id, source="stripe", amount_refunded=0,
                              flags=[], held=False)
            self.uow.session.add(payment)
        payment.client_id = client_id or payment.client_id or (copy.client_id if copy else None)
        payment.amount = int(amount or payment.amount or 0)
        payment.currency = (str(currency or "")).upper() or payment.currency or (copy.currency if copy else "XXX")
        payment.method = method
        payment.status = "failed"
        payment.failure_code, payment.failure_message = code, message
        payment.stripe_checkout_session_id = session_id or payment.stripe_checkout_session_id
        payment.stripe_payment_intent_id = payment_intent or payment.stripe_payment_intent_id
        payment.last_stripe_event_id, payment.last_stripe_event_created = ctx.event_id, ctx.created
        await self.uow.session.flush()
        self.uow.publish(
            payment_event(payment, PaymentEventType.FAILED, stripe_event_id=ctx.event_id),
            topic=topics.PAYMENT, key=invoice_id,
        )
        return "processed", f"payment {payment.id} failed: {code}"

    async def _session_expired(self, ctx: _Ctx, obj: dict[str, Any]) -> tuple[str, str]:
        session_id = obj.get("id")
        row = await self.repo.get_session(session_id, for_update=True) if session_id else None
        if row is None:
            return "ignored", "expired checkout session unknown here"
        if row.status != "open":
            return "ignored", f"stale: session already {row.status}"
        row.status = "expired"
        row.last_event_created = max(row.last_event_created, ctx.created)
        return "processed", f"checkout session {session_id} expired"

    async def _touch_session(
        self, ctx: _Ctx, session_id: str | None, *, status: str, payment_intent: str | None,
        payment_status: str | None,
    ) -> CheckoutSession | None:
        if not session_id:
            return None
        row = await self.repo.get_session(session_id, for_update=True)
        if row is None:
            return None
        if payment_intent and not row.stripe_payment_intent_id:
            row.stripe_payment_intent_id = payment_intent
        # complete is final for a session: an older "expired" never comes after it.
        row.status = status
        if payment_status and (row.payment_status != "paid"):
            row.payment_status = "paid" if ctx.type == "checkout.session.async_payment_succeeded" else payment_status
        row.last_event_created = max(row.last_event_created, ctx.created)
        return row

    # -- refunds -----------------------------------------------------------------------------------
    async def _charge_refunded(self, ctx: _Ctx, obj: dict[str, Any]) -> tuple[str, str]:
        pi = normalize.ref_id(obj.get("payment_intent"))
        payment = await self.repo.find_stripe_payment(payment_intent=pi, session_id=None, for_update=True)
        if payment is None:
            if (obj.get("metadata") or {}).get("invoice_id"):
                raise RetryLater(f"refund of payment intent {pi} arrived before its payment")
            return "ignored", "refund of a charge this service did not take"
        cumulative = int(obj.get("amount_refunded") or 0)
        delta = cumulative - payment.amount_refunded
        if delta <= 0:
            return "ignored", (f"stale or duplicate: {payment.amount_refunded} already refunded "
                               f"(event says {cumulative})")
        refunds = (obj.get("refunds") or {}).get("data") if isinstance(obj.get("refunds"), dict) else None
        refund = Refund(
            id=uuid.uuid4(),
            payment_id=payment.id,
            invoice_id=payment.invoice_id,
            amount=delta,
            currency=(obj.get("currency") or payment.currency).upper(),
            cumulative_refunded=cumulative,
            stripe_charge_id=obj.get("id"),
            stripe_refund_id=(refunds[0].get("id") if refunds else None),
            stripe_event_id=ctx.event_id,
        )
        self.uow.session.add(refund)
        payment.amount_refunded = cumulative
        payment.stripe_charge_id = payment.stripe_charge_id or obj.get("id")
        if payment.status in SETTLED:
            payment.status = "refunded" if cumulative >= payment.amount else "partially_refunded"
        await self.uow.session.flush()
        if payment.held or payment.status not in SETTLED:
            return "processed", f"refund {refund.id} of {delta} recorded (payment not applied to the invoice)"
        self.uow.publish(
            payment_event(payment, PaymentEventType.REFUNDED, amount=delta, payment_id=str(refund.id),
                          reference=f"refund of payment {payment.id}", stripe_event_id=ctx.event_id),
            topic=topics.PAYMENT, key=payment.invoice_id,
        )
        return "processed", f"refund {refund.id} of {delta} {refund.currency} for payment {payment.id}"

    # -- subscriptions and Stripe invoices: normalized for the subscriptions service ---------------
    async def _republish_subscription(self, ctx: _Ctx, event: dict[str, Any]) -> tuple[str, str]:
        data = normalize.subscription(event)
        key = data.subscription_id
        # trial_will_end is a notice, not a state change: it never makes another event stale.
        if ctx.type != "customer.subscription.trial_will_end" and not await self.repo.advance_object(
            key, "subscription", ctx.created, ctx.event_id, {"status": data.status}
        ):
            return "ignored", f"stale: a newer event of {key} was already published"
        self.uow.publish(
            CloudEvent.create(source=SOURCE, type=f"stripe.{ctx.type}", subject=key, data=data,
                              correlation_id=current_correlation_id(), dataschema=SCHEMA_SUBSCRIPTION_V1),
            topic=topics.STRIPE, key=key,
        )
        return "processed", f"republished stripe.{ctx.type} for {key} ({data.status})"

    async def _republish_invoice(self, ctx: _Ctx, event: dict[str, Any]) -> tuple[str, str]:
        data = normalize.invoice(event)
        if not await self.repo.advance_object(data.invoice_id, "invoice", ctx.created, ctx.event_id,
                                              {"status": data.status}):
            return "ignored", f"stale: a newer event of {data.invoice_id} was already published"
        key = data.subscription_id or data.invoice_id
        self.uow.publish(
            CloudEvent.create(source=SOURCE, type=f"stripe.{ctx.type}", subject=key, data=data,
                              correlation_id=current_correlation_id(), dataschema=SCHEMA_INVOICE_V1),
            topic=topics.STRIPE, key=key,
        )
        return "processed", f"republished stripe.{ctx.type} for {data.invoice_id}"


@dataclass(frozen=True)
class _Ctx:
    event_id: str
    created: int
    type: str


def _invoice_id(session: dict[str, Any]) -> str | None:
    return (session.get("metadata") or {}).get("invoice_id") or session.get("client_reference_id")


def _method(types: Any) -> str:
    if isinstance(types, list) and len(types) == 1:
        return str(types[0])
    return "stripe"
