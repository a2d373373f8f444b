"""HTTP API of the payments service (behind the gateway, which authenticates the caller), plus the
Stripe webhook endpoint (stripe/intake.py). No fake Stripe page lives here: locally the Stripe stand-in
(deploy/stripe_standin) hosts the checkout and invoice pages, as Stripe does.

One commit rule: a route's changes are committed by its unit of work (`RequestUnitOfWork`) after the
route returns; routes and the service never commit."""

from __future__ import annotations

import pathlib
import uuid
from dataclasses import dataclass
from typing import Annotated

import structlog
from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, status

from kit.actor import AdminActor, CurrentActor
from kit.child import ChildProcess
from kit.db import Database
from kit.idempotency import IdempotentRoute
from kit.metrics import QueryGauge
from kit.pagination import Page, PageParams
from kit.service import ServiceRuntime, create_service_app, make_broker
from kit.web import RequestUnitOfWork
from services.payments.config import PaymentsSettings
from services.payments.consumers import register_consumers
from services.payments.invoice_client import HttpInvoiceReader, InvoiceReader
from services.payments.models import Payment, Refund, payments_database
from services.payments.repository import PaymentFilter
from services.payments.schemas import (
    CheckoutOut,
    CheckoutStatusOut,
    MarkPaidRequest,
    PaymentOut,
    RefundOut,
)
from services.payments.service import PaymentsService
from services.payments.stripe import intake as stripe_intake
from services.payments.stripe.gateway import StripeGateway, StripeSdkGateway
from services.payments.stripe.intake import WebhookIntake
from services.payments.stripe.worker import WebhookWorker, run_worker_child

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


def payments_service(uow: RequestUnitOfWork, request: Request) -> PaymentsService:
    ctx = _ctx(request)
    return PaymentsService(uow, ctx.settings, ctx.stripe, ctx.invoices)


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


# Every POST here records its Idempotency-Key with its effect (kit.idempotency): whatever timed out on
# the way, a retry with the key replays the first payment instead of recording a second.
invoices = APIRouter(prefix="/api/invoices", tags=["payments"], route_class=IdempotentRoute)
payments = APIRouter(prefix="/api/payments", tags=["payments"])


@invoices.post("/{invoice_id}/checkout", response_model=CheckoutOut)
async def create_checkout(invoice_id: uuid.UUID, svc: Service, actor: CurrentActor) -> CheckoutOut:
    """Pay Now: a Stripe Checkout Session for the amount due (a repeat while it is open returns it); for
    a subscription's invoice, the Stripe invoice's own hosted page (`stripeInvoiceId`, no session)."""
    link = await svc.checkout(str(invoice_id), actor)
    return CheckoutOut(url=link.url, session_id=link.session_id, stripe_invoice_id=link.stripe_invoice_id,
                       expires_at=link.expires_at, amount=link.amount, currency=link.currency, reused=link.reused)


@invoices.post("/{invoice_id}/mark-paid", status_code=status.HTTP_201_CREATED, response_model=PaymentOut)
async def mark_paid(invoice_id: uuid.UUID, body: MarkPaidRequest, svc: Service, actor: AdminActor) -> PaymentOut:
    """Record a manual payment (bank transfer, cash, cheque, other); partial allowed, overpayment refused."""
    payment = await svc.mark_paid(str(invoice_id), body, actor)
    return payment_out(payment)


@payments.get("", response_model=Page[PaymentOut])
async def list_payments(
    svc: Service,
    actor: CurrentActor,
    page: PageParams,
    invoice_id: Annotated[uuid.UUID | None, Query(alias="invoiceId")] = None,
    client_id: Annotated[uuid.UUID | None, Query(alias="clientId")] = None,
    status_: Annotated[list[str] | None, Query(alias="status", max_length=30)] = None,
    method: Annotated[list[str] | None, Query(max_length=30)] = None,
    source: Annotated[str | None, Query(pattern="^(stripe|manual)$")] = None,
) -> Page[PaymentOut]:
    """Payment history, newest first: per invoice (`invoiceId`), per client (`clientId`); a client sees
    only its own. `limit` + `cursor` pages; `total` counts every match."""
    f = PaymentFilter(
        invoice_id=str(invoice_id) if invoice_id else None,
        client_id=str(client_id) if client_id else None,
        statuses=tuple(status_ or ()),
        methods=tuple(method or ()),
        source=source,
    )
    result, refunds = await svc.search(f, actor, page)
    return Page[PaymentOut](items=[payment_out(p, refunds.get(p.id)) for p in result.items],
                            next_cursor=result.next_cursor, has_more=result.has_more, total=result.total)


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


