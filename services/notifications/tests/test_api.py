"""The HTTP API in process (real PostgreSQL, real mail sink): log, reminders on demand, open tracking."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from datetime import date, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from services.notifications.app import Notifications, create_app
from services.notifications.config import NotificationsSettings
from services.notifications.consumers import NotificationConsumer
from services.notifications.models import Notification, OutboxMessage
from services.notifications.service import CONSUMER_NAME, new_token
from services.notifications.tests.conftest import (
    ADMIN,
    FakeInvoiceService,
    Mailbox,
    invoice_event,
    snapshot,
)


class Api:
    def __init__(self, http: httpx.AsyncClient, parts: Notifications) -> None:
        self.http = http
        self.parts = parts
        self.consumer = NotificationConsumer(
            parts.db, CONSUMER_NAME, parts.service.handlers(), after_commit=parts.wake
        )

    async def opened_events(self) -> list[dict[str, Any]]:
        async with self.parts.db.unit_of_work() as uow:
            payloads = (
                await uow.session.scalars(
                    select(OutboxMessage.payload)
                    .where(OutboxMessage.event_type == "notification.opened")
                    .order_by(OutboxMessage.id)
                )
            ).all()
        return [json.loads(p) for p in payloads]

    async def message(self, invoice_id: str, kind: str = "invoice_sent") -> Notification:
        async with self.parts.db.unit_of_work() as uow:
            n = (await uow.session.scalars(select(Notification).filter_by(invoice_id=invoice_id, kind=kind))).one()
            uow.session.expunge_all()
            return n

    async def sent(self, invoice_id: str, kind: str = "invoice_sent", timeout: float = 15) -> Notification:
        deadline = time.monotonic() + timeout
        while True:
            n = await self.message(invoice_id, kind)
            if n.status == "sent":
                return n
            assert time.monotonic() < deadline, f"not sent: {n.status} {n.last_error}"
            await asyncio.sleep(0.1)


@pytest.fixture
async def api(
    make_settings: Callable[..., NotificationsSettings], fake_invoice_service: FakeInvoiceService
) -> AsyncIterator[Api]:
    app = create_app(make_settings(invoice_url=fake_invoice_service.url))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://notifications", headers=ADMIN) as http:
            yield Api(http, app.state.notifications)


def tracking_urls(mail: Any) -> tuple[str, str]:
    html = mail.get_body(("html",)).get_content()
    pixel = re.search(r'src="http://billing\.example\.com(/t/o/[A-Za-z0-9_-]+\.gif)"', html)
    link = re.search(r'href="http://billing\.example\.com(/t/l/[A-Za-z0-9_-]+)"', html)
    assert pixel and link, html
    return pixel.group(1), link.group(1)


async def test_pixel_open_is_recorded_and_published_once(api: Api, mailbox: Mailbox) -> None:
    snap = snapshot(number="2026-0301", email_="opener@acme.example.com")
    await api.consumer.apply(invoice_event("invoice.sent", snap))
    await api.sent(snap["id"])
    [mail] = mailbox.for_invoice(snap["id"])
    pixel, _ = tracking_urls(mail)

    first = await api.http.get(pixel, headers={})
    assert first.status_code == 200
    assert first.headers["content-type"] == "image/gif" and first.content.startswith(b"GIF89a")
    assert "no-store" in first.headers["cache-control"]
    opened = await api.message(snap["id"])
    assert opened.opened_at is not None and opened.opened_via == "pixel"
    [event] = [e for e in await api.opened_events() if e["data"]["invoiceId"] == snap["id"]]
    assert event["type"] == "notification.opened" and event["subject"] == snap["id"]
    assert event["data"]["messageId"] == str(opened.id)
    assert event["data"]["kind"] == "invoice_sent"
    assert event["data"]["recipient"] == "opener@acme.example.com"
    assert event["data"]["openedAt"]

    second = await api.http.get(pixel, headers={})
    assert second.status_code == 200 and second.content == first.content
    assert len([e for e in await api.opened_events() if e["data"]["invoiceId"] == snap["id"]]) == 1
    assert (await api.message(snap["id"])).opened_at == opened.opened_at


async def test_bad_pixel_tokens_get_the_gif_and_record_nothing(api: Api) -> None:
    before = len(await api.opened_events())
    paths = (f"/t/o/{new_token()}.gif", "/t/o/short.gif", "/t/o/%27%3B%20drop.gif", "/t/o/" + "a" * 200 + ".gif")
    for path in paths:
        response = await api.http.get(path, headers={})
        assert response.status_code == 200, path
        assert response.headers["content-type"] == "image/gif"
    assert len(await api.opened_events()) == before


async def test_tracked_link_redirects_to_the_invoice_and_counts_as_an_open(api: Api, mailbox: Mailbox) -> None:
    snap = snapshot(number="2026-0302")
    await api.consumer.apply(invoice_event("invoice.sent", snap))
    await api.sent(snap["id"])
    pixel, link = tracking_urls(mailbox.for_invoice(snap["id"])[0])
    response = await api.http.get(link, headers={}, follow_redirects=False)
    assert response.status_code == 302
    assert response.headers["location"] == f"http://billing.example.com/portal/invoices/{snap['id']}"
    n = await api.message(snap["id"])
    assert n.opened_via == "link" and n.clicked_at is not None
    await api.http.get(pixel, headers={})  # the pixel after the click: already opened
    assert len([e for e in await api.opened_events() if e["data"]["invoiceId"] == snap["id"]]) == 1
    bad = await api.http.get(f"/t/l/{new_token()}", headers={}, follow_redirects=False)
    assert bad.status_code == 302 and bad.headers["location"] == "http://billing.example.com/portal"


async def test_message_log_filters_per_invoice_detail_and_retry(api: Api) -> None:
    a = snapshot(number="2026-0303", email_="log-a@acme.example.com")
    b = snapshot(number="2026-0304", email_="log-b@acme.example.com")
    await api.consumer.apply(invoice_event("invoice.sent", a))
    await api.consumer.apply(invoice_event("invoice.sent", b))
    await api.consumer.apply(invoice_event("invoice.cancelled", {**b, "status": "CANCELLED", "version": 3}))
    await api.sent(a["id"])
    await api.sent(b["id"], "invoice_cancelled")

    page = (await api.http.get("/api/notifications")).json()
    assert set(page) == {"items", "nextCursor", "hasMore", "total"}
    assert page["total"] >= 3 and page["hasMore"] is (page["total"] > 20)
    item = page["items"][0]
    assert set(item) >= {"id", "kind", "status", "invoiceId", "recipient", "subject", "sentAt", "failedAt",
                         "openedAt", "attempts", "createdAt"}
    by_invoice = (await api.http.get("/api/notifications", params={"invoiceId": b["id"]})).json()
    assert sorted(i["kind"] for i in by_invoice["items"]) == ["invoice_cancelled", "invoice_sent"]
    only_cancel = (await api.http.get("/api/notifications", params={"kind": "invoice_cancelled",
                                                                     "recipient": "LOG-B@acme.example.com"})).json()
    assert [i["invoiceId"] for i in only_cancel["items"]] == [b["id"]]
    assert (await api.http.get("/api/notifications", params={"status": "sent", "opened": "true",
                                                              "invoiceId": a["id"]})).json()["total"] == 0
    per_invoice = (await api.http.get(f"/api/notifications/invoices/{a['id']}")).json()["items"]
    assert [(i["kind"], i["status"], i["recipient"]) for i in per_invoice] == [
        ("invoice_sent", "sent", "log-a@acme.example.com")
    ]
    detail = (await api.http.get(f"/api/notifications/{per_invoice[0]['id']}")).json()
    assert [a_["outcome"] for a_ in detail["deliveryAttempts"]] == ["sent"]
    assert detail["subject"] == "Invoice 2026-0303 from Billing"

    conflict = await api.http.post(f"/api/notifications/{per_invoice[0]['id']}/retry")
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "conflict"
    missing = await api.http.get("/api/notifications/00000000-0000-0000-0000-000000000000")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    bad = await api.http.get("/api/notifications", params={"status": "bogus", "limit": 0})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "validation_error"


async def test_admin_only(api: Api) -> None:
    client = {"X-Actor-Role": "client", "X-Actor-Client-Id": "c1", "X-Actor-User-Id": "u1"}
    for method, path in (("GET", "/api/notifications"), ("POST", "/api/reminders/run"), ("GET", "/api/reminders")):
        response = await api.http.request(method, path, headers=client)
        assert response.status_code == 403, path
        assert response.json()["error"]["code"] == "forbidden"


async def test_reminders_run_on_demand_is_idempotent(api: Api, mailbox: Mailbox) -> None:
    as_of = date(2026, 9, 1)
    snap = snapshot(number="2026-0305", due=as_of + timedelta(days=7), issue=date(2026, 8, 1),
                    email_="ondemand@acme.example.com")
    await api.consumer.apply(invoice_event("invoice.sent", snap))
    first = await api.http.post("/api/reminders/run", json={"asOf": as_of.isoformat()})
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["asOf"] == "2026-09-01"
    mine = [r for r in body["reminders"] if r["invoiceId"] == snap["id"]]
    assert [(r["kind"], r["sequence"]) for r in mine] == [("reminder_before_due", 7)]
    second = (await api.http.post("/api/reminders/run", json={"asOf": as_of.isoformat()})).json()
    assert [r for r in second["reminders"] if r["invoiceId"] == snap["id"]] == []
    await api.sent(snap["id"], "reminder_before_due")
    kinds = sorted(m["X-Billing-Kind"] for m in mailbox.to("ondemand@acme.example.com"))
    assert kinds == ["invoice_sent", "reminder_before_due"]
    listed = (await api.http.get("/api/reminders", params={"invoiceId": snap["id"]})).json()["items"]
    assert [(r["kind"], r["sequence"], r["notificationStatus"]) for r in listed] == [("before_due", 7, "sent")]
    # No body: as of today. A bad date: a clean 422.
    today = await api.http.post("/api/reminders/run")
    assert today.status_code == 200 and today.json()["asOf"] == api.parts.service.today().isoformat()
    bad = await api.http.post("/api/reminders/run", json={"asOf": "not-a-date"})
    assert bad.status_code == 422 and bad.json()["error"]["details"][0]["field"] == "asOf"


async def test_reminders_run_as_of_a_date_asks_the_invoice_service_first(
    api: Api, mailbox: Mailbox, fake_invoice_service: FakeInvoiceService
) -> None:
    """One overdue notice for the invoice the invoice service marks OVERDUE, none for another past due."""
    as_of = date(2026, 10, 10)
    marked = snapshot(number="2026-0310", due=as_of - timedelta(days=1), issue=date(2026, 9, 1),
                      email_="marked@acme.example.com")
    not_marked = snapshot(number="2026-0311", due=as_of - timedelta(days=1), issue=date(2026, 9, 1),
                          email_="not-marked@acme.example.com")
    for snap in (marked, not_marked):
        await api.consumer.apply(invoice_event("invoice.sent", snap))
    fake_invoice_service.past_due = {marked["id"]}
    calls = len(fake_invoice_service.mark_overdue_calls)
    response = await api.http.post("/api/reminders/run", json={"asOf": as_of.isoformat()})
    assert response.status_code == 200, response.text
    [(asked, _headers)] = fake_invoice_service.mark_overdue_calls[calls:calls + 1]
    assert asked == {"asOf": "2026-10-10"}
    mine = [(r["invoiceId"], r["kind"], r["sequence"]) for r in response.json()["reminders"]
            if r["invoiceId"] in (marked["id"], not_marked["id"])]
    assert mine == [(marked["id"], "reminder_overdue", 1)]
    await api.sent(marked["id"], "reminder_overdue")
    assert sorted(m["X-Billing-Kind"] for m in mailbox.to("marked@acme.example.com")) == [
        "invoice_sent", "reminder_overdue"]
    assert [m["X-Billing-Kind"] for m in mailbox.to("not-marked@acme.example.com")] == ["invoice_sent"]


async def test_reminders_run_is_a_503_and_sends_nothing_when_the_invoice_service_fails(
    api: Api, fake_invoice_service: FakeInvoiceService, make_settings: Callable[..., NotificationsSettings]
) -> None:
    as_of = date(2026, 11, 10)
    late = snapshot(number="2026-0312", due=as_of - timedelta(days=1), issue=date(2026, 10, 1))
    await api.consumer.apply(invoice_event("invoice.sent", late))
    fake_invoice_service.past_due = {late["id"]}
    fake_invoice_service.mark_overdue_status = 500
    try:
        failed = await api.http.post("/api/reminders/run", json={"asOf": as_of.isoformat()})
    finally:
        fake_invoice_service.mark_overdue_status = 200
    assert failed.status_code == 503, failed.text
    error = failed.json()["error"]
    assert error["code"] == "invoice_service_unavailable" and "no overdue notice was sent" in error["message"]
    assert (await api.http.get("/api/reminders", params={"invoiceId": late["id"]})).json()["items"] == []

    # Nothing listening at all (the default settings point at a closed port): a 503 too, with Retry-After.
    app = create_app(make_settings())
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://n", headers=ADMIN) as http:
            down = await http.post("/api/reminders/run", json={"asOf": as_of.isoformat()})
    assert down.status_code == 503 and down.json()["error"]["code"] == "invoice_service_unavailable"
    assert down.headers["retry-after"] == "30"


async def test_lists_page_with_a_cursor_and_refuse_unknown_parameters(api: Api) -> None:
    snaps = [snapshot(number=f"2026-04{i:02d}", email_=f"page-{i}@acme.example.com") for i in range(5)]
    for snap in snaps:
        await api.consumer.apply(invoice_event("invoice.sent", snap))
    seen: list[str] = []
    params: dict[str, Any] = {"limit": 2, "kind": "invoice_sent"}
    while True:
        page = (await api.http.get("/api/notifications", params=params)).json()
        assert len(page["items"]) <= 2 and page["total"] == 5
        seen += [i["id"] for i in page["items"]]
        if not page["hasMore"]:
            break
        params["cursor"] = page["nextCursor"]
    everything = (await api.http.get("/api/notifications", params={"limit": 100, "kind": "invoice_sent"})).json()
    assert seen == [i["id"] for i in everything["items"]] and len(set(seen)) == 5
    # A cursor belongs to its list and filters.
    other = await api.http.get("/api/notifications", params={"cursor": params["cursor"], "kind": "invoice_cancelled"})
    assert other.status_code == 400 and other.json()["error"]["code"] == "invalid_cursor"
    for path in ("/api/notifications", "/api/reminders", f"/api/notifications/invoices/{snaps[0]['id']}"):
        bad = await api.http.get(path, params={"offset": 0})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "unknown_query_parameter", path
        assert set((await api.http.get(path)).json()) == {"items", "nextCursor", "hasMore", "total"}
