"""The verifier store's alembic revisions (loaded by path by actors/common/migrations.py).

``v0001`` is the schema of the first release (verifier_agents, runtime policies, allowlists);
``v0002`` adds the revocation outbox (verifier_notices, verifier_deliveries); ``v0003`` the named
measured-boot policies (verifier_mbpolicies). Revisions are
frozen copies: never import schema.py here, the current tables may differ from a revision's.
"""

from pathlib import Path

from keytrio.actors.common.migrations import Migrations

MIGRATIONS = Migrations("verifier", Path(__file__).parent, "v0001", "verifier_agents")
