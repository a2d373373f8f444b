"""Clients: the list, creating one, a client's page (its invoices and subscriptions), "Invite to portal"."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import ValidationError
from starlette.responses import Response

from kit.db import UnitOfWork
from kit.errors import AppError
from kit.web import request_database
from services.gateway.admin import formatting
from services.gateway.admin.api import ApiError
from services.gateway.admin.auth import auth_service, invitation_token, unusable_password
from services.gateway.admin.common import (
    CLIENT_PICKER_LIMIT,
    api,
    first_error,
    idempotency_headers,
    query_pairs,
    search_clients,
    text,
    with_selected,
)
from services.gateway.admin.invoices import _uuid_or_none
from services.gateway.admin.models import Client, Invoice, Notification, Page, Subscription
from services.gateway.admin.web import AdminSession, Csrf, redirect, render
from services.gateway.models import User
from services.gateway.repository import UserRepository
from services.gateway.schemas import CreateUserRequest

router = APIRouter()
COMMON_CURRENCIES = ("EUR", "USD", "GBP", "CHF", "JPY", "SEK", "DKK", "PLN", "CAD", "AUD")


def currency_options() -> list[tuple[str, str]]:
    return [(c, c) for c in COMMON_CURRENCIES]


@router.get("/clients")
async def client_list(request: Request, session: AdminSession,
                      cursor: Annotated[str | None, Query(max_length=2000)] = None) -> Response:
    failure = None
    page: Page[Client] = Page[Client](items=[])
    try:
        page = await api(request, session).get(Page[Client], "/api/clients", {"limit": 20, "cursor": cursor})
    except ApiError as exc:
        failure = "The invoice service is not available right now." if exc.unavailable else first_error(exc)
    return render(request, "clients.html", {"page": page, "failure": failure, "query": query_pairs(request),
                                            "cursor": cursor}, session=session)


def _client_form(request: Request, session: AdminSession, values: dict[str, str], errors: dict[str, str],
                 status_code: int = 200) -> Response:
    return render(request, "client_form.html", {"values": values, "errors": errors,
                                                "currency_options": currency_options()},
                  status_code=status_code, session=session)


@router.get("/clients/new")
async def new_client(request: Request, session: AdminSession) -> Response:
    return _client_form(request, session, {"currency": "EUR"}, {})


@router.get("/clients/options")
async def client_options(
    request: Request, session: AdminSession,
    client_search: Annotated[str | None, Query(max_length=100)] = None,
    client_id: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    """The client picker's options for what was typed in its search field (htmx swaps them into the
    <select>); the client chosen so far stays chosen. Rendered by Jinja, so names are text."""
    a = api(request, session)
    search = (client_search or "").strip()
    selected = _uuid_or_none(client_id or "") or ""
    failure, matches, total = None, [], 0
    try:
        found = await (search_clients(a, search) if search else a.get(Page[Client], "/api/clients",
                                                                          {"limit": CLIENT_PICKER_LIMIT}))
        matches, total = found.items, found.total if found.total is not None else len(found.items)
    except ApiError as exc:
        failure = "The client list is not available right now." if exc.unavailable else first_error(exc)
    shown = await with_selected(a, matches, selected) if failure is None else []
    return render(request, "partials/client_options.html", {
        "clients": shown, "matches": len(matches), "total": total, "selected": selected, "search": search,
        "failure": failure,
    }, session=session)


CLIENT_FIELDS = {"name": "name", "email": "email", "address": "address", "currency": "currency", "taxId": "tax_id"}


@router.post("/clients", dependencies=[Csrf])
async def create_client(request: Request, session: AdminSession) -> Response:
    raw = await request.form()
    values = {k: text(raw, k).strip() for k in ("name", "email", "address", "currency", "tax_id")}
    values["currency"] = values["currency"].upper()
    errors: dict[str, str] = {}
    if not values["name"]:
        errors["name"] = "Enter the client's name."
    if not values["email"] or "@" not in values["email"]:
        errors["email"] = "Enter the email address invoices go to."
    if not formatting.known_currency(values["currency"]):
        errors["currency"] = "Choose a currency."
    if errors:
        return _client_form(request, session, values, errors, 422)
    body: dict[str, Any] = {"name": values["name"], "email": values["email"], "currency": values["currency"]}
    if values["address"]:
        body["address"] = values["address"]
    if values["tax_id"]:
        body["taxId"] = values["tax_id"]
    try:
        client = await api(request, session).post(Client, "/api/clients", body, headers=idempotency_headers(raw))
    except ApiError as exc:
        fields = {CLIENT_FIELDS.get(k, "name"): _sentence(v) for k, v in exc.field_errors().items()}
        return _client_form(request, session, values, fields or {"name": first_error(exc)}, 422)
    return redirect(request, f"/admin/clients/{client.id}?created=1")


def _sentence(message: str) -> str:
    text_ = message.removeprefix("Value error, ")
    return (text_[:1].upper() + text_[1:]).rstrip(".") + "."


async def _client_page(request: Request, session: AdminSession, client_id: str, *,
                       invite: dict[str, Any] | None = None, notice: str | None = None,
                       status_code: int = 200) -> Response:
    a = api(request, session)
    if _uuid_or_none(client_id) is None:
        return render(request, "error.html", {"title": "No such client", "message": "There is no client here."},
                      status_code=404, session=session)
    try:
        client = await a.get(Client, f"/api/clients/{client_id}")
    except ApiError as exc:
        title = "No such client" if exc.status == 404 else "Client unavailable"
        return render(request, "error.html", {"title": title, "message": first_error(exc)},
                      status_code=404 if exc.status == 404 else 502, session=session)

    async def invoices() -> Page[Invoice] | None:
        try:
            return await a.get(Page[Invoice], "/api/invoices", {"clientId": client.id, "limit": 20})
        except ApiError:
            return None

    async def subscriptions() -> Page[Subscription] | None:
        try:
            return await a.get(Page[Subscription], "/api/subscriptions", {"clientId": client.id, "limit": 20})
        except ApiError:
            return None

    inv, subs = await asyncio.gather(invoices(), subscriptions())
    return render(request, "client.html", {
        "client": client, "invoices": inv, "subscriptions": subs, "invite": invite or {"email": client.email},
        "notice": notice,
    }, status_code=status_code, session=session)


@router.get("/clients/{client_id}")
async def client_detail(request: Request, session: AdminSession, client_id: str,
                        created: Annotated[str | None, Query(max_length=5)] = None) -> Response:
    return await _client_page(request, session, client_id, notice="Client created." if created else None)


@router.post("/clients/{client_id}/invite", dependencies=[Csrf])
async def invite_client(request: Request, session: AdminSession, client_id: str) -> Response:
    """Create the client's portal login (or renew the link of its existing one) and email the invitation.

    The login is committed (its own unit of work) before the notifications service is asked to mail
    the link, so an emailed link always names a login that exists. The link is shown to the admin
    too: when the email cannot be queued (notifications down) it can be passed on by hand.
    """
    raw = await request.form()
    email = text(raw, "email").strip().lower()
    if _uuid_or_none(client_id) is None:
        return await _client_page(request, session, client_id)
    a = api(request, session)
    try:
        client = await a.get(Client, f"/api/clients/{client_id}")
    except ApiError:
        return await _client_page(request, session, client_id)  # its error page: unknown or unavailable
    async with request_database(request).transaction() as uow:
        login = await _portal_login(request, uow, client_id, email)
        if isinstance(login, _NewLogin):  # audited with the login it creates, in the same transaction
            await request.app.state.gateway.audit.record_own(
                uow, request, user_id=session.claims.user_id, status=201, created=str(login.user.id),
                body={"email": email, "role": "client", "clientId": client_id})
            login = login.user
    if isinstance(login, str):
        return await _client_page(request, session, client_id, status_code=422,
                                  invite={"email": email, "error": login})
    base = str(request.base_url).rstrip("/")
    link = f"{base}/admin/invite/{invitation_token(request, str(login.id), login.password_hash)}"
    invite: dict[str, Any] = {"email": email, "link": link}
    try:
        answer = await a.request("POST", "/api/notifications/invitations", json={
            "clientId": client.id, "email": email, "name": client.name, "link": link, "portalUrl": f"{base}/portal",
        })
        message = Notification.model_validate_json(answer.content)
    except ApiError as exc:
        invite["email_error"] = ("The notifications service is not available right now." if exc.unavailable
                                 else first_error(exc))
    except ValidationError:
        invite["email_error"] = "The notifications service gave an answer that was not understood."
    else:
        invite["emailed"] = "sent" if answer.status_code == 201 else "already"
        invite["message"] = message
    return await _client_page(request, session, client_id, invite=invite)


@dataclass(frozen=True)
class _NewLogin:
    user: User


async def _portal_login(request: Request, uow: UnitOfWork, client_id: str, email: str) -> User | _NewLogin | str:
    """The client's login for `email`, created when there is none; a sentence for the admin otherwise."""
    users = UserRepository(uow.session)
    existing = await users.get_by_email(email) if email else None
    if existing is not None and existing.client_id != client_id:
        return "This email already has a login of someone else."
    if existing is not None:
        return existing
    try:
        request_body = CreateUserRequest(email=email, password=unusable_password(), role="client",
                                         client_id=client_id)
    except ValidationError:
        return "Enter a valid email address."
    try:
        await auth_service(request, uow).create_user(request_body)
    except AppError as exc:
        return exc.message
    created = await users.get_by_email(email)
    assert created is not None
    return _NewLogin(created)
