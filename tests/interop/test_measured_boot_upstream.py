"""Issue 11: upstream Keylime 7.14.3's verifier (``measured_boot_policy_name = example``) and ours
agree on good and tampered UEFI boots.

This module starts its own upstream instance (``support.upstream_instance``; the session one keeps
upstream's default accept-all measured-boot policy) with ``KEYLIME_VERIFIER_MEASURED_BOOT_POLICY_NAME
=example``. The reference state is made from the GOOD boot's log by upstream's own
``keylime-policy create measured-boot`` (it is also checked to equal keytrio's
``mb_create.refstate_from_log``). Boots are testbed/boot_log.py's rich OVMF + shim + grub + Linux
log: the good boot and one boot per tamper knob (secure_boot_off, unknown_kernel,
dbx_missing_entry, extra_application), replayed into a real swtpm.

(a) ``test_mb_evidence``: per boot, a quote over PCRs 0-9 and 11-15 (what both verifiers ask for
with an mb policy; PCR 16 is not quoted: ``/verify/evidence`` skips the data-PCR check on both)
plus the log as ``mb_log`` go to ``POST /v2.5/verify/evidence`` of both verifiers. Same status
class, same ``valid``, and failure types equal once keytrio's finer policy failures
(``measured_boot.secure_boot_disabled``, ``…boot_application_not_allowed``, ...) are mapped to
upstream's single ``measured_boot.policy_example`` (docs/compatibility.md, "Measured boot").

Upstream's ``/verify/evidence`` evaluates the mb policy only with ``measured_boot_evaluate =
always``: it calls check_quote with no attestation count (-1), and ``once`` evaluates at count 0
only, so with upstream's default every tampered boot would pass there (replay only). This
instance therefore runs with ``always``; the attestation loop gives the same verdicts either way
(each agent is evaluated on its first quote).

(b) ``test_mb_attestation_loop``: our agents on machines that booted the good and the
unknown-kernel boot (``Machine(boot=...)``), registered with upstream's registrar, are enrolled
with the reference state by upstream's tenant (``keylime_tenant -c add --mb-policy FILE``):
Get Quote vs Invalid Quote (``measured_boot.policy_example``). Then, removed from upstream's
verifier, the same agents are enrolled by our tenant library in our verifier (serving with
upstream's cv_ca): Get Quote vs Invalid Quote (``measured_boot.boot_application_not_allowed``).
"""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from keytrio.actors.agent.tpm import Tpm
from keytrio.actors.common import tls
from keytrio.actors.tenant.tenant import Tenant
from keytrio.actors.verifier import config as verifier_config
from keytrio.actors.verifier.actor import Verifier
from keytrio.protocol import eventlog_parse, mb_create, mb_policy
from keytrio.protocol.quote import build_quote, encode_pcr_blob
from keytrio.testbed import boot_log, swtpm_state
from keytrio.testbed import swtpm as swtpm_mod
from keytrio.testbed.boot_log import TAMPER_KNOBS, BootConfig
from tests.interop.evidence_cases import Answer, Verdict
from tests.interop.support import (
    GET_QUOTE,
    INVALID_QUOTE,
    Upstream,
    run_tool,
    run_tools,
    running_machine,
    server_client,
    upstream_instance,
    wait_record,
)

pytestmark = [pytest.mark.interop, pytest.mark.swtpm]

