"""Validators for request inputs. Each returns the normalised value or raises ValidationError."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import uuid as _uuid

from cryptography import x509

from keytrio.protocol import safejson
from keytrio.protocol.errors import ValidationError

_NONCE = re.compile(r"^[A-Za-z0-9]{1,64}$")
_MASK = re.compile(r"^0x[0-9a-fA-F]{1,6}$")
_HEX = re.compile(r"^[0-9a-fA-F]*$")
_PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n([A-Za-z0-9+/=\r\n]+?)\r?\n?-----END \1-----", re.S
)

#: Agent ids follow upstream's rule (keylime.common.validators.valid_agent_id): one or more word
#: characters (Unicode letters, digits, "_"), dots and dashes. At most 80 of them: upstream stores
#: agent_id as String(80), so a longer id works there only on SQLite.
AGENT_ID_MAX = 80
_AGENT_ID = re.compile(r"[\w.-]+")
_CANONICAL_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")

_HOSTNAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,253}[A-Za-z0-9])?$")

MAX_PCR = 23


def agent_id(value: object, field: str = "agent_id") -> str:
    """An agent id (upstream's ``[\\w.-]+``, at most :data:`AGENT_ID_MAX` characters).

    A UUID in canonical 8-4-4-4-12 form is lower-cased, so ``tenant status`` finds an agent whatever
    the case it is typed in; every other id is kept exactly (``Foo`` and ``foo`` are two agents)."""
    if not isinstance(value, str) or not value:
        raise ValidationError(field, "must be a non-empty string")
    if len(value) > AGENT_ID_MAX:
        raise ValidationError(field, f"longer than {AGENT_ID_MAX} characters")
    if not _AGENT_ID.fullmatch(value):
        raise ValidationError(field, "not a valid agent id (letters, digits, '_', '.' and '-' only)")
    if value in (".", ".."):  # URL dot segments: clients rewrite /agents/.. before sending it
        raise ValidationError(field, "'.' and '..' cannot be agent ids")
    if _CANONICAL_UUID.fullmatch(value):
        return value.lower()
    return value


def uuid(value: object, field: str = "uuid") -> str:
    """A strict RFC 4122 UUID in canonical lower-case form."""
    if not isinstance(value, str):
        raise ValidationError(field, "must be a string")
    try:
        return str(_uuid.UUID(value))
    except ValueError as exc:
        raise ValidationError(field, "not a valid UUID") from exc


def nonce(value: object, field: str = "nonce") -> str:
    """1 to 64 ASCII letters and digits (the TPM's qualifying-data limit)."""
    if not isinstance(value, str) or not _NONCE.fullmatch(value):
        raise ValidationError(field, "must be 1-64 characters [A-Za-z0-9]")
    return value


def pcr_mask(value: object, field: str = "mask") -> int:
    """A hex mask ``0x…`` over PCRs 0-23; returns the integer."""
    if not isinstance(value, str) or not _MASK.fullmatch(value):
        raise ValidationError(field, "must be a hex mask 0x… over PCRs 0-23")
    mask = int(value, 16)
    if mask >> (MAX_PCR + 1):
        raise ValidationError(field, "selects a PCR above 23")
    return mask


def mask_to_pcrs(mask: int) -> list[int]:
    return [i for i in range(MAX_PCR + 1) if mask >> i & 1]


def pcrs_to_mask(pcrs: list[int] | tuple[int, ...] | set[int]) -> str:
    m = 0
    for p in pcrs:
        if not 0 <= p <= MAX_PCR:
            raise ValidationError("pcr", f"PCR {p} out of range 0-23")
        m |= 1 << p
    return hex(m)


def b64(value: object, field: str, *, allow_empty: bool = False, max_len: int | None = None) -> bytes:
    """Strict standard base64 (padding required, no stray characters); returns the bytes."""
    if not isinstance(value, str):
        raise ValidationError(field, "must be a base64 string")
    if not value and not allow_empty:
        raise ValidationError(field, "must not be empty")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValidationError(field, "is not valid base64") from exc
    if max_len is not None and len(raw) > max_len:
        raise ValidationError(field, f"decodes to more than {max_len} bytes")
    return raw


def hex_bytes(value: object, field: str, *, length: int | None = None) -> bytes:
    if not isinstance(value, str) or not _HEX.fullmatch(value) or len(value) % 2:
        raise ValidationError(field, "must be an even-length hex string")
    raw = bytes.fromhex(value)
    if length is not None and len(raw) != length:
        raise ValidationError(field, f"must be {length} bytes")
    return raw


def pem(value: object, field: str, *, label: str | None = None) -> str:
    """A PEM text with at least one well-formed block (of ``label`` if given)."""
    if not isinstance(value, str):
        raise ValidationError(field, "must be a PEM string")
    try:
        raw = value.encode("ascii")
    except UnicodeEncodeError as exc:
        raise ValidationError(field, "PEM must be ASCII") from exc
    blocks = _PEM_BLOCK.findall(raw)
    if not blocks:
        raise ValidationError(field, "is not PEM")
    for kind, body in blocks:
        if label is not None and kind.decode() != label:
            raise ValidationError(field, f"expected a PEM {label}")
        try:
            base64.b64decode(b"".join(body.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValidationError(field, "PEM body is not valid base64") from exc
    return value


def mtls_cert(value: object, field: str = "mtls_cert") -> str | None:
    """An agent's mTLS certificate (one PEM X.509 certificate); None for none or ``"disabled"``,
    which upstream agents with mTLS switched off send."""
    if value is None or value == "disabled":
        return None
    text = pem(value, field, label="CERTIFICATE")
    try:
        x509.load_pem_x509_certificate(text.encode("ascii"))
    except ValueError:
        raise ValidationError(field, "is not a valid X.509 certificate") from None
    return text


def integer(value: object, field: str, *, lo: int = 0, hi: int | None = None) -> int:
    """A non-negative int (not a bool) in ``lo..hi``; text of ASCII digits is accepted, as
    upstream's tenant sends ports as text (safejson.digits: bounded, no Unicode digits)."""
    return safejson.digits(value, field, lo=lo, hi=hi)


def pcr_number(value: object, field: str = "pcr") -> int:
    """A PCR index 0-23, as an int or as the text of a JSON key (``"10"``)."""
    return safejson.digits(value, field, lo=0, hi=MAX_PCR, max_len=2)


def port(value: object, field: str = "port") -> int:
    return integer(value, field, lo=1, hi=65535)


def host(value: object, field: str = "ip") -> str:
    """An IP address (normalised) or a DNS host name, as agents register their contact address."""
    if not isinstance(value, str) or not value:
        raise ValidationError(field, "must be an IP address or host name")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(value):
        raise ValidationError(field, "must be an IP address or host name")
    return value


_DIGEST_HEX = re.compile(r"^(?:0x)?[0-9a-fA-F]{2,256}$")


def tpm_policy(policy: object, field: str = "tpm_policy", *, require_mask: bool = True) -> dict[str, object]:
    """A PCR policy object: ``{"mask": "0x…", "<pcr 0-23>": hex digest | [hex digests]}``."""
    if not isinstance(policy, dict):
        raise ValidationError(field, "must be a JSON object")
    if "mask" in policy:
        pcr_mask(policy["mask"], f"{field}.mask")
    elif require_mask:
        raise ValidationError(field, 'needs a "mask"')
    for key, accepted in policy.items():
        if key == "mask":
            continue
        try:
            pcr_number(key)
        except ValidationError:
            raise ValidationError(field, f"key {key[:16]!r} is not a PCR number 0-23") from None
        values = [accepted] if isinstance(accepted, str) else accepted
        if not isinstance(values, list) or not all(isinstance(h, str) and _DIGEST_HEX.fullmatch(h) for h in values):
            raise ValidationError(field, f"PCR {key}: accepted values must be hex digests")
    return policy
