"""The verifier's first schema (as released before migrations existed).

Revision ID: v0001
Revises: (none)
"""

import sqlalchemy as sa
from alembic import op

revision = "v0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "verifier_agents",
        sa.Column("agent_id", sa.String(255), primary_key=True),
        sa.Column("v", sa.Text, nullable=True),
        sa.Column("ip", sa.String(255), nullable=False),
        sa.Column("port", sa.Integer, nullable=False),
        sa.Column("tpm_policy", sa.Text, nullable=False),
        sa.Column("runtime_policy", sa.Text, nullable=False),
        sa.Column("runtime_policy_name", sa.String(255), nullable=True),
        sa.Column("runtime_policy_checksum", sa.String(64), nullable=True),
        sa.Column("runtime_policy_key", sa.Text, nullable=True),
        sa.Column("mb_policy", sa.Text, nullable=True),
        sa.Column("mb_policy_name", sa.String(255), nullable=True),
        sa.Column("ima_sign_verification_keys", sa.Text, nullable=True),
        sa.Column("meta_data", sa.Text, nullable=False),
        sa.Column("revocation_key", sa.Text, nullable=True),
        sa.Column("accept_tpm_hash_algs", sa.Text, nullable=False),
        sa.Column("accept_tpm_encryption_algs", sa.Text, nullable=False),
        sa.Column("accept_tpm_signing_algs", sa.Text, nullable=False),
        sa.Column("ak_tpm", sa.Text, nullable=False),
        sa.Column("mtls_cert", sa.Text, nullable=True),
        sa.Column("supported_version", sa.String(16), nullable=False),
        sa.Column("enrolled_at", sa.Float, nullable=False),
        sa.Column("operational_state", sa.Integer, nullable=False),
        sa.Column("verifier_id", sa.String(255), nullable=False),
        sa.Column("severity_level", sa.Integer, nullable=True),
        sa.Column("last_event_id", sa.String(255), nullable=True),
        sa.Column("attestation_count", sa.Integer, nullable=False),
        sa.Column("last_received_quote", sa.Integer, nullable=False),
        sa.Column("last_successful_attestation", sa.Integer, nullable=False),
        sa.Column("hash_alg", sa.String(32), nullable=False),
        sa.Column("enc_alg", sa.String(32), nullable=False),
        sa.Column("sign_alg", sa.String(32), nullable=False),
        sa.Column("v_delivered", sa.Boolean, nullable=False),
        sa.Column("next_ima_ml_entry", sa.Integer, nullable=False),
        sa.Column("ima_pcr10", sa.Text, nullable=False),
        sa.Column("boottime", sa.Integer, nullable=True),
        sa.Column("ima_progress", sa.Text, nullable=True),
        sa.Column("tpm_clock_info", sa.Text, nullable=True),
    )
    op.create_index("ix_verifier_agents_verifier_id", "verifier_agents", ["verifier_id"])
    op.create_table(
        "verifier_runtime_policies",
        sa.Column("checksum", sa.String(64), primary_key=True),
        sa.Column("policy", sa.Text, nullable=False),
        sa.Column("runtime_policy_key", sa.Text, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "verifier_allowlists",
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("checksum", sa.String(64), nullable=False),
        sa.Column("runtime_policy_key", sa.Text, nullable=True),
        sa.Column("tpm_policy", sa.Text, nullable=True),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_index("ix_verifier_allowlists_checksum", "verifier_allowlists", ["checksum"])


def downgrade() -> None:
    op.drop_table("verifier_allowlists")
    op.drop_table("verifier_runtime_policies")
    op.drop_table("verifier_agents")
