"""The invoice service, asked over HTTP as the system (internal token, no actor): it alone says when an
invoice is OVERDUE, and it owns the clients (name and email).

The reminder scan asks it to mark what is past due as of the scan's day before any overdue notice is
queued, so an overdue email and the invoice's status never disagree (an email "your invoice is
overdue" for an invoice the portal still shows as SENT).

A subscription email whose event carried no address (a client in a trial has no invoice yet, so no
invoice copy here knows it) asks it for the client at delivery.
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
from kit.logging import correlation_hooks

log = structlog.get_logger(__name__)

MARK_OVERDUE_PATH = "/api/invoices/mark-overdue"
CLIENT_PATH = "/api/clients/{client_id}"


class InvoiceServiceUnavailable(ServiceUnavailable):
    code = "invoice_service_unavailable"


class OverdueAuthority(Protocol):
    """Whoever decides that an invoice is OVERDUE: the invoice service (a stand-in in tests)."""

    async def mark_overdue(self, as_of: date) -> frozenset[str]:
        """Mark every open invoice past due as of `as_of` OVERDUE; the ids of those it marked now.

        Raises `ServiceUnavailable` when that cannot be had (then no overdue notice may go out).
        """
        ...


class ClientContact(ContractModel):
    """`GET /api/clients/{id}`'s answer, the fields we use."""

    id: uuid.UUID
    name: str
    email: str


class ClientDirectory(Protocol):
    """Who a client is: the invoice service (a stand-in in tests)."""

    async def client_contact(self, client_id: str) -> ClientContact | None:
        """The client, or None when there is no such client. Raises `ServiceUnavailable` when that
        cannot be had right now (then ask again later)."""
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
                                         trust_env=False, event_hooks=correlation_hooks())

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

    async def client_contact(self, client_id: str) -> ClientContact | None:
        try:
            client_uuid = uuid.UUID(client_id)
        except ValueError:
            return None
        try:
            response = await self._client.get(CLIENT_PATH.format(client_id=client_uuid))
        except httpx.HTTPError as exc:
            raise InvoiceServiceUnavailable(
                "The invoice service cannot be reached for the client's address.",
                details={"service": "invoice", "error": type(exc).__name__},
            ) from exc
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise InvoiceServiceUnavailable(
                f"The invoice service answered {response.status_code} for client {client_id}.",
                details={"service": "invoice", "status": response.status_code},
            )
        try:
            return ClientContact.model_validate_json(response.content)
        except ValidationError as exc:
            raise InvoiceServiceUnavailable("The invoice service answered with something that is not a client.",
                                            details={"service": "invoice"}) from exc

    async def close(self) -> None:
        await self._client.aclose()
