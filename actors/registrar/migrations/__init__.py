"""The registrar store's alembic revisions (loaded by path by actors/common/migrations.py).

``r0001`` is the schema of the first release; ``r0002`` reactivates rows a re-registration had
deactivated (re-registrations now leave the active record in place). Revisions are frozen copies: never import
schema.py here.
"""

from pathlib import Path

from keytrio.actors.common.migrations import Migrations

MIGRATIONS = Migrations("registrar", Path(__file__).parent, "r0001", "registrar_agents")
