"""The revocation outbox: one row per notice, one per (notice, recipient) delivery.

Revision ID: v0002
Revises: v0001
"""

import sqlalchemy as sa
from alembic import op

revision = "v0002"
down_revision = "v0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "verifier_notices",
        sa.Column("notice_id", sa.String(64), primary_key=True),
        sa.Column("verifier_id", sa.String(255), nullable=False),
        sa.Column("agent_id", sa.String(255), nullable=False),
        sa.Column("event_id", sa.String(255), nullable=False),
        sa.Column("msg", sa.Text, nullable=False),
        sa.Column("signature", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    )
    op.create_table(
        "verifier_deliveries",
        sa.Column("notice_id", sa.String(64), sa.ForeignKey("verifier_notices.notice_id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("recipient", sa.String(255), primary_key=True),
        sa.Column("verifier_id", sa.String(255), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", sa.Float, nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("done_at", sa.Float, nullable=True),
    )
    op.create_index("ix_verifier_deliveries_due", "verifier_deliveries", ["verifier_id", "state", "next_attempt_at"])
    op.create_index("ix_verifier_deliveries_recipient", "verifier_deliveries", ["recipient", "state"])


def downgrade() -> None:
    op.drop_table("verifier_deliveries")
    op.drop_table("verifier_notices")
