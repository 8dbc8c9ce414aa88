"""Cluster mode: agent and outbox leases, verifier instance heartbeats.

Revision ID: v0005
Revises: v0004
"""

import sqlalchemy as sa
from alembic import op

revision = "v0005"
down_revision = "v0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "verifier_leases",
        sa.Column("kind", sa.String(16), primary_key=True),
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("verifier_id", sa.String(255), nullable=False),
        sa.Column("holder", sa.String(64), nullable=True),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("epoch", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_verifier_leases_group", "verifier_leases", ["verifier_id", "kind"])
    op.create_table(
        "verifier_members",
        sa.Column("instance_id", sa.String(64), primary_key=True),
        sa.Column("verifier_id", sa.String(255), nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("verifier_members")
    op.drop_index("ix_verifier_leases_group", table_name="verifier_leases")
    op.drop_table("verifier_leases")
