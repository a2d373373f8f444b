"""subscription invoices: our copy knows its Stripe invoice, a payment per Stripe invoice, the charges
waiting for our invoice; the in-service stand-in checkout is gone (checkout_sessions.stand_in)

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("invoices", sa.Column("stripe_invoice_id", sa.String(length=255), nullable=True))
    op.create_index(op.f("ix_invoices_stripe_invoice_id"), "invoices", ["stripe_invoice_id"], unique=False)
    op.add_column("payments", sa.Column("stripe_invoice_id", sa.String(length=255), nullable=True))
    op.create_unique_constraint("payments_stripe_invoice_id_key", "payments", ["stripe_invoice_id"])
    op.create_table(
        "stripe_invoice_charges",
        sa.Column("stripe_invoice_id", sa.String(length=255), nullable=False),
        sa.Column("subscription_id", sa.String(length=255), nullable=True),
        sa.Column("customer_id", sa.String(length=255), nullable=True),
        sa.Column("client_id", sa.String(length=64), nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("paid_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("failure_code", sa.String(length=100), nullable=True),
        sa.Column("failure_message", sa.Text(), nullable=True),
        sa.Column("stripe_event_id", sa.String(length=255), nullable=False),
        sa.Column("stripe_event_created", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("stripe_invoice_id"),
    )
    # The local checkout page moved out of this service into the Stripe stand-in (deploy/stripe_standin).
    op.drop_column("checkout_sessions", "stand_in")


def downgrade() -> None:
    op.add_column(
        "checkout_sessions",
        sa.Column("stand_in", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.drop_table("stripe_invoice_charges")
    op.drop_constraint("payments_stripe_invoice_id_key", "payments", type_="unique")
    op.drop_column("payments", "stripe_invoice_id")
    op.drop_index(op.f("ix_invoices_stripe_invoice_id"), table_name="invoices")
    op.drop_column("invoices", "stripe_invoice_id")
