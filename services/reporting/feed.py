"""Kafka → read models, a batch of events per transaction, each event's effect exactly once.

The feed keeps its Kafka positions (next offset per partition) in its own schema, committed in the
same transaction as the effects of the events before them, and records every event id in an inbox
(the same event published twice, at two offsets, is applied once). Each transaction starts by
locking the positions of the partitions it applies and checks the batch against them:
* records before the stored position were applied already (a rebalance, another replica): skipped;
* a batch that starts after the stored position means the read models are behind what was read:
  the partition is sent back there. This is also how a running replica takes over a rebuilt schema,
  whose positions are where the rebuild stopped: it replays what the old schema had beyond them.

Why not kit.consumer: one transaction per event tops out far below the rebuild's 5,000 events/s, and
offsets committed to Kafka cannot follow the read models when a rebuild swaps them.

A batch that keeps failing is applied one event at a time, each in a savepoint, and an event the
database refuses as data (or whose payload its contract refuses) is kept in `rejected_events` and
skipped, so one bad event cannot stall a partition.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient
from pydantic import ValidationError
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from contracts.envelope import CloudEvent
from kit.db import Database
from kit.service import ensure_topics
from kit.worker import backoff_delay
from services.reporting.config import ReportingSettings
from services.reporting.models import SCHEMA
from services.reporting.periods import Zone
from services.reporting.projection import HANDLERS, Changes, Writer

log = structlog.get_logger(__name__)

Records = Mapping[TopicPartition, Sequence[ConsumerRecord]]
Beginnings = Callable[[Sequence[TopicPartition]], Awaitable[Mapping[TopicPartition, int]]]
ONE_BY_ONE_AFTER = 3  # failed attempts of a batch before it is applied event by event
# SQLSTATE classes that mean "this data cannot be stored", not "try again": data exception, integrity.
_DATA_ERRORS = ("22", "23")


@dataclass
class Applied:
    events: int = 0  # events applied (inbox-new and of interest)
    records: int = 0  # records passed over (the positions moved by this many)
    positions: dict[TopicPartition, int] = field(default_factory=dict)  # next offset, where it moved
    seeks: dict[TopicPartition, int] = field(default_factory=dict)  # where the consumer must read from
    rejected: int = 0


@dataclass
class _Rejection:
    record: ConsumerRecord
    error: str
    event: CloudEvent | None = None


def _sqlstate(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    return str(getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None) or "")


def is_data_error(exc: BaseException) -> bool:
    return isinstance(exc, DBAPIError) and _sqlstate(exc)[:2] in _DATA_ERRORS


class Feed:
    """Applies records to the read models of one schema (`reporting`, or the copy a rebuild fills)."""

    def __init__(self, db: Database, *, default_zone: str, schema: str = SCHEMA,
                 synchronous_commit: bool = True) -> None:
        self.db = db
        self.schema = schema
        self.default_zone = default_zone
        self.synchronous_commit = synchronous_commit
        # Partitions sent back to an offset, to accept a batch that still starts later (offsets the
        # log does not have, e.g. transaction markers) instead of seeking there forever.
        self._sought: dict[TopicPartition, int] = {}

    async def stored_positions(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        async with self.db.transaction() as uow:
            writer = Writer(uow.session, self.schema, Zone(self.default_zone))
            return await self._positions(writer, tps, lock=False)

    async def init_positions(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Create the positions not stored yet (at `offsets`); stored ones stay where they are."""
        if not offsets:
            return
        items = sorted(offsets.items())
        async with self.db.transaction() as uow:
            await Writer(uow.session, self.schema, Zone(self.default_zone)).execute(
                "INSERT INTO {s}.positions (topic, partition, next_offset) SELECT * FROM unnest("
                "CAST(:topics AS text[]), CAST(:parts AS int[]), CAST(:offsets AS bigint[])) ON CONFLICT DO NOTHING",
                {"topics": [tp.topic for tp, _ in items], "parts": [tp.partition for tp, _ in items],
                 "offsets": [offset for _, offset in items]},
            )

    async def _positions(self, writer: Writer, tps: Sequence[TopicPartition], *,
                         lock: bool) -> dict[TopicPartition, int]:
        ordered = sorted(set(tps))
        rows = await writer.execute(
            "SELECT topic, partition, next_offset FROM {s}.positions WHERE (topic, partition) IN "
            "(SELECT * FROM unnest(CAST(:topics AS text[]), CAST(:parts AS int[]))) ORDER BY topic, partition"
            + (" FOR UPDATE" if lock else ""),
            {"topics": [tp.topic for tp in ordered], "parts": [tp.partition for tp in ordered]},
        )
        return {TopicPartition(row.topic, row.partition): int(row.next_offset) for row in rows}

    async def _zone(self, writer: Writer) -> Zone:
        """The zone these read models count days in: the one they were first built with."""
        await writer.execute(
            "INSERT INTO {s}.meta (key, value) VALUES ('timezone', :zone) ON CONFLICT DO NOTHING",
            {"zone": self.default_zone},
        )
        value = (await writer.execute("SELECT value FROM {s}.meta WHERE key = 'timezone'")).scalar_one()
        return Zone(str(value))

    async def apply(self, batch: Records, beginnings: Beginnings, *, one_by_one: bool = False) -> Applied:
        """Apply one batch (records per partition, in offset order) in one transaction."""
        result = Applied()
        if not any(batch.values()):
            return result
        async with self.db.transaction() as uow:
            session = uow.session
            if not self.synchronous_commit:
                # A rebuild that dies is run again: its commits need not wait for the disk.
                await session.execute(text("SET LOCAL synchronous_commit = off"))
            writer = Writer(session, self.schema, Zone(self.default_zone))
            stored = await self._positions(writer, list(batch), lock=True)
            missing = [tp for tp in batch if tp not in stored]
            if missing:
                stored.update(await beginnings(missing))
            accepted: list[ConsumerRecord] = []
            for tp in sorted(batch):
                records = batch[tp]
                if not records:
                    continue
                expected = stored[tp]
                if records[0].offset > expected and self._sought.get(tp) != expected:
                    result.seeks[tp] = expected  # behind what was read: read again from there
                    self._sought[tp] = expected
                    continue
                self._sought.pop(tp, None)
                fresh = [r for r in records if r.offset >= expected]
                if fresh:
                    accepted.extend(fresh)
                    result.positions[tp] = fresh[-1].offset + 1
                    result.records += len(fresh)
            if not accepted:
                return result
            writer.zone = await self._zone(writer)
            events, rejections = _parse(accepted)
            if one_by_one:
                result.events = await self._apply_one_by_one(writer, events, rejections)
            else:
                result.events = await self._apply_together(writer, events, rejections)
            result.rejected = len(rejections)
            await self._reject(writer, rejections)
            await self._move(writer, result.positions)
        return result

    async def _claim(self, writer: Writer, events: Sequence[tuple[ConsumerRecord, CloudEvent]]) -> set[str]:
        """Record the ids in the inbox; the ids not seen before."""
        unique: dict[str, str] = {}
        for _, event in events:
            unique.setdefault(event.id, event.type)
        if not unique:
            return set()
        ids = sorted(unique)  # one order for every writer: concurrent batches never deadlock on the index
        rows = await writer.execute(
            "INSERT INTO {s}.inbox (event_id, event_type) SELECT * FROM unnest(CAST(:ids AS text[]), "
            "CAST(:types AS text[])) ON CONFLICT DO NOTHING RETURNING event_id",
            {"ids": ids, "types": [unique[i] for i in ids]},
        )
        return {row.event_id for row in rows}

    async def _apply_together(self, writer: Writer, events: Sequence[tuple[ConsumerRecord, CloudEvent]],
                              rejections: list[_Rejection]) -> int:
        new = await self._claim(writer, events)
        changes, applied = Changes(), 0
        for record, event in events:
            if event.id not in new:
                continue
            new.discard(event.id)  # the same id twice in one batch: once
            try:
                HANDLERS[event.type](changes, event)
            except (ValidationError, ValueError) as exc:
                rejections.append(_Rejection(record, _describe(exc), event))
                continue
            applied += 1
        await writer.write(changes)
        return applied

    async def _apply_one_by_one(self, writer: Writer, events: Sequence[tuple[ConsumerRecord, CloudEvent]],
                                rejections: list[_Rejection]) -> int:
        applied = 0
        for record, event in events:
            try:
                async with writer.session.begin_nested():
                    if not await self._claim(writer, [(record, event)]):
                        continue
                    changes = Changes()
                    HANDLERS[event.type](changes, event)
                    await writer.write(changes)
            except (ValidationError, ValueError) as exc:
                rejections.append(_Rejection(record, _describe(exc), event))
                continue
            except DBAPIError as exc:
                if not is_data_error(exc):
                    raise
                rejections.append(_Rejection(record, _describe(exc), event))
                continue
            applied += 1
        return applied

    async def _reject(self, writer: Writer, rejections: Sequence[_Rejection]) -> None:
        for rejection in rejections:
            record, event = rejection.record, rejection.event
            log.error("event_rejected", topic=record.topic, partition=record.partition, offset=record.offset,
                      event_id=event.id if event else None, error=rejection.error[:500])
            await writer.execute(
                "INSERT INTO {s}.rejected_events (topic, partition, \"offset\", event_id, event_type, error, payload) "
                "VALUES (:topic, :partition, :offset, :event_id, :event_type, :error, :payload) ON CONFLICT DO NOTHING",
                {"topic": record.topic, "partition": record.partition, "offset": record.offset,
                 "event_id": event.id if event else None, "event_type": event.type if event else None,
                 "error": rejection.error[:4000], "payload": bytes(record.value or b"")},
            )

    async def _move(self, writer: Writer, positions: Mapping[TopicPartition, int]) -> None:
        items = sorted(positions.items())
        if not items:
            return
        await writer.execute(
            "INSERT INTO {s}.positions (topic, partition, next_offset) SELECT * FROM unnest("
            "CAST(:topics AS text[]), CAST(:parts AS int[]), CAST(:offsets AS bigint[])) "
            "ON CONFLICT (topic, partition) DO UPDATE SET next_offset = excluded.next_offset",
            {"topics": [tp.topic for tp, _ in items], "parts": [tp.partition for tp, _ in items],
             "offsets": [offset for _, offset in items]},
        )


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _parse(records: Sequence[ConsumerRecord]) -> tuple[list[tuple[ConsumerRecord, CloudEvent]], list[_Rejection]]:
    """The records as CloudEvents of a type the read models use; unreadable ones as rejections."""
    events: list[tuple[ConsumerRecord, CloudEvent]] = []
    rejections: list[_Rejection] = []
    for record in records:
        try:
            event = CloudEvent.model_validate_json(record.value or b"")
        except ValidationError as exc:
            rejections.append(_Rejection(record, _describe(exc)))
            continue
        if event.type in HANDLERS:
            events.append((record, event))
    return events, rejections


