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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from aiokafka import AIOKafkaConsumer, TopicPartition
from sqlalchemy import text

from kit.clock import utcnow
from kit.db import Database
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


async def rebuild(settings: ReportingSettings, *, say: Callable[[str], None] = print) -> RebuildResult:
    await upgrade_to_head_async(MIGRATIONS, settings.database_url)
    db = Database(settings.database_url, pool_size=2)
    started_at, started = utcnow(), time.monotonic()
    try:
        async with db.engine.connect() as lock:
            if not (await lock.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": _LOCK_KEY})).scalar():
                raise RebuildRunning("another rebuild of these read models is running")
            try:
                await _fresh_schema(db, settings.timezone)
                feed = Feed(db, default_zone=settings.timezone, schema=NEW_SCHEMA, synchronous_commit=False)
                events, records = await _replay(feed, settings, say)
                await _swap(db, settings, started_at, events)
            finally:
                await lock.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _LOCK_KEY})
                await lock.commit()
    finally:
        await db.dispose()
    result = RebuildResult(events=events, records=records, seconds=time.monotonic() - started)
    say(f"rebuild: done, {result.records:,} events read ({result.events:,} applied) in {result.seconds:,.1f} s, "
        f"{result.rate:,.0f} events/s; the rebuilt read models are live")
    return result


async def _replay(feed: Feed, settings: ReportingSettings, say: Callable[[str], None]) -> tuple[int, int]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, group_id=None, enable_auto_commit=False,
        client_id=f"{settings.service_name}-rebuild", max_poll_records=settings.rebuild_batch_size,
        fetch_max_bytes=64 * 1024 * 1024, max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    await consumer.start()
    try:
        tps = await topic_partitions(settings.kafka_bootstrap, settings.topics)
        if not tps:
            say("rebuild: the topics have no partitions yet: nothing to replay")
            return 0, 0
        consumer.assign(tps)
        beginning = await consumer.beginning_offsets(tps)
        await feed.init_positions(beginning)
        for tp in tps:
            consumer.seek(tp, beginning[tp])
        position = dict(beginning)
        end = await consumer.end_offsets(tps)
        say(f"rebuild: replaying {_lag(end, position):,} events from {len(tps)} partitions into {NEW_SCHEMA}")
        progress = _Progress(say)
        events = records = 0
        for round_ in range(CATCH_UP_ROUNDS + 1):
            while _lag(end, position):
                waiting = [tp for tp in tps if position[tp] < end[tp]]
                batch = await consumer.getmany(*waiting, timeout_ms=1000, max_records=settings.rebuild_batch_size)
                if not batch:
                    continue
                applied = await apply_with_retries(feed, batch, consumer.beginning_offsets)
                for tp, offset in applied.seeks.items():
                    consumer.seek(tp, offset)
                    position[tp] = offset
                position.update(applied.positions)
                events += applied.events
                records += applied.records
                progress.tick(records, _lag(end, position))
            if round_ == CATCH_UP_ROUNDS:
                break
            end = await consumer.end_offsets(tps)  # what arrived meanwhile
            if not _lag(end, position):
                break
            say(f"rebuild: catching up with {_lag(end, position):,} events that arrived meanwhile")
        progress.tick(records, _lag(end, position), force=True)
        return events, records
    finally:
        await consumer.stop()


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
    try:
        asyncio.run(rebuild(settings))
    except RebuildRunning as exc:
        print(f"reporting: {exc}", flush=True)
        return 1
    return 0
