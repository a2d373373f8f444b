"""Stripe SDK plumbing for the services that call Stripe (payments, subscriptions); no billing rules.

* Key rules: this platform runs against Stripe's test mode or a local stand-in only, so a live key, or
  anything that is not a test-mode secret key, stops the process (`check_stripe_key`).
* `StripeAdapter`: the base of a service's adapter over the official SDK (`StripeClient`, async on
  httpx): the client built from the STRIPE_* settings (`STRIPE_API_BASE` → `base_addresses`, offline
  the stand-in or stripe-mock), and one way to make a call: a Stripe failure becomes our error
  (`stripe_error`), resource_missing on a read becomes None (`is_missing`), the answer is parsed into
  a typed model (`parse_stripe`) so that nothing past the adapter reads a Stripe dict.
* `StripeModel` + `Ts` (unix seconds → aware datetime) + `Ref` (an id or the expanded object → its
  id): what a service's typed Stripe objects are made of, and the few sub-objects both services
  read identically.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable
from datetime import datetime
from typing import Annotated, Any, ClassVar, Protocol, Self, TypeVar

import stripe
import structlog
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from kit.clock import from_unix
from kit.errors import AppError

log = structlog.get_logger(__name__)

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

# -- keys ----------------------------------------------------------------------------------------------

_LIVE_KEY = re.compile(r"^(sk|rk|pk)_live_")
_TEST_KEY = re.compile(r"^(sk|rk)_test_\S+$")
# A secret key from the Stripe dashboard: sk_test_ / rk_test_ and a long random part (100+ characters
# today). Placeholders such as sk_test_local or sk_test_123 are shorter than this bound.
_REAL_TEST_KEY = re.compile(r"^(sk|rk)_test_[A-Za-z0-9]{24,}$")


class LiveKeyRefused(ValueError):
    """The configured Stripe key is a live key (or not a Stripe secret key at all)."""


def check_stripe_key(key: str) -> None:
    """Refuse (LiveKeyRefused) a live key and anything that is not a test-mode secret key."""
    if _LIVE_KEY.match(key):
        raise LiveKeyRefused(
            "STRIPE_SECRET_KEY is a live-mode key (sk_live_/rk_live_). This platform only runs against "
            "Stripe test mode or stripe-mock: set an sk_test_... key."
        )
    if not _TEST_KEY.match(key):
        raise LiveKeyRefused("STRIPE_SECRET_KEY must be a Stripe test-mode secret key (sk_test_... or rk_test_...).")


def is_test_mode_key(key: str) -> bool:
    """A test-mode secret key (sk_test_/rk_test_), a local placeholder such as sk_test_local included."""
    return bool(_TEST_KEY.match(key)) and not _LIVE_KEY.match(key)


def looks_like_real_test_key(key: str) -> bool:
    """True for a key Stripe itself issued (sk_test_ + 24 or more alphanumerics), not a placeholder."""
    return bool(_REAL_TEST_KEY.match(key))


# -- errors --------------------------------------------------------------------------------------------


class StripeUnavailable(AppError):
    """Stripe (or the stand-in) failed, could not be reached or answered something unreadable; the
    caller may retry."""

    status_code = 502
    code = "payment_provider_error"


class StripeRefused(AppError):
    """Stripe refused the request as it stands (a 4xx invalid request): the object's state there does
    not allow it."""

    status_code = 409
    code = "stripe_refused"


def is_missing(exc: stripe.StripeError) -> bool:
    """Stripe has no such object (a retrieve of an unknown id)."""
    return getattr(exc, "http_status", None) == 404 or getattr(exc, "code", None) == "resource_missing"


def stripe_error(action: str, exc: stripe.StripeError, *, refusals: bool = False) -> AppError:
    """Our error for a failed call (logged): StripeUnavailable (502), or with `refusals` StripeRefused
    (409) for a 4xx invalid request, which a retry would not change. `action` completes "Stripe could
    not ..."."""
    status = getattr(exc, "http_status", None)
    code = getattr(exc, "code", None)
    log.warning("stripe_error", action=action, status=status, code=code, error=str(exc)[:300])
    message = f"Stripe could not {action}: {getattr(exc, 'user_message', None) or str(exc)[:200]}"
    details = {"stripeStatus": status, "stripeCode": code}
    if refusals and isinstance(exc, stripe.InvalidRequestError) and status is not None and 400 <= status < 500:
        return StripeRefused(message, details=details)
    return StripeUnavailable(message, details=details)


# -- parsing -------------------------------------------------------------------------------------------


