"""U/V key halves, K, and the payload (POST keys/ukey, keys/vkey; GET keys/verify).

Halves arrive in either order and may be re-sent (a re-enrolment sends a new U and a new V).
Like upstream's agent we keep a few pending halves of each kind and, whenever one arrives, try
every pairing with the other kind: the pair whose K = U xor V reproduces the U's auth_tag
(HMAC-SHA384(K, agent id)) is the one. Nothing is decrypted before the tag matched. Then the
payload (if any) is decrypted under K and stored; only if that succeeds do K and the payload
take effect and autorun.sh is started. A half that does not decrypt under the NK, or a payload
that does not authenticate or unpack safely, is answered 400 and changes nothing.

A U whose tag matches no pending V is kept (its V may still come); it never runs anything.
"""

from __future__ import annotations

import hmac
import logging
import shutil
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio
from cryptography.hazmat.primitives.asymmetric import rsa

from keytrio.actors.agent.runner import Job, Runner
from keytrio.actors.agent.secure import SecureDir, UnsafeArchive
from keytrio.protocol import payload as pl
from keytrio.protocol import validation
from keytrio.protocol.wire import UKey, VKey

log = logging.getLogger("keytrio.agent")

MAX_PENDING = 4  # pending halves kept per kind (oldest dropped first)


@dataclass(frozen=True)
class _U:
    u: bytes
    auth_tag: str
    payload: bytes | None


class KeyError400(Exception):
    """A request the agent refuses with 400 (message safe to show: no key material)."""


class Keys:
    def __init__(
        self,
        *,
        agent_id: str,
        nk_private: rsa.RSAPrivateKey,
        secure_dir: SecureDir,
        runner: Runner,
        enable_autorun: bool,
        on_payload: Callable[[Path | None], None],
    ) -> None:
        self.agent_id = agent_id
        self._nk = nk_private
        self._secure = secure_dir
        self._runner = runner
        self._autorun = enable_autorun
        self._on_payload = on_payload
        self._pending_u: deque[_U] = deque(maxlen=MAX_PENDING)
        self._pending_v: deque[bytes] = deque(maxlen=MAX_PENDING)
        self._k: bytes | None = None
        self._lock = trio.Lock()

    @property
    def has_k(self) -> bool:
        return self._k is not None

    # -- requests ---------------------------------------------------------------------------

    async def post_ukey(self, body: dict[str, object]) -> str:
        half = UKey.decode(body)
        u = await self._decrypt_half(half.encrypted_key)
        async with self._lock:
            new = _U(u, half.auth_tag, half.payload)
            for v in list(self._pending_v):
                k = pl.combine(u, v)
                if pl.check_auth_tag(k, self.agent_id, new.auth_tag):
                    await self._complete(k, new)
                    return "K derived"
            self._pending_u.append(new)
        log.info("agent=%s event=ukey_stored", self.agent_id)
        return "U stored"

    async def post_vkey(self, body: dict[str, object]) -> str:
        v = await self._decrypt_half(VKey.decode(body).encrypted_key)
        async with self._lock:
            for cand in list(self._pending_u):
                k = pl.combine(cand.u, v)
                if pl.check_auth_tag(k, self.agent_id, cand.auth_tag):
                    try:
                        await self._complete(k, cand)
                    except KeyError400:
                        # that U's payload is bad and can never succeed: drop it, keep V
                        self._pending_u.remove(cand)
                        self._pending_v.append(v)
                        raise
                    return "K derived"
            self._pending_v.append(v)
        log.info("agent=%s event=vkey_stored", self.agent_id)
        return "V stored"

    def verify(self, challenge: object) -> str:
        if self._k is None:
            raise KeyError400("Bootstrap key not yet available.")
        challenge = validation.nonce(challenge, "challenge")
        return pl.verify_hmac(self._k, challenge)

    # -- internals --------------------------------------------------------------------------

    async def _decrypt_half(self, encrypted_key: str) -> bytes:
        try:
            return await trio.to_thread.run_sync(pl.decrypt_key_half, self._nk, encrypted_key)
        except pl.PayloadError as exc:
            raise KeyError400("encrypted_key does not decrypt under this agent's NK") from exc

    async def _complete(self, k: bytes, u: _U) -> None:
        """K matched ``u``'s auth tag: decrypt and store the payload, then make K current."""
        if self._k is not None and hmac.compare_digest(self._k, k):
            # the same pair delivered again: K is current, the payload already handled
            self._pending_u.clear()
            self._pending_v.clear()
            return
        unzipped: Path | None = None
        if u.payload is not None:
            try:
                plaintext = pl.decrypt_payload(k, u.payload)
            except pl.PayloadError as exc:
                raise KeyError400("payload does not decrypt under the derived key") from exc
            try:
                unzipped = await trio.to_thread.run_sync(self._secure.store, plaintext)
            except UnsafeArchive as exc:
                raise KeyError400(f"payload refused: {exc}") from exc
            del plaintext
        self._k = k
        self._pending_u.clear()
        self._pending_v.clear()
        log.info("agent=%s event=key_derived payload=%s", self.agent_id, u.payload is not None)
        self._on_payload(unzipped)
        if unzipped is not None and self._autorun:
            script = unzipped / "autorun.sh"
            if script.is_file():
                shell = shutil.which("bash") or "/bin/sh"
                self._runner.submit([Job([shell, "autorun.sh"], unzipped, label="autorun.sh")])
