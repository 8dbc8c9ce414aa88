"""Runtime (IMA) policies: JSON ``meta.version`` 1, validated once into an immutable index.

Format (upstream Keylime 7.14.3, ``keylime-policy create runtime``)::

    {"meta": {"version": 1, "generator": 3, "timestamp": "..."}, "release": 0,
     "digests": {path: [hex, ...]}, "excludes": [regex, ...], "keyrings": {name: [hex]},
     "ima": {"ignored_keyrings": [], "log_hash_alg": "sha1", "dm_policy": null},
     "ima-buf": {name: [hex]}, "verification-keys": ""}

Decisions (differences from upstream's JSON schema are all on the lenient side and documented):

- Every section upstream's JSON schema requires must be present (``meta.version``,
  ``meta.generator``, ``release``, ``digests``, ``excludes``, ``keyrings``, ``ima`` with
  ``ignored_keyrings``/``log_hash_alg``/``dm_policy``, ``ima-buf``, ``verification-keys``): upstream's
  tenant and ``keylime-policy`` refuse a policy without them, and upstream's verifier, which does
  not check, fails every quote with a KeyError on it. keytrio refuses it when it is uploaded,
  enrolled or sent as evidence, naming every missing section. Unknown top-level keys are ignored
  (upstream's schema allows them too).
- ``b""``, whitespace or ``{}`` give the *empty policy* (``is_empty``): upstream stores "{}" as no
  policy and then evaluates with its EMPTY_RUNTIME_POLICY, i.e. every measured file is outside
  the policy. Whether to check IMA at all for such an agent is the verifier's decision.
- Digests: hex of any of the sizes sha1/sha224/sha256/sha384/sha512 (20/28/32/48/64 bytes), any
  case; stored as bytes. Upstream's pattern ``[0-9a-f]{40,128}`` also lets odd sizes through.
- Excludes are Python regexes applied with ``re.match`` (anchored at the start only), as
  upstream; each is compiled once when the policy is parsed.
- ``ima.dm_policy`` must be null (device-mapper policies are not supported, upstream's schema
  says the same).
- ``verification-keys``: "" or a JSON string ``{"pubkeys": [b64 DER SPKI], "keyids": [int]}``
  (possibly JSON-encoded twice, as upstream tolerates); keyids default to the kernel's keyidv2.
- A DSSE envelope is unwrapped by :func:`load_policy` only (signature policy is explicit there).

``checksum`` is the hex SHA-256 of the exact source bytes (the payload for a DSSE envelope is
*not* what is hashed: the envelope as uploaded is), which is also what upstream's
``runtime_policy_sha256`` is compared against; the verifier stores one copy per checksum.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from keytrio.protocol import dsse, safejson
from keytrio.protocol.errors import ProtocolError, ValidationError
from keytrio.protocol.tpm2 import DIGEST_SIZES

POLICY_VERSION = 1
#: ``ima.log_hash_alg``: the template-hash column is replayed with the PCR banks' hashes.
LOG_HASH_ALGS = tuple(DIGEST_SIZES)
#: Sizes in bytes a listed file digest may have (sha1, sha224, sha256/sm3, sha384, sha512).
FILE_DIGEST_SIZES = frozenset({20, 28, 32, 48, 64})
_HEX = re.compile(r"[0-9a-fA-F]+")
#: Numbered/named backreferences change meaning inside one big alternation.
_BACKREF = re.compile(r"\\[1-9]|\(\?P=")

ImaPublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


class PolicyError(ValidationError):
    """A runtime policy is invalid; ``field`` is the JSON path, e.g. ``digests["/bin/x"][1]``."""


class KeyTypeError(ProtocolError):
    """Data is a key or certificate, but of a type IMA signatures cannot use (not RSA/EC)."""


# --- IMA verification keys -------------------------------------------------------------------


@dataclass(frozen=True)
class ImaKey:
    """A public key for ima-sig checks, indexed by the kernel's 32-bit keyidv2."""

    keyid: int
    public_key: ImaPublicKey = field(compare=False)
    der: bytes  # SubjectPublicKeyInfo DER: identity and serialised form

    def to_json(self) -> list[Any]:
        return [self.keyid, base64.b64encode(self.der).decode()]

    @classmethod
    def from_json(cls, obj: object) -> ImaKey:
        if not (isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], int)):
            raise ValidationError("key", "must be [keyid, b64 DER]")
        try:
            der = base64.b64decode(obj[1], validate=True)
        except (binascii.Error, TypeError) as exc:
            raise ValidationError("key", "not base64") from exc
        key = _load_spki(der)
        if key is None:
            raise ValidationError("key", "not a DER public key")
        return cls.of(key, obj[0])

    @classmethod
    def of(cls, public_key: ImaPublicKey, keyid: int | None = None) -> ImaKey:
        der = public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return cls(keyid if keyid else keyidv2(public_key), public_key, der)


