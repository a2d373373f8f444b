"""The only place that talks to Stripe: a thin async adapter over the official SDK (`StripeClient`).

What the domain reads comes back parsed (`events.CheckoutSession`, `events.Customer`,
`events.Invoice`); the setup command, which compares whole objects with what it wants, gets plain
dicts (`StripeObject.to_dict()`). The client, the error mapping and the parsing are kit.stripe's;
offline, STRIPE_API_BASE points at the Stripe stand-in (deploy/stripe_standin, in front of stripe-mock).
"""

from __future__ import annotations

from typing import Any, Protocol

import stripe

from kit.stripe import StripeAdapter, is_missing, to_dict
from services.payments.stripe.events import CheckoutSession, Customer, Invoice


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


class StripeSdkGateway(StripeAdapter):
    """`StripeGateway` and `StripeSetupApi` on the official SDK, async (httpx). A payments call's
    failure is StripeUnavailable (502); the setup calls let the SDK's errors through to the command."""

    # -- payments --------------------------------------------------------------------------------
    async def create_customer(self, params: dict[str, Any], *, idempotency_key: str) -> Customer:
        request = self.client.v1.customers.create_async(
            params=params,  # type: ignore[arg-type]
            options={"idempotency_key": idempotency_key},
        )
        return await self._read("create the customer", Customer, request)

    async def create_checkout_session(self, params: dict[str, Any], *, idempotency_key: str) -> CheckoutSession:
        request = self.client.v1.checkout.sessions.create_async(
            params=params,  # type: ignore[arg-type]
            options={"idempotency_key": idempotency_key},
        )
        return await self._read("create the checkout session", CheckoutSession, request)

    async def retrieve_customer(self, customer_id: str) -> Customer | None:
        """The customer (a deleted one comes back with `deleted`), None when Stripe has no such id."""
        return await self._read_or_none("read the customer", Customer,
                                        self.client.v1.customers.retrieve_async(customer_id))

    async def retrieve_invoice(self, invoice_id: str) -> Invoice | None:
        """A Stripe invoice (a subscription's), None when Stripe has no such id."""
        return await self._read_or_none("read the invoice", Invoice, self.client.v1.invoices.retrieve_async(invoice_id))

    # -- setup -----------------------------------------------------------------------------------
    async def list_webhook_endpoints(self) -> list[dict[str, Any]]:
        page = await self.client.v1.webhook_endpoints.list_async(params={"limit": 100})
        return [to_dict(e) for e in page.data]

    async def create_webhook_endpoint(self, params: dict[str, Any]) -> dict[str, Any]:
        return to_dict(await self.client.v1.webhook_endpoints.create_async(params=params))  # type: ignore[arg-type]

    async def update_webhook_endpoint(self, endpoint_id: str, params: dict[str, Any]) -> dict[str, Any]:
        return to_dict(await self.client.v1.webhook_endpoints.update_async(endpoint_id, params=params))  # type: ignore[arg-type]

    async def retrieve_product(self, product_id: str) -> dict[str, Any] | None:
        try:
            return to_dict(await self.client.v1.products.retrieve_async(product_id))
        except stripe.InvalidRequestError as exc:
            if is_missing(exc):
                return None
            raise

    async def create_product(self, params: dict[str, Any]) -> dict[str, Any]:
        return to_dict(await self.client.v1.products.create_async(params=params))  # type: ignore[arg-type]

    async def update_product(self, product_id: str, params: dict[str, Any]) -> dict[str, Any]:
        return to_dict(await self.client.v1.products.update_async(product_id, params=params))  # type: ignore[arg-type]

    async def list_prices(self, lookup_keys: list[str]) -> list[dict[str, Any]]:
        page = await self.client.v1.prices.list_async(
            params={"lookup_keys": lookup_keys, "limit": 100, "active": True}
        )
        return [to_dict(p) for p in page.data]

    async def create_price(self, params: dict[str, Any]) -> dict[str, Any]:
        return to_dict(await self.client.v1.prices.create_async(params=params))  # type: ignore[arg-type]

    async def update_price(self, price_id: str, params: dict[str, Any]) -> dict[str, Any]:
        return to_dict(await self.client.v1.prices.update_async(price_id, params=params))  # type: ignore[arg-type]

    async def list_payment_method_configurations(self) -> list[dict[str, Any]]:
        page = await self.client.v1.payment_method_configurations.list_async(params={"limit": 100})
        return [to_dict(c) for c in page.data]

    async def update_payment_method_configuration(self, pmc_id: str, params: dict[str, Any]) -> dict[str, Any]:
        return to_dict(await self.client.v1.payment_method_configurations.update_async(pmc_id, params=params))  # type: ignore[arg-type]

    async def list_portal_configurations(self) -> list[dict[str, Any]]:
        page = await self.client.v1.billing_portal.configurations.list_async(params={"limit": 100})
        return [to_dict(c) for c in page.data]

    async def create_portal_configuration(self, params: dict[str, Any]) -> dict[str, Any]:
        return to_dict(await self.client.v1.billing_portal.configurations.create_async(params=params))  # type: ignore[arg-type]

    async def update_portal_configuration(self, config_id: str, params: dict[str, Any]) -> dict[str, Any]:
        return to_dict(await self.client.v1.billing_portal.configurations.update_async(config_id, params=params))  # type: ignore[arg-type]
