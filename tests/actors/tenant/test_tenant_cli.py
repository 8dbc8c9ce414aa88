"""``keytrio tenant VERB`` end to end, in-process: the verbs are parsed by the argparse parser our
``register()`` builds and run by ``actors.tenant.cli.run`` against a real registrar, verifier and
agent (swtpm) over mTLS. Every failure mode is asserted as exit code + one stderr line."""

from __future__ import annotations

import io
import json
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from quart import Response

from keytrio.actors.ca.authority import Authority
from keytrio.actors.common import tls
from keytrio.actors.common.app import make_app, ok
from keytrio.actors.common.serve import serve
from keytrio.actors.tenant import Refused, cli_args, cli_output
from keytrio.actors.tenant import cli as tenant_cli
from keytrio.actors.tenant.payload import REVOCATION_CERT
from keytrio.protocol import states, versions
from keytrio.testbed.ima_log import ImaLog
from keytrio.testbed.swtpm_state import ek_ca_certs
from tests.actors.registrar_support import EkCa, SoftTpm
from tests.actors.tenant_support import (
    AGENT_ID,
    OTHER_ID,
    Cli,
    World,
    make_cli,
    tenant_parser,
    tls_layout,
    write_config,
)
from tests.actors.tools.policy_support import policy
from tests.ports import free_port

UPSTREAM = Path(__file__).resolve().parents[2] / "protocol" / "data" / "keylime"


# --- end to end (swtpm) -----------------------------------------------------------------------------


