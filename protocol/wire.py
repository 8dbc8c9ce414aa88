"""The agent's replies as typed values: the agent encodes them, the verifier and tenant decode them.

``results`` of ``GET quotes/integrity`` (:class:`IntegrityQuote`) and ``GET quotes/identity``
(:class:`IdentityQuote`), the key halves the tenant and verifier post (:class:`UKey`,
:class:`VKey`) and the agent's ``GET keys/verify`` answer (:class:`KeyVerify`). Revocation notices
are :class:`protocol.revocation.Notice` (``parse_notice`` decodes them). Everything a peer says is
hostile input: decoding checks every field's type.

* An integrity-quote reply that cannot be read is a list of ``qoute_validation.invalid_data``
  failures (upstream's id: "parsing agent get quote response failed"), ``context["check"]`` =
  ``"response"`` and ``context["field"]`` the field at fault, one per bad field.
* An identity-quote or verify reply that cannot be read raises :class:`ReplyError`.
* A key half the agent cannot use raises :class:`~protocol.errors.ValidationError` naming the field
  (the agent's 400).

Presence matters on the wire: ``pubkey`` only when the verifier asked ``partial=0``, the IMA keys
only when PCR 10 was asked (``ima_measurement_list`` null when the machine has no IMA list, as
upstream's agent says it), ``mb_measurement_list`` only when PCR 0 was asked (null without a log).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from keytrio.protocol import payload as pl
from keytrio.protocol import validation
from keytrio.protocol.errors import ProtocolError, ValidationError
from keytrio.protocol.evidence import Evidence
from keytrio.protocol.failures import Failure, Severity

#: upstream's id for an agent reply it cannot read ("parsing agent get quote response failed")
INVALID_DATA = "qoute_validation.invalid_data"
CHECK_RESPONSE = "response"  # context["check"] of a malformed-reply failure (wrong/missing field)
#: integers the verifier stores go into 64-bit columns (a 60-digit integer is valid JSON)
MAX_STORED_INT = (1 << 63) - 1


class ReplyError(ProtocolError):
    """A reply the tenant cannot use (wrong or missing fields)."""


def _bounded(value: object) -> int | None:
    if type(value) is int:  # the usual case (JSON numbers; never a bool): no exception machinery
        return value if 0 <= value <= MAX_STORED_INT else None
    try:
        return validation.integer(value, "value", lo=0, hi=MAX_STORED_INT)
    except ValidationError:
        return None


def _response_failure(message: str, **extra: object) -> Failure:
    ctx: dict[str, object] = {"message": message, "check": CHECK_RESPONSE}
    ctx.update(extra)
    return Failure(INVALID_DATA, ctx, Severity.EMERGENCY, recoverable=False)


@dataclass(frozen=True)
class ImaTail:
    """The IMA list from entry ``entry`` on; ``text`` None: the machine has no IMA list."""

    text: str | None
    entry: int = 0


@dataclass(frozen=True)
class BootLog:
    """The UEFI event log as base64 text; ``text`` None: the machine has no log."""

    text: str | None

    @classmethod
    def of(cls, data: bytes | None) -> BootLog:
        return cls(base64.b64encode(data).decode("ascii") if data is not None else None)

    def data(self) -> bytes:
        """The binary log (b"" when absent; a log that is not base64 becomes unparseable bytes,
        so the measured-boot check reports it rather than this decoder)."""
        if not self.text:
            return b""
        try:
            return base64.b64decode(self.text, validate=True)
        except (binascii.Error, ValueError):
            return b"\x00"


_ALGS = ("quote", "hash_alg", "enc_alg", "sign_alg")


@dataclass(frozen=True)
class IntegrityQuote:
    """``results`` of ``GET quotes/integrity`` (PROTOCOL.md "Agent")."""

    quote: str
    hash_alg: str
    enc_alg: str
    sign_alg: str
    pubkey: str | None = None  # only with partial=0
    boottime: int | None = None
    ima: ImaTail | None = None  # only when PCR 10 was asked
    mb: BootLog | None = None  # only when PCR 0 was asked

    def encode(self) -> dict[str, Any]:
        out: dict[str, Any] = {"quote": self.quote, "hash_alg": self.hash_alg, "enc_alg": self.enc_alg,
                               "sign_alg": self.sign_alg}
        if self.pubkey is not None:
            out["pubkey"] = self.pubkey
        if self.boottime is not None:
            out["boottime"] = self.boottime
        if self.ima is not None:
            out["ima_measurement_list"] = self.ima.text
            out["ima_measurement_list_entry"] = self.ima.entry
        if self.mb is not None:
            out["mb_measurement_list"] = self.mb.text
        return out

    @classmethod
    def decode(cls, reply: object, *, need_pubkey: bool) -> tuple[IntegrityQuote | None, list[Failure]]:
        """(the reply, []) or (None, one failure per bad field); ``need_pubkey``: partial=0 was asked."""
        if not isinstance(reply, dict):
            return None, [_response_failure("quote reply results are not an object")]
        fails: list[Failure] = []
        text: dict[str, str] = {}
        for name in _ALGS + (("pubkey",) if need_pubkey else ()):
            value = reply.get(name)
            if value is None:
                fails.append(_response_failure(f"{name} is missing", field=name))
            elif not isinstance(value, str):
                fails.append(_response_failure(f"{name} must be a string", field=name))
            else:
                text[name] = value
        boottime = reply.get("boottime")
        if boottime is not None and (not isinstance(boottime, int) or _bounded(boottime) is None):
            fails.append(_response_failure("boottime must be an integer", field="boottime"))
        ml = reply.get("ima_measurement_list")
        if ml is not None and not isinstance(ml, str):
            fails.append(_response_failure("ima_measurement_list must be a string", field="ima_measurement_list"))
        entry = reply.get("ima_measurement_list_entry", 0)
        if not isinstance(entry, int) or _bounded(entry) is None:
            fails.append(_response_failure("ima_measurement_list_entry must be an integer >= 0",
                                           field="ima_measurement_list_entry"))
        mb = reply.get("mb_measurement_list")
        if mb is not None and not isinstance(mb, str):
            fails.append(_response_failure("mb_measurement_list must be a string", field="mb_measurement_list"))
        if fails:
            return None, fails
        pubkey = reply.get("pubkey")
        has_ima = "ima_measurement_list" in reply or "ima_measurement_list_entry" in reply
        return cls(
            text["quote"], text["hash_alg"], text["enc_alg"], text["sign_alg"],
            pubkey=pubkey if isinstance(pubkey, str) else None,
            boottime=boottime,
            ima=ImaTail(ml, entry) if has_ima else None,
            mb=BootLog(mb) if "mb_measurement_list" in reply else None,
        ), []  # fmt: skip

    def evidence(self, *, boot_log: bool) -> Evidence:
        """The :class:`~protocol.evidence.Evidence` of this reply (``boot_log``: decode the UEFI log)."""
        return Evidence(
            self.quote, self.hash_alg, self.enc_alg,
            ima_list=self.ima.text if self.ima is not None else None,
            ima_entry=self.ima.entry if self.ima is not None else 0,
            mb_log=(self.mb.data() if self.mb is not None else b"") if boot_log else None,
        )  # fmt: skip


@dataclass(frozen=True)
class IdentityQuote:
    """``results`` of ``GET quotes/identity``: a quote over PCR 16 and the NK it binds."""

    quote: str
    hash_alg: str
    enc_alg: str
    sign_alg: str
    pubkey: str
    boottime: int | None = None

    def encode(self) -> dict[str, Any]:
        out: dict[str, Any] = {"quote": self.quote, "hash_alg": self.hash_alg, "enc_alg": self.enc_alg,
                               "sign_alg": self.sign_alg, "pubkey": self.pubkey}
        if self.boottime is not None:
            out["boottime"] = self.boottime
        return out

    @classmethod
    def decode(cls, reply: object) -> IdentityQuote:
        """ReplyError unless quote, the three algorithms and pubkey are non-empty strings."""
        values = [reply.get(k) for k in (*_ALGS, "pubkey")] if isinstance(reply, dict) else []
        if not values or not all(isinstance(v, str) and v for v in values):
            raise ReplyError("reply lacks quote/hash_alg/enc_alg/sign_alg/pubkey")
        boottime = reply.get("boottime") if isinstance(reply, dict) else None
        return cls(*values, boottime=boottime if isinstance(boottime, int) and _bounded(boottime) is not None
                   else None)

    def evidence(self) -> Evidence:
        return Evidence(self.quote, self.hash_alg, self.enc_alg)


#: an encrypted key half: RSA-OAEP under the NK, so at most the modulus size (8192-bit keys fit)
MAX_ENCRYPTED_KEY = 1024
AUTH_TAG_HEX_LEN = 96  # HMAC-SHA384 in hex


def _encrypted_key(value: object) -> str:
    validation.b64(value, "encrypted_key", max_len=MAX_ENCRYPTED_KEY)
    assert isinstance(value, str)
    return value


@dataclass(frozen=True)
class UKey:
    """Body of ``POST keys/ukey``: U encrypted to the NK (base64), HMAC-SHA384(K, agent id) in hex,
    and the payload encrypted under K (AES-GCM: IV || ciphertext || tag), if any."""

    encrypted_key: str
    auth_tag: str
    payload: bytes | None = None

    def encode(self) -> dict[str, Any]:
        out: dict[str, Any] = {"encrypted_key": self.encrypted_key, "auth_tag": self.auth_tag}
        if self.payload:
            out["payload"] = base64.b64encode(self.payload).decode("ascii")
        return out

    @classmethod
    def decode(cls, body: dict[str, Any]) -> UKey:
        """ValidationError for the first bad field, in the order auth_tag, payload, encrypted_key."""
        auth_tag = body.get("auth_tag")
        if not isinstance(auth_tag, str) or len(auth_tag) != AUTH_TAG_HEX_LEN:
            raise ValidationError("auth_tag", f"must be {AUTH_TAG_HEX_LEN} hex characters")
        validation.hex_bytes(auth_tag, "auth_tag")
        raw_payload = body.get("payload")
        payload = None
        if raw_payload is not None and raw_payload != "":
            payload = validation.b64(raw_payload, "payload")
            if len(payload) < pl.IV_LEN + pl.TAG_LEN:
                raise ValidationError("payload", "too short to be an AES-GCM payload")
        return cls(_encrypted_key(body.get("encrypted_key")), auth_tag.lower(), payload)


@dataclass(frozen=True)
class VKey:
    """Body of ``POST keys/vkey`` (the verifier's half): V encrypted to the NK (base64)."""

    encrypted_key: str

    def encode(self) -> dict[str, Any]:
        return {"encrypted_key": self.encrypted_key}

    @classmethod
    def decode(cls, body: dict[str, Any]) -> VKey:
        return cls(_encrypted_key(body.get("encrypted_key")))


@dataclass(frozen=True)
class KeyVerify:
    """``results`` of ``GET keys/verify``: HMAC-SHA384(K, challenge) in hex."""

    hmac: str

    def encode(self) -> dict[str, Any]:
        return {"hmac": self.hmac}

    @classmethod
    def decode(cls, reply: object) -> KeyVerify:
        value = reply.get("hmac") if isinstance(reply, dict) else None
        if not isinstance(value, str):
            raise ReplyError("reply lacks hmac")
        return cls(value)
