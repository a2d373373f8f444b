"""Data access for the invoice service. Knows SQL, not business rules."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date

from sqlalchemy import Select, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from services.invoice.models import Client, Invoice, InvoicePayment, NumberCounter

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
