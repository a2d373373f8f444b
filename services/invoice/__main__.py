"""`python -m services.invoice` runs one replica (HTTP API, Kafka consumers, outbox relay, jobs)."""

from kit.service import serve
from services.invoice.app import create_app
from services.invoice.config import InvoiceSettings

if __name__ == "__main__":
    settings = InvoiceSettings()
    serve(create_app(settings), settings)