UPSTREAM_ENV = {
    "KL_QUOTE_INTERVAL": "1",
    "KEYLIME_VERIFIER_MEASURED_BOOT_POLICY_NAME": "example",
    "KEYLIME_VERIFIER_MEASURED_BOOT_EVALUATE": "always",  # see the module docstring
}
NONCE = "k3ytr10MeasuredB00t"
BANKS = ("sha1", "sha256")
BANK = "sha256"
GOOD = BootConfig()
UPSTREAM_POLICY_FAIL = "measured_boot.policy_example"
#: keytrio's policy failures (protocol/mb_policy.py) that upstream reports as policy_example;
#: replay (invalid_pcr_N), missing_pcrs and parser failures keep their names on both sides
POLICY_KINDS = frozenset({
    "secure_boot_disabled", "secure_boot_enabled", "pk_not_allowed", "kek_not_allowed", "db_not_allowed",
    "vendor_db_not_allowed", "dbx_missing_entries", "boot_application_not_allowed", "kernel_not_allowed",
    "initrd_not_allowed", "kernel_cmdline_not_allowed", "scrtm_bios_not_allowed", "mok_not_allowed",
    "unexpected_event", "event_repeated", "invalid_separator", "bad_event_data",
})  # fmt: skip


def upstream_types(ours: frozenset[str]) -> frozenset[str]:
    """keytrio's failure types as upstream names them (docs/compatibility.md, "Measured boot")."""
    out = set()
    for t in ours:
        prefix, _, kind = t.partition(".")
        out.add(UPSTREAM_POLICY_FAIL if prefix == "measured_boot" and kind in POLICY_KINDS else t)
    return frozenset(out)


@dataclass(frozen=True)
class MbCase:
    name: str
    log: str  # the boot whose log is sent
    quote: str  # the boot whose quote is sent
    upstream: Verdict
    ours: Verdict
    send_log: bool = True
    note: str = ""  # set: a documented difference (no mapping check)


def _invalid(*types: str) -> Verdict:
    return Verdict(2, False, frozenset(types))


CASES = [
    MbCase("good", "good", "good", Verdict(2, True), Verdict(2, True)),
    MbCase("secure_boot_off", "secure_boot_off", "secure_boot_off", _invalid(UPSTREAM_POLICY_FAIL),
           # keytrio also names the missing kernel: without Secure Boot nothing measures it in PCR 4
           _invalid("measured_boot.secure_boot_disabled", "measured_boot.boot_application_not_allowed")),
    MbCase("unknown_kernel", "unknown_kernel", "unknown_kernel", _invalid(UPSTREAM_POLICY_FAIL),
           _invalid("measured_boot.boot_application_not_allowed")),
    MbCase("dbx_missing_entry", "dbx_missing_entry", "dbx_missing_entry", _invalid(UPSTREAM_POLICY_FAIL),
           _invalid("measured_boot.dbx_missing_entries")),
    MbCase("extra_application", "extra_application", "extra_application", _invalid(UPSTREAM_POLICY_FAIL),
           _invalid("measured_boot.boot_application_not_allowed")),
    # the good boot's log sent with the quote of the unknown-kernel boot: the replay fails on the
    # PCRs the kernel is measured into (4: Authenticode, 9: grub reads vmlinuz)
    MbCase("log-not-of-quoted-boot", "good", "unknown_kernel",
           _invalid("measured_boot.invalid_pcr_4", "measured_boot.invalid_pcr_9"),
           _invalid("measured_boot.invalid_pcr_4", "measured_boot.invalid_pcr_9")),
    MbCase("mb-policy-without-log", "good", "good",
           _invalid("measured_boot.missing_pcrs", *(f"pcr_validation.unused_pcr_{p}" for p in (*range(10), 14))),
           Verdict(4, False, frozenset({"mb_log.missing_param"})), send_log=False,
           note="both refuse; upstream evaluates (every policy PCR unused, the policy's PCRs missing), "
                "keytrio answers a missing input with 400 as it does for the other required inputs"),
]


def boot_config(name: str) -> BootConfig:
    return GOOD if name == "good" else GOOD.tampered(name)


@dataclass
class Evidence:
    log: bytes
    quote: str
    ak: bytes
    ek: bytes


@dataclass
class MbCrossCheck:
    refstate: str  # what upstream's keylime-policy wrote
    ours_refstate: dict[str, Any]
    evidence: dict[str, Evidence]
    upstream: dict[str, Answer]
    ours: dict[str, Answer]


