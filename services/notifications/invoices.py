"""The invoice service, asked over HTTP as the system (internal token, no actor): it alone says when an
invoice is OVERDUE.

The reminder scan asks it to mark what is past due as of the scan's day before any overdue notice is
queued, so an overdue email and the invoice's status never disagree (an email "your invoice is
overdue" for an invoice the portal still shows as SENT).
"""

from __future__ import annotations

import uuid
from datetime import date
from typing import Protocol

import httpx
import structlog
from pydantic import ValidationError

from contracts.base import ContractModel
from kit.actor import INTERNAL_TOKEN_HEADER
from kit.errors import ServiceUnavailable

log = structlog.get_logger(__name__)

MARK_OVERDUE_PATH = "/api/invoices/mark-overdue"


class InvoiceServiceUnavailable(ServiceUnavailable):
    code = "invoice_service_unavailable"


class OverdueAuthority(Protocol):
    """Whoever decides that an invoice is OVERDUE: the invoice service (a stand-in in tests)."""

    async def mark_overdue(self, as_of: date) -> frozenset[str]:
        """Mark every open invoice past due as of `as_of` OVERDUE; the ids of those it marked now.

        Raises `ServiceUnavailable` when that cannot be had (then no overdue notice may go out).
        """
        ...


class MarkOverdueAnswer(ContractModel):
    """`POST /api/invoices/mark-overdue`'s answer, the fields we use: the invoices this call moved to
    OVERDUE. (Those already OVERDUE, or moved by a scan running at the same time, are not listed: their
    copies say OVERDUE once their invoice.overdue events have arrived.)"""

    as_of: date
    marked_overdue: int
    invoice_ids: list[uuid.UUID]


class InvoiceServiceClient:
    def __init__(self, base_url: str, internal_token: str | None, timeout: float = 30.0) -> None:
        headers = {"Accept": "application/json"}
        if internal_token:
            headers[INTERNAL_TOKEN_HEADER] = internal_token
        self._client = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout,
                                         trust_env=False)

    async def mark_overdue(self, as_of: date) -> frozenset[str]:
        """One call: when it answers, nothing open and due before `as_of` is left unmarked."""
        answer = await self._post(as_of)
        if answer.as_of != as_of:
            raise InvoiceServiceUnavailable(
                f"The invoice service marked overdue invoices as of {answer.as_of}, not {as_of}; "
                "no overdue notice was sent.", details={"service": "invoice"},
            )
        log.info("invoices_marked_overdue", as_of=as_of.isoformat(), marked=answer.marked_overdue)
        return frozenset(str(invoice_id) for invoice_id in answer.invoice_ids)

    async def _post(self, as_of: date) -> MarkOverdueAnswer:
        try:
            response = await self._client.post(MARK_OVERDUE_PATH, json={"asOf": as_of.isoformat()})
        except httpx.HTTPError as exc:
            raise InvoiceServiceUnavailable(
                "The invoice service cannot be reached to mark overdue invoices; no overdue notice was sent. "
                "Try again later.", details={"service": "invoice", "error": type(exc).__name__},
                retry_after=30,
            ) from exc
        if response.status_code != 200:
            raise InvoiceServiceUnavailable(
                f"The invoice service answered {response.status_code} when asked to mark overdue invoices; "
                "no overdue notice was sent. Try again later.",
                details={"service": "invoice", "status": response.status_code}, retry_after=30,
            )
        try:
            return MarkOverdueAnswer.model_validate_json(response.content)
        except ValidationError as exc:
            raise InvoiceServiceUnavailable(
                "The invoice service gave an answer that is not a mark-overdue result; no overdue notice was sent.",
                details={"service": "invoice"},
            ) from exc

    async def close(self) -> None:
        await self._client.aclose()
