"""The reports, read from the read models (never from another service).

Day-based figures come from the daily aggregates; "as of" a past day, what an invoice still owed is
what it owes now plus the payments (less refunds) recorded for it after that day, for invoices
issued by then and not yet cancelled then. Currencies are never added together.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession

from kit.clock import utcnow
from kit.pagination import Page, PageRequest, SortKey, paginate
from services.reporting.models import OPEN_SQL, SCHEMA
from services.reporting.models import Invoice as InvoiceRow
from services.reporting.periods import Period, Zone, month_end, month_label, months
from services.reporting.projection import METHODS
from services.reporting.schemas import (
    Aging,
    AgingGroup,
    AgingRow,
    Basis,
    Dso,
    DsoRow,
    MethodRow,
    Mismatch,
    MonthAmount,
    MonthlyRevenue,
    Mrr,
    MrrMonth,
    OutstandingInvoice,
    PaymentMethods,
    Reconciliation,
    RevenueMonth,
    Summary,
    SummaryRow,
)
from services.reporting.subscriptions import PAYING_STATUSES

_PAYING_SQL = "(" + ", ".join(f"'{status}'" for status in sorted(PAYING_STATUSES)) + ")"


def whole(amount: Decimal | int | None) -> int:
    """An exact amount (e.g. MRR, in fractions of a minor unit) as whole minor units, half up."""
    if amount is None:
        return 0
    return int(Decimal(amount).quantize(Decimal(1), rounding=ROUND_HALF_UP))


async def read_zone(session: AsyncSession, default: str) -> Zone:
    """The zone the read models were built for (the setting until the first event arrives)."""
    value = (await session.execute(text(f"SELECT value FROM {SCHEMA}.meta WHERE key = 'timezone'"))).scalar()
    return Zone(str(value) if value else default)


class ZoneCache:
    """The read models' zone, read again every few seconds (it changes only with a rebuild)."""

    def __init__(self, default: str, ttl: float = 2.0) -> None:
        self.default = default
        self.ttl = ttl
        self._zone: Zone | None = None
        self._until = 0.0

    async def get(self, session: AsyncSession) -> Zone:
        now = time.monotonic()
        if self._zone is None or now >= self._until:
            self._zone, self._until = await read_zone(session, self.default), now + self.ttl
        return self._zone


@dataclass(frozen=True)
class Receivable:
    invoice_id: str
    number: str | None
    currency: str
    client_id: str
    client_name: str | None
    issue_date: date | None
    due_date: date | None
    due: int


def receivables_sql(where: str = "", group: str = "") -> str:
    """Invoices with what each still owed at the end of :day (:end = the first instant after it)."""
    return f"""
        WITH later AS (
            SELECT invoice_id, SUM(amount) AS amount FROM {SCHEMA}.ledger WHERE occurred_at >= :end
            GROUP BY invoice_id
        ), candidates AS (
            SELECT id FROM {SCHEMA}.invoices WHERE {OPEN_SQL}
            UNION SELECT id FROM {SCHEMA}.invoices WHERE status = 'CANCELLED' AND cancelled_at >= :end
            UNION SELECT invoice_id FROM later
        ), owed AS (
            SELECT i.id, i.number, i.currency, i.client_id, i.client_name, i.issue_date, i.due_date,
                   i.changed_at, i.total - i.amount_paid + COALESCE(l.amount, 0) AS due
            FROM candidates c JOIN {SCHEMA}.invoices i ON i.id = c.id LEFT JOIN later l ON l.invoice_id = i.id
            WHERE i.status <> 'DRAFT' AND i.issue_date <= :day
              AND (i.cancelled_at IS NULL OR i.cancelled_at >= :end)
        )
        SELECT {group or '*'} FROM owed WHERE due > 0 {where}
    """


