"""Values the database cannot take are refused at the edge (issue 12, defect 6): forged cursors
against real PostgreSQL (a 400, never a driver error), and the kit's bounded types."""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from enum import StrEnum
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError
from sqlalchemy import BigInteger, DateTime, Enum, Numeric, String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from kit.db import Database
from kit.pagination import InvalidCursor, PageRequest, SortKey, encode_cursor, paginate
from kit.web import CalendarDate, Int64, UtcDateTime

SCOPE = "hostile"


class Base(DeclarativeBase):
    pass


class Colour(StrEnum):
    RED = "red"
    BLUE = "blue"


class Thing(Base):
    __tablename__ = "things"
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    n: Mapped[int] = mapped_column(BigInteger)
    price: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    label: Mapped[str] = mapped_column(String(20))
    colour: Mapped[Colour] = mapped_column(Enum(Colour, native_enum=False, length=10))


ORDERS: dict[str, list[SortKey]] = {
    "at": [SortKey(Thing.at), SortKey(Thing.id)],
    "n": [SortKey(Thing.n), SortKey(Thing.id)],
    "price": [SortKey(Thing.price), SortKey(Thing.id)],
    "label": [SortKey(Thing.label), SortKey(Thing.id)],
    "colour": [SortKey(Thing.colour), SortKey(Thing.id)],
}


@pytest.fixture(scope="module")
async def db(database_url_factory: Callable[[str], str]) -> AsyncIterator[Database]:
    database = Database(database_url_factory("kithostile"), pool_size=2)
    async with database.engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    async with database.transaction() as uow:
        for i in range(5):
            uow.session.add(Thing(id=uuid.uuid4(), at=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(days=i), n=i,
                                  price=Decimal(i), label=f"l{i}", colour=Colour.RED if i % 2 else Colour.BLUE))
    yield database
    await database.dispose()


async def _page(db: Database, sort: str, cursor: str | None) -> Any:
    async with db.transaction() as uow:
        return await paginate(uow.session, select(Thing), order=ORDERS[sort], page=PageRequest(2, cursor),
                              scope=SCOPE)


@pytest.mark.parametrize("sort", sorted(ORDERS))
async def test_genuine_cursors_still_work(db: Database, sort: str) -> None:
    first = await _page(db, sort, None)
    second = await _page(db, sort, first.next_cursor)
    assert len(second.items) == 2 and {t.id for t in first.items}.isdisjoint({t.id for t in second.items})


FORGED: list[tuple[str, list[Any]]] = [
    ("n", [2**63, uuid.uuid4()]),  # past BIGINT: asyncpg cannot bind it
    ("n", [-(2**63) - 1, uuid.uuid4()]),  # forged with json (orjson, like the kit, stops at 64 bits)
    ("at", [datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=14))), uuid.uuid4()]),  # before year 1 in UTC
    ("at", [datetime(9999, 12, 31, 23, 59, tzinfo=timezone(timedelta(hours=-14))), uuid.uuid4()]),
    ("at", [datetime(2026, 1, 1), uuid.uuid4()]),  # naive, for a timestamptz column
    ("at", [5, uuid.uuid4()]),  # a number for a timestamp
    ("n", ["five", uuid.uuid4()]),  # text for a number
    ("label", ["a\x00b", uuid.uuid4()]),  # PostgreSQL text cannot hold NUL
    ("price", [Decimal("NaN"), uuid.uuid4()]),
    ("price", [Decimal("1e999999"), uuid.uuid4()]),
    ("label", [True, uuid.uuid4()]),
    ("colour", [7, uuid.uuid4()]),
    ("at", [datetime(2026, 1, 1, tzinfo=UTC), "not-a-uuid-but-text"]),
]


@pytest.mark.parametrize(("sort", "values"), FORGED, ids=[f"{s}-{i}" for i, (s, _) in enumerate(FORGED)])
async def test_forged_cursor_is_invalid_cursor_not_a_driver_error(db: Database, sort: str, values: list[Any]) -> None:
    with pytest.raises(InvalidCursor):
        await _page(db, sort, _forge(values))


def _forge(values: list[Any]) -> str:
    """A cursor as a client could write one: the scope's digest is sha256, no secret."""
    try:
        return encode_cursor(values, SCOPE)
    except TypeError:  # an int orjson refuses to write
        tagged = [["i", v] if isinstance(v, int) else ["u", str(v)] for v in values]
        raw = json.dumps({"s": hashlib.sha256(SCOPE.encode()).hexdigest()[:12], "v": tagged}).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class Body(BaseModel):
    n: Int64 | None = None
    day: CalendarDate | None = None
    at: UtcDateTime | None = None


@pytest.mark.parametrize("data", [
    {"n": 2**63}, {"n": -(2**63) - 1},
    {"day": "0001-01-01"}, {"day": "9999-12-31"}, {"day": "1969-12-31"}, {"day": "2101-01-01"},
    {"at": "0001-01-01T00:00:00+14:00"}, {"at": "9999-12-31T23:59:59-14:00"},
])
def test_bounded_types_refuse(data: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Body.model_validate(data)


def test_bounded_types_accept() -> None:
    body = Body.model_validate({"n": 2**63 - 1, "day": "2100-12-31", "at": "2026-03-01T10:00:00+02:00"})
    assert body.n == 2**63 - 1 and body.day == date(2100, 12, 31)
    assert body.at == datetime(2026, 3, 1, 8, tzinfo=UTC) and body.at.tzinfo is UTC
    assert Body.model_validate({"at": "2026-03-01T10:00:00"}).at == datetime(2026, 3, 1, 10, tzinfo=UTC)
