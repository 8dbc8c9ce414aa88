"""protocol.push_wire: the v3.0 JSON:API documents; every malformed input is a WireError (400/422)."""

from __future__ import annotations

import base64
import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keytrio.protocol import pcr_blob, push_wire
from keytrio.protocol.push_wire import WireError

AID = "d432fbb3-d2f1-4a97-9ef7-75bd81c00000"
CAPS = {"data": {"type": "attestation", "attributes": {
    "evidence_supported": [
        {"evidence_class": "certification", "evidence_type": "tpm_quote", "capabilities": {
            "hash_algorithms": ["sha256", "SHA384"], "signature_schemes": ["rsassa"],
            "available_subjects": {"sha256": [10, 0, 10]}, "certification_keys": [{"key_class": "asymmetric"}]}},
        {"evidence_class": "log", "evidence_type": "ima_log", "capabilities": {
            "entry_count": 20, "supports_partial_access": True, "formats": ["text/plain"]}},
        {"evidence_class": "future", "evidence_type": "thing", "capabilities": {}},
    ],
    "system_info": {"boot_time": "2024-01-15T10:30:00Z"}}}}


def test_capabilities_upstream_and_documented_shapes():
    caps = push_wire.parse_capabilities(CAPS)
    assert caps.quote.hash_algorithms == ["sha256", "sha384"]
    assert caps.quote.available == {"sha256": [0, 10]}
    assert caps.logs["ima_log"].entry_count == 20 and caps.boot_time == "2024-01-15T10:30:00Z"
    flat = copy.deepcopy(CAPS)
    flat["data"]["attributes"]["evidence_supported"][0]["capabilities"]["available_subjects"] = [0, 1, 10]
    assert push_wire.parse_capabilities(flat).quote.available == {"sha256": [0, 1, 10], "sha384": [0, 1, 10]}


