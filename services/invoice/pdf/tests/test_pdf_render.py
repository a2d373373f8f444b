"""The rendered PDF: its text, QR code, pagination, statuses, unicode and robustness."""

from __future__ import annotations

import io
import re
import unicodedata
from datetime import date
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pypdf import PdfReader

from services.invoice.pdf import (
    BankDetails,
    ClientInfo,
    InvoiceDocument,
    InvoiceStatus,
    LineItem,
    TemplateSettings,
    format_money,
    render_invoice_pdf,
)
from services.invoice.pdf.fonts import get_fontset
from services.invoice.pdf.money import format_date
from services.invoice.pdf.system import INSTALL_HINT
from services.invoice.pdf.tests.conftest import build_document, decode_qr, pdf_pages_text, render_png


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("\xa0", " "))


def _font_names(pdf: bytes) -> set[str]:
    names: set[str] = set()
    for page in PdfReader(io.BytesIO(pdf)).pages:
        fonts = page["/Resources"].get("/Font", {})
        for ref in fonts.values():
            names.add(str(ref.get_object()["/BaseFont"]))
    return names


def test_fonts_are_installed() -> None:
    fonts = get_fontset()
    assert not fonts.missing, f"fonts missing for {fonts.missing}: {INSTALL_HINT}"
    assert fonts.base.startswith("Invoice")


def test_text_has_number_totals_due_date_and_payment_details(template, document) -> None:
    pdf = render_invoice_pdf(document, template)
    assert pdf.startswith(b"%PDF-") and pdf.rstrip().endswith(b"%%EOF")
    pages = pdf_pages_text(pdf)
    assert len(pages) == 1
    text = _one_line(pages[0])
    assert "INV-2026-0001" in text
    for amount in (document.subtotal, document.tax_amount, document.total, document.amount_due):
        assert _one_line(format_money(amount, "USD", "en_US")) in text
    assert format_money(-document.amount_paid, "USD", "en_US") in text
    assert document.amount_due == 396030 and "$3,960.30" in text  # amount due, formatted
    assert format_date(document.due_date, "en_US") == "Feb 4, 2026"
    assert "Feb 4, 2026" in text and "Jan 5, 2026" in text
    assert "Pay by card online, or by ACH transfer to the account below." in text
    assert "US00 EXMP 0001 2345 6789" in text and "EXMPUS33" in text
    assert "https://billing.example.com/pay/inv_8f3a2c1d" in text
    assert "Globex Corporation" in text and "Acme Digital Studio" in text
    assert "Page 1 of 1" in text
    for line in document.items:
        assert line.description in text


def test_pay_link_is_a_clickable_annotation(template, document) -> None:
    pdf = render_invoice_pdf(document, template)
    page = PdfReader(io.BytesIO(pdf)).pages[0]
    uris = [a.get_object()["/A"]["/URI"] for a in page.get("/Annots", []) if "/A" in a.get_object()]
    assert document.pay_url in uris


def test_qr_code_decodes_to_the_pay_url(template, document, tmp_path) -> None:
    pdf = render_invoice_pdf(document, template)
    png = render_png(pdf, tmp_path, dpi=150)
    assert decode_qr(png) == [document.pay_url]


def test_long_pay_url_still_decodes(template, tmp_path) -> None:
    doc = build_document(3)
    doc.pay_url = "https://checkout.example.com/c/pay/cs_test_" + "a1B2c3D4e5" * 25 + "#fidkdWxOYHwnPyd1blpxYHZxWjA0"
    pdf = render_invoice_pdf(doc, template)
    png = render_png(pdf, tmp_path, dpi=200)
    assert decode_qr(png) == [doc.pay_url]


def test_200_lines_paginate_with_repeated_header_and_page_numbers(template) -> None:
    doc = build_document(200)
    pdf = render_invoice_pdf(doc, template)
    pages = pdf_pages_text(pdf)
    # Letter, this layout: 21 rows on page 1, 33 on each later page. Pinned to catch layout regressions.
    assert len(pages) == 6
    seen: list[int] = []
    for number, text in enumerate(pages, start=1):
        assert f"Page {number} of {len(pages)}" in text, f"page {number} lacks its page number"
        assert text.count("Page ") == 1
        assert "Description" in text and "Unit price" in text and "Amount" in text, f"no table header on {number}"
        if number > 1:
            assert "INV-2026-0001 (continued)" in text
        seen += [int(m) for m in re.findall(r"Line (\d{3}):", text)]
    assert seen == list(range(1, 201)), "every line exactly once, in order"
    last = _one_line(pages[-1])
    assert format_money(doc.total, "USD", "en_US") in last


