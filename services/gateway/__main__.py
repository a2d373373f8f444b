"""`python -m services.gateway`: run the gateway (settings from GATEWAY_* and BILLING_* env vars)."""

from kit.cli import run_service
from services.gateway.app import create_app
from services.gateway.config import GatewaySettings


def main() -> None:
    run_service("gateway", GatewaySettings, create_app, __doc__)


if __name__ == "__main__":
    main()
