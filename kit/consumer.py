"""Exactly-once effects from at-least-once Kafka delivery.

Each event is applied inside one unit of work that also records its id in the inbox; the Kafka
offset is committed only after that transaction commits. A repeat finds the inbox row and is
skipped; a crash before commit leaves the offset uncommitted, so the event comes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import structlog
from aiokafka import TopicPartition
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from pydantic import ValidationError

from contracts import topics
from contracts.deadletter import EVENT_TYPE as DEADLETTER_TYPE
from contracts.deadletter import SCHEMA_V1 as DEADLETTER_SCHEMA
from contracts.deadletter import DeadLetterV1
from contracts.envelope import CloudEvent
from kit import tracing
from kit.db import Database, UnitOfWork
from kit.deadletter import (
    EventFailureMixin,
    failure_model_of,
    forget_failures,
    forget_many_failures,
    record_failure,
)
from kit.errors import AppError
from kit.logging import bind_correlation_id
from kit.metrics import DEAD_LETTERED, EVENTS_HANDLED

log = structlog.get_logger(__name__)

EventHandler = Callable[[UnitOfWork, CloudEvent], Awaitable[None]]
# A batch consumer's poll waits this long for records when none are buffered (FastStream then sleeps as
# long again): the extra delay of the first event after a quiet spell.
BATCH_WAIT_MS = 20


class EventConsumer:
    def __init__(
        self,
        db: Database,
        name: str,
        handlers: Mapping[str, EventHandler],
        *,
        retry_delays: tuple[float, ...] = (0.05, 0.2, 0.5, 1.0, 2.0),
        max_redeliveries: int = 5,
        failure_model: type[EventFailureMixin] | None = None,
    ) -> None:
        self._db = db
        self.name = name
        self._handlers = handlers
        self._retry_delays = retry_delays
        self._max_redeliveries = max_redeliveries
        # Failed deliveries are counted in the service's event_failures table (found on its Base unless
        # given), so the count survives a restart or a rebalance; in this process only if it has none.
        self._failure_model = failure_model or failure_model_of(db)
        self._failures: dict[str, int] = {}  # event id -> failed deliveries, when the table is missing or down
        if self._failure_model is None:
            log.warning("event_failures_not_durable", consumer=name)

    async def apply(self, event: CloudEvent) -> bool:
        """Apply one event once. Returns False when it was a duplicate or of no interest."""
        handler = self._handlers.get(event.type)
        if handler is None:
            return False
        async with self._db.transaction() as uow:
            if self._failure_model is not None:  # applied (or a duplicate): its earlier failures are moot
                await forget_failures(uow.session, self._failure_model, consumer=self.name, event_id=event.id)
            if not await uow.claim_event(event.id, event.type, self.name):
                log.info("event_duplicate_skipped", event_id=event.id, event_type=event.type)
                return False
            await handler(uow, event)
        return True

    async def _count_failure(self, event: CloudEvent, error: Exception) -> int:
        """One more failed delivery of `event`; returns how many there were, in every process."""
        if self._failure_model is not None:
            try:
                failures = await record_failure(self._db, self._failure_model, consumer=self.name, event=event,
                                                error=error)
            except Exception as exc:  # the database is down: count here, park later if it comes back
                log.error("event_failure_not_recorded", consumer=self.name, event_id=event.id, error=str(exc)[:500])
            else:
                self._failures.pop(event.id, None)
                return failures
        failures = self._failures.get(event.id, 0) + 1
        self._failures[event.id] = failures
        return failures

    async def _dead_letter(self, event: CloudEvent, error: Exception, attempts: int, topic: str | None = None) -> bool:
        """Park the event on billing.deadletter through the outbox. False if even that fails (e.g. the
        database is down): then the event is redelivered as before, nothing is lost."""
        if self._db.outbox_model is None:
            return False
        try:
            async with self._db.transaction() as uow:
                parked = DeadLetterV1(consumer=self.name, event_id=event.id, event_type=event.type,
                                      error=str(error)[:2000], attempts=attempts,
                                      event=event.model_dump(mode="json"), topic=topic)
                uow.publish(
                    CloudEvent.create(source=self.name, type=DEADLETTER_TYPE, subject=event.subject or event.id,
                                      data=parked, correlation_id=event.correlationid,
                                      dataschema=DEADLETTER_SCHEMA),
                    topic=topics.DEADLETTER, key=event.subject or event.id,
                )
                # Gone with the parking: a replay (after the fix) is a fresh event with its full retries.
                if self._failure_model is not None:
                    await forget_failures(uow.session, self._failure_model, consumer=self.name, event_id=event.id)
        except Exception as exc:
            log.error("event_dead_letter_failed", consumer=self.name, event_id=event.id, error=str(exc))
            return False
        log.error("event_dead_lettered", consumer=self.name, event_id=event.id, event_type=event.type,
                  attempts=attempts, error=str(error)[:500])
        return True

    async def handle_message(self, message: KafkaMessage) -> str:
        """Handle one delivery; returns its outcome (the `outcome` label of billing_consumer_handling_seconds)."""
        # A span continuing the trace of the relay's send (Kafka headers): its effects, and the events
        # it publishes, join that trace.
        with tracing.consuming(message, consumer=self.name):
            return await self._handle_message(message)

    async def _handle_message(self, message: KafkaMessage) -> str:
        try:
            event = CloudEvent.model_validate_json(message.body)
        except ValidationError as exc:
            log.error("event_malformed_dropped", consumer=self.name, error=str(exc)[:500])
            await message.ack()
            return "malformed"
        outcome = await self._handle_event(event, _topic_of(message))
        if outcome == "failed":
            await message.nack()  # rewinds the partition: the event comes back
        else:
            await message.ack()
        return outcome

    def _done(self, event: CloudEvent, *, applied: bool) -> str:
        """An event handled without error (applied, or not for this consumer): its outcome."""
        self._failures.pop(event.id, None)
        if applied:
            log.info("event_applied", consumer=self.name, event_type=event.type, subject=event.subject)
            return "applied"
        return "duplicate" if event.type in self._handlers else "ignored"

    async def _handle_event(self, event: CloudEvent, topic: str | None) -> str:
        """Apply one event with its retries; its outcome. "failed": it must be delivered again."""
        bind_correlation_id(event.correlationid)
        for attempt, delay in enumerate((*self._retry_delays, None)):
            try:
                outcome = self._done(event, applied=await self.apply(event))
                break
            except AppError as exc:
                # The domain refuses it (e.g. a payment for a cancelled invoice): retrying cannot help.
                log.warning(
                    "event_refused", consumer=self.name, event_id=event.id, event_type=event.type,
                    code=exc.code, reason=exc.message,
                )
                outcome = "refused"
                break
            except Exception as exc:
                if delay is None:
                    failures = await self._count_failure(event, exc)
                    if failures >= self._max_redeliveries and await self._dead_letter(
                            event, exc, failures, topic=topic):
                        self._failures.pop(event.id, None)
                        DEAD_LETTERED.labels(self.name, topic or "").inc()
                        outcome = "dead_lettered"
                        break  # parked: acked so the partition moves on
                    log.error("event_failed_will_redeliver", consumer=self.name, event_id=event.id,
                              failures=failures, error=str(exc))
                    return "failed"
                log.warning("event_retry", consumer=self.name, attempt=attempt + 1, error=str(exc))
                await asyncio.sleep(delay)
        return outcome

    # -- batches ------------------------------------------------------------------------------------

    async def apply_batch(self, events: Sequence[CloudEvent]) -> list[CloudEvent]:
        """Apply `events` in order in one transaction (one claim and one commit for all of them);
        returns those applied (not duplicates, of interest). Raises, with nothing kept, if any fails."""
        wanted = [e for e in events if e.type in self._handlers]
        if not wanted:
            return []
        async with self._db.transaction() as uow:
            if self._failure_model is not None:  # applied (or duplicates): their earlier failures are moot
                await forget_many_failures(uow.session, self._failure_model, consumer=self.name,
                                           event_ids=[e.id for e in wanted])
            fresh = await uow.claim_events([(e.id, e.type) for e in wanted], self.name)
            applied = []
            for event in wanted:
                if event.id in fresh:
                    fresh.discard(event.id)  # an id twice in one batch is applied once
                    bind_correlation_id(event.correlationid)  # what the events it publishes carry
                    await self._handlers[event.type](uow, event)
                    applied.append(event)
        return applied

    async def handle_batch(self, message: KafkaMessage) -> Counter[tuple[str, str]]:
        """Handle one batch of records (from one or more partitions of one or more topics, each
        partition in its order): all in one transaction; if that fails, each on its own as
        `handle_message` does, and a record that must come again rewinds its partition to it (the
        records behind it on that partition wait too). The offsets are committed after. Returns the
        count of each (topic, outcome)."""
        records: tuple[Any, ...] = message.raw_message if isinstance(message.raw_message, tuple) else ()
        outcomes: Counter[tuple[str, str]] = Counter()
        parsed: list[tuple[Any, CloudEvent]] = []
        for record in records:
            try:
                parsed.append((record, CloudEvent.model_validate_json(record.value)))
            except ValidationError as exc:
                log.error("event_malformed_dropped", consumer=self.name, error=str(exc)[:500])
                outcomes[(record.topic, "malformed")] += 1
        if await self._batch_at_once(parsed, outcomes):
            await message.ack()
            return outcomes
        rewind: dict[TopicPartition, int] = {}
        for record, event in parsed:
            partition = TopicPartition(record.topic, record.partition)
            if partition in rewind:
                continue  # behind a record that comes again: it comes again too, in order
            with tracing.consuming(_RecordView(record), consumer=self.name):
                outcome = await self._handle_event(event, record.topic)
            outcomes[(record.topic, outcome)] += 1
            if outcome == "failed":
                rewind[partition] = record.offset
        for partition, offset in rewind.items():
            message.consumer.seek(partition, offset)
        await message.ack()  # commits every partition's position: the rewound ones at their failed record
        return outcomes

    async def _batch_at_once(self, parsed: list[tuple[Any, CloudEvent]],
                             outcomes: Counter[tuple[str, str]]) -> bool:
        if not parsed:
            return True
        spans = contextlib.ExitStack()
        try:
            with spans:
                for record, _ in parsed:  # one span per record, each continuing its own trace
                    spans.enter_context(tracing.consuming(_RecordView(record), consumer=self.name))
                applied = await self.apply_batch([event for _, event in parsed])
        except Exception as exc:  # redone one by one, with the retries and parking of each
            log.info("event_batch_retry_one_by_one", consumer=self.name, events=len(parsed), error=str(exc)[:300])
            return False
        done = {event.id for event in applied}
        for record, event in parsed:
            outcomes[(record.topic, self._done(event, applied=event.id in done))] += 1
        return True

    def subscribe(self, broker: KafkaBroker, *topics: str, group_id: str, workers: int = 3, batch: int = 0) -> None:
        """One subscriber per topic with `workers` consumers in the group: partitions are handled in
        parallel, each partition (hence each aggregate) still strictly in order.

        `batch` > 0: one consumer for all the topics instead, taking up to `batch` records a poll and
        applying them in one transaction (`handle_batch`): a commit per batch, not per event, which is
        what a busy topic needs. Only for handlers whose effects are all in the database: a failed batch
        is redone event by event, so a handler's outside effect (an email, an HTTP call) could happen
        twice. One consumer, so one member of the group: a start or a restart is one rebalance, where a
        consumer per topic joined one after another, each join a rebalance of its own (about 3 s each:
        the members rejoin on their next heartbeat)."""
        async def one(body: Any, message: KafkaMessage) -> None:
            # The raw bytes are parsed here, so a malformed event is dropped with a log, not a crash loop.
            started = time.perf_counter()
            outcome = await self.handle_message(message)
            EVENTS_HANDLED.labels(self.name, _topic_of(message) or "", group_id,
                                  outcome).observe(time.perf_counter() - started)

        async def many(body: Any, message: KafkaMessage) -> None:
            started = time.perf_counter()
            outcomes = await self.handle_batch(message)
            each = (time.perf_counter() - started) / max(1, sum(outcomes.values()))
            for (topic, outcome), n in outcomes.items():
                histogram = EVENTS_HANDLED.labels(self.name, topic, group_id, outcome)
                for _ in range(n):
                    histogram.observe(each)

        common: dict[str, Any] = {"group_id": group_id, "ack_policy": AckPolicy.MANUAL,
                                  "auto_offset_reset": "earliest"}
        if batch > 0:
            many.__name__ = f"{self.name}_batch_handler"
            # The document's channels stay "<name>:<topic>" (FastStream adds the topic to the title
            # of a subscriber of several).
            title = self.name if len(topics) > 1 else f"{self.name}:{topics[0]}"
            broker.subscriber(*topics, title=title, batch=True, max_records=batch, batch_timeout_ms=BATCH_WAIT_MS,
                              **common)(many)
            return
        one.__name__ = f"{self.name}_handler"
        # `workers` consumers of a record at a time per topic (FastStream's concurrent manual-commit
        # subscriber takes a single topic).
        for topic in topics:
            broker.subscriber(topic, title=f"{self.name}:{topic}", max_workers=workers, **common)(one)


class _RecordView:
    """A record of a batch as kit.tracing.consuming reads a message: its headers and the record."""

    def __init__(self, record: Any) -> None:
        self.raw_message = record
        self.headers = {key: value.decode("utf-8", "replace") if isinstance(value, bytes) else value
                        for key, value in (record.headers or ())}


def _topic_of(message: KafkaMessage) -> str | None:
    """The topic a message was read from (recorded with a dead letter, for its replay)."""
    raw = message.raw_message
    topic = getattr(raw[0] if isinstance(raw, tuple) and raw else raw, "topic", None)
    return topic if isinstance(topic, str) else None