def to_dict(obj: Any) -> dict[str, Any]:
    """An SDK object (StripeObject) or a mapping as a plain dict."""
    return obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)


def parse_stripe(model: type[M], obj: Any, action: str) -> M:
    """`obj` (an SDK object or a dict) as `model`; a shape the model cannot read is StripeUnavailable
    (Stripe answered something we do not understand: a 502, never a 500)."""
    try:
        return model.model_validate(to_dict(obj))
    except ValidationError as exc:
        log.error("stripe_unreadable_answer", action=action, model=model.__name__, error=str(exc)[:500])
        raise StripeUnavailable(f"Could not {action}: Stripe answered an object this service cannot read.") from exc


def _ts(value: object) -> object:
    if value is None or value == "":
        return None
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        return from_unix(int(value))
    return value  # a datetime (a model built in code); anything else fails validation


def _ref(value: object) -> object:
    """A Stripe reference: an id, or the expanded object (then its id)."""
    if isinstance(value, dict):
        return value.get("id")
    return value


# A Stripe timestamp (unix seconds) as an aware UTC datetime; absent, null, "" and 0 are None.
Ts = Annotated[datetime | None, BeforeValidator(_ts)]
# An expandable reference (`"cus_1"` or `{"id": "cus_1", ...}`) as its id.
Ref = Annotated[str | None, BeforeValidator(_ref)]


class StripeModel(BaseModel):
    """A typed Stripe object: only the fields a service reads. Unknown fields are ignored (Stripe adds
    fields in every API version); parsed once at the edge, never changed after."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class Recurring(StripeModel):
    """A price's `recurring`."""

    interval: str | None = None
    interval_count: int | None = None


class Period(StripeModel):
    """An invoice line's `period`."""

    start: Ts = None
    end: Ts = None


class PriceDetails(StripeModel):
    """An invoice line's `pricing.price_details` (API 2025-03-31 and later)."""

    price: Ref = None


class ProrationDetails(StripeModel):
    """An invoice line's `parent.subscription_item_details` / `parent.invoice_item_details`."""

    proration: bool | None = None


# -- the adapter ---------------------------------------------------------------------------------------


class StripeSettings(Protocol):
    """The STRIPE_* settings every Stripe-calling service has."""

    @property
    def stripe_secret_key(self) -> str: ...
    @property
    def stripe_api_base(self) -> str | None: ...
    @property
    def stripe_timeout(self) -> float: ...
    @property
    def stripe_max_network_retries(self) -> int: ...


def stripe_client(
    api_key: str, *, api_base: str | None = None, timeout: float = 20.0, max_network_retries: int = 2
) -> stripe.StripeClient:
    """The SDK client, async on httpx; `api_base` (STRIPE_API_BASE) replaces Stripe's API address."""
    check_stripe_key(api_key)
    return stripe.StripeClient(
        api_key,
        base_addresses={"api": api_base.rstrip("/")} if api_base else {},
        http_client=stripe.HTTPXClient(timeout=timeout),
        max_network_retries=max_network_retries,
    )


class StripeAdapter:
    """Base of a service's Stripe adapter: `self.client` and the three ways to make a call."""

    # Map a 4xx invalid request to StripeRefused (409) instead of StripeUnavailable (502).
    refusals: ClassVar[bool] = False

    def __init__(self, client: stripe.StripeClient) -> None:
        self.client = client

    @classmethod
    def from_settings(cls, settings: StripeSettings) -> Self:
        return cls(stripe_client(settings.stripe_secret_key, api_base=settings.stripe_api_base,
                                 timeout=settings.stripe_timeout,
                                 max_network_retries=settings.stripe_max_network_retries))

    async def _call(self, action: str, request: Awaitable[T]) -> T:
        """The SDK's answer to `request`; a Stripe failure raises `stripe_error(action, ...)`."""
        try:
            return await request
        except stripe.StripeError as exc:
            raise stripe_error(action, exc, refusals=self.refusals) from exc

    async def _read(self, action: str, model: type[M], request: Awaitable[Any]) -> M:
        """The answer to `request` as `model`."""
        return parse_stripe(model, await self._call(action, request), action)

    async def _read_or_none(self, action: str, model: type[M], request: Awaitable[Any]) -> M | None:
        """The answer to a retrieve as `model`, None when Stripe has no such object."""
        try:
            obj = await request
        except stripe.StripeError as exc:
            if is_missing(exc):
                return None
            raise stripe_error(action, exc, refusals=self.refusals) from exc
        return parse_stripe(model, obj, action)
