"""HTTP forwarding to the backend services over pooled httpx clients (one per upstream)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import structlog
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from kit.actor import CLIENT_HEADER, INTERNAL_TOKEN_HEADER, ROLE_HEADER, USER_HEADER
from kit.errors import AppError
from kit.logging import CORRELATION_HEADER, current_correlation_id

log = structlog.get_logger(__name__)

# RFC 9110 §7.6.1 connection-specific headers, never forwarded in either direction.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te", "trailer",
     "trailers", "transfer-encoding", "upgrade"}
)
# Headers of the caller the gateway replaces with its own (or must not pass on).
_REQUEST_DROP = HOP_BY_HOP | {
    "host", "content-length", "authorization", "accept-encoding", "forwarded", "x-forwarded-for",
    "x-forwarded-host", "x-forwarded-proto", "x-real-ip", CORRELATION_HEADER.lower(), INTERNAL_TOKEN_HEADER.lower(),
    # The trace context a service continues is the gateway's own (kit.tracing injects it), never a
    # caller's: with the gateway's tracing off, a forged traceparent would reach the services.
    "traceparent", "tracestate", "baggage",
}
_TRUSTED_PREFIX = "x-actor-"  # every X-Actor-* header is ours alone, known or future
# httpx hands us the decoded body, so length and encoding are ours to set; server/date come from
# the gateway's own server, the correlation id from the gateway's middleware.
_RESPONSE_DROP = HOP_BY_HOP | {"content-length", "content-encoding", "server", "date", CORRELATION_HEADER.lower()}

ANONYMOUS_ROLE = "anonymous"

# Told of every call to a service once its outcome is known: the answer, or the error it became.
# The public proxy and the admin pages both call through the pool, so the audit log listens here.
ExchangeObserver = Callable[[str, httpx.Request, "httpx.Response | None", "AppError | None"], Awaitable[None]]


class UpstreamUnavailable(AppError):
    status_code = 503
    code = "upstream_unavailable"


class UpstreamTimeout(AppError):
    status_code = 504
    code = "upstream_timeout"


class BadGateway(AppError):
    status_code = 502
    code = "bad_gateway"


@dataclass(frozen=True)
class ForwardedActor:
    """Who the upstream is told is calling. `anonymous` on public routes, so that an upstream
    endpoint guarded by kit.actor refuses it instead of treating a header-less call as `system`."""

    role: str
    user_id: str | None = None
    client_id: str | None = None

    def headers(self) -> dict[str, str]:
        out = {ROLE_HEADER: self.role}
        if self.user_id:
            out[USER_HEADER] = self.user_id
        if self.client_id:
            out[CLIENT_HEADER] = self.client_id
        return out


ANONYMOUS = ForwardedActor(role=ANONYMOUS_ROLE)


def _connection_tokens(values: Iterable[str]) -> set[str]:
    """Header names listed in `Connection` (hop-by-hop by declaration)."""
    tokens: set[str] = set()
    for value in values:
        tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


def forwardable_request_headers(request: Request) -> list[tuple[str, str]]:
    """The caller's headers minus hop-by-hop, credentials and anything the gateway asserts itself."""
    drop = _REQUEST_DROP | _connection_tokens(request.headers.getlist("connection"))
    kept = []
    for name, value in request.headers.items():
        # Some servers read "X_Actor_Role" as "X-Actor-Role": judge the dashed spelling.
        dashed = name.replace("_", "-")
        if name in drop or dashed in drop or dashed.startswith(_TRUSTED_PREFIX):
            continue
        kept.append((name, value))
    return kept


