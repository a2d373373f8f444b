"""Pure pieces: settings rules (live keys, the stand-in rule), Stripe signing and verification, the
normalization of Stripe payloads for billing.stripe."""

from __future__ import annotations

import contextlib
import json
import time

import pytest
import stripe
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from kit.stripe import looks_like_real_test_key
from services.payments.config import PaymentsSettings, is_loopback_url
from services.payments.stripe import normalize
from services.payments.stripe import testing as stripe_events
from services.payments.stripe.events import Event, Invoice, ObjT, Subscription, parse_event
from services.payments.stripe.intake import WebhookRejected, verify

REAL_LOOKING = "sk_test_51" + "Ab3dE" * 20  # the shape of a key Stripe issues (about 107 characters)


def typed(event: dict[str, object], model: type[ObjT]) -> Event[ObjT]:
    """A built event as the worker reads it: its stored body parsed into the typed models."""
    return parse_event(stripe_events.encode_event(event), model)


# -- settings --------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["sk_live_abc", "rk_live_" + "x" * 40, "pk_live_123", "pk_test_123", "hello", ""])
def test_live_or_non_secret_keys_refuse_to_start(key: str) -> None:
    with pytest.raises(ValidationError) as exc:
        PaymentsSettings(stripe_secret_key=key)
    assert "test" in str(exc.value)


def test_live_key_from_the_environment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRIPE_SECRET_KEY", "sk_live_" + "z" * 99)
    with pytest.raises(ValidationError, match="live-mode key"):
        PaymentsSettings()


@pytest.mark.parametrize(
    ("api_base", "expected"),
    [
        ("http://127.0.0.1:12113", True),  # the Stripe stand-in
        ("http://localhost:12111", True),
        ("http://[::1]:12111", True),
        (None, False),  # talking to api.stripe.com
        ("https://api.stripe.com", False),
        ("http://10.0.0.5:12111", False),  # not this machine
        ("http://127.0.0.1.evil.example:12111", False),
    ],
)
def test_local_stripe_rule(api_base: str | None, expected: bool) -> None:
    """Only STRIPE_API_BASE says where Stripe is; no setting switches on a fake page in the service."""
    s = PaymentsSettings(stripe_api_base=api_base, stripe_secret_key="sk_test_local")
    assert s.local_stripe is expected
    assert not hasattr(s, "stand_in_checkout")


def test_real_key_shape() -> None:
    assert looks_like_real_test_key(REAL_LOOKING)
    assert looks_like_real_test_key("rk_test_" + "a1" * 20)
    assert not looks_like_real_test_key("sk_test_local")
    assert not looks_like_real_test_key("sk_test_123")
    assert is_loopback_url("http://127.0.0.2:1") and not is_loopback_url("http://example.com")


def test_payment_methods_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAYMENTS_PAYMENT_METHODS", "card, sepa_debit")
    assert PaymentsSettings().payment_methods == ["card", "sepa_debit"]
    monkeypatch.setenv("PAYMENTS_PAYMENT_METHODS", "card,bitcoin")
    with pytest.raises(ValidationError, match="bitcoin"):
        PaymentsSettings()


def test_global_stripe_env_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", "whsec_abc")
    monkeypatch.setenv("STRIPE_API_BASE", "http://127.0.0.1:9")
    monkeypatch.setenv("PAYMENTS_PORT", "9123")
    s = PaymentsSettings()
    assert (s.stripe_webhook_secret, s.stripe_api_base, s.port) == ("whsec_abc", "http://127.0.0.1:9", 9123)


# -- signing and verification ----------------------------------------------------------------------


def test_signed_events_pass_the_sdks_own_verification() -> None:
    event = stripe_events.build_event("checkout.session.completed", stripe_events.checkout_session(
        invoice_id="inv-1", amount_total=500, currency="eur"))
    body, headers = stripe_events.signed_request(event, "whsec_x")
    parsed = stripe.Webhook.construct_event(body, headers["Stripe-Signature"], "whsec_x", tolerance=300)
    assert parsed.id == event["id"] and parsed.type == "checkout.session.completed"
    assert verify(body, headers["Stripe-Signature"], "whsec_x", 300).id == event["id"]


