"""The monitor's IMA hook: per agent, protocol.ima_eval over only the new lines of each poll.

:class:`AgentIma` is the :class:`protocol.evidence.ImaHook` of one agent (protocol.evidence.verify
calls it with the list tail, its first entry number, the quoted PCRs and the bank). It resolves the agent's runtime policy in the shared
:class:`~actors.verifier.policies.PolicyStore` at every call (so a PUT of a named policy applies at
the next poll), keeps the :class:`~protocol.ima_eval.ImaProgress` (running PCR 10, line count,
boot identity, learned keys), logs ToMToU warnings (they are not failures then), and observes the
lines parsed per poll in the ``ima_lines_per_poll`` histogram (one per verifier, no agent label:
its memory does not grow with the fleet). A hook holds O(1) state besides the progress itself.

attest.py calls :meth:`AgentIma.for_boot` with the reply's boottime and the quote's resetCount
before each evaluation; the monitor stores :meth:`AgentIma.progress_json` with the poll's success
record, and :class:`ImaHooks` restores it from the row on (re)start.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import weakref
from collections.abc import Iterable
from typing import Any, Protocol

from prometheus_client import Histogram

from keytrio.protocol import safejson
from keytrio.protocol.errors import ProtocolError
from keytrio.protocol.failures import Failure, Severity
from keytrio.protocol.ima import IMA_PCR
from keytrio.protocol.ima_eval import PCR_MISMATCH, ImaProgress, evaluate_ima, nothing_new
from keytrio.protocol.runtime_policy import ImaKey, KeyTypeError, RuntimePolicy, parse_ima_key

log = logging.getLogger("keytrio.verifier")

POLICY_MISSING = "ima.policy_missing"  # the agent's runtime policy is not in the store (fail closed)


def parse_verification_keys(text: str | None) -> list[ImaKey]:
    """``ima_sign_verification_keys`` as enrolled: JSON list of PEM texts or base64 of PEM/DER.

    Raises ValueError naming the bad entry.
    """
    if not text:
        return []
    doc = safejson.loads(text) if isinstance(text, str) else text
    if isinstance(doc, str):
        doc = safejson.loads(doc) if doc.strip().startswith("[") else [doc]
    if not isinstance(doc, list):
        raise ValueError("ima_sign_verification_keys must be a JSON list of keys")
    out: list[ImaKey] = []
    for i, item in enumerate(doc):
        if not isinstance(item, str):
            raise ValueError(f"ima_sign_verification_keys[{i}]: must be a string")
        data = item.encode("ascii", "replace")
        if not item.lstrip().startswith("-----BEGIN"):
            try:
                data = base64.b64decode(item, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"ima_sign_verification_keys[{i}]: not PEM nor base64") from None
        try:
            key = parse_ima_key(data)
        except KeyTypeError as exc:
            raise ValueError(f"ima_sign_verification_keys[{i}]: {exc}") from None
        if key is None:
            raise ValueError(f"ima_sign_verification_keys[{i}]: not a certificate or public key")
        out.append(key)
    return out


class PolicySource(Protocol):
    def resolve(self, name: str | None, checksum: str | None) -> RuntimePolicy | None: ...


class FixedPolicy:
    """A PolicySource of exactly one policy (``/verify/evidence``: the policy comes with the request)."""

    def __init__(self, policy: RuntimePolicy) -> None:
        self.policy = policy

    def resolve(self, name: str | None, checksum: str | None) -> RuntimePolicy | None:
        return self.policy


class AgentIma:
    """The IMA hook of one agent (see module docstring)."""

    def __init__(
        self,
        agent_id: str,
        policies: PolicySource,
        name: str | None,
        checksum: str | None,
        *,
        progress: ImaProgress | None = None,
        ignore_tomtou_errors: bool = False,
        extra_keys: Iterable[ImaKey] = (),
        lines_per_poll: Histogram | None = None,
        check_unquoted: bool = False,
    ) -> None:
        self.agent_id = agent_id
        self.check_unquoted = check_unquoted  # /verify/evidence: judge lines the quote does not cover yet
        self.policies = policies
        self.name = name
        self.checksum = checksum
        self.progress = progress or ImaProgress()
        self.ignore_tomtou_errors = ignore_tomtou_errors
        self.extra_keys = list(extra_keys)
        self._lines_per_poll = lines_per_poll
        self.warnings: list[Failure] = []  # of the last poll

    def policy(self) -> RuntimePolicy | None:
        return self.policies.resolve(self.name, self.checksum)

    def for_boot(self, boottime: int | None, reset_count: int | None) -> None:
        before = self.progress.count
        self.progress = self.progress.for_boot(boottime, reset_count)
        if before and not self.progress.count:
            log.info("agent=%s event=ima_new_boot boottime=%s reset_count=%s", self.agent_id, boottime,
                     reset_count)

    def nothing_new(
        self, list_text: str | None, first_entry: int, boottime: int | None, reset_count: int | None,
        pcr10: bytes | None, bank: str,
    ) -> bool:
        """:meth:`for_boot` and the call for a poll with nothing new, when it is one: True when it
        took the poll (no failure; the next entry is ``progress.count``), False when it did nothing
        and the caller makes those two calls.

        A steady poll has no line, the same boot and PCR 10 unchanged; the general path would then
        build a new progress equal to the old one and set up an evaluation for an empty tail. Here
        the progress stays the same object (the monitor sees it unchanged by identity rather than
        by equality: it writes neither way), and the rest of the call's effects happen as there:
        the policy must still resolve, the poll is observed as 0 lines, the warnings are cleared.
        """
        if self.check_unquoted or not nothing_new(self.progress, list_text, first_entry, boottime, reset_count,
                                                  pcr10, bank):
            return False
        if self.policy() is None:
            return False  # the general path names the missing policy
        if self._lines_per_poll is not None:
            self._lines_per_poll.observe(0)
        self.warnings = []
        return True

    def progress_json(self) -> str:
        return json.dumps(self.progress.to_json(), sort_keys=True)

    def __call__(
        self, list_text: str | None, first_entry: int, pcrs: dict[int, bytes], bank: str
    ) -> tuple[list[Failure], int]:
        policy = self.policy()
        if policy is None:
            f = Failure(POLICY_MISSING, {"message": "runtime policy not found", "name": self.name,
                                         "checksum": self.checksum}, Severity.EMERGENCY)
            return [f], self.progress.count
        pcr10 = pcrs.get(IMA_PCR)
        if pcr10 is None:
            return [Failure(PCR_MISMATCH, {"message": "PCR 10 is not in the quote"}, Severity.EMERGENCY)], \
                self.progress.count
        res = evaluate_ima(
            list_text, first_entry, pcr10, bank, policy, self.progress,
            ignore_tomtou_errors=self.ignore_tomtou_errors,
            extra_verification_keys=self.extra_keys,
            quoted_pcrs=pcrs,
            check_unquoted=self.check_unquoted,
        )  # fmt: skip
        if self._lines_per_poll is not None:
            self._lines_per_poll.observe(res.lines_parsed)
        self.warnings = list(res.warnings)
        for w in res.warnings:
            log.warning("agent=%s event=%s severity=%s path=%s line=%s", self.agent_id, w.event_id,
                        w.severity.label, w.context.get("path"), w.context.get("line"))
        self.progress = res.progress
        return list(res.failures), res.progress.count


class ImaHooks:
    """``ima_check_for(row)`` of the MonitorSet: an AgentIma for agents with a runtime policy.

    ``hooks[agent_id]`` is the hook of a running monitor (its progress, for status and tests). It
    holds the hooks weakly: an entry goes when its monitor ends (agent failed, stopped, deleted),
    so the map never outgrows the monitors running.
    """

    def __init__(
        self, policies: PolicySource, *, ignore_tomtou_errors: bool = False, lines_per_poll: Histogram | None = None
    ) -> None:
        self.policies = policies
        self.ignore_tomtou_errors = ignore_tomtou_errors
        self.lines_per_poll = lines_per_poll
        self.hooks: weakref.WeakValueDictionary[str, AgentIma] = weakref.WeakValueDictionary()

    def __call__(self, row: dict[str, Any]) -> AgentIma | None:
        name = row.get("runtime_policy_name") or None
        checksum = row.get("runtime_policy_checksum") or None
        if not name and not checksum:
            self.hooks.pop(row["agent_id"], None)
            return None
        progress = None
        if row.get("ima_progress"):
            try:
                progress = ImaProgress.from_json(json.loads(row["ima_progress"]))
            except (ValueError, ProtocolError):
                log.warning("agent=%s event=bad_stored_ima_progress restarting at line 0", row["agent_id"])
        if progress is not None and progress.count != int(row.get("next_ima_ml_entry") or 0):
            progress = None  # inconsistent row (e.g. reactivated): start again at line 0
        hook = AgentIma(
            row["agent_id"], self.policies, name, checksum, progress=progress,
            ignore_tomtou_errors=self.ignore_tomtou_errors,
            extra_keys=parse_verification_keys(row.get("ima_sign_verification_keys")),
            lines_per_poll=self.lines_per_poll,
        )  # fmt: skip
        self.hooks[row["agent_id"]] = hook
        return hook
