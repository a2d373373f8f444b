"""After a real PostgreSQL crash-restart (`pg_ctl restart -m immediate`) a service on kit listens
again: /readyz is 503 while it cannot work, then 200, and commit → Kafka through the outbox relay
(kit.outbox, in its child process) and a NOTIFY to a worker on a channel (as payments' webhook worker is woken) are fast
again. Poll intervals are 5 s, so only a NOTIFY explains anything faster than that.

The server restarted is this test's own (the session's PostgreSQL is shared by every test)."""

from __future__ import annotations

import asyncio
import shutil
import statistics
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.orm import DeclarativeBase

from contracts.envelope import CloudEvent
from deploy.infra import PostgresServer, free_port
from deploy.testing import KafkaEventLog
from kit.db import Database, OutboxMixin
from kit.service import ServiceRuntime, create_service_app, make_broker
from kit.settings import ServiceSettings
from kit.web import RequestUnitOfWork
from kit.worker import PollingWorker, asyncpg_dsn

POLL = 5.0  # every loop's poll interval: anything well under it was woken by a NOTIFY
FAST = 1.0  # what "fast" must beat (commit → Kafka is some 10 ms; a poll would be up to 5 s)
CHANNEL = "kit_restart_test"


class _Base(DeclarativeBase):
    pass


class OutboxMessage(OutboxMixin, _Base):
    pass


class Woken(PollingWorker):
    """Stands for payments' webhook worker: woken by NOTIFY on its channel from another process."""

    name = "woken"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.runs: list[float] = []

    async def run_once(self) -> int:
        self.runs.append(time.monotonic())
        return 0


@pytest.fixture
def own_postgres(infra_dir: Path) -> Iterator[PostgresServer]:
    # Durable (fsync and synchronous commit on): a fast-mode server loses its last commits in a crash.
    server = PostgresServer(infra_dir / f"pg-restart-{uuid.uuid4().hex[:8]}", free_port())
    server.ensure_installed()
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.data_dir, ignore_errors=True)


def crash_restart(server: PostgresServer) -> None:
    """`pg_ctl restart -m immediate`: every backend killed at once, crash recovery on start."""
    server._as_postgres("pg_ctl", "restart", "-D", str(server.data_dir), "-m", "immediate", "-w", "-t", "60",
                        "-l", str(server.log_path), timeout=90)


