"""DSSE envelopes: PAE, sign/verify round trips, refusals, and envelopes made by keylime-policy."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from keytrio.protocol import dsse
from keytrio.protocol.dsse import DsseError
from keytrio.protocol.errors import ProtocolError

DATA = Path(__file__).parent / "data" / "keylime"
KEY = ec.derive_private_key(0xC0FFEE, ec.SECP256R1())
OTHER = ec.derive_private_key(0xBEEF, ec.SECP256R1())
P384 = ec.derive_private_key(0x1234, ec.SECP384R1())


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_pae_spec_vector() -> None:
    # the example of the DSSE specification (protocol.md)
    assert dsse.pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


@pytest.mark.parametrize("key", [KEY, P384], ids=["p256", "p384"])
def test_round_trip(key: ec.EllipticCurvePrivateKey) -> None:
    env = dsse.sign_envelope(b'{"a": 1}', dsse.KEYLIME_PAYLOAD_TYPE, key)
    assert dsse.verify_envelope(env, _pem(key)) == b'{"a": 1}'
    doc = json.loads(env)
    assert doc["signatures"][0]["keyid"] == dsse.ecdsa_keyid(key.public_key())
    # DER-encoded ECDSA signature, deterministic (RFC 6979)
    assert base64.b64decode(doc["signatures"][0]["sig"])[0] == 0x30
    assert dsse.sign_envelope(b'{"a": 1}', dsse.KEYLIME_PAYLOAD_TYPE, key) == env


def test_wrong_key_refused() -> None:
    env = dsse.sign_envelope(b"x", "t", KEY)
    with pytest.raises(DsseError, match="no signature verifies"):
        dsse.verify_envelope(env, _pem(OTHER))


def test_tampered_payload_and_type_refused() -> None:
    doc = json.loads(dsse.sign_envelope(b"payload", "t", KEY))
    bad = dict(doc, payload=base64.b64encode(b"pAyload").decode())
    with pytest.raises(DsseError):
        dsse.verify_envelope(json.dumps(bad), _pem(KEY))
    bad = dict(doc, payloadType="u")
    with pytest.raises(DsseError):
        dsse.verify_envelope(json.dumps(bad), _pem(KEY))
    with pytest.raises(DsseError, match="payloadType"):
        dsse.verify_envelope(json.dumps(doc), _pem(KEY), payload_type="other")


@pytest.mark.parametrize(
    "envelope",
    [
        "not json",
        b"\xff\xfe",
        "[]",
        '{"payload": "eA==", "payloadType": "t", "signatures": []}',
        '{"payload": "eA==", "payloadType": "t"}',
        '{"payload": "!!", "payloadType": "t", "signatures": [{"sig": "eA=="}]}',
        '{"payload": "eA==", "payloadType": "", "signatures": [{"sig": "eA=="}]}',
        '{"payload": "eA==", "payloadType": "t", "signatures": [{"keyid": 1, "sig": "eA=="}]}',
        '{"payload": "eA==", "payloadType": "t", "signatures": [{"sig": "%%"}]}',
        '{"payload": "eA==", "payloadType": "t", "signatures": ["x"]}',
    ],
)
def test_malformed_envelopes(envelope: str | bytes) -> None:
    with pytest.raises(DsseError):
        dsse.verify_envelope(envelope, _pem(KEY))


def test_bad_keys() -> None:
    env = dsse.sign_envelope(b"x", "t", KEY)
    with pytest.raises(DsseError, match="not a PEM"):
        dsse.verify_envelope(env, b"garbage")
    rsa_pub = (
        rsa.generate_private_key(65537, 2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(DsseError, match="unsupported key type"):
        dsse.verify_envelope(env, rsa_pub)
    assert issubclass(DsseError, ProtocolError)


@settings(max_examples=25, deadline=None)
@given(st.binary(max_size=200), st.text(min_size=1, max_size=20))
def test_round_trip_property(payload: bytes, ptype: str) -> None:
    env = dsse.sign_envelope(payload, ptype, KEY)
    assert dsse.verify_envelope(env, _pem(KEY), payload_type=ptype) == payload


# --- envelopes made by upstream keylime-policy 7.14.3 (see data/keylime/README.md) -------------


def test_upstream_ecdsa_envelope() -> None:
    env = (DATA / "signed_ecdsa.json").read_text()
    pub = (DATA / "ecdsa_pub.pem").read_bytes()
    payload = dsse.verify_envelope(env, pub, payload_type=dsse.KEYLIME_PAYLOAD_TYPE)
    assert payload == (DATA / "policy_ima.json").read_bytes()
    keyid = json.loads(env)["signatures"][0]["keyid"]
    assert keyid == dsse.ecdsa_keyid(serialization.load_pem_public_key(pub))  # type: ignore[arg-type]


def test_upstream_x509_envelope() -> None:
    env = (DATA / "signed_x509.json").read_text()
    cert = (DATA / "x509_cert.pem").read_bytes()
    assert dsse.verify_envelope(env, cert) == (DATA / "policy_ima.json").read_bytes()
    assert base64.b64decode(json.loads(env)["signatures"][0]["keyid"]) == cert
    # the other backend's key does not verify it
    with pytest.raises(DsseError):
        dsse.verify_envelope(env, (DATA / "ecdsa_pub.pem").read_bytes())