def keyidv2(public_key: ImaPublicKey) -> int:
    """The kernel's keyidv2: low 4 bytes of SHA-1 over the PKCS#1 (RSA) / X9.62 point (EC) bytes."""
    if isinstance(public_key, rsa.RSAPublicKey):
        raw = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    else:
        raw = public_key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
    return int.from_bytes(hashlib.new("sha1", raw).digest()[-4:], "big")  # noqa: S324 (the kernel defines keyidv2 with SHA-1)


def _check_type(key: object) -> ImaPublicKey:
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise KeyTypeError(f"unsupported key type {type(key).__name__}")
    return key


def _load_spki(der: bytes) -> ImaPublicKey | None:
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, UnsupportedAlgorithm):
        return None
    return _check_type(key)


def _cert_keyid(cert: x509.Certificate) -> int | None:
    # The kernel takes keyidv2 from the certificate's Subject Key Identifier when it has one.
    try:
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return None
    return int.from_bytes(ski.digest[-4:], "big") if len(ski.digest) >= 4 else None


def parse_ima_key(data: bytes) -> ImaKey | None:
    """A key from an x509 certificate or public key, DER or PEM; None when ``data`` is neither.

    Raises KeyTypeError for a parsable key that is not RSA/EC (upstream's ``ima.invalid_key``).
    """
    data = bytes(data)
    for load_cert in (x509.load_der_x509_certificate, x509.load_pem_x509_certificate):
        try:
            cert = load_cert(data)
            key = cert.public_key()
        except (ValueError, UnsupportedAlgorithm):
            continue
        return ImaKey.of(_check_type(key), _cert_keyid(cert))
    for load_key in (serialization.load_der_public_key, serialization.load_pem_public_key):
        try:
            key = load_key(data)
        except (ValueError, UnsupportedAlgorithm):
            continue
        return ImaKey.of(_check_type(key))
    return None


# --- the parsed policy -------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class RuntimePolicy:
    """An immutable index of one runtime policy, built once and shared by every agent using it."""

    digests: Mapping[str, frozenset[bytes]]
    excludes: tuple[str, ...]
    keyrings: Mapping[str, frozenset[bytes]]
    ima_buf: Mapping[str, frozenset[bytes]]
    ignored_keyrings: frozenset[str]
    log_hash_alg: str
    verification_keys: Mapping[int, tuple[ImaKey, ...]]
    checksum: str
    release: int = 0
    generator: int | None = None
    is_empty: bool = False
    _exclude_re: re.Pattern[str] | None = field(default=None, repr=False)
    _exclude_each: tuple[re.Pattern[str], ...] = field(default=(), repr=False)

    def excluded(self, path: str) -> bool:
        """True when an ``excludes`` regex matches at the start of ``path`` (``re.match``)."""
        if self._exclude_re is not None:
            return self._exclude_re.match(path) is not None
        return any(p.match(path) for p in self._exclude_each)

    def keyring_ignored(self, name: str) -> bool:
        return "*" in self.ignored_keyrings or name in self.ignored_keyrings


