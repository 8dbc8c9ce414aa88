"""Incremental evaluation of an IMA measurement list against a quote's PCR 10 and a runtime policy.

One call handles one poll: the lines from ``progress.count`` on are parsed and folded into the
running PCR 10 value until it equals the quoted value; only those lines are checked and counted.
Later lines (the log may run ahead of the quote) are re-read at the next poll.

Failure ids and their conditions follow upstream Keylime 7.14.3 (keylime/ima/ima.py, ast.py,
cloud_verifier_common.py, agentstates.py):

- ``ima.validation.ima-ng.not_in_allowlist`` path not in ``digests`` (also for ima-sig without a
  valid signature, and for ima-buf against ``keyrings``/``ima-buf``), and
  ``ima.validation.ima-ng.runtime_policy_hash`` path listed with other digests;
- ``ima.validation.ima_hash`` template hash wrong; ``ima.validation.tomtou`` violation entry;
  ``ima.validation.ima_pcr`` entry not for PCR 10; ``ima.parser.entry`` unparsable line;
- ``ima.validator.ima-sig.invalid_signature`` (sic ``validator``) only without a policy but with
  verification keys; ``ima.invalid_key`` ima-buf key of an unsupported type;
- ``ima.pcr_mismatch`` no prefix of the log replays to the quoted PCR 10;
  ``ima.quote_progress`` a quote that lagged the log did not catch up with that lag;
- ``qoute_validation.invalid_ima_entry_nb`` (sic) the list starts neither at 0 nor where asked.

Speed: plain passing ima-ng lines go through :mod:`protocol.ima_fast`, which only ever accepts
lines; every other line (and so every failure) goes through the general per-line code here.

Differences on purpose: a ToMToU entry fails unless ``ignore_tomtou_errors`` (then a warning),
the documented meaning (upstream 7.14.3 does the reverse); in the attestation loop lines after the
matching one are not checked in this poll (the next quote covers them; upstream checks them and
fails on them too); ``check_unquoted`` (``/verify/evidence``) checks them as upstream does.
After any failure the progress is *not* advanced (upstream resets to line 0), so the same lines
are evaluated again next poll, against whatever policy is current then.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from keytrio.protocol import ima
from keytrio.protocol.errors import ValidationError
from keytrio.protocol.failures import Failure, Severity
from keytrio.protocol.ima import Entry, ImaParseError
from keytrio.protocol.ima_fast import FastNg
from keytrio.protocol.runtime_policy import ImaKey, KeyTypeError, RuntimePolicy, parse_ima_key

# --- failure ids (upstream's) ------------------------------------------------------------------
NOT_IN_ALLOWLIST = "ima.validation.ima-ng.not_in_allowlist"
RUNTIME_POLICY_HASH = "ima.validation.ima-ng.runtime_policy_hash"
IMA_HASH = "ima.validation.ima_hash"
TOMTOU = "ima.validation.tomtou"
IMA_PCR = "ima.validation.ima_pcr"
PARSER_ENTRY = "ima.parser.entry"
INVALID_SIGNATURE = "ima.validator.ima-sig.invalid_signature"
INVALID_KEY = "ima.invalid_key"
PCR_MISMATCH = "ima.pcr_mismatch"
QUOTE_PROGRESS = "ima.quote_progress"
INVALID_ENTRY_NB = "qoute_validation.invalid_ima_entry_nb"

#: Kernel hash_algo ids (include/uapi/linux/hash_info.h) usable in IMA signature v2 headers.
SIG_HASH_ALGOS: dict[int, str] = {2: "sha1", 4: "sha256", 5: "sha384", 6: "sha512", 7: "sha224"}
_SIG_HASH_IDS = {v: k for k, v in SIG_HASH_ALGOS.items()}
#: signature_v2_hdr: type (3 = EVM_IMA_XATTR_DIGSIG, 5 = portable), version 2, hash, keyid, size.
_SIG_HDR = struct.Struct(">BBBIH")
_SIG_TYPES = (3, 5)
_CRYPTO_HASHES = {
    "sha1": hashes.SHA1, "sha224": hashes.SHA224, "sha256": hashes.SHA256,
    "sha384": hashes.SHA384, "sha512": hashes.SHA512,
}  # fmt: skip


def _fail(event_id: str, **context: Any) -> Failure:
    return Failure(event_id, context, Severity.EMERGENCY, recoverable=True)


# --- progress ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImaProgress:
    """What a verifier keeps per agent between polls (serialisable with to_json/from_json).

    ``count``: lines verified so far (the next ``ima_ml_entry``); ``pcrs``: running PCR 10 per
    bank (hex) after those lines; ``boottime``/``reset_count``: the boot they belong to;
    ``lag``: lines the last log ran ahead of its quote; ``learned_keys``: keys from ``.ima``-style
    keyring entries seen so far (needed for ima-sig lines in later polls).
    """

    count: int = 0
    pcrs: Mapping[str, str] = field(default_factory=dict)
    boottime: int | None = None
    reset_count: int | None = None
    lag: int = 0
    learned_keys: tuple[ImaKey, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "pcrs": dict(self.pcrs),
            "boottime": self.boottime,
            "reset_count": self.reset_count,
            "lag": self.lag,
            "learned_keys": [k.to_json() for k in self.learned_keys],
        }

    @classmethod
    def from_json(cls, obj: object) -> ImaProgress:
        if not isinstance(obj, dict):
            raise ValidationError("ima_progress", "must be an object")

        def nat(name: str, optional: bool = False) -> int | None:
            v = obj.get(name)
            if v is None and optional:
                return None
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValidationError(f"ima_progress.{name}", "must be an integer >= 0")
            return v

        pcrs = obj.get("pcrs")
        if not isinstance(pcrs, dict):
            raise ValidationError("ima_progress.pcrs", "must be an object bank -> hex")
        for bank, value in pcrs.items():
            if bank not in ima.BANKS or not isinstance(value, str):
                raise ValidationError("ima_progress.pcrs", f"bad entry for {bank!r}")
            try:
                ok = len(bytes.fromhex(value)) == ima.BANKS[bank]
            except ValueError:
                ok = False
            if not ok:
                raise ValidationError("ima_progress.pcrs", f"not a {bank} value")
        keys = obj.get("learned_keys", [])
        if not isinstance(keys, list):
            raise ValidationError("ima_progress.learned_keys", "must be a list")
        return cls(
            count=nat("count") or 0,
            pcrs=dict(pcrs),
            boottime=nat("boottime", True),
            reset_count=nat("reset_count", True),
            lag=nat("lag", True) or 0,
            learned_keys=tuple(ImaKey.from_json(k) for k in keys),
        )

    def for_boot(self, boottime: int | None, reset_count: int | None) -> ImaProgress:
        """This progress if the boot is the same one, else a fresh start at line 0 for the new boot.

        A value of None on either side is "unknown" and does not count as a change.
        """
        changed = (boottime is not None and self.boottime is not None and boottime != self.boottime) or (
            reset_count is not None and self.reset_count is not None and reset_count != self.reset_count
        )
        if changed:
            return ImaProgress(boottime=boottime, reset_count=reset_count)
        return ImaProgress(
            self.count,
            self.pcrs,
            self.boottime if boottime is None else boottime,
            self.reset_count if reset_count is None else reset_count,
            self.lag,
            self.learned_keys,
        )


@dataclass(frozen=True)
class ImaResult:
    failures: list[Failure]
    warnings: list[Failure]
    progress: ImaProgress
    lines_parsed: int

    @property
    def ok(self) -> bool:
        return not self.failures


# --- ima-sig -----------------------------------------------------------------------------------


def _verify_ima_sig(
    sig: bytes, digest: bytes, digest_alg: str, keys: Mapping[int, Iterable[ImaKey]]
) -> str | None:
    """None when the IMA v2 signature over ``digest`` verifies; else why not."""
    if len(sig) < _SIG_HDR.size:
        return "malformed signature"
    typ, version, algo, keyid, size = _SIG_HDR.unpack_from(sig)
    if typ not in _SIG_TYPES or version != 2:
        return "not an IMA v2 digital signature"
    if size != len(sig) - _SIG_HDR.size:
        return "malformed signature"
    alg = SIG_HASH_ALGOS.get(algo)
    if alg is None or alg != digest_alg:
        return "signature hash algorithm does not match the file digest"
    candidates = keys.get(keyid, ())
    if not candidates:
        return f"no key with id 0x{keyid:08x}"
    raw = sig[_SIG_HDR.size :]
    pre = Prehashed(_CRYPTO_HASHES[alg]())
    for k in candidates:
        try:
            if isinstance(k.public_key, rsa.RSAPublicKey):
                k.public_key.verify(raw, digest, padding.PKCS1v15(), pre)
            else:
                k.public_key.verify(raw, digest, ec.ECDSA(pre))
        except (InvalidSignature, ValueError):
            continue
        return None
    return "invalid signature"


def ima_signature(digest: bytes, digest_alg: str, keyid: int, raw_signature: bytes) -> bytes:
    """Assemble an IMA signature v2 (as evmctl writes into security.ima) around a raw signature."""
    algo = _SIG_HASH_IDS.get(digest_alg)
    if algo is None or len(digest) != hashlib.new(digest_alg).digest_size:
        raise ValidationError("digest_alg", f"unsupported for IMA signatures: {digest_alg!r}")
    return _SIG_HDR.pack(3, 2, algo, keyid, len(raw_signature)) + raw_signature


# --- per-entry policy checks -------------------------------------------------------------------


class _Ctx:
    """Per-call state: policy, keyring (policy + extra + learned) and accumulated verdicts."""

    def __init__(
        self,
        policy: RuntimePolicy | None,
        extra: Iterable[ImaKey],
        learned: tuple[ImaKey, ...],
        ignore_tomtou: bool,
        quoted_pcrs: Mapping[int, bytes] | None,
        bank: str,
    ) -> None:
        self.policy = policy
        self.ignore_tomtou = ignore_tomtou
        self.failures: list[Failure] = []
        self.warnings: list[Failure] = []
        self.learned = list(learned)
        self.keys: dict[int, list[ImaKey]] = {}
        if policy is not None:
            for kid, ks in policy.verification_keys.items():
                self.keys.setdefault(kid, []).extend(ks)
        self.has_extra = False
        for k in extra:
            self.has_extra = True
            self.keys.setdefault(k.keyid, []).append(k)
        for k in learned:
            self.keys.setdefault(k.keyid, []).append(k)
        self.boot_aggregates = _boot_aggregates(quoted_pcrs, bank)
        self.bank = bank

    def lookup(self, table: Mapping[str, frozenset[bytes]], e: Entry, **extra: Any) -> Failure | None:
        """Upstream's ``_validate_ima_ng``: excluded, else listed with this digest."""
        accepted = table.get(e.path)
        if accepted is not None and e.digest in accepted:
            return None
        assert self.policy is not None
        if self.policy.excluded(e.path):  # regex only for paths the index did not accept
            return None
        where = {"path": e.path, "line": e.line_no, **extra}
        if accepted is None:
            return _fail(NOT_IN_ALLOWLIST, message=f"File not found in allowlist: {e.path}", **where)
        return _fail(
            RUNTIME_POLICY_HASH,
            message="Hash not found in runtime policy",
            got=e.digest.hex(),
            expected=sorted(d.hex() for d in accepted),
            **where,
        )

    def tomtou(self, e: Entry) -> None:
        ctx = {
            "message": "ToMToU / open-writers violation: hash validation was skipped",
            "path": e.path,
            "line": e.line_no,
        }
        if self.ignore_tomtou:
            self.warnings.append(Failure(TOMTOU, ctx, Severity.WARNING, recoverable=True))
        else:
            self.failures.append(_fail(TOMTOU, **ctx))

    def check(self, e: Entry) -> None:
        policy = self.policy
        if e.template == "ima-sig":
            self._ima_sig(e)
        elif e.template == "ima-buf":
            self._ima_buf(e)
        elif policy is None:
            return
        elif e.path == ima.BOOT_AGGREGATE_NAME:
            self._boot_aggregate(e)
        else:
            f = self.lookup(policy.digests, e)
            if f is not None:
                self.failures.append(f)

    def _boot_aggregate(self, e: Entry) -> None:
        assert self.policy is not None
        listed = self.policy.digests.get(e.path, frozenset())
        computed = self.boot_aggregates if e.digest_alg == self.bank else frozenset()
        accepted = listed | computed
        # Upstream merges the aggregates it can compute into the policy's list; with neither a
        # listed value nor quoted PCRs 0-7 there is nothing to compare against: accept.
        if accepted and e.digest not in accepted:
            self.failures.append(
                _fail(
                    RUNTIME_POLICY_HASH,
                    message="boot_aggregate not in runtime policy nor computed from quoted PCRs",
                    got=e.digest.hex(),
                    expected=sorted(d.hex() for d in accepted),
                    path=e.path,
                    line=e.line_no,
                )
            )

    def _ima_sig(self, e: Entry) -> None:
        policy = self.policy
        if policy is None and not self.has_extra:
            return
        if policy is not None and policy.excluded(e.path):
            return
        why = "missing signature"
        if e.signature:
            why = _verify_ima_sig(e.signature, e.digest, e.digest_alg, self.keys) or ""
            if not why:
                return
        if policy is not None:  # upstream: an unverified signature falls back to the digests
            f = self.lookup(policy.digests, e, signature=why)
        else:
            f = _fail(
                INVALID_SIGNATURE,
                message=f"signature for file {e.path} could not be validated",
                reason=why,
                path=e.path,
                line=e.line_no,
            )
        if f is not None:
            self.failures.append(f)

    def _ima_buf(self, e: Entry) -> None:
        policy = self.policy
        if policy is None:
            return
        try:
            key = parse_ima_key(e.buf or b"")
        except KeyTypeError as exc:
            self.failures.append(
                _fail(INVALID_KEY, message=f"key from {e.path}: {exc}", path=e.path, line=e.line_no)
            )
            return
        if key is not None:
            if policy.keyring_ignored(e.path):
                return  # neither checked nor trusted for ima-sig
            f = self.lookup(policy.keyrings, e)
            if f is None:
                self._learn(key)
            else:
                self.failures.append(f)
            return
        f = self.lookup(policy.ima_buf, e)
        if f is not None:
            self.failures.append(f)

    def _learn(self, key: ImaKey) -> None:
        if key not in self.learned:
            self.learned.append(key)
            self.keys.setdefault(key.keyid, []).append(key)


