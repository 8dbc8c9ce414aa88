"""protocol.wire: the agent's replies round-trip, and a hostile reply is typed failures, never an
exception (the verifier) or a ReplyError (the tenant)."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keytrio.protocol import payload as pl
from keytrio.protocol.errors import ValidationError
from keytrio.protocol.evidence import Evidence
from keytrio.protocol.failures import Severity
from keytrio.protocol.revocation import Notice, parse_notice
from keytrio.protocol.wire import (
    CHECK_RESPONSE,
    INVALID_DATA,
    BootLog,
    IdentityQuote,
    ImaTail,
    IntegrityQuote,
    KeyVerify,
    ReplyError,
    UKey,
    VKey,
)

FULL = IntegrityQuote("rQUOTE", "sha256", "rsa", "rsassa", pubkey="PEM", boottime=1_700_000_000,
                      ima=ImaTail("line\n", 3), mb=BootLog.of(b"\x01\x02"))


def test_integrity_round_trip_and_presence():
    wire = FULL.encode()
    assert list(wire) == ["quote", "hash_alg", "enc_alg", "sign_alg", "pubkey", "boottime",
                          "ima_measurement_list", "ima_measurement_list_entry", "mb_measurement_list"]
    assert wire["mb_measurement_list"] == base64.b64encode(b"\x01\x02").decode()
    assert IntegrityQuote.decode(wire, need_pubkey=True) == (FULL, [])
    # partial=1, no PCR 10, no PCR 0: those keys are absent, not null
    bare = IntegrityQuote("rQUOTE", "sha256", "ecc", "ecdsa", boottime=5)
    assert bare.encode() == {"quote": "rQUOTE", "hash_alg": "sha256", "enc_alg": "ecc", "sign_alg": "ecdsa",
                             "boottime": 5}
    assert IntegrityQuote.decode(bare.encode(), need_pubkey=False) == (bare, [])
    # asked, but the machine has no list / no log: null, as upstream's agent says it
    none = IntegrityQuote("rQ", "sha1", "rsa", "rsassa", ima=ImaTail(None, 0), mb=BootLog(None))
    wire = none.encode()
    assert wire["ima_measurement_list"] is None and wire["ima_measurement_list_entry"] == 0
    assert "mb_measurement_list" in wire and wire["mb_measurement_list"] is None
    assert IntegrityQuote.decode(wire, need_pubkey=False) == (none, [])


def _fields(reply, need_pubkey=False):
    value, fails = IntegrityQuote.decode(reply, need_pubkey=need_pubkey)
    assert value is None and fails
    for f in fails:
        assert f.event_id == INVALID_DATA and f.context["check"] == CHECK_RESPONSE
        assert f.severity == Severity.EMERGENCY and not f.recoverable
    return [f.context.get("field") for f in fails]


GOOD = {"quote": "rQ", "hash_alg": "sha256", "enc_alg": "rsa", "sign_alg": "rsassa"}


@pytest.mark.parametrize(
    ("change", "need_pubkey", "fields"),
    [
        ({"quote": None}, False, ["quote"]),
        ({"quote": 5, "hash_alg": ["sha256"]}, False, ["quote", "hash_alg"]),
        ({"enc_alg": True, "sign_alg": {}}, False, ["enc_alg", "sign_alg"]),
        ({}, True, ["pubkey"]),
        ({"pubkey": 7}, True, ["pubkey"]),
        ({"boottime": "17"}, False, ["boottime"]),
        ({"boottime": True}, False, ["boottime"]),
        ({"boottime": -1}, False, ["boottime"]),
        ({"boottime": 10**60}, False, ["boottime"]),
        ({"ima_measurement_list": 5}, False, ["ima_measurement_list"]),
        ({"ima_measurement_list_entry": "3"}, False, ["ima_measurement_list_entry"]),
        ({"ima_measurement_list_entry": -1}, False, ["ima_measurement_list_entry"]),
        ({"ima_measurement_list_entry": None}, False, ["ima_measurement_list_entry"]),
        ({"mb_measurement_list": 5}, False, ["mb_measurement_list"]),
        ({"quote": None, "boottime": 1.5, "mb_measurement_list": []}, False,
         ["quote", "boottime", "mb_measurement_list"]),
    ],
)
def test_integrity_decode_failures(change, need_pubkey, fields):
    reply = {**GOOD, **change}
    reply = {k: v for k, v in reply.items() if not (k == "quote" and v is None)}
    assert _fields(reply, need_pubkey) == fields


def test_integrity_decode_not_an_object():
    assert _fields(["quote"]) == [None]
    assert _fields(None) == [None]


def test_pubkey_only_required_when_asked():
    value, fails = IntegrityQuote.decode({**GOOD, "pubkey": 7}, need_pubkey=False)
    assert fails == [] and value is not None and value.pubkey is None


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from([*GOOD, "pubkey", "boottime", "ima_measurement_list",
                                        "ima_measurement_list_entry", "mb_measurement_list", "x"]),
                       st.none() | st.booleans() | st.integers() | st.text(max_size=5) | st.lists(st.integers())))
def test_integrity_decode_never_raises(reply):
    value, fails = IntegrityQuote.decode(reply, need_pubkey=True)
    assert (value is None) == bool(fails)
    if value is not None:
        assert IntegrityQuote.decode(value.encode(), need_pubkey=True) == (value, [])


def test_boot_log_bytes():
    assert BootLog.of(b"abc").data() == b"abc"
    assert BootLog(None).data() == b"" and BootLog("").data() == b""
    assert BootLog("not base64!").data() == b"\x00"  # the measured-boot check reports it


def test_evidence_of_a_reply():
    assert FULL.evidence(boot_log=True) == Evidence("rQUOTE", "sha256", "rsa", "line\n", 3, b"\x01\x02")
    assert FULL.evidence(boot_log=False).mb_log is None
    bare = IntegrityQuote("rQ", "sha256", "rsa", "rsassa")
    assert bare.evidence(boot_log=True) == Evidence("rQ", "sha256", "rsa", None, 0, b"")


def test_identity_round_trip():
    q = IdentityQuote("rQ", "sha256", "rsa", "rsassa", "PEM", boottime=9)
    assert list(q.encode()) == ["quote", "hash_alg", "enc_alg", "sign_alg", "pubkey", "boottime"]
    assert IdentityQuote.decode(q.encode()) == q
    assert IdentityQuote.decode({**q.encode(), "boottime": "x"}).boottime is None
    assert q.evidence() == Evidence("rQ", "sha256", "rsa")


@pytest.mark.parametrize("reply", [None, [], {}, {**GOOD}, {**GOOD, "pubkey": ""}, {**GOOD, "pubkey": 5},
                                   {**GOOD, "pubkey": "PEM", "quote": ""}])
def test_identity_decode_refuses(reply):
    with pytest.raises(ReplyError, match="reply lacks quote/hash_alg/enc_alg/sign_alg/pubkey"):
        IdentityQuote.decode(reply)


# --- key halves and keys/verify ---------------------------------------------------------------

TAG = "ab" * 48
EKEY = base64.b64encode(b"k" * 256).decode()
SEALED = bytes(pl.IV_LEN + pl.TAG_LEN + 3)


def test_key_halves_round_trip():
    u = UKey(EKEY, TAG, SEALED)
    assert u.encode() == {"encrypted_key": EKEY, "auth_tag": TAG, "payload": base64.b64encode(SEALED).decode()}
    assert UKey.decode(u.encode()) == u
    assert UKey(EKEY, TAG).encode() == {"encrypted_key": EKEY, "auth_tag": TAG}  # no payload: no key
    assert UKey.decode({"encrypted_key": EKEY, "auth_tag": TAG.upper(), "payload": ""}) == UKey(EKEY, TAG)
    assert VKey.decode(VKey(EKEY).encode()) == VKey(EKEY)
    assert KeyVerify.decode(KeyVerify("c0ffee").encode()) == KeyVerify("c0ffee")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"encrypted_key": EKEY}, "auth_tag"),
        ({"encrypted_key": EKEY, "auth_tag": "ab" * 47}, "auth_tag"),
        ({"encrypted_key": EKEY, "auth_tag": "zz" * 48}, "auth_tag"),
        ({"encrypted_key": EKEY, "auth_tag": TAG, "payload": "not base64"}, "payload"),
        ({"encrypted_key": EKEY, "auth_tag": TAG, "payload": base64.b64encode(b"short").decode()}, "payload"),
        ({"auth_tag": TAG}, "encrypted_key"),
        ({"encrypted_key": "", "auth_tag": TAG}, "encrypted_key"),
        ({"encrypted_key": base64.b64encode(bytes(1025)).decode(), "auth_tag": TAG}, "encrypted_key"),
        # the first bad field in the agent's order: auth_tag, payload, encrypted_key
        ({"encrypted_key": 5, "auth_tag": 5, "payload": 5}, "auth_tag"),
        ({"encrypted_key": 5, "auth_tag": TAG, "payload": 5}, "payload"),
    ],
)
def test_ukey_refused(body, field):
    with pytest.raises(ValidationError) as exc:
        UKey.decode(body)
    assert exc.value.field == field


@pytest.mark.parametrize("body", [{}, {"encrypted_key": 5}, {"encrypted_key": "**"}])
def test_vkey_refused(body):
    with pytest.raises(ValidationError, match="encrypted_key"):
        VKey.decode(body)


@pytest.mark.parametrize("reply", [None, {}, {"hmac": 5}, ["hmac"]])
def test_key_verify_refused(reply):
    with pytest.raises(ReplyError):
        KeyVerify.decode(reply)


def test_revocation_notice_round_trip():
    n = Notice('{"type": "revocation"}', "c2ln")
    assert n.encode() == {"msg": '{"type": "revocation"}', "signature": "c2ln"}
    assert parse_notice(n.encode()) == n
