"""One list convention: `?limit=` (1–100, default 20) and an opaque `?cursor=`, answered with
`{items, nextCursor, hasMore}` (plus `total` where it is cheap).

Keyset pagination: the cursor holds the sort values of the last row returned, so page 5,000 costs
what page 1 costs and rows inserted meanwhile neither repeat nor go missing. The last sort key must
be unique (the primary key) so the order is total. NULLs always sort last, in both directions.

    order = [SortKey(Invoice.due_date, descending=True, nullable=True), SortKey(Invoice.id, descending=True)]
    page = await paginate(session, select(Invoice).where(...), order=order, page=params, scope="invoices:-dueDate")
    return Page[InvoiceOut](items=[...page.items], next_cursor=page.next_cursor, has_more=page.has_more)
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Generic, TypeVar

import orjson
from fastapi import Depends, Query
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from sqlalchemy import ColumnElement, Select, and_, false, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import QueryableAttribute

from kit.errors import AppError

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
T = TypeVar("T")


class InvalidCursor(AppError):
    status_code = 400
    code = "invalid_cursor"


class Page(BaseModel, Generic[T]):
    """The body of every list endpoint."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    items: list[T]
    next_cursor: str | None = Field(default=None, description="Pass as `cursor` for the next page; null at the end.")
    has_more: bool = False
    total: int | None = Field(default=None, description="Rows matching the filters, where cheap to count.")


@dataclass(frozen=True)
class PageRequest:
    limit: int = DEFAULT_LIMIT
    cursor: str | None = None


def page_request(
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Items per page (1–100).")] = DEFAULT_LIMIT,
    cursor: Annotated[str | None, Query(max_length=2000, pattern=r"^[A-Za-z0-9_\-]*$",
                                        description="`nextCursor` of the previous page.")] = None,
) -> PageRequest:
    return PageRequest(limit=limit, cursor=cursor or None)


PageParams = Annotated[PageRequest, Depends(page_request)]


@dataclass(frozen=True)
class SortKey:
    column: ColumnElement[Any] | QueryableAttribute[Any]
    descending: bool = False
    nullable: bool = False


@dataclass(frozen=True)
class PageResult(Generic[T]):
    items: list[T]
    next_cursor: str | None
    has_more: bool
    total: int | None = None


# A cursor value is [tag, text]; the tag says how to read the text back.
_ENCODERS: list[tuple[type, str, Callable[[Any], Any]]] = [
    (bool, "b", lambda v: bool(v)),
    (int, "i", lambda v: int(v)),
    (datetime, "t", lambda v: v.isoformat()),
    (date, "d", lambda v: v.isoformat()),
    (uuid.UUID, "u", str),
    (Decimal, "m", str),
    (str, "s", str),
]
_DECODERS: dict[str, Callable[[Any], Any]] = {
    "b": lambda v: _typed(v, bool),
    "i": lambda v: _int64(_typed(v, int)),
    "t": lambda v: _instant(datetime.fromisoformat(_typed(v, str))),
    "d": lambda v: date.fromisoformat(_typed(v, str)),
    "u": lambda v: uuid.UUID(_typed(v, str)),
    "m": lambda v: _finite(Decimal(_typed(v, str))),
    "s": lambda v: _text(_typed(v, str)),
}


def _typed(value: Any, kind: type) -> Any:
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"expected {kind.__name__}")
    return value


# A cursor is the client's to forge: its values are bound as query parameters, so each must be one
# the database accepts (else a 500 instead of the 400 below).
def _int64(value: int) -> int:
    if not -(2**63) <= value < 2**63:
        raise ValueError("integer out of range")
    return value


def _instant(value: datetime) -> datetime:
    if value.tzinfo is not None:
        value.astimezone(UTC)  # OverflowError past year 1 or 9999 in UTC
    return value


def _finite(value: Decimal) -> Decimal:
    if not value.is_finite() or abs(value.adjusted()) > 1000:
        raise ValueError("number out of range")
    return value


def _text(value: str) -> str:
    if "\x00" in value:
        raise ValueError("NUL character")
    return value


def _encode_value(value: Any) -> list[Any]:
    if value is None:
        return ["n", None]
    for kind, tag, encode in _ENCODERS:
        if isinstance(value, kind):
            return [tag, encode(value)]
    raise TypeError(f"cannot put a {type(value).__name__} in a cursor")


def _decode_value(raw: Any) -> Any:
    if not (isinstance(raw, list) and len(raw) == 2 and isinstance(raw[0], str)):
        raise ValueError("malformed value")
    tag, value = raw
    if tag == "n":
        return None
    decode = _DECODERS.get(tag)
    if decode is None:
        raise ValueError("unknown value tag")
    return decode(value)


def _scope_digest(scope: str) -> str:
    return hashlib.sha256(scope.encode()).hexdigest()[:12]


