"""Who a client is (name, email): read from the invoice service, which owns clients.

Needed when the platform creates a client's Stripe customer (Stripe's emails and the billing portal
show them) and copied into every subscription snapshot, so notifications can email the client.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Protocol

import httpx
import structlog
from pydantic import BaseModel, ValidationError

from kit.actor import INTERNAL_TOKEN_HEADER
from kit.errors import ServiceUnavailable
from kit.logging import CORRELATION_HEADER, current_correlation_id

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class ClientInfo:
    id: uuid.UUID
    name: str | None
    email: str | None


class ClientDirectory(Protocol):
    async def get(self, client_id: uuid.UUID) -> ClientInfo | None:
        """The client, None when the invoice service does not know it; 503 when it cannot say."""
        ...


class _ClientBody(BaseModel):
    id: uuid.UUID
    name: str | None = None
    email: str | None = None


class HttpClientDirectory:
    """GET {invoice_url}/api/clients/{id} as the system actor (no role header, internal token)."""

    def __init__(self, base_url: str, internal_token: str | None, *, timeout: float = 5.0) -> None:
        headers = {INTERNAL_TOKEN_HEADER: internal_token} if internal_token else {}
        self._client = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    async def get(self, client_id: uuid.UUID) -> ClientInfo | None:
        headers = {CORRELATION_HEADER: cid} if (cid := current_correlation_id()) else {}
        try:
            response = await self._client.get(f"/api/clients/{client_id}", headers=headers)
        except httpx.HTTPError as exc:
            log.warning("invoice_service_unreachable", client_id=str(client_id), error=str(exc))
            raise ServiceUnavailable("The invoice service cannot be reached to read the client; try again.",
                                     retry_after=5) from exc
        if response.status_code in (404, 422):
            return None
        if response.status_code != 200:
            raise ServiceUnavailable(f"The invoice service answered {response.status_code} for the client; try again.",
                                     retry_after=5)
        try:
            body = _ClientBody.model_validate_json(response.content)
        except ValidationError as exc:
            raise ServiceUnavailable("The invoice service returned an unreadable client.") from exc
        return ClientInfo(id=body.id, name=body.name, email=body.email)

    async def aclose(self) -> None:
        await self._client.aclose()


class StaticClientDirectory:
    """Tests and tools: the clients put here (or, with `accept_any`, a nameless client for any id)."""

    def __init__(self, *, accept_any: bool = False) -> None:
        self.clients: dict[uuid.UUID, ClientInfo] = {}
        self.accept_any = accept_any

    def add(self, client_id: uuid.UUID, name: str | None = None, email: str | None = None) -> ClientInfo:
        info = ClientInfo(client_id, name, email)
        self.clients[client_id] = info
        return info

    async def get(self, client_id: uuid.UUID) -> ClientInfo | None:
        if client_id in self.clients:
            return self.clients[client_id]
        return ClientInfo(client_id, None, None) if self.accept_any else None
