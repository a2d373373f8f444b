"""HTTP API of the invoice service (served to the gateway, which authenticates the caller)."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from datetime import date
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from kit.actor import AdminActor, CurrentActor
from kit.clock import utcnow
from kit.errors import NotFound
from kit.idempotency import IdempotentRoute
from kit.pagination import Page, PageParams
from kit.service import PeriodicJob, ServiceRuntime, create_service_app, make_broker
from kit.web import RequestUnitOfWork
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
    InvoicePreview,
    InvoicePreviewOut,
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
from services.invoice.service import InvoiceService
from services.invoice.status import InvoiceStatus
from services.invoice.templates import (
    LOGO_BODY_LIMIT,
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
# Every body but the logo's: a template, or an invoice of 1,000 long lines, fits.
MAX_BODY = 2 * 1024 * 1024
M = TypeVar("M", bound=BaseModel)


# The services are built on the request's unit of work (committed once the handler returns). The
# factories are async only so FastAPI calls them inline instead of in its thread pool.
async def invoice_service(uow: RequestUnitOfWork, request: Request) -> InvoiceService:
    settings: InvoiceSettings = request.app.state.runtime.settings
    return InvoiceService(uow, default_net_days=settings.default_net_days)


Service = Annotated[InvoiceService, Depends(invoice_service)]


async def template_service(uow: RequestUnitOfWork, request: Request) -> TemplateService:
    return TemplateService(uow, request.app.state.template_cache)


Templates = Annotated[TemplateService, Depends(template_service)]


async def invoice_pdfs(request: Request) -> InvoicePdfs:
    return request.app.state.pdfs  # type: ignore[no-any-return]


Pdfs = Annotated[InvoicePdfs, Depends(invoice_pdfs)]


def parse_body(model: type[M], raw: bytes) -> M:
    """A JSON body read raw by the route, validated only now; errors as FastAPI's own 422."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**err, "loc": ("body", *err["loc"])} for err in exc.errors(include_url=False)]
        ) from None


def json_body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI for a body the route reads itself: the model's schema, nested models by reference
    (they are among the document's components already, through the routes that take them)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


PDF_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/pdf": {"schema": {"type": "string", "format": "binary"}}}},
}


def invoice_out(invoice: Invoice) -> InvoiceOut:
    return InvoiceOut.model_validate(invoice)


# Every POST of these routers records its Idempotency-Key with its effect (kit.idempotency).
clients = APIRouter(prefix="/api/clients", tags=["clients"], route_class=IdempotentRoute)
invoices = APIRouter(prefix="/api/invoices", tags=["invoices"], route_class=IdempotentRoute)
# Reads that are POSTs (they take a body): nothing to deduplicate, so no Idempotency-Key is recorded.
invoice_reads = APIRouter(prefix="/api/invoices", tags=["invoices"])
template = APIRouter(prefix="/api/invoice-template", tags=["invoice template"])


@clients.post("", status_code=status.HTTP_201_CREATED, response_model=ClientOut)
async def create_client(body: ClientCreate, svc: Service, _: AdminActor) -> ClientOut:
    return ClientOut.model_validate(await svc.create_client(body))


@clients.get("", response_model=Page[ClientOut])
async def list_clients(
    svc: Service, actor: CurrentActor, page: PageParams,
    q: Annotated[str | None, Query(max_length=100, description="Only clients whose name or email contains this "
                                   "text (any case; `%` and `_` match themselves).")] = None,
) -> Page[ClientOut]:
    """Clients, newest first (a client login sees its own); `total` counts them all (that match `q`)."""
    result = await svc.list_clients(actor, page, search=q.strip() if q and q.strip() else None)
    return Page[ClientOut](items=[ClientOut.model_validate(c) for c in result.items], next_cursor=result.next_cursor,
                           has_more=result.has_more, total=result.total)


@clients.get("/{client_id}", response_model=ClientOut)
async def get_client(client_id: uuid.UUID, svc: Service, actor: CurrentActor) -> ClientOut:
    return ClientOut.model_validate(await svc.get_client(client_id, actor))


