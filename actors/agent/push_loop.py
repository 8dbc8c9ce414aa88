"""The push-mode attestation loop: PoP session, then capabilities -> quote -> evidence, forever.

One cycle: (a session first if there is no valid token) POST capabilities -> 201 with the
challenge, PCRs and logs requested -> quote + logs -> PATCH evidence -> 202 with
``seconds_to_next_attestation``, which is the wait before the next cycle.

Waiting rules, all on trio's clock:
* 429 and 503 carry ``Retry-After``: wait exactly that, then retry (no backoff step counted);
* no answer (refused, timeout, TLS, reset), 5xx, or an answer the agent cannot use: exponential
  backoff from ``backoff_initial_delay``, doubling up to ``backoff_max_delay``, never giving up;
  the first success resets it;
* a session refused because the agent is not enrolled yet (200, evaluation "fail"), or a proof
  refused (401): backoff, then a new session;
* 401/403 on an attestation route: the token is no longer good (expired, verifier restarted,
  agent re-enrolled): a new session at once, backoff if that happens again without a success;
* the token's lifetime (``token_expires_at`` by the verifier's clock) is renewed before it ends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import trio

from keytrio.actors.agent import push_messages as msg
from keytrio.actors.agent.push_client import Answer, Unreachable, VerifierClient
from keytrio.actors.agent.push_evidence import EvidenceSource
from keytrio.actors.agent.tpm import TpmError

log = logging.getLogger("keytrio.agent")

API = "/v3"
#: renew a token this long (or this share of its life, if less) before the verifier says it ends
RENEW_MARGIN = 10.0


class Backoff:
    """initial, 2*initial, 4*initial, ... capped at maximum; ``reset`` after a success."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial, self.maximum = initial, max(initial, maximum)
        self.failures = 0

    def next(self) -> float:
        delay = min(self.maximum, self.initial * 2 ** min(self.failures, 62))
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0


class _Wait(Exception):
    """End this cycle; ``delay`` None means: take a backoff step."""

    def __init__(self, why: str, delay: float | None = None, *, drop_token: bool = False) -> None:
        super().__init__(why)
        self.delay = delay
        self.drop_token = drop_token


@dataclass
class PushStats:
    """Counters the owner (tests, /health) can read; ``changed`` is set on every update."""

    sessions: int = 0  # tokens obtained
    accepted: int = 0  # evidence submissions answered 202
    failures: int = 0  # cycles that ended in a backoff step
    last_index: str | None = None
    last_error: str = ""