def _boot_aggregates(pcrs: Mapping[int, bytes] | None, bank: str) -> frozenset[bytes]:
    size = ima.BANKS[bank]
    if not pcrs or not all(len(pcrs.get(i, b"")) == size for i in range(8)):
        return frozenset()
    out = {ima.boot_aggregate(bank, pcrs)}
    if bank != "sha1" and len(pcrs.get(8, b"")) == size and len(pcrs.get(9, b"")) == size:
        out.add(ima.boot_aggregate(bank, pcrs, pcrs_8_9=True))
    return frozenset(out)


# --- the evaluation ----------------------------------------------------------------------------


def _split_lines(text: str) -> list[str]:
    if not text:
        return []
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def _keys(extra: Iterable[ImaKey | bytes]) -> list[ImaKey]:
    out = []
    for i, k in enumerate(extra):
        if isinstance(k, ImaKey):
            out.append(k)
            continue
        try:
            parsed = parse_ima_key(k)
        except KeyTypeError as exc:
            raise ValidationError(f"extra_verification_keys[{i}]", str(exc)) from exc
        if parsed is None:
            raise ValidationError(f"extra_verification_keys[{i}]", "not a certificate or public key")
        out.append(parsed)
    return out


def _general_line(
    ctx: _Ctx,
    line: str,
    line_no: int,
    value: bytes,
    bank_hash: Callable[[bytes], Any],
    log_hash: Callable[[bytes], Any],
    same_alg: bool,
    ff: bytes,
) -> tuple[bytes, bool]:
    """Check one line of any kind and fold it in: (new PCR value, False if it did not parse)."""
    try:
        e = ima.parse_line(line, line_no)
    except ImaParseError as exc:
        ctx.failures.append(
            _fail(
                PARSER_ENTRY,
                message=f"Line was not parsable into a valid IMA entry: {exc.reason}",
                line=line_no,
            )
        )
        return value, False
    if e.pcr != ima.IMA_PCR:
        ctx.failures.append(
            _fail(
                IMA_PCR,
                message="IMA PCR is not the configured one",
                expected=str(ima.IMA_PCR),
                got=str(e.pcr),
                path=e.path,
                line=line_no,
            )
        )
    if e.is_violation:
        value = bank_hash(value + ff).digest()
        ctx.tomtou(e)
        return value, True
    data = ima.template_data(e)
    ext = bank_hash(data).digest()
    value = bank_hash(value + ext).digest()
    th = ext if same_alg else log_hash(data).digest()
    if th != e.template_hash:
        ctx.failures.append(
            _fail(
                IMA_HASH,
                message="IMA template hash does not match the calculated hash.",
                expected=th.hex(),
                got=e.template_hash.hex(),
                path=e.path,
                line=line_no,
            )
        )
    else:
        ctx.check(e)
    return value, True


