"""protocol.ekcert: decoding (PEM, base64 DER, padded NV reads), EK matching, direct issuance."""

import base64
import datetime

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st
from tpm2_pytss.types import TPM2B_PUBLIC

from keytrio.protocol import ekcert
from keytrio.protocol.errors import DecodeError


def _issue(ca_cert, ca_key, key, *, name="ek"):
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1)).sign(ca_key, hashes.SHA256()))


@pytest.fixture(scope="module")
def world():
    ca = trustme.CA()
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    other = trustme.CA()
    ek_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = _issue(ca_cert, ca_key, ek_key)
    pem = ek_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    ek_public = TPM2B_PUBLIC.from_pem(pem)
    return ca_cert, x509.load_pem_x509_certificate(other.cert_pem.bytes()), cert, ek_public


def test_parse_forms_and_padding(world):
    _, _, cert, _ = world
    der = cert.public_bytes(serialization.Encoding.DER)
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    for form in (pem, base64.b64encode(der).decode(), base64.b64encode(pem.encode()).decode(),
                 base64.b64encode(der + b"\xff" * 37).decode()):  # NV reads carry padding
        assert ekcert.parse(form) == cert
    assert ekcert.trim_der(der + b"\x00" * 5) == der
    assert ekcert.load_many(pem.encode() * 2) == [cert, cert]


def test_matching_and_issuance(world):
    ca_cert, other_ca, cert, ek_public = world
    assert ekcert.certifies(cert, ek_public)
    other = TPM2B_PUBLIC.from_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
                                  .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    assert not ekcert.certifies(cert, other)
    assert ekcert.issued_by_any(cert, [other_ca, ca_cert])
    assert not ekcert.issued_by_any(cert, [other_ca])


@given(st.text(max_size=200))
def test_hostile_text_only_decode_errors(text):
    try:
        ekcert.parse(text)
    except DecodeError:
        pass


@given(st.binary(max_size=300))
def test_hostile_bytes_only_decode_errors(data):
    try:
        ekcert.load_many(data)
    except DecodeError:
        pass
    assert len(ekcert.trim_der(data)) <= len(data)


# --- chains: EK cert -> intermediates -> root ---------------------------------------------------------

DAY = datetime.timedelta(days=1)
T0 = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)


def _key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _ca(name, key, issuer=None, issuer_key=None, *, ca=True, path_length=None, key_cert_sign=True,
        start=T0, end=T0 + 3650 * DAY, extensions=True):
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
         .issuer_name(issuer.subject if issuer else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(start).not_valid_after(end))
    if extensions:
        b = b.add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        b = b.add_extension(x509.KeyUsage(digital_signature=not key_cert_sign, content_commitment=False,
                                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                                          key_cert_sign=key_cert_sign, crl_sign=key_cert_sign, encipher_only=False,
                                          decipher_only=False), critical=True)
    return b.sign(issuer_key or key, hashes.SHA256())


def _ek_cert(issuer, issuer_key, ek_key, *, start=T0 + DAY):
    """An EK cert as TPM vendors make them: empty subject, critical SAN directoryName, odd dates."""
    san = x509.SubjectAlternativeName([x509.DirectoryName(x509.Name([
        x509.NameAttribute(x509.ObjectIdentifier("2.23.133.2.1"), "id:00001014"),
        x509.NameAttribute(x509.ObjectIdentifier("2.23.133.2.2"), "swtpm")]))])
    return (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(issuer.subject)
            .public_key(ek_key.public_key()).serial_number(7).not_valid_before(start)
            .not_valid_after(datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC))
            .add_extension(san, critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.ObjectIdentifier("2.23.133.8.1")]), critical=False)
            .sign(issuer_key, hashes.SHA256()))


@pytest.fixture(scope="module")
def chain():
    root_key, int_key, ek_key = _key(), _key(), _key()
    root = _ca("Vendor Root", root_key)
    inter = _ca("Vendor EK CA 01", int_key, root, root_key)
    ek = _ek_cert(inter, int_key, ek_key)
    return root, root_key, inter, int_key, ek, ek_key


