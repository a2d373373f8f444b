"""Issue 13: how long each service takes to start and to restart until it answers, on a fresh stack.

    python -m bench.startup_bench [--rounds 3] [--services invoice,payments,notifications,...]

Starts PostgreSQL (fsync on) and Kafka, then the services one after the other (bench/stack.py, the
launch path of `make run`), and times each first start. Then, `--rounds` times, stops each service
(SIGTERM, as a rolling deploy does) and starts it again. A start is timed until GET /healthz answers
200. That is after the service's startup: migrations, its Kafka consumers joined to their group, its
relay child reporting. Printed per service: the first start, and the median and max of the restarts.

A service's Kafka consumers are what make a start slow: each consumer that joins a group costs a
rebalance of about 3 s. A batch consumer is one consumer for all its topics (kit/consumer.py).
No speed is checked; the bench fails only when a start fails.
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench import report
from bench.stack import running_stack

SERVICES = ("invoice", "payments", "notifications", "subscriptions", "reporting")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.startup_bench",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="restarts of each service (default 3)")
    parser.add_argument("--services", default=",".join(SERVICES),
                        help=f"comma-separated, in start order (default {','.join(SERVICES)})")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.services.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SERVICES))
    if unknown or args.rounds < 1:
        parser.error(f"unknown service(s) {unknown}; choose from {', '.join(SERVICES)}" if unknown
                     else "--rounds must be at least 1")
    rep = report.current("startup")
    # No services handed to running_stack: it would start them untimed. Stopped here instead, also
    # when a start fails.
    with running_stack([]) as stack:
        try:
            first: dict[str, float] = {}
            for name in names:
                started = time.monotonic()
                stack.start_service(name)
                first[name] = time.monotonic() - started
            restarts: dict[str, list[float]] = {name: [] for name in names}
            for round_ in range(1, args.rounds + 1):
                print(f"restart round {round_}/{args.rounds}...", flush=True)
                for name in names:
                    process = stack.processes[name]
                    process.stop()
                    started = time.monotonic()
                    process.start()
                    restarts[name].append(time.monotonic() - started)
        finally:
            for process in stack.processes.values():
                process.stop()
    print(f"\n== start and restart until /healthz answers, {args.rounds} restarts each ==")
    for name in names:
        median = statistics.median(restarts[name])
        print(f"  {name:<14} first start {rep.figure(f'{name} first start', first[name], 's'):5.1f} s   "
              f"restart median {rep.figure(f'{name} restart median', median, 's'):5.1f} s   "
              f"max {rep.figure(f'{name} restart max', max(restarts[name]), 's'):5.1f} s")
    rep.check("every start answered", True, f"{len(names) * (args.rounds + 1)} starts")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