@invoices.post("", status_code=status.HTTP_201_CREATED, response_model=InvoiceOut)
async def create_invoice(body: InvoiceCreate, svc: Service, _: AdminActor) -> InvoiceOut:
    return invoice_out(await svc.create_invoice(body))


@invoice_reads.post("/preview", response_model=InvoicePreviewOut)
async def preview_invoice(body: InvoicePreview, svc: Service, _: AdminActor) -> InvoicePreviewOut:
    """The totals of the draft `POST /api/invoices` would create from this body, computed by the
    same rules and refused with the same 422s, saving nothing (no invoice, no event). `clientId` is
    optional here: the currency is `currency`, else the client's (with neither, `currency` is
    required). Answers the currency, subtotal, discountAmount, taxAmount, total and each line's
    amount and taxAmount, in minor units. An Idempotency-Key is accepted and ignored."""
    draft = await svc.preview_invoice(body)
    return InvoicePreviewOut.model_validate(draft)


@invoices.get("", response_model=Page[InvoiceOut])
async def list_invoices(
    svc: Service,
    actor: CurrentActor,
    page: PageParams,
    status_: Annotated[list[InvoiceStatus] | None, Query(alias="status")] = None,
    client_id: Annotated[uuid.UUID | None, Query(alias="clientId")] = None,
    project_id: Annotated[str | None, Query(alias="projectId", max_length=100, pattern=NO_NUL)] = None,
    number: Annotated[str | None, Query(max_length=20, pattern=NO_NUL)] = None,
    due_before: Annotated[date | None, Query(alias="dueBefore")] = None,
    due_after: Annotated[date | None, Query(alias="dueAfter")] = None,
    issued_from: Annotated[date | None, Query(alias="issuedFrom")] = None,
    issued_to: Annotated[date | None, Query(alias="issuedTo")] = None,
    sort: SortField = "-createdAt",
) -> Page[InvoiceOut]:
    """Invoices matching every filter given, in `sort` order (`-` = descending; NULLs last), `limit`
    at a time; `total` counts all that match. A client login sees its own sent invoices only. A
    cursor only works with the sort and filters of the page that gave it (else 400)."""
    f = InvoiceFilter(
        client_id=client_id,
        statuses=tuple(sorted(set(status_ or ()))),
        project_id=project_id,
        number=number,
        due_before=due_before,
        due_after=due_after,
        issued_from=issued_from,
        issued_to=issued_to,
    )
    result = await svc.search(f, actor, sort=sort, page=page)
    return Page[InvoiceOut](items=[invoice_out(i) for i in result.items], next_cursor=result.next_cursor,
                            has_more=result.has_more, total=result.total)


@invoices.post("/mark-overdue", response_model=OverdueScanResult)
async def mark_overdue(svc: Service, _: AdminActor, body: OverdueScanRequest | None = None) -> OverdueScanResult:
    """Mark overdue, now, as of `asOf` (default: today, UTC): every SENT, VIEWED or PARTIAL invoice
    whose due date is before `asOf` becomes OVERDUE (one `invoice.overdue` event each). The
    invoice service is the one source of truth for "overdue"; the same scan runs on its schedule.

    Answers `{asOf, markedOverdue, invoiceIds}`: the date used, how many invoices this call moved
    and their ids (oldest due date first). Invoices already OVERDUE are not listed again. Safe to
    call at once with another scan: it waits for invoices another scan holds, so when it answers,
    no open invoice due before `asOf` is left (each was moved by this call or by the other one,
    whose ids that one reports); calling it again with the same `asOf` moves nothing more."""
    as_of = (body.as_of if body else None) or utcnow().date()
    ids = await svc.mark_overdue(as_of, wait_for_locked=True)
    return OverdueScanResult(as_of=as_of, marked_overdue=len(ids), invoice_ids=ids)


