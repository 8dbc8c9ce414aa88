"""Push model (API v3.0): PoP sessions, the attestation history, agents without a contact address.

Revision ID: v0004
Revises: v0003
"""

import sqlalchemy as sa
from alembic import op

revision = "v0004"
down_revision = "v0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # a push agent has no address the verifier could dial: ip/port become nullable
    with op.batch_alter_table("verifier_agents") as batch:
        batch.alter_column("ip", existing_type=sa.String(255), nullable=True)
        batch.alter_column("port", existing_type=sa.Integer, nullable=True)
    op.create_table(
        "verifier_push_sessions",
        sa.Column("session_id", sa.String(64), primary_key=True),
        sa.Column("agent_id", sa.String(255), nullable=False),
        sa.Column("challenge", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("challenges_expire_at", sa.Float, nullable=False),
        sa.Column("response_received_at", sa.Float, nullable=True),
        sa.Column("token_hash", sa.String(64), nullable=True),
        sa.Column("token_expires_at", sa.Float, nullable=True),
    )
    op.create_index("ix_verifier_push_sessions_agent", "verifier_push_sessions", ["agent_id"])
    op.create_table(
        "verifier_push_attestations",
        sa.Column("agent_id", sa.String(255), primary_key=True),
        sa.Column("idx", sa.Integer, primary_key=True),
        sa.Column("stage", sa.String(32), nullable=False),
        sa.Column("evaluation", sa.String(16), nullable=False),
        sa.Column("failure_reason", sa.String(32), nullable=True),
        sa.Column("failure_event", sa.String(255), nullable=True),
        sa.Column("challenge", sa.String(64), nullable=False),
        sa.Column("hash_alg", sa.String(16), nullable=False),
        sa.Column("evidence_requested", sa.Text, nullable=False),
        sa.Column("capabilities", sa.Text, nullable=False),
        sa.Column("system_info", sa.Text, nullable=False),
        sa.Column("evidence", sa.Text, nullable=True),
        sa.Column("capabilities_received_at", sa.Float, nullable=False),
        sa.Column("challenges_expire_at", sa.Float, nullable=False),
        sa.Column("evidence_received_at", sa.Float, nullable=True),
        sa.Column("verification_completed_at", sa.Float, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("verifier_push_attestations")
    op.drop_table("verifier_push_sessions")
    with op.batch_alter_table("verifier_agents") as batch:
        batch.alter_column("port", existing_type=sa.Integer, nullable=False)
        batch.alter_column("ip", existing_type=sa.String(255), nullable=False)
