"""What a runtime policy says about one parsed IMA entry: listed, excluded, signed, a trusted key.

:class:`PolicyCheck` judges entries one at a time for one evaluation (one poll) and keeps the
verdicts and the keyring (policy keys, the agent's extra keys and the keys learned from keyring
entries so far); :mod:`protocol.ima_eval` replays the list and hands it the entries whose template
hash is right. Rules and failure ids follow upstream Keylime 7.14.3 (keylime/ima/ima.py, ast.py):

- ``ima.validation.ima-ng.not_in_allowlist``: path not in ``digests`` (also for ima-sig without a
  valid signature, and for ima-buf against ``keyrings``/``ima-buf``);
- ``ima.validation.ima-ng.runtime_policy_hash``: path listed with other digests;
- ``ima.validation.tomtou``: a violation entry (a warning under ``ignore_tomtou_errors``);
- ``ima.validator.ima-sig.invalid_signature`` (sic ``validator``): only without a policy but with
  verification keys;
- ``ima.invalid_key``: an ima-buf key of an unsupported type.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from keytrio.protocol import ima, tpm2
from keytrio.protocol.errors import ValidationError
from keytrio.protocol.failures import Failure, Severity
from keytrio.protocol.ima import Entry
from keytrio.protocol.ima_sig import verify_ima_sig
from keytrio.protocol.runtime_policy import ImaKey, KeyTypeError, RuntimePolicy, parse_ima_key

# --- failure ids (upstream's) ------------------------------------------------------------------
NOT_IN_ALLOWLIST = "ima.validation.ima-ng.not_in_allowlist"
RUNTIME_POLICY_HASH = "ima.validation.ima-ng.runtime_policy_hash"
TOMTOU = "ima.validation.tomtou"
INVALID_SIGNATURE = "ima.validator.ima-sig.invalid_signature"
INVALID_KEY = "ima.invalid_key"


def ima_failure(event_id: str, **context: Any) -> Failure:
    """An IMA failure as upstream rates them: emergency, recoverable by a later good quote."""
    return Failure(event_id, context, Severity.EMERGENCY, recoverable=True)


def verification_keys(extra: Iterable[ImaKey | bytes]) -> list[ImaKey]:
    """ImaKey values from certificates or public keys (DER/PEM); ValidationError names a bad one."""
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


def boot_aggregates(pcrs: Mapping[int, bytes] | None, bank: str) -> frozenset[bytes]:
    """The boot_aggregate values quoted PCRs 0-7 (and 8-9) allow; empty without those PCRs."""
    size = tpm2.DIGEST_SIZES[bank]
    if not pcrs or not all(len(pcrs.get(i, b"")) == size for i in range(8)):
        return frozenset()
    out = {ima.boot_aggregate(bank, pcrs)}
    if bank != "sha1" and len(pcrs.get(8, b"")) == size and len(pcrs.get(9, b"")) == size:
        out.add(ima.boot_aggregate(bank, pcrs, pcrs_8_9=True))
    return frozenset(out)


class PolicyCheck:
    """Per-evaluation state: policy, keyring (policy + extra + learned) and accumulated verdicts."""

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
        self.boot_aggregates = boot_aggregates(quoted_pcrs, bank)
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
            return ima_failure(NOT_IN_ALLOWLIST, message=f"File not found in allowlist: {e.path}", **where)
        return ima_failure(
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
            self.failures.append(ima_failure(TOMTOU, **ctx))

    def check(self, e: Entry) -> None:
        """Judge one entry whose template hash is right (a violation goes to :meth:`tomtou`)."""
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
                ima_failure(
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
            why = verify_ima_sig(e.signature, e.digest, e.digest_alg, self.keys) or ""
            if not why:
                return
        if policy is not None:  # upstream: an unverified signature falls back to the digests
            f = self.lookup(policy.digests, e, signature=why)
        else:
            f = ima_failure(
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
                ima_failure(INVALID_KEY, message=f"key from {e.path}: {exc}", path=e.path, line=e.line_no)
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
