"""HTTP machinery every service shares: the request's unit of work, strict query strings, body limits.

* One place commits: `RequestUnitOfWork` opens the request's unit of work; it commits when the handler
  returns and rolls back when it raises. Routes and services never call `commit()`.
* An unknown query parameter is a 400 naming it (a typo such as `?limt=1` must not silently return
  the default page); a NUL byte in a query value or a path segment is a 422 (PostgreSQL text cannot
  hold it).
* One body-size limit: `BodyLimit` refuses a declared or streamed body over the limit with a 413.
* Parse at the edge, within what the database and the calendar can hold: `Int64` (asyncpg cannot
  bind a larger int: a 500 otherwise), `UtcDateTime` (an offset that pushes the instant past year 1
  or 9999 cannot be stored), `CalendarDate` (a date the platform computes with: due dates + net days,
  reminders ± weeks, reports).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from datetime import UTC, date, datetime
from typing import Annotated, Any

import orjson
from fastapi import Depends, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from pydantic import AfterValidator, Field
from pydantic_core import PydanticCustomError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kit.db import Database, UnitOfWork
from kit.errors import AppError, InvalidInput, PayloadTooLarge, error_body, retry_after_headers

DEFAULT_MAX_BODY = 2 * 1024 * 1024

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
# BIGINT: what PostgreSQL stores and asyncpg binds. Add your own ge/le for the field's real range.
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]

# The days the platform stores and computes with; reporting refuses the same range.
MIN_DATE = date(1970, 1, 1)
MAX_DATE = date(2100, 12, 31)


def calendar_date(value: date) -> date:
    if not MIN_DATE <= value <= MAX_DATE:
        raise ValueError(f"must be between {MIN_DATE} and {MAX_DATE}")
    return value


def utc_datetime(value: datetime) -> datetime:
    """The same instant in UTC (a naive value is read as UTC); refused when UTC cannot hold it,
    e.g. `0001-01-01T00:00:00+14:00` or `9999-12-31T23:59:59-14:00`."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("date and time out of range once converted to UTC") from None


def one_line(value: str) -> str:
    """Text that ends up in an email header or a one-line display (a name, a link): a CR/LF would
    start a header of its own, the other C0/C1 controls, DEL and U+2028/2029 break or disguise what
    the reader sees. A 422 naming the character."""
    for char in value:
        code = ord(char)
        if code < 0x20 or 0x7F <= code <= 0x9F or code in (0x2028, 0x2029):
            raise PydanticCustomError("control_character", "must not contain control characters (found U+{code})",
                                      {"code": f"{code:04X}"})
    return value


CalendarDate = Annotated[date, AfterValidator(calendar_date)]
UtcDateTime = Annotated[datetime, AfterValidator(utc_datetime)]


def request_database(request: Request) -> Database:
    return request.app.state.runtime.db  # type: ignore[no-any-return]


async def request_unit_of_work(request: Request) -> AsyncIterator[UnitOfWork]:
    """The request's unit of work: committed after the handler returns, rolled back if it raises.

    Used with `scope="function"` so the commit happens before the response is sent: a client never
    sees a 2xx for a change that then failed to commit (a failed commit is the handler's error).
    """
    async with request_database(request).transaction() as uow:
        yield uow


RequestUnitOfWork = Annotated[UnitOfWork, Depends(request_unit_of_work, scope="function")]


class UnknownQueryParameter(AppError):
    status_code = 400
    code = "unknown_query_parameter"


_allowed_cache: dict[int, frozenset[str]] = {}


def _query_names(dependant: Dependant) -> set[str]:
    names: set[str] = set()
    for param in dependant.query_params:
        model = getattr(param.field_info, "annotation", None)
        fields = getattr(model, "model_fields", None)
        if isinstance(model, type) and fields:  # a pydantic model of query parameters
            names.update(f.alias or n for n, f in fields.items())
        else:
            names.add(param.alias)
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


def _allowed_query(route: APIRoute) -> frozenset[str]:
    key = id(route)
    allowed = _allowed_cache.get(key)
    if allowed is None:
        allowed = frozenset(_query_names(route.dependant))
        _allowed_cache[key] = allowed
    return allowed


