"""Pure pieces: days and months, currencies, formula-safe cells, payment method groups, MRR walk."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest

from contracts.subscription import BillingInterval, SubscriptionSnapshotV1, SubscriptionStatus
from kit.errors import InvalidInput
from services.reporting.exports import currency_format, inert, safe_filename
from services.reporting.money import check_currency, major_units
from services.reporting.periods import Period, Zone, as_of_day, month_end, months, period
from services.reporting.projection import method_group
from services.reporting.reports import MrrWalk, whole
from services.reporting.subscriptions import monthly_amount


def test_days_and_months_in_a_zone() -> None:
    berlin = Zone("Europe/Berlin")
    assert berlin.day_of(datetime(2026, 8, 31, 23, 30, tzinfo=UTC)) == date(2026, 9, 1)
    assert berlin.start_of(date(2026, 9, 1)) == datetime(2026, 8, 31, 22, 0, tzinfo=UTC)
    assert berlin.end_of(date(2026, 10, 25)) == datetime(2026, 10, 25, 23, 0, tzinfo=UTC)  # 25 hours that day
    assert Zone("UTC").day_of(datetime(2026, 8, 31, 23, 30, tzinfo=UTC)) == date(2026, 8, 31)
    assert months(date(2026, 11, 15), date(2027, 2, 1)) == [date(2026, 11, 1), date(2026, 12, 1), date(2027, 1, 1),
                                                             date(2027, 2, 1)]
    assert month_end(date(2028, 2, 10)) == date(2028, 2, 29)


def test_periods_are_checked() -> None:
    default = {"default_start": date(2026, 1, 1), "default_end": date(2026, 12, 31)}
    assert period(None, None, **default) == Period(date(2026, 1, 1), date(2026, 12, 31))
    assert period(date(2026, 3, 5), date(2026, 4, 2), whole_months=True, **default) == Period(
        date(2026, 3, 1), date(2026, 4, 30))
    assert period(date(2024, 1, 1), date(2026, 12, 31), **default).days == 1096  # 36 months: allowed
    for start, end in ((date(2026, 5, 1), date(2026, 4, 1)), (date(2023, 12, 31), date(2026, 12, 31)),
                       (date(1, 1, 1), date(2026, 1, 1)), (date(2026, 1, 1), date(9999, 12, 31))):
        with pytest.raises(InvalidInput):
            period(start, end, **default)
    assert as_of_day(None, date(2026, 6, 1)) == date(2026, 6, 1)
    with pytest.raises(InvalidInput, match="future"):
        as_of_day(date(2026, 6, 2), date(2026, 6, 1))


def test_currencies() -> None:
    assert check_currency("eur") == "EUR" and check_currency(None) is None
    with pytest.raises(InvalidInput):
        check_currency("ABC")
    assert major_units(1234, "EUR") == Decimal("12.34") and major_units(1234, "JPY") == Decimal(1234)
    assert major_units(-1234, "BHD") == Decimal("-1.234")
    assert currency_format("EUR") == '#,##0.00 "EUR";-#,##0.00 "EUR"'
    assert currency_format("JPY") == '#,##0 "JPY";-#,##0 "JPY"'


def test_formula_like_text_is_made_inert() -> None:
    for text in ("=1+1", "+1", "-1", "\u22121", "@SUM(A1)", "\tx", "\rx", "\nx"):
        assert inert(text) == "'" + text
    assert inert("Acme") == "Acme" and inert("a=b") == "a=b"
    assert safe_filename('ar aging/"2026"') == "ar-aging-2026"


def test_payment_methods_are_grouped() -> None:
    assert [method_group(m) for m in ("card", "Card", "sepa_debit", "cash", "check", "cheque", "stripe", "")] == [
        "card", "card", "bank_transfer", "cash", "cheque", "cheque", "other", "other"]


def snapshot(**fields: object) -> SubscriptionSnapshotV1:
    values: dict[str, object] = {"id": "s", "version": 1, "client_id": "c", "status": SubscriptionStatus.ACTIVE,
                                 "quantity": 1, "currency": "EUR", "unit_amount": 1_000,
                                 "interval": BillingInterval.MONTH, "stripe_subscription_id": "sub_1",
                                 "occurred_at": datetime(2026, 1, 1, tzinfo=UTC)}
    values.update(fields)
    return SubscriptionSnapshotV1.model_validate(values)


def test_monthly_amount_normalises_and_excludes_trials() -> None:
    assert monthly_amount(snapshot()) == Decimal(1000)
    assert monthly_amount(snapshot(quantity=3, interval=BillingInterval.YEAR, unit_amount=1_000)) == Decimal(250)
    assert monthly_amount(snapshot(interval_count=3, unit_amount=900)) == Decimal(300)
    assert monthly_amount(snapshot(interval=BillingInterval.YEAR, unit_amount=100_000)) == Decimal("8333.333333")
    for status in ("trialing", "incomplete", "canceled", "unpaid", "paused"):
        assert monthly_amount(snapshot(status=status)) == 0
    assert monthly_amount(snapshot(status="past_due")) == Decimal(1000)
    assert monthly_amount(snapshot(unit_amount=None, mrr=777)) == Decimal(777)  # no price on it: its own figure
    assert whole(Decimal("8333.5")) == 8334 and whole(Decimal("-0.5")) == -1


@dataclass
class Row:
    subscription_id: str
    version: int
    client_id: str
    currency: str
    status: str
    mrr: Decimal
    effective_at: datetime


def test_a_plan_switch_at_one_instant_is_one_move() -> None:
    t1, t2 = datetime(2026, 1, 5, tzinfo=UTC), datetime(2026, 2, 5, tzinfo=UTC)
    history = [Row("old", 1, "c", "EUR", "active", Decimal(1000), t1),
               Row("new", 1, "c", "EUR", "active", Decimal(1500), t2),
               Row("old", 2, "c", "EUR", "canceled", Decimal(0), t2)]
    walk = MrrWalk(Zone("UTC"), Period(date(2026, 1, 1), date(2026, 2, 28)))
    walk.run(sorted(history, key=lambda r: (r.effective_at, r.client_id, r.currency, r.subscription_id, r.version)))
    jan, feb = walk.months(["EUR"])
    assert (jan.new, jan.mrr) == (1000, 1000)
    assert (feb.expansion, feb.churn, feb.new, feb.mrr, feb.net_new) == (500, 0, 0, 1500, 500)


async def test_identical_requests_share_one_computation() -> None:
    import asyncio

    from services.reporting.cache import ReportCache

    generation, calls = [0], []

    async def compute() -> int:
        calls.append(1)
        await asyncio.sleep(0.05)
        return len(calls)

    cache = ReportCache(60.0, lambda: generation[0])
    assert await asyncio.gather(*(cache.get("k", compute) for _ in range(10))) == [1] * 10  # one in flight
    assert await cache.get("k", compute) == 1 and len(calls) == 1  # kept
    assert await cache.get("k", compute, fresh=True) == 2  # Cache-Control: no-cache
    generation[0] += 1  # the feed applied a batch
    assert await cache.get("k", compute) == 3
    assert await cache.get("other", compute) == 4
    assert await ReportCache(0, lambda: 0).get("k", compute) == 5  # off

    async def fail() -> int:
        raise RuntimeError("database down")

    with pytest.raises(RuntimeError):
        await cache.get("broken", fail)
    assert await cache.get("broken", compute) == 6  # a failure is not kept
