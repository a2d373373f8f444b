"""Payments domain logic: Pay Now (Checkout), manual payments, history, and what Stripe's events do to
payments, checkout sessions and refunds. No HTTP and no Stripe JSON here: Stripe events arrive as
typed values from services/payments/stripe/handlers.py.

Money rules:
* A payment is one row per Stripe PaymentIntent (else per Checkout Session, or per Stripe invoice for
  a subscription's invoice), or one per manual record. A Stripe payment that reaches `succeeded`
  never goes back; a later failure for it is stale.
* What is still due = invoice total − the invoice's amountPaid − what this service recorded that the
  invoice service has not applied yet (it tells us through the snapshot's causeId).
* Amounts are recorded exactly as Stripe reports them, never rounded: an underpayment is a partial
  payment, an overpayment is recorded in full, both flagged; a payment in another currency than the
  invoice is recorded, flagged and held (not sent to the invoice service) for a human to resolve.
* The invoice service is asked over HTTP (its copy may lag, or none exists yet) only before a lock
  is taken: a slow invoice service must never hold a row of ours locked.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import structlog

from contracts import topics
from contracts.envelope import CloudEvent
from contracts.invoice import InvoiceEventType, InvoiceSnapshotV1, InvoiceStatus
from contracts.payment import SCHEMA_V1 as PAYMENT_SCHEMA
from contracts.payment import PaymentEventType, PaymentEventV1
from contracts.stripe import SCHEMA_INVOICE_V1, SCHEMA_SUBSCRIPTION_V1, StripeInvoiceV1, StripeSubscriptionV1
from kit.actor import Actor
from kit.clock import from_unix, utcnow
from kit.db import UnitOfWork
from kit.errors import Conflict, InvalidInput, NotFound
from kit.logging import current_correlation_id
from kit.pagination import PageRequest, PageResult
from kit.stripe import StripeUnavailable
from services.payments.config import PaymentsSettings
from services.payments.invoice_client import InvoiceReader, InvoiceServiceUnavailable
from services.payments.models import CheckoutSession, InvoiceCopy, Payment, Refund, StripeInvoiceCharge
from services.payments.repository import SETTLED, CheckoutTerms, PaymentFilter, Repository
from services.payments.schemas import MarkPaidRequest
from services.payments.stripe.gateway import StripeGateway

log = structlog.get_logger(__name__)
SOURCE = "payments"
UNKNOWN_CURRENCY = "XXX"  # ISO 4217 "no currency": a Stripe payment for an invoice we know nothing of

NOT_PAYABLE: dict[InvoiceStatus, str] = {
    InvoiceStatus.DRAFT: "a draft",
    InvoiceStatus.PAID: "already paid",
    InvoiceStatus.CANCELLED: "cancelled",
}


class RetryLater(Exception):
    """The event cannot be handled yet (e.g. a refund before its payment): try again later."""


class Outcome(NamedTuple):
    """What handling a Stripe event did, stored on its row."""

    status: str  # processed | ignored
    detail: str


def processed(detail: str) -> Outcome:
    return Outcome("processed", detail)


def ignored(detail: str) -> Outcome:
    return Outcome("ignored", detail)


def combined(*outcomes: Outcome) -> Outcome:
    """One event with several effects: processed when any of them did something."""
    status = "processed" if any(o.status == "processed" for o in outcomes) else "ignored"
    return Outcome(status, "; ".join(o.detail for o in outcomes))


# How far along its life a Stripe invoice is, per event type: of two events of one second (Stripe's
# resolution), the one that would move the invoice back (its draft after its payment) is stale.
INVOICE_STAGES: dict[str, int] = {
    "invoice.created": 0,
    "invoice.finalized": 1,
    "invoice.payment_failed": 2,
    "invoice.paid": 3,
}


@dataclass(frozen=True)
class StripeEventRef:
    """Which Stripe event causes a change: its id, Stripe's timestamp (the order of events) and type."""

    event_id: str
    created: int
    type: str


@dataclass(frozen=True)
class StripeCharge:
    """A Stripe payment attempt for one of our invoices, as a Checkout Session or PaymentIntent tells it."""

    invoice_id: str
    client_id: str | None
    amount: int | None  # minor units; None when Stripe did not say
    currency: str | None  # ISO 4217, upper case
    method: str
    session_id: str | None = None
    payment_intent: str | None = None
    customer: str | None = None


