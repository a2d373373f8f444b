"""Stripe-shaped API errors."""

from __future__ import annotations

from typing import Any

DOCS = "https://stripe.com/docs/error-codes"


class StripeError(Exception):
    """An error answered as Stripe does: ``{"error": {"type", "message", "param", "code"}}``."""

    def __init__(
        self, message: str, *, status: int = 400, type: str = "invalid_request_error",
        param: str | None = None, code: str | None = None, extra: dict[str, Any] | None = None,
        commit: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.extra = dict(extra or {})
        self.commit = commit  # True: the state changes made before the error stand (a declined charge)

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.param is not None:
            error["param"] = self.param
        if self.code is not None:
            error["code"] = self.code
            error["doc_url"] = f"{DOCS}/{self.code.replace('_', '-')}"
        error.update(self.extra)
        return {"error": error}


def missing(kind: str, object_id: str, *, param: str = "id", status: int = 404) -> StripeError:
    """``No such customer: 'cus_x'`` (404 for a path id, 400 for a referenced id in the body)."""
    return StripeError(f"No such {kind}: '{object_id}'", status=status, param=param, code="resource_missing")


def card_declined(*, commit: bool = False) -> StripeError:
    """402 ``card_error``; ``commit``: the failed attempt itself is kept (and its events sent)."""
    return StripeError("Your card was declined.", status=402, type="card_error", code="card_declined",
                       extra={"decline_code": "generic_decline"}, commit=commit)
