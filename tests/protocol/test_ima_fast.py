"""The IMA fast path (protocol.ima_fast) must give exactly the general path's results.

Every test evaluates the same list twice, ``fast_path=True`` and ``fast_path=False`` (every line
through the general per-line code), and compares the whole ImaResult: failures with their
contexts and order, warnings, progress, lines parsed.
"""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keytrio.protocol import ima, tpm2
from keytrio.protocol.ima import Entry
from keytrio.protocol.ima_eval import ImaProgress, ImaResult, evaluate_ima
from keytrio.protocol.ima_fast import FastNg
from keytrio.protocol.runtime_policy import RuntimePolicy, parse_policy, policy_document

PCRS = {i: bytes([i]) * 32 for i in range(10)}


def _raw(
    path: str, digest: bytes, alg: str = "sha256", log_alg: str = "sha1", template: str = "ima-ng"
) -> Entry:
    """An entry with any path (spaces, odd characters) and a correct template hash."""
    e = Entry(10, b"", template, alg, digest, path, None, b"" if template == "ima-buf" else None)
    return Entry(10, ima.template_hash(e, log_alg), template, alg, digest, path, e.signature, e.buf)


class _Log:
    """Builds list lines of many kinds, and the policy that goes with them."""

    def __init__(self, log_alg: str) -> None:
        self.log_alg = log_alg
        self.digests: dict[str, list[str]] = {}
        self.n = 0

    def _name(self, prefix: str = "/usr/lib/x/f") -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def _line(self, e: Entry, listed: bool = True, digest: bytes | None = None) -> str:
        if listed:
            self.digests.setdefault(e.path, []).append((digest or e.digest).hex())
        return ima.format_line(e)

    def _entry(self, path: str, alg: str = "sha256", template: str = "ima-ng") -> Entry:
        d = hashlib.new(alg, path.encode("utf-8", "surrogateescape")).digest() if alg != "md5" else bytes(16)
        return _raw(path, d, alg, self.log_alg, template)

    def ok(self) -> list[str]:
        return [self._line(self._entry(self._name()))]

    def unlisted(self) -> list[str]:
        return [self._line(self._entry(self._name()), listed=False)]

    def wrong_digest(self) -> list[str]:
        return [self._line(self._entry(self._name()), digest=b"\x01" * 32)]

    def two_digests(self) -> list[str]:
        e = self._entry(self._name())
        self.digests[e.path] = [(b"\x02" * 32).hex()]
        return [self._line(e)]

    def excluded(self) -> list[str]:
        return [self._line(self._entry(self._name("/tmp/x")), listed=False)]

    def excluded_wrong(self) -> list[str]:
        return [self._line(self._entry(self._name("/tmp/y")), digest=b"\x03" * 32)]

    def bad_th(self) -> list[str]:
        line = self._line(self._entry(self._name()))
        return [line[:3] + ("0" if line[3] != "0" else "1") + line[4:]]

    def upper_th(self) -> list[str]:
        pcr, th, rest = self._line(self._entry(self._name())).split(" ", 2)
        return [f"{pcr} {th.upper()} {rest}"]

    def upper_digest(self) -> list[str]:
        p, th, t, d, path = self._line(self._entry(self._name())).split(" ", 4)
        return [f"{p} {th} {t} {d.upper().replace('SHA256', 'sha256')} {path}"]

    def violation(self) -> list[str]:
        return [ima.format_line(ima.violation_entry(self._name(), template_hash_alg=self.log_alg))]

    def pcr11(self) -> list[str]:
        return ["11" + self._line(self._entry(self._name()))[2:]]

    def pcr010(self) -> list[str]:
        return ["0" + self._line(self._entry(self._name()))]

    def boot_aggregate(self) -> list[str]:
        e = ima.boot_aggregate_entry("sha256", PCRS, template_hash_alg=self.log_alg)
        return [ima.format_line(e)]

    def boot_aggregate_listed(self) -> list[str]:
        e = ima.boot_aggregate_entry("sha256", PCRS, template_hash_alg=self.log_alg)
        return [self._line(e)]

    def ima_sig(self) -> list[str]:
        return [self._line(self._entry(self._name(), template="ima-sig"))]

    def ima_buf(self) -> list[str]:
        return [self._line(self._entry(self._name(), template="ima-buf"), listed=False)]

    def legacy_ima(self) -> list[str]:
        return [
            self._line(
                ima.build_entry("ima", self._name(), "sha1", b"\x06" * 20, template_hash_alg=self.log_alg)
            )
        ]

    def space_in_path(self) -> list[str]:
        return [self._line(self._entry(self._name("/usr/a b/f")))]

    def other_alg(self) -> list[str]:
        return [self._line(self._entry(self._name(), alg="sha1"))]

    def sha512(self) -> list[str]:
        return [self._line(self._entry(self._name(), alg="sha512"))]

    def md5(self) -> list[str]:  # policies take no 16-byte digests: never listed
        return [self._line(self._entry(self._name(), alg="md5"), listed=False)]

    def short_digest(self) -> list[str]:  # policies take no 31-byte digests; matters without one
        return [self._line(_raw(self._name(), b"\x04" * 31, "sha256", self.log_alg), listed=False)]

    def tab_in_hex(self) -> list[str]:
        p, th, t, d, path = self._line(self._entry(self._name())).split(" ", 4)
        return [f"{p} {th} {t} {d[:20]}\t{d[21:]} {path}"]

    def ws_in_hex(self) -> list[str]:  # bytes.fromhex would skip the tab: right digest, bad field
        p, th, t, d, path = self._line(self._entry(self._name())).split(" ", 4)
        return [f"{p} {th} {t} {d[:21]}\t{d[21:]} {path}"]  # between two hex pairs

    def forged_short(self) -> list[str]:
        """A 31-byte sha256 "digest" whose template hash is over a 32-byte-style length prefix."""
        name = self._name().encode()
        data = (
            struct.pack("<I", 41)
            + b"sha256:\0"
            + b"\x05" * 31
            + struct.pack("<I", len(name) + 1)
            + name
            + b"\0"
        )
        th = hashlib.new(self.log_alg, data).hexdigest()
        return [f"10 {th} ima-ng sha256:{'05' * 31} {name.decode()}"]

    def escaped_name(self) -> list[str]:
        return [self._line(self._entry(self._name("/usr/\udc80\u00e9/f")))]

    def unencodable_name(self) -> list[str]:
        e = self._entry(self._name())
        return [ima.format_line(e).replace(e.path, e.path + "\ud800")]

    def double_space(self) -> list[str]:
        return [self._line(self._entry(self._name())).replace(" ima-ng ", "  ima-ng ")]

    def trailing_space(self) -> list[str]:
        return [self._line(self._entry(self._name())) + " "]

    def empty(self) -> list[str]:
        return [""]

    def garbage(self) -> list[str]:
        return ["10 zz ima-ng sha256:00 /x"]

    def unknown_alg(self) -> list[str]:
        return [self._line(self._entry(self._name())).replace(" sha256:", " sha257:")]

    def shifted_pair(self) -> list[str]:
        """Two good entries with a space moved across the line break: 3 + 5 spaces."""
        a = self._line(self._entry(self._name()))
        b = self._line(self._entry(self._name()))
        cut = a.rindex(" ")
        return [a[:cut], a[cut + 1 :] + " " + b]

    def split_digest(self) -> list[str]:
        """Two lines whose digest fields hold ``sha256:<hex>sha256:`` and ``<hex>``: joined, the
        column still reads as n whole digests (the per-field length check must catch it)."""
        a = self._line(self._entry(self._name())).split(" ")
        b = self._line(self._entry(self._name())).split(" ")
        a[3], b[3] = a[3] + "sha256:", b[3][len("sha256:") :]
        return [" ".join(a), " ".join(b)]

    def long_name(self) -> list[str]:  # longer than the column pass's length table: line by line
        return [self._line(self._entry(self._name("/usr/" + "n" * 5000 + "/f")))]

    def policy(self) -> RuntimePolicy:
        doc = policy_document(digests=self.digests, excludes=["/tmp/x", "^/tmp/nomatch"])
        doc["ima"]["log_hash_alg"] = self.log_alg
        return parse_policy(json.dumps(doc))


