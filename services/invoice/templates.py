"""Invoice template settings: versioned, append-only storage and the logo upload. No HTTP routing.

Every save (settings or logo) inserts a new version; the current template is the highest version and
version 0 stands for the built-in defaults (`TemplateSettings()`) while nothing has been saved. An
invoice records the version current when it was sent (`invoices.template_version`) and is rendered
with that version for good; drafts follow the current one.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any

import structlog
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from kit.actor import Actor
from kit.db import UnitOfWork
from kit.errors import AppError, Conflict, InvalidInput, PayloadTooLarge
from kit.web import receive_body
from services.invoice.models import Invoice, InvoiceTemplate
from services.invoice.pdf import LogoError, NormalizedLogo, TemplateSettings, validate_logo
from services.invoice.pdf.logo import MAX_LOGO_BYTES
from services.invoice.repository import TemplateRepository
from services.invoice.schemas import TemplatePreview, TemplateUpdate
from services.invoice.status import InvoiceStatus

log = structlog.get_logger(__name__)

DEFAULT_VERSION = 0
LOGO_URL = "/api/invoice-template/logo"


class LogoTooLarge(PayloadTooLarge):
    code = "logo_too_large"


class UnsupportedUpload(AppError):
    status_code = 415
    code = "unsupported_media_type"


class InvalidLogo(AppError):
    status_code = 422
    code = "invalid_logo"


@dataclass(frozen=True)
class StoredTemplate:
    version: int
    settings: TemplateSettings  # with the logo
    created_at: datetime | None = None
    created_by: str | None = None


DEFAULT_TEMPLATE = StoredTemplate(version=DEFAULT_VERSION, settings=TemplateSettings())


class TemplateCache:
    """Saved versions never change, so a version read once can be kept (per process, small LRU)."""

    def __init__(self, size: int = 16) -> None:
        self._size = size
        self._items: OrderedDict[int, StoredTemplate] = OrderedDict()

    def get(self, version: int) -> StoredTemplate | None:
        found = self._items.get(version)
        if found is not None:
            self._items.move_to_end(version)
        return found

    def put(self, stored: StoredTemplate) -> None:
        self._items[stored.version] = stored
        self._items.move_to_end(stored.version)
        while len(self._items) > self._size:
            self._items.popitem(last=False)


def _settings_from_row(row: InvoiceTemplate) -> TemplateSettings:
    logo = None
    if row.logo_data and row.logo_mime and row.logo_width and row.logo_height:
        logo = NormalizedLogo(
            data=row.logo_data,
            mime=row.logo_mime,  # type: ignore[arg-type]
            width=row.logo_width,
            height=row.logo_height,
            source_mime=row.logo_source_mime or "",
        )
    data: dict[str, Any] = {k: v for k, v in dict(row.settings or {}).items() if k != "logo"}
    try:
        return TemplateSettings.model_validate({**data, "logo": logo})
    except ValidationError as exc:
        # Stored by an older (or newer) version of the code with different rules: keep what still
        # validates rather than fail the invoice.
        bad = {str(err["loc"][0]) for err in exc.errors() if err.get("loc")}
        log.warning("invoice_template_fields_dropped", version=row.version, fields=sorted(bad))
        kept = {k: v for k, v in data.items() if k not in bad}
        return TemplateSettings.model_validate({**kept, "logo": logo})


def _row(version: int, settings: TemplateSettings, actor: Actor) -> InvoiceTemplate:
    logo = settings.logo
    return InvoiceTemplate(
        version=version,
        settings=settings.model_dump(mode="json", by_alias=True, exclude={"logo"}),
        logo_data=logo.data if logo else None,
        logo_mime=logo.mime if logo else None,
        logo_width=logo.width if logo else None,
        logo_height=logo.height if logo else None,
        logo_source_mime=(logo.source_mime or None) if logo else None,
        created_by=actor.user_id or actor.role,
    )


@dataclass
class TemplateService:
    uow: UnitOfWork
    cache: TemplateCache | None = None

    @property
    def repo(self) -> TemplateRepository:
        return TemplateRepository(self.uow.session)

    async def version(self, version: int) -> StoredTemplate | None:
        if version == DEFAULT_VERSION:
            return DEFAULT_TEMPLATE
        cached = self.cache.get(version) if self.cache else None
        if cached is not None:
            return cached
        row = await self.repo.get(version)
        if row is None:
            return None
        stored = StoredTemplate(row.version, _settings_from_row(row), row.created_at, row.created_by)
        if self.cache:
            self.cache.put(stored)
        return stored

    async def current(self) -> StoredTemplate:
        latest = await self.repo.latest_version()
        return await self.version(latest) or DEFAULT_TEMPLATE

    async def for_invoice(self, invoice: Invoice) -> StoredTemplate:
        """Sent invoices keep the version they were sent with; drafts (and invoices sent before
        templates existed) use the current one."""
        if invoice.status != InvoiceStatus.DRAFT and invoice.template_version is not None:
            pinned = await self.version(invoice.template_version)
            if pinned is not None:
                return pinned
            log.warning("invoice_template_version_missing", invoice_id=str(invoice.id),
                        version=invoice.template_version)
        return await self.current()

    async def _insert(self, settings: TemplateSettings, actor: Actor) -> StoredTemplate:
        """Caller holds the lock and derived `settings` from the current version."""
        version = await self.repo.latest_version() + 1
        row = await self.repo.add(_row(version, settings, actor))
        stored = StoredTemplate(version, settings, row.created_at, row.created_by)
        return stored

    async def save(self, update: TemplateUpdate, actor: Actor) -> StoredTemplate:
        await self.repo.lock()
        current = await self.current()
        if update.version is not None and update.version != current.version:
            raise Conflict(
                f"The template was changed (now version {current.version}) since version {update.version} "
                "was loaded; reload it and apply the changes again.",
                code="template_version_conflict",
                details={"expected": update.version, "current": current.version},
            )
        logo = None if update.remove_logo else current.settings.logo
        return await self._insert(update.to_settings(logo), actor)

    async def preview_settings(self, preview: TemplatePreview) -> TemplateSettings:
        """The unsaved settings of a preview with its logo: none when `removeLogo` or `logo: null`,
        the given one (validated again) when there is one, else the saved logo."""
        if preview.remove_logo or ("logo" in preview.model_fields_set and preview.logo is None):
            logo = None
        elif preview.logo is not None:
            logo = await validate_uploaded_logo(preview.logo.data, preview.logo.mime)
        else:
            logo = (await self.current()).settings.logo
        return preview.to_settings(logo)

    async def set_logo(self, logo: NormalizedLogo, actor: Actor) -> StoredTemplate:
        await self.repo.lock()
        current = await self.current()
        settings = current.settings.model_copy(update={"logo": logo})
        return await self._insert(settings, actor)


# -- logo upload -----------------------------------------------------------------------------------

RAW_LOGO_TYPES = frozenset(
    {"image/png", "image/x-png", "image/jpeg", "image/jpg", "image/pjpeg", "image/svg+xml", "image/svg"}
)
_EXTENSION_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}
# room for the multipart boundaries and part headers around a file at the limit
MULTIPART_OVERHEAD = 16 * 1024
# The most a logo upload request may carry (the service's body limit for LOGO_URL).
LOGO_BODY_LIMIT = MAX_LOGO_BYTES + MULTIPART_OVERHEAD


def _too_large() -> LogoTooLarge:
    return LogoTooLarge(f"The logo is larger than the {MAX_LOGO_BYTES // (1024 * 1024)} MB limit.",
                        details={"maxBytes": MAX_LOGO_BYTES})


async def _read_capped(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it passes `limit` (declared or actual): never read beyond it.
    The logo's own 413 (`logo_too_large`), not the generic one."""
    try:
        return await receive_body(request.receive, limit=limit, content_length=request.headers.get("content-length"))
    except PayloadTooLarge as exc:
        raise _too_large() from exc


