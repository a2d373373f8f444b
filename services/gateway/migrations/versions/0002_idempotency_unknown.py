"""Idempotency keys remember an unknown outcome (a 5xx or a timeout) instead of forgetting the key.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 00:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_constraint("ck_idempotency_keys_state", "idempotency_keys", type_="check")
    op.create_check_constraint("ck_idempotency_keys_state", "idempotency_keys",
                               "state IN ('in_progress', 'completed', 'unknown')")


def downgrade() -> None:
    op.execute("DELETE FROM idempotency_keys WHERE state = 'unknown'")
    op.drop_constraint("ck_idempotency_keys_state", "idempotency_keys", type_="check")
    op.create_check_constraint("ck_idempotency_keys_state", "idempotency_keys", "state IN ('in_progress', 'completed')")
