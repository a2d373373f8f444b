"""One short handler per Stripe event type: the typed event in, one call to the domain
(services/payments/stripe/payments.py) out.

`HANDLERS` is the only list of the event types payments handles. The intake stores any other type
as ignored (Stripe still gets its 200), the setup command subscribes the webhook endpoint to exactly
these (`enabled_events`), and the table below and the OpenAPI description of `POST /webhooks/stripe`
are generated from it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic

from contracts.stripe import StripeInvoiceV1
from services.payments.stripe import normalize
from services.payments.stripe.events import (
    Charge,
    CheckoutSession,
    Event,
    Invoice,
    ObjT,
    PaymentIntent,
    Subscription,
    parse_event,
)
from services.payments.stripe.payments import (
    Outcome,
    StripeCharge,
    StripeEventRef,
    StripeInvoiceCollection,
    StripePayments,
    StripeRefund,
    combined,
    ignored,
)


def _ref(event: Event[Any]) -> StripeEventRef:
    return StripeEventRef(event_id=event.id, created=event.created, type=event.type)


def _charge(session: CheckoutSession, invoice_id: str) -> StripeCharge:
    return StripeCharge(
        invoice_id=invoice_id,
        client_id=session.metadata.client_id,
        amount=session.amount_total,
        currency=session.currency,
        method=session.method,
        session_id=session.id,
        payment_intent=session.payment_intent,
        customer=session.customer,
    )


NOT_OURS = "checkout session for no invoice of ours"


def _payment_for_us(session: CheckoutSession) -> StripeCharge | Outcome:
    if not session.for_a_payment:
        return ignored(f"checkout session in {session.mode} mode (subscriptions arrive as customer.subscription.*)")
    invoice_id = session.invoice_id
    return _charge(session, invoice_id) if invoice_id else ignored(NOT_OURS)


async def checkout_completed(payments: StripePayments, event: Event[CheckoutSession]) -> Outcome:
    """Checkout done: a card payment settles; an asynchronous method (SEPA debit, ...) is pending."""
    charge = _payment_for_us(event.object)
    if isinstance(charge, Outcome):
        return charge
    return await payments.checkout_completed(_ref(event), charge, payment_status=event.object.payment_status,
                                             paid=event.object.paid)


async def checkout_async_succeeded(payments: StripePayments, event: Event[CheckoutSession]) -> Outcome:
    """The asynchronous payment of a completed Checkout settled: the payment succeeds."""
    charge = _payment_for_us(event.object)
    if isinstance(charge, Outcome):
        return charge
    return await payments.checkout_completed(_ref(event), charge, payment_status="paid", paid=True)


async def checkout_async_failed(payments: StripePayments, event: Event[CheckoutSession]) -> Outcome:
    """The asynchronous payment of a completed Checkout failed: payment.failed."""
    session, invoice_id = event.object, event.object.invoice_id
    if not invoice_id or not session.for_a_payment:
        return ignored(NOT_OURS)
    return await payments.checkout_failed(_ref(event), _charge(session, invoice_id))


async def checkout_expired(payments: StripePayments, event: Event[CheckoutSession]) -> Outcome:
    """Nobody paid in time: the open session is closed (the next Pay Now makes a new one)."""
    return await payments.checkout_expired(_ref(event), event.object.id)


async def payment_intent_failed(payments: StripePayments, event: Event[PaymentIntent]) -> Outcome:
    """A card was declined (the customer may retry in the same session): payment.failed."""
    intent = event.object
    invoice_id = intent.metadata.invoice_id or await payments.invoice_of_payment_intent(intent.id)
    if not invoice_id:
        return ignored("payment intent for no invoice of ours")
    charge = StripeCharge(invoice_id=invoice_id, client_id=intent.metadata.client_id, amount=intent.amount,
                          currency=intent.currency, method=intent.method, payment_intent=intent.id)
    return await payments.payment_failed(_ref(event), charge, code=intent.failure_code,
                                         message=intent.failure_message)


async def charge_refunded(payments: StripePayments, event: Event[Charge]) -> Outcome:
    """Money given back (each increase of the charge's amount_refunded once): payment.refunded."""
    charge = event.object
    return await payments.refunded(_ref(event), StripeRefund(
        payment_intent=charge.payment_intent, cumulative=charge.amount_refunded, currency=charge.currency,
        charge_id=charge.id, refund_id=charge.latest_refund_id, for_our_invoice=bool(charge.metadata.invoice_id),
    ))


async def subscription_changed(payments: StripePayments, event: Event[Subscription]) -> Outcome:
    """Republished normalized on billing.stripe (older than the last one published: dropped)."""
    return await payments.republish_subscription(_ref(event), normalize.subscription(event), ordered=True)


async def subscription_notice(payments: StripePayments, event: Event[Subscription]) -> Outcome:
    """Republished normalized on billing.stripe (a notice: never stale, never makes others stale)."""
    return await payments.republish_subscription(_ref(event), normalize.subscription(event), ordered=False)


async def _normalized_invoice(payments: StripePayments, event: Event[Invoice]) -> StripeInvoiceV1:
    """The invoice for billing.stripe; its client from the customer when the subscription names none."""
    inv = event.object
    customer_client_id = None
    if not (inv.metadata.client_id or inv.subscription_metadata.client_id) and inv.customer:
        customer_client_id = await payments.client_of_customer(inv.customer)
    return normalize.invoice(event, customer_client_id=customer_client_id)


def _collection(data: StripeInvoiceV1) -> StripeInvoiceCollection:
    return StripeInvoiceCollection(
        stripe_invoice_id=data.invoice_id, subscription_id=data.subscription_id, customer=data.customer_id,
        client_id=data.client_id, currency=data.currency, amount_paid=data.amount_paid, amount_due=data.amount_due,
        paid_at=data.paid_at, attempt_count=data.attempt_count,
    )


async def stripe_invoice(payments: StripePayments, event: Event[Invoice]) -> Outcome:
    """A subscription's Stripe invoice, republished normalized on billing.stripe (stale ones dropped)."""
    return await payments.republish_invoice(_ref(event), await _normalized_invoice(payments, event))


async def stripe_invoice_paid(payments: StripePayments, event: Event[Invoice]) -> Outcome:
    """Republished normalized; Stripe's charge becomes a card payment of our invoice of it (payment.succeeded)."""
    data = await _normalized_invoice(payments, event)
    paid = await payments.stripe_invoice_paid(_ref(event), _collection(data))
    return combined(paid, await payments.republish_invoice(_ref(event), data))


async def stripe_invoice_failed(payments: StripePayments, event: Event[Invoice]) -> Outcome:
    """Republished normalized; the failed attempt is recorded on our invoice of it (no payment.failed)."""
    data = await _normalized_invoice(payments, event)
    failed = await payments.stripe_invoice_failed(_ref(event), _collection(data))
    return combined(failed, await payments.republish_invoice(_ref(event), data))


@dataclass(frozen=True)
class Handler(Generic[ObjT]):
    """The Stripe object an event type carries and the function that handles it."""

    model: type[ObjT]
    handle: Callable[[StripePayments, Event[ObjT]], Awaitable[Outcome]]

    def parse(self, payload: bytes) -> Event[ObjT]:
        """The stored body as a typed event (ValueError when Stripe's object is not what we expect)."""
        return parse_event(payload, self.model)

    @property
    def summary(self) -> str:
        return (self.handle.__doc__ or "").strip().splitlines()[0]


HANDLERS: dict[str, Handler[Any]] = {
    "checkout.session.completed": Handler(CheckoutSession, checkout_completed),
    "checkout.session.async_payment_succeeded": Handler(CheckoutSession, checkout_async_succeeded),
    "checkout.session.async_payment_failed": Handler(CheckoutSession, checkout_async_failed),
    "checkout.session.expired": Handler(CheckoutSession, checkout_expired),
    "payment_intent.payment_failed": Handler(PaymentIntent, payment_intent_failed),
    "charge.refunded": Handler(Charge, charge_refunded),
    "customer.subscription.created": Handler(Subscription, subscription_changed),
    "customer.subscription.updated": Handler(Subscription, subscription_changed),
    "customer.subscription.deleted": Handler(Subscription, subscription_changed),
    "customer.subscription.paused": Handler(Subscription, subscription_changed),
    "customer.subscription.resumed": Handler(Subscription, subscription_changed),
    "customer.subscription.trial_will_end": Handler(Subscription, subscription_notice),
    "invoice.created": Handler(Invoice, stripe_invoice),
    "invoice.finalized": Handler(Invoice, stripe_invoice),
    "invoice.paid": Handler(Invoice, stripe_invoice_paid),
    "invoice.payment_failed": Handler(Invoice, stripe_invoice_failed),
}


def handled_types_table() -> str:
    """The handled event types as a Markdown table (this module's documentation and the OpenAPI one)."""
    rows = [f"| `{event_type}` | {handler.model.__name__} | {handler.summary} |"
            for event_type, handler in HANDLERS.items()]
    return "\n".join(["| Stripe event type | object | what happens |", "|---|---|---|", *rows])


__doc__ = f"{__doc__}\nHandled event types (generated from `HANDLERS`):\n\n{handled_types_table()}\n"
