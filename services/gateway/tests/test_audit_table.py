"""The audit dispatch table against the real route tables, and the pure parts of recording (no server)."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI

from kit.actor import ROLE_HEADER, USER_HEADER
from services.gateway import routes as route_table
from services.gateway.app import create_app
from services.gateway.audit import (
    AUDITED,
    MAX_SUMMARY_BYTES,
    NOT_AUDITED,
    REDACTED,
    TABLE,
    Audited,
    AuditLog,
    Record,
    outcome_of,
    summarize,
    summarize_content,
)
from services.gateway.proxy import BadGateway, UpstreamTimeout, UpstreamUnavailable
from services.gateway.routes import split_path
from services.gateway.tests.conftest import make_settings

MUTATING = {"POST", "PUT", "PATCH", "DELETE"}


def _operations(app: FastAPI) -> Iterator[tuple[str, str]]:
    """Every (method, path) the app serves, hidden routes included."""
    for route in app.routes:
        contexts = getattr(route, "effective_route_contexts", None)
        found = list(contexts() if callable(contexts) else contexts or []) if contexts is not None else [route]
        for item in found:
            path = getattr(item, "path_format", None) or getattr(item, "path", None)
            for method in getattr(item, "methods", None) or ():
                if isinstance(path, str):
                    yield method, path


def _service_app(name: str) -> FastAPI:
    module = importlib.import_module(f"services.{name}.app")
    app: FastAPI = module.create_app()
    return app


@pytest.fixture(scope="module")
def reachable() -> set[tuple[str, str]]:
    """Every change a caller can reach through the gateway: the services' routes the route table sends
    to them (as the gateway's proxy does) and the gateway's own API routes."""
    out: set[tuple[str, str]] = set()
    for upstream in sorted({r.upstream for r in route_table.ROUTES}):
        for method, path in _operations(_service_app(upstream)):
            route = route_table.resolve(path)
            if method in MUTATING and route is not None and route.upstream == upstream:
                out.add((method, path))
    gateway = create_app(make_settings("postgresql+asyncpg://nobody@127.0.0.1:1/none"))
    for method, path in _operations(gateway):
        if method in MUTATING and path.startswith("/api/") and "{full_path" not in path:
            out.add((method, path))
    return out


def test_every_reachable_change_is_audited_or_says_why_not(reachable: set[tuple[str, str]]) -> None:
    assert len(reachable) > 15  # the walk found the services' routes at all
    missing = sorted(op for op in reachable if op not in AUDITED and op not in NOT_AUDITED)
    assert not missing, f"add these to services/gateway/audit.py AUDITED or NOT_AUDITED (with a reason): {missing}"


def test_the_table_names_only_routes_that_exist(reachable: set[tuple[str, str]]) -> None:
    # Admin pages mostly change things through the APIs above (recorded as those); the few that write
    # the gateway's own tables (the invite page creates a login) are listed under their page route.
    gateway = create_app(make_settings("postgresql+asyncpg://nobody@127.0.0.1:1/none"))
    pages = {(method, path) for method, path in _operations(gateway) if path.startswith("/admin/")}
    stale = sorted(op for op in [*AUDITED, *NOT_AUDITED] if op not in reachable | pages)
    assert not stale, f"no such route any more: {stale}"
    assert not set(AUDITED) & set(NOT_AUDITED)
    assert all(reason.strip() for reason in NOT_AUDITED.values())


def test_the_actions_the_issue_names_are_audited() -> None:
    actions = {entry.action for entry in AUDITED.values()}
    for action in ("invoice.send", "payment.manual", "invoice.cancel", "template.update", "template.logo_upload",
                   "user.create", "plan.create", "plan.update", "plan.archive", "subscription.create",
                   "subscription.change", "subscription.cancel", "reminders.run", "client.create",
                   "invoice.create", "invoice.update"):
        assert action in actions
    assert AUDITED[("POST", "/api/invoices/{invoice_id}/mark-paid")].money


def test_matching_takes_literal_segments_first_and_names_the_targets() -> None:
    overdue = TABLE.match("POST", split_path("/api/invoices/mark-overdue"))
    assert overdue is not None and overdue.entry.action == "invoice.overdue_scan" and overdue.targets == {}
    sent = TABLE.match("POST", split_path("/api/invoices/3f1c/send"))
    assert sent is not None and sent.entry.action == "invoice.send" and sent.targets == {"invoice_id": "3f1c"}
    assert TABLE.match("GET", split_path("/api/invoices/3f1c")) is None
    assert TABLE.match("POST", split_path("/api/invoices/3f1c/send/extra")) is None
    assert TABLE.match("POST", split_path("/api/invoices/preview")) is None  # not audited


def test_outcomes() -> None:
    money, other = Audited("payment.manual", money=True), Audited("invoice.send")
    assert outcome_of(other, 200, None) == "succeeded"
    assert outcome_of(money, 201, None) == "succeeded"
    assert outcome_of(money, 409, None) == "refused"
    assert outcome_of(other, 409, None) is None  # a refused non-money change is not kept
    assert outcome_of(other, 500, None) == "unknown"
    assert outcome_of(money, None, UpstreamTimeout("slow")) == "unknown"
    assert outcome_of(money, None, BadGateway("broken")) == "unknown"
    assert outcome_of(money, None, UpstreamUnavailable("down")) is None  # never reached the service


def test_summary_removes_secrets_and_stays_bounded() -> None:
    body: dict[str, Any] = {"email": "a@b.example", "password": "hunter22", "nested": {"apiKey": "k", "cardCvc": "1"},
                            "items": list(range(100)), "note": "x" * 5000, "nul": "a\x00b"}
    out = summarize(body)
    assert out is not None
    summary = out["body"]
    assert summary["password"] == REDACTED and summary["nested"] == {"apiKey": REDACTED, "cardCvc": REDACTED}
    assert "hunter22" not in orjson.dumps(out).decode()
    assert len(summary["items"]) == 26 and summary["items"][-1] == "… 75 more"
    assert len(summary["note"]) == 200 and summary["nul"] == "ab"
    huge = summarize({f"k{i}": "v" * 199 for i in range(24)})
    assert huge is not None and huge["truncated"] is True and len(huge["keys"]) == 24
    assert len(orjson.dumps(huge)) <= MAX_SUMMARY_BYTES
    deep = summarize({"a": {"b": {"c": {"d": {"e": 1}}}}})
    assert deep == {"body": {"a": {"b": {"c": {"d": "{…}"}}}}}


def test_summary_of_a_file_is_its_type_and_size() -> None:
    assert summarize_content(b"\x89PNG....", "multipart/form-data; boundary=x") == {
        "contentType": "multipart/form-data; boundary=x", "bytes": 8}
    assert summarize_content(b"", "application/json") is None
    assert summarize_content(b"{not json", "application/json") == {"contentType": "application/json", "bytes": 9}


class _Recorder(AuditLog):
    def __init__(self) -> None:
        super().__init__(db=None, upstream_urls={"invoice": "http://svc/prefix"})  # type: ignore[arg-type]
        self.records: list[Record] = []

    async def write(self, record: Record) -> bool:
        self.records.append(record)
        return True


def _request(method: str, url: str, *, role: str = "admin", body: Any = None, **headers: str) -> httpx.Request:
    return httpx.Request(method, url, json=body, headers={ROLE_HEADER: role, USER_HEADER: "u-1", **headers})


async def test_observe_records_admin_changes_only() -> None:
    audit = _Recorder()
    ok = httpx.Response(200, json={"id": "new"})
    await audit.observe("invoice", _request("GET", "http://svc/prefix/api/invoices/i1"), ok, None)
    await audit.observe("invoice", _request("POST", "http://svc/prefix/api/invoices/i1/send", role="client"), ok, None)
    await audit.observe("invoice", _request("POST", "http://svc/prefix/api/invoices/preview", body={}), ok, None)
    assert audit.records == []
    await audit.observe("invoice", _request("POST", "http://svc/prefix/api/invoices/i%2F1/send?x=1",
                                            **{"X-Correlation-Id": "corr-1", "Idempotency-Key": "k-1"}), ok, None)
    await audit.observe("invoice", _request("POST", "http://svc/prefix/api/invoices", body={"clientId": "c"}),
                        httpx.Response(201, json={"id": "inv-9"}), None)
    sent, created = audit.records
    assert (sent.action, sent.outcome, sent.status, sent.targets) == ("invoice.send", "succeeded", 200,
                                                                      {"invoice_id": "i/1"})
    assert (sent.correlation_id, sent.idempotency_key, sent.upstream) == ("corr-1", "k-1", "invoice")
    assert created.targets == {"invoice_id": "inv-9"} and created.summary == {"body": {"clientId": "c"}}


async def test_observe_records_an_unknown_outcome_without_an_answer() -> None:
    audit = _Recorder()
    request = _request("POST", "http://pay/api/invoices/i1/mark-paid", body={"amount": 100})
    await audit.observe("payments", request, None, UpstreamTimeout("slow"))
    await audit.observe("payments", request, None, UpstreamUnavailable("down"))
    [record] = audit.records
    assert (record.action, record.outcome, record.status) == ("payment.manual", "unknown", None)


async def test_a_failed_write_is_logged_not_raised() -> None:
    from kit.db import Database

    db = Database("postgresql+asyncpg://nobody:x@127.0.0.1:1/none")
    try:
        audit = AuditLog(db, write_timeout=5)
        record = Record(actor_user_id="u", actor_role="admin", action="invoice.send", outcome="succeeded",
                        method="POST", path="/api/invoices/i/send", upstream="invoice", status=200, targets={},
                        summary=None, correlation_id=None, idempotency_key=None)
        assert await audit.write(record) is False
    finally:
        await db.dispose()
