"""HTTP API of the payments service (behind the gateway, which authenticates the caller), plus the
Stripe webhook endpoint and, in local mode only, the stand-in checkout page."""

from __future__ import annotations

import pathlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

import orjson
import structlog
from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, status
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from kit.actor import AdminActor, CurrentActor
from kit.db import Database
from kit.errors import AppError, error_body
from kit.logging import CORRELATION_HEADER, bind_correlation_id
from kit.service import ServiceRuntime, create_service_app, make_broker
from services.payments import standin
from services.payments.config import PaymentsSettings
from services.payments.consumers import register_consumers
from services.payments.invoice_client import HttpInvoiceReader, InvoiceReader
from services.payments.models import InboxEvent, OutboxMessage, Payment, Refund
from services.payments.repository import PaymentFilter
from services.payments.schemas import (
    CheckoutOut,
    CheckoutStatusOut,
    MarkPaidRequest,
    PaymentOut,
    PaymentPage,
    RefundOut,
)
from services.payments.service import PaymentsService
from services.payments.stripe_gateway import StripeGateway, StripeSdkGateway
from services.payments.webhooks import PayloadTooLarge, WebhookIntake, WebhookWorker

log = structlog.get_logger(__name__)
MIGRATIONS = pathlib.Path(__file__).parent / "migrations"


@dataclass
class PaymentsContext:
    settings: PaymentsSettings
    db: Database
    stripe: StripeGateway
    invoices: InvoiceReader
    intake: WebhookIntake
    worker: WebhookWorker


def _ctx(request: Request) -> PaymentsContext:
    return request.app.state.payments  # type: ignore[no-any-return]


async def payments_service(request: Request) -> AsyncIterator[PaymentsService]:
    ctx = _ctx(request)
    async with ctx.db.unit_of_work() as uow:
        yield PaymentsService(uow, ctx.settings, ctx.stripe, ctx.invoices)


Service = Annotated[PaymentsService, Depends(payments_service)]


def payment_out(payment: Payment, refunds: list[Refund] | None = None) -> PaymentOut:
    return PaymentOut(
        id=payment.id,
        invoice_id=payment.invoice_id,
        client_id=payment.client_id,
        amount=payment.amount,
        currency=payment.currency,
        method=payment.method,
        source=payment.source,
        status=payment.status,
        amount_refunded=payment.amount_refunded,
        paid_at=payment.paid_at,
        reference=payment.reference,
        failure_code=payment.failure_code,
        failure_message=payment.failure_message,
        flags=list(payment.flags or []),
        held=payment.held,
        applied=payment.applied_at is not None,
        stripe_checkout_session_id=payment.stripe_checkout_session_id,
        stripe_payment_intent_id=payment.stripe_payment_intent_id,
        refunds=[RefundOut.model_validate(r) for r in refunds or []],
        created_at=payment.created_at,
        updated_at=payment.updated_at,
    )


invoices = APIRouter(prefix="/api/invoices", tags=["payments"])
payments = APIRouter(prefix="/api/payments", tags=["payments"])
webhooks = APIRouter(tags=["webhooks"])


@invoices.post("/{invoice_id}/checkout", response_model=CheckoutOut)
async def create_checkout(invoice_id: uuid.UUID, svc: Service, actor: CurrentActor) -> CheckoutOut:
    """Pay Now: a Stripe Checkout Session for the amount due. A repeat while it is open returns it."""
    session, reused = await svc.checkout(str(invoice_id), actor)
    await svc.uow.commit()
    return CheckoutOut(url=session.url, session_id=session.id, expires_at=session.expires_at,
                       amount=session.amount, currency=session.currency, reused=reused)


@invoices.post("/{invoice_id}/mark-paid", status_code=status.HTTP_201_CREATED, response_model=PaymentOut)
async def mark_paid(invoice_id: uuid.UUID, body: MarkPaidRequest, svc: Service, actor: AdminActor) -> PaymentOut:
    """Record a manual payment (bank transfer, cash, cheque, other); partial allowed, overpayment refused."""
    payment = await svc.mark_paid(str(invoice_id), body, actor)
    await svc.uow.commit()
    return payment_out(payment)


@payments.get("", response_model=PaymentPage)
async def list_payments(
    svc: Service,
    actor: CurrentActor,
    invoice_id: Annotated[uuid.UUID | None, Query(alias="invoiceId")] = None,
    client_id: Annotated[uuid.UUID | None, Query(alias="clientId")] = None,
    status_: Annotated[list[str] | None, Query(alias="status", max_length=30)] = None,
    method: Annotated[list[str] | None, Query(max_length=30)] = None,
    source: Annotated[str | None, Query(pattern="^(stripe|manual)$")] = None,
    page: Annotated[int, Query(ge=1, le=100000)] = 1,
    page_size: Annotated[int, Query(alias="pageSize", ge=1, le=200)] = 50,
) -> PaymentPage:
    """Payment history: per invoice (`invoiceId`), per client (`clientId`); a client sees only its own."""
    f = PaymentFilter(
        invoice_id=str(invoice_id) if invoice_id else None,
        client_id=str(client_id) if client_id else None,
        statuses=tuple(status_ or ()),
        methods=tuple(method or ()),
        source=source,
    )
    rows, refunds, total = await svc.search(f, actor, page=page, page_size=page_size)
    return PaymentPage(items=[payment_out(p, refunds.get(p.id)) for p in rows], total=total, page=page,
                       page_size=page_size)


