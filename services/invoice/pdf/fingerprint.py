"""Content fingerprint of a rendered invoice, for caching the PDF bytes."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from services.invoice.pdf.fonts import get_fontset
from services.invoice.pdf.models import InvoiceDocument, TemplateSettings
from services.invoice.pdf.render import RENDERER_VERSION


def _canonical(doc: InvoiceDocument, template: TemplateSettings) -> dict[str, Any]:
    tpl = template.model_dump(mode="json", exclude={"logo"})
    logo = template.logo
    tpl["logo"] = (
        None
        if logo is None
        else {"sha256": hashlib.sha256(logo.data).hexdigest(), "mime": logo.mime, "w": logo.width, "h": logo.height}
    )
    return {
        "renderer": RENDERER_VERSION,
        "fonts": get_fontset().identity(),
        "document": doc.model_dump(mode="json"),
        "template": tpl,
    }


def document_fingerprint(doc: InvoiceDocument, template: TemplateSettings) -> str:
    """sha256 (hex) of a canonical JSON of everything that affects the rendered PDF.

    Covers every document and template field (the logo by its hash), the renderer version and the
    fonts in use. Equal fingerprints mean byte-identical PDFs (rendering is deterministic).
    """
    payload = orjson.dumps(_canonical(doc, template), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(payload).hexdigest()
