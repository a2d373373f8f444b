"""Shared helpers of the template and PDF API tests."""

from __future__ import annotations

import io
import re
from typing import Any

import httpx
from PIL import Image
from pypdf import PdfReader

SVG_LOGO = b"""<svg xmlns="http://www.w3.org/2000/svg" width="240" height="80" viewBox="0 0 240 80">
<rect x="0" y="0" width="80" height="80" rx="16" fill="#0B6E4F"/>
<circle cx="40" cy="40" r="22" fill="#ffffff"/>
</svg>"""


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (300, 100), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (200, 40, 40)).save(buf, format=fmt)
    return buf.getvalue()


def pdf_text(pdf: bytes) -> str:
    """All pages' text on one line (whitespace and no-break spaces collapsed)."""
    reader = PdfReader(io.BytesIO(pdf))
    text = " ".join(page.extract_text() or "" for page in reader.pages)
    return re.sub(r"\s+", " ", text.replace("\xa0", " "))


def pdf_uris(pdf: bytes) -> list[str]:
    uris = []
    for page in PdfReader(io.BytesIO(pdf)).pages:
        for annot in page.get("/Annots", []) or []:
            obj = annot.get_object()
            if "/A" in obj and "/URI" in obj["/A"]:
                uris.append(str(obj["/A"]["/URI"]))
    return uris


async def put_template(api: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    body = {"companyName": "Acme Digital Studio", **fields}
    response = await api.put("/api/invoice-template", json=body)
    assert response.status_code == 200, response.text
    return response.json()
