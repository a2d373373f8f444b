"""Visual regression: page 1 at 50 dpi against a reviewed reference image.

To accept an intended layout change: INVOICE_PDF_UPDATE_REFERENCE=1 pytest services/invoice/pdf/tests,
look at the new PNG under reference/, commit it, and bump RENDERER_VERSION.
"""

from __future__ import annotations

import os
import shutil

from PIL import ImageChops, ImageStat

from services.invoice.pdf import render_invoice_pdf
from services.invoice.pdf.tests.conftest import REFERENCE_DIR, build_document, open_png, render_png

REFERENCE = REFERENCE_DIR / "invoice-page1-50dpi.png"
MAX_MEAN_ABS_DIFF = 1.5  # of 255, averaged over pixels and channels


def test_page_one_matches_reference(template, tmp_path) -> None:
    doc = build_document(10, status="OVERDUE")
    png = render_png(render_invoice_pdf(doc, template), tmp_path, dpi=50)
    if os.environ.get("INVOICE_PDF_UPDATE_REFERENCE") == "1":
        REFERENCE_DIR.mkdir(exist_ok=True)
        shutil.copyfile(png, REFERENCE)
    assert REFERENCE.exists(), f"no reference image {REFERENCE}; see this module's docstring"
    actual, expected = open_png(png), open_png(REFERENCE)
    assert actual.size == expected.size
    diff = ImageChops.difference(actual, expected)
    mean = sum(ImageStat.Stat(diff).mean) / 3
    if mean >= MAX_MEAN_ABS_DIFF:
        shutil.copyfile(png, tmp_path / "actual.png")
        raise AssertionError(f"page 1 differs from the reference: mean abs diff {mean:.2f} (see {tmp_path})")


def test_visual_check_detects_a_changed_layout(template, tmp_path) -> None:
    """The threshold is tight enough to see a different brand colour."""
    if not REFERENCE.exists():
        return
    doc = build_document(10, status="OVERDUE")
    other = template.model_copy(update={"brand_color": "#7A1F3D"})
    png = render_png(render_invoice_pdf(doc, other), tmp_path, dpi=50)
    diff = ImageChops.difference(open_png(png), open_png(REFERENCE))
    assert sum(ImageStat.Stat(diff).mean) / 3 >= MAX_MEAN_ABS_DIFF