@pytest.mark.swtpm
async def test_cli_end_to_end(world: World, nursery: trio.Nursery, swtpm: Any, tmp_path: Path) -> None:
    w = world
    cli = make_cli(w, tmp_path)
    r = await w.agent(nursery, swtpm.tcti, enable_autorun=True)
    src = tmp_path / "payload"
    src.mkdir()
    (src / "app.conf").write_text("x = 1\n")
    marker = tmp_path / "autorun.log"
    autorun = tmp_path / "run.sh"
    autorun.write_text(f"echo ran >> {marker}\n")
    ek_store = [a for p in ek_ca_certs(swtpm.state_dir) for a in ("--ek-trust-store", str(p))]

    # an EK trust store of another CA: 4, and nothing enrolled
    other = EkCa.new().write(tmp_path / "other-ek-ca")
    await cli.fails(4, "add", AGENT_ID, "--ek-trust-store", other, match="EK certificate")
    code, out, _ = await cli("list", "--json")
    assert code == 0 and json.loads(out) == {"registrar": [AGENT_ID], "verifier": []}
    # a pull agent (it registered a contact address) enrolled with --push: warned before the POST,
    # which this pull-mode verifier refuses (a push enrolment has no contact address)
    code, out, err = await cli("add", "--push", AGENT_ID, "--no-ek-check")
    assert "keytrio tenant add: warning: the registrar has a contact address for" in err, err
    assert "enrol it without --push" in err and code == 5, (code, err)
    assert json.loads((await cli("list", "--json"))[1])["verifier"] == []

    code, out, err = await cli("add", AGENT_ID, *ek_store, "--payload", src, "--include-autorun", autorun,
                               "--pcr", "16=" + "00" * 32, "--pcr", "16=" + "11" * 32,  # listed but PCR 16 is checked anyway
                               "--metadata", '{"owner": "cli"}', "--verify")
    assert code == 0, err
    assert f"agent {AGENT_ID} enrolled" in out and "Get Quote after" in out and "proved K" in out
    assert "enrolling" in out and err == ""  # not a terminal: plain progress lines on stdout, no spinner
    unzipped = r.data_dir / "secure" / "unzipped"
    assert (unzipped / "app.conf").read_text() == "x = 1\n"
    assert (unzipped / REVOCATION_CERT).read_text() == (tmp_path / "cv_ca" / REVOCATION_CERT).read_text()
    assert r.agent.runner is not None
    with trio.fail_after(10):
        await r.agent.runner.wait_completed(1)
    assert marker.read_text() == "ran\n"

    # the verifier refuses a second add (409): 5, and the line says what to do
    await cli.fails(5, "add", AGENT_ID, "--no-ek-check", match="HTTP 409", )

    code, out, _ = await cli("status", AGENT_ID)
    assert code == 0 and "Get Quote (3)" in out and "registered, contact 127.0.0.1" in out
    assert "last event" in out and "attestations" in out
    code, out, _ = await cli("status", AGENT_ID, "--json")
    st = json.loads(out)
    assert st["operational_state_name"] == "Get Quote" and st["verifier"]["meta_data"] == '{"owner": "cli"}'
    assert json.loads(st["verifier"]["tpm_policy"])["16"] == ["00" * 32, "11" * 32]

    code, out, _ = await cli("list")
    assert code == 0 and AGENT_ID in out and out.splitlines()[1].split()[1:] == ["yes", "yes"]
    code, out, _ = await cli("list", "--json", "--verifier-id", "elsewhere")
    assert json.loads(out) == {"registrar": [AGENT_ID], "verifier": []}

    assert (await cli("stop", AGENT_ID))[0] == 0
    code, out, _ = await cli("status", AGENT_ID, "--json")
    assert json.loads(out)["operational_state"] == states.TENANT_FAILED
    assert (await cli("reactivate", AGENT_ID))[0] == 0
    with trio.fail_after(15):
        while json.loads((await cli("status", AGENT_ID, "--json"))[1])["operational_state"] != states.GET_QUOTE:
            await trio.sleep(0.1)

    # update = delete + add with the new options
    code, out, err = await cli("update", AGENT_ID, "--no-ek-check", "--metadata", '{"owner": "updated"}')
    assert code == 0, err
    assert "updated" in out
    code, out, _ = await cli("status", AGENT_ID, "--json")
    assert json.loads(out)["verifier"]["meta_data"] == '{"owner": "updated"}'

    # runtime policies: upstream-made ones (plain and DSSE-signed) round trip through the verifier
    assert (await cli("policy", "add", "rootfs", "--file", UPSTREAM / "policy_rootfs.json"))[0] == 0
    code, _, err = await cli("policy", "add", "signed", "--file", UPSTREAM / "signed_ecdsa.json",
                             "--key", UPSTREAM / "ecdsa_pub.pem")
    assert code == 0, err
    code, out, _ = await cli("policy", "list", "--json")
    assert sorted(json.loads(out)) == ["rootfs", "signed"]
    code, out, _ = await cli("policy", "show", "rootfs")
    assert out.strip() == (UPSTREAM / "policy_rootfs.json").read_text().strip()
    code, out, _ = await cli("policy", "show", "signed", "--json")
    rec = json.loads(out)
    assert rec["runtime_policy"] == (UPSTREAM / "signed_ecdsa.json").read_text()
    assert rec == {"name": "signed", "tmp_policy": None, "runtime_policy": rec["runtime_policy"]}  # upstream's record
    await cli.fails(5, "policy", "add", "rootfs", "--file", UPSTREAM / "policy_merged.json", match="HTTP 409")
    assert (await cli("policy", "update", "rootfs", "--file", UPSTREAM / "policy_merged.json"))[0] == 0
    saved = tmp_path / "saved.json"
    assert (await cli("policy", "show", "rootfs", "-o", saved))[0] == 0
    assert saved.read_text() == (UPSTREAM / "policy_merged.json").read_text()
    # a signed policy with the wrong key is refused locally (4); a broken one is a usage error (2)
    await cli.fails(4, "policy", "add", "bad", "--file", UPSTREAM / "signed_x509.json",
                    "--key", UPSTREAM / "ecdsa_pub.pem", match="signature")
    broken = tmp_path / "broken.json"
    broken.write_text('{"meta": {"version": 7}}')
    await cli.fails(2, "policy", "add", "bad", "--file", broken, match="meta.version")
    for name in ("rootfs", "signed"):
        assert (await cli("policy", "delete", name))[0] == 0
    assert json.loads((await cli("policy", "list", "--json"))[1]) == []
    await cli.fails(5, "policy", "show", "rootfs", match="HTTP 404")

    # a policy made by `keytrio policy create runtime` from the agent's IMA log is enforced
    assert r.agent.tpm is not None
    log = ImaLog(r.ima_path, r.agent.tpm.extend, ["sha1", "sha256", "sha384"])
    await log.measure("/usr/bin/tool", b"tool v1")
    await log.measure("/etc/tool.conf", b"conf")
    made = tmp_path / "made.json"
    assert policy("create", "runtime", "--ima-log", r.ima_path, "-o", made)[0] == 0
    code, out, err = await cli("update", AGENT_ID, "--no-ek-check", "--runtime-policy", made)
    assert code == 0, err
    st = json.loads((await cli("status", AGENT_ID, "--json"))[1])
    assert st["verifier"]["has_runtime_policy"] and st["operational_state"] == states.GET_QUOTE
    count = st["verifier"]["attestation_count"]
    with trio.fail_after(15):
        while (st := json.loads((await cli("status", AGENT_ID, "--json"))[1]))["verifier"]["attestation_count"] < count + 2:
            await trio.sleep(0.1)
    assert st["operational_state"] == states.GET_QUOTE
    await log.measure("/usr/bin/intruder", b"not in the policy")
    with trio.fail_after(15):
        while (st := json.loads((await cli("status", AGENT_ID, "--json"))[1]))["operational_state"] == states.GET_QUOTE:
            await trio.sleep(0.1)
    assert st["operational_state"] in (states.INVALID_QUOTE, states.FAILED)
    assert "not_in_allowlist" in st["verifier"]["last_event_id"]
    code, out, _ = await cli("status", AGENT_ID)
    assert "not_in_allowlist" in out and states.name(st["operational_state"]) in out
    # re-enrolling with the same policy: the verifier fails the agent again, and add says so (4)
    await cli.fails(4, "update", AGENT_ID, "--no-ek-check", "--runtime-policy", made, match="not_in_allowlist")

    code, out, _ = await cli("delete", AGENT_ID)
    assert code == 0 and "deleted" in out
    code, out, _ = await cli("status", AGENT_ID)
    assert "not enrolled" in out
    await cli.fails(5, "stop", AGENT_ID, match="HTTP 404")
    assert (await cli("regdelete", AGENT_ID))[0] == 0
    await cli.fails(5, "status", AGENT_ID, match="404")
    await r.stop()


