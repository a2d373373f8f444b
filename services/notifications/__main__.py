"""`python -m services.notifications` runs one replica (HTTP API, Kafka consumers, delivery, scan)."""

from kit.cli import run_service
from services.notifications.app import create_app
from services.notifications.config import NotificationsSettings

if __name__ == "__main__":
    run_service("notifications", NotificationsSettings, create_app, __doc__)
