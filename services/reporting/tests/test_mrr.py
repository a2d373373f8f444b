"""MRR and its movements for a scripted set of subscription events, against figures computed by hand."""

from __future__ import annotations

import random

from contracts.subscription import BillingInterval
from services.reporting.tests.conftest import Reporting
from services.reporting.tests.scenario import Published, SubscriptionScript, at


def subscriptions() -> list[Published]:
    """EUR: A new 100.00/month in Jan, upgraded to 150.00 in Feb, downgraded to 120.00 in Mar, canceled in
    Apr, back in May with another subscription at 90.00 (reactivation); B an annual 1,200.00 from Jan
    (100.00 a month); C a trial from Feb that converts in Mar; E an annual 1,000.00 from Jun (83.33...).
    USD: D 2 seats at 25.00 from Feb. A renewal changes nothing."""
    a1 = SubscriptionScript("client-a", "EUR", 10_000)
    a2 = SubscriptionScript("client-a", "EUR", 9_000)
    b = SubscriptionScript("client-b", "EUR", 120_000, BillingInterval.YEAR)
    c = SubscriptionScript("client-c", "EUR", 6_000)
    d = SubscriptionScript("client-d", "USD", 2_500, quantity=2)
    e = SubscriptionScript("client-e", "EUR", 100_000, BillingInterval.YEAR)
    return [
        *a1.started(at("2026-01-10T10:00")), *b.started(at("2026-01-15T10:00")),
        *c.started(at("2026-02-01T10:00"), trial=True), *a1.changed(at("2026-02-10T10:00"), unit_amount=15_000),
        *d.started(at("2026-02-20T10:00")), *a1.renewed(at("2026-02-10T11:00")),
        *c.activated(at("2026-03-01T10:00")), *a1.changed(at("2026-03-10T10:00"), unit_amount=12_000),
        *a1.canceled(at("2026-04-10T10:00")), *a2.started(at("2026-05-10T10:00")),
        *e.started(at("2026-06-05T10:00")),
    ]


def movements(report: dict, currency: str) -> list[tuple]:
    return [(m["month"], m["mrr"], m["new"], m["expansion"], m["contraction"], m["churn"], m["reactivation"],
             m["netNew"], m["activeSubscriptions"], m["customers"])
            for m in report["months"] if m["currency"] == currency]


EXPECTED_EUR = [
    # month      MRR     new  expansion contraction churn reactivation net new  active customers
    ("2026-01", 20_000, 20_000, 0, 0, 0, 0, 20_000, 2, 2),
    ("2026-02", 25_000, 0, 5_000, 0, 0, 0, 5_000, 2, 2),  # C is trialing: no MRR, not active
    ("2026-03", 28_000, 6_000, 0, 3_000, 0, 0, 3_000, 3, 3),
    ("2026-04", 16_000, 0, 0, 0, 12_000, 0, -12_000, 2, 2),
    ("2026-05", 25_000, 0, 0, 0, 0, 9_000, 9_000, 3, 3),
    ("2026-06", 33_333, 8_333, 0, 0, 0, 0, 8_333, 4, 4),  # 100,000 / 12 = 8,333.33
]


async def test_mrr_movements_match_the_hand_computed_figures(reporting: Reporting) -> None:
    events = subscriptions()
    shuffled = events * 2
    random.Random(3).shuffle(shuffled)  # delivered twice, in any order: the history decides, not arrival
    await reporting.publish(shuffled)
    await reporting.caught_up()
    report = await reporting.get("/mrr", **{"from": "2026-01-01", "to": "2026-06-30"})
    assert report["currencies"] == ["EUR", "USD"]
    assert movements(report, "EUR") == EXPECTED_EUR
    assert movements(report, "USD") == [
        ("2026-01", 0, 0, 0, 0, 0, 0, 0, 0, 0)] + [(f"2026-0{m}", 5_000, 5_000 if m == 2 else 0, 0, 0, 0, 0,
                                                    5_000 if m == 2 else 0, 1, 1) for m in range(2, 7)]

    later = await reporting.get("/mrr", **{"from": "2026-04-01", "to": "2026-05-31", "currency": "EUR"})
    assert movements(later, "EUR") == EXPECTED_EUR[3:5]  # history before the range only sets the start

    summary = {r["currency"]: r for r in (await reporting.get("/summary"))["currencies"]}
    assert (summary["EUR"]["mrr"], summary["EUR"]["arr"], summary["EUR"]["activeSubscriptions"]) == (
        33_333, 400_000, 4)  # 9,000 + 10,000 + 6,000 + 8,333.33 = 33,333.33; ARR exact: 400,000
    assert (summary["USD"]["mrr"], summary["USD"]["arr"], summary["USD"]["activeSubscriptions"]) == (5_000, 60_000, 1)
    march = {r["currency"]: r for r in (await reporting.get("/summary", asOf="2026-02-15"))["currencies"]}
    assert (march["EUR"]["mrr"], march["EUR"]["activeSubscriptions"], march["EUR"]["trialingSubscriptions"]) == (
        25_000, 2, 1)
