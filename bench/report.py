"""What a bench measured, collected as it prints: figures, ratios and guarantee checks.

A bench asks for `current(name)` once and records through it; the runner (`python -m bench --json FILE`)
opens one `collecting(name)` per bench and writes every report, with the machine's load around it, so
two runs can be set side by side by `python -m bench.compare`. Run alone, a bench gets a report of its
own that is printed and dropped.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from bench.stack import LoadResult, percentile

Better = Literal["higher", "lower"]

# Units where a smaller number is the better one; compare marks a change by this.
_LOWER_IS_BETTER = {"ms", "s", "MB", "B", "µs", "count"}


@dataclass
class Report:
    bench: str
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)
    ratios: dict[str, dict[str, Any]] = field(default_factory=dict)
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def figure(self, name: str, value: float, unit: str, *, better: Better | None = None) -> float:
        """Record one figure (NaN is kept as null: 'not measured')."""
        self.figures[name] = {"value": _number(value), "unit": unit,
                              "better": better or ("lower" if unit in _LOWER_IS_BETTER else "higher")}
        return value

    def ratio(self, name: str, numerator: float, denominator: float, *, target: str | None = None) -> float:
        value = numerator / denominator if denominator else float("nan")
        self.ratios[name] = {"value": _number(value), "target": target}
        return value

    def check(self, name: str, ok: bool, detail: str = "", *, show: bool = True) -> bool:
        """A guarantee (nothing lost, nothing doubled, order, gapless numbers): printed beside the speed."""
        self.checks[name] = {"ok": bool(ok), "detail": detail}
        if show:
            print(f"check {name:<48} {'ok  ' if ok else 'FAIL'}  {detail}")
        return ok

    def spread(self, name: str, seconds: list[float], unit: Literal["ms", "s"] = "ms", *,
               with_max: bool = True) -> str:
        """Record p50, p99 (and max) of durations given in seconds; the printable 'p50 .. p99 .. max ..'."""
        scale = 1000.0 if unit == "ms" else 1.0
        digits = 1 if unit == "ms" else 2
        shown = [("p50", percentile(seconds, 50)), ("p99", percentile(seconds, 99))]
        if with_max:
            shown.append(("max", max(seconds, default=float("nan"))))
        return "   ".join(f"{label} {self.figure(f'{name} {label}', value * scale, unit):.{digits}f} {unit}"
                          for label, value in shown)

    def load(self, name: str, result: LoadResult, unit: str = "req/s") -> LoadResult:
        """Rate, p50, p99, count and errors of one load phase, under `name`."""
        self.figure(f"{name} rate", result.rate, unit)
        self.figure(f"{name} p50", result.pct(50) * 1000, "ms")
        self.figure(f"{name} p99", result.pct(99) * 1000, "ms")
        self.figure(f"{name} n", len(result.latencies), "count", better="higher")
        self.figure(f"{name} errors", result.errors, "count")
        return result

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.checks.values())

    def as_json(self) -> dict[str, Any]:
        return {"figures": self.figures, "ratios": self.ratios, "checks": self.checks}


def _number(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


_active: Report | None = None


def current(bench: str) -> Report:
    """The report the runner opened for this bench, else a fresh one (the bench was run alone)."""
    if _active is not None and _active.bench == bench:
        return _active
    return Report(bench)


def machine() -> dict[str, Any]:
    return {"nproc": os.cpu_count(), "loadavg": list(os.getloadavg()), "python": platform.python_version(),
            "date": datetime.now(UTC).isoformat(timespec="seconds")}


@contextlib.contextmanager
def collecting(bench: str) -> Iterator[Report]:
    global _active
    _active = Report(bench)
    try:
        yield _active
    finally:
        _active = None


def out_of_order(sequences: dict[str, list[str]], expected: list[str]) -> int:
    """Aggregates whose events arrived in an order other than `expected` (types not listed are ignored)."""
    rank = {event_type: i for i, event_type in enumerate(expected)}
    bad = 0
    for seen in sequences.values():
        ranks = [rank[t] for t in seen if t in rank]
        if any(later < earlier for earlier, later in zip(ranks, ranks[1:], strict=False)):
            bad += 1
    return bad


def number_gaps(numbers: list[tuple[int, int]]) -> tuple[int, int, int]:
    """(numbers in use, repeats, gaps) of (year, seq) invoice numbers: gapless means 1..max each year."""
    repeats = len(numbers) - len(set(numbers))
    gaps = 0
    by_year: dict[int, set[int]] = {}
    for year, seq in numbers:
        by_year.setdefault(year, set()).add(seq)
    for seqs in by_year.values():
        gaps += max(seqs) - len(seqs)  # seqs >= 1, so this counts the numbers missing from 1..max
    return len(numbers), repeats, gaps


async def invoice_numbers(database_url: str) -> list[tuple[int, int]]:
    """(year, sequence) of every numbered invoice in the invoice service's database, for number_gaps."""
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(text(
                "SELECT number_year, number_seq FROM invoices WHERE number_seq IS NOT NULL"))).all()
        return [(int(year), int(seq)) for year, seq in rows]
    finally:
        await engine.dispose()
