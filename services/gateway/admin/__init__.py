"""The admin web UI at /admin: server-rendered pages (Jinja2) with htmx 2 for partial updates.

Every page asks the services through the gateway's upstream pool as the signed-in admin (never a
service's database). Vendored, pinned assets (htmx 2.0.11, Chart.js 4.6.1, with their licences) are
served from static/: no build step, no CDN. Mounted by services.gateway.app: `router` among the
gateway's routers and `configure(app, ...)` once the app exists.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from starlette.responses import Response

from kit.web import StrictQuery
from services.gateway.admin import (
    audit,
    auth,
    billing,
    clients,
    invoices,
    reports,
    static,
    subscriptions,
    template_editor,
)
from services.gateway.admin.web import (
    AdminConfig,
    CsrfRefused,
    LoginRequired,
    NotAnAdmin,
    derive_key,
    login_redirect,
    make_environment,
    render,
)
from services.gateway.proxy import UpstreamPool
from services.gateway.security import TokenCodec

# Like every route of the gateway's own, a page refuses query parameters it does not declare.
router = APIRouter(prefix="/admin", include_in_schema=False, dependencies=[StrictQuery])
router.add_api_route("", reports.dashboard, methods=["GET"])  # /admin itself (an included router cannot)
for module in (static, auth, reports, invoices, clients, billing, template_editor, subscriptions, audit):
    router.include_router(module.router)


def configure(app: FastAPI, *, secret: str, tokens: TokenCodec, upstreams: UpstreamPool, cookie_secure: bool) -> None:
    """Give the pages the gateway's token codec and upstream pool, and turn their errors into pages."""
    app.state.admin = AdminConfig(
        tokens=tokens,
        upstreams=upstreams,
        csrf_key=derive_key(secret, "csrf"),
        invite_key=derive_key(secret, "invitation"),
        cookie_secure=cookie_secure,
        templates=make_environment(),
    )

    async def on_login_required(request: Request, _: Exception) -> Response:
        return login_redirect(request)

    async def on_not_admin(request: Request, _: Exception) -> Response:
        return render(request, "forbidden.html", status_code=403)

    async def on_csrf(request: Request, exc: Exception) -> Response:
        message = exc.message if isinstance(exc, CsrfRefused) else "Refused."
        return render(request, "error.html", {"title": "Request refused", "message": message}, status_code=403)

    app.add_exception_handler(LoginRequired, on_login_required)
    app.add_exception_handler(NotAnAdmin, on_not_admin)
    app.add_exception_handler(CsrfRefused, on_csrf)
