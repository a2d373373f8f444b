"""The only place that talks to Stripe: a thin async adapter over the official SDK (`StripeClient`).

What the domain reads comes back parsed (`events.CheckoutSession`, `events.Customer`,
`events.Invoice`); the setup command, which compares whole objects with what it wants, gets plain
dicts (`StripeObject.to_dict()`). Offline, `api_base` points at the Stripe stand-in
(deploy/stripe_standin, in front of stripe-mock).
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

import stripe
import structlog
from pydantic import BaseModel, ValidationError

from kit.errors import AppError
from services.payments.config import PaymentsSettings, check_stripe_key
from services.payments.stripe.events import CheckoutSession, Customer, Invoice

log = structlog.get_logger(__name__)
M = TypeVar("M", bound=BaseModel)


class StripeUnavailable(AppError):
    """Stripe (or stripe-mock) refused or could not be reached; the caller may retry."""

    status_code = 502
    code = "payment_provider_error"


class StripeNotFound(Exception):
    """A retrieve for an object Stripe does not have (resource_missing)."""


class StripeGateway(Protocol):
    """What the payments service needs from Stripe."""

    async def create_customer(self, params: dict[str, Any], *, idempotency_key: str) -> Customer: ...

    async def create_checkout_session(self, params: dict[str, Any], *, idempotency_key: str) -> CheckoutSession: ...

    async def retrieve_customer(self, customer_id: str) -> Customer | None: ...

    async def retrieve_invoice(self, invoice_id: str) -> Invoice | None: ...


class StripeSetupApi(Protocol):
    """What the setup command (setup.py) needs from Stripe."""

    async def list_webhook_endpoints(self) -> list[dict[str, Any]]: ...
    async def create_webhook_endpoint(self, params: dict[str, Any]) -> dict[str, Any]: ...
    async def update_webhook_endpoint(self, endpoint_id: str, params: dict[str, Any]) -> dict[str, Any]: ...
    async def retrieve_product(self, product_id: str) -> dict[str, Any] | None: ...
    async def create_product(self, params: dict[str, Any]) -> dict[str, Any]: ...
    async def update_product(self, product_id: str, params: dict[str, Any]) -> dict[str, Any]: ...
    async def list_prices(self, lookup_keys: list[str]) -> list[dict[str, Any]]: ...
    async def create_price(self, params: dict[str, Any]) -> dict[str, Any]: ...
    async def update_price(self, price_id: str, params: dict[str, Any]) -> dict[str, Any]: ...
    async def list_payment_method_configurations(self) -> list[dict[str, Any]]: ...
    async def update_payment_method_configuration(self, pmc_id: str, params: dict[str, Any]) -> dict[str, Any]: ...
    async def list_portal_configurations(self) -> list[dict[str, Any]]: ...
    async def create_portal_configuration(self, params: dict[str, Any]) -> dict[str, Any]: ...
    async def update_portal_configuration(self, config_id: str, params: dict[str, Any]) -> dict[str, Any]: ...


def _dict(obj: Any) -> dict[str, Any]:
    return obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)


def _parsed(model: type[M], obj: Any, what: str) -> M:
    try:
        return model.model_validate(_dict(obj))
    except ValidationError as exc:
        log.warning("stripe_unreadable_answer", object=what, error=str(exc)[:300])
        raise StripeUnavailable(f"Stripe returned an unreadable {what}.") from None


def _missing(exc: stripe.StripeError) -> bool:
    return getattr(exc, "http_status", None) == 404 or getattr(exc, "code", None) == "resource_missing"


def _error(action: str, exc: stripe.StripeError) -> StripeUnavailable:
    status = getattr(exc, "http_status", None)
    log.warning("stripe_error", action=action, status=status, code=getattr(exc, "code", None), error=str(exc)[:300])
    return StripeUnavailable(
        f"Stripe could not {action}: {getattr(exc, 'user_message', None) or str(exc)[:200]}",
        details={"stripeStatus": status, "stripeCode": getattr(exc, "code", None)},
    )


class StripeSdkGateway:
    """`StripeGateway` and `StripeSetupApi` on the official SDK, async (httpx)."""

    def __init__(
        self,
        api_key: str,
        *,
        api_base: str | None = None,
        timeout: float = 20.0,
        max_network_retries: int = 2,
    ) -> None:
        check_stripe_key(api_key)
        base: dict[str, str] = {}
        if api_base:
            base = {"api": api_base.rstrip("/")}
        self.api_base = api_base
        self.client = stripe.StripeClient(
            api_key,
            base_addresses=base,  # type: ignore[arg-type]
            http_client=stripe.HTTPXClient(timeout=timeout),
            max_network_retries=max_network_retries,
        )

    @classmethod
    def from_settings(cls, settings: PaymentsSettings) -> StripeSdkGateway:
        return cls(
            settings.stripe_secret_key,
            api_base=settings.stripe_api_base,
            timeout=settings.stripe_timeout,
            max_network_retries=settings.stripe_max_network_retries,
        )

    # -- payments --------------------------------------------------------------------------------
    async def create_customer(self, params: dict[str, Any], *, idempotency_key: str) -> Customer:
        try:
            customer = await self.client.v1.customers.create_async(
                params=params,  # type: ignore[arg-type]
                options={"idempotency_key": idempotency_key},
            )
        except stripe.StripeError as exc:
            raise _error("create the customer", exc) from exc
        return _parsed(Customer, customer, "customer")

    async def create_checkout_session(self, params: dict[str, Any], *, idempotency_key: str) -> CheckoutSession:
        try:
            session = await self.client.v1.checkout.sessions.create_async(
                params=params,  # type: ignore[arg-type]
                options={"idempotency_key": idempotency_key},
            )
        except stripe.StripeError as exc:
            raise _error("create the checkout session", exc) from exc
        return _parsed(CheckoutSession, session, "checkout session")

    async def retrieve_customer(self, customer_id: str) -> Customer | None:
        """The customer (a deleted one comes back with `deleted`), None when Stripe has no such id."""
        try:
            customer = await self.client.v1.customers.retrieve_async(customer_id)
        except stripe.StripeError as exc:
            if _missing(exc):
                return None
            raise _error("read the customer", exc) from exc
        return _parsed(Customer, customer, "customer")

    async def retrieve_invoice(self, invoice_id: str) -> Invoice | None:
        """A Stripe invoice (a subscription's), None when Stripe has no such id."""
        try:
            invoice = await self.client.v1.invoices.retrieve_async(invoice_id)
        except stripe.StripeError as exc:
            if _missing(exc):
                return None
            raise _error("read the invoice", exc) from exc
        return _parsed(Invoice, invoice, "invoice")

    # -- setup -----------------------------------------------------------------------------------
    async def list_webhook_endpoints(self) -> list[dict[str, Any]]:
        page = await self.client.v1.webhook_endpoints.list_async(params={"limit": 100})
        return [_dict(e) for e in page.data]

    async def create_webhook_endpoint(self, params: dict[str, Any]) -> dict[str, Any]:
        return _dict(await self.client.v1.webhook_endpoints.create_async(params=params))  # type: ignore[arg-type]

    async def update_webhook_endpoint(self, endpoint_id: str, params: dict[str, Any]) -> dict[str, Any]:
        return _dict(await self.client.v1.webhook_endpoints.update_async(endpoint_id, params=params))  # type: ignore[arg-type]

    async def retrieve_product(self, product_id: str) -> dict[str, Any] | None:
        try:
            return _dict(await self.client.v1.products.retrieve_async(product_id))
        except stripe.InvalidRequestError as exc:
            if _missing(exc):
                return None
            raise

    async def create_product(self, params: dict[str, Any]) -> dict[str, Any]:
        return _dict(await self.client.v1.products.create_async(params=params))  # type: ignore[arg-type]

    async def update_product(self, product_id: str, params: dict[str, Any]) -> dict[str, Any]:
        return _dict(await self.client.v1.products.update_async(product_id, params=params))  # type: ignore[arg-type]

    async def list_prices(self, lookup_keys: list[str]) -> list[dict[str, Any]]:
        page = await self.client.v1.prices.list_async(
            params={"lookup_keys": lookup_keys, "limit": 100, "active": True}
        )
        return [_dict(p) for p in page.data]

    async def create_price(self, params: dict[str, Any]) -> dict[str, Any]:
        return _dict(await self.client.v1.prices.create_async(params=params))  # type: ignore[arg-type]

    async def update_price(self, price_id: str, params: dict[str, Any]) -> dict[str, Any]:
        return _dict(await self.client.v1.prices.update_async(price_id, params=params))  # type: ignore[arg-type]

    async def list_payment_method_configurations(self) -> list[dict[str, Any]]:
        page = await self.client.v1.payment_method_configurations.list_async(params={"limit": 100})
        return [_dict(c) for c in page.data]

    async def update_payment_method_configuration(self, pmc_id: str, params: dict[str, Any]) -> dict[str, Any]:
        return _dict(await self.client.v1.payment_method_configurations.update_async(pmc_id, params=params))  # type: ignore[arg-type]

    async def list_portal_configurations(self) -> list[dict[str, Any]]:
        page = await self.client.v1.billing_portal.configurations.list_async(params={"limit": 100})
        return [_dict(c) for c in page.data]

    async def create_portal_configuration(self, params: dict[str, Any]) -> dict[str, Any]:
        return _dict(await self.client.v1.billing_portal.configurations.create_async(params=params))  # type: ignore[arg-type]

    async def update_portal_configuration(self, config_id: str, params: dict[str, Any]) -> dict[str, Any]:
        return _dict(await self.client.v1.billing_portal.configurations.update_async(config_id, params=params))  # type: ignore[arg-type]
