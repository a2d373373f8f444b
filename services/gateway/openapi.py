"""One OpenAPI document for the public API: the gateway's own routes plus each upstream's paths.

Upstream documents are fetched lazily from `<upstream>/openapi.json`, cached, and skipped (then
retried after a short while) when a service is down. Only paths the route table actually sends to
that upstream are included; component names that clash between services are prefixed.

Every operation lists the error statuses it can answer, each with the one error body
(`ErrorResponse`): the platform's own (400 unknown query parameter or invalid cursor, 422, 404 with a
path id, 401/403 behind a token, 409 on a change, 413 on a body) and the gateway's (502/503/504 from
a proxied service, 429 on login). One place adds them, here, for the gateway's routes and every
service's alike.
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
from services.gateway.schemas import ErrorResponse

log = structlog.get_logger(__name__)

BEARER_SCHEME = "bearerAuth"
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
# The trusted headers only the gateway sets: callers never see them in the merged document.
_HIDDEN_HEADER_PARAMS = {h.lower() for h in (INTERNAL_TOKEN_HEADER, ROLE_HEADER, CLIENT_HEADER, USER_HEADER)}
IDEMPOTENCY_PARAMETER = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    # What the gateway accepts (validate_key): 1 to 255 printable ASCII characters, no edge spaces.
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]([ -~]*[!-~])?$"},
    "description": "Makes the POST safe to retry: a repeat with the same key returns the first response "
    "(with `Idempotent-Replayed: true`) for 24 hours.",
}

ERROR_SCHEMA_REF = "#/components/schemas/ErrorResponse"
# status -> (name under components/responses, what it means here)
ERROR_RESPONSES: dict[str, tuple[str, str]] = {
    "400": ("BadRequest", "An unknown query parameter (named in the message), an invalid cursor, a malformed "
            "request or Idempotency-Key."),
    "401": ("Unauthorized", "No valid bearer token (missing, expired or forged)."),
    "403": ("Forbidden", "The caller's role may not do this."),
    "404": ("NotFound", "No such resource, or not one the caller may see."),
    "409": ("Conflict", "The resource's state does not allow this, or a request with the same "
            "Idempotency-Key is still in progress."),
    "413": ("PayloadTooLarge", "The request body is over the size limit."),
    "422": ("ValidationError", "The body or the parameters are invalid (the fields at fault in `details`), "
            "or the Idempotency-Key was used for another request."),
    "429": ("TooManyRequests", "Too many failed logins for the account or from the address: try again after "
            "`Retry-After` seconds."),
    "502": ("BadGateway", "The service behind the gateway failed to answer properly."),
    "503": ("ServiceUnavailable", "The service behind the gateway, or a store it needs, is unavailable: "
            "retry later."),
    "504": ("GatewayTimeout", "The service behind the gateway did not answer in time."),
}
RETRY_AFTER_HEADER = {"Retry-After": {"description": "Seconds to wait before trying again.",
                                      "schema": {"type": "integer", "minimum": 1}}}


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
    _add_error_schema(components)
    # Every service answers validation errors in the shared error format, not FastAPI's default shape.
    schemas = components["schemas"]
    for name in [n for n in schemas if n.endswith("HTTPValidationError")]:
        schemas[name] = {**schemas["ErrorResponse"], "title": name}
    for path, item in paths.items():
        route = resolve(path, routes)
        for method, op in item.items():
            if method in HTTP_METHODS and isinstance(op, dict):
                _add_error_responses(op, method, path, route, components)
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


def _add_error_schema(components: dict[str, Any]) -> None:
    """The one error body, `ErrorResponse` (and its `ErrorDetail`), and a named response per status."""
    schemas = components.setdefault("schemas", {})
    error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in error_schema.pop("$defs", {}).items():
        schemas.setdefault(name, definition)
    schemas.setdefault("ErrorResponse", error_schema)
    responses = components.setdefault("responses", {})
    for status, (name, description) in ERROR_RESPONSES.items():
        response: dict[str, Any] = {"description": description,
                                    "content": {"application/json": {"schema": {"$ref": ERROR_SCHEMA_REF}}}}
        if status in ("429", "503"):
            response["headers"] = RETRY_AFTER_HEADER
        responses.setdefault(name, response)


def error_statuses(method: str, path: str, route: Route | None, *, secured: bool) -> list[str]:
    """The error statuses an operation can answer, from what every route of the platform does."""
    statuses = {"400", "422"}  # strict query strings, invalid cursors, bad Idempotency-Keys; validation
    if secured:
        statuses |= {"401", "403"}
    if "{" in path:
        statuses.add("404")
    if method in ("post", "put", "patch"):
        statuses.add("413")
    keyed = method == "post" and (route is None or route.idempotency)
    if method in ("put", "patch", "delete") or keyed:
        statuses.add("409")  # a state that forbids the change; a POST's Idempotency-Key still in flight
    if keyed:
        statuses.add("503")  # the gateway's idempotency store is unreachable
    if route is not None:  # proxied to a service
        statuses |= {"502", "503", "504"}
    if path == "/api/auth/login":
        statuses |= {"401", "429"}
    return sorted(statuses)


def _is_error_shaped(components: dict[str, Any], schema: dict[str, Any]) -> bool:
    """A service's own copy of the error body (`{"error": {code, message, details}}` under another name)."""
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
        schema = components.get("schemas", {}).get(ref.rsplit("/", 1)[1], {})
    properties = schema.get("properties", {}) if isinstance(schema, dict) else {}
    return set(properties) == {"error"}


