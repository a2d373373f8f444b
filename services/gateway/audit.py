"""The audit log: every admin action that changes money or documents, recorded append-only.

The gateway sees every admin call with its actor, so it records them: the upstream pool tells
`AuditLog.observe` of each call to a service once its outcome is known, whichever way it came (the
public API's proxy or the admin pages), and the gateway's own changes (`POST /api/users`) are
recorded by their handler in the request's own transaction.

"The dispatch table is the list": `AUDITED` maps (method, route pattern) to an action name, and
`NOT_AUDITED` names every other change an admin can reach, with the reason; a test walks the
services' routes behind the route table (services/gateway/routes.py) and fails on one in neither.

What is kept: outcomes that happened (2xx), refusals (4xx) of actions on money, and "unknown" when
no answer tells (a 5xx, a timeout, a broken answer: the idempotency layer's unknown state); a call
that never reached the service (unreachable) is not an action. Writing the row never breaks the
request: its own short transaction, bounded in time, and a failure is logged as an error.
"""

from __future__ import annotations

import asyncio
import enum
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import httpx
import orjson
import structlog
from pydantic import Field
from starlette.requests import Request

from kit.actor import ROLE_HEADER, USER_HEADER
from kit.db import Database, UnitOfWork
from kit.errors import AppError
from kit.logging import CORRELATION_HEADER, current_correlation_id
from kit.pagination import Page, PageRequest
from services.gateway.models import (
    OUTCOME_REFUSED,
    OUTCOME_SUCCEEDED,
    OUTCOME_UNKNOWN,
    ROLE_ADMIN,
    AuditEntry,
)
from services.gateway.proxy import BadGateway, UpstreamTimeout
from services.gateway.repository import AuditFilter, AuditRepository
from services.gateway.routes import split_path
from services.gateway.schemas import CamelModel

log = structlog.get_logger(__name__)

GATEWAY_UPSTREAM = "gateway"  # the `upstream` of the gateway's own actions
IDEMPOTENCY_HEADER = "idempotency-key"


@dataclass(frozen=True)
class Audited:
    action: str
    # An action on money: its refusals (4xx) are kept too, with the status (who tried to pay what).
    money: bool = False
    # A create: the new resource's `id` (from the 2xx answer) is recorded as this target.
    creates: str | None = None


# (method, route pattern as the service declares it) -> what is recorded.
AUDITED: dict[tuple[str, str], Audited] = {
    # invoices (invoice service)
    ("POST", "/api/invoices"): Audited("invoice.create", creates="invoice_id"),
    ("PUT", "/api/invoices/{invoice_id}"): Audited("invoice.update"),
    ("POST", "/api/invoices/{invoice_id}/send"): Audited("invoice.send"),
    ("POST", "/api/invoices/{invoice_id}/cancel"): Audited("invoice.cancel", money=True),
    ("POST", "/api/invoices/mark-overdue"): Audited("invoice.overdue_scan"),
    # payments
    ("POST", "/api/invoices/{invoice_id}/mark-paid"): Audited("payment.manual", money=True, creates="payment_id"),
    # clients and the template (invoice service)
    ("POST", "/api/clients"): Audited("client.create", creates="client_id"),
    ("PUT", "/api/invoice-template"): Audited("template.update"),
    ("POST", "/api/invoice-template/logo"): Audited("template.logo_upload"),
    # plans and subscriptions
    ("POST", "/api/plans"): Audited("plan.create", creates="plan_id"),
    ("PUT", "/api/plans/{plan_id}"): Audited("plan.update"),
    ("POST", "/api/plans/{plan_id}/archive"): Audited("plan.archive"),
    ("POST", "/api/subscriptions"): Audited("subscription.create", money=True, creates="subscription_id"),
    ("POST", "/api/subscriptions/{subscription_id}/change"): Audited("subscription.change", money=True),
    ("POST", "/api/subscriptions/{subscription_id}/cancel"): Audited("subscription.cancel", money=True),
    ("POST", "/api/subscriptions/{subscription_id}/resume"): Audited("subscription.resume", money=True),
    # Moves the test clock: renewals, invoices and card payments follow (test mode only).
    ("POST", "/api/test-clock/advance"): Audited("test_clock.advance", money=True),
    # reminders and emails (notifications)
    ("POST", "/api/reminders/run"): Audited("reminders.run"),
    ("POST", "/api/notifications/{notification_id}/retry"): Audited("notification.retry"),
    ("POST", "/api/notifications/invitations"): Audited("client.invite", creates="notification_id"),
    # the gateway's own
    ("POST", "/api/users"): Audited("user.create", creates="user_id"),
    # the admin page's "Invite to portal" creates the client's login itself (not through /api/users)
    ("POST", "/admin/clients/{client_id}/invite"): Audited("user.create", creates="user_id"),
}