@payments.get("/checkout-sessions/{session_id}", response_model=CheckoutStatusOut)
async def checkout_status(session_id: Annotated[str, Path(max_length=255)], svc: Service,
                          actor: CurrentActor) -> CheckoutStatusOut:
    """For the portal's success page: "processing" until the webhook confirms; never trust the redirect."""
    row, state, payment = await svc.checkout_status(session_id, actor)
    return CheckoutStatusOut(session_id=row.id, invoice_id=row.invoice_id, session_status=row.status,
                             payment_status=state, payment_id=payment.id if payment else None,
                             amount=row.amount, currency=row.currency)


@payments.get("/{payment_id}", response_model=PaymentOut)
async def get_payment(payment_id: uuid.UUID, svc: Service, actor: CurrentActor) -> PaymentOut:
    payment, refunds = await svc.get(payment_id, actor)
    return payment_out(payment, refunds)


@webhooks.post("/webhooks/stripe", include_in_schema=True)
async def stripe_webhook(request: Request) -> JSONResponse:
    """Stripe's deliveries. Verified on the raw body, stored by event id, answered at once; handled after."""
    ctx = _ctx(request)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > ctx.settings.webhook_max_body:
        raise PayloadTooLarge("The webhook body is too large.")
    body = await request.body()
    if len(body) > ctx.settings.webhook_max_body:
        raise PayloadTooLarge("The webhook body is too large.")
    result = await ctx.intake.receive(body, request.headers.get("stripe-signature"))
    return JSONResponse(result)


class WebhookFastPath:
    """Pure ASGI in front of the middleware stack: `POST /webhooks/stripe` goes straight to the intake.

    Stripe's deliveries are the one high-volume path; skipping the per-request HTTP middleware and
    FastAPI's routing and dependency machinery roughly doubles the acks per second. Same contract as
    the FastAPI route below (kept for the OpenAPI document): 200 JSON, 400/413 with the error body.
    """

    PATH = "/webhooks/stripe"

    def __init__(self, app: ASGIApp, ctx: PaymentsContext) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        correlation_id = bind_correlation_id(headers.get(CORRELATION_HEADER.lower()))
        try:
            status, body = 200, await self._receive(self.ctx, headers, receive)
        except AppError as exc:
            status, body = exc.status_code, error_body(exc.code, exc.message, exc.details)
        except Exception as exc:
            log.exception("webhook_unexpected_error", error=str(exc))
            status, body = 500, error_body("internal_error", "An unexpected error occurred.")
        finally:
            structlog.contextvars.unbind_contextvars("correlation_id")
        payload = orjson.dumps(body)
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
            (CORRELATION_HEADER.lower().encode(), correlation_id.encode()),
        ]})
        await send({"type": "http.response.body", "body": payload})

    @staticmethod
    async def _receive(ctx: PaymentsContext, headers: dict[str, str], receive: Receive) -> dict[str, object]:
        limit = ctx.settings.webhook_max_body
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge("The webhook body is too large.")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise PayloadTooLarge("The client went away.")  # never answered anyway
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge("The webhook body is too large.")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return await ctx.intake.receive(b"".join(chunks), headers.get("stripe-signature"))


def build_runtime(
    settings: PaymentsSettings | None = None,
    *,
    stripe_gateway: StripeGateway | None = None,
    invoice_reader: InvoiceReader | None = None,
) -> tuple[ServiceRuntime, PaymentsContext]:
    settings = settings or PaymentsSettings()
    db = Database(settings.database_url, outbox_model=OutboxMessage, inbox_model=InboxEvent,
                  pool_size=settings.db_pool_size)
    broker = make_broker(settings)
    register_consumers(broker, db, group_id=settings.consumer_group)
    reader = invoice_reader or HttpInvoiceReader(settings.invoice_url, settings.internal_token)
    gateway = stripe_gateway or StripeSdkGateway.from_settings(settings)
    worker = WebhookWorker(db, settings, reader, concurrency=settings.webhook_worker_concurrency)
    intake = WebhookIntake(db, settings, worker.wake)
    ctx = PaymentsContext(settings=settings, db=db, stripe=gateway, invoices=reader, intake=intake, worker=worker)

    async def close_reader() -> None:
        if isinstance(reader, HttpInvoiceReader):
            await reader.aclose()

    runtime = ServiceRuntime(
        settings=settings,
        db=db,
        broker=broker,
        migrations=MIGRATIONS,
        on_startup=[intake.start, worker.start],
        on_shutdown=[worker.stop, intake.stop, close_reader],
    )
    return runtime, ctx


def create_app(
    settings: PaymentsSettings | None = None,
    *,
    stripe_gateway: StripeGateway | None = None,
    invoice_reader: InvoiceReader | None = None,
) -> FastAPI:
    runtime, ctx = build_runtime(settings, stripe_gateway=stripe_gateway, invoice_reader=invoice_reader)
    routers = [invoices, payments, webhooks]
    if ctx.settings.stand_in_checkout:
        routers.append(standin.router)
    app = create_service_app(
        runtime,
        title="Payments service",
        description="Stripe Checkout, Stripe webhooks, manual payments and payment history.",
        routers=routers,
    )
    app.state.payments = ctx
    app.add_middleware(WebhookFastPath, ctx=ctx)
    return app