@dataclass(frozen=True)
class StripeRefund:
    """A charge's refunds as of an event: Stripe reports the cumulative amount refunded."""

    payment_intent: str | None
    cumulative: int
    currency: str | None
    charge_id: str | None
    refund_id: str | None
    for_our_invoice: bool  # metadata.invoice_id is set: the payment will come, retry until it does


@dataclass(frozen=True)
class StripeInvoiceCollection:
    """Stripe collecting one of its invoices, as invoice.paid / invoice.payment_failed tell it."""

    stripe_invoice_id: str
    subscription_id: str | None  # None: not a subscription's invoice, nothing of ours
    customer: str | None
    client_id: str | None
    currency: str  # ISO 4217, upper case
    amount_paid: int
    amount_due: int
    paid_at: datetime | None
    attempt_count: int | None = None


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
    """The local copy of invoices (kept from invoice.* events), with the HTTP fallback for one not seen
    in an event yet and a re-read for one that may lag behind its events.

    Both HTTP reads happen before the caller locks anything (`lock()` comes last): the invoice service
    may take seconds to answer, and nobody must wait on our rows meanwhile.
    """

    def __init__(self, repo: Repository, reader: InvoiceReader) -> None:
        self.repo = repo
        self.reader = reader
        self._fetched: set[str] = set()  # read from the invoice service in this unit of work

    async def get(self, invoice_id: str, *, for_update: bool = False) -> InvoiceCopy | None:
        """The copy; when none exists yet, the invoice service is asked (no row is locked then: there is
        none) and its answer stored. `for_update` locks an existing copy at once."""
        copy = await self.repo.get_invoice(invoice_id, for_update=for_update)
        if copy is not None:
            return copy
        snap = await self.reader.fetch(invoice_id)
        if snap is None:
            return None
        self._fetched.add(invoice_id)
        await self.repo.upsert_invoice(snap, source="http")
        return await self.repo.get_invoice(invoice_id, for_update=for_update)

    async def refresh(self, copy: InvoiceCopy) -> InvoiceCopy:
        """Re-read the invoice (and which of our payments its ledger holds) from the invoice service when
        the copy may lag behind its events, say the invoice.sent event is still on its way. Used before
        refusing something, and before any lock. If the invoice service cannot answer, this is a 503
        (InvoiceServiceUnavailable): a refusal read off a copy that may lag (a 409 "is a draft" for an
        invoice sent meanwhile) is final for the caller, who would never retry a payment it owes."""
        if copy.id in self._fetched:
            return copy  # just read from the invoice service: nothing fresher to ask for
        try:
            # The ledger first: a payment applied in between then shows in amountPaid and still counts
            # as pending here, which errs towards refusing, never towards an overpayment.
            applied = await self.reader.applied(copy.id)
            snap = await self.reader.fetch(copy.id)
        except InvoiceServiceUnavailable as exc:
            log.warning("invoice_refresh_failed", invoice_id=copy.id, error=exc.message)
            raise
        if snap is None:
            return copy
        # Everything in that ledger is in the snapshot's amountPaid, so in the copy's once it is stored.
        await self.repo.upsert_invoice(snap, source="http")
        for payment_id, kind in applied:
            await self.repo.mark_applied(payment_id, refund=kind == "refund")
        await self.repo.session.refresh(copy)
        log.info("invoice_copy_refreshed", invoice_id=copy.id, version=copy.version, status=copy.status)
        return copy

    async def lock(self, copy: InvoiceCopy) -> InvoiceCopy:
        """Lock the copy's row (FOR UPDATE) and re-read it: what is decided next holds until commit."""
        locked = await self.repo.get_invoice(copy.id, for_update=True)
        assert locked is not None  # copies are never deleted
        return locked

    async def outstanding(self, copy: InvoiceCopy) -> int:
        return await outstanding(self.repo, copy)


async def outstanding(repo: Repository, copy: InvoiceCopy) -> int:
    """What is still due on the invoice: its total − its amountPaid − what we recorded it has not applied."""
    return copy.total - copy.amount_paid - await repo.unapplied_net(copy.id)