def _add_error_responses(
    op: dict[str, Any], method: str, path: str, route: Route | None, components: dict[str, Any]
) -> None:
    responses: dict[str, Any] = op.setdefault("responses", {})
    secured = bool(op.get("security")) if route is not None else _declares_bearer(op)
    for status in error_statuses(method, path, route, secured=secured):
        name, _ = ERROR_RESPONSES[status]
        existing = responses.get(status)
        if existing is None or _is_default_validation_error(existing):
            responses[status] = {"$ref": f"#/components/responses/{name}"}
        elif isinstance(existing, dict) and "$ref" not in existing and "content" not in existing:
            # Declared with a description only (e.g. `404: {}`): its body is the error body too.
            existing["content"] = {"application/json": {"schema": {"$ref": ERROR_SCHEMA_REF}}}
            existing.setdefault("description", ERROR_RESPONSES[status][1])
    # Any other error status an operation declares answers the error body as well, by its one name.
    for status, existing in responses.items():
        if not str(status).startswith(("4", "5")) or not isinstance(existing, dict) or "$ref" in existing:
            continue
        schema = existing.get("content", {}).get("application/json", {}).get("schema")
        if schema is None or (isinstance(schema, dict) and _is_error_shaped(components, schema)):
            existing["content"] = {"application/json": {"schema": {"$ref": ERROR_SCHEMA_REF}}}
    op["responses"] = dict(sorted(responses.items(), key=lambda kv: str(kv[0])))


def _declares_bearer(op: dict[str, Any]) -> bool:
    return any(BEARER_SCHEME in requirement for requirement in op.get("security", []) if isinstance(requirement, dict))


def _is_default_validation_error(response: Any) -> bool:
    """FastAPI's own 422 entry (or any entry whose body is a *HTTPValidationError): ours replaces it."""
    if not isinstance(response, dict):
        return False
    schema = response.get("content", {}).get("application/json", {}).get("schema", {})
    return isinstance(schema, dict) and str(schema.get("$ref", "")).endswith("HTTPValidationError")


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
    """Copy `source` components into `target`; returns {old $ref: new $ref} for renamed clashes.

    Two entries are the same only once the renames are applied: a `Page_PaymentOut_` that reads the
    same in two services but points at two different `PaymentOut`s is two entries (compared before
    the renames, the second service's copy overwrote the first's: /api/payments then promised the
    invoice service's items). So renames are found until none is added.
    """
    entries = [(kind, name, value) for kind, bucket in source.items()
               if kind != "securitySchemes" and isinstance(bucket, dict) for name, value in bucket.items()]
    renames: dict[str, str] = {}
    changed = True
    while changed:
        changed = False
        for kind, name, value in entries:
            old_ref = f"#/components/{kind}/{name}"
            bucket = target.get(kind, {})
            if old_ref in renames or name not in bucket or bucket[name] == _rewrite_refs(value, renames):
                continue
            new_name, n = f"{prefix}{name}", 2
            taken = set(renames.values())
            while (new_name in bucket and bucket[new_name] != _rewrite_refs(value, renames)) \
                    or f"#/components/{kind}/{new_name}" in taken:
                new_name, n = f"{prefix}{name}{n}", n + 1
            renames[old_ref] = f"#/components/{kind}/{new_name}"
            changed = True
    for kind, name, value in entries:
        new_name = renames.get(f"#/components/{kind}/{name}", f"#/components/{kind}/{name}").rsplit("/", 1)[1]
        target.setdefault(kind, {})[new_name] = _rewrite_refs(value, renames) if renames else value
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
