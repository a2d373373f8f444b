"""Structured logs (structlog) carrying the correlation id of the request or event being handled.

One format for every line a service writes: structlog's own events and stdlib records (uvicorn,
aiokafka, FastStream, SQLAlchemy, ...) both go through structlog's ProcessorFormatter on one root
handler. JSON with `<PREFIX>LOG_JSON=true` (the containers set it), otherwise key=value console lines,
coloured only on a terminal (never in a file or a pipe, nor with NO_COLOR set).
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from collections.abc import Awaitable, Callable
from typing import IO, Any, TextIO

import httpx
import structlog
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CORRELATION_HEADER = "X-Correlation-Id"
# Libraries whose INFO lines are routine chatter (consumer-group joins, one line per internal HTTP
# call: the access line of the service called says it): warnings and errors still come through.
QUIET_LIBRARIES = ("aiokafka", "kafka", "httpx", "httpcore")
# Libraries that install a stream handler of their own (at import, or uvicorn's default dictConfig
# when something in the process ran it with its own log config) and stop propagation.
OWN_HANDLER_LIBRARIES = ("faststream", "faststream.access", "faststream.access.kafka",
                         "uvicorn", "uvicorn.error", "uvicorn.access")


class _Handler(logging.StreamHandler[IO[str]]):
    """Ours, so that configuring again replaces it and leaves other handlers (pytest's) alone."""


class _NamedWriter(structlog.WriteLogger):
    """structlog's writer with the logger's name, which add_logger_name reads as from a stdlib logger."""

    def __init__(self, file: TextIO, name: str) -> None:
        super().__init__(file)
        self.name = name


def configure_logging(service: str, level: str = "INFO", json: bool = False, *, stream: TextIO | None = None) -> None:
    out = stream or sys.stderr
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO

    def add_service(_: Any, __: str, event_dict: structlog.typing.EventDict) -> structlog.typing.EventDict:
        event_dict.setdefault("service", service)  # also on lines from threads that bound nothing
        return event_dict

    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        add_service,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor
    if json:
        renderer = structlog.processors.JSONRenderer()
        tail: list[structlog.typing.Processor] = [structlog.processors.format_exc_info, renderer]
    else:
        colours = out.isatty() and "NO_COLOR" not in os.environ
        # A plain traceback: the default (rich, with every frame's locals) made one error ~30,000 lines,
        # rendered inside the request, and kept the invoice service answering 504s for minutes after a
        # PostgreSQL crash in the chaos run.
        renderer = structlog.dev.ConsoleRenderer(colors=colours, exception_formatter=structlog.dev.plain_traceback)
        tail = [renderer]
    # structlog's own events are rendered and written directly: through stdlib logging each line cost
    # ~5x more (two LogRecords, caller lookup), and the access line is written once per request.
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), *tail],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *args: _NamedWriter(out, str(args[0]) if args else ""),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder(), _drop_message_copy],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
    )
    handler = _Handler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for existing in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
    for name in OWN_HANDLER_LIBRARIES:  # their coloured stdout handler goes; the root handler takes over
        library = logging.getLogger(name)
        for own in [h for h in library.handlers if type(h) is logging.StreamHandler]:
            library.removeHandler(own)
        library.propagate = True
        library.disabled = False
    structlog.contextvars.bind_contextvars(service=service)


def _drop_message_copy(_: Any, __: str, event_dict: structlog.typing.EventDict) -> structlog.typing.EventDict:
    # ExtraAdder also picks up the `message` the stdlib formatter set on the record: it is the event.
    if event_dict.get("message") == event_dict.get("event"):
        event_dict.pop("message", None)
    return event_dict


def current_correlation_id() -> str | None:
    return structlog.contextvars.get_contextvars().get("correlation_id")


def bind_correlation_id(value: str | None) -> str:
    correlation_id = value or str(uuid.uuid4())
    structlog.contextvars.bind_contextvars(correlation_id=correlation_id)
    return correlation_id


class CorrelationMiddleware:
    """Bind the caller's correlation id (or a new one) for the whole request and echo it back.
    Plain ASGI rather than BaseHTTPMiddleware: no extra task and body copy on every request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = Headers(scope=scope).get(CORRELATION_HEADER)
        correlation_id = bind_correlation_id(incoming)

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[CORRELATION_HEADER] = correlation_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_header)
        finally:
            structlog.contextvars.unbind_contextvars("correlation_id")


async def _forward_correlation_id(request: httpx.Request) -> None:
    correlation_id = current_correlation_id()
    if correlation_id and CORRELATION_HEADER not in request.headers:
        request.headers[CORRELATION_HEADER] = correlation_id


def correlation_hooks() -> dict[str, list[Callable[[httpx.Request], Awaitable[None]]]]:
    """`httpx.AsyncClient(event_hooks=correlation_hooks())`: every internal call carries the correlation
    id of the request or event being handled, so one id follows it across services."""
    return {"request": [_forward_correlation_id]}
