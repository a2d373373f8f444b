"""Stripe's form encoding, as the SDK writes it."""

from __future__ import annotations

from urllib.parse import urlencode

import pytest

from deploy.stripe_standin.errors import StripeError
from deploy.stripe_standin.forms import metadata_update, parse_form


def test_nested_hashes_and_arrays() -> None:
    body = urlencode([
        ("items[0][price]", "price_a"), ("items[0][quantity]", "2"), ("items[1][price]", "price_b"),
        ("metadata[client_id]", "c1"), ("subscription_details[items][0][id]", "si_1"),
        ("expand[0]", "latest_invoice"), ("lookup_keys[]", "a"), ("lookup_keys[]", "b"), ("email", ""),
    ])
    parsed = parse_form(body)
    assert parsed["items"] == [{"price": "price_a", "quantity": "2"}, {"price": "price_b"}]
    assert parsed["metadata"] == {"client_id": "c1"}
    assert parsed["subscription_details"] == {"items": [{"id": "si_1"}]}
    assert parsed["expand"] == ["latest_invoice"]
    assert parsed["lookup_keys"] == ["a", "b"]
    assert parsed["email"] == ""


def test_array_indexes_are_ordered_numerically() -> None:
    pairs = [(f"line_items[{i}][price]", f"p{i}") for i in (10, 2, 0, 1)]
    assert [x["price"] for x in parse_form(urlencode(pairs))["line_items"]] == ["p0", "p1", "p2", "p10"]


def test_conflicting_keys_are_refused() -> None:
    with pytest.raises(StripeError):
        parse_form("a=1&a[b]=2")


def test_metadata_merge_like_stripe() -> None:
    current = {"keep": "1", "drop": "2"}
    assert metadata_update(current, parse_form("metadata[drop]=&metadata[new]=3")) == {"keep": "1", "new": "3"}
    assert metadata_update(current, parse_form("metadata=")) == {}
    assert metadata_update(current, {}) == current
