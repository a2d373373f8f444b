"""Plans and prices API (SUB1): validation, immutable prices, archive, visibility; Stripe via stripe-mock."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from .conftest import ScriptedStripe, client_headers, create_plan, price_body


async def test_create_a_plan_with_prices_in_stripe(api: httpx.AsyncClient) -> None:
    plan = await create_plan(api, "Maintenance", [price_body(4_900, trial_days=14), price_body(49_000, "year")])
    assert plan["active"] and plan["features"] == ["Updates"]
    assert plan["stripeProductId"] == f"plan_{uuid.UUID(plan['id']).hex}"
    monthly, yearly = plan["prices"]
    assert (monthly["amount"], monthly["interval"], monthly["intervalCount"], monthly["trialDays"]) == (
        4_900, "month", 1, 14)
    assert yearly["interval"] == "year" and yearly["currency"] == "EUR"
    assert all(p["stripePriceId"].startswith("price_") and p["active"] for p in plan["prices"])
    assert monthly["lookupKey"] != yearly["lookupKey"]
    fetched = await api.get(f"/api/plans/{plan['id']}")
    assert fetched.status_code == 200 and fetched.json() == plan


@pytest.mark.parametrize(("body", "field"), [
    ({"name": "X", "surprise": 1}, "surprise"),
    ({"name": ""}, "name"),
    ({"name": "Bad\x00name"}, "name"),
    ({"name": "Bell\x07"}, "name"),
    ({"name": "X", "features": ["ok", "tab\x1bescape"]}, "features"),
    ({"name": "X", "prices": [price_body(-1)]}, "prices.0.amount"),
    ({"name": "X", "prices": [price_body(10.5)]}, "prices.0.amount"),  # type: ignore[arg-type]
    ({"name": "X", "prices": [price_body("100")]}, "prices.0.amount"),  # type: ignore[arg-type]
    ({"name": "X", "prices": [price_body(100, "week")]}, "prices.0.interval"),
    ({"name": "X", "prices": [price_body(100, currency="EURO")]}, "prices.0.currency"),
    ({"name": "X", "prices": [price_body(100, currency="XYZ")]}, "prices.0.currency"),
    ({"name": "X", "prices": [price_body(100, intervalCount=4, interval="year")]}, "prices.0"),
    ({"name": "X", "prices": [price_body(100, trialDays=-1)]}, "prices.0.trialDays"),
    ({"name": "X", "prices": [price_body(100, lookupKey="has space")]}, "prices.0.lookupKey"),
    ({"name": "X", "prices": [price_body(100), price_body(200)]}, "prices"),
])
async def test_bad_plans_are_refused_with_a_422_naming_the_field(api: httpx.AsyncClient, body: dict[str, Any],
                                                                  field: str) -> None:
    response = await api.post("/api/plans", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert any(d["field"].startswith(field) or d["field"] == "" for d in error["details"]), error


async def test_a_new_amount_is_a_new_price_and_the_old_one_is_archived(
    api: httpx.AsyncClient, scripted: ScriptedStripe
) -> None:
    plan = await create_plan(api, "Retainer", [price_body(10_000), price_body(100_000, "year")])
    monthly, yearly = plan["prices"]
    keep_yearly = {k: yearly[k] for k in ("id", "currency", "amount", "interval", "intervalCount")}
    body = {"name": "Retainer+", "description": "More hours", "features": ["Updates", "Support"],
            "prices": [{**keep_yearly, "trialDays": 7}, price_body(12_000)]}
    response = await api.put(f"/api/plans/{plan['id']}", json=body)
    assert response.status_code == 200, response.text
    updated = response.json()
    assert (updated["name"], updated["description"], updated["features"]) == (
        "Retainer+", "More hours", ["Updates", "Support"])
    by_id = {p["id"]: p for p in updated["prices"]}
    assert by_id[monthly["id"]]["active"] is False  # replaced: archived, kept for running subscriptions
    assert by_id[yearly["id"]]["active"] and by_id[yearly["id"]]["trialDays"] == 7
    [new] = [p for p in updated["prices"] if p["id"] not in (monthly["id"], yearly["id"])]
    assert new["amount"] == 12_000 and new["active"]
    assert new["lookupKey"] == monthly["lookupKey"]  # the new price takes the key over

    # clients see only what is on offer
    as_client = await api.get(f"/api/plans/{plan['id']}", headers=client_headers(uuid.uuid4()))
    assert as_client.status_code == 200
    assert {p["id"] for p in as_client.json()["prices"]} == {yearly["id"], new["id"]}


async def test_prices_are_immutable(api: httpx.AsyncClient) -> None:
    plan = await create_plan(api, "Fixed", [price_body(1_000)])
    [price] = plan["prices"]
    changed = {**{k: price[k] for k in ("id", "currency", "interval", "intervalCount")}, "amount": 2_000}
    response = await api.put(f"/api/plans/{plan['id']}", json={"name": "Fixed", "prices": [changed]})
    assert response.status_code == 422 and response.json()["error"]["code"] == "price_immutable"
    foreign = {**price_body(1_000), "id": str(uuid.uuid4())}
    response = await api.put(f"/api/plans/{plan['id']}", json={"name": "Fixed", "prices": [foreign]})
    assert response.status_code == 422 and response.json()["error"]["code"] == "unknown_price"


async def test_a_lookup_key_belongs_to_one_active_price(api: httpx.AsyncClient) -> None:
    key = f"custom_{uuid.uuid4().hex[:8]}"
    await create_plan(api, "A", [price_body(1_000, lookupKey=key)])
    response = await api.post("/api/plans", json={"name": "B", "prices": [price_body(2_000, lookupKey=key)]})
    assert response.status_code == 409 and response.json()["error"]["code"] == "lookup_key_taken"


async def test_archive_a_plan(api: httpx.AsyncClient, scripted: ScriptedStripe) -> None:
    plan = await create_plan(api, "Legacy", [price_body(1_000)])
    response = await api.post(f"/api/plans/{plan['id']}/archive")
    assert response.status_code == 200
    archived = response.json()
    assert archived["active"] is False and all(not p["active"] for p in archived["prices"])
    again = await api.post(f"/api/plans/{plan['id']}/archive")
    assert again.status_code == 200 and again.json()["active"] is False
    edit = await api.put(f"/api/plans/{plan['id']}", json={"name": "Legacy 2"})
    assert edit.status_code == 409 and edit.json()["error"]["code"] == "plan_archived"
    # an archived plan is gone for clients, kept for admins
    assert (await api.get(f"/api/plans/{plan['id']}", headers=client_headers(uuid.uuid4()))).status_code == 404
    assert (await api.get(f"/api/plans/{plan['id']}")).status_code == 200
    listed = await api.get("/api/plans", params={"active": "false", "limit": 100})
    assert plan["id"] in {p["id"] for p in listed.json()["items"]}


async def test_plans_are_admin_managed_and_listed_with_cursors(api: httpx.AsyncClient) -> None:
    client = client_headers(uuid.uuid4())
    assert (await api.post("/api/plans", json={"name": "Mine"}, headers=client)).status_code == 403
    assert (await api.get(f"/api/plans/{uuid.uuid4()}")).status_code == 404
    assert (await api.get("/api/plans/not-a-uuid")).status_code == 422
    for n in range(3):
        await create_plan(api, f"Paged {n}", [])
    first = await api.get("/api/plans", params={"limit": 2})
    assert first.status_code == 200
    page = first.json()
    assert len(page["items"]) == 2 and page["hasMore"] and page["nextCursor"] and page["total"] >= 3
    second = await api.get("/api/plans", params={"limit": 2, "cursor": page["nextCursor"]})
    assert second.status_code == 200
    assert not {p["id"] for p in page["items"]} & {p["id"] for p in second.json()["items"]}
    assert (await api.get("/api/plans", params={"limt": 2})).status_code == 400
    assert (await api.get("/api/plans", params={"limit": 0})).status_code == 422
    # a client's list has active plans only
    listed = await api.get("/api/plans", params={"limit": 100, "active": "false"}, headers=client)
    assert all(p["active"] for p in listed.json()["items"])
