"""Incremental evaluation of an IMA measurement list against a quote's PCR 10 and a runtime policy.

One call handles one poll: the lines from ``progress.count`` on are parsed and folded into the
running PCR 10 value until it equals the quoted value; only those lines are checked and counted.
Later lines (the log may run ahead of the quote) are re-read at the next poll.

The rooms: this module replays the list (general per-line code here, plain passing ima-ng lines
in :mod:`protocol.ima_fast`, which only ever accepts lines, so every failure comes from the
general code) and assembles the verdict and the new :class:`ImaProgress`; what the runtime policy
says about one entry is :mod:`protocol.ima_rules`; ima-sig signatures are :mod:`protocol.ima_sig`.

Failure ids of the replay follow upstream Keylime 7.14.3 (keylime/ima/ima.py,
cloud_verifier_common.py, agentstates.py; the policy's own ids are listed in ima_rules):

- ``ima.validation.ima_hash`` template hash wrong; ``ima.validation.ima_pcr`` (``WRONG_IMA_PCR``)
  entry not for PCR 10; ``ima.parser.entry`` unparsable line;
- ``ima.pcr_mismatch`` no prefix of the log replays to the quoted PCR 10;
  ``ima.quote_progress`` a quote that lagged the log did not catch up with that lag;
- ``qoute_validation.invalid_ima_entry_nb`` (sic) the list starts neither at 0 nor where asked.

Differences on purpose: a ToMToU entry fails unless ``ignore_tomtou_errors`` (then a warning),
the documented meaning (upstream 7.14.3 does the reverse); in the attestation loop lines after the
matching one are not checked in this poll (the next quote covers them; upstream checks them and
fails on them too); ``check_unquoted`` (``/verify/evidence``) checks them as upstream does.
After any failure the progress is *not* advanced (upstream resets to line 0), so the same lines
are evaluated again next poll, against whatever policy is current then.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from keytrio.protocol import ima, tpm2
from keytrio.protocol.errors import ValidationError
from keytrio.protocol.failures import Failure, Severity
from keytrio.protocol.ima import ImaParseError
from keytrio.protocol.ima_fast import FastNg
from keytrio.protocol.ima_rules import PolicyCheck, ima_failure, verification_keys
from keytrio.protocol.runtime_policy import ImaKey, RuntimePolicy

# --- failure ids of the replay (upstream's; the policy's own are in protocol/ima_rules.py) -------
IMA_HASH = "ima.validation.ima_hash"
#: an entry not for PCR 10 (upstream's ``ima.validation.ima_pcr``; the PCR itself is ima.IMA_PCR)
WRONG_IMA_PCR = "ima.validation.ima_pcr"
PARSER_ENTRY = "ima.parser.entry"
PCR_MISMATCH = "ima.pcr_mismatch"
QUOTE_PROGRESS = "ima.quote_progress"
INVALID_ENTRY_NB = "qoute_validation.invalid_ima_entry_nb"


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
            if bank not in tpm2.DIGEST_SIZES or not isinstance(value, str):
                raise ValidationError("ima_progress.pcrs", f"bad entry for {bank!r}")
            try:
                ok = len(bytes.fromhex(value)) == tpm2.DIGEST_SIZES[bank]
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


def nothing_new(
    progress: ImaProgress,
    list_text: str | None,
    first_entry: int,
    boottime: int | None,
    reset_count: int | None,
    quoted_pcr10: object,
    bank: str,
) -> bool:
    """Whether a poll brings nothing to judge: no new line, the same boot, PCR 10 where the
    progress left it.

    True only when ``evaluate_ima(list_text, first_entry, quoted_pcr10, bank, <any policy>,
    progress.for_boot(boottime, reset_count))`` (``check_unquoted`` off) would give no failure, no
    warning, 0 lines parsed and a progress equal to ``progress``: the caller may then keep
    ``progress`` as it is and skip both calls (a quiet machine's every poll). Anything else
    (another boot, a reset or backwards ``first_entry``, a lag to catch up, another bank, a PCR 10
    that moved, a progress whose PCR text the general path would rewrite) is False: ask those two.
    """
    pcrs = progress.pcrs
    return (
        not list_text
        and first_entry == progress.count
        and progress.lag == 0
        # for_boot keeps the progress only when neither side changed; a value where the progress
        # had None is written into it (a different progress), so it is "not the same" here
        and (boottime is None or boottime == progress.boottime)
        and (reset_count is None or reset_count == progress.reset_count)
        # evaluate_ima's own shortcut keeps the progress only as exactly {bank: lower-case hex};
        # None (PCR 10 not quoted) and other types are the general path's to judge
        and type(quoted_pcr10) is bytes
        and len(quoted_pcr10) == tpm2.DIGEST_SIZES.get(bank)
        and len(pcrs) == 1
        and pcrs.get(bank) == quoted_pcr10.hex()
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


# --- the general per-line path ----------------------------------------------------------------


class _GeneralPath:
    """Every line the fast path does not take: parse, PCR number, template hash, then the policy."""

    def __init__(self, rules: PolicyCheck, bank: str, log_hash_alg: str) -> None:
        self.rules = rules
        self.bank_hash = getattr(hashlib, bank)
        self.log_hash = getattr(hashlib, log_hash_alg)
        self.same_alg = log_hash_alg == bank
        self.ff = b"\xff" * tpm2.DIGEST_SIZES[bank]

    def fold(self, line: str, line_no: int, value: bytes) -> tuple[bytes, bool]:
        """Check one line of any kind and fold it in: (new PCR value, False if it did not parse)."""
        rules = self.rules
        try:
            e = ima.parse_line(line, line_no)
        except ImaParseError as exc:
            rules.failures.append(
                ima_failure(
                    PARSER_ENTRY,
                    message=f"Line was not parsable into a valid IMA entry: {exc.reason}",
                    line=line_no,
                )
            )
            return value, False
        if e.pcr != ima.IMA_PCR:
            rules.failures.append(
                ima_failure(
                    WRONG_IMA_PCR,
                    message="IMA PCR is not the configured one",
                    expected=str(ima.IMA_PCR),
                    got=str(e.pcr),
                    path=e.path,
                    line=line_no,
                )
            )
        if e.is_violation:
            value = self.bank_hash(value + self.ff).digest()
            rules.tomtou(e)
            return value, True
        data = ima.template_data(e)
        ext = self.bank_hash(data).digest()
        value = self.bank_hash(value + ext).digest()
        th = ext if self.same_alg else self.log_hash(data).digest()
        if th != e.template_hash:
            rules.failures.append(
                ima_failure(
                    IMA_HASH,
                    message="IMA template hash does not match the calculated hash.",
                    expected=th.hex(),
                    got=e.template_hash.hex(),
                    path=e.path,
                    line=line_no,
                )
            )
        else:
            rules.check(e)
        return value, True


# --- the evaluation, step by step --------------------------------------------------------------


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
    target = ima.pcr_value(bank, quoted_pcr10, "quoted_pcr10")
    extra = verification_keys(extra_verification_keys)
    if first_entry == 0 and progress.count != 0:  # the agent's list was reset
        progress = ImaProgress(boottime=progress.boottime, reset_count=progress.reset_count)
    refused = _refuse_start(first_entry, progress, bank)
    if refused is not None:
        return refused
    start_hex = progress.pcrs.get(bank)
    value = bytes.fromhex(start_hex) if start_hex is not None else bytes(len(target))
    if not list_text and value == target and not check_unquoted:
        # no new line and PCR 10 where the progress left it (a quiet machine, every poll): the
        # general path would judge nothing; its result without building the policy check
        pcrs = {bank: value.hex()}
        if progress.lag == 0 and dict(progress.pcrs) == pcrs:
            return ImaResult([], [], progress, 0)
        return ImaResult([], [], ImaProgress(progress.count, pcrs, progress.boottime, progress.reset_count, 0,
                                             progress.learned_keys), 0)

    log_hash_alg = policy.log_hash_alg if policy is not None else "sha1"
    rules = PolicyCheck(policy, extra, progress.learned_keys, ignore_tomtou_errors, quoted_pcrs, bank)
    general = _GeneralPath(rules, bank, log_hash_alg)
    text = list_text or ""
    lines = ima.split_lines(text)

    matched: int | None = 0
    parsed = 0
    if value != target:
        # a NUL anywhere: leave every line to the general parser (it rejects names with NUL)
        use_fast = fast_path and "\0" not in text
        fast = FastNg(bank, log_hash_alg, policy.digests if policy is not None else None) if use_fast else None
        value, matched, parsed = _replay_to_quote(lines, first_entry, value, target, general, fast)
    if check_unquoted and matched is not None:
        value = _judge_unquoted(lines, matched, first_entry, value, general)
        parsed = len(lines)
    return _verdict(rules, progress, bank, value, matched, parsed, len(lines), first_entry, target)


def _refuse_start(first_entry: int, progress: ImaProgress, bank: str) -> ImaResult | None:
    """A result when the list does not start where the progress stands (or has no PCR for it)."""
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
    if progress.pcrs.get(bank) is None and progress.count != 0:
        f = ima_failure(PCR_MISMATCH, message=f"no running PCR 10 value for bank {bank} at line {progress.count}")
        return ImaResult([f], [], progress, 0)
    return None


def _replay_to_quote(
    lines: list[str], first_entry: int, value: bytes, target: bytes, general: _GeneralPath, fast: FastNg | None
) -> tuple[bytes, int | None, int]:
    """Fold lines in until the value equals the quoted one: (value, lines matched or None, lines
    looked at, the unreadable one included)."""
    i = 0
    while i < len(lines):
        if fast is not None:
            # plain passing ima-ng lines; lines[i] (if any) is then for the general path
            value, i, hit = fast.run(lines, i, value, target)
            if hit:
                return value, i, i
            if i == len(lines):
                break
        value, readable = general.fold(lines[i], first_entry + i, value)
        i += 1
        if not readable:
            break  # the replay cannot go past a line it cannot read
        if value == target:
            return value, i, i
    return value, None, i


def _judge_unquoted(lines: list[str], matched: int, first_entry: int, value: bytes, general: _GeneralPath) -> bytes:
    """The lines after the quoted one, judged line by line (``check_unquoted``)."""
    for j in range(matched, len(lines)):
        # not attested by this quote, but presented: an unreadable one is a parser failure and the
        # next is still read, as upstream reads the whole list
        value, _ = general.fold(lines[j], first_entry + j, value)
    return value


def _verdict(
    rules: PolicyCheck,
    progress: ImaProgress,
    bank: str,
    value: bytes,
    matched: int | None,
    parsed: int,
    n_lines: int,
    first_entry: int,
    target: bytes,
) -> ImaResult:
    """The replay's own failures, then the result: new progress only when nothing failed."""
    if matched is None:
        rules.failures.append(
            ima_failure(
                PCR_MISMATCH,
                message=f"IMA measurement list does not match TPM PCR {target.hex()}",
                lines=n_lines,
                first_entry=first_entry,
            )
        )
    elif progress.lag > 0 and matched < progress.lag and matched < n_lines:
        # upstream's quote_progress: a quote that lagged the log must catch up with that lag
        rules.failures.append(
            ima_failure(
                QUOTE_PROGRESS,
                message="PCR quote did not make progress to catch up with log",
                lag=progress.lag,
                matched=matched,
            )
        )
    if rules.failures or matched is None:
        return ImaResult(rules.failures, rules.warnings, progress, parsed)
    new = ImaProgress(
        count=progress.count + matched,
        pcrs={bank: value.hex()},  # other banks were not advanced: drop them
        boottime=progress.boottime,
        reset_count=progress.reset_count,
        lag=n_lines - matched,
        learned_keys=tuple(rules.learned),
    )
    return ImaResult(rules.failures, rules.warnings, new, parsed)


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
        self.extra = verification_keys(extra_verification_keys)
        self.last: ImaResult | None = None

    def __call__(
        self, list_text: str | None, first_entry: int, pcrs: dict[int, bytes], bank: str
    ) -> tuple[list[Failure], int]:
        pcr10 = pcrs.get(ima.IMA_PCR)
        if pcr10 is None:
            return [ima_failure(PCR_MISMATCH, message="PCR 10 is not in the quote")], self.progress.count
        res = evaluate_ima(
            list_text, first_entry, pcr10, bank, self.policy, self.progress,
            ignore_tomtou_errors=self.ignore_tomtou_errors,
            extra_verification_keys=self.extra,
            quoted_pcrs=pcrs,
        )  # fmt: skip
        self.progress = res.progress
        self.last = res
        return res.failures + res.warnings, res.progress.count
