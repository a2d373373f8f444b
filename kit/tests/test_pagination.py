"""kit.pagination against real PostgreSQL: every row exactly once across pages, in order, for
ascending, descending and nullable sort keys; cursors that are tampered with or reused under
another sort are a 400."""

from __future__ import annotations

import itertools
import random
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import date, timedelta

import pytest
from sqlalchemy import Date, Integer, String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from kit.db import Database
from kit.pagination import InvalidCursor, PageRequest, SortKey, decode_cursor, encode_cursor, paginate


class Base(DeclarativeBase):
    pass


class Row(Base):
    __tablename__ = "rows"
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    amount: Mapped[int] = mapped_column(Integer)
    due: Mapped[date | None] = mapped_column(Date, nullable=True)
    label: Mapped[str | None] = mapped_column(String(20), nullable=True)


@pytest.fixture(scope="module")
async def db(database_url_factory: Callable[[str], str]) -> AsyncIterator[Database]:
    database = Database(database_url_factory("kitpage"), pool_size=2)
    async with database.engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    rnd = random.Random(7)
    async with database.transaction() as uow:
        for _ in range(137):  # many ties on amount and due, a third without a due date
            uow.session.add(Row(id=uuid.uuid4(), amount=rnd.randint(1, 5),
                                due=None if rnd.random() < 0.33 else date(2026, 1, 1) + timedelta(rnd.randint(0, 4)),
                                label=rnd.choice([None, "a", "b"])))
    yield database
    await database.dispose()


async def _walk(db: Database, order: list[SortKey], limit: int, scope: str) -> list[Row]:
    seen: list[Row] = []
    cursor = None
    for _ in range(1000):
        async with db.transaction() as uow:
            page = await paginate(uow.session, select(Row), order=order, page=PageRequest(limit, cursor),
                                  scope=scope, with_total=True)
        assert page.total == 137
        assert len(page.items) <= limit
        seen += page.items
        if not page.has_more:
            assert page.next_cursor is None
            return seen
        assert page.next_cursor and len(page.items) == limit
        cursor = page.next_cursor
    raise AssertionError("pagination did not end")


@pytest.mark.parametrize(("due_desc", "amount_desc", "limit"),
                         list(itertools.product([False, True], [False, True], [1, 7, 20, 100])))
async def test_every_row_once_in_order(db: Database, due_desc: bool, amount_desc: bool, limit: int) -> None:
    order = [SortKey(Row.due, descending=due_desc, nullable=True),
             SortKey(Row.amount, descending=amount_desc), SortKey(Row.id, descending=True)]
    rows = await _walk(db, order, limit, scope=f"t:{due_desc}:{amount_desc}")
    assert len(rows) == 137 and len({r.id for r in rows}) == 137
    with_due = [r for r in rows if r.due is not None]
    assert rows[: len(with_due)] == with_due, "NULL due dates come last"
    dues = [r.due for r in with_due]
    assert dues == sorted(dues, reverse=due_desc)  # type: ignore[type-var]
    for (_, group) in itertools.groupby(rows, key=lambda r: r.due):
        amounts = [r.amount for r in group]
        assert amounts == sorted(amounts, reverse=amount_desc)


async def test_nullable_string_key(db: Database) -> None:
    rows = await _walk(db, [SortKey(Row.label, nullable=True), SortKey(Row.id)], 9, scope="label")
    labels = [r.label for r in rows]
    assert labels == sorted(labels, key=lambda v: (v is None, v or ""))
    assert len({r.id for r in rows}) == 137


async def test_cursor_of_another_scope_is_refused(db: Database) -> None:
    order = [SortKey(Row.amount), SortKey(Row.id)]
    async with db.unit_of_work() as uow:
        first = await paginate(uow.session, select(Row), order=order, page=PageRequest(5), scope="by-amount")
        assert first.next_cursor
        with pytest.raises(InvalidCursor):
            await paginate(uow.session, select(Row), order=order, page=PageRequest(5, first.next_cursor),
                           scope="by-due")


@pytest.mark.parametrize("cursor", ["", "abc", "e30", "!!!!", encode_cursor([1], "s") + "x"])
def test_tampered_cursors_are_invalid(cursor: str) -> None:
    with pytest.raises(InvalidCursor):
        decode_cursor(cursor or "@", "s", size=2)


def test_cursor_round_trip_of_every_type() -> None:
    values = [None, True, 2**62, "x'y", date(2026, 2, 28), uuid.UUID(int=5)]
    assert decode_cursor(encode_cursor(values, "s"), "s") == values
