"""protocol.tpm2: public areas, names, keys, algorithm maps, AK attributes, PCR 16 binding."""

from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tpm2_pytss.constants import TPM2_ALG, TPMA_OBJECT

from keytrio.protocol import tpm2
from keytrio.protocol.errors import DecodeError, ProtocolError, ValidationError
from tests.protocol.tpm2_support import AK_ATTRS, ak_public, ek_public, key_pem, private_key

# --- tests ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rsa", "p256", "p384"])
def test_parse_public_round_trip_and_key(kind):
    pub = ak_public(kind)
    raw = pub.marshal()
    parsed = tpm2.parse_public(raw)
    assert parsed.marshal() == raw
    assert tpm2.public_from_b64(base64.b64encode(raw).decode()).marshal() == raw
    key = tpm2.public_key(raw)
    assert key.public_numbers() == private_key(kind).public_key().public_numbers()
    assert tpm2.public_key_pem(parsed) == key_pem(private_key(kind)).decode()


@pytest.mark.parametrize("kind", ["rsa", "p256", "p384"])
def test_object_name_matches_tpm2_pytss(kind):
    pub = ak_public(kind)
    name = tpm2.object_name(pub)
    assert name == bytes(pub.get_name())
    assert name[:2] == b"\x00\x0b"
    assert name[2:] == hashlib.sha256(pub.publicArea.marshal()).digest()
    assert tpm2.object_name(ek_public("p384"))[:2] == b"\x00\x0c"


def test_parse_public_rejects_truncation_and_trailing_bytes():
    raw = ak_public("rsa").marshal()
    with pytest.raises(DecodeError):
        tpm2.parse_public(raw + b"\x00")
    for cut in (0, 1, 2, 10, len(raw) // 2, len(raw) - 1):
        with pytest.raises(DecodeError):
            tpm2.parse_public(raw[:cut])
    with pytest.raises(DecodeError):
        tpm2.public_from_b64("not base64!")
    with pytest.raises(DecodeError):
        tpm2.public_from_b64(12)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_parse_public_random_bytes_only_decode_error(raw):
    try:
        pub = tpm2.parse_public(raw)
    except DecodeError:
        return
    # whatever parses, the key helpers fail only with protocol errors
    for fn in (tpm2.public_key, tpm2.object_name, tpm2.key_algorithms, tpm2.check_ak_attributes):
        try:
            fn(pub)
        except ProtocolError:
            pass


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_parse_public_mutations_only_protocol_errors(data):
    raw = bytearray(ak_public(data.draw(st.sampled_from(["rsa", "p256"]))).marshal())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    try:
        pub = tpm2.parse_public(bytes(raw))
        tpm2.check_ak_attributes(pub)
        tpm2.ak_key(pub)
    except ProtocolError:
        pass


def test_algorithm_maps():
    for name, size in (("sha1", 20), ("sha256", 32), ("sha384", 48), ("sha512", 64)):
        assert tpm2.hash_alg_name(tpm2.hash_alg_id(name)) == name
        assert tpm2.digest_size(name) == size
        assert tpm2.crypto_hash(name).digest_size == size
        assert tpm2.digest(name, b"x") == hashlib.new(name, b"x").digest()
    assert tpm2.hash_alg_id("sha256") == 0x000B
    assert tpm2.SIGN_ALGS == {"rsassa": 0x14, "rsapss": 0x16, "ecdsa": 0x18, "ecschnorr": 0x1C}
    assert tpm2.ENC_ALGS == {"rsa": 0x01, "ecc": 0x23}
    with pytest.raises(ValidationError):
        tpm2.hash_alg_id("md5")
    with pytest.raises(ValidationError):
        tpm2.hash_alg_name(0x12)


@pytest.mark.parametrize(
    ("kind", "sign", "halg", "expected"),
    [
        ("rsa", "rsassa", "sha256", ("rsa", "rsassa", "sha256")),
        ("rsa", "rsapss", "sha384", ("rsa", "rsapss", "sha384")),
        ("p256", "ecdsa", "sha256", ("ecc", "ecdsa", "sha256")),
        ("p384", "ecdsa", "sha384", ("ecc", "ecdsa", "sha384")),
    ],
)
def test_key_algorithms_and_valid_ak(kind, sign, halg, expected):
    pub = ak_public(kind, sign, halg)
    assert tpm2.key_algorithms(pub) == expected
    tpm2.check_ak_attributes(pub)
    ak = tpm2.ak_key(pub.marshal())
    assert (ak.enc_alg, ak.sign_alg, ak.hash_alg) == expected
    assert ak.name == tpm2.object_name(pub)


@pytest.mark.parametrize("missing", ["restricted", "sign", "fixedTPM", "fixedParent", "sensitiveDataOrigin"])
def test_check_ak_attributes_names_missing_attribute(missing):
    bit = tpm2.AK_REQUIRED_ATTRIBUTES[missing]
    pub = ak_public("rsa", attrs=int(AK_ATTRS) & ~bit)
    with pytest.raises(ValidationError, match=missing):
        tpm2.check_ak_attributes(pub)


def test_check_ak_attributes_rejects_decrypt_and_bad_scheme():
    with pytest.raises(ValidationError, match="decrypt"):
        tpm2.check_ak_attributes(ak_public("rsa", attrs=int(AK_ATTRS | TPMA_OBJECT.DECRYPT)))
    with pytest.raises(ValidationError, match="missing"):
        tpm2.check_ak_attributes(ek_public("rsa"))
    # an RSA key with an ECC scheme
    with pytest.raises(ValidationError):
        tpm2.check_ak_attributes(ak_public("rsa", sign="ecdsa"))
    # no scheme at all
    pub = ak_public("rsa")
    pub.publicArea.parameters.rsaDetail.scheme.scheme = TPM2_ALG.NULL
    with pytest.raises(ValidationError, match="scheme"):
        tpm2.check_ak_attributes(pub)


def test_public_key_rejects_unusable_keys():
    pub = ak_public("p256")
    pub.publicArea.unique.ecc.y = b"\x01" * 32  # not on the curve
    with pytest.raises(ValidationError):
        tpm2.public_key(pub)
    pub = ak_public("rsa")
    pub.publicArea.unique.rsa = b""
    with pytest.raises(ValidationError):
        tpm2.public_key(pub)


@pytest.mark.parametrize("bank", ["sha1", "sha256", "sha384", "sha512"])
def test_pcr16_binding_value(bank):
    pem = key_pem(private_key("rsa")).decode()
    h = hashlib.new(bank, pem.encode()).digest()
    expected = hashlib.new(bank, bytes(len(h)) + h).digest()
    assert tpm2.pcr16_binding_value(bank, pem) == expected
    assert tpm2.extend_value(bank, bytes(len(h)), h) == expected
    assert tpm2.pcr16_binding_value(bank, pem + "\n") != expected


def test_extend_value_checks_sizes():
    with pytest.raises(ValidationError):
        tpm2.extend_value("sha256", bytes(20), bytes(32))
    with pytest.raises(ValidationError):
        tpm2.extend_value("sha256", bytes(32), bytes(31))
    with pytest.raises(ValidationError):
        tpm2.extend_value("md5", bytes(16), bytes(16))
