"""Data access for the invoice service. Knows SQL, not business rules."""

from __future__ import annotations

import uuid
import zlib
from dataclasses import dataclass
from datetime import date
from typing import Any

from sqlalchemy import Select, func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from services.invoice.models import Client, Invoice, InvoicePayment, InvoicePdf, InvoiceTemplate, NumberCounter

SORT_COLUMNS = {
    "createdAt": Invoice.created_at,
    "issueDate": Invoice.issue_date,
    "dueDate": Invoice.due_date,
    "total": Invoice.total,
    "invoiceNumber": Invoice.invoice_number,
    "status": Invoice.status,
}


@dataclass(frozen=True)
class InvoiceFilter:
    client_id: uuid.UUID | None = None
    statuses: tuple[str, ...] = ()
    project_id: str | None = None
    number: str | None = None
    due_before: date | None = None
    due_after: date | None = None
    issued_from: date | None = None
    issued_to: date | None = None
    sent_only: bool = False  # only invoices that have left DRAFT (they carry a number)


class ClientRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, client_id: uuid.UUID) -> Client | None:
        return await self.session.get(Client, client_id)

    async def list(self, only: uuid.UUID | None = None, limit: int = 100, offset: int = 0) -> list[Client]:
        stmt = select(Client).order_by(Client.created_at.desc()).limit(limit).offset(offset)
        if only is not None:
            stmt = stmt.where(Client.id == only)
        return list((await self.session.scalars(stmt)).all())

    def add(self, client: Client) -> None:
        self.session.add(client)


class InvoiceRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    def add(self, invoice: Invoice) -> None:
        self.session.add(invoice)

    async def get(self, invoice_id: uuid.UUID, *, for_update: bool = False) -> Invoice | None:
        stmt = select(Invoice).where(Invoice.id == invoice_id)
        if for_update:
            # Lock only the invoice row (the joined client is read, not locked).
            stmt = stmt.with_for_update(of=Invoice)
        return (await self.session.scalars(stmt)).unique().one_or_none()

    def _filtered(self, stmt: Select, f: InvoiceFilter) -> Select:  # type: ignore[type-arg]
        if f.client_id is not None:
            stmt = stmt.where(Invoice.client_id == f.client_id)
        if f.sent_only:
            stmt = stmt.where(Invoice.invoice_number.is_not(None))
        if f.statuses:
            stmt = stmt.where(Invoice.status.in_(f.statuses))
        if f.project_id:
            stmt = stmt.where(Invoice.project_id == f.project_id)
        if f.number:
            stmt = stmt.where(Invoice.invoice_number.ilike(f"%{f.number}%"))
        if f.due_before:
            stmt = stmt.where(Invoice.due_date <= f.due_before)
        if f.due_after:
            stmt = stmt.where(Invoice.due_date >= f.due_after)
        if f.issued_from:
            stmt = stmt.where(Invoice.issue_date >= f.issued_from)
        if f.issued_to:
            stmt = stmt.where(Invoice.issue_date <= f.issued_to)
        return stmt

    async def search(self, f: InvoiceFilter, *, sort: str, limit: int, offset: int) -> tuple[list[Invoice], int]:
        descending = sort.startswith("-")
        column = SORT_COLUMNS[sort.lstrip("-")]
        order = column.desc().nulls_last() if descending else column.asc().nulls_last()
        stmt = self._filtered(select(Invoice), f).order_by(order, Invoice.id).limit(limit).offset(offset)
        rows = list((await self.session.scalars(stmt)).unique().all())
        total = await self.session.scalar(self._filtered(select(func.count(Invoice.id)), f))
        return rows, int(total or 0)

    async def next_number(self, year: int) -> int:
        """Take the next number of `year`. The counter row stays locked until this transaction ends,
        so concurrent senders queue here and a rollback gives the number back: no gaps, no repeats."""
        await self.session.execute(
            insert(NumberCounter).values(year=year, last_value=0).on_conflict_do_nothing()
        )
        value = await self.session.scalar(
            update(NumberCounter)
            .where(NumberCounter.year == year)
            .values(last_value=NumberCounter.last_value + 1)
            .returning(NumberCounter.last_value)
        )
        assert value is not None
        return value

    async def past_due_ids(self, as_of: date, statuses: tuple[str, ...], limit: int) -> list[uuid.UUID]:
        stmt = (
            select(Invoice.id)
            .where(Invoice.status.in_(statuses), Invoice.due_date < as_of)
            .order_by(Invoice.due_date)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return list((await self.session.scalars(stmt)).all())

    async def add_payment(self, entry: InvoicePayment) -> bool:
        """Insert a ledger entry; False when this payment id was already applied."""
        values = {c.name: getattr(entry, c.key) for c in InvoicePayment.__table__.columns if c.key != "id"}
        values = {k: v for k, v in values.items() if v is not None}
        result = await self.session.execute(
            insert(InvoicePayment).values(**values).on_conflict_do_nothing().returning(InvoicePayment.id)
        )
        return result.first() is not None

    async def payments(self, invoice_id: uuid.UUID) -> list[InvoicePayment]:
        stmt = (
            select(InvoicePayment)
            .where(InvoicePayment.invoice_id == invoice_id)
            .order_by(InvoicePayment.paid_at, InvoicePayment.id)
        )
        return list((await self.session.scalars(stmt)).all())


# Key of the transaction-scoped advisory lock that serializes template saves across replicas.
TEMPLATE_LOCK_KEY = zlib.crc32(b"invoice:invoice_templates")


@dataclass(frozen=True)
class TemplateHead:
    """The current template version and the one default the send path needs (no logo bytes)."""

    version: int
    default_net_days: int | None


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
        row = (
            await self.session.execute(
                select(InvoiceTemplate.version, InvoiceTemplate.settings["defaultNetDays"].as_integer())
                .order_by(InvoiceTemplate.version.desc())
                .limit(1)
            )
        ).first()
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
