"""Login throttling (issue 12, defect 7): per account and per client address, 429 with Retry-After,
counted in the gateway's database so that two replicas share the counts; real PostgreSQL, two real
gateway processes (uvicorn in this loop) on one database.

The client address is what uvicorn reports: X-Forwarded-For from loopback (uvicorn trusts the
loopback proxy by default) stands for callers on other addresses.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx
import pytest

from services.gateway.app import create_app
from services.gateway.tests.conftest import ADMIN_EMAIL, ADMIN_PASSWORD, assert_error, make_settings, serve
from services.gateway.tests.upstream_app import Upstream

ACCOUNT_LIMIT = 3
ADDRESS_LIMIT = 5
LOCKOUT = 2.0  # seconds; the second lock-out lasts 4
CLIENT_EMAIL = "throttled-client@example.com"
CLIENT_PASSWORD = "client-password"


@dataclass
class Replicas:
    a: httpx.AsyncClient
    b: httpx.AsyncClient


@pytest.fixture(scope="module")
async def replicas(
    database_url_factory: Callable[[str], str], invoice_upstream: Upstream, dead_url: str
) -> AsyncIterator[Replicas]:
    database_url = database_url_factory("gateway_throttle")
    settings = make_settings(
        database_url, invoice_url=invoice_upstream.url, payments_url=dead_url, subscriptions_url=dead_url,
        notifications_url=dead_url, reporting_url=dead_url,
        login_account_max_failures=ACCOUNT_LIMIT, login_address_max_failures=ADDRESS_LIMIT,
        login_window_seconds=60, login_lockout_seconds=LOCKOUT, login_lockout_max_seconds=30,
    )
    first = await serve(create_app(settings))
    second = await serve(create_app(settings))
    async with httpx.AsyncClient(base_url=first.url, timeout=20) as a, \
            httpx.AsyncClient(base_url=second.url, timeout=20) as b:
        token = (await a.post("/api/auth/login", json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})).json()
        created = await a.post(
            "/api/users", headers={"Authorization": f"Bearer {token['accessToken']}"},
            json={"email": CLIENT_EMAIL, "password": CLIENT_PASSWORD, "role": "client", "clientId": "client-1"},
        )
        assert created.status_code == 201, created.text
        yield Replicas(a=a, b=b)
    await second.stop()
    await first.stop()


async def _login(http: httpx.AsyncClient, email: str, password: str, address: str) -> httpx.Response:
    return await http.post("/api/auth/login", json={"email": email, "password": password},
                           headers={"X-Forwarded-For": address})


def _assert_throttled(response: httpx.Response, scope: str) -> int:
    error = assert_error(response, 429, "too_many_login_attempts")
    retry_after = int(response.headers["Retry-After"])
    assert 1 <= retry_after <= 30
    assert "Try again in" in error["message"] and "UTC" in error["message"], error
    assert error["details"]["scope"] == scope and error["details"]["retryAfter"] == retry_after
    return retry_after


async def test_account_locked_after_failures_on_any_replica(replicas: Replicas) -> None:
    attacker = "198.51.100.1"
    for http in (replicas.a, replicas.b, replicas.a):  # the failures add up across replicas
        assert_error(await _login(http, ADMIN_EMAIL, "wrong-password", attacker), 401, "invalid_credentials")

    # Now even the right password is refused, on both replicas and from any address.
    first_wait = _assert_throttled(await _login(replicas.b, ADMIN_EMAIL, ADMIN_PASSWORD, attacker), "account")
    _assert_throttled(await _login(replicas.a, ADMIN_EMAIL, ADMIN_PASSWORD, "198.51.100.9"), "account")
    # Another account from another address is unaffected.
    other = await _login(replicas.a, CLIENT_EMAIL, CLIENT_PASSWORD, "198.51.100.2")
    assert other.status_code == 200, other.text

    # After the lock-out the count starts again; failing again locks it out twice as long (exponential).
    await asyncio.sleep(first_wait + 0.2)
    for _ in range(ACCOUNT_LIMIT):
        assert_error(await _login(replicas.a, ADMIN_EMAIL, "wrong-password", "198.51.100.3"), 401)
    second_wait = _assert_throttled(await _login(replicas.a, ADMIN_EMAIL, ADMIN_PASSWORD, "198.51.100.3"),
                                    "account")
    assert second_wait > first_wait and second_wait >= 2 * LOCKOUT - 1, (first_wait, second_wait)
    # After the window, the right password works.
    await asyncio.sleep(second_wait + 0.2)
    assert (await _login(replicas.b, ADMIN_EMAIL, ADMIN_PASSWORD, attacker)).status_code == 200


async def test_address_locked_after_failures_across_accounts(replicas: Replicas) -> None:
    spray = "203.0.113.7"
    for n in range(ADDRESS_LIMIT):  # one guess at each of many accounts: no account reaches its limit
        http = replicas.a if n % 2 else replicas.b
        assert_error(await _login(http, f"victim-{n}@example.com", "Winter2026!", spray), 401, "invalid_credentials")
    wait = _assert_throttled(await _login(replicas.a, CLIENT_EMAIL, CLIENT_PASSWORD, spray), "address")
    admin = await _login(replicas.b, ADMIN_EMAIL, ADMIN_PASSWORD, spray)
    assert "network address" in admin.json()["error"]["message"]
    # The same account from elsewhere still gets in.
    assert (await _login(replicas.b, CLIENT_EMAIL, CLIENT_PASSWORD, "203.0.113.8")).status_code == 200
    started = time.monotonic()
    await asyncio.sleep(wait + 0.2)
    assert time.monotonic() - started >= wait
    assert (await _login(replicas.a, CLIENT_EMAIL, CLIENT_PASSWORD, spray)).status_code == 200


async def test_parallel_guesses_cannot_pass_the_limit(replicas: Replicas) -> None:
    """Each attempt is counted before its password is checked: 12 guesses at once, on two replicas,
    get exactly ACCOUNT_LIMIT password checks."""
    email = "parallel-target@example.com"
    guesses = [
        _login(replicas.a if n % 2 else replicas.b, email, f"guess-{n}", f"192.0.2.{n + 1}") for n in range(12)
    ]
    statuses = sorted(r.status_code for r in await asyncio.gather(*guesses))
    assert statuses == [401] * ACCOUNT_LIMIT + [429] * (12 - ACCOUNT_LIMIT), statuses


async def test_successful_login_resets_the_account_count(replicas: Replicas) -> None:
    for round_ in range(3):
        address = f"198.51.100.{50 + round_}"
        for _ in range(ACCOUNT_LIMIT - 1):
            assert_error(await _login(replicas.a, CLIENT_EMAIL, "wrong-password", address), 401)
        assert (await _login(replicas.b, CLIENT_EMAIL, CLIENT_PASSWORD, address)).status_code == 200


async def test_login_nul_in_email_is_422(replicas: Replicas) -> None:
    response = await _login(replicas.a, "admin\u0000@example.com", "x", "198.51.100.60")
    assert_error(response, 422, "validation_error")