class Reports:
    def __init__(self, session: AsyncSession, zone: Zone) -> None:
        self.session = session
        self.zone = zone
        self.generated_at = utcnow()

    def head(self) -> dict[str, Any]:
        return {"generated_at": self.generated_at, "timezone": self.zone.name}

    async def _rows(self, sql: str, **params: Any) -> Sequence[Any]:
        return (await self.session.execute(text(sql), params)).all()

    # summary ----------------------------------------------------------------------------------------

    async def summary(self, as_of: date, currency: str | None) -> Summary:
        """One statement (the dashboard is the most asked-for report): four parts, each a row per
        currency of (part, currency, a, b, c, d)."""
        only = "AND currency = :currency" if currency else ""
        today = as_of == self.zone.today()
        numbers = "::numeric, ".join(("a", "b", "c", "d")) + "::numeric"
        parts = [
            f"SELECT 'cash' AS part, currency, SUM(paid - refunded) FILTER (WHERE day >= :month) AS a, "
            f"SUM(paid - refunded) AS b, NULL::numeric AS c, NULL::numeric AS d FROM {SCHEMA}.cash_daily "
            f"WHERE day BETWEEN :year AND :day {only} GROUP BY currency",
            f"SELECT 'invoiced', currency, SUM(amount) FILTER (WHERE day >= :month), SUM(amount), NULL::numeric, "
            "NULL::numeric "
            f"FROM {SCHEMA}.invoiced_daily WHERE day BETWEEN :year AND :day {only} GROUP BY currency",
            # what open invoices owe: kept per due date for today, worked out from the ledger for a past day
            f"SELECT 'owed', currency, SUM(amount), SUM(invoices), SUM(amount) FILTER (WHERE due_date < :day), "
            f"SUM(invoices) FILTER (WHERE due_date < :day) FROM {SCHEMA}.open_by_due WHERE true {only} "
            "GROUP BY currency HAVING SUM(invoices) > 0" if today else
            receivables_sql(only, "'owed', currency, SUM(due), COUNT(*), SUM(due) FILTER (WHERE due_date < :day), "
                                  "COUNT(*) FILTER (WHERE due_date < :day)") + " GROUP BY currency",
            f"SELECT 'subscriptions', currency, SUM(mrr), COUNT(*) FILTER (WHERE status IN {_PAYING_SQL}), "
            "COUNT(*) FILTER (WHERE status = 'trialing'), NULL::numeric FROM "
            + (f"{SCHEMA}.subscriptions" if today else
               f"(SELECT DISTINCT ON (subscription_id) currency, status, mrr FROM {SCHEMA}.subscription_changes "
               "WHERE effective_at < :end ORDER BY subscription_id, version DESC) s")
            + f" WHERE currency IS NOT NULL {only} GROUP BY currency",
        ]
        sql = (f"SELECT part, currency, {numbers} FROM ("
               + " UNION ALL ".join(f"({part})" for part in parts) + ") summary")
        rows: dict[str, dict[str, int]] = defaultdict(dict)
        for r in await self._rows(sql, month=as_of.replace(day=1), year=as_of.replace(month=1, day=1), day=as_of,
                                  end=self.zone.end_of(as_of), currency=currency):
            a, b, c, d = r.a or 0, r.b or 0, r.c or 0, r.d or 0
            figures = rows[r.currency]
            if r.part == "cash":
                figures.update(collected_this_month=int(a), collected_year_to_date=int(b))
            elif r.part == "invoiced":
                figures.update(invoiced_this_month=int(a), invoiced_year_to_date=int(b))
            elif r.part == "owed":
                figures.update(outstanding=int(a), open_invoices=int(b), overdue=int(c), overdue_invoices=int(d))
            else:
                figures.update(mrr=whole(a), arr=whole(a * 12), active_subscriptions=int(b),
                               trialing_subscriptions=int(c))
        names = [name for name in SummaryRow.model_fields if name != "currency"]
        return Summary(**self.head(), as_of=as_of, currencies=[
            SummaryRow(currency=code, **{name: figures.get(name, 0) for name in names})
            for code, figures in sorted(rows.items())
        ])

    # outstanding ------------------------------------------------------------------------------------

    def _outstanding_query(self, currency: str | None, client_id: str | None) -> Any:
        stmt = select(InvoiceRow).where(text(OPEN_SQL))
        if currency:
            stmt = stmt.where(InvoiceRow.currency == currency)
        if client_id:
            stmt = stmt.where(InvoiceRow.client_id == client_id)
        return stmt

    def _outstanding_item(self, row: InvoiceRow, today: date) -> OutstandingInvoice:
        overdue = (today - row.due_date).days if row.due_date else 0
        return OutstandingInvoice(
            invoice_id=row.id, invoice_number=row.number, client_id=row.client_id, client_name=row.client_name,
            currency=row.currency, status=row.status, issue_date=row.issue_date, due_date=row.due_date,
            total=row.total, amount_paid=row.amount_paid, amount_due=row.amount_due, days_overdue=max(0, overdue),
        )

    _OUTSTANDING_ORDER = (SortKey(InvoiceRow.due_date, nullable=True), SortKey(InvoiceRow.id))

    async def outstanding(self, page: PageRequest, currency: str | None,
                          client_id: str | None) -> Page[OutstandingInvoice]:
        today = self.zone.today()
        result = await paginate(self.session, self._outstanding_query(currency, client_id),
                                order=self._OUTSTANDING_ORDER, page=page, with_total=True,
                                scope=f"outstanding:{currency or ''}:{client_id or ''}")
        return Page[OutstandingInvoice](items=[self._outstanding_item(r, today) for r in result.items],
                                        next_cursor=result.next_cursor, has_more=result.has_more,
                                        total=result.total)

    async def all_outstanding(self, currency: str | None, client_id: str | None,
                              chunk: int = 2000) -> AsyncIterator[list[OutstandingInvoice]]:
        """Every open invoice in the list's order, in chunks, from a server-side cursor."""
        today = self.zone.today()
        stmt = self._outstanding_query(currency, client_id).order_by(
            InvoiceRow.due_date.asc().nulls_last(), InvoiceRow.id).execution_options(yield_per=chunk)
        result = await self.session.stream_scalars(stmt)
        async for rows in result.partitions(chunk):
            yield [self._outstanding_item(row, today) for row in rows]

    # aging ------------------------------------------------------------------------------------------

    async def aging(self, as_of: date, group_by: AgingGroup, currency: str | None) -> Aging:
        only = "AND currency = :currency" if currency else ""
        buckets = ("SUM(due) FILTER (WHERE due_date IS NULL OR due_date >= :day) AS current, "
                   "SUM(due) FILTER (WHERE :day - due_date BETWEEN 1 AND 30) AS d30, "
                   "SUM(due) FILTER (WHERE :day - due_date BETWEEN 31 AND 60) AS d60, "
                   "SUM(due) FILTER (WHERE :day - due_date BETWEEN 61 AND 90) AS d90, "
                   "SUM(due) FILTER (WHERE :day - due_date > 90) AS over, SUM(due) AS total, COUNT(*) AS n")
        by_client = group_by == AgingGroup.CLIENT
        keys = ("currency, client_id, (array_agg(client_name ORDER BY changed_at DESC))[1] AS client_name"
                if by_client else "currency")
        grouping = " GROUP BY currency, client_id ORDER BY currency, client_name, client_id" if by_client \
            else " GROUP BY currency ORDER BY currency"
        found = await self._rows(receivables_sql(only, f"{keys}, {buckets}") + grouping,
                                 day=as_of, end=self.zone.end_of(as_of), currency=currency)

        def row(r: Any) -> AgingRow:
            return AgingRow(currency=r.currency, client_id=getattr(r, "client_id", None) if by_client else None,
                            client_name=getattr(r, "client_name", None) if by_client else None,
                            current=r.current or 0, days_1_to_30=r.d30 or 0, days_31_to_60=r.d60 or 0,
                            days_61_to_90=r.d90 or 0, over_90=r.over or 0, total=r.total or 0, invoices=r.n)

        rows = [row(r) for r in found]
        totals: dict[str, AgingRow] = {}
        for item in rows:
            held = totals.get(item.currency)
            if held is None:
                totals[item.currency] = item.model_copy(update={"client_id": None, "client_name": None})
                continue
            totals[item.currency] = held.model_copy(update={
                name: getattr(held, name) + getattr(item, name)
                for name in ("current", "days_1_to_30", "days_31_to_60", "days_61_to_90", "over_90", "total",
                             "invoices")
            })
        return Aging(**self.head(), as_of=as_of, group_by=group_by, rows=rows,
                     totals=[totals[c] for c in sorted(totals)])

    # monthly revenue --------------------------------------------------------------------------------

    async def monthly_revenue(self, period: Period, basis: Basis, currency: str | None) -> MonthlyRevenue:
        only = "AND currency = :currency" if currency else ""
        if basis == Basis.CASH:
            sql = (f"SELECT currency, date_trunc('month', day)::date AS month, SUM(paid - refunded) AS amount, "
                   f"SUM(payments) AS n FROM {SCHEMA}.cash_daily WHERE day BETWEEN :start AND :end {only} "
                   "GROUP BY 1, 2")
        else:
            sql = (f"SELECT currency, date_trunc('month', day)::date AS month, SUM(amount) AS amount, "
                   f"SUM(invoices) AS n FROM {SCHEMA}.invoiced_daily WHERE day BETWEEN :start AND :end {only} "
                   "GROUP BY 1, 2")
        found = {(r.currency, r.month): (int(r.amount or 0), int(r.n or 0))
                 for r in await self._rows(sql, start=period.start, end=period.end, currency=currency)}
        currencies = sorted({c for c, _ in found} | ({currency} if currency else set()))
        month_rows, totals = [], {c: [0, 0] for c in currencies}
        for first in period.month_starts():
            amounts = []
            for code in currencies:
                amount, count = found.get((code, first), (0, 0))
                totals[code][0] += amount
                totals[code][1] += count
                amounts.append(MonthAmount(currency=code, amount=amount, count=count))
            month_rows.append(RevenueMonth(month=month_label(first), start=first, end=month_end(first),
                                           amounts=amounts))
        return MonthlyRevenue(**self.head(), basis=basis, from_=period.start, to=period.end, currencies=currencies,
                              months=month_rows,
                              totals=[MonthAmount(currency=c, amount=a, count=n) for c, (a, n) in totals.items()])

    # payment methods --------------------------------------------------------------------------------

    async def payment_methods(self, period: Period, currency: str | None) -> PaymentMethods:
        only = "AND currency = :currency" if currency else ""
        found = {
            (r.currency, r.method): r
            for r in await self._rows(
                "SELECT currency, method, SUM(payments) AS payments, SUM(paid) AS paid, SUM(refunds) AS refunds, "
                f"SUM(refunded) AS refunded FROM {SCHEMA}.cash_daily WHERE day BETWEEN :start AND :end {only} "
                "GROUP BY currency, method", start=period.start, end=period.end, currency=currency,
            )
        }
        currencies = sorted({c for c, _ in found} | ({currency} if currency else set()))
        rows = []
        for code in currencies:
            for method in METHODS:
                r = found.get((code, method))
                paid, refunded = (int(r.paid or 0), int(r.refunded or 0)) if r else (0, 0)
                rows.append(MethodRow(currency=code, method=method, count=int(r.payments or 0) if r else 0,
                                      amount=paid - refunded, gross_amount=paid,
                                      refund_count=int(r.refunds or 0) if r else 0, refunded_amount=refunded))
        return PaymentMethods(**self.head(), from_=period.start, to=period.end, rows=rows)

    # MRR --------------------------------------------------------------------------------------------

    async def mrr(self, period: Period, currency: str | None) -> Mrr:
        only = "AND currency = :currency" if currency else ""
        history = await self._rows(
            "SELECT subscription_id, version, client_id, currency, status, mrr, effective_at "
            f"FROM {SCHEMA}.subscription_changes WHERE currency IS NOT NULL AND effective_at < :end {only} "
            "ORDER BY effective_at, client_id, currency, subscription_id, version",
            end=self.zone.end_of(period.end), currency=currency,
        )
        walk = MrrWalk(self.zone, period)
        walk.run(history)
        currencies = sorted(walk.currencies | ({currency} if currency else set()))
        return Mrr(**self.head(), from_=period.start, to=period.end, currencies=currencies,
                   months=walk.months(currencies))

    # DSO --------------------------------------------------------------------------------------------

    async def dso(self, period: Period, currency: str | None) -> Dso:
        only = "AND currency = :currency" if currency else ""
        receivables = {r.currency: int(r.owed) for r in await self._rows(
            receivables_sql(only, "currency, SUM(due) AS owed") + " GROUP BY currency",
            day=period.end, end=self.zone.end_of(period.end), currency=currency)}
        sales = {r.currency: int(r.amount) for r in await self._rows(
            f"SELECT currency, SUM(amount) AS amount FROM {SCHEMA}.invoiced_daily "
            f"WHERE day BETWEEN :start AND :end {only} GROUP BY currency",
            start=period.start, end=period.end, currency=currency)}
        rows = []
        for code in sorted(set(receivables) | set(sales) | ({currency} if currency else set())):
            owed, sold = receivables.get(code, 0), sales.get(code, 0)
            dso = (Decimal(owed) / Decimal(sold) * period.days).quantize(Decimal("0.1"), ROUND_HALF_UP) \
                if sold > 0 else None
            rows.append(DsoRow(currency=code, receivables=owed, sales=sold, days=period.days, dso=dso))
        return Dso(**self.head(), from_=period.start, to=period.end, rows=rows)

    # reconciliation ---------------------------------------------------------------------------------

    async def reconciliation(self, currency: str | None) -> Reconciliation:
        only = "AND COALESCE(i.currency, t.currency) = :currency" if currency else ""
        found = await self._rows(
            "SELECT COALESCE(i.id, t.invoice_id) AS invoice_id, i.number, i.client_name, i.status, "
            "i.currency, i.amount_paid, t.currency AS recorded_currency, COALESCE(t.amount, 0) AS recorded, "
            f"COALESCE(t.entries, 0) AS entries FROM {SCHEMA}.invoices i "
            f"FULL OUTER JOIN {SCHEMA}.ledger_totals t ON t.invoice_id = i.id "
            "WHERE (i.id IS NULL OR (t.invoice_id IS NULL AND i.amount_paid <> 0) "
            "OR (t.currency <> i.currency AND t.amount <> 0) "
            "OR (t.currency = i.currency AND t.amount <> i.amount_paid)) "
            f"{only} ORDER BY 1, recorded_currency", currency=currency,
        )
        mismatches = [self._mismatch(r) for r in found]
        counts = (await self._rows(
            f"SELECT (SELECT COUNT(*) FROM {SCHEMA}.invoices) AS invoices, "
            f"(SELECT COUNT(*) FROM {SCHEMA}.ledger) AS entries, "
            f"(SELECT COUNT(*) FROM {SCHEMA}.rejected_events) AS rejected"))[0]
        return Reconciliation(**self.head(), invoices_checked=counts.invoices, ledger_entries=counts.entries,
                              mismatches=mismatches, rejected_events=counts.rejected)

    @staticmethod
    def _mismatch(r: Any) -> Mismatch:
        if r.currency is None:
            problem, difference = "no_invoice", None
        elif r.recorded_currency is None:
            problem, difference = "no_payments", -int(r.amount_paid)
        elif r.recorded_currency != r.currency:
            problem, difference = "currency_differs", None
        else:
            problem, difference = "amount_differs", int(r.recorded) - int(r.amount_paid)
        return Mismatch(invoice_id=r.invoice_id, invoice_number=r.number, client_name=r.client_name,
                        status=r.status, currency=r.currency, amount_paid=r.amount_paid,
                        recorded_currency=r.recorded_currency, recorded=int(r.recorded), entries=int(r.entries),
                        difference=difference, problem=problem)


