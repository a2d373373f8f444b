"""`python -m services.payments` runs one replica (HTTP API, webhook worker, Kafka consumer, outbox relay).

A live Stripe key (sk_live_/rk_live_) is refused at start, like any other bad setting.
"""

from kit.cli import run_service
from services.payments.app import create_app
from services.payments.config import PaymentsSettings

if __name__ == "__main__":
    run_service("payments", PaymentsSettings, create_app, __doc__)
