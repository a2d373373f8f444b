"""Template settings, fingerprints, file names and the preview sample."""

from __future__ import annotations

from datetime import date, timedelta
from decimal import Decimal

import pytest
from pydantic import ValidationError

from services.invoice.pdf import (
    RENDERER_VERSION,
    InvoiceDocument,
    TemplateSettings,
    document_fingerprint,
    pdf_filename,
    render_invoice_pdf,
    sample_document,
    validate_logo,
)
from services.invoice.pdf import fingerprint as fingerprint_module
from services.invoice.pdf.tests.conftest import LOGO_SVG, build_document, pdf_pages_text


def test_default_template_is_valid_and_renders() -> None:
    template = TemplateSettings()
    assert template.default_net_days == 30 and template.locale == "en_US"
    pdf = render_invoice_pdf(sample_document(template, today=date(2026, 3, 1)), template)
    assert pdf.startswith(b"%PDF")


def test_template_accepts_camel_case_and_snake_case() -> None:
    a = TemplateSettings.model_validate({"companyName": "Acme", "brandColor": "#1f3a5f", "defaultNetDays": 14})
    b = TemplateSettings(company_name="Acme", brand_color="#1F3A5F", default_net_days=14)
    assert a == b and a.brand_color == "#1F3A5F"
    dumped = a.model_dump(by_alias=True)
    assert dumped["companyName"] == "Acme" and "numberPrefixDisplay" in dumped and "bankDetails" in dumped


@pytest.mark.parametrize(
    "field",
    [
        {"brand_color": "red"},
        {"brand_color": "#12345"},
        {"accent_color": "#GGGGGG"},
        {"default_net_days": 366},
        {"default_net_days": -1},
        {"locale": "xx_YY"},
        {"locale": ""},
        {"company_name": "x" * 201},
    ],
)
def test_template_rejects_bad_values(field: dict) -> None:
    with pytest.raises(ValidationError):
        TemplateSettings(**field)


def test_template_round_trips_through_json_with_logo() -> None:
    template = TemplateSettings(logo=validate_logo(LOGO_SVG, "image/svg+xml"), locale="de-DE")
    assert template.locale == "de_DE"
    again = TemplateSettings.model_validate_json(template.model_dump_json(by_alias=True))
    assert again == template and again.logo is not None and again.logo.data == template.logo.data


def test_fingerprint_is_stable_and_content_based(template) -> None:
    doc = build_document(5)
    fp = document_fingerprint(doc, template)
    assert len(fp) == 64 and int(fp, 16) >= 0
    same = InvoiceDocument.model_validate(doc.model_dump(by_alias=True))
    assert document_fingerprint(same, template.model_copy(deep=True)) == fp


@pytest.mark.parametrize(
    "change",
    [
        lambda d, t: setattr(d, "amount_paid", d.amount_paid + 1),
        lambda d, t: setattr(d.items[0], "description", d.items[0].description + "."),
        lambda d, t: setattr(d, "status", "PAID"),
        lambda d, t: setattr(d, "due_date", d.due_date + timedelta(days=1)),
        lambda d, t: setattr(d.client, "name", "Other"),
        lambda d, t: setattr(t, "brand_color", "#000000"),
        lambda d, t: setattr(t, "footer_text", "new footer"),
        lambda d, t: setattr(t, "locale", "de_DE"),
        lambda d, t: setattr(t, "logo", validate_logo(LOGO_SVG.replace(b"#0B6E4F", b"#FF0000"), "image/svg+xml")),
        lambda d, t: setattr(t.bank_details, "iban", "DE00"),
    ],
)
def test_fingerprint_changes_with_anything_that_affects_output(template, change) -> None:
    doc = build_document(5)
    before = document_fingerprint(doc, template)
    change(doc, template)
    assert document_fingerprint(doc, template) != before


def test_fingerprint_includes_renderer_version(template, monkeypatch) -> None:
    doc = build_document(2)
    before = document_fingerprint(doc, template)
    monkeypatch.setattr(fingerprint_module, "RENDERER_VERSION", RENDERER_VERSION + "-next")
    assert document_fingerprint(doc, template) != before


def test_same_fingerprint_means_same_bytes(template) -> None:
    a, b = build_document(5), build_document(5)
    assert document_fingerprint(a, template) == document_fingerprint(b, template)
    assert render_invoice_pdf(a, template) == render_invoice_pdf(b, template)


@pytest.mark.parametrize(
    ("number", "draft_id", "expected"),
    [
        ("2026-0001", None, "invoice-2026-0001.pdf"),
        ("2026-10000", "x", "invoice-2026-10000.pdf"),
        (None, "5b0e1f9c-2f7d-4c1e-9a55-7d7c4f0e9b21", "invoice-draft-5b0e1f9c.pdf"),
        ("", "abc", "invoice-draft-abc.pdf"),
        (None, None, "invoice-draft.pdf"),
        ("../../etc/passwd", None, "invoice-etc-passwd.pdf"),
        ('2026/0001"; x', None, "invoice-2026-0001-x.pdf"),
    ],
)
def test_pdf_filename(number, draft_id, expected) -> None:
    assert pdf_filename(number, draft_id) == expected


def test_sample_document_uses_template_defaults() -> None:
    template = TemplateSettings(
        locale="de_DE", default_net_days=14, default_notes="Vielen Dank!", default_terms="Zahlbar ohne Abzug."
    )
    doc = sample_document(template, today=date(2026, 3, 1))
    assert doc.currency == "EUR" and doc.due_date == date(2026, 3, 15)
    assert doc.notes == "Vielen Dank!" and doc.terms == "Zahlbar ohne Abzug."
    assert doc.subtotal == sum(i.amount for i in doc.items)
    assert doc.total == doc.subtotal - doc.discount_amount + doc.tax_amount
    assert doc.amount_due == doc.total - doc.amount_paid
    assert doc.tax_rate == Decimal("10")
    text = " ".join(pdf_pages_text(render_invoice_pdf(doc, template)))
    assert "Vielen Dank!" in text and "15.03.2026" in text


def test_sample_in_zero_decimal_currency() -> None:
    doc = sample_document(TemplateSettings(locale="ja_JP"), today=date(2026, 3, 1))
    assert doc.currency == "JPY" and doc.items[0].unit_price == 1800