async def read_logo_upload(request: Request) -> tuple[bytes, str]:
    """The uploaded logo and its declared type, from a multipart `file` field or a raw image body."""
    content_type = request.headers.get("content-type", "")
    mime = content_type.split(";", 1)[0].strip().lower()
    if mime == "multipart/form-data":
        body = await _read_capped(request, MAX_LOGO_BYTES + MULTIPART_OVERHEAD)
        return await _from_multipart(request, body)
    if mime in RAW_LOGO_TYPES:
        return await _read_capped(request, MAX_LOGO_BYTES), mime
    raise UnsupportedUpload(
        f"Upload the logo as multipart/form-data (field `file`) or as a raw PNG, JPEG or SVG body, "
        f"not {mime or 'an untyped body'}.",
        details={"accepted": ["multipart/form-data", "image/png", "image/jpeg", "image/svg+xml"]},
    )


async def _from_multipart(request: Request, body: bytes) -> tuple[bytes, str]:
    async def stream() -> Any:
        yield body

    parser = MultiPartParser(request.headers, stream(), max_files=2, max_fields=10,
                             max_part_size=MAX_LOGO_BYTES + MULTIPART_OVERHEAD)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise InvalidInput(f"The multipart body cannot be read: {exc.message}", code="invalid_upload") from exc
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidInput("Send the logo in a multipart file field named `file`.",
                               details=[{"field": "file", "message": "required"}])
        data = await upload.read()
        declared = (upload.content_type or "").split(";", 1)[0].strip().lower()
        if declared in ("", "application/octet-stream"):
            # Some clients send no part type: go by the file name, validate_logo checks the content.
            declared = _EXTENSION_TYPES.get(PurePosixPath(upload.filename or "").suffix.lower(), declared)
        return data, declared
    finally:
        await form.close()


async def validate_uploaded_logo(data: bytes, content_type: str) -> NormalizedLogo:
    """Decode and normalize in a worker thread (Pillow/svglib work is CPU-bound)."""
    if len(data) > MAX_LOGO_BYTES:
        raise _too_large()
    try:
        return await asyncio.to_thread(validate_logo, data, content_type)
    except LogoError as exc:
        raise InvalidLogo(str(exc)) from exc
