"""The two phases of a push attestation: capabilities -> challenge, evidence -> accepted.

:func:`plan` decides what to ask an agent for (pure, from its enrolment row and its
capabilities): the quote's hash is the AK's scheme hash, the scheme the AK's, the PCRs those the
enrolment needs (``tpm_policy`` PCRs, PCR 10 with a runtime policy, the measured-boot PCRs with an
mb policy), the IMA log from the line the verifier has verified so far (0 after a reboot), the UEFI
log with an mb policy. What the agent cannot provide is a 422 and nothing is stored.

:class:`Attestations` keeps the per-agent rules of the cycle: 503 while the previous evidence is
being verified, 429 ``premature_attestation`` before ``quote_interval`` has passed since the
previous evidence, 403 for a failed agent (until the tenant reactivates it), 403
``evidence_immutable`` for evidence sent twice, 403 for a challenge that expired or an attestation
that is not the latest.
"""

from __future__ import annotations

import base64
import datetime
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Connection

from keytrio.actors.common.store import Store
from keytrio.actors.verifier import records
from keytrio.actors.verifier.push import store as pstore
from keytrio.actors.verifier.push.evalstate import Enrolment, EvalStates
from keytrio.protocol import pop, push_wire
from keytrio.protocol.errors import ProtocolError
from keytrio.protocol.push_wire import WireError

#: boot_time values closer than this are the same boot (the agent derives it from its uptime)
BOOT_TIME_SLACK = 60
FAILED_STATES = frozenset({records.FAILED, records.INVALID_QUOTE, records.TENANT_FAILED, records.TERMINATED})


def boot_epoch(value: str | None) -> int | None:
    """``system_info.boot_time`` (ISO 8601) as epoch seconds; None when absent or unreadable."""
    if not value:
        return None
    try:
        dt = datetime.datetime.fromisoformat(value)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.UTC)
    return int(dt.timestamp())


def plan(row: dict[str, Any], caps: push_wire.Capabilities, challenge_b64: str,
         enr: Enrolment | None = None) -> push_wire.Requested:
    """What to request from this agent (WireError 422 when it cannot provide it)."""
    enr = enr or Enrolment.of(row)
    ak = enr.ak
    q = caps.quote
    hash_alg = push_wire.choose_hash(ak.hash_alg, q.hash_algorithms, list(enr.hash_algs), q.available)
    if hash_alg is None:
        raise WireError(422, f"the quote must use {ak.hash_alg} (the AK's scheme hash): the agent must offer it "
                             "with a PCR bank, and the enrolment accept it")
    if ak.sign_alg not in q.signature_schemes or ak.sign_alg not in enr.sign_algs:
        raise WireError(422, f"the quote must be signed with {ak.sign_alg} (the AK's scheme)")
    pcrs = enr.pcrs
    missing = sorted(set(pcrs) - set(q.available.get(hash_alg, [])))
    if missing:
        raise WireError(422, f"the agent cannot quote the PCRs its policies need: {hash_alg} {missing}")
    logs: dict[str, int] = {}
    if enr.runtime:
        ima = caps.logs.get(push_wire.IMA_LOG)
        if ima is None:
            raise WireError(422, "the agent's runtime policy needs the ima_log")
        offset = int(row.get("next_ima_ml_entry") or 0)
        boot, stored = boot_epoch(caps.boot_time), row.get("boottime")
        if ima.entry_count < offset or (boot is not None and stored is not None
                                        and abs(boot - stored) > BOOT_TIME_SLACK):
            offset = 0  # a new boot: a new log
        if offset and not ima.supports_partial_access:
            offset = 0
        logs[push_wire.IMA_LOG] = offset
    if enr.mb is not None:
        if push_wire.UEFI_LOG not in caps.logs:
            raise WireError(422, "the agent's measured-boot policy needs the uefi_log")
        logs[push_wire.UEFI_LOG] = 0
    key = {"key_class": "asymmetric", "key_algorithm": ak.enc_alg,
           "key_size": ak.key.key_size, "server_identifier": "ak"}
    return push_wire.Requested(challenge_b64, hash_alg, ak.sign_alg, pcrs, logs, key)


@dataclass(frozen=True)
class CycleSettings:
    quote_interval: float = 2.0
    evidence_lifetime: float = 1800.0  # challenges_expire_at of an attestation
    history: int = 10  # attestations kept per agent


def retry_after(seconds: float) -> int:
    return max(1, math.ceil(seconds))


#: ``admit(conn)``: the agent's row once its token and enrolment hold, else the refusal (service.py)
Admit = Callable[[Connection], "dict[str, Any] | WireError"]


@dataclass(frozen=True)
class Accepted:
    """Evidence stored for verification: the agent's row and the attestation as that transaction
    read them, and the evidence as parsed (the verifier needs no second read or parse)."""

    row: dict[str, Any]
    res: dict[str, Any]
    evidence: push_wire.Evidence
    #: the check run in that transaction (verify.Settled; None: not checked there): for a pass
    #: ``res`` is the completed attestation, whose verdict that transaction wrote
    settled: Any = None


#: ``settle(conn, row, res, evidence, now)``, run in the evidence transaction before the evidence
#: is stored (verify.Verifier.settle): the check of a steady-state cycle (verify.Settled: a pass's
#: completed columns are stored with the evidence, then ``Settled.write`` writes the rest)
Settle = Callable[[Connection, dict[str, Any], dict[str, Any], push_wire.Evidence, float], Any]


