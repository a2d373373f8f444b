"""The admin pages' machinery: templates, security headers, the session cookie, CSRF, rendering.

* The session is the gateway's own access token (the JWT the login API issues) in an HttpOnly,
  SameSite=Lax cookie scoped to /admin (Secure when `GATEWAY_ADMIN_COOKIE_SECURE` is set): every page
  decodes it with the gateway's TokenCodec, so an admin page and the API agree on who is signed in and
  for how long.
* CSRF: a random value in its own HttpOnly cookie; the token every form carries (hidden field) and
  htmx sends (the `X-CSRF-Token` header, read from the page's meta tag) is its HMAC under the
  gateway's secret. A POST without the matching token is refused (403) before the handler runs.
* Pages are Jinja2 with autoescaping on for every template: data is text, never markup.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

from fastapi import Depends, Request
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from starlette.responses import HTMLResponse, RedirectResponse, Response

from kit.errors import AppError
from services.gateway.admin import formatting
from services.gateway.admin.api import Unavailable
from services.gateway.proxy import ForwardedActor, UpstreamPool
from services.gateway.security import TokenClaims, TokenCodec

PACKAGE_DIR = Path(__file__).parent
TEMPLATES_DIR = PACKAGE_DIR / "templates"
STATIC_DIR = PACKAGE_DIR / "static"

SESSION_COOKIE = "admin_session"
CSRF_COOKIE = "admin_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
COOKIE_PATH = "/admin"

# Same origin only, nothing inline. `frame-src 'self'`: the template editor shows the PDF preview
# in an iframe; `object-src 'self'` lets Chromium's PDF viewer show it. Charts draw on a canvas
# (CSSOM changes by script are not inline styles, so style-src stays 'self').
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-src 'self'; object-src 'self'; base-uri 'none'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-store",
}
# A PDF the admin pages frame themselves (the template preview): framable by our own pages only.
FRAMABLE_HEADERS = {
    **SECURITY_HEADERS,
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'self'",
    "X-Frame-Options": "SAMEORIGIN",
}


@dataclass
class AdminConfig:
    tokens: TokenCodec
    upstreams: UpstreamPool
    csrf_key: bytes
    invite_key: bytes
    cookie_secure: bool
    templates: Environment


def make_environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES_DIR),
        autoescape=select_autoescape(enabled_extensions=("html",), default_for_string=True, default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    formatting.install(env)
    env.tests["unavailable"] = lambda value: isinstance(value, Unavailable)
    # A fresh key per rendered form: the same submission sent twice is one request to the service.
    env.globals["new_idempotency_key"] = lambda: str(uuid.uuid4())
    env.filters["without"] = lambda pairs, key: [(k, v) for k, v in pairs if k != key]
    env.filters["with_cursor"] = lambda pairs, cursor: [*((k, v) for k, v in pairs if k != "cursor"),
                                                         ("cursor", cursor)]
    return env


def derive_key(secret: str, purpose: str) -> bytes:
    return hmac.new(secret.encode(), f"billing-admin:{purpose}".encode(), hashlib.sha256).digest()


def config(request: Request) -> AdminConfig:
    return request.app.state.admin  # type: ignore[no-any-return]


# -- errors that become pages --------------------------------------------------------------------


class LoginRequired(Exception):
    """No valid session: to the sign-in page, then back to where the admin was going."""


class NotAnAdmin(Exception):
    """A valid session of a client login: 403 with a link to the portal."""


class CsrfRefused(AppError):
    status_code = 403
    code = "csrf_failed"


def safe_next(value: str | None) -> str:
    """Only a path of the admin pages is accepted as where to go after signing in (no open redirect)."""
    if not value or not value.startswith("/admin") or value.startswith("//") or "\\" in value:
        return "/admin"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or parts.path.startswith("/admin/login"):
        return "/admin"
    return value


def is_htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


def redirect(request: Request, url: str) -> Response:
    """A redirect that also works for an htmx request (which would otherwise swap the target page in)."""
    if is_htmx(request):
        return Response(status_code=204, headers={"HX-Redirect": url})
    return RedirectResponse(url, status_code=303)


def login_redirect(request: Request) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    if request.method != "GET":
        target = request.headers.get("hx-current-url") or "/admin"
        target = urlsplit(target).path or "/admin"
    return redirect(request, f"/admin/login?next={quote(safe_next(target), safe='')}")


# -- session --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Session:
    claims: TokenClaims
    csrf_token: str

    @property
    def actor(self) -> ForwardedActor:
        return ForwardedActor(role=self.claims.role, user_id=self.claims.user_id, client_id=self.claims.client_id)


def csrf_token_for(request: Request) -> str:
    """The CSRF token of this browser (its cookie's HMAC); '' when it has no CSRF cookie yet."""
    raw = request.cookies.get(CSRF_COOKIE) or getattr(request.state, "new_csrf_cookie", "")
    if not raw:
        return ""
    return hmac.new(config(request).csrf_key, raw.encode(), hashlib.sha256).hexdigest()


def ensure_csrf_cookie(request: Request) -> None:
    """Give this browser a CSRF cookie when it has none (set on the response by `render`)."""
    if not request.cookies.get(CSRF_COOKIE):
        request.state.new_csrf_cookie = secrets.token_urlsafe(32)


def read_claims(request: Request) -> TokenClaims | None:
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        return None
    try:
        return config(request).tokens.decode(token)
    except AppError:
        return None


async def admin_session(request: Request) -> Session:
    claims = read_claims(request)
    if claims is None:
        raise LoginRequired()
    if claims.role != "admin":
        raise NotAnAdmin()
    ensure_csrf_cookie(request)
    return Session(claims=claims, csrf_token=csrf_token_for(request))


AdminSession = Annotated[Session, Depends(admin_session)]


async def check_csrf(request: Request) -> None:
    """Every state-changing request carries the token: in the header (htmx) or the form field."""
    expected = csrf_token_for(request) if request.cookies.get(CSRF_COOKIE) else ""
    sent = request.headers.get(CSRF_HEADER)
    if sent is None:
        content_type = request.headers.get("content-type", "")
        if content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
            form = await request.form()
            value = form.get(CSRF_FIELD)
            sent = value if isinstance(value, str) else None
    if not expected or not sent or not hmac.compare_digest(expected, sent):
        raise CsrfRefused("This form has expired or did not come from the admin pages. Reload the page and try again.")
    origin = request.headers.get("origin")
    if origin and origin != "null" and urlsplit(origin).netloc != request.headers.get("host"):
        raise CsrfRefused("This request came from another site.")


Csrf = Depends(check_csrf)


# -- rendering ------------------------------------------------------------------------------------


def set_session_cookie(response: Response, request: Request, token: str, max_age: int) -> None:
    response.set_cookie(SESSION_COOKIE, token, max_age=max_age, path=COOKIE_PATH, httponly=True, samesite="lax",
                        secure=config(request).cookie_secure)


def set_csrf_cookie(response: Response, request: Request, value: str) -> None:
    response.set_cookie(CSRF_COOKIE, value, path=COOKIE_PATH, httponly=True, samesite="lax",
                        secure=config(request).cookie_secure)


def render(
    request: Request,
    template: str,
    context: dict[str, Any] | None = None,
    *,
    status_code: int = 200,
    headers: dict[str, str] | None = None,
    session: Session | None = None,
) -> HTMLResponse:
    ensure_csrf_cookie(request)
    ctx: dict[str, Any] = {
        "request": request,
        "csrf_token": csrf_token_for(request),
        "csrf_field": CSRF_FIELD,
        "locale": formatting.request_locale(request),
        "session": session,
        "path": request.url.path,
        "htmx": is_htmx(request),
    }
    ctx.update(context or {})
    html = config(request).templates.get_template(template).render(ctx)
    response = HTMLResponse(html, status_code=status_code, headers={**SECURITY_HEADERS, **(headers or {})})
    new_cookie = getattr(request.state, "new_csrf_cookie", None)
    if new_cookie:
        set_csrf_cookie(response, request, new_cookie)
    return response