async def boot_and_quote(sw: swtpm_mod.Swtpm, cfg: BootConfig) -> Evidence:
    """Replay one boot into the (freshly restarted) swtpm and quote the measured-boot PCRs."""
    async with await Tpm.open(sw.tcti) as tpm:
        for pcr, digests in boot_log.events(BANKS, cfg):
            await tpm.extend(pcr, digests)
        ek = await tpm.endorsement_key()
        ak = await tpm.create_ak(ek)
        q = await tpm.quote(ak, nonce=NONCE.encode(), pcrs=mb_policy.MEASUREDBOOT_PCRS, bank=BANK)
        await tpm.flush(ak)
    quote = build_quote(q.attest, q.signature, encode_pcr_blob(q.bank, q.pcrs))
    return Evidence(boot_log.build(BANKS, cfg), quote, ak.public, ek.public)


def request(case: MbCase, evidence: dict[str, Evidence], refstate: str) -> dict[str, Any]:
    quoted = evidence[case.quote]
    return {"type": "tpm", "data": {
        "nonce": NONCE,
        "quote": quoted.quote,
        "hash_alg": BANK,
        "tpm_ak": base64.b64encode(quoted.ak).decode(),
        "tpm_ek": base64.b64encode(quoted.ek).decode(),
        "tpm_policy": "",
        "runtime_policy": "",
        "mb_policy": refstate,
        "ima_measurement_list": "",
        "mb_log": base64.b64encode(evidence[case.log].log).decode() if case.send_log else "",
    }}  # fmt: skip


async def cross_check(upstream: Upstream, root: Path, swtpm_template: Path) -> MbCrossCheck:
    boots = ["good", *TAMPER_KNOBS]
    evidence: dict[str, Evidence] = {}
    state = root / "swtpm"
    swtpm_state.copy_state(swtpm_template, state)
    async with swtpm_mod.swtpm_running(state, banks=BANKS) as sw:
        for i, name in enumerate(boots):
            if i:
                await sw.restart()  # TPM2_Shutdown + restart: PCRs reset, the next boot starts clean
            evidence[name] = await boot_and_quote(sw, boot_config(name))

    # the reference state, by upstream's own tool from the good boot's log
    log_path, ref_path = root / "good.bin", root / "refstate.json"
    log_path.write_bytes(evidence["good"].log)
    await run_tool([*upstream.tool("keylime-policy"), "create", "measured-boot", "-e", str(log_path),
                    "-o", str(ref_path)], upstream.env)
    refstate = ref_path.read_text()
    ours_ref = mb_create.refstate_from_log(eventlog_parse.parse(evidence["good"].log))

    ca_dir = root / "cv_ca"
    shutil.copytree(upstream.ca.dir, ca_dir)  # our verifier serves with upstream's certificates
    answers: dict[str, dict[str, Answer]] = {}
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(Verifier(our_verifier_config(root / "verifier", ca_dir)).run)
        targets = {"upstream": upstream.verifier_url, "ours": f"https://{host}:{port}"}

        async def send_all(side: str) -> None:
            answers[side] = await post_cases(targets[side], ca_dir / "cacert.crt", CASES, evidence, refstate)

        async with trio.open_nursery() as senders:
            senders.start_soon(send_all, "upstream")
            senders.start_soon(send_all, "ours")
        nursery.cancel_scope.cancel()
    return MbCrossCheck(refstate, ours_ref, evidence, answers["upstream"], answers["ours"])


async def post_cases(url: str, ca_file: Path, cases: list[MbCase], evidence: dict[str, Evidence],
                     refstate: str) -> dict[str, Answer]:
    answers = {}
    # no client certificate: /verify/evidence is public on both
    async with httpx.AsyncClient(verify=tls.client_context([ca_file]), timeout=60.0) as client:
        for case in cases:
            resp = await client.post(f"{url}/v2.5/verify/evidence", json=request(case, evidence, refstate))
            try:
                body = resp.json()
            except ValueError:
                body = resp.text
            answers[case.name] = Answer(resp.status_code, body, Verdict.of(resp.status_code, body))
    return answers


