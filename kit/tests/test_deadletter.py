"""Dead letters on real Kafka and PostgreSQL: the redelivery count of a poison event survives a new
EventConsumer (a restart), the event is parked after N failed deliveries, and
`python -m kit.deadletter` lists it, shows it and replays it once the handler is fixed, applied exactly
once; a second replay is refused; a malformed payload is still dropped with a log."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from alembic.migration import MigrationContext
from alembic.operations import Operations
from faststream.kafka import KafkaBroker
from prometheus_client import REGISTRY
from sqlalchemy import Integer, String, func, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from contracts import topics
from contracts.deadletter import DeadLetterV1
from contracts.envelope import CloudEvent
from kit.consumer import EventConsumer
from kit.db import Database, InboxMixin, OutboxMixin, UnitOfWork
from kit.deadletter import EventFailureMixin, create_table_in_migration, failure_model_of
from kit.outbox import OutboxRelay

ROOT = Path(__file__).resolve().parents[2]
MAX_REDELIVERIES = 5
ATTEMPTS_PER_DELIVERY = 2  # retry_delays=(x,): one try and one in-process retry per delivery


class _Base(DeclarativeBase):
    pass


class OutboxMessage(OutboxMixin, _Base):
    pass


class InboxEvent(InboxMixin, _Base):
    pass


class EventFailure(EventFailureMixin, _Base):
    pass


class Effect(_Base):
    """What the handler does: one row per application (no unique key, so a double apply shows)."""

    __tablename__ = "test_effects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(200))


@dataclass
class Handler:
    broken: bool = True
    calls: dict[str, int] = field(default_factory=dict)  # consumer instance label -> handler calls

    def for_instance(self, label: str) -> Callable[[UnitOfWork, CloudEvent], Awaitable[None]]:
        async def handle(uow: UnitOfWork, event: CloudEvent) -> None:
            self.calls[label] = self.calls.get(label, 0) + 1
            if self.broken:
                raise RuntimeError("handler bug: the flag is not flipped yet")
            uow.session.add(Effect(event_id=event.id))

        return handle


def _create_schema(conn: Connection) -> None:
    # event_failures comes from the migration helper the services use, the rest from the models: the
    # consumer's model must fit the migrated table.
    with Operations.context(MigrationContext.configure(conn)):
        create_table_in_migration()
    _Base.metadata.create_all(conn, tables=[t for t in _Base.metadata.sorted_tables if t.name != "event_failures"])


async def wait_until(check: Callable[[], Awaitable[Any]], *, timeout: float = 60, what: str) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if result := await check():
            return result
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class Cli:
    bootstrap: str

    async def __call__(self, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        t0 = asyncio.get_running_loop().time()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kit.deadletter", *args, cwd=ROOT,
            env={**os.environ, "DEADLETTER_KAFKA_BOOTSTRAP": self.bootstrap, **(env or {})},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode is not None
        took = asyncio.get_running_loop().time() - t0
        print(f"$ deadletter {' '.join(args)} -> {proc.returncode} in {took:.1f} s; stderr: {err.decode()[-500:]}")
        return proc.returncode, out.decode(), err.decode()


@dataclass
class Stack:
    db: Database
    topic: str
    consumer_name: str
    handler: Handler
    cli: Cli
    kafka: Any
    brokers: list[KafkaBroker] = field(default_factory=list)

    async def start_consumer(self, label: str, group_id: str) -> KafkaBroker:
        consumer = EventConsumer(self.db, self.consumer_name, {"test.poison": self.handler.for_instance(label)},
                                 retry_delays=(0.3,), max_redeliveries=MAX_REDELIVERIES)
        broker = KafkaBroker(self.kafka.bootstrap)
        consumer.subscribe(broker, self.topic, group_id=group_id, workers=1)
        await broker.start()
        self.brokers.append(broker)
        return broker

    async def failures(self, event_id: str) -> int | None:
        async with self.db.transaction() as uow:
            return await uow.session.scalar(select(EventFailure.failures).where(
                EventFailure.consumer == self.consumer_name, EventFailure.event_id == event_id))

    async def effects(self, event_id: str) -> int:
        async with self.db.transaction() as uow:
            return int(await uow.session.scalar(select(func.count()).where(Effect.event_id == event_id)) or 0)

    async def parked(self) -> list[DeadLetterV1]:
        async with self.db.transaction() as uow:
            payloads = (await uow.session.scalars(
                select(OutboxMessage.payload).where(OutboxMessage.topic == topics.DEADLETTER))).all()
        return [CloudEvent.model_validate_json(p).data_as(DeadLetterV1) for p in payloads]


@pytest.fixture
async def stack(kafka: Any, database_url_factory: Callable[[str], str]) -> AsyncIterator[Stack]:
    db = Database(database_url_factory("deadletter_cli"), outbox_model=OutboxMessage, inbox_model=InboxEvent,
                  pool_size=3)
    async with db.engine.begin() as conn:
        await conn.run_sync(_create_schema)
    topic = f"test.deadletter.{uuid.uuid4().hex[:8]}"
    kafka.create_topics([topic], partitions=1)  # one partition: order behind the poison event is strict
    relay_broker = KafkaBroker(kafka.bootstrap)
    await relay_broker.start()
    relay = OutboxRelay(db, relay_broker, service=f"dl-{uuid.uuid4().hex[:6]}", poll_interval=0.2)
    await relay.start()
    stack = Stack(db=db, topic=topic, consumer_name=f"dl-test-{uuid.uuid4().hex[:8]}", handler=Handler(),
                  cli=Cli(kafka.bootstrap), kafka=kafka)
    try:
        yield stack
    finally:
        for broker in stack.brokers:
            await broker.stop()
        await relay.stop()
        await relay_broker.stop()
        await db.dispose()


async def test_count_survives_a_restart_then_parked_listed_shown_and_replayed_once(stack: Stack) -> None:
    assert failure_model_of(stack.db) is EventFailure  # found on the Base, as in the services
    group = f"g-{uuid.uuid4().hex[:6]}"
    poison = CloudEvent(source="test", type="test.poison", subject=f"agg-{uuid.uuid4().hex[:6]}",
                        data={"n": 1}, correlationid="corr-dl-1")
    first = await stack.start_consumer("first", group)
    await first.publish(poison.to_bytes(), topic=stack.topic, key=poison.subject.encode())

    await wait_until(lambda: stack.failures(poison.id), what="the first failed delivery to be recorded")
    await first.stop()  # the "restart": the process and its memory are gone
    stack.brokers.remove(first)
    before_restart = await stack.failures(poison.id)
    assert before_restart is not None and 1 <= before_restart < MAX_REDELIVERIES
    assert await stack.parked() == []

    await stack.start_consumer("second", group)
    letters = await wait_until(stack.parked, what="the poison event to be parked")
    assert len(letters) == 1
    letter = letters[0]
    assert letter.event_id == poison.id and letter.attempts == MAX_REDELIVERIES
    assert letter.topic == stack.topic and letter.consumer == stack.consumer_name
    assert "handler bug" in letter.error
    # The new instance only needed the deliveries the first one had not made: the count was durable.
    assert stack.handler.calls["second"] == ATTEMPTS_PER_DELIVERY * (MAX_REDELIVERIES - before_restart)
    assert await stack.failures(poison.id) is None  # gone with the parking
    assert await stack.effects(poison.id) == 0

    # list: reads the topic up to its end (the relay publishes the parked event shortly after commit).
    seen: list[str] = []

    async def listed() -> str | None:
        code, out, err = await stack.cli("list", "--consumer", stack.consumer_name)
        assert code == 0, err
        seen[:] = [out, err]
        return out if poison.subject in out else None

    try:
        lines = (await wait_until(listed, timeout=20, what="`list` to show the parked event")).splitlines()
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last `list`: {seen}") from None
    assert len(lines) == 1
    parked_id, consumer, event_type, subject, attempts, when, status, *error = lines[0].split("  ")
    assert (consumer, event_type, subject, attempts, status) == (
        stack.consumer_name, "test.poison", poison.subject, f"attempts={MAX_REDELIVERIES}", "parked")
    assert when.endswith("Z") and "handler bug" in "  ".join(error)

    code, out, err = await stack.cli("show", parked_id[:12])  # an unambiguous prefix will do
    assert code == 0, err
    shown = json.loads(out)
    assert shown["parkedId"] == parked_id and shown["replays"] == []
    assert DeadLetterV1.model_validate(shown) == letter
    assert shown["event"]["id"] == poison.id and shown["event"]["correlationid"] == "corr-dl-1"

    stack.handler.broken = False  # the cause is fixed
    code, out, err = await stack.cli("replay", parked_id)
    assert code == 0, err
    assert f"replayed {parked_id}" in out and stack.topic in out
    await wait_until(lambda: stack.effects(poison.id), what="the replayed event to be applied")

    code, out, err = await stack.cli("replay", parked_id)
    assert code == 1 and "already replayed" in err and "--force" in err, (code, out, err)
    code, out, err = await stack.cli("list", "--consumer", stack.consumer_name)
    assert code == 0 and " replayed " in out and "  parked  " not in out, (out, err)
    code, out, _ = await stack.cli("list", "--consumer", stack.consumer_name, "--pending")
    assert code == 0 and out == ""

    # Forced, it goes out again and the inbox skips it: an event behind it on the (one) partition is
    # applied, then the poison event's effect is still counted once.
    code, out, err = await stack.cli("replay", parked_id, "--force")
    assert code == 0, err
    behind = CloudEvent(source="test", type="test.poison", subject=poison.subject, data={"n": 2})
    await stack.brokers[-1].publish(behind.to_bytes(), topic=stack.topic, key=poison.subject.encode())
    await wait_until(lambda: stack.effects(behind.id), what="the event behind the forced replay")
    assert await stack.effects(poison.id) == 1
    assert len(await stack.parked()) == 1  # nothing parked again
    code, out, _ = await stack.cli("show", parked_id)
    assert [r["forced"] for r in json.loads(out)["replays"]] == [False, True]


async def test_malformed_payload_is_dropped_with_a_log(stack: Stack) -> None:
    stack.handler.broken = False
    good = CloudEvent(source="test", type="test.poison", subject="agg-m", data={"n": 1})
    # Counted by outcome (kit.metrics; the log line `event_malformed_dropped` is written at the same
    # place): structlog's capture does not see loggers another test already cached in this process.
    def malformed() -> float:
        return sum(sample.value for metric in REGISTRY.collect() for sample in metric.samples
                   if sample.name == "billing_consumer_handling_seconds_count"
                   and sample.labels.get("consumer") == stack.consumer_name
                   and sample.labels.get("outcome") == "malformed")

    before = malformed()
    broker = await stack.start_consumer("malformed", f"g-{uuid.uuid4().hex[:6]}")
    await broker.publish(b'{"not": "a cloud event"', topic=stack.topic, key=b"agg-m")
    await broker.publish(good.to_bytes(), topic=stack.topic, key=b"agg-m")
    await wait_until(lambda: stack.effects(good.id), what="the event behind the malformed one")
    assert malformed() - before == 1
    assert await stack.parked() == [] and await stack.failures(good.id) is None


async def test_command_line_errors_name_the_setting(kafka: Any) -> None:
    cli = Cli(kafka.bootstrap)
    code, out, _ = await cli("--help")
    assert code == 0 and "DEADLETTER_KAFKA_BOOTSTRAP" in out and "replay" in out
    code, _, err = await cli("--bootstrap", "127.0.0.1:1", "--timeout", "5", "list")
    assert code == 1 and "127.0.0.1:1" in err and "DEADLETTER_KAFKA_BOOTSTRAP" in err, err
    assert "Traceback" not in err
    code, _, err = await cli("list", env={"DEADLETTER_TIMEOUT": "soon"})
    assert code == 2 and "DEADLETTER_TIMEOUT" in err and "Traceback" not in err, err
    code, _, err = await cli("replay")
    assert code == 2 and "parked id or --all" in err
    code, _, err = await cli("show", f"no-such-{uuid.uuid4().hex}")
    assert code == 1 and "no parked event" in err, err