async def strict_query_params(request: Request) -> None:
    """App-wide dependency: refuse query parameters the route does not declare, and NUL bytes in
    query values and path parameters (a string id such as a checkout session's is looked up as is)."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    for name, value in request.path_params.items():
        if isinstance(value, str) and "\x00" in value:
            raise InvalidInput(f"Path parameter {name!r} must not contain NUL characters.",
                               details=[{"field": name, "message": "NUL character"}])
    if not request.query_params:
        return
    allowed = _allowed_query(route)
    unknown = sorted({name for name in request.query_params if name not in allowed})
    if unknown:
        names = ", ".join(unknown)
        accepted = ", ".join(sorted(allowed)) or "none"
        raise UnknownQueryParameter(
            f"Unknown query parameter: {names} (accepted: {accepted}).",
            details={"unknown": unknown, "accepted": sorted(allowed)},
        )
    for name, value in request.query_params.multi_items():
        if "\x00" in value or "\x00" in name:
            raise InvalidInput(f"Query parameter {name!r} must not contain NUL characters.",
                               details=[{"field": name, "message": "NUL character"}])


StrictQuery = Depends(strict_query_params)


def check_declared_length(content_length: str | None, limit: int) -> None:
    """Refuse a declared `Content-Length` over `limit` (413) or one that is not a number (400)."""
    if content_length is None or content_length == "":
        return
    if not content_length.isdigit():
        raise AppError("Invalid Content-Length header.", code="bad_request")
    if int(content_length) > limit:
        raise PayloadTooLarge(f"The request body is larger than the limit of {_size(limit)}.",
                              details={"maxBytes": limit})


async def receive_body(receive: Receive, *, limit: int, content_length: str | None = None) -> bytes:
    """Read a whole ASGI request body, refusing it (413) as soon as it passes `limit`."""
    check_declared_length(content_length, limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise AppError("The client went away before the body was complete.", code="client_disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"The request body is larger than the limit of {_size(limit)}.",
                                  details={"maxBytes": limit})
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _size(limit: int) -> str:
    if limit >= 1024 * 1024 and limit % (1024 * 1024) == 0:
        return f"{limit // (1024 * 1024)} MB"
    if limit >= 1024 and limit % 1024 == 0:
        return f"{limit // 1024} KB"
    return f"{limit} bytes"


class BodyLimit:
    """Pure ASGI: a body over the limit gets a 413 without being read into memory.

    `limits` maps a path prefix to its own limit (the longest matching prefix wins), e.g. a logo
    upload or Stripe's webhooks. A declared length over the limit is answered at once; a streamed
    body is counted as it arrives and the read fails with `PayloadTooLarge`, which the app's error
    handlers turn into the 413 error body.
    """

    def __init__(self, app: ASGIApp, *, limit: int = DEFAULT_MAX_BODY, limits: Mapping[str, int] | None = None) -> None:
        self.app = app
        self.limit = limit
        self.limits = sorted((limits or {}).items(), key=lambda item: len(item[0]), reverse=True)

    def limit_for(self, path: str) -> int:
        for prefix, limit in self.limits:
            if path.startswith(prefix):
                return limit
        return self.limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"content-length"), None)
        try:
            check_declared_length(declared, limit)
        except AppError as exc:
            await send_error(send, exc)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise PayloadTooLarge(f"The request body is larger than the limit of {_size(limit)}.",
                                          details={"maxBytes": limit})
            return message

        await self.app(scope, limited_receive, send)


async def send_error(send: Send, exc: AppError, headers: Mapping[str, str] | None = None) -> None:
    """Answer with the platform's error body from pure ASGI code (outside FastAPI's handlers)."""
    headers = {**(retry_after_headers(exc) or {}), **(headers or {})}
    await send_json(send, exc.status_code, error_body(exc.code, exc.message, exc.details), headers)


async def send_json(send: Send, status: int, body: Any, headers: Mapping[str, str] | None = None) -> None:
    payload = orjson.dumps(body)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})
