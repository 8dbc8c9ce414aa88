"""Measured-boot policies: the named store (``/v2.x/mbpolicies/``) and enrolment resolution.

Wire facts (upstream 7.14.3): ``GET /mbpolicies/`` -> ``{"mbpolicy names": [...]}``;
``GET /mbpolicies/{name}`` -> ``{"name", "mb_policy"}`` (the reference state as JSON text);
``POST`` (201, 409 if the name exists) and ``PUT`` (201, 409 if it does not) take
``{"mb_policy": "<JSON text>"}`` (``{}``, the empty policy, is stored too: agents enrolled with it
get no measured-boot checks); ``DELETE`` -> 204, 409 while an agent uses the name. An inline
policy given at enrolment without a name is stored under the agent's id (upstream's rule).

Policies are validated with :func:`protocol.mb_policy.parse_refstate` before they are stored.
An agent enrolled by name keeps the name and a copy of the text taken at enrolment (its
``mb_policy`` column), so a later PUT of the name affects agents enrolled after it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from keytrio.actors.common.store import Store
from keytrio.actors.verifier.policies import NameExists, NameInUse, NameUnknown, PolicyRefused
from keytrio.actors.verifier.schema import agents, mbpolicies
from keytrio.protocol import mb_policy


def canonical(value: object, field: str = "mb_policy") -> str | None:
    """A validated reference state as JSON text; None for "no policy" (None, "", "{}", "null").

    Upstream's tenant sends JSON text; a JSON object is accepted too. PolicyRefused otherwise.
    """
    if value is None or value == "":
        return None
    if isinstance(value, dict):
        text = json.dumps(value)
    elif isinstance(value, str):
        text = value
    else:
        raise PolicyRefused(field, "must be JSON text of a measured-boot reference state")
    try:
        if mb_policy.is_empty(text):
            return None
        mb_policy.parse_refstate(text)
    except mb_policy.MbPolicyError as exc:
        raise PolicyRefused(exc.field.replace("mb_policy", field, 1), exc.reason) from None
    return text


class MbPolicyStore:
    """Named measured-boot policies in the verifier's database."""

    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self._clock = clock

    async def names(self) -> list[str]:
        def run(conn: Connection) -> list[str]:
            return [r[0] for r in conn.execute(sa.select(mbpolicies.c.name).order_by(mbpolicies.c.name))]
        return await self.store.read(run)

    async def get(self, name: str) -> str | None:
        def run(conn: Connection) -> str | None:
            return conn.execute(sa.select(mbpolicies.c.mb_policy).where(mbpolicies.c.name == name)).scalar()
        return await self.store.read(run)

    async def save(self, name: str, text: str, *, create: bool) -> None:
        """POST (create=True: NameExists if present) or PUT (NameUnknown if absent)."""
        now = self._clock()

        def run(conn: Connection) -> None:
            exists = conn.execute(sa.select(mbpolicies.c.name).where(mbpolicies.c.name == name)).first()
            if create and exists:
                raise NameExists(name)
            if not create and not exists:
                raise NameUnknown(name)
            if exists:
                conn.execute(mbpolicies.update().where(mbpolicies.c.name == name)
                             .values(mb_policy=text, updated_at=now))
            else:
                conn.execute(mbpolicies.insert().values(name=name, mb_policy=text, updated_at=now))
        await self.store.write(run)

    async def ensure(self, name: str, text: str) -> None:
        """Store ``text`` under ``name`` unless present; NameExists if present with other content."""
        now = self._clock()

        def run(conn: Connection) -> None:
            old = conn.execute(sa.select(mbpolicies.c.mb_policy).where(mbpolicies.c.name == name)).scalar()
            if old is None:
                conn.execute(mbpolicies.insert().values(name=name, mb_policy=text, updated_at=now))
            elif json.loads(old) != json.loads(text):
                raise NameExists(name)
        await self.store.write(run)

    async def drop_unused(self, name: str) -> None:
        """Delete the policy ``name`` if present and no agent uses it (an agent's inline copy)."""
        def run(conn: Connection) -> None:
            if conn.execute(sa.select(agents.c.agent_id).where(agents.c.mb_policy_name == name)).first() is None:
                conn.execute(mbpolicies.delete().where(mbpolicies.c.name == name))
        await self.store.write(run)

    async def delete(self, name: str) -> None:
        def run(conn: Connection) -> None:
            if conn.execute(sa.select(mbpolicies.c.name).where(mbpolicies.c.name == name)).first() is None:
                raise NameUnknown(name)
            users = [r[0] for r in conn.execute(sa.select(agents.c.agent_id).where(agents.c.mb_policy_name == name))]
            if users:
                raise NameInUse(users)
            conn.execute(mbpolicies.delete().where(mbpolicies.c.name == name))
        await self.store.write(run)


async def resolve_enrolment(mstore: MbPolicyStore, values: dict[str, Any]) -> None:
    """Set ``values["mb_policy"]``/``["mb_policy_name"]`` for an enrolment (inline or by name).

    Inline + name: the name is created with that policy (409 if it exists with other content).
    Inline without a name: stored under the agent's id, as upstream does (so ``GET /mbpolicies/``
    lists it; deleting the agent deletes it). Name only: the stored policy is copied
    (NameUnknown if absent). PolicyRefused for a bad one.
    """
    name = values.get("mb_policy_name") or None
    text = canonical(values.get("mb_policy"))
    if text is not None and name is None:
        name = values["agent_id"]
    values["mb_policy_name"] = name
    values["mb_policy"] = text
    if text is not None:
        if name is not None:
            await mstore.ensure(name, text)
        return
    if name is not None:
        stored = await mstore.get(name)
        if stored is None:
            raise NameUnknown(name)
        values["mb_policy"] = canonical(stored)
        if values["mb_policy"] is None:
            values["mb_policy_name"] = name  # an empty named policy: no measured-boot checks
