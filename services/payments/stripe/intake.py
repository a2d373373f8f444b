"""Stripe webhook intake: `POST /webhooks/stripe`, the one code that serves it, and its OpenAPI operation.

Verify the signature on the raw bytes (300 s tolerance), store the event keyed by Stripe's event id
(a redelivery is a no-op), answer 200. Nothing else happens before the 200, so Stripe never times out
on us and a crash after the 200 loses nothing; the webhook worker (worker.py) handles what was stored.

The endpoint is pure ASGI and `install()` puts it in front of the app's middleware: Stripe's deliveries
are the one high-volume path, and skipping the per-request middleware and FastAPI's routing and
dependency machinery roughly doubles the acks per second. The same endpoint is also the app's route
for the path (other methods get their 405 there), and the operation in the app's OpenAPI document is
built from this module's request and response models, so the document describes the code that runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, Literal

import asyncpg
import stripe
import structlog
from fastapi import FastAPI
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from kit import tracing
from kit.db import Database
from kit.errors import AppError, error_body
from kit.logging import CORRELATION_HEADER, bind_correlation_id
from kit.outbox import asyncpg_dsn
from kit.web import receive_body, send_error, send_json
from services.payments.config import PaymentsSettings
from services.payments.stripe.handlers import HANDLERS, handled_types_table

log = structlog.get_logger(__name__)

WEBHOOK_PATH = "/webhooks/stripe"
WEBHOOK_CHANNEL = "stripe_events"  # NOTIFY on it wakes webhook workers in other processes
SIGNATURE_HEADER = "stripe-signature"


class WebhookRejected(AppError):
    """Stripe is told 400: the delivery is not from Stripe (or not usable); nothing was stored."""

    status_code = 400
    code = "webhook_rejected"


# -- the request and the answer -------------------------------------------------------------------------


def _object_id(value: Any) -> Any:
    return value if isinstance(value, str) else None


class StripeObjectIn(BaseModel):
    """The event's object: only its id is read here (the worker parses the rest by event type)."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"additionalProperties": True})

    id: Annotated[str | None, BeforeValidator(_object_id)] = Field(
        default=None, description="Stripe's id of the object, e.g. cs_test_..., pi_..., sub_...")


class StripeEventDataIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    object: StripeObjectIn


class StripeEventIn(BaseModel):
    """A Stripe Event, as Stripe delivers it; the body must be exactly the bytes Stripe signed."""

    model_config = ConfigDict(extra="ignore", title="StripeEvent")

    id: Annotated[StrictStr, Field(min_length=1, max_length=255, description="evt_...; deliveries are deduplicated")]
    object: Literal["event"] | None = None
    type: Annotated[StrictStr, Field(min_length=1, max_length=100, examples=sorted(HANDLERS))]
    created: Annotated[StrictInt, Field(description="Unix seconds")]
    livemode: Annotated[bool, BeforeValidator(bool)] = False
    data: StripeEventDataIn


class WebhookAck(BaseModel):
    """The 200: Stripe stops retrying. Stored events are handled after it (duplicates and ignored
    types are not handled again)."""

    received: bool = True
    duplicate: bool = Field(description="This event id was stored before: nothing new stored")
    ignored: bool = Field(description="Stored but not handled: a type not in the table, or a live-mode event")


def verify(body: bytes, signature: str | None, secret: str, tolerance: int) -> StripeEventIn:
    """Verify like stripe.Webhook.construct_event (the SDK's own check), then read the event."""
    if not signature:
        raise WebhookRejected("Missing Stripe-Signature header.", code="missing_signature")
    try:
        stripe.WebhookSignature.verify_header(body, signature, secret, tolerance)
    except stripe.SignatureVerificationError as exc:
        message = f"Invalid Stripe signature: {exc.user_message or exc}"
        raise WebhookRejected(message, code="invalid_signature") from None
    except UnicodeDecodeError:
        raise WebhookRejected("The body is not UTF-8.", code="invalid_payload") from None
    try:
        return StripeEventIn.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if any(err["type"] == "json_invalid" for err in errors):
            raise WebhookRejected("The body is not JSON.", code="invalid_payload") from None
        where = ", ".join(".".join(str(p) for p in err["loc"]) or "body" for err in errors[:5])
        raise WebhookRejected(f"The body is not a Stripe event (it needs id, type, created and data.object): "
                              f"{where}.", code="invalid_payload") from None


# -- storing ----------------------------------------------------------------------------------------------

_INSERT_EVENT = """
INSERT INTO stripe_events (id, type, created, livemode, object_id, payload, status, outcome, attempts,
                           next_attempt_at, received_at, processed_at, trace_context)
VALUES ($1, $2, $3, $4, $5, $6, $7::varchar, $8, 0, now(), now(),
        CASE WHEN $7::varchar = 'pending' THEN NULL ELSE now() END, $9::jsonb)
ON CONFLICT (id) DO NOTHING
RETURNING id, status
"""
# One round trip: store the event and, if it waits for processing, wake workers in other processes
# (delivered on commit; this statement runs in autocommit).
_INSERT_EVENT = f"""
WITH stored AS ({_INSERT_EVENT.strip()})
SELECT id, CASE WHEN status = 'pending' THEN pg_notify('{WEBHOOK_CHANNEL}', '') END FROM stored
"""


