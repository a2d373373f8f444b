"""subscription emails: the Stripe invoice of an invoice copy, paid Stripe invoices

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 09:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("invoices", sa.Column("stripe_invoice_id", sa.String(length=100), nullable=True))
    op.create_index("ix_invoices_stripe_invoice", "invoices", ["stripe_invoice_id"], unique=False)
    op.create_table(
        "paid_stripe_invoices",
        sa.Column("stripe_invoice_id", sa.String(length=100), nullable=False),
        sa.Column("paid_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("recorded_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("stripe_invoice_id"),
    )


def downgrade() -> None:
    op.drop_table("paid_stripe_invoices")
    op.drop_index("ix_invoices_stripe_invoice", table_name="invoices")
    op.drop_column("invoices", "stripe_invoice_id")
