"""Data access for the invoice service. Knows SQL, not business rules."""

from __future__ import annotations

import dataclasses
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

import orjson
from sqlalchemy import Integer, Select, bindparam, func, inspect, or_, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import QueryableAttribute, joinedload

from contracts.invoice import InvoiceStatus
from kit.pagination import PageRequest, PageResult, SortKey, paginate
from services.invoice.models import (
    Client,
    Invoice,
    InvoiceItem,
    InvoicePayment,
    InvoicePdf,
    InvoiceTemplate,
    NumberCounter,
)

# `sort` values of the invoice list (without the leading "-") -> their columns, nullable ones marked
# (NULLs sort last either way). Numbers sort by (year, sequence): "2026-10000" comes after "2026-9999".
# The id is always the last key, so the order is total and a cursor names one position.
_SORTS: dict[str, tuple[tuple[QueryableAttribute[Any], bool], ...]] = {
    "createdAt": ((Invoice.created_at, False),),
    "issueDate": ((Invoice.issue_date, True),),
    "dueDate": ((Invoice.due_date, True),),
    "total": ((Invoice.total, False),),
    "invoiceNumber": ((Invoice.number_year, True), (Invoice.number_seq, True)),
    "status": ((Invoice.status, False),),
}


def invoice_order(sort: str) -> list[SortKey]:
    descending = sort.startswith("-")
    keys = [SortKey(column, descending=descending, nullable=nullable)
            for column, nullable in _SORTS[sort.removeprefix("-")]]
    return [*keys, SortKey(Invoice.id, descending=descending)]


def like_escape(text: str) -> str:
    """`text` as a LIKE pattern that matches only itself (escape character: backslash)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


@dataclass(frozen=True)
class InvoiceFilter:
    client_id: uuid.UUID | None = None
    statuses: tuple[InvoiceStatus, ...] = ()
    project_id: str | None = None
    number: str | None = None
    due_before: date | None = None
    due_after: date | None = None
    issued_from: date | None = None
    issued_to: date | None = None
    sent_only: bool = False  # only invoices that have left DRAFT (they carry a number)

    def scope(self, sort: str) -> str:
        """What a cursor of this list is bound to: the sort and every filter (the caller's scoping
        included), so a cursor is refused under another sort or filter instead of skipping rows."""
        values = dataclasses.asdict(self) | {"statuses": sorted(self.statuses), "sort": sort}
        return "invoices:" + orjson.dumps(values, default=str, option=orjson.OPT_SORT_KEYS).decode()


@dataclass(frozen=True)
class ClientRef:
    """What a new invoice takes from its client: the currency, and the name and email its events carry."""

    id: uuid.UUID
    name: str
    email: str
    currency: str


class ClientRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, client_id: uuid.UUID) -> Client | None:
        return await self.session.get(Client, client_id)

    async def ref(self, client_id: uuid.UUID) -> ClientRef | None:
        """The client's four columns as a plain value: no ORM instance, no identity map (the create
        path's lookup; an ORM get cost more CPU than the rest of its SQL)."""
        row = (await self.session.execute(_CLIENT_REF, {"id": client_id})).first()
        return None if row is None else ClientRef(id=row[0], name=row[1], email=row[2], currency=row[3])

    async def page(self, page: PageRequest, only: uuid.UUID | None = None, search: str | None = None
                   ) -> PageResult[Client]:
        """Newest first. `only`: the one client a client login may see; `search`: name or email
        contains it, in any case, literally (a picker's type-ahead: the clients of an agency, no index)."""
        stmt = select(Client)
        if only is not None:
            stmt = stmt.where(Client.id == only)
        if search:
            pattern = f"%{like_escape(search)}%"
            stmt = stmt.where(or_(Client.name.ilike(pattern, escape="\\"),
                                  Client.email.ilike(pattern, escape="\\")))
        order = [SortKey(Client.created_at, descending=True), SortKey(Client.id, descending=True)]
        return await paginate(self.session, stmt, order=order, page=page, with_total=True,
                              scope=f"clients:only={only}:q={search or ''}")

    def add(self, client: Client) -> None:
        self.session.add(client)


def _set_columns(instance: object, names: tuple[str, ...]) -> dict[str, Any]:
    given = inspect(instance).dict
    return {name: given[name] for name in names if name in given}


class InvoiceRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    def add(self, invoice: Invoice) -> None:
        self.session.add(invoice)

    async def insert_new(self, invoice: Invoice) -> None:
        """Write a new invoice built in memory (not added to the session) and its lines: one INSERT
        of the invoice (its created_at and updated_at set from the database's answer) and one of all
        the lines, without the ORM's flush (a third of a create's CPU). The instance stays
        transient: it is the answer and the event, nothing in this unit of work changes it later."""
        # Only the attributes that were set, as the ORM's INSERT would: a column left out takes its
        # default (Python or server side), not NULL.
        row = (await self.session.execute(_INSERT_INVOICE, _set_columns(invoice, _INVOICE_INSERTED))).one()
        invoice.created_at, invoice.updated_at = row[0], row[1]
        if invoice.items:
            await self.session.execute(_INSERT_ITEMS, [
                {**_set_columns(item, _ITEM_INSERTED), "invoice_id": invoice.id} for item in invoice.items
            ])

    async def get(self, invoice_id: uuid.UUID, *, for_update: bool = False) -> Invoice | None:
        stmt = _GET_INVOICE_FOR_UPDATE if for_update else _GET_INVOICE
        return (await self.session.scalars(stmt, {"id": invoice_id})).unique().one_or_none()

    async def by_stripe_id(self, stripe_invoice_id: str, *, for_update: bool = False) -> Invoice | None:
        """Our invoice of a Stripe invoice (in_...), if there is one (unique)."""
        stmt = select(Invoice).where(Invoice.stripe_invoice_id == stripe_invoice_id)
        if for_update:
            stmt = stmt.with_for_update(of=Invoice).execution_options(populate_existing=True)
        return (await self.session.scalars(stmt)).unique().one_or_none()

    def _filtered(self, stmt: Select[Any], f: InvoiceFilter) -> Select[Any]:
        if f.client_id is not None:
            stmt = stmt.where(Invoice.client_id == f.client_id)
        if f.sent_only:
            stmt = stmt.where(Invoice.invoice_number.is_not(None))
        if f.statuses:
            stmt = stmt.where(Invoice.status.in_(f.statuses))
        if f.project_id:
            stmt = stmt.where(Invoice.project_id == f.project_id)
        if f.number:
            # The search text is literal: `%`, `_` and `\` match themselves (`?number=%` matched every invoice).
            stmt = stmt.where(Invoice.invoice_number.ilike(f"%{like_escape(f.number)}%", escape="\\"))
        if f.due_before:
            stmt = stmt.where(Invoice.due_date <= f.due_before)
        if f.due_after:
            stmt = stmt.where(Invoice.due_date >= f.due_after)
        if f.issued_from:
            stmt = stmt.where(Invoice.issue_date >= f.issued_from)
        if f.issued_to:
            stmt = stmt.where(Invoice.issue_date <= f.issued_to)
        return stmt

    async def search(self, f: InvoiceFilter, *, sort: str, page: PageRequest) -> PageResult[Invoice]:
        """One page of the invoices matching `f`, in `sort` order, with the total (the filters are
        served by the client/created and status/due indexes)."""
        return await paginate(self.session, self._filtered(select(Invoice), f), order=invoice_order(sort),
                              page=page, scope=f.scope(sort), with_total=True)

    async def next_number(self, year: int) -> int:
        """Take the next number of `year`. The counter row stays locked until this transaction ends,
        so concurrent senders queue here and a rollback gives the number back: no gaps, no repeats."""
        value = await self.session.scalar(_TAKE_NUMBER, {"year": year})
        assert value is not None
        return int(value)

    async def past_due_ids(
        self, as_of: date, statuses: Sequence[InvoiceStatus], limit: int, *, skip_locked: bool
    ) -> list[uuid.UUID]:
        """Lock and return open invoices due before `as_of`, oldest due date first (always the same
        order, so two scans that wait for each other's locks cannot deadlock). `skip_locked`: leave
        rows another transaction holds to it instead of waiting for them."""
        stmt = (
            select(Invoice.id)
            .where(Invoice.status.in_(statuses), Invoice.due_date < as_of)
            .order_by(Invoice.due_date, Invoice.id)
            .limit(limit)
            .with_for_update(skip_locked=skip_locked)
        )
        return list((await self.session.scalars(stmt)).all())

    async def add_payment(self, entry: InvoicePayment) -> bool:
        """Insert a ledger entry; False when this payment id was already applied."""
        result = await self.session.execute(_ADD_PAYMENT, {key: getattr(entry, key) for key in _PAYMENT_INSERTED})
        return result.first() is not None

    async def payments(self, invoice_id: uuid.UUID, page: PageRequest) -> PageResult[InvoicePayment]:
        """The invoice's ledger, oldest first."""
        stmt = select(InvoicePayment).where(InvoicePayment.invoice_id == invoice_id)
        order = [SortKey(InvoicePayment.paid_at), SortKey(InvoicePayment.id)]
        return await paginate(self.session, stmt, order=order, page=page, with_total=True,
                              scope=f"invoice-payments:{invoice_id}")


