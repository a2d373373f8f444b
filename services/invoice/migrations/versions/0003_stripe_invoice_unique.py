"""one invoice per Stripe invoice

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 09:00:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A subscription's Stripe invoice becomes one invoice of ours, idempotent on its id (NULLs, our
    # own invoices, do not collide).
    op.create_unique_constraint("uq_invoices_stripe_invoice_id", "invoices", ["stripe_invoice_id"])


def downgrade() -> None:
    op.drop_constraint("uq_invoices_stripe_invoice_id", "invoices", type_="unique")