def test_rendering_is_deterministic(template, document) -> None:
    assert render_invoice_pdf(document, template) == render_invoice_pdf(document.model_copy(deep=True), template)


@pytest.mark.parametrize("status", list(InvoiceStatus))
def test_every_status_renders_with_its_stamp(template, status) -> None:
    doc = build_document(3, status=status.value)
    if status == InvoiceStatus.PAID:
        doc.amount_paid, doc.amount_due, doc.paid_at = doc.total, 0, date(2026, 1, 20)
    text = _one_line(" ".join(pdf_pages_text(render_invoice_pdf(doc, template))))
    stamp = {
        InvoiceStatus.PAID: "PAID",
        InvoiceStatus.OVERDUE: "OVERDUE",
        InvoiceStatus.CANCELLED: "CANCELLED",
        InvoiceStatus.PARTIAL: "PARTIALLY PAID",
        InvoiceStatus.DRAFT: "DRAFT",
    }.get(status)
    if stamp:
        assert stamp in text
    if status in (InvoiceStatus.PAID, InvoiceStatus.CANCELLED):
        assert "How to pay" not in text  # nothing to pay
    else:
        assert "How to pay" in text


def test_draft_has_watermark_on_every_page_and_no_number(template) -> None:
    doc = build_document(80, status="DRAFT")
    doc.invoice_number = None
    pages = pdf_pages_text(render_invoice_pdf(doc, template))
    assert len(pages) > 1
    for text in pages:
        assert "DRAFT" in text
    assert "INV-" not in " ".join(pages)


def test_unicode_names_survive_extraction(template) -> None:
    names = ["José Núñez-Pérez", "北京中文科技有限公司", "עברית בע״מ", "شركة العربية"]
    doc = build_document(3, client_name=" / ".join(names))
    doc.items[0].description = "Développement — 开发 — פיתוח — تطوير"
    pdf = render_invoice_pdf(doc, template)
    text = unicodedata.normalize("NFKC", pdf_pages_text(pdf)[0])
    for word in [
        "José",
        "Núñez-Pérez",
        "北京中文科技有限公司",
        "עברית",
        "شركة",
        "العربية",
        "Développement",
        "开发",
        "פיתוח",
        "تطوير",
    ]:
        assert word in text, f"{word!r} not extracted"
    fonts = _font_names(pdf)
    # each script is set in a font that has its glyphs (no .notdef boxes)
    for face in ("NotoSans-Regular", "NotoSansHebrew", "NotoSansArabic", "DroidSansFallback"):
        assert any(face in name for name in fonts), f"{face} not embedded: {fonts}"


def test_wrapped_rtl_name_reads_in_order(template) -> None:
    # A right-to-left name that wraps over several lines: lines are broken in logical order and each
    # line is then reordered for display, so the first line holds the beginning of the name.
    name = "البداية " + "شركة العربية للتجارة والمقاولات المحدودة " * 3 + "النهاية"
    doc = build_document(1, client_name=name)
    text = unicodedata.normalize("NFKC", pdf_pages_text(render_invoice_pdf(doc, template))[0])
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if "البداية" in line)
    last = next(i for i, line in enumerate(lines) if "النهاية" in line)
    assert first < last, lines[first : last + 1]
    assert lines[first].strip().startswith("البداية")


def test_long_description_wraps_and_splits_across_pages(template) -> None:
    doc = build_document(4)
    doc.items[1].description = "Long description " + "lorem ipsum dolor sit amet " * 600 + "THE-END"
    doc.items[2].description = "X" * 5000  # one unbreakable word
    pdf = render_invoice_pdf(doc, template)
    pages = pdf_pages_text(pdf)
    assert len(pages) >= 3
    joined = " ".join(pages)
    assert "THE-END" in joined and "Long description" in pages[0]
    for number, text in enumerate(pages, start=1):
        assert f"Page {number} of {len(pages)}" in text
    assert pages[0].count("Unit price") == 1, "header must not repeat on the same page"


