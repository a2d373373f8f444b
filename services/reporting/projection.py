"""What events do to the read models.

A batch of events is first gathered into `Changes` by the handlers of the dispatch table (one short
handler per event type; the payload is parsed with its contract model there, at the edge), then
written with one statement per table. Each effect is safe to see twice and in any order:
* an invoice or subscription copy takes a snapshot only when its version is strictly newer
  (kit.replica's rule), and the aggregates move by the difference between the old and new copy;
* a payment or refund is a ledger row keyed by its own id: the second sighting inserts nothing and
  so moves no aggregate.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from contracts.envelope import CloudEvent
from contracts.invoice import OPEN_STATUSES, InvoiceEventType, InvoiceSnapshotV1, InvoiceStatus
from contracts.payment import PaymentEventType, PaymentEventV1
from contracts.subscription import SubscriptionEventType, SubscriptionSnapshotV1
from services.reporting.periods import Zone
from services.reporting.subscriptions import SubscriptionState, state_of

# Kept under this due date in open_by_due: an open invoice without one is never overdue.
NO_DUE_DATE = date.max
METHODS = ("card", "bank_transfer", "cash", "cheque", "other")
# Stripe's payment method types (and our manual ones) by the method group the reports show.
_METHOD_GROUPS = {
    "card": "card", "link": "card", "apple_pay": "card", "google_pay": "card",
    "bank_transfer": "bank_transfer", "sepa_debit": "bank_transfer", "us_bank_account": "bank_transfer",
    "bacs_debit": "bank_transfer", "acss_debit": "bank_transfer", "au_becs_debit": "bank_transfer",
    "customer_balance": "bank_transfer", "ach_debit": "bank_transfer", "ach_credit_transfer": "bank_transfer",
    "cash": "cash", "cheque": "cheque", "check": "cheque",
}


def method_group(method: str) -> str:
    return _METHOD_GROUPS.get(method.strip().lower(), "other")


def _currency(code: str) -> str:
    code = code.strip().upper()
    if len(code) != 3 or not code.isalpha():
        raise ValueError(f"not a currency code: {code!r}")
    return code


@dataclass(frozen=True)
class InvoiceCopy:
    """The columns of reporting.invoices, from one snapshot."""

    id: str
    version: int
    number: str | None
    status: InvoiceStatus
    currency: str
    client_id: str
    client_name: str | None
    total: int
    amount_paid: int
    amount_due: int
    issue_date: date | None
    due_date: date | None
    paid_at: datetime | None
    cancelled_at: datetime | None
    changed_at: datetime

    @classmethod
    def of(cls, snapshot: InvoiceSnapshotV1, at: datetime) -> InvoiceCopy:
        return cls(
            id=snapshot.id, version=snapshot.version, number=snapshot.invoice_number, status=snapshot.status,
            currency=_currency(snapshot.currency), client_id=snapshot.client_id, client_name=snapshot.client_name,
            total=snapshot.total, amount_paid=snapshot.amount_paid, amount_due=snapshot.amount_due,
            issue_date=snapshot.issue_date, due_date=snapshot.due_date, paid_at=snapshot.paid_at,
            cancelled_at=at if snapshot.status == InvoiceStatus.CANCELLED else None, changed_at=at,
        )


@dataclass(frozen=True)
class Standing:
    """What one invoice version adds to the aggregates: `None` where it adds nothing."""

    invoiced: tuple[str, date] | None  # (currency, issue date): it stands as issued
    open: tuple[str, date] | None  # (currency, due date): it still expects money
    total: int
    amount_due: int

    @classmethod
    def of(cls, status: str, currency: str, issue_date: date | None, due_date: date | None, total: int,
           amount_due: int) -> Standing:
        issued = status not in (InvoiceStatus.DRAFT, InvoiceStatus.CANCELLED) and issue_date is not None
        is_open = status in OPEN_STATUSES
        return cls(
            invoiced=(currency, issue_date) if issued and issue_date is not None else None,
            open=(currency, due_date or NO_DUE_DATE) if is_open else None,
            total=total, amount_due=amount_due,
        )


@dataclass(frozen=True)
class LedgerRow:
    entry_id: str
    invoice_id: str
    kind: str  # payment | refund
    method: str
    currency: str
    amount: int  # signed: a refund is negative
    occurred_at: datetime
    event_id: str


@dataclass
class Changes:
    """Everything one batch of events asks of the read models, before it is written."""

    invoices: dict[str, InvoiceCopy] = field(default_factory=dict)
    ledger: dict[str, LedgerRow] = field(default_factory=dict)
    subscriptions: dict[tuple[str, int], SubscriptionState] = field(default_factory=dict)

    def invoice(self, copy: InvoiceCopy) -> None:
        held = self.invoices.get(copy.id)
        if held is None or held.version < copy.version:
            self.invoices[copy.id] = copy

    def entry(self, row: LedgerRow) -> None:
        self.ledger.setdefault(row.entry_id, row)

    def subscription(self, state: SubscriptionState) -> None:
        self.subscriptions.setdefault((state.subscription_id, state.version), state)

    def __bool__(self) -> bool:
        return bool(self.invoices or self.ledger or self.subscriptions)


# -- the dispatch table ------------------------------------------------------------------------------

Handler = Callable[[Changes, CloudEvent], None]


def take_invoice_snapshot(changes: Changes, event: CloudEvent) -> None:
    changes.invoice(InvoiceCopy.of(event.data_as(InvoiceSnapshotV1), event.time))


def _ledger_row(event: CloudEvent, payment: PaymentEventV1, kind: str, sign: int, at: datetime) -> LedgerRow:
    if payment.amount <= 0:
        raise ValueError(f"a {kind} of {payment.amount} (amounts are positive)")
    return LedgerRow(entry_id=payment.payment_id, invoice_id=payment.invoice_id, kind=kind,
                     method=method_group(payment.method), currency=_currency(payment.currency),
                     amount=sign * payment.amount, occurred_at=at, event_id=event.id)


def take_payment(changes: Changes, event: CloudEvent) -> None:
    payment = event.data_as(PaymentEventV1)
    changes.entry(_ledger_row(event, payment, "payment", 1, payment.paid_at or event.time))


def take_refund(changes: Changes, event: CloudEvent) -> None:
    # The refund's paidAt is that of the payment refunded; the money went back when the event says.
    changes.entry(_ledger_row(event, event.data_as(PaymentEventV1), "refund", -1, event.time))


def take_subscription_snapshot(changes: Changes, event: CloudEvent) -> None:
    changes.subscription(state_of(event.data_as(SubscriptionSnapshotV1)))


HANDLERS: dict[str, Handler] = {
    **{event_type.value: take_invoice_snapshot for event_type in InvoiceEventType},
    PaymentEventType.SUCCEEDED: take_payment,
    PaymentEventType.RECORDED: take_payment,
    PaymentEventType.REFUNDED: take_refund,
    **{event_type.value: take_subscription_snapshot for event_type in SubscriptionEventType},
}


# -- writing -----------------------------------------------------------------------------------------


# The SQL types of the key columns of the aggregates (every value column is a number).
_KEY_TYPES = {"currency": "text", "day": "date", "due_date": "date", "method": "text", "invoice_id": "text"}


def _columns(rows: Iterable[Any], names: Iterable[str]) -> dict[str, list[Any]]:
    """Rows as one list per column: the arrays `unnest` turns back into rows (one statement per table)."""
    rows = list(rows)
    return {name: [getattr(row, name) for row in rows] for name in names}


class Writer:
    """The statements of one schema (`reporting`, or the copy a rebuild fills)."""

    def __init__(self, session: AsyncSession, schema: str, zone: Zone) -> None:
        self.session = session
        self.s = schema
        self.zone = zone

    async def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        return await self.session.execute(text(sql.format(s=self.s)), params or {})

    async def write(self, changes: Changes) -> None:
        # A fixed order of tables (and sorted keys within each) so concurrent batches never deadlock.
        if changes.invoices:
            await self._invoices(changes.invoices)
        if changes.ledger:
            await self._ledger(changes.ledger)
        if changes.subscriptions:
            await self._subscriptions(changes.subscriptions)

    # invoices -------------------------------------------------------------------------------------

    async def _invoices(self, copies: Mapping[str, InvoiceCopy]) -> None:
        ids = sorted(copies)
        held = {
            row.id: row
            for row in await self.execute(
                "SELECT id, version, status, currency, total, amount_due, issue_date, due_date "
                "FROM {s}.invoices WHERE id = ANY(CAST(:ids AS text[])) ORDER BY id FOR UPDATE",
                {"ids": ids},
            )
        }
        newer: list[InvoiceCopy] = []
        invoiced: dict[tuple[str, date], list[int]] = defaultdict(lambda: [0, 0])
        open_due: dict[tuple[str, date], list[int]] = defaultdict(lambda: [0, 0])
        for invoice_id in ids:
            copy, old = copies[invoice_id], held.get(invoice_id)
            if old is not None and old.version >= copy.version:
                continue  # a redelivery or an older version: the copy never moves back
            newer.append(copy)
            after = Standing.of(copy.status, copy.currency, copy.issue_date, copy.due_date, copy.total,
                                copy.amount_due)
            moves = [(after, 1)]
            if old is not None:
                moves.append((Standing.of(old.status, old.currency, old.issue_date, old.due_date, old.total,
                                          old.amount_due), -1))
            for standing, sign in moves:
                if standing.invoiced is not None:
                    invoiced[standing.invoiced][0] += sign
                    invoiced[standing.invoiced][1] += sign * standing.total
                if standing.open is not None:
                    open_due[standing.open][0] += sign
                    open_due[standing.open][1] += sign * standing.amount_due
        if not newer:
            return
        names = ("id", "version", "number", "status", "currency", "client_id", "client_name", "total",
                 "amount_paid", "amount_due", "issue_date", "due_date", "paid_at", "cancelled_at", "changed_at")
        types = ("text", "int", "text", "text", "text", "text", "text", "bigint", "bigint", "bigint", "date",
                 "date", "timestamptz", "timestamptz", "timestamptz")
        unnest = ", ".join(f"CAST(:{n} AS {t}[])" for n, t in zip(names, types, strict=True))
        updates = ", ".join(f"{n} = excluded.{n}" for n in names[1:])
        params = _columns(newer, names)
        params["status"] = [str(status) for status in params["status"]]
        await self.execute(
            f"INSERT INTO {{s}}.invoices ({', '.join(names)}) SELECT * FROM unnest({unnest}) "
            f"ON CONFLICT (id) DO UPDATE SET {updates} WHERE {{s}}.invoices.version < excluded.version",
            params,
        )
        await self._add("invoiced_daily", ("currency", "day"), ("invoices", "amount"), invoiced)
        await self._add("open_by_due", ("currency", "due_date"), ("invoices", "amount"), open_due)

    async def _add(self, table: str, keys: tuple[str, ...], values: tuple[str, ...],
                   deltas: Mapping[tuple[Any, ...], list[int]]) -> None:
        """Move aggregate rows by `deltas` (key -> one number per value column), creating them as needed."""
        moved = sorted((key, delta) for key, delta in deltas.items() if any(delta))
        if not moved:
            return
        params: dict[str, list[Any]] = {k: [key[i] for key, _ in moved] for i, k in enumerate(keys)}
        params.update({v: [delta[i] for _, delta in moved] for i, v in enumerate(values)})
        columns = (*keys, *values)
        unnest = ", ".join(f"CAST(:{c} AS {_KEY_TYPES.get(c, 'bigint')}[])" for c in columns)
        sums = ", ".join(f"{v} = {{s}}.{table}.{v} + excluded.{v}" for v in values)
        await self.execute(
            f"INSERT INTO {{s}}.{table} ({', '.join(columns)}) SELECT * FROM unnest({unnest}) "
            f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {sums}",
            params,
        )

    # ledger ---------------------------------------------------------------------------------------

    async def _ledger(self, entries: Mapping[str, LedgerRow]) -> None:
        names = ("entry_id", "invoice_id", "kind", "method", "currency", "amount", "occurred_at", "event_id")
        types = ("text", "text", "text", "text", "text", "bigint", "timestamptz", "text")
        rows = [entries[key] for key in sorted(entries)]
        unnest = ", ".join(f"CAST(:{n} AS {t}[])" for n, t in zip(names, types, strict=True))
        inserted = {
            row.entry_id
            for row in await self.execute(
                f"INSERT INTO {{s}}.ledger ({', '.join(names)}) SELECT * FROM unnest({unnest}) "
                "ON CONFLICT (entry_id) DO NOTHING RETURNING entry_id",
                _columns(rows, names),
            )
        }
        cash: dict[tuple[str, date, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        totals: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        for row in rows:
            if row.entry_id not in inserted:
                continue  # seen before under another event id: already counted
            day = self.zone.day_of(row.occurred_at)
            sums = cash[(row.currency, day, row.method)]
            if row.kind == "payment":
                sums[0] += 1
                sums[1] += row.amount
            else:
                sums[2] += 1
                sums[3] -= row.amount  # refunded, as a positive amount
            totals[(row.invoice_id, row.currency)][0] += row.amount
            totals[(row.invoice_id, row.currency)][1] += 1
        await self._add("cash_daily", ("currency", "day", "method"), ("payments", "paid", "refunds", "refunded"),
                        cash)
        await self._add("ledger_totals", ("invoice_id", "currency"), ("amount", "entries"), totals)

    # subscriptions --------------------------------------------------------------------------------

    async def _subscriptions(self, states: Mapping[tuple[str, int], SubscriptionState]) -> None:
        rows = [states[key] for key in sorted(states)]
        params: dict[str, list[Any]] = {
            "id": [r.subscription_id for r in rows], "version": [r.version for r in rows],
            "client_id": [r.client_id for r in rows], "currency": [r.currency for r in rows],
            "status": [r.status for r in rows], "mrr": [Decimal(r.mrr) for r in rows],
            "at": [r.effective_at for r in rows],
        }
        unnest = ("unnest(CAST(:id AS text[]), CAST(:version AS bigint[]), CAST(:client_id AS text[]), "
                  "CAST(:currency AS text[]), CAST(:status AS text[]), CAST(:mrr AS numeric[]), "
                  "CAST(:at AS timestamptz[]))")
        # Every version is history (the movements are computed from it); the copy keeps the newest.
        await self.execute(
            "INSERT INTO {s}.subscription_changes (subscription_id, version, client_id, currency, status, mrr, "
            f"effective_at) SELECT * FROM {unnest} ON CONFLICT (subscription_id, version) DO NOTHING",
            params,
        )
        newest: dict[str, int] = {}
        for index, row in enumerate(rows):  # sorted by (id, version): the last index per id is the newest
            newest[row.subscription_id] = index
        keep = sorted(newest.values())
        latest = {name: [values[i] for i in keep] for name, values in params.items()}
        await self.execute(
            "INSERT INTO {s}.subscriptions (id, version, client_id, currency, status, mrr, changed_at) "
            f"SELECT * FROM {unnest} ON CONFLICT (id) DO UPDATE SET version = excluded.version, "
            "client_id = excluded.client_id, currency = excluded.currency, status = excluded.status, "
            "mrr = excluded.mrr, changed_at = excluded.changed_at WHERE {s}.subscriptions.version < excluded.version",
            latest,
        )
