"""OpenTelemetry traces: HTTP (FastAPI server, httpx client), SQL and Kafka, one trace per operation.

Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` is set (spans then go to that OTLP/HTTP collector, batched,
`service.name` = the service's name), or `BILLING_TRACE_FILE` (tests: every span as one JSON line
appended to that file, written when the span ends). While off, every function here returns after one
boolean check and instruments nothing.

The W3C trace context (`traceparent`, `tracestate`) crosses the asynchronous hops in the data itself:
`UnitOfWork.publish` stores the current context in the outbox row's headers, the relay sends each
row inside a PRODUCER span that continues it (its own context replaces the stored one in the Kafka
headers) and `EventConsumer.handle_message` runs the handler inside a CONSUMER span continuing the
relay's. The payments intake stores the context with each Stripe event and the webhook worker
continues it, so one trace follows a webhook from the gateway to every service its events reach.

SQL statements and HTTP calls with no enclosing operation (the relay's and the workers' polling,
LISTEN connections) start no trace: a root span of kind CLIENT is dropped.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

# The API only (FastAPI depends on it anyway): the SDK, exporters and instrumentations are imported
# when tracing is turned on, so a process with tracing off loads none of them.
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes, AttributeValue

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.sampling import SamplingResult
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "ENDPOINT_ENV",
    "TRACE_FILE_ENV",
    "configure",
    "consuming",
    "continued",
    "current_context",
    "disable",
    "enabled",
    "inject",
    "instrument_app",
    "instrument_engine",
    "kafka_sends",
    "set_attributes",
    "span",
]

ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
TRACE_FILE_ENV = "BILLING_TRACE_FILE"
TRACER_NAME = "billing"
# Not traced: probes and scrapes would bury the operations.
EXCLUDED_URLS = "/healthz,/readyz,/metrics"

T = TypeVar("T")

_enabled = bool(os.environ.get(ENDPOINT_ENV) or os.environ.get(TRACE_FILE_ENV))
_provider: TracerProvider | None = None
_http_client_instrumented = False
_lock = threading.Lock()
# W3C trace context only, whatever OTEL_PROPAGATORS says: it is the format stored in our rows.
_propagator = TraceContextTextMapPropagator()
_off: AbstractContextManager[None] = nullcontext()


def enabled() -> bool:
    return _enabled


def _tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


# -- set-up ---------------------------------------------------------------------------------------------


def configure(service_name: str, *, exporter: SpanExporter | None = None) -> bool:
    """Install the tracer provider of this process (once) and instrument httpx; True when tracing is on.

    `exporter` is the test hook: spans also go to it (e.g. an InMemorySpanExporter), synchronously, and
    tracing is on from then on in this process (`disable()` turns the instrumentation off again)."""
    global _enabled, _provider, _http_client_instrumented
    if exporter is None and not _enabled:
        return False
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    with _lock:
        _enabled = True
        if _provider is None:
            _provider = _build_provider(service_name)
            trace.set_tracer_provider(_provider)
        if exporter is not None:
            _provider.add_span_processor(SimpleSpanProcessor(exporter))
        if not _http_client_instrumented:
            from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

            HTTPXClientInstrumentor().instrument()
            _http_client_instrumented = True
    return True


def disable() -> None:
    """Tests: stop tracing in this process (instrumented engines and apps keep their hooks, but the
    context no longer travels and no new span starts from kit)."""
    global _enabled, _http_client_instrumented
    with _lock:
        _enabled = False
        if _http_client_instrumented:
            from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

            HTTPXClientInstrumentor().uninstrument()
            _http_client_instrumented = False


def instrument_app(app: FastAPI) -> None:
    """A SERVER span per request (continuing the caller's traceparent), around every middleware."""
    if not _enabled:
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    # No spans for each ASGI receive/send message: a request is one span.
    FastAPIInstrumentor.instrument_app(app, excluded_urls=EXCLUDED_URLS, exclude_spans=["receive", "send"])


def instrument_engine(engine: AsyncEngine) -> None:
    """A CLIENT span per SQL statement on this engine (kit.db.Database calls it for every engine)."""
    if not _enabled:
        return
    from opentelemetry.instrumentation.sqlalchemy import __version__ as sqlalchemy_instrumentation_version
    from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
    from opentelemetry.metrics import get_meter

    # EngineTracer is what SQLAlchemyInstrumentor().instrument(engine=...) builds; called directly because
    # the instrumentor is a singleton that instruments once per process, and a service has several
    # engines (its own, the relay thread's).
    name = "opentelemetry.instrumentation.sqlalchemy"
    usage = get_meter(name, sqlalchemy_instrumentation_version).create_up_down_counter(
        "db.client.connections.usage", unit="connections")
    EngineTracer(trace.get_tracer(name, sqlalchemy_instrumentation_version), engine.sync_engine, usage)


def _build_provider(service_name: str) -> TracerProvider:
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import Decision, ParentBased, Sampler, SamplingResult

    class Operations(Sampler):
        """Root sampler: every operation is traced, a bare client call (SQL, HTTP) is no trace of its own."""

        def should_sample(self, parent_context: Context | None, trace_id: int, name: str,
                          kind: SpanKind | None = None, attributes: Attributes = None,
                          links: Sequence[Link] | None = None,
                          trace_state: TraceState | None = None) -> SamplingResult:
            if kind is SpanKind.CLIENT:
                return SamplingResult(Decision.DROP)
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)

        def get_description(self) -> str:
            return "BillingOperations"

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}),
                              sampler=ParentBased(root=Operations()))
    if os.environ.get(ENDPOINT_ENV):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace_file = os.environ.get(TRACE_FILE_ENV)
    if trace_file:
        provider.add_span_processor(SimpleSpanProcessor(json_lines_exporter(trace_file)))
    return provider


