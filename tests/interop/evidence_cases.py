"""Evidence for the ``POST /v2.5/verify/evidence`` cross-check (issue 9, direction 4).

:func:`build_material` drives one swtpm through ``actors.agent.tpm.Tpm`` (EK, two AKs, PCR 15
extended, an IMA list written by ``testbed.ima_log.ImaLog`` that really extends PCR 10) and takes
real quotes at chosen points of the log:

- quote A (PCRs 10 + 15) covers boot_aggregate, three ima-ng files, two ima-sig files (one
  signed by the policy's verification key, one by another key; both digests listed) and an
  ima-buf entry carrying the IMA signing key (keyring ``.ima``);
- quote B (PCRs 10 + 15) covers all of that plus one ToMToU violation entry;
- quote C (PCR 15 only) is for the tpm_policy-only cases;
- quote A's PCRs again, signed by a P-256 ECDSA AK, and from the sha384 bank signed by an RSA
  AK hashing with SHA-384 (upstream's ``hash_alg`` is both the bank and the signing hash).

:func:`build_cases` turns that into named :class:`Case` values: a JSON request body, the verdict
the security intent asks for (``expect``), and, where upstream Keylime 7.14.3 answers otherwise,
upstream's recorded verdict with the kind of difference:

- ``upstream-defect``: upstream's verdict contradicts the security intent or is a 500 on bad
  input; keytrio's must be ``expect``;
- ``deliberate``: keytrio differs on purpose (reason in ``note``), both verdicts are asserted.

Every case asserts both verdicts exactly: a difference keytrio should not have is a failing test
(fixed in the verifier), never an expected failure.

docs/compatibility.md lists every case whose ``kind`` is set.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from keytrio.actors.agent.tpm import Quote, Tpm
from keytrio.protocol import ima, tpm2
from keytrio.protocol.ima_sig import ima_signature
from keytrio.protocol.quote import build_quote, encode_pcr_blob
from keytrio.protocol.runtime_policy import keyidv2
from keytrio.testbed.ima_log import ImaLog

NONCE = "k3ytr10EvidenceN0nce"  # 20 alphanumerics, as upstream's verifier makes them
BANKS = ("sha1", "sha256", "sha384")  # every active bank of the testbed swtpm
BANK = "sha256"
FILES = {f"/usr/bin/tool{i}": f"tool {i} contents".encode() for i in range(3)}
SIGNED = "/usr/lib/signed-ok"  # ima-sig, signature by the policy's key, digest also listed
BADSIG = "/usr/lib/signed-bad"  # ima-sig, signature by another key, digest also listed
KEYRING = ".ima"
TOMTOU = "/var/log/opened-for-write"
PCR15_DATA = b"keytrio evidence cross-check"

QUOTE_FAIL = "qoute_validation.quote_validation"  # (sic) upstream's component name
INVALID_QUOTE = "qoute_validation.invalid_quote"
NOT_IN_ALLOWLIST = "ima.validation.ima-ng.not_in_allowlist"
RUNTIME_POLICY_HASH = "ima.validation.ima-ng.runtime_policy_hash"
IMA_HASH = "ima.validation.ima_hash"
TOMTOU_FAIL = "ima.validation.tomtou"
PCR_MISMATCH = "ima.pcr_mismatch"
MISSING = "default.missing_param"  # upstream: one failure, the first missing field
MISSING_POLICY = "default.missing_policy"
SIG_NOTE = ("upstream's _tpm2_checkquote treats an exception with an empty message as success: "
            "cryptography's InvalidSignature has none, so a quote whose signature does not verify "
            "(forged, or signed by another AK) is taken as a quote of no PCRs; with no PCR listed in "
            "tpm_policy nothing else fails and the evidence is valid")


@dataclass(frozen=True)
class Verdict:
    """What a verifier answered: HTTP status class (2, 4, 5), ``valid``, the set of failure types."""

    status_class: int
    valid: bool | None
    types: frozenset[str] = frozenset()

    @classmethod
    def of(cls, status_code: int, body: Any) -> Verdict:
        results = body.get("results") if isinstance(body, dict) else None
        results = results if isinstance(results, dict) else {}
        failures = results.get("failures") if isinstance(results.get("failures"), list) else []
        valid = results.get("valid")
        return cls(status_code // 100, None if valid is None else bool(valid),
                   frozenset(str(f.get("type")) for f in failures if isinstance(f, dict)))

    def show(self) -> str:
        valid = "-" if self.valid is None else str(self.valid).lower()
        return f"{self.status_class}xx valid={valid} {{{', '.join(sorted(self.types))}}}"


@dataclass
class Answer:
    """One verifier's HTTP answer to one case."""

    status_code: int
    body: Any
    verdict: Verdict

    def describe(self, limit: int = 600) -> str:
        return f"{self.verdict.show()} (HTTP {self.status_code}) {str(self.body)[:limit]}"


