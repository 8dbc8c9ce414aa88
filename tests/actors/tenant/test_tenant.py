"""The tenant library against a real registrar, a real verifier (actor: monitor + V delivery) and
real agents on swtpm, all over mTLS."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

from keytrio.actors.tenant import (
    ConnectionProblem,
    Refused,
    Tenant,
    UsageError,
    VerificationFailed,
    make_payload,
)
from keytrio.actors.tenant.add import verify_key, wait_for
from keytrio.actors.tenant.ekcheck import check_ek, load_trust_store
from keytrio.actors.tenant.payload import REVOCATION_CERT, add_files
from keytrio.protocol import payload as pl
from keytrio.protocol import states
from keytrio.protocol.runtime_policy import policy_document
from keytrio.testbed.swtpm_state import ek_ca_certs
from tests.actors.agent_support import results
from tests.actors.registrar_support import (
    EkCa,
    SoftTpm,
    b64,
)
from tests.actors.tenant_support import AGENT_ID, OTHER_ID, World
from tests.ports import free_port

pytestmark = pytest.mark.swtpm

async def _verifier_ids(w: World) -> list[str]:
    async with w.tenant() as t:
        return await t.list()


# --- the add flow end to end ------------------------------------------------------------------------


async def test_add_end_to_end_and_operations(
    world: World, nursery: trio.Nursery, swtpm: Any, tmp_path: Path, pki: Any
) -> None:
    w = world
    r = await w.agent(nursery, swtpm.tcti, enable_autorun=True)
    marker = tmp_path / "autorun.log"
    src = tmp_path / "payload"
    (src / "conf").mkdir(parents=True)
    (src / "conf" / "app.txt").write_text("hello")
    zipped = make_payload(src, autorun=f"echo ran >> {marker}\n")

    async with w.tenant() as t:
        # an EK trust store of another CA: refused before anything reaches agent or verifier
        other = EkCa.new().write(tmp_path / "other-ek-ca")
        with pytest.raises(VerificationFailed, match="EK certificate"):
            await t.add(AGENT_ID, ek_trust_store=[other], payload=zipped)
        assert await t.list() == []
        assert (await r.get("/keys/verify", challenge="abc")).status_code == 400  # no U arrived

        res = await t.add(
            AGENT_ID,
            tpm_policy={"mask": "0x0"},
            payload=zipped,
            revocation_key_pem=pki.agent.key.read_text(),
            revocation_cert_pem=pki.agent.pem,
            metadata={"owner": "tests"},
            ek_trust_store=ek_ca_certs(swtpm.state_dir),
            timeout=15.0,
        )
        assert res.verified and res.operational_state == states.GET_QUOTE
        assert (res.agent_version, res.registrar_version, res.verifier_version) == ("2.1", "2.5", "2.5")
        assert res.nk_pem == r.info.nk_pem and res.hash_alg == "sha256"

        # the agent really holds K (independent of the tenant's own check), and a wrong K fails
        got = results(await r.get("/keys/verify", challenge="indep123"))["hmac"]
        assert got == pl.verify_hmac(res.k, "indep123")
        assert got != pl.verify_hmac(bytes(32), "indep123")
        async with t.agent("127.0.0.1", r.info.address[1], r.info.mtls_cert) as agent_peer:
            with pytest.raises(VerificationFailed, match="does not match K"):
                await verify_key(t, agent_peer, bytes(32), timeout=0.3)

        # payload: unpacked with the revocation cert, autorun.sh ran exactly once
        assert r.agent.runner is not None
        with trio.fail_after(10):
            await r.agent.runner.wait_completed(1)
        unzipped = r.data_dir / "secure" / "unzipped"
        assert (unzipped / "conf" / "app.txt").read_text() == "hello"
        assert (unzipped / REVOCATION_CERT).read_text() == pki.agent.pem
        # two more full attestations (each a quote from the agent): still one run
        seen = (await t.status(AGENT_ID))["verifier"]["attestation_count"]
        with trio.fail_after(10):
            while (await t.status(AGENT_ID))["verifier"]["attestation_count"] < seen + 2:
                await trio.sleep(0.05)
        assert r.agent.runner.completed == 1 and marker.read_text() == "ran\n"

        # status: registrar record + verifier record, state named; attestation continues
        st = await t.status(AGENT_ID)
        assert st["registrar"]["aik_tpm"] == b64(r.info.ak_public)
        assert st["operational_state_name"] == "Get Quote"
        assert st["verifier"]["meta_data"] == '{"owner": "tests"}'
        count = st["verifier"]["attestation_count"]
        with trio.fail_after(10):
            while (await t.status(AGENT_ID))["verifier"]["attestation_count"] <= count:
                await trio.sleep(0.1)

        # enrolling twice: the verifier says 409
        with pytest.raises(Refused) as exc:
            await t.add(AGENT_ID, verify=False, wait_for_state=None)
        assert exc.value.status_code == 409 and exc.value.peer == "verifier"

        # waiting for a state that does not come: the timeout names what was seen
        with pytest.raises(VerificationFailed, match=r"not Provide V after 0.3 s \(seen: Get Quote\)"):
            await wait_for(t, AGENT_ID, states.PROVIDE_V, timeout=0.3)

        await t.stop(AGENT_ID)
        assert (await t.status(AGENT_ID))["operational_state_name"] == "Tenant Quote Failed"
        with pytest.raises(VerificationFailed, match="reached Tenant Quote Failed instead of Get Quote"):
            await wait_for(t, AGENT_ID, states.GET_QUOTE, timeout=5)
        await t.reactivate(AGENT_ID)
        with trio.fail_after(10):
            while (await t.status(AGENT_ID))["operational_state"] != states.GET_QUOTE:
                await trio.sleep(0.05)
        assert await t.list() == [AGENT_ID] and await t.list("default") == [AGENT_ID]
        assert await t.list("elsewhere") == []

        await t.delete(AGENT_ID)
        st = await t.status(AGENT_ID)
        assert st["verifier"] is None and st["operational_state"] is None and st["registrar"] is not None
        with pytest.raises(Refused) as exc:
            await t.stop(AGENT_ID)
        assert exc.value.status_code == 404

        # re-add after delete works (no payload this time)
        res2 = await t.add(AGENT_ID, timeout=15.0)
        assert res2.verified and res2.k != res.k
        await t.delete(AGENT_ID)

        await t.regdelete(AGENT_ID)
        assert await t.reglist() == []
        with pytest.raises(Refused) as exc:
            await t.status(AGENT_ID)
        assert exc.value.status_code == 404
    await r.stop()


async def test_runtime_policy_enrolment_quotes_pcr10_and_empty_filter_lists_all(
    world: World, nursery: trio.Nursery, swtpm: Any, swtpm_factory: Any
) -> None:
    """What upstream's verifier needs from our tenant, and upstream's tenant from our verifier:
    an enrolment with a runtime policy (inline or by name) carries PCR 10 in tpm_policy's mask,
    since upstream's verifier quotes only the mask's PCRs and so would never check the IMA list;
    ``GET /agents/?verifier=`` (empty, as ``keylime_tenant -c cvlist`` sends it) lists every agent."""
    w = world
    other_tpm = await swtpm_factory(fresh=False)
    agents = {aid: await w.agent(nursery, tcti, aid) for aid, tcti in
              ((AGENT_ID, swtpm.tcti), (OTHER_ID, other_tpm.tcti))}
    policy = json.dumps(policy_document(meta={"version": 1, "generator": 3},
                                        digests={"/usr/bin/x": ["ab" * 32]}))
    async with w.tenant() as t:
        await t.policy_add("named", policy.encode())
        await t.add(AGENT_ID, runtime_policy=policy, tpm_policy={"mask": "0x1"}, verify=False, wait_for_state=None)
        await t.add(OTHER_ID, runtime_policy_name="named", verify=False, wait_for_state=None)
        masks = {aid: int(json.loads((await t.status(aid))["verifier"]["tpm_policy"])["mask"], 16)
                 for aid in agents}
        assert masks == {AGENT_ID: 1 | 1 << 10, OTHER_ID: 1 << 10}, {a: hex(m) for a, m in masks.items()}

        verifier = await t.ready(t.verifier)
        listed = (await verifier.call("GET", "/agents/", params={"verifier": ""})).results["uuids"]
        assert sorted(listed) == sorted([[AGENT_ID], [OTHER_ID]]), listed
        assert sorted(await t.list("")) == sorted(agents)
        assert await t.list("elsewhere") == []
        for aid in agents:
            await t.delete(aid)
    for r in agents.values():
        await r.stop()


# --- forged identities ---------------------------------------------------------------------------


async def test_forged_identity_is_refused_and_nothing_enrolled(
    world: World, nursery: trio.Nursery, swtpm: Any, swtpm_factory: Any
) -> None:
    w = world
    r = await w.agent(nursery, swtpm.tcti)
    other_tpm = await swtpm_factory(fresh=False)
    other = await w.agent(nursery, other_tpm.tcti, OTHER_ID)
    assert other.info.ak_public != r.info.ak_public
    good_ak = b64(r.info.ak_public)

    async with w.tenant() as t:
        # the registrar's AK is another TPM's: the identity quote does not verify
        await w.set_registrar(AGENT_ID, aik_tpm=b64(other.info.ak_public))
        with pytest.raises(VerificationFailed, match=r"identity quote.*signature"):
            await t.add(AGENT_ID, timeout=5.0)
        assert await t.list() == []
        assert (await r.get("/keys/verify", challenge="abc")).status_code == 400  # U never sent

        # the right AK but PCR 16 no longer binds the NK (something extended it)
        await w.set_registrar(AGENT_ID, aik_tpm=good_ak)
        assert r.agent.tpm is not None
        await r.agent.tpm.extend(16, {"sha256": bytes(range(32))})
        with pytest.raises(VerificationFailed, match="PCR 16") as exc:
            await t.add(AGENT_ID, timeout=5.0)
        assert exc.value.context["failures"] == ["pcr_validation.invalid_pcr_16"]
        assert await t.list() == []
        assert (await r.get("/keys/verify", challenge="abc")).status_code == 400

        # the other agent, untouched, still enrols fine through the same tenant
        res = await t.add(OTHER_ID, timeout=15.0)
        assert res.verified
        assert await t.list() == [OTHER_ID]
    await r.stop()
    await other.stop()


# --- errors without a TPM ------------------------------------------------------------------------


async def test_error_classes(world: World, pki: Any) -> None:
    w = world
    soft = SoftTpm.new()
    port = free_port()  # nothing listens there: the "agent" is unreachable
    await w.registrar.enroll(AGENT_ID, soft, mtls_cert=pki.agent.pem, port=port)

    dead = f"https://127.0.0.1:{free_port()}"
    async with w.tenant(verifier_url=dead) as t:
        with pytest.raises(ConnectionProblem) as cexc:
            await t.add(AGENT_ID)
        assert cexc.value.peer == "verifier" and cexc.value.exit_code == 3
        with pytest.raises(ConnectionProblem):
            await t.list()

    async with w.tenant() as t:
        with pytest.raises(ConnectionProblem) as cexc:  # registered, but nobody answers there
            await t.add(AGENT_ID)
        assert cexc.value.peer == "agent"
        with pytest.raises(Refused) as rexc:  # unknown to the registrar
            await t.add(OTHER_ID)
        assert (rexc.value.peer, rexc.value.status_code, rexc.value.exit_code) == ("registrar", 404, 5)
        with pytest.raises(Refused) as rexc:
            await t.reactivate(OTHER_ID)
        assert rexc.value.status_code == 404
        for bad in ("not an id", "a/b", "x" * 81, ".."):  # outside upstream's [\w.-]+: no request made
            with pytest.raises(UsageError, match="agent id"):
                await t.add(bad)
        with pytest.raises(Refused) as rexc:  # 'not-an-id' is an id (upstream's rule), unknown here
            await t.add("not-an-id")
        assert rexc.value.status_code == 404
        with pytest.raises(UsageError):
            await t.add(AGENT_ID, tpm_policy={"mask": "0x0", "25": ["00"]})
        with pytest.raises(UsageError):
            await t.add(AGENT_ID, runtime_policy=b"not json")
        assert await t.list() == []

    # a client cert from another CA: the handshake fails (no HTTP answer), a ConnectionProblem
    async with Tenant(w.registrar.https_url, w.verifier_url, ca_files=[pki.ca],
                      client_cert=pki.other_client.cert, client_key=pki.other_client.key) as t:
        with pytest.raises(ConnectionProblem):
            await t.list()
    with pytest.raises(UsageError):
        Tenant(w.registrar.https_url, w.verifier_url, ca_files=[pki.ca],
               client_cert=pki.client.cert, client_key=pki.other_client.key)


def test_ek_check_and_payload_helpers(tmp_path: Path) -> None:
    ca, other = EkCa.new(), EkCa.new("Other Vendor")
    soft = SoftTpm.new()
    cert = b64(ca.issue(soft.ek_key.public_key()))
    store = load_trust_store([ca.write(tmp_path / "ca")])
    check_ek(cert, soft.ek_tpm, store)
    with pytest.raises(VerificationFailed, match="trust store"):
        check_ek(cert, soft.ek_tpm, load_trust_store([other.write(tmp_path / "other")]))
    with pytest.raises(VerificationFailed, match="not the registered EK"):
        check_ek(cert, SoftTpm.new().ek_tpm, store)
    with pytest.raises(VerificationFailed, match="no EK certificate"):
        check_ek(None, soft.ek_tpm, store)
    with pytest.raises(UsageError):
        load_trust_store([tmp_path / "empty-does-not-exist"])

    import io
    import zipfile

    single = tmp_path / "one.sh"
    single.write_text("x")
    z = add_files(make_payload(single, autorun="echo hi"), {"a/b.txt": "b"})
    with zipfile.ZipFile(io.BytesIO(z)) as zf:
        assert sorted(zf.namelist()) == ["a/b.txt", "autorun.sh", "one.sh"]
        assert zf.getinfo("autorun.sh").external_attr >> 16 & 0o777 == 0o755
    with pytest.raises(UsageError):
        make_payload(extra={"../evil": b""})


def test_trust_store_directory_reads_certificates_only(tmp_path: Path) -> None:
    """An swtpm-localca-like directory: certificates beside keys, a serial counter, a config file,
    a lock file and a subdirectory. The certificates are read; the rest is named in one warning."""
    from cryptography.hazmat.primitives import serialization

    ca = EkCa.new()
    soft = SoftTpm.new()
    d = ca.write(tmp_path / "localca", "rootca-cert.pem").parent
    (d / "signkey.pem").write_bytes(ca.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (d / "certserial").write_text("3")
    (d / "swtpm-localca.conf").write_text("statedir = x\n")
    (d / ".lock.swtpm-localca").write_bytes(b"")
    (d / "sub").mkdir()
    (d / "vendor.der").write_bytes(ca.cert.public_bytes(serialization.Encoding.DER))
    warnings: list[str] = []
    store = load_trust_store([d], warn=warnings.append)
    assert store == [ca.cert, ca.cert]  # rootca-cert.pem and vendor.der
    assert warnings == [f"EK trust store {d}: skipped 4 file(s) holding no certificate: "
                        ".lock.swtpm-localca, certserial, signkey.pem, swtpm-localca.conf"]
    check_ek(b64(ca.issue(soft.ek_key.public_key())), soft.ek_tpm, store)
    # a file named on its own must be a certificate file
    for bad in ("signkey.pem", "certserial", "nothing-here"):
        with pytest.raises(UsageError, match=f"EK trust store file .*{bad}"):
            load_trust_store([d / bad])
    # a directory of no certificate at all
    with pytest.raises(UsageError, match="holds no certificate"):
        load_trust_store([d / "sub"], warn=warnings.append)
