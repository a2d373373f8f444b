"""kit.replica: a local copy takes a snapshot only when it is strictly newer (real PostgreSQL)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from sqlalchemy import DateTime, Integer, String, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from kit.db import Database
from kit.replica import upsert_if_newer


class Base(DeclarativeBase):
    pass


class Copy(Base):
    __tablename__ = "copies"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


async def test_only_a_strictly_newer_version_replaces_the_copy(database_url_factory: Callable[[str], str]) -> None:
    db = Database(database_url_factory("kitreplica"), pool_size=2)
    async with db.engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    try:
        async def store(version: int, status: str) -> bool:
            async with db.transaction() as uow:
                return await upsert_if_newer(uow.session, Copy, {"id": "inv-1", "version": version, "status": status})

        assert await store(2, "SENT") is True  # first copy
        assert await store(2, "SENT") is False  # redelivery of the same version: nothing to do
        assert await store(1, "DRAFT") is False  # older, out of order: never moves back
        assert await store(4, "PAID") is True
        assert await store(3, "PARTIAL") is False
        async with db.unit_of_work() as uow:
            copy = await uow.session.get(Copy, "inv-1")
            assert copy is not None and (copy.version, copy.status) == (4, "PAID")
    finally:
        await db.dispose()