def build_runtime(
    settings: PaymentsSettings | None = None,
    *,
    stripe_gateway: StripeGateway | None = None,
    invoice_reader: InvoiceReader | None = None,
) -> tuple[ServiceRuntime, PaymentsContext]:
    settings = settings or PaymentsSettings()
    db = payments_database(settings.database_url, settings.db_pool_size)
    broker = make_broker(settings)
    register_consumers(broker, db, group_id=settings.consumer_group)
    reader = invoice_reader or HttpInvoiceReader(settings.invoice_url, settings.internal_token)
    gateway = stripe_gateway or StripeSdkGateway.from_settings(settings)
    worker = WebhookWorker(db, settings, reader, gateway)  # inline mode's, and what tools drive by hand
    # By default the worker runs in a child process (its own GIL: the intake's acks and the worker's
    # processing no longer take turns); the intake's NOTIFY wakes it. Injected doubles only exist here.
    child = (settings.webhook_worker_mode == "process" and settings.webhook_worker_enabled
             and stripe_gateway is None and invoice_reader is None)
    background: WebhookWorker | ChildProcess = worker
    if child:
        background = ChildProcess(WebhookWorker.name, run_worker_child, (settings,), service=settings.service_name,
                                  log_level=settings.log_level, log_json=settings.log_json)
    intake = WebhookIntake(db, settings, (lambda: None) if child else worker.wake)
    ctx = PaymentsContext(settings=settings, db=db, stripe=gateway, invoices=reader, intake=intake, worker=worker)

    async def close_reader() -> None:
        if isinstance(reader, HttpInvoiceReader):
            await reader.aclose()

    runtime = ServiceRuntime(
        settings=settings,
        db=db,
        broker=broker,
        migrations=MIGRATIONS,
        on_startup=[intake.start, background.start],  # a child is waited for by the runtime
        on_shutdown=[background.stop, intake.stop, close_reader],
        workers=[background],  # /readyz: 503 while it is dead, stuck or deaf
    )
    runtime.metrics += [  # /metrics: the stored Stripe events the worker has not yet processed, and failures
        QueryGauge(db, "billing_payments_webhook_events",
                   "Stored Stripe webhook events by status: pending (the worker's backlog) and failed (given up).",
                   "SELECT status, count(*) FROM stripe_events WHERE status IN ('pending', 'failed') GROUP BY status",
                   labels=["status"], fill=[("pending",), ("failed",)]),
        QueryGauge(db, "billing_payments_webhook_retrying",
                   "Pending Stripe webhook events that have failed at least once (waiting for their next attempt).",
                   "SELECT count(*) FROM stripe_events WHERE status = 'pending' AND attempts > 0"),
        QueryGauge(db, "billing_payments_webhook_oldest_pending_age_seconds",
                   "Age of the oldest Stripe webhook event not yet processed (0 when none waits).",
                   "SELECT COALESCE(EXTRACT(EPOCH FROM now() - min(received_at)), 0) FROM stripe_events "
                   "WHERE status = 'pending'"),
    ]
    return runtime, ctx


def create_app(
    settings: PaymentsSettings | None = None,
    *,
    stripe_gateway: StripeGateway | None = None,
    invoice_reader: InvoiceReader | None = None,
) -> FastAPI:
    runtime, ctx = build_runtime(settings, stripe_gateway=stripe_gateway, invoice_reader=invoice_reader)
    app = create_service_app(
        runtime,
        title="Payments service",
        description="Stripe Checkout, Stripe webhooks, manual payments and payment history.",
        routers=[invoices, payments],
    )
    app.state.payments = ctx
    stripe_intake.install(app, ctx.intake, max_body=ctx.settings.webhook_max_body)
    return app
