"""Runtime policies: upstream-generated policies load, validation errors name the JSON path."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from keytrio.protocol import dsse
from keytrio.protocol.dsse import DsseError
from keytrio.protocol.errors import ValidationError
from keytrio.protocol.runtime_policy import (
    KeyTypeError,
    PolicyError,
    keyidv2,
    load_policy,
    parse_ima_key,
    parse_policy,
    policy_document,
)

DATA = Path(__file__).parent / "data" / "keylime"
SIGNER = ec.derive_private_key(0x5151, ec.SECP256R1())


def _policy(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "meta": {"version": 1, "generator": 0},
        "release": 0,
        "digests": {"/usr/bin/x": ["aa" * 32]},
        "excludes": [],
        "keyrings": {},
        "ima": {"ignored_keyrings": [], "log_hash_alg": "sha1", "dm_policy": None},
        "ima-buf": {},
        "verification-keys": "",
    }
    doc.update(over)
    return doc


def _ima(**over: Any) -> dict[str, Any]:
    return {"ignored_keyrings": [], "log_hash_alg": "sha1", "dm_policy": None, **over}


# --- upstream-generated policies ---------------------------------------------------------------


def test_upstream_rootfs_policy() -> None:
    raw = (DATA / "policy_rootfs.json").read_bytes()
    p = parse_policy(raw)
    assert p.digests["/usr/bin/hello"] == {hashlib.sha256(b"hello\n").digest()}
    assert p.digests["/etc/app.conf"] == {hashlib.sha256(b"conf\n").digest()}
    assert p.excludes == ("/tmp/.*", "/var/log/.*")
    assert p.excluded("/tmp/foo") and p.excluded("/var/log/x/y")
    assert not p.excluded("/usr/tmp/foo")  # re.match: anchored at the start, as upstream
    assert p.log_hash_alg == "sha1" and p.generator == 3 and not p.is_empty
    assert p.checksum == hashlib.sha256(raw).hexdigest()


def test_upstream_merged_policy_has_several_digests() -> None:
    p = parse_policy((DATA / "policy_merged.json").read_text())
    assert p.digests["/usr/bin/hello"] == {
        hashlib.sha256(b"hello\n").digest(),
        hashlib.sha256(b"hello-old\n").digest(),
    }
    assert p.digests["/usr/bin/extra"] == {hashlib.sha256(b"extra\n").digest()}


def test_upstream_ima_policy_keys_and_buffers() -> None:
    p = parse_policy((DATA / "policy_ima.json").read_bytes())
    cert = (DATA / "ima_cert.der").read_bytes()
    assert p.keyrings[".ima"] == {hashlib.sha256(cert).digest()}
    assert p.ima_buf["device_resume"] == {hashlib.sha256(b"name=TEST;").digest()}
    ((kid, keys),) = p.verification_keys.items()
    learned = parse_ima_key(cert)
    assert learned is not None
    # upstream stored keyidv2 (derived: the certificate has no SKI) matches ours
    assert kid == learned.keyid == keyidv2(learned.public_key)
    assert keys[0].der == learned.der


def test_signed_upstream_policies() -> None:
    plain = parse_policy((DATA / "policy_ima.json").read_bytes())
    for env, key in (("signed_ecdsa.json", "ecdsa_pub.pem"), ("signed_x509.json", "x509_cert.pem")):
        raw = (DATA / env).read_bytes()
        p = load_policy(raw, signing_key=(DATA / key).read_bytes(), require_signature=True)
        assert p.digests == plain.digests and p.keyrings == plain.keyrings
        assert p.checksum == hashlib.sha256(raw).hexdigest()  # the envelope as uploaded
    with pytest.raises(DsseError):
        load_policy(
            (DATA / "signed_ecdsa.json").read_bytes(), signing_key=(DATA / "x509_cert.pem").read_bytes()
        )


def test_load_policy_signature_rules() -> None:
    body = json.dumps(_policy()).encode()
    env = dsse.sign_envelope(body, dsse.KEYLIME_PAYLOAD_TYPE, SIGNER)
    pub = SIGNER.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert "/usr/bin/x" in load_policy(env, signing_key=pub).digests
    assert "/usr/bin/x" in load_policy(env).digests  # no key, not required: payload unverified
    with pytest.raises(PolicyError, match="runtime_policy_key"):
        load_policy(env, require_signature=True)
    with pytest.raises(DsseError, match="not DSSE-signed"):
        load_policy(body, signing_key=pub)
    other = ec.derive_private_key(7, ec.SECP256R1()).public_key()
    with pytest.raises(DsseError):
        load_policy(
            env,
            signing_key=other.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        )
    with pytest.raises(PolicyError, match="DSSE"):
        parse_policy(env)  # parse_policy never silently unwraps an envelope


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"", "", "  \n", "{}", b"{}"])
def test_empty_policy(raw: bytes | str) -> None:
    p = parse_policy(raw)
    assert p.is_empty and not p.digests and p.log_hash_alg == "sha1" and not p.excluded("/x")


@pytest.mark.parametrize(
    ("drop", "path", "missing"),
    [
        ("ima", "$", "'ima'"),
        ("verification-keys", "$", "'verification-keys'"),
        ("meta.generator", "meta", "'generator'"),
        ("ima.dm_policy", "ima", "'dm_policy'"),
    ],
)
def test_sections_upstream_requires_are_required(drop: str, path: str, missing: str) -> None:
    doc = _policy()
    *parents, key = drop.split(".")
    target = doc
    for p in parents:
        target = target[p]
    del target[key]
    with pytest.raises(PolicyError) as info:
        parse_policy(json.dumps(doc))
    assert info.value.field == path and missing in info.value.reason


def test_every_missing_section_is_named() -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy('{"meta": {"version": 1, "generator": 1}, "digests": {}}')
    for name in ("release", "excludes", "keyrings", "ima", "ima-buf", "verification-keys"):
        assert repr(name) in info.value.reason


def test_policy_document_is_complete() -> None:
    p = parse_policy(json.dumps(policy_document(ima={"log_hash_alg": "sha256"})))
    assert not p.is_empty and not p.digests and p.log_hash_alg == "sha256" and p.generator == 1


@pytest.mark.parametrize(
    ("doc", "path", "reason"),
    [
        (_policy(digests={"/usr/bin/x": ["aa" * 32, "zz"]}), 'digests["/usr/bin/x"][1]', "not hex"),
        (_policy(digests={"/usr/bin/x": ["aa" * 31]}), 'digests["/usr/bin/x"][0]', "no known hash size"),
        (_policy(digests={"/usr/bin/x": []}), 'digests["/usr/bin/x"]', "non-empty"),
        (_policy(digests={"/usr/bin/x": "aa"}), 'digests["/usr/bin/x"]', "non-empty list"),
        (_policy(digests=[]), "digests", "object"),
        (_policy(keyrings={".ima": ["abc"]}), 'keyrings[".ima"][0]', "not hex"),
        (_policy(**{"ima-buf": {"dev": [1]}}), 'ima-buf["dev"][0]', "not hex"),
        (_policy(excludes=["ok.*", "bad("]), "excludes[1]", "bad regex 'bad('"),
        (_policy(excludes="x"), "excludes", "list"),
        (_policy(excludes=[3]), "excludes[0]", "string"),
        (_policy(meta={"version": 2, "generator": 0}), "meta.version", "unsupported version 2"),
        (_policy(meta={"version": True, "generator": 0}), "meta.version", "unsupported"),
        (_policy(meta={"version": None, "generator": 0}), "meta.version", "unsupported version None"),
        (_policy(meta={"version": 1}), "meta", "missing required 'generator'"),
        (_policy(meta=1), "meta", "object"),
        (_policy(release=-1), "release", "integer"),
        (_policy(ima=_ima(log_hash_alg="md5")), "ima.log_hash_alg", "one of"),
        (_policy(ima=_ima(dm_policy={})), "ima.dm_policy", "not supported"),
        (_policy(ima=_ima(ignored_keyrings=[1])), "ima.ignored_keyrings[0]", "string"),
        (_policy(**{"verification-keys": 5}), "verification-keys", "string"),
        (_policy(**{"verification-keys": "{"}), "verification-keys", "not JSON"),
        (_policy(**{"verification-keys": '{"pubkeys": ["%%"]}'}), "verification-keys.pubkeys[0]", "base64"),
        (_policy(**{"verification-keys": '{"pubkeys": ["AAAA"]}'}), "verification-keys.pubkeys[0]", "DER"),
    ],
)
def test_validation_errors_name_the_path(doc: dict[str, Any], path: str, reason: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(json.dumps(doc))
    assert info.value.field == path
    assert reason in info.value.reason
    assert str(info.value).startswith(path + ": ")
    assert isinstance(info.value, ValidationError)


@pytest.mark.parametrize("raw", [b"\xff", "[1]", "nope", b'"x"'])
def test_not_a_policy(raw: bytes | str) -> None:
    with pytest.raises(PolicyError):
        parse_policy(raw)


def test_digest_sizes_and_case() -> None:
    sizes = {"sha1": 20, "sha224": 28, "sha256": 32, "sha384": 48, "sha512": 64}
    doc = _policy(digests={f"/{n}": [("AB" * s)] for n, s in sizes.items()})
    p = parse_policy(json.dumps(doc))
    assert all(p.digests[f"/{n}"] == {b"\xab" * s} for n, s in sizes.items())


def test_excludes_special_patterns() -> None:
    # a global flag and a backreference cannot live in one alternation; each still works
    p = parse_policy(json.dumps(_policy(excludes=["(?i)/TMP/", r"/(a)\1/", "/var/log/"])))
    assert p.excluded("/tmp/x") and p.excluded("/aa/b") and p.excluded("/var/log/m")
    assert not p.excluded("/ab/") and not p.excluded("/usr/var/log/")


def test_verification_keys_keyid_given_or_derived() -> None:
    key = ec.derive_private_key(99, ec.SECP256R1()).public_key()
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    b64 = base64.b64encode(der).decode()
    p = parse_policy(
        json.dumps(_policy(**{"verification-keys": json.dumps({"pubkeys": [b64], "keyids": [77]})}))
    )
    assert list(p.verification_keys) == [77]
    inner = json.dumps({"pubkeys": [b64]})
    p = parse_policy(json.dumps(_policy(**{"verification-keys": json.dumps(inner)})))  # doubly encoded
    assert list(p.verification_keys) == [keyidv2(key)]


def test_parse_ima_key_forms() -> None:
    key = ec.derive_private_key(5, ec.SECP384R1()).public_key()
    for enc in (serialization.Encoding.DER, serialization.Encoding.PEM):
        k = parse_ima_key(key.public_bytes(enc, serialization.PublicFormat.SubjectPublicKeyInfo))
        assert k is not None and k.keyid == keyidv2(key)
    assert parse_ima_key(b"name=TEST;") is None
    ed = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(32)).public_key()
    with pytest.raises(KeyTypeError):
        parse_ima_key(
            ed.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        )


_paths = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30)
_digests = st.lists(
    st.sampled_from([20, 32, 48, 64]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
    min_size=1,
    max_size=4,
)


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(_paths, _digests, max_size=10))
def test_digest_index_property(digests: dict[str, list[bytes]]) -> None:
    raw = json.dumps(_policy(digests={p: [d.hex() for d in ds] for p, ds in digests.items()}))
    pol = parse_policy(raw)
    assert dict(pol.digests) == {p: frozenset(ds) for p, ds in digests.items()}
    assert pol.checksum == hashlib.sha256(raw.encode()).hexdigest()
