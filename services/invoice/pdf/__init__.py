"""Invoice PDF rendering (reportlab): pure functions, no database or HTTP.

pdf = render_invoice_pdf(doc, template)
key = document_fingerprint(doc, template)   # cache key for the bytes
"""

from services.invoice.pdf.filename import pdf_filename
from services.invoice.pdf.fingerprint import document_fingerprint
from services.invoice.pdf.logo import LogoError, validate_logo
from services.invoice.pdf.models import (
    BankDetails,
    ClientInfo,
    InvoiceDocument,
    InvoiceStatus,
    LineItem,
    NormalizedLogo,
    TemplateSettings,
)
from services.invoice.pdf.money import format_money
from services.invoice.pdf.render import RENDERER_VERSION, render_invoice_pdf
from services.invoice.pdf.sample import sample_document
from services.invoice.pdf.system import missing_apt_packages

__all__ = [
    "RENDERER_VERSION",
    "BankDetails",
    "ClientInfo",
    "InvoiceDocument",
    "InvoiceStatus",
    "LineItem",
    "LogoError",
    "NormalizedLogo",
    "TemplateSettings",
    "document_fingerprint",
    "format_money",
    "pdf_filename",
    "render_invoice_pdf",
    "sample_document",
    "missing_apt_packages",
    "validate_logo",
]