def test_absurd_and_empty_input_still_lays_out(template) -> None:
    cases = [
        InvoiceDocument(),  # nothing at all: a draft with no number, dates, client or items
        InvoiceDocument(client=ClientInfo(name="N" * 50_000, address="A\n" * 5000, email="e" * 3000)),
        build_document(1, client_name="Client " * 2000),
        InvoiceDocument(
            invoice_number="9" * 500,
            status="overdue",
            currency="XYZ",
            items=[LineItem(description="\x00\x07bad\ud800 chars\r\n\ttab", quantity=Decimal("1e6"), amount=10**18)],
            subtotal=10**18,
            total=10**18,
            amount_due=-(10**15),
            tax_rate=Decimal("1e-9"),
            pay_url="javascript:alert(1)",
            notes="",
            terms="terms " * 5000,
        ),
    ]
    empty_template = TemplateSettings(
        company_name="", footer_text="F" * 1000, bank_details=BankDetails(), payment_instructions=""
    )
    for doc in cases:
        for tpl in (template, empty_template):
            pdf = render_invoice_pdf(doc, tpl)
            pages = pdf_pages_text(pdf)
            assert pages and all(f"of {len(pages)}" in p for p in pages)


def test_pathological_text_is_capped_and_fast(template) -> None:
    import time

    doc = build_document(3)
    doc.items[0].description = "a\n" * 10_000  # capped to 150 lines
    doc.items[1].description = "word " * 20_000  # capped to 20 000 characters
    doc.notes = "note\n" * 20_000
    doc.client = ClientInfo(name="שם ארוך " * 500, address="line\n" * 5000)
    start = time.perf_counter()
    pages = pdf_pages_text(render_invoice_pdf(doc, template))
    assert time.perf_counter() - start < 20
    assert 3 <= len(pages) <= 40
    assert "\u2026" in " ".join(pages)  # shortened text ends with an ellipsis


def test_a_failing_full_layout_falls_back_to_the_safe_layout(template, monkeypatch, caplog) -> None:
    from services.invoice.pdf import render

    original = render._summary_strip

    def broken(ctx, width):
        if not ctx.safe:
            raise RuntimeError("boom")
        return original(ctx, width)

    monkeypatch.setattr(render, "_summary_strip", broken)
    doc = build_document(3)
    text = " ".join(pdf_pages_text(render_invoice_pdf(doc, template)))
    assert "INV-2026-0001" in text and "using the safe layout" in caplog.text


def test_bad_pay_urls_get_no_link_or_qr(template) -> None:
    doc = build_document(2)
    doc.pay_url = "javascript:alert(document.cookie)"
    text = " ".join(pdf_pages_text(render_invoice_pdf(doc, template)))
    assert "javascript" not in text and "Pay online" not in text


def test_zero_decimal_and_euro_currencies(template) -> None:
    doc = build_document(2, currency="JPY")
    text = _one_line(pdf_pages_text(render_invoice_pdf(doc, template))[0])
    assert f"¥{doc.total:,}" in text and ".00" not in text
    de = template.model_copy(update={"locale": "de_DE"})
    doc = build_document(2, currency="EUR")
    text = _one_line(pdf_pages_text(render_invoice_pdf(doc, de))[0])
    assert _one_line(format_money(doc.total, "EUR", "de_DE")) in text
    assert "04.02.2026" in text


_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=300)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=_text,
    description=_text,
    notes=st.none() | _text,
    amount=st.integers(min_value=-(10**15), max_value=10**15),
    lines=st.integers(min_value=0, max_value=40),
)
def test_fuzzed_text_never_breaks_rendering(template, name, description, notes, amount, lines) -> None:
    doc = InvoiceDocument(
        invoice_number="2026-0002",
        status="SENT",
        client=ClientInfo(name=name, address=description),
        items=[LineItem(description=description, amount=amount, unit_price=amount) for _ in range(lines)],
        total=amount,
        amount_due=amount,
        notes=notes,
        pay_url="https://billing.example.com/pay/x",
    )
    pdf = render_invoice_pdf(doc, template)
    reader = PdfReader(io.BytesIO(pdf))
    assert len(reader.pages) >= 1
