"""Portal invitations (`POST /api/notifications/invitations`): the service in process, real PostgreSQL and
the real mail sink. Mailed through the delivery queue (retried on SMTP failures, in the log), once per
link, control characters refused with a 422 naming the field."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from email.message import EmailMessage
from typing import Any

import httpx
import pytest

from services.notifications.app import create_app
from services.notifications.config import NotificationsSettings
from services.notifications.tests.conftest import ADMIN, Mailbox

PATH = "/api/notifications/invitations"
LINK = "http://billing.example.com/admin/invite/{}.1767225600.c2lnbmF0dXJl"


@pytest.fixture
async def http(make_settings: Callable[..., NotificationsSettings]) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(make_settings())
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://notifications", headers=ADMIN) as client:
            yield client


def invitation(**overrides: Any) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    body = {"clientId": str(uuid.uuid4()), "email": f"invited-{tag}@acme.example.com", "name": "Acme GmbH",
            "link": LINK.format(uuid.uuid4()), "portalUrl": "http://billing.example.com/portal"}
    return body | overrides


async def sent(http: httpx.AsyncClient, notification_id: str, timeout: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        n = (await http.get(f"/api/notifications/{notification_id}")).json()
        if n["status"] == "sent":
            return dict(n)
        assert time.monotonic() < deadline, f"not sent: {n}"
        await asyncio.sleep(0.1)


def text_of(mail: EmailMessage) -> str:
    part = mail.get_body(("plain",))
    assert part is not None
    return str(part.get_content())


async def test_an_invitation_is_mailed_once_with_its_link(http: httpx.AsyncClient, mailbox: Mailbox) -> None:
    body = invitation()
    first = await http.post(PATH, json=body)
    assert first.status_code == 201, first.text
    queued = first.json()
    assert queued["kind"] == "portal_invitation" and queued["recipient"] == body["email"]
    assert queued["clientId"] == body["clientId"] and "client portal" in queued["subject"]
    done = await sent(http, queued["id"])
    assert done["deliveryAttempts"][-1]["outcome"] == "sent"

    await mailbox.wait(lambda _: len(mailbox.to(body["email"])) > 0, "the invitation")
    [mail] = mailbox.to(body["email"])
    assert mail["To"].addresses[0].display_name == "Acme GmbH"
    text = text_of(mail)
    assert f"Set your password: {body['link']}" in text  # the link itself, not a tracked redirect
    assert body["portalUrl"] in text
    html = mail.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert f'href="{body["link"]}"' in html

    again = await http.post(PATH, json=body)  # a second click: the same message, nothing queued
    assert again.status_code == 200 and again.json()["id"] == queued["id"]
    log = (await http.get("/api/notifications", params={"kind": "portal_invitation",
                                                        "recipient": body["email"]})).json()
    assert log["total"] == 1
    other = await http.post(PATH, json=body | {"link": LINK.format(uuid.uuid4())})  # a new link: a new email
    assert other.status_code == 201 and other.json()["id"] != queued["id"]


async def test_an_smtp_failure_is_retried_and_logged(http: httpx.AsyncClient, mailbox: Mailbox) -> None:
    mailbox.sink.fail_next(1)
    body = invitation()
    queued = (await http.post(PATH, json=body)).json()
    done = await sent(http, queued["id"])
    assert [a["outcome"] for a in done["deliveryAttempts"]] == ["retry", "sent"]
    assert done["attempts"] == 2
    assert len(mailbox.to(body["email"])) == 1


@pytest.mark.parametrize(("field", "value"), [
    ("name", "Acme\r\nBcc: victim@example.com"),
    ("name", "Acme\u2028Ltd"),
    ("email", "a\r\n@acme.example.com"),
    ("link", "http://billing.example.com/admin/invite/x\r\nX-Evil: 1"),
    ("portalUrl", "http://billing.example.com/\x00portal"),
    ("clientId", "client\x7f"),
])
async def test_control_characters_are_refused_with_422(http: httpx.AsyncClient, field: str, value: str) -> None:
    response = await http.post(PATH, json=invitation(**{field: value}))
    assert response.status_code == 422, response.text
    details = response.json()["error"]["details"]
    assert any(d["field"] == field and "control characters" in d["message"] for d in details), details


@pytest.mark.parametrize(("field", "value"), [
    ("link", "javascript:alert(1)"), ("link", "/admin/invite/relative"), ("portalUrl", "ftp://billing.example.com"),
    ("email", "not-an-address"), ("extra", "x"),
])
async def test_bad_invitations_are_422(http: httpx.AsyncClient, field: str, value: str) -> None:
    response = await http.post(PATH, json=invitation(**{field: value}))
    assert response.status_code == 422, response.text


async def test_only_an_admin_may_invite(http: httpx.AsyncClient) -> None:
    client = {"X-Actor-Role": "client", "X-Actor-User-Id": "u-1", "X-Actor-Client-Id": "c-1"}
    response = await http.post(PATH, json=invitation(), headers=client)
    assert response.status_code == 403
