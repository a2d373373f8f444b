"""`python -m services.reporting` serves the reports (HTTP API and the Kafka feed of its read models);
`python -m services.reporting rebuild` replays the event log into fresh read models and swaps them in."""

from __future__ import annotations

import sys

from kit.cli import build_parser, load_settings
from kit.service import serve
from services.reporting.config import ReportingSettings


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("reporting", ReportingSettings, __doc__)
    commands = parser.add_subparsers(dest="command", metavar="{rebuild}")
    commands.add_parser(
        "rebuild", help="replay the invoice, payment and subscription topics from their first offset into "
                        "fresh read models, print progress, swap them in, exit",
        description="Replays every partition of the topics from its first offset into a fresh schema, "
                    "printing events/s and the lag left, then swaps it in in one transaction. The service "
                    "may keep running meanwhile.",
    )
    args = parser.parse_args(argv)
    settings = load_settings("reporting", ReportingSettings)
    if args.command == "rebuild":
        from services.reporting.rebuild import main as rebuild

        return rebuild(settings)
    from services.reporting.app import create_app

    serve(create_app(settings), settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
