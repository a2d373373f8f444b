"""Invoice domain logic: validation, totals, numbering, status changes and their events. No HTTP."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta

import structlog

from contracts import topics
from contracts.envelope import CloudEvent
from contracts.invoice import SCHEMA_V1, InvoiceEventType, InvoiceLineV1, InvoiceSnapshotV1
from contracts.payment import PaymentEventV1
from contracts.stripe import StripeInvoiceV1
from contracts.subscription import CollectionMethod
from kit.actor import Actor
from kit.clock import utcnow
from kit.db import UnitOfWork
from kit.errors import Conflict, InvalidInput, NotFound
from kit.logging import current_correlation_id
from kit.pagination import PageRequest, PageResult
from services.invoice.models import Client, Invoice, InvoiceItem, InvoicePayment
from services.invoice.money import AmountError, LineInput, compute_totals, stripe_line_price, stripe_totals
from services.invoice.repository import (
    ClientRef,
    ClientRepository,
    InvoiceFilter,
    InvoiceRepository,
    TemplateRepository,
)
from services.invoice.schemas import ClientCreate, InvoiceCreate, InvoiceFields, InvoicePreview, InvoiceUpdate, ItemIn
from services.invoice.status import OPEN, InvoiceStatus, can_transition

log = structlog.get_logger(__name__)
S = InvoiceStatus
SOURCE = "invoice"
# The open states the overdue scan moves on (OVERDUE itself is open but already there).
PAST_DUE_CANDIDATES = (S.SENT, S.VIEWED, S.PARTIAL)
OVERDUE_BATCH = 500
# Stripe invoice states that never become an invoice of ours: a draft may still change, a void one
# was never owed.
STRIPE_NOT_BILLED = frozenset({"draft", "void"})


def _not_mirrored(data: StripeInvoiceV1) -> str | None:
    """Why a Stripe invoice does not become one of ours (None: it does).

    Only a subscription's invoices are ours to mirror. An invoice with nothing to pay (a trial's
    $0 invoice at signup, a 100% coupon, a credit that Stripe keeps as customer balance) moves no
    money: no number, no email (the issue: "no invoice during the trial")."""
    if data.subscription_id is None:
        return "not_a_subscription_invoice"
    if data.status in STRIPE_NOT_BILLED:
        return f"stripe_status_{data.status}"
    if _stripe_total(data) <= 0:
        return "nothing_to_pay"
    return None


def _stripe_total(data: StripeInvoiceV1) -> int:
    if data.total is not None:
        return data.total
    return sum(line.amount for line in data.lines) + (data.tax or 0)


def format_number(year: int, seq: int) -> str:
    return f"{year}-{seq:04d}"


def snapshot(invoice: Invoice, *, cause_id: str | None = None, reason: str | None = None,
             client: Client | ClientRef | None = None) -> InvoiceSnapshotV1:
    """`client`: the invoice's client when the instance does not carry it (a new invoice)."""
    client = client or invoice.client
    return InvoiceSnapshotV1(
        id=str(invoice.id),
        invoice_number=invoice.invoice_number,
        status=invoice.status,
        currency=invoice.currency,
        client_id=str(invoice.client_id),
        client_name=client.name if client else None,
        client_email=client.email if client else None,
        project_id=invoice.project_id,
        subtotal=invoice.subtotal,
        discount_amount=invoice.discount_amount,
        tax_amount=invoice.tax_amount,
        total=invoice.total,
        amount_paid=invoice.amount_paid,
        amount_due=invoice.amount_due,
        issue_date=invoice.issue_date,
        due_date=invoice.due_date,
        paid_at=invoice.paid_at,
        version=invoice.version,
        items=[
            InvoiceLineV1(
                id=str(item.id),
                description=item.description,
                quantity=item.quantity,
                unit_price=item.unit_price,
                discount=item.discount,
                tax_rate=item.tax_rate,
                amount=item.amount,
            )
            for item in invoice.items
        ],
        stripe_invoice_id=invoice.stripe_invoice_id,
        cause_id=cause_id,
        reason=reason,
    )


