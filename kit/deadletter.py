"""Dead letters: a durable redelivery count per event, and the operator's command for parked events.

The count. `kit.consumer.EventConsumer` records each failed delivery of an event in the service's
`event_failures` table (one row per consumer and event id), in a transaction of its own, so the count
survives a restart or a rebalance to another replica: a poison event is parked after N failed
deliveries whichever processes saw them. The row goes away in the transaction that applies the event
or parks it, so an event whose row is gone is fresh: that is what a replay (after the cause is
fixed) finds, and why it gets its full N deliveries again.

    class EventFailure(EventFailureMixin, Base): pass      # in the service's models.py
    create_table_in_migration()                             # in one of its Alembic migrations

The command, `python -m kit.deadletter list|show ID|replay ID|replay --all` (see `--help`), reads
billing.deadletter from the beginning up to its end offsets (it never waits for more):
* `list`: one line per parked event (parked id, consumer, original type, subject, attempts, when,
  replayed or not, the head of the error);
* `show ID`: the whole dead letter as JSON (ID: the parked id, or an unambiguous prefix of it);
* `replay ID`: publishes the ORIGINAL event again (same id, key = its subject, on its original
  topic), then records `deadletter.replayed` on billing.deadletter; a second replay of it is refused
  without `--force`. The event was never claimed in the parking consumer's inbox (its handler
  failed), so the replay is applied there once; a duplicate replay, and every other consumer group
  of that topic that applied the event before, skip it by their inbox.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from typing import Any

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import DateTime, Delete, Integer, String, Table, Text, any_, bindparam, delete, func
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from contracts import topics
from contracts.deadletter import (
    EVENT_TYPE,
    REPLAY_HEADER,
    REPLAYED_SCHEMA_V1,
    REPLAYED_TYPE,
    TOPIC_BY_TYPE_PREFIX,
    DeadLetterReplayedV1,
    DeadLetterV1,
)
from contracts.envelope import CONTENT_TYPE, CloudEvent
from kit.db import Database

MAX_ERROR = 2000  # characters of the last error kept per event


class EventFailureMixin:
    """Failed deliveries of an event to a consumer. Mixed into a service's Base:
    `class EventFailure(EventFailureMixin, Base): pass`."""

    __tablename__ = "event_failures"

    consumer: Mapped[str] = mapped_column(String(100), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    event_type: Mapped[str] = mapped_column(String(200))
    failures: Mapped[int] = mapped_column(Integer)
    last_error: Mapped[str] = mapped_column(Text)
    first_failed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    last_failed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


def create_table_in_migration() -> None:
    """The `event_failures` table of EventFailureMixin, for a service's Alembic migration."""
    import sqlalchemy as sa
    from alembic import op

    op.create_table(
        "event_failures",
        sa.Column("consumer", sa.String(length=100), nullable=False),
        sa.Column("event_id", sa.String(length=200), nullable=False),
        sa.Column("event_type", sa.String(length=200), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("first_failed_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("last_failed_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("consumer", "event_id"),
    )


def failure_model_of(db: Database) -> type[EventFailureMixin] | None:
    """The service's EventFailureMixin model, found on the Base its inbox model is registered on."""
    if db.inbox_model is None:
        return None
    registry = getattr(db.inbox_model, "registry", None)
    if registry is None:
        return None
    for mapper in registry.mappers:
        if issubclass(mapper.class_, EventFailureMixin):
            found: type[EventFailureMixin] = mapper.class_
            return found
    return None


def _storable(text: str) -> str:
    # PostgreSQL text cannot hold NUL; an error message quoting hostile input may.
    return text.replace("\x00", "\\0")[:MAX_ERROR]


async def record_failure(db: Database, model: type[EventFailureMixin], *, consumer: str, event: CloudEvent,
                         error: BaseException) -> int:
    """Count one more failed delivery of `event` (its own transaction); returns the count so far."""
    message = _storable(f"{type(error).__name__}: {error}")
    stmt = insert(model).values(consumer=consumer, event_id=event.id, event_type=_storable(event.type)[:200],
                                failures=1, last_error=message).on_conflict_do_update(
        index_elements=[model.consumer, model.event_id],
        set_={"failures": model.failures + 1, "last_error": message, "last_failed_at": func.now()},
    ).returning(model.failures)
    async with db.transaction() as uow:
        failures: int = (await uow.session.execute(stmt)).scalar_one()
    return failures


async def forget_failures(session: AsyncSession, model: type[EventFailureMixin], *, consumer: str,
                          event_id: str) -> None:
    """Drop the event's failure row, in the transaction that applies or parks it."""
    await session.execute(_forget(model.__table__), {"consumer": consumer, "event_id": event_id})  # type: ignore[attr-defined]


async def forget_many_failures(session: AsyncSession, model: type[EventFailureMixin], *, consumer: str,
                               event_ids: Sequence[str]) -> None:
    """forget_failures for a batch of events, in one statement."""
    await session.execute(_forget_many(model.__table__), {"consumer": consumer, "ids": list(event_ids)})  # type: ignore[attr-defined]


@cache
def _forget_many(table: Table) -> Delete:
    return delete(table).where(table.c.consumer == bindparam("consumer"),
                               table.c.event_id == any_(bindparam("ids", type_=ARRAY(String))))


@cache
def _forget(table: Table) -> Delete:
    # Once per table, values bound at execution: this runs for every event applied (3% of a consumer's
    # CPU when it was built per call).
    return delete(table).where(table.c.consumer == bindparam("consumer"), table.c.event_id == bindparam("event_id"))


# --- the command -------------------------------------------------------------------------------

PROG = "python -m kit.deadletter"
USAGE_ERROR = 2
FAILED = 1


class DeadLetterSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DEADLETTER_", extra="ignore")

    kafka_bootstrap: str = "127.0.0.1:9092"
    topic: str = topics.DEADLETTER
    # Seconds to wait for Kafka (connecting, reading up to the end offsets, each publish).
    timeout: float = Field(default=30.0, gt=0)


class CommandError(Exception):
    """A failure to report as one line on stderr."""


@dataclass
class Parked:
    parked_id: str
    parked_at: datetime
    subject: str | None
    letter: DeadLetterV1
    replays: list[tuple[datetime, DeadLetterReplayedV1]] = field(default_factory=list)

    @property
    def original_topic(self) -> str | None:
        if self.letter.topic:
            return self.letter.topic
        return TOPIC_BY_TYPE_PREFIX.get(self.letter.event_type.split(".", 1)[0])

    @property
    def key(self) -> str:
        subject = self.letter.event.get("subject")
        return subject if isinstance(subject, str) and subject else self.letter.event_id

    def as_json(self) -> dict[str, Any]:
        return {
            "parkedId": self.parked_id,
            "parkedAt": self.parked_at.isoformat(),
            **self.letter.model_dump(mode="json", by_alias=True),
            "replays": [{"at": at.isoformat(), "forced": replay.forced} for at, replay in self.replays],
        }


@dataclass
class DeadLetters:
    parked: list[Parked]
    skipped: int  # records on the topic that are not dead letters we can read


def _kafka_error(settings: DeadLetterSettings, exc: BaseException) -> CommandError:
    return CommandError(
        f"cannot talk to Kafka at {settings.kafka_bootstrap!r} (DEADLETTER_KAFKA_BOOTSTRAP or --bootstrap): "
        f"{type(exc).__name__}: {exc}".rstrip(": ")
    )


async def read_dead_letters(settings: DeadLetterSettings) -> DeadLetters:
    """Everything on the dead-letter topic from its beginning to its end offsets at the time of the call."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.errors import KafkaError

    timeout_ms = int(settings.timeout * 1000)
    # "earliest": with the default ("latest") the fetcher's own reset can land after our seek and
    # skip everything.
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                request_timeout_ms=max(timeout_ms, 1000),
                                connections_max_idle_ms=max(timeout_ms * 2, 10_000))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.timeout
    try:
        await asyncio.wait_for(consumer.start(), settings.timeout)
    except (KafkaError, OSError, TimeoutError, ValueError) as exc:
        await consumer.stop()
        raise _kafka_error(settings, exc) from exc
    records: list[Any] = []
    try:
        partitions = await _partitions(settings)
        if not partitions:  # no dead letter ever (or the topic is being created this moment)
            return DeadLetters(parked=[], skipped=0)
        tps = [TopicPartition(settings.topic, p) for p in partitions]
        consumer.assign(tps)
        end = await consumer.end_offsets(tps)
        begin = await consumer.beginning_offsets(tps)
        for tp in tps:
            consumer.seek(tp, begin[tp])
        remaining = {tp for tp in tps if end[tp] > begin[tp]}
        while remaining:
            if loop.time() > deadline:
                raise CommandError(f"reading {settings.topic} did not reach its end offsets within "
                                   f"{settings.timeout:g} s (DEADLETTER_TIMEOUT or --timeout)")
            batch = await consumer.getmany(*remaining, timeout_ms=500)
            for batch_records in batch.values():
                records.extend(batch_records)
            for tp in list(remaining):
                if await consumer.position(tp) >= end[tp]:
                    remaining.discard(tp)
    except KafkaError as exc:
        raise _kafka_error(settings, exc) from exc
    finally:
        await consumer.stop()
    return _parse(records)


async def _partitions(settings: DeadLetterSettings) -> list[int]:
    """The topic's partitions, without creating it (a metadata request from a client may)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap,
                                request_timeout_ms=max(int(settings.timeout * 1000), 1000))
    await admin.start()
    try:
        if settings.topic not in await admin.list_topics():
            return []
        described = await admin.describe_topics([settings.topic])
    finally:
        await admin.close()
    return sorted(int(p["partition"]) for topic in described if topic.get("topic") == settings.topic
                  for p in topic.get("partitions") or ())


def _parse(records: Sequence[Any]) -> DeadLetters:
    parked: dict[str, Parked] = {}
    replays: list[tuple[datetime, DeadLetterReplayedV1]] = []
    skipped = 0
    for record in records:
        try:
            event = CloudEvent.model_validate_json(record.value)
            if event.type == EVENT_TYPE:
                parked[event.id] = Parked(event.id, event.time, event.subject, event.data_as(DeadLetterV1))
            elif event.type == REPLAYED_TYPE:
                replays.append((event.time, event.data_as(DeadLetterReplayedV1)))
            else:
                skipped += 1
        except (ValidationError, ValueError, TypeError):
            skipped += 1
    for at, replay in replays:
        if (entry := parked.get(replay.parked_id)) is not None:
            entry.replays.append((at, replay))
    ordered = sorted(parked.values(), key=lambda p: (p.parked_at, p.parked_id))
    return DeadLetters(parked=ordered, skipped=skipped)


def find(letters: DeadLetters, parked_id: str) -> Parked:
    """The dead letter with this parked id, or the only one whose id starts with it."""
    exact = [p for p in letters.parked if p.parked_id == parked_id]
    matches = exact or [p for p in letters.parked if parked_id and p.parked_id.startswith(parked_id)]
    if not matches:
        raise CommandError(f"no parked event with id {parked_id!r} on the dead-letter topic "
                           f"(`{PROG} list` shows the ids)")
    if len(matches) > 1:
        raise CommandError(f"{parked_id!r} is the start of {len(matches)} parked ids; give more of it")
    return matches[0]


def _head(text: str, width: int) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def format_line(entry: Parked) -> str:
    letter = entry.letter
    replayed = f"replayed {entry.replays[-1][0]:%Y-%m-%dT%H:%M:%SZ}" if entry.replays else "parked"
    return "  ".join([
        entry.parked_id, letter.consumer, letter.event_type, entry.subject or "-",
        f"attempts={letter.attempts}", f"{entry.parked_at:%Y-%m-%dT%H:%M:%SZ}", replayed,
        _head(letter.error, 80),
    ])


async def replay(settings: DeadLetterSettings, letters: DeadLetters, chosen: Sequence[Parked], *,
                 force: bool) -> list[Parked]:
    """Publish each chosen event again on its topic, then record its replay. Refuses (before
    publishing anything) an event replayed before unless `force`; one original event parked by
    several consumers goes out once."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaError

    replayed_events = {(p.letter.event_id, p.letter.consumer) for p in letters.parked if p.replays}
    for entry in chosen:
        if not force and (entry.replays or (entry.letter.event_id, entry.letter.consumer) in replayed_events):
            when = f" at {entry.replays[-1][0]:%Y-%m-%dT%H:%M:%SZ}" if entry.replays else " (parked again since)"
            raise CommandError(f"{entry.parked_id} ({entry.letter.event_type} {entry.letter.event_id}) was "
                               f"already replayed{when}; --force publishes it again (the consumer's inbox "
                               f"skips it if it was applied)")
        if entry.original_topic is None:
            raise CommandError(f"{entry.parked_id}: no topic for event type {entry.letter.event_type!r} "
                               f"(not in contracts.deadletter.TOPIC_BY_TYPE_PREFIX, none recorded)")
        try:
            CloudEvent.model_validate(entry.letter.event)
        except ValidationError as exc:
            raise CommandError(f"{entry.parked_id}: the parked event is not a valid CloudEvent: {exc}") from exc
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, enable_idempotence=True, acks="all",
                                request_timeout_ms=max(int(settings.timeout * 1000), 1000))
    try:
        await asyncio.wait_for(producer.start(), settings.timeout)
    except (KafkaError, OSError, TimeoutError, ValueError) as exc:
        await producer.stop()
        raise _kafka_error(settings, exc) from exc
    done: list[Parked] = []
    published: set[str] = set()
    try:
        for entry in chosen:
            letter, topic = entry.letter, entry.original_topic
            assert topic is not None  # checked above
            original = CloudEvent.model_validate(letter.event)
            if original.id not in published:
                # The original's fields, extensions included, as it was parked: same id, so inboxes dedupe.
                headers = [("content-type", CONTENT_TYPE.encode()), ("ce_type", original.type.encode()),
                           (REPLAY_HEADER, entry.parked_id.encode())]
                if original.correlationid:
                    headers.append(("correlation_id", original.correlationid.encode()))
                await asyncio.wait_for(producer.send_and_wait(
                    topic, json.dumps(letter.event).encode(), key=entry.key.encode(), headers=headers),
                    settings.timeout)
                published.add(original.id)
            marker = CloudEvent.create(
                source="kit.deadletter", type=REPLAYED_TYPE, subject=entry.subject or entry.key,
                data=DeadLetterReplayedV1(parked_id=entry.parked_id, consumer=letter.consumer,
                                          event_id=letter.event_id, event_type=letter.event_type, topic=topic,
                                          forced=bool(entry.replays)),
                correlation_id=original.correlationid, dataschema=REPLAYED_SCHEMA_V1,
            )
            await asyncio.wait_for(producer.send_and_wait(
                settings.topic, marker.to_bytes(), key=(entry.subject or entry.key).encode(),
                headers=[("content-type", CONTENT_TYPE.encode()), ("ce_type", REPLAYED_TYPE.encode())]),
                settings.timeout)
            done.append(entry)
    except (KafkaError, TimeoutError) as exc:
        names = ", ".join(p.parked_id for p in done) or "none"
        raise CommandError(f"{_kafka_error(settings, exc)} (replayed before the failure: {names})") from exc
    finally:
        await producer.stop()
    return done


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="List, inspect and replay events consumers parked on the dead-letter topic "
                    f"({topics.DEADLETTER}).",
        epilog="settings (environment variables; a flag wins):\n"
               "  DEADLETTER_KAFKA_BOOTSTRAP  Kafka bootstrap servers, default 127.0.0.1:9092 (--bootstrap)\n"
               f"  DEADLETTER_TOPIC            the dead-letter topic, default {topics.DEADLETTER} (--topic)\n"
               "  DEADLETTER_TIMEOUT          seconds to wait for Kafka, default 30 (--timeout)\n"
               "exit status: 0 done, 1 failed (Kafka, unknown id, refused replay), 2 usage or setting error",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--bootstrap", help="Kafka bootstrap servers (host:port[,host:port])")
    parser.add_argument("--topic", help="the dead-letter topic")
    parser.add_argument("--timeout", type=float, help="seconds to wait for Kafka")
    commands = parser.add_subparsers(dest="command", required=True, metavar="list|show|replay")
    listing = commands.add_parser("list", help="one line per parked event")
    listing.add_argument("--consumer", help="only events this consumer parked")
    listing.add_argument("--pending", action="store_true", help="only events not replayed yet")
    show = commands.add_parser("show", help="one parked event, whole, as JSON")
    show.add_argument("id", help="parked id (or an unambiguous prefix)")
    again = commands.add_parser("replay", help="publish a parked event again on its original topic")
    again.add_argument("id", nargs="?", help="parked id (or an unambiguous prefix)")
    again.add_argument("--all", action="store_true", help="every parked event not replayed yet")
    again.add_argument("--consumer", help="with --all: only events this consumer parked")
    again.add_argument("--force", action="store_true", help="replay even if it was replayed before")
    return parser


def _settings(args: argparse.Namespace) -> DeadLetterSettings:
    overrides = {name: value for name, value in (("kafka_bootstrap", args.bootstrap), ("topic", args.topic),
                                                 ("timeout", args.timeout)) if value is not None}
    try:
        settings = DeadLetterSettings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(f"DEADLETTER_{str(e['loc'][0]).upper()}: {e['msg']}" for e in exc.errors())
        raise SystemExit(_fail(problems, USAGE_ERROR)) from None
    if not settings.kafka_bootstrap.strip():
        raise SystemExit(_fail("DEADLETTER_KAFKA_BOOTSTRAP (or --bootstrap) is empty", USAGE_ERROR))
    return settings


def _fail(message: str, status: int) -> int:
    print(f"deadletter: {message}", file=sys.stderr, flush=True)
    return status


async def run(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "replay" and bool(args.id) == bool(args.all):
        parser.error("replay takes a parked id or --all (not both)")
    settings = _settings(args)
    try:
        letters = await read_dead_letters(settings)
        if letters.skipped:
            print(f"deadletter: {letters.skipped} record(s) on {settings.topic} are not dead letters; skipped",
                  file=sys.stderr)
        if args.command == "list":
            shown = [p for p in letters.parked if (args.consumer is None or p.letter.consumer == args.consumer)
                     and not (args.pending and p.replays)]
            for entry in shown:
                print(format_line(entry))
            print(f"{len(shown)} parked event(s), {sum(1 for p in shown if p.replays)} replayed", file=sys.stderr)
        elif args.command == "show":
            print(json.dumps(find(letters, args.id).as_json(), indent=2, ensure_ascii=False))
        else:
            if args.all:
                chosen = [p for p in letters.parked if (args.force or not p.replays)
                          and (args.consumer is None or p.letter.consumer == args.consumer)]
                replayed_events = {(p.letter.event_id, p.letter.consumer) for p in letters.parked if p.replays}
                if not args.force:
                    chosen = [p for p in chosen if (p.letter.event_id, p.letter.consumer) not in replayed_events]
            else:
                chosen = [find(letters, args.id)]
            for entry in await replay(settings, letters, chosen, force=args.force):
                print(f"replayed {entry.parked_id}: {entry.letter.event_type} {entry.letter.event_id} "
                      f"-> {entry.original_topic} (consumer {entry.letter.consumer})")
            if not chosen:
                print("nothing to replay", file=sys.stderr)
    except CommandError as exc:
        return _fail(str(exc), FAILED)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(run(argv))


if __name__ == "__main__":
    raise SystemExit(main())