def our_verifier_config(data_dir: Path, ca_dir: Path, **extra: Any) -> Any:
    """Our verifier with upstream's cv_ca (same file names): its server cert is the one upstream's
    tenant and our agents already trust, its client cert the one they accept."""
    return verifier_config.load_config(env={}, overrides={
        "metrics_port": 0, "ip": "127.0.0.1", "port": 0, "data_dir": str(data_dir), "tls_dir": str(ca_dir), **extra,
    })


@pytest.fixture(scope="module")
def mb_upstream() -> Iterator[Upstream]:
    with upstream_instance(UPSTREAM_ENV, prefix="keytrio-keylime-mb-") as up:
        yield up


@pytest.fixture(scope="module")
def mb_crosscheck(mb_upstream: Upstream, swtpm_template: Path) -> Iterator[MbCrossCheck]:
    # a sync fixture with its own trio loop: all answers are fetched once for the module
    with tempfile.TemporaryDirectory(prefix="keytrio-mb-evidence-") as d:
        yield trio.run(cross_check, mb_upstream, Path(d), swtpm_template)


def test_mb_refstate_upstream_tool_equals_ours(mb_crosscheck: MbCrossCheck) -> None:
    assert json.loads(mb_crosscheck.refstate) == mb_crosscheck.ours_refstate


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_mb_evidence(mb_crosscheck: MbCrossCheck, name: str) -> None:
    case = next(c for c in CASES if c.name == name)
    up, ours = mb_crosscheck.upstream[name], mb_crosscheck.ours[name]
    print(f"[{name}] upstream {up.describe(900)}\n[{name}] keytrio  {ours.describe(900)}")  # shown on failure
    assert up.verdict == case.upstream, f"upstream: expected {case.upstream.show()}, got {up.describe(900)}"
    assert ours.verdict == case.ours, f"keytrio: expected {case.ours.show()}, got {ours.describe(900)}"
    if not case.note:
        assert (ours.verdict.status_class, ours.verdict.valid) == (up.verdict.status_class, up.verdict.valid)
        assert upstream_types(ours.verdict.types) == up.verdict.types
    if up.verdict.types == {UPSTREAM_POLICY_FAIL}:
        # upstream names no event; its reason (a test's why_not) must at least be there
        (failure,) = up.body["results"]["failures"]
        assert failure["context"]["reason"], failure


