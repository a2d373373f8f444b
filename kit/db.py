"""Async SQLAlchemy engine and a unit of work that rolls back unless committed.

One place commits: `async with db.transaction() as uow:` commits when the block ends normally and
rolls back when it raises. HTTP handlers get it through `kit.web.RequestUnitOfWork`; consumers and
workers open it themselves. Domain code never calls `commit()`.

The unit of work also carries the transactional outbox: events added with `publish()` are written
in the same transaction as the change they describe, and a NOTIFY wakes the relay after commit.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from functools import cache
from types import TracebackType
from typing import Any, Self

from sqlalchemy import BigInteger, DateTime, Identity, Index, LargeBinary, String, Table, func, text
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Mapped, declared_attr, mapped_column
from sqlalchemy.sql.dml import ReturningInsert
from sqlalchemy.sql.elements import TextClause

from contracts.envelope import CONTENT_TYPE, CloudEvent
from kit import tracing

OUTBOX_CHANNEL = "outbox"


class OutboxMixin:
    """Events waiting for (or already through) the relay. Mixed into each service's own Base."""

    __tablename__ = "outbox"

    @declared_attr.directive
    def __table_args__(cls) -> tuple[Any, ...]:
        return (Index("ix_outbox_unpublished", "id", postgresql_where=text("published_at IS NULL")),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(64), unique=True)
    event_type: Mapped[str] = mapped_column(String(100))
    topic: Mapped[str] = mapped_column(String(200))
    key: Mapped[str] = mapped_column(String(200))
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    headers: Mapped[dict[str, str]] = mapped_column(JSONB, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class InboxMixin:
    """Ids of events a consumer has applied; written in the same transaction as the effect."""

    __tablename__ = "inbox"

    event_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    consumer: Mapped[str] = mapped_column(String(100), primary_key=True)
    event_type: Mapped[str] = mapped_column(String(100))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Database:
    def __init__(
        self,
        url: str,
        *,
        outbox_model: type[OutboxMixin] | None = None,
        inbox_model: type[InboxMixin] | None = None,
        idempotency_model: type[Any] | None = None,
        pool_size: int = 10,
    ) -> None:
        self.url = url
        # No pre-ping: it cost three round trips (BEGIN; SELECT; ROLLBACK) on every checkout, 4-8% of a
        # service's CPU under load (bench.profile). After a PostgreSQL restart the first statement on a
        # stale connection fails as a disconnect, SQLAlchemy then invalidates the whole pool, and that
        # one request is a 503 the caller retries (kit.errors); consumers and workers retry anyway.
        self.engine = create_async_engine(url, pool_size=pool_size, max_overflow=pool_size)
        tracing.instrument_engine(self.engine)
        self.sessionmaker = async_sessionmaker(self.engine, expire_on_commit=False)
        self.outbox_model = outbox_model
        self.inbox_model = inbox_model
        # kit.idempotency.IdempotencyMixin subclass, for services whose routes declare `Idempotent`.
        self.idempotency_model = idempotency_model

    def unit_of_work(self) -> UnitOfWork:
        return UnitOfWork(self)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[UnitOfWork]:
        """A unit of work that commits when the block returns and rolls back when it raises."""
        async with self.unit_of_work() as uow:
            yield uow
            if not uow.committed:
                await uow.commit()

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        await self.engine.dispose()


class UnitOfWork:
    """`async with db.unit_of_work() as uow: ...; await uow.commit()`; anything else rolls back."""

    session: AsyncSession

    def __init__(self, db: Database) -> None:
        self._db = db
        self._pending_events = 0
        self.committed = False

    async def __aenter__(self) -> Self:
        self.session = self._db.sessionmaker()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if not self.committed:
                await self.session.rollback()
        finally:
            await self.session.close()

    def publish(self, event: CloudEvent, *, topic: str, key: str) -> None:
        """Stage an event; it is stored with the change and relayed to Kafka after commit."""
        if self._db.outbox_model is None:
            raise RuntimeError("this service has no outbox table")
        headers = {"content-type": CONTENT_TYPE, "ce_type": event.type}
        if event.correlationid:
            headers["correlation_id"] = event.correlationid
        tracing.inject(headers)  # the relay's send, and so the consumers, continue the current trace
        row = self._db.outbox_model()  # a mixin's columns are set as attributes: typed, checked by mypy
        row.event_id = event.id
        row.event_type = event.type
        row.topic = topic
        row.key = key
        row.payload = event.to_bytes()
        row.headers = headers
        self.session.add(row)
        self._pending_events += 1

    async def claim_event(self, event_id: str, event_type: str, consumer: str) -> bool:
        """Record that `consumer` handles `event_id`; False when it was already handled."""
        if self._db.inbox_model is None:
            raise RuntimeError("this service has no inbox table")
        stmt = _claim(self._db.inbox_model.__table__)  # type: ignore[attr-defined]
        params = {"event_id": event_id, "consumer": consumer, "event_type": event_type}
        return (await self.session.execute(stmt, params)).first() is not None

    async def claim_events(self, events: Sequence[tuple[str, str]], consumer: str) -> set[str]:
        """claim_event for many (event id, type) pairs in one statement; the ids not handled before."""
        if self._db.inbox_model is None:
            raise RuntimeError("this service has no inbox table")
        if not events:
            return set()
        stmt = _claim_many(self._db.inbox_model.__table__)  # type: ignore[attr-defined]
        params = {"ids": [e[0] for e in events], "types": [e[1] for e in events], "consumer": consumer}
        return {row[0] for row in await self.session.execute(stmt, params)}

    async def commit(self) -> None:
        if self._pending_events:
            await self.session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": OUTBOX_CHANNEL})
        await self.session.commit()
        self.committed = True
        self._pending_events = 0


def new_id() -> uuid.UUID:
    return uuid.uuid4()


@cache
def _claim_many(table: Table) -> TextClause:
    return text(
        f"INSERT INTO {table.name} (event_id, consumer, event_type) "  # noqa: S608 - our own table's name
        "SELECT unnest(CAST(:ids AS varchar[])), :consumer, unnest(CAST(:types AS varchar[])) "
        "ON CONFLICT DO NOTHING RETURNING event_id"
    )


@cache
def _claim(table: Table) -> ReturningInsert[Any]:
    # Built once, values bound at execution (building it per event cost ~3% of a consumer's CPU).
    return insert(table).on_conflict_do_nothing().returning(table.c.event_id)
