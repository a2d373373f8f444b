"""kit.tracing: the trace context's round trip through the outbox (UnitOfWork.publish stores it in the
row's headers, the relay's send continues it and puts its own in the Kafka headers, the consumer's span
continues that), and nothing at all while tracing is off. In process, with an in-memory exporter."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from sqlalchemy.orm import DeclarativeBase

from contracts.envelope import CloudEvent
from kit import tracing
from kit.consumer import EventConsumer
from kit.db import Database, OutboxMixin

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

# The SDK is loaded only when tracing is on (kit.tracing); an environment without it skips these tests
# instead of failing the whole collection.
memory_exporter = pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter",
                                      reason="opentelemetry-sdk is not installed")

TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def _parse(traceparent: str) -> tuple[str, str, bool]:
    """W3C traceparent -> (trace id, parent span id, sampled)."""
    match = TRACEPARENT.match(traceparent)
    assert match is not None, traceparent
    return match.group(1), match.group(2), bool(int(match.group(3), 16) & 1)
# Never connected to: publish() only stages the row in the session.
UNUSED_URL = "postgresql+asyncpg://nobody@127.0.0.1:9/none"


class _Base(DeclarativeBase):
    pass


class OutboxMessage(OutboxMixin, _Base):
    pass


@dataclass
class _Record:  # what FastStream's KafkaMessage.raw_message is: aiokafka's ConsumerRecord
    topic: str
    key: bytes


@dataclass
class _Message:
    """A KafkaMessage as EventConsumer reads it: decoded headers, the raw record, ack/nack."""

    body: bytes
    headers: dict[str, Any]
    raw_message: _Record
    acked: list[str] = field(default_factory=list)

    async def ack(self) -> None:
        self.acked.append("ack")

    async def nack(self) -> None:
        self.acked.append("nack")


class _RecordingConsumer(EventConsumer):
    """Applies nothing to a database: records the span its handling runs in."""

    seen: list[trace.SpanContext]

    async def apply(self, event: CloudEvent) -> bool:
        self.seen.append(trace.get_current_span().get_span_context())
        return True


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    spans: InMemorySpanExporter = memory_exporter.InMemorySpanExporter()
    assert tracing.configure("kit-test", exporter=spans)
    yield spans
    tracing.disable()
    spans.clear()


def _stage(event: CloudEvent) -> OutboxMessage:
    """UnitOfWork.publish's row for `event`, read back from the session before anything is sent."""
    db = Database(UNUSED_URL, outbox_model=OutboxMessage, pool_size=1)
    uow = db.unit_of_work()
    uow.session = db.sessionmaker()
    uow.publish(event, topic="billing.test", key=event.subject or event.id)
    [row] = [obj for obj in uow.session.new if isinstance(obj, OutboxMessage)]
    return row


def _event() -> CloudEvent:
    return CloudEvent(source="test", type="test.happened", subject="agg-1", data={"n": 1}, correlationid="corr-1")


def _by_name(spans: tuple[ReadableSpan, ...], name: str) -> ReadableSpan:
    [found] = [s for s in spans if s.name == name]
    return found


async def test_outbox_headers_carry_the_trace_from_publish_to_the_consumer(exporter: InMemorySpanExporter) -> None:
    tracer = trace.get_tracer("kit-test")
    with tracer.start_as_current_span("operation") as operation:
        row = _stage(_event())
    op_ctx = operation.get_span_context()

    # Stored with the row: the context of the operation that published it, next to the usual headers.
    stored = row.headers["traceparent"]
    assert _parse(stored) == (f"{op_ctx.trace_id:032x}", f"{op_ctx.span_id:016x}", True)
    assert row.headers["ce_type"] == "test.happened" and row.headers["correlation_id"] == "corr-1"

    # The relay: a PRODUCER span per record, child of the operation; its own context goes to Kafka.
    with tracing.kafka_sends() as sends:
        kafka_headers = sends.headers(row.topic, row.headers)
    send = _by_name(exporter.get_finished_spans(), "billing.test publish")
    assert send.kind is SpanKind.PRODUCER
    assert send.parent is not None and send.parent.span_id == op_ctx.span_id
    assert send.context is not None and send.context.trace_id == op_ctx.trace_id
    assert _parse(kafka_headers["traceparent"]) == (f"{op_ctx.trace_id:032x}", f"{send.context.span_id:016x}", True)
    assert row.headers["traceparent"] == stored  # the stored row is not changed
    assert {k: v for k, v in kafka_headers.items() if k != "traceparent"} == {
        k: v for k, v in row.headers.items() if k != "traceparent"}

    # The consumer: the handler runs in a CONSUMER span whose parent is the relay's send.
    consumer = _RecordingConsumer(Database(UNUSED_URL, pool_size=1), "test-consumer", {})
    consumer.seen = []
    message = _Message(body=row.payload, headers=kafka_headers, raw_message=_Record("billing.test", b"agg-1"))
    await consumer.handle_message(message)  # type: ignore[arg-type]
    assert message.acked == ["ack"]
    process = _by_name(exporter.get_finished_spans(), "billing.test process")
    assert process.kind is SpanKind.CONSUMER
    assert process.parent is not None and process.parent.span_id == send.context.span_id
    assert process.context is not None and process.context.trace_id == op_ctx.trace_id
    assert consumer.seen == [process.context]  # the handler ran inside it
    assert process.attributes is not None
    assert process.attributes["messaging.kafka.message.key"] == "agg-1"
    assert process.attributes["cloudevents.event_type"] == "test.happened"
    assert process.attributes["messaging.consumer.group.name"] == "test-consumer"