def evaluate_ima(
    list_text: str | None,
    first_entry: int,
    quoted_pcr10: bytes,
    bank: str,
    policy: RuntimePolicy | None,
    progress: ImaProgress,
    *,
    ignore_tomtou_errors: bool = False,
    extra_verification_keys: Iterable[ImaKey | bytes] = (),
    quoted_pcrs: Mapping[int, bytes] | None = None,
    fast_path: bool = True,
    check_unquoted: bool = False,
) -> ImaResult:
    """Check the list lines from ``first_entry`` on (see module docstring).

    ``progress`` must already be for the current boot (:meth:`ImaProgress.for_boot`). A list that
    starts at 0 while progress is further restarts the evaluation at 0 (the agent's list was
    reset), as upstream does. ``quoted_pcrs`` (PCRs 0-9 of ``bank``, when the quote has them)
    lets the boot_aggregate line be checked. ``extra_verification_keys`` are certificates or
    public keys (DER/PEM) or ImaKey values, e.g. the agent's ``ima_sign_verification_keys``.
    ``fast_path=False`` sends every line through the general per-line code (the fast path,
    :mod:`protocol.ima_fast`, only accepts lines that code would accept; tests compare the two).
    ``check_unquoted`` also checks the lines after the one that matches the quote against the
    policy (``/verify/evidence``: every line the client presents is judged, there is no next
    poll); they still do not count as progress.
    Raises ValidationError only for bad arguments (bank, key material); evidence problems are
    failures.
    """
    if bank not in ima.BANKS:
        raise ValidationError("bank", f"unsupported PCR bank {bank!r}")
    size = ima.BANKS[bank]
    if not isinstance(quoted_pcr10, bytes | bytearray) or len(quoted_pcr10) != size:
        raise ValidationError("quoted_pcr10", f"not a {bank} PCR value")
    target = bytes(quoted_pcr10)
    extra = _keys(extra_verification_keys)

    if first_entry == 0 and progress.count != 0:
        progress = ImaProgress(boottime=progress.boottime, reset_count=progress.reset_count)
    if first_entry != progress.count:
        f = Failure(
            INVALID_ENTRY_NB,
            {
                "message": "Agent did not respond with requested next IMA measurement list entry",
                "got": first_entry,
                "expected": progress.count,
            },
            Severity.EMERGENCY,
            recoverable=False,
        )
        return ImaResult([f], [], progress, 0)

    start_hex = progress.pcrs.get(bank)
    if start_hex is None and progress.count != 0:
        f = _fail(PCR_MISMATCH, message=f"no running PCR 10 value for bank {bank} at line {progress.count}")
        return ImaResult([f], [], progress, 0)
    value = bytes.fromhex(start_hex) if start_hex is not None else bytes(size)

    log_hash_alg = policy.log_hash_alg if policy is not None else "sha1"
    bank_hash = getattr(hashlib, bank)
    log_hash = getattr(hashlib, log_hash_alg)
    same_alg = log_hash_alg == bank
    ff = b"\xff" * size
    ctx = _Ctx(policy, extra, progress.learned_keys, ignore_tomtou_errors, quoted_pcrs, bank)
    lines = _split_lines(list_text or "")

    matched: int | None = 0 if value == target else None
    parsed = 0
    if matched is None:
        digests = policy.digests if policy is not None else None
        # a NUL anywhere: leave every line to the general parser (it rejects names with NUL)
        fast = FastNg(bank, log_hash_alg, digests) if fast_path and "\0" not in (list_text or "") else None
        i = 0
        while i < len(lines):
            if fast is not None:
                # plain passing ima-ng lines; lines[i] (if any) is then for the general path
                value, i, hit = fast.run(lines, i, value, target)
                if hit:
                    matched = i
                    break
                if i == len(lines):
                    break
            value, readable = _general_line(
                ctx, lines[i], first_entry + i, value, bank_hash, log_hash, same_alg, ff
            )
            i += 1
            if not readable:
                break  # the replay cannot go past a line it cannot read
            if value == target:
                matched = i
                break
        parsed = i  # lines looked at, the unreadable one included

    if check_unquoted and matched is not None:
        for j in range(matched, len(lines)):
            # not attested by this quote, but presented: judged line by line (an unreadable one
            # is a parser failure and the next is still read, as upstream reads the whole list)
            value, _ = _general_line(ctx, lines[j], first_entry + j, value, bank_hash, log_hash, same_alg, ff)
        parsed = len(lines)

    if matched is None:
        ctx.failures.append(
            _fail(
                PCR_MISMATCH,
                message=f"IMA measurement list does not match TPM PCR {target.hex()}",
                lines=len(lines),
                first_entry=first_entry,
            )
        )
    else:
        # upstream's quote_progress: a quote that lagged the log must catch up with that lag
        if progress.lag > 0 and matched < progress.lag and matched < len(lines):
            ctx.failures.append(
                _fail(
                    QUOTE_PROGRESS,
                    message="PCR quote did not make progress to catch up with log",
                    lag=progress.lag,
                    matched=matched,
                )
            )
    if ctx.failures or matched is None:
        return ImaResult(ctx.failures, ctx.warnings, progress, parsed)
    new = ImaProgress(
        count=progress.count + matched,
        pcrs={bank: value.hex()},  # other banks were not advanced: drop them
        boottime=progress.boottime,
        reset_count=progress.reset_count,
        lag=len(lines) - matched,
        learned_keys=tuple(ctx.learned),
    )
    return ImaResult(ctx.failures, ctx.warnings, new, parsed)


