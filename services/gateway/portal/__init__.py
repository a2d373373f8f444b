"""The client portal: static pages (plain HTML, one CSS file, vanilla JS) served by the gateway.

The pages are public; the JS logs in with `POST /api/auth/login`, keeps the bearer token in
sessionStorage and calls the gateway's API with it, so every authorization decision stays with the
API. Paying happens on Stripe's hosted pages (locally the Stripe stand-in's, deploy/stripe_standin);
this router only claims the exact paths below.
"""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.responses import RedirectResponse, Response

from kit.errors import NotFound
from kit.web import StrictQuery

PACKAGE_DIR = Path(__file__).parent
PAGES_DIR = PACKAGE_DIR / "pages"
STATIC_DIR = PACKAGE_DIR / "static"

# Same-origin only: no inline script or style, no framing, forms and fetches to this origin alone.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}
MEDIA_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".ico": "image/x-icon",
    ".png": "image/png",
}


def _load_static() -> dict[str, tuple[bytes, str, str]]:
    """Every servable asset, read once: a fixed allow-list, so no request path ever reaches the disk.
    name -> (content, media type, ETag)."""
    assets: dict[str, tuple[bytes, str, str]] = {}
    for path in sorted(STATIC_DIR.iterdir()):
        media_type = MEDIA_TYPES.get(path.suffix)
        if path.is_file() and media_type is not None:
            content = path.read_bytes()
            etag = '"' + hashlib.sha256(content).hexdigest()[:32] + '"'
            assets[path.name] = (content, media_type, etag)
    return assets


def _load_pages() -> dict[str, bytes]:
    return {path.stem: path.read_bytes() for path in PAGES_DIR.glob("*.html")}


STATIC = _load_static()
PAGES = _load_pages()

# Like every route of ours, a page refuses query parameters it does not know (400 naming them). The
# ones below are read by the page's script, not by the server: declared so they are accepted.
router = APIRouter(prefix="/portal", include_in_schema=False, dependencies=[StrictQuery])
METHODS = ["GET", "HEAD"]
ScriptParam = Annotated[str | None, Query(max_length=2000)]


def page(name: str) -> Response:
    headers = {**SECURITY_HEADERS, "Cache-Control": "no-cache"}
    return Response(PAGES[name], media_type="text/html; charset=utf-8", headers=headers)


@router.api_route("", methods=METHODS)
@router.api_route("/", methods=METHODS)
async def portal_home() -> Response:
    return RedirectResponse("/portal/invoices", status_code=302)


@router.api_route("/login", methods=METHODS)
async def login_page(next_path: Annotated[str | None, Query(alias="next", max_length=2000)] = None) -> Response:
    """`next`: where to go after logging in (checked by the script: same-origin portal paths only)."""
    return page("login")


@router.api_route("/invoices", methods=METHODS)
@router.api_route("/invoices/", methods=METHODS)
async def invoices_page(page_number: Annotated[str | None, Query(alias="page", max_length=20)] = None) -> Response:
    """`page`: the page number of the invoice list (its cursor is kept by the script)."""
    return page("invoices")


@router.api_route("/invoices/{invoice_id}", methods=METHODS)
async def invoice_page(
    invoice_id: str,
    checkout: ScriptParam = None,
    session_id: ScriptParam = None,
) -> Response:
    """`checkout=success|cancelled&session_id=...`: the return from a checkout (payments builds it)."""
    try:
        uuid.UUID(invoice_id)
    except ValueError:
        raise NotFound("No such invoice.") from None
    return page("invoice")


@router.api_route("/subscription", methods=METHODS)
@router.api_route("/subscription/", methods=METHODS)
async def subscription_page(checkout: ScriptParam = None, session_id: ScriptParam = None) -> Response:
    """The client's subscription. `checkout=success&session_id=...|cancel`: the return from a
    subscription Checkout (the subscriptions service builds it); the billing portal returns here too."""
    return page("subscription")


@router.api_route("/static/{name}", methods=METHODS)
async def static_asset(name: str, request: Request) -> Response:
    asset = STATIC.get(name)
    if asset is None:
        raise NotFound("No such file.")
    content, media_type, etag = asset
    # Revalidated on every load (no fingerprinted names, no build step): a 304 when unchanged.
    headers = {**SECURITY_HEADERS, "Cache-Control": "no-cache", "ETag": etag}
    if etag in (t.strip() for t in request.headers.get("if-none-match", "").split(",")):
        return Response(status_code=304, headers=headers)
    return Response(content, media_type=media_type, headers=headers)