class UpstreamPool:
    def __init__(
        self,
        urls: dict[str, str],
        *,
        internal_token: str | None,
        connect_timeout: float = 5.0,
        timeout: float = 30.0,
        max_connections: int = 100,
        max_keepalive: int = 20,
        keepalive_expiry: float = 4.0,
    ) -> None:
        self.urls = {name: url.rstrip("/") for name, url in urls.items()}
        self._internal_token = internal_token
        limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_keepalive,
            keepalive_expiry=keepalive_expiry,
        )
        self._clients = {
            name: httpx.AsyncClient(
                base_url=url,
                # retries: connection attempts only (nothing was sent yet), safe for any method
                transport=httpx.AsyncHTTPTransport(limits=limits, retries=1),
                timeout=httpx.Timeout(timeout, connect=connect_timeout, pool=connect_timeout),
                follow_redirects=False,
                trust_env=False,
            )
            for name, url in self.urls.items()
        }
        self.observers: list[ExchangeObserver] = []

    def client(self, upstream: str) -> httpx.AsyncClient:
        try:
            return self._clients[upstream]
        except KeyError:
            raise UpstreamUnavailable(f"No address configured for the {upstream} service.") from None

    async def close(self) -> None:
        for client in self._clients.values():
            await client.aclose()

    def gateway_headers(self) -> dict[str, str]:
        """What every call from the gateway carries: the shared secret and the correlation id."""
        out: dict[str, str] = {}
        if self._internal_token:
            out[INTERNAL_TOKEN_HEADER] = self._internal_token
        correlation_id = current_correlation_id()
        if correlation_id:
            out[CORRELATION_HEADER] = correlation_id
        return out

    async def send(self, upstream: str, request: httpx.Request, *, stream: bool = False) -> httpx.Response:
        """Send with errors mapped to 503 (unreachable), 504 (too slow) or 502 (broken answer);
        the observers hear of the outcome before the caller does."""
        try:
            response = await self._send(upstream, request, stream=stream)
        except AppError as exc:
            await self._notify(upstream, request, None, exc)
            raise
        await self._notify(upstream, request, response, None)
        return response

    async def _notify(self, upstream: str, request: httpx.Request, response: httpx.Response | None,
                      error: AppError | None) -> None:
        for observer in self.observers:
            try:
                await observer(upstream, request, response, error)
            except Exception as exc:  # an observer never breaks the call it watches
                log.error("upstream_observer_failed", upstream=upstream, error=repr(exc))

    async def _send(self, upstream: str, request: httpx.Request, *, stream: bool) -> httpx.Response:
        client = self.client(upstream)
        try:
            return await client.send(request, stream=stream)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            log.warning("upstream_unreachable", upstream=upstream, error=repr(exc))
            raise UpstreamUnavailable(
                f"The {upstream} service is unavailable.", details={"service": upstream}
            ) from exc
        except httpx.TimeoutException as exc:
            log.warning("upstream_timeout", upstream=upstream, error=repr(exc))
            raise UpstreamTimeout(
                f"The {upstream} service did not answer in time.", details={"service": upstream}
            ) from exc
        except httpx.TransportError as exc:
            log.warning("upstream_broken_response", upstream=upstream, error=repr(exc))
            raise BadGateway(f"The {upstream} service gave no valid answer.", details={"service": upstream}) from exc

    async def forward(self, request: Request, upstream: str, body: bytes, actor: ForwardedActor, *,
                      read_timeout: float | None = None) -> Response:
        """Forward the request. A GET's answer is streamed through (a report export may be large);
        other answers are read whole (the idempotency middleware stores them)."""
        client = self.client(upstream)
        raw_path: bytes = request.scope.get("raw_path") or request.url.path.encode()
        query: bytes = request.scope.get("query_string") or b""
        base = client.base_url
        base_path = base.raw_path.rstrip(b"/")
        try:
            url = base.copy_with(raw_path=base_path + raw_path + (b"?" + query if query else b""))
        except httpx.InvalidURL as exc:
            raise AppError("The request path is not a valid URL.", code="invalid_path") from exc

        headers = forwardable_request_headers(request)
        headers += list(self.gateway_headers().items())
        headers += list(actor.headers().items())
        if request.client is not None:
            headers.append(("X-Forwarded-For", request.client.host))
        headers.append(("X-Forwarded-Proto", request.url.scheme))
        if "host" in request.headers:
            headers.append(("X-Forwarded-Host", request.headers["host"]))
        headers.append(("Accept-Encoding", "identity"))

        timeout = None
        if read_timeout is not None:
            timeout = httpx.Timeout(client.timeout.connect, read=read_timeout, write=client.timeout.write,
                                    pool=client.timeout.pool)
        upstream_request = client.build_request(request.method, url, headers=headers, content=body,
                                                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT)
        if request.method == "GET":
            return streamed_response(await self.send(upstream, upstream_request, stream=True))
        upstream_response = await self.send(upstream, upstream_request)
        return to_starlette_response(upstream_response, head=request.method == "HEAD")

    async def client_exists(self, client_id: str) -> bool:
        """Ask the invoice service, as the system, whether `client_id` exists."""
        client = self.client("invoice")
        request = client.build_request(
            "GET", f"/api/clients/{quote(client_id, safe='')}", headers=self.gateway_headers()
        )
        response = await self.send("invoice", request)
        if response.status_code in (404, 422):  # 422: not even a well-formed client id
            return False
        if response.is_success:
            return True
        log.warning("client_lookup_failed", status=response.status_code, body=response.text[:300])
        raise BadGateway(
            f"The invoice service answered {response.status_code} when looking up the client.",
            details={"service": "invoice"},
        )

    async def get_json(self, upstream: str, path: str, *, time_limit: float) -> Any:
        client = self.client(upstream)
        request = client.build_request("GET", path, headers=self.gateway_headers(), timeout=time_limit)
        response = await self.send(upstream, request)
        response.raise_for_status()
        return response.json()


def _response_headers(upstream: httpx.Response) -> list[tuple[bytes, bytes]]:
    drop = _RESPONSE_DROP | _connection_tokens(upstream.headers.get_list("connection"))
    return [
        (name.encode("latin-1"), value.encode("latin-1"))
        for name, value in upstream.headers.multi_items()
        if name.lower() not in drop
    ]


def streamed_response(upstream: httpx.Response) -> Response:
    """The upstream's answer passed through as it arrives (identity encoding was asked for, so the raw
    bytes are the body and its Content-Length still holds), closed when done or abandoned."""
    raw = _response_headers(upstream)
    if "content-length" in upstream.headers:
        raw.append((b"content-length", upstream.headers["content-length"].encode("latin-1")))

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        finally:  # also when the caller hangs up mid-way: give the pooled connection back
            await upstream.aclose()

    response = StreamingResponse(body(), status_code=upstream.status_code)
    response.raw_headers = raw
    return response


def to_starlette_response(upstream: httpx.Response, *, head: bool = False) -> Response:
    body = upstream.content
    response = Response(content=b"" if head else body, status_code=upstream.status_code)
    raw = _response_headers(upstream)
    status = upstream.status_code
    if head and "content-length" in upstream.headers:
        raw.append((b"content-length", upstream.headers["content-length"].encode("latin-1")))
    elif not (status < 200 or status in (204, 304)):
        raw.append((b"content-length", str(len(body)).encode()))
    response.raw_headers = raw
    return response
