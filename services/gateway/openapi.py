"""One OpenAPI document for the public API: the gateway's own routes plus each upstream's paths.

Upstream documents are fetched lazily from `<upstream>/openapi.json`, cached, and skipped (then
retried after a short while) when a service is down. Only paths the route table actually sends to
that upstream are included; component names that clash between services are prefixed.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Callable, Iterable
from typing import Any

import structlog

from kit.actor import CLIENT_HEADER, INTERNAL_TOKEN_HEADER, ROLE_HEADER, USER_HEADER
from services.gateway.proxy import UpstreamPool
from services.gateway.routes import Auth, Route, resolve

log = structlog.get_logger(__name__)

BEARER_SCHEME = "bearerAuth"
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
# The trusted headers only the gateway sets: callers never see them in the merged document.
_HIDDEN_HEADER_PARAMS = {h.lower() for h in (INTERNAL_TOKEN_HEADER, ROLE_HEADER, CLIENT_HEADER, USER_HEADER)}
IDEMPOTENCY_PARAMETER = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "maxLength": 255},
    "description": "Makes the POST safe to retry: a repeat with the same key returns the first response "
    "(with `Idempotent-Replayed: true`) for 24 hours.",
}


class OpenApiAggregator:
    def __init__(
        self,
        pool: UpstreamPool,
        routes: Callable[[], Iterable[Route]],
        *,
        cache_seconds: float,
        retry_seconds: float,
        fetch_timeout: float,
    ) -> None:
        self._pool = pool
        self._routes = routes
        self._cache_seconds = cache_seconds
        self._retry_seconds = retry_seconds
        self._fetch_timeout = fetch_timeout
        self._cache: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def _upstreams(self) -> list[str]:
        seen: list[str] = []
        for route in self._routes():
            if route.upstream not in seen:
                seen.append(route.upstream)
        return seen

    async def _spec(self, upstream: str) -> dict[str, Any] | None:
        cached = self._cache.get(upstream)
        now = time.monotonic()
        if cached and now < cached[0]:
            return cached[1]
        lock = self._locks.setdefault(upstream, asyncio.Lock())
        async with lock:
            cached = self._cache.get(upstream)
            if cached and time.monotonic() < cached[0]:
                return cached[1]
            try:
                spec = await self._pool.get_json(upstream, "/openapi.json", time_limit=self._fetch_timeout)
                if not isinstance(spec, dict) or not isinstance(spec.get("paths"), dict):
                    raise ValueError("not an OpenAPI document")
                self._cache[upstream] = (time.monotonic() + self._cache_seconds, spec)
                return spec
            except Exception as exc:
                log.warning("openapi_upstream_unavailable", upstream=upstream, error=str(exc)[:300])
                stale = cached[1] if cached else None  # keep serving the last good copy
                self._cache[upstream] = (time.monotonic() + self._retry_seconds, stale)
                return stale

    async def document(self, own: dict[str, Any]) -> dict[str, Any]:
        upstreams = self._upstreams()
        specs = await asyncio.gather(*(self._spec(name) for name in upstreams))
        routes = list(self._routes())
        return merge_documents(own, dict(zip(upstreams, specs, strict=True)), routes)


def merge_documents(
    own: dict[str, Any], upstream_specs: dict[str, dict[str, Any] | None], routes: list[Route]
) -> dict[str, Any]:
    doc = copy.deepcopy(own)
    paths: dict[str, Any] = doc.setdefault("paths", {})
    components: dict[str, Any] = doc.setdefault("components", {})
    components.setdefault("securitySchemes", {})[BEARER_SCHEME] = {
        "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
        "description": "The `accessToken` from `POST /api/auth/login`.",
    }
    operation_ids = {
        op.get("operationId") for item in paths.values() for m, op in item.items() if m in HTTP_METHODS
    }
    unavailable: list[str] = []
    tags: list[dict[str, str]] = list(doc.get("tags", []))

    for name, spec in upstream_specs.items():
        if spec is None:
            unavailable.append(name)
            continue
        spec = copy.deepcopy(spec)
        renames = _merge_components(components, spec.get("components", {}), prefix=_camel(name))
        if renames:
            spec = _rewrite_refs(spec, renames)
        included = False
        for path, item in spec.get("paths", {}).items():
            route = resolve(path, routes)
            if route is None or route.upstream != name or path in paths or not isinstance(item, dict):
                continue
            for method, op in item.items():
                if method not in HTTP_METHODS or not isinstance(op, dict):
                    continue
                _adapt_operation(op, method, route, name, operation_ids)
            paths[path] = item
            included = True
        if included and not any(t.get("name") == name for t in tags):
            tags.append({"name": name, "description": f"Served by the {name} service."})

    for item in paths.values():  # the gateway's own POSTs take the key too
        post = item.get("post")
        if isinstance(post, dict):
            _add_idempotency_parameter(post)
    # Every service answers validation errors in the shared error format, not FastAPI's default shape.
    schemas = components.get("schemas", {})
    if "ErrorResponse" in schemas:
        for name in [n for n in schemas if n.endswith("HTTPValidationError")]:
            schemas[name] = {**schemas["ErrorResponse"], "title": name}
    if tags:
        doc["tags"] = tags
    if unavailable:
        doc["x-unavailable-upstreams"] = unavailable
    return doc


def _adapt_operation(op: dict[str, Any], method: str, route: Route, upstream: str, operation_ids: set[Any]) -> None:
    op["security"] = [{BEARER_SCHEME: []}] if route.auth is Auth.USER else []
    params = [p for p in op.get("parameters", []) if not _is_hidden_header(p)]
    if params:
        op["parameters"] = params
    else:
        op.pop("parameters", None)
    if method == "post" and route.idempotency:
        _add_idempotency_parameter(op)
    op.setdefault("tags", [upstream])
    op_id = op.get("operationId")
    if op_id is not None:
        if op_id in operation_ids:
            op["operationId"] = op_id = f"{upstream}_{op_id}"
        operation_ids.add(op_id)


def _is_hidden_header(param: Any) -> bool:
    return (
        isinstance(param, dict)
        and param.get("in") == "header"
        and str(param.get("name", "")).lower() in _HIDDEN_HEADER_PARAMS
    )


def _add_idempotency_parameter(op: dict[str, Any]) -> None:
    params = op.setdefault("parameters", [])
    if not any(isinstance(p, dict) and str(p.get("name", "")).lower() == "idempotency-key" for p in params):
        params.append(dict(IDEMPOTENCY_PARAMETER))


def _merge_components(target: dict[str, Any], source: dict[str, Any], *, prefix: str) -> dict[str, str]:
    """Copy `source` components into `target`; returns {old $ref: new $ref} for renamed clashes."""
    renames: dict[str, str] = {}
    pending: list[tuple[str, str, str, Any]] = []
    for kind, entries in source.items():
        if kind == "securitySchemes" or not isinstance(entries, dict):
            continue
        bucket = target.setdefault(kind, {})
        for entry_name, value in entries.items():
            new_name = entry_name
            if entry_name in bucket and bucket[entry_name] != value:
                new_name = f"{prefix}{entry_name}"
                n = 2
                while new_name in bucket and bucket[new_name] != value:
                    new_name = f"{prefix}{entry_name}{n}"
                    n += 1
                renames[f"#/components/{kind}/{entry_name}"] = f"#/components/{kind}/{new_name}"
            pending.append((kind, entry_name, new_name, value))
    for kind, _old, new_name, value in pending:
        target[kind][new_name] = _rewrite_refs(value, renames) if renames else value
    return renames


def _rewrite_refs(node: Any, renames: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {
            k: (renames.get(v, v) if k == "$ref" and isinstance(v, str) else _rewrite_refs(v, renames))
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_rewrite_refs(v, renames) for v in node]
    return node


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.replace("-", "_").split("_"))
