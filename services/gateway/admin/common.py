"""Helpers the admin pages share: the API as the signed-in admin, client look-ups, form text."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable
from typing import Any

from starlette.datastructures import FormData
from starlette.requests import Request

from services.gateway.admin.api import Api, ApiError
from services.gateway.admin.models import Client, Page
from services.gateway.admin.web import Session, config

CLIENT_PICKER_LIMIT = 100


def api(request: Request, session: Session) -> Api:
    return Api(config(request).upstreams, session.actor)


def text(form: FormData, name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""


async def recent_clients(client_api: Api) -> list[Client]:
    """The newest clients, for a picker (the client list page pages through all of them)."""
    page = await client_api.get(Page[Client], "/api/clients", {"limit": CLIENT_PICKER_LIMIT})
    return page.items


async def with_selected(client_api: Api, clients: list[Client], selected: str) -> list[Client]:
    """`clients` with the `selected` one first when it is not among them (an older client than the
    picker's newest, chosen by search or by a link): a form never silently loses its client."""
    if not selected or any(c.id == selected for c in clients):
        return clients
    try:
        uuid.UUID(selected)
    except ValueError:  # typed into a form by hand: not a client, and never a path to ask for
        return clients
    return [*(await clients_by_id(client_api, [selected])).values(), *clients]


async def search_clients(client_api: Api, text_: str) -> Page[Client]:
    """The clients whose name or email contains `text_` (the invoice service searches), newest first."""
    return await client_api.get(Page[Client], "/api/clients", {"limit": CLIENT_PICKER_LIMIT, "q": text_})


async def clients_by_id(client_api: Api, ids: Iterable[str], known: Iterable[Client] = ()) -> dict[str, Client]:
    """Clients by id for the rows of a page: the ones not already known are asked for at once."""
    out = {c.id: c for c in known}
    missing = sorted({i for i in ids if i and i not in out})

    async def one(client_id: str) -> Client | None:
        try:
            return await client_api.get(Client, f"/api/clients/{client_id}")
        except ApiError:
            return None

    for found in await asyncio.gather(*(one(i) for i in missing)):
        if found is not None:
            out[found.id] = found
    return out


def query_pairs(request: Request, *, drop: Iterable[str] = ()) -> list[tuple[str, str]]:
    dropped = set(drop)
    return [(k, v) for k, v in request.query_params.multi_items() if v != "" and k not in dropped]


def idempotency_headers(form: FormData) -> dict[str, str]:
    """The form's idempotency key (rendered with it) as the services' `Idempotency-Key` header."""
    key = text(form, "idempotency_key")
    return {"Idempotency-Key": key} if 0 < len(key) <= 100 and key.isascii() and key.isprintable() else {}


def first_error(exc: ApiError) -> str:
    """A service's refusal in one sentence for a person."""
    return exc.message if exc.message else "The request was refused."


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
