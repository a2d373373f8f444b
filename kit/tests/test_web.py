"""kit.web: strict query strings, one body limit, and the request's unit of work (commit on return,
rollback on raise) against real PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import httpx
import pytest
from fastapi import FastAPI, Query, Request
from sqlalchemy import String, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from kit.db import Database
from kit.errors import Conflict, install_error_handlers
from kit.web import BodyLimit, RequestUnitOfWork, StrictQuery


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)


class _Runtime:
    def __init__(self, db: Database) -> None:
        self.db = db


def make_app(db: Database | None = None) -> FastAPI:
    app = FastAPI(dependencies=[StrictQuery])
    app.add_middleware(BodyLimit, limit=1000, limits={"/big": 5000})
    install_error_handlers(app)
    if db is not None:
        app.state.runtime = _Runtime(db)

    @app.get("/items")
    async def items(limit: Annotated[int, Query(ge=1, le=100)] = 20,
                    tag: Annotated[list[str] | None, Query()] = None) -> dict[str, Any]:
        return {"limit": limit, "tag": tag}

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"size": len(await request.body())}

    @app.post("/big/echo")
    async def big_echo(request: Request) -> dict[str, int]:
        return {"size": len(await request.body())}

    @app.post("/notes/{note_id}")
    async def add_note(note_id: str, uow: RequestUnitOfWork, fail: bool = False) -> dict[str, str]:
        uow.session.add(Note(id=note_id))
        await uow.session.flush()
        if fail:
            raise Conflict("refused after the write")
        return {"id": note_id}

    return app


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app()), base_url="http://t") as c:
        yield c


async def test_unknown_query_parameter_is_400_naming_it(client: httpx.AsyncClient) -> None:
    r = await client.get("/items", params={"limt": "1"})
    assert r.status_code == 400
    body = r.json()["error"]
    assert body["code"] == "unknown_query_parameter"
    assert "limt" in body["message"] and body["details"]["unknown"] == ["limt"]
    assert body["details"]["accepted"] == ["limit", "tag"]


async def test_declared_query_parameters_pass(client: httpx.AsyncClient) -> None:
    r = await client.get("/items", params=[("limit", "3"), ("tag", "a"), ("tag", "b")])
    assert r.status_code == 200 and r.json() == {"limit": 3, "tag": ["a", "b"]}


async def test_nul_in_a_query_value_is_a_4xx(client: httpx.AsyncClient) -> None:
    r = await client.get("/items?tag=a%00b")
    assert r.status_code == 422 and "NUL" in r.json()["error"]["message"]


async def test_declared_body_over_the_limit_is_413_before_reading(client: httpx.AsyncClient) -> None:
    r = await client.post("/echo", content=b"x" * 1001)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    assert (await client.post("/echo", content=b"x" * 1000)).json() == {"size": 1000}


async def test_streamed_body_over_the_limit_is_413(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b"y" * 300

    r = await client.post("/echo", content=chunks())  # no Content-Length: counted as it arrives
    assert r.status_code == 413


async def test_a_path_prefix_has_its_own_limit(client: httpx.AsyncClient) -> None:
    assert (await client.post("/big/echo", content=b"x" * 4000)).json() == {"size": 4000}
    assert (await client.post("/big/echo", content=b"x" * 5001)).status_code == 413


async def test_bad_content_length_is_400(client: httpx.AsyncClient) -> None:
    r = await client.post("/echo", content=b"abc", headers={"content-length": "x3"})
    assert r.status_code == 400


async def test_request_unit_of_work_commits_on_return_and_rolls_back_on_raise(
    database_url_factory: Callable[[str], str],
) -> None:
    db = Database(database_url_factory("kitweb"), pool_size=2)
    async with db.engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    app = make_app(db)
    kept, dropped = uuid.uuid4().hex, uuid.uuid4().hex
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            assert (await c.post(f"/notes/{kept}")).status_code == 200
            r = await c.post(f"/notes/{dropped}", params={"fail": "true"})
            assert r.status_code == 409
        async with db.unit_of_work() as uow:
            ids = set((await uow.session.scalars(select(Note.id))).all())
            assert kept in ids and dropped not in ids
            # nothing left open: no idle-in-transaction session of ours
            open_tx = await uow.session.scalar(text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state = 'idle in transaction' AND pid <> pg_backend_pid()"))
            assert open_tx == 0
    finally:
        await db.dispose()
