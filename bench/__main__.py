"""`python -m bench [--json FILE] [name ...] [-- bench options]` (or `make bench`): run the benchmarks.

    invoices   create and send through the gateway vs a bare FastAPI endpoint; commit -> Kafka delay
               at concurrency 16 and 4
    webhooks   signed Stripe webhook ingestion vs a bare endpoint: a 2,000-event burst and a steady
               200 events/s for 30 s (open loop); time until PAID; lost/doubled check
    pdfs       reportlab PDFs/s (10 and 200 lines), cached re-downloads, vs WeasyPrint
    reminders  reminder scan over 100,000 open invoices vs a naive full scan; emails/s to the sink
    reporting  2.4M events rebuilt (events/s), summary and monthly revenue vs a bare endpoint, 200k-row xlsx
    subscriptions  a month of renewals over 10,000 subscriptions: until all PAID, invoices/s, lost/doubled;
               change-preview p50/p99 vs a bare endpoint
    startup    each service's first start and restarts until /healthz answers (Kafka group joins)

Each prints its figures, ratios and checks (nothing lost or doubled, order, gapless numbers); none
passes or fails on speed, the exit code is 1 when a check failed. `--json FILE` also writes
{bench: {figures, ratios, checks, machine: {nproc, loadavg before/after, date}}} to FILE (rewritten
after each bench); `python -m bench.compare OLD.json NEW.json` sets two such files side by side.
Options after `--` go to the bench when one is named. Run one alone for its own options, e.g.
`python -m bench.invoice_bench --help`; `python -m bench.profile --help` runs one under py-spy.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench import report

BENCHES = {
    "invoices": "bench.invoice_bench",
    "webhooks": "bench.webhook_bench",
    "pdfs": "bench.pdf_bench",
    "reminders": "bench.reminder_bench",
    "reporting": "bench.reporting_bench",
    "subscriptions": "bench.subscriptions_bench",
    "startup": "bench.startup_bench",
}


def run_one(name: str, bench_args: list[str]) -> tuple[int, dict[str, Any]]:
    """Run one bench with a report open; its exit code and its JSON entry."""
    before = report.machine()
    started = time.monotonic()
    error = None
    with report.collecting(name) as collected:
        try:
            code = importlib.import_module(BENCHES[name]).main(bench_args) or 0
        except Exception as exc:  # one bench that breaks keeps the others' figures
            traceback.print_exc()
            code, error = 1, repr(exc)
    after = os.getloadavg()
    entry = {**collected.as_json(), "exit_code": code, "elapsed_s": round(time.monotonic() - started, 1),
             "args": bench_args, "error": error,
             "machine": {"nproc": before["nproc"], "python": before["python"], "date": before["date"],
                         "loadavg_before": before["loadavg"], "loadavg_after": list(after)}}
    return code, entry


def main(argv: list[str]) -> int:
    if any(arg in ("-h", "--help") for arg in argv[: argv.index("--") if "--" in argv else len(argv)]):
        print(__doc__)
        return 0
    bench_args: list[str] = []
    if "--" in argv:
        argv, bench_args = argv[: argv.index("--")], argv[argv.index("--") + 1:]
    parser = argparse.ArgumentParser(prog="python -m bench", add_help=False)
    parser.add_argument("--json", type=Path)
    parser.add_argument("names", nargs="*")
    args = parser.parse_args(argv)
    names = args.names or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    if bench_args and len(names) != 1:
        print("options after -- need exactly one bench named", file=sys.stderr)
        return 2
    results: dict[str, Any] = {}
    worst = 0
    for name in names:
        print(f"\n######## {name} ({BENCHES[name]})  load average {os.getloadavg()[0]:.2f}", flush=True)
        code, results[name] = run_one(name, bench_args)
        worst = max(worst, code)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.json:
        print(f"\nfigures written to {args.json}")
    return worst


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
