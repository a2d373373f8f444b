"""JSON bodies of the reports (camelCase). Amounts are integers in minor units next to their currency."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class Out(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


class ExportFormat(StrEnum):
    JSON = "json"
    CSV = "csv"
    XLSX = "xlsx"


class Basis(StrEnum):
    CASH = "cash"  # money received, less refunds, on the day it moved
    INVOICED = "invoiced"  # invoices issued (and not cancelled), on their issue date


class AgingGroup(StrEnum):
    CURRENCY = "currency"
    CLIENT = "client"


class ReportHead(Out):
    generated_at: datetime
    timezone: str = Field(description="IANA zone whose calendar days and months the report uses.")


# summary --------------------------------------------------------------------------------------------


class SummaryRow(Out):
    currency: str
    collected_this_month: int = Field(description="Payments less refunds from the 1st of asOf's month to asOf.")
    collected_year_to_date: int
    invoiced_this_month: int = Field(description="Invoices issued this month that stand (not cancelled).")
    invoiced_year_to_date: int
    outstanding: int = Field(description="Still owed on open invoices as of asOf.")
    open_invoices: int
    overdue: int = Field(description="The part of `outstanding` past its due date.")
    overdue_invoices: int
    mrr: int = Field(description="Monthly recurring revenue (subscriptions active or past due), minor units.")
    arr: int = Field(description="12 × MRR.")
    active_subscriptions: int
    trialing_subscriptions: int


class Summary(ReportHead):
    as_of: date
    currencies: list[SummaryRow]


# outstanding ----------------------------------------------------------------------------------------


class OutstandingInvoice(Out):
    invoice_id: str
    invoice_number: str | None
    client_id: str
    client_name: str | None
    currency: str
    status: str
    issue_date: date | None
    due_date: date | None
    total: int
    amount_paid: int
    amount_due: int
    days_overdue: int = Field(description="Days past the due date today (0 when not yet due).")


# aging ----------------------------------------------------------------------------------------------


class AgingRow(Out):
    currency: str
    client_id: str | None = None
    client_name: str | None = None
    current: int = Field(description="Not yet past due.")
    days_1_to_30: int = Field(alias="days1To30")
    days_31_to_60: int = Field(alias="days31To60")
    days_61_to_90: int = Field(alias="days61To90")
    over_90: int = Field(alias="over90")
    total: int
    invoices: int


class Aging(ReportHead):
    as_of: date
    group_by: AgingGroup
    rows: list[AgingRow]
    totals: list[AgingRow] = Field(description="One row per currency.")


# monthly revenue ------------------------------------------------------------------------------------


class MonthAmount(Out):
    currency: str
    amount: int
    count: int = Field(description="Payments (cash basis) or invoices (invoiced basis).")


class RevenueMonth(Out):
    month: str = Field(description="YYYY-MM")
    start: date
    end: date
    amounts: list[MonthAmount] = Field(description="Every currency of the report, zero when nothing moved.")


class MonthlyRevenue(ReportHead):
    basis: Basis
    from_: date = Field(alias="from")
    to: date
    currencies: list[str]
    months: list[RevenueMonth]
    totals: list[MonthAmount]


# payment methods ------------------------------------------------------------------------------------


class MethodRow(Out):
    currency: str
    method: str
    count: int = Field(description="Payments received.")
    amount: int = Field(description="Received less refunded.")
    gross_amount: int
    refund_count: int
    refunded_amount: int


class PaymentMethods(ReportHead):
    from_: date = Field(alias="from")
    to: date
    rows: list[MethodRow]


# MRR ------------------------------------------------------------------------------------------------


class MrrMonth(Out):
    month: str
    currency: str
    mrr: int = Field(description="MRR at the end of the month.")
    new: int
    expansion: int
    contraction: int
    churn: int
    reactivation: int
    net_new: int = Field(description="new + expansion + reactivation − contraction − churn")
    active_subscriptions: int
    customers: int = Field(description="Clients with MRR at the end of the month.")


class Mrr(ReportHead):
    from_: date = Field(alias="from")
    to: date
    currencies: list[str]
    months: list[MrrMonth]


# DSO ------------------------------------------------------------------------------------------------


class DsoRow(Out):
    currency: str
    receivables: int = Field(description="Owed on invoices at the end of the period.")
    sales: int = Field(description="Invoiced in the period (invoices that stand).")
    days: int
    dso: Decimal | None = Field(description="receivables ÷ sales × days, one decimal; null without sales.")


class Dso(ReportHead):
    from_: date = Field(alias="from")
    to: date
    rows: list[DsoRow]


# reconciliation -------------------------------------------------------------------------------------


class Mismatch(Out):
    invoice_id: str
    invoice_number: str | None
    client_name: str | None
    status: str | None
    currency: str | None = Field(description="The invoice's currency (null: no invoice seen).")
    amount_paid: int | None = Field(description="amountPaid on the newest invoice snapshot.")
    recorded_currency: str | None
    recorded: int = Field(description="Σ of the payments less refunds recorded for it.")
    entries: int
    difference: int | None = Field(description="recorded − amountPaid (same currency only).")
    problem: str = Field(description="amount_differs | currency_differs | no_invoice | no_payments")


class Reconciliation(ReportHead):
    invoices_checked: int
    ledger_entries: int
    mismatches: list[Mismatch]
    rejected_events: int = Field(description="Events the read models could not use (kept for inspection).")
