"""Plans (create with prices, archive) and Subscriptions (subscribe a client, change plan with the
proration preview, cancel, resume), through the subscriptions service.

Each form carries an idempotency key made when it was shown (a fresh one each time it is shown, so a
corrected form is a new request), sent as `Idempotency-Key`: the service answers a repeated submit (a
double click, a reload of the POST) with its first answer instead of creating a second subscription
or charging a change twice.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from starlette.datastructures import FormData
from starlette.responses import Response

from services.gateway.admin import formatting
from services.gateway.admin.api import ApiError
from services.gateway.admin.common import (
    api,
    clients_by_id,
    first_error,
    query_pairs,
    recent_clients,
    text,
    with_selected,
)
from services.gateway.admin.formatting import MoneyInputError, parse_major
from services.gateway.admin.invoices import _uuid_or_none
from services.gateway.admin.models import ChangePreview, Client, Page, Plan, Price, Subscription
from services.gateway.admin.web import AdminSession, Csrf, redirect, render

router = APIRouter()
Cursor = Annotated[str | None, Query(max_length=2000)]
PRICE_ROWS = 3
INTERVALS = [("month", "Month"), ("year", "Year")]
COLLECTION = [("charge_automatically", "Charge the card automatically"), ("send_invoice", "Send an invoice")]
SUB_STATUSES = [("", "Any status"), ("trialing", "Trialing"), ("active", "Active"), ("past_due", "Past due"),
                ("canceled", "Canceled"), ("incomplete", "Incomplete"), ("unpaid", "Unpaid"), ("paused", "Paused")]
SERVICE_DOWN = "The subscriptions service is not available right now."


def _key_headers(form: FormData) -> dict[str, str]:
    key = text(form, "idempotency_key")
    return {"Idempotency-Key": key} if key and len(key) <= 64 else {}


def price_label(plan: Plan, price: Price, locale: str) -> str:
    every = price.interval if price.interval_count == 1 else f"{price.interval_count} {price.interval}s"
    trial = f", {price.trial_days}-day trial" if price.trial_days else ""
    return f"{plan.name} — {formatting.money(price.amount, price.currency, locale)} / {every}{trial}"


# -- plans -----------------------------------------------------------------------------------------


@router.get("/plans")
async def plan_list(request: Request, session: AdminSession, cursor: Cursor = None) -> Response:
    page: Page[Plan] = Page[Plan](items=[])
    failure = None
    try:
        page = await api(request, session).get(Page[Plan], "/api/plans", {"limit": 20, "cursor": cursor})
    except ApiError as exc:
        failure = SERVICE_DOWN if exc.unavailable or exc.status == 404 else first_error(exc)
    return render(request, "plans.html", {"page": page, "failure": failure, "query": query_pairs(request),
                                          "cursor": cursor}, session=session)


def _plan_form(request: Request, session: AdminSession, values: dict[str, Any], errors: dict[str, str],
               status_code: int = 200, failure: str | None = None) -> Response:
    return render(request, "plan_form.html", {
        "values": values, "errors": errors, "intervals": INTERVALS, "rows": PRICE_ROWS, "failure": failure,
        "idempotency_key": str(uuid.uuid4()),
    }, status_code=status_code, session=session)


@router.get("/plans/new")
async def new_plan(request: Request, session: AdminSession) -> Response:
    return _plan_form(request, session, {"price_currency": ["EUR"] + [""] * (PRICE_ROWS - 1)}, {})


@router.post("/plans", dependencies=[Csrf])
async def create_plan(request: Request, session: AdminSession) -> Response:
    form = await request.form()
    locale = formatting.request_locale(request)
    values: dict[str, Any] = {k: text(form, k) for k in ("name", "description", "features", "idempotency_key")}
    for col in ("currency", "amount", "interval", "interval_count", "trial_days"):
        got = [v if isinstance(v, str) else "" for v in form.getlist(f"price_{col}")]
        values[f"price_{col}"] = (got + [""] * PRICE_ROWS)[:PRICE_ROWS]
    errors: dict[str, str] = {}
    name = values["name"].strip()
    if not name:
        errors["name"] = "Name the plan."
    features = [f.strip() for f in values["features"].splitlines() if f.strip()]
    prices: list[dict[str, Any]] = []
    for i in range(PRICE_ROWS):
        currency = values["price_currency"][i].strip().upper()
        amount_text = values["price_amount"][i]
        if not currency and not amount_text.strip():
            continue
        if not formatting.known_currency(currency):
            errors[f"price-{i}-currency"] = "Enter a currency code such as EUR."
            continue
        try:
            amount = parse_major(amount_text, currency, locale)
        except MoneyInputError as exc:
            errors[f"price-{i}-amount"] = str(exc)
            continue
        interval = values["price_interval"][i] or "month"
        count_text = values["price_interval_count"][i].strip() or "1"
        trial_text = values["price_trial_days"][i].strip() or "0"
        if interval not in dict(INTERVALS):
            errors[f"price-{i}-interval"] = "Choose month or year."
        if not count_text.isdigit() or not 1 <= int(count_text) <= 36:
            errors[f"price-{i}-interval_count"] = "Every 1 to 36 intervals."
        if not trial_text.isdigit() or int(trial_text) > 730:
            errors[f"price-{i}-trial_days"] = "0 to 730 days."
        if not any(k.startswith(f"price-{i}-") for k in errors):
            prices.append({"currency": currency, "amount": amount, "interval": interval,
                           "intervalCount": int(count_text), "trialDays": int(trial_text)})
    if not prices and not any(k.startswith("price-") for k in errors):
        errors["price-0-amount"] = "Give the plan at least one price."
    if errors:
        return _plan_form(request, session, values, errors, 422)
    body = {"name": name, "description": values["description"].strip() or None, "features": features,
            "prices": prices}
    try:
        plan = await api(request, session).post(Plan, "/api/plans", body, headers=_key_headers(form))
    except ApiError as exc:
        failure = SERVICE_DOWN if exc.unavailable else None
        fields = {_plan_field(k): formatting.label(v, {}) for k, v in exc.field_errors().items()}
        return _plan_form(request, session, values, fields or ({} if failure else {"name": first_error(exc)}), 422,
                          failure=failure)
    return redirect(request, f"/admin/plans/{plan.id}?created=1")


def _plan_field(api_field: str) -> str:
    parts = api_field.split(".")
    if parts[0] == "prices" and len(parts) >= 3 and parts[1].isdigit():
        names = {"amount": "amount", "currency": "currency", "interval": "interval", "intervalCount":
                 "interval_count", "trialDays": "trial_days"}
        return f"price-{parts[1]}-{names.get(parts[2], 'amount')}"
    if parts[0] == "prices":
        return "price-0-amount"
    return {"name": "name", "description": "description", "features": "features"}.get(parts[0], "name")


async def _plan(request: Request, session: AdminSession, plan_id: str) -> Plan | Response:
    if _uuid_or_none(plan_id) is None:
        return render(request, "error.html", {"title": "No such plan", "message": "There is no plan here."},
                      status_code=404, session=session)
    try:
        return await api(request, session).get(Plan, f"/api/plans/{plan_id}")
    except ApiError as exc:
        title = "No such plan" if exc.status == 404 else "Plan unavailable"
        return render(request, "error.html", {"title": title, "message": first_error(exc)},
                      status_code=404 if exc.status == 404 else 503, session=session)


@router.get("/plans/{plan_id}")
async def plan_detail(request: Request, session: AdminSession, plan_id: str,
                      created: Annotated[str | None, Query(max_length=5)] = None,
                      archived: Annotated[str | None, Query(max_length=5)] = None) -> Response:
    found = await _plan(request, session, plan_id)
    if isinstance(found, Response):
        return found
    notice = "Plan created." if created else ("Plan archived." if archived else None)
    return render(request, "plan.html", {"plan": found, "notice": notice, "error": None,
                                         "idempotency_key": str(uuid.uuid4())}, session=session)


@router.post("/plans/{plan_id}/archive", dependencies=[Csrf])
async def archive_plan(request: Request, session: AdminSession, plan_id: str) -> Response:
    found = await _plan(request, session, plan_id)
    if isinstance(found, Response):
        return found
    form = await request.form()
    try:
        await api(request, session).post(Plan, f"/api/plans/{found.id}/archive", {}, headers=_key_headers(form))
    except ApiError as exc:
        return render(request, "plan.html", {"plan": found, "notice": None, "error": first_error(exc),
                                             "idempotency_key": str(uuid.uuid4())}, status_code=422, session=session)
    return redirect(request, f"/admin/plans/{found.id}?archived=1")


# -- subscriptions -----------------------------------------------------------------------------------


async def _price_options(request: Request, session: AdminSession) -> tuple[list[tuple[str, str]], str | None]:
    locale = formatting.request_locale(request)
    try:
        plans = await api(request, session).get(Page[Plan], "/api/plans", {"limit": 100, "active": "true"})
    except ApiError as exc:
        return [], SERVICE_DOWN if exc.unavailable or exc.status == 404 else first_error(exc)
    return [(p.id, price_label(plan, p, locale)) for plan in plans.items for p in plan.prices if p.active], None


@router.get("/subscriptions")
async def subscription_list(request: Request, session: AdminSession, cursor: Cursor = None,
                            status: Annotated[str | None, Query(max_length=20)] = None) -> Response:
    a = api(request, session)
    page: Page[Subscription] = Page[Subscription](items=[])
    failure = None
    params: dict[str, Any] = {"limit": 20, "cursor": cursor}
    if status in dict(SUB_STATUSES):
        params["status"] = status
    try:
        page = await a.get(Page[Subscription], "/api/subscriptions", params)
    except ApiError as exc:
        failure = SERVICE_DOWN if exc.unavailable or exc.status == 404 else first_error(exc)
    names = await clients_by_id(a, (s.client_id for s in page.items))
    return render(request, "subscriptions.html", {
        "page": page, "failure": failure, "names": names, "query": query_pairs(request), "cursor": cursor,
        "status": status or "", "status_options": SUB_STATUSES,
    }, session=session)


async def _subscription_form(request: Request, session: AdminSession, values: dict[str, str],
                             errors: dict[str, str], status_code: int = 200, failure: str | None = None) -> Response:
    a = api(request, session)
    (prices, price_failure), clients = await asyncio.gather(_price_options(request, session), _clients(a))
    clients = await with_selected(a, clients, values.get("client_id", ""))
    return render(request, "subscription_form.html", {
        "values": values, "errors": errors, "failure": failure or price_failure,
        "price_options": [("", "Choose a plan and price…"), *prices],
        "client_options": [("", "Choose a client…")] + [(c.id, c.name) for c in clients],
        "collection_options": COLLECTION, "idempotency_key": str(uuid.uuid4()),
    }, status_code=status_code, session=session)


async def _clients(a: Any) -> list[Client]:
    try:
        return await recent_clients(a)
    except ApiError:
        return []


@router.get("/subscriptions/new")
async def new_subscription(request: Request, session: AdminSession,
                           client_id: Annotated[str | None, Query(alias="clientId", max_length=64)] = None) -> Response:
    return await _subscription_form(request, session, {"client_id": _uuid_or_none(client_id or "") or "",
                                                       "quantity": "1", "collection": "send_invoice"}, {})


@router.post("/subscriptions", dependencies=[Csrf])
async def create_subscription(request: Request, session: AdminSession) -> Response:
    form = await request.form()
    values = {k: text(form, k).strip() for k in ("client_id", "price_id", "quantity", "trial_days", "collection",
                                                 "days_until_due", "idempotency_key")}
    errors: dict[str, str] = {}
    if _uuid_or_none(values["client_id"]) is None:
        errors["client_id"] = "Choose a client."
    if _uuid_or_none(values["price_id"]) is None:
        errors["price_id"] = "Choose a plan and price."
    if not values["quantity"].isdigit() or not 1 <= int(values["quantity"]) <= 10_000:
        errors["quantity"] = "Enter a quantity from 1 to 10,000."
    if values["trial_days"] and (not values["trial_days"].isdigit() or int(values["trial_days"]) > 730):
        errors["trial_days"] = "Enter 0 to 730 days, or leave it empty for the price's own trial."
    if values["collection"] not in dict(COLLECTION):
        errors["collection"] = "Choose how it is paid."
    if values["days_until_due"] and (not values["days_until_due"].isdigit()
                                     or not 1 <= int(values["days_until_due"]) <= 365):
        errors["days_until_due"] = "Enter 1 to 365 days."
    if errors:
        return await _subscription_form(request, session, values, errors, 422)
    body: dict[str, Any] = {"clientId": values["client_id"], "priceId": values["price_id"],
                            "quantity": int(values["quantity"]), "collectionMethod": values["collection"]}
    if values["trial_days"]:
        body["trialDays"] = int(values["trial_days"])
    if values["collection"] == "send_invoice" and values["days_until_due"]:
        body["daysUntilDue"] = int(values["days_until_due"])
    try:
        sub = await api(request, session).post(Subscription, "/api/subscriptions", body, headers=_key_headers(form))
    except ApiError as exc:
        return await _subscription_form(request, session, values, {}, 422,
                                        failure=SERVICE_DOWN if exc.unavailable else first_error(exc))
    return redirect(request, f"/admin/subscriptions/{sub.id}?created=1")


async def _subscription(request: Request, session: AdminSession, sub_id: str) -> Subscription | Response:
    if _uuid_or_none(sub_id) is None:
        return render(request, "error.html", {"title": "No such subscription", "message": "There is none here."},
                      status_code=404, session=session)
    try:
        return await api(request, session).get(Subscription, f"/api/subscriptions/{sub_id}")
    except ApiError as exc:
        title = "No such subscription" if exc.status == 404 else "Subscription unavailable"
        return render(request, "error.html", {"title": title, "message": first_error(exc)},
                      status_code=404 if exc.status == 404 else 503, session=session)


async def _detail(request: Request, session: AdminSession, sub: Subscription, *, notice: str | None = None,
                  error: str | None = None, preview: ChangePreview | None = None,
                  change: dict[str, str] | None = None, status_code: int = 200) -> Response:
    a = api(request, session)
    (prices, _), clients = await asyncio.gather(_price_options(request, session), clients_by_id(a, [sub.client_id]))
    return render(request, "subscription.html", {
        "sub": sub, "client": clients.get(sub.client_id), "notice": notice, "error": error, "preview": preview,
        "change": change or {"price_id": "", "quantity": str(sub.quantity)},
        "price_options": [("", "Choose the new plan and price…"), *[(v, t) for v, t in prices if v != sub.price_id]],
        "idempotency_key": str(uuid.uuid4()),
    }, status_code=status_code, session=session)


NOTICES = {"created": "Subscription created.", "changed": "Plan changed.", "canceled": "Cancellation recorded.",
           "resumed": "Subscription resumed."}


@router.get("/subscriptions/{sub_id}")
async def subscription_detail(
    request: Request, session: AdminSession, sub_id: str,
    created: Annotated[str | None, Query(max_length=5)] = None,
    changed: Annotated[str | None, Query(max_length=5)] = None,
    canceled: Annotated[str | None, Query(max_length=5)] = None,
    resumed: Annotated[str | None, Query(max_length=5)] = None,
) -> Response:
    found = await _subscription(request, session, sub_id)
    if isinstance(found, Response):
        return found
    flags = {"created": created, "changed": changed, "canceled": canceled, "resumed": resumed}
    notice = next((NOTICES[k] for k, v in flags.items() if v), None)
    return await _detail(request, session, found, notice=notice)


@router.get("/subscriptions/{sub_id}/change")
async def change_preview(
    request: Request, session: AdminSession, sub_id: str,
    price_id: Annotated[str, Query(alias="priceId", max_length=64)] = "",
    quantity: Annotated[str, Query(max_length=6)] = "1",
) -> Response:
    """The proration preview of a change: what it costs now, before confirming it."""
    found = await _subscription(request, session, sub_id)
    if isinstance(found, Response):
        return found
    change = {"price_id": price_id, "quantity": quantity}
    if _uuid_or_none(price_id) is None:
        return await _detail(request, session, found, error="Choose the new plan and price.", change=change,
                             status_code=422)
    if not quantity.isdigit() or not 1 <= int(quantity) <= 10_000:
        return await _detail(request, session, found, error="Enter a quantity from 1 to 10,000.", change=change,
                             status_code=422)
    try:
        preview = await api(request, session).get(ChangePreview, f"/api/subscriptions/{found.id}/change-preview",
                                                  {"priceId": price_id, "quantity": quantity})
    except ApiError as exc:
        return await _detail(request, session, found, error=first_error(exc), change=change, status_code=422)
    return await _detail(request, session, found, preview=preview, change=change)


@router.post("/subscriptions/{sub_id}/change", dependencies=[Csrf])
async def apply_change(request: Request, session: AdminSession, sub_id: str) -> Response:
    found = await _subscription(request, session, sub_id)
    if isinstance(found, Response):
        return found
    form = await request.form()
    body: dict[str, Any] = {"priceId": text(form, "price_id"), "prorationDate": text(form, "proration_date")}
    quantity = text(form, "quantity")
    if quantity.isdigit():
        body["quantity"] = int(quantity)
    try:
        await api(request, session).post(Subscription, f"/api/subscriptions/{found.id}/change", body,
                                         headers=_key_headers(form))
    except ApiError as exc:
        return await _detail(request, session, found, error=first_error(exc), status_code=422)
    return redirect(request, f"/admin/subscriptions/{found.id}?changed=1")


@router.post("/subscriptions/{sub_id}/cancel", dependencies=[Csrf])
async def cancel_subscription(request: Request, session: AdminSession, sub_id: str) -> Response:
    found = await _subscription(request, session, sub_id)
    if isinstance(found, Response):
        return found
    form = await request.form()
    at_period_end = text(form, "when") != "now"
    try:
        await api(request, session).post(Subscription, f"/api/subscriptions/{found.id}/cancel",
                                         {"atPeriodEnd": at_period_end}, headers=_key_headers(form))
    except ApiError as exc:
        return await _detail(request, session, found, error=first_error(exc), status_code=422)
    return redirect(request, f"/admin/subscriptions/{found.id}?canceled=1")


@router.post("/subscriptions/{sub_id}/resume", dependencies=[Csrf])
async def resume_subscription(request: Request, session: AdminSession, sub_id: str) -> Response:
    found = await _subscription(request, session, sub_id)
    if isinstance(found, Response):
        return found
    form = await request.form()
    try:
        await api(request, session).post(Subscription, f"/api/subscriptions/{found.id}/resume", {},
                                         headers=_key_headers(form))
    except ApiError as exc:
        return await _detail(request, session, found, error=first_error(exc), status_code=422)
    return redirect(request, f"/admin/subscriptions/{found.id}?resumed=1")
