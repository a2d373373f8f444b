"""kit.stripe: key rules, error mapping, missing detection, Ts/Ref parsing, the adapter's calls."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
import stripe
from pydantic import ValidationError

from kit.stripe import (
    LiveKeyRefused,
    Period,
    Ref,
    StripeAdapter,
    StripeModel,
    StripeRefused,
    StripeUnavailable,
    Ts,
    check_stripe_key,
    is_missing,
    is_test_mode_key,
    looks_like_real_test_key,
    parse_stripe,
    stripe_client,
    stripe_error,
    to_dict,
)

REAL_LOOKING = "sk_test_51" + "Ab3dE" * 20  # the shape of a key Stripe issues (about 107 characters)
LOCAL_KEYS = ["sk_test_local", "sk_test_123", "sk_test_x", "rk_test_local"]  # the stand-in's, stripe-mock's


# -- keys ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["sk_live_" + "a" * 30, "rk_live_" + "a" * 30, "pk_live_abc"])
def test_a_live_key_is_refused(key: str) -> None:
    with pytest.raises(LiveKeyRefused, match="live-mode key"):
        check_stripe_key(key)
    assert not is_test_mode_key(key)
    assert not looks_like_real_test_key(key)


@pytest.mark.parametrize("key", ["", "sk_test_", "pk_test_abc", "whsec_abc", "sk_test_has space", "test_sk_x"])
def test_anything_but_a_test_mode_secret_key_is_refused(key: str) -> None:
    with pytest.raises(LiveKeyRefused, match="test-mode secret key"):
        check_stripe_key(key)
    assert not is_test_mode_key(key)


def test_a_restricted_test_key_is_a_test_mode_key() -> None:
    restricted = "rk_test_" + "a1" * 20
    check_stripe_key(restricted)
    assert is_test_mode_key(restricted)
    assert looks_like_real_test_key(restricted)


def test_a_key_stripe_issued_is_recognised() -> None:
    check_stripe_key(REAL_LOOKING)
    assert is_test_mode_key(REAL_LOOKING)
    assert looks_like_real_test_key(REAL_LOOKING)
    assert not looks_like_real_test_key(REAL_LOOKING + "-")  # only alphanumerics after the prefix


@pytest.mark.parametrize("key", LOCAL_KEYS)
def test_local_stand_in_keys_are_accepted_but_not_taken_for_real_ones(key: str) -> None:
    check_stripe_key(key)
    assert is_test_mode_key(key)
    assert not looks_like_real_test_key(key)


def test_the_client_refuses_a_live_key() -> None:
    with pytest.raises(LiveKeyRefused):
        stripe_client("sk_live_" + "a" * 30)


# -- errors --------------------------------------------------------------------------------------------


def invalid_request(status: int, code: str | None, message: str = "No such customer: 'cus_x'") -> stripe.StripeError:
    body = {"error": {"message": message, "code": code, "type": "invalid_request_error"}}
    return stripe.InvalidRequestError(message, "id", code=code, http_status=status, json_body=body)


def test_a_failure_is_stripe_unavailable_with_stripes_status_and_code() -> None:
    error = stripe_error("read the customer", invalid_request(400, "parameter_invalid", "Bad id."))
    assert isinstance(error, StripeUnavailable)
    assert (error.status_code, error.code) == (502, "payment_provider_error")
    assert error.message == "Stripe could not read the customer: Bad id."
    assert error.details == {"stripeStatus": 400, "stripeCode": "parameter_invalid"}


def test_an_unreachable_stripe_is_stripe_unavailable() -> None:
    error = stripe_error("create the customer", stripe.APIConnectionError("Connection refused"), refusals=True)
    assert isinstance(error, StripeUnavailable)
    assert error.message == "Stripe could not create the customer: Connection refused"
    assert error.details == {"stripeStatus": None, "stripeCode": None}


def test_with_refusals_a_4xx_invalid_request_is_stripe_refused() -> None:
    refused = stripe_error("update the subscription", invalid_request(400, "resource_invalid"), refusals=True)
    assert isinstance(refused, StripeRefused)
    assert (refused.status_code, refused.code) == (409, "stripe_refused")
    assert refused.details == {"stripeStatus": 400, "stripeCode": "resource_invalid"}
    # a server error or another kind of error stays retryable
    assert isinstance(stripe_error("x", invalid_request(500, None), refusals=True), StripeUnavailable)
    card = stripe.CardError("Declined", "card", "card_declined", http_status=402)
    assert isinstance(stripe_error("x", card, refusals=True), StripeUnavailable)


def test_missing_is_a_404_or_resource_missing() -> None:
    assert is_missing(invalid_request(404, "resource_missing"))
    assert is_missing(invalid_request(404, None))
    assert is_missing(invalid_request(400, "resource_missing"))
    assert not is_missing(invalid_request(400, "parameter_invalid"))
    assert not is_missing(stripe.APIConnectionError("Connection refused"))
    assert not is_missing(stripe.APIError("boom", http_status=500))


# -- parsing -------------------------------------------------------------------------------------------


class Thing(StripeModel):
    id: str
    customer: Ref = None
    created: Ts = None
    period: Period = Period()


def test_ts_reads_unix_seconds_as_an_aware_utc_datetime() -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert Thing.model_validate({"id": "t", "created": int(at.timestamp())}).created == at
    assert Thing.model_validate({"id": "t", "created": str(int(at.timestamp()))}).created == at
    assert Thing.model_validate({"id": "t", "created": at}).created == at  # a model built in code
    for absent in (None, "", 0):
        assert Thing.model_validate({"id": "t", "created": absent}).created is None
    assert Thing.model_validate({"id": "t"}).created is None
    for wrong in ("yesterday", True, [1]):
        with pytest.raises(ValidationError):
            Thing.model_validate({"id": "t", "created": wrong})


def test_ref_reads_an_id_or_an_expanded_object() -> None:
    assert Thing.model_validate({"id": "t", "customer": "cus_1"}).customer == "cus_1"
    assert Thing.model_validate({"id": "t", "customer": {"id": "cus_1", "object": "customer"}}).customer == "cus_1"
    assert Thing.model_validate({"id": "t", "customer": None}).customer is None
    assert Thing.model_validate({"id": "t", "customer": {"object": "customer"}}).customer is None
    with pytest.raises(ValidationError):
        Thing.model_validate({"id": "t", "customer": 12})


def test_a_stripe_model_ignores_unknown_fields_and_is_frozen() -> None:
    thing = Thing.model_validate({"id": "t", "new_in_2027": {"x": 1}, "period": {"start": 1, "end": 2}})
    assert thing.period.start == datetime.fromtimestamp(1, tz=UTC)
    assert not hasattr(thing, "new_in_2027")
    with pytest.raises(ValidationError):
        thing.id = "other"  # type: ignore[misc]


def test_parse_stripe_reads_sdk_objects_and_dicts() -> None:
    sdk = stripe.StripeObject.construct_from({"id": "t", "customer": {"id": "cus_1"}, "created": 1}, "sk_test_x")
    assert parse_stripe(Thing, sdk, "read the thing").customer == "cus_1"
    assert to_dict(sdk)["customer"] == {"id": "cus_1"}
    assert parse_stripe(Thing, {"id": "t"}, "read the thing") == Thing(id="t")


def test_an_unreadable_answer_is_stripe_unavailable() -> None:
    with pytest.raises(StripeUnavailable, match="Could not read the thing: Stripe answered an object"):
        parse_stripe(Thing, {"customer": "cus_1"}, "read the thing")  # no id


# -- the adapter ---------------------------------------------------------------------------------------


class Adapter(StripeAdapter):
    async def thing(self, request: Awaitable[Any]) -> Thing:
        return await self._read("read the thing", Thing, request)

    async def maybe_thing(self, request: Awaitable[Any]) -> Thing | None:
        return await self._read_or_none("read the thing", Thing, request)


class RefusingAdapter(Adapter):
    refusals = True


async def answer(value: Any) -> Any:
    return value


async def fail(exc: Exception) -> Any:
    raise exc


async def test_the_adapter_maps_failures_and_parses_answers() -> None:
    adapter = Adapter(stripe_client("sk_test_local"))
    assert await adapter.thing(answer({"id": "t", "customer": "cus_1"})) == Thing(id="t", customer="cus_1")
    assert await adapter.maybe_thing(fail(invalid_request(404, "resource_missing"))) is None
    with pytest.raises(StripeUnavailable) as unavailable:
        await adapter.maybe_thing(fail(invalid_request(400, "parameter_invalid")))
    assert isinstance(unavailable.value.__cause__, stripe.InvalidRequestError)
    with pytest.raises(StripeUnavailable):
        await adapter.thing(fail(invalid_request(404, "resource_missing")))  # only a retrieve may miss
    with pytest.raises(StripeUnavailable):
        await adapter.thing(answer({"no": "id"}))
    with pytest.raises(StripeRefused):
        await RefusingAdapter(stripe_client("sk_test_local")).thing(fail(invalid_request(400, "resource_invalid")))


@dataclass
class Settings:
    stripe_secret_key: str = "sk_test_local"
    stripe_api_base: str | None = None
    stripe_timeout: float = 5.0
    stripe_max_network_retries: int = 0


@pytest.fixture
async def fake_stripe() -> AsyncIterator[tuple[str, list[str]]]:
    """A loopback HTTP server standing in for Stripe: GET /v1/customers/cus_1 is a customer, any other
    path Stripe's resource_missing 404. Yields its address and the request lines it received."""
    seen: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        line = head.split("\r\n", 1)[0]
        seen.append(line)
        if line.startswith("GET /v1/customers/cus_1 "):
            status, body = "200 OK", {"id": "cus_1", "object": "customer", "created": 1_700_000_000}
        else:
            status, body = "404 Not Found", {"error": {"type": "invalid_request_error", "code": "resource_missing",
                                                       "message": "No such customer"}}
        data = json.dumps(body).encode()
        writer.write(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                     "Connection: close\r\n\r\n".encode() + data)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/", seen
    finally:
        server.close()
        await server.wait_closed()


async def test_from_settings_talks_to_the_api_base(fake_stripe: tuple[str, list[str]]) -> None:
    base, seen = fake_stripe
    adapter = Adapter.from_settings(Settings(stripe_api_base=base))
    found = await adapter.maybe_thing(adapter.client.v1.customers.retrieve_async("cus_1"))
    assert found == Thing(id="cus_1", created=datetime.fromtimestamp(1_700_000_000, tz=UTC))
    assert await adapter.maybe_thing(adapter.client.v1.customers.retrieve_async("cus_gone")) is None
    assert [line.split(" ")[:2] for line in seen] == [["GET", "/v1/customers/cus_1"], ["GET", "/v1/customers/cus_gone"]]


def test_from_settings_refuses_a_live_key() -> None:
    with pytest.raises(LiveKeyRefused):
        Adapter.from_settings(Settings(stripe_secret_key="sk_live_" + "a" * 30))
