"""The W3C trace context of each stored Stripe delivery (kit.tracing): the webhook worker continues the
intake's trace, so one trace follows a webhook through payments, Kafka and the other services.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 12:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, no default: a metadata-only change, instant on a large table.
    op.add_column("stripe_events", sa.Column("trace_context", JSONB, nullable=True))


def downgrade() -> None:
    op.drop_column("stripe_events", "trace_context")
