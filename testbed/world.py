"""The Testbed: one CA, a registrar, a verifier and N simulated machines in one parent nursery.

    async with Testbed(tmp, machines=3, seed=1) as tb:
        await tb.enrol(tb.machines[0])                      # tenant add (revocation pair of the CA)
        await tb.wait_state(tb.machines[0], GET_QUOTE)      # polls the verifier's GET
        await tb.machines[0].extend_data(15, b"tamper")
        await tb.wait_state(tb.machines[0], INVALID_QUOTE)  # on timeout: raises with what was seen

Layout of ``dir``: ``cv_ca/`` (upstream file names, see testbed/pki.py), ``swtpm-localca/`` (one
EK-cert CA for every TPM), ``registrar/``, ``verifier/`` (SQLite), ``machines/<name>/``, and for
the ``keytrio tenant`` command line ``tenant.toml`` (registrar and verifier addresses, ``tls_dir``
= ``cv_ca/``, EK check on) with ``ek-trust-store/`` (the swtpm EK CA chain: intermediate and root).
Every machine runs behind a TCP proxy (so its network can be cut), or with ``behind_nat=True``
(``add_machines(1, behind_nat=True)`` or ``machine_options``) behind a NAT gateway
(testbed/nat.py): it dials out, nothing dials in. A machine with ``mode="push"`` runs a push agent
(API v3.0) whose verifier_url is the testbed's verifier (through its NAT when behind one); enrol it
with :meth:`Testbed.enrol_push` on a verifier serving push (``verifier_options={"mode": "both"}``)
and read its history with :meth:`Testbed.push_attestations`. Every machine trusts the CA's
RevocationNotifier cert (only notices signed with that key run its actions) and has a recording
action that writes each accepted notice to ``machines/<name>/notices/``. What the waits and the
notices show goes to :attr:`Testbed.observer`.

Determinism: agent ids and machine contents come from ``seed``; nonces and keys stay random.
"""

from __future__ import annotations

import json
import random
import shlex
import uuid
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

import trio

from keytrio.actors.common import startup
from keytrio.actors.registrar.actor import Registrar, RegistrarAddresses
from keytrio.actors.registrar.config import load_config as registrar_config
from keytrio.actors.tenant import Tenant, push
from keytrio.actors.tenant.add import AddRequest, AddResult
from keytrio.actors.verifier.actor import Verifier
from keytrio.actors.verifier.config import load_config as verifier_config
from keytrio.testbed.machine import Machine
from keytrio.testbed.observe import Observer, state_name
from keytrio.testbed.pki import CaFiles, make_cv_ca
from keytrio.testbed.swtpm_state import init_local_ca, local_ca_certs

GET_QUOTE, FAILED, INVALID_QUOTE, TENANT_FAILED = 3, 7, 9, 10
TENANT_CONFIG, EK_TRUST_STORE = "tenant.toml", "ek-trust-store"
POLL = 0.05  # seconds between two verifier GETs of a wait

RECORDER = """#!/bin/sh
# keytrio testbed: record each revocation notice the agent accepted (its msg arrives on stdin)
f=$(mktemp "{dir}/n.XXXXXX")
cat > "$f"
mv "$f" "$f.json"
"""


class WaitTimeout(AssertionError):
    """A wait ran out of time; the message names what was seen meanwhile."""


def machine_uuid(seed: int, name: str) -> str:
    return str(uuid.UUID(int=random.Random(f"{seed}:uuid:{name}").getrandbits(128), version=4))


