"""Signing in and out of the admin pages, and the one-time "set your password" link of an invitation.

The sign-in runs the gateway's own login (AuthService, the same code as `POST /api/auth/login`) and
keeps the access token it issues in the session cookie. A client login is refused with a 403 that
sends it to the portal, and gets no cookie.

Invitations: inviting a client creates its login with an unusable random password and a one-time
link to choose one, which the notifications service emails (services.gateway.admin.clients). The link
is signed with the gateway's secret over the login's current password hash, so it stops working the
moment the password is set (and after its expiry). It expires at the end of the UTC day a week on:
every invitation of one login on one day is the same link, which the notifications service mails
once, so a repeated click sends nothing new; the next day a fresh one can be sent.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from kit.errors import AppError, retry_after_headers
from kit.web import RequestUnitOfWork
from services.gateway.admin.web import (
    COOKIE_PATH,
    SESSION_COOKIE,
    AdminSession,
    Csrf,
    config,
    read_claims,
    redirect,
    render,
    safe_next,
    set_session_cookie,
)
from services.gateway.repository import UserRepository
from services.gateway.schemas import PASSWORD_MAX_LENGTH, PASSWORD_MIN_LENGTH
from services.gateway.security import client_address
from services.gateway.service import AuthService

router = APIRouter()
INVITE_TTL_SECONDS = 7 * 24 * 3600
Next = Annotated[str | None, Query(alias="next", max_length=2000)]


def _text(form: Any, name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""


def auth_service(request: Request, uow: Any, *, throttled: bool = False) -> AuthService:
    """The gateway's AuthService; `throttled`: with the API login's throttle (same counts, same limits)."""
    gateway = request.app.state.gateway
    return AuthService(uow, gateway.passwords, gateway.tokens, gateway.upstreams,
                       throttle=gateway.throttle if throttled else None)


@router.get("/login")
async def login_page(request: Request, next_path: Next = None) -> Response:
    claims = read_claims(request)
    if claims is not None and claims.role == "admin":
        return redirect(request, safe_next(next_path))
    return render(request, "login.html", {"next": safe_next(next_path), "email": "", "error": None,
                                          "retry_after": None})


@router.post("/login", dependencies=[Csrf])
async def login(request: Request, uow: RequestUnitOfWork) -> Response:
    form = await request.form()
    email, password = _text(form, "email").strip(), _text(form, "password")
    next_path = safe_next(_text(form, "next"))
    if not email or not password:
        return render(request, "login.html", {"next": next_path, "email": email, "retry_after": None,
                                              "error": "Enter your email and password."}, status_code=422)
    try:
        # Throttled as `POST /api/auth/login` is, in the same counters: the sign-in page is no way
        # around the API's limit (per account and per client address).
        result = await auth_service(request, uow, throttled=True).login(
            email, password[:PASSWORD_MAX_LENGTH], address=client_address(request))
    except AppError as exc:
        message = "Wrong email or password." if exc.status_code == 401 else exc.message
        return render(request, "login.html", {"next": next_path, "email": email, "error": message,
                                              "retry_after": getattr(exc, "retry_after", None)},
                      status_code=exc.status_code, headers=retry_after_headers(exc))
    if result.user.role != "admin":
        return render(request, "forbidden.html", status_code=403)
    response = redirect(request, next_path)
    set_session_cookie(response, request, result.access_token, result.expires_in)
    return response


@router.post("/logout", dependencies=[Csrf])
async def logout(request: Request) -> Response:
    response = redirect(request, "/admin/login")
    response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH, httponly=True, samesite="lax",
                           secure=config(request).cookie_secure)
    return response


@router.get("/session")
async def session_check(session: AdminSession) -> Response:
    """For scripts and probes: 204 while the admin session is valid (a redirect to sign in otherwise)."""
    return Response(status_code=204)


# -- invitations -------------------------------------------------------------------------------------


def _signature(key: bytes, user_id: str, expires: int, password_hash: str) -> str:
    mac = hmac.new(key, f"{user_id}.{expires}.{password_hash}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def invitation_expiry(now: float) -> int:
    """The end of the UTC day `INVITE_TTL_SECONDS` from `now` (so one day's links are all the same)."""
    return (int(now + INVITE_TTL_SECONDS) // 86400 + 1) * 86400


def invitation_token(request: Request, user_id: str, password_hash: str, now: float | None = None) -> str:
    expires = invitation_expiry(now if now is not None else time.time())
    return f"{user_id}.{expires}.{_signature(config(request).invite_key, user_id, expires, password_hash)}"


def unusable_password() -> str:
    """A login's password until its owner chooses one: nobody knows it."""
    return secrets.token_urlsafe(32)


async def _invited_user(request: Request, token: str, uow: Any) -> Any:
    """The login this link is for, while the link is valid; None otherwise."""
    parts = token.split(".")
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    user_id, expires_text, signature = parts
    try:
        uid = uuid.UUID(user_id)
    except ValueError:
        return None
    if int(expires_text) < time.time():
        return None
    user = await UserRepository(uow.session).get(uid)
    if user is None:
        return None
    expected = _signature(config(request).invite_key, user_id, int(expires_text), user.password_hash)
    return user if hmac.compare_digest(expected, signature) else None


@router.get("/invite/{token}")
async def invitation_page(request: Request, token: str, uow: RequestUnitOfWork) -> Response:
    user = await _invited_user(request, token, uow)
    if user is None:
        return render(request, "invite.html", {"valid": False, "token": token, "errors": {}}, status_code=404)
    return render(request, "invite.html", {"valid": True, "token": token, "email": user.email, "errors": {}})


@router.post("/invite/{token}", dependencies=[Csrf])
async def accept_invitation(request: Request, token: str, uow: RequestUnitOfWork) -> Response:
    user = await _invited_user(request, token, uow)
    if user is None:
        return render(request, "invite.html", {"valid": False, "token": token, "errors": {}}, status_code=404)
    form = await request.form()
    password, repeat = _text(form, "password"), _text(form, "repeat")
    errors: dict[str, str] = {}
    if len(password) < PASSWORD_MIN_LENGTH:
        errors["password"] = f"Use at least {PASSWORD_MIN_LENGTH} characters."
    elif len(password) > PASSWORD_MAX_LENGTH:
        errors["password"] = f"Use at most {PASSWORD_MAX_LENGTH} characters."
    elif password != repeat:
        errors["repeat"] = "The two passwords differ."
    if errors:
        return render(request, "invite.html", {"valid": True, "token": token, "email": user.email,
                                               "errors": errors}, status_code=422)
    gateway = request.app.state.gateway
    await UserRepository(uow.session).set_password_hash(user.id, await gateway.passwords.hash(password))
    return render(request, "invite_done.html", {"email": user.email})
