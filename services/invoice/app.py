"""HTTP API of the invoice service (served to the gateway, which authenticates the caller)."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import date
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Response, status
from fastapi.routing import APIRoute

from kit.actor import AdminActor, CurrentActor
from kit.errors import AppError, InvalidInput, NotFound
from kit.service import PeriodicJob, ServiceRuntime, create_service_app, make_broker
from services.invoice.config import InvoiceSettings
from services.invoice.consumers import register_consumers
from services.invoice.documents import InvoicePdfs, etag, etag_matches
from services.invoice.models import Invoice
from services.invoice.repository import InvoiceFilter
from services.invoice.schemas import (
    ClientCreate,
    ClientOut,
    InvoiceCreate,
    InvoiceOut,
    InvoicePage,
    InvoiceUpdate,
    LogoOut,
    OverdueScanRequest,
    OverdueScanResult,
    PaymentOut,
    SendRequest,
    SortField,
    TemplateOut,
    TemplatePreview,
    TemplateUpdate,
)
from services.invoice.service import InvoiceService, utcnow
from services.invoice.status import InvoiceStatus
from services.invoice.templates import (
    LOGO_URL,
    StoredTemplate,
    TemplateCache,
    TemplateService,
    read_logo_upload,
    validate_uploaded_logo,
)

MIGRATIONS = Path(__file__).parent / "migrations"
# PostgreSQL text cannot hold U+0000: such a filter is refused (422) instead of failing the query.
NO_NUL = r"^[^\x00]*$"


async def invoice_service(request: Request) -> AsyncIterator[InvoiceService]:
    runtime: ServiceRuntime = request.app.state.runtime
    settings: InvoiceSettings = runtime.settings  # type: ignore[assignment]
    async with runtime.db.unit_of_work() as uow:
        yield InvoiceService(uow, default_net_days=settings.default_net_days)


Service = Annotated[InvoiceService, Depends(invoice_service)]


async def template_service(request: Request) -> AsyncIterator[TemplateService]:
    runtime: ServiceRuntime = request.app.state.runtime
    async with runtime.db.unit_of_work() as uow:
        yield TemplateService(uow, request.app.state.template_cache)


Templates = Annotated[TemplateService, Depends(template_service)]


async def invoice_pdfs(request: Request) -> InvoicePdfs:
    return request.app.state.pdfs  # type: ignore[no-any-return]


Pdfs = Annotated[InvoicePdfs, Depends(invoice_pdfs)]


class PayloadTooLarge(AppError):
    status_code = 413
    code = "payload_too_large"


class LimitedBodyRoute(APIRoute):
    """Refuses a body whose declared length is over `MAX_BODY` before FastAPI reads it."""

    MAX_BODY = 2 * 1024 * 1024

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        limit = self.MAX_BODY

        async def limited(request: Request) -> Response:
            declared = request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise PayloadTooLarge(f"The request body is larger than {limit // 1024} KB.")
            return await handler(request)

        return limited


PDF_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/pdf": {"schema": {"type": "string", "format": "binary"}}}},
}


def invoice_out(invoice: Invoice) -> InvoiceOut:
    return InvoiceOut.model_validate(invoice)


clients = APIRouter(prefix="/api/clients", tags=["clients"])
invoices = APIRouter(prefix="/api/invoices", tags=["invoices"])
template = APIRouter(prefix="/api/invoice-template", tags=["invoice template"], route_class=LimitedBodyRoute)
# The logo upload caps its own (streamed) body at the logo limit.
template_logo = APIRouter(prefix="/api/invoice-template", tags=["invoice template"])


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
    project_id: Annotated[str | None, Query(alias="projectId", max_length=100, pattern=NO_NUL)] = None,
    number: Annotated[str | None, Query(max_length=20, pattern=NO_NUL)] = None,
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
        # mark_viewed changes this same (identity-mapped) instance: no need to read it again.
        await svc.mark_viewed(invoice_id, cause_id=f"portal:{actor.user_id}")
        await svc.uow.commit()
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


@invoices.get("/{invoice_id}/pdf", response_class=Response, responses={**PDF_RESPONSES, 304: {}})
async def invoice_pdf(
    invoice_id: uuid.UUID,
    pdfs: Pdfs,
    actor: CurrentActor,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """The invoice as a PDF, for admins, services and the owning client (anyone else: 404).

    Drafts use the current template, sent invoices the template version they were sent with.
    Rendered once per content (ETag = content fingerprint; If-None-Match gives 304). Downloading
    does not mark the invoice viewed."""
    result = await pdfs.get(invoice_id, actor, if_none_match=if_none_match)
    headers = {"ETag": etag(result.fingerprint), "Cache-Control": "private, no-cache"}
    if result.pdf is None:
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    headers["Content-Disposition"] = f'attachment; filename="{result.filename}"'
    headers["X-PDF-Cache"] = "hit" if result.cached else "miss"
    return Response(content=result.pdf, media_type="application/pdf", headers=headers)


def template_out(stored: StoredTemplate) -> TemplateOut:
    settings = stored.settings
    logo = settings.logo
    return TemplateOut(
        **settings.model_dump(exclude={"logo"}),
        version=stored.version,
        created_at=stored.created_at,
        created_by=stored.created_by,
        logo=None
        if logo is None
        else LogoOut(
            mime=logo.mime,
            width=logo.width,
            height=logo.height,
            source_mime=logo.source_mime or None,
            url=f"{LOGO_URL}?version={stored.version}",
        ),
    )


@template.get("", response_model=TemplateOut)
async def get_template(templates: Templates, _: AdminActor) -> TemplateOut:
    """The current template (version 0 with the defaults while nothing has been saved)."""
    return template_out(await templates.current())


@template.put("", response_model=TemplateOut)
async def put_template(body: TemplateUpdate, templates: Templates, actor: AdminActor) -> TemplateOut:
    """Save the template as a new version. A full replace: omitted fields take their defaults;
    `companyName` is required; the logo is kept unless `removeLogo` is true. Invoices already sent
    keep the version they were sent with."""
    stored = await templates.save(body, actor)
    await templates.uow.commit()
    return template_out(stored)


@template.post("/preview", response_class=Response, responses=PDF_RESPONSES)
async def preview_template(body: TemplatePreview, templates: Templates, pdfs: Pdfs, _: AdminActor) -> Response:
    """A sample invoice rendered with these (unsaved) settings, for a live preview."""
    if body.remove_logo or ("logo" in body.model_fields_set and body.logo is None):
        logo = None
    elif body.logo is not None:
        logo = await validate_uploaded_logo(body.logo.data, body.logo.mime)
    else:
        logo = (await templates.current()).settings.logo
    await templates.uow.session.close()  # no database work while rendering
    pdf = await pdfs.preview(body.to_settings(logo))
    return Response(
        content=pdf,
        media_type="application/pdf",
        headers={"Content-Disposition": 'inline; filename="invoice-preview.pdf"', "Cache-Control": "no-store"},
    )


@template_logo.post("/logo", status_code=status.HTTP_201_CREATED, response_model=TemplateOut,
                    openapi_extra={"requestBody": {"content": {
                        "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
                            "file": {"type": "string", "format": "binary"}}}},
                        "image/png": {"schema": {"type": "string", "format": "binary"}},
                        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                        "image/svg+xml": {"schema": {"type": "string", "format": "binary"}},
                    }}})
async def upload_logo(request: Request, templates: Templates, actor: AdminActor) -> TemplateOut:
    """Upload the logo (PNG, JPEG or SVG, at most 1 MB): a multipart `file` field or the raw image
    as the body. It is validated and normalized (raster to PNG, SVG sanitized) and saved as a new
    template version. 413 `logo_too_large`, 415 for another body type, 422 `invalid_logo`."""
    data, content_type = await read_logo_upload(request)
    logo = await validate_uploaded_logo(data, content_type)
    stored = await templates.set_logo(logo, actor)
    await templates.uow.commit()
    return template_out(stored)


@template_logo.get("/logo", response_class=Response,
                   responses={200: {"content": {"image/png": {}, "image/svg+xml": {}}}, 304: {}, 404: {}})
async def get_logo(
    templates: Templates,
    _: CurrentActor,
    version: Annotated[int | None, Query(ge=0, le=2**31 - 1)] = None,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """The current logo image, or that of `version` (immutable, cacheable for good)."""
    stored = await templates.current() if version is None else await templates.version(version)
    logo = stored.settings.logo if stored is not None else None
    if logo is None:
        raise NotFound("No logo." if version is None else f"No logo in template version {version}.")
    digest = hashlib.sha256(logo.data).hexdigest()
    headers = {
        "ETag": etag(digest),
        "Cache-Control": "private, no-cache" if version is None else "private, max-age=31536000, immutable",
        "X-Content-Type-Options": "nosniff",
        # a sanitized SVG opened directly still runs nothing
        "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:",
    }
    if etag_matches(if_none_match, digest):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    return Response(content=logo.data, media_type=logo.mime, headers=headers)


def build_runtime(settings: InvoiceSettings | None = None) -> ServiceRuntime:
    from kit.db import Database
    from services.invoice.models import InboxEvent, OutboxMessage

    settings = settings or InvoiceSettings()
    db = Database(settings.database_url, outbox_model=OutboxMessage, inbox_model=InboxEvent,
                  pool_size=settings.db_pool_size)
    broker = make_broker(settings)
    register_consumers(broker, db, settings.group_id)

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
    app = create_service_app(
        runtime,
        title="Invoice service",
        description="Clients, invoices, numbering, the invoice status machine, the invoice template and PDFs.",
        routers=[clients, invoices, template, template_logo],
    )
    config: InvoiceSettings = runtime.settings  # type: ignore[assignment]
    app.state.template_cache = TemplateCache()
    app.state.pdfs = InvoicePdfs(
        db=runtime.db,
        templates=app.state.template_cache,
        portal_url=config.portal_url,
        render_slots=asyncio.Semaphore(max(1, config.pdf_render_concurrency)),
    )
    return app
