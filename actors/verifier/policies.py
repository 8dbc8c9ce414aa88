"""Runtime (IMA) policy store: one stored copy per distinct policy, parsed once, shared by agents.

Tables (schema.py): ``verifier_runtime_policies`` (checksum -> policy bytes as uploaded) and
``verifier_allowlists`` (name -> checksum, runtime_policy_key, tpm_policy). An agent enrolled by
name resolves that name at every poll, so a PUT of the name swaps the policy for every agent using
it at their next poll; an agent enrolled inline without a name references its checksum.

In memory: ``checksum -> RuntimePolicy`` (the parsed index, built once per distinct policy, in a
worker thread) and ``name -> checksum``. Both are loaded at start (:meth:`PolicyStore.load`) and
updated after each committed write by this process. Several verifier processes sharing one
database (PostgreSQL) pick up each other's writes with :meth:`PolicyStore.refresh`, which the
verifier runs every ``policy_refresh_interval`` seconds (two small SELECTs; a policy new to this
process is parsed once).

Unreferenced policy rows (no name, no agent) are deleted when the last reference goes.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import sqlalchemy as sa
import trio
from prometheus_client import Counter
from sqlalchemy.engine import Connection

from keytrio.actors.common.store import Store
from keytrio.actors.verifier.schema import agents, allowlists, runtime_policies
from keytrio.protocol.dsse import DsseError
from keytrio.protocol.runtime_policy import PolicyError, RuntimePolicy, load_policy

log = logging.getLogger("keytrio.verifier")

MAX_NAME = 255


class PolicyRefused(Exception):
    """A policy (or its key) cannot be accepted; ``field`` is the JSON path / request field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class NameExists(Exception):
    pass


class NameUnknown(Exception):
    pass


class NameInUse(Exception):
    def __init__(self, agent_ids: list[str]) -> None:
        super().__init__(", ".join(agent_ids))
        self.agent_ids = agent_ids


def decode_key(value: str | None) -> bytes | None:
    """``runtime_policy_key`` as sent: PEM text, or base64 of PEM/DER (upstream's tenant); ""/None = none."""
    if not value:
        return None
    text = value.strip()
    if text.startswith("-----BEGIN"):
        return text.encode("ascii", "replace")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise PolicyRefused("runtime_policy_key", "must be a PEM key/certificate or base64 of one") from None


