"""PoP sessions: challenge, proof (protocol.pop), bearer tokens stored hashed.

* ``POST /sessions`` -> a session with a 16-byte challenge valid ``challenge_lifetime`` seconds.
* ``PATCH /sessions/{id}`` -> the agent's TPM2_Certify over its AK with the challenge. Passed: a
  token ``"{session_id}.{secret}"`` (only its SHA-256 is stored) valid ``session_lifetime``
  seconds, extended by every passed attestation. An agent that is not enrolled (yet) gets 200 with
  ``evaluation: "fail"`` (it retries, as upstream's agent does); a wrong proof gets 401.
* :meth:`Sessions.authenticate` checks an ``Authorization`` header for one agent: missing -> 403
  (the "authentication required" signal upstream's agent waits for), malformed / unknown /
  expired -> 401, another agent's token -> 403. The attestation cycle runs the same check
  (:func:`parse_bearer`, then :func:`token_error` on the session row) inside its own transaction,
  so a token revoked or expired in the database, by this verifier or another one on it, is
  refused at once (nothing about tokens is cached in memory).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from keytrio.actors.common.store import Store
from keytrio.actors.verifier import records
from keytrio.actors.verifier.push import store as pstore
from keytrio.protocol import pop, push_wire
from keytrio.protocol.push_wire import WireError

log = logging.getLogger("keytrio.verifier")

_TOKEN = re.compile(r"^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\.([A-Za-z0-9_-]{16,128})$")
_SESSION_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
AUTH_REQUIRED = "Action {action} requires agent authentication (PoP token)"
SESSIONS_PER_AGENT = 4  # the agent's newest sessions kept (older ones, and expired ones, are deleted)
MAX_PENDING = 10_000  # unanswered challenges out at once (then 429: POST /sessions is public)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


@dataclass(frozen=True)
class SessionSettings:
    challenge_lifetime: float = 60.0
    session_lifetime: float = 180.0


class Sessions:
    def __init__(self, store: Store, settings: SessionSettings, clock: Callable[[], float]) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.max_pending = MAX_PENDING

    async def create(self, doc: object) -> dict[str, Any]:
        agent_id = push_wire.parse_session_request(doc)
        now = self.clock()
        sid = str(uuid.uuid4())
        challenge = base64.b64encode(pop.new_challenge()).decode("ascii")
        expires = now + self.settings.challenge_lifetime
        if not await pstore.add_session(self.store, {
            "session_id": sid, "agent_id": agent_id, "challenge": challenge, "created_at": now,
            "challenges_expire_at": expires,
        }, now=now, keep_per_agent=SESSIONS_PER_AGENT, max_pending=self.max_pending):
            raise WireError(429, "too many sessions are waiting for their proof: try again later",
                            retry_after=max(1, int(self.settings.challenge_lifetime)))
        return push_wire.session_document(sid, agent_id, challenge, now, expires)

    async def prove(self, session_id: str, doc: object) -> tuple[int, dict[str, Any]]:
        """(HTTP status, session document) for the proof in ``doc``."""
        if not _SESSION_ID.fullmatch(session_id):
            raise WireError(404, "session not found")
        proof = push_wire.parse_session_proof(doc)
        session = await pstore.get_session(self.store, session_id)
        if session is None:
            raise WireError(404, "session not found")
        if proof.agent_id != session["agent_id"]:
            raise WireError(400, "agent_id is not the session's agent")
        if session["response_received_at"] is not None:
            raise WireError(409, "the session was answered already: open a new one")
        now = self.clock()
        provided = {"message": base64.b64encode(proof.message).decode("ascii"),
                    "signature": base64.b64encode(proof.signature).decode("ascii")}

        def answer(evaluation: str, **extra: Any) -> dict[str, Any]:
            return push_wire.session_document(
                session_id, session["agent_id"], session["challenge"], session["created_at"],
                session["challenges_expire_at"], evaluation=evaluation, response_received_at=now,
                provided=provided, **extra)

        if now > session["challenges_expire_at"]:
            await pstore.mark_answered(self.store, session_id, now)
            return 401, answer("fail")
        row = await records.get(self.store, session["agent_id"])
        if row is None:
            # not enrolled (yet): 200 "fail", the agent tries again later (upstream's behaviour)
            await pstore.mark_answered(self.store, session_id, now)
            return 200, answer("fail")
        try:
            pop.verify_pop(proof.message, proof.signature, ak_public=base64.b64decode(row["ak_tpm"]),
                           challenge=base64.b64decode(session["challenge"]))
        except pop.PopError as exc:
            log.warning("agent=%s event=push_pop_failed session=%s reason=%s", row["agent_id"], session_id,
                        exc.reason)
            await pstore.mark_answered(self.store, session_id, now)
            return 401, answer("fail")
        token = f"{session_id}.{secrets.token_urlsafe(32)}"
        expires = now + self.settings.session_lifetime
        if not await pstore.prove_session(self.store, session_id, token_hash=token_hash(token), now=now,
                                          expires_at=expires):
            raise WireError(409, "the session was answered already: open a new one")
        log.info("agent=%s event=push_session_authenticated session=%s", row["agent_id"], session_id)
        return 200, answer("pass", token=token, token_expires_at=expires)

    async def authenticate(self, authorization: str | None, agent_id: str, action: str) -> None:
        """Raise WireError unless ``authorization`` carries a valid token of ``agent_id``."""
        bearer = parse_bearer(authorization, action)
        session = await pstore.get_session(self.store, bearer.session_id)
        err = token_error(session, bearer, agent_id, action, self.clock())
        if err is not None:
            raise err


@dataclass(frozen=True)
class Bearer:
    """A well-formed bearer token (not yet checked against its session)."""

    session_id: str
    token: str


def parse_bearer(authorization: str | None, action: str) -> Bearer:
    """The token of an ``Authorization`` header: missing -> 403 (upstream's "authentication
    required" signal), malformed -> 401. Checked against the store by :func:`token_error`."""
    if not authorization:
        raise WireError(403, AUTH_REQUIRED.format(action=action))
    scheme, _, token = authorization.strip().partition(" ")
    m = _TOKEN.fullmatch(token.strip()) if scheme.lower() == "bearer" else None
    if m is None:
        raise WireError(401, "Invalid authentication token")
    return Bearer(m.group(1), token.strip())


def token_error(session: dict[str, Any] | None, bearer: Bearer, agent_id: str, action: str,
                now: float) -> WireError | None:
    """Why ``bearer`` does not authenticate ``agent_id`` (``session``: its stored row), or None.
    Unknown / wrong / expired -> 401, another agent's token -> 403."""
    if (session is None or session["token_hash"] is None
            or not hmac.compare_digest(session["token_hash"], token_hash(bearer.token))):
        return WireError(401, "Invalid authentication token")
    if session["token_expires_at"] is None or now > session["token_expires_at"]:
        return WireError(401, "Authentication token expired")
    if session["agent_id"] != agent_id:
        return WireError(403, f"Action {action} is not allowed for this agent's token")
    return None