async def apply_with_retries(feed: Feed, batch: Records, beginnings: Beginnings, *,
                             stop: asyncio.Event | None = None) -> Applied:
    """Apply a batch, retrying with kit's backoff; after a few failures, one event at a time."""
    failures = 0
    while True:
        try:
            return await feed.apply(batch, beginnings, one_by_one=failures >= ONE_BY_ONE_AFTER)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failures += 1
            log.warning("feed_batch_failed", attempt=failures, error=str(exc)[:500])
            if stop is not None and stop.is_set():
                raise
            await asyncio.sleep(backoff_delay(failures, initial=0.2, maximum=30.0))


async def topic_partitions(bootstrap: str, topics: Sequence[str]) -> list[TopicPartition]:
    """Every partition of the topics that exist (asked of the cluster, not of a consumer's cache)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(list(topics))
    finally:
        await admin.close()
    return sorted(TopicPartition(t["topic"], p["partition"]) for t in described if t["error_code"] == 0
                  for p in t["partitions"])


class _SeekToStoredPositions(ConsumerRebalanceListener):
    """On assignment, each partition continues from the position stored with the read models."""

    def __init__(self, feed: Feed, consumer: AIOKafkaConsumer) -> None:
        self.feed = feed
        self.consumer = consumer

    async def on_partitions_revoked(self, revoked: Any) -> None:
        return None

    async def on_partitions_assigned(self, assigned: Any) -> None:
        tps = sorted(assigned)
        if not tps:
            return
        await self.feed.init_positions(await self.consumer.beginning_offsets(tps))
        for tp, offset in (await self.feed.stored_positions(tps)).items():
            self.consumer.seek(tp, offset)


class LiveFeed:
    """The service's consumer group over the invoice, payment and subscription topics."""

    def __init__(self, feed: Feed, settings: ReportingSettings) -> None:
        self.feed = feed
        self.settings = settings
        self.applied = 0
        self.generation = 0  # batches that changed the read models (report caches key on it)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="reporting-feed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        attempt = 0
        while True:
            try:
                await self._consume()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                attempt += 1
                log.warning("feed_restarting", attempt=attempt, error=str(exc)[:500])
                await asyncio.sleep(backoff_delay(attempt, initial=0.5, maximum=30.0))

    async def _consume(self) -> None:
        settings = self.settings
        await ensure_topics(settings.kafka_bootstrap, settings.topics)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap, group_id=settings.group_id,
            client_id=f"{settings.service_name}-feed", enable_auto_commit=False, auto_offset_reset="earliest",
            max_poll_records=settings.feed_batch_size,
        )
        consumer.subscribe(list(settings.topics), listener=_SeekToStoredPositions(self.feed, consumer))
        await consumer.start()
        try:
            while True:
                batch = await consumer.getmany(timeout_ms=1000, max_records=settings.feed_batch_size)
                if not batch:
                    continue
                applied = await apply_with_retries(self.feed, batch, consumer.beginning_offsets)
                for tp, offset in applied.seeks.items():
                    with contextlib.suppress(Exception):  # revoked meanwhile: its new owner seeks itself
                        consumer.seek(tp, offset)
                self.applied += applied.events
                if applied.events or applied.rejected:
                    self.generation += 1
                if applied.events:
                    log.info("feed_applied", events=applied.events, records=applied.records)
        finally:
            await consumer.stop()
