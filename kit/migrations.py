"""Alembic helpers: one env.py body for every service, and an upgrade guarded by an advisory lock."""

from __future__ import annotations

import asyncio
import zlib
from pathlib import Path

from alembic import command, context
from alembic.config import Config
from sqlalchemy import MetaData, pool, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine


def alembic_config(script_location: Path, database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def upgrade_to_head(script_location: Path, database_url: str) -> None:
    """Run from a thread or a sync context; replicas starting together take turns."""
    command.upgrade(alembic_config(script_location, database_url), "head")


async def upgrade_to_head_async(script_location: Path, database_url: str) -> None:
    await asyncio.to_thread(upgrade_to_head, script_location, database_url)


def run_env(target_metadata: MetaData) -> None:
    """Body of each service's migrations/env.py (online mode, async engine)."""
    url = context.config.get_main_option("sqlalchemy.url")
    assert url, "sqlalchemy.url is not configured"
    lock_key = zlib.crc32(f"migrations:{url.rsplit('/', 1)[-1]}".encode())

    def do_run(connection: Connection) -> None:
        # Held until commit: replicas migrating at once run one after another.
        connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": lock_key})
        context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()

    async def run_async() -> None:
        engine = create_async_engine(url, poolclass=pool.NullPool)
        async with engine.connect() as connection:
            await connection.run_sync(do_run)
        await engine.dispose()

    asyncio.run(run_async())