def decode_policy_b64(value: object, field: str = "runtime_policy") -> bytes:
    """The policy bytes from the base64 text the tenant sends ("" -> b"")."""
    if value is None or value == "":
        return b""
    if not isinstance(value, str):
        raise PolicyRefused(field, "must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise PolicyRefused(field, "is not valid base64") from None


def parse(raw: bytes, key: bytes | None, *, require_signature: bool) -> RuntimePolicy:
    """load_policy with our error type (blocking: run in a thread for large policies)."""
    try:
        return load_policy(raw, signing_key=key, require_signature=require_signature)
    except PolicyError as exc:
        if exc.field == "runtime_policy_key":
            field = exc.field
        elif exc.field in ("$", ""):
            field = "runtime_policy"
        else:
            field = f"runtime_policy.{exc.field}"
        raise PolicyRefused(field, exc.reason) from None
    except DsseError as exc:
        raise PolicyRefused("runtime_policy", f"signature check failed: {exc}") from None


@dataclass(frozen=True)
class NamedPolicy:
    name: str
    checksum: str
    runtime_policy_key: str | None
    tpm_policy: str | None


class PolicyStore:
    """The verifier's runtime policies (see module docstring)."""

    def __init__(self, store: Store, *, require_signatures: bool = False,
                 clock: Callable[[], float] = time.time, parses: Counter | None = None) -> None:
        self.store = store
        self.require_signatures = require_signatures
        self._clock = clock
        self._parsed: dict[str, RuntimePolicy] = {}
        self._names: dict[str, str] = {}
        self._writes = 0  # local writes so far: a refresh that raced one is not applied
        self.parses = parses  # runtime_policy_parses_total: once per distinct policy is the goal

    # --- in-memory lookups (sync: used inside the pure evaluation of a poll) -------------------

    def by_checksum(self, checksum: str | None) -> RuntimePolicy | None:
        return self._parsed.get(checksum) if checksum else None

    def by_name(self, name: str | None) -> RuntimePolicy | None:
        return self.by_checksum(self._names.get(name)) if name else None

    def resolve(self, name: str | None, checksum: str | None) -> RuntimePolicy | None:
        """An agent's current policy: its name's (if named), else its own checksum's."""
        if name:
            return self.by_name(name)
        return self.by_checksum(checksum)

    def loaded(self, name: str | None, checksum: str | None) -> bool:
        """Nothing for :meth:`ensure` to load (sync, thread-safe reads: the push verifier asks
        this inside the evidence transaction before it checks there)."""
        return (not name and not checksum) or self.resolve(name, checksum) is not None

    def names(self) -> list[str]:
        return sorted(self._names)

    # --- loading / parsing ---------------------------------------------------------------------

    async def _parse(self, raw: bytes, key: bytes | None, *, verify: bool) -> RuntimePolicy:
        # A stored policy is re-parsed at start with the key it was accepted with; the signature
        # requirement is applied on upload (verify=True) only.
        fn = partial(parse, raw, key, require_signature=self.require_signatures and verify)
        policy = await trio.to_thread.run_sync(fn)
        if self.parses is not None:
            self.parses.inc()
        return policy

    async def load(self) -> None:
        """Read both tables and parse every stored policy once (at verifier start)."""

        def q(conn: Connection) -> tuple[list[Any], list[Any]]:
            pols = list(conn.execute(sa.select(runtime_policies)).mappings())
            names = list(conn.execute(sa.select(allowlists.c.name, allowlists.c.checksum)).mappings())
            return [dict(p) for p in pols], [dict(n) for n in names]

        pols, names = await self.store.read(q)
        for row in pols:
            try:
                key = decode_key(row["runtime_policy_key"])
                self._parsed[row["checksum"]] = await self._parse(row["policy"].encode("utf-8"), key, verify=False)
            except PolicyRefused as exc:  # corrupt row: agents using it fail closed (no policy found)
                log.error("event=stored_policy_unusable checksum=%s error=%s", row["checksum"], exc)
        self._names = {n["name"]: n["checksum"] for n in names}

    async def refresh(self) -> bool:
        """Follow writes of other verifier processes on the same database: names added, moved
        to another policy or deleted, and policy rows garbage-collected. True if anything changed.

        A snapshot read while this process committed a write of its own is dropped (the next
        refresh reads again), so a refresh never undoes a local PUT/POST/DELETE.
        """
        writes = self._writes
        known = set(self._parsed)

        def q(conn: Connection) -> tuple[dict[str, str], set[str], list[Any]]:
            names = {r.name: r.checksum for r in conn.execute(sa.select(allowlists.c.name, allowlists.c.checksum))}
            stored = set(conn.execute(sa.select(runtime_policies.c.checksum)).scalars())
            wanted = set(names.values()) - known
            rows = []
            if wanted:
                rows = [dict(r) for r in conn.execute(
                    sa.select(runtime_policies).where(runtime_policies.c.checksum.in_(sorted(wanted)))).mappings()]
            return names, stored, rows

        names, stored, rows = await self.store.read(q)
        parsed: dict[str, RuntimePolicy] = {}
        for row in rows:
            try:
                key = decode_key(row["runtime_policy_key"])
                parsed[row["checksum"]] = await self._parse(row["policy"].encode("utf-8"), key, verify=False)
            except PolicyRefused as exc:  # agents using it fail closed, as after load()
                log.error("event=stored_policy_unusable checksum=%s error=%s", row["checksum"], exc)
        if writes != self._writes:
            return False  # raced a local write: its result stands, read again next time
        gone = [c for c in self._parsed if c not in stored]
        changed = bool(parsed) or bool(gone) or names != self._names
        for c in gone:
            del self._parsed[c]
        self._parsed.update(parsed)
        if names != self._names:
            log.info("event=runtime_policies_refreshed names=%d", len(names))
        self._names = names
        return changed

    async def ensure(self, name: str | None, checksum: str | None) -> None:
        """Load an agent's policy that another process (a worker, a cluster instance) accepted and
        this one has not read yet, so that a monitor started here does not fail it as missing."""
        if self.loaded(name, checksum):
            return

        def q(conn: Connection) -> tuple[str | None, dict[str, Any] | None]:
            want = checksum
            if name:
                want = conn.execute(sa.select(allowlists.c.checksum).where(allowlists.c.name == name)).scalar()
            row = None
            if want and want not in self._parsed:
                row = conn.execute(sa.select(runtime_policies).where(runtime_policies.c.checksum == want)).mappings().first()
            return want, dict(row) if row is not None else None

        want, row = await self.store.read(q)
        if row is not None:
            try:
                key = decode_key(row["runtime_policy_key"])
                self._parsed[row["checksum"]] = await self._parse(row["policy"].encode("utf-8"), key, verify=False)
            except PolicyRefused as exc:  # fail closed, as after load()
                log.error("event=stored_policy_unusable checksum=%s error=%s", row["checksum"], exc)
        if name and want:
            self._names[name] = want

    async def accept(self, raw: bytes, key_text: str | None) -> RuntimePolicy:
        """Validate an uploaded policy (signature rules apply); reuses the parsed index if known."""
        key = decode_key(key_text)
        policy = await self._parse(raw, key, verify=True)
        return self._parsed.get(policy.checksum, policy)

    # --- writes ----------------------------------------------------------------------------------

    def _insert_policy(self, conn: Connection, policy: RuntimePolicy, raw: bytes, key: str | None) -> None:
        exists = conn.execute(sa.select(runtime_policies.c.checksum)
                              .where(runtime_policies.c.checksum == policy.checksum)).first()
        if exists is None:
            conn.execute(sa.insert(runtime_policies).values(
                checksum=policy.checksum, policy=raw.decode("utf-8"), runtime_policy_key=key or None,
                created_at=self._clock()))

    def _gc(self, conn: Connection, checksum: str) -> bool:
        """Delete the policy row if nothing references it any more; True if deleted."""
        if conn.execute(sa.select(allowlists.c.name).where(allowlists.c.checksum == checksum)).first():
            return False
        used = conn.execute(sa.select(agents.c.agent_id).where(
            sa.and_(agents.c.runtime_policy_checksum == checksum, agents.c.runtime_policy_name.is_(None)))).first()
        if used:
            return False
        conn.execute(sa.delete(runtime_policies).where(runtime_policies.c.checksum == checksum))
        return True

    def _forget_unused(self, dropped: list[str]) -> None:
        for c in dropped:
            if c not in self._names.values():
                self._parsed.pop(c, None)

    async def save_named(
        self, name: str, raw: bytes, policy: RuntimePolicy, key: str | None, tpm_policy: str | None,
        *, create: bool,
    ) -> None:
        """POST (create=True: NameExists if taken) or PUT (create=False: NameUnknown if absent)."""

        def txn(conn: Connection) -> list[str]:
            row = conn.execute(sa.select(allowlists).where(allowlists.c.name == name)).mappings().first()
            if create and row is not None:
                raise NameExists(name)
            if not create and row is None:
                raise NameUnknown(name)
            self._insert_policy(conn, policy, raw, key)
            values = {"checksum": policy.checksum, "runtime_policy_key": key or None,
                      "tpm_policy": tpm_policy, "updated_at": self._clock()}
            if row is None:
                conn.execute(sa.insert(allowlists).values(name=name, **values))
                return []
            conn.execute(sa.update(allowlists).where(allowlists.c.name == name).values(**values))
            old = row["checksum"]
            return [old] if old != policy.checksum and self._gc(conn, old) else []

        dropped = await self.store.write(txn)
        self._writes += 1
        self._parsed.setdefault(policy.checksum, policy)
        self._names[name] = policy.checksum
        self._forget_unused(dropped)
        log.info("event=runtime_policy_saved name=%s checksum=%s", name, policy.checksum)

    async def store_inline(self, raw: bytes, policy: RuntimePolicy, key: str | None, name: str | None) -> None:
        """An enrolment's inline policy: by checksum, and under ``name`` if given.

        A name that exists with another policy -> NameExists (upstream: 409).
        """

        def txn(conn: Connection) -> None:
            if name:
                row = conn.execute(sa.select(allowlists).where(allowlists.c.name == name)).mappings().first()
                if row is not None and row["checksum"] != policy.checksum:
                    raise NameExists(name)
            self._insert_policy(conn, policy, raw, key)
            if name and row is None:
                conn.execute(sa.insert(allowlists).values(
                    name=name, checksum=policy.checksum, runtime_policy_key=key or None, tpm_policy=None,
                    updated_at=self._clock()))

        await self.store.write(txn)
        self._writes += 1
        self._parsed.setdefault(policy.checksum, policy)
        if name:
            self._names[name] = policy.checksum

    async def get_named(self, name: str) -> tuple[NamedPolicy, str] | None:
        """(the name's row, the policy text as stored) or None."""

        def q(conn: Connection) -> tuple[NamedPolicy, str] | None:
            row = conn.execute(
                sa.select(allowlists, runtime_policies.c.policy)
                .join(runtime_policies, runtime_policies.c.checksum == allowlists.c.checksum)
                .where(allowlists.c.name == name)
            ).mappings().first()
            if row is None:
                return None
            return NamedPolicy(name, row["checksum"], row["runtime_policy_key"], row["tpm_policy"]), row["policy"]

        return await self.store.read(q)

    async def delete_named(self, name: str) -> None:
        """NameUnknown / NameInUse (an agent enrolled with this name) or deleted."""

        def txn(conn: Connection) -> list[str]:
            row = conn.execute(sa.select(allowlists).where(allowlists.c.name == name)).mappings().first()
            if row is None:
                raise NameUnknown(name)
            users = [r[0] for r in conn.execute(
                sa.select(agents.c.agent_id).where(agents.c.runtime_policy_name == name).order_by(agents.c.agent_id))]
            if users:
                raise NameInUse(users)
            conn.execute(sa.delete(allowlists).where(allowlists.c.name == name))
            return [row["checksum"]] if self._gc(conn, row["checksum"]) else []

        dropped = await self.store.write(txn)
        self._writes += 1
        self._names.pop(name, None)
        self._forget_unused(dropped)

    async def agent_deleted(self, checksum: str | None) -> None:
        """After an agent row is gone: drop its inline policy if nothing else uses it."""
        if not checksum:
            return
        dropped = await self.store.write(lambda conn: [checksum] if self._gc(conn, checksum) else [])
        self._writes += 1
        self._forget_unused(dropped)