async def test_an_event_published_outside_a_trace_starts_one_at_the_relay(exporter: InMemorySpanExporter) -> None:
    row = _stage(_event())  # e.g. a periodic job: no span around it
    assert "traceparent" not in row.headers
    with tracing.kafka_sends() as sends:
        kafka_headers = sends.headers(row.topic, row.headers)
    send = _by_name(exporter.get_finished_spans(), "billing.test publish")
    assert send.parent is None and send.context is not None
    assert _parse(kafka_headers["traceparent"]) == (
        f"{send.context.trace_id:032x}", f"{send.context.span_id:016x}", True)


async def test_a_failed_send_ends_its_span_as_an_error(exporter: InMemorySpanExporter) -> None:
    row = _stage(_event())
    with pytest.raises(ConnectionError), tracing.kafka_sends() as sends:
        sends.headers(row.topic, row.headers)
        raise ConnectionError("broker gone")
    send = _by_name(exporter.get_finished_spans(), "billing.test publish")
    assert send.status.status_code is trace.StatusCode.ERROR
    assert send.status.description is not None and "broker gone" in send.status.description


async def test_a_stored_context_is_continued_later(exporter: InMemorySpanExporter) -> None:
    """The webhook path: the intake stores current_context(), the worker continues it."""
    with tracing.span("stripe.webhook.intake"):
        stored = tracing.current_context()
    assert stored is not None and set(stored) == {"traceparent"}

    async def work() -> trace.SpanContext:
        return trace.get_current_span().get_span_context()

    inside = await tracing.traced(work, stored, "stripe.webhook.process")()
    intake = _by_name(exporter.get_finished_spans(), "stripe.webhook.intake")
    process = _by_name(exporter.get_finished_spans(), "stripe.webhook.process")
    assert process.parent is not None and intake.context is not None
    assert process.parent.span_id == intake.context.span_id and inside == process.context


async def test_a_bare_client_call_is_no_trace_of_its_own(exporter: InMemorySpanExporter) -> None:
    """The relay's and the workers' polling SQL is a CLIENT span with no parent: dropped."""
    tracer = trace.get_tracer("kit-test")
    with tracer.start_as_current_span("SELECT outbox", kind=SpanKind.CLIENT) as poll:
        assert not poll.is_recording()
        carried = tracing.current_context()  # what a publish inside it would store: not sampled
        assert carried is not None and not _parse(carried["traceparent"])[2]
    with tracer.start_as_current_span("operation"), tracer.start_as_current_span("SELECT", kind=SpanKind.CLIENT):
        pass
    assert [s.name for s in exporter.get_finished_spans()] == ["SELECT", "operation"]


async def test_off_nothing_is_stored_or_started() -> None:
    assert not tracing.enabled()  # the test process has no OTEL_EXPORTER_OTLP_ENDPOINT
    tracer = trace.get_tracer("kit-test")
    with tracer.start_as_current_span("operation"):
        row = _stage(_event())
        assert tracing.current_context() is None
    assert "traceparent" not in row.headers
    with tracing.kafka_sends() as sends:
        assert sends.headers(row.topic, row.headers) is row.headers
    with tracing.span("anything") as span:
        assert span is None