# Every other change an admin can reach, and why it is not an audited action.
NOT_AUDITED: dict[tuple[str, str], str] = {
    ("POST", "/api/auth/login"): "a login changes no money or document (failures are counted by the throttle)",
    ("POST", "/api/invoices/preview"): "computes a draft's totals; stores nothing",
    ("POST", "/api/invoice-template/preview"): "renders a sample PDF; stores nothing",
    ("POST", "/api/invoices/{invoice_id}/checkout"): "opens a Stripe Checkout for the client to pay; the "
    "payment itself arrives by Stripe's webhook",
    ("POST", "/api/subscriptions/checkout"): "opens a Stripe Checkout; the subscription arrives by webhook",
    ("POST", "/api/billing-portal"): "a link to Stripe's billing portal; changes nothing by itself",
    ("POST", "/webhooks/stripe"): "Stripe, not an admin (public, signed; payments stores every event)",
}

ACTIONS: tuple[str, ...] = tuple(sorted({entry.action for entry in AUDITED.values()}))
# The filter's accepted values, listed in the OpenAPI document.
AuditAction = enum.StrEnum("AuditAction", {name.replace(".", "_"): name for name in ACTIONS})  # type: ignore[misc]


def _is_param(segment: str) -> bool:
    return segment.startswith("{") and segment.endswith("}")


@dataclass(frozen=True)
class Matched:
    entry: Audited
    pattern: str
    targets: dict[str, str]


class DispatchTable:
    """(method, path) -> the audited action, its pattern and the path's parameters. Literal segments
    win over parameters (`/api/invoices/mark-overdue` is not the invoice `mark-overdue`)."""

    def __init__(self, table: dict[tuple[str, str], Audited]) -> None:
        rows = [(method, split_path(pattern), pattern, entry) for (method, pattern), entry in table.items()]
        rows.sort(key=lambda r: sum(1 for s in r[1] if not _is_param(s)), reverse=True)
        self._rows = rows

    def match(self, method: str, segments: tuple[str, ...]) -> Matched | None:
        for row_method, pattern_segments, pattern, entry in self._rows:
            if row_method != method or len(pattern_segments) != len(segments):
                continue
            targets: dict[str, str] = {}
            for expected, actual in zip(pattern_segments, segments, strict=True):
                if _is_param(expected):
                    targets[expected[1:-1]] = clean_text(actual, 200)
                elif expected != actual:
                    break
            else:
                return Matched(entry, pattern, targets)
        return None


TABLE = DispatchTable(AUDITED)


def outcome_of(entry: Audited, status: int | None, error: AppError | None) -> str | None:
    """What to record for this answer, or None when there is nothing to keep."""
    if error is not None:
        # No answer, or a broken one, after the request went out: it may have happened. A service
        # that could not be reached (503 upstream_unavailable) never got it: nothing happened.
        return OUTCOME_UNKNOWN if isinstance(error, UpstreamTimeout | BadGateway) else None
    if status is None:
        return None
    if 200 <= status < 300:
        return OUTCOME_SUCCEEDED
    if status >= 500:
        return OUTCOME_UNKNOWN
    if 400 <= status < 500 and entry.money:
        return OUTCOME_REFUSED
    return None


# --- the bounded, redacted summary of a request body -----------------------------------------------

MAX_DEPTH = 4
MAX_ITEMS = 25
MAX_STRING = 200
MAX_KEY = 64
MAX_SUMMARY_BYTES = 4096
REDACTED = "[redacted]"
_SECRET_WORDS = ("password", "passwd", "secret", "token", "apikey", "authorization", "cvc", "cvv", "cardnumber")


def clean_text(value: str, limit: int) -> str:
    """Text PostgreSQL can store (no NUL, valid UTF-8), cut to `limit` characters."""
    cleaned = value.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"


def is_secret(key: str) -> bool:
    normalized = re.sub(r"[^a-z]", "", key.lower())
    return any(word in normalized for word in _SECRET_WORDS)


