"""The route table: which public path goes to which upstream service, and how it is guarded.

A plain list of `Route`s that other features extend (e.g. a public `/portal/...` page of a service).
Patterns match whole path segments; `{name}` matches any one segment. Among the patterns that are a
prefix of the request path, the longest wins (ties: more literal segments). Methods do not matter.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum


class Auth(StrEnum):
    USER = "user"  # a valid bearer token is required; the actor is forwarded
    PUBLIC = "public"  # no token; forwarded as the anonymous actor


@dataclass(frozen=True)
class Route:
    prefix: str
    upstream: str
    auth: Auth = Auth.USER
    # Whether POSTs with an Idempotency-Key are deduplicated by the gateway.
    idempotency: bool = True
    # Seconds to wait for the upstream's first byte, when longer than the gateway's default
    # (a 200,000-row report export is computed before its first byte).
    read_timeout: float | None = None

    @property
    def segments(self) -> tuple[str, ...]:
        return split_path(self.prefix)

    def score(self) -> tuple[int, int]:
        segs = self.segments
        return len(segs), sum(1 for s in segs if not _is_param(s))

    def matches(self, path_segments: Sequence[str]) -> bool:
        segs = self.segments
        if len(path_segments) < len(segs):
            return False
        return all(_is_param(p) or p == s for p, s in zip(segs, path_segments, strict=False))


ROUTES: list[Route] = [
    # payments
    Route("/api/invoices/{id}/checkout", "payments"),
    Route("/api/invoices/{id}/mark-paid", "payments"),
    Route("/api/payments", "payments"),
    # Stripe signs the raw body: no auth, no gateway idempotency (Stripe event ids dedupe).
    Route("/webhooks/stripe", "payments", auth=Auth.PUBLIC, idempotency=False),
    # invoice
    Route("/api/invoices", "invoice"),
    Route("/api/clients", "invoice"),
    Route("/api/invoice-template", "invoice"),
    # subscriptions
    Route("/api/subscriptions", "subscriptions"),
    Route("/api/plans", "subscriptions"),
    Route("/api/billing-portal", "subscriptions"),
    Route("/api/test-clock", "subscriptions"),  # admin, test mode only (the service refuses otherwise)
    # notifications
    Route("/api/notifications", "notifications"),
    Route("/api/reminders", "notifications"),
    Route("/t", "notifications", auth=Auth.PUBLIC),  # email open pixel and tracked links
    # reporting
    Route("/api/reports", "reporting", read_timeout=300.0),
]


def split_path(path: str) -> tuple[str, ...]:
    return tuple(s for s in path.split("/") if s)


def _is_param(segment: str) -> bool:
    return segment.startswith("{") and segment.endswith("}")


def resolve(path: str, routes: Iterable[Route] | None = None) -> Route | None:
    """The route serving `path`, or None."""
    segments = split_path(path)
    best: Route | None = None
    for route in ROUTES if routes is None else routes:
        if route.matches(segments) and (best is None or route.score() > best.score()):
            best = route
    return best
