"""`keytrio ca`: init in the cv_ca layout, issue, list, revoke; a server loading the CRL refuses a
revoked client certificate at the handshake (real TLS sockets); one purpose per certificate
(extended key usage), the same for the testbed's CA (tests/actors/common/test_key_doors.py walks every
key against every door)."""

import stat
from pathlib import Path

import httpx
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from keytrio.actors.ca.authority import REVOCATION_SIGNING, Authority, CaError
from keytrio.actors.common import tls
from keytrio.actors.common.app import make_app, ok
from keytrio.actors.common.serve import serve
from keytrio.protocol import revocation, versions
from keytrio.scenarios.cli import main
from keytrio.testbed.pki import make_cv_ca

LAYOUT = ["RevocationNotifier-cert.crt", "RevocationNotifier-private.pem", "ca-private.pem", "cacert.crt",
          "cacrl.pem", "client-cert.crt", "client-private.pem", "index.json", "server-cert.crt",
          "server-private.pem"]


def test_cli_init_issue_list_revoke(tmp_path: Path, capsys):
    d = tmp_path / "cv_ca"
    assert main(["ca", "init", "--dir", str(d), "--ip", "127.0.0.1", "--dns", "verifier.example"]) == 0
    assert sorted(p.name for p in d.iterdir()) == LAYOUT
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for key in d.glob("*-private.pem"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    server = x509.load_pem_x509_certificate((d / "server-cert.crt").read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "verifier.example" in sans.get_values_for_type(x509.DNSName)
    notifier = x509.load_pem_x509_certificate((d / "RevocationNotifier-cert.crt").read_bytes())
    assert notifier.public_key().key_size == 2048  # RSA: notices are RSA-PSS signed
    ca = x509.load_pem_x509_certificate((d / "cacert.crt").read_bytes())
    server.verify_directly_issued_by(ca)

    assert main(["ca", "init", "--dir", str(d)]) == 2  # never overwrite a CA
    assert main(["ca", "issue", "--dir", str(d), "--client", "ops"]) == 0
    assert main(["ca", "issue", "--dir", str(d), "--client", "ops"]) == 2  # name in use
    assert main(["ca", "issue", "--dir", str(d), "--server", "reg"]) == 2  # no SAN
    assert main(["ca", "revoke", "--dir", str(d), "ops"]) == 0
    assert main(["ca", "revoke", "--dir", str(d), "ops"]) == 2
    capsys.readouterr()
    long_name = "a-rather-long-client-name-for-the-tenant"
    assert main(["ca", "issue", "--dir", str(d), "--client", long_name]) == 0
    capsys.readouterr()
    assert main(["ca", "list", "--dir", str(d)]) == 0
    out = capsys.readouterr().out
    assert "ops" in out and "revoked" in out and out.count("valid") >= 3
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "SERIAL", "EXPIRES", "STATE"]
    # every column starts where its header does, whatever the lengths of names and serials
    starts = [lines[0].index(h) for h in ("KIND", "SERIAL", "EXPIRES", "STATE")]
    for line in lines[1:]:
        assert all(line[s - 1] == " " and line[s] != " " for s in starts), (line, starts)
    assert any(line.startswith(long_name + "  ") for line in lines)
    crl = x509.load_pem_x509_crl((d / "cacrl.pem").read_bytes())
    ops = next(i for i in Authority(d).list() if i.name == "ops")
    assert crl.get_revoked_certificate_by_serial_number(ops.serial) is not None
    assert main(["ca", "list", "--dir", str(tmp_path / "nothing")]) == 2
    with pytest.raises(CaError):
        Authority(d).issue("../evil", "client")


def test_validity_days_are_checked(tmp_path: Path, capsys):
    """--days out of range once ended in a traceback (cryptography's ValueError for <= 0,
    OverflowError past year 9999); a certificate outliving its CA is refused too."""
    d = tmp_path / "cv_ca"
    assert main(["ca", "init", "--dir", str(d)]) == 0
    capsys.readouterr()
    for days in ("-5", "0", "99999999", "36501"):
        assert main(["ca", "issue", "--dir", str(d), "--client", f"c{days}", "--days", days]) == 2
        assert capsys.readouterr().err.strip() == f"keytrio ca: --days {days}: a validity of 1 to 36500 days"
    assert main(["ca", "issue", "--dir", str(d), "--client", "long", "--days", "3652"]) == 2
    assert "a certificate it issues must not outlive it" in capsys.readouterr().err
    assert main(["ca", "issue", "--dir", str(d), "--client", "short", "--days", "1"]) == 0
    assert main(["ca", "issue", "--dir", str(d), "--client", "whole", "--days", "3650"]) == 0  # the CA's life
    assert [i.name for i in Authority(d).list() if i.kind == "client"] == ["client", "short", "whole"]
    whole = x509.load_pem_x509_certificate((d / "whole-cert.crt").read_bytes())
    assert whole.not_valid_after_utc <= Authority(d).cert.not_valid_after_utc
    with pytest.raises(CaError, match="a validity of 1 to 36500 days"):
        Authority.init(tmp_path / "other", days=0)
    assert not (tmp_path / "other").exists()
    short = Authority.init(tmp_path / "short", days=30)  # its default pairs live as long as it
    leaf = x509.load_pem_x509_certificate((tmp_path / "short" / "client-cert.crt").read_bytes())
    assert leaf.not_valid_after_utc <= short.cert.not_valid_after_utc


async def test_server_with_crl_refuses_revoked_client(tmp_path: Path):
    ca = Authority.init(tmp_path / "cv_ca")
    good = ca.issue("tenant-a", "client")
    bad = ca.issue("tenant-b", "client")
    ca.revoke("tenant-b")
    app = make_app("crl-test", versions=versions.SERVER_VERSIONS, require_client_cert=True,
                   trusted_client_ca=[str(ca.dir / "cacert.crt")])

    @app.api.route("/agents/")
    async def agents():
        return ok({"uuids": []})

    ctx = tls.server_context(ca.dir / "server-cert.crt", ca.dir / "server-private.pem",
                             client_ca_files=[ca.dir / "cacert.crt"], mode="optional",
                             crl_files=[ca.dir / "cacrl.pem"])
    async with trio.open_nursery() as n:
        host, port = await n.start(lambda task_status: serve(app, port=0, ssl_context=ctx, task_status=task_status))
        url = f"https://{host}:{port}/v2.1/agents/"

        def client(files):
            return httpx.AsyncClient(verify=tls.client_context([ca.dir / "cacert.crt"], files.cert, files.key),
                                     timeout=5)

        async with client(good) as c:
            r = await c.get(url)
            assert r.status_code == 200, r.text
        async with client(bad) as c:
            with pytest.raises(httpx.TransportError):
                await c.get(url)
        async with httpx.AsyncClient(verify=tls.client_context([ca.dir / "cacert.crt"]), timeout=5) as c:
            r = await c.get(f"https://{host}:{port}/version")  # public, no cert: CRL check does not apply
            assert r.status_code in (200, 404)
        n.cancel_scope.cancel()


def _eku(path: Path) -> tuple[list[x509.ObjectIdentifier], bool]:
    ext = x509.load_pem_x509_certificate(path.read_bytes()).extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    return list(ext.value), ext.critical


def test_one_purpose_per_certificate_ca_and_testbed(tmp_path: Path, capsys):
    """`keytrio ca` and the testbed's CA issue the same leaves: server serverAuth only, client
    clientAuth only, notifier keytrio's revocation-signing purpose only (critical: no other use),
    and a notice signed with the notifier key verifies against its certificate."""
    d = tmp_path / "cv_ca"
    assert main(["ca", "init", "--dir", str(d)]) == 0
    assert main(["ca", "issue", "--dir", str(d), "--notifier", "notifier-2"]) == 0
    testbed = make_cv_ca(tmp_path / "testbed")
    layouts = [
        (d / "server-cert.crt", d / "client-cert.crt", d / "RevocationNotifier-cert.crt", d / "RevocationNotifier-private.pem"),
        (None, None, d / "notifier-2-cert.crt", d / "notifier-2-private.pem"),
        (testbed.server_cert, testbed.client_cert, testbed.revocation_cert, testbed.revocation_key),
    ]
    for server, client, notifier, notifier_key in layouts:
        if server is not None and client is not None:
            assert _eku(server) == ([ExtendedKeyUsageOID.SERVER_AUTH], False)
            assert _eku(client) == ([ExtendedKeyUsageOID.CLIENT_AUTH], False)
        assert _eku(notifier) == ([REVOCATION_SIGNING], True)
        cert = x509.load_pem_x509_certificate(notifier.read_bytes())
        key = serialization.load_pem_private_key(notifier_key.read_bytes(), password=None)
        msg = revocation.build_message(agent_id="a", ip="127.0.0.1", port=1, tpm_policy="{}", meta_data="{}",
                                       event_time="now", event_id="e", severity_label="critical", context={})
        assert revocation.verify_notice(cert, msg, revocation.sign_message(key, msg))["event_id"] == "e"  # type: ignore[arg-type]
    assert "notifier-2" in (d / "index.json").read_text()


@pytest.mark.parametrize("require_eku", [False, True])
def test_client_cert_purpose_rule(tmp_path: Path, require_eku: bool):
    ca = Authority.init(tmp_path / "cv_ca")

    def cert(name: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate((ca.dir / f"{name}-cert.crt").read_bytes())

    assert tls.client_cert_purpose(cert("client"), require_eku=require_eku) is None
    assert "clientAuth" in (tls.client_cert_purpose(cert("server"), require_eku=require_eku) or "")
    assert "clientAuth" in (tls.client_cert_purpose(cert("RevocationNotifier"), require_eku=require_eku) or "")
    bare = x509.load_pem_x509_certificate((ca.dir / "cacert.crt").read_bytes())  # no EKU at all
    assert (tls.client_cert_purpose(bare, require_eku=require_eku) is None) is not require_eku