class Testbed:
    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self,
        dir: Path,
        *,
        machines: int = 1,
        seed: int = 0,
        quote_interval: float = 0.2,
        retry_interval: float = 0.1,
        max_retries: int = 3,
        request_timeout: float = 2.0,
        observer: Observer | None = None,
        machine_options: dict[str, Any] | None = None,
        verifier_options: dict[str, Any] | None = None,
        registrar_options: dict[str, Any] | None = None,
    ) -> None:
        self.dir = Path(dir).resolve()
        self.count = machines
        self.seed = seed
        self.observer = observer or Observer()
        self.verifier_overrides: dict[str, Any] = {
            "quote_interval": quote_interval,
            "retry_interval": retry_interval,
            "max_retries": max_retries,
            "request_timeout": request_timeout,
            **(verifier_options or {}),
        }
        self.machine_options = dict(machine_options or {})
        self.registrar_options = dict(registrar_options or {})
        self.ca: CaFiles | None = None
        self.registrar: Registrar | None = None
        self.registrar_addresses: RegistrarAddresses | None = None
        self.verifier: Verifier | None = None
        self.verifier_address: tuple[str, int] | None = None
        self.machines: list[Machine] = []
        self.tenant: Tenant | None = None
        self._nursery: trio.Nursery | None = None
        self._stack: AsyncExitStack | None = None
        self._verifier_scope: trio.CancelScope | None = None
        self._verifier_done: trio.Event | None = None
        self._seen_notices: set[Path] = set()
        self._swtpm_ca: Path | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    async def __aenter__(self) -> Testbed:
        self._stack = AsyncExitStack()
        await self._stack.__aenter__()
        try:
            await self._lock()  # released after the nursery (every actor) has stopped
            self._nursery = await self._stack.enter_async_context(trio.open_nursery())
            await self._start()
        except BaseException as exc:
            if self._nursery is not None:
                self._nursery.cancel_scope.cancel()
            if not await self._stack.__aexit__(type(exc), exc, exc.__traceback__):
                raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        assert self._stack is not None and self._nursery is not None
        self._nursery.cancel_scope.cancel()
        if self.tenant is not None:
            with trio.CancelScope(shield=True):
                await self.tenant.aclose()
        return await self._stack.__aexit__(exc_type, exc, tb)

    async def run(self, *, task_status: trio.TaskStatus[Testbed] = trio.TASK_STATUS_IGNORED) -> None:
        """Start everything, report ``self``, run until cancelled (``keytrio testbed up``)."""
        async with self:
            task_status.started(self)
            await trio.sleep_forever()

    async def _lock(self) -> None:
        """One testbed per directory: a second one would rewrite the CA and TPMs of the first."""
        assert self._stack is not None
        try:
            lock = await startup.lock_data_dir(self.dir, "testbed")
        except startup.StartupError as exc:
            if exc.code != startup.Exit.DATADIR_LOCKED:
                raise
            raise startup.StartupError(
                exc.code, f"testbed directory {self.dir} is in use by a running testbed"
                + exc.what.partition("another instance")[2],
                "stop it (Ctrl-C in its terminal) or give this one another --dir") from None
        self._stack.callback(lock.release)

    async def _start(self) -> None:
        assert self._nursery is not None
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = ca = await trio.to_thread.run_sync(make_cv_ca, self.dir / "cv_ca")
        self._swtpm_ca = self.dir / "swtpm-localca"
        await trio.to_thread.run_sync(init_local_ca, self._swtpm_ca)
        self.registrar = Registrar(registrar_config(None, env={}, overrides={
            "metrics_port": 0, "ip": "127.0.0.1", "port": 0, "tls_port": 0, "data_dir": str(self.dir / "registrar"),
            "server_cert": str(ca.server_cert), "server_key": str(ca.server_key),
            "trusted_client_ca": [str(ca.ca)], "graceful_timeout": 0.5, **self.registrar_options,
        }))
        self.registrar_addresses = await self._nursery.start(self.registrar.run)
        await self.start_verifier()
        await self.add_machines(self.count)
        assert self.registrar_addresses is not None and self.verifier_address is not None
        self.tenant = Tenant(
            "https://{}:{}".format(*self.registrar_addresses.https), self.verifier_url,
            ca_files=[ca.ca], client_cert=ca.client_cert, client_key=ca.client_key,
            request_timeout=10.0, poll_interval=POLL,
        )

    @property
    def verifier_url(self) -> str:
        assert self.verifier_address is not None
        return "https://{}:{}".format(*self.verifier_address)

    @property
    def registrar_url(self) -> str:
        assert self.registrar_addresses is not None
        return "https://{}:{}".format(*self.registrar_addresses.https)

    @property
    def registrar_http_url(self) -> str:
        assert self.registrar_addresses is not None
        return "http://{}:{}".format(*self.registrar_addresses.http)

    # -- the verifier -----------------------------------------------------------------------------

    async def start_verifier(self) -> tuple[str, int]:
        """Start the verifier (again on the same port after the first start)."""
        assert self._nursery is not None and self.ca is not None
        ca = self.ca
        port = self.verifier_address[1] if self.verifier_address else 0
        config = verifier_config(None, env={}, overrides={
            "metrics_port": 0, "ip": "127.0.0.1", "port": port, "data_dir": str(self.dir / "verifier"),
            "server_cert": str(ca.server_cert), "server_key": str(ca.server_key),
            "client_cert": str(ca.client_cert), "client_key": str(ca.client_key),
            "trusted_client_ca": [str(ca.ca)], "trusted_server_ca": [str(ca.ca)],
            "exponential_backoff": False, "graceful_timeout": 0.5,
            **self.verifier_overrides,
        })
        verifier = Verifier(config)
        scope, done = trio.CancelScope(), trio.Event()

        async def run(task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with scope:
                    await verifier.run(task_status=task_status)
            finally:
                done.set()

        self.verifier_address = await self._nursery.start(run)
        self.verifier, self._verifier_scope, self._verifier_done = verifier, scope, done
        return self.verifier_address

    async def stop_verifier(self) -> None:
        if self._verifier_scope is None or self._verifier_done is None:
            return
        self._verifier_scope.cancel()
        await self._verifier_done.wait()
        self._verifier_scope = self._verifier_done = None
        self.verifier = None

    async def restart_verifier(self) -> None:
        """Stop the verifier (monitors end, database closes) and start it on the same port and file."""
        await self.stop_verifier()
        await self.start_verifier()

    # -- machines ---------------------------------------------------------------------------------

    async def add_machines(self, count: int, **options: Any) -> list[Machine]:
        """Create and start ``count`` more machines concurrently (m<i>, i continuing the numbering)."""
        assert self._nursery is not None and self.ca is not None and self.registrar_addresses is not None
        new = [self._machine(f"m{len(self.machines) + i}", **options) for i in range(count)]
        self.machines.extend(new)
        nursery = self._nursery

        async def start(m: Machine) -> None:
            await nursery.start(m.run)

        async with trio.open_nursery() as starting:
            for m in new:
                starting.start_soon(start, m)
        await trio.to_thread.run_sync(self.write_tenant_config)  # the EK CA exists after a provisioning
        return new

    def _machine(self, name: str, **options: Any) -> Machine:
        assert self.ca is not None and self.registrar_addresses is not None
        root = self.dir / "machines"
        notices = root / name / "notices"
        actions = root / name / "revocation-actions"
        for d in (notices, actions):
            d.mkdir(parents=True, exist_ok=True)
        script = actions / "10-record.sh"
        script.write_text(RECORDER.format(dir=notices))
        script.chmod(0o755)
        opts: dict[str, Any] = {
            "uuid": machine_uuid(self.seed, name),
            "revocation_cert": str(self.ca.revocation_cert),
            "retry_interval": 0.1,
            **self.machine_options,
            **options,
        }
        return Machine(name, root, self.ca, registrar=self.registrar_addresses.http, seed=self.seed,
                       verifier=self.verifier_address, swtpm_ca_dir=self._swtpm_ca, proxy=True, **opts)

    def machine(self, name: str) -> Machine:
        for m in self.machines:
            if m.name == name:
                return m
        raise KeyError(name)

    def by_agent_id(self, agent_id: str) -> str:
        for m in self.machines:
            if m.info is not None and m.agent_id == agent_id:
                return m.name
        return agent_id

    # -- tenant steps and waits -------------------------------------------------------------------

    async def enrol(self, machine: Machine, **options: Any) -> AddResult:
        """``tenant add`` for ``machine``: the CA's revocation pair, mask 0x0, waits for GET_QUOTE
        and keys/verify (tenant defaults). Any add option may be passed (payload, tpm_policy, ...)."""
        assert self.tenant is not None and self.ca is not None
        options.setdefault("revocation_key_pem", self.ca.revocation_key.read_text())
        options.setdefault("revocation_cert_pem", self.ca.revocation_cert.read_text())
        options.setdefault("timeout", 20.0)
        result = await self.tenant.add(machine.agent_id, **options)
        await self.get(machine)
        return result

    async def enrol_push(self, machine: Machine, **options: Any) -> None:
        """``tenant add --push`` for a push-mode machine (``mode="push"``; the verifier serves push
        with ``verifier_options={"mode": "both"}`` or ``"push"``): no contact address, nothing
        sent to the agent, which attests on its own. Any AddRequest option may be passed."""
        assert self.tenant is not None and self.ca is not None
        options.setdefault("revocation_key_pem", self.ca.revocation_key.read_text())
        await push.add_push_agent(self.tenant, AddRequest(machine.agent_id, **options))

    async def push_attestations(self, machine: Machine) -> list[dict[str, Any]]:
        """The verifier's attestation history of a push-mode machine, newest first."""
        assert self.tenant is not None
        await self.tenant.ready(self.tenant.verifier)
        return await push.attestations(self.tenant, machine.agent_id)

    async def get(self, machine: Machine) -> dict[str, Any] | None:
        """The verifier's record of ``machine`` (None: unknown to it); the observer sees it too."""
        assert self.tenant is not None
        peer = await self.tenant.ready(self.tenant.verifier)
        reply = await peer.call("GET", f"/agents/{machine.agent_id}", expect=(200, 404))
        record = reply.results if reply.status_code == 200 else None
        self.observer.saw_record(machine.name, record)
        return record

    async def wait(
        self,
        machine: Machine,
        pred: Callable[[dict[str, Any] | None], bool],
        what: str,
        *,
        timeout: float = 20.0,
    ) -> dict[str, Any] | None:
        """Poll the verifier until ``pred(record)``; WaitTimeout names the states/events seen."""
        last: dict[str, Any] | None = None
        with trio.move_on_after(timeout):
            while True:
                last = await self.get(machine)
                self.collect_notices()
                if pred(last):
                    return last
                await trio.sleep(POLL)
        seen = " -> ".join(state_name(s) for s in self.observer.states(machine.name)) or "nothing"
        events = ", ".join(self.observer.events(machine.name)) or "none"
        count = last.get("attestation_count") if last else None
        raise WaitTimeout(f"{machine.name}: not {what} after {timeout:g} s (states seen: {seen}; "
                          f"events: {events}; attestation_count {count})")

    async def wait_state(self, machine: Machine, state: int, *, timeout: float = 20.0) -> dict[str, Any]:
        record = await self.wait(machine, lambda r: r is not None and r["operational_state"] == state,
                                 f"in state {state_name(state)}", timeout=timeout)
        assert record is not None
        return record

    async def wait_count(self, machine: Machine, at_least: int, *, timeout: float = 20.0) -> dict[str, Any]:
        """Until the verifier counted ``at_least`` attestations of ``machine`` (and it is GET_QUOTE)."""
        record = await self.wait(
            machine,
            lambda r: r is not None and r["attestation_count"] >= at_least and r["operational_state"] == GET_QUOTE,
            f"attested {at_least} times", timeout=timeout)
        assert record is not None
        return record

    async def wait_gone(self, machine: Machine, *, timeout: float = 20.0) -> None:
        await self.wait(machine, lambda r: r is None, "deleted", timeout=timeout)

    # -- revocation notices -----------------------------------------------------------------------

    def notices_dir(self, machine: Machine) -> Path:
        return machine.dir / "notices"

    def collect_notices(self) -> None:
        """Give the observer every notice a machine's recording action wrote since the last call."""
        for m in self.machines:
            files = [p for p in self.notices_dir(m).glob("*.json") if p not in self._seen_notices]
            for path in sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name)):
                self._seen_notices.add(path)
                try:
                    msg = json.loads(path.read_text())
                except (OSError, ValueError):
                    msg = {}
                self.observer.saw_notice(m.name, self.by_agent_id(str(msg.get("agent_id"))),
                                         str(msg.get("event_id")))

    def notices(self, machine: Machine) -> list[dict[str, Any]]:
        """The msg documents of the notices ``machine`` accepted (signature checked by its agent)."""
        out = []
        for path in sorted(self.notices_dir(machine).glob("*.json"), key=lambda p: p.stat().st_mtime_ns):
            out.append(json.loads(path.read_text()))
        return out

    async def wait_notices(self, machine: Machine, count: int, *, timeout: float = 20.0) -> list[dict[str, Any]]:
        with trio.move_on_after(timeout):
            while len(found := self.notices(machine)) < count:
                await trio.sleep(POLL)
            self.collect_notices()
            return found
        self.collect_notices()
        raise WaitTimeout(f"{machine.name}: {len(self.notices(machine))} notices after {timeout:g} s, "
                          f"expected {count}")

    # -- for `keytrio testbed up` -----------------------------------------------------------------

    @property
    def tenant_config(self) -> Path:
        return self.dir / TENANT_CONFIG

    def write_tenant_config(self) -> Path:
        """Write ``tenant.toml`` and ``ek-trust-store/`` (the swtpm EK CA chain); returns the file.

        The swtpm CA's directory itself holds keys, a serial counter and configuration beside the
        certificates, so the trust store gets copies of the certificates only."""
        assert self.ca is not None and self.registrar_addresses is not None and self._swtpm_ca is not None
        store = self.dir / EK_TRUST_STORE
        store.mkdir(exist_ok=True)
        for cert in local_ca_certs(self._swtpm_ca):
            (store / cert.name).write_bytes(cert.read_bytes())
        reg_host, reg_port = self.registrar_addresses.https
        ver_host, ver_port = self.verifier_address or ("127.0.0.1", 0)

        def q(value: object) -> str:  # a TOML basic string (JSON's escapes are TOML's)
            return json.dumps(str(value), ensure_ascii=False)

        text = (
            "# keytrio tenant configuration of the testbed in this directory (written by keytrio testbed up)\n"
            "[tenant]\n"
            f"registrar_ip = {q(reg_host)}\nregistrar_tls_port = {reg_port}\n"
            f"verifier_ip = {q(ver_host)}\nverifier_port = {ver_port}\n"
            f"tls_dir = {q(self.ca.dir)}\n"
            f"client_cert = {q(self.ca.client_cert.name)}\nclient_key = {q(self.ca.client_key.name)}\n"
            f"trusted_server_ca = [{q(self.ca.ca.name)}]\n"
            f"revocation_key = {q(self.ca.revocation_key.name)}\nrevocation_cert = {q(self.ca.revocation_cert.name)}\n"
            "require_ek_cert = true\n"
            f"tpm_cert_store = {q(store)}\n"
        )
        tmp = self.tenant_config.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.tenant_config)
        return self.tenant_config

    def tenant_commands(self) -> list[str]:
        """The tenant command lines that work on this testbed (printed by ``keytrio testbed up``)."""
        config = shlex.quote(str(self.tenant_config))
        out = []
        for m in self.machines:
            aid = shlex.quote(m.agent_id)
            if m.is_push:  # enrolled without a contact address; its history is read at the verifier
                out += [f"keytrio tenant add --push -c {config} {aid}",
                        f"keytrio tenant attestations -c {config} {aid}"]
            else:
                out.append(f"keytrio tenant add -c {config} {aid}")
            out.append(f"keytrio tenant status -c {config} {aid}")
        out.append(f"keytrio tenant list -c {config}")
        return out

    def describe(self) -> dict[str, Any]:
        assert self.ca is not None and self.registrar_addresses is not None
        return {
            "registrar": {"http": "{}:{}".format(*self.registrar_addresses.http),
                          "https": self.registrar_url},
            "verifier": self.verifier_url,
            "tenant_config": str(self.tenant_config),
            "tenant": {"ca": str(self.ca.ca), "client_cert": str(self.ca.client_cert),
                       "client_key": str(self.ca.client_key),
                       "revocation_key": str(self.ca.revocation_key),
                       "revocation_cert": str(self.ca.revocation_cert)},
            "agents": [self._describe(m) for m in self.machines],
        }

    @staticmethod
    def _describe(m: Machine) -> dict[str, Any]:
        out: dict[str, Any] = {"machine": m.name, "agent_id": m.agent_id, "mode": "push" if m.is_push else "pull"}
        if m.is_push:
            # it listens on no port; behind a NAT its public address refuses every connection
            out["behind_nat"] = "{}:{}".format(*m.contact) if m.nat is not None else None
        else:
            out["address"], out["direct"] = "{}:{}".format(*m.contact), "{}:{}".format(*m.address)
        out["dir"] = str(m.dir)
        return out


__all__ = ["Testbed", "WaitTimeout", "machine_uuid"]
