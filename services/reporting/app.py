"""HTTP API of the reporting service: admin-only reports over its own read models, as JSON, CSV or xlsx."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import date
from typing import Annotated, Any, TypeVar

import structlog
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from pydantic import BaseModel
from sqlalchemy import text

from kit.actor import AdminActor
from kit.db import Database
from kit.errors import InvalidInput
from kit.metrics import Subscription
from kit.pagination import Page, PageParams
from kit.service import ServiceRuntime, create_service_app, make_broker
from kit.web import RequestUnitOfWork, request_database
from services.reporting import tables
from services.reporting.cache import ReportCache
from services.reporting.config import ReportingSettings
from services.reporting.exports import CSV_TYPE, XLSX_TYPE, Table, export
from services.reporting.feed import Feed, LiveFeed
from services.reporting.models import MIGRATIONS, SCHEMA
from services.reporting.money import check_currency
from services.reporting.periods import Period, as_of_day, period
from services.reporting.reports import Reports, ZoneCache, days_back, default_months_back
from services.reporting.schemas import (
    Aging,
    AgingGroup,
    Basis,
    Dso,
    ExportFormat,
    MonthlyRevenue,
    Mrr,
    OutstandingInvoice,
    PaymentMethods,
    Reconciliation,
    Summary,
)

log = structlog.get_logger(__name__)

EXPORTS: dict[int | str, dict[str, Any]] = {200: {"content": {
    CSV_TYPE.split(";")[0]: {"schema": {"type": "string"}},
    XLSX_TYPE: {"schema": {"type": "string", "format": "binary"}},
}}}

Format = Annotated[ExportFormat, Query(description="json (default), csv (RFC 4180, UTF-8) or xlsx.")]
CurrencyFilter = Annotated[str | None, Query(min_length=3, max_length=3, pattern=r"^[A-Za-z]{3}$",
                                             description="Only this ISO 4217 currency.")]
From = Annotated[date | None, Query(alias="from", description="First day (YYYY-MM-DD).")]
To = Annotated[date | None, Query(description="Last day (YYYY-MM-DD), included.")]
AsOf = Annotated[date | None, Query(alias="asOf", description="As of the end of this day (default today).")]


async def reports(uow: RequestUnitOfWork, request: Request) -> Reports:
    zones: ZoneCache = request.app.state.zones
    return Reports(uow.session, await zones.get(uow.session))


ReportsDep = Annotated[Reports, Depends(reports)]
router = APIRouter(prefix="/api/reports", tags=["reports"])
R = TypeVar("R", bound=BaseModel)


async def respond(request: Request, reports: Reports, fmt: ExportFormat, compute: Callable[[], Awaitable[R]],
                  table: Callable[[R], Table]) -> Response:
    """An aggregate report: its JSON (serialised once and shared by identical requests for a moment,
    see cache.py), or its export."""
    if fmt != ExportFormat.JSON:
        return export(table(await compute()), fmt)

    async def body() -> bytes:
        return (await compute()).model_dump_json(by_alias=True).encode()

    cache: ReportCache = request.app.state.report_cache
    key = (request.url.path, tuple(sorted(request.query_params.multi_items())), reports.zone.name,
           reports.zone.today())
    fresh = "no-cache" in request.headers.get("cache-control", "")
    return Response(await cache.get(key, body, fresh=fresh), media_type="application/json")


@router.get("/summary", response_model=Summary, responses=EXPORTS)
async def summary(_: AdminActor, reports: ReportsDep, request: Request, as_of: AsOf = None,
                  currency: CurrencyFilter = None, format: Format = ExportFormat.JSON) -> Response:
    """The dashboard (REP1), per currency: collected this month and year to date, invoiced, outstanding,
    overdue, MRR, ARR, active subscriptions."""
    code = check_currency(currency)
    day = as_of_day(as_of, reports.zone.today())
    return await respond(request, reports, format, lambda: reports.summary(day, code),
                         lambda report: tables.summary(report, code))


@router.get("/outstanding", response_model=Page[OutstandingInvoice], responses=EXPORTS)
async def outstanding(_: AdminActor, reports: ReportsDep, request: Request, page: PageParams,
                      currency: CurrencyFilter = None,
                      client_id: Annotated[str | None, Query(alias="clientId", max_length=64,
                                                             pattern=r"^[A-Za-z0-9_\-]+$")] = None,
                      format: Format = ExportFormat.JSON) -> Page[OutstandingInvoice] | Response:
    """Open invoices, the oldest due first (REP2): client, number, due date, amount due, days overdue.
    A page as every list; an export holds every row (so it takes no `limit` or `cursor`)."""
    code = check_currency(currency)
    if format == ExportFormat.JSON:
        return await reports.outstanding(page, code, client_id)
    if {"limit", "cursor"} & set(request.query_params):
        raise InvalidInput("An export holds every row: limit and cursor apply to the JSON pages only.",
                           details=[{"field": "format", "message": "no limit or cursor with an export"}])
    zone, db = reports.zone, request_database(request)

    async def rows() -> Any:
        async with db.transaction() as uow:  # its own: the request's ends before the body streams
            async for chunk in Reports(uow.session, zone).all_outstanding(code, client_id):
                yield chunk

    return export(tables.outstanding(rows(), zone.today(), zone.name, reports.generated_at.isoformat(), code,
                                     client_id), format)


@router.get("/ar-aging", response_model=Aging, responses=EXPORTS)
async def ar_aging(_: AdminActor, reports: ReportsDep, request: Request, as_of: AsOf = None,
                   group_by: Annotated[AgingGroup, Query(alias="groupBy")] = AgingGroup.CURRENCY,
                   currency: CurrencyFilter = None, format: Format = ExportFormat.JSON) -> Response:
    """What is owed as of a day by days past due: current, 1–30, 31–60, 61–90, over 90 (REP2), per
    currency or per client and currency."""
    code = check_currency(currency)
    day = as_of_day(as_of, reports.zone.today())
    return await respond(request, reports, format, lambda: reports.aging(day, group_by, code),
                         lambda report: tables.aging(report, code))


def _months(reports: Reports, start: date | None, end: date | None) -> Period:
    today = reports.zone.today()
    return period(start, end, default_start=default_months_back(today), default_end=today, whole_months=True)


@router.get("/revenue/monthly", response_model=MonthlyRevenue, responses=EXPORTS)
async def revenue_monthly(_: AdminActor, reports: ReportsDep, request: Request, from_: From = None, to: To = None,
                          basis: Basis = Basis.CASH, currency: CurrencyFilter = None,
                          format: Format = ExportFormat.JSON) -> Response:
    """One row per month of the range (whole months; twelve to this month by default), months without
    revenue as zero (REP3). Cash: received less refunded, on the day the money moved. Invoiced: invoices
    issued that month and not cancelled."""
    code = check_currency(currency)
    span = _months(reports, from_, to)
    return await respond(request, reports, format, lambda: reports.monthly_revenue(span, basis, code),
                         lambda report: tables.monthly_revenue(report, code))


@router.get("/payment-methods", response_model=PaymentMethods, responses=EXPORTS)
async def payment_methods(_: AdminActor, reports: ReportsDep, request: Request, from_: From = None, to: To = None,
                          currency: CurrencyFilter = None,
                          format: Format = ExportFormat.JSON) -> Response:
    """Payments per method (card, bank transfer, cash, cheque, other) with refunds netted (REP4); this
    year by default."""
    code = check_currency(currency)
    today = reports.zone.today()
    span = period(from_, to, default_start=today.replace(month=1, day=1), default_end=today)
    return await respond(request, reports, format, lambda: reports.payment_methods(span, code),
                         lambda report: tables.payment_methods(report, code))


@router.get("/mrr", response_model=Mrr, responses=EXPORTS)
async def mrr(_: AdminActor, reports: ReportsDep, request: Request, from_: From = None, to: To = None,
              currency: CurrencyFilter = None,
              format: Format = ExportFormat.JSON) -> Response:
    """MRR at the end of each month and its movements (new, expansion, contraction, churn, reactivation;
    net new), as Stripe Billing defines them; whole months, twelve to this month by default."""
    code = check_currency(currency)
    span = _months(reports, from_, to)
    return await respond(request, reports, format, lambda: reports.mrr(span, code),
                         lambda report: tables.mrr(report, code))


@router.get("/dso", response_model=Dso, responses=EXPORTS)
async def dso(_: AdminActor, reports: ReportsDep, request: Request, from_: From = None, to: To = None,
              currency: CurrencyFilter = None,
              format: Format = ExportFormat.JSON) -> Response:
    """Days sales outstanding = receivables at the end of the period ÷ sales invoiced in it × its days
    (the last 90 days by default)."""
    code = check_currency(currency)
    today = reports.zone.today()
    span = period(from_, to, default_start=days_back(today, 90), default_end=today)
    as_of_day(span.end, today)  # receivables of a day that has not ended do not exist yet
    return await respond(request, reports, format, lambda: reports.dso(span, code),
                         lambda report: tables.dso(report, code))


@router.get("/reconciliation", response_model=Reconciliation, responses=EXPORTS)
async def reconciliation(_: AdminActor, reports: ReportsDep, currency: CurrencyFilter = None,
                         format: Format = ExportFormat.JSON) -> Reconciliation | Response:
    """Per invoice, the payments recorded for it (less refunds) against its amountPaid; every mismatch
    (expected: none once the feed has caught up)."""
    code = check_currency(currency)
    report = await reports.reconciliation(code)
    return report if format == ExportFormat.JSON else export(tables.reconciliation(report, code), format)


def build_runtime(settings: ReportingSettings | None = None) -> tuple[ServiceRuntime, LiveFeed | None]:
    settings = settings or ReportingSettings()
    db = Database(settings.database_url, pool_size=settings.db_pool_size)
    runtime = ServiceRuntime(settings=settings, db=db, broker=make_broker(settings), migrations=MIGRATIONS)

    async def check_zone() -> None:
        async with db.transaction() as uow:
            built = (await uow.session.execute(
                text(f"SELECT value FROM {SCHEMA}.meta WHERE key = 'timezone'"))).scalar()
        if built and built != settings.timezone:
            log.warning("reporting_timezone_differs", setting=settings.timezone, read_models=built,
                        hint="the reports use the read models' zone until `python -m services.reporting rebuild`")

    runtime.on_startup.append(check_zone)
    live = None
    if settings.feed_enabled and settings.kafka_enabled:
        live = LiveFeed(Feed(db, default_zone=settings.timezone), settings)
        runtime.on_startup.append(live.start)
        runtime.on_shutdown.append(live.stop)
        # /metrics: the feed's lag from the positions it keeps with the read models (it commits none
        # to Kafka). Readiness: dead when its task has ended (it restarts itself on any error, so only
        # a cancellation or a BaseException ends it); not judged stuck, as which partitions this
        # replica holds is known only inside the feed's consumer.
        feed = live

        def feed_problem() -> str | None:
            task = feed._task  # noqa: SLF001 - the feed is this service's own
            return "dead: the feed task has ended" if task is not None and task.done() else None

        runtime.consumers.append(Subscription(name=f"consumer:{settings.group_id}:feed", group=settings.group_id,
                                              topics=tuple(settings.topics), assigned=set, problem=feed_problem,
                                              positions=live.feed.stored_positions))
    return runtime, live


def create_app(settings: ReportingSettings | None = None) -> FastAPI:
    settings = settings or ReportingSettings()
    runtime, live = build_runtime(settings)
    app = create_service_app(
        runtime,
        title="Reporting service",
        description="Revenue, outstanding and aging, payment methods, MRR, DSO and reconciliation, from read "
                    "models fed by Kafka events; every report also as CSV or xlsx.",
        routers=[router],
    )
    app.state.feed = live
    app.state.zones = ZoneCache(settings.timezone)
    app.state.report_cache = ReportCache(settings.report_cache_seconds,
                                         (lambda: live.generation) if live is not None else (lambda: 0))
    return app