def test_signature_matches_stripes_documented_scheme() -> None:
    import hashlib
    import hmac

    header = stripe_events.sign_payload(b'{"a":1}', "whsec_k", 1_700_000_000)
    expected = hmac.new(b"whsec_k", b'1700000000.{"a":1}', hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda b, h: (b, None), "missing_signature"),
        (lambda b, h: (b, ""), "missing_signature"),
        (lambda b, h: (b, "t=1,v1=abc"), "invalid_signature"),
        (lambda b, h: (b, h.replace("v1=", "v0=")), "invalid_signature"),
        (lambda b, h: (b + b" ", h), "invalid_signature"),
        (lambda b, h: (b, stripe_events.sign_payload(b, "whsec_wrong")), "invalid_signature"),
        (lambda b, h: (b, stripe_events.sign_payload(b, "whsec_x", int(time.time()) - 301)), "invalid_signature"),
    ],
)
def test_verification_failures(mutate: object, code: str) -> None:
    event = stripe_events.build_event("invoice.paid", {"id": "in_1", "object": "invoice"})
    body, headers = stripe_events.signed_request(event, "whsec_x")
    body2, header2 = mutate(body, headers["Stripe-Signature"])  # type: ignore[operator]
    with pytest.raises(WebhookRejected) as exc:
        verify(body2, header2, "whsec_x", 300)
    assert exc.value.code == code and exc.value.status_code == 400


def test_within_tolerance_and_multiple_signatures_accepted() -> None:
    """Stripe sends several v1 signatures while a secret is being rolled."""
    body = stripe_events.encode_event(stripe_events.build_event("invoice.paid", {"id": "in_1"}))
    ts = int(time.time()) - 290
    good = stripe_events.sign_payload(body, "whsec_x", ts).split(",")[1]
    header = f"t={ts},v1={'0' * 64},{good}"
    assert verify(body, header, "whsec_x", 300).type == "invoice.paid"


@pytest.mark.parametrize(
    "payload",
    [b"not json", b"\xff\xfe", b"[]", b"{}", b'{"id": "evt_1", "type": "x"}',
     b'{"id": 5, "type": "x", "created": 1, "data": {"object": {}}}',
     b'{"id": "evt_1", "type": "x", "created": "1", "data": {"object": {}}}',
     b'{"id": "evt_1", "type": "x", "created": 1, "data": {"object": []}}',
     b'{"id": "evt_1", "object": "charge", "type": "x", "created": 1, "data": {"object": {}}}'],
)
def test_signed_but_unusable_bodies(payload: bytes) -> None:
    with pytest.raises(WebhookRejected) as exc:
        verify(payload, stripe_events.sign_payload(payload, "whsec_x"), "whsec_x", 300)
    assert exc.value.code == "invalid_payload"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.text(max_size=80))
def test_arbitrary_bodies_and_headers_never_crash(body: bytes, header: str) -> None:
    with contextlib.suppress(WebhookRejected):
        verify(body, header, "whsec_x", 300)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_signed_bodies_are_refused_cleanly_or_parsed(body: bytes) -> None:
    try:
        event = verify(body, stripe_events.sign_payload(body, "whsec_x"), "whsec_x", 300)
    except WebhookRejected:
        return
    assert isinstance(event.id, str)


# -- normalization ---------------------------------------------------------------------------------


def test_subscription_current_api_shape_periods_on_items() -> None:
    sub = stripe_events.subscription(client_id="c1", plan_id="p1", period_start=1_700_000_000,
                                     period_end=1_702_592_000)
    event = stripe_events.build_event("customer.subscription.updated", sub, created=1_700_000_100)
    data = normalize.subscription(typed(event, Subscription))
    assert data.subscription_id == sub["id"] and data.client_id == "c1" and data.plan_id == "p1"
    assert data.current_period_start is not None and int(data.current_period_start.timestamp()) == 1_700_000_000
    assert int(data.current_period_end.timestamp()) == 1_702_592_000  # type: ignore[union-attr]
    assert data.items[0].interval == "month" and data.currency == "EUR"
    assert int(data.stripe_event_created.timestamp()) == 1_700_000_100
    wire = json.loads(data.model_dump_json(by_alias=True))
    assert {"subscriptionId", "currentPeriodEnd", "stripeEventId", "priceLookupKey"} <= set(wire)


