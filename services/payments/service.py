"""Payments domain logic behind the API: Pay Now (Checkout), manual payments, refunds, history, and
the invoice.* consumer's copy of our invoices. No HTTP here. What Stripe's events do is in
services/payments/stripe/payments.py; what both share in services/payments/ledger.py.

Money rules:
* A manual payment is one row per record. What is still due = invoice total − the invoice's amountPaid
  − what this service recorded that the invoice service has not applied yet (it tells us through the
  snapshot's causeId).
* The invoice service is asked over HTTP only before a lock is taken: a slow invoice service must
  never hold a row of ours locked.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog

from contracts import topics
from contracts.invoice import InvoiceEventType, InvoiceSnapshotV1, InvoiceStatus
from contracts.payment import PaymentEventType
from kit.actor import Actor
from kit.clock import utcnow
from kit.db import UnitOfWork
from kit.errors import Conflict, InvalidInput, NotFound
from kit.pagination import PageRequest, PageResult
from kit.stripe import StripeUnavailable
from services.payments.config import PaymentsSettings
from services.payments.invoice_client import InvoiceReader
from services.payments.ledger import InvoiceCopies, payment_event
from services.payments.models import CheckoutSession, InvoiceCopy, Payment, Refund
from services.payments.repository import SETTLED, PaymentFilter, Repository
from services.payments.schemas import MarkPaidRequest
from services.payments.stripe.gateway import StripeGateway
from services.payments.stripe.payments import StripeInvoicePayments

log = structlog.get_logger(__name__)

NOT_PAYABLE: dict[InvoiceStatus, str] = {
    InvoiceStatus.DRAFT: "a draft",
    InvoiceStatus.PAID: "already paid",
    InvoiceStatus.CANCELLED: "cancelled",
}


@dataclass(frozen=True)
class PayLink:
    """Where Pay Now sends the client: a Checkout Session of ours, or the Stripe invoice's own page."""

    url: str
    amount: int
    currency: str
    session_id: str | None = None
    stripe_invoice_id: str | None = None
    expires_at: datetime | None = None
    reused: bool = False


async def apply_invoice_snapshot(uow: UnitOfWork, event_type: str, snap: InvoiceSnapshotV1) -> bool:
    """invoice.* consumer: keep the newest snapshot; note which of our payments it reports applied; our
    copy of a Stripe invoice meets the charge Stripe reported for it (StripeInvoicePayments)."""
    repo = Repository(uow.session)
    if snap.stripe_invoice_id:
        await repo.lock_stripe_invoice(snap.stripe_invoice_id)  # before the copy's row: the worker's order
    stored = await repo.upsert_invoice(snap)
    if snap.cause_id:
        if event_type in (InvoiceEventType.PAID, InvoiceEventType.PARTIALLY_PAID):
            await repo.mark_applied(snap.cause_id, refund=False)
        elif event_type == InvoiceEventType.UPDATED and snap.reason == "refunded":
            await repo.mark_applied(snap.cause_id, refund=True)
    if snap.stripe_invoice_id:
        # Even when this version was stored before (read over HTTP): the charge may have come meanwhile.
        detail = await StripeInvoicePayments(uow).collect(snap.stripe_invoice_id)
        log.info("stripe_invoice_copy_seen", invoice_id=snap.id, stripe_invoice_id=snap.stripe_invoice_id,
                 outcome=detail)
    return stored