def _bounded(value: Any, depth: int) -> Any:
    if isinstance(value, dict):
        if depth >= MAX_DEPTH:
            return "{…}"
        out: dict[str, Any] = {}
        for i, (key, item) in enumerate(value.items()):
            if i == MAX_ITEMS:
                out["…"] = f"{len(value) - MAX_ITEMS} more"
                break
            name = clean_text(str(key), MAX_KEY)
            out[name] = REDACTED if is_secret(name) else _bounded(item, depth + 1)
        return out
    if isinstance(value, list):
        if depth >= MAX_DEPTH:
            return "[…]"
        items = [_bounded(item, depth + 1) for item in value[:MAX_ITEMS]]
        if len(value) > MAX_ITEMS:
            items.append(f"… {len(value) - MAX_ITEMS} more")
        return items
    if isinstance(value, str):
        return clean_text(value, MAX_STRING)
    if isinstance(value, bool | int | float) or value is None:
        return value
    return clean_text(str(value), MAX_STRING)


def summarize(body: Any) -> dict[str, Any] | None:
    """A JSON body's shape and values, secrets replaced, every part bounded (at most 4 KB in all)."""
    summary = {"body": _bounded(body, 0)}
    if len(orjson.dumps(summary)) <= MAX_SUMMARY_BYTES:
        return summary
    keys = [clean_text(str(k), MAX_KEY) for k in body][:MAX_ITEMS] if isinstance(body, dict) else []
    return {"truncated": True, "keys": keys}


def summarize_content(content: bytes, content_type: str | None) -> dict[str, Any] | None:
    if not content:
        return None
    if content_type is None or "json" in content_type:
        try:
            return summarize(orjson.loads(content))
        except orjson.JSONDecodeError:
            pass
    # A file (the logo) or something unreadable: what it was, not what it said.
    return {"contentType": clean_text(content_type or "", 100) or None, "bytes": len(content)}


def _created_id(response: httpx.Response) -> str | None:
    if "json" not in response.headers.get("content-type", "") or len(response.content) > 1024 * 1024:
        return None
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return None
    value = body.get("id") if isinstance(body, dict) else None
    return clean_text(str(value), 200) if isinstance(value, str | int) and not isinstance(value, bool) else None


# --- recording ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    actor_user_id: str
    actor_role: str
    action: str
    outcome: str
    method: str
    path: str
    upstream: str
    status: int | None
    targets: dict[str, str]
    summary: dict[str, Any] | None
    correlation_id: str | None
    idempotency_key: str | None


class AuditLog:
    def __init__(self, db: Database, *, upstream_urls: dict[str, str] | None = None,
                 write_timeout: float = 2.0) -> None:
        self._db = db
        self._write_timeout = write_timeout
        # A service served under a path (http://host/invoice) is called at that prefix + the public path.
        self._base_paths = {name: urlsplit(url).path.rstrip("/") for name, url in (upstream_urls or {}).items()}

    async def observe(self, upstream: str, request: httpx.Request, response: httpx.Response | None,
                      error: AppError | None) -> None:
        """Called by the upstream pool for every call to a service; records the admin's actions."""
        if request.method in ("GET", "HEAD", "OPTIONS") or request.headers.get(ROLE_HEADER) != ROLE_ADMIN:
            return
        user_id = request.headers.get(USER_HEADER)
        if not user_id:
            return
        # Split before decoding: an id holding an encoded "/" stays one segment.
        raw = request.url.raw_path.decode("ascii", "replace").split("?", 1)[0]
        base = self._base_paths.get(upstream, "")
        if base and raw.startswith(base + "/"):
            raw = raw[len(base):]
        segments = tuple(unquote(s, errors="replace") for s in raw.split("/") if s)
        matched = TABLE.match(request.method, segments)
        if matched is None:
            return
        status = response.status_code if response is not None else None
        outcome = outcome_of(matched.entry, status, error)
        if outcome is None:
            return
        targets = dict(matched.targets)
        if matched.entry.creates and response is not None and response.is_success:
            created = _created_id(response)
            if created:
                targets[matched.entry.creates] = created
        try:
            content = request.content
        except httpx.RequestNotRead:
            content = b""
        await self.write(Record(
            actor_user_id=clean_text(user_id, 64), actor_role=ROLE_ADMIN, action=matched.entry.action,
            outcome=outcome, method=request.method, path=clean_text("/" + "/".join(segments), 2048),
            upstream=upstream, status=status, targets=targets,
            summary=summarize_content(content, request.headers.get("content-type")),
            correlation_id=_header(request.headers.get(CORRELATION_HEADER) or current_correlation_id(), 128),
            idempotency_key=_header(request.headers.get(IDEMPOTENCY_HEADER), 255),
        ))

    async def write(self, record: Record) -> bool:
        """Append in a short transaction of its own; False (and an error in the log) when it failed."""
        try:
            await asyncio.wait_for(self._append(record), timeout=self._write_timeout)
            return True
        except Exception as exc:  # the action itself already happened: the caller still gets its answer
            log.error("audit_write_failed", action=record.action, path=record.path, outcome=record.outcome,
                      status=record.status, actor=record.actor_user_id, correlation_id=record.correlation_id,
                      error=repr(exc))
            return False

    async def _append(self, record: Record) -> None:
        async with self._db.transaction() as uow:
            await append(uow, record)

    async def record_own(self, uow: UnitOfWork, request: Request, *, user_id: str, status: int,
                         body: Any, created: str | None = None) -> None:
        """A gateway action, in the request's unit of work: the change and its entry commit together."""
        segments = split_path(request.url.path)
        matched = TABLE.match(request.method, segments)
        if matched is None:
            raise LookupError(f"{request.method} {request.url.path} is not in the audit table")
        targets = dict(matched.targets)
        if matched.entry.creates and created:
            targets[matched.entry.creates] = created
        await append(uow, Record(
            actor_user_id=user_id, actor_role=ROLE_ADMIN, action=matched.entry.action, outcome=OUTCOME_SUCCEEDED,
            method=request.method, path=clean_text(request.url.path, 2048), upstream=GATEWAY_UPSTREAM,
            status=status, targets=targets, summary=summarize(body),
            correlation_id=_header(current_correlation_id(), 128),
            idempotency_key=_header(request.headers.get(IDEMPOTENCY_HEADER), 255),
        ))


