"""What Stripe's events do to payments, checkout sessions and refunds, and a subscription's Stripe
invoice collected by Stripe as a payment of ours. Typed values in (handlers.py parses Stripe's JSON),
the outcome stored on the event's row out; no HTTP and no Stripe JSON here.

Money rules (with services/payments/ledger.py):
* A payment is one row per Stripe PaymentIntent (else per Checkout Session, or per Stripe invoice for
  a subscription's invoice). A Stripe payment that reaches `succeeded` never goes back; a later failure
  for it is stale.
* Amounts are recorded exactly as Stripe reports them, never rounded: an underpayment is a partial
  payment, an overpayment is recorded in full, both flagged; a payment in another currency than the
  invoice is recorded, flagged and held (not sent to the invoice service) for a human to resolve.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

import structlog

from contracts import topics
from contracts.envelope import CloudEvent
from contracts.payment import PaymentEventType
from contracts.stripe import SCHEMA_INVOICE_V1, SCHEMA_SUBSCRIPTION_V1, StripeInvoiceV1, StripeSubscriptionV1
from kit.clock import from_unix, utcnow
from kit.db import UnitOfWork
from kit.logging import current_correlation_id
from services.payments.invoice_client import InvoiceReader
from services.payments.ledger import SOURCE, Assessment, InvoiceCopies, assess, payment_event
from services.payments.models import InvoiceCopy, Payment, Refund, StripeInvoiceCharge
from services.payments.repository import SETTLED, CheckoutTerms, Repository
from services.payments.stripe.gateway import StripeGateway

log = structlog.get_logger(__name__)
UNKNOWN_CURRENCY = "XXX"  # ISO 4217 "no currency": a Stripe payment for an invoice we know nothing of


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