def json_lines_exporter(path: str) -> SpanExporter:
    """Appends each finished span as one JSON line (`span_record`) to a file: the test hook of a process
    the tests start (`BILLING_TRACE_FILE`). One write per batch on an O_APPEND descriptor, so lines from
    the service's and the relay's threads never interleave."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class JsonLines(SpanExporter):
        def __init__(self) -> None:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self._lock = threading.Lock()

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            data = "".join(json.dumps(span_record(s), default=str) + "\n" for s in spans).encode()
            with self._lock:
                os.write(self._fd, data)
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            with self._lock, contextlib.suppress(OSError):
                os.close(self._fd)

    return JsonLines()


def span_record(span: ReadableSpan) -> dict[str, Any]:
    """What the trace file keeps of a span: ids in W3C hex, its parent, service, kind, times, attributes."""
    context = span.get_span_context()
    return {
        "traceId": None if context is None else f"{context.trace_id:032x}",
        "spanId": None if context is None else f"{context.span_id:016x}",
        "parentSpanId": None if span.parent is None else f"{span.parent.span_id:016x}",
        "name": span.name,
        "kind": span.kind.name,
        "service": span.resource.attributes.get("service.name"),
        "start": span.start_time,
        "end": span.end_time,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
    }


# -- the context in stored data -------------------------------------------------------------------------


def inject(headers: dict[str, str]) -> None:
    """Add the current trace context (`traceparent`, `tracestate`) to `headers`; nothing while off or
    outside a span."""
    if _enabled:
        _propagator.inject(headers)


def current_context() -> dict[str, str] | None:
    """The current trace context as headers, to store with work done later (None: off, or no span)."""
    if not _enabled:
        return None
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier or None


def set_attributes(attributes: Mapping[str, AttributeValue]) -> None:
    """Annotate the current span (a no-op while off)."""
    if _enabled:
        trace.get_current_span().set_attributes(attributes)


def span(name: str, attributes: Mapping[str, AttributeValue] | None = None) -> AbstractContextManager[Any]:
    """A child span of the current one around the block."""
    if not _enabled:
        return _off
    return _tracer().start_as_current_span(name, attributes=attributes)


def continued(carrier: Mapping[str, str] | None, name: str, *, kind: SpanKind = SpanKind.INTERNAL,
              attributes: Mapping[str, AttributeValue] | None = None) -> AbstractContextManager[Any]:
    """A span around the block whose parent is the stored context `carrier` (a new trace without one)."""
    if not _enabled:
        return _off
    parent = _propagator.extract(dict(carrier or {}))
    return _tracer().start_as_current_span(name, context=parent, kind=kind, attributes=attributes)


def traced(work: Callable[[], Awaitable[T]], carrier: Mapping[str, str] | None, name: str, *,
           kind: SpanKind = SpanKind.CONSUMER,
           attributes: Mapping[str, AttributeValue] | None = None) -> Callable[[], Awaitable[T]]:
    """`work`, run inside a span continuing `carrier` each time it is awaited (`work` itself while off)."""
    if not _enabled:
        return work

    async def run() -> T:
        with continued(carrier, name, kind=kind, attributes=attributes):
            return await work()

    return run


# -- Kafka ----------------------------------------------------------------------------------------------


class _Sends:
    """The relay's PRODUCER spans of one batch: each continues its row's stored context, and its own
    context is what the record carries to the consumers."""

    def __init__(self) -> None:
        self._spans: list[trace.Span] = []

    def headers(self, topic: str, stored: dict[str, str]) -> dict[str, str]:
        parent = _propagator.extract(stored)
        send = _tracer().start_span(f"{topic} publish", context=parent, kind=SpanKind.PRODUCER,
                                    attributes={"messaging.system": "kafka", "messaging.destination.name": topic,
                                                "messaging.operation.type": "send",
                                                "cloudevents.event_type": stored.get("ce_type", "")})
        self._spans.append(send)
        out = dict(stored)
        _propagator.inject(out, context=trace.set_span_in_context(send))
        return out

    def end(self, error: BaseException | None) -> None:
        for send in self._spans:
            if error is not None:
                send.record_exception(error)
                send.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
            send.end()


class _NoSends:
    def headers(self, topic: str, stored: dict[str, str]) -> dict[str, str]:
        return stored


_no_sends: AbstractContextManager[_Sends | _NoSends] = nullcontext(_NoSends())


@contextmanager
def _sending() -> Iterator[_Sends]:
    sends = _Sends()
    try:
        yield sends
    except BaseException as exc:
        sends.end(exc)
        raise
    sends.end(None)


def kafka_sends() -> AbstractContextManager[_Sends | _NoSends]:
    """Around a batch of sends: `sends.headers(topic, row_headers)` are the Kafka headers of one record;
    the spans end (acknowledged, or failed with the error) when the block does."""
    if not _enabled:
        return _no_sends
    return _sending()


class ConsumedMessage(Protocol):
    """What `consuming` reads of a FastStream KafkaMessage."""

    @property
    def headers(self) -> Mapping[str, Any]: ...

    @property
    def raw_message(self) -> Any: ...


def consuming(message: ConsumedMessage, *, consumer: str) -> AbstractContextManager[Any]:
    """A CONSUMER span around handling one Kafka record, continuing the trace its headers carry."""
    if not _enabled:
        return _off
    headers = {k: v for k, v in message.headers.items() if isinstance(v, str)}
    record = message.raw_message
    topic = getattr(record, "topic", None) or "kafka"
    key = getattr(record, "key", None)
    attributes: dict[str, AttributeValue] = {
        "messaging.system": "kafka", "messaging.destination.name": str(topic),
        "messaging.operation.type": "process", "messaging.consumer.group.name": consumer,
        "cloudevents.event_type": headers.get("ce_type", ""),
    }
    if isinstance(key, bytes):
        attributes["messaging.kafka.message.key"] = key.decode("utf-8", "replace")
    return continued(headers, f"{topic} process", kind=SpanKind.CONSUMER, attributes=attributes)
