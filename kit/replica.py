"""One rule for a local copy of another service's aggregate (DESIGN.md: "keeps its own copy from events").

Every snapshot event carries the aggregate's `version`, bumped once per change. A copy takes a
snapshot only when it is strictly newer than what it holds: an equal version is a redelivery of the
same state (nothing to do), an older one arrived out of order and must not move the copy backwards.
One `INSERT … ON CONFLICT DO UPDATE … WHERE copy.version < new.version` does it atomically, so two
consumers racing on the same aggregate cannot interleave a read and a write.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import func
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession


async def upsert_if_newer(
    session: AsyncSession,
    model: Any,
    values: Mapping[str, Any],
    *,
    key: str = "id",
    version: str = "version",
    touch: str | None = "updated_at",
) -> bool:
    """Store `values` as the copy of `values[key]` unless the copy already has the same or a newer
    `version`. True when stored (inserted or updated)."""
    insert_stmt = insert(model).values(**values)
    updates: dict[str, Any] = {name: insert_stmt.excluded[name] for name in values if name != key}
    if touch is not None:
        updates[touch] = func.now()
    stmt = insert_stmt.on_conflict_do_update(
        index_elements=[getattr(model, key)],
        set_=updates,
        where=getattr(model, version) < insert_stmt.excluded[version],
    ).returning(getattr(model, key))
    return (await session.execute(stmt)).first() is not None