class Attestations:
    """The two phases, each ONE transaction (token, enrolment, latest attestation, write): every
    check runs on what the database holds at that moment, and a refusal writes nothing."""

    def __init__(self, store: Store, settings: CycleSettings, clock: Callable[[], float],
                 states: EvalStates | None = None) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.states = states or EvalStates(None)
        self.settle: Settle | None = None

    async def create(self, admit: Admit, doc: object | WireError) -> dict[str, Any]:
        """Phase 1. Returns the stored attestation (with ``index``). ``doc`` is the request's JSON,
        or the refusal of an unreadable body (answered after the token and enrolment checks)."""
        now = self.clock()
        challenge = base64.b64encode(pop.new_challenge()).decode("ascii")
        settings = self.settings

        def txn(conn: Connection) -> dict[str, Any] | WireError:
            row = admit(conn)
            if isinstance(row, WireError):
                return row
            if isinstance(doc, WireError):
                return doc
            agent_id = row["agent_id"]
            if row["operational_state"] in FAILED_STATES:
                return WireError(403, "attestations are disabled for this agent (a previous failure or timeout): "
                                      "the tenant must reactivate it")
            last = pstore.latest_head_in(conn, agent_id)
            if last is not None and last["stage"] == pstore.EVALUATING:
                return WireError(503, "the previous attestation is still being verified", retry_after=1)
            if last is not None and last["evidence_received_at"] is not None:
                wait = last["evidence_received_at"] + settings.quote_interval - now
                if wait > 0:
                    return WireError(429, f"premature attestation: the next one is due in {wait:.3g} s",
                                     code="premature_attestation", retry_after=retry_after(wait))
            try:
                caps = push_wire.parse_capabilities(doc)
                req = plan(row, caps, challenge, self.states.enrolment(row))
            except WireError as exc:
                return exc
            except (ProtocolError, ValueError) as exc:
                return WireError(422, f"the enrolment cannot be attested: {exc}")
            values = {
                "agent_id": agent_id, "stage": pstore.AWAITING, "evaluation": pstore.PENDING,
                "challenge": challenge, "hash_alg": req.hash_alg,
                "evidence_requested": push_wire.evidence_requested(req), "capabilities": caps.supported,
                "system_info": caps.system_info, "capabilities_received_at": now,
                "challenges_expire_at": now + settings.evidence_lifetime,
            }
            index = pstore.insert_attestation(conn, values, last, history=settings.history)
            return {**values, "index": index, "failure_reason": None, "evidence": None,
                    "evidence_received_at": None, "verification_completed_at": None}

        # urgent: the agent waits for the 201 on its connection, so this waits at most the
        # store's urgent_linger, not the linger meant for the pull monitor's success records
        out = await self.store.write_grouped(txn, urgent=True)
        if isinstance(out, WireError):
            raise out
        return out

    async def submit(self, admit: Admit, which: str, doc: object | WireError) -> Accepted:
        """Phase 2: store the evidence of attestation ``which`` ("latest" or an index)."""
        now = self.clock()
        settle = self.settle

        def txn(conn: Connection) -> Accepted | WireError:
            row = admit(conn)
            if isinstance(row, WireError):
                return row
            if isinstance(doc, WireError):
                return doc
            agent_id = row["agent_id"]
            last = pstore.latest_in(conn, agent_id)
            if which == "latest":
                target = last
            else:
                try:
                    index = parse_index(which)
                except WireError as exc:
                    return exc
                target = pstore.attestation_in(conn, agent_id, index)
            if target is None:
                return WireError(404, "attestation not found")
            if last is not None and target["index"] != last["index"]:
                return WireError(403, "evidence can only be submitted for the latest attestation")
            if target["stage"] != pstore.AWAITING:
                return WireError(403, "evidence was already submitted for this attestation", code="evidence_immutable")
            if now > target["challenges_expire_at"]:
                return WireError(403, "the attestation's challenges have expired: start a new attestation")
            try:
                # parsed to refuse bad input before anything is stored; the verifier uses it as is
                ev = push_wire.parse_evidence(doc, target["evidence_requested"], target["hash_alg"])
            except WireError as exc:
                return exc
            collected = doc["data"]["attributes"]["evidence_collected"]  # type: ignore[index]
            res = {**target, "stage": pstore.EVALUATING, "evidence": collected, "evidence_received_at": now}
            # checked before it is stored, so that a pass stores evidence and verdict in one
            # statement; the stage condition of that statement still refuses evidence sent twice
            settled = settle(conn, row, res, ev, now) if settle is not None else None
            completed = settled.completed if settled is not None and settled.passed else None
            if not pstore.set_evidence(conn, agent_id, target["index"], collected, now, completed=completed):
                return WireError(403, "evidence was already submitted for this attestation", code="evidence_immutable")
            if completed is not None:
                settled.write(conn)
                res = {**res, **completed}  # the columns the statement wrote
            return Accepted(row, res, ev, settled)

        # urgent: the agent waits for the 202 on its connection (and its next cycle starts
        # after it): as for the capabilities above
        out = await self.store.write_grouped(txn, urgent=True)
        if isinstance(out, WireError):
            raise out
        return out


def parse_index(text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 12:
        raise WireError(404, "attestation not found")
    return int(text)


def evidence_items(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``evidence`` attribute: per requested item, the capabilities, parameters and data."""
    requested = res.get("evidence_requested") or []
    collected = res.get("evidence") or []
    caps = {(c.get("evidence_class"), c.get("evidence_type")): c.get("capabilities", {})
            for c in res.get("capabilities") or [] if isinstance(c, dict)}
    out = []
    for i, want in enumerate(requested):
        key = (want["evidence_class"], want["evidence_type"])
        item = {"evidence_class": key[0], "evidence_type": key[1], "capabilities": caps.get(key, {}),
                "chosen_parameters": want.get("chosen_parameters", {})}
        if i < len(collected) and isinstance(collected[i], dict):
            item["data"] = collected[i].get("data", {})
        out.append(item)
    return out
