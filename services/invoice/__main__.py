"""`python -m services.invoice` runs one replica (HTTP API, Kafka consumers, outbox relay, jobs)."""

from kit.cli import run_service
from services.invoice.app import create_app
from services.invoice.config import InvoiceSettings

if __name__ == "__main__":
    run_service("invoice", InvoiceSettings, create_app, __doc__)
