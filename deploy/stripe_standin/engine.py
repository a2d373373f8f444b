"""The stand-in's domain logic: Stripe objects and their lifecycle, kept in a ``State``.

Everything here is synchronous and single-threaded: the HTTP layer (app.py) calls it under one
asyncio lock. Every state change emits the event Stripe would (``Engine.emit``); the HTTP layer
hands those to the webhook deliverer.

Time: a customer created on a test clock lives on that clock's ``frozen_time``; everything else uses
real time. ``advance_test_clock`` runs every due step of the clock's customers in time order, each at
its own moment (events carry that moment in ``created``); ``tick`` does the same in real time for
customers without a clock.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from deploy.stripe_standin import API_VERSION
from deploy.stripe_standin.arith import (
    DAY,
    INTERVALS,
    describe_interval,
    format_date,
    format_money,
    next_period_end,
    proration_pair,
)
from deploy.stripe_standin.errors import StripeError, card_declined, missing
from deploy.stripe_standin.forms import (
    as_bool,
    as_dict,
    as_int,
    as_list,
    as_str,
    metadata_update,
    require_str,
)
from deploy.stripe_standin.state import State, new_id

Obj = dict[str, Any]
EventSink = Callable[[Obj], None]

TRIAL_WILL_END_BEFORE = 3 * DAY
RETRY_DELAY = DAY  # next_payment_attempt after a failure (Stripe's smart retries vary; one day here)
MAX_ATTEMPTS = 4  # the first attempt and three retries, then the subscription becomes unpaid
INCOMPLETE_EXPIRES_AFTER = 23 * 3600
CHECKOUT_DEFAULT_EXPIRY = 24 * 3600
CHECKOUT_MIN_EXPIRY = 30 * 60
CARD_OUTCOMES = ("succeed", "decline", "none")
PRORATION_BEHAVIORS = ("create_prorations", "always_invoice", "none")
PAYMENT_BEHAVIORS = ("allow_incomplete", "default_incomplete", "error_if_incomplete", "pending_if_incomplete")
MISSING_PM_BEHAVIORS = ("cancel", "create_invoice", "pause")
OPEN_SUB_STATUSES = ("trialing", "active", "past_due", "unpaid", "incomplete", "paused")

KIND_NAMES = {
    "product": "product", "price": "price", "customer": "customer", "test_clock": "test clock",
    "checkout_session": "checkout.session", "subscription": "subscription", "invoice": "invoice",
    "invoiceitem": "invoiceitem", "payment_intent": "payment_intent", "portal_session": "billing portal session",
    "portal_configuration": "billing portal configuration",
}
KIND_BY_PREFIX = {
    "prod": "product", "price": "price", "cus": "customer", "clock": "test_clock", "cs": "checkout_session",
    "sub": "subscription", "in": "invoice", "ii": "invoiceitem", "pi": "payment_intent", "bps": "portal_session",
    "bpc": "portal_configuration",
}


@dataclass
class LineSpec:
    """One invoice line before it becomes a line (or a pending invoice item)."""

    amount: int
    description: str
    period_start: int
    period_end: int
    price_id: str
    quantity: int
    proration: bool
    subscription_item: str
    invoice_item: str | None = None


@dataclass
class ChangePlan:
    price: Obj
    quantity: int
    proration_date: int
    changed: bool = False
    reset: bool = False  # a different interval: the billing cycle restarts at the proration date
    new_period: tuple[int, int] | None = None
    prorations: list[LineSpec] = field(default_factory=list)  # become invoice items
    cycle_lines: list[LineSpec] = field(default_factory=list)  # the new full period, when reset
    invoice_now: bool = False


def _list(data: list[Obj], url: str, has_more: bool = False) -> Obj:
    return {"object": "list", "data": data, "has_more": has_more, "url": url}


def _diff(before: Obj, after: Obj) -> Obj:
    """Stripe's ``previous_attributes``: the old value of every top-level field that changed."""
    return {k: copy.deepcopy(v) for k, v in before.items() if after.get(k) != v}


