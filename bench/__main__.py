"""`python -m bench [name ...]` (or `make bench`): run the benchmarks one after another.

    invoices   create and send through the gateway vs a bare FastAPI endpoint; commit -> Kafka delay
    webhooks   signed Stripe webhook ingestion vs a bare endpoint; time until PAID; lost/doubled check
    pdfs       reportlab PDFs/s (10 and 200 lines), cached re-downloads, vs WeasyPrint
    reminders  reminder scan over 100,000 open invoices vs a naive full scan; emails/s to the sink
    reporting  2.4M events rebuilt (events/s), summary and monthly revenue vs a bare endpoint, 200k-row xlsx
    subscriptions  a month of renewals over 10,000 subscriptions: until all PAID, invoices/s, lost/doubled;
               change-preview p50/p99 vs a bare endpoint

Each prints its figures and ratios; none passes or fails. Run one alone for its own options, e.g.
`python -m bench.invoice_bench --help`.
"""

from __future__ import annotations

import importlib
import sys

BENCHES = {
    "invoices": "bench.invoice_bench",
    "webhooks": "bench.webhook_bench",
    "pdfs": "bench.pdf_bench",
    "reminders": "bench.reminder_bench",
    "reporting": "bench.reporting_bench",
    "subscriptions": "bench.subscriptions_bench",
}


def main(argv: list[str]) -> int:
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return 0
    names = argv or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    worst = 0
    for name in names:
        print(f"\n######## {name} ({BENCHES[name]})", flush=True)
        worst = max(worst, importlib.import_module(BENCHES[name]).main([]) or 0)
    return worst


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
