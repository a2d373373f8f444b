"""a send in flight is marked on its message; payments that settled an invoice

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 12:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("notifications", sa.Column("send_attempt_id", sa.Uuid(), nullable=True))
    op.add_column("notifications", sa.Column("send_started_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "invoice_payments",
        sa.Column("payment_id", sa.String(length=100), nullable=False),
        sa.Column("invoice_id", sa.String(length=64), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("payment_id"),
    )
    op.create_index("ix_invoice_payments_invoice", "invoice_payments", ["invoice_id", "recorded_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_invoice_payments_invoice", table_name="invoice_payments")
    op.drop_table("invoice_payments")
    op.drop_column("notifications", "send_started_at")
    op.drop_column("notifications", "send_attempt_id")