KINDS = [k for k in vars(_Log) if not k.startswith("_") and k not in ("policy", "ok")]
#: kinds whose line passes every check (the fast path may take them; the rest it must not)
ACCEPTED = {
    "boot_aggregate_listed",
    "escaped_name",
    "long_name",
    "other_alg",
    "sha512",
    "space_in_path",
    "upper_digest",
    "two_digests",
}


def _replay_prefixes(lines: list[str], bank: str) -> list[bytes]:
    """PCR 10 after each readable prefix of ``lines`` (stops at the first unreadable line)."""
    value = bytes(tpm2.DIGEST_SIZES[bank])
    out = [value]
    for i, line in enumerate(lines):
        try:
            e = ima.parse_line(line, i)
        except ima.ImaParseError:
            break
        value = hashlib.new(bank, value + ima.extend_digest(e, bank)).digest()
        out.append(value)
    return out


def _both(text: str, target: bytes, bank: str, policy: RuntimePolicy | None, **kw: object) -> ImaResult:
    runs = [
        evaluate_ima(text, 0, target, bank, policy, ImaProgress(), quoted_pcrs=PCRS, fast_path=fast, **kw)  # type: ignore[arg-type]
        for fast in (True, False)
    ]
    assert runs[0] == runs[1]
    return runs[0]


