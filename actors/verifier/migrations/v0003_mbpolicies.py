"""Named measured-boot policies (verifier_mbpolicies).

Revision ID: v0003
Revises: v0002
"""

import sqlalchemy as sa
from alembic import op

revision = "v0003"
down_revision = "v0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "verifier_mbpolicies",
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("mb_policy", sa.Text, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("verifier_mbpolicies")
