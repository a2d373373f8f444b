"""Logo upload validation."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from services.invoice.pdf import LogoError, TemplateSettings, render_invoice_pdf, validate_logo
from services.invoice.pdf.logo import MAX_LOGO_BYTES, NORMALIZED_MAX_SIZE
from services.invoice.pdf.tests.conftest import LOGO_SVG, build_document


def _image(fmt: str, size: tuple[int, int] = (300, 100), mode: str = "RGBA") -> bytes:
    color = {"RGBA": (200, 40, 40, 255), "RGB": (200, 40, 40), "L": 90}[mode]
    img = Image.new(mode, size, color)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_valid_png_is_normalized() -> None:
    logo = validate_logo(_image("PNG"), "image/png")
    assert logo.mime == "image/png" and (logo.width, logo.height) == (300, 100)
    with Image.open(io.BytesIO(logo.data)) as img:
        assert img.format == "PNG" and img.mode == "RGBA"


def test_valid_jpeg_becomes_png() -> None:
    logo = validate_logo(_image("JPEG", mode="RGB"), "image/jpeg; charset=binary")
    assert logo.mime == "image/png" and logo.source_mime == "image/jpeg"
    with Image.open(io.BytesIO(logo.data)) as img:
        assert img.format == "PNG" and img.mode == "RGB"


def test_large_image_is_downscaled() -> None:
    logo = validate_logo(_image("PNG", (3000, 1000), mode="RGB"), "image/png")
    assert logo.width <= NORMALIZED_MAX_SIZE[0] and logo.height <= NORMALIZED_MAX_SIZE[1]
    assert abs(logo.width / logo.height - 3) < 0.01


def test_valid_svg_stays_vector_and_is_sanitized() -> None:
    svg = LOGO_SVG.replace(b"<rect", b'<script>alert(1)</script><rect onclick="evil()"')
    logo = validate_logo(svg, "image/svg+xml")
    assert logo.mime == "image/svg+xml" and logo.width / logo.height == 3  # svglib sizes in pt (px * 0.75)
    assert b"script" not in logo.data and b"onclick" not in logo.data


def test_oversized_file() -> None:
    data = _image("PNG") + b"\0" * MAX_LOGO_BYTES
    with pytest.raises(LogoError, match="too large .* limit is 1 MB"):
        validate_logo(data, "image/png")


@pytest.mark.parametrize(
    ("data", "content_type", "message"),
    [
        (b"", "image/png", "empty"),
        (b"hello, not an image", "image/png", "not a valid image"),
        (b"%PDF-1.7 ...", "application/pdf", "unsupported logo type application/pdf"),
        (b"GIF89a....", "image/gif", "unsupported logo type image/gif"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 100, "image/png", "not a valid PNG"),  # truncated
        (b"\xff\xd8\xff\xe0" + b"garbage" * 10, "image/jpeg", "not a valid JPEG"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'><rect></svg>", "image/svg+xml", "broken"),
        (b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'></svg>", "image/svg+xml", "empty"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'><rect width='5' height='5'/></svg>", "image/svg+xml", "size"),
        (
            b"<?xml version='1.0'?><!DOCTYPE svg [<!ENTITY x SYSTEM 'file:///etc/passwd'>]>"
            b"<svg xmlns='http://www.w3.org/2000/svg'><text>&x;</text></svg>",
            "image/svg+xml",
            "DOCTYPE",
        ),
        (
            b"<svg xmlns='http://www.w3.org/2000/svg' xmlns:xlink='http://www.w3.org/1999/xlink' width='9' "
            b"height='9'><image xlink:href='file:///etc/passwd' width='9' height='9'/></svg>",
            "image/svg+xml",
            "external",
        ),
        (b"<html><body>hi</body></html>", "image/svg+xml", "not a valid image"),
        (
            b"<svg xmlns='http://www.w3.org/2000/svg' width='9' height='9'><style>@import url(http://x/a.css);"
            b"</style><rect width='9' height='9'/></svg>",
            "image/svg+xml",
            "external",
        ),
        (
            b"<svg xmlns='http://www.w3.org/2000/svg' width='9' height='9'>"
            b"<rect width='9' height='9' style='fill: url( \"http://x/p\" )'/></svg>",
            "image/svg+xml",
            "external",
        ),
    ],
)
def test_rejected_logos(data: bytes, content_type: str, message: str) -> None:
    with pytest.raises(LogoError, match=message):
        validate_logo(data, content_type)


def test_type_must_match_content() -> None:
    with pytest.raises(LogoError, match="does not match the file, which is a JPEG image"):
        validate_logo(_image("JPEG", mode="RGB"), "image/png")
    with pytest.raises(LogoError, match="which is a PNG image"):
        validate_logo(_image("PNG"), "image/svg+xml")


def test_dimensions_are_limited() -> None:
    with pytest.raises(LogoError, match="maximum is 5000x5000"):
        validate_logo(_image("PNG", (6000, 20), mode="L"), "image/png")
    with pytest.raises(LogoError, match="at least 16x16"):
        validate_logo(_image("PNG", (8, 8)), "image/png")


def test_logo_error_is_a_value_error() -> None:
    assert issubclass(LogoError, ValueError)


@pytest.mark.parametrize("kind", ["png", "svg"])
def test_logos_are_drawn(kind: str) -> None:
    logo = validate_logo(_image("PNG"), "image/png") if kind == "png" else validate_logo(LOGO_SVG, "image/svg+xml")
    doc = build_document(2)
    with_logo = render_invoice_pdf(doc, TemplateSettings(logo=logo))
    without = render_invoice_pdf(doc, TemplateSettings())
    assert with_logo != without
    if kind == "png":
        assert b"/Subtype /Image" in with_logo