# --- failure modes (no TPM needed) ------------------------------------------------------------------


async def test_cli_failure_modes(world: World, pki: Any, tmp_path: Path) -> None:
    w = world
    cli = make_cli(w, tmp_path)
    soft = SoftTpm.new()
    vendor = EkCa.new()
    soft.ekcert_der = vendor.issue(soft.ek_key.public_key())
    await w.registrar.enroll(AGENT_ID, soft, mtls_cert=pki.agent.pem, port=free_port())  # nobody listens there
    vendor_store = vendor.write(tmp_path / "vendor")

    # registrar down: 3
    dead = f"127.0.0.1:{free_port()}"
    line = await cli.fails(3, "add", AGENT_ID, "--no-ek-check", "--registrar", dead, match="registrar")
    assert "--registrar" in line
    # verifier down: 3
    await cli.fails(3, "list", flags=["--verifier", dead], match="cannot talk to the verifier")
    # agent down: 3 (EK cert checked and fine first)
    line = await cli.fails(3, "add", AGENT_ID, "--ek-trust-store", vendor_store, match="cannot talk to the agent")
    assert "agent running" in line
    # bad EK certificate (another vendor's CA): 4
    await cli.fails(4, "add", AGENT_ID, "--ek-trust-store", EkCa.new().write(tmp_path / "x"), match="EK certificate")
    # the verifier refuses: 5 (unknown agent; unknown policy; registrar does not know the agent)
    await cli.fails(5, "reactivate", OTHER_ID, match="HTTP 404")
    await cli.fails(5, "add", OTHER_ID, "--no-ek-check", match="registrar refused (HTTP 404)")
    assert (await cli("policy", "add", "p1", "--file", UPSTREAM / "policy_rootfs.json"))[0] == 0
    await cli.fails(5, "policy", "add", "p1", "--file", UPSTREAM / "policy_rootfs.json", match="HTTP 409")
    await cli.fails(5, "policy", "delete", "nope", match="HTTP 404")

    # wrong CA: the tenant trusts another CA than the one of the servers' certs: 3 (TLS)
    wrong_dir = tls_layout(tmp_path / "wrong_ca", pki, ca=pki.other_ca)
    wrong = Cli(write_config(tmp_path / "wrong.toml", wrong_dir, w.registrar.https_url), cli.flags)
    line = await wrong.fails(3, "list", match="tls")
    assert "not issued by the CA you trust" in line
    # a client cert of another CA: the servers refuse the handshake: 3
    other_dir = tls_layout(tmp_path / "other_client", pki)
    shutil.copy(pki.other_client.cert, other_dir / "client-cert.crt")
    shutil.copy(pki.other_client.key, other_dir / "client-private.pem")
    other = Cli(write_config(tmp_path / "other.toml", other_dir, w.registrar.https_url), cli.flags)
    line = await other.fails(3, "status", AGENT_ID)
    assert "does not trust your client certificate" in line

    # usage errors: 2
    await cli.fails(2, "add", AGENT_ID, match="--ek-trust-store DIR|FILE is required")
    await cli.fails(2, "add", "not an id", "--no-ek-check", match="agent id")
    await cli.fails(2, "add", AGENT_ID, "--no-ek-check", "--pcr", "7=xyz", match="--pcr")
    await cli.fails(2, "add", AGENT_ID, "--no-ek-check", "--payload", tmp_path / "missing", match="payload")
    await cli.fails(2, "add", AGENT_ID, "--no-ek-check", "--metadata", "[1]", match="--metadata")
    # nested past any real document: once a RecursionError traceback (json.loads), now a usage error
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    line = await cli.fails(2, "add", AGENT_ID, "--no-ek-check", "--tpm-policy", deep, match="--tpm-policy")
    assert "nested more than 64 levels deep" in line
    await cli.fails(2, "add", AGENT_ID, "--no-ek-check", "--metadata", '{"a":' * 5_000, match="--metadata: nested")
    await cli.fails(2, "add", AGENT_ID, "--no-ek-check", "--metadata", '{"a": 1, "a": 2}', match="--metadata")
    await cli.fails(2, "add", AGENT_ID, "--no-ek-check", "--runtime-policy", UPSTREAM / "allowlist.txt",
                    match="runtime policy")
    await cli.fails(2, "list", "--registrar", "nohostport", match="HOST:PORT")
    await Cli(tmp_path / "missing.toml", cli.flags).fails(2, "list", match="configuration")
    await cli.fails(2, "list", "--tls-dir", tmp_path / "empty", match="TLS file")
    bad_cfg = tmp_path / "bad.toml"
    bad_cfg.write_text("[tenant]\nregistrar_tls_port = 0\nbogus = 1\n")
    line = await Cli(bad_cfg, cli.flags).fails(2, "list", match="bogus")
    assert "registrar_tls_port" in line
    with pytest.raises(SystemExit) as exc:
        tenant_parser().parse_args(["tenant", "add"])  # AGENT_ID missing
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        tenant_parser().parse_args(["tenant", "add", AGENT_ID, "--runtime-policy", "a", "--runtime-policy-name", "b"])
    for bad in ("nan", "inf", "-1", "0"):  # float() takes them; no wait means them (nan broke trio's timeout)
        with pytest.raises(SystemExit) as exc:
            tenant_parser().parse_args(["tenant", "add", AGENT_ID, f"--timeout={bad}"])
        assert exc.value.code == 2
    assert tenant_parser().parse_args(["tenant", "add", AGENT_ID, "--timeout", "2.5"]).timeout == 2.5
    # still nothing enrolled
    assert json.loads((await cli("list", "--json"))[1]) == {"registrar": [AGENT_ID], "verifier": []}