@dataclass
class InvoiceService:
    uow: UnitOfWork
    default_net_days: int = 30

    @property
    def invoices(self) -> InvoiceRepository:
        return InvoiceRepository(self.uow.session)

    @property
    def clients(self) -> ClientRepository:
        return ClientRepository(self.uow.session)

    # -- clients ---------------------------------------------------------------------------------

    async def create_client(self, data: ClientCreate) -> Client:
        client = Client(id=uuid.uuid4(), **data.model_dump())
        self.clients.add(client)
        await self.uow.session.flush()
        return client

    async def get_client(self, client_id: uuid.UUID, actor: Actor) -> Client:
        client = await self.clients.get(client_id)
        if client is None or not actor.can_see_client(str(client_id)):
            raise NotFound(f"Client {client_id} not found.")
        return client

    async def list_clients(self, actor: Actor, page: PageRequest, *, search: str | None = None) -> PageResult[Client]:
        if actor.is_admin:
            return await self.clients.page(page, search=search)
        if actor.client_id is None:  # e.g. an anonymous caller: nobody's clients
            return PageResult(items=[], next_cursor=None, has_more=False, total=0)
        return await self.clients.page(page, only=uuid.UUID(actor.client_id), search=search)

    # -- reading ---------------------------------------------------------------------------------

    async def get_invoice(self, invoice_id: uuid.UUID, actor: Actor, *, for_update: bool = False) -> Invoice:
        invoice = await self.invoices.get(invoice_id, for_update=for_update)
        if invoice is None or not actor.can_see_client(str(invoice.client_id)) or (
            not actor.is_admin and invoice.invoice_number is None
        ):
            # Another client's invoice is "not found", not "forbidden": its existence is not leaked.
            # A client never sees drafts (nor drafts cancelled before sending): only what was sent.
            raise NotFound(f"Invoice {invoice_id} not found.")
        return invoice

    async def read(self, invoice_id: uuid.UUID, actor: Actor) -> Invoice:
        """The invoice as `actor` may see it. A client reading a SENT invoice has opened it (in the
        portal): it becomes VIEWED, once."""
        invoice = await self.get_invoice(invoice_id, actor)
        if actor.role == "client" and invoice.status == S.SENT:
            # mark_viewed re-reads this same (identity-mapped) instance under a lock and changes it.
            await self.mark_viewed(invoice_id, cause_id=f"portal:{actor.user_id}")
        return invoice

    async def search(self, f: InvoiceFilter, actor: Actor, *, sort: str, page: PageRequest) -> PageResult[Invoice]:
        if not actor.is_admin:
            if actor.client_id is None or (f.client_id is not None and str(f.client_id) != actor.client_id):
                return PageResult(items=[], next_cursor=None, has_more=False, total=0)
            f = replace(f, client_id=uuid.UUID(actor.client_id), sent_only=True)
        return await self.invoices.search(f, sort=sort, page=page)

    async def payments(self, invoice_id: uuid.UUID, actor: Actor, page: PageRequest) -> PageResult[InvoicePayment]:
        await self.get_invoice(invoice_id, actor)
        return await self.invoices.payments(invoice_id, page)

    # -- drafting --------------------------------------------------------------------------------

    async def create_invoice(self, data: InvoiceCreate) -> Invoice:
        client = await self._existing_client(data.client_id)
        invoice = self._draft(data, client_id=client.id, currency=data.currency or client.currency)
        await self.invoices.insert_new(invoice)
        self._emit(invoice, InvoiceEventType.CREATED, client=client)
        return invoice

    async def preview_invoice(self, data: InvoicePreview) -> Invoice:
        """The draft `create_invoice` would make of `data` (same checks, same refusals, same totals),
        never saved: no row, no event. The currency is `data.currency`, else the client's."""
        client = await self._existing_client(data.client_id) if data.client_id is not None else None
        currency = data.currency or (client.currency if client is not None else None)
        if currency is None:  # InvoicePreview refuses this already; kept so no draft lacks a currency
            raise InvalidInput("Give a currency or a clientId.", details=[{"field": "currency"}])
        return self._draft(data, client_id=data.client_id, currency=currency)

    async def _existing_client(self, client_id: uuid.UUID) -> ClientRef:
        client = await self.clients.ref(client_id)
        if client is None:
            raise InvalidInput(f"Client {client_id} does not exist.", details=[{"field": "clientId"}])
        return client

    def _draft(self, data: InvoiceCreate, *, client_id: uuid.UUID | None, currency: str) -> Invoice:
        """A new draft of `data`, not yet in the session, its totals computed (InvalidInput if the
        numbers cannot make an invoice)."""
        invoice = Invoice(
            id=uuid.uuid4(),
            status=S.DRAFT,
            client_id=client_id,
            currency=currency,
            discount_fixed=0,
            amount_paid=0,
            version=1,
            items=[],
        )
        self._apply_fields(invoice, data)
        self._replace_items(invoice, data.items)
        return invoice

    async def editable_draft(self, invoice_id: uuid.UUID) -> Invoice:
        """The draft, locked for an edit; 404 when it does not exist, 409 when it is no longer a
        draft (asked before the new content is even read: whatever it is, it cannot apply)."""
        invoice = await self.get_invoice(invoice_id, Actor("system"), for_update=True)
        if invoice.status != S.DRAFT:
            raise Conflict(
                f"Invoice {invoice.invoice_number} is {invoice.status}; only drafts can be edited.",
                code="invoice_not_editable",
            )
        return invoice

    async def update_invoice(self, invoice: Invoice, data: InvoiceUpdate) -> Invoice:
        """Apply a PUT to a draft from `editable_draft` (see InvoiceUpdate for what it replaces)."""
        if not data.model_fields_set:
            raise InvalidInput("Nothing to update.")
        if data.client_id is not None and data.client_id != invoice.client_id:
            client = await self.clients.get(data.client_id)
            if client is None:
                raise InvalidInput(f"Client {data.client_id} does not exist.", details=[{"field": "clientId"}])
            invoice.client_id, invoice.client = client.id, client
            invoice.currency = client.currency  # as a new draft for this client would have it
        if data.currency:
            invoice.currency = data.currency
        self._apply_fields(invoice, data)
        if data.items is not None:
            self._replace_items(invoice, data.items)
        else:
            self._recompute(invoice)
        await self._change(invoice, InvoiceEventType.UPDATED)
        return invoice

    def _apply_fields(self, invoice: Invoice, data: InvoiceFields) -> None:
        for name in data.model_fields_set & set(InvoiceFields.model_fields):
            value = getattr(data, name)
            if name == "discount_fixed":
                value = value or 0
            setattr(invoice, name, value)
        if "discount_percent" in data.model_fields_set and data.discount_percent is not None:
            invoice.discount_fixed = 0
        if "discount_fixed" in data.model_fields_set and data.discount_fixed:
            invoice.discount_percent = None
        if invoice.issue_date and invoice.due_date and invoice.due_date < invoice.issue_date:
            raise InvalidInput("dueDate cannot be before issueDate.", details=[{"field": "dueDate"}])

    def _replace_items(self, invoice: Invoice, items: list[ItemIn]) -> None:
        invoice.items = [
            InvoiceItem(
                id=uuid.uuid4(),
                position=index,
                description=item.description,
                quantity=item.quantity,
                unit_price=item.unit_price,
                discount=item.discount,
                discount_percent=item.discount_percent,
                tax_rate=item.tax_rate,
                amount=0,
            )
            for index, item in enumerate(items)
        ]
        self._recompute(invoice)

    def _recompute(self, invoice: Invoice) -> None:
        try:
            totals = compute_totals(
                [
                    LineInput(
                        quantity=item.quantity,
                        unit_price=item.unit_price,
                        discount=item.discount if item.discount_percent is None else 0,
                        discount_percent=item.discount_percent,
                        tax_rate=item.tax_rate,
                    )
                    for item in invoice.items
                ],
                discount_fixed=invoice.discount_fixed or 0,
                discount_percent=invoice.discount_percent,
                tax_rate=invoice.tax_rate,
            )
        except AmountError as exc:
            # The field at fault in details, as a body validation error names it (a form shows the
            # message next to that field).
            details = [{"field": exc.field, "message": str(exc)}] if exc.field else None
            raise InvalidInput(str(exc), code="invalid_amounts", details=details) from exc
        for item, line in zip(invoice.items, totals.lines, strict=True):
            item.discount = line.discount
            item.amount = line.amount
            item.tax_amount = line.tax
        invoice.subtotal = totals.subtotal
        invoice.discount_amount = totals.discount_amount
        invoice.tax_amount = totals.tax_amount
        invoice.total = totals.total

    # -- lifecycle -------------------------------------------------------------------------------

    async def send(self, invoice_id: uuid.UUID, *, resend: bool = False, today: date | None = None) -> Invoice:
        invoice = await self.get_invoice(invoice_id, Actor("system"), for_update=True)
        today = today or utcnow().date()
        if invoice.status == S.DRAFT:
            if not invoice.items:
                raise InvalidInput("An invoice needs at least one line item before it is sent.",
                                   code="invoice_empty")
            if invoice.total <= 0:
                raise InvalidInput("An invoice with a zero total cannot be sent.", code="invoice_zero_total")
            # The queries below would each flush what is assigned so far (one UPDATE of the invoice
            # apiece): the whole change is written once, by _change.
            with self.uow.session.no_autoflush:
                invoice.issue_date = invoice.issue_date or today
                # The invoice keeps the template (look and defaults) current at sending; 0 = built-in defaults.
                head = await TemplateRepository(self.uow.session).head()
                invoice.template_version = head.version if head else 0
                net_days = invoice.net_days
                if net_days is None:
                    template_days = head.default_net_days if head else None
                    net_days = template_days if template_days is not None else self.default_net_days
                invoice.due_date = invoice.due_date or invoice.issue_date + timedelta(days=net_days)
                if invoice.invoice_number is None:
                    year = today.year
                    seq = await self.invoices.next_number(year)
                    invoice.number_year, invoice.number_seq = year, seq
                    invoice.invoice_number = format_number(year, seq)
                invoice.sent_at = utcnow()
            await self._change(invoice, InvoiceEventType.SENT, to=S.SENT)
            return invoice
        if resend and invoice.status in OPEN:
            # No status change, but a new sent_at: a new version, so copies elsewhere take it.
            invoice.sent_at = utcnow()
            await self._change(invoice, InvoiceEventType.SENT, reason="resent")
            return invoice
        raise Conflict(
            f"Invoice {invoice.invoice_number} is already {invoice.status}"
            + ("; pass resend=true to send it again." if invoice.status in OPEN else "."),
            code="invalid_transition",
        )

    async def cancel(self, invoice_id: uuid.UUID) -> Invoice:
        invoice = await self.get_invoice(invoice_id, Actor("system"), for_update=True)
        invoice.cancelled_at = utcnow()  # a refused move raises: the unit of work rolls this back
        await self._change(invoice, InvoiceEventType.CANCELLED, to=S.CANCELLED)
        return invoice

    async def mark_viewed(self, invoice_id: uuid.UUID, *, cause_id: str | None = None) -> bool:
        """SENT → VIEWED; any other state is left alone (a late open never moves it back)."""
        invoice = await self.invoices.get(invoice_id, for_update=True)
        if invoice is None or invoice.status != S.SENT:
            return False
        invoice.viewed_at = utcnow()
        await self._change(invoice, InvoiceEventType.VIEWED, to=S.VIEWED, cause_id=cause_id)
        return True

    async def mark_overdue(self, as_of: date, *, wait_for_locked: bool = False,
                           batch_size: int = OVERDUE_BATCH) -> list[uuid.UUID]:
        """Move every SENT/VIEWED/PARTIAL invoice due before `as_of` to OVERDUE; the ids it moved.

        This is the one rule for "overdue". By default rows another transaction holds are skipped
        (SKIP LOCKED), so replicas running the scheduled scan together split the work instead of
        doubling it. `wait_for_locked=True` waits for them instead, so that once this transaction
        commits, no invoice open and due before `as_of` is left: each was moved by this call or
        by the one that held it (which left it OVERDUE, or paid or cancelled it)."""
        marked: list[uuid.UUID] = []
        while True:
            ids = await self.invoices.past_due_ids(as_of, PAST_DUE_CANDIDATES, batch_size,
                                                   skip_locked=not wait_for_locked)
            for invoice_id in ids:
                invoice = await self.invoices.get(invoice_id, for_update=True)
                assert invoice is not None
                await self._change(invoice, InvoiceEventType.OVERDUE, to=S.OVERDUE, reason="past_due")
            marked.extend(ids)
            # The rows of this batch are OVERDUE now: the next query returns only the rest.
            if len(ids) < batch_size:
                return marked

    # -- payments (driven by payment.* events) ---------------------------------------------------

    async def apply_payment(self, payment: PaymentEventV1, *, event_time: datetime | None = None) -> Invoice | None:
        invoice = await self._payment_target(payment)
        if invoice is None:
            return None
        if payment.currency.upper() != invoice.currency:
            raise Conflict(
                f"Payment {payment.payment_id} is in {payment.currency}, invoice is in {invoice.currency}.",
                code="currency_mismatch",
            )
        if invoice.status in (S.DRAFT, S.CANCELLED):
            raise Conflict(f"Invoice is {invoice.status}; payment {payment.payment_id} not applied.",
                           code="invoice_not_payable")
        paid_at = payment.paid_at or event_time or utcnow()
        added = await self.invoices.add_payment(
            InvoicePayment(
                invoice_id=invoice.id,
                payment_id=payment.payment_id,
                kind="payment",
                amount=payment.amount,
                currency=invoice.currency,
                method=payment.method,
                reference=payment.reference,
                paid_at=paid_at,
            )
        )
        if not added:
            log.info("payment_already_applied", payment_id=payment.payment_id)
            return invoice
        invoice.amount_paid += payment.amount
        target: InvoiceStatus | None
        if invoice.amount_paid >= invoice.total:
            target = S.PAID
            invoice.paid_at = invoice.paid_at or paid_at
            event_type = InvoiceEventType.PAID
        else:
            # PARTIAL, or OVERDUE while past due; a PAID invoice never goes back on a payment.
            target = None if invoice.status == S.PAID else self._open_status(invoice)
            event_type = InvoiceEventType.PARTIALLY_PAID
        await self._change(invoice, event_type, to=None if target == invoice.status else target,
                           cause_id=payment.payment_id)
        return invoice

    async def apply_refund(self, payment: PaymentEventV1) -> Invoice | None:
        invoice = await self._payment_target(payment)
        if invoice is None:
            return None
        added = await self.invoices.add_payment(
            InvoicePayment(
                invoice_id=invoice.id,
                payment_id=payment.payment_id,
                kind="refund",
                amount=-payment.amount,
                currency=invoice.currency,
                method=payment.method,
                reference=payment.reference,
                paid_at=payment.paid_at or utcnow(),
            )
        )
        if not added:
            return invoice
        invoice.amount_paid = max(invoice.amount_paid - payment.amount, 0)
        target: InvoiceStatus | None = None
        if invoice.status == S.PAID and invoice.amount_paid < invoice.total:
            # A refund is new money movement, not a stale event: the invoice is open again
            # (PARTIAL while something stays paid), through the refund moves of the status machine.
            target = self._open_status(invoice)
            invoice.paid_at = None
        elif invoice.status == S.PARTIAL and invoice.amount_paid == 0:
            target = self._open_status(invoice)  # nothing paid any more: SENT, VIEWED or OVERDUE
        # Always invoice.updated (reason "refunded", cause = the payment): what payments reads to
        # know the refund is applied, whatever the status became.
        await self._change(invoice, InvoiceEventType.UPDATED, to=target, refund=True,
                           cause_id=payment.payment_id, reason="refunded")
        return invoice

    async def payment_failed(self, payment: PaymentEventV1) -> Invoice | None:
        """The seed's flow: a failed payment makes the invoice OVERDUE (if it is still open)."""
        invoice = await self._payment_target(payment)
        if invoice is None or invoice.status not in PAST_DUE_CANDIDATES:
            return invoice
        await self._change(invoice, InvoiceEventType.OVERDUE, to=S.OVERDUE, cause_id=payment.payment_id,
                           reason="payment_failed")
        return invoice

    # -- subscription invoices (driven by stripe.invoice.* events) -------------------------------

    async def mirror_stripe_invoice(self, data: StripeInvoiceV1) -> Invoice | None:
        """Our invoice of a subscription's finalized Stripe invoice: created from Stripe's lines and
        totals and sent (numbered, emailed) by the first of its events to arrive (finalized, paid or
        payment_failed: they repeat and come out of order), the same invoice for every later one.
        None when the Stripe invoice is not one we bill (see `_not_mirrored`). Stripe's payment is
        not applied here: payments records it (payment.succeeded) against this invoice."""
        existing = await self.invoices.by_stripe_id(data.invoice_id, for_update=True)
        if existing is not None:
            return existing
        skip = _not_mirrored(data)
        client = None if skip else await self._stripe_client(data)
        if client is None:
            log.info("stripe_invoice_not_mirrored", stripe_invoice=data.invoice_id, reason=skip or "no_client",
                     customer=data.customer_id, client_id=data.client_id, total=data.total)
            return None
        issued = (data.finalized_at or data.created or data.stripe_event_created).astimezone(UTC).date()
        # Stripe charges the card on finalization: due then. Sent for payment: Stripe's due date, else
        # the usual net days (send() fills it in).
        if data.collection_method == CollectionMethod.SEND_INVOICE:
            due = data.due_date.astimezone(UTC).date() if data.due_date else None
        else:
            due = issued
        invoice = Invoice(
            id=uuid.uuid4(), status=S.DRAFT, client_id=client.id, client=client, currency=data.currency.upper(),
            project_id=None, issue_date=issued, due_date=due, amount_paid=0, version=1,
            stripe_invoice_id=data.invoice_id, items=self._stripe_items(data),
        )
        try:
            totals = stripe_totals([item.amount for item in invoice.items], tax=data.tax or 0,
                                   total=_stripe_total(data))
        except AmountError as exc:
            raise InvalidInput(f"Stripe invoice {data.invoice_id}: {exc}", code="invalid_amounts") from exc
        invoice.subtotal, invoice.tax_amount, invoice.total = totals.subtotal, totals.tax_amount, totals.total
        invoice.discount_amount = invoice.discount_fixed = totals.discount_amount
        if data.amount_due != invoice.total:
            # e.g. a credit balance Stripe applied: the card pays less than the total (then PARTIAL).
            log.warning("stripe_invoice_amount_due_differs", stripe_invoice=data.invoice_id, total=invoice.total,
                        amount_due=data.amount_due)
        self.invoices.add(invoice)
        await self.uow.session.flush()  # a concurrent copy of the same Stripe invoice fails here, unique
        self._emit(invoice, InvoiceEventType.CREATED, cause_id=data.stripe_event_id)
        log.info("stripe_invoice_mirrored", stripe_invoice=data.invoice_id, invoice_id=str(invoice.id),
                 total=invoice.total, lines=len(invoice.items))
        return await self.send(invoice.id)

    async def stripe_payment_failed(self, data: StripeInvoiceV1) -> Invoice | None:
        """Stripe could not charge a subscription invoice: ours (mirrored first if this is the first
        event of it) becomes OVERDUE while it is still open; a later payment makes it PAID."""
        invoice = await self.mirror_stripe_invoice(data)
        if invoice is None or invoice.status not in PAST_DUE_CANDIDATES:
            return invoice
        await self._change(invoice, InvoiceEventType.OVERDUE, to=S.OVERDUE, cause_id=data.stripe_event_id,
                           reason="payment_failed")
        return invoice

    async def _stripe_client(self, data: StripeInvoiceV1) -> Client | None:
        try:
            client_id = uuid.UUID(data.client_id or "")
        except ValueError:
            return None
        return await self.clients.get(client_id)

    def _stripe_items(self, data: StripeInvoiceV1) -> list[InvoiceItem]:
        """Stripe's lines as they are, proration credits (negative) included. A webhook lists at most
        the first lines of a long invoice: the rest of Stripe's subtotal is one line of its own, so
        the lines always add up to Stripe's subtotal."""
        lines = [(line.description or "Subscription", line.amount, line.quantity) for line in data.lines]
        listed = sum(amount for _, amount, _ in lines)
        if data.subtotal is not None and data.subtotal != listed:
            lines.append((f"Further items of Stripe invoice {data.number or data.invoice_id}",
                          data.subtotal - listed, None))
        items = []
        for position, (description, amount, stripe_quantity) in enumerate(lines):
            quantity, unit_price = stripe_line_price(amount, stripe_quantity)
            items.append(InvoiceItem(id=uuid.uuid4(), position=position, description=description,
                                     quantity=quantity, unit_price=unit_price, discount=0, amount=amount,
                                     tax_amount=0))
        return items

    async def _payment_target(self, payment: PaymentEventV1) -> Invoice | None:
        try:
            invoice_id = uuid.UUID(payment.invoice_id)
        except ValueError:
            raise InvalidInput(f"Payment {payment.payment_id} names no valid invoice.") from None
        invoice = await self.invoices.get(invoice_id, for_update=True)
        if invoice is None:
            raise NotFound(f"Invoice {payment.invoice_id} of payment {payment.payment_id} not found.")
        return invoice

    # -- helpers ---------------------------------------------------------------------------------

    async def _change(self, invoice: Invoice, event_type: InvoiceEventType, *, to: InvoiceStatus | None = None,
                      refund: bool = False, cause_id: str | None = None, reason: str | None = None) -> None:
        """The one way an existing invoice changes: the move to `to` (if any) is checked against the
        status machine (`refund`: a refund's moves are allowed too), the version goes up by exactly
        one and the event is staged in the outbox with the new snapshot. Nothing else assigns
        `status` or `version`."""
        if to is not None:
            current = invoice.status
            if not can_transition(current, to, refund=refund):
                raise Conflict(f"Invoice cannot go from {current} to {to}.", code="invalid_transition",
                               details={"from": current, "to": to})
            invoice.status = to
        invoice.version += 1
        # Written now (not at commit) so the response built from this instance shows updated_at and
        # a database refusal surfaces here.
        await self.uow.session.flush()
        self._emit(invoice, event_type, cause_id=cause_id, reason=reason)

    def _open_status(self, invoice: Invoice) -> InvoiceStatus:
        """The open state the invoice is in given what is paid and its dates (after a payment or a
        refund): OVERDUE past the due date, PARTIAL with something paid, else VIEWED or SENT."""
        if invoice.due_date and invoice.due_date < utcnow().date():
            return S.OVERDUE
        if invoice.amount_paid > 0:
            return S.PARTIAL
        return S.VIEWED if invoice.viewed_at else S.SENT

    def _emit(self, invoice: Invoice, event_type: InvoiceEventType, *, cause_id: str | None = None,
              reason: str | None = None, client: ClientRef | None = None) -> None:
        event = CloudEvent.create(
            source=SOURCE,
            type=event_type,
            subject=str(invoice.id),
            data=snapshot(invoice, cause_id=cause_id, reason=reason, client=client),
            correlation_id=current_correlation_id(),
            dataschema=SCHEMA_V1,
        )
        self.uow.publish(event, topic=topics.INVOICE, key=str(invoice.id))