# The statements of the create and send paths, built once: building one per call cost about as much
# CPU as running it (python -m bench.invoice_cpu).
_GET_INVOICE = select(Invoice).where(Invoice.id == bindparam("id"))
# Lock only the invoice row (the joined client is read, not locked), and take the row as it is once
# the lock is ours: an instance read earlier in this unit of work may be stale.
_GET_INVOICE_FOR_UPDATE = (_GET_INVOICE.options(joinedload(Invoice.items)).with_for_update(of=Invoice)
                           .execution_options(populate_existing=True))
_CLIENT_REF = select(Client.id, Client.name, Client.email, Client.currency).where(Client.id == bindparam("id"))
# Every column but the server-side timestamps, which the INSERT returns.
_INVOICE_INSERTED = tuple(c.key for c in Invoice.__table__.columns if c.key not in ("created_at", "updated_at"))
_INSERT_INVOICE = Invoice.__table__.insert().returning(Invoice.__table__.c.created_at, Invoice.__table__.c.updated_at)
_ITEM_INSERTED = tuple(c.key for c in InvoiceItem.__table__.columns if c.key != "invoice_id")
# Built once (per event it was 14% of the payment consumer's samples); the ledger id and recorded_at
# are the server's.
_PAYMENT_INSERTED = tuple(c.key for c in InvoicePayment.__table__.columns if c.key not in ("id", "recorded_at"))
_ADD_PAYMENT = insert(InvoicePayment).on_conflict_do_nothing().returning(InvoicePayment.id)
_INSERT_ITEMS = InvoiceItem.__table__.insert()

# One round trip: the year's first number creates its row, every other one bumps it under the row
# lock (ON CONFLICT DO UPDATE waits for a concurrent sender's transaction like the UPDATE did).
_TAKE_NUMBER = (
    insert(NumberCounter)
    .values(year=bindparam("year", type_=Integer), last_value=1)
    .on_conflict_do_update(index_elements=[NumberCounter.year],
                           set_={"last_value": NumberCounter.last_value + 1})
    .returning(NumberCounter.last_value)
)

# Key of the transaction-scoped advisory lock that serializes template saves across replicas.
TEMPLATE_LOCK_KEY = zlib.crc32(b"invoice:invoice_templates")


@dataclass(frozen=True)
class TemplateHead:
    """The current template version and the one default the send path needs (no logo bytes)."""

    version: int
    default_net_days: int | None


# Read by every send.
_TEMPLATE_HEAD = (
    select(InvoiceTemplate.version, InvoiceTemplate.settings["defaultNetDays"].as_integer())
    .order_by(InvoiceTemplate.version.desc())
    .limit(1)
)


class TemplateRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def lock(self) -> None:
        """Held until the transaction ends: concurrent saves (any replica) take turns, so each one
        derives its version from the one before it and `max(version) + 1` cannot collide."""
        await self.session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": TEMPLATE_LOCK_KEY})

    async def latest_version(self) -> int:
        """0 when no template was ever saved (the built-in defaults)."""
        value = await self.session.scalar(select(func.max(InvoiceTemplate.version)))
        return int(value or 0)

    async def head(self) -> TemplateHead | None:
        row = (await self.session.execute(_TEMPLATE_HEAD)).first()
        return None if row is None else TemplateHead(version=row[0], default_net_days=row[1])

    async def get(self, version: int) -> InvoiceTemplate | None:
        return await self.session.get(InvoiceTemplate, version)

    async def add(self, row: InvoiceTemplate) -> InvoiceTemplate:
        self.session.add(row)
        await self.session.flush()
        return row


class PdfCacheRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, invoice_id: uuid.UUID, fingerprint: str) -> bytes | None:
        return await self.session.scalar(
            select(InvoicePdf.pdf).where(InvoicePdf.invoice_id == invoice_id, InvoicePdf.fingerprint == fingerprint)
        )

    async def put(self, invoice_id: uuid.UUID, fingerprint: str, pdf: bytes) -> None:
        """Keep only the latest rendering of each invoice."""
        values: dict[str, Any] = {"invoice_id": invoice_id, "fingerprint": fingerprint, "pdf": pdf}
        stmt = insert(InvoicePdf).values(**values)
        stmt = stmt.on_conflict_do_update(
            index_elements=[InvoicePdf.invoice_id],
            set_={"fingerprint": stmt.excluded.fingerprint, "pdf": stmt.excluded.pdf, "created_at": func.now()},
            where=InvoicePdf.fingerprint != stmt.excluded.fingerprint,
        )
        await self.session.execute(stmt)
