"""Idempotency keys recorded with the effect they guard (kit.idempotency): a mark-paid retried after
the gateway timed out replays its payment instead of recording a second one.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 10:00:00.000000
"""

from collections.abc import Sequence

from alembic import op

from kit.idempotency import create_table_in_migration

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    create_table_in_migration()


def downgrade() -> None:
    op.drop_table("idempotency_keys")
