"""The admin pages call the services as the signed-in admin, through the gateway's upstream pool.

Same path → service table as the public proxy (services.gateway.routes), same pooled clients, the
admin forwarded in the trusted actor headers. Answers are parsed at this edge into the typed models
of services.gateway.admin.models; an error answer becomes `ApiError` with the service's code,
message and details (for the field-level messages of a form).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from kit.errors import AppError
from services.gateway import routes as route_table
from services.gateway.proxy import ForwardedActor, UpstreamPool

M = TypeVar("M", bound=BaseModel)
Params = Mapping[str, str | int | Sequence[str]] | None


class ApiError(Exception):
    """A service said no (4xx), is down (503), too slow (504) or broke its answer (502)."""

    def __init__(self, status: int, code: str, message: str, details: Any = None, service: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.service = service

    @property
    def unavailable(self) -> bool:
        """The service is not there (down, not deployed yet, or does not serve this path)."""
        return self.status in (502, 503, 504)

    def field_errors(self) -> dict[str, str]:
        """`details` of a validation error as field -> message (field paths as the service names them)."""
        out: dict[str, str] = {}
        if isinstance(self.details, list):
            for item in self.details:
                if isinstance(item, dict) and isinstance(item.get("field"), str):
                    out.setdefault(item["field"], str(item.get("message", "invalid")))
        return out


class Unavailable:
    """What a page shows in place of something a service could not give (down, not deployed, refused)."""

    def __init__(self, message: str) -> None:
        self.message = message


def _error_from(response: httpx.Response, service: str) -> ApiError:
    code, message, details = "", f"The {service} service answered {response.status_code}.", None
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        code = str(err.get("code") or "")
        message = str(err.get("message") or message)
        details = err.get("details")
    return ApiError(response.status_code, code, message, details, service)


class Api:
    def __init__(self, pool: UpstreamPool, actor: ForwardedActor) -> None:
        self._pool = pool
        self._actor = actor

    def _upstream(self, path: str) -> str:
        route = route_table.resolve(path)
        if route is None:
            raise ApiError(404, "not_found_route", f"No service serves {path}.")
        return route.upstream

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Params = None,
        json: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """The raw answer (2xx only); anything else raises ApiError."""
        upstream = self._upstream(path)
        try:
            client = self._pool.client(upstream)
            out_headers = {**self._pool.gateway_headers(), **self._actor.headers(), "Accept-Encoding": "identity",
                           **(headers or {})}
            query = {k: v for k, v in (params or {}).items() if v not in (None, "", [])}
            request = client.build_request(method, path, params=query or None, json=json, content=content,
                                           headers=out_headers)
            response = await self._pool.send(upstream, request)
        except AppError as exc:  # unreachable, timed out, broken answer
            raise ApiError(exc.status_code, exc.code, exc.message, exc.details, upstream) from exc
        if not response.is_success:
            raise _error_from(response, upstream)
        return response

    async def get(self, model: type[M], path: str, params: Params = None) -> M:
        return self._parse(model, await self.request("GET", path, params=params), path)

    async def post(self, model: type[M], path: str, json: Any = None, *, headers: Mapping[str, str] | None = None
                   ) -> M:
        return self._parse(model, await self.request("POST", path, json=json, headers=headers), path)

    async def put(self, model: type[M], path: str, json: Any = None) -> M:
        return self._parse(model, await self.request("PUT", path, json=json), path)

    @staticmethod
    def _parse(model: type[M], response: httpx.Response, path: str) -> M:
        try:
            return model.model_validate_json(response.content)
        except ValidationError as exc:
            raise ApiError(502, "bad_gateway", f"The answer of {path} was not understood.",
                           exc.errors(include_url=False)) from exc
