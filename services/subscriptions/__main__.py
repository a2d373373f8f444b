"""`python -m services.subscriptions` runs one replica (HTTP API, billing.stripe consumers, outbox relay)."""

from kit.cli import run_service
from services.subscriptions.app import create_app
from services.subscriptions.config import SubscriptionsSettings

if __name__ == "__main__":
    run_service("subscriptions", SubscriptionsSettings, create_app, __doc__)
