"""Outbox relay: publishes committed outbox rows to Kafka with an idempotent producer (acks=all).

Only one relay per service publishes at a time (a transaction-scoped advisory lock), so events of
one aggregate leave in commit order even with several replicas running. A crash between publish
and marking rows published re-sends them: delivery is at least once and consumers deduplicate by
event id.

Where it runs (`<PREFIX>RELAY_MODE`): by default in a child process of the service (`RelayProcess`,
kit.child), which has its own GIL, so commit → Kafka does not wait behind the service's request
handling; `thread` runs it in a thread of the service (`RelayThread`), as before.
"""

from __future__ import annotations

import asyncio
import threading
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import structlog
from faststream.kafka import KafkaBroker
from sqlalchemy import func, select, update
from sqlalchemy import inspect as sa_inspect

from kit import tracing
from kit.child import ChildContext, ChildProcess, ChildReport, run_worker
from kit.db import OUTBOX_CHANNEL, Database, OutboxMixin
from kit.metrics import OUTBOX_RELAYED
from kit.worker import PollingWorker, WorkerState, asyncpg_dsn

__all__ = ["OutboxRelay", "RelayProcess", "RelayThread", "asyncpg_dsn"]

log = structlog.get_logger(__name__)


class OutboxRelay(PollingWorker):
    """Publishes pending outbox rows in batches: woken by the NOTIFY that commits send, polling as a
    fallback, backing off while Kafka or the database is down (kit.worker.PollingWorker)."""

    name = "outbox-relay"

    def __init__(
        self,
        db: Database,
        broker: KafkaBroker,
        *,
        service: str,
        batch_size: int = 200,
        poll_interval: float = 1.0,
        coalesce: float = 0.005,
    ) -> None:
        if db.outbox_model is None:
            raise ValueError("database has no outbox model")
        # drain() empties the outbox in one run, so a full batch never needs an immediate rerun.
        super().__init__(database_url=db.url, channel=OUTBOX_CHANNEL, poll_interval=poll_interval,
                         batch_size=2**62, coalesce=coalesce, max_error_backoff=5.0)
        self._db = db
        self._model: type[OutboxMixin] = db.outbox_model
        self._broker = broker
        self._lock_key = zlib.crc32(f"outbox:{service}".encode())
        self._relayed = OUTBOX_RELAYED.labels(service)
        self.relayed_total = 0  # events published since start (a child relay reports it to its parent)
        self._relay_batch = batch_size

    async def run_once(self) -> int:
        return await self.drain()

    async def drain(self) -> int:
        """Publish everything pending; returns how many events went out."""
        sent = 0
        while True:
            batch = await self._publish_batch()
            sent += batch
            if batch < self._relay_batch:
                return sent

    async def _publish_batch(self) -> int:
        table = sa_inspect(self._model).local_table  # Core, not ORM: this runs for every batch of every service
        async with self._db.engine.begin() as conn:
            if not await conn.scalar(select(func.pg_try_advisory_xact_lock(self._lock_key))):
                return 0  # another replica is relaying
            rows = (
                await conn.execute(
                    select(table.c.id, table.c.topic, table.c.key, table.c.payload, table.c.headers)
                    .where(table.c.published_at.is_(None))
                    .order_by(table.c.id)
                    .limit(self._relay_batch)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            if not rows:
                return 0
            # Each send is a span continuing the trace stored with its row (kit.tracing), until acked.
            with tracing.kafka_sends() as sends:
                futures = [
                    await self._broker.publish(
                        row.payload,
                        topic=row.topic,
                        key=row.key.encode(),
                        headers=sends.headers(row.topic, row.headers),
                        correlation_id=row.headers.get("correlation_id"),
                        no_confirm=True,
                    )
                    for row in rows
                ]
                await asyncio.gather(*futures)  # acks=all for every record before we mark them
            await conn.execute(
                update(table).where(table.c.id.in_([r.id for r in rows])).values(published_at=func.now())
            )
        self._relayed.inc(len(rows))  # counted once the marking committed with the block above
        self.relayed_total += len(rows)
        log.debug("outbox_published", count=len(rows))
        return len(rows)


class RelayThread:
    """An OutboxRelay on its own event loop, engine and producer, in a daemon thread: request load on
    the service's loop then doesn't queue the relay behind it (commit → Kafka stays short).

    `state()` is the relay's (kit.worker.WorkerState), readable from the service's thread; a relay
    thread that has ended is dead."""

    name = OutboxRelay.name

    def __init__(
        self,
        database_url: str,
        outbox_model: type[OutboxMixin],
        broker_factory: Callable[[], KafkaBroker],
        *,
        service: str,
        poll_interval: float = 1.0,
    ) -> None:
        self._database_url = database_url
        self._outbox_model = outbox_model
        self._broker_factory = broker_factory
        self._service = service
        self._poll_interval = poll_interval
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._relay: OutboxRelay | None = None

    async def start(self) -> None:
        self._thread = threading.Thread(target=self._run_thread, name=f"outbox-relay-{self._service}", daemon=True)
        self._thread.start()
        await asyncio.to_thread(self._ready.wait, 60)
        if self._error is not None:
            raise RuntimeError(f"outbox relay failed to start: {self._error}") from self._error

    def state(self) -> WorkerState:
        relay, thread = self._relay, self._thread
        if relay is None:  # not started, or failed before its relay existed
            return WorkerState(name=self.name, started=thread is not None, running=False, listening=None,
                               consecutive_failures=0, last_success_age=None,
                               last_error=None if self._error is None else str(self._error)[:500],
                               problem=None if thread is None else "dead: the relay thread did not start")
        state = relay.state()
        if state.started and (thread is None or not thread.is_alive()):
            return replace(state, running=False, problem="dead: the relay thread has ended")
        return state

    async def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 15)

    def _run_thread(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced to start() if it happens before ready
            self._error = exc
            self._ready.set()
            log.error("outbox_relay_thread_failed", error=str(exc))

    async def _main(self) -> None:
        # A new thread starts with empty context variables: name the service in its log lines again.
        structlog.contextvars.bind_contextvars(service=self._service, component="outbox-relay")
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with _relay_on_its_own(self._database_url, self._outbox_model, self._broker_factory,
                                     self._service, self._poll_interval) as relay:
            self._relay = relay
            try:
                await relay.start()
                self._ready.set()
                await self._stop.wait()
            finally:
                await relay.stop()


@asynccontextmanager
async def _relay_on_its_own(database_url: str, outbox_model: type[OutboxMixin],
                            broker_factory: Callable[[], KafkaBroker], service: str,
                            poll_interval: float) -> AsyncIterator[OutboxRelay]:
    """A relay (not yet started) with an engine and a producer of its own, for a thread or a child
    process; both are closed after."""
    db = Database(database_url, outbox_model=outbox_model, pool_size=2)
    broker = broker_factory()
    try:
        await broker.start()
        yield OutboxRelay(db, broker, service=service, poll_interval=poll_interval)
    finally:
        await broker.stop()
        await db.dispose()


# -- the relay in a child process (kit.child): the default ------------------------------------------------


async def _relay_child(ctx: ChildContext, database_url: str, outbox_model: type[OutboxMixin],
                       broker_factory: Callable[[], KafkaBroker], service: str, poll_interval: float) -> None:
    async with _relay_on_its_own(database_url, outbox_model, broker_factory, service, poll_interval) as relay:
        await run_worker(ctx, relay, lambda: {"relayed": relay.relayed_total})


class RelayProcess(ChildProcess):
    """The service's OutboxRelay in a child process (its own GIL, next to the service's requests and
    consumers), restarted if it exits; its published count is carried into this process's
    billing_outbox_relayed_total. `broker_factory` and `outbox_model` cross to the child by import
    (a module-level function, or a functools.partial of one with picklable arguments)."""

    def __init__(self, database_url: str, outbox_model: type[OutboxMixin], broker_factory: Callable[[], KafkaBroker],
                 *, service: str, poll_interval: float = 1.0, log_level: str = "INFO", log_json: bool = False) -> None:
        relayed = OUTBOX_RELAYED.labels(service)

        def carry(report: ChildReport, previous: ChildReport | None) -> None:
            before = previous.counters.get("relayed", 0.0) if previous is not None else 0.0
            relayed.inc(max(0.0, report.counters.get("relayed", 0.0) - before))

        args: tuple[Any, ...] = (database_url, outbox_model, broker_factory, service, poll_interval)
        super().__init__(OutboxRelay.name, _relay_child, args, service=service, log_level=log_level,
                         log_json=log_json, on_report=carry)