class ImaChecker:
    """Adapter for the verifier hook ``ImaCheck``: ``(list, first_entry, pcrs, bank) -> (failures, next)``.

    One per agent. ``progress`` is read and replaced on every call (store ``checker.progress``
    after a poll; on a new boot set ``checker.progress = checker.progress.for_boot(...)``);
    ``last`` is the last ImaResult (warnings, lines_parsed). Warnings are returned after the
    failures with severity WARNING, so a caller that only looks at the worst one is unaffected.
    """

    def __init__(
        self,
        policy: RuntimePolicy | None,
        progress: ImaProgress | None = None,
        *,
        ignore_tomtou_errors: bool = False,
        extra_verification_keys: Iterable[ImaKey | bytes] = (),
    ) -> None:
        self.policy = policy
        self.progress = progress or ImaProgress()
        self.ignore_tomtou_errors = ignore_tomtou_errors
        self.extra = _keys(extra_verification_keys)
        self.last: ImaResult | None = None

    def __call__(
        self, list_text: str | None, first_entry: int, pcrs: dict[int, bytes], bank: str
    ) -> tuple[list[Failure], int]:
        pcr10 = pcrs.get(ima.IMA_PCR)
        if pcr10 is None:
            return [_fail(PCR_MISMATCH, message="PCR 10 is not in the quote")], self.progress.count
        res = evaluate_ima(
            list_text, first_entry, pcr10, bank, self.policy, self.progress,
            ignore_tomtou_errors=self.ignore_tomtou_errors,
            extra_verification_keys=self.extra,
            quoted_pcrs=pcrs,
        )  # fmt: skip
        self.progress = res.progress
        self.last = res
        return res.failures + res.warnings, res.progress.count
