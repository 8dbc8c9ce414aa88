"""What the agent's two modes (pull: actors/agent/actor.py, push: actors/agent/push.py) share: the
running agent's face (:class:`AgentInfo`, and :class:`AgentHost`, the part of the Agent a mode
fills in) and the first start-up steps (the data directory locked, the TPM opened).

A leaf below both modes, so push.py needs no import of actor.py (which starts it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import trio

from keytrio.actors.agent import config as agent_config
from keytrio.actors.agent import datadir
from keytrio.actors.agent.tpm import Tpm, TpmError
from keytrio.actors.common import startup
from keytrio.actors.common.startup import Exit, StartupError

if TYPE_CHECKING:
    from keytrio.actors.agent.push_loop import PushAttester
    from keytrio.actors.agent.quotes import AgentMetrics
    from keytrio.actors.common.config import Config


@dataclass(frozen=True)
class AgentInfo:
    """What a running agent exposes to its owner (tests, the testbed)."""

    agent_id: str
    address: tuple[str, int]
    nk_pem: str
    mtls_cert: str
    ek_public: bytes
    ek_cert_der: bytes | None
    ak_public: bytes
    hash_alg: str


class AgentHost(Protocol):
    """The attributes of :class:`actors.agent.actor.Agent` a mode reads and fills in while it runs."""

    config: Config
    metrics: AgentMetrics
    info: AgentInfo | None
    tpm: Tpm | None
    push: PushAttester | None


async def lock_data_dir(data_dir: Path) -> startup.DataDirLock:
    """The agent's data directory, created if needed and locked for this process."""
    try:
        await trio.to_thread.run_sync(datadir.ensure_dir, data_dir)
    except OSError as exc:
        raise StartupError(Exit.DATADIR, f"data_dir {data_dir}: {exc.strerror or exc}",
                           "create it writable for the agent's user or set data_dir") from exc
    return await startup.lock_data_dir(data_dir, agent_config.ACTOR)


async def open_tpm(cfg: Config) -> Tpm:
    """The TPM at ``tcti`` (owner password set when configured); exit code TPM when unreachable."""
    try:
        return await Tpm.open(cfg.tcti, owner_password=cfg.tpm_ownerpassword or None)
    except TpmError as exc:
        reason = str(exc.__cause__ or exc)
        raise StartupError(Exit.TPM, f"TPM unreachable at tcti {cfg.tcti!r}: {reason}",
                           "start the TPM (swtpm) or fix tcti; for /dev/tpmrm0 check the device exists "
                           "and the agent's user may open it (group tss)") from exc