def test_subscription_older_api_shape_periods_on_subscription() -> None:
    sub = stripe_events.subscription()
    for item in sub["items"]["data"]:
        item.pop("current_period_start")
        item.pop("current_period_end")
        item["plan"] = item.pop("price")
    sub["current_period_start"], sub["current_period_end"] = 1_600_000_000, 1_602_592_000
    data = normalize.subscription(typed(stripe_events.build_event("customer.subscription.created", sub), Subscription))
    assert int(data.current_period_end.timestamp()) == 1_602_592_000  # type: ignore[union-attr]
    assert data.items[0].current_period_end == data.current_period_end


def test_invoice_both_shapes_of_the_subscription_reference() -> None:
    new = stripe_events.stripe_invoice(subscription_id="sub_1", client_id="c9")
    data = normalize.invoice(typed(stripe_events.build_event("invoice.paid", new), Invoice))
    assert data.subscription_id == "sub_1" and data.client_id == "c9" and data.paid_at is not None
    old = {**new, "parent": None, "subscription": "sub_2",
           "subscription_details": {"metadata": {"client_id": "c8", "plan_id": "p"}}}
    data = normalize.invoice(typed(stripe_events.build_event("invoice.payment_failed", old), Invoice))
    assert data.subscription_id == "sub_2" and data.client_id == "c8" and data.plan_id == "p"
    one_off = {**new, "parent": None}
    assert normalize.invoice(typed(stripe_events.build_event("invoice.paid", one_off), Invoice)).subscription_id is None


def test_public_and_portal_urls_follow_the_gateway(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BILLING_GATEWAY_URL", "http://127.0.0.1:18000")
    s = PaymentsSettings()
    assert s.public_url == "http://127.0.0.1:18000" and s.portal_url == "http://127.0.0.1:18000/portal"
    monkeypatch.setenv("PAYMENTS_PORTAL_URL", "https://portal.example")
    assert PaymentsSettings().portal_url == "https://portal.example"
    assert PaymentsSettings(public_url="https://pay.example").public_url == "https://pay.example"


def test_openapi_documents_the_one_webhook_endpoint_from_the_intake_models_and_the_table() -> None:
    from fastapi.routing import APIRoute

    from services.payments.app import create_app
    from services.payments.stripe.handlers import HANDLERS

    app = create_app(PaymentsSettings())
    doc = app.openapi()
    operation = doc["paths"]["/webhooks/stripe"]["post"]
    assert all(f"`{event_type}`" in operation["description"] for event_type in HANDLERS)
    request = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    assert {"id", "type", "created", "data"} <= set(doc["components"]["schemas"][request]["properties"])
    ack = operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    assert set(doc["components"]["schemas"][ack]["properties"]) == {"received", "duplicate", "ignored"}
    assert {"400", "413"} <= set(operation["responses"])
    # served by one ASGI endpoint, not by a FastAPI handler
    served = [r for r in app.routes if getattr(r, "path", None) == "/webhooks/stripe"]
    assert len(served) == 1 and not isinstance(served[0], APIRoute)


async def test_the_invoice_ledger_is_read_as_a_list_or_page_by_page() -> None:
    import httpx

    from services.payments.invoice_client import HttpInvoiceReader, InvoiceServiceUnavailable

    pages = {
        None: {"items": [{"paymentId": "p1", "kind": "payment"}], "nextCursor": "c2", "hasMore": True},
        "c2": {"items": [{"paymentId": "r1", "kind": "refund", "amount": 5}], "nextCursor": None, "hasMore": False},
    }
    seen: list[dict[str, str]] = []

    def paged(request: httpx.Request) -> httpx.Response:
        seen.append(dict(request.url.params))
        return httpx.Response(200, json=pages[request.url.params.get("cursor")])

    def plain(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=[{"paymentId": "p1"}, {"paymentId": "r1", "kind": "refund"}])

    def garbled(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"items": [{"kind": "payment"}]})

    reader = HttpInvoiceReader("http://invoice", None)
    await reader.aclose()
    for handler in (paged, plain):
        reader._client = httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://invoice")
        assert await reader.applied("inv-1") == [("p1", "payment"), ("r1", "refund")]
        await reader.aclose()
    assert seen == [{}, {"limit": "100", "cursor": "c2"}]  # the first page asks nothing the service may not know
    reader._client = httpx.AsyncClient(transport=httpx.MockTransport(garbled), base_url="http://invoice")
    with pytest.raises(InvoiceServiceUnavailable):
        await reader.applied("inv-1")
    await reader.aclose()
