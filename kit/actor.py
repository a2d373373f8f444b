"""Who is calling: the gateway authenticates users and forwards the result in trusted headers."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, Request

from kit.errors import Forbidden, Unauthorized

ROLE_HEADER = "X-Actor-Role"
CLIENT_HEADER = "X-Actor-Client-Id"
USER_HEADER = "X-Actor-User-Id"
INTERNAL_TOKEN_HEADER = "X-Internal-Token"

Role = Literal["admin", "client", "system", "anonymous"]


@dataclass(frozen=True)
class Actor:
    role: Role
    user_id: str | None = None
    client_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role in ("admin", "system")

    def can_see_client(self, client_id: str) -> bool:
        return self.is_admin or (self.client_id is not None and self.client_id == str(client_id))


async def get_actor(request: Request) -> Actor:
    expected = getattr(request.app.state, "internal_token", None)
    if expected and not hmac.compare_digest(request.headers.get(INTERNAL_TOKEN_HEADER, ""), expected):
        raise Unauthorized("Missing or invalid internal token.")
    role = request.headers.get(ROLE_HEADER)
    if role is None:
        # A direct service-to-service call (no user behind it).
        return Actor(role="system")
    if role == "admin":
        return Actor(role="admin", user_id=request.headers.get(USER_HEADER))
    if role == "client":
        client_id = request.headers.get(CLIENT_HEADER)
        if not client_id:
            raise Forbidden("A client login must be bound to a client.")
        return Actor(role="client", user_id=request.headers.get(USER_HEADER), client_id=client_id)
    if role == "anonymous":
        # A public route of the gateway (checkout page, tracking pixel): no rights at all.
        return Actor(role="anonymous")
    raise Unauthorized(f"Unknown role {role!r}.")


async def require_admin(actor: Annotated[Actor, Depends(get_actor)]) -> Actor:
    if not actor.is_admin:
        raise Forbidden("This action needs an admin.")
    return actor


CurrentActor = Annotated[Actor, Depends(get_actor)]
AdminActor = Annotated[Actor, Depends(require_admin)]