async def assess(
    repo: Repository, copy: InvoiceCopy | None, amount: int, currency: str, session_row: CheckoutTerms | None
) -> Assessment:
    """What a human may want to know about a Stripe payment of this amount (flags), and whether it is held."""
    flags: list[str] = []
    if session_row is not None and (amount != session_row.amount or currency != session_row.currency):
        flags.append("amount_differs_from_checkout")
    if copy is None:
        return Assessment(flags=[*flags, "unknown_invoice"], held=False, amount_due=None)
    if currency != copy.currency:
        return Assessment(flags=[*flags, "currency_mismatch"], held=True, amount_due=None)
    due = await outstanding(repo, copy)
    if copy.status == InvoiceStatus.CANCELLED:
        flags.append("invoice_cancelled")
    elif copy.status == InvoiceStatus.PAID or due <= 0:
        flags.append("invoice_already_paid")
    if amount < due:
        flags.append("underpayment")
    elif amount > due:
        flags.append("overpayment")
    return Assessment(flags=flags, held=False, amount_due=due)


class StripeInvoicePayments:
    """A subscription's Stripe invoice collected (or not) by Stripe, as a payment of our invoice of it.

    Two sides meet here, in either order: the charge (the webhook worker, from invoice.paid /
    invoice.payment_failed) and our copy of the invoice (the invoice.* consumer, once the invoice
    service made our invoice from the normalized stripe.invoice.* events and its snapshot names the
    Stripe invoice). Each side takes the Stripe invoice's lock, stores its half and calls `collect`:
    whichever comes second records the payment, once per Stripe invoice (the unique
    payments.stripe_invoice_id). Nothing waits: the normalized events go out at once either way.
    """

    def __init__(self, uow: UnitOfWork) -> None:
        self.uow = uow
        self.repo = Repository(uow.session)

    async def charged(self, ref: StripeEventRef, collection: StripeInvoiceCollection) -> Outcome:
        """invoice.paid: Stripe collected `amount_paid` (final: a later failure never undoes it)."""
        stripe_id = collection.stripe_invoice_id
        if collection.subscription_id is None:
            return ignored(f"Stripe invoice {stripe_id} belongs to no subscription: no invoice of ours")
        if collection.amount_paid <= 0:
            return ignored(f"Stripe invoice {stripe_id} paid without a charge (nothing was collected)")
        await self.repo.lock_stripe_invoice(stripe_id)
        row = await self.repo.get_invoice_charge(stripe_id)
        if row is not None and row.status == "succeeded":
            return ignored(f"duplicate: Stripe invoice {stripe_id} already paid")
        row = self._store(row, ref, collection, status="succeeded", amount=collection.amount_paid)
        row.paid_at = collection.paid_at or from_unix(ref.created)
        row.failure_code = row.failure_message = None
        return processed(await self.collect(stripe_id))

    async def failed(self, ref: StripeEventRef, collection: StripeInvoiceCollection) -> Outcome:
        """invoice.payment_failed: a failed attempt (the invoice service and notifications act on the
        normalized event; here it is only recorded, no payment.failed and so no second email)."""
        stripe_id = collection.stripe_invoice_id
        if collection.subscription_id is None:
            return ignored(f"Stripe invoice {stripe_id} belongs to no subscription: no invoice of ours")
        await self.repo.lock_stripe_invoice(stripe_id)
        row = await self.repo.get_invoice_charge(stripe_id)
        if row is not None and (row.status == "succeeded" or row.stripe_event_created > ref.created):
            return ignored(f"stale: Stripe invoice {stripe_id} already {row.status} as of a newer event")
        row = self._store(row, ref, collection, status="failed", amount=collection.amount_due)
        attempt = f" (attempt {collection.attempt_count})" if collection.attempt_count else ""
        row.failure_code = "invoice_payment_failed"
        row.failure_message = f"Stripe could not collect invoice {stripe_id}{attempt}."
        return processed(await self.collect(stripe_id))

    def _store(self, row: StripeInvoiceCharge | None, ref: StripeEventRef, collection: StripeInvoiceCollection,
               *, status: str, amount: int) -> StripeInvoiceCharge:
        if row is None:
            row = StripeInvoiceCharge(stripe_invoice_id=collection.stripe_invoice_id)
            self.uow.session.add(row)
        row.subscription_id = collection.subscription_id
        row.customer_id = collection.customer
        row.client_id = collection.client_id
        row.status = status
        row.amount = amount
        row.currency = collection.currency
        row.stripe_event_id = ref.event_id
        row.stripe_event_created = ref.created
        return row

    async def collect(self, stripe_invoice_id: str) -> str:
        """The charge applied to our invoice of the Stripe invoice, when both exist. The caller holds the
        Stripe invoice's lock (`Repository.lock_stripe_invoice`)."""
        await self.uow.session.flush()
        charge = await self.repo.get_invoice_charge(stripe_invoice_id)
        if charge is None:
            return f"no charge of Stripe invoice {stripe_invoice_id} yet"
        copy = await self.repo.invoice_of_stripe_invoice(stripe_invoice_id, for_update=True)
        if copy is None:
            return (f"Stripe invoice {stripe_invoice_id} {charge.status}: the payment is recorded when our "
                    "invoice of it arrives")
        payment = await self.repo.payment_of_stripe_invoice(stripe_invoice_id, for_update=True)
        if payment is not None and payment.status in SETTLED:
            return f"duplicate: payment {payment.id} of Stripe invoice {stripe_invoice_id} already {payment.status}"
        if payment is None:  # added once complete (a query below would flush it half-filled)
            payment = Payment(id=uuid.uuid4(), invoice_id=copy.id, source="stripe", method="card", amount_refunded=0,
                              flags=[], held=False, stripe_invoice_id=stripe_invoice_id,
                              reference=stripe_invoice_id)
        payment.client_id = charge.client_id or copy.client_id
        payment.amount = charge.amount
        payment.currency = charge.currency
        payment.stripe_customer_id = charge.customer_id
        payment.last_stripe_event_id = charge.stripe_event_id
        payment.last_stripe_event_created = charge.stripe_event_created
        if charge.status == "failed":
            payment.status = "failed"
            payment.failure_code, payment.failure_message = charge.failure_code, charge.failure_message
            self.uow.session.add(payment)
            await self.uow.session.flush()
            return f"failed attempt of Stripe invoice {stripe_invoice_id} recorded on invoice {copy.id}"
        verdict = await assess(self.repo, copy, charge.amount, charge.currency, None)
        payment.status = "succeeded"
        payment.paid_at = charge.paid_at or utcnow()
        payment.failure_code = payment.failure_message = None
        payment.flags, payment.held = verdict.flags, verdict.held
        self.uow.session.add(payment)
        await self.uow.session.flush()
        if verdict.held:
            log.warning("stripe_invoice_payment_held", payment_id=str(payment.id), invoice_id=copy.id,
                        flags=verdict.flags)
            return f"payment {payment.id} of Stripe invoice {stripe_invoice_id} HELD: {', '.join(verdict.flags)}"
        self.uow.publish(
            payment_event(payment, PaymentEventType.SUCCEEDED, stripe_event_id=charge.stripe_event_id),
            topic=topics.PAYMENT, key=copy.id,
        )
        extra = f" (flags: {', '.join(verdict.flags)})" if verdict.flags else ""
        return (f"payment {payment.id} of Stripe invoice {stripe_invoice_id} succeeded for invoice {copy.id}: "
                f"{charge.amount} {charge.currency}{extra}")


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


