"""Fixtures for the invoice PDF tests: documents, rendering to text and to PNG."""

from __future__ import annotations

import io
import shutil
import subprocess
from collections.abc import Callable
from datetime import date
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest
from PIL import Image
from pypdf import PdfReader

from services.invoice.pdf import (
    BankDetails,
    ClientInfo,
    InvoiceDocument,
    LineItem,
    TemplateSettings,
    validate_logo,
)
from services.invoice.pdf.system import INSTALL_HINT

HERE = Path(__file__).parent
REFERENCE_DIR = HERE / "reference"

LOGO_SVG = b"""<svg xmlns="http://www.w3.org/2000/svg" width="240" height="80" viewBox="0 0 240 80">
<rect x="0" y="0" width="80" height="80" rx="16" fill="#0B6E4F"/>
<circle cx="40" cy="40" r="22" fill="#ffffff"/>
<path d="M110 20 L150 60 L190 20 Z" fill="#0B6E4F"/>
</svg>"""


def require_tool(command: str) -> str:
    """The tool's path, or fail (never skip) with the install step to run."""
    path = shutil.which(command)
    if path is None:
        pytest.fail(f"`{command}` is not installed: {INSTALL_HINT}", pytrace=False)
    return path


def pdf_pages_text(pdf: bytes) -> list[str]:
    reader = PdfReader(io.BytesIO(pdf))
    return [page.extract_text() or "" for page in reader.pages]


def render_png(pdf: bytes, tmp_path: Path, *, dpi: int, page: int = 1, name: str = "page") -> Path:
    pdftoppm = require_tool("pdftoppm")
    src = tmp_path / f"{name}.pdf"
    src.write_bytes(pdf)
    prefix = tmp_path / f"{name}-{dpi}"
    subprocess.run(
        [pdftoppm, "-r", str(dpi), "-f", str(page), "-l", str(page), "-singlefile", "-png", str(src), str(prefix)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    out = prefix.with_suffix(".png")
    assert out.exists(), f"pdftoppm wrote no {out}"
    return out


def decode_qr(png: Path) -> list[str]:
    zbarimg = require_tool("zbarimg")
    result = subprocess.run(
        [zbarimg, "--raw", "-q", "-Sdisable", "-Sqrcode.enable", str(png)], capture_output=True, timeout=60
    )
    return [line for line in result.stdout.decode("utf-8", "replace").splitlines() if line.strip()]


def open_png(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


@pytest.fixture
def template() -> TemplateSettings:
    return TemplateSettings(
        company_name="Acme Digital Studio",
        company_address="500 Market Street, Floor 7\nSan Francisco, CA 94105",
        company_email="billing@acme.example",
        company_phone="+1 415 555 0100",
        tax_id="US-EIN 12-3456789",
        brand_color="#1F3A5F",
        accent_color="#2A9D8F",
        logo=validate_logo(LOGO_SVG, "image/svg+xml"),
        footer_text="Acme Digital Studio LLC · 500 Market Street, San Francisco · acme.example",
        payment_instructions="Pay by card online, or by ACH transfer to the account below. "
        "Quote the invoice number as the payment reference.",
        bank_details=BankDetails(
            account_name="Acme Digital Studio LLC",
            bank_name="First Example Bank",
            iban="US00 EXMP 0001 2345 6789",
            bic="EXMPUS33",
        ),
        number_prefix_display="INV-",
        default_terms="Payment due within 30 days. Late payments incur 1.5% monthly interest.",
        locale="en_US",
    )


def _minor(value: Decimal) -> int:
    return int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def build_document(
    lines: int = 10,
    *,
    status: str = "SENT",
    currency: str = "USD",
    tax_rate: Decimal = Decimal("8.25"),
    amount_paid: int = 10_000,
    client_name: str = "Globex Corporation",
    description: Callable[[int], str] = lambda i: f"Line {i + 1:03d}: consulting and development work",
) -> InvoiceDocument:
    """A consistent invoice (line and total identities hold) with `lines` items."""
    items: list[LineItem] = []
    for i in range(lines):
        quantity = Decimal(i % 5 + 1)
        unit = 12_500 + i * 7
        discount = 500 if i % 7 == 0 else 0
        items.append(
            LineItem(
                description=description(i),
                quantity=quantity,
                unit_price=unit,
                discount=discount,
                tax_rate=None,
                amount=_minor(quantity * unit) - discount,
            )
        )
    subtotal = sum(item.amount for item in items)
    tax = _minor(Decimal(subtotal) * tax_rate / 100)
    total = subtotal + tax
    return InvoiceDocument(
        id="5b0e1f9c-2f7d-4c1e-9a55-7d7c4f0e9b21",
        invoice_number="2026-0001",
        status=status,
        currency=currency,
        issue_date=date(2026, 1, 5),
        due_date=date(2026, 2, 4),
        client=ClientInfo(name=client_name, email="ap@globex.example", address="1 Globex Way\nCypress Creek, OR 97000"),
        project_reference="PRJ-778",
        items=items,
        subtotal=subtotal,
        discount_amount=0,
        tax_rate=tax_rate,
        tax_amount=tax,
        total=total,
        amount_paid=amount_paid,
        amount_due=total - amount_paid,
        notes="Thanks for working with us.",
        pay_url="https://billing.example.com/pay/inv_8f3a2c1d",
    )


@pytest.fixture
def document() -> InvoiceDocument:
    return build_document(10)