async def _until(condition: Any, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out: {what}"
        await asyncio.sleep(0.01)


async def test_after_a_crash_restart_readiness_tells_and_notify_speed_comes_back(
    own_postgres: PostgresServer, kafka: Any
) -> None:
    url = own_postgres.create_database("restart_test")
    settings = ServiceSettings(service_name=f"restart-{uuid.uuid4().hex[:6]}", database_url=url,
                               kafka_bootstrap=kafka.bootstrap, outbox_poll_interval=POLL, migrate_on_start=False)
    db = Database(url, outbox_model=OutboxMessage, pool_size=2)
    async with db.engine.begin() as conn:
        await conn.run_sync(_Base.metadata.create_all)
    topic = f"test.restart.{uuid.uuid4().hex[:8]}"
    kafka.create_topics([topic], partitions=1)
    reader = KafkaEventLog(kafka.bootstrap, topic)
    await reader.start()
    runtime = ServiceRuntime(settings=settings, db=db, broker=make_broker(settings))
    woken = Woken(database_url=url, channel=CHANNEL, poll_interval=POLL)
    runtime.workers.append(woken)
    runtime.on_startup.append(woken.start)
    runtime.on_shutdown.append(woken.stop)
    app = create_service_app(runtime, title="restart test")
    notifier: asyncpg.Connection | None = None

    async def readyz() -> tuple[int, dict[str, Any]]:
        response = await http.get("/readyz")
        return response.status_code, response.json()

    async def commit_to_kafka() -> float:
        """Seconds from a commit with one outbox event to the event read back from Kafka."""
        event = CloudEvent(source="test", type="test.restart", subject="agg", data={"n": uuid.uuid4().hex})
        started = time.monotonic()
        async with db.transaction() as uow:
            uow.publish(event, topic=topic, key="agg")
        await _until(lambda: any(e.id == event.id for e in reader.events), "event on Kafka", timeout=3 * POLL)
        return time.monotonic() - started

    async def notify_to_run() -> float:
        assert notifier is not None
        before = len(woken.runs)
        started = time.monotonic()
        await notifier.execute(f"NOTIFY {CHANNEL}")
        await _until(lambda: len(woken.runs) > before, "the worker woken", timeout=3 * POLL)
        return woken.runs[before] - started

    await runtime.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            code, body = await readyz()
            assert code == 200, body
            assert body["workers"]["outbox-relay"]["listening"] is True
            assert body["workers"]["woken"]["listening"] is True
            notifier = await asyncpg.connect(asyncpg_dsn(url))
            await commit_to_kafka()  # the producer's first send to a topic fetches its metadata
            before = [await commit_to_kafka() for _ in range(3)]
            assert max(before) < FAST, before
            assert await notify_to_run() < FAST
            await notifier.close()

            # Crash-restart PostgreSQL while /readyz is asked every 50 ms.
            seen: list[tuple[float, int, dict[str, Any]]] = []
            restart = asyncio.create_task(asyncio.to_thread(crash_restart, own_postgres))
            while not restart.done():
                seen.append((time.monotonic(), *await readyz()))
                await asyncio.sleep(0.05)
            await restart
            restarted = time.monotonic()
            assert any(code == 503 for _, code, _ in seen), "readiness never said the service cannot work"
            down = next(body for _, code, body in seen if code == 503)
            assert down["checks"]["database"] != "ok"

            # Ready again, each loop listening again, within a few seconds of the restart (not a poll).
            deadline = restarted + 15
            while True:
                code, body = await readyz()
                listening = [w["listening"] for w in body["workers"].values()]
                if code == 200 and all(listening):
                    break
                assert time.monotonic() < deadline, body
                await asyncio.sleep(0.05)
            assert time.monotonic() - restarted < POLL * 2, body

            notifier = await asyncpg.connect(asyncpg_dsn(url))
            after = [await commit_to_kafka() for _ in range(3)]
            assert max(after) < FAST, after
            assert await notify_to_run() < FAST
            print(f"commit->kafka median before {statistics.median(before) * 1000:.0f} ms, "
                  f"after {statistics.median(after) * 1000:.0f} ms; ready again after "
                  f"{time.monotonic() - restarted:.1f} s")
    finally:
        if notifier is not None and not notifier.is_closed():
            await notifier.close()
        await runtime.stop()
        await reader.stop()


async def test_a_request_on_a_connection_pooled_before_the_crash_is_a_503_then_works(
    own_postgres: PostgresServer,
) -> None:
    """No pre-ping on checkout (it cost three round trips per transaction): the first request on a
    connection from before a crash-restart is a 503 the caller may retry, never a 500, and the whole
    pool is renewed by it; and while PostgreSQL is down, requests are 503s too."""
    url = own_postgres.create_database("stale_test")
    settings = ServiceSettings(service_name=f"stale-{uuid.uuid4().hex[:6]}", database_url=url,
                               kafka_enabled=False, migrate_on_start=False)
    db = Database(url, pool_size=2)
    runtime = ServiceRuntime(settings=settings, db=db, broker=make_broker(settings))
    app = create_service_app(runtime, title="stale connection test")

    @app.get("/probe")
    async def probe(uow: RequestUnitOfWork) -> dict[str, int]:
        return {"one": (await uow.session.execute(text("SELECT 1"))).scalar_one()}

    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                     base_url="http://test") as http:
            both = await asyncio.gather(http.get("/probe"), http.get("/probe"))  # two pooled connections
            assert [r.status_code for r in both] == [200, 200]
            crash_restart(own_postgres)
            first = await http.get("/probe")
            assert first.status_code == 503, first.text  # the stale connection: retry
            assert first.json()["error"]["code"] == "database_unavailable" and first.headers["Retry-After"] == "1"
            for _ in range(3):  # every pooled connection was renewed: no second 503
                again = await http.get("/probe")
                assert again.status_code == 200 and again.json() == {"one": 1}, again.text

            own_postgres._as_postgres("pg_ctl", "stop", "-D", str(own_postgres.data_dir), "-m", "fast", "-w",
                                      timeout=60)
            try:
                down = await http.get("/probe")
                assert down.status_code == 503 and down.json()["error"]["code"] == "database_unavailable", down.text
            finally:
                own_postgres.start()
            assert (await http.get("/probe")).status_code in (200, 503)
            assert (await http.get("/probe")).status_code == 200
    finally:
        await db.dispose()
