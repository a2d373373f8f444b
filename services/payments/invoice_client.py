"""Fallback read of an invoice from the invoice service, for an invoice not yet known from events."""

from __future__ import annotations

from typing import Protocol

import httpx
import structlog
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError
from pydantic.alias_generators import to_camel

from contracts.invoice import InvoiceSnapshotV1
from kit.actor import INTERNAL_TOKEN_HEADER
from kit.errors import AppError
from kit.logging import CORRELATION_HEADER, current_correlation_id

log = structlog.get_logger(__name__)


class InvoiceServiceUnavailable(AppError):
    status_code = 503
    code = "invoice_service_unavailable"


class LedgerEntry(BaseModel):
    """One row of the invoice's payment ledger (`GET /api/invoices/{id}/payments`): what it applied."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    payment_id: str
    kind: str = "payment"  # payment | refund


class LedgerPage(BaseModel):
    """The same list in the platform's page shape (`{items, nextCursor, hasMore}`)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    items: list[LedgerEntry]
    next_cursor: str | None = None


_LEDGER = TypeAdapter(list[LedgerEntry] | LedgerPage)
_MAX_LEDGER_PAGES = 100


class InvoiceReader(Protocol):
    async def fetch(self, invoice_id: str) -> InvoiceSnapshotV1 | None: ...

    async def applied(self, invoice_id: str) -> list[tuple[str, str]]:
        """(payment id, kind "payment" | "refund") of what the invoice's ledger has applied."""
        ...


class HttpInvoiceReader:
    """GET {invoice_url}/api/invoices/{id} as the system actor (no role header, internal token)."""

    def __init__(self, base_url: str, internal_token: str | None, *, timeout: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {INTERNAL_TOKEN_HEADER: internal_token} if internal_token else {}
        self._client = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout)

    async def fetch(self, invoice_id: str) -> InvoiceSnapshotV1 | None:
        headers = {}
        if cid := current_correlation_id():
            headers[CORRELATION_HEADER] = cid
        try:
            response = await self._client.get(f"/api/invoices/{invoice_id}", headers=headers)
        except httpx.HTTPError as exc:
            log.warning("invoice_service_unreachable", invoice_id=invoice_id, error=str(exc))
            raise InvoiceServiceUnavailable("The invoice service cannot be reached; try again.") from exc
        if response.status_code in (404, 422):
            return None
        if response.status_code != 200:
            log.warning("invoice_service_error", invoice_id=invoice_id, status=response.status_code)
            raise InvoiceServiceUnavailable(f"The invoice service answered {response.status_code}; try again.")
        try:
            # InvoiceOut is a superset of the snapshot (same camelCase names).
            return InvoiceSnapshotV1.model_validate(response.json())
        except (ValidationError, ValueError) as exc:
            log.warning("invoice_service_bad_body", invoice_id=invoice_id, error=str(exc)[:300])
            raise InvoiceServiceUnavailable("The invoice service returned an unreadable invoice.") from exc

    async def applied(self, invoice_id: str) -> list[tuple[str, str]]:
        """Every entry of the ledger: a plain list, or each page of the platform's paged list."""
        entries: list[LedgerEntry] = []
        params: dict[str, str | int] = {}  # the first page as the service pages by default
        for _ in range(_MAX_LEDGER_PAGES):
            try:
                response = await self._client.get(f"/api/invoices/{invoice_id}/payments", params=params)
            except httpx.HTTPError as exc:
                raise InvoiceServiceUnavailable("The invoice service cannot be reached; try again.") from exc
            if response.status_code != 200:
                raise InvoiceServiceUnavailable(f"The invoice service answered {response.status_code}; try again.")
            try:
                body = _LEDGER.validate_json(response.content)
            except ValidationError as exc:
                raise InvoiceServiceUnavailable("The invoice service returned an unreadable ledger.") from exc
            if isinstance(body, list):
                return [(entry.payment_id, entry.kind) for entry in body]
            entries.extend(body.items)
            if not body.next_cursor:
                break
            params = {"limit": 100, "cursor": body.next_cursor}
        return [(entry.payment_id, entry.kind) for entry in entries]

    async def aclose(self) -> None:
        await self._client.aclose()


class NoInvoiceReader:
    """For tests and tools: nothing beyond what events brought."""

    async def fetch(self, invoice_id: str) -> InvoiceSnapshotV1 | None:
        return None

    async def applied(self, invoice_id: str) -> list[tuple[str, str]]:
        return []