MISSING_NOTE = "upstream names every missing input default.missing_param (the first one only)"
UPSTREAM_400 = Verdict(4, None)  # upstream's 400 for type/data problems: results {}


def ok() -> Verdict:
    return Verdict(2, True)


def invalid(*types: str) -> Verdict:
    return Verdict(2, False, frozenset(types))


def bad_request(*types: str) -> Verdict:
    return Verdict(4, False, frozenset(types))


@dataclass(frozen=True)
class Case:
    name: str
    body: Any  # the JSON request body; bytes are sent as they are
    expect: Verdict  # the verdict the security intent asks for: keytrio's
    upstream: Verdict | None = None  # upstream 7.14.3's verdict when it differs from ``expect``
    kind: str = ""  # "", "upstream-defect", "deliberate"
    note: str = ""
    content_type: str = "application/json"

    @property
    def upstream_verdict(self) -> Verdict:
        return self.upstream if self.upstream is not None else self.expect


@dataclass
class Material:
    """Everything the cases are made of (all from one swtpm)."""

    ak: bytes  # TPM2B_PUBLIC of the AK that signed the quotes
    other_ak: bytes  # a second AK of the same TPM
    ek: bytes
    quote_a: str
    quote_b: str
    quote_c: str
    other_nonce_quote: str  # like quote A, nonce "0ther..."
    pcr15: str  # hex of PCR 15 (sha256)
    entries_a: list[ima.Entry]  # the list quote A covers
    entries_b: list[ima.Entry]  # ... and quote B
    ima_key_der: bytes  # SPKI of the IMA signing key (in the .ima ima-buf entry)
    forged_sig_quote: str = ""  # quote A with one signature bit flipped
    ecc_ak: bytes = b""  # a P-256 ECDSA AK of the same TPM
    ecc_quote_a: str = ""  # quote A's PCRs and nonce, signed by the ECC AK
    ecc_forged_quote: str = ""  # the ECC quote with one bit of its signature's S flipped
    ak_384: bytes = b""  # an RSA AK signing with SHA-384
    quote_a_384: str = ""  # quote A's PCRs and nonce from the sha384 bank, signed by ak_384
    pcr15_384: str = ""  # hex of PCR 15 (sha384)
    notes: dict[str, str] = field(default_factory=dict)


def placeholder_material() -> Material:
    """A Material without evidence: enough for :func:`build_cases` to name the cases."""
    return Material(ak=b"", other_ak=b"", ek=b"", quote_a="", quote_b="", quote_c="", other_nonce_quote="",
                    pcr15="", entries_a=[], entries_b=[], ima_key_der=b"")


def _quote_text(q: Quote) -> str:
    return build_quote(q.attest, q.signature, encode_pcr_blob(q.bank, q.pcrs))


def _ima_sig(key: rsa.RSAPrivateKey, digest: bytes) -> bytes:
    raw = key.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    return ima_signature(digest, "sha256", keyidv2(key.public_key()), raw)


