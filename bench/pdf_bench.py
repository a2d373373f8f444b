"""Invoice PDF benchmark: reportlab renderer vs WeasyPrint, plus cached re-downloads.

    python -m bench.pdf_bench [--seconds 3]

Single process, single thread. Measures
  * reportlab PDFs/s for a 10-line and a 200-line invoice (render_invoice_pdf, full pipeline);
  * cached re-downloads/s: document_fingerprint(doc, template) + a dict lookup of the bytes,
    as the service would serve a PDF it has already rendered;
  * WeasyPrint PDFs/s for an equivalent HTML invoice of the same content (same fonts, logo,
    header band, items table with repeated header, totals, payment block, QR code, page numbers),
    and the speed ratio (target: reportlab >= 5x faster).
WeasyPrint needs pango (Debian: libpango-1.0-0 libpangoft2-1.0-0).
"""

from __future__ import annotations

import argparse
import html
import io
import platform
import sys
import time
from collections.abc import Callable
from datetime import date
from decimal import ROUND_HALF_UP, Decimal

from bench.report import current
from services.invoice.pdf import (
    BankDetails,
    ClientInfo,
    InvoiceDocument,
    LineItem,
    TemplateSettings,
    document_fingerprint,
    format_money,
    render_invoice_pdf,
    validate_logo,
)
from services.invoice.pdf.money import format_date, format_quantity, format_rate

LOGO_SVG = b"""<svg xmlns="http://www.w3.org/2000/svg" width="240" height="80" viewBox="0 0 240 80">
<rect x="0" y="0" width="80" height="80" rx="16" fill="#0B6E4F"/><circle cx="40" cy="40" r="22" fill="#ffffff"/>
<path d="M110 20 L150 60 L190 20 Z" fill="#0B6E4F"/></svg>"""


def make_template() -> TemplateSettings:
    return TemplateSettings(
        company_name="Acme Digital Studio",
        company_address="500 Market Street, Floor 7\nSan Francisco, CA 94105",
        company_email="billing@acme.example",
        company_phone="+1 415 555 0100",
        tax_id="US-EIN 12-3456789",
        logo=validate_logo(LOGO_SVG, "image/svg+xml"),
        footer_text="Acme Digital Studio LLC · 500 Market Street, San Francisco · acme.example",
        payment_instructions="Pay by card online, or by ACH transfer to the account below. "
        "Quote the invoice number as the payment reference.",
        bank_details=BankDetails(
            account_name="Acme Digital Studio LLC", bank_name="First Example Bank", iban="US00 EXMP 0001 2345 6789"
        ),
        number_prefix_display="INV-",
        default_terms="Payment due within 30 days.",
        locale="en_US",
    )


def make_document(lines: int) -> InvoiceDocument:
    items = []
    for i in range(lines):
        qty = Decimal(i % 5 + 1)
        unit = 12_500 + i * 7
        discount = 500 if i % 7 == 0 else 0
        amount = int((qty * unit).quantize(Decimal(1), rounding=ROUND_HALF_UP)) - discount
        items.append(
            LineItem(
                description=f"Line {i + 1:03d}: consulting and development work, sprint {i // 10 + 1}",
                quantity=qty,
                unit_price=unit,
                discount=discount,
                amount=amount,
            )
        )
    subtotal = sum(it.amount for it in items)
    tax = int((Decimal(subtotal) * Decimal("0.0825")).quantize(Decimal(1), rounding=ROUND_HALF_UP))
    return InvoiceDocument(
        invoice_number="2026-0001",
        status="SENT",
        currency="USD",
        issue_date=date(2026, 1, 5),
        due_date=date(2026, 2, 4),
        client=ClientInfo(name="Globex Corporation", email="ap@globex.example", address="1 Globex Way\nCypress Creek"),
        project_reference="PRJ-778",
        items=items,
        subtotal=subtotal,
        tax_rate=Decimal("8.25"),
        tax_amount=tax,
        total=subtotal + tax,
        amount_paid=10_000,
        amount_due=subtotal + tax - 10_000,
        notes="Thanks for working with us.",
        pay_url="https://billing.example.com/pay/inv_8f3a2c1d",
    )


# --------------------------------------------------------------------------- WeasyPrint equivalent

