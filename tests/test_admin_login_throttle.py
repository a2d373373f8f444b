"""The admin sign-in page is throttled as `POST /api/auth/login` is (issue 11): per account and per
client address, in the same counters in the gateway's database, 429 with `Retry-After` and a page that
says when to try again. A real gateway (uvicorn in this loop) on real PostgreSQL; the services behind
it are not needed for signing in (their address refuses connections).

The client address is what uvicorn reports: X-Forwarded-For from loopback (uvicorn trusts the
loopback proxy by default) stands for callers on other addresses.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from services.gateway.app import create_app
from services.gateway.tests.conftest import ADMIN_EMAIL, ADMIN_PASSWORD, make_settings, serve

ACCOUNT_LIMIT = 3
ADDRESS_LIMIT = 5
LOCKOUT = 2.0  # seconds
DEAD = "http://127.0.0.1:9"  # nothing listens there


@pytest.fixture(scope="module")
async def gateway_url(database_url_factory: Callable[[str], str]) -> AsyncIterator[str]:
    settings = make_settings(
        database_url_factory("gateway_admin_throttle"), invoice_url=DEAD, payments_url=DEAD,
        subscriptions_url=DEAD, notifications_url=DEAD, reporting_url=DEAD,
        login_account_max_failures=ACCOUNT_LIMIT, login_address_max_failures=ADDRESS_LIMIT,
        login_window_seconds=60, login_lockout_seconds=LOCKOUT, login_lockout_max_seconds=30,
    )
    served = await serve(create_app(settings))
    yield served.url
    await served.stop()


async def sign_in_page(base_url: str, email: str, password: str, address: str) -> httpx.Response:
    """What a browser does: open the sign-in page (CSRF cookie and token), then post the form."""
    async with httpx.AsyncClient(base_url=base_url, timeout=20, headers={"X-Forwarded-For": address}) as http:
        page = await http.get("/admin/login")
        assert page.status_code == 200
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert token, page.text[:500]
        return await http.post("/admin/login", data={"csrf_token": token.group(1), "email": email,
                                                     "password": password, "next": "/admin"})


async def api_login(base_url: str, email: str, password: str, address: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=base_url, timeout=20) as http:
        return await http.post("/api/auth/login", json={"email": email, "password": password},
                               headers={"X-Forwarded-For": address})


def error_text(page: httpx.Response) -> str:
    match = re.search(r'data-testid="login-error"[^>]*>([^<]*)<', page.text)
    assert match, page.text[:2000]
    return match.group(1)


def assert_throttled_page(page: httpx.Response, whom: str) -> int:
    assert page.status_code == 429, page.text[:1000]
    assert page.headers["content-type"].startswith("text/html")
    retry_after = int(page.headers["Retry-After"])
    assert 1 <= retry_after <= 30
    message = error_text(page)
    assert f"Too many failed logins {whom}. Try again in " in message, message
    assert re.search(r"\(after \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\)", message), message
    assert f'data-retry-after="{retry_after}"' in page.text
    assert "admin_session" not in page.headers.get("set-cookie", "")
    return retry_after


async def new_admin(base_url: str) -> tuple[str, str]:
    async with httpx.AsyncClient(base_url=base_url, timeout=20) as http:
        token = (await http.post("/api/auth/login", json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})).json()
        email, password = f"admin-{uuid.uuid4().hex[:8]}@example.com", "another-admin-password"
        created = await http.post("/api/users", headers={"Authorization": f"Bearer {token['accessToken']}"},
                                  json={"email": email, "password": password, "role": "admin"})
        assert created.status_code == 201, created.text
    return email, password


async def test_an_account_is_locked_after_failures_on_the_page_and_the_api_together(gateway_url: str) -> None:
    email, password = await new_admin(gateway_url)
    wrong = await sign_in_page(gateway_url, email, "wrong-password", "198.51.100.10")
    assert wrong.status_code == 401 and error_text(wrong) == "Wrong email or password."
    assert (await api_login(gateway_url, email, "wrong-password", "198.51.100.11")).status_code == 401
    wrong = await sign_in_page(gateway_url, email, "wrong-password", "198.51.100.12")
    assert wrong.status_code == 401

    # The limit is reached: from another address, with the right password, the page says when.
    refused = await sign_in_page(gateway_url, email, password, "198.51.100.13")
    retry_after = assert_throttled_page(refused, "for this account")
    api = await api_login(gateway_url, email, password, "198.51.100.14")
    assert api.status_code == 429 and api.json()["error"]["code"] == "too_many_login_attempts"

    # Once Retry-After has passed, the right password signs in (and clears the account's count).
    deadline = time.monotonic() + retry_after + 10
    while True:
        page = await sign_in_page(gateway_url, email, password, "198.51.100.15")
        if page.status_code == 303:
            break
        assert page.status_code == 429 and time.monotonic() < deadline, page.status_code
        await asyncio.sleep(0.2)
    assert page.headers["location"] == "/admin" and "admin_session=" in page.headers["set-cookie"]


async def test_an_address_is_locked_after_failures_for_any_accounts(gateway_url: str) -> None:
    address = "203.0.113.20"
    for i in range(ADDRESS_LIMIT):
        guess = await sign_in_page(gateway_url, f"nobody-{i}-{uuid.uuid4().hex[:6]}@example.com", "guess", address)
        assert guess.status_code == 401, (i, guess.status_code)
    refused = await sign_in_page(gateway_url, ADMIN_EMAIL, ADMIN_PASSWORD, address)  # even the right one
    assert_throttled_page(refused, "from your network address")
    # Another address is not concerned; the admin's account is not locked by the address's guesses.
    ok = await sign_in_page(gateway_url, ADMIN_EMAIL, ADMIN_PASSWORD, "203.0.113.21")
    assert ok.status_code == 303, ok.text[:1000]
