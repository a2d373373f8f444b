"""`python -m services.gateway`: run the gateway (settings from GATEWAY_* and BILLING_* env vars)."""

from kit.service import serve
from services.gateway.app import create_app
from services.gateway.config import GatewaySettings


def main() -> None:
    settings = GatewaySettings()
    serve(create_app(settings), settings)


if __name__ == "__main__":
    main()