def _header(value: str | None, limit: int) -> str | None:
    return clean_text(value, limit) if value else None


async def append(uow: UnitOfWork, record: Record) -> None:
    await AuditRepository(uow.session).append(
        actor_user_id=record.actor_user_id, actor_role=record.actor_role, action=record.action,
        outcome=record.outcome, method=record.method, path=record.path, upstream=record.upstream,
        status=record.status, targets=record.targets, summary=record.summary,
        correlation_id=record.correlation_id, idempotency_key=record.idempotency_key,
    )


# --- reading -----------------------------------------------------------------------------------------


class AuditActor(CamelModel):
    user_id: str
    email: str | None = Field(description="The login's email when the action was recorded.")
    role: str


class AuditEntryOut(CamelModel):
    id: int
    occurred_at: datetime
    actor: AuditActor
    action: str
    outcome: Literal["succeeded", "refused", "unknown"] = Field(
        description="`succeeded`: the service answered 2xx; `refused`: 4xx (kept for actions on money); "
        "`unknown`: a 5xx, a timeout or a broken answer, so it may or may not have happened.")
    method: str
    path: str
    upstream: str = Field(description="The service that did it; `gateway` for the gateway's own actions.")
    status: int | None = Field(description="The service's answer; null when none came.")
    targets: dict[str, str] = Field(description="The ids the action was about: the path's, and a created one.")
    summary: dict[str, Any] | None = Field(description="The request body, bounded, secrets and passwords "
                                           "removed (a file: its type and size).")
    correlation_id: str | None
    idempotency_key: str | None


def entry_out(row: AuditEntry) -> AuditEntryOut:
    return AuditEntryOut(
        id=row.id, occurred_at=row.occurred_at,
        actor=AuditActor(user_id=row.actor_user_id, email=row.actor_email, role=row.actor_role),
        action=row.action, outcome=row.outcome,  # type: ignore[arg-type]  # the table's CHECK holds it
        method=row.method, path=row.path, upstream=row.upstream, status=row.status, targets=row.targets,
        summary=row.summary, correlation_id=row.correlation_id, idempotency_key=row.idempotency_key,
    )


async def list_entries(uow: UnitOfWork, filters: AuditFilter, page: PageRequest) -> Page[AuditEntryOut]:
    result = await AuditRepository(uow.session).list_page(filters, page)
    return Page[AuditEntryOut](items=[entry_out(r) for r in result.items], next_cursor=result.next_cursor,
                               has_more=result.has_more)
