"""Durable redelivery counts of the consumers (kit.deadletter): a poison event is parked after N failed
deliveries even across restarts and rebalances.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 10:00:00.000000
"""

from collections.abc import Sequence

from alembic import op

from kit.deadletter import create_table_in_migration

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    create_table_in_migration()


def downgrade() -> None:
    op.drop_table("event_failures")
