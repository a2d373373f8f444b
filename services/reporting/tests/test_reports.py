"""The reports over a hand-checked set of invoices: two currencies, month boundaries, partial and full
payments, a refund, a cancellation, a draft; the same events twice, or shuffled, change nothing."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from services.reporting.tests.conftest import CLIENT, Reporting, running
from services.reporting.tests.scenario import InvoiceScript, Published, at, stray_payment

FORMULA_NAME = '=HYPERLINK("http://evil.example/","click")'


@dataclass
class Scenario:
    events: list[Published]
    invoices: dict[str, InvoiceScript]


def scenario() -> Scenario:
    """EUR: A partly then fully paid across the Aug/Sep boundary, then partly refunded; B sent, unpaid;
    C partly paid in cash; D sent then cancelled; E a draft; F (a formula-looking client) never paid.
    JPY (no decimals): J1 partly paid by cheque, J2 paid by card."""
    acme, tokyo, evil = "client-acme", "client-tokyo", "client-evil"
    a = InvoiceScript(acme, "Acme GmbH", "EUR", 100_000, date(2026, 8, 10), date(2026, 9, 9))
    b = InvoiceScript(acme, "Acme GmbH", "EUR", 50_000, date(2026, 9, 15), date(2026, 10, 15))
    c = InvoiceScript(acme, "Acme GmbH", "EUR", 30_000, date(2026, 10, 20), date(2026, 11, 19))
    d = InvoiceScript(acme, "Acme GmbH", "EUR", 20_000, date(2026, 7, 1), date(2026, 7, 31))
    e = InvoiceScript(acme, "Acme GmbH", "EUR", 7_000, None, None)
    f = InvoiceScript(evil, FORMULA_NAME, "EUR", 12_345, date(2026, 6, 1), date(2026, 7, 1))
    j1 = InvoiceScript(tokyo, "Tokyo KK", "JPY", 500_000, date(2026, 9, 30), date(2026, 10, 30))
    j2 = InvoiceScript(tokyo, "Tokyo KK", "JPY", 80_000, date(2026, 10, 1), date(2026, 10, 31))
    events: list[Published] = []
    for invoice, created, number in ((f, "2026-06-01T08:00", "2026-0001"), (d, "2026-07-01T08:00", "2026-0002"),
                                     (a, "2026-08-10T08:00", "2026-0003"), (b, "2026-09-15T08:00", "2026-0004"),
                                     (j1, "2026-09-30T08:00", "2026-0005"), (j2, "2026-10-01T08:00", "2026-0006"),
                                     (c, "2026-10-20T08:00", "2026-0007")):
        events += invoice.created(at(created)) + invoice.sent(at(created), number)
    events += e.created(at("2026-09-01T10:00"))
    events += d.cancelled(at("2026-08-15T12:00"))
    events += a.paid(40_000, at("2026-08-31T23:30"), "card")  # August in UTC, September in Berlin
    events += a.paid(60_000, at("2026-09-01T00:30"), "bank_transfer")
    events += j1.paid(200_000, at("2026-10-01T09:00"), "cheque")
    events += j2.paid(80_000, at("2026-10-02T09:00"), "card")
    events += a.refunded(10_000, at("2026-10-05T10:00"), "card", original_paid_at=at("2026-08-31T23:30"))
    events += c.paid(5_000, at("2026-10-25T10:00"), "cash")
    events.sort(key=lambda p: p.event.time)  # as the services would publish them
    return Scenario(events, {"A": a, "B": b, "C": c, "D": d, "E": e, "F": f, "J1": j1, "J2": j2})


def by_currency(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["currency"]: row for row in rows}


def strip(report: Any) -> Any:
    """A report without the moment it was generated (for comparing two runs)."""
    if isinstance(report, dict):
        return {k: strip(v) for k, v in report.items() if k != "generatedAt"}
    if isinstance(report, list):
        return [strip(v) for v in report]
    return report


async def all_reports(service: Reporting) -> dict[str, Any]:
    """Every report, for comparing two sets of read models."""
    out: dict[str, Any] = {}
    for as_of in ("2026-08-10", "2026-08-20", "2026-10-31"):
        out[f"summary {as_of}"] = await service.get("/summary", asOf=as_of)
        out[f"aging {as_of}"] = await service.get("/ar-aging", asOf=as_of, groupBy="client")
    out["summary"] = await service.get("/summary")
    out["aging"] = await service.get("/ar-aging")
    out["outstanding"] = await service.get("/outstanding", limit=100)
    for basis in ("cash", "invoiced"):
        out[basis] = await service.get("/revenue/monthly", **{"from": "2026-01-01", "to": "2026-12-31", "basis": basis})
    out["methods"] = await service.get("/payment-methods", **{"from": "2026-01-01", "to": "2026-10-31"})
    out["dso"] = await service.get("/dso", **{"from": "2026-10-01", "to": "2026-10-31"})
    out["mrr"] = await service.get("/mrr", **{"from": "2026-01-01", "to": "2026-11-30"})
    out["reconciliation"] = await service.get("/reconciliation")
    return strip(out)


async def test_the_figures_of_the_scenario(reporting: Reporting) -> None:
    await reporting.publish(scenario().events)
    await reporting.caught_up()

    summary = await reporting.get("/summary", asOf="2026-10-31")
    assert summary["asOf"] == "2026-10-31" and summary["timezone"] == "UTC"
    eur, jpy = by_currency(summary["currencies"])["EUR"], by_currency(summary["currencies"])["JPY"]
    assert eur == {
        "currency": "EUR",
        "collectedThisMonth": 5_000 - 10_000,  # cash received in October less the refund
        "collectedYearToDate": 40_000 + 60_000 + 5_000 - 10_000,
        "invoicedThisMonth": 30_000,  # C
        "invoicedYearToDate": 100_000 + 50_000 + 30_000 + 12_345,  # A B C F (D cancelled, E a draft)
        "outstanding": 10_000 + 50_000 + 25_000 + 12_345, "openInvoices": 4,
        "overdue": 10_000 + 50_000 + 12_345, "overdueInvoices": 3,  # A B F (C not due until 19 Nov)
        "mrr": 0, "arr": 0, "activeSubscriptions": 0, "trialingSubscriptions": 0,
    }
    assert jpy | {"mrr": 0} == {
        "currency": "JPY", "collectedThisMonth": 280_000, "collectedYearToDate": 280_000,
        "invoicedThisMonth": 80_000, "invoicedYearToDate": 580_000, "outstanding": 300_000, "openInvoices": 1,
        "overdue": 300_000, "overdueInvoices": 1, "mrr": 0, "arr": 0, "activeSubscriptions": 0,
        "trialingSubscriptions": 0,
    }

    # today (after the last event, so the same money; what is overdue depends on the day)
    today = date.fromisoformat((await reporting.get("/ar-aging"))["asOf"])
    now = by_currency((await reporting.get("/summary"))["currencies"])
    assert now["EUR"]["outstanding"] == 97_345 and now["JPY"]["outstanding"] == 300_000
    assert now["EUR"]["overdue"] == sum(v for due, v in ((date(2026, 9, 9), 10_000), (date(2026, 10, 15), 50_000),
                                                          (date(2026, 11, 19), 25_000), (date(2026, 7, 1), 12_345))
                                        if due < today)

    aging = await reporting.get("/ar-aging", asOf="2026-10-31")
    rows = by_currency(aging["rows"])
    assert rows["EUR"] | {"clientId": None} == {
        "currency": "EUR", "clientId": None, "clientName": None, "current": 25_000, "days1To30": 50_000,
        "days31To60": 10_000, "days61To90": 0, "over90": 12_345, "total": 97_345, "invoices": 4,
    }
    assert (rows["JPY"]["days1To30"], rows["JPY"]["total"], rows["JPY"]["current"]) == (300_000, 300_000, 0)
    assert aging["totals"] == aging["rows"]

    clients = await reporting.get("/ar-aging", asOf="2026-10-31", groupBy="client")
    named = {(r["clientName"], r["currency"]): r for r in clients["rows"]}
    assert named[("Acme GmbH", "EUR")]["total"] == 85_000 and named[(FORMULA_NAME, "EUR")]["over90"] == 12_345
    assert named[("Tokyo KK", "JPY")]["days1To30"] == 300_000
    assert by_currency(clients["totals"])["EUR"]["total"] == 97_345

    # as of earlier days: D was receivable until it was cancelled on 15 Aug; A owed all of it on 20 Aug
    august_10 = by_currency((await reporting.get("/ar-aging", asOf="2026-08-10"))["rows"])["EUR"]
    assert (august_10["current"], august_10["days1To30"], august_10["days31To60"], august_10["total"]) == (
        100_000, 20_000, 12_345, 132_345)
    august_20 = await reporting.get("/ar-aging", asOf="2026-08-20")
    assert [(r["currency"], r["current"], r["days31To60"], r["total"], r["invoices"]) for r in august_20["rows"]] == [
        ("EUR", 100_000, 12_345, 112_345, 2)]
    past = by_currency((await reporting.get("/summary", asOf="2026-08-20"))["currencies"])["EUR"]
    assert (past["outstanding"], past["overdue"], past["collectedThisMonth"], past["invoicedThisMonth"]) == (
        112_345, 12_345, 0, 100_000)

    cash = await reporting.get("/revenue/monthly", **{"from": "2026-06-01", "to": "2026-10-31"})
    assert cash["currencies"] == ["EUR", "JPY"] and [m["month"] for m in cash["months"]] == [
        "2026-06", "2026-07", "2026-08", "2026-09", "2026-10"]
    assert [[(a["currency"], a["amount"], a["count"]) for a in m["amounts"]] for m in cash["months"]] == [
        [("EUR", 0, 0), ("JPY", 0, 0)],
        [("EUR", 0, 0), ("JPY", 0, 0)],
        [("EUR", 40_000, 1), ("JPY", 0, 0)],
        [("EUR", 60_000, 1), ("JPY", 0, 0)],
        [("EUR", -5_000, 1), ("JPY", 280_000, 2)],
    ]
    invoiced = await reporting.get("/revenue/monthly", **{"from": "2026-06-15", "to": "2026-10-02",
                                                          "basis": "invoiced"})
    assert (invoiced["from"], invoiced["to"]) == ("2026-06-01", "2026-10-31")  # whole months
    assert [[(a["currency"], a["amount"]) for a in m["amounts"]] for m in invoiced["months"]] == [
        [("EUR", 12_345), ("JPY", 0)], [("EUR", 0), ("JPY", 0)], [("EUR", 100_000), ("JPY", 0)],
        [("EUR", 50_000), ("JPY", 500_000)], [("EUR", 30_000), ("JPY", 80_000)],
    ]
    assert invoiced["totals"] == [{"currency": "EUR", "amount": 192_345, "count": 4},
                                  {"currency": "JPY", "amount": 580_000, "count": 2}]
    only_yen = await reporting.get("/revenue/monthly", **{"from": "2026-01-01", "to": "2026-03-31",
                                                          "currency": "jpy"})
    assert [m["amounts"] for m in only_yen["months"]] == [[{"currency": "JPY", "amount": 0, "count": 0}]] * 3

    methods = await reporting.get("/payment-methods", **{"from": "2026-01-01", "to": "2026-10-31"})
    table = {(r["currency"], r["method"]): (r["count"], r["amount"], r["grossAmount"], r["refundCount"],
                                            r["refundedAmount"]) for r in methods["rows"]}
    assert table == {
        ("EUR", "card"): (1, 30_000, 40_000, 1, 10_000), ("EUR", "bank_transfer"): (1, 60_000, 60_000, 0, 0),
        ("EUR", "cash"): (1, 5_000, 5_000, 0, 0), ("EUR", "cheque"): (0, 0, 0, 0, 0),
        ("EUR", "other"): (0, 0, 0, 0, 0),
        ("JPY", "card"): (1, 80_000, 80_000, 0, 0), ("JPY", "bank_transfer"): (0, 0, 0, 0, 0),
        ("JPY", "cash"): (0, 0, 0, 0, 0), ("JPY", "cheque"): (1, 200_000, 200_000, 0, 0),
        ("JPY", "other"): (0, 0, 0, 0, 0),
    }

    dso = by_currency((await reporting.get("/dso", **{"from": "2026-10-01", "to": "2026-10-31"}))["rows"])
    assert dso["EUR"] == {"currency": "EUR", "receivables": 97_345, "sales": 30_000, "days": 31, "dso": "100.6"}
    assert dso["JPY"] == {"currency": "JPY", "receivables": 300_000, "sales": 80_000, "days": 31, "dso": "116.3"}

    outstanding = await reporting.get("/outstanding", limit=2)
    assert outstanding["total"] == 5 and outstanding["hasMore"] is True
    rest = await reporting.get("/outstanding", limit=2, cursor=outstanding["nextCursor"])
    last = await reporting.get("/outstanding", limit=2, cursor=rest["nextCursor"])
    listed = outstanding["items"] + rest["items"] + last["items"]
    assert last["hasMore"] is False and last["nextCursor"] is None
    assert [(i["invoiceNumber"], i["amountDue"]) for i in listed] == [
        ("2026-0001", 12_345), ("2026-0003", 10_000), ("2026-0004", 50_000), ("2026-0005", 300_000),
        ("2026-0007", 25_000)]  # by due date
    assert listed[0]["daysOverdue"] == (today - date(2026, 7, 1)).days and listed[0]["clientName"] == FORMULA_NAME
    euro_only = await reporting.get("/outstanding", currency="EUR", clientId="client-acme")
    assert [i["invoiceNumber"] for i in euro_only["items"]] == ["2026-0003", "2026-0004", "2026-0007"]

    reconciliation = await reporting.get("/reconciliation")
    assert reconciliation["mismatches"] == [] and reconciliation["invoicesChecked"] == 8
    assert reconciliation["ledgerEntries"] == 6 and reconciliation["rejectedEvents"] == 0


async def test_month_boundaries_follow_the_reporting_timezone(settings_factory: Any, producer: Any) -> None:
    async with running(settings_factory(timezone="Europe/Berlin"), producer) as berlin:
        await berlin.publish(scenario().events)
        await berlin.caught_up()
        cash = await berlin.get("/revenue/monthly", **{"from": "2026-08-01", "to": "2026-09-30", "currency": "EUR"})
        assert cash["timezone"] == "Europe/Berlin"
        # 23:30 UTC on 31 August is 01:30 on 1 September in Berlin
        assert [m["amounts"][0]["amount"] for m in cash["months"]] == [0, 100_000]


async def test_the_same_events_twice_or_shuffled_change_nothing(settings_factory: Any, producer: Any) -> None:
    events = scenario().events
    async with running(settings_factory(), producer) as ordered:
        await ordered.publish(events)
        await ordered.caught_up()
        expected = await all_reports(ordered)

    mixed = list(events) * 2  # every event twice...
    for item in events[::3]:  # ...and some published again under a new event id (a relay's retry upstream)
        again = item.event.model_copy(update={"id": f"{item.event.id}-again"})
        mixed.append(Published(item.topic, item.key, again))
    random.Random(7).shuffle(mixed)  # in any order: older versions after newer ones
    async with running(settings_factory(), producer) as shuffled:
        await shuffled.publish(mixed)
        await shuffled.caught_up()
        assert await all_reports(shuffled) == expected


async def test_a_payment_for_an_unknown_invoice_is_a_reconciliation_mismatch(reporting: Reporting) -> None:
    story = scenario()
    await reporting.publish(story.events + [stray_payment("inv-nobody-knows", 777, "EUR", at("2026-10-10T10:00"))])
    await reporting.caught_up()
    report = await reporting.get("/reconciliation")
    assert [(m["invoiceId"], m["problem"], m["recorded"], m["recordedCurrency"]) for m in report["mismatches"]] == [
        ("inv-nobody-knows", "no_invoice", 777, "EUR")]
    methods = await reporting.get("/payment-methods", **{"from": "2026-10-01", "to": "2026-10-31", "currency": "EUR"})
    assert {r["method"]: r["amount"] for r in methods["rows"]}["other"] == 777


async def test_a_malformed_event_is_kept_aside_and_the_rest_applied(reporting: Reporting) -> None:
    story = scenario()
    await reporting.producer.send_and_wait(reporting.topic("invoice"), b"{not json", key=b"x")
    broken = story.events[0].event.model_copy(update={"id": "broken-1", "data": {"id": "x", "version": "nope"}})
    await reporting.publish([Published("invoice", "x", broken), *story.events])
    await reporting.caught_up()
    report = await reporting.get("/reconciliation")
    assert report["rejectedEvents"] == 2 and report["invoicesChecked"] == 8


async def test_reports_are_for_admins(reporting: Reporting) -> None:
    for path in ("/summary", "/outstanding", "/ar-aging", "/revenue/monthly", "/payment-methods", "/mrr", "/dso",
                 "/reconciliation"):
        response = await reporting.http.get(f"/api/reports{path}", headers=CLIENT)
        assert response.status_code == 403, (path, response.text)
        assert response.json()["error"]["code"] == "forbidden"


async def test_bad_filters_are_clear_4xx(reporting: Reporting) -> None:
    tomorrow = datetime.now(UTC).date() + timedelta(days=1)
    cases = [
        ("/revenue/monthly", {"from": "2026-05-01", "to": "2026-04-01"}, 422, "after"),
        ("/revenue/monthly", {"from": "2023-01-01", "to": "2026-12-31"}, 422, "36 months"),
        ("/payment-methods", {"from": "0001-01-01", "to": "2026-01-01"}, 422, "between"),
        ("/mrr", {"from": "2026-01-01", "to": "9999-12-31"}, 422, "between"),
        ("/dso", {"from": str(tomorrow - timedelta(days=5)), "to": str(tomorrow)}, 422, "future"),
        ("/ar-aging", {"asOf": "2099-01-01"}, 422, "future"),
        ("/summary", {"asOf": "0001-01-01"}, 422, "between"),
        ("/summary", {"asOf": "yesterday"}, 422, ""),
        ("/summary", {"currency": "ABC"}, 422, "Unknown currency"),
        ("/summary", {"currency": "EURO"}, 422, ""),
        ("/summary", {"format": "pdf"}, 422, ""),
        ("/summary", {"asof": "2026-01-01"}, 400, "Unknown query parameter"),
        ("/ar-aging", {"groupBy": "planet"}, 422, ""),
        ("/revenue/monthly", {"basis": "accrual"}, 422, ""),
        ("/outstanding", {"limit": "0"}, 422, ""),
        ("/outstanding", {"cursor": "bm90LWEtY3Vyc29y"}, 400, "cursor"),
        ("/outstanding", {"format": "csv", "limit": "5"}, 422, "every row"),
    ]
    for path, params, status, words in cases:
        response = await reporting.http.get(f"/api/reports{path}", params=params)
        assert response.status_code == status, (path, params, response.text)
        assert words in response.text, (path, params, response.text)
