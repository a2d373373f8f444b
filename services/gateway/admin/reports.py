"""Dashboard (REP1-REP4: collected, outstanding, overdue, MRR; monthly revenue; aging; methods) and
Reports with their CSV and Excel downloads, all from the reporting service.

Every chart draws figures that a table beside it lists (the table is what people with a screen reader
and the tests read); the chart data travels in a data attribute, never in an inline script.
"""

from __future__ import annotations

import asyncio
from datetime import date
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel
from starlette.responses import Response

from services.gateway.admin import formatting
from services.gateway.admin.api import Api, ApiError, Unavailable
from services.gateway.admin.common import api, first_error
from services.gateway.admin.models import (
    Aging,
    MonthlyRevenue,
    MrrReport,
    OutstandingInvoice,
    Page,
    PaymentMethods,
    Summary,
)
from services.gateway.admin.web import AdminSession, render

router = APIRouter()
M = TypeVar("M", bound=BaseModel)

# name in our URL -> (upstream path, title, takes a period)
REPORTS = {
    "summary": ("/api/reports/summary", "Summary", False),
    "outstanding": ("/api/reports/outstanding", "Outstanding invoices", False),
    "ar-aging": ("/api/reports/ar-aging", "Receivables aging", False),
    "revenue-monthly": ("/api/reports/revenue/monthly", "Monthly revenue", True),
    "payment-methods": ("/api/reports/payment-methods", "Payment methods", True),
    "mrr": ("/api/reports/mrr", "MRR", True),
    "dso": ("/api/reports/dso", "Days sales outstanding", True),
    "reconciliation": ("/api/reports/reconciliation", "Reconciliation", False),
}
PALETTE = ("#1F3A5F", "#2A9D8F", "#E9C46A", "#F4A261", "#E76F51", "#6D597A", "#355070", "#B56576")


async def _fetch(a: Api, model: type[M], path: str, params: dict[str, Any] | None = None) -> M | Unavailable:
    try:
        return await a.get(model, path, params)
    except ApiError as exc:
        if exc.unavailable or exc.status == 404:
            return Unavailable("The reporting service is not available right now.")
        return Unavailable(first_error(exc))


def _major(minor: int, currency: str) -> float:
    # For drawing only: the figures people read are the table's, formatted from the integers.
    return float(formatting.to_major(minor, currency))


def revenue_chart(report: MonthlyRevenue) -> dict[str, Any]:
    return {
        "type": "bar",
        "labels": [m.month for m in report.months],
        "datasets": [
            {"label": cur, "color": PALETTE[i % len(PALETTE)],
             "data": [_major(next((a.amount for a in m.amounts if a.currency == cur), 0), cur) for m in report.months]}
            for i, cur in enumerate(report.currencies)
        ],
    }


def methods_chart(report: PaymentMethods, currency: str) -> dict[str, Any]:
    rows = [r for r in report.rows if r.currency == currency]
    return {"type": "doughnut", "labels": [formatting.label(r.method, formatting.METHOD_LABELS) for r in rows],
            "datasets": [{"label": currency, "colors": list(PALETTE[: len(rows)]),
                          "data": [_major(r.amount, currency) for r in rows]}]}


def aging_chart(report: Aging) -> dict[str, Any]:
    buckets = ["Current", "1–30 days", "31–60 days", "61–90 days", "Over 90 days"]
    return {"type": "bar", "labels": buckets, "datasets": [
        {"label": row.currency, "color": PALETTE[i % len(PALETTE)],
         "data": [_major(v, row.currency) for v in (row.current, row.days_1_to_30, row.days_31_to_60,
                                                     row.days_61_to_90, row.over_90)]}
        for i, row in enumerate(report.totals or report.rows)
    ]}