class StripePayments:
    """What Stripe's events do here: payments, checkout sessions, refunds, and the normalized stripe.*
    events for other services. Runs in the webhook worker's transaction; each method returns the
    outcome stored on the event row, or raises RetryLater."""

    def __init__(self, uow: UnitOfWork, invoices: InvoiceReader, stripe: StripeGateway) -> None:
        self.uow = uow
        self.repo = Repository(uow.session)
        self.copies = InvoiceCopies(self.repo, invoices)
        self.stripe = stripe
        self.stripe_invoices = StripeInvoicePayments(uow)

    # -- Checkout ----------------------------------------------------------------------------------
    async def checkout_completed(
        self, ref: StripeEventRef, charge: StripeCharge, *, payment_status: str | None, paid: bool
    ) -> Outcome:
        """A session completed: paid now (card), or pending an asynchronous method's result."""
        session_row = await self._touch_session(ref, charge, payment_status=payment_status)
        if not paid:
            return await self._payment_pending(ref, charge)
        return await self._settle(ref, charge, session_row)

    async def checkout_failed(self, ref: StripeEventRef, charge: StripeCharge) -> Outcome:
        await self._touch_session(ref, charge, payment_status="unpaid")
        return await self.payment_failed(ref, charge, code="async_payment_failed",
                                         message="The payment could not be completed.")

    async def checkout_expired(self, ref: StripeEventRef, session_id: str) -> Outcome:
        row = await self.repo.get_session(session_id, for_update=True)
        if row is None:
            return ignored("expired checkout session unknown here")
        if row.status != "open":
            return ignored(f"stale: session already {row.status}")
        row.status = "expired"
        row.last_event_created = max(row.last_event_created, ref.created)
        return processed(f"checkout session {session_id} expired")

    async def _touch_session(
        self, ref: StripeEventRef, charge: StripeCharge, *, payment_status: str | None
    ) -> CheckoutTerms | None:
        if not charge.session_id:
            return None
        return await self.repo.complete_session(charge.session_id, payment_intent=charge.payment_intent,
                                                payment_status=payment_status, created=ref.created)

    async def _payment_pending(self, ref: StripeEventRef, charge: StripeCharge) -> Outcome:
        copy = await self.copies.get(charge.invoice_id)  # may ask the invoice service: before the lock below
        payment = await self.repo.find_stripe_payment(payment_intent=charge.payment_intent,
                                                      session_id=charge.session_id, for_update=True)
        if payment is not None:
            return processed(f"payment {payment.id} already {payment.status}; nothing to do for an unpaid completion")
        payment = Payment(
            id=uuid.uuid4(),
            invoice_id=charge.invoice_id,
            client_id=charge.client_id or (copy.client_id if copy else None),
            amount=charge.amount or 0,
            currency=charge.currency or (copy.currency if copy else UNKNOWN_CURRENCY),
            method=charge.method,
            source="stripe",
            status="pending",
            amount_refunded=0,
            flags=[],
            held=False,
            stripe_checkout_session_id=charge.session_id,
            stripe_payment_intent_id=charge.payment_intent,
            stripe_customer_id=charge.customer,
            last_stripe_event_id=ref.event_id,
            last_stripe_event_created=ref.created,
        )
        self.uow.session.add(payment)
        await self.uow.session.flush()
        return processed(f"payment {payment.id} pending (asynchronous payment method)")

    async def _settle(self, ref: StripeEventRef, charge: StripeCharge, session_row: CheckoutTerms | None) -> Outcome:
        # The copy first (locked; when none exists the invoice service is asked before any lock of ours
        # for this event), then the payment: every path locks copy before payment.
        copy = await self.copies.get(charge.invoice_id, for_update=True)
        payment = await self.repo.find_stripe_payment(
            payment_intent=charge.payment_intent, session_id=charge.session_id, for_update=True
        )
        if payment is not None and payment.status in SETTLED:
            return processed(f"duplicate: payment {payment.id} already {payment.status}")
        amount = charge.amount or 0
        currency = charge.currency or (copy.currency if copy else UNKNOWN_CURRENCY)
        verdict = await self._assess(copy, amount, currency, session_row)
        if payment is None:
            payment = Payment(id=uuid.uuid4(), invoice_id=charge.invoice_id, source="stripe", amount_refunded=0)
            self.uow.session.add(payment)
        payment.client_id = (charge.client_id or (session_row.client_id if session_row else None)
                             or (copy.client_id if copy else None))
        payment.amount = amount
        payment.currency = currency
        payment.method = charge.method
        payment.status = "succeeded"
        payment.paid_at = from_unix(ref.created) or utcnow()
        payment.failure_code = None
        payment.failure_message = None
        payment.flags = verdict.flags
        payment.held = verdict.held
        payment.stripe_checkout_session_id = charge.session_id or payment.stripe_checkout_session_id
        payment.stripe_payment_intent_id = charge.payment_intent or payment.stripe_payment_intent_id
        payment.stripe_customer_id = charge.customer or payment.stripe_customer_id
        payment.last_stripe_event_id = ref.event_id
        payment.last_stripe_event_created = ref.created
        await self.uow.session.flush()
        if verdict.held:
            log.warning("stripe_payment_held", payment_id=str(payment.id), invoice_id=charge.invoice_id,
                        flags=verdict.flags)
            return processed(f"payment {payment.id} recorded and HELD for review: {', '.join(verdict.flags)}")
        self.uow.publish(
            payment_event(payment, PaymentEventType.SUCCEEDED, stripe_event_id=ref.event_id),
            topic=topics.PAYMENT, key=charge.invoice_id,
        )
        if verdict.flags:
            log.warning("stripe_payment_flagged", payment_id=str(payment.id), invoice_id=charge.invoice_id,
                        flags=verdict.flags, amount=amount, amount_due=verdict.amount_due)
        extra = f" (flags: {', '.join(verdict.flags)})" if verdict.flags else ""
        return processed(f"payment {payment.id} succeeded: {amount} {currency}{extra}")

    async def _assess(
        self, copy: InvoiceCopy | None, amount: int, currency: str, session_row: CheckoutTerms | None
    ) -> Assessment:
        return await assess(self.repo, copy, amount, currency, session_row)

    # -- failures ----------------------------------------------------------------------------------
    async def invoice_of_payment_intent(self, payment_intent: str) -> str | None:
        """Our invoice of a PaymentIntent that carries no metadata: through its session or payment."""
        session_row = await self.repo.session_for_intent(payment_intent)
        if session_row is not None:
            return session_row.invoice_id
        payment = await self.repo.find_stripe_payment(payment_intent=payment_intent, session_id=None)
        return payment.invoice_id if payment is not None else None

    async def payment_failed(self, ref: StripeEventRef, charge: StripeCharge, *, code: str, message: str) -> Outcome:
        copy = await self.copies.get(charge.invoice_id)  # may ask the invoice service: before the lock below
        payment = await self.repo.find_stripe_payment(payment_intent=charge.payment_intent,
                                                      session_id=charge.session_id, for_update=True)
        if payment is not None and payment.status in SETTLED:
            return ignored(f"stale: payment {payment.id} already {payment.status}; a failure cannot undo it")
        if payment is not None and payment.status == "failed":
            if (payment.last_stripe_event_created or 0) <= ref.created:
                payment.failure_code, payment.failure_message = code, message
                payment.last_stripe_event_id, payment.last_stripe_event_created = ref.event_id, ref.created
            return processed(f"payment {payment.id} already failed; failure details updated")
        if payment is None:
            payment = Payment(id=uuid.uuid4(), invoice_id=charge.invoice_id, source="stripe", amount_refunded=0,
                              flags=[], held=False)
            self.uow.session.add(payment)
        payment.client_id = charge.client_id or payment.client_id or (copy.client_id if copy else None)
        payment.amount = charge.amount or payment.amount or 0
        payment.currency = charge.currency or payment.currency or (copy.currency if copy else UNKNOWN_CURRENCY)
        payment.method = charge.method
        payment.status = "failed"
        payment.failure_code, payment.failure_message = code, message
        payment.stripe_checkout_session_id = charge.session_id or payment.stripe_checkout_session_id
        payment.stripe_payment_intent_id = charge.payment_intent or payment.stripe_payment_intent_id
        payment.last_stripe_event_id, payment.last_stripe_event_created = ref.event_id, ref.created
        await self.uow.session.flush()
        self.uow.publish(
            payment_event(payment, PaymentEventType.FAILED, stripe_event_id=ref.event_id),
            topic=topics.PAYMENT, key=charge.invoice_id,
        )
        return processed(f"payment {payment.id} failed: {code}")

    # -- refunds -----------------------------------------------------------------------------------
    async def refunded(self, ref: StripeEventRef, refund: StripeRefund) -> Outcome:
        payment = await self.repo.find_stripe_payment(payment_intent=refund.payment_intent, session_id=None,
                                                      for_update=True)
        if payment is None:
            if refund.for_our_invoice:
                raise RetryLater(f"refund of payment intent {refund.payment_intent} arrived before its payment")
            return ignored("refund of a charge this service did not take")
        delta = refund.cumulative - payment.amount_refunded
        if delta <= 0:
            return ignored(f"stale or duplicate: {payment.amount_refunded} already refunded "
                           f"(event says {refund.cumulative})")
        row = Refund(
            id=uuid.uuid4(),
            payment_id=payment.id,
            invoice_id=payment.invoice_id,
            amount=delta,
            currency=refund.currency or payment.currency,
            cumulative_refunded=refund.cumulative,
            stripe_charge_id=refund.charge_id,
            stripe_refund_id=refund.refund_id,
            stripe_event_id=ref.event_id,
        )
        self.uow.session.add(row)
        payment.amount_refunded = refund.cumulative
        payment.stripe_charge_id = payment.stripe_charge_id or refund.charge_id
        if payment.status in SETTLED:
            payment.status = "refunded" if refund.cumulative >= payment.amount else "partially_refunded"
        await self.uow.session.flush()
        if payment.held or payment.status not in SETTLED:
            return processed(f"refund {row.id} of {delta} recorded (payment not applied to the invoice)")
        self.uow.publish(
            payment_event(payment, PaymentEventType.REFUNDED, amount=delta, payment_id=str(row.id),
                          reference=f"refund of payment {payment.id}", stripe_event_id=ref.event_id),
            topic=topics.PAYMENT, key=payment.invoice_id,
        )
        return processed(f"refund {row.id} of {delta} {row.currency} for payment {payment.id}")

    # -- a subscription's Stripe invoice, collected by Stripe: a card payment of our invoice --------
    async def stripe_invoice_paid(self, ref: StripeEventRef, collection: StripeInvoiceCollection) -> Outcome:
        return await self.stripe_invoices.charged(ref, collection)

    async def stripe_invoice_failed(self, ref: StripeEventRef, collection: StripeInvoiceCollection) -> Outcome:
        return await self.stripe_invoices.failed(ref, collection)

    async def client_of_customer(self, customer_id: str) -> str | None:
        """Our client of a Stripe customer: one this service created, else the customer's metadata.client_id
        (a customer the subscriptions service made, or one made in Stripe's dashboard with it)."""
        client_id = await self.repo.client_of_customer(customer_id)
        if client_id is not None:
            return client_id
        customer = await self.stripe.retrieve_customer(customer_id)
        if customer is None or customer.deleted:
            return None
        return customer.metadata.client_id

    # -- subscriptions and Stripe invoices: normalized for the subscriptions service ---------------
    async def republish_subscription(
        self, ref: StripeEventRef, data: StripeSubscriptionV1, *, ordered: bool
    ) -> Outcome:
        """`ordered` events change the subscription's state: an older one than the last published is stale.
        A notice (trial_will_end) is not a state change and never makes another event stale."""
        key = data.subscription_id
        if ordered and not await self.repo.advance_object(key, "subscription", ref.created, ref.event_id,
                                                          {"status": data.status}):
            return ignored(f"stale: a newer event of {key} was already published")
        self.uow.publish(
            CloudEvent.create(source=SOURCE, type=f"stripe.{ref.type}", subject=key, data=data,
                              correlation_id=current_correlation_id(), dataschema=SCHEMA_SUBSCRIPTION_V1),
            topic=topics.STRIPE, key=key,
        )
        return processed(f"republished stripe.{ref.type} for {key} ({data.status})")

    async def republish_invoice(self, ref: StripeEventRef, data: StripeInvoiceV1) -> Outcome:
        """Older than the last one published, or of the same second and earlier in the invoice's life
        (its draft after its payment): stale."""
        if not await self.repo.advance_object(data.invoice_id, "invoice", ref.created, ref.event_id,
                                              {"status": data.status}, rank=INVOICE_STAGES.get(ref.type, 0)):
            return ignored(f"stale: a newer event of {data.invoice_id} was already published")
        key = data.subscription_id or data.invoice_id
        self.uow.publish(
            CloudEvent.create(source=SOURCE, type=f"stripe.{ref.type}", subject=key, data=data,
                              correlation_id=current_correlation_id(), dataschema=SCHEMA_INVOICE_V1),
            topic=topics.STRIPE, key=key,
        )
        return processed(f"republished stripe.{ref.type} for {data.invoice_id}")
