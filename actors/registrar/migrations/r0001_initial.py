"""The registrar's first schema (as released before migrations existed).

Revision ID: r0001
Revises: (none)
"""

import sqlalchemy as sa
from alembic import op

revision = "r0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "registrar_agents",
        sa.Column("agent_id", sa.String(255), primary_key=True),
        sa.Column("ek_tpm", sa.Text, nullable=False),
        sa.Column("ekcert", sa.Text, nullable=True),
        sa.Column("aik_tpm", sa.Text, nullable=False),
        sa.Column("mtls_cert", sa.Text, nullable=True),
        sa.Column("ip", sa.String(255), nullable=True),
        sa.Column("port", sa.Integer, nullable=True),
        sa.Column("regcount", sa.Integer, nullable=False),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("auth_tag", sa.String(128), nullable=True),
        sa.Column("pending_tag", sa.String(128), nullable=True),
        sa.Column("pending_deadline", sa.Float, nullable=True),
        sa.Column("pending_mtls_cert", sa.Text, nullable=True),
        sa.Column("pending_ip", sa.String(255), nullable=True),
        sa.Column("pending_port", sa.Integer, nullable=True),
        sa.Column("registered_at", sa.Float, nullable=False),
        sa.Column("activated_at", sa.Float, nullable=True),
    )
    op.create_index("ix_registrar_agents_pending_deadline", "registrar_agents", ["pending_deadline"])


def downgrade() -> None:
    op.drop_table("registrar_agents")
