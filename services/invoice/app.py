"""HTTP API of the invoice service (served to the gateway, which authenticates the caller)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import date
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Query, Request, status

from kit.actor import AdminActor, CurrentActor
from kit.errors import InvalidInput
from kit.service import PeriodicJob, ServiceRuntime, create_service_app, make_broker
from services.invoice.config import InvoiceSettings
from services.invoice.consumers import register_consumers
from services.invoice.models import Invoice
from services.invoice.repository import InvoiceFilter
from services.invoice.schemas import (
    ClientCreate,
    ClientOut,
    InvoiceCreate,
    InvoiceOut,
    InvoicePage,
    InvoiceUpdate,
    OverdueScanRequest,
    OverdueScanResult,
    PaymentOut,
    SendRequest,
    SortField,
)
from services.invoice.service import InvoiceService, utcnow
from services.invoice.status import InvoiceStatus

MIGRATIONS = __import__("pathlib").Path(__file__).parent / "migrations"


async def invoice_service(request: Request) -> AsyncIterator[InvoiceService]:
    runtime: ServiceRuntime = request.app.state.runtime
    settings: InvoiceSettings = runtime.settings  # type: ignore[assignment]
    async with runtime.db.unit_of_work() as uow:
        yield InvoiceService(uow, default_net_days=settings.default_net_days)


Service = Annotated[InvoiceService, Depends(invoice_service)]


def invoice_out(invoice: Invoice) -> InvoiceOut:
    return InvoiceOut.model_validate(invoice)


clients = APIRouter(prefix="/api/clients", tags=["clients"])
invoices = APIRouter(prefix="/api/invoices", tags=["invoices"])


@clients.post("", status_code=status.HTTP_201_CREATED, response_model=ClientOut)
async def create_client(body: ClientCreate, svc: Service, _: AdminActor) -> ClientOut:
    client = await svc.create_client(body)
    await svc.uow.commit()
    return ClientOut.model_validate(client)


@clients.get("", response_model=list[ClientOut])
async def list_clients(
    svc: Service,
    actor: CurrentActor,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[ClientOut]:
    return [ClientOut.model_validate(c) for c in await svc.list_clients(actor, limit, offset)]


@clients.get("/{client_id}", response_model=ClientOut)
async def get_client(client_id: uuid.UUID, svc: Service, actor: CurrentActor) -> ClientOut:
    return ClientOut.model_validate(await svc.get_client(client_id, actor))


@invoices.post("", status_code=status.HTTP_201_CREATED, response_model=InvoiceOut)
async def create_invoice(body: InvoiceCreate, svc: Service, _: AdminActor) -> InvoiceOut:
    invoice = await svc.create_invoice(body)
    await svc.uow.commit()
    return invoice_out(invoice)


@invoices.get("", response_model=InvoicePage)
async def list_invoices(
    svc: Service,
    actor: CurrentActor,
    status_: Annotated[list[InvoiceStatus] | None, Query(alias="status")] = None,
    client_id: Annotated[uuid.UUID | None, Query(alias="clientId")] = None,
    project_id: Annotated[str | None, Query(alias="projectId", max_length=100)] = None,
    number: Annotated[str | None, Query(max_length=20)] = None,
    due_before: Annotated[date | None, Query(alias="dueBefore")] = None,
    due_after: Annotated[date | None, Query(alias="dueAfter")] = None,
    issued_from: Annotated[date | None, Query(alias="issuedFrom")] = None,
    issued_to: Annotated[date | None, Query(alias="issuedTo")] = None,
    sort: SortField = "-createdAt",
    page: Annotated[int, Query(ge=1, le=100000)] = 1,
    page_size: Annotated[int, Query(alias="pageSize", ge=1, le=200)] = 50,
) -> InvoicePage:
    f = InvoiceFilter(
        client_id=client_id,
        statuses=tuple(status_ or ()),
        project_id=project_id,
        number=number,
        due_before=due_before,
        due_after=due_after,
        issued_from=issued_from,
        issued_to=issued_to,
    )
    rows, total = await svc.search(f, actor, sort=sort, page=page, page_size=page_size)
    return InvoicePage(items=[invoice_out(i) for i in rows], total=total, page=page, page_size=page_size)


@invoices.post("/mark-overdue", response_model=OverdueScanResult)
async def mark_overdue(svc: Service, _: AdminActor, body: OverdueScanRequest | None = None) -> OverdueScanResult:
    """Run the overdue scan now (it also runs on its own schedule)."""
    as_of = (body.as_of if body else None) or utcnow().date()
    count = await svc.mark_overdue(as_of)
    await svc.uow.commit()
    return OverdueScanResult(marked_overdue=count)


@invoices.get("/{invoice_id}", response_model=InvoiceOut)
async def get_invoice(invoice_id: uuid.UUID, svc: Service, actor: CurrentActor) -> InvoiceOut:
    invoice = await svc.get_invoice(invoice_id, actor)
    if actor.role == "client" and invoice.status == InvoiceStatus.SENT:
        # The client opened it in the portal.
        await svc.mark_viewed(invoice_id, cause_id=f"portal:{actor.user_id}")
        await svc.uow.commit()
        invoice = await svc.get_invoice(invoice_id, actor)
    return invoice_out(invoice)


@invoices.put("/{invoice_id}", response_model=InvoiceOut)
async def update_invoice(invoice_id: uuid.UUID, body: InvoiceUpdate, svc: Service, _: AdminActor) -> InvoiceOut:
    if not body.model_fields_set:
        raise InvalidInput("Nothing to update.")
    invoice = await svc.update_invoice(invoice_id, body)
    await svc.uow.commit()
    return invoice_out(invoice)


@invoices.post("/{invoice_id}/send", response_model=InvoiceOut)
async def send_invoice(
    invoice_id: uuid.UUID, svc: Service, _: AdminActor, body: SendRequest | None = None
) -> InvoiceOut:
    invoice = await svc.send(invoice_id, resend=bool(body and body.resend))
    await svc.uow.commit()
    return invoice_out(invoice)


@invoices.post("/{invoice_id}/cancel", response_model=InvoiceOut)
async def cancel_invoice(invoice_id: uuid.UUID, svc: Service, _: AdminActor) -> InvoiceOut:
    invoice = await svc.cancel(invoice_id)
    await svc.uow.commit()
    return invoice_out(invoice)


@invoices.get("/{invoice_id}/payments", response_model=list[PaymentOut])
async def invoice_payments(invoice_id: uuid.UUID, svc: Service, actor: CurrentActor) -> list[PaymentOut]:
    """Payments applied to this invoice (the invoice's own ledger; refunds as negative amounts)."""
    return [PaymentOut.model_validate(p) for p in await svc.payments(invoice_id, actor)]


def build_runtime(settings: InvoiceSettings | None = None) -> ServiceRuntime:
    from kit.db import Database
    from services.invoice.models import InboxEvent, OutboxMessage

    settings = settings or InvoiceSettings()
    db = Database(settings.database_url, outbox_model=OutboxMessage, inbox_model=InboxEvent,
                  pool_size=settings.db_pool_size)
    broker = make_broker(settings)
    register_consumers(broker, db)

    async def overdue_job() -> int:
        async with db.unit_of_work() as uow:
            count = await InvoiceService(uow).mark_overdue(utcnow().date())
            await uow.commit()
        return count

    return ServiceRuntime(
        settings=settings,
        db=db,
        broker=broker,
        migrations=MIGRATIONS,
        jobs=[PeriodicJob("mark-overdue", settings.overdue_scan_interval, overdue_job)],
    )


def create_app(settings: InvoiceSettings | None = None) -> FastAPI:
    runtime = build_runtime(settings)
    return create_service_app(
        runtime,
        title="Invoice service",
        description="Clients, invoices, numbering and the invoice status machine.",
        routers=[clients, invoices],
    )
