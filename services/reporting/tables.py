"""Each report as a table for the CSV and Excel exports: the same figures as its JSON, row by row."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import date
from typing import Any

from services.reporting.exports import Column, Kind, Table, chunks_of
from services.reporting.schemas import (
    Aging,
    AgingGroup,
    Dso,
    MonthlyRevenue,
    Mrr,
    OutstandingInvoice,
    PaymentMethods,
    Reconciliation,
    ReportHead,
    Summary,
)

A, N = Kind.AMOUNT, Kind.COUNT


def filters(title: str, head: ReportHead, **used: object) -> list[tuple[str, str]]:
    out = [("Report", title)]
    for name, value in used.items():
        out.append((name.rstrip("_").replace("_", " ").capitalize(), "all" if value is None else str(value)))
    out += [("Time zone", head.timezone), ("Generated at", head.generated_at.isoformat())]
    return out


def summary(report: Summary, currency: str | None) -> Table:
    columns = [Column("Currency"), Column("Collected this month", A), Column("Collected year to date", A),
               Column("Invoiced this month", A), Column("Invoiced year to date", A), Column("Outstanding", A),
               Column("Open invoices", N), Column("Overdue", A), Column("Overdue invoices", N), Column("MRR", A),
               Column("ARR", A), Column("Active subscriptions", N), Column("Trialing subscriptions", N)]
    rows = [(r.currency, r.collected_this_month, r.collected_year_to_date, r.invoiced_this_month,
             r.invoiced_year_to_date, r.outstanding, r.open_invoices, r.overdue, r.overdue_invoices, r.mrr, r.arr,
             r.active_subscriptions, r.trialing_subscriptions) for r in report.currencies]
    return Table(f"summary-{report.as_of}", columns, chunks_of(rows),
                 filters("Summary", report, as_of=report.as_of, currency=currency))


OUTSTANDING_COLUMNS = [
    Column("Invoice number"), Column("Client"), Column("Currency"), Column("Status"), Column("Issue date", Kind.DATE),
    Column("Due date", Kind.DATE), Column("Total", A, total=True), Column("Paid", A, total=True),
    Column("Amount due", A, total=True), Column("Days overdue", N), Column("Client id"), Column("Invoice id"),
]


def outstanding_row(r: OutstandingInvoice) -> tuple[Any, ...]:
    return (r.invoice_number, r.client_name, r.currency, r.status, r.issue_date, r.due_date, r.total, r.amount_paid,
            r.amount_due, r.days_overdue, r.client_id, r.invoice_id)


def outstanding(rows: AsyncIterator[list[OutstandingInvoice]], today: date, timezone: str, generated: str,
                currency: str | None, client_id: str | None) -> Table:
    async def chunks() -> AsyncIterator[Sequence[Sequence[Any]]]:
        async for chunk in rows:
            yield [outstanding_row(r) for r in chunk]

    used = [("Report", "Outstanding invoices"), ("As of", str(today)), ("Currency", currency or "all"),
            ("Client id", client_id or "all"), ("Time zone", timezone), ("Generated at", generated)]
    return Table(f"outstanding-{today}", OUTSTANDING_COLUMNS, chunks(), used)


def aging(report: Aging, currency: str | None) -> Table:
    by_client = report.group_by == AgingGroup.CLIENT
    buckets = [Column(title, A, total=by_client) for title in ("Current", "1-30 days", "31-60 days", "61-90 days",
                                                               "Over 90 days", "Total")]
    columns = ([Column("Client"), Column("Client id")] if by_client else []) + [Column("Currency"), *buckets,
                                                                                 Column("Invoices", N, total=by_client)]
    rows = [((r.client_name, r.client_id) if by_client else ()) + (
        r.currency, r.current, r.days_1_to_30, r.days_31_to_60, r.days_61_to_90, r.over_90, r.total, r.invoices)
        for r in report.rows]
    return Table(f"ar-aging-{report.as_of}", columns, chunks_of(rows),
                 filters("Accounts receivable aging", report, as_of=report.as_of, group_by=report.group_by.value,
                         currency=currency))


def monthly_revenue(report: MonthlyRevenue, currency: str | None) -> Table:
    columns = [Column("Month", Kind.MONTH), Column("Currency"), Column("Amount", A, total=True),
               Column("Count", N, total=True)]
    rows = [(month.start, a.currency, a.amount, a.count) for month in report.months for a in month.amounts]
    return Table(f"revenue-monthly-{report.basis.value}-{report.from_}-{report.to}", columns, chunks_of(rows),
                 filters("Monthly revenue", report, basis=report.basis.value, from_=report.from_, to=report.to,
                         currency=currency))


def payment_methods(report: PaymentMethods, currency: str | None) -> Table:
    columns = [Column("Currency"), Column("Method"), Column("Payments", N, total=True),
               Column("Amount (net)", A, total=True), Column("Received", A, total=True),
               Column("Refunds", N, total=True), Column("Refunded", A, total=True)]
    rows = [(r.currency, r.method, r.count, r.amount, r.gross_amount, r.refund_count, r.refunded_amount)
            for r in report.rows]
    return Table(f"payment-methods-{report.from_}-{report.to}", columns, chunks_of(rows),
                 filters("Payment methods", report, from_=report.from_, to=report.to, currency=currency))


def mrr(report: Mrr, currency: str | None) -> Table:
    columns = [Column("Month", Kind.MONTH), Column("Currency"), Column("MRR", A)] + [
        Column(title, A, total=True) for title in ("New", "Expansion", "Contraction", "Churn", "Reactivation",
                                                   "Net new")] + [Column("Active subscriptions", N),
                                                                  Column("Customers", N)]
    rows = [(date.fromisoformat(m.month + "-01"), m.currency, m.mrr, m.new, m.expansion, m.contraction, m.churn,
             m.reactivation, m.net_new, m.active_subscriptions, m.customers) for m in report.months]
    return Table(f"mrr-{report.from_}-{report.to}", columns, chunks_of(rows),
                 filters("MRR", report, from_=report.from_, to=report.to, currency=currency))


def dso(report: Dso, currency: str | None) -> Table:
    columns = [Column("Currency"), Column("Receivables", A), Column("Sales", A), Column("Days", N),
               Column("DSO", Kind.DECIMAL)]
    rows = [(r.currency, r.receivables, r.sales, r.days, r.dso) for r in report.rows]
    return Table(f"dso-{report.from_}-{report.to}", columns, chunks_of(rows),
                 filters("Days sales outstanding", report, from_=report.from_, to=report.to, currency=currency))


def reconciliation(report: Reconciliation, currency: str | None) -> Table:
    columns = [Column("Invoice id"), Column("Invoice number"), Column("Client"), Column("Status"), Column("Currency"),
               Column("Amount paid", A), Column("Recorded currency"), Column("Recorded", A, currency_at=6),
               Column("Entries", N), Column("Difference", A), Column("Problem")]
    rows = [(m.invoice_id, m.invoice_number, m.client_name, m.status, m.currency or m.recorded_currency,
             m.amount_paid, m.recorded_currency, m.recorded, m.entries, m.difference, m.problem)
            for m in report.mismatches]
    return Table("reconciliation", columns, chunks_of(rows),
                 filters("Reconciliation", report, currency=currency, invoices_checked=report.invoices_checked,
                         ledger_entries=report.ledger_entries, rejected_events=report.rejected_events))
