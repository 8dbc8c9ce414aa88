"""POST notifications/revocation: verify the notice, run the actions once per notice.

The verifying cert is the payload's ``RevocationNotifier-cert.crt`` when a payload delivered one,
else the configured ``revocation_cert``. With a cert, an unsigned or badly signed notice is
refused (403). Without any cert the notice is accepted on the strength of the mTLS channel alone
(only holders of a server-components CA client cert can reach this endpoint), as upstream does
when no revocation key was enrolled, and a warning is logged.

Actions: every executable regular file of ``revocation_actions_dir`` (sorted by name), then the
entries of the payload's ``action_list`` (names relative to the unpacked payload, separated by
commas or whitespace). Each gets the notice's ``msg`` JSON text on stdin and runs in the
background (runner.py).

Duplicates: a notice's id is its ``notice_id`` (keytrio's verifier adds one) or else SHA-256 of
the ``msg`` text; ids are persisted in ``data_dir/revocation-seen.json`` (the newest
:data:`MAX_SEEN`), and a notice seen before is acknowledged without running anything.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import trio
from cryptography import x509

from keytrio.actors.agent import datadir
from keytrio.actors.agent.runner import Job, Runner
from keytrio.protocol import revocation, safejson
from keytrio.protocol.errors import ValidationError

log = logging.getLogger("keytrio.agent")

MAX_SEEN = 1000
PAYLOAD_CERT = "RevocationNotifier-cert.crt"
ACTION_LIST = "action_list"


class NoticeRefused(Exception):
    """403: unsigned or badly signed notice while a revocation cert is known."""


class Revocations:
    def __init__(
        self,
        *,
        agent_id: str,
        data_dir: Path,
        runner: Runner,
        actions_dir: Path | None,
        configured_cert: x509.Certificate | None,
    ) -> None:
        self.agent_id = agent_id
        self._seen_path = data_dir / datadir.SEEN_FILE
        self._runner = runner
        self._actions_dir = actions_dir
        self._configured_cert = configured_cert
        self._payload_cert: x509.Certificate | None = None
        self._payload_dir: Path | None = None
        self._payload_actions: list[str] = []
        self._seen: list[str] = []
        self._lock = trio.Lock()

    def load_seen(self) -> None:
        """Blocking: call in a thread at start."""
        value = datadir.read_json(self._seen_path)
        if isinstance(value, list):
            self._seen = [v for v in value if isinstance(v, str)][-MAX_SEEN:]

    @property
    def cert(self) -> x509.Certificate | None:
        return self._payload_cert or self._configured_cert

    def use_payload(self, unzipped: Path | None) -> None:
        """Adopt the revocation cert and action list of a newly unpacked payload."""
        self._payload_dir = unzipped
        self._payload_cert = None
        self._payload_actions = []
        if unzipped is None:
            return
        cert_path = unzipped / PAYLOAD_CERT
        if cert_path.is_file():
            try:
                self._payload_cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            except ValueError:
                log.warning("agent=%s event=bad_revocation_cert the payload's %s is not a PEM cert",
                            self.agent_id, PAYLOAD_CERT)
        list_path = unzipped / ACTION_LIST
        if list_path.is_file():
            text = list_path.read_text("utf-8", errors="replace")
            self._payload_actions = [n for n in text.replace(",", " ").split() if n]

    async def handle(self, body: dict[str, Any]) -> str:
        notice = revocation.parse_notice(body)
        cert = self.cert
        if cert is not None:
            try:
                msg = revocation.verify_notice(cert, notice.msg, notice.signature)
            except revocation.RevocationError as exc:
                log.warning("agent=%s event=revocation_refused reason=%s", self.agent_id, exc)
                raise NoticeRefused(f"Revocation notice refused: {exc}") from exc
        else:
            msg = _unsigned_message(notice.msg)
            log.warning("agent=%s event=revocation_unverified no revocation cert is known", self.agent_id)
        notice_id = msg.get("notice_id")
        if not isinstance(notice_id, str) or not notice_id:
            notice_id = hashlib.sha256(notice.msg.encode("utf-8")).hexdigest()
        async with self._lock:
            if notice_id in self._seen:
                log.info("agent=%s event=revocation_duplicate notice=%s", self.agent_id, notice_id)
                return "Revocation notice already handled"
            self._seen.append(notice_id)
            del self._seen[:-MAX_SEEN]
            # persisted before the actions start: a re-sent notice never runs them twice
            await trio.to_thread.run_sync(datadir.write_json, self._seen_path, list(self._seen))
        jobs = await trio.to_thread.run_sync(self._jobs, notice.msg.encode("utf-8"))
        log.info("agent=%s event=revocation notice=%s event_id=%s actions=%d",
                 self.agent_id, notice_id, msg.get("event_id"), len(jobs))
        self._runner.submit(jobs)
        return "Revocation notice accepted"

    def _jobs(self, stdin: bytes) -> list[Job]:
        jobs: list[Job] = []
        if self._actions_dir is not None and self._actions_dir.is_dir():
            for p in sorted(self._actions_dir.iterdir()):
                try:
                    st = p.stat()
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode) and os.access(p, os.X_OK):
                    jobs.append(Job([os.fspath(p)], self._actions_dir, stdin, label=f"action {p.name}"))
        base = self._payload_dir
        if base is not None:
            for name in self._payload_actions:
                path = _inside(base, name)
                if path is None:
                    log.warning("agent=%s event=bad_action name=%r", self.agent_id, name)
                    continue
                argv = [os.fspath(path)] if os.access(path, os.X_OK) else [shutil.which("bash") or "/bin/sh", os.fspath(path)]
                jobs.append(Job(argv, base, stdin, label=f"payload action {name}"))
        return jobs


def _inside(base: Path, name: str) -> Path | None:
    p = (base / name).resolve()
    try:
        p.relative_to(base.resolve())
    except ValueError:
        return None
    return p if p.is_file() else None


def _unsigned_message(msg: str) -> dict[str, Any]:
    try:
        parsed = safejson.loads(msg)
    except safejson.JsonError as exc:
        raise ValidationError("msg", "is not JSON") from exc
    if not isinstance(parsed, dict) or parsed.get("type") != revocation.MSG_TYPE:
        raise ValidationError("msg", "is not a revocation message")
    return parsed