_CSS = """
@page { size: Letter; margin: 45mm 18mm 22mm 18mm;
  @top-left { content: element(band); width: 100%; }
  @bottom-left { content: "%(footer)s"; font-size: 7.5pt; color: #616E7C; }
  @bottom-right { content: "Page " counter(page) " of " counter(pages); font-size: 7.5pt; color: #616E7C; } }
body { font-family: "Noto Sans", sans-serif; font-size: 9pt; color: #1F2933; }
.band { position: running(band); background: #1F3A5F; color: white; height: 32mm; margin: -10mm -18mm 0;
  padding: 0 18mm; display: flex; align-items: center; justify-content: space-between; }
.band .logo { background: white; border-radius: 1.5mm; padding: 2.5mm; } .band .logo svg { height: 16mm; width: auto; }
.band h1 { font-size: 24pt; margin: 0; text-align: right; } .band .num { text-align: right; }
.parties { display: flex; gap: 6mm; } .parties > div { flex: 1; } .label { font-size: 7.5pt; color: #616E7C; }
.title { font-size: 7.5pt; color: #1F3A5F; font-weight: bold; }
.strip { background: #EEF1F4; border-left: 2pt solid #1F3A5F; padding: 3mm 5mm; margin: 5mm 0; }
.strip .due { font-size: 18pt; font-weight: bold; color: #1F3A5F; }
table.items { width: 100%; border-collapse: collapse; font-size: 8.5pt; }
table.items thead th { background: #1F3A5F; color: white; text-align: left; padding: 5pt 6pt; }
table.items td { padding: 3pt 6pt; border-bottom: 0.4pt solid #D9DEE4; }
table.items tr:nth-child(even) td { background: #F5F7FA; } .r { text-align: right !important; }
table.totals { margin-left: auto; width: 88mm; margin-top: 5mm; } table.totals td { padding: 3pt 6pt; }
tr.due td { background: #1F3A5F; color: white; font-weight: bold; }
.pay { display: flex; justify-content: space-between; margin-top: 5mm; page-break-inside: avoid; }
.qr svg { width: 30mm; height: 30mm; }
"""


def _qr_svg(data: str) -> str:
    import qrcode
    import qrcode.image.svg

    img = qrcode.make(data, image_factory=qrcode.image.svg.SvgPathImage, border=4)
    buf = io.BytesIO()
    img.save(buf)
    text = buf.getvalue().decode()
    return text[text.index("<svg") :]


def invoice_html(doc: InvoiceDocument, tpl: TemplateSettings) -> str:
    e = html.escape
    loc = tpl.locale

    def money(v: int) -> str:
        return e(format_money(v, doc.currency, loc))

    rows = "".join(
        f"<tr><td>{e(it.description)}</td><td class=r>{e(format_quantity(it.quantity, loc))}</td>"
        f"<td class=r>{money(it.unit_price)}</td><td class=r>{money(-it.discount) if it.discount else ''}</td>"
        f"<td class=r>{money(it.amount)}</td></tr>"
        for it in doc.items
    )
    logo = tpl.logo.data.decode() if tpl.logo else ""
    logo = logo[logo.index("<svg") :] if "<svg" in logo else ""
    bank = tpl.bank_details
    number = e(f"{tpl.number_prefix_display}{doc.invoice_number}")
    css = _CSS.replace("%(footer)s", e(tpl.footer_text).replace('"', "'"))
    return f"""<!doctype html><html><head><meta charset="utf-8"><style>{css}</style></head><body>
<div class="band"><div class="logo">{logo}</div><div style="font-size:15pt;font-weight:bold">{e(tpl.company_name)}</div>
<div><h1>INVOICE</h1><div class="num">{number}</div></div></div>
<div class="parties">
<div><div class="title">FROM</div><b>{e(tpl.company_name)}</b><br>{e(tpl.company_address).replace(chr(10), "<br>")}
<br>{e(tpl.company_email)}<br>{e(tpl.company_phone)}<br>Tax ID: {e(tpl.tax_id)}</div>
<div><div class="title">BILL TO</div><b>{e(doc.client.name)}</b><br>
{e(doc.client.address or "").replace(chr(10), "<br>")}<br>{e(doc.client.email or "")}</div>
<div><table><tr><td class=label>Invoice number</td><td class=r><b>{number}</b></td></tr>
<tr><td class=label>Issue date</td><td class=r>{e(format_date(doc.issue_date, loc))}</td></tr>
<tr><td class=label>Due date</td><td class=r>{e(format_date(doc.due_date, loc))}</td></tr>
<tr><td class=label>Project</td><td class=r>{e(doc.project_reference or "")}</td></tr>
<tr><td class=label>Status</td><td class=r>{e(doc.status.value.title())}</td></tr></table></div></div>
<div class="strip"><div class="label">Amount due ({e(doc.currency)})</div><div class="due">{money(doc.amount_due)}</div>
<div class="label">Due date</div><b>{e(format_date(doc.due_date, loc))}</b></div>
<table class="items"><thead><tr><th>Description</th><th class=r>Qty</th><th class=r>Unit price</th>
<th class=r>Discount</th><th class=r>Amount</th></tr></thead><tbody>{rows}</tbody></table>
<table class="totals"><tr><td>Subtotal</td><td class=r>{money(doc.subtotal)}</td></tr>
<tr><td>Tax ({e(format_rate(doc.tax_rate, loc))})</td><td class=r>{money(doc.tax_amount)}</td></tr>
<tr><td><b>Total</b></td><td class=r><b>{money(doc.total)}</b></td></tr>
<tr><td>Amount paid</td><td class=r>{money(-doc.amount_paid)}</td></tr>
<tr class="due"><td>Amount due</td><td class=r>{money(doc.amount_due)}</td></tr></table>
<h4>Notes</h4><p>{e(doc.notes or "")}</p><h4>Terms</h4><p>{e(tpl.default_terms)}</p>
<div class="pay"><div><h4>How to pay</h4><p>{e(tpl.payment_instructions)}</p>
<p>Account name: {e(bank.account_name if bank else "")}<br>Bank: {e(bank.bank_name if bank else "")}<br>
IBAN: {e(bank.iban if bank else "")}</p>
<p>Pay online: <a href="{e(doc.pay_url or "")}">{e(doc.pay_url or "")}</a></p></div>
<div class="qr">{_qr_svg(doc.pay_url or "")}<div class=label>Scan to pay online</div></div></div>
</body></html>"""


