"""The registrar's logic: validate registrations, make credentials, activate, expire, serve records.

Every method that changes state runs one database transaction (``Store.write``) that commits
before the method returns, so the HTTP answer never acknowledges something a crash could lose.
Errors are :class:`ApiError` (code + status text); no status text ever holds the credential or
an expected auth tag. See schema.py for the meaning of the row fields (pending registrations).
"""

from __future__ import annotations

import base64
import hmac
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
import trio
from cryptography import x509
from sqlalchemy.engine import Connection
from tpm2_pytss.constants import TPMA_OBJECT
from tpm2_pytss.types import TPM2B_PUBLIC

from keytrio.actors.common.app import ApiError, bad_request, parse_agent_id
from keytrio.actors.common.metrics import Metrics
from keytrio.actors.common.store import Store
from keytrio.actors.registrar import ekcert as ekcerts
from keytrio.actors.registrar.schema import agents
from keytrio.protocol import credential, tpm2, validation
from keytrio.protocol.errors import ProtocolError, ValidationError

log = logging.getLogger("keytrio.registrar")

_TAG = re.compile(r"^[0-9a-fA-F]{96}$")  # hex of HMAC-SHA384


@dataclass(frozen=True)
class Registration:
    """A validated ``POST /agents/{id}`` body."""

    agent_id: str  # normalised (lower case): the database key
    raw_id: str  # as the agent wrote it in the URL: the auth tag is an HMAC over this text
    ek: TPM2B_PUBLIC
    ek_tpm: str  # canonical base64 of the TPM2B_PUBLIC
    aik: TPM2B_PUBLIC
    aik_tpm: str
    ekcert: str | None  # canonical base64 DER
    mtls_cert: str | None
    ip: str | None
    port: int | None


class RegistrarMetrics:
    """The registrar's Prometheus metrics (own registry: two registrars in one process count apart)."""

    def __init__(self) -> None:
        m = self.metrics = Metrics("registrar")
        self.registrations = m.counter(
            "registrations_total", "Registrations (POST /agents/{id}) by result: new, again (a known "
            "agent re-registered), invalid, forbidden, conflict.", ("result",))
        self.activations = m.counter(
            "activations_total", "Activations by result: activated, repeat, unknown, invalid, "
            "wrong_removed, wrong_rolled_back, wrong_active.", ("result",))
        self.agents = m.gauge("agents", "Agent records: active (GET answers them), pending (a registration "
                              "awaits activation; an active agent re-registering counts in both).", ("state",))


_REFUSALS = {400: "invalid", 403: "forbidden", 404: "unknown", 409: "conflict"}


def _refusal(exc: ApiError) -> str:
    return _REFUSALS.get(getattr(exc, "code", 0), "error")


def _public(doc: dict[str, Any], field: str) -> tuple[TPM2B_PUBLIC, str]:
    if doc.get(field) is None:
        raise ValidationError(field, "is required")
    raw = validation.b64(doc[field], field, max_len=4096)
    try:
        pub = tpm2.parse_public(raw)
    except ProtocolError as exc:
        raise ValidationError(field, f"is not a TPM2B_PUBLIC ({exc})") from None
    return pub, base64.b64encode(tpm2.public_bytes(pub)).decode("ascii")


def _check_ek(ek: TPM2B_PUBLIC) -> None:
    attrs = int(ek.publicArea.objectAttributes)
    if not attrs & int(TPMA_OBJECT.RESTRICTED) or not attrs & int(TPMA_OBJECT.DECRYPT):
        raise ValidationError("ek_tpm", "an EK must be a restricted decryption key")
    if attrs & int(TPMA_OBJECT.SIGN_ENCRYPT):
        raise ValidationError("ek_tpm", "an EK must not be a signing key")
    try:
        tpm2.public_key(ek)
    except ValidationError as exc:
        raise ValidationError("ek_tpm", exc.reason) from None


def _ip(value: object) -> str | None:
    return None if value is None else validation.host(value, "ip")