@pytest.mark.parametrize(("path", "value", "status"), [
    (("evidence_supported",), [], 400),
    (("evidence_supported",), "x", 400),
    (("evidence_supported", 0, "capabilities", "hash_algorithms"), [], 422),
    (("evidence_supported", 0, "capabilities", "signature_schemes"), [1], 422),
    (("evidence_supported", 0, "capabilities", "available_subjects"), {"sha256": [24]}, 422),
    (("evidence_supported", 0, "capabilities", "available_subjects"), "all", 422),
    (("evidence_supported", 0, "capabilities", "certification_keys"), ["k"], 422),
    (("evidence_supported", 1, "capabilities", "entry_count"), -1, 422),
    (("evidence_supported", 1, "capabilities", "supports_partial_access"), "yes", 422),
    (("evidence_supported", 0, "evidence_type"), "tpm_quotes", 422),  # no quote offered
    (("evidence_supported", 2, "evidence_class"), 5, 400),
    (("system_info",), "now", 400),
    (("system_info",), {"boot_time": 5}, 400),
])
def test_capabilities_refused(path, value, status):
    doc = copy.deepcopy(CAPS)
    node = doc["data"]["attributes"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(WireError) as exc:
        push_wire.parse_capabilities(doc)
    assert exc.value.status == status


@pytest.mark.parametrize("doc", [None, [], {"data": []}, {"data": {"type": "session", "attributes": {}}},
                                 {"data": {"type": "attestation"}}])
def test_not_the_document_asked_for(doc):
    with pytest.raises(WireError) as exc:
        push_wire.parse_capabilities(doc)
    assert exc.value.status == 400


def _requested():
    req = push_wire.Requested("Y2hhbGxlbmdl", "sha256", "rsassa", [0, 10], {"ima_log": 3},
                              {"key_class": "asymmetric"})
    return push_wire.evidence_requested(req)


def test_requested_shape():
    items = _requested()
    assert items[0]["chosen_parameters"]["selected_subjects"] == {"sha256": [0, 10]}
    assert items[1]["chosen_parameters"] == {"starting_offset": 3, "format": "text/plain"}


def _evidence(subject, entries="a\nb\n", count=2):
    return {"data": {"type": "attestation", "attributes": {"evidence_collected": [
        {"evidence_class": "certification", "evidence_type": "tpm_quote", "data": {
            "subject_data": subject, "message": "AAEC", "signature": "AwQF"}},
        {"evidence_class": "log", "evidence_type": "ima_log", "data": {"entry_count": count, "entries": entries}},
    ]}}}


def test_evidence_blob_and_object_forms_agree():
    values = {0: bytes(32), 10: b"\x11" * 32}
    blob = pcr_blob.encode({"sha256": values})
    a = push_wire.parse_evidence(_evidence(base64.b64encode(blob).decode()), _requested(), "sha256")
    b = push_wire.parse_evidence(_evidence({"0": "00" * 32, "10": "11" * 32}), _requested(), "sha256")
    assert a.pcr_blob == b.pcr_blob == blob
    assert a.logs["ima_log"] == ("a\nb\n", 2) and a.message == b"\x00\x01\x02"
    assert push_wire.quote_text(a) == "rAAEC:AwQF:" + base64.b64encode(blob).decode()


@pytest.mark.parametrize(("doc", "status"), [
    (_evidence("AAAA"), 422),  # base64 but not a PCR blob
    (_evidence("!!"), 400),
    (_evidence({"x": "00"}), 422),
    (_evidence({"1": "zz"}), 422),
    (_evidence({"1": "00"}), 422),  # not a sha256 value
    (_evidence(None), 400),
    (_evidence({"0": "00" * 32}, entries="a\n", count=2), 422),
    (_evidence({"0": "00" * 32}, entries=["a"]), 400),
])
def test_evidence_refused(doc, status):
    with pytest.raises(WireError) as exc:
        push_wire.parse_evidence(doc, _requested(), "sha256")
    assert exc.value.status == status


def test_evidence_order_and_number():
    doc = _evidence({"0": "00" * 32})
    items = doc["data"]["attributes"]["evidence_collected"]
    items.reverse()
    with pytest.raises(WireError, match="order"):
        push_wire.parse_evidence(doc, _requested(), "sha256")
    items.pop()
    with pytest.raises(WireError, match="1 items, 2 were requested"):
        push_wire.parse_evidence(doc, _requested(), "sha256")


def test_sessions():
    assert push_wire.parse_session_request({"data": {"type": "session", "attributes": {
        "agent_id": AID, "authentication_supported": [
            {"authentication_class": "pop", "authentication_type": "tpm_pop"}]}}}) == AID
    proof = push_wire.parse_session_proof({"data": {"type": "session", "attributes": {
        "agent_id": AID, "authentication_provided": [{"authentication_class": "pop",
                                                      "authentication_type": "tpm_pop",
                                                      "data": {"message": "AAE=", "signature": "AgM="}}]}}})
    assert (proof.message, proof.signature) == (b"\x00\x01", b"\x02\x03")
    doc = push_wire.session_document("sid", AID, "Y2g=", 0.0, 60.0, evaluation="pass", token="sid.x",
                                     token_expires_at=180.0)
    attrs = doc["data"]["attributes"]
    assert attrs["token"] == "sid.x" and attrs["token_expires_at"] == "1970-01-01T00:03:00.000000Z"
    assert push_wire.error_document(429, "wait", "premature_attestation") == {"errors": [
        {"status": "429", "title": "Too Many Requests", "detail": "wait", "code": "premature_attestation"}]}


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                    max_leaves=30))
def test_hostile_documents_only_raise_wire_errors(doc):
    for parse in (push_wire.parse_capabilities, push_wire.parse_session_request, push_wire.parse_session_proof,
                  lambda d: push_wire.parse_evidence(d, _requested(), "sha256")):
        for candidate in (doc, {"data": {"type": "attestation", "attributes": doc}},
                          {"data": {"type": "session", "attributes": doc}}):
            try:
                parse(candidate)
            except WireError:
                pass
