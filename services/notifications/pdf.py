"""The invoice PDF, fetched from the invoice service as a system call (internal token, no actor)."""

from __future__ import annotations

import httpx

from kit.actor import INTERNAL_TOKEN_HEADER
from kit.logging import correlation_hooks


class PdfUnavailable(Exception):
    """The PDF could not be had right now (404, 5xx, network): worth trying again later."""


class PdfFetcher:
    def __init__(self, base_url: str, internal_token: str | None, timeout: float = 15.0) -> None:
        headers = {"Accept": "application/pdf"}
        if internal_token:
            headers[INTERNAL_TOKEN_HEADER] = internal_token
        self._client = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout,
                                         event_hooks=correlation_hooks())

    async def fetch(self, invoice_id: str) -> bytes:
        try:
            response = await self._client.get(f"/api/invoices/{invoice_id}/pdf")
        except httpx.HTTPError as exc:
            raise PdfUnavailable(f"invoice service unreachable: {type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise PdfUnavailable(f"invoice service answered {response.status_code} for the PDF")
        if not response.content.startswith(b"%PDF"):
            raise PdfUnavailable("invoice service answered 200 but not with a PDF")
        return response.content

    async def close(self) -> None:
        await self._client.aclose()
