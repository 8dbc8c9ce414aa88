"""A re-registration no longer deactivates the agent's record: ``active`` means ``regcount > 0``.

Rows written by r0001-era code while a re-registration awaited activation have ``active = false``
although their non-pending columns still hold the last activated record; they become active again
(the pending values stay pending). No schema change; downgrading leaves the rows as they are,
which the older code reads correctly (it only looked at ``active`` to answer GET).

Revision ID: r0002
Revises: r0001
"""

import sqlalchemy as sa
from alembic import op

revision = "r0002"
down_revision = "r0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    agents = sa.table("registrar_agents", sa.column("regcount", sa.Integer), sa.column("active", sa.Boolean))
    op.execute(sa.update(agents).where(agents.c.regcount > 0, agents.c.active.is_(False)).values(active=True))


def downgrade() -> None:
    pass