def _q(key: str) -> str:
    return json.dumps(key, ensure_ascii=False)


def _digest_map(obj: object, where: str) -> dict[str, frozenset[bytes]]:
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise PolicyError(where, "must be an object of name -> [hex digest, ...]")
    out: dict[str, frozenset[bytes]] = {}
    # The JSON-path label of an entry is built only when it is wrong: building it for every
    # entry was half the cost of loading a 10,000-file policy (docs/performance.md).
    for name, values in obj.items():
        if not isinstance(values, list) or not values:
            raise PolicyError(f"{where}[{_q(name)}]", "must be a non-empty list of hex digests")
        ds = set()
        for i, v in enumerate(values):
            if not isinstance(v, str) or not _HEX.fullmatch(v) or len(v) % 2:
                raise PolicyError(f"{where}[{_q(name)}][{i}]", "not hex")
            if len(v) // 2 not in FILE_DIGEST_SIZES:
                raise PolicyError(f"{where}[{_q(name)}][{i}]", f"{len(v) // 2}-byte digest: no known hash size")
            ds.add(bytes.fromhex(v))
        out[name] = frozenset(ds)
    return out


def _compile_excludes(
    obj: object,
) -> tuple[tuple[str, ...], re.Pattern[str] | None, tuple[re.Pattern[str], ...]]:
    if obj is None:
        return (), None, ()
    if not isinstance(obj, list):
        raise PolicyError("excludes", "must be a list of regular expressions")
    each = []
    for i, rx in enumerate(obj):
        if not isinstance(rx, str):
            raise PolicyError(f"excludes[{i}]", "must be a string")
        try:
            each.append(re.compile(rx))
        except re.error as exc:
            raise PolicyError(f"excludes[{i}]", f"bad regex {rx!r}: {exc}") from exc
    if not each:
        return (), None, ()
    # One alternation is the fast path (one match call per path); patterns that cannot be combined
    # (global inline flags, numbered backreferences) keep their own compiled forms instead.
    combined: re.Pattern[str] | None = None
    if not any(_BACKREF.search(rx) for rx in obj):
        try:
            combined = re.compile("|".join(f"(?:{rx})" for rx in obj))
        except re.error:  # e.g. a global inline flag "(?i)" that is only legal at the start
            combined = None
    return tuple(obj), combined, tuple(each)


def _verification_keys(obj: object) -> dict[int, tuple[ImaKey, ...]]:
    if obj is None or obj == "":
        return {}
    if not isinstance(obj, str):
        raise PolicyError("verification-keys", "must be a string (JSON-encoded keyring)")
    try:
        ring = safejson.loads(obj)
        if isinstance(ring, str):  # upstream tolerates a doubly encoded keyring
            ring = safejson.loads(ring)
    except safejson.JsonError as exc:
        raise PolicyError("verification-keys", f"not JSON ({exc})") from exc
    if not isinstance(ring, dict) or not isinstance(ring.get("pubkeys"), list):
        raise PolicyError("verification-keys", 'must be {"pubkeys": [b64 DER], "keyids": [int]}')
    keyids = ring.get("keyids", [])
    if not isinstance(keyids, list) or not all(
        isinstance(k, int) and not isinstance(k, bool) for k in keyids
    ):
        raise PolicyError("verification-keys.keyids", "must be a list of integers")
    out: dict[int, list[ImaKey]] = {}
    for i, b64 in enumerate(ring["pubkeys"]):
        at = f"verification-keys.pubkeys[{i}]"
        try:
            der = base64.b64decode(b64, validate=True)
        except (binascii.Error, TypeError, ValueError) as exc:
            raise PolicyError(at, "not base64") from exc
        try:
            key = _load_spki(der)
        except KeyTypeError as exc:
            raise PolicyError(at, str(exc)) from exc
        if key is None:
            raise PolicyError(at, "not a DER SubjectPublicKeyInfo")
        ik = ImaKey.of(key, keyids[i] if i < len(keyids) else None)
        out.setdefault(ik.keyid, []).append(ik)
    return {k: tuple(v) for k, v in out.items()}