class MrrWalk:
    """MRR movements from the history of every subscription's MRR, in effective order.

    Per client and currency (Stripe Billing's subscriber level), each moment something changes:
    from nothing to something is new MRR, or reactivation if the client had MRR before; from
    something to nothing is churn; up or down otherwise is expansion or contraction. Changes of one
    client at the same instant (a plan switch as cancel + create) count as one move.
    """

    KINDS = ("new", "expansion", "contraction", "churn", "reactivation")

    def __init__(self, zone: Zone, period: Period) -> None:
        self.zone = zone
        self.period = period
        self.currencies: set[str] = set()
        self._subs: dict[tuple[str, str], dict[str, tuple[int, Decimal, str]]] = defaultdict(dict)
        self._ever: set[tuple[str, str]] = set()
        self._moves: dict[tuple[date, str], dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
        self._ends: dict[tuple[date, str], tuple[Decimal, int, int]] = {}

    def _client_mrr(self, key: tuple[str, str]) -> Decimal:
        return sum((mrr for _, mrr, _ in self._subs[key].values()), Decimal(0))

    def _snapshot(self, month_first: date) -> None:
        per_currency: dict[str, list[Any]] = defaultdict(lambda: [Decimal(0), 0, 0])
        for (_, code), subs in self._subs.items():
            total = sum((mrr for _, mrr, _ in subs.values()), Decimal(0))
            figures = per_currency[code]
            figures[0] += total
            figures[1] += sum(1 for _, _, status in subs.values() if status in PAYING_STATUSES)
            figures[2] += 1 if total > 0 else 0
        for code, (mrr, active, customers) in per_currency.items():
            self._ends[(month_first, code)] = (mrr, active, customers)

    def run(self, history: Iterable[Any]) -> None:
        month_starts = self.period.month_starts()
        month_ends = [self.zone.end_of(month_end(first)) for first in month_starts]
        next_month = 0
        for step in _steps(history):
            at = step[0].effective_at
            while next_month < len(month_starts) and at >= month_ends[next_month]:
                self._snapshot(month_starts[next_month])
                next_month += 1
            self._apply(step)
        while next_month < len(month_starts):
            self._snapshot(month_starts[next_month])
            next_month += 1

    def _apply(self, step: Sequence[Any]) -> None:
        first = step[0]
        key = (first.client_id, first.currency)
        self.currencies.add(first.currency)
        before, had_before = self._client_mrr(key), key in self._ever
        for change in step:
            held = self._subs[key].get(change.subscription_id)
            if held is None or held[0] < change.version:
                self._subs[key][change.subscription_id] = (change.version, Decimal(change.mrr), change.status)
        after = self._client_mrr(key)
        if after > 0:
            self._ever.add(key)
        if after == before:
            return
        day = self.zone.day_of(first.effective_at)
        if not self.period.start <= day <= self.period.end:
            return
        if before == 0:
            kind = "reactivation" if had_before else "new"
        elif after == 0:
            kind = "churn"
        else:
            kind = "expansion" if after > before else "contraction"
        self._moves[(day.replace(day=1), first.currency)][kind] += abs(after - before)

    def months(self, currencies: Sequence[str]) -> list[MrrMonth]:
        out = []
        for first in self.period.month_starts():
            for code in currencies:
                moves = self._moves.get((first, code), {})
                figures = {kind: whole(moves.get(kind)) for kind in self.KINDS}
                mrr, active, customers = self._ends.get((first, code), (Decimal(0), 0, 0))
                out.append(MrrMonth(
                    month=month_label(first), currency=code, mrr=whole(mrr), **figures,
                    net_new=figures["new"] + figures["expansion"] + figures["reactivation"]
                    - figures["contraction"] - figures["churn"],
                    active_subscriptions=active, customers=customers,
                ))
        return out


def _steps(history: Iterable[Any]) -> Iterable[list[Any]]:
    """History rows (sorted by time, client, currency) grouped by (time, client, currency)."""
    step: list[Any] = []
    for row in history:
        if step and (row.effective_at, row.client_id, row.currency) != (
                step[0].effective_at, step[0].client_id, step[0].currency):
            yield step
            step = []
        step.append(row)
    if step:
        yield step


def default_months_back(today: date, count: int = 12) -> date:
    """The first day of the month `count - 1` months before today's (a year of months by default)."""
    return months(date(today.year - 2, 1, 1), today)[-count]


def days_back(today: date, days: int) -> date:
    return today - timedelta(days=days - 1)

