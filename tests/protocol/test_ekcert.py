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