class PaymentsService:
    """What the HTTP API does: Pay Now, manual payments, history. Runs in the request's unit of work."""

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

    async def _refresh_if(self, copy: InvoiceCopy, doubt: Callable[[InvoiceCopy], Awaitable[bool]]) -> InvoiceCopy:
        return await self.copies.refresh(copy) if await doubt(copy) else copy

    # -- Pay Now ---------------------------------------------------------------------------------
    async def checkout(self, invoice_id: str, actor: Actor) -> PayLink:
        """Where to pay what is due: a Checkout Session (a repeat while one is open gets it back), or for
        our copy of a subscription's Stripe invoice, that invoice's page at Stripe."""
        # The invoice service first (HTTP, no lock held yet), then the lock.
        copy = await self.copies.get(invoice_id)
        if copy is None or not actor.can_see_client(copy.client_id):
            raise NotFound(f"Invoice {invoice_id} not found.")
        copy = await self._refresh_if(copy, self._nothing_to_pay)
        # One checkout of an invoice at a time (a double click gets the same session), without
        # locking the copy's row: the Stripe calls below take a while.
        await self.repo.lock_invoice_key(invoice_id)
        await self.repo.session.refresh(copy)  # what the invoice.* consumer stored meanwhile
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
        if copy.stripe_invoice_id:
            return await self._stripe_invoice_page(copy, copy.stripe_invoice_id)
        now = utcnow()
        reusable = await self.repo.reusable_session(invoice_id, due, copy.currency, now + timedelta(minutes=10))
        if reusable is not None:
            return self._link(reusable, reused=True)

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
        if not session.id:
            raise StripeUnavailable("Stripe returned a checkout session without an id.")
        url = session.url or ""  # Stripe's hosted page (locally the Stripe stand-in's)
        if not url:
            raise StripeUnavailable("Stripe returned a checkout session without a URL.")
        returned_expiry = session.expires_at
        row = await self.repo.add_session(
            {
                "id": session.id,
                "invoice_id": invoice_id,
                "client_id": copy.client_id,
                "amount": due,
                "currency": copy.currency,
                "status": "open",
                "payment_status": "unpaid",
                "url": url,
                "success_url": success_url.replace("{CHECKOUT_SESSION_ID}", session.id),
                "cancel_url": cancel_url,
                "idempotency_key": idempotency_key,
                "invoice_version": copy.version,
                "stripe_customer_id": customer_id,
                "expires_at": returned_expiry if returned_expiry and returned_expiry > now else expires_at,
            }
        )
        log.info("checkout_session_created", invoice_id=invoice_id, session_id=session.id, amount=due,
                 currency=copy.currency)
        return self._link(row, reused=False)

    @staticmethod
    def _link(row: CheckoutSession, *, reused: bool) -> PayLink:
        return PayLink(url=row.url, amount=row.amount, currency=row.currency, session_id=row.id,
                       expires_at=row.expires_at, reused=reused)

    async def _stripe_invoice_page(self, copy: InvoiceCopy, stripe_invoice_id: str) -> PayLink:
        """Stripe's hosted page of the Stripe invoice our invoice copies. Never a Checkout Session: that
        would take the money a second way and leave Stripe's invoice open (and Stripe retrying it)."""
        invoice = await self.stripe.retrieve_invoice(stripe_invoice_id)
        if invoice is None:
            raise StripeUnavailable(f"Stripe has no invoice {stripe_invoice_id}.")
        if invoice.status == "paid":
            raise Conflict(
                "Stripe already collected this invoice; the payment is being recorded.",
                code="nothing_due",
                details={"amountDue": 0},
            )
        if invoice.status != "open" or not invoice.hosted_invoice_url:
            raise Conflict(
                f"Invoice {copy.invoice_number or copy.id} cannot be paid online: "
                f"Stripe's invoice is {invoice.status}.",
                code="invoice_not_payable",
                details={"status": copy.status, "stripeStatus": invoice.status},
            )
        remaining = invoice.amount_remaining
        return PayLink(
            url=invoice.hosted_invoice_url,
            amount=remaining if remaining is not None else invoice.amount_due - invoice.amount_paid,
            currency=invoice.currency or copy.currency,
            stripe_invoice_id=invoice.id,
        )

    async def _nothing_to_pay(self, copy: InvoiceCopy) -> bool:
        return copy.status in NOT_PAYABLE or await self.copies.outstanding(copy) <= 0

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
        if not customer.id:
            return None
        row = await self.repo.add_customer(copy.client_id, customer.id, copy.client_email)
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
        # The invoice service first (HTTP: the copy when none exists yet, a re-read when the copy may be
        # behind and we would refuse), then the row lock, then the decision on the locked row.
        copy = await self.copies.get(invoice_id)
        if copy is None:
            raise NotFound(f"Invoice {invoice_id} not found.")

        async def would_refuse(c: InvoiceCopy) -> bool:
            return c.status in NOT_PAYABLE or body.amount > await self.copies.outstanding(c)

        copy = await self._refresh_if(copy, would_refuse)
        copy = await self.copies.lock(copy)  # concurrent records of one invoice queue here: never an overpayment
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
        self, f: PaymentFilter, actor: Actor, page: PageRequest
    ) -> tuple[PageResult[Payment], dict[uuid.UUID, list[Refund]]]:
        if not actor.is_admin:
            if f.client_id and f.client_id != actor.client_id:
                raise NotFound(f"Client {f.client_id} not found.")
            if f.invoice_id:
                copy = await self.repo.get_invoice(f.invoice_id)
                if copy is not None and copy.client_id != actor.client_id:
                    raise NotFound(f"Invoice {f.invoice_id} not found.")
            f = PaymentFilter(invoice_id=f.invoice_id, client_id=actor.client_id, statuses=f.statuses,
                              methods=f.methods, source=f.source)
        result = await self.repo.search_payments(f, page)
        refunds = await self.repo.refunds_of([p.id for p in result.items])
        return result, refunds

    async def get(self, payment_id: uuid.UUID, actor: Actor) -> tuple[Payment, list[Refund]]:
        payment = await self.repo.get_payment(payment_id)
        if payment is None or not actor.can_see_client(payment.client_id or ""):
            raise NotFound(f"Payment {payment_id} not found.")
        refunds = await self.repo.refunds_of([payment.id])
        return payment, refunds.get(payment.id, [])

