"""`python -m services.notifications` runs one replica (HTTP API, Kafka consumers, delivery, scan)."""

from kit.service import serve
from services.notifications.app import create_app
from services.notifications.config import NotificationsSettings

if __name__ == "__main__":
    settings = NotificationsSettings()
    serve(create_app(settings), settings)
