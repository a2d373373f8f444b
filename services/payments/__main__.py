"""`python -m services.payments` runs one replica (HTTP API, webhook worker, Kafka consumer, outbox relay)."""

import sys

from pydantic import ValidationError

from kit.service import serve
from services.payments.config import PaymentsSettings

if __name__ == "__main__":
    try:
        settings = PaymentsSettings()
    except ValidationError as exc:
        # e.g. a live Stripe key: refuse to start, with the reason on one line.
        reasons = "; ".join(str(err.get("msg")) for err in exc.errors())
        print(f"payments: refusing to start: {reasons}", file=sys.stderr)
        sys.exit(2)
    from services.payments.app import create_app

    serve(create_app(settings), settings)