@router.get("/")
async def dashboard(request: Request, session: AdminSession) -> Response:
    a = api(request, session)
    summary, revenue, aging, methods = await asyncio.gather(
        _fetch(a, Summary, "/api/reports/summary"),
        _fetch(a, MonthlyRevenue, "/api/reports/revenue/monthly"),
        _fetch(a, Aging, "/api/reports/ar-aging"),
        _fetch(a, PaymentMethods, "/api/reports/payment-methods"),
    )
    method_currencies = sorted({r.currency for r in methods.rows}) if isinstance(methods, PaymentMethods) else []
    return render(request, "dashboard.html", {
        "summary": summary, "revenue": revenue, "aging": aging, "methods": methods,
        "revenue_chart": revenue_chart(revenue) if isinstance(revenue, MonthlyRevenue) else None,
        "aging_chart": aging_chart(aging) if isinstance(aging, Aging) else None,
        "method_charts": {c: methods_chart(methods, c) for c in method_currencies}
        if isinstance(methods, PaymentMethods) else {},
    }, session=session)


Day = Annotated[str | None, Query(max_length=10)]


def _period(from_: str | None, to: str | None) -> tuple[dict[str, str], dict[str, str]]:
    params: dict[str, str] = {}
    errors: dict[str, str] = {}
    for key, value in (("from", from_), ("to", to)):
        if value:
            try:
                params[key] = date.fromisoformat(value).isoformat()
            except ValueError:
                errors[key] = "Enter a date (YYYY-MM-DD)."
    return params, errors


@router.get("/reports")
async def reports_page(request: Request, session: AdminSession,
                       from_: Annotated[str | None, Query(alias="from", max_length=10)] = None,
                       to: Day = None) -> Response:
    a = api(request, session)
    params, errors = _period(from_, to)
    period = params if not errors else {}
    summary, outstanding, aging, revenue, methods, mrr = await asyncio.gather(
        _fetch(a, Summary, "/api/reports/summary"),
        _fetch(a, Page[OutstandingInvoice], "/api/reports/outstanding", {"limit": 20}),
        _fetch(a, Aging, "/api/reports/ar-aging"),
        _fetch(a, MonthlyRevenue, "/api/reports/revenue/monthly", period),
        _fetch(a, PaymentMethods, "/api/reports/payment-methods", period),
        _fetch(a, MrrReport, "/api/reports/mrr", period),
    )
    return render(request, "reports.html", {
        "reports": REPORTS, "summary": summary, "outstanding": outstanding, "aging": aging, "revenue": revenue,
        "methods": methods, "mrr": mrr, "period": {"from": from_ or "", "to": to or ""}, "errors": errors,
        "period_query": period,
        "revenue_chart": revenue_chart(revenue) if isinstance(revenue, MonthlyRevenue) else None,
    }, session=session)


@router.get("/reports/download/{name}")
async def download(request: Request, session: AdminSession, name: str,
                   format: Annotated[str, Query(max_length=4)] = "csv",
                   from_: Annotated[str | None, Query(alias="from", max_length=10)] = None,
                   to: Day = None) -> Response:
    """The report as the reporting service exports it (CSV or xlsx), named as it names it."""
    if name not in REPORTS or format not in ("csv", "xlsx"):
        return render(request, "error.html", {"title": "No such report", "message": "There is no such download."},
                      status_code=404, session=session)
    path, title, periodic = REPORTS[name]
    params: dict[str, str] = {"format": format}
    if periodic:
        period, _ = _period(from_, to)
        params.update(period)
    try:
        upstream = await api(request, session).request("GET", path, params=params)
    except ApiError as exc:
        message = ("The reporting service is not available right now." if exc.unavailable or exc.status == 404
                   else first_error(exc))
        return render(request, "error.html", {"title": f"{title}: no download", "message": message},
                      status_code=503 if exc.unavailable else exc.status, session=session)
    disposition = upstream.headers.get("content-disposition", f'attachment; filename="{name}.{format}"')
    return Response(upstream.content, media_type=upstream.headers.get("content-type", "application/octet-stream"),
                    headers={"Content-Disposition": disposition, "Cache-Control": "no-store",
                             "X-Content-Type-Options": "nosniff"})