async def test_revoked_client_cert(nursery: trio.Nursery, tmp_path: Path) -> None:
    """`keytrio ca` CA, a client cert issued then revoked; a server loading the CA's CRL (the
    registrar and verifier configs have no CRL option yet) refuses it: 3. The valid cert works."""
    ca_dir = tmp_path / "cv_ca"
    ca = Authority.init(ca_dir)
    ca.issue("ops", "client")
    ca.revoke("ops")
    app = make_app("crl-test", versions=versions.SERVER_VERSIONS, require_client_cert=True,
                   trusted_client_ca=[ca_dir / "cacert.crt"], version_payload=versions.server_version_payload())

    @app.api.route("/agents/")
    async def agents() -> Response:
        return ok({"uuids": []})

    ctx = tls.server_context(ca_dir / "server-cert.crt", ca_dir / "server-private.pem",
                             client_ca_files=[ca_dir / "cacert.crt"], mode="optional",
                             crl_files=[ca_dir / "cacrl.pem"])
    host, port = await nursery.start(partial(serve, app, ssl_context=ctx, graceful_timeout=0.5))
    flags = ["--registrar", f"{host}:{port}", "--verifier", f"{host}:{port}", "--tls-dir", str(ca_dir)]
    good = tmp_path / "good.toml"
    good.write_text("[tenant]\nrequest_timeout = 5.0\n")
    code, out, err = await Cli(good, flags)("list", "--json")
    assert code == 0, err
    assert json.loads(out) == {"registrar": [], "verifier": []}
    revoked = tmp_path / "revoked.toml"
    revoked.write_text('[tenant]\nrequest_timeout = 5.0\nclient_cert = "ops-cert.crt"\nclient_key = "ops-private.pem"\n')
    line = await Cli(revoked, flags).fails(3, "list", match="cannot talk to the registrar")
    assert "as revoked: issue a new one" in line