class PushAttester:
    def __init__(self, *, agent_id: str, client: VerifierClient, evidence: EvidenceSource,
                 interval: float, backoff: Backoff, clock: Callable[[], float] = trio.current_time) -> None:
        self.agent_id = agent_id
        self.client = client
        self.evidence = evidence
        self.interval = interval
        self.backoff = backoff
        self.clock = clock
        self.stats = PushStats()
        self._token: str | None = None
        self._token_until = 0.0
        self._changed = trio.Event()
        self._fresh_session_failed = False

    # -- observing (tests) --------------------------------------------------------------------------

    def _touch(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    @property
    def token(self) -> str | None:
        """The PoP bearer token in use (None before the first session or after a refusal)."""
        return self._token

    async def wait_for(self, pred: Callable[[PushStats], bool]) -> PushStats:
        while not pred(self.stats):
            await self._changed.wait()
        return self.stats

    # -- the loop -----------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            while True:
                delay = await self._cycle_or_wait()
                await trio.sleep(delay)
        finally:
            with trio.CancelScope(shield=True):
                await self.client.aclose()

    async def _cycle_or_wait(self) -> float:
        try:
            delay = await self._cycle()
        except _Wait as w:
            if w.drop_token:
                self._token = None
            if w.delay is not None:
                log.info("agent=%s event=push_wait seconds=%.1f reason=%s", self.agent_id, w.delay, w)
                return w.delay
            delay = self.backoff.next()
            self.stats.failures += 1
            self.stats.last_error = str(w)
            log.warning("agent=%s event=push_retry delay=%.1fs attempt=%d error=%s", self.agent_id, delay,
                        self.backoff.failures, w)
            self._touch()
            return delay
        self.backoff.reset()
        return delay

    async def _call(self, method: str, path: str, body: Any = None, *, token: str | None = None) -> Answer:
        try:
            return await self.client.call(method, path, body, token=token)
        except Unreachable as exc:
            raise _Wait(f"verifier unreachable: {exc}") from exc

    @staticmethod
    def _throttled(answer: Answer, what: str) -> None:
        if answer.status in (429, 503):
            # without a usable Retry-After, the backoff decides
            raise _Wait(f"{what}: HTTP {answer.status} {answer.detail()}".strip(), answer.retry_after)

    async def _cycle(self) -> float:
        token = await self._session()
        agent = quote(self.agent_id, safe="")
        caps = msg.capabilities_request(await self.evidence.capabilities())
        answer = await self._call("POST", f"{API}/agents/{agent}/attestations", caps, token=token)
        self._auth_refused(answer, "capabilities")
        self._throttled(answer, "capabilities")
        if answer.status != 201:
            raise _Wait(f"capabilities: HTTP {answer.status} {answer.detail()}".strip())
        try:
            requested = msg.parse_requested(answer.doc, answer.location)
        except msg.WireError as exc:
            raise _Wait(f"capabilities answer unusable: {exc}") from exc
        try:
            collected = await self.evidence.collect(requested)
        except (TpmError, OSError, ValueError) as exc:
            raise _Wait(f"evidence could not be collected: {exc}") from exc
        target = requested.index or "latest"
        answer = await self._call("PATCH", f"{API}/agents/{agent}/attestations/{target}",
                                  msg.evidence_request(requested, collected), token=token)
        self._auth_refused(answer, "evidence")
        self._throttled(answer, "evidence")
        if answer.status != 202:
            raise _Wait(f"evidence: HTTP {answer.status} {answer.detail()}".strip())
        self._fresh_session_failed = False
        self.stats.accepted += 1
        self.stats.last_index = requested.index
        self._touch()
        wait = msg.seconds_to_next(answer.doc)
        log.info("agent=%s event=evidence_accepted index=%s next_in=%.1fs", self.agent_id, requested.index,
                 self.interval if wait is None else wait)
        return self.interval if wait is None else wait

    def _auth_refused(self, answer: Answer, what: str) -> None:
        if answer.status not in (401, 403):
            return
        why = f"{what}: HTTP {answer.status} {answer.detail()}".strip()
        if self._fresh_session_failed:
            # a token just obtained is refused too: not a stale token, so back off
            raise _Wait(why, drop_token=True)
        self._fresh_session_failed = True
        raise _Wait(why, 0.0, drop_token=True)

    # -- PoP session ----------------------------------------------------------------------------

    async def _session(self) -> str:
        if self._token is not None and self.clock() < self._token_until:
            return self._token
        self._token = None
        answer = await self._call("POST", f"{API}/sessions", msg.session_request(self.agent_id))
        self._throttled(answer, "session")
        if answer.status not in (200, 201):
            raise _Wait(f"session: HTTP {answer.status} {answer.detail()}".strip())
        try:
            challenge = msg.parse_session(answer.doc)
        except msg.WireError as exc:
            raise _Wait(f"session answer unusable: {exc}") from exc
        try:
            proof = await self.evidence.certify(challenge.challenge)
        except TpmError as exc:
            raise _Wait(f"TPM2_Certify failed: {exc}") from exc
        answer = await self._call("PATCH", f"{API}/sessions/{quote(challenge.session_id, safe='')}",
                                  msg.proof_request(self.agent_id, challenge.session_id, proof.attest,
                                                    proof.signature))
        self._throttled(answer, "proof")
        if answer.status == 401:
            raise _Wait("proof of possession refused (HTTP 401): is this the AK the registrar holds?")
        if answer.status != 200:
            raise _Wait(f"proof: HTTP {answer.status} {answer.detail()}".strip())
        try:
            result = msg.parse_proof(answer.doc)
        except msg.WireError as exc:
            raise _Wait(f"proof answer unusable: {exc}") from exc
        if not result.passed or result.token is None:
            raise _Wait("session refused (evaluation fail): not enrolled with the verifier yet?")
        now = self.clock()
        if result.lifetime is None:
            self._token_until = float("inf")  # renewed when refused
        else:
            self._token_until = now + max(result.lifetime - min(RENEW_MARGIN, result.lifetime / 4), 0.0)
        self._token = result.token
        self.stats.sessions += 1
        self._touch()
        log.info("agent=%s event=session_opened session=%s lifetime=%s", self.agent_id, challenge.session_id,
                 "unknown" if result.lifetime is None else f"{result.lifetime:.0f}s")
        return result.token
