"""The push fleet's upstream side: bench.sim_push's agents against upstream Keylime 7.14.3 in push mode.

The same simulated machines (bench.sim_push.PushAgent: software AK, PoP session with a software
TPM2_Certify, capabilities, tpm2_quote-shaped evidence, the IMA tail asked for) dial in to
upstream's verifier started by tests/interop/upstream/up.sh with ``KL_VERIFIER_MODE=push`` (started
in pull mode, restarted in push mode: its ``/version`` answers 410 there). What upstream needs and
answers is shared/PUSH_MODEL_WIRE.md:

- the first ``register`` agents register with upstream's registrar in v2.x (its v3.0 routes answer
  500) with no contact, and activate (software ActivateCredential of its tpm2-tools blob); upstream's
  verifier never asks its registrar in push mode (the PoP is checked against the enrolled
  ``ak_tpm``), so the rest are enrolled only, as on keytrio's side;
- enrolment: the admin ``POST /v2.x/agents/{id}`` that ``keylime_tenant -c add --push-model`` sends
  (no address, no mTLS cert, no V), with the bench's named runtime policy uploaded first;
- the window: bench.sim_push.push_window, the CPU of upstream's whole verifier process group (its
  ``max_workers`` workers included, as the pull fleet measures it) over Σ ``attestation_count``
  deltas of the bulk GET; upstream increments it once an attestation's evidence passed
  (tpm_engine ``_process_results``), as keytrio does;
- afterwards every agent is deleted, so a larger N re-enrols the same ids on the same instance.

Upstream limits session creation to ``session_create_rate_limit_per_ip`` (50 a minute) per client
address; all simulated agents share 127.0.0.1, where a real fleet has one address per machine, so
the bench brings the instance up with that limit raised (``UP_ENV``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from bench import fleet, sim_push
from bench.http_load import _env_sh, pin_group
from bench.sim_agent import SimAgent

#: environment for up.sh that makes the push-mode instance the bench measures
UP_ENV = {"KL_VERIFIER_MODE": "push", "KEYLIME_VERIFIER_SESSION_CREATE_RATE_LIMIT_PER_IP": "100000",
          "KEYLIME_VERIFIER_SESSION_CREATE_RATE_LIMIT_PER_AGENT": "100000"}  # fmt: skip


class UpstreamPush:
    """One running up.sh DIR in push mode: its URLs, CA, verifier process group and interval."""

    def __init__(self, up_dir: Path) -> None:
        self.dir = up_dir
        self.env = _env_sh(up_dir)
        self.url = self.env["KL_VERIFIER_URL"]
        self.registrar = self.env["KL_REGISTRAR_URL"]
        self.ca = Path(self.env["KL_CA_DIR"])
        self.quote_interval = fleet._upstream_interval(up_dir)
        self.registered: set[str] = set()

    @property
    def pgid(self) -> int:
        return int((self.dir / "run" / "verifier.pid").read_text().strip())

    def pids(self) -> list[int]:
        return fleet.group_pids(self.pgid)

    def pin(self, cpu: int) -> list[int]:
        return pin_group(self.pgid, cpu)

    def admin(self, timeout: float = 120.0) -> httpx.AsyncClient:
        from keytrio.actors.common import tls

        ctx = tls.client_context([self.ca / "cacert.crt"], self.ca / "client-cert.crt", self.ca / "client-private.pem")
        return httpx.AsyncClient(verify=ctx, timeout=timeout)


async def upstream_push_side(up: UpstreamPush, sims: list[SimAgent], body: dict[str, Any], seconds: float,
                             register: int = 0) -> dict[str, Any]:
    """One window of ``sims`` against upstream's push verifier (see the module doc); -> the table row."""
    todo = [s for s in sims[:register] if s.agent_id not in up.registered]
    if todo:
        await sim_push.register(todo, up.registrar)
        up.registered.update(s.agent_id for s in todo)
    async with up.admin() as admin:
        await fleet._upload(admin, up.url, body)
        try:
            row = await sim_push.push_window(admin, up.url, up.ca / "cacert.crt", up.pids, sims, up.quote_interval,
                                             seconds, lean=False)  # fmt: skip
        finally:
            deleted = await fleet._delete_all(admin, up.url, [s.agent_id for s in sims], timeout=60 + 0.2 * len(sims))
    return {**row, "processes": len(up.pids()), "deleted_after": deleted}