async def test_progress_spinner_on_a_tty() -> None:
    from keytrio.actors.tenant.progress import Progress

    buf = io.StringIO()
    p = Progress(buf, tty=True, interval=0.01)
    async with p.step("waiting for Get Quote"):
        await trio.sleep(0.05)
    text = buf.getvalue()
    assert "\r| waiting for Get Quote" in text and text.endswith("\r\x1b[K")
    # an error inside a step reaches the caller as itself (not inside an ExceptionGroup)
    with pytest.raises(Refused):
        async with p.step("failing"):
            raise Refused("verifier", 409, "exists")
    assert buf.getvalue().endswith("\r\x1b[K")
    plain = io.StringIO()
    async with Progress(plain).step("waiting"):  # StringIO is not a TTY: one plain line
        pass
    assert plain.getvalue() == "waiting ...\n"


def test_tpm_policy_and_default_config() -> None:
    assert cli_args.tpm_policy_from(["7=AB", "7=0xcd", "16=00"], None) == {"7": ["ab", "cd"], "16": ["00"], "mask": "0x0"}
    assert cli_args.tpm_policy_from([], None) is None
    out = io.StringIO()
    args = tenant_parser().parse_args(["tenant", "--print-default-config"])
    assert trio.run(partial(tenant_cli.run, args, out=out, env={})) == 0
    assert "[tenant]" in out.getvalue() and "registrar_tls_port = 8891" in out.getvalue()


def test_status_text_names_severities_and_the_algorithm_triple() -> None:
    ver = {"operational_state": states.INVALID_QUOTE, "last_event_id": "pcr_validation.invalid_pcr_15",
           "severity_level": 4, "attestation_count": 3, "hash_alg": "sha384", "enc_alg": "ecc384",
           "sign_alg": "ecschnorr", "accept_tpm_hash_algs": ["sha384"], "accept_tpm_encryption_algs": ["ecc"],
           "accept_tpm_signing_algs": ["ecschnorr", "rsassa"], "verifier_id": "default",
           "verifier_ip": "127.0.0.1", "verifier_port": 8881, "tpm_policy": "{}"}
    text = cli_output.format_status({"agent_id": "a.b-c_1", "registrar": None, "verifier": ver})
    assert "last event   pcr_validation.invalid_pcr_15 (severity critical)" in text
    assert "algorithms   hash sha384, encryption ecc384, signing ecschnorr" in text
    assert "accepted     hash sha384; encryption ecc; signing ecschnorr,rsassa" in text
    assert [cli_output.severity_name(n) for n in (0, 1, 2, 3, 4, 5, 6, 9, None, True)] == [
        "info", "notice", "warning", "error", "critical", "alert", "emergency", "level 9", "none", "none"]
    quiet = cli_output.format_status({"agent_id": "x", "registrar": None,
                                      "verifier": {**ver, "last_event_id": None, "severity_level": None}})
    assert "last event   none" in quiet
