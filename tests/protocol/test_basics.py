"""Envelope, API versions, input validators and failure severities."""

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keytrio.protocol import envelope, validation, versions
from keytrio.protocol.errors import DecodeError, ValidationError
from keytrio.protocol.failures import Failure, Severity, worst


def test_envelope_shapes():
    assert envelope.success({"a": 1}) == {"code": 200, "status": "Success", "results": {"a": 1}}
    assert envelope.error(404) == {"code": 404, "status": "Not Found", "results": {}}
    assert envelope.error(400, "bad nonce")["status"] == "bad nonce"
    assert envelope.parse({"code": 200, "status": "Success", "results": {"x": 1}}) == (200, "Success", {"x": 1})
    assert envelope.parse({"code": 200, "status": "Success", "results": None}) == (200, "Success", {})


@pytest.mark.parametrize(
    "doc",
    [None, [], "x", {"status": "x"}, {"code": "200", "status": "x"}, {"code": True, "status": "x"},
     {"code": 200, "status": 3}, {"code": 200, "status": "ok", "results": [1]}],
)
def test_envelope_parse_rejects(doc):
    with pytest.raises(DecodeError):
        envelope.parse(doc)


def test_versions():
    assert versions.server_version_payload() == {
        "current_version": "2.5",
        "supported_versions": ["2.0", "2.1", "2.2", "2.3", "2.4", "2.5"],
    }
    assert versions.agent_version_payload() == {"supported_version": "2.1", "supported_versions": ["2.1"]}
    assert versions.parse_version_prefix("v2.1") == "2.1"
    assert versions.negotiate(["2.0", "2.1", "2.5"], ["2.1"]) == "2.1"
    assert versions.negotiate(["2.10", "2.9"], ["2.9", "2.10"]) == "2.10"
    assert versions.negotiate(["2.0"], ["3.0"]) is None
    for bad in ("2.1", "v2", "v2.x", "v2.1.0", ""):
        with pytest.raises(ValidationError):
            versions.parse_version_prefix(bad)


def test_agent_id_and_uuid():
    u = "D432FBB3-D2F1-4A97-9EF7-75BD81C00000"
    assert validation.agent_id(u) == u.lower()  # a canonical UUID is found whatever its case
    # upstream's rule (keylime.common.validators.valid_agent_id): [\w.-]+, kept as given
    for good in ("ab" * 32, "foo", "Foo", "a.b-c_1", "_", "...", "wörk", "агент-7", "x" * 80,
                 "0123456789ABCDEF0123456789ABCDEF", "{d432fbb3-d2f1-4a97-9ef7-75bd81c00000}"[1:-1]):
        assert validation.agent_id(good) == (good.lower() if good.count("-") == 4 else good)
    for bad in ("", "not a uuid", "../etc/passwd", "a/b", "x" * 81, 5, None, ".", "..", "a b", "a\n",
                "a:b", "a%2Fb", "a\u00a0b", "tab\t", "a\x00", "{" + u + "}", "urn:uuid:" + u):
        with pytest.raises(ValidationError):
            validation.agent_id(bad)
    with pytest.raises(ValidationError):
        validation.uuid("ab" * 32)


@pytest.mark.parametrize("good", ["a", "A1b2C3", "x" * 64, "1234567890ABCDEFHIJ"])
def test_nonce_good(good):
    assert validation.nonce(good) == good


@pytest.mark.parametrize("bad", ["", "x" * 65, "abc-def", "abc def", "ä", 12, None, "abc\n"])
def test_nonce_bad(bad):
    with pytest.raises(ValidationError):
        validation.nonce(bad)


def test_mask():
    assert validation.pcr_mask("0x10401") == 0x10401
    assert validation.mask_to_pcrs(0x10401) == [0, 10, 16]
    assert validation.pcrs_to_mask([0, 10, 16]) == "0x10401"
    assert validation.pcr_mask("0xFFFFFF") == 0xFFFFFF
    for bad in ("0x1000000", "10401", "0x", "0xZZ", "", 5, "0x10401 "):
        with pytest.raises(ValidationError):
            validation.pcr_mask(bad)
    with pytest.raises(ValidationError):
        validation.pcrs_to_mask([24])


@given(st.integers(min_value=0, max_value=0xFFFFFF))
def test_mask_roundtrip(m):
    assert validation.pcr_mask(validation.pcrs_to_mask(validation.mask_to_pcrs(m))) == m


def test_b64_and_pem():
    assert validation.b64(base64.b64encode(b"hi").decode(), "f") == b"hi"
    for bad in ("", "abc", "a b=", "!!!!", None, 3):
        with pytest.raises(ValidationError):
            validation.b64(bad, "f")
    assert validation.b64("", "f", allow_empty=True) == b""
    with pytest.raises(ValidationError):
        validation.b64(base64.b64encode(b"x" * 10).decode(), "f", max_len=5)
    pem = "-----BEGIN CERTIFICATE-----\n" + base64.b64encode(b"\x30" * 40).decode() + "\n-----END CERTIFICATE-----\n"
    assert validation.pem(pem, "cert", label="CERTIFICATE") == pem
    for bad in ("hello", pem.replace("END CERT", "END KEY"), pem.replace("MDA", "M!A"), 7):
        with pytest.raises(ValidationError):
            validation.pem(bad, "cert")
    with pytest.raises(ValidationError):
        validation.pem(pem, "cert", label="PUBLIC KEY")


@given(st.text(max_size=80))
def test_validators_only_raise_validation_error(s):
    for fn in (validation.nonce, validation.pcr_mask, validation.agent_id, validation.port, validation.host):
        try:
            fn(s)
        except ValidationError:
            pass
    for fn in (validation.b64, validation.pem, validation.hex_bytes):
        try:
            fn(s, "f")
        except ValidationError:
            pass


def test_integers():
    assert validation.port("8890") == 8890
    assert validation.port(443) == 443
    for bad in (0, 70000, True, "8x", 1.5, None):
        with pytest.raises(ValidationError):
            validation.port(bad)


def test_host():
    assert validation.host("127.0.0.1") == "127.0.0.1"
    assert validation.host("::0001") == "::1"  # normalised
    assert validation.host("agent-7.example.org") == "agent-7.example.org"
    for bad in ("", "-lead", "a b", "x" * 300, "1.2.3.4/8", None, 5):
        with pytest.raises(ValidationError) as info:
            validation.host(bad, "cloudagent_ip")
        assert info.value.field == "cloudagent_ip"


def test_worst_failure():
    a = Failure("ima.validation.ima-ng.not_in_allowlist", {}, Severity.WARNING)
    b = Failure("pcr_validation.invalid_pcr_16", {}, Severity.CRITICAL)
    assert worst([a, b]) is b
    assert worst([]) is None
    assert Severity.from_label("error") is Severity.ERROR and Severity.ALERT.label == "alert"
    assert b.to_json() == {"type": "pcr_validation.invalid_pcr_16", "context": {}}
