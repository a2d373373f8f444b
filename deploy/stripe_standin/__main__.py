"""``python -m deploy.stripe_standin``: the local Stripe stand-in as its own process."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import uvicorn

from deploy.stripe_standin.app import Settings, create_app


def parse_args(argv: Sequence[str] | None = None) -> tuple[Settings, str]:
    env = os.environ
    parser = argparse.ArgumentParser(
        prog="python -m deploy.stripe_standin",
        description=(
            "A local, stateful Stripe stand-in. The official stripe SDK talks to it as to Stripe "
            "(base_addresses={'api': URL}); it keeps state for products, prices, customers, checkout sessions, "
            "subscriptions, invoices, billing-portal sessions and test clocks, forwards every other request to "
            "stripe-mock, hosts the checkout/invoice/portal pages and delivers signed webhook events."
        ),
    )
    parser.add_argument("--host", default=env.get("STRIPE_STANDIN_HOST", "127.0.0.1"),
                        help="address to listen on (default 127.0.0.1; env STRIPE_STANDIN_HOST)")
    parser.add_argument("--port", type=int, default=int(env.get("STRIPE_STANDIN_PORT", "12113")),
                        help="port to listen on (default 12113; env STRIPE_STANDIN_PORT)")
    parser.add_argument("--stripe-mock-url", default=env.get("STRIPE_MOCK_URL", "http://127.0.0.1:12111"),
                        help="stripe-mock base URL, for every request the stand-in keeps no state for "
                             "(default http://127.0.0.1:12111; env STRIPE_MOCK_URL)")
    parser.add_argument("--webhook-url", action="append", default=None, metavar="URL",
                        help="where events are POSTed, e.g. http://127.0.0.1:8002/webhooks/stripe; repeatable "
                             "(env STRIPE_STANDIN_WEBHOOK_URLS, comma separated)")
    parser.add_argument("--webhook-secret", default=env.get("STRIPE_WEBHOOK_SECRET", "whsec_local"),
                        help="signing secret of the deliveries (default env STRIPE_WEBHOOK_SECRET or whsec_local)")
    parser.add_argument("--public-url", default=env.get("STRIPE_STANDIN_PUBLIC_URL"),
                        help="base URL of the hosted pages in checkout/portal/invoice URLs "
                             "(default http://HOST:PORT; env STRIPE_STANDIN_PUBLIC_URL)")
    parser.add_argument("--state-file", type=Path, default=env.get("STRIPE_STANDIN_STATE_FILE"),
                        help="keep the state in this JSON file across restarts (default: memory only; "
                             "env STRIPE_STANDIN_STATE_FILE)")
    parser.add_argument("--retry-for", type=float, default=900.0, metavar="SECONDS",
                        help="retry a failing delivery for this long after its first attempt (default 900)")
    parser.add_argument("--no-validate", action="store_true",
                        help="do not let stripe-mock check the parameters of the stateful requests first")
    parser.add_argument("--log-level", default=env.get("STRIPE_STANDIN_LOG_LEVEL", "info"),
                        choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    urls = args.webhook_url
    if urls is None:
        urls = [u.strip() for u in env.get("STRIPE_STANDIN_WEBHOOK_URLS", "").split(",") if u.strip()]
    return Settings(
        host=args.host, port=args.port, stripe_mock_url=args.stripe_mock_url.rstrip("/"), webhook_urls=list(urls),
        webhook_secret=args.webhook_secret, public_url=args.public_url, state_file=args.state_file,
        retry_for_seconds=args.retry_for, validate_with_mock=not args.no_validate,
    ), str(args.log_level)


def main(argv: Sequence[str] | None = None) -> int:
    settings, level = parse_args(argv)
    logging.basicConfig(level=level.upper(), stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    print(f"[stripe-standin] listening on http://{settings.host}:{settings.port} (pages at {settings.base_url}), "
          f"stripe-mock {settings.stripe_mock_url}, webhooks -> {', '.join(settings.webhook_urls) or 'none yet'}",
          flush=True)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=level,
                access_log=level == "debug")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