def weasyprint_renderer() -> Callable[[InvoiceDocument, TemplateSettings], bytes] | None:
    try:
        from weasyprint import HTML
    except Exception as exc:  # pango missing: OSError from cffi
        print(f"WeasyPrint unavailable ({exc}); Debian packages libpango-1.0-0 libpangoft2-1.0-0", file=sys.stderr)
        return None

    def render(doc: InvoiceDocument, tpl: TemplateSettings) -> bytes:
        return HTML(string=invoice_html(doc, tpl)).write_pdf()

    return render


# --------------------------------------------------------------------------- measuring


def rate(fn: Callable[[], object], seconds: float, min_runs: int = 3) -> tuple[float, int]:
    fn()  # warm up (font registration, caches)
    runs, start = 0, time.perf_counter()
    while True:
        fn()
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and runs >= min_runs:
            return runs / elapsed, runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pdf_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement (default 3)")
    args = parser.parse_args(argv)

    rep = current("pdfs")
    tpl = make_template()
    docs = {10: make_document(10), 200: make_document(200)}
    print(f"invoice PDF benchmark: python {platform.python_version()}, 1 process, 1 thread, {args.seconds:g}s each")

    rl: dict[int, float] = {}
    for lines, doc in docs.items():
        pdf = render_invoice_pdf(doc, tpl)
        rl[lines], runs = rate(lambda doc=doc: render_invoice_pdf(doc, tpl), args.seconds)
        rep.figure(f"reportlab {lines} lines", rl[lines], "PDFs/s")
        print(f"  reportlab  {lines:>3} lines: {rl[lines]:8.1f} PDFs/s  ({1000 / rl[lines]:6.1f} ms, {len(pdf):,} B)")

    cache: dict[str, bytes] = {document_fingerprint(d, tpl): render_invoice_pdf(d, tpl) for d in docs.values()}
    for lines, doc in docs.items():

        def cached(doc: InvoiceDocument = doc) -> bytes:
            return cache[document_fingerprint(doc, tpl)]

        r, _ = rate(cached, min(args.seconds, 1.5))
        rep.figure(f"cached {lines} lines", r, "downloads/s")
        print(f"  cached     {lines:>3} lines: {r:8.0f} downloads/s  (fingerprint + dict lookup, {1e6 / r:.0f} µs)")

    weasy = weasyprint_renderer()
    if weasy is None:
        print("  WeasyPrint: not measured")
        return 1
    for lines, doc in docs.items():
        pdf = weasy(doc, tpl)
        r, runs = rate(lambda doc=doc: weasy(doc, tpl), args.seconds, min_runs=2)
        rep.figure(f"weasyprint {lines} lines", r, "PDFs/s")
        ratio = rep.ratio(f"reportlab / weasyprint {lines} lines", rl[lines], r, target=">= 5x (500%)")
        verdict = "ok" if ratio >= 5 else "below the 5x target"
        print(
            f"  WeasyPrint {lines:>3} lines: {r:8.1f} PDFs/s  ({1000 / r:6.1f} ms, {len(pdf):,} B)"
            f"  -> reportlab is {ratio:.1f}x faster ({verdict})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
