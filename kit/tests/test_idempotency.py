"""kit.idempotency on real PostgreSQL: a key recorded with its effect in one transaction. A repeat
replays the answer (even after the caller timed out), a concurrent repeat waits and replays, another
body with the same key is a 422, and a failed request leaves nothing behind."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from fastapi import APIRouter, FastAPI, Response
from sqlalchemy import Integer, String, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from kit.db import Database
from kit.errors import Conflict, install_error_handlers
from kit.idempotency import IdempotencyMixin, Idempotent, IdempotentRoute
from kit.web import RequestUnitOfWork


class Base(DeclarativeBase):
    pass


class Effect(Base):
    __tablename__ = "effects"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    amount: Mapped[int] = mapped_column(Integer)


class IdempotencyKey(IdempotencyMixin, Base):
    pass


class _Runtime:
    def __init__(self, db: Database) -> None:
        self.db = db


@pytest.fixture
async def setup(database_url_factory: Callable[[str], str]) -> AsyncIterator[tuple[httpx.AsyncClient, Database]]:
    db = Database(database_url_factory("kitidem"), idempotency_model=IdempotencyKey, pool_size=4)
    async with db.engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    router = APIRouter(route_class=IdempotentRoute)
    gate = asyncio.Event()
    gate.set()

    @router.post("/pay", status_code=201)
    async def pay(body: dict[str, int], uow: RequestUnitOfWork) -> dict[str, str]:
        await gate.wait()
        if body.get("amount", 0) < 0:
            raise Conflict("refused")
        effect = Effect(id=uuid.uuid4().hex, amount=body["amount"])
        uow.session.add(effect)
        await uow.session.flush()
        return {"id": effect.id}

    @router.post("/preview")
    async def preview(uow: RequestUnitOfWork) -> Response:
        return Response(content=b"%PDF" + b"x" * 300_000, media_type="application/pdf")

    @router.post("/explicit", status_code=201)
    async def explicit(uow: RequestUnitOfWork, _: Idempotent) -> dict[str, str]:
        uow.session.add(Effect(id=uuid.uuid4().hex, amount=1))
        return {"ok": "yes"}

    app = FastAPI()
    app.state.runtime = _Runtime(db)
    app.state.gate = gate
    install_error_handlers(app)
    app.include_router(router)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        yield client, db
    await db.dispose()


async def _effects(db: Database) -> int:
    async with db.unit_of_work() as uow:
        return int(await uow.session.scalar(select(func.count()).select_from(Effect)) or 0)


async def test_a_repeat_replays_the_first_answer(setup: tuple[httpx.AsyncClient, Database]) -> None:
    client, db = setup
    headers = {"Idempotency-Key": "k-1", "X-Actor-User-Id": "u1"}
    first = await client.post("/pay", json={"amount": 500}, headers=headers)
    second = await client.post("/pay", json={"amount": 500}, headers=headers)
    assert first.status_code == second.status_code == 201
    assert first.json() == second.json() and second.headers["Idempotent-Replayed"] == "true"
    assert await _effects(db) == 1
    # another user's identical key is another request
    other = await client.post("/pay", json={"amount": 500}, headers={**headers, "X-Actor-User-Id": "u2"})
    assert other.status_code == 201 and other.json() != first.json()
    assert await _effects(db) == 2


async def test_same_key_other_body_is_422(setup: tuple[httpx.AsyncClient, Database]) -> None:
    client, db = setup
    headers = {"Idempotency-Key": "k-2"}
    assert (await client.post("/pay", json={"amount": 1}, headers=headers)).status_code == 201
    r = await client.post("/pay", json={"amount": 2}, headers=headers)
    assert r.status_code == 422 and r.json()["error"]["code"] == "idempotency_key_reused"
    assert await _effects(db) == 1


async def test_a_failed_request_can_be_retried(setup: tuple[httpx.AsyncClient, Database]) -> None:
    client, db = setup
    headers = {"Idempotency-Key": "k-3"}
    assert (await client.post("/pay", json={"amount": -1}, headers=headers)).status_code == 409
    assert (await client.post("/pay", json={"amount": -1}, headers=headers)).status_code == 409
    assert await _effects(db) == 0


async def test_concurrent_repeats_make_one_effect(setup: tuple[httpx.AsyncClient, Database]) -> None:
    client, db = setup
    headers = {"Idempotency-Key": "k-4"}
    answers = await asyncio.gather(*[client.post("/pay", json={"amount": 7}, headers=headers) for _ in range(5)])
    assert {a.status_code for a in answers} == {201}
    assert len({a.json()["id"] for a in answers}) == 1
    assert await _effects(db) == 1


async def test_without_a_key_every_request_runs(setup: tuple[httpx.AsyncClient, Database]) -> None:
    client, db = setup
    for _ in range(2):
        assert (await client.post("/pay", json={"amount": 3})).status_code == 201
    assert await _effects(db) == 2


async def test_a_large_answer_keeps_no_claim(setup: tuple[httpx.AsyncClient, Database]) -> None:
    client, db = setup
    headers = {"Idempotency-Key": "k-5"}
    for _ in range(2):  # a read-only POST with a big answer simply runs again
        r = await client.post("/preview", headers=headers)
        assert r.status_code == 200 and len(r.content) > 300_000 and "idempotent-replayed" not in r.headers
    async with db.unit_of_work() as uow:
        assert await uow.session.scalar(select(func.count()).select_from(IdempotencyKey)) == 0


async def test_every_post_of_the_router_is_guarded(setup: tuple[httpx.AsyncClient, Database]) -> None:
    client, db = setup
    headers = {"Idempotency-Key": "k-6"}
    first = await client.post("/explicit", headers=headers)  # declares Idempotent too: claimed once
    second = await client.post("/explicit", headers=headers)
    assert first.status_code == second.status_code == 201 and second.headers["idempotent-replayed"] == "true"
    assert await _effects(db) == 1
