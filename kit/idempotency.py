"""Idempotency keys recorded in the same transaction as the effect they guard.

The gateway forwards a POST's `Idempotency-Key` to the service. Every POST route of a router built
with `APIRouter(route_class=IdempotentRoute)` is guarded (or a route declares `Idempotent` itself):

1. Before the handler runs, the key is claimed in the request's unit of work (INSERT of a row in the
   service's `idempotency_keys` table). A concurrent repeat blocks on that uncommitted row until the
   first request commits (then it replays the stored answer) or rolls back (then it runs itself).
2. After the handler returns, the response is written into the claimed row, and the unit of work
   commits effect and answer together. A handler that raises rolls both back: nothing was done, so
   a retry simply runs again.

So no timeout anywhere (gateway, client, proxy) can double an effect: whatever the caller saw, the
second request with the key finds either the committed answer or nothing. The same key with another
body is a 422 (as Stripe does).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from fastapi.routing import APIRoute
from sqlalchemy import DateTime, Integer, LargeBinary, String, delete, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Mapped, mapped_column

from kit.actor import INTERNAL_TOKEN_HEADER, USER_HEADER
from kit.db import UnitOfWork
from kit.errors import AppError, InvalidInput
from kit.web import RequestUnitOfWork

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY = 255
# Answers larger than this are not kept (none of the guarded routes answers that much).
MAX_STORED_BODY = 256 * 1024
_STATE = "idempotency_claim"


class IdempotencyMixin:
    """Mixed into a service's Base: `class IdempotencyKey(IdempotencyMixin, Base): pass`."""

    __tablename__ = "idempotency_keys"

    owner: Mapped[str] = mapped_column(String(200), primary_key=True)
    key: Mapped[str] = mapped_column(String(MAX_KEY), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    media_type: Mapped[str | None] = mapped_column(String(100), nullable=True)
    body: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Replay(Exception):
    """The key was used before: answer what was answered then."""

    def __init__(self, status_code: int, body: bytes, media_type: str | None) -> None:
        super().__init__("replay")
        self.response = Response(content=body, status_code=status_code, media_type=media_type,
                                 headers={REPLAYED_HEADER: "true"})


def fingerprint(method: str, path: str, body: bytes) -> str:
    return hashlib.sha256(b"\0".join([method.encode(), path.encode(), body])).hexdigest()


async def claim(uow: UnitOfWork, model: Any, *, owner: str, key: str, print_: str) -> Any | None:
    """Claim `key` for `owner` in this unit of work. Returns the claimed row, or raises `Replay` /
    422 when the key was used before (waiting first if that request is still running)."""
    # A new key (the usual case) comes back from the INSERT itself, loaded as the row to answer into;
    # a separate SELECT after it cost ~10% of a guarded create's CPU. Only a conflict reads the row.
    claimed = select(model).from_statement(
        insert(model).values(owner=owner, key=key, fingerprint=print_).on_conflict_do_nothing().returning(model))
    inserted = (await uow.session.scalars(claimed)).first()
    if inserted is not None:
        return inserted
    row = await uow.session.scalar(select(model).where(model.owner == owner, model.key == key))
    if row is None:  # the first request rolled back between our INSERT and SELECT: it never happened
        return await claim(uow, model, owner=owner, key=key, print_=print_)
    if row.fingerprint != print_:
        raise InvalidInput(f"This {HEADER} was already used for a different request.",
                           code="idempotency_key_reused")
    if row.status_code is None or row.body is None:  # committed without a stored answer (too large)
        raise AppError("This request was already processed; its answer was not kept.", code="already_processed")
    raise Replay(row.status_code, row.body, row.media_type)


async def idempotency_guard(request: Request, uow: RequestUnitOfWork) -> None:
    """Dependency of a guarded route: claims the request's key (if it carries one)."""
    key = request.headers.get(HEADER)
    if key is None or request.method != "POST":
        return
    if not key or len(key) > MAX_KEY or not key.isprintable():
        raise InvalidInput(f"{HEADER} must be 1–{MAX_KEY} printable characters.")
    model = request.app.state.runtime.db.idempotency_model
    if model is None:
        raise RuntimeError("this service has no idempotency_keys table")
    # The gateway names the user; a direct service-to-service caller is "system".
    owner = request.headers.get(USER_HEADER) or ("system" if request.headers.get(INTERNAL_TOKEN_HEADER) else "anon")
    query = request.url.query
    path = f"{request.url.path}?{query}" if query else request.url.path
    row = await claim(uow, model, owner=owner, key=key, print_=fingerprint("POST", path, await request.body()))
    setattr(request.state, _STATE, row)
    request.state.idempotency_uow = uow


Idempotent = Annotated[None, Depends(idempotency_guard)]


class IdempotentRoute(APIRoute):
    """Route class for routers whose POST routes are guarded: adds the claim to every POST route,
    stores the answer in the claimed row before the request's unit of work commits, and turns
    `Replay` into the stored answer."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        methods = {m.upper() for m in kwargs.get("methods") or ()}
        if "POST" in methods:
            kwargs["dependencies"] = [*(kwargs.get("dependencies") or ()), Depends(idempotency_guard)]
        super().__init__(path, endpoint, **kwargs)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                response = await handler(request)
            except Replay as replay:
                return replay.response
            row = getattr(request.state, _STATE, None)
            if row is not None and response.status_code < 500:
                body = bytes(response.body) if hasattr(response, "body") else None
                if body is not None and len(body) <= MAX_STORED_BODY:
                    row.status_code = response.status_code
                    row.media_type = response.media_type
                    row.body = body
                else:  # a streamed or large answer (a PDF preview): nothing to replay, keep no claim
                    request.state.idempotency_uow.session.expunge(row)
                    await request.state.idempotency_uow.session.execute(
                        delete(type(row)).where(type(row).owner == row.owner, type(row).key == row.key))
            return response

        return guarded


def create_table_in_migration() -> None:
    """The `idempotency_keys` table of IdempotencyMixin, for a service's Alembic migration."""
    import sqlalchemy as sa
    from alembic import op

    op.create_table(
        "idempotency_keys",
        sa.Column("owner", sa.String(length=200), nullable=False),
        sa.Column("key", sa.String(length=MAX_KEY), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("media_type", sa.String(length=100), nullable=True),
        sa.Column("body", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("owner", "key"),
    )
