"""/readyz tells when a background loop is dead, stuck or deaf, and reports each one, on real
PostgreSQL: a worker registered in ServiceRuntime.workers whose runs keep failing (stuck), whose LISTEN
connection is gone and cannot come back (deaf: its database refuses connections), whose task ended
(dead); and 200 again once each recovers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from kit.db import Database
from kit.service import ServiceRuntime, create_service_app, make_broker
from kit.settings import ServiceSettings
from kit.worker import PollingWorker, asyncpg_dsn


class Crash(BaseException):
    """Not an Exception: the worker's loop does not catch it, so its task ends (a dead worker)."""


class Flaky(PollingWorker):
    name = "flaky"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.runs = 0
        self.failing = False
        self.crash = False

    async def run_once(self) -> int:
        self.runs += 1
        if self.crash:
            raise Crash
        if self.failing:
            raise RuntimeError("database down")
        return 0


@dataclass
class Ready:
    http: httpx.AsyncClient
    worker: Flaky
    worker_url: str

    async def get(self) -> tuple[int, dict[str, Any]]:
        response = await self.http.get("/readyz")
        return response.status_code, response.json()

    async def until(self, status: int, timeout: float = 10.0) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            code, body = await self.get()
            if code == status:
                return body
            assert asyncio.get_running_loop().time() < deadline, f"/readyz still {code}: {body}"
            await asyncio.sleep(0.05)


@pytest.fixture
async def ready(database_url_factory: Callable[[str], str]) -> AsyncIterator[Ready]:
    # The runtime's own database stays up throughout; the worker listens on another one.
    settings = ServiceSettings(service_name="readiness-test", database_url=database_url_factory("readiness"),
                               kafka_enabled=False)
    db = Database(settings.database_url, pool_size=2)
    runtime = ServiceRuntime(settings=settings, db=db, broker=make_broker(settings))
    worker_url = database_url_factory("readiness_worker")
    worker = Flaky(database_url=worker_url, channel="readiness_test", poll_interval=0.1, stuck_polls=3,
                   listen_grace=0.5, max_error_backoff=0.2)
    runtime.workers.append(worker)
    app = create_service_app(runtime, title="readiness test")
    await worker.start()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        yield Ready(http, worker, worker_url)
    await worker.stop()
    await db.dispose()


async def test_a_healthy_worker_is_reported_and_ready(ready: Ready) -> None:
    body = await ready.until(200)
    assert body["ready"] is True and body["checks"] == {"database": "ok"}
    flaky = body["workers"]["flaky"]
    assert (flaky["status"], flaky["running"], flaky["listening"], flaky["consecutiveFailures"]) == (
        "ok", True, True, 0)
    assert 0 <= flaky["lastSuccessAgeSeconds"] < 1


async def test_stuck_while_failing_then_ready_again(ready: Ready) -> None:
    await ready.until(200)
    ready.worker.failing = True
    body = await ready.until(503)  # failing for more than 3 poll intervals (0.3 s)
    flaky = body["workers"]["flaky"]
    assert flaky["status"] == "stuck" and flaky["consecutiveFailures"] >= 2
    assert flaky["running"] is True and "database down" in flaky["lastError"]
    assert body["checks"] == {"database": "ok"}  # only the worker is at fault
    ready.worker.failing = False
    body = await ready.until(200)
    assert body["workers"]["flaky"]["consecutiveFailures"] == 0


async def test_deaf_while_it_cannot_listen_then_ready_again(ready: Ready) -> None:
    await ready.until(200)
    name = make_url(ready.worker_url).database
    admin = await asyncpg.connect(asyncpg_dsn(ready.worker_url).replace(f"/{name}", "/postgres"))
    try:
        # No new connection to the worker's database (not even a superuser's), then its LISTEN
        # connection killed: it cannot listen again until connections are allowed back.
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = $1", name)
        assert killed == 1
        body = await ready.until(503)
        flaky = body["workers"]["flaky"]
        assert flaky["status"] == "deaf" and flaky["listening"] is False and "readiness_test" in flaky["problem"]
        assert flaky["consecutiveFailures"] == 0  # its runs go on (polling): deaf, not stuck
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        body = await ready.until(200)
        assert body["workers"]["flaky"]["listening"] is True
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()


async def test_dead_when_its_task_has_ended(ready: Ready) -> None:
    await ready.until(200)
    ready.worker.crash = True
    ready.worker.wake()
    body = await ready.until(503)
    flaky = body["workers"]["flaky"]
    assert (flaky["status"], flaky["running"]) == ("dead", False)
    assert all(isinstance(task.exception(), Crash) for task in ready.worker._tasks)
