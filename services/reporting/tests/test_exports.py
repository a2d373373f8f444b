"""Exports: CSV through Python's csv module and xlsx through openpyxl give back the JSON's numbers;
a formula-looking client name comes out as inert text; the filename and content type are right."""

from __future__ import annotations

import csv
import io
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from openpyxl import load_workbook

from services.reporting.tests.conftest import Reporting
from services.reporting.tests.test_reports import FORMULA_NAME, scenario

XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"


async def download(service: Reporting, path: str, **params: Any) -> tuple[bytes, dict[str, str]]:
    response = await service.http.get(f"/api/reports{path}", params=params)
    assert response.status_code == 200, response.text
    return response.content, dict(response.headers)


def major(amount: int, currency: str) -> Decimal:
    return Decimal(amount).scaleb(-(0 if currency == "JPY" else 2))


def sheet_rows(content: bytes, title: str = "Report") -> list[list[Any]]:
    workbook = load_workbook(io.BytesIO(content))
    return [[cell.value for cell in row] for row in workbook[title].iter_rows()]


async def test_monthly_revenue_round_trips(reporting: Reporting) -> None:
    await reporting.publish(scenario().events)
    await reporting.caught_up()
    params = {"from": "2026-06-01", "to": "2026-10-31"}
    report = await reporting.get("/revenue/monthly", **params)
    expected = [(m["month"], a["currency"], major(a["amount"], a["currency"]), a["count"])
                for m in report["months"] for a in m["amounts"]]

    content, headers = await download(reporting, "/revenue/monthly", format="csv", **params)
    assert headers["content-type"].startswith("text/csv") and "charset=utf-8" in headers["content-type"]
    assert headers["content-disposition"] == \
        'attachment; filename="revenue-monthly-cash-2026-06-01-2026-10-31.csv"'
    assert b"\r\n" in content and content.endswith(b"\r\n")  # RFC 4180 line ends
    header, *rows = list(csv.reader(io.StringIO(content.decode("utf-8"), newline="")))
    assert header == ["Month", "Currency", "Amount", "Count"]
    assert [(r[0], r[1], Decimal(r[2]), int(r[3])) for r in rows] == expected
    assert ["2026-10", "EUR", "-50.00", "1"] in rows  # a negative amount stays a number

    content, headers = await download(reporting, "/revenue/monthly", format="xlsx", **params)
    assert headers["content-type"] == XLSX
    assert headers["content-disposition"].endswith('revenue-monthly-cash-2026-06-01-2026-10-31.xlsx"')
    workbook = load_workbook(io.BytesIO(content))
    sheet = workbook["Report"]
    header, *body = [list(row) for row in sheet.iter_rows()]
    assert [c.value for c in header] == ["Month", "Currency", "Amount", "Count"]
    data, totals = body[:-2], body[-2:]
    assert [(c[0].value.strftime("%Y-%m"), c[1].value, Decimal(str(c[2].value)), c[3].value) for c in data] == \
        expected
    assert isinstance(data[0][0].value, datetime)  # a date, shown as YYYY-MM
    assert data[0][0].number_format == "yyyy-mm"
    eur = next(c for c in data if c[1].value == "EUR")
    assert eur[2].data_type == "n" and eur[2].number_format.startswith('#,##0.00 "EUR"')
    yen = next(c for c in data if c[1].value == "JPY")
    assert yen[2].number_format.startswith('#,##0 "JPY"')
    assert [(c[0].value, c[1].value, Decimal(str(c[2].value)), c[3].value) for c in totals] == [
        ("Total", "EUR", Decimal("950.00"), 3), ("Total", "JPY", Decimal("280000"), 2)]
    filters = {row[0].value: row[1].value for row in list(workbook["Filters"].iter_rows())[1:]}
    assert filters["Report"] == "Monthly revenue" and filters["Basis"] == "cash"
    assert (filters["From"], filters["To"], filters["Currency"], filters["Time zone"]) == (
        "2026-06-01", "2026-10-31", "all", "UTC")


async def test_outstanding_export_has_every_row_and_an_inert_formula(reporting: Reporting) -> None:
    await reporting.publish(scenario().events)
    await reporting.caught_up()
    listed = (await reporting.get("/outstanding", limit=100))["items"]

    content, headers = await download(reporting, "/outstanding", format="csv")
    assert headers["content-disposition"].startswith('attachment; filename="outstanding-')
    header, *rows = list(csv.reader(io.StringIO(content.decode("utf-8"), newline="")))
    assert header[:3] == ["Invoice number", "Client", "Currency"]
    assert [r[0] for r in rows] == [i["invoiceNumber"] for i in listed]
    assert [Decimal(r[8]) for r in rows] == [major(i["amountDue"], i["currency"]) for i in listed]
    evil = next(r for r in rows if r[0] == "2026-0001")
    assert evil[1] == "'" + FORMULA_NAME  # a spreadsheet shows it as text, never runs it
    assert (evil[4], evil[5]) == ("2026-06-01", "2026-07-01")

    content, _ = await download(reporting, "/outstanding", format="xlsx", currency="EUR")
    workbook = load_workbook(io.BytesIO(content))
    sheet_cells = [list(row) for row in workbook["Report"].iter_rows()]
    data = sheet_cells[1:-1]  # less the header and the one totals row (EUR)
    assert [row[0].value for row in data] == [i["invoiceNumber"] for i in listed if i["currency"] == "EUR"]
    client = data[0][1]
    assert client.value == FORMULA_NAME and client.data_type == "s" and client.quotePrefix
    assert isinstance(data[0][5].value, datetime) and data[0][5].value.date() == date(2026, 7, 1)
    total_row = sheet_cells[-1]
    assert (total_row[0].value, total_row[2].value) == ("Total", "EUR")
    assert Decimal(str(total_row[8].value)) == major(sum(i["amountDue"] for i in listed if i["currency"] == "EUR"),
                                                     "EUR")


async def test_every_report_exports(reporting: Reporting) -> None:
    await reporting.publish(scenario().events)
    await reporting.caught_up()
    for path, params in (("/summary", {"asOf": "2026-10-31"}), ("/ar-aging", {"groupBy": "client"}),
                         ("/payment-methods", {}), ("/mrr", {}), ("/dso", {}), ("/reconciliation", {}),
                         ("/revenue/monthly", {"basis": "invoiced"})):
        for fmt in ("csv", "xlsx"):
            content, headers = await download(reporting, path, format=fmt, **params)
            assert headers["content-disposition"].endswith(f'.{fmt}"'), (path, headers)
            if fmt == "csv":
                assert list(csv.reader(io.StringIO(content.decode("utf-8"), newline="")))[0], path
            else:
                assert sheet_rows(content)[0], path
    summary_rows = sheet_rows((await download(reporting, "/summary", format="xlsx", asOf="2026-10-31"))[0])
    eur = next(r for r in summary_rows if r[0] == "EUR")
    assert Decimal(str(eur[5])) == Decimal("973.45")  # outstanding, in euros
    aging = list(csv.reader(io.StringIO((await download(reporting, "/ar-aging", format="csv", asOf="2026-10-31",
                                                        groupBy="client"))[0].decode())))
    assert ["'" + FORMULA_NAME, "client-evil", "EUR", "0.00", "0.00", "0.00", "0.00", "123.45", "123.45", "1"] \
        in aging