def parse_registration(
    raw_id: str,
    doc: dict[str, Any],
    *,
    require_ek_cert: bool,
    cert_store: list[x509.Certificate],
) -> Registration:
    """Validate a registration body; ApiError 400 (bad input) or 403 (untrusted EK cert)."""
    agent_id = parse_agent_id(raw_id)
    try:
        ek, ek_tpm = _public(doc, "ek_tpm")
        _check_ek(ek)
        aik, aik_tpm = _public(doc, "aik_tpm")
        try:
            tpm2.check_ak_attributes(aik)
        except ValidationError as exc:
            raise ValidationError("aik_tpm", exc.reason) from None
        cert = ekcerts.parse_ekcert(doc.get("ekcert"))
        if cert is not None:
            ekcerts.check_matches_ek(cert, ek)
        elif require_ek_cert:
            raise ValidationError("ekcert", "is required (require_ek_cert)")
        mtls_cert = validation.mtls_cert(doc.get("mtls_cert"))
        ip = _ip(doc.get("ip"))
        port = validation.port(doc["port"]) if doc.get("port") is not None else None
    except ProtocolError as exc:
        raise bad_request(exc) from None
    if require_ek_cert and cert is not None and not ekcerts.chains_to_store(cert, cert_store):
        raise ApiError(403, "Forbidden: the EK certificate does not chain to a trusted TPM CA")
    return Registration(
        agent_id=agent_id,
        raw_id=raw_id,
        ek=ek,
        ek_tpm=ek_tpm,
        aik=aik,
        aik_tpm=aik_tpm,
        ekcert=base64.b64encode(ekcerts.cert_der(cert)).decode("ascii") if cert is not None else None,
        mtls_cert=mtls_cert,
        ip=ip,
        port=port,
    )


def parse_auth_tag(doc: dict[str, Any]) -> str:
    tag = doc.get("auth_tag")
    if not isinstance(tag, str) or not _TAG.fullmatch(tag):
        raise ApiError(400, "Bad request: auth_tag must be the 96-hex-digit HMAC-SHA384")
    return tag.lower()


def _same_tag(expected: str | None, given: str) -> bool:
    if expected is None:
        return False
    return hmac.compare_digest(expected.encode("ascii"), given.encode("ascii"))


# --- row transitions (run inside a transaction) ---------------------------------------------------

_PENDING_CLEARED = {
    "pending_tag": None,
    "pending_deadline": None,
    "pending_mtls_cert": None,
    "pending_ip": None,
    "pending_port": None,
}


def _row(conn: Connection, agent_id: str) -> Any:
    return conn.execute(sa.select(agents).where(agents.c.agent_id == agent_id)).mappings().first()


def _drop_pending(conn: Connection, row: Any) -> str:
    """Undo a pending registration: delete a never-activated row, roll back a re-registration."""
    where = agents.c.agent_id == row["agent_id"]
    if row["regcount"] == 0:
        conn.execute(sa.delete(agents).where(where))
        return "removed"
    conn.execute(sa.update(agents).where(where).values(**_PENDING_CLEARED))
    return "rolled back"


def _expire(conn: Connection, row: Any, now: float) -> Any:
    """The row after applying its activation timeout (None if that removed it)."""
    deadline = row["pending_deadline"]
    if deadline is None or deadline > now:
        return row
    outcome = _drop_pending(conn, row)
    log.info("event=registration.expired agent_id=%s outcome=%s", row["agent_id"], outcome.replace(" ", "_"))
    return _row(conn, row["agent_id"])