def _fails(ek, store, match):
    with pytest.raises(ekcert.ChainError, match=match):
        ekcert.chain_to_store(ek, store)


def test_chain_through_an_intermediate_to_the_root(chain):
    root, _, inter, _, ek, _ = chain
    assert ekcert.chain_to_store(ek, [root, inter]) == [ek, inter, root]
    assert ekcert.chain_to_store(ek, [inter, root]) == [ek, inter, root]
    # upstream trusts every certificate of its store: an intermediate without its root ends the path
    assert ekcert.chain_to_store(ek, [inter]) == [ek, inter]
    # the root alone cannot vouch for an EK cert whose issuer it does not know
    _fails(ek, [root], "not issued by a CA of the EK trust store")
    _fails(ek, [], "not issued by a CA")
    assert ekcert.issued_by_any(ek, [root, inter]) and not ekcert.issued_by_any(ek, [root])


def test_every_link_is_checked(chain):
    root, root_key, inter, int_key, ek, ek_key = chain
    # a root of the right name but another key: the intermediate does not chain to it
    _fails(ek, [inter, _ca("Vendor Root", _key())], "signature of CN=Vendor Root on CN=Vendor EK CA 01")
    # ... unless the store also holds the real one (vendors reissue CAs under the same name)
    assert ekcert.chain_to_store(ek, [inter, _ca("Vendor Root", _key()), root])[-1] == root
    # an issuer that is not a CA, may not sign certificates, or is v3 without basicConstraints
    for bad, why in ((_ca("Vendor EK CA 01", int_key, root, root_key, ca=False), "cA is false"),
                     (_ca("Vendor EK CA 01", int_key, root, root_key, key_cert_sign=False), "keyCertSign"),
                     (_ca("Vendor EK CA 01", int_key, root, root_key, extensions=False), "no basicConstraints")):
        _fails(ek, [bad, root], why)
    # pathLenConstraint 0 on the root: no intermediate may follow it
    strict_root = _ca("Vendor Root", root_key, path_length=0)
    _fails(ek, [inter, strict_root], "pathLenConstraint")
    assert ekcert.chain_to_store(_ek_cert(strict_root, root_key, ek_key), [strict_root])
    # issued while the issuer was not valid (before or after its validity), at any link
    _fails(_ek_cert(inter, int_key, ek_key, start=T0 - DAY), [inter, root], "outside the validity")
    _fails(_ek_cert(inter, int_key, ek_key, start=T0 + 4000 * DAY), [inter, root], "outside the validity")
    early = _ca("Vendor EK CA 01", int_key, root, root_key, start=T0 - 10 * DAY)
    _fails(ek, [early, root], "CN=Vendor EK CA 01 was issued 2019-12-22, outside the validity")
    # the current time is not judged: an expired chain still proves where the EK came from
    old_root = _ca("Vendor Root", root_key, end=T0 + 30 * DAY)
    old_inter = _ca("Vendor EK CA 01", int_key, old_root, root_key, end=T0 + 30 * DAY)
    assert len(ekcert.chain_to_store(ek, [old_inter, old_root])) == 3
    # a signature by another key of the issuer's name
    _fails(_ek_cert(inter, _key(), ek_key), [inter, root], "signature of CN=Vendor EK CA 01")


def test_cycles_and_depth_end():
    ka, kb, ek_key = _key(), _key(), _key()
    a0 = _ca("A", ka)
    b = _ca("B", kb, a0, ka)
    a = _ca("A", ka, b, kb)  # A issued by B issued by A: a loop, and no self-signed root among them
    ek = _ek_cert(b, kb, ek_key)
    assert ekcert.chain_to_store(ek, [b, a]) == [ek, b, a]  # ends where the store repeats itself
    names = [f"C{i}" for i in range(12)]
    keys = [_key() for _ in names]
    certs = [_ca(names[0], keys[0])]
    for i in range(1, len(names)):
        certs.append(_ca(names[i], keys[i], certs[-1], keys[i - 1]))
    _fails(_ek_cert(certs[-1], keys[-1], ek_key), certs, "no path of at most")