class Engine:
    def __init__(
        self, state: State, *, public_url: str, on_event: EventSink | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.s = state
        self.public_url = public_url.rstrip("/")
        self.on_event = on_event
        self._clock = clock
        self._at: int | None = None

    # ------------------------------------------------------------------------------------------------
    # time and events

    def real_now(self) -> int:
        return int(self._clock())

    def clock_of(self, customer_id: str | None) -> str | None:
        customer = self.s.bucket("customer").get(customer_id or "")
        clock_id = customer.get("test_clock") if customer else None
        return clock_id if clock_id in self.s.bucket("test_clock") else None

    def now_for(self, customer_id: str | None) -> int:
        """The customer's time: its test clock's frozen time, else real time (or the step being run)."""
        if self._at is not None:
            return self._at
        clock_id = self.clock_of(customer_id)
        if clock_id is not None:
            return int(self.s.bucket("test_clock")[clock_id]["frozen_time"])
        return self.real_now()

    @contextmanager
    def at(self, moment: int) -> Iterator[None]:
        previous, self._at = self._at, moment
        try:
            yield
        finally:
            self._at = previous

    def view(self, obj: Obj) -> Obj:
        """A snapshot of ``obj`` as the API shows it now (embedded prices refreshed)."""
        out = copy.deepcopy(obj)
        if out.get("object") == "subscription":
            for item in out["items"]["data"]:
                price = self.s.bucket("price").get(item["price"]["id"])
                if price is not None:
                    item["price"] = copy.deepcopy(price)
        return out

    def emit(self, type: str, obj: Obj, *, created: int | None = None, previous: Obj | None = None) -> Obj:
        customer = obj.get("customer") if isinstance(obj.get("customer"), str) else None
        if obj.get("object") == "customer":
            customer = obj.get("id")
        data: Obj = {"object": self.view(obj)}
        if previous is not None:
            data["previous_attributes"] = copy.deepcopy(previous)
        event = {
            "id": new_id("evt"),
            "object": "event",
            "api_version": API_VERSION,
            "created": created if created is not None else self.now_for(customer),
            "data": data,
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": type,
        }
        self.s.add_event(event)
        if self.on_event is not None:
            self.on_event(event)
        return event

    # ------------------------------------------------------------------------------------------------
    # generic lookups, lists, expansion

    def get(self, kind: str, object_id: str, *, param: str | None = None) -> Obj:
        obj = self.s.bucket(kind).get(object_id)
        if obj is None or obj.get("deleted"):
            if param is None:
                raise missing(KIND_NAMES.get(kind, kind), object_id)
            raise missing(KIND_NAMES.get(kind, kind), object_id, param=param, status=400)
        return obj

    def find(self, object_id: str) -> Obj | None:
        kind = KIND_BY_PREFIX.get(object_id.split("_", 1)[0])
        if kind == "checkout_session" or object_id.startswith("cs_"):
            kind = "checkout_session"
        if kind is not None and object_id in self.s.bucket(kind):
            return self.s.bucket(kind)[object_id]
        for bucket in self.s.objects.values():
            if object_id in bucket:
                return bucket[object_id]
        return None

    def page(self, objects: list[Obj], params: Obj, url: str) -> Obj:
        """A Stripe list: newest first, ``limit`` (1-100, default 10), ``starting_after``/``ending_before``."""
        limit = as_int(params, "limit", 10)
        assert limit is not None
        if not 1 <= limit <= 100:
            raise StripeError("This value must be between 1 and 100.", param="limit")
        ordered = list(reversed(objects))
        after, before = as_str(params, "starting_after"), as_str(params, "ending_before")
        ids = [o["id"] for o in ordered]
        if after:
            if after not in ids:
                raise missing("object", after, param="starting_after", status=400)
            ordered = ordered[ids.index(after) + 1:]
        elif before:
            if before not in ids:
                raise missing("object", before, param="ending_before", status=400)
            ordered = ordered[: ids.index(before)]
            return _list([self.view(o) for o in ordered[-limit:]], url, len(ordered) > limit)
        return _list([self.view(o) for o in ordered[:limit]], url, len(ordered) > limit)

    def expand(self, obj: Obj, paths: list[str]) -> Obj:
        """Replace ids by objects along each dotted path (``latest_invoice``, ``data.customer``, ...)."""
        for path in paths:
            self._expand(obj, path.split("."))
        return obj

    def _expand(self, node: Any, parts: list[str]) -> None:
        if not parts:
            return
        if isinstance(node, list):
            for item in node:
                self._expand(item, parts)
            return
        if not isinstance(node, dict):
            return
        head, rest = parts[0], parts[1:]
        if head == "payments" and node.get("object") == "invoice" and "payments" not in node:
            node["payments"] = self._invoice_payments(node)
        value = node.get(head)
        if isinstance(value, str):
            target = self.find(value)
            if target is not None:
                node[head] = self.view(target)
                value = node[head]
        self._expand(value, rest)

    # ------------------------------------------------------------------------------------------------
    # products and prices

    def create_product(self, p: Obj, *, inline: bool = False) -> Obj:
        product_id = as_str(p, "id") or new_id("prod", 14)
        if product_id in self.s.bucket("product"):
            raise StripeError(f"Product already exists: {product_id}", param="id", code="resource_already_exists")
        now = self.real_now()
        product: Obj = {
            "id": product_id, "object": "product", "active": as_bool(p, "active", True),
            "created": now, "default_price": None, "description": as_str(p, "description"),
            "images": as_list(p, "images"), "livemode": False, "marketing_features": [],
            "metadata": metadata_update({}, p), "name": require_str(p, "name"), "package_dimensions": None,
            "shippable": as_bool(p, "shippable"), "statement_descriptor": as_str(p, "statement_descriptor"),
            "tax_code": as_str(p, "tax_code"), "unit_label": as_str(p, "unit_label"), "updated": now,
            "url": as_str(p, "url"),
        }
        self.s.bucket("product")[product_id] = product
        if inline:
            self.s.meta(product_id)["inline"] = True
            return product
        self.emit("product.created", product, created=now)
        default_price = as_dict(p, "default_price_data")
        if default_price:
            price = self.create_price({**default_price, "product": product_id})
            before = copy.deepcopy(product)
            product["default_price"] = price["id"]
            self.emit("product.updated", product, created=now, previous=_diff(before, product))
        return product

    def update_product(self, product_id: str, p: Obj) -> Obj:
        product = self.get("product", product_id)
        before = copy.deepcopy(product)
        for key in ("name", "description", "statement_descriptor", "unit_label", "url", "tax_code"):
            if key in p:
                product[key] = as_str(p, key)
        if "active" in p:
            product["active"] = bool(as_bool(p, "active"))
        if "default_price" in p:
            price_id = as_str(p, "default_price")
            if price_id is not None:
                self.get("price", price_id, param="default_price")
            product["default_price"] = price_id
        if "images" in p:
            product["images"] = as_list(p, "images")
        product["metadata"] = metadata_update(product["metadata"], p)
        if product != before:
            product["updated"] = self.real_now()
            self.emit("product.updated", product, previous=_diff(before, product))
        return product

    def delete_product(self, product_id: str) -> Obj:
        product = self.get("product", product_id)
        if any(pr["product"] == product_id and not self.s.meta(pr["id"]).get("inline")
               for pr in self.s.bucket("price").values()):
            raise StripeError("This product cannot be deleted because it has one or more user-created prices.",
                              param="id")
        del self.s.bucket("product")[product_id]
        self.emit("product.deleted", product)
        return {"id": product_id, "object": "product", "deleted": True}

    def list_products(self, p: Obj) -> Obj:
        active = as_bool(p, "active")
        ids = set(as_list(p, "ids"))
        items = [o for o in self.s.bucket("product").values()
                 if not self.s.meta(o["id"]).get("inline")
                 and (active is None or o["active"] == active) and (not ids or o["id"] in ids)]
        return self.page(items, p, "/v1/products")

    def _product_name(self, product_id: str) -> str:
        product = self.s.bucket("product").get(product_id)
        return str(product["name"]) if product else product_id

    def create_price(self, p: Obj, *, inline: bool = False, param: str = "") -> Obj:
        currency = require_str(p, "currency", param=f"{param}currency").lower()
        product_id = as_str(p, "product")
        if product_id is not None:
            self.get("product", product_id, param=f"{param}product")
        elif p.get("product_data"):
            product_id = self.create_product(as_dict(p, "product_data"), inline=inline)["id"]
        else:
            raise StripeError(f"Missing required param: {param}product.", param=f"{param}product",
                              code="parameter_missing")
        unit_amount = as_int(p, "unit_amount", param=f"{param}unit_amount")
        if unit_amount is None and as_str(p, "unit_amount_decimal") is not None:
            unit_amount = int(Decimal(str(as_str(p, "unit_amount_decimal"))))
        if unit_amount is None:
            raise StripeError(f"Missing required param: {param}unit_amount.", param=f"{param}unit_amount",
                              code="parameter_missing")
        if unit_amount < 0:
            raise StripeError("This value must be greater than or equal to 0.", param=f"{param}unit_amount")
        recurring_in = as_dict(p, "recurring")
        recurring: Obj | None = None
        if recurring_in:
            interval = require_str(recurring_in, "interval", param=f"{param}recurring[interval]")
            if interval not in INTERVALS:
                raise StripeError(f"Invalid recurring[interval]: must be one of {', '.join(INTERVALS)}",
                                  param=f"{param}recurring[interval]")
            count = as_int(recurring_in, "interval_count", 1)
            assert count is not None
            if count < 1 or (interval == "year" and count > 3) or (interval == "month" and count > 36):
                raise StripeError("The maximum billing interval is 3 years.", param=f"{param}recurring[interval_count]")
            recurring = {"interval": interval, "interval_count": count, "meter": None, "usage_type": "licensed"}
        lookup_key = as_str(p, "lookup_key")
        now = self.real_now()
        price: Obj = {
            "id": new_id("price"), "object": "price", "active": False if inline else as_bool(p, "active", True),
            "billing_scheme": "per_unit", "created": now, "currency": currency, "custom_unit_amount": None,
            "livemode": False, "lookup_key": lookup_key, "metadata": metadata_update({}, p),
            "nickname": as_str(p, "nickname"), "product": product_id, "recurring": recurring,
            "tax_behavior": as_str(p, "tax_behavior", "unspecified"), "tiers_mode": None,
            "transform_quantity": None, "type": "recurring" if recurring else "one_time",
            "unit_amount": unit_amount, "unit_amount_decimal": str(unit_amount),
        }
        if lookup_key is not None:
            self._claim_lookup_key(price, lookup_key, bool(as_bool(p, "transfer_lookup_key", False)))
        self.s.bucket("price")[price["id"]] = price
        trial_days = as_int(recurring_in, "trial_period_days") if recurring_in else None
        if trial_days:
            self.s.meta(price["id"])["trial_period_days"] = trial_days
        if inline:
            self.s.meta(price["id"])["inline"] = True
        else:
            self.emit("price.created", price, created=now)
        return price

    def _claim_lookup_key(self, price: Obj, lookup_key: str, transfer: bool) -> None:
        for other in self.s.bucket("price").values():
            if other["id"] != price["id"] and other.get("lookup_key") == lookup_key:
                if not transfer:
                    raise StripeError(
                        f"A price (`{other['id']}`) already uses that lookup key.", param="lookup_key",
                    )
                before = copy.deepcopy(other)
                other["lookup_key"] = None
                self.emit("price.updated", other, previous=_diff(before, other))

    def update_price(self, price_id: str, p: Obj) -> Obj:
        price = self.get("price", price_id)
        before = copy.deepcopy(price)
        if "active" in p:
            price["active"] = bool(as_bool(p, "active"))
        if "nickname" in p:
            price["nickname"] = as_str(p, "nickname")
        if "tax_behavior" in p:
            price["tax_behavior"] = as_str(p, "tax_behavior", "unspecified")
        if "lookup_key" in p:
            key = as_str(p, "lookup_key")
            if key is not None:
                self._claim_lookup_key(price, key, bool(as_bool(p, "transfer_lookup_key", False)))
            price["lookup_key"] = key
        price["metadata"] = metadata_update(price["metadata"], p)
        if price != before:
            self.emit("price.updated", price, previous=_diff(before, price))
        return price

    def list_prices(self, p: Obj) -> Obj:
        active = as_bool(p, "active")
        keys = set(as_list(p, "lookup_keys"))
        product = as_str(p, "product")
        currency = as_str(p, "currency")
        kind = as_str(p, "type")
        items = [
            o for o in self.s.bucket("price").values()
            if not self.s.meta(o["id"]).get("inline")
            and (active is None or o["active"] == active)
            and (not keys or o.get("lookup_key") in keys)
            and (product is None or o["product"] == product)
            and (currency is None or o["currency"] == currency.lower())
            and (kind is None or o["type"] == kind)
        ]
        return self.page(items, p, "/v1/prices")

    # ------------------------------------------------------------------------------------------------
    # customers and their simulated card

    def card(self, customer_id: str) -> str:
        return str(self.s.meta(customer_id).get("card", "succeed"))

    def set_card(self, customer_id: str, outcome: str, *, explicit: bool = True) -> Obj:
        """The customer's simulated card. ``explicit``: set on purpose (knob, portal, checkout), so a
        send_invoice subscription no longer takes it away."""
        customer = self.get("customer", customer_id)
        if outcome not in CARD_OUTCOMES:
            raise StripeError(f"outcome must be one of {', '.join(CARD_OUTCOMES)}", param="outcome")
        before = copy.deepcopy(customer)
        self.s.meta(customer_id)["card"] = outcome
        if explicit:
            self.s.meta(customer_id)["card_explicit"] = True
        customer["invoice_settings"]["default_payment_method"] = (
            None if outcome == "none" else f"pm_standin_{outcome}_{customer_id.removeprefix('cus_')}"
        )
        if customer != before:
            self.emit("customer.updated", customer, previous=_diff(before, customer))
        return customer

    def create_customer(self, p: Obj) -> Obj:
        clock_id = as_str(p, "test_clock")
        if clock_id is not None:
            self.get("test_clock", clock_id, param="test_clock")
        customer_id = new_id("cus", 14)
        customer: Obj = {
            "id": customer_id, "object": "customer", "address": None, "balance": as_int(p, "balance", 0),
            "created": 0, "currency": None, "default_source": None, "delinquent": False,
            "description": as_str(p, "description"), "discount": None, "email": as_str(p, "email"),
            "invoice_prefix": new_id("x", 8)[2:].upper(),
            "invoice_settings": {"custom_fields": None, "default_payment_method": None, "footer": None,
                                 "rendering_options": None},
            "livemode": False, "metadata": metadata_update({}, p), "name": as_str(p, "name"),
            "next_invoice_sequence": 1, "phone": as_str(p, "phone"),
            "preferred_locales": as_list(p, "preferred_locales"),
            "shipping": None, "tax_exempt": as_str(p, "tax_exempt", "none"), "test_clock": clock_id,
        }
        self.s.bucket("customer")[customer_id] = customer
        customer["created"] = self.now_for(customer_id)
        self.s.meta(customer_id)["card"] = "succeed"
        customer["invoice_settings"]["default_payment_method"] = f"pm_standin_succeed_{customer_id[4:]}"
        self.emit("customer.created", customer)
        return customer

    def retrieve_customer(self, customer_id: str) -> Obj:
        customer = self.s.bucket("customer").get(customer_id)
        if customer is not None and customer.get("deleted"):
            return {"id": customer_id, "object": "customer", "deleted": True}
        return self.get("customer", customer_id)

    def update_customer(self, customer_id: str, p: Obj) -> Obj:
        customer = self.get("customer", customer_id)
        before = copy.deepcopy(customer)
        for key in ("email", "name", "description", "phone"):
            if key in p:
                customer[key] = as_str(p, key)
        if "balance" in p:
            customer["balance"] = as_int(p, "balance", 0)
        if "preferred_locales" in p:
            customer["preferred_locales"] = as_list(p, "preferred_locales")
        settings = as_dict(p, "invoice_settings")
        if "default_payment_method" in settings:
            pm = as_str(settings, "default_payment_method")
            customer["invoice_settings"]["default_payment_method"] = pm
            self.s.meta(customer_id).update({"card": "succeed" if pm else "none", "card_explicit": True})
        customer["metadata"] = metadata_update(customer["metadata"], p)
        if customer != before:
            self.emit("customer.updated", customer, previous=_diff(before, customer))
        return customer

    def delete_customer(self, customer_id: str) -> Obj:
        customer = self.get("customer", customer_id)
        for sub in list(self.s.bucket("subscription").values()):
            if sub["customer"] == customer_id and sub["status"] not in ("canceled", "incomplete_expired"):
                self._cancel_now(sub, self.now_for(customer_id), reason="cancellation_requested")
        self.emit("customer.deleted", customer)
        customer["deleted"] = True
        return {"id": customer_id, "object": "customer", "deleted": True}

    def list_customers(self, p: Obj) -> Obj:
        email = as_str(p, "email")
        clock = as_str(p, "test_clock")
        items = [o for o in self.s.bucket("customer").values() if not o.get("deleted")
                 and (email is None or o.get("email") == email) and (clock is None or o.get("test_clock") == clock)]
        return self.page(items, p, "/v1/customers")

    # ------------------------------------------------------------------------------------------------
    # test clocks

    def create_test_clock(self, p: Obj) -> Obj:
        frozen = as_int(p, "frozen_time")
        if frozen is None:
            raise StripeError("Missing required param: frozen_time.", param="frozen_time", code="parameter_missing")
        now = self.real_now()
        clock: Obj = {"id": new_id("clock"), "object": "test_helpers.test_clock", "created": now,
                 "deletes_after": now + 30 * DAY, "frozen_time": frozen, "livemode": False,
                 "name": as_str(p, "name"), "status": "ready", "status_details": {}}
        self.s.bucket("test_clock")[clock["id"]] = clock
        self.emit("test_helpers.test_clock.created", clock, created=now)
        return clock

    def list_test_clocks(self, p: Obj) -> Obj:
        return self.page(list(self.s.bucket("test_clock").values()), p, "/v1/test_helpers/test_clocks")

    def delete_test_clock(self, clock_id: str) -> Obj:
        clock = self.get("test_clock", clock_id)
        for customer in list(self.s.bucket("customer").values()):
            if customer.get("test_clock") == clock_id and not customer.get("deleted"):
                self.delete_customer(customer["id"])
        del self.s.bucket("test_clock")[clock_id]
        self.emit("test_helpers.test_clock.deleted", clock, created=self.real_now())
        return {"id": clock_id, "object": "test_helpers.test_clock", "deleted": True}

    def advance_test_clock(self, clock_id: str, p: Obj) -> Obj:
        clock = self.get("test_clock", clock_id)
        target = as_int(p, "frozen_time")
        if target is None:
            raise StripeError("Missing required param: frozen_time.", param="frozen_time", code="parameter_missing")
        current = int(clock["frozen_time"])
        if target < current:
            raise StripeError(
                f"The test clock can only be advanced forward: frozen_time {target} is before the current "
                f"frozen_time {current}.", param="frozen_time",
            )
        customers = {c["id"] for c in self.s.bucket("customer").values()
                     if c.get("test_clock") == clock_id and not c.get("deleted")}
        retries = {i["id"] for i in self.s.bucket("invoice").values()
                   if i["customer"] in customers and self._retryable(i)}
        clock["status"] = "advancing"
        clock["status_details"] = {"advancing": {"target_frozen_time": target}}
        self.emit("test_helpers.test_clock.advancing", clock, created=current)
        self.run_due(customers, target, retries=retries)
        clock["frozen_time"] = target
        clock["status"] = "ready"
        clock["status_details"] = {}
        self.emit("test_helpers.test_clock.ready", clock, created=target)
        return clock

    # ------------------------------------------------------------------------------------------------
    # the scheduler: due steps of subscriptions and invoices, in time order

    def _retryable(self, invoice: Obj) -> bool:
        return (invoice["status"] == "open" and invoice["collection_method"] == "charge_automatically"
                and invoice["attempt_count"] > 0 and invoice.get("next_payment_attempt") is not None)

    def _steps(
        self, customers: set[str], until: int, retries: set[str] | None, done: set[str],
    ) -> list[tuple[int, int, str, str]]:
        steps: list[tuple[int, int, str, str]] = []
        for sub in self.s.bucket("subscription").values():
            if sub["customer"] not in customers:
                continue
            status = sub["status"]
            item = sub["items"]["data"][0]
            if status == "trialing":
                if not self.s.meta(sub["id"]).get("trial_will_end_sent"):
                    steps.append((max(sub["trial_end"] - TRIAL_WILL_END_BEFORE, sub["created"]), 1,
                                  "trial_will_end", sub["id"]))
                steps.append((sub["trial_end"], 2, "trial_end", sub["id"]))
            elif status in ("active", "past_due", "unpaid"):
                steps.append((item["current_period_end"], 3, "period_end", sub["id"]))
            elif status == "incomplete":
                steps.append((sub["created"] + INCOMPLETE_EXPIRES_AFTER, 3, "incomplete_expire", sub["id"]))
        for invoice in self.s.bucket("invoice").values():
            if invoice["customer"] not in customers or invoice["status"] != "open":
                continue
            if self._retryable(invoice):
                if retries is None:
                    steps.append((invoice["next_payment_attempt"], 0, "retry", invoice["id"]))
                elif invoice["id"] in retries and invoice["id"] not in done:
                    steps.append((min(invoice["next_payment_attempt"], until), 0, "retry", invoice["id"]))
            if (invoice["collection_method"] == "send_invoice" and invoice.get("due_date")
                    and not self.s.meta(invoice["id"]).get("overdue")):
                steps.append((invoice["due_date"], 0, "overdue", invoice["id"]))
        return [s for s in steps if s[0] <= until]

    def run_due(self, customers: set[str], until: int, *, retries: set[str] | None = None) -> int:
        """Run every step due up to ``until`` for ``customers``, earliest first; returns how many ran.

        ``retries``: for a test clock advance, the failed invoices to retry once (at their
        next_payment_attempt, or at the target time if that is later). ``None`` (real time): retry
        whenever next_payment_attempt has come.
        """
        done: set[str] = set()
        count = 0
        for _ in range(100_000):
            due = self._steps(customers, until, retries, done)
            if not due:
                break
            moment, _order, action, object_id = min(due)
            with self.at(moment):
                self._run_step(action, object_id, moment, done)
            count += 1
        return count

    def _run_step(self, action: str, object_id: str, moment: int, done: set[str]) -> None:
        if action == "retry":
            done.add(object_id)
            self._attempt(self.s.bucket("invoice")[object_id], moment)
            return
        if action == "overdue":
            invoice = self.s.bucket("invoice")[object_id]
            self.s.meta(object_id)["overdue"] = True
            sub = self._invoice_sub(invoice)
            if sub is not None and sub["status"] == "active":
                self._set_status(sub, "past_due", moment)
            return
        sub = self.s.bucket("subscription")[object_id]
        if action == "trial_will_end":
            self.s.meta(sub["id"])["trial_will_end_sent"] = True
            self.emit("customer.subscription.trial_will_end", sub, created=moment)
        elif action == "trial_end":
            self._end_trial(sub, moment)
        elif action == "period_end":
            self._renew(sub, moment)
        elif action == "incomplete_expire":
            before = copy.deepcopy(sub)
            sub["status"] = "incomplete_expired"
            sub["ended_at"] = moment
            for invoice in self.s.bucket("invoice").values():
                if self._invoice_sub_id(invoice) == sub["id"] and invoice["status"] == "open":
                    self._void(invoice, moment)
            self.emit("customer.subscription.updated", sub, created=moment, previous=_diff(before, sub))

    def tick(self) -> int:
        """Real-time steps for customers without a test clock, and checkout sessions that expired."""
        now = self.real_now()
        for session in self.s.bucket("checkout_session").values():
            if session["status"] == "open" and session["expires_at"] <= now:
                self._expire_session(session, now)
        customers = {c["id"] for c in self.s.bucket("customer").values()
                     if not c.get("test_clock") and not c.get("deleted")}
        return self.run_due(customers, now) if customers else 0

    # ------------------------------------------------------------------------------------------------
    # subscriptions

    def _price_for_item(self, item: Obj, param: str) -> Obj:
        if item.get("price_data"):
            data = as_dict(item, "price_data", param=f"{param}[price_data]")
            return self.create_price(data, inline=True, param=f"{param}[price_data]")
        price_id = as_str(item, "price")
        if price_id is None:
            raise StripeError(f"Missing required param: {param}[price].", param=f"{param}[price]",
                              code="parameter_missing")
        return self.get("price", price_id, param=f"{param}[price]")

    def _check_recurring(self, price: Obj, param: str) -> None:
        if price.get("type") != "recurring" or not price.get("recurring"):
            raise StripeError("The price specified is set to `type=one_time` but this field only accepts prices "
                              "with `type=recurring`.", param=param)
        if not price["active"] and not self.s.meta(price["id"]).get("inline"):
            raise StripeError("The price specified is inactive. This field only accepts active prices.", param=param)

    def create_subscription(self, p: Obj) -> Obj:
        customer_id = require_str(p, "customer")
        self.get("customer", customer_id, param="customer")
        items = as_list(p, "items")
        if not items:
            raise StripeError("Missing required param: items.", param="items", code="parameter_missing")
        if len(items) != 1:
            raise StripeError("The Stripe stand-in supports subscriptions with exactly one item.", param="items")
        price = self._price_for_item(items[0], "items[0]")
        self._check_recurring(price, "items[0][price]")
        quantity = as_int(items[0], "quantity", 1, param="items[0][quantity]")
        assert quantity is not None
        at = self.now_for(customer_id)
        trial_end: int | None = None
        raw_trial_end = as_str(p, "trial_end")
        if raw_trial_end == "now":
            trial_end = None
        elif raw_trial_end is not None:
            trial_end = as_int(p, "trial_end")
            assert trial_end is not None
            if trial_end <= at:
                raise StripeError("Invalid timestamp: must be an integer Unix timestamp in the future.",
                                  param="trial_end")
        elif as_int(p, "trial_period_days") is not None:
            days = as_int(p, "trial_period_days")
            assert days is not None
            trial_end = at + days * DAY if days > 0 else None
        elif as_bool(p, "trial_from_plan") and self.s.meta(price["id"]).get("trial_period_days"):
            trial_end = at + int(self.s.meta(price["id"])["trial_period_days"]) * DAY
        collection = as_str(p, "collection_method", "charge_automatically")
        if collection not in ("charge_automatically", "send_invoice"):
            raise StripeError("Invalid collection_method", param="collection_method")
        days_until_due = as_int(p, "days_until_due")
        if collection == "send_invoice" and days_until_due is None:
            raise StripeError("Missing required param: days_until_due.", param="days_until_due",
                              code="parameter_missing")
        payment_behavior = as_str(p, "payment_behavior", "allow_incomplete")
        if payment_behavior not in PAYMENT_BEHAVIORS:
            raise StripeError("Invalid payment_behavior", param="payment_behavior")
        proration_behavior = as_str(p, "proration_behavior", "create_prorations")
        if proration_behavior not in PRORATION_BEHAVIORS:
            raise StripeError("Invalid proration_behavior", param="proration_behavior")
        missing_pm = self._missing_pm_behavior(as_dict(p, "trial_settings"), "trial_settings")
        return self.start_subscription(
            customer_id, price, quantity, trial_end=trial_end, collection_method=str(collection),
            days_until_due=days_until_due, metadata=metadata_update({}, p), payment_behavior=str(payment_behavior),
            missing_payment_method=missing_pm, description=as_str(p, "description"),
        )

    def _missing_pm_behavior(self, trial_settings: Obj, param: str) -> str:
        end_behavior = as_dict(trial_settings, "end_behavior", param=f"{param}[end_behavior]")
        value = as_str(end_behavior, "missing_payment_method", "create_invoice")
        if value not in MISSING_PM_BEHAVIORS:
            raise StripeError("Invalid missing_payment_method", param=f"{param}[end_behavior][missing_payment_method]")
        return str(value)

    def start_subscription(
        self, customer_id: str, price: Obj, quantity: int, *, trial_end: int | None, collection_method: str,
        days_until_due: int | None, metadata: dict[str, str], payment_behavior: str = "allow_incomplete",
        missing_payment_method: str = "create_invoice", description: str | None = None,
    ) -> Obj:
        at = self.now_for(customer_id)
        if collection_method == "send_invoice" and not self.s.meta(customer_id).get("card_explicit"):
            # a customer billed by sent invoices has no card on file (unless one was given on purpose)
            self.set_card(customer_id, "none", explicit=False)
        recurring = price["recurring"]
        trialing = trial_end is not None and trial_end > at
        if trialing:
            assert trial_end is not None
            anchor, start, end = trial_end, at, trial_end
        else:
            anchor, start = at, at
            end = next_period_end(at, recurring["interval"], recurring["interval_count"], at)
        amount = int(price["unit_amount"]) * quantity
        owed = max(0, amount + int(self.get("customer", customer_id)["balance"]))
        if trialing:
            status = "trialing"
        elif collection_method == "send_invoice" or owed == 0:
            status = "active"
        elif payment_behavior == "default_incomplete":
            status = "incomplete"
        elif self.card(customer_id) == "succeed":
            status = "active"
        elif payment_behavior == "error_if_incomplete":
            raise card_declined()
        else:
            status = "incomplete"
        sub_id = new_id("sub")
        item: Obj = {
            "id": new_id("si", 14), "object": "subscription_item", "billing_thresholds": None, "created": at,
            "current_period_end": end, "current_period_start": start, "discounts": [], "metadata": {},
            "price": copy.deepcopy(price), "quantity": quantity, "subscription": sub_id, "tax_rates": [],
        }
        sub: Obj = {
            "id": sub_id, "object": "subscription", "application": None, "application_fee_percent": None,
            "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None},
            "billing_cycle_anchor": anchor, "billing_cycle_anchor_config": None,
            "billing_mode": {"flexible": None, "type": "classic"}, "billing_schedules": [], "billing_thresholds": None,
            "cancel_at": None, "cancel_at_period_end": False, "canceled_at": None,
            "cancellation_details": {"comment": None, "feedback": None, "reason": None},
            "collection_method": collection_method, "created": at, "currency": price["currency"],
            "customer": customer_id, "days_until_due": days_until_due if collection_method == "send_invoice" else None,
            "default_payment_method": None, "default_source": None, "default_tax_rates": [],
            "description": description, "discounts": [], "ended_at": None,
            "invoice_settings": {"account_tax_ids": None, "issuer": {"type": "self"}},
            "items": {"object": "list", "data": [item], "has_more": False,
                      "url": f"/v1/subscription_items?subscription={sub_id}"},
            "latest_invoice": None, "livemode": False, "metadata": metadata,
            "next_pending_invoice_item_invoice": None, "on_behalf_of": None, "pause_collection": None,
            "payment_settings": {"payment_method_options": None, "payment_method_types": None,
                                 "save_default_payment_method": "off"},
            "pending_invoice_item_interval": None, "pending_setup_intent": None, "pending_update": None,
            "schedule": None, "start_date": at, "status": status, "test_clock": self.clock_of(customer_id),
            "transfer_data": None, "trial_end": trial_end if trialing else None,
            "trial_settings": {"end_behavior": {"missing_payment_method": missing_payment_method}},
            "trial_start": at if trialing else None,
        }
        self.s.bucket("subscription")[sub_id] = sub
        self.s.meta(sub_id).update({"anchor": anchor, "trial_will_end_sent": False})
        invoice = None
        if not trialing:  # the first invoice exists when the subscription does (latest_invoice is set)
            line = self._cycle_line(sub, price, quantity, start, end)
            invoice = self._prepare_invoice(sub, [line], "subscription_create", at, at)
        self.emit("customer.subscription.created", sub, created=at)
        if invoice is not None:
            self._publish_invoice(invoice, sub, attempt=payment_behavior != "default_incomplete")
        elif trial_end is not None and trial_end - at <= TRIAL_WILL_END_BEFORE:
            self.s.meta(sub_id)["trial_will_end_sent"] = True
            self.emit("customer.subscription.trial_will_end", sub, created=at)
        return sub

    def retrieve_subscription(self, sub_id: str) -> Obj:
        return self.get("subscription", sub_id)

    def list_subscriptions(self, p: Obj) -> Obj:
        customer = as_str(p, "customer")
        status = as_str(p, "status")
        price = as_str(p, "price")

        def keep(sub: Obj) -> bool:
            if customer is not None and sub["customer"] != customer:
                return False
            if price is not None and sub["items"]["data"][0]["price"]["id"] != price:
                return False
            if status in (None, ""):
                return str(sub["status"]) not in ("canceled", "incomplete_expired")
            if status == "all":
                return True
            if status == "ended":
                return str(sub["status"]) in ("canceled", "incomplete_expired")
            return bool(sub["status"] == status)

        return self.page([s for s in self.s.bucket("subscription").values() if keep(s)], p, "/v1/subscriptions")

    def _set_status(self, sub: Obj, status: str, moment: int) -> None:
        if sub["status"] == status:
            return
        before = copy.deepcopy(sub)
        sub["status"] = status
        self.emit("customer.subscription.updated", sub, created=moment, previous=_diff(before, sub))

    def _current_price(self, sub: Obj) -> Obj:
        item = sub["items"]["data"][0]
        price: Obj = self.s.bucket("price").get(item["price"]["id"], item["price"])
        return price

    def _anchor(self, sub: Obj) -> int:
        anchor = self.s.meta(sub["id"]).get("anchor")
        return int(anchor if anchor is not None else sub["billing_cycle_anchor"])

    def _end_trial(self, sub: Obj, moment: int) -> None:
        customer_id = sub["customer"]
        before = copy.deepcopy(sub)
        item = sub["items"]["data"][0]
        price = self._current_price(sub)
        recurring = price["recurring"]
        no_pm = self.card(customer_id) == "none"
        behavior = sub["trial_settings"]["end_behavior"]["missing_payment_method"]
        sub["trial_end"] = moment
        if no_pm and behavior == "cancel":
            sub.update({"status": "canceled", "canceled_at": moment, "ended_at": moment})
            sub["cancellation_details"]["reason"] = "cancellation_requested"
            item["current_period_end"] = moment
            self.emit("customer.subscription.deleted", sub, created=moment)
            return
        if no_pm and behavior == "pause":
            sub["status"] = "paused"
            item["current_period_end"] = moment
            self.emit("customer.subscription.updated", sub, created=moment, previous=_diff(before, sub))
            self.emit("customer.subscription.paused", sub, created=moment)
            return
        end = next_period_end(moment, recurring["interval"], recurring["interval_count"], moment)
        sub["status"] = "active"
        sub["billing_cycle_anchor"] = moment
        self.s.meta(sub["id"])["anchor"] = moment
        item["current_period_start"], item["current_period_end"] = moment, end
        line = self._cycle_line(sub, price, int(item["quantity"]), moment, end)
        invoice = self._prepare_invoice(sub, [line], "subscription_cycle",
                                        before["items"]["data"][0]["current_period_start"], moment)
        self.emit("customer.subscription.updated", sub, created=moment, previous=_diff(before, sub))
        self._publish_invoice(invoice, sub)

    def _renew(self, sub: Obj, moment: int) -> None:
        item = sub["items"]["data"][0]
        if sub["cancel_at_period_end"]:
            sub["status"] = "canceled"
            sub["ended_at"] = moment
            sub["canceled_at"] = sub.get("canceled_at") or moment
            self.emit("customer.subscription.deleted", sub, created=moment)
            return
        before = copy.deepcopy(sub)
        price = self._current_price(sub)
        recurring = price["recurring"]
        old_start, old_end = item["current_period_start"], item["current_period_end"]
        anchor = self._anchor(sub)
        new_end = next_period_end(anchor, recurring["interval"], recurring["interval_count"], old_end)
        item["current_period_start"], item["current_period_end"] = old_end, new_end
        line = self._cycle_line(sub, price, int(item["quantity"]), old_end, new_end)
        invoice = self._prepare_invoice(sub, [line], "subscription_cycle", old_start, old_end)
        self.emit("customer.subscription.updated", sub, created=moment, previous=_diff(before, sub))
        self._publish_invoice(invoice, sub)

    def _requested_item(self, sub: Obj, items: list[Any], param: str) -> tuple[Obj, int]:
        item = sub["items"]["data"][0]
        price, quantity = self._current_price(sub), int(item["quantity"])
        if not items:
            return price, quantity
        if len(items) != 1 or not isinstance(items[0], dict):
            raise StripeError("The Stripe stand-in supports subscriptions with exactly one item.", param=param)
        change = items[0]
        item_id = as_str(change, "id")
        if item_id is None:
            raise StripeError(
                f"Pass {param}[0][id] (the subscription item to change): without it Stripe adds a second item, "
                "which the stand-in does not support.", param=f"{param}[0][id]",
            )
        if item_id != item["id"]:
            raise missing("subscription item", item_id, param=f"{param}[0][id]", status=400)
        if change.get("price") or change.get("price_data"):
            price = self._price_for_item(change, f"{param}[0]")
            self._check_recurring(price, f"{param}[0][price]")
        new_quantity = as_int(change, "quantity", quantity, param=f"{param}[0][quantity]")
        assert new_quantity is not None
        return price, new_quantity

    def plan_change(self, sub: Obj, price: Obj, quantity: int, proration_date: int | None, behavior: str,
                    *, param: str = "proration_date") -> ChangePlan:
        """What changing ``sub`` to ``price`` × ``quantity`` does (shared by the update and the preview)."""
        item = sub["items"]["data"][0]
        at = self.now_for(sub["customer"])
        old_price = self._current_price(sub)
        old_quantity = int(item["quantity"])
        start, end = int(item["current_period_start"]), int(item["current_period_end"])
        pd = at if proration_date is None else proration_date
        plan = ChangePlan(price=price, quantity=quantity, proration_date=pd)
        plan.changed = price["id"] != old_price["id"] or quantity != old_quantity
        if not plan.changed:
            return plan
        if price["currency"] != sub["currency"]:
            raise StripeError("The price specified has a different currency than the subscription.",
                              param="items[0][price]")
        if behavior not in PRORATION_BEHAVIORS:
            raise StripeError("Invalid proration_behavior", param="proration_behavior")
        if sub["status"] not in ("active", "past_due", "unpaid"):
            return plan  # no prorations in a trial (its end invoices the new price), nor while incomplete/paused
        if not start <= pd <= end:
            raise StripeError(
                f"The proration_date ({pd}) must be within the current billing period of the subscription "
                f"({start} to {end}).", param=param,
            )
        new_rec, old_rec = price["recurring"], old_price["recurring"]
        plan.reset = ((new_rec["interval"], new_rec["interval_count"])
                      != (old_rec["interval"], old_rec["interval_count"]))
        credit, debit = proration_pair(int(old_price["unit_amount"]), old_quantity, int(price["unit_amount"]),
                                       quantity, start, end, pd)
        credit_line = LineSpec(credit, self._proration_text("Unused time on", old_price, old_quantity, pd),
                               pd, end, old_price["id"], old_quantity, True, item["id"])
        debit_line = LineSpec(debit, self._proration_text("Remaining time on", price, quantity, pd),
                              pd, end, price["id"], quantity, True, item["id"])
        if plan.reset:
            new_end = next_period_end(pd, new_rec["interval"], new_rec["interval_count"], pd)
            plan.new_period = (pd, new_end)
            if behavior != "none" and credit != 0:
                plan.prorations = [credit_line]
            plan.cycle_lines = [self._cycle_line(sub, price, quantity, pd, new_end)]
            plan.invoice_now = True
        else:
            if behavior != "none":
                plan.prorations = [line for line in (credit_line, debit_line) if line.amount != 0]
            plan.invoice_now = behavior == "always_invoice"
        return plan

    def _proration_text(self, prefix: str, price: Obj, quantity: int, pd: int) -> str:
        count = f"{quantity} × " if quantity != 1 else ""
        return f"{prefix} {count}{self._product_name(price['product'])} after {format_date(pd)}"

    def _cycle_line(self, sub: Obj, price: Obj, quantity: int, start: int, end: int) -> LineSpec:
        recurring = price["recurring"]
        text = (f"{quantity} × {self._product_name(price['product'])} (at "
                f"{format_money(int(price['unit_amount']), price['currency'])} / "
                f"{describe_interval(recurring['interval'], recurring['interval_count'])})")
        return LineSpec(int(price["unit_amount"]) * quantity, text, start, end, price["id"], quantity, False,
                        sub["items"]["data"][0]["id"])

    def update_subscription(self, sub_id: str, p: Obj) -> Obj:
        sub = self.get("subscription", sub_id)
        customer_id = sub["customer"]
        at = self.now_for(customer_id)
        if sub["status"] in ("canceled", "incomplete_expired"):
            allowed = {"metadata", "cancellation_details", "expand"}
            if set(p) - allowed:
                raise StripeError("A canceled subscription can only update its cancellation_details and metadata.",
                                  param=sorted(set(p) - allowed)[0])
        behavior = as_str(p, "proration_behavior", "create_prorations")
        assert behavior is not None
        if behavior not in PRORATION_BEHAVIORS:
            raise StripeError("Invalid proration_behavior", param="proration_behavior")
        payment_behavior = as_str(p, "payment_behavior", "allow_incomplete")
        if payment_behavior not in PAYMENT_BEHAVIORS:
            raise StripeError("Invalid payment_behavior", param="payment_behavior")
        price, quantity = self._requested_item(sub, as_list(p, "items"), "items")
        plan = self.plan_change(sub, price, quantity, as_int(p, "proration_date"), behavior)
        if as_str(p, "billing_cycle_anchor") == "now" and not plan.reset and sub["status"] != "trialing":
            plan = self._reset_now(sub, plan, behavior)
        if (plan.invoice_now and payment_behavior == "error_if_incomplete"
                and sub["collection_method"] == "charge_automatically" and self.card(customer_id) != "succeed"
                and sum(x.amount for x in [*plan.prorations, *plan.cycle_lines]) > 0):
            raise card_declined()
        before = copy.deepcopy(sub)
        item = sub["items"]["data"][0]
        if plan.changed:
            item["price"] = copy.deepcopy(price)
            item["quantity"] = quantity
        if plan.reset and plan.new_period is not None:
            item["current_period_start"], item["current_period_end"] = plan.new_period
            sub["billing_cycle_anchor"] = plan.new_period[0]
            self.s.meta(sub_id)["anchor"] = plan.new_period[0]
        sub["metadata"] = metadata_update(sub["metadata"], p)
        for key in ("description",):
            if key in p:
                sub[key] = as_str(p, key)
        if "days_until_due" in p and sub["collection_method"] == "send_invoice":
            sub["days_until_due"] = as_int(p, "days_until_due")
        if "trial_settings" in p:
            sub["trial_settings"]["end_behavior"]["missing_payment_method"] = self._missing_pm_behavior(
                as_dict(p, "trial_settings"), "trial_settings")
        if "cancel_at_period_end" in p:
            cancel = bool(as_bool(p, "cancel_at_period_end"))
            sub["cancel_at_period_end"] = cancel
            sub["cancel_at"] = item["current_period_end"] if cancel else None
            sub["canceled_at"] = at if cancel else None
            sub["cancellation_details"]["reason"] = "cancellation_requested" if cancel else None
        end_trial_now = False
        raw_trial_end = as_str(p, "trial_end")
        if raw_trial_end is not None and sub["status"] == "trialing":
            if raw_trial_end == "now":
                end_trial_now = True
            else:
                new_trial_end = as_int(p, "trial_end")
                assert new_trial_end is not None
                if new_trial_end <= at:
                    raise StripeError("Invalid timestamp: must be an integer Unix timestamp in the future.",
                                      param="trial_end")
                sub["trial_end"] = new_trial_end
                item["current_period_end"] = new_trial_end
                sub["billing_cycle_anchor"] = new_trial_end
                self.s.meta(sub_id)["anchor"] = new_trial_end
                if new_trial_end - at > TRIAL_WILL_END_BEFORE:
                    self.s.meta(sub_id)["trial_will_end_sent"] = False
        for spec in plan.prorations:
            self._create_invoice_item(sub, spec, at)
        invoice = None
        if plan.invoice_now:
            invoice = self._prepare_invoice(sub, plan.cycle_lines, "subscription_update", at, at,
                                            proration_date=plan.proration_date)
        if sub != before:
            self.emit("customer.subscription.updated", sub, created=at, previous=_diff(before, sub))
        if invoice is not None:
            self._publish_invoice(invoice, sub)
        if end_trial_now:
            self._end_trial(sub, at)
        return sub

    def _reset_now(self, sub: Obj, plan: ChangePlan, behavior: str) -> ChangePlan:
        """``billing_cycle_anchor=now``: credit the unused time, start a full period now."""
        at = self.now_for(sub["customer"])
        item = sub["items"]["data"][0]
        old_price = self._current_price(sub)
        credit, _ = proration_pair(int(old_price["unit_amount"]), int(item["quantity"]), 0, 0,
                                   int(item["current_period_start"]), int(item["current_period_end"]), at)
        rec = plan.price["recurring"]
        end = next_period_end(at, rec["interval"], rec["interval_count"], at)
        reset = ChangePlan(price=plan.price, quantity=plan.quantity, proration_date=at, changed=True, reset=True,
                           new_period=(at, end), invoice_now=True)
        if behavior != "none" and credit != 0:
            reset.prorations = [LineSpec(credit, self._proration_text("Unused time on", old_price,
                                                                      int(item["quantity"]), at),
                                         at, int(item["current_period_end"]), old_price["id"], int(item["quantity"]),
                                         True, item["id"])]
        reset.cycle_lines = [self._cycle_line(sub, plan.price, plan.quantity, at, end)]
        return reset

    def cancel_subscription(self, sub_id: str, p: Obj) -> Obj:
        sub = self.get("subscription", sub_id)
        if sub["status"] in ("canceled", "incomplete_expired"):
            raise StripeError(f"This subscription is already canceled: {sub_id}", param="subscription")
        self._cancel_now(sub, self.now_for(sub["customer"]), reason="cancellation_requested")
        return sub

    def _cancel_now(self, sub: Obj, moment: int, *, reason: str | None) -> None:
        sub.update({"status": "canceled", "canceled_at": moment, "ended_at": moment, "cancel_at": None})
        sub["cancellation_details"]["reason"] = reason
        self.emit("customer.subscription.deleted", sub, created=moment)

    # ------------------------------------------------------------------------------------------------
    # invoices

    def _invoice_sub_id(self, invoice: Obj) -> str | None:
        parent = invoice.get("parent") or {}
        details = parent.get("subscription_details") or {}
        sub = details.get("subscription")
        return sub if isinstance(sub, str) else None

    def _invoice_sub(self, invoice: Obj) -> Obj | None:
        sub_id = self._invoice_sub_id(invoice)
        return self.s.bucket("subscription").get(sub_id) if sub_id else None

    def _pending_items(self, sub_id: str) -> list[Obj]:
        return [ii for ii in self.s.bucket("invoiceitem").values()
                if ii.get("invoice") is None and (ii.get("parent") or {}).get("subscription_details", {})
                .get("subscription") == sub_id]

    def _item_spec(self, ii: Obj) -> LineSpec:
        return LineSpec(int(ii["amount"]), str(ii["description"]), int(ii["period"]["start"]), int(ii["period"]["end"]),
                        ii["pricing"]["price_details"]["price"], int(ii["quantity"]), bool(ii["proration"]),
                        ii["parent"]["subscription_details"]["subscription_item"], invoice_item=ii["id"])

    def _create_invoice_item(self, sub: Obj, spec: LineSpec, at: int) -> Obj:
        price = self.s.bucket("price").get(spec.price_id) or self._current_price(sub)
        ii: Obj = {
            "id": new_id("ii"), "object": "invoiceitem", "amount": spec.amount, "currency": sub["currency"],
            "customer": sub["customer"], "date": at, "description": spec.description, "discountable": False,
            "discounts": [], "invoice": None, "livemode": False, "metadata": {}, "net_amount": spec.amount,
            "parent": {"subscription_details": {"subscription": sub["id"], "subscription_item": spec.subscription_item},
                       "type": "subscription_details"},
            "period": {"end": spec.period_end, "start": spec.period_start},
            "pricing": {"price_details": {"price": spec.price_id, "product": price["product"]}, "type": "price_details",
                        "unit_amount_decimal": self._unit_decimal(spec)},
            "proration": spec.proration, "proration_details": {"discount_amounts": []},
            "quantity": spec.quantity, "quantity_decimal": str(spec.quantity), "tax_rates": [],
            "test_clock": sub.get("test_clock"),
        }
        self.s.bucket("invoiceitem")[ii["id"]] = ii
        self.emit("invoiceitem.created", ii, created=at)
        return ii

    @staticmethod
    def _unit_decimal(spec: LineSpec) -> str:
        value = Decimal(spec.amount) / Decimal(spec.quantity or 1)
        text = format(value.normalize(), "f")
        return text

    def _line(self, spec: LineSpec, invoice_id: str, sub: Obj) -> Obj:
        price = self.s.bucket("price").get(spec.price_id) or self._current_price(sub)
        return {
            "id": new_id("il"), "object": "line_item", "amount": spec.amount, "currency": sub["currency"],
            "description": spec.description, "discount_amounts": [], "discountable": not spec.proration,
            "discounts": [], "invoice": invoice_id, "livemode": False, "metadata": {},
            "parent": {
                "invoice_item_details": None,
                "subscription_item_details": {
                    "invoice_item": spec.invoice_item, "proration": spec.proration,
                    "proration_details": {"credited_items": None}, "subscription": sub["id"],
                    "subscription_item": spec.subscription_item,
                },
                "type": "subscription_item_details",
            },
            "period": {"end": spec.period_end, "start": spec.period_start},
            "pretax_credit_amounts": [],
            "pricing": {"price_details": {"price": spec.price_id, "product": price["product"]}, "type": "price_details",
                        "unit_amount_decimal": self._unit_decimal(spec)},
            "quantity": spec.quantity, "subtotal": spec.amount, "taxes": [],
        }

    def build_invoice(
        self, sub: Obj, specs: list[LineSpec], billing_reason: str, period_start: int, period_end: int, *,
        preview: bool, pending: list[LineSpec] | None = None, proration_date: int | None = None,
    ) -> Obj:
        """An invoice of ``sub``: pending items first, then ``specs``; totals and balance applied."""
        customer = self.get("customer", sub["customer"])
        at = self.now_for(sub["customer"])
        invoice_id = new_id("upcoming_in") if preview else new_id("in")
        all_specs = [*(pending or []), *specs]
        lines = [self._line(spec, invoice_id, sub) for spec in all_specs]
        subtotal = sum(line["amount"] for line in lines)
        total = subtotal
        balance = int(customer["balance"])
        after_balance = total + balance
        amount_due = max(0, after_balance)
        details: Obj = {"metadata": copy.deepcopy(sub["metadata"]), "subscription": sub["id"]}
        if proration_date is not None:
            details["subscription_proration_date"] = proration_date
        return {
            "id": invoice_id, "object": "invoice", "account_country": "US", "account_name": "Stripe stand-in",
            "account_tax_ids": None, "amount_due": amount_due, "amount_overpaid": 0, "amount_paid": 0,
            "amount_paid_off_stripe": 0, "amount_remaining": amount_due, "amount_shipping": 0, "application": None,
            "attempt_count": 0, "attempted": False, "auto_advance": not preview,
            "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None, "provider": None,
                              "status": None},
            "automatically_finalizes_at": None, "billing_reason": billing_reason,
            "collection_method": sub["collection_method"], "confirmation_secret": None, "created": at,
            "currency": sub["currency"], "custom_fields": None, "customer": customer["id"],
            "customer_address": None, "customer_email": customer.get("email"), "customer_name": customer.get("name"),
            "customer_phone": customer.get("phone"), "customer_shipping": None, "customer_tax_exempt": "none",
            "customer_tax_ids": [], "default_payment_method": None, "default_source": None, "default_tax_rates": [],
            "description": None, "discounts": [], "due_date": None, "effective_at": None, "ending_balance": None,
            "footer": None, "from_invoice": None, "hosted_invoice_url": None, "invoice_pdf": None,
            "issuer": {"type": "self"}, "last_finalization_error": None, "latest_revision": None,
            "lines": {"object": "list", "data": lines, "has_more": False,
                      "url": f"/v1/invoices/{invoice_id}/lines"},
            "livemode": False, "metadata": {}, "next_payment_attempt": None, "number": None, "on_behalf_of": None,
            "parent": {"quote_details": None, "subscription_details": details, "type": "subscription_details"},
            "payment_settings": {"default_mandate": None, "payment_method_options": None,
                                 "payment_method_types": None},
            "period_end": period_end, "period_start": period_start, "post_payment_credit_notes_amount": 0,
            "pre_payment_credit_notes_amount": 0, "receipt_number": None, "rendering": None, "shipping_cost": None,
            "shipping_details": None, "starting_balance": balance, "statement_descriptor": None, "status": "draft",
            "status_transitions": {"finalized_at": None, "marked_uncollectible_at": None, "paid_at": None,
                                   "voided_at": None},
            "subtotal": subtotal, "subtotal_excluding_tax": subtotal, "test_clock": sub.get("test_clock"),
            "total": total, "total_discount_amounts": [], "total_excluding_tax": total,
            "total_pretax_credit_amounts": [], "total_taxes": [], "webhooks_delivered_at": None if preview else at,
        }

    def _prepare_invoice(self, sub: Obj, specs: list[LineSpec], billing_reason: str, period_start: int,
                         period_end: int, *, proration_date: int | None = None) -> Obj:
        """The draft (pending items of ``sub`` first, then ``specs``), stored as ``sub``'s latest invoice;
        nothing emitted yet (``_publish_invoice`` does that)."""
        items = self._pending_items(sub["id"])
        invoice = self.build_invoice(sub, specs, billing_reason, period_start, period_end, preview=False,
                                     pending=[self._item_spec(ii) for ii in items], proration_date=proration_date)
        for ii in items:
            ii["invoice"] = invoice["id"]
        self.s.bucket("invoice")[invoice["id"]] = invoice
        self.s.meta(invoice["id"])["payments"] = []
        sub["latest_invoice"] = invoice["id"]
        return invoice

    def _publish_invoice(self, invoice: Obj, sub: Obj, *, attempt: bool = True) -> None:
        """invoice.created, then finalize, then (charge_automatically) charge."""
        at = self.now_for(sub["customer"])
        self.emit("invoice.created", invoice, created=at)
        self._finalize(invoice, at, sub)
        if invoice["amount_due"] == 0:
            self._mark_paid(invoice, at, charge=False)
        elif sub["collection_method"] == "charge_automatically" and attempt:
            self._attempt(invoice, at)

    def _finalize(self, invoice: Obj, at: int, sub: Obj) -> None:
        customer = self.get("customer", invoice["customer"])
        number = self.s.next_counter("invoice_number")
        ending = min(0, int(invoice["total"]) + int(invoice["starting_balance"]))
        customer["balance"] = ending
        customer["next_invoice_sequence"] = int(customer.get("next_invoice_sequence") or 1) + 1
        invoice.update({
            "number": f"STANDIN-{number:04d}", "status": "open", "effective_at": at, "ending_balance": ending,
            "hosted_invoice_url": f"{self.public_url}/invoice/{invoice['id']}",
        })
        invoice["status_transitions"]["finalized_at"] = at
        if invoice["collection_method"] == "send_invoice":
            invoice["due_date"] = at + int(sub.get("days_until_due") or 0) * DAY
        self.emit("invoice.finalized", invoice, created=at)

    def _payment_intent(self, *, amount: int, currency: str, customer: str | None, at: int, status: str,
                        metadata: dict[str, str] | None = None, description: str | None = None,
                        intent_id: str | None = None, error: Obj | None = None) -> Obj:
        intent_id = intent_id or new_id("pi")
        existing = self.s.bucket("payment_intent").get(intent_id)
        intent: Obj = existing or {
            "id": intent_id, "object": "payment_intent", "amount": amount, "amount_capturable": 0,
            "amount_details": {"tip": {}}, "amount_received": 0, "application": None, "application_fee_amount": None,
            "automatic_payment_methods": None, "canceled_at": None, "cancellation_reason": None,
            "capture_method": "automatic", "client_secret": f"{intent_id}_secret_{new_id('x', 16)[2:]}",
            "confirmation_method": "automatic", "created": at, "currency": currency, "customer": customer,
            "description": description, "last_payment_error": None, "latest_charge": None, "livemode": False,
            "metadata": dict(metadata or {}), "next_action": None, "on_behalf_of": None, "payment_method": None,
            "payment_method_configuration_details": None, "payment_method_options": {},
            "payment_method_types": ["card"], "processing": None, "receipt_email": None, "review": None,
            "setup_future_usage": None, "shipping": None, "statement_descriptor": None,
            "statement_descriptor_suffix": None, "status": status, "transfer_data": None, "transfer_group": None,
        }
        intent["status"] = status
        intent["payment_method"] = f"pm_standin_{'succeed' if status == 'succeeded' else 'decline'}"
        if status == "succeeded":
            intent["amount_received"] = amount
            intent["latest_charge"] = new_id("ch")
            intent["last_payment_error"] = None
        else:
            intent["last_payment_error"] = error
        self.s.bucket("payment_intent")[intent_id] = intent
        return intent

    @staticmethod
    def decline_error(payment_intent: str | None = None) -> Obj:
        return {"charge": new_id("ch"), "code": "card_declined", "decline_code": "generic_decline",
                "doc_url": "https://stripe.com/docs/error-codes/card-declined", "message": "Your card was declined.",
                "type": "card_error"}

    def _attempt(self, invoice: Obj, at: int, *, outcome: str | None = None) -> bool:
        """Charge the invoice (with the customer's simulated card unless ``outcome``); True if paid."""
        result = outcome or self.card(invoice["customer"])
        invoice["attempt_count"] += 1
        invoice["attempted"] = True
        if result == "succeed":
            self._mark_paid(invoice, at, charge=True)
            return True
        meta = self.s.meta(invoice["id"])
        intent = self._payment_intent(amount=int(invoice["amount_remaining"]), currency=invoice["currency"],
                                      customer=invoice["customer"], at=at, status="requires_payment_method",
                                      intent_id=meta.get("intent"), error=self.decline_error(),
                                      description=f"Invoice {invoice['number']}")
        meta["intent"] = intent["id"]
        invoice["next_payment_attempt"] = at + RETRY_DELAY if invoice["attempt_count"] < MAX_ATTEMPTS else None
        self.emit("invoice.payment_failed", invoice, created=at)
        sub = self._invoice_sub(invoice)
        if sub is not None:
            if sub["status"] in ("active", "trialing"):
                self._set_status(sub, "past_due", at)
            if invoice["next_payment_attempt"] is None and sub["status"] == "past_due":
                self._set_status(sub, "unpaid", at)
        return False

    def _mark_paid(self, invoice: Obj, at: int, *, charge: bool, out_of_band: bool = False) -> None:
        amount = int(invoice["amount_remaining"])
        meta = self.s.meta(invoice["id"])
        if charge and amount > 0:
            intent = self._payment_intent(amount=amount, currency=invoice["currency"], customer=invoice["customer"],
                                          at=at, status="succeeded", intent_id=meta.get("intent"),
                                          description=f"Invoice {invoice['number']}")
            meta["intent"] = intent["id"]
            meta.setdefault("payments", []).append({"intent": intent["id"], "amount": amount, "at": at})
        if out_of_band:
            invoice["amount_paid_off_stripe"] = amount
        invoice["amount_paid"] = int(invoice["amount_paid"]) + amount
        invoice["amount_remaining"] = 0
        invoice["status"] = "paid"
        invoice["next_payment_attempt"] = None
        invoice["status_transitions"]["paid_at"] = at
        self.emit("invoice.paid", invoice, created=at)
        if not out_of_band:
            self.emit("invoice.payment_succeeded", invoice, created=at)
        sub = self._invoice_sub(invoice)
        if sub is not None and sub["status"] in ("incomplete", "past_due", "unpaid"):
            still_open = any(
                other["status"] == "open" and self._invoice_sub_id(other) == sub["id"]
                for other in self.s.bucket("invoice").values()
            )
            if not still_open:
                self._set_status(sub, "active", at)

    def _void(self, invoice: Obj, at: int) -> None:
        invoice["status"] = "void"
        invoice["amount_remaining"] = 0
        invoice["next_payment_attempt"] = None
        invoice["status_transitions"]["voided_at"] = at
        self.emit("invoice.voided", invoice, created=at)

    def _invoice_payments(self, invoice: Obj) -> Obj:
        payments = []
        for record in self.s.meta(invoice["id"]).get("payments", []):
            payments.append({
                "amount_paid": record["amount"], "amount_requested": record["amount"], "created": record["at"],
                "currency": invoice["currency"], "id": f"inpay_{record['intent'][3:]}", "invoice": invoice["id"],
                "is_default": True, "livemode": False, "object": "invoice_payment",
                "payment": {"payment_intent": record["intent"], "type": "payment_intent"}, "status": "paid",
                "status_transitions": {"canceled_at": None, "paid_at": record["at"]},
            })
        return _list(payments, f"/v1/invoice_payments?invoice={invoice['id']}")

    def retrieve_invoice(self, invoice_id: str) -> Obj:
        return self.get("invoice", invoice_id)

    def list_invoices(self, p: Obj) -> Obj:
        customer, sub, status = as_str(p, "customer"), as_str(p, "subscription"), as_str(p, "status")
        method = as_str(p, "collection_method")
        items = [i for i in self.s.bucket("invoice").values()
                 if (customer is None or i["customer"] == customer)
                 and (sub is None or self._invoice_sub_id(i) == sub)
                 and (status is None or i["status"] == status)
                 and (method is None or i["collection_method"] == method)]
        return self.page(items, p, "/v1/invoices")

    def invoice_lines(self, invoice_id: str, p: Obj) -> Obj:
        invoice = self.get("invoice", invoice_id)
        return self.page(list(reversed(invoice["lines"]["data"])), p, f"/v1/invoices/{invoice_id}/lines")

    def pay_invoice(self, invoice_id: str, p: Obj, *, outcome: str | None = None) -> Obj:
        """``POST /v1/invoices/{id}/pay`` (customer's card) or the hosted page (``outcome``)."""
        invoice = self.get("invoice", invoice_id)
        at = self.now_for(invoice["customer"])
        if invoice["status"] == "paid":
            raise StripeError("Invoice is already paid.", param="invoice")
        if invoice["status"] == "void":
            raise StripeError("This invoice can no longer be paid because it has been voided.", param="invoice")
        if invoice["status"] == "draft":
            sub = self._invoice_sub(invoice)
            assert sub is not None
            self._finalize(invoice, at, sub)
        if as_bool(p, "paid_out_of_band"):
            self._mark_paid(invoice, at, charge=False, out_of_band=True)
            return invoice
        result = outcome or self.card(invoice["customer"])
        if result == "none":
            raise StripeError("This customer has no attached payment source or default payment method. Please "
                              "consider adding a default payment method.", param="payment_method")
        if not self._attempt(invoice, at, outcome=result):
            raise card_declined(commit=True)
        return invoice

    def fail_invoice_payment(self, invoice_id: str) -> Obj:
        """The hosted invoice page's "Decline" button: a failed attempt with the card entered there."""
        invoice = self.get("invoice", invoice_id)
        if invoice["status"] == "open":
            self._attempt(invoice, self.now_for(invoice["customer"]), outcome="decline")
        return invoice

    def void_invoice(self, invoice_id: str) -> Obj:
        invoice = self.get("invoice", invoice_id)
        if invoice["status"] not in ("open", "uncollectible"):
            raise StripeError(f"You can only void open or uncollectible invoices (this one is {invoice['status']}).")
        self._void(invoice, self.now_for(invoice["customer"]))
        return invoice

    def mark_uncollectible(self, invoice_id: str) -> Obj:
        invoice = self.get("invoice", invoice_id)
        if invoice["status"] != "open":
            raise StripeError(f"You can only mark open invoices uncollectible (this one is {invoice['status']}).")
        at = self.now_for(invoice["customer"])
        invoice["status"] = "uncollectible"
        invoice["next_payment_attempt"] = None
        invoice["status_transitions"]["marked_uncollectible_at"] = at
        self.emit("invoice.marked_uncollectible", invoice, created=at)
        return invoice

    def create_preview(self, p: Obj) -> Obj:
        customer_id = as_str(p, "customer")
        sub_id = as_str(p, "subscription")
        details = as_dict(p, "subscription_details")
        if sub_id is None and customer_id is None:
            raise StripeError("Missing required param: customer.", param="customer", code="parameter_missing")
        if sub_id is not None:
            sub = self.get("subscription", sub_id, param="subscription")
            if customer_id is not None and customer_id != sub["customer"]:
                raise StripeError("The subscription does not belong to this customer.", param="subscription")
        else:
            assert customer_id is not None
            self.get("customer", customer_id, param="customer")
            items = as_list(details, "items")
            if items:
                return self._preview_new_subscription(customer_id, items)
            subs = [s for s in self.s.bucket("subscription").values()
                    if s["customer"] == customer_id and s["status"] in OPEN_SUB_STATUSES]
            if not subs:
                raise StripeError(f"No upcoming invoices for customer: {customer_id}", status=404,
                                  code="invoice_upcoming_none")
            sub = subs[-1]
        if sub["status"] in ("canceled", "incomplete_expired"):
            raise StripeError(f"No upcoming invoices for subscription: {sub['id']}", status=404,
                              code="invoice_upcoming_none")
        at = self.now_for(sub["customer"])
        behavior = as_str(details, "proration_behavior", "create_prorations")
        assert behavior is not None
        price, quantity = self._requested_item(sub, as_list(details, "items"), "subscription_details[items]")
        pd = as_int(details, "proration_date", param="subscription_details[proration_date]")
        plan = self.plan_change(sub, price, quantity, pd, behavior, param="subscription_details[proration_date]")
        pending = [self._item_spec(ii) for ii in self._pending_items(sub["id"])] + plan.prorations
        pd_shown = plan.proration_date if plan.changed else None
        if plan.invoice_now:
            return self.build_invoice(sub, plan.cycle_lines, "subscription_update", at, at, preview=True,
                                      pending=pending, proration_date=pd_shown)
        cancel = as_bool(details, "cancel_at_period_end", bool(sub["cancel_at_period_end"]))
        if cancel:
            raise StripeError(f"No upcoming invoices for subscription: {sub['id']}", status=404,
                              code="invoice_upcoming_none")
        item = sub["items"]["data"][0]
        rec = price["recurring"]
        start, end = int(item["current_period_start"]), int(item["current_period_end"])
        if sub["status"] == "trialing":
            next_start = int(sub["trial_end"])
            next_end = next_period_end(next_start, rec["interval"], rec["interval_count"], next_start)
        else:
            anchor = self._anchor(sub)
            next_start = end
            next_end = next_period_end(anchor, rec["interval"], rec["interval_count"], end)
        cycle = self._cycle_line(sub, price, quantity, next_start, next_end)
        with self.at(next_start):
            return self.build_invoice(sub, [cycle], "upcoming", start, end, preview=True, pending=pending,
                                      proration_date=pd_shown)

    def _preview_new_subscription(self, customer_id: str, items: list[Any]) -> Obj:
        if len(items) != 1 or not isinstance(items[0], dict):
            raise StripeError("The Stripe stand-in supports subscriptions with exactly one item.",
                              param="subscription_details[items]")
        price_id = as_str(items[0], "price")
        if price_id is None:
            raise StripeError("Missing required param: subscription_details[items][0][price].",
                              param="subscription_details[items][0][price]", code="parameter_missing")
        price = self.get("price", price_id, param="subscription_details[items][0][price]")
        self._check_recurring(price, "subscription_details[items][0][price]")
        quantity = as_int(items[0], "quantity", 1) or 1
        at = self.now_for(customer_id)
        rec = price["recurring"]
        end = next_period_end(at, rec["interval"], rec["interval_count"], at)
        draft: Obj = {"id": "sub_preview", "customer": customer_id, "currency": price["currency"], "metadata": {},
                 "collection_method": "charge_automatically", "test_clock": self.clock_of(customer_id),
                 "items": {"data": [{"id": "si_preview", "price": price, "quantity": quantity}]}}
        cycle = self._cycle_line(draft, price, quantity, at, end)
        return self.build_invoice(draft, [cycle], "subscription_create", at, at, preview=True)

    # ------------------------------------------------------------------------------------------------
    # invoice items (read-only: they come from prorations)

    def list_invoice_items(self, p: Obj) -> Obj:
        customer, pending = as_str(p, "customer"), as_bool(p, "pending")
        invoice = as_str(p, "invoice")
        items = [ii for ii in self.s.bucket("invoiceitem").values()
                 if (customer is None or ii["customer"] == customer)
                 and (pending is None or (ii["invoice"] is None) == pending)
                 and (invoice is None or ii["invoice"] == invoice)]
        return self.page(items, p, "/v1/invoiceitems")

    # ------------------------------------------------------------------------------------------------
    # checkout sessions

    def create_checkout_session(self, p: Obj) -> Obj:
        mode = require_str(p, "mode")
        if mode not in ("payment", "subscription"):
            raise StripeError(f"The Stripe stand-in supports mode=payment and mode=subscription, not {mode}.",
                              param="mode")
        customer_id = as_str(p, "customer")
        if customer_id is not None:
            self.get("customer", customer_id, param="customer")
        raw_items = as_list(p, "line_items")
        if not raw_items:
            raise StripeError("Missing required param: line_items.", param="line_items", code="parameter_missing")
        now = self.real_now()
        line_items: list[Obj] = []
        for index, raw in enumerate(raw_items):
            if not isinstance(raw, dict):
                raise StripeError(f"Invalid line_items[{index}]", param=f"line_items[{index}]")
            price = self._price_for_item(raw, f"line_items[{index}]")
            if mode == "subscription":
                self._check_recurring(price, f"line_items[{index}][price]")
            elif price["type"] == "recurring":
                raise StripeError("You specified `payment` mode but passed a recurring price. Either switch to "
                                  "`subscription` mode or use only one-time prices.", param=f"line_items[{index}]")
            quantity = as_int(raw, "quantity", 1, param=f"line_items[{index}][quantity]")
            assert quantity is not None
            amount = int(price["unit_amount"]) * quantity
            line_items.append({
                "id": new_id("li"), "object": "item", "amount_discount": 0, "amount_subtotal": amount,
                "amount_tax": 0, "amount_total": amount, "currency": price["currency"],
                "description": self._product_name(price["product"]), "metadata": {}, "price": copy.deepcopy(price),
                "quantity": quantity,
            })
        currencies = {li["currency"] for li in line_items}
        if len(currencies) != 1:
            raise StripeError("All line items must use the same currency.", param="line_items")
        if mode == "subscription" and len(line_items) != 1:
            raise StripeError("The Stripe stand-in supports subscription checkouts with exactly one line item.",
                              param="line_items")
        expires_at = as_int(p, "expires_at", now + CHECKOUT_DEFAULT_EXPIRY)
        assert expires_at is not None
        if not now + CHECKOUT_MIN_EXPIRY - 60 <= expires_at <= now + CHECKOUT_DEFAULT_EXPIRY + 60:
            raise StripeError("The `expires_at` timestamp must be at least 30 minutes and at most 24 hours from "
                              "Checkout Session creation.", param="expires_at")
        subscription_data = as_dict(p, "subscription_data")
        if subscription_data:
            self._missing_pm_behavior(as_dict(subscription_data, "trial_settings"), "subscription_data[trial_settings]")
        total = sum(int(li["amount_total"]) for li in line_items)
        session_id = new_id("cs_test", 58)
        customer_email = as_str(p, "customer_email")
        session: Obj = {
            "id": session_id, "object": "checkout.session", "adaptive_pricing": None, "after_expiration": None,
            "allow_promotion_codes": None, "amount_subtotal": total, "amount_total": total,
            "automatic_tax": {"enabled": False, "liability": None, "provider": None, "status": None},
            "billing_address_collection": None, "cancel_url": as_str(p, "cancel_url"),
            "client_reference_id": as_str(p, "client_reference_id"), "client_secret": None,
            "collected_information": None, "consent": None, "consent_collection": None, "created": now,
            "currency": currencies.pop(), "custom_fields": [],
            "custom_text": {"after_submit": None, "shipping_address": None, "submit": None,
                            "terms_of_service_acceptance": None},
            "customer": customer_id,
            "customer_creation": "if_required" if mode == "payment" and not customer_id else None,
            "customer_details": None, "customer_email": customer_email, "discounts": [], "expires_at": expires_at,
            "invoice": None, "invoice_creation": None, "livemode": False, "locale": as_str(p, "locale"),
            "metadata": metadata_update({}, p), "mode": mode, "payment_intent": None, "payment_link": None,
            "payment_method_collection": "always" if mode == "subscription" else None,
            "payment_method_configuration_details": None, "payment_method_options": {},
            "payment_method_types": as_list(p, "payment_method_types") or ["card"],
            "payment_status": "unpaid", "phone_number_collection": {"enabled": False}, "recovered_from": None,
            "saved_payment_method_options": None, "setup_intent": None, "shipping_address_collection": None,
            "shipping_cost": None, "shipping_options": [], "status": "open", "submit_type": None,
            "subscription": None, "success_url": as_str(p, "success_url"),
            "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
            "ui_mode": as_str(p, "ui_mode", "hosted"), "url": f"{self.public_url}/checkout/{session_id}",
        }
        self.s.bucket("checkout_session")[session_id] = session
        self.s.meta(session_id).update({
            "line_items": line_items, "intent": new_id("pi"), "subscription_data": subscription_data,
            "payment_intent_data": as_dict(p, "payment_intent_data"),
        })
        return session

    def checkout_session(self, session_id: str) -> Obj:
        session = self.get("checkout_session", session_id)
        if session["status"] == "open" and session["expires_at"] <= self.real_now():
            self._expire_session(session, self.real_now())
        return session

    def checkout_line_items(self, session_id: str, p: Obj) -> Obj:
        self.get("checkout_session", session_id)
        items = list(self.s.meta(session_id).get("line_items", []))
        return self.page(list(reversed(items)), p, f"/v1/checkout/sessions/{session_id}/line_items")

    def list_checkout_sessions(self, p: Obj) -> Obj:
        customer, status = as_str(p, "customer"), as_str(p, "status")
        intent, sub = as_str(p, "payment_intent"), as_str(p, "subscription")
        items = [s for s in self.s.bucket("checkout_session").values()
                 if (customer is None or s["customer"] == customer) and (status is None or s["status"] == status)
                 and (intent is None or s["payment_intent"] == intent) and (sub is None or s["subscription"] == sub)]
        return self.page(items, p, "/v1/checkout/sessions")

    def expire_checkout_session(self, session_id: str) -> Obj:
        session = self.checkout_session(session_id)
        if session["status"] != "open":
            raise StripeError(f"Only Checkout Sessions with a status in [\"open\"] can be expired. This Checkout "
                              f"Session has a status of \"{session['status']}\".", param="session")
        self._expire_session(session, self.real_now())
        return session

    def _expire_session(self, session: Obj, at: int) -> None:
        session["status"] = "expired"
        session["url"] = None
        self.emit("checkout.session.expired", session, created=at)

    def _checkout_intent_metadata(self, session_id: str) -> dict[str, str]:
        data = self.s.meta(session_id).get("payment_intent_data") or {}
        return metadata_update({}, data) if isinstance(data, dict) else {}

    def complete_checkout(self, session_id: str) -> Obj:
        """The hosted page's Pay / Subscribe button: what Stripe does when the person pays."""
        session = self.checkout_session(session_id)
        if session["status"] != "open":
            return session
        meta = self.s.meta(session_id)
        customer_id = session.get("customer")
        email = session.get("customer_email")
        if customer_id:
            email = self.get("customer", customer_id).get("email") or email
        if session["mode"] == "payment":
            now = self.real_now()
            data = meta.get("payment_intent_data") or {}
            intent = self._payment_intent(
                amount=int(session["amount_total"]), currency=session["currency"], customer=customer_id, at=now,
                status="succeeded", metadata=self._checkout_intent_metadata(session_id), intent_id=meta["intent"],
                description=as_str(data, "description") if isinstance(data, dict) else None,
            )
            session.update({"status": "complete", "payment_status": "paid", "payment_intent": intent["id"], "url": None,
                            "customer_details": self._customer_details(email)})
            self.emit("payment_intent.succeeded", intent, created=now)
            self.emit("checkout.session.completed", session, created=now)
            return session
        if not customer_id:
            customer_id = self.create_customer({"email": email} if email else {})["id"]
        self.set_card(customer_id, "succeed")
        data = meta.get("subscription_data") or {}
        line = meta["line_items"][0]
        price = self.s.bucket("price").get(line["price"]["id"], line["price"])
        at = self.now_for(customer_id)
        trial_end: int | None = None
        if as_int(data, "trial_end") is not None:
            trial_end = as_int(data, "trial_end")
        elif as_int(data, "trial_period_days"):
            trial_end = at + int(as_int(data, "trial_period_days") or 0) * DAY
        sub = self.start_subscription(
            customer_id, price, int(line["quantity"]), trial_end=trial_end, collection_method="charge_automatically",
            days_until_due=None, metadata=metadata_update({}, data), description=as_str(data, "description"),
            missing_payment_method=self._missing_pm_behavior(as_dict(data, "trial_settings"), "trial_settings"),
        )
        invoice = self.s.bucket("invoice").get(sub["latest_invoice"] or "")
        session.update({
            "status": "complete", "customer": customer_id, "subscription": sub["id"], "url": None,
            "invoice": invoice["id"] if invoice else None,
            "payment_status": "paid" if invoice and invoice["status"] == "paid" else "no_payment_required",
            "customer_details": self._customer_details(email),
        })
        self.emit("checkout.session.completed", session, created=at)
        return session

    @staticmethod
    def _customer_details(email: str | None) -> Obj:
        return {"address": None, "business_name": None, "email": email, "individual_name": None, "name": None,
                "phone": None, "tax_exempt": "none", "tax_ids": []}

    def decline_checkout(self, session_id: str) -> Obj:
        """The hosted page's Decline button: a failed payment attempt; the session stays open."""
        session = self.checkout_session(session_id)
        if session["status"] != "open":
            return session
        meta = self.s.meta(session_id)
        now = self.real_now()
        intent = self._payment_intent(
            amount=int(session["amount_total"]), currency=session["currency"], customer=session.get("customer"),
            at=now, status="requires_payment_method", intent_id=meta["intent"], error=self.decline_error(),
            metadata=self._checkout_intent_metadata(session_id) if session["mode"] == "payment"
            else dict(session["metadata"]),
        )
        self.emit("payment_intent.payment_failed", intent, created=now)
        return session

    # ------------------------------------------------------------------------------------------------
    # billing portal

    def _portal_features(self, given: Obj, current: Obj | None = None) -> Obj:
        cur: Obj = copy.deepcopy(current) if current else {
            "customer_update": {"allowed_updates": [], "enabled": False},
            "invoice_history": {"enabled": False},
            "payment_method_update": {"enabled": False, "payment_method_configuration": None},
            "subscription_cancel": {"cancellation_reason": {"enabled": False, "options": []}, "enabled": False,
                                    "mode": "at_period_end", "proration_behavior": "none"},
            "subscription_update": {"billing_cycle_anchor": None, "default_allowed_updates": [], "enabled": False,
                                    "products": None, "proration_behavior": "none",
                                    "schedule_at_period_end": {"conditions": []},
                                    "trial_update_behavior": "end_trial"},
        }
        for feature, values in given.items():
            if feature not in cur or not isinstance(values, dict):
                raise StripeError(f"Invalid features[{feature}]", param=f"features[{feature}]")
            target = cur[feature]
            for key, value in values.items():
                param = f"features[{feature}][{key}]"
                if key == "enabled":
                    target[key] = bool(as_bool(values, key, param=param))
                elif key in ("allowed_updates", "default_allowed_updates"):
                    target[key] = as_list(values, key, param=param)
                elif key == "products":
                    products = []
                    for index, entry in enumerate(as_list(values, key, param=param)):
                        if not isinstance(entry, dict):
                            raise StripeError(f"Invalid {param}[{index}]", param=f"{param}[{index}]")
                        products.append({"adjustable_quantity": {"enabled": False, "maximum": None, "minimum": 1},
                                         "prices": as_list(entry, "prices"), "product": as_str(entry, "product")})
                    target[key] = products
                elif key == "cancellation_reason" and isinstance(value, dict):
                    target[key] = {"enabled": bool(as_bool(value, "enabled", False)),
                                   "options": as_list(value, "options")}
                elif key == "schedule_at_period_end" and isinstance(value, dict):
                    target[key] = {"conditions": as_list(value, "conditions")}
                elif isinstance(value, str) or value is None:
                    target[key] = value if value != "" else None
                else:
                    raise StripeError(f"Invalid {param}", param=param)
        return cur

    def create_portal_configuration(self, p: Obj, *, is_default: bool = False) -> Obj:
        now = self.real_now()
        profile = as_dict(p, "business_profile")
        login = as_dict(p, "login_page")
        config: Obj = {
            "id": new_id("bpc"), "object": "billing_portal.configuration", "active": True, "application": None,
            "business_profile": {"headline": as_str(profile, "headline"),
                                 "privacy_policy_url": as_str(profile, "privacy_policy_url"),
                                 "terms_of_service_url": as_str(profile, "terms_of_service_url")},
            "created": now, "default_return_url": as_str(p, "default_return_url"),
            "features": self._portal_features(as_dict(p, "features")), "is_default": is_default, "livemode": False,
            "login_page": {"enabled": bool(as_bool(login, "enabled", False)), "url": None},
            "metadata": metadata_update({}, p), "name": as_str(p, "name"), "updated": now,
        }
        self.s.bucket("portal_configuration")[config["id"]] = config
        self.emit("billing_portal.configuration.created", config, created=now)
        return config

    def update_portal_configuration(self, config_id: str, p: Obj) -> Obj:
        config = self.get("portal_configuration", config_id)
        before = copy.deepcopy(config)
        if "active" in p:
            config["active"] = bool(as_bool(p, "active"))
        if "business_profile" in p:
            profile = as_dict(p, "business_profile")
            for key in ("headline", "privacy_policy_url", "terms_of_service_url"):
                if key in profile:
                    config["business_profile"][key] = as_str(profile, key)
        if "default_return_url" in p:
            config["default_return_url"] = as_str(p, "default_return_url")
        if "features" in p:
            config["features"] = self._portal_features(as_dict(p, "features"), config["features"])
        if "login_page" in p:
            config["login_page"]["enabled"] = bool(as_bool(as_dict(p, "login_page"), "enabled", False))
        if "name" in p:
            config["name"] = as_str(p, "name")
        config["metadata"] = metadata_update(config["metadata"] or {}, p)
        if config != before:
            config["updated"] = self.real_now()
            self.emit("billing_portal.configuration.updated", config, previous=_diff(before, config))
        return config

    def list_portal_configurations(self, p: Obj) -> Obj:
        active, default = as_bool(p, "active"), as_bool(p, "is_default")
        items = [c for c in self.s.bucket("portal_configuration").values()
                 if (active is None or c["active"] == active) and (default is None or c["is_default"] == default)]
        return self.page(items, p, "/v1/billing_portal/configurations")

    def create_portal_session(self, p: Obj) -> Obj:
        customer_id = require_str(p, "customer")
        self.get("customer", customer_id, param="customer")
        config_id = as_str(p, "configuration")
        if config_id is not None:
            config = self.get("portal_configuration", config_id, param="configuration")
        else:
            defaults = [c for c in self.s.bucket("portal_configuration").values() if c["is_default"]]
            config = defaults[0] if defaults else self.create_portal_configuration(
                {"features": {"invoice_history": {"enabled": "true"}, "payment_method_update": {"enabled": "true"},
                              "subscription_cancel": {"enabled": "true"},
                              "subscription_update": {"enabled": "true", "default_allowed_updates": ["price"],
                                                      "proration_behavior": "create_prorations"}}},
                is_default=True)
        now = self.real_now()
        session_id = new_id("bps")
        session: Obj = {
            "configuration": config["id"], "created": now, "customer": customer_id, "customer_account": None,
            "flow": None, "id": session_id, "livemode": False, "locale": as_str(p, "locale"),
            "object": "billing_portal.session", "on_behalf_of": None,
            "return_url": as_str(p, "return_url") or config.get("default_return_url"),
            "url": f"{self.public_url}/portal/{session_id}",
        }
        self.s.bucket("portal_session")[session_id] = session
        return session

    def portal_switch_options(self, sub: Obj, config: Obj) -> list[Obj]:
        """Prices the portal offers for ``sub``: active recurring prices of its product (or the
        configuration's list for that product), in the same currency."""
        current = self._current_price(sub)
        allowed: set[str] | None = None
        for entry in config["features"]["subscription_update"].get("products") or []:
            if entry.get("product") == current["product"]:
                allowed = set(entry.get("prices") or [])
        return [
            pr for pr in self.s.bucket("price").values()
            if pr["product"] == current["product"] and pr["active"] and pr["type"] == "recurring"
            and pr["currency"] == current["currency"] and not self.s.meta(pr["id"]).get("inline")
            and (allowed is None or pr["id"] in allowed)
        ]

    def portal_switch(self, session_id: str, sub_id: str, price_id: str) -> Obj:
        session = self.get("portal_session", session_id)
        sub = self._portal_sub(session, sub_id)
        config = self.get("portal_configuration", session["configuration"])
        if price_id not in {pr["id"] for pr in self.portal_switch_options(sub, config)}:
            raise StripeError("This price is not offered for this subscription.", param="price")
        behavior = config["features"]["subscription_update"].get("proration_behavior") or "create_prorations"
        if behavior == "none" and not config["features"]["subscription_update"]["enabled"]:
            behavior = "create_prorations"
        item = sub["items"]["data"][0]
        return self.update_subscription(sub_id, {"items": [{"id": item["id"], "price": price_id}],
                                                 "proration_behavior": behavior})

    def portal_cancel(self, session_id: str, sub_id: str, cancel: bool) -> Obj:
        session = self.get("portal_session", session_id)
        self._portal_sub(session, sub_id)
        return self.update_subscription(sub_id, {"cancel_at_period_end": "true" if cancel else "false"})

    def _portal_sub(self, session: Obj, sub_id: str) -> Obj:
        sub = self.get("subscription", sub_id)
        if sub["customer"] != session["customer"]:
            raise missing("subscription", sub_id)
        return sub

    # ------------------------------------------------------------------------------------------------
    # events API

    def retrieve_event(self, event_id: str) -> Obj:
        for event in self.s.events:
            if event["id"] == event_id:
                return event
        raise missing("event", event_id)

    def list_events(self, p: Obj) -> Obj:
        kind = as_str(p, "type")
        types = set(as_list(p, "types"))

        def keep(event: Obj) -> bool:
            if kind is not None:
                if kind.endswith("*"):
                    return str(event["type"]).startswith(kind[:-1])
                return bool(event["type"] == kind)
            return not types or event["type"] in types

        return self.page([e for e in self.s.events if keep(e)], p, "/v1/events")