def _int(obj: object, where: str, default: int | None) -> int | None:
    if obj is None:
        return default
    if not isinstance(obj, int) or isinstance(obj, bool) or obj < 0:
        raise PolicyError(where, "must be an integer >= 0")
    return obj


def _decode(raw: bytes | str) -> tuple[bytes, str]:
    if isinstance(raw, str):
        return raw.encode("utf-8", "surrogatepass"), raw
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise PolicyError("$", "policy must be bytes or text")
    source = bytes(raw)
    try:
        return source, source.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError("$", "not UTF-8") from exc


def _load_json(text: str) -> Any:
    try:
        return safejson.loads(text, allow_surrogates=True)  # non-UTF-8 file names
    except safejson.JsonError as exc:
        raise PolicyError("$", str(exc)) from exc


REQUIRED_SECTIONS = ("meta", "release", "digests", "excludes", "keyrings", "ima", "ima-buf", "verification-keys")
REQUIRED_META = ("version", "generator")
REQUIRED_IMA = ("ignored_keyrings", "log_hash_alg", "dm_policy")


def policy_document(**sections: Any) -> dict[str, Any]:
    """A complete policy document (upstream's empty policy, generator 1) with ``sections`` put in.

    Section names with a dash are passed as ``**{"ima-buf": ...}``; an ``ima`` dict is merged
    into the default ``ima`` section, so ``ima={"log_hash_alg": "sha256"}`` is enough.
    """
    doc: dict[str, Any] = {
        "meta": {"version": POLICY_VERSION, "generator": 1},
        "release": 0,
        "digests": {},
        "excludes": [],
        "keyrings": {},
        "ima": {"ignored_keyrings": [], "log_hash_alg": "sha1", "dm_policy": None},
        "ima-buf": {},
        "verification-keys": "",
    }
    for name, value in sections.items():
        if name == "ima" and isinstance(value, dict):
            doc["ima"] = {**doc["ima"], **value}
        else:
            doc[name] = value
    return doc


