"""invoice template versions and the PDF cache

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 20:20:50.373410
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Append-only: one row per saved version; the current template is the highest version.
    op.create_table(
        "invoice_templates",
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("settings", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("logo_data", sa.LargeBinary(), nullable=True),
        sa.Column("logo_mime", sa.String(length=40), nullable=True),
        sa.Column("logo_width", sa.Integer(), nullable=True),
        sa.Column("logo_height", sa.Integer(), nullable=True),
        sa.Column("logo_source_mime", sa.String(length=40), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=True),
        sa.CheckConstraint("version > 0", name="ck_invoice_templates_version_positive"),
        sa.CheckConstraint("(logo_data IS NULL) = (logo_mime IS NULL)", name="ck_invoice_templates_logo_complete"),
        sa.PrimaryKeyConstraint("version"),
    )
    # The latest rendering of each invoice (upserted), keyed by its content fingerprint.
    op.create_table(
        "invoice_pdfs",
        sa.Column("invoice_id", sa.Uuid(), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("pdf", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["invoice_id"], ["invoices.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("invoice_id"),
    )


def downgrade() -> None:
    op.drop_table("invoice_pdfs")
    op.drop_table("invoice_templates")
