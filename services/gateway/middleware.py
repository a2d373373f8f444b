"""ASGI middleware in front of every gateway route: body size cap, path sanity, Idempotency-Key.

It buffers the request body (kit.web's limit: more than `max_body_bytes` is a 413), then, for a POST that
carries an `Idempotency-Key`, claims the key before the request runs and stores the response after
(a 5xx or no answer keeps the key with an unknown outcome: the retry is forwarded again with the same
key, and the service — which records the key in the same transaction as its effect — replays what it
did or does it now; so no timeout doubles an effect). A repeat gets the stored response with
`Idempotent-Replayed: true`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kit.errors import AppError, PayloadTooLarge, ServiceUnavailable, error_body
from kit.web import check_declared_length, receive_body, send_error, send_json
from services.gateway.routes import resolve
from services.gateway.security import TokenCodec, bearer_token
from services.gateway.service import IdempotencyService, KeyClaim, StoredResponse

log = structlog.get_logger(__name__)

IDEMPOTENCY_HEADER = "idempotency-key"
REPLAYED_HEADER = "Idempotent-Replayed"
ANONYMOUS_OWNER = "anon"
# The response headers kept with a stored response and replayed with it.
STORED_HEADERS = ("content-type", "content-disposition", "location")


class GatewayMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        idempotency: IdempotencyService,
        tokens: TokenCodec,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        # An oversized body is read and dropped up to this much before the 413, so the client (still
        # sending) sees the answer rather than a reset connection; beyond it we just close.
        self.drain_limit = max(4 * max_body_bytes, 16 * 1024 * 1024)
        self.idempotency = idempotency
        self.tokens = tokens
        self._detached: set[asyncio.Task[Any]] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)

        if any(seg in (".", "..") for seg in scope["path"].split("/")):
            await send_error(send, AppError("Dot segments are not allowed in the path.", code="invalid_path"))
            return
        if resolve(scope["path"]) is not None:
            # A request for a service is sent on with its headers, which must be ASCII (the proxy's
            # HTTP client cannot encode anything else: a 500, found by Schemathesis).
            bad = next((name for name, value in scope["headers"] if not value.isascii()), None)
            if bad is not None:
                name = bad.decode("latin-1")
                await send_error(send, AppError(f"Header {name!r} must be ASCII.", code="invalid_header",
                                                details=[{"field": name, "message": "non-ASCII characters"}]))
                return

        declared = headers.get("content-length")
        try:
            check_declared_length(declared, self.max_body_bytes)
        except PayloadTooLarge as exc:
            if declared is not None and int(declared) <= self.drain_limit:
                await self._discard_body(receive)
            await self._too_large(send, exc)
            return
        except AppError as exc:  # not a number
            await send_error(send, exc)
            return
        more_body = True

        async def tracking_receive() -> Message:
            nonlocal more_body
            message = await receive()
            more_body = message["type"] == "http.request" and bool(message.get("more_body", False))
            return message

        try:
            body = await receive_body(tracking_receive, limit=self.max_body_bytes)
        except PayloadTooLarge as exc:
            if more_body:
                await self._discard_body(receive)
            await self._too_large(send, exc)
            return
        except AppError:  # the client went away mid-body: nobody to answer
            return
        replay_receive = _replaying_receive(body, receive)

        key = headers.get(IDEMPOTENCY_HEADER)
        if scope["method"] != "POST" or key is None:
            await self.app(scope, replay_receive, send)
            return
        route = resolve(scope["path"])
        if route is not None and not route.idempotency:
            await self.app(scope, replay_receive, send)
            return
        owner = self._owner(headers)
        if owner is None:  # a bad token: the route answers 401 (or ignores it); nothing to remember
            await self.app(scope, replay_receive, send)
            return

        raw_path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        query = scope.get("query_string", b"").decode("latin-1")
        path = f"{raw_path}?{query}" if query else raw_path
        try:
            outcome = await self.idempotency.begin(owner=owner, key=key, method="POST", path=path, body=body)
        except AppError as exc:
            await send_error(send, exc)
            return
        except Exception as exc:  # the gateway's database is unreachable: refuse rather than run unguarded
            log.error("idempotency_store_unavailable", error=str(exc))
            await send_error(send, ServiceUnavailable("Idempotency keys cannot be checked right now; retry later."))
            return
        if isinstance(outcome, StoredResponse):
            await _replay(outcome, scope, receive, send)
            return
        await self._run_once(outcome, scope, replay_receive, receive, send)

    async def _run_once(
        self, claim: KeyClaim, scope: Scope, app_receive: Receive, receive: Receive, send: Send
    ) -> None:
        # The request runs in its own task: should this one be cancelled (the caller hung up), the
        # request still finishes and its response is stored, so a retry gets it instead of a rerun.
        task = asyncio.create_task(self._execute(claim, scope, app_receive))
        try:
            start, body = await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                self._detached.add(task)
                task.add_done_callback(self._forget)
            raise
        if start is None:
            await _error(send, 500, "internal_error", "An unexpected error occurred.")
            return
        await send(start)
        await send({"type": "http.response.body", "body": body, "more_body": False})

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._detached.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("idempotent_request_failed_after_disconnect", error=str(task.exception()))

    async def _execute(self, claim: KeyClaim, scope: Scope, app_receive: Receive) -> tuple[Message | None, bytes]:
        """Run the request, then store its response (or keep the key as "unknown" for a 5xx or a crash)."""
        start: Message | None = None
        chunks: list[bytes] = []

        async def capture(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        try:
            await self.app(scope, app_receive, capture)
        except BaseException:
            await self._unknown_quietly(claim)
            raise
        body = b"".join(chunks)
        if start is None or start["status"] >= 500:
            await self._unknown_quietly(claim)
            return start, body
        resp_headers = Headers(raw=start.get("headers", []))
        stored = {name: resp_headers[name] for name in STORED_HEADERS if name in resp_headers}
        try:
            await self.idempotency.complete(claim, StoredResponse(status=start["status"], headers=stored, body=body))
        except Exception as exc:  # the answer still goes out; a retry after the lock timeout reruns
            log.error("idempotency_store_failed", key=claim.key, error=str(exc))
        return start, body

    async def _unknown_quietly(self, claim: KeyClaim) -> None:
        try:
            await self.idempotency.mark_unknown(claim)
        except Exception as exc:  # the claim stays in progress and is taken over once stale
            log.error("idempotency_mark_unknown_failed", key=claim.key, error=str(exc))

    def _owner(self, headers: Headers) -> str | None:
        authorization = headers.get("authorization")
        if authorization is None:
            return ANONYMOUS_OWNER
        token = bearer_token(authorization)
        if token is None:
            return None
        try:
            return self.tokens.decode(token).user_id
        except AppError:
            return None

    async def _discard_body(self, receive: Receive) -> None:
        drained = 0
        while drained <= self.drain_limit:
            message = await receive()
            if message["type"] != "http.request":
                return
            drained += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    async def _too_large(self, send: Send, exc: PayloadTooLarge) -> None:
        # An oversized body is not read to its end (past the drain limit): the connection cannot be reused.
        await send_error(send, exc, headers={"Connection": "close"})


def _replaying_receive(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the disconnect, as a server would

    return replay


async def _replay(stored: StoredResponse, scope: Scope, receive: Receive, send: Send) -> None:
    headers = dict(stored.headers)
    headers[REPLAYED_HEADER] = "true"
    response = Response(content=stored.body, status_code=stored.status, headers=headers)
    await response(scope, receive, send)


async def _error(send: Send, status: int, code: str, message: str) -> None:
    await send_json(send, status, error_body(code, message))
