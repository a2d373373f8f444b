"""What every way of recording a payment shares (an admin's manual payment, a Stripe charge): the
local copies of our invoices and what is still due on one, the assessment of a Stripe amount against
it, and the payment.* event a recorded payment publishes.

The invoice service is asked over HTTP (its copy may lag, or none exists yet) only before a lock is
taken: a slow invoice service must never hold a row of ours locked.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from contracts.envelope import CloudEvent
from contracts.invoice import InvoiceStatus
from contracts.payment import SCHEMA_V1 as PAYMENT_SCHEMA
from contracts.payment import PaymentEventType, PaymentEventV1
from kit.logging import current_correlation_id
from services.payments.invoice_client import InvoiceReader, InvoiceServiceUnavailable
from services.payments.models import InvoiceCopy, Payment
from services.payments.repository import CheckoutTerms, Repository

log = structlog.get_logger(__name__)
SOURCE = "payments"


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

