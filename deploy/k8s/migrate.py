"""Apply a service's database migrations, or wait until someone has (the Kubernetes migration Job).

    python -m deploy.k8s.migrate invoice          # upgrade the invoice database to head, exit 0
    python -m deploy.k8s.migrate invoice --wait   # exit 0 once the database is at head (init container)

In a cluster ``<PREFIX>MIGRATE_ON_START`` is false: one Job per service migrates (kit.migrations, the
same advisory-locked Alembic upgrade a replica runs at start otherwise), and each Deployment's init
container waits for it, so a new replica never serves against an old schema and no rollout of ten
replicas races ten upgrades. Settings are read exactly as the service reads them (one line naming the
variable and exit 2 when one is bad), so a Job fails early on the same mistake the service would.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import asyncpg
from alembic.script import ScriptDirectory

from deploy.k8s.settings import settings_class
from deploy.services import SERVICES, service_by_name
from kit.cli import load_settings
from kit.migrations import alembic_config, upgrade_to_head
from kit.worker import asyncpg_dsn


def head_revisions(service: str, database_url: str) -> set[str]:
    spec = service_by_name(service)
    return set(ScriptDirectory.from_config(alembic_config(spec.package_dir / "migrations", database_url)).get_heads())


async def current_revisions(database_url: str) -> set[str]:
    """The revisions recorded in the database; empty when it was never migrated (or cannot be asked)."""
    conn = await asyncpg.connect(asyncpg_dsn(database_url), timeout=5)
    try:
        rows = await conn.fetch("SELECT version_num FROM alembic_version")
    except asyncpg.UndefinedTableError:
        return set()
    finally:
        await conn.close()
    return {row["version_num"] for row in rows}


def wait_for_head(service: str, database_url: str, timeout: float, poll: float = 2.0) -> bool:
    heads = head_revisions(service, database_url)
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        try:
            current = asyncio.run(current_revisions(database_url))
            state = f"at {', '.join(sorted(current)) or 'no revision'}"
        except (OSError, asyncpg.PostgresError) as exc:
            current, state = set(), f"not reachable ({type(exc).__name__}: {exc})"
        if current == heads:
            print(f"{service}: database at head {', '.join(sorted(heads))}", flush=True)
            return True
        if state != last:
            print(f"{service}: waiting for the migration Job: database {state}, head {', '.join(sorted(heads))}",
                  flush=True)
            last = state
        if time.monotonic() > deadline:
            print(f"{service}: database still not at head after {timeout:.0f}s", file=sys.stderr, flush=True)
            return False
        time.sleep(poll)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.k8s.migrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("service", choices=[spec.name for spec in SERVICES])
    parser.add_argument("--wait", action="store_true", help="do not migrate: exit 0 once the database is at head")
    parser.add_argument("--timeout", type=float, default=900.0, help="--wait gives up after this many seconds")
    args = parser.parse_args(argv)
    settings = load_settings(args.service, settings_class(service_by_name(args.service)))
    if args.wait:
        return 0 if wait_for_head(args.service, settings.database_url, args.timeout) else 1
    started = time.monotonic()
    upgrade_to_head(service_by_name(args.service).package_dir / "migrations", settings.database_url)
    print(f"{args.service}: migrated to head in {time.monotonic() - started:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
