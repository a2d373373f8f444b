"""Download file names for invoice PDFs."""

from __future__ import annotations

import re

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _slug(value: str) -> str:
    return _UNSAFE.sub("-", value).strip("-.")[:64]


def pdf_filename(invoice_number: str | None, draft_id: str | None = None) -> str:
    """`"2026-0001"` -> `"invoice-2026-0001.pdf"`; a draft -> `"invoice-draft-<first 8 of id>.pdf"`."""
    number = _slug(invoice_number or "")
    if number:
        return f"invoice-{number}.pdf"
    short = _slug((draft_id or "").replace("-", ""))[:8]
    return f"invoice-draft-{short}.pdf" if short else "invoice-draft.pdf"
