"""Register with the registrar and activate the AK (plain HTTP, as upstream's agent does).

POST /v2.1/agents/{id} {ek_tpm, ekcert, aik_tpm, mtls_cert, ip, port} -> results.blob (a
MakeCredential blob for our EK + AK name); TPM2_ActivateCredential recovers the credential;
PUT /v2.1/agents/{id}/activate {auth_tag = HMAC-SHA384(b64(credential), id)}.

Both steps are retried with backoff while the registrar is unreachable or answers 408/500/599;
any other error (400, 403: e.g. this id is registered with another TPM) ends the agent's start.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import trio

from keytrio.actors.agent.identity import Identity
from keytrio.actors.agent.tpm import Tpm, TpmError
from keytrio.actors.common import client as http
from keytrio.protocol import credential, validation
from keytrio.protocol.errors import ValidationError

log = logging.getLogger("keytrio.agent")

REGISTRAR_API = "2.1"


class RegistrationError(Exception):
    pass


@dataclass(frozen=True)
class Registration:
    registrar_ip: str
    registrar_port: int
    contact_ip: str | None  # None (with contact_port and mtls_cert): a push-mode agent, reached by no one
    contact_port: int | None
    mtls_cert: str | None
    retries: int
    interval: float
    exponential: bool
    timeout: float = 30.0
    #: observes ActivateCredential's latency (AgentMetrics.tpm_seconds.labels("activate_credential"))
    tpm_timer: Any = None

    def _url(self, agent_id: str, suffix: str = "") -> str:
        host = self.registrar_ip
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # IPv6 literal
        # ids may hold non-ASCII word characters (upstream's [\w.-]+): percent-encoded as UTF-8
        return f"http://{host}:{self.registrar_port}/v{REGISTRAR_API}/agents/{quote(agent_id, safe='')}{suffix}"

    async def run(self, tpm: Tpm, ident: Identity) -> None:
        body: dict[str, Any] = {
            "ek_tpm": base64.b64encode(ident.ek.public).decode("ascii"),
            "ekcert": base64.b64encode(ident.ek.cert_der).decode("ascii") if ident.ek.cert_der else None,
            "aik_tpm": base64.b64encode(ident.ak.public).decode("ascii"),
        }
        # a push agent sends no contact at all, as upstream's push agent
        contact = {"mtls_cert": self.mtls_cert, "ip": self.contact_ip, "port": self.contact_port}
        body.update({k: v for k, v in contact.items() if v is not None})

        def on_retry(attempt: int, exc: Exception, delay: float) -> None:
            log.warning("agent=%s event=registrar_retry attempt=%d delay=%.1fs error=%s",
                        ident.agent_id, attempt, delay, exc)

        async with http.make_client(None, timeout=self.timeout) as client:

            async def register() -> bytes:
                reply = await http.request_json(client, "POST", self._url(ident.agent_id), json=body)
                return validation.b64(reply.results.get("blob"), "blob", max_len=4096)

            async def activate(tag: str) -> None:
                await http.request_json(
                    client, "PUT", self._url(ident.agent_id, "/activate"), json={"auth_tag": tag}
                )

            try:
                blob = await http.retry(register, retries=self.retries, interval=self.interval,
                                        exponential=self.exponential, on_retry=on_retry)
                start = trio.current_time()
                try:
                    cred = await tpm.activate_credential(ident.ak, ident.ek, blob)
                finally:
                    if self.tpm_timer is not None:
                        self.tpm_timer.observe(trio.current_time() - start)
                tag = credential.activation_auth_tag(cred, ident.agent_id)
                await http.retry(lambda: activate(tag), retries=self.retries, interval=self.interval,
                                 exponential=self.exponential, on_retry=on_retry)
            except (http.ClientError, ValidationError, TpmError) as exc:
                raise RegistrationError(f"registration of {ident.agent_id} failed: {exc}") from exc
        log.info("agent=%s event=registered registrar=%s:%d", ident.agent_id, self.registrar_ip, self.registrar_port)
