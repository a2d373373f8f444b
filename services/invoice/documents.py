"""Invoice PDFs: the printed document built from an invoice, rendered once per content and cached.

The cache key is `document_fingerprint(doc, template)`: it covers every printed field, the template
version's settings (logo by hash), the renderer version and fonts. So an unchanged invoice is served
from `invoice_pdfs` without rendering, and any change that shows on paper (a payment, the PAID stamp,
an edited draft, a new template for a draft) gives a new fingerprint and a fresh render.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

import structlog

from kit.actor import Actor
from kit.db import Database
from services.invoice.models import Invoice
from services.invoice.pdf import (
    ClientInfo,
    InvoiceDocument,
    LineItem,
    TemplateSettings,
    document_fingerprint,
    pdf_filename,
    render_invoice_pdf,
    sample_document,
)
from services.invoice.repository import PdfCacheRepository
from services.invoice.service import InvoiceService
from services.invoice.status import OPEN
from services.invoice.templates import TemplateCache, TemplateService

log = structlog.get_logger(__name__)


def pay_url(portal_url: str, invoice: Invoice) -> str | None:
    if invoice.status in OPEN and invoice.amount_due > 0:
        return f"{portal_url.rstrip('/')}/invoices/{invoice.id}"
    return None


def build_document(invoice: Invoice, template: TemplateSettings, portal_url: str) -> InvoiceDocument:
    """What is printed for `invoice`. Default notes and terms come from the template at render time
    when the invoice has none of its own."""
    client = invoice.client
    return InvoiceDocument(
        id=str(invoice.id),
        invoice_number=invoice.invoice_number,
        status=invoice.status,
        currency=invoice.currency,
        issue_date=invoice.issue_date,
        due_date=invoice.due_date,
        paid_at=invoice.paid_at,
        client=ClientInfo(name=client.name, email=client.email, address=client.address, tax_id=client.tax_id),
        project_reference=invoice.project_id,
        items=[
            LineItem(
                description=item.description,
                quantity=item.quantity,
                unit_price=item.unit_price,
                discount=item.discount,
                tax_rate=item.tax_rate,
                amount=item.amount,
            )
            for item in invoice.items
        ],
        subtotal=invoice.subtotal,
        discount_amount=invoice.discount_amount,
        tax_rate=invoice.tax_rate,
        tax_amount=invoice.tax_amount,
        total=invoice.total,
        amount_paid=invoice.amount_paid,
        amount_due=invoice.amount_due,
        notes=invoice.notes or template.default_notes or None,
        terms=template.default_terms or None,
        pay_url=pay_url(portal_url, invoice),
    )


def etag(fingerprint: str) -> str:
    return f'"{fingerprint}"'


def etag_matches(if_none_match: str | None, fingerprint: str) -> bool:
    """RFC 9110 weak comparison of If-None-Match against our (strong) ETag."""
    if not if_none_match:
        return False
    for candidate in if_none_match.split(","):
        tag = candidate.strip()
        if tag == "*":
            return True
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag.strip('"') == fingerprint:
            return True
    return False


@dataclass(frozen=True)
class InvoicePdf:
    filename: str
    fingerprint: str
    pdf: bytes | None  # None: the caller's copy (If-None-Match) is current
    cached: bool


@dataclass
class InvoicePdfs:
    db: Database
    templates: TemplateCache
    portal_url: str
    render_slots: asyncio.Semaphore

    async def render(self, doc: InvoiceDocument, template: TemplateSettings) -> bytes:
        """Render in a worker thread (reportlab is CPU-bound), a bounded number at a time."""
        async with self.render_slots:
            return await asyncio.to_thread(render_invoice_pdf, doc, template)

    async def get(self, invoice_id: uuid.UUID, actor: Actor, *, if_none_match: str | None = None) -> InvoicePdf:
        # Its own short units of work, not the request's: no connection is held while rendering.
        async with self.db.unit_of_work() as uow:  # read only: nothing to commit
            invoice = await InvoiceService(uow).get_invoice(invoice_id, actor)  # others': 404
            template = (await TemplateService(uow, self.templates).for_invoice(invoice)).settings
            doc = build_document(invoice, template, self.portal_url)
            filename = pdf_filename(invoice.invoice_number, str(invoice.id))
            fingerprint = await asyncio.to_thread(document_fingerprint, doc, template)
            if etag_matches(if_none_match, fingerprint):
                return InvoicePdf(filename, fingerprint, None, cached=True)
            cached = await PdfCacheRepository(uow.session).get(invoice.id, fingerprint)
        # The database connection is back in the pool while rendering.
        if cached is not None:
            return InvoicePdf(filename, fingerprint, cached, cached=True)
        pdf = await self.render(doc, template)
        try:
            async with self.db.transaction() as uow:
                await PdfCacheRepository(uow.session).put(invoice_id, fingerprint, pdf)
        except Exception as exc:  # the PDF is good; only caching it failed (e.g. invoice just deleted)
            log.warning("invoice_pdf_cache_write_failed", invoice_id=str(invoice_id), error=str(exc))
        return InvoicePdf(filename, fingerprint, pdf, cached=False)

    async def preview(self, template: TemplateSettings) -> bytes:
        return await self.render(sample_document(template), template)