class RegistrarService:
    """The registrar's operations over one :class:`Store` (no global state)."""

    def __init__(
        self,
        store: Store,
        *,
        activation_timeout: float,
        require_ek_cert: bool = False,
        cert_store: list[x509.Certificate] | None = None,
        clock: Callable[[], float] = time.time,
        rng: Callable[[int], bytes] = os.urandom,
        metrics: RegistrarMetrics | None = None,
    ) -> None:
        self.metrics = metrics or RegistrarMetrics()
        self.store = store
        self.activation_timeout = activation_timeout
        self.require_ek_cert = require_ek_cert
        self.cert_store = list(cert_store or [])
        self.clock = clock
        self.rng = rng

    # -- agents (plain HTTP) ----------------------------------------------------------------------

    async def register(self, raw_id: str, doc: dict[str, Any]) -> str:
        """Validate and store a (re-)registration; returns the base64 MakeCredential blob."""
        try:
            blob, kind = await self._register(raw_id, doc)
        except ApiError as exc:
            self.metrics.registrations.labels(_refusal(exc)).inc()
            raise
        self.metrics.registrations.labels(kind).inc()
        return blob

    async def _register(self, raw_id: str, doc: dict[str, Any]) -> tuple[str, str]:
        reg = parse_registration(
            raw_id, doc, require_ek_cert=self.require_ek_cert, cert_store=self.cert_store
        )
        secret = credential.new_credential(self.rng(32))
        try:
            blob = credential.make_credential_blob(reg.ek, tpm2.object_name(reg.aik), secret, rng=self.rng)
        except ProtocolError as exc:  # e.g. an EK whose symmetric scheme MakeCredential cannot use
            raise bad_request(exc) from None
        tag = credential.activation_auth_tag(secret, reg.raw_id)
        del secret  # only the tag is kept: the credential itself is never stored or logged
        now = self.clock()
        deadline = now + self.activation_timeout

        def txn(conn: Connection) -> str:
            row = _row(conn, reg.agent_id)
            if row is not None:
                row = _expire(conn, row, now)
            pending = {
                "pending_tag": tag,
                "pending_deadline": deadline,
                "pending_mtls_cert": reg.mtls_cert,
                "pending_ip": reg.ip,
                "pending_port": reg.port,
            }
            if row is None:
                conn.execute(
                    sa.insert(agents).values(
                        agent_id=reg.agent_id,
                        ek_tpm=reg.ek_tpm,
                        ekcert=reg.ekcert,
                        aik_tpm=reg.aik_tpm,
                        regcount=0,
                        active=False,
                        registered_at=now,
                        **pending,
                    )
                )
                return "new"
            if (row["ek_tpm"], row["ekcert"], row["aik_tpm"]) != (reg.ek_tpm, reg.ekcert, reg.aik_tpm):
                raise ApiError(
                    403, "Forbidden: agent id already registered with a different EK, EK cert or AK"
                )
            # only the pending_* columns: an activated record stays what GET answers (and what
            # tenants and verifiers trust) until this registration is activated in its turn, so a
            # replay of the agent's public EK/AK by anyone who reaches this port changes nothing
            conn.execute(sa.update(agents).where(agents.c.agent_id == reg.agent_id).values(**pending))
            return "again"

        try:
            kind = await self.store.write(txn)
        except sa.exc.IntegrityError:  # a concurrent first registration of the same id won
            raise ApiError(409, "Conflict: concurrent registration of this agent id") from None
        except ApiError:
            log.warning("event=registration.identity_mismatch agent_id=%s", reg.agent_id)
            raise
        log.info("event=registration.%s agent_id=%s", kind, reg.agent_id)
        return base64.b64encode(blob).decode("ascii"), kind

    async def activate(self, raw_id: str, doc: dict[str, Any]) -> None:
        try:
            agent_id = parse_agent_id(raw_id)
            tag = parse_auth_tag(doc)
        except ApiError:
            self.metrics.activations.labels("invalid").inc()
            raise
        now = self.clock()

        def txn(conn: Connection) -> str:
            row = _row(conn, agent_id)
            if row is not None:
                row = _expire(conn, row, now)
            if row is None:
                return "unknown"
            if row["pending_tag"] is None:
                # already active: a retried activation (lost answer) with the same tag is fine; a
                # wrong tag changes nothing, it must not let anyone knock an active agent out
                return "repeat" if _same_tag(row["auth_tag"], tag) else "wrong_active"
            if not _same_tag(row["pending_tag"], tag):
                return "wrong_" + _drop_pending(conn, row).replace(" ", "_")
            values: dict[str, Any] = {
                "active": True,
                "auth_tag": row["pending_tag"],
                "mtls_cert": row["pending_mtls_cert"],
                "ip": row["pending_ip"],
                "port": row["pending_port"],
                "regcount": row["regcount"] + 1,
                "activated_at": now,
                **_PENDING_CLEARED,
            }
            conn.execute(sa.update(agents).where(agents.c.agent_id == agent_id).values(**values))
            return "activated"

        outcome = await self.store.write(txn)
        self.metrics.activations.labels(outcome).inc()
        log.info("event=activation.%s agent_id=%s", outcome, agent_id)
        if outcome == "unknown":
            raise ApiError(404, "Agent not found or its registration expired")
        if outcome.startswith("wrong"):
            what = {
                "wrong_removed": "; the registration was removed",
                "wrong_rolled_back": "; the re-registration was discarded",
                "wrong_active": "",
            }[outcome]
            raise ApiError(400, "Activation failed: auth_tag does not match" + what)

    # -- tenant / verifier (HTTPS) ----------------------------------------------------------------

    async def list_ids(self) -> list[str]:
        def q(conn: Connection) -> list[str]:
            rows = conn.execute(sa.select(agents.c.agent_id).order_by(agents.c.agent_id))
            return [r[0] for r in rows]

        return await self.store.read(q)

    async def get(self, raw_id: str) -> dict[str, Any]:
        agent_id = parse_agent_id(raw_id)

        def q(conn: Connection) -> Any:
            return conn.execute(sa.select(agents).where(agents.c.agent_id == agent_id)).mappings().first()

        row = await self.store.read(q)
        # upstream's texts (web/registrar/agents_controller.py)
        if row is None:
            raise ApiError(404, f"Agent with ID '{agent_id}' not found")
        if not row["active"]:
            raise ApiError(404, f"Agent with ID '{agent_id}' has not been activated")
        return {
            "aik_tpm": row["aik_tpm"],
            "ek_tpm": row["ek_tpm"],
            "ekcert": row["ekcert"],
            "mtls_cert": row["mtls_cert"],
            "ip": row["ip"],
            "port": row["port"],
            "regcount": row["regcount"],
        }

    async def delete(self, raw_id: str) -> None:
        agent_id = parse_agent_id(raw_id)

        def txn(conn: Connection) -> int:
            return conn.execute(sa.delete(agents).where(agents.c.agent_id == agent_id)).rowcount

        if not await self.store.write(txn):
            raise ApiError(404, f"Agent with ID '{agent_id}' not found")
        log.info("event=agent.deleted agent_id=%s", agent_id)

    # -- housekeeping -----------------------------------------------------------------------------

    async def refresh_gauges(self) -> None:
        """Recount the agent records for the ``agents`` gauge (one GROUP BY)."""

        def q(conn: Connection) -> tuple[int, int]:
            active = sa.func.count().filter(agents.c.active.is_(True))
            pending = sa.func.count().filter(agents.c.pending_tag.is_not(None))
            row = conn.execute(sa.select(active, pending)).one()
            return int(row[0]), int(row[1])

        active, pending = await self.store.read(q)
        self.metrics.agents.labels("active").set(active)
        self.metrics.agents.labels("pending").set(pending)

    async def health(self) -> dict[str, Any]:
        """/health: the store answers a trivial SELECT within 5 s."""
        return await store_health(self.store)

    async def sweep(self) -> int:
        """Apply the activation timeout to every expired pending registration; returns how many."""
        now = self.clock()

        def txn(conn: Connection) -> int:
            rows = (
                conn.execute(
                    sa.select(agents).where(
                        agents.c.pending_deadline.is_not(None), agents.c.pending_deadline <= now
                    )
                )
                .mappings()
                .all()
            )
            for row in rows:
                _expire(conn, row, now)
            return len(rows)

        return await self.store.write(txn)


async def store_health(store: Store, timeout: float = 5.0) -> dict[str, Any]:
    """``{"ok": bool, "store": "ok"|reason}`` from a ``SELECT 1`` through ``store``."""
    with trio.move_on_after(timeout):
        try:
            await store.read(lambda conn: conn.execute(sa.text("SELECT 1")).scalar())
        except Exception as exc:  # any database failure means unhealthy, never a 500
            return {"ok": False, "store": f"unreachable ({type(exc).__name__})"}
        return {"ok": True, "store": "ok"}
    return {"ok": False, "store": "timeout"}
