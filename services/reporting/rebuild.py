"""`python -m services.reporting rebuild`: the read models again from the whole event log.

1. Fresh tables in the schema `reporting_rebuild` (a leftover of a failed run is dropped first).
2. Every partition of the three topics read from its first offset, without a consumer group, up to
   the end offsets taken at the start, in batches of `REPORTING_REBUILD_BATCH_SIZE` events per
   transaction (the live feed's code, into the new schema); progress printed every second.
3. A few catch-up rounds up to the newest end offsets, so little is left for the live feed.
4. One transaction drops the live schema and renames the new one into its place. A running replica
   notices that the positions moved back and replays the few events after them into the new tables.

One rebuild at a time (a PostgreSQL advisory lock); the service can keep serving meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from aiokafka import AIOKafkaConsumer, TopicPartition
from sqlalchemy import text

from kit.clock import utcnow
from kit.db import Database
from kit.logging import configure_logging
from kit.migrations import upgrade_to_head_async
from services.reporting.config import ReportingSettings
from services.reporting.feed import Feed, apply_with_retries, topic_partitions
from services.reporting.models import MIGRATIONS, READ_MODEL_TABLES, SCHEMA, Base

NEW_SCHEMA = f"{SCHEMA}_rebuild"
_LOCK_KEY = 0x5245_504F  # "REPO": one rebuild at a time
CATCH_UP_ROUNDS = 3


class RebuildRunning(RuntimeError):
    pass


@dataclass(frozen=True)
class RebuildResult:
    events: int
    records: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds else 0.0


class _Progress:
    def __init__(self, say: Callable[[str], None], interval: float = 1.0) -> None:
        self.say = say
        self.interval = interval
        self.started = self._last = time.monotonic()
        self._last_records = 0

    def tick(self, records: int, lag: int, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        recent = (records - self._last_records) / max(now - self._last, 1e-9)
        overall = records / max(now - self.started, 1e-9)
        self.say(f"rebuild: {records:,} events read, {recent:,.0f} events/s now ({overall:,.0f} overall), "
                 f"lag {lag:,}")
        self._last, self._last_records = now, records


async def _fresh_schema(db: Database, zone: str) -> None:
    async with db.engine.begin() as conn:
        await conn.execute(text(f"DROP SCHEMA IF EXISTS {NEW_SCHEMA} CASCADE"))
        await conn.execute(text(f"CREATE SCHEMA {NEW_SCHEMA}"))
        translated = await conn.execution_options(schema_translate_map={SCHEMA: NEW_SCHEMA})
        await translated.run_sync(lambda sync: Base.metadata.create_all(sync, tables=READ_MODEL_TABLES))
        await conn.execute(text(f"INSERT INTO {NEW_SCHEMA}.meta (key, value) VALUES ('timezone', :zone)"),
                           {"zone": zone})


def _lag(end: Mapping[TopicPartition, int], position: Mapping[TopicPartition, int]) -> int:
    return sum(max(0, offset - position[tp]) for tp, offset in end.items())


async def rebuild(settings: ReportingSettings, *, say: Callable[[str], None] = print,
                  before_swap: Callable[[], Awaitable[None]] | None = None) -> RebuildResult:
    """Replay, swap, then apply what the live feed put into the old tables after the rebuild's last
    end offsets. `before_swap` lets a test publish events at the worst moment."""
    await upgrade_to_head_async(MIGRATIONS, settings.database_url)
    db = Database(settings.database_url, pool_size=2)
    started_at, started = utcnow(), time.monotonic()
    try:
        async with db.engine.connect() as lock:
            if not (await lock.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": _LOCK_KEY})).scalar():
                raise RebuildRunning("another rebuild of these read models is running")
            try:
                await _fresh_schema(db, settings.timezone)
                async with _Replay(db, settings, say) as replay:
                    await replay.run()
                    if before_swap is not None:
                        await before_swap()
                    await _swap(db, settings, started_at, replay.events)
                    await replay.tail()
            finally:
                await lock.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _LOCK_KEY})
                await lock.commit()
    finally:
        await db.dispose()
    result = RebuildResult(events=replay.events, records=replay.records, seconds=time.monotonic() - started)
    say(f"rebuild: done, {result.records:,} events read ({result.events:,} applied) in {result.seconds:,.1f} s, "
        f"{result.rate:,.0f} events/s; the rebuilt read models are live")
    return result


class _Replay:
    """One consumer (no group) over every partition, from the first offset, into a Feed."""

    def __init__(self, db: Database, settings: ReportingSettings, say: Callable[[str], None]) -> None:
        self.db, self.settings, self.say = db, settings, say
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap, group_id=None, enable_auto_commit=False,
            client_id=f"{settings.service_name}-rebuild", max_poll_records=settings.rebuild_batch_size,
            fetch_max_bytes=64 * 1024 * 1024, max_partition_fetch_bytes=8 * 1024 * 1024,
        )
        self.tps: list[TopicPartition] = []
        self.position: dict[TopicPartition, int] = {}
        self.events = self.records = 0
        self.progress = _Progress(say)

    async def __aenter__(self) -> _Replay:
        await self.consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()

    async def run(self) -> None:
        settings = self.settings
        self.tps = await topic_partitions(settings.kafka_bootstrap, settings.topics)
        if not self.tps:
            self.say("rebuild: the topics have no partitions yet: nothing to replay")
            return
        self.consumer.assign(self.tps)
        beginning = await self.consumer.beginning_offsets(self.tps)
        feed = Feed(self.db, default_zone=settings.timezone, schema=NEW_SCHEMA, synchronous_commit=False)
        await feed.init_positions(beginning)
        for tp in self.tps:
            self.consumer.seek(tp, beginning[tp])
        self.position = dict(beginning)
        end = await self.consumer.end_offsets(self.tps)
        self.say(f"rebuild: replaying {_lag(end, self.position):,} events from {len(self.tps)} partitions "
                 f"into {NEW_SCHEMA}")
        for round_ in range(CATCH_UP_ROUNDS + 1):
            await self._drain(feed, end)
            if round_ == CATCH_UP_ROUNDS:
                break
            end = await self.consumer.end_offsets(self.tps)  # what arrived meanwhile
            if not _lag(end, self.position):
                break
            self.say(f"rebuild: catching up with {_lag(end, self.position):,} events that arrived meanwhile")
        self.progress.tick(self.records, _lag(end, self.position), force=True)

    async def tail(self) -> None:
        """After the swap: what arrived since, into the live schema. The live feed may apply the same
        records at the same time; the stored positions make sure each is applied once."""
        if not self.tps:
            return
        end = await self.consumer.end_offsets(self.tps)
        if _lag(end, self.position):
            self.say(f"rebuild: applying the {_lag(end, self.position):,} events that arrived during the swap")
            await self._drain(Feed(self.db, default_zone=self.settings.timezone, schema=SCHEMA), end)

    async def _drain(self, feed: Feed, end: Mapping[TopicPartition, int]) -> None:
        while _lag(end, self.position):
            waiting = [tp for tp in self.tps if self.position[tp] < end[tp]]
            batch = await self.consumer.getmany(*waiting, timeout_ms=1000,
                                                max_records=self.settings.rebuild_batch_size)
            if not batch:
                continue
            applied = await apply_with_retries(feed, batch, self.consumer.beginning_offsets)
            for tp, records in batch.items():
                if tp in applied.seeks:
                    self.consumer.seek(tp, applied.seeks[tp])
                    self.position[tp] = applied.seeks[tp]
                elif records:  # applied now, or already (by the live feed, after the swap)
                    self.position[tp] = max(self.position[tp], records[-1].offset + 1)
            self.events += applied.events
            self.records += applied.records
            self.progress.tick(self.records, _lag(end, self.position))


async def _swap(db: Database, settings: ReportingSettings, started_at: datetime, events: int) -> None:
    async with db.engine.begin() as conn:
        await conn.execute(text(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
        await conn.execute(text(f"ALTER SCHEMA {NEW_SCHEMA} RENAME TO {SCHEMA}"))
        await conn.execute(
            text("INSERT INTO public.rebuilds (started_at, finished_at, events, timezone) "
                 "VALUES (:started, now(), :events, :zone)"),
            {"started": started_at, "events": events, "zone": settings.timezone},
        )


def main(settings: ReportingSettings) -> int:
    configure_logging(settings.service_name, settings.log_level, settings.log_json)
    try:
        asyncio.run(rebuild(settings))
    except RebuildRunning as exc:
        print(f"reporting: {exc}", flush=True)
        return 1
    return 0