def _require(obj: Mapping[str, Any], keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise PolicyError(where, "missing required " + ", ".join(repr(k) for k in missing))


def parse_policy(raw: bytes | str) -> RuntimePolicy:
    """Validate a plain (unsigned) runtime policy and index it. Raises PolicyError."""
    source, text = _decode(raw)
    checksum = hashlib.sha256(source).hexdigest()
    doc = {} if not text.strip() else _load_json(text)
    return _build(doc, checksum)


def _build(doc: object, checksum: str) -> RuntimePolicy:
    if not isinstance(doc, dict):
        raise PolicyError("$", "must be a JSON object")
    if dsse.is_envelope(doc):
        raise PolicyError("$", "is a DSSE envelope: load it with load_policy")
    if not doc:
        return _empty(checksum)
    meta = doc.get("meta")
    if not isinstance(meta, dict):
        raise PolicyError("meta", "must be an object with 'version'")
    version = meta.get("version")
    if version != POLICY_VERSION or isinstance(version, bool):
        raise PolicyError("meta.version", f"unsupported version {version!r} (expected {POLICY_VERSION})")
    # after the version: a policy of another format version is reported as that, not as gaps
    _require(doc, REQUIRED_SECTIONS, "$")
    _require(meta, REQUIRED_META, "meta")
    generator = _int(meta.get("generator"), "meta.generator", None)
    if "timestamp" in meta and not isinstance(meta["timestamp"], str):
        raise PolicyError("meta.timestamp", "must be a string")
    release = _int(doc.get("release"), "release", 0)
    digests = _digest_map(doc.get("digests"), "digests")
    excludes, combined, each = _compile_excludes(doc.get("excludes"))
    keyrings = _digest_map(doc.get("keyrings"), "keyrings")
    ima_buf = _digest_map(doc.get("ima-buf"), "ima-buf")
    ignored, alg = _ima_section(doc.get("ima"))
    keys = _verification_keys(doc.get("verification-keys"))
    return RuntimePolicy(
        digests=MappingProxyType(digests),
        excludes=excludes,
        keyrings=MappingProxyType(keyrings),
        ima_buf=MappingProxyType(ima_buf),
        ignored_keyrings=frozenset(ignored),
        log_hash_alg=alg,
        verification_keys=MappingProxyType(keys),
        checksum=checksum,
        release=release or 0,
        generator=generator,
        _exclude_re=combined,
        _exclude_each=each,
    )


def _ima_section(ima: object) -> tuple[list[str], str]:
    """The ``ima`` section: (ignored keyrings, log hash algorithm); no device-mapper policy."""
    if not isinstance(ima, dict):
        raise PolicyError("ima", "must be an object")
    _require(ima, REQUIRED_IMA, "ima")
    ignored = ima.get("ignored_keyrings")
    if ignored is None:
        ignored = []
    if not isinstance(ignored, list):
        raise PolicyError("ima.ignored_keyrings", "must be a list of keyring names")
    for i, name in enumerate(ignored):
        if not isinstance(name, str):
            raise PolicyError(f"ima.ignored_keyrings[{i}]", "must be a string")
    alg = ima.get("log_hash_alg", "sha1")
    if alg not in LOG_HASH_ALGS:
        raise PolicyError("ima.log_hash_alg", f"must be one of {', '.join(LOG_HASH_ALGS)}")
    if ima.get("dm_policy") is not None:
        raise PolicyError("ima.dm_policy", "device-mapper policies are not supported (must be null)")
    return ignored, alg


def _empty(checksum: str) -> RuntimePolicy:
    empty: Mapping[str, frozenset[bytes]] = MappingProxyType({})
    return RuntimePolicy(
        digests=empty,
        excludes=(),
        keyrings=empty,
        ima_buf=empty,
        ignored_keyrings=frozenset(),
        log_hash_alg="sha1",
        verification_keys=MappingProxyType({}),
        checksum=checksum,
        is_empty=True,
    )


def load_policy(
    raw: bytes | str,
    *,
    signing_key: bytes | str | None = None,
    require_signature: bool = False,
) -> RuntimePolicy:
    """A policy as uploaded: plain JSON or a DSSE envelope (``keylime-policy sign runtime``).

    - ``signing_key`` (upstream ``runtime_policy_key``: ECDSA public key PEM or x509 certificate)
      given: the policy must be an envelope with a signature by that key (DsseError otherwise);
    - ``require_signature`` (upstream ``require_allow_list_signatures``) without a key: refused;
    - neither: an envelope's payload is used unverified, as upstream does.
    The checksum is over the bytes as uploaded. Raises PolicyError or dsse.DsseError.
    """
    if require_signature and signing_key is None:
        raise PolicyError("runtime_policy_key", "a signed policy and its key are required")
    source, text = _decode(raw)
    checksum = hashlib.sha256(source).hexdigest()
    doc = {} if not text.strip() else _load_json(text)
    if not dsse.is_envelope(doc):
        if signing_key is not None:
            raise dsse.DsseError("policy is not DSSE-signed but a signing key was given")
        return _build(doc, checksum)
    if signing_key is not None:
        payload = dsse.verify_envelope(text, signing_key)
    else:
        _, payload, _ = dsse.parse_envelope(text)
    try:
        inner = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError("payload", "not UTF-8") from exc
    return _build(_load_json(inner) if inner.strip() else {}, checksum)
