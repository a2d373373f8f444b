"""The migrations create exactly the tables the models (and so a rebuild) describe."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from kit.migrations import upgrade_to_head_async
from services.reporting.models import MIGRATIONS, Base


def _differences(conn: Connection) -> list[Any]:
    context = MigrationContext.configure(conn, opts={"include_schemas": True, "compare_type": True})
    return [d for d in compare_metadata(context, Base.metadata)
            if not (d[0] == "remove_table" and getattr(d[1], "name", "") == "alembic_version")]


async def test_migrations_match_the_models(database_url_factory: Callable[[str], str]) -> None:
    url = database_url_factory("reporting_schema")
    await upgrade_to_head_async(MIGRATIONS, url)
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(_differences) == []
    finally:
        await engine.dispose()