@invoices.get("/{invoice_id}", response_model=InvoiceOut)
async def get_invoice(invoice_id: uuid.UUID, svc: Service, actor: CurrentActor) -> InvoiceOut:
    """The invoice; a client opening its SENT invoice makes it VIEWED."""
    return invoice_out(await svc.read(invoice_id, actor))


@invoices.put("/{invoice_id}", response_model=InvoiceOut, openapi_extra=json_body_doc(InvoiceUpdate))
async def update_invoice(invoice_id: uuid.UUID, request: Request, svc: Service, _: AdminActor) -> InvoiceOut:
    """Replace fields of a draft; accepts the body that created it. Fields given replace the stored
    ones, fields omitted keep theirs, `items` replaces every line, `clientId` may name another
    client (the currency then follows it unless `currency` is given).

    Only a draft can be edited: on any other invoice the answer is 409 `invoice_not_editable`,
    whatever the body (it is read only after that check); then an invalid body is a 422."""
    raw = await request.body()
    invoice = await svc.editable_draft(invoice_id)
    return invoice_out(await svc.update_invoice(invoice, parse_body(InvoiceUpdate, raw)))


@invoices.post("/{invoice_id}/send", response_model=InvoiceOut)
async def send_invoice(
    invoice_id: uuid.UUID, svc: Service, _: AdminActor, body: SendRequest | None = None
) -> InvoiceOut:
    return invoice_out(await svc.send(invoice_id, resend=bool(body and body.resend)))


@invoices.post("/{invoice_id}/cancel", response_model=InvoiceOut)
async def cancel_invoice(invoice_id: uuid.UUID, svc: Service, _: AdminActor) -> InvoiceOut:
    return invoice_out(await svc.cancel(invoice_id))


@invoices.get("/{invoice_id}/payments", response_model=Page[PaymentOut])
async def invoice_payments(
    invoice_id: uuid.UUID, svc: Service, actor: CurrentActor, page: PageParams
) -> Page[PaymentOut]:
    """Payments applied to this invoice, oldest first (the invoice's own ledger; refunds as negative
    amounts)."""
    result = await svc.payments(invoice_id, actor, page)
    return Page[PaymentOut](items=[PaymentOut.model_validate(p) for p in result.items],
                            next_cursor=result.next_cursor, has_more=result.has_more, total=result.total)


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
    return template_out(await templates.save(body, actor))


@template.post("/preview", response_class=Response, responses=PDF_RESPONSES)
async def preview_template(body: TemplatePreview, templates: Templates, pdfs: Pdfs, _: AdminActor) -> Response:
    """A sample invoice rendered with these (unsaved) settings, for a live preview."""
    settings = await templates.preview_settings(body)
    await templates.uow.session.close()  # no database connection held while rendering
    pdf = await pdfs.preview(settings)
    return Response(
        content=pdf,
        media_type="application/pdf",
        headers={"Content-Disposition": 'inline; filename="invoice-preview.pdf"', "Cache-Control": "no-store"},
    )


@template.post("/logo", status_code=status.HTTP_201_CREATED, response_model=TemplateOut,
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
    return template_out(await templates.set_logo(logo, actor))


@template.get("/logo", response_class=Response,
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
    from services.invoice.models import IdempotencyKey, InboxEvent, OutboxMessage

    settings = settings or InvoiceSettings()
    db = Database(settings.database_url, outbox_model=OutboxMessage, inbox_model=InboxEvent,
                  idempotency_model=IdempotencyKey, pool_size=settings.db_pool_size)
    broker = make_broker(settings)
    register_consumers(broker, db, settings.group_id)

    async def overdue_job() -> int:
        async with db.transaction() as uow:
            return len(await InvoiceService(uow).mark_overdue(utcnow().date()))

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
        routers=[clients, invoice_reads, invoices, template],
        max_body=MAX_BODY,
        # The logo upload reads its body itself, up to the logo's own limit (413 logo_too_large):
        # here only the room it may take at most.
        body_limits={LOGO_URL: LOGO_BODY_LIMIT},
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
