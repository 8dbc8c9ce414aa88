"""The server-components certificate authority (`keytrio ca`), in upstream Keylime's cv_ca layout.

A CA directory holds the CA (``cacert.crt``, ``ca-private.pem``), the certificates it issued
(``<name>-cert.crt`` / ``<name>-private.pem``; the default layout uses upstream's names
``server-*``, ``client-*`` and ``RevocationNotifier-*``), an index of what was issued
(``index.json``) and the certificate revocation list (``cacrl.pem``) that servers load to refuse
revoked client certificates. Private keys are written 0600, the directory 0700, whatever the umask.

A key per door (extended key usage): a server certificate is for serverAuth only, a client
certificate (tenant, verifier) for clientAuth only, and the revocation notifier's certificate
for :data:`REVOCATION_SIGNING` only, a keytrio purpose that no TLS stack accepts. The notifier's
private key is handed to the verifier (and stored in its database) to sign revocation notices;
with no TLS purpose it cannot log in anywhere, while agents, keytrio's and upstream's alike, only
use its public key to check a notice's signature. Upstream's cv_ca issues every leaf without an
extended key usage, so its notifier certificate is also a TLS client certificate.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keytrio.actors.common.private_files import private_dir, write_private

CA_CERT, CA_KEY, CRL, INDEX = "cacert.crt", "ca-private.pem", "cacrl.pem", "index.json"
Kind = Literal["server", "client", "revocation"]

#: The revocation notifier's purpose: "keytrio revocation-notice signing", an OID in the 2.25
#: (UUID, ITU-T X.667) arc, so it needs no registration and means nothing to any other software.
#: A private purpose rather than emailProtection or codeSigning: those are trusted for S/MIME or
#: code elsewhere, and the notifier key should open no door at all.
REVOCATION_SIGNING = x509.ObjectIdentifier("2.25.38613450585174001958753112755116779306")

_PURPOSES: dict[str, list[x509.ObjectIdentifier]] = {
    "server": [ExtendedKeyUsageOID.SERVER_AUTH],
    "client": [ExtendedKeyUsageOID.CLIENT_AUTH],
    "revocation": [REVOCATION_SIGNING],
}


class CaError(Exception):
    """A CA operation cannot be done (no CA, a name in use, an unknown certificate, ...)."""


@dataclass(frozen=True)
class Issued:
    name: str
    kind: str
    serial: int
    not_after: str
    revoked: bool
    cert: Path
    key: Path


#: the longest validity asked of ``--days`` (X.509's GeneralizedTime ends in 9999; this is a mistake long before)
MAX_DAYS = 36500


def _check_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise CaError(f"--days {days!r}: a validity of 1 to {MAX_DAYS} days")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_key(path: Path, key: Any) -> None:
    write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))


def make_leaf(ca_cert: x509.Certificate, ca_key: Any, name: str, kind: Kind, *,
              ips: tuple[str, ...] = (), dns: tuple[str, ...] = (), days: int = 825,
              ) -> tuple[x509.Certificate, Any]:
    """A leaf certificate + its new private key for ``kind`` (the purposes above), signed by the CA.

    Used by :meth:`Authority.issue` and by the testbed's CA, so both issue the same certificates.
    """
    if kind not in _PURPOSES:
        raise CaError(f"unknown certificate kind {kind!r}")
    parsed_ips = []
    for ip in ips:
        try:
            parsed_ips.append(ipaddress.ip_address(ip))
        except ValueError:
            raise CaError(f"not an IP address: {ip!r}") from None
    # Revocation notices are RSA-PSS signed (PROTOCOL.md), so the notifier key is RSA.
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048) if kind == "revocation" \
        else ec.generate_private_key(ec.SECP256R1())
    signing = kind == "revocation"
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        # never past the CA's own end (a leaf for the CA's whole life, issued a moment after it)
        .not_valid_after(min(_now() + datetime.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),
                       critical=False)  # type: ignore[arg-type]
        # TLS needs digitalSignature (ECDHE), the notifier only signs notices
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(_PURPOSES[kind]), critical=signing)
    )
    if kind == "server" or (ips or dns):
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
        sans += [x509.IPAddress(ip) for ip in parsed_ips]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    hash_alg = hashes.SHA384() if isinstance(ca_key, ec.EllipticCurvePrivateKey) and ca_key.curve.key_size >= 384 \
        else hashes.SHA256()
    return builder.sign(ca_key, hash_alg), key


class Authority:
    """One CA directory. ``Authority.init(dir)`` creates it; ``Authority(dir)`` opens it."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        if not (self.dir / CA_CERT).is_file() or not (self.dir / CA_KEY).is_file():
            raise CaError(f"{self.dir}: no CA here (run `keytrio ca init --dir {self.dir}`)")
        self.cert = x509.load_pem_x509_certificate((self.dir / CA_CERT).read_bytes())
        self._key = serialization.load_pem_private_key((self.dir / CA_KEY).read_bytes(), password=None)

    @classmethod
    def init(cls, directory: Path, *, common_name: str = "keytrio CA", days: int = 3650,
             default_layout: bool = True, server_ips: tuple[str, ...] = ("127.0.0.1",),
             server_dns: tuple[str, ...] = ("localhost",)) -> Authority:
        """Create a CA; with ``default_layout`` also upstream's server, client and notifier pairs."""
        _check_days(days)
        d = Path(directory)
        if (d / CA_CERT).exists():
            raise CaError(f"{d}: a CA already exists")
        private_dir(d)
        key = ec.generate_private_key(ec.SECP384R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "keytrio")])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(minutes=5))
            .not_valid_after(_now() + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA384())
        )
        _write_key(d / CA_KEY, key)
        (d / CA_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (d / INDEX).write_text("[]\n")
        ca = cls(d)
        ca.write_crl()
        if default_layout:  # the usual 825 days, or the CA's own validity when that is shorter
            leaf_days = min(825, days)
            ca.issue("server", "server", ips=server_ips, dns=server_dns, days=leaf_days)
            ca.issue("client", "client", days=leaf_days)
            ca.issue("RevocationNotifier", "revocation", days=leaf_days)
        return ca

    # -- index ----------------------------------------------------------------------------------

    def _index(self) -> list[dict[str, Any]]:
        return json.loads((self.dir / INDEX).read_text())

    def _save_index(self, entries: list[dict[str, Any]]) -> None:
        tmp = self.dir / (INDEX + ".tmp")
        tmp.write_text(json.dumps(entries, indent=1) + "\n")
        tmp.replace(self.dir / INDEX)

    def list(self) -> list[Issued]:
        return [Issued(e["name"], e["kind"], e["serial"], e["not_after"], e["revoked"],
                       self.dir / f"{e['name']}-cert.crt", self.dir / f"{e['name']}-private.pem")
                for e in self._index()]

    # -- issuing --------------------------------------------------------------------------------

    def issue(self, name: str, kind: Kind, *, ips: tuple[str, ...] = (), dns: tuple[str, ...] = (),
              days: int = 825) -> Issued:
        """Issue ``<name>-cert.crt`` + ``<name>-private.pem`` for a server, a client or the notifier."""
        if not name or "/" in name or name.startswith("."):
            raise CaError(f"bad certificate name {name!r}")
        if any(e["name"] == name and not e["revoked"] for e in self._index()):
            raise CaError(f"a certificate named {name!r} exists (revoke it first)")
        if kind == "server" and not (ips or dns):
            raise CaError("a server certificate needs at least one --ip or --dns")
        _check_days(days)
        ca_until = self.cert.not_valid_after_utc
        # a day's slack: "as long as the CA" asked right after it was made is capped (make_leaf)
        if _now() + datetime.timedelta(days=days) > ca_until + datetime.timedelta(days=1):
            left = max((ca_until - _now()).days, 0)
            raise CaError(f"--days {days}: the CA itself is valid until {ca_until:%Y-%m-%d} ({left} days): "
                          "a certificate it issues must not outlive it")
        cert, key = make_leaf(self.cert, self._key, name, kind, ips=ips, dns=dns, days=days)
        serial = cert.serial_number
        cert_path, key_path = self.dir / f"{name}-cert.crt", self.dir / f"{name}-private.pem"
        _write_key(key_path, key)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        entries = [e for e in self._index() if e["name"] != name]
        entries.append({"name": name, "kind": kind, "serial": serial,
                        "not_after": cert.not_valid_after_utc.isoformat(), "revoked": False})
        self._save_index(entries)
        return self.list()[-1]

    # -- revocation -----------------------------------------------------------------------------

    def revoke(self, name_or_serial: str) -> Issued:
        entries = self._index()
        for e in entries:
            if e["name"] == name_or_serial or str(e["serial"]) == name_or_serial:
                if e["revoked"]:
                    raise CaError(f"{e['name']} is already revoked")
                e["revoked"] = True
                e["revoked_at"] = _now().isoformat()
                self._save_index(entries)
                self.write_crl()
                return next(i for i in self.list() if i.serial == e["serial"])
        raise CaError(f"no certificate {name_or_serial!r} in {self.dir}")

    def write_crl(self) -> Path:
        now = _now()
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
                   .last_update(now - datetime.timedelta(minutes=5))
                   .next_update(now + datetime.timedelta(days=30)))
        for e in self._index():
            if e["revoked"]:
                when = datetime.datetime.fromisoformat(e.get("revoked_at", now.isoformat()))
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder().serial_number(e["serial"]).revocation_date(when).build())
        crl = builder.sign(self._key, hashes.SHA384())  # type: ignore[arg-type]
        path = self.dir / CRL
        path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        return path