def _build(plan: list[tuple[str, int]], log_alg: str) -> tuple[list[str], RuntimePolicy]:
    log = _Log(log_alg)
    lines: list[str] = []
    for kind, run in plan:
        lines += getattr(log, kind)()
        for _ in range(run):
            lines += log.ok()
    return lines, log.policy()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    plan=st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 70)), max_size=6),
    lead=st.integers(0, 40),
    algs=st.sampled_from([("sha256", "sha1"), ("sha256", "sha256"), ("sha1", "sha1"), ("sha384", "sha1")]),
    where=st.one_of(st.none(), st.floats(0, 1)),
    with_policy=st.booleans(),
    ignore_tomtou=st.booleans(),
)
def test_fast_and_general_paths_agree(
    plan: list[tuple[str, int]],
    lead: int,
    algs: tuple[str, str],
    where: float | None,
    with_policy: bool,
    ignore_tomtou: bool,
) -> None:
    bank, log_alg = algs
    lines, policy = _build([("ok", lead), *plan], log_alg)
    prefixes = _replay_prefixes(lines, bank)
    # the quote matches some readable prefix (the log may run ahead of it), or nothing at all
    target = (
        hashlib.new(bank, b"no prefix").digest()
        if where is None
        else prefixes[int(where * (len(prefixes) - 1))]
    )
    text = "".join(x + "\n" for x in lines)
    _both(text, target, bank, policy if with_policy else None, ignore_tomtou_errors=ignore_tomtou)


@pytest.mark.parametrize("with_policy", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_inside_long_clean_runs(kind: str, with_policy: bool) -> None:
    # long runs on both sides so the column pass (chunks of 16..512 lines) meets the odd line
    lines, policy = _build([("ok", 700), (kind, 700), (kind, 0), ("ok", 0)], "sha1")
    prefixes = _replay_prefixes(lines, "sha256")
    text = "\n".join(lines)
    for target in (prefixes[-1], prefixes[len(prefixes) // 2], prefixes[0], b"\x07" * 32):
        _both(text, target, "sha256", policy if with_policy else None)


def test_clean_list_is_accepted_and_counted() -> None:
    lines, policy = _build([("ok", 3000)], "sha1")
    prefixes = _replay_prefixes(lines, "sha256")
    res = _both("\n".join(lines) + "\n", prefixes[1234], "sha256", policy)
    assert res.ok and res.progress.count == 1234 and res.progress.lag == len(lines) - 1234
    assert res.lines_parsed == 1234


@pytest.mark.parametrize("split", [False, True])
def test_fast_path_accepts_only_what_it_should(split: bool) -> None:
    """FastNg alone: stops exactly at the first line it must leave to the general path."""
    for kind in KINDS:
        lines, policy = _build([("ok", 40), (kind, 40)], "sha1")
        prefixes = _replay_prefixes(lines, "sha256")
        fast = FastNg("sha256", "sha1", policy.digests)
        if split:
            value, stop, hit = fast._lines(lines, 0, len(lines), bytes(32), b"\x07" * 32)
        else:
            value, stop, hit = fast.run(lines, 0, bytes(32), b"\x07" * 32)
        assert not hit and value == prefixes[stop]
        assert stop == (len(lines) if kind in ACCEPTED else 41), kind  # 41 good lines first


def test_nul_anywhere_leaves_everything_to_the_general_path() -> None:
    lines, policy = _build([("ok", 50)], "sha1")
    lines[30] = lines[30] + "\0x"
    res = _both("\n".join(lines), b"\x07" * 32, "sha256", policy)
    assert [f.event_id for f in res.failures] == ["ima.parser.entry", "ima.pcr_mismatch"]
    assert res.failures[0].context["line"] == 30 and res.lines_parsed == 31