async def test_mb_attestation_loop(mb_upstream: Upstream, tmp_path: Path) -> None:
    up, env = mb_upstream, dict(mb_upstream.env)
    policy_path = tmp_path / "refstate.json"
    registrar = up.registrar_agent_address
    async with running_machine("mb-good", tmp_path, up.ca, registrar=registrar, uuid=str(uuidlib.uuid4()),
                               boot=GOOD) as good, \
            running_machine("mb-kernel", tmp_path, up.ca, registrar=registrar, uuid=str(uuidlib.uuid4()),
                            boot=GOOD.tampered("unknown_kernel")) as bad, \
            server_client(up.ca) as client:
        # the reference state: upstream's tool on the log the good machine's agent serves
        await run_tool([*up.tool("keylime-policy"), "create", "measured-boot", "-e", str(good.boot_log_path),
                        "-o", str(policy_path)], env)

        # 1. upstream's tenant enrols both with it in upstream's verifier (no payload)
        def add(m: Any) -> tuple[list[str], dict[str, str]]:
            host, port = m.address
            return ([*up.tool("keylime_tenant"), "-c", "add", "-t", host, "-tp", str(port), "-u", m.agent_id,
                     "--mb-policy", str(policy_path)], env)

        await run_tools(add(good), add(bad))
        rec = await wait_record(client, up.verifier_url, good.agent_id,
                                lambda r: r["operational_state"] == GET_QUOTE and r["attestation_count"] >= 2,
                                timeout=30, what="upstream: the good boot in Get Quote, two attestations")
        assert rec["has_mb_refstate"] == 1 and not rec["last_event_id"], rec
        mask = int(json.loads(rec["tpm_policy"])["mask"], 16)
        assert all(mask >> pcr & 1 for pcr in mb_policy.MEASUREDBOOT_PCRS), rec["tpm_policy"]
        rec = await wait_record(client, up.verifier_url, bad.agent_id,
                                lambda r: r["operational_state"] == INVALID_QUOTE,
                                timeout=30, what="upstream: the unknown-kernel boot in Invalid Quote")
        assert rec["last_event_id"] == UPSTREAM_POLICY_FAIL, rec
        await run_tools(*(([*up.tool("keylime_tenant"), "-c", "delete", "-u", m.agent_id], env) for m in (good, bad)))

        # 2. the same agents, same boots, in our verifier (upstream's cv_ca), enrolled by our tenant
        ca_dir = tmp_path / "cv_ca"
        shutil.copytree(up.ca.dir, ca_dir)
        cfg = our_verifier_config(tmp_path / "verifier", ca_dir, quote_interval=1.0)
        policy = policy_path.read_text()
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(Verifier(cfg).run)
            ours = f"https://{host}:{port}"
            async with Tenant(up.registrar_tls_url, ours, ca_files=[up.ca.ca], client_cert=up.ca.client_cert,
                              client_key=up.ca.client_key) as tenant:
                result = await tenant.add(good.agent_id, mb_policy=policy, timeout=30)
                assert result.operational_state == GET_QUOTE, result
                # no Get Quote, so the verifier never sends V: nothing to verify
                await tenant.add(bad.agent_id, mb_policy=policy, wait_for_state=None, verify=False)
            rec = await wait_record(client, ours, good.agent_id,
                                    lambda r: r["operational_state"] == GET_QUOTE and r["attestation_count"] >= 2,
                                    timeout=30, what="keytrio: the good boot in Get Quote, two attestations")
            assert rec["has_mb_refstate"] == 1 and not rec["last_event_id"], rec
            rec = await wait_record(client, ours, bad.agent_id, lambda r: r["operational_state"] == INVALID_QUOTE,
                                    timeout=30, what="keytrio: the unknown-kernel boot in Invalid Quote")
            assert rec["last_event_id"] == "measured_boot.boot_application_not_allowed", rec
            assert upstream_types(frozenset([rec["last_event_id"]])) == {UPSTREAM_POLICY_FAIL}
            nursery.cancel_scope.cancel()


def test_mb_evidence_upstream_evaluate_once_skips_policy(mb_crosscheck: MbCrossCheck) -> None:
    """Upstream defect (docs/compatibility.md): with its default ``measured_boot_evaluate = once``
    upstream's /verify/evidence only replays the log and never evaluates the policy, so every
    tampered boot is valid there; keytrio evaluates it (the verdicts of test_mb_evidence)."""
    tampered = [c for c in CASES if c.name in TAMPER_KNOBS]
    with upstream_instance({**UPSTREAM_ENV, "KEYLIME_VERIFIER_MEASURED_BOOT_EVALUATE": "once"},
                           prefix="keytrio-keylime-mb-once-") as once:
        answers = trio.run(post_cases, once.verifier_url, once.ca.ca, tampered, mb_crosscheck.evidence,
                           mb_crosscheck.refstate)
    for case in tampered:
        up = answers[case.name]
        print(f"[{case.name}] upstream (once) {up.describe(900)}")
        assert up.verdict == Verdict(2, True), f"upstream (once) changed: {up.describe(900)}"
        assert mb_crosscheck.ours[case.name].verdict.valid is False
