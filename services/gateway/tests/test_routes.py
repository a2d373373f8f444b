"""The route table alone: longest prefix wins, whole segments only, placeholders match one segment."""

from __future__ import annotations

import pytest

from services.gateway.routes import ROUTES, Auth, Route, resolve


@pytest.mark.parametrize(
    ("path", "upstream"),
    [
        ("/api/invoices", "invoice"),
        ("/api/invoices/", "invoice"),
        ("/api/invoices/abc", "invoice"),
        ("/api/invoices/abc/pdf", "invoice"),
        ("/api/invoices/abc/send", "invoice"),
        ("/api/invoices/abc/checkout", "payments"),
        ("/api/invoices/abc/payments", "invoice"),  # the invoice's own ledger
        ("/api/invoices/abc/mark-paid", "payments"),
        ("/api/invoices/abc/payments/extra", "invoice"),
        ("/api/payments", "payments"),
        ("/api/payments/p1/refund", "payments"),
        ("/api/clients/c1", "invoice"),
        ("/api/invoice-template", "invoice"),
        ("/api/invoice-template/logo", "invoice"),
        ("/api/subscriptions/s1/cancel", "subscriptions"),
        ("/api/plans", "subscriptions"),
        ("/api/billing-portal/session", "subscriptions"),
        ("/api/notifications", "notifications"),
        ("/api/reminders/run", "notifications"),
        ("/api/reports/revenue", "reporting"),
        ("/webhooks/stripe", "payments"),
        ("/t/o/abc.gif", "notifications"),
    ],
)
def test_resolve(path: str, upstream: str) -> None:
    route = resolve(path)
    assert route is not None, path
    assert route.upstream == upstream


@pytest.mark.parametrize(
    "path", ["/", "/api", "/api/invoicesX", "/api/invoice", "/api/users2", "/webhooks", "/webhooks/other", "/tx"]
)
def test_unrouted(path: str) -> None:
    assert resolve(path) is None


def test_public_routes_are_only_the_webhook_and_tracking() -> None:
    public = {r.prefix for r in ROUTES if r.auth is Auth.PUBLIC}
    assert public == {"/webhooks/stripe", "/t"}
    assert [r.prefix for r in ROUTES if not r.idempotency] == ["/webhooks/stripe"]


def test_table_is_extensible() -> None:
    extra = [*ROUTES, Route("/portal/invoices", "invoice", auth=Auth.PUBLIC)]
    route = resolve("/portal/invoices/tok_123", extra)
    assert route is not None and route.upstream == "invoice" and route.auth is Auth.PUBLIC
    assert resolve("/portal/invoices/tok_123") is None
    # a literal segment beats a placeholder of the same length
    table = [Route("/a/{id}", "x"), Route("/a/special", "y")]
    assert resolve("/a/special", table).upstream == "y"  # type: ignore[union-attr]
    assert resolve("/a/other", table).upstream == "x"  # type: ignore[union-attr]