async def build_material(tcti: str, ima_path: Any) -> Material:
    """Drive the swtpm at ``tcti``; the IMA list is written to ``ima_path``."""
    ima_key = rsa.generate_private_key(65537, 2048)
    other_key = rsa.generate_private_key(65537, 2048)
    der = ima_key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    async with await Tpm.open(tcti) as tpm:
        ek = await tpm.endorsement_key()
        ak = await tpm.create_ak(ek)
        other = await tpm.create_ak(ek)
        await tpm.flush(other)
        await tpm.extend(15, {b: hashlib.new(b, PCR15_DATA).digest() for b in BANKS})
        log = ImaLog(ima_path, tpm.extend, BANKS)  # ima-ng sha256 digests, sha1 template hashes
        await log.boot_aggregate({BANK: await tpm.read_pcrs(BANK, range(8))})
        for path, content in FILES.items():
            await log.measure(path, content)
        for path, key in ((SIGNED, ima_key), (BADSIG, other_key)):
            content = f"signed {path}".encode()
            digest = hashlib.sha256(content).digest()
            await log.measure(path, content, template="ima-sig", signature=_ima_sig(key, digest))
        await log.buf(KEYRING, der)
        nonce = NONCE.encode()
        qa = await tpm.quote(ak, nonce=nonce, pcrs=[10, 15], bank=BANK)
        # hash_alg names the bank AND the AK's signing hash (upstream: "Quote was expected to use
        # sha384 but used sha256"): a sha384 bank quote needs an RSA AK signing with SHA-384
        ak384 = await tpm.create_ak(ek, hash_alg="sha384")
        qa384 = await tpm.quote(ak384, nonce=nonce, pcrs=[10, 15], bank="sha384")
        await tpm.flush(ak384)
        ecc = await tpm.create_ak(ek, alg="ecc")
        qe = await tpm.quote(ecc, nonce=nonce, pcrs=[10, 15], bank=BANK)
        await tpm.flush(ecc)
        qo = await tpm.quote(ak, nonce=b"0therN0nce0therN0nce", pcrs=[10, 15], bank=BANK)
        entries_a = list(log.entries)
        await log.tomtou(TOMTOU)
        qb = await tpm.quote(ak, nonce=nonce, pcrs=[10, 15], bank=BANK)
        qc = await tpm.quote(ak, nonce=nonce, pcrs=[15], bank=BANK)
        pcr15 = (await tpm.read_pcrs(BANK, [15]))[15].hex()
        pcr15_384 = (await tpm.read_pcrs("sha384", [15]))[15].hex()
        entries_b = list(log.entries)
        await tpm.shutdown_clear()
    return Material(
        ak=ak.public, other_ak=other.public, ek=ek.public,
        quote_a=_quote_text(qa), quote_b=_quote_text(qb), quote_c=_quote_text(qc),
        other_nonce_quote=_quote_text(qo), pcr15=pcr15, entries_a=entries_a, entries_b=entries_b,
        ima_key_der=der,
        forged_sig_quote=_flip_signature_bit(_quote_text(qa)),
        ecc_ak=ecc.public, ecc_quote_a=_quote_text(qe), ecc_forged_quote=_flip_signature_bit(_quote_text(qe)),
        ak_384=ak384.public, quote_a_384=_quote_text(qa384), pcr15_384=pcr15_384,
    )


def _flip_signature_bit(quote: str) -> str:
    """The quote with the last byte of its TPMT_SIGNATURE changed (RSA: the signature; ECDSA: S)."""
    attest, sig, blob = quote[1:].split(":")
    flipped = bytearray(base64.b64decode(sig))
    flipped[-1] ^= 1
    return f"r{attest}:{base64.b64encode(bytes(flipped)).decode()}:{blob}"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def list_text(entries: list[ima.Entry], template_hash_alg: str = "sha1") -> str:
    """The ASCII list; with another template-hash column (PCR 10 extends are unchanged)."""
    out = []
    for e in entries:
        if template_hash_alg != "sha1" and not e.is_violation:
            e = dataclasses.replace(e, template_hash=ima.template_hash(e, template_hash_alg))
        elif template_hash_alg != "sha1":
            e = dataclasses.replace(e, template_hash=bytes(tpm2.DIGEST_SIZES[template_hash_alg]))
        out.append(ima.format_line(e) + "\n")
    return "".join(out)


def policy(m: Material, *, drop: tuple[str, ...] = (), excludes: tuple[str, ...] = (),
           log_hash_alg: str = "sha1", keyring: bool = True) -> dict[str, Any]:
    """A runtime policy (upstream format, generator 3) accepting everything in ``m``'s list
    except ``drop``; the IMA key is the policy's verification key and allowed on ``.ima``."""
    digests: dict[str, list[str]] = {}
    for e in m.entries_a:
        if e.template != "ima-buf":
            digests.setdefault(e.path, []).append(e.digest.hex())
    for path in drop:
        digests.pop(path, None)
    keyrings = {KEYRING: [hashlib.sha256(m.ima_key_der).hexdigest()]} if keyring else {}
    return {
        "meta": {"version": 1, "generator": 3, "timestamp": "2026-01-01 00:00:00"},
        "release": 0,
        "digests": digests,
        "excludes": list(excludes),
        "keyrings": keyrings,
        "ima": {"ignored_keyrings": [], "log_hash_alg": log_hash_alg, "dm_policy": None},
        "ima-buf": {},
        "verification-keys": json.dumps({"pubkeys": [b64(m.ima_key_der)]}),
    }


