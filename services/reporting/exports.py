"""Every report as CSV or Excel, streamed.

* CSV: RFC 4180 (comma, CRLF, quotes doubled), UTF-8, a header row. Amounts in major units of their
  row's currency (12.34, JPY 1234). A text cell that a spreadsheet would read as a formula (it
  starts with = + - − @, a tab or a CR/LF) gets a leading apostrophe (OWASP's CSV injection advice);
  numbers are never touched, so a negative amount stays a number.
* Excel (.xlsx, openpyxl write-only mode, row by row into a temporary file that is then streamed):
  amounts as numbers with their currency's format and decimals, dates as dates, a header row, a
  totals row per currency, and a second sheet with the report's filters. Text is always stored as
  text (never a formula), quote-prefixed when it looks like one.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import os
import re
import tempfile
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from enum import StrEnum
from typing import Any

from fastapi.responses import StreamingResponse
from openpyxl import Workbook
from openpyxl.cell import WriteOnlyCell
from openpyxl.cell.cell import Cell
from openpyxl.styles import Font
from openpyxl.worksheet._write_only import WriteOnlyWorksheet

from services.reporting.money import exponent, major_units
from services.reporting.schemas import ExportFormat

CSV_TYPE = "text/csv; charset=utf-8; header=present"
XLSX_TYPE = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
FORMULA_STARTS = ("=", "+", "-", "\u2212", "@", "\t", "\r", "\n")
_CHUNK = 64 * 1024


class Kind(StrEnum):
    TEXT = "text"
    DATE = "date"
    MONTH = "month"  # a date shown as YYYY-MM
    AMOUNT = "amount"  # minor units of the row's currency
    COUNT = "count"
    DECIMAL = "decimal"


@dataclass(frozen=True)
class Column:
    title: str
    kind: Kind = Kind.TEXT
    total: bool = False  # summed per currency in the totals row
    currency_at: int | None = None  # an amount in another currency than the row's: that column's index


@dataclass
class Table:
    """A report as rows. `rows` yields chunks; amounts are minor units, in the currency of the row's
    `currency` column."""

    name: str  # file name stem
    columns: Sequence[Column]
    rows: AsyncIterator[Sequence[Sequence[Any]]]
    filters: Sequence[tuple[str, str]] = ()
    currency: int | None = None  # index of the currency column (found by its title when not given)
    label: int = 0  # index of the column that says "Total" in a totals row (the first other text column)

    def __post_init__(self) -> None:
        if self.currency is None:
            self.currency = next((i for i, c in enumerate(self.columns) if c.title == "Currency"), None)
        self.label = next((i for i, c in enumerate(self.columns)
                           if c.kind in (Kind.TEXT, Kind.MONTH) and i != self.currency), self.label)


async def chunks_of(rows: Iterable[Sequence[Any]]) -> AsyncIterator[Sequence[Sequence[Any]]]:
    yield list(rows)


def inert(text: str) -> str:
    """A text cell a spreadsheet will not run: a leading apostrophe before a formula-like start."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def safe_filename(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-") or "report"


# CSV ------------------------------------------------------------------------------------------------


def _currency_of(column: Column, row: Sequence[Any], row_currency: str | None) -> str | None:
    return row[column.currency_at] if column.currency_at is not None else row_currency


def _csv_cell(column: Column, value: Any, currency: str | None) -> str:
    if value is None:
        return ""
    if column.kind == Kind.AMOUNT:
        return str(major_units(int(value), currency)) if currency else str(value)
    if column.kind == Kind.MONTH and isinstance(value, date):
        return f"{value.year:04d}-{value.month:02d}"
    if column.kind in (Kind.DATE, Kind.COUNT, Kind.DECIMAL):
        return value.isoformat() if isinstance(value, date) else str(value)
    return inert(str(value))


async def csv_stream(table: Table) -> AsyncIterator[bytes]:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow([inert(c.title) for c in table.columns])
    async for chunk in table.rows:
        for row in chunk:
            code = row[table.currency] if table.currency is not None else None
            writer.writerow([_csv_cell(c, v, _currency_of(c, row, code))
                             for c, v in zip(table.columns, row, strict=True)])
        yield buffer.getvalue().encode()
        buffer.seek(0)
        buffer.truncate()
    if buffer.tell():
        yield buffer.getvalue().encode()


# Excel ----------------------------------------------------------------------------------------------


def currency_format(currency: str) -> str:
    places = exponent(currency)
    number = "#,##0" + ("." + "0" * places if places else "")
    return f'{number} "{currency}";-{number} "{currency}"'


