"""Revocation notices: message text, RSA-PSS signing and verification, body validation."""

from __future__ import annotations

import base64
import datetime
import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from keytrio.protocol import revocation
from keytrio.protocol.errors import ProtocolError, ValidationError
from keytrio.protocol.revocation import RevocationError

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _cert(key: rsa.RSAPrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "RevocationNotifier")])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


CERT = _cert(KEY)


def _msg(**over: object) -> str:
    args: dict = dict(
        agent_id="d432fbb3-d2f1-4a97-9ef7-75bd81c00000",
        ip="127.0.0.1",
        port=9002,
        tpm_policy='{"mask": "0x400"}',
        meta_data="{}",
        event_time="Tue Mar  5 10:11:12 2024",
        event_id="pcr_validation.invalid_pcr_16",
        severity_label="emergency",
        context={"message": "PCR 16 mismatch"},
        notice_id="n-1",
    )
    args.update(over)
    return revocation.build_message(**args)


def test_message_text_exact() -> None:
    expected = (
        '{"type": "revocation", "ip": "127.0.0.1", "agent_id": "d432fbb3-d2f1-4a97-9ef7-75bd81c00000", '
        '"port": 9002, "tpm_policy": "{\\"mask\\": \\"0x400\\"}", "meta_data": "{}", '
        '"event_time": "Tue Mar  5 10:11:12 2024", "event_id": "pcr_validation.invalid_pcr_16", '
        '"severity_label": "emergency", "context": "{\\"message\\": \\"PCR 16 mismatch\\"}", '
        '"notice_id": "n-1"}'
    )
    assert _msg() == expected


def test_message_without_event_and_str_context() -> None:
    m = json.loads(_msg(event_id=None, severity_label=None, context=None, notice_id=None))
    assert list(m) == ["type", "ip", "agent_id", "port", "tpm_policy", "meta_data", "event_time"]
    m = json.loads(_msg(context="plain text"))
    assert json.loads(m["context"]) == {"message": "plain text"}


def test_sign_verify_with_key_cert_and_pem() -> None:
    msg = _msg()
    sig = revocation.sign_message(KEY, msg)
    parsed = revocation.verify_notice(CERT, msg, sig)
    assert parsed["agent_id"] == "d432fbb3-d2f1-4a97-9ef7-75bd81c00000"
    assert revocation.verify_notice(KEY.public_key(), msg, sig) == parsed
    cert_pem = CERT.public_bytes(serialization.Encoding.PEM).decode()
    assert revocation.verify_notice(cert_pem, msg, sig) == parsed
    pub_pem = KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert revocation.verify_notice(pub_pem, msg, sig) == parsed


def test_signature_is_pss_sha256_max_salt() -> None:
    msg = _msg()
    sig = base64.b64decode(revocation.sign_message(KEY, msg))
    # Independent check with the parameters PROTOCOL.md fixes (raises if they differ).
    KEY.public_key().verify(
        sig,
        msg.encode(),
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH),
        hashes.SHA256(),
    )
    # And a signature made that way elsewhere (as upstream's verifier does) is accepted.
    theirs = KEY.sign(
        msg.encode(),
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH),
        hashes.SHA256(),
    )
    revocation.verify_notice(CERT, msg, base64.b64encode(theirs).decode())


def test_forged_and_unsigned_rejected() -> None:
    msg = _msg()
    sig = revocation.sign_message(KEY, msg)
    forged = msg.replace("127.0.0.1", "127.0.0.2")
    with pytest.raises(RevocationError):
        revocation.verify_notice(CERT, forged, sig)
    with pytest.raises(RevocationError):
        revocation.verify_notice(_cert(OTHER), msg, sig)
    with pytest.raises(RevocationError):
        revocation.verify_notice(CERT, msg, revocation.sign_message(OTHER, msg))
    for bad in ("", "none", "!!!", "QUFB", None):
        with pytest.raises(RevocationError):
            revocation.verify_notice(CERT, msg, bad)  # type: ignore[arg-type]
    pkcs1 = KEY.sign(msg.encode(), padding.PKCS1v15(), hashes.SHA256())
    with pytest.raises(RevocationError):
        revocation.verify_notice(CERT, msg, base64.b64encode(pkcs1).decode())


def test_signed_but_not_a_revocation() -> None:
    for msg in ('{"type": "other"}', "[1, 2]", "not json"):
        with pytest.raises(RevocationError):
            revocation.verify_notice(CERT, msg, revocation.sign_message(KEY, msg))


def test_bad_keys() -> None:
    msg = _msg()
    sig = revocation.sign_message(KEY, msg)
    with pytest.raises(RevocationError):
        revocation.verify_notice("garbage", msg, sig)
    with pytest.raises(RevocationError):
        revocation.verify_notice(ec.generate_private_key(ec.SECP256R1()).public_key(), msg, sig)
    with pytest.raises(RevocationError):
        revocation.sign_message(ec.generate_private_key(ec.SECP256R1()), msg)  # type: ignore[arg-type]


def test_parse_notice() -> None:
    n = revocation.parse_notice({"msg": "m", "signature": "s"})
    assert (n.msg, n.signature) == ("m", "s")
    for body in (
        None,
        [],
        {"msg": "m"},
        {"signature": "s"},
        {"msg": 1, "signature": "s"},
        {"msg": "m", "signature": None},
    ):
        with pytest.raises(ValidationError):
            revocation.parse_notice(body)


@settings(max_examples=80, deadline=None)
@given(
    st.one_of(
        st.none(), st.integers(), st.text(), st.dictionaries(st.text(max_size=10), st.text(max_size=20))
    ),
    st.text(max_size=50),
    st.text(max_size=400),
)
def test_hostile_notices_only_typed_errors(body: object, msg: str, sig: str) -> None:
    try:
        revocation.parse_notice(body)
    except ProtocolError:
        pass
    with pytest.raises(ProtocolError):
        revocation.verify_notice(CERT, msg, sig)


@settings(max_examples=80, deadline=None)
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200)).map(lambda k: k if k else "x"))
def test_hostile_keys_only_typed_errors(key: str | bytes) -> None:
    prefix = "-----BEGIN CERTIFICATE-----\n" if isinstance(key, str) else b"-----BEGIN PUBLIC KEY-----\n"
    for candidate in (key, prefix + key):
        with pytest.raises(RevocationError):
            revocation.verify_notice(candidate, "{}", "QUFB")