def encode_cursor(values: Sequence[Any], scope: str = "") -> str:
    raw = orjson.dumps({"s": _scope_digest(scope), "v": [_encode_value(v) for v in values]})
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_cursor(cursor: str, scope: str = "", *, size: int | None = None) -> list[Any]:
    """The sort values in `cursor`; 400 when it is malformed or belongs to another list or sort."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = orjson.loads(raw)
        if not isinstance(data, dict) or not isinstance(data.get("v"), list):
            raise ValueError("malformed cursor")
        if data.get("s") != _scope_digest(scope):
            raise InvalidCursor("This cursor belongs to another list, sort or filter: start again without it.")
        values = [_decode_value(v) for v in data["v"]]
    except InvalidCursor:
        raise
    except (ValueError, TypeError, OverflowError, binascii.Error, InvalidOperation, orjson.JSONDecodeError):
        raise InvalidCursor("The cursor is not valid: pass the `nextCursor` of a previous page unchanged.") from None
    if size is not None and len(values) != size:
        raise InvalidCursor("The cursor is not valid: pass the `nextCursor` of a previous page unchanged.")
    return values


@dataclass(frozen=True)
class _Element:
    expr: ColumnElement[Any]
    descending: bool
    is_null_flag: bool  # the `column IS NULL` element placed before a nullable column


def _elements(order: Sequence[SortKey]) -> list[_Element]:
    out: list[_Element] = []
    for key in order:
        column: ColumnElement[Any] = key.column.expression if isinstance(key.column, QueryableAttribute) else key.column
        if key.nullable:
            out.append(_Element(column.is_(None), False, True))
        out.append(_Element(column, key.descending, False))
    return out


def _after(elements: Sequence[_Element], values: Sequence[Any]) -> ColumnElement[bool]:
    """Rows strictly after the row whose sort values are `values`, in the order of `elements`."""
    clauses: list[ColumnElement[bool]] = []
    equal: list[ColumnElement[bool]] = []
    for element, value in zip(elements, values, strict=True):
        if element.is_null_flag:
            # false < true: a row with a value comes before the NULLs.
            greater = element.expr if value is False else false()
            same = element.expr if value is True else ~element.expr
        elif value is None:
            greater, same = false(), element.expr.is_(None)
        else:
            greater = element.expr < value if element.descending else element.expr > value
            same = element.expr == value
        clauses.append(and_(*equal, greater) if equal else greater)
        equal.append(same)
    return or_(*clauses)


def _check_types(elements: Sequence[_Element], values: Sequence[Any]) -> None:
    """Each cursor value must fit its sort column: a forged cursor (the digest of a scope is no
    secret) with, say, a number for a timestamp would otherwise fail in the driver, a 500."""
    for element, value in zip(elements, values, strict=True):
        if value is None:
            continue
        if element.is_null_flag:
            expected: type = bool
        else:
            try:
                expected = element.expr.type.python_type
            except NotImplementedError:
                continue
        if issubclass(expected, (str, enum.Enum)):
            expected = str  # an enum column's values travel as their text
        fits = isinstance(value, expected) and not (isinstance(value, bool) and expected is not bool)
        if fits and isinstance(value, datetime):
            fits = (value.tzinfo is not None) == bool(getattr(element.expr.type, "timezone", False))
        if not fits:
            raise InvalidCursor("The cursor is not valid: pass the `nextCursor` of a previous page unchanged.")


def order_by(order: Sequence[SortKey]) -> list[ColumnElement[Any]]:
    return [e.expr.desc() if e.descending else e.expr.asc() for e in _elements(order)]


async def paginate(
    session: AsyncSession,
    stmt: Select[Any],
    *,
    order: Sequence[SortKey],
    page: PageRequest,
    scope: str = "",
    with_total: bool = False,
) -> PageResult[Any]:
    """One page of the entities `stmt` selects (its first column), in `order`, after `page.cursor`.

    `scope` names the list, its sort and its filters: a cursor is refused under another scope.
    """
    elements = _elements(order)
    total = None
    if with_total:
        total = int(await session.scalar(select(func.count()).select_from(stmt.order_by(None).subquery())) or 0)
    query = stmt.add_columns(*[e.expr for e in elements]).order_by(*order_by(order))
    if page.cursor:
        values = decode_cursor(page.cursor, scope, size=len(elements))
        _check_types(elements, values)
        query = query.where(_after(elements, values))
    rows = (await session.execute(query.limit(page.limit + 1))).all()
    has_more = len(rows) > page.limit
    rows = rows[: page.limit]
    next_cursor = None
    if has_more and rows:
        width = len(elements)
        next_cursor = encode_cursor(list(rows[-1][-width:]), scope)
    return PageResult(items=[row[0] for row in rows], next_cursor=next_cursor, has_more=has_more, total=total)