def data(m: Material, **over: Any) -> dict[str, Any]:
    """The evidence ``data`` of the good case (quote A, its list, a policy accepting it)."""
    base = {
        "nonce": NONCE,
        "quote": m.quote_a,
        "hash_alg": BANK,
        "tpm_ak": b64(m.ak),
        "tpm_ek": b64(m.ek),
        "tpm_policy": json.dumps({"15": [m.pcr15], "mask": hex(1 << 10 | 1 << 15)}),
        "runtime_policy": json.dumps(policy(m)),
        "mb_policy": "",
        "ima_measurement_list": list_text(m.entries_a),
        "mb_log": "",
    }
    base.update(over)
    return base


def tpm(d: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tpm", "data": d}


def without(d: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in names}


def build_cases(m: Material) -> list[Case]:
    good = data(m)
    pcr15_only = data(m, quote=m.quote_c, runtime_policy="", ima_measurement_list="",
                      tpm_policy=json.dumps({"15": [m.pcr15], "mask": hex(1 << 15)}))
    extra = ima.build_entry("ima-ng", "/usr/bin/tool0", "sha256", hashlib.sha256(FILES["/usr/bin/tool0"]).digest())
    stranger = ima.build_entry("ima-ng", "/tmp/unquoted", "sha256", hashlib.sha256(b"x").digest())
    tampered = ima.build_entry("ima-ng", "/usr/bin/tool1", "sha256", hashlib.sha256(b"tampered").digest())
    no_ima_section = policy(m)
    ecc = data(m, quote=m.ecc_quote_a, tpm_ak=b64(m.ecc_ak))
    b384 = data(m, quote=m.quote_a_384, hash_alg="sha384", tpm_ak=b64(m.ak_384),
                tpm_policy=json.dumps({"15": [m.pcr15_384], "mask": hex(1 << 10 | 1 << 15)}))
    del no_ima_section["ima"]
    cases = [
        Case("good-runtime-and-tpm-policy", tpm(good), ok()),
        Case("good-runtime-policy-only", tpm(data(m, tpm_policy="")), ok()),
        Case("good-tpm-policy-only", tpm(pcr15_only), ok()),
        Case("good-no-policy", tpm(data(m, quote=m.quote_c, tpm_policy="", runtime_policy="",
                                        ima_measurement_list="")),
             bad_request(MISSING_POLICY),
             note="was a keytrio gap (fixed): without any policy (tpm_policy, runtime_policy or mb_policy) "
                  "upstream answers 400 default.missing_policy"),
        Case("wrong-nonce", tpm(data(m, nonce="wr0ngN0nce0123456789")), invalid(QUOTE_FAIL)),
        # the nonce as raw text (pull mode) or as base64 of the quote's extraData (push mode)
        Case("nonce-base64", tpm(data(m, nonce=b64(NONCE.encode()))), ok()),
        Case("nonce-base64-missing-padding", tpm(data(m, nonce=b64(NONCE.encode())[:-1])), invalid(QUOTE_FAIL),
             note="20 bytes are 28 base64 characters ending in '='; without it the text is neither the raw "
                  "nonce nor base64"),
        Case("nonce-base64-wrapped", tpm(data(m, nonce=_wrapped(b64(NONCE.encode())))), ok(),
             note="a line break inside the base64 text is skipped, as upstream's lenient decoder does"),
        Case("nonce-base64-of-other-nonce", tpm(data(m, nonce=b64(b"0therN0nce0therN0nce"))), invalid(QUOTE_FAIL)),
        Case("nonce-base64-other-quote", tpm(data(m, quote=m.other_nonce_quote, nonce=b64(b"0therN0nce0therN0nce"))),
             ok(), note="the other quote's own nonce, base64: its extraData"),
        Case("ecc-ak-nonce-base64", tpm({**ecc, "nonce": b64(NONCE.encode())}), ok()),
        Case("sha384-bank-nonce-base64", tpm({**b384, "nonce": b64(NONCE.encode())}), ok()),
        Case("replayed-quote-other-nonce", tpm(data(m, quote=m.other_nonce_quote)), invalid(QUOTE_FAIL)),
        Case("other-ak", tpm(data(m, tpm_ak=b64(m.other_ak))), invalid(QUOTE_FAIL),
             upstream=invalid("pcr_validation.missing_pcrs"), kind="upstream-defect", note=SIG_NOTE),
        Case("other-ak-runtime-policy-only", tpm(data(m, tpm_ak=b64(m.other_ak), tpm_policy="")),
             invalid(QUOTE_FAIL), upstream=ok(), kind="upstream-defect", note=SIG_NOTE),
        Case("forged-signature", tpm(data(m, quote=m.forged_sig_quote)), invalid(QUOTE_FAIL),
             upstream=invalid("pcr_validation.missing_pcrs"), kind="upstream-defect", note=SIG_NOTE),
        Case("forged-signature-runtime-policy-only", tpm(data(m, quote=m.forged_sig_quote, tpm_policy="")),
             invalid(QUOTE_FAIL), upstream=ok(), kind="upstream-defect", note=SIG_NOTE),
        Case("pcr-mismatch-tpm-policy", tpm(data(m, tpm_policy=json.dumps({"15": ["00" * 32], "mask": "0x8400"}))),
             invalid("pcr_validation.invalid_pcr_15")),
        Case("pcr-mismatch-tpm-policy-only", tpm({**pcr15_only, "tpm_policy": json.dumps({"15": ["11" * 32]})}),
             invalid("pcr_validation.invalid_pcr_15")),
        Case("file-not-in-policy", tpm(data(m, runtime_policy=json.dumps(policy(m, drop=("/usr/bin/tool1",))))),
             invalid(NOT_IN_ALLOWLIST)),
        Case("wrong-digest", tpm(data(m, runtime_policy=json.dumps(_wrong_digest(policy(m), "/usr/bin/tool2")))),
             invalid(RUNTIME_POLICY_HASH)),
        Case("excluded-path", tpm(data(m, runtime_policy=json.dumps(
            policy(m, drop=("/usr/bin/tool1",), excludes=("/usr/bin/tool1",))))), ok()),
        Case("tomtou", tpm(data(m, quote=m.quote_b, ima_measurement_list=list_text(m.entries_b))),
             invalid(TOMTOU_FAIL), upstream=ok(), kind="upstream-defect",
             note="ignore_tomtou_errors = false: upstream 7.14.3 records a tomtou failure only when "
                  "ignore_tomtou_errors is TRUE (ima/ast.py) and otherwise skips the entry, its path "
                  "never checked; keytrio fails a ToMToU entry unless ignore_tomtou_errors (PROTOCOL.md)"),
        Case("log-ahead-of-quote", tpm(data(m, ima_measurement_list=list_text([*m.entries_a, extra]))), ok()),
        Case("log-ahead-unquoted-line-outside-policy",
             tpm(data(m, ima_measurement_list=list_text([*m.entries_a, stranger]))), invalid(NOT_IN_ALLOWLIST),
             note="was deliberate (keytrio left lines after the quoted position unchecked): every line "
                  "presented is judged, as upstream does"),
        Case("log-ahead-unquoted-line-wrong-digest",
             tpm(data(m, ima_measurement_list=list_text([*m.entries_a, tampered]))), invalid(RUNTIME_POLICY_HASH)),
        Case("log-ahead-unquoted-unparsable-line",
             tpm(data(m, ima_measurement_list=list_text(m.entries_a) + "10 not an ima line\n")),
             invalid("ima.parser.entry")),
        Case("log-ahead-unquoted-line-excluded", tpm(data(m, runtime_policy=json.dumps(
            policy(m, excludes=("/tmp/unquoted",))), ima_measurement_list=list_text([*m.entries_a, stranger]))),
             ok()),
        Case("log-behind-quote", tpm(data(m, quote=m.quote_b)), invalid(PCR_MISMATCH)),
        Case("log-truncated", tpm(data(m, ima_measurement_list=list_text(m.entries_a[:3]))), invalid(PCR_MISMATCH)),
        Case("template-hash-sha256", tpm(data(m, ima_measurement_list=list_text(m.entries_a, "sha256"),
                                              runtime_policy=json.dumps(policy(m, log_hash_alg="sha256")))), ok()),
        Case("template-hash-sha256-policy-sha1", tpm(data(m, ima_measurement_list=list_text(m.entries_a, "sha256"))),
             invalid(IMA_HASH)),
        Case("template-hash-sha1-policy-sha256",
             tpm(data(m, runtime_policy=json.dumps(policy(m, log_hash_alg="sha256")))), invalid(IMA_HASH)),
        Case("ima-sig-invalid-signature-digest-listed", tpm(good), ok(),
             note="same evidence as the good case: the ima-sig line signed by another key is accepted "
                  "through its listed digest"),
        Case("ima-sig-valid-signature-not-listed", tpm(data(m, runtime_policy=json.dumps(policy(m, drop=(SIGNED,))))),
             ok(), upstream=invalid(NOT_IN_ALLOWLIST), kind="deliberate",
             note="upstream's /verify/evidence passes no IMA keyrings (cloud_verifier_common."
                  "process_verify_attestation), so the policy's verification-keys are ignored there, "
                  "unlike in its own attestation loop; keytrio gives the loop's verdict"),
        Case("ima-sig-invalid-signature-not-listed",
             tpm(data(m, runtime_policy=json.dumps(policy(m, drop=(BADSIG,))))), invalid(NOT_IN_ALLOWLIST)),
        Case("ima-buf-keyring-denied", tpm(data(m, runtime_policy=json.dumps(policy(m, keyring=False)))),
             invalid(NOT_IN_ALLOWLIST)),
        Case("ima-buf-keyring-ignored", tpm(data(m, runtime_policy=json.dumps(
            _ignored_keyring(policy(m, keyring=False))))), ok()),
        Case("missing-quote", tpm(without(good, "quote")), bad_request(MISSING), note=MISSING_NOTE),
        Case("missing-nonce", tpm(data(m, nonce="")), bad_request(MISSING), note=MISSING_NOTE),
        Case("missing-tpm-ak", tpm(without(good, "tpm_ak")), bad_request(MISSING), note=MISSING_NOTE),
        Case("missing-tpm-ek", tpm(without(good, "tpm_ek")), bad_request(MISSING),
             note="was a keytrio gap (fixed): upstream requires tpm_ek (and does not use it)"),
        Case("missing-ima-list-with-runtime-policy", tpm(data(m, ima_measurement_list="")),
             invalid(PCR_MISMATCH),
             note="was a keytrio gap (fixed): upstream evaluates an empty list (valid only while PCR 10 is "
                  "still zero)"),
        Case("missing-type", {"data": good}, bad_request("type.missing_param"), upstream=UPSTREAM_400,
             kind="deliberate", note="keytrio's 400s always carry valid=false and a failure naming the field; "
                                     "upstream's carry results {}"),
        Case("missing-data", {"type": "tpm"}, bad_request("data.missing_param"), upstream=UPSTREAM_400,
             kind="deliberate"),
        Case("unsupported-type", {"type": "sgx", "data": good}, bad_request("type.invalid_param"),
             upstream=UPSTREAM_400, kind="deliberate"),
        Case("body-not-json", b"{not json", UPSTREAM_400),
        Case("body-not-json-form-content-type", b"{not json", UPSTREAM_400, upstream=Verdict(5, None),
             kind="upstream-defect", content_type="application/x-www-form-urlencoded",
             note="upstream answers 500 with an empty body when a body that is not JSON is not labelled JSON"),
        Case("data-not-an-object", tpm("quote"), bad_request("data.missing_param"), upstream=Verdict(5, None),
             kind="upstream-defect", note="upstream answers 500 when data is a string"),
        Case("nonce-not-a-string", tpm(data(m, nonce=12345)), bad_request("nonce.invalid_param"),
             upstream=invalid("qoute_validation.invalid_quote"), kind="deliberate",
             note="keytrio answers input it cannot use with 400 <field>.invalid_param; upstream evaluates "
                  "it and reports the exception as qoute_validation.invalid_quote"),
        Case("tpm-policy-not-json", tpm(data(m, tpm_policy="{nope")), bad_request("tpm_policy.invalid_param"),
             upstream=invalid("qoute_validation.invalid_quote"), kind="deliberate"),
        Case("runtime-policy-not-json", tpm(data(m, runtime_policy="{nope")),
             bad_request("runtime_policy.invalid_param"), upstream=Verdict(5, None), kind="upstream-defect",
             note="upstream answers 500 to a runtime_policy that is not JSON"),
        Case("runtime-policy-without-ima-section", tpm(data(m, runtime_policy=json.dumps(no_ima_section))),
             bad_request("runtime_policy.invalid_param"), upstream=invalid("qoute_validation.invalid_quote"),
             kind="upstream-defect",
             note="upstream's policy schema requires the ima section, but its verifier does not validate "
                  "the schema: the evaluation fails with KeyError 'ima' and the crash is reported as an "
                  "invalid quote; keytrio refuses the malformed policy as a 400 naming the missing section "
                  "(as upstream's tenant and keylime-policy do)"),
        # ECC AK (P-256, ECDSA/SHA-256) instead of RSA
        Case("ecc-ak-good", tpm(ecc), ok()),
        Case("ecc-ak-wrong-nonce", tpm({**ecc, "nonce": "wr0ngN0nce0123456789"}), invalid(QUOTE_FAIL)),
        Case("ecc-ak-forged-signature", tpm({**ecc, "quote": m.ecc_forged_quote}), invalid(QUOTE_FAIL),
             upstream=invalid("pcr_validation.missing_pcrs"), kind="upstream-defect", note=SIG_NOTE),
        Case("ecc-quote-with-rsa-ak", tpm({**ecc, "tpm_ak": b64(m.ak)}), invalid(QUOTE_FAIL)),
        Case("ecc-ak-file-not-in-policy",
             tpm({**ecc, "runtime_policy": json.dumps(policy(m, drop=("/usr/bin/tool1",)))}),
             invalid(NOT_IN_ALLOWLIST)),
        # the sha384 PCR bank (PCR 10 replayed with sha384 template hashes)
        Case("sha384-bank-good", tpm(b384), ok()),
        Case("sha384-bank-pcr15-mismatch", tpm({**b384, "tpm_policy": json.dumps(
            {"15": [m.pcr15], "mask": hex(1 << 10 | 1 << 15)})}), invalid("pcr_validation.invalid_pcr_15")),
        Case("sha384-bank-file-not-in-policy",
             tpm({**b384, "runtime_policy": json.dumps(policy(m, drop=("/usr/bin/tool1",)))}),
             invalid(NOT_IN_ALLOWLIST)),
        Case("sha384-bank-log-behind", tpm({**b384, "ima_measurement_list": list_text(m.entries_a[:-1])}),
             invalid(PCR_MISMATCH)),
        Case("sha384-quote-declared-sha256", tpm({**b384, "hash_alg": "sha256"}), invalid(QUOTE_FAIL)),
        Case("sha384-quote-with-sha256-ak", tpm({**b384, "tpm_ak": b64(m.ak)}), invalid(QUOTE_FAIL),
             upstream=invalid("pcr_validation.missing_pcrs"), kind="upstream-defect", note=SIG_NOTE),
        Case("quote-garbage", tpm(data(m, quote="rAAAA:BBBB:CCCC")), invalid(QUOTE_FAIL)),
        # quotes upstream cannot even split and decode: its id is invalid_quote
        Case("quote-not-r-prefixed", tpm(data(m, quote="x" + m.quote_a[1:])), invalid(INVALID_QUOTE)),
        Case("quote-two-parts", tpm(data(m, quote=m.quote_a.rsplit(":", 1)[0])), invalid(INVALID_QUOTE)),
        Case("quote-bad-base64-padding", tpm(data(m, quote=_short_attest(m.quote_a))), invalid(INVALID_QUOTE)),
        Case("hash-alg-unknown", tpm(data(m, hash_alg="md5")), invalid("qoute_validation.invalid_hash_alg"),
             note="was a keytrio gap (fixed): upstream reports an unrecognised hash_alg as qoute_validation.invalid_hash_alg"),
        Case("hash-alg-other-bank", tpm(data(m, hash_alg="sha1")), invalid(QUOTE_FAIL)),
    ]
    return cases


def _short_attest(quote: str) -> str:
    """The quote with the last character of its TPMS_ATTEST base64 cut (padding now wrong)."""
    attest, _, rest = quote[1:].partition(":")
    return f"r{attest[:-1]}:{rest}"


def _wrapped(text: str) -> str:
    """base64 text with a line break in it (as `base64` wraps long output)."""
    return text[:12] + "\n" + text[12:]


def _wrong_digest(doc: dict[str, Any], path: str) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    doc["digests"][path] = ["ab" * 32]
    return doc


def _ignored_keyring(doc: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    doc["ima"]["ignored_keyrings"] = [KEYRING]
    return doc