class WebhookIntake:
    """The hot path before the 200: one INSERT ... ON CONFLICT DO NOTHING, in autocommit, on a small
    asyncpg pool of its own (no ORM, no pre-ping: one round trip to PostgreSQL per delivery)."""

    def __init__(self, db: Database, settings: PaymentsSettings, on_stored: Callable[[], None]) -> None:
        self.db = db
        self.settings = settings
        self.on_stored = on_stored
        self.livemode_allowed = False  # this platform never runs in live mode
        self._pool: asyncpg.Pool | None = None

    async def start(self) -> None:
        self._pool = await asyncpg.create_pool(
            asyncpg_dsn(self.db.url), min_size=1, max_size=self.settings.webhook_intake_pool_size,
            statement_cache_size=16,
        )

    async def stop(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def receive(self, body: bytes, signature: str | None) -> WebhookAck:
        with tracing.span("stripe.webhook.intake"):
            return await self._receive(body, signature)

    async def _receive(self, body: bytes, signature: str | None) -> WebhookAck:
        event = verify(body, signature, self.settings.stripe_webhook_secret, self.settings.webhook_tolerance)
        tracing.set_attributes({"stripe.event_id": event.id, "stripe.event_type": event.type})
        status, outcome = "pending", None
        if event.type not in HANDLERS:
            status, outcome = "ignored", f"event type {event.type} is not handled"
        elif event.livemode and not self.livemode_allowed:
            status, outcome = "ignored", "live-mode event delivered to a test-mode integration"
        object_id = event.data.object.id
        if self._pool is None:
            raise RuntimeError("webhook intake not started")
        # Stored with the event: the worker handles it later in a span of this same trace.
        trace_context = tracing.current_context()
        inserted = await self._pool.fetchval(
            _INSERT_EVENT, event.id, event.type, event.created, event.livemode,
            object_id[:255] if object_id else None, body, status, outcome,
            None if trace_context is None else json.dumps(trace_context),
        ) is not None
        if inserted and status == "pending":
            self.on_stored()
        if not inserted:
            log.info("stripe_event_duplicate", event_id=event.id, event_type=event.type)
        elif status == "ignored":
            log.info("stripe_event_ignored", event_id=event.id, event_type=event.type, reason=outcome)
        return WebhookAck(duplicate=not inserted, ignored=status == "ignored")


# -- serving ------------------------------------------------------------------------------------------------


class WebhookEndpoint:
    """Pure ASGI: the one code that answers `POST /webhooks/stripe` (200 JSON, 400/413 error body)."""

    def __init__(self, intake: WebhookIntake, *, max_body: int) -> None:
        self.intake = intake
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        correlation_id = bind_correlation_id(headers.get(CORRELATION_HEADER.lower()))
        reply_headers = {CORRELATION_HEADER: correlation_id}
        try:
            body = await receive_body(receive, limit=self.max_body, content_length=headers.get("content-length"))
            ack = await self.intake.receive(body, headers.get(SIGNATURE_HEADER))
        except AppError as exc:
            await send_error(send, exc, reply_headers)
            return
        except Exception as exc:
            log.exception("webhook_unexpected_error", error=str(exc))
            await send_json(send, 500, error_body("internal_error", "An unexpected error occurred."), reply_headers)
            return
        finally:
            structlog.contextvars.unbind_contextvars("correlation_id")
        await send_json(send, 200, ack.model_dump(), reply_headers)


class WebhookFastPath:
    """In front of the middleware stack: `POST /webhooks/stripe` goes straight to the endpoint."""

    def __init__(self, app: ASGIApp, endpoint: WebhookEndpoint) -> None:
        self.app = app
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == WEBHOOK_PATH and scope["method"] == "POST":
            await self.endpoint(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def install(app: FastAPI, intake: WebhookIntake, *, max_body: int) -> None:
    """Serve and document `POST /webhooks/stripe` on `app` with the one endpoint."""
    endpoint = WebhookEndpoint(intake, max_body=max_body)
    app.router.routes.append(Route(WEBHOOK_PATH, endpoint, methods=["POST"]))
    app.add_middleware(WebhookFastPath, endpoint=endpoint)
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            add_to_openapi(generate(), max_body=max_body)
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]


def add_to_openapi(schema: dict[str, Any], *, max_body: int) -> None:
    """The operation of `POST /webhooks/stripe`, from StripeEventIn and WebhookAck and `HANDLERS`."""
    ref = "#/components/schemas/{model}"
    refs, defs = models_json_schema([(StripeEventIn, "validation"), (WebhookAck, "serialization")], ref_template=ref)
    schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
    error = {"description": "The platform's error body",
             "content": {"application/json": {"schema": {"$ref": ref.format(model="StripeWebhookError")}}}}
    schema["components"]["schemas"]["StripeWebhookError"] = {
        "type": "object", "title": "StripeWebhookError",
        "properties": {"error": {"type": "object", "properties": {
            "code": {"type": "string"}, "message": {"type": "string"}, "details": {}}}},
    }
    description = (
        "Stripe's deliveries. The signature (`Stripe-Signature`, 300 s tolerance) is verified on the raw "
        "body, the event is stored by its id and answered at once; the webhook worker handles it after "
        f"the 200. Bodies over {max_body // 1024} KB are refused (413). A signed event of another type, "
        "or a live-mode one, is answered 200 and ignored.\n\nHandled event types:\n\n" + handled_types_table()
    )
    schema.setdefault("paths", {})[WEBHOOK_PATH] = {"post": {
        "tags": ["webhooks"],
        "summary": "Stripe webhook",
        "operationId": "stripe_webhook",
        "description": description,
        "parameters": [{"name": "Stripe-Signature", "in": "header", "required": True,
                        "schema": {"type": "string"}, "description": "t=<unix seconds>,v1=<HMAC-SHA256>"}],
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": refs[(StripeEventIn, "validation")]}}},
        "responses": {
            "200": {"description": "Stored (or a duplicate of a stored event)",
                    "content": {"application/json": {"schema": refs[(WebhookAck, "serialization")]}}},
            "400": {**error, "description": "Not signed by Stripe with our secret, or not a Stripe event"},
            "413": {**error, "description": "Body too large"},
        },
    }}
