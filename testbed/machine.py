"""A simulated machine: its own swtpm, a boot that really extends PCRs 0-7, an IMA log, an agent.

Lifecycle (structured): ``await nursery.start(machine.run)`` provisions and starts the TPM,
boots (boot event log + boot_aggregate), starts the agent and returns once it serves; cancelling
``run`` stops the agent and the TPM cleanly. Operations while it runs: :meth:`measure`,
:meth:`extend`, :meth:`stop_agent` / :meth:`start_agent`, :meth:`reboot`.

Boot: ``Machine(..., boot=None)`` boots the minimal UEFI log (one separator per PCR 0-7);
``boot=BootConfig()`` (testbed/boot_log.py) boots the rich OVMF + shim + grub + Linux log from
the first boot on, a tampered config (``BootConfig().tampered(knob)``) a boot a measured-boot
policy must refuse. ``reboot(boot=...)`` switches the configuration for that and later boots.

swtpm serves one client connection at a time, so while the agent runs every extend goes
through the agent's own TPM handle; while it is stopped the machine opens the TPM itself.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from pathlib import Path
from types import EllipsisType
from typing import Any

import trio

from keytrio.actors.agent.actor import Agent
from keytrio.actors.agent.lifecycle import AgentInfo
from keytrio.actors.agent.tpm import Tpm
from keytrio.testbed import boot_log
from keytrio.testbed.ima_log import FILE_NAME, ImaLog
from keytrio.testbed.nat import Nat
from keytrio.testbed.netproxy import Mode, NetProxy
from keytrio.testbed.pki import CaFiles
from keytrio.testbed.swtpm import Swtpm, swtpm_running

#: First boot time of every machine (epoch seconds); each reboot adds a deterministic amount.
BASE_BOOTTIME = 1_767_225_600


class Machine:
    def __init__(
        self,
        name: str,
        root: Path,
        ca: CaFiles,
        *,
        registrar: tuple[str, int] | None = None,
        verifier: tuple[str, int] | None = None,
        banks: Sequence[str] = ("sha1", "sha256"),
        seed: int = 0,
        swtpm_ca_dir: Path | None = None,
        proxy: bool = False,
        behind_nat: bool = False,
        boot: boot_log.BootConfig | None = None,
        **agent_options: Any,
    ) -> None:
        self.name = name
        self.dir = Path(root) / name
        self.ca = ca
        self.registrar = registrar
        self.verifier = verifier  # a push agent's (``mode="push"``) verifier: its verifier_url
        self.banks = tuple(banks)
        self.rng = random.Random(f"{seed}:{name}")
        self.swtpm_ca_dir = swtpm_ca_dir
        self.agent_options = agent_options
        self.boot = boot  # the UEFI boot every (re)boot replays; None: the minimal log
        # With a proxy, peers learn the proxy's port as the agent's contact port, so the
        # testbed can cut the machine's network (refuse / blackhole) and restore it.
        self.proxy: NetProxy | None = NetProxy() if proxy and not behind_nat else None
        # Behind a NAT (testbed/nat.py) the agent dials out through the gateway and its contact
        # address is the gateway's, which refuses every inbound connection (replaces the proxy).
        self.nat: Nat | None = Nat() if behind_nat else None
        self._registrar_route: tuple[str, int] | None = None
        self._verifier_route: tuple[str, int] | None = None
        self.boots = 0
        self.swtpm: Swtpm | None = None
        self.agent: Agent | None = None
        self.info: AgentInfo | None = None
        self.ima: ImaLog | None = None
        self._port = int(agent_options.pop("port", 0))
        self._nursery: trio.Nursery | None = None
        self._agent_scope: trio.CancelScope | None = None
        self._agent_done: trio.Event | None = None
        self._boot_tpm: Tpm | None = None  # the TPM handle used while booting (no agent yet)

    # -- paths ----------------------------------------------------------------------------------

    @property
    def ima_path(self) -> Path:
        return self.dir / FILE_NAME

    @property
    def boot_log_path(self) -> Path:
        return self.dir / "binary_bios_measurements"

    @property
    def boottime_path(self) -> Path:
        return self.dir / "boottime"

    @property
    def actions_dir(self) -> Path:
        return self.dir / "revocation-actions"

    @property
    def address(self) -> tuple[str, int]:
        if self.info is None:
            raise RuntimeError(f"machine {self.name}: agent not running")
        return self.info.address

    @property
    def is_push(self) -> bool:
        """A push-mode agent (API v3.0): it dials the verifier, listens on no port."""
        return self.agent_options.get("mode") == "push"

    @property
    def agent_id(self) -> str:
        if self.info is None:
            raise RuntimeError(f"machine {self.name}: agent never started")
        return self.info.agent_id

    # -- lifecycle ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Machine] = trio.TASK_STATUS_IGNORED) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        async with swtpm_running(self.dir / "tpm", banks=self.banks, ca_dir=self.swtpm_ca_dir) as sw:
            self.swtpm = sw
            try:
                await self._boot()
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    if self.proxy is not None:
                        await nursery.start(self.proxy.run)
                    if self.nat is not None:
                        await nursery.start(self.nat.run)
                        if self.registrar is not None:
                            self._registrar_route = await self.nat.route(self.registrar)
                        if self.verifier is not None:
                            self._verifier_route = await self.nat.route(self.verifier)
                    await self.start_agent()
                    task_status.started(self)
                    await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    await self.stop_agent()
                self._nursery = None

    async def _boot(self) -> None:
        """Extend PCRs 0-7 from the boot log, start a fresh IMA log, set a new boot time."""
        self.boots += 1
        self.boottime_path.write_text(f"{BASE_BOOTTIME + 1000 * self.boots + self.rng.randrange(100)}\n")
        self.boot_log_path.write_bytes(boot_log.build(self.banks, self.boot))
        assert self.swtpm is not None
        async with await Tpm.open(self.swtpm.tcti) as tpm:
            for pcr, digests in boot_log.events(self.banks, self.boot):
                await tpm.extend(pcr, digests)
            boot_pcrs = {b: await tpm.read_pcrs(b, range(10)) for b in self.banks}
            self.ima = ImaLog(self.ima_path, self.extend, self.banks)
            self._boot_tpm = tpm
            try:
                await self.ima.boot_aggregate(boot_pcrs)
            finally:
                self._boot_tpm = None

    def _agent_config(self) -> dict[str, Any]:
        self.actions_dir.mkdir(parents=True, exist_ok=True)
        opts: dict[str, Any] = {
            "tcti": self.swtpm.tcti if self.swtpm else "",
            "ip": "127.0.0.1",
            "port": self._port,
            "metrics_port": 0,  # many agents per host: never the fixed default
            "data_dir": str(self.dir / "agent-data"),
            "trusted_client_ca": [str(self.ca.ca)],
            "boottime_source": str(self.boottime_path),
            "ima_ml_path": str(self.ima_path),
            "measuredboot_ml_path": str(self.boot_log_path),
            "revocation_actions_dir": str(self.actions_dir),
            "secure_mount": "never",
            "tpm_hash_alg": "sha256",
        }
        if self.registrar is not None:
            opts["registrar_ip"], opts["registrar_port"] = self._registrar_route or self.registrar
        if self.proxy is not None:
            opts["contact_ip"], opts["contact_port"] = "127.0.0.1", self.proxy.port
        if self.nat is not None:
            opts["contact_ip"], opts["contact_port"] = self.nat.public_address
        if self.is_push and self.verifier is not None:
            # a push agent dials the verifier (through the NAT when behind one) and is dialled by nobody
            opts.pop("contact_ip", None)
            opts.pop("contact_port", None)
            opts["verifier_url"] = "https://{}:{}".format(*(self._verifier_route or self.verifier))
            opts["verifier_tls_ca_cert"] = str(self.ca.ca)
            opts["backoff_initial_delay"], opts["backoff_max_delay"] = 0.1, 1.0  # testbed pace
        opts.update(self.agent_options)
        return opts

    async def start_agent(self) -> AgentInfo:
        """Start the agent (it binds PCR 16 and registers); keeps the port across restarts."""
        if self._nursery is None:
            raise RuntimeError(f"machine {self.name} is not running")
        if self._agent_scope is not None:
            raise RuntimeError(f"machine {self.name}: agent already running")
        agent = Agent.from_options(**self._agent_config())
        scope, done = trio.CancelScope(), trio.Event()

        async def run_agent(task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with scope:
                    await agent.run(task_status=task_status)
            finally:
                done.set()

        self._agent_scope, self._agent_done = scope, done
        try:
            _host, port = await self._nursery.start(run_agent)
        except BaseException:
            self._agent_scope = self._agent_done = None
            raise
        self._port = port
        if self.proxy is not None:
            self.proxy.target = ("127.0.0.1", port)
        self.agent, self.info = agent, agent.info
        return agent.info  # type: ignore[return-value]

    async def stop_agent(self) -> None:
        """Stop the agent process (its TPM connection closes); the machine keeps running."""
        scope, done = self._agent_scope, self._agent_done
        if scope is None or done is None:
            return
        scope.cancel()
        await done.wait()
        self._agent_scope = self._agent_done = None
        self.agent = None

    def cut_network(self, mode: Mode = "refuse") -> None:
        """Peers can no longer reach the agent: connections refused, or never answered.
        Behind a NAT: the machine's uplink is cut (its outbound connections fail)."""
        if self.nat is not None:
            self.nat.set_mode(mode)
            return
        if self.proxy is None:
            raise RuntimeError(f"machine {self.name} has no proxy (Machine(..., proxy=True))")
        self.proxy.set_mode(mode)

    def restore_network(self) -> None:
        if self.nat is not None:
            self.nat.set_mode("pass")
        if self.proxy is not None:
            self.proxy.set_mode("pass")

    async def outbound(self, target: tuple[str, int]) -> tuple[str, int]:
        """The address this machine's software must dial to reach ``target`` (e.g. a push agent's
        verifier): the NAT's route to it when behind one, else ``target`` itself."""
        if self.nat is None:
            return target
        return await self.nat.route(target)

    @property
    def contact(self) -> tuple[str, int]:
        """The address peers use: the NAT's public one (refused) or the proxy's when there is
        one, else the agent's."""
        if self.nat is not None:
            return self.nat.public_address
        if self.proxy is not None:
            return ("127.0.0.1", self.proxy.port)
        return self.address

    @property
    def agent_running(self) -> bool:
        return self._agent_scope is not None

    async def reboot(self, boot: boot_log.BootConfig | EllipsisType | None = ...) -> None:
        """Agent down, TPM2_Shutdown + restart (PCRs reset, resetCount + 1), boot again, agent up.

        ``boot``: the UEFI boot to replay from now on (None: the minimal log); omitted: the same."""
        if not isinstance(boot, EllipsisType):
            self.boot = boot
        await self.stop_agent()
        assert self.swtpm is not None
        await self.swtpm.restart()
        await self._boot()
        await self.start_agent()

    # -- measurements ---------------------------------------------------------------------------

    async def extend(self, pcr: int, digests: dict[str, bytes]) -> None:
        if self._boot_tpm is not None:
            await self._boot_tpm.extend(pcr, digests)
        elif self.agent is not None and self.agent.tpm is not None:
            await self.agent.tpm.extend(pcr, digests)
        else:
            assert self.swtpm is not None
            async with await Tpm.open(self.swtpm.tcti) as tpm:
                await tpm.extend(pcr, digests)

    async def extend_data(self, pcr: int, data: bytes) -> None:
        """Extend ``pcr`` in every bank with H_bank(data) (e.g. to change a policy PCR)."""
        await self.extend(pcr, {b: hashlib.new(b, data).digest() for b in self.banks})

    async def measure(self, path: str, content: bytes | None = None) -> bytes:
        """Record a file measurement in the IMA log (then PCR 10); returns the content measured."""
        if self.ima is None:
            raise RuntimeError("not booted")
        if content is None:
            content = self.rng.randbytes(64)
        await self.ima.measure(path, content)
        return content

    async def read_pcrs(self, bank: str, pcrs: Sequence[int]) -> dict[int, bytes]:
        if self.agent is not None and self.agent.tpm is not None:
            return await self.agent.tpm.read_pcrs(bank, pcrs)
        assert self.swtpm is not None
        async with await Tpm.open(self.swtpm.tcti) as tpm:
            return await tpm.read_pcrs(bank, pcrs)
