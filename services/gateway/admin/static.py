"""The admin pages' static files: a fixed allow-list read once at import, so no request path reaches the disk."""

from __future__ import annotations

import hashlib

from fastapi import APIRouter, Request
from starlette.responses import Response

from kit.errors import NotFound
from services.gateway.admin.web import SECURITY_HEADERS, STATIC_DIR

MEDIA_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
    ".md": "text/plain; charset=utf-8",
}


def _load() -> dict[str, tuple[bytes, str, str]]:
    """relative name ("admin.js", "vendor/htmx-2.0.11.min.js") -> (content, media type, ETag)."""
    assets: dict[str, tuple[bytes, str, str]] = {}
    for path in sorted(STATIC_DIR.rglob("*")):
        media_type = MEDIA_TYPES.get(path.suffix)
        if path.is_file() and media_type is not None:
            content = path.read_bytes()
            etag = '"' + hashlib.sha256(content).hexdigest()[:32] + '"'
            assets[path.relative_to(STATIC_DIR).as_posix()] = (content, media_type, etag)
    return assets


STATIC = _load()
router = APIRouter()


@router.api_route("/static/{name:path}", methods=["GET", "HEAD"])
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