@dataclass
class _Sheet:
    """Writes the rows of one table into a write-only worksheet, keeping the per-currency totals."""

    table: Table
    sheet: WriteOnlyWorksheet
    totals: dict[str, list[Any]] = field(default_factory=dict)
    bold: Font = field(default_factory=lambda: Font(bold=True))
    _protos: dict[tuple[int, str | None], Cell] = field(default_factory=dict)

    def cell(self, column: Column, value: Any, currency: str | None, *, bold: bool = False) -> Cell:
        cell = WriteOnlyCell(self.sheet)
        if column.kind == Kind.AMOUNT and value is not None and currency:
            cell.value = major_units(int(value), currency)
            cell.number_format = currency_format(currency)
        elif column.kind in (Kind.DATE, Kind.MONTH) and isinstance(value, date):
            cell.value = value
            cell.number_format = "yyyy-mm" if column.kind == Kind.MONTH else "yyyy-mm-dd"
        elif column.kind == Kind.DECIMAL and value is not None:
            cell.value = Decimal(value)
            cell.number_format = "0.0"
        elif column.kind in (Kind.COUNT, Kind.AMOUNT) and value is not None:
            cell.value = int(value)
        elif value is not None and str(value):
            text = str(value)
            cell.value = text
            cell.data_type = "s"  # never a formula, whatever it starts with
            if text.startswith(FORMULA_STARTS):
                cell.quotePrefix = True
        if bold:
            cell.font = self.bold
        return cell

    def _proto(self, index: int, column: Column, currency: str | None) -> Cell:
        """One styled cell per column (and currency), reused row after row: openpyxl writes a cell
        out as it is appended, so only its value changes (formats are not looked up per cell)."""
        key = (index, currency)
        cell = self._protos.get(key)
        if cell is None:
            cell = WriteOnlyCell(self.sheet)
            if column.kind == Kind.AMOUNT and currency:
                cell.number_format = currency_format(currency)
            elif column.kind in (Kind.DATE, Kind.MONTH):
                cell.number_format = "yyyy-mm" if column.kind == Kind.MONTH else "yyyy-mm-dd"
            elif column.kind == Kind.DECIMAL:
                cell.number_format = "0.0"
            elif column.kind == Kind.TEXT:
                cell.quotePrefix = True  # only used for text that looks like a formula
            self._protos[key] = cell
        return cell

    def _value(self, index: int, column: Column, value: Any, currency: str | None) -> Any:
        if value is None:
            return None
        kind = column.kind
        if kind == Kind.TEXT or (kind == Kind.AMOUNT and not currency):
            if kind == Kind.AMOUNT:
                return int(value)
            text = str(value)
            if not text.startswith(FORMULA_STARTS):
                return text  # plain text is stored as text
            cell = self._proto(index, column, None)
            cell.value = text
            cell.data_type = "s"  # never a formula, whatever it starts with
            return cell
        if kind == Kind.COUNT:
            return int(value)
        cell = self._proto(index, column, currency if kind == Kind.AMOUNT else None)
        if kind == Kind.AMOUNT:
            cell.value = major_units(int(value), currency or "")
        elif kind == Kind.DECIMAL:
            cell.value = Decimal(value)
        else:
            cell.value = value
        return cell

    def header(self) -> None:
        self.sheet.append([self.cell(Column(c.title), c.title, None, bold=True) for c in self.table.columns])

    def rows(self, chunk: Sequence[Sequence[Any]]) -> None:
        columns, index = self.table.columns, self.table.currency
        for row in chunk:
            code = row[index] if index is not None else None
            self.sheet.append([self._value(i, c, v, _currency_of(c, row, code))
                               for i, (c, v) in enumerate(zip(columns, row, strict=True))])
            if code is not None and any(c.total for c in columns):
                sums = self.totals.setdefault(code, [0] * len(columns))
                for i, column in enumerate(columns):
                    if column.total and row[i] is not None:
                        sums[i] += row[i]

    def totals_rows(self) -> None:
        columns = self.table.columns
        for code in sorted(self.totals):
            values: list[Any] = [None] * len(columns)
            for i, column in enumerate(columns):
                if column.total:
                    values[i] = self.totals[code][i]
            values[self.table.label] = "Total"
            if self.table.currency is not None:
                values[self.table.currency] = code
            self.sheet.append([self.cell(c if c.total else Column(c.title), v, code, bold=True)
                               for c, v in zip(columns, values, strict=True)])


def _new_workbook(table: Table) -> tuple[Workbook, _Sheet]:
    workbook = Workbook(write_only=True)
    sheet = _Sheet(table, workbook.create_sheet(title="Report"))
    sheet.header()
    return workbook, sheet


def _finish(workbook: Workbook, sheet: _Sheet, path: str) -> None:
    sheet.totals_rows()
    filters = workbook.create_sheet(title="Filters")
    filters.append([sheet.cell(Column("Filter"), "Filter", None, bold=True),
                    sheet.cell(Column("Value"), "Value", None, bold=True)])
    for name, value in sheet.table.filters:
        filters.append([sheet.cell(Column(name), name, None), sheet.cell(Column(value), value, None)])
    workbook.save(path)


async def xlsx_stream(table: Table) -> AsyncIterator[bytes]:
    fd, path = tempfile.mkstemp(prefix="report-", suffix=".xlsx")
    os.close(fd)
    try:
        workbook, sheet = await asyncio.to_thread(_new_workbook, table)
        async for chunk in table.rows:
            await asyncio.to_thread(sheet.rows, chunk)
        await asyncio.to_thread(_finish, workbook, sheet, path)
        with open(path, "rb") as handle:  # noqa: ASYNC230 - each read below runs in a thread
            while block := await asyncio.to_thread(handle.read, _CHUNK):
                yield block
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


def export(table: Table, fmt: ExportFormat) -> StreamingResponse:
    name = safe_filename(table.name)
    if fmt == ExportFormat.CSV:
        body, media, suffix = csv_stream(table), CSV_TYPE, "csv"
    else:
        body, media, suffix = xlsx_stream(table), XLSX_TYPE, "xlsx"
    return StreamingResponse(body, media_type=media, headers={
        "Content-Disposition": f'attachment; filename="{name}.{suffix}"',
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
    })
