"""The C line loop (protocol/_ima_fast.c) must give exactly what the Python passes give.

Each list is run through ``FastNg(native=True)`` (C) and ``FastNg(native=False)``: ``_lines`` (the
line-by-line pass the C code copies) always, ``run`` (the column pass too) when the list holds no
NUL (its caller's guarantee). The whole list is walked: after a line the fast path hands back,
the walk goes on after it, so every mutated line of a list is looked at, not only the first.
Results compared: (value, stop, matched) at every step. Under CI=true the extension must be
importable (a silent fall back to Python would make the benchmark and these tests meaningless).
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keytrio.protocol import ima_fast
from keytrio.protocol.ima import KERNEL_DIGEST_SIZES
from keytrio.protocol.ima_fast import NATIVE_ALGORITHMS, FastNg
from keytrio.protocol.tpm2 import DIGEST_SIZES

PAIRS = [(bank, log) for bank in DIGEST_SIZES for log in DIGEST_SIZES]
#: d-ng algorithms of every digest size the kernel table has, and one it lacks
DNG_ALGS = ["sha256", "sha1", "sha512", "md5", "sm3", "sha3-384", "tgr192", "sha384", "wp512"]


def test_the_extension_is_there_under_ci() -> None:
    if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
        assert ima_fast._native is not None, "keytrio.protocol._ima_fast did not import: not built?"
    if ima_fast._native is None:
        pytest.skip("keytrio.protocol._ima_fast is not built here (no compiler or libssl-dev?)")
    assert set(DIGEST_SIZES) == NATIVE_ALGORITHMS
    assert FastNg("sha256", "sha1", None).native
    assert not FastNg("sha256", "sha1", None, native=False).native


needs_c = pytest.mark.skipif(ima_fast._native is None, reason="keytrio.protocol._ima_fast is not built")


def _u32(n: int) -> bytes:
    return struct.pack("<I", n)


def _line(path: str, digest: bytes, alg: str, log: str, th: str | None = None) -> str:
    try:
        name = path.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate: the line is made anyway, and must not pass
        name = path.encode("utf-8", "surrogatepass")
    data = _u32(len(alg) + 2 + len(digest)) + alg.encode() + b":\0" + digest + _u32(len(name) + 1) + name + b"\0"
    if th is None:
        th = hashlib.new(log, data).hexdigest()
    return f"10 {th} ima-ng {alg}:{digest.hex()} {path}"


class _Walk:
    """Runs a list through both implementations, step by step, and compares every step."""

    def __init__(self, bank: str, log: str, digests: Mapping[str, Any] | None) -> None:
        self.bank, self.log, self.digests = bank, log, digests
        self.steps = 0
        self.accepted = 0

    def compare(self, lines: list[str], value: bytes, target: bytes) -> None:
        # the column pass relies on its caller's guarantees: no NUL, no newline in a line
        unsplit = any("\0" in x or "\n" in x for x in lines)
        start = 0
        while start <= len(lines):
            c = FastNg(self.bank, self.log, self.digests)
            assert c.native
            got = c.run(lines, start, value, target)
            py = FastNg(self.bank, self.log, self.digests, native=False)
            want = py._lines(lines, start, len(lines), value, target)
            assert got == want, (start, lines[start : start + 1])
            if not unsplit:
                assert got == FastNg(self.bank, self.log, self.digests, native=False).run(
                    lines, start, value, target
                ), start
            self.steps += 1
            v, stop, matched = got
            self.accepted += stop - start
            if matched or stop >= len(lines):
                return
            # the general path would take lines[stop]; carry on after it with the same value
            value, start = v, stop + 1


def _chain(lines: list[str], bank: str, k: int, walk: _Walk) -> bytes:
    """PCR 10 after the first k lines (through the Python pass; it may stop earlier)."""
    value, _, _ = FastNg(bank, walk.log, walk.digests, native=False)._lines(lines, 0, k, bytes(DIGEST_SIZES[bank]), b"")
    return value


# --- mutation ---------------------------------------------------------------------------------

HOSTILE = [" ", "  ", "\t", "\0", "\n", "\r", ":", "A", "F", "g", "G", "0", "\udc80", "\udcff", "\ud800",
           "\udfff", "é", "\u20ac", "\U0001f600", "\x7f", "\xff", "10", "ima-ng", "sha256:", "\x0b"]


def _mutate(rng: random.Random, line: str) -> str:
    kind = rng.randrange(16)
    if kind == 0:  # a hostile character somewhere
        i = rng.randrange(len(line) + 1)
        return line[:i] + rng.choice(HOSTILE) + line[i:]
    if kind == 1:  # one character replaced
        i = rng.randrange(len(line))
        return line[:i] + rng.choice(HOSTILE) + line[i + 1 :]
    if kind == 2:  # one character dropped
        i = rng.randrange(len(line))
        return line[:i] + line[i + 1 :]
    if kind == 3:  # truncated
        return line[: rng.randrange(len(line))]
    f = line.split(" ", 4)
    if len(f) < 5:
        return line + rng.choice(HOSTILE)
    pcr, th, tpl, dng, path = f
    if kind == 4:
        pcr = rng.choice(["11", "010", "", "1O", "10\0", "ten", "+10", "1", "9"])
    elif kind == 5:
        th = rng.choice([th.upper(), "0" * len(th), th[:-1], th + "0", th[:-2] + "zz", "", th[:10] + "É" + th[11:]])
    elif kind == 6:
        tpl = rng.choice(["ima", "ima-sig", "ima-buf", "ima-ngx", "IMA-NG", "ima-n", "ima-ng\0", ""])
    elif kind == 7:
        alg, _, hx = dng.partition(":")
        dng = rng.choice([
            f"{alg.upper()}:{hx}", f"{alg}:{hx.upper()}", f"{alg}:{hx[:-2]}", f"{alg}:{hx}00", f"{alg}{hx}",
            f"{alg}::{hx}", f"sha257:{hx}", f":{hx}", f"{alg}:{hx[:6]} {hx[7:]}", f"{alg}:{hx[:6]}\t{hx[8:]}",
            f"{alg}:{hx[:-1]}x", f"{rng.choice(DNG_ALGS)}:{hx}", f"{alg}:{hx[:4]}\u0660{hx[5:]}",
            "x" * rng.randrange(1, 600) + ":" + hx,
        ])
    elif kind == 8:  # names: long, spaced, escaped, unencodable, empty
        path = rng.choice([
            path + " ", " " + path, path + " x", "", path * rng.randrange(20, 400), path + "\udc80",
            path + "\ud800", "é" + path, path + "\0", "/" + "n" * rng.randrange(4000, 70000),
            path.replace("/", "\U0001f600"),
        ])
    elif kind == 9:  # a violation: zero template hash
        th = "0" * len(th)
    elif kind == 10:  # extra spaces between fields
        return rng.choice([f"{pcr}  {th} {tpl} {dng} {path}", f"{pcr} {th}  {tpl} {dng} {path}",
                           f"{pcr} {th} {tpl}  {dng} {path}", f"{pcr} {th} {tpl} {dng}  {path}",
                           f" {pcr} {th} {tpl} {dng} {path}"])
    else:  # left alone: most lines of a real list pass
        return line
    return " ".join([pcr, th, tpl, dng, path])


def _make_list(rng: random.Random, log: str, n: int, tag: str) -> tuple[list[str], dict[str, frozenset[bytes]]]:
    lines: list[str] = []
    policy: dict[str, frozenset[bytes]] = {}
    for k in range(n):
        accent = "\u00e9" if k % 97 == 0 else ""
        space = "x y" if k % 89 == 0 else ""
        path = f"/usr/{tag}/{accent}{space}f{k}"
        alg = rng.choice(DNG_ALGS) if k % 7 == 0 else "sha256"
        digest = hashlib.sha256(f"{tag}{k}".encode()).digest()[:1] * KERNEL_DIGEST_SIZES[alg]
        digest = bytes((b + i) % 256 for i, b in enumerate(digest))
        line = _line(path, digest, alg, log)
        listed = rng.random()
        if listed < 0.9:
            policy[path] = frozenset([digest])
        elif listed < 0.95:
            policy[path] = frozenset([b"\x01" * len(digest), digest[::-1]])
        lines.append(_mutate(rng, line) if rng.random() < 0.35 else line)
    return lines, policy


class _Odd(Mapping[str, frozenset[bytes]]):
    """A Mapping that is not a dict: the C code must ask it through .get, as FastNg does."""

    def __init__(self, d: dict[str, frozenset[bytes]]) -> None:
        self._d = d

    def __getitem__(self, k: str) -> frozenset[bytes]:
        return self._d[k]

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)


@needs_c
@pytest.mark.parametrize(("bank", "log"), PAIRS)
def test_mutated_lists_agree(bank: str, log: str) -> None:
    rng = random.Random(f"{bank}/{log}")
    total = accepted = 0
    for round_ in range(6):
        lines, policy = _make_list(rng, log, 400, f"{bank}{round_}")
        for digests in (policy, MappingProxyType(policy), _Odd(policy), None):
            walk = _Walk(bank, log, digests)
            # no target reached; a value reached after some prefix; a target of another length
            targets = [b"\x07" * DIGEST_SIZES[bank], _chain(lines, bank, rng.randrange(len(lines)), walk), b"x"]
            for target in targets:
                walk.compare(lines, bytes(DIGEST_SIZES[bank]), target)
            walk.compare(lines, b"odd start value", targets[0])
            total += walk.steps
            accepted += walk.accepted
    assert total > 1000 and accepted > 2000  # the walk looked at many lines, mutated and whole


@needs_c
def test_tens_of_thousands_of_mutated_lines() -> None:
    rng = random.Random(20261204)
    seen = 0
    for round_ in range(8):
        bank, log = PAIRS[round_ % len(PAIRS)]
        lines, policy = _make_list(rng, log, 5000, f"big{round_}")
        walk = _Walk(bank, log, policy if round_ % 2 else None)
        walk.compare(lines, bytes(DIGEST_SIZES[bank]), b"\x07" * DIGEST_SIZES[bank])
        seen += len(lines)
        assert walk.steps > 500
    assert seen == 40000


# --- structured fields (hypothesis) -------------------------------------------------------------

_hex = st.text("0123456789abcdefABCDEF \t", min_size=0, max_size=140)


@st.composite
def _lines(draw: st.DrawFn, log: str) -> tuple[str, str, bytes]:
    """A line whose every field is either right or drawn from what can go wrong there."""
    alg = draw(st.sampled_from([*DNG_ALGS, "sha257", "", "SHA256"]))
    size = KERNEL_DIGEST_SIZES.get(alg, 32)
    digest = draw(st.binary(min_size=size, max_size=size))
    path = draw(st.one_of(
        st.text(max_size=40),
        st.text(st.characters(codec="utf-8"), max_size=20),
        st.sampled_from(["/bin/a", "/bin/a b", "", "/x\udc80", "/x\ud800"]),
    ))
    good = _line(path, digest, alg if alg in KERNEL_DIGEST_SIZES else "sha256", log)
    pcr, th, tpl, dng, _ = good.split(" ", 4)
    pcr = draw(st.sampled_from([pcr, pcr, "11", "", "010"]))
    th = draw(st.one_of(st.just(th), st.just(th), st.just(th.upper()), st.just("0" * len(th)), _hex))
    tpl = draw(st.sampled_from([tpl, tpl, "ima-sig", "ima", ""]))
    dng = draw(st.one_of(st.just(f"{alg}:{digest.hex()}"), st.just(dng), st.builds(lambda h: f"{alg}:{h}", _hex)))
    sep = draw(st.sampled_from([" ", " ", " ", "  ", "\t"]))
    return sep.join([pcr, th, tpl, dng]) + " " + path, path, digest


@needs_c
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), pair=st.sampled_from(PAIRS), listed=st.floats(0, 1), with_policy=st.booleans())
def test_structured_lines_agree(data: st.DataObject, pair: tuple[str, str], listed: float, with_policy: bool) -> None:
    bank, log = pair
    drawn = data.draw(st.lists(_lines(log), min_size=1, max_size=12))
    lines = [x for x, _, _ in drawn]
    policy = {p: frozenset([d]) for k, (_, p, d) in enumerate(drawn) if k < listed * len(drawn)}
    walk = _Walk(bank, log, policy if with_policy else None)
    walk.compare(lines, bytes(DIGEST_SIZES[bank]), _chain(lines, bank, len(lines) // 2 + 1, walk))


# --- what only the C code has to survive --------------------------------------------------------


@needs_c
def test_unsupported_algorithms_and_odd_arguments() -> None:
    native = ima_fast._native
    assert native is not None
    good = _line("/a", bytes(32), "sha256", "sha1")
    with pytest.raises(ValueError, match="unsupported"):
        native.run([good], 0, bytes(32), bytes(32), "md5", "sha1", None, KERNEL_DIGEST_SIZES)
    with pytest.raises(ValueError, match="unsupported"):
        native.run([good], 0, bytes(32), bytes(32), "sha256", "sha3-256", None, KERNEL_DIGEST_SIZES)
    with pytest.raises(TypeError):
        native.run((good,), 0, bytes(32), bytes(32), "sha256", "sha1", None, KERNEL_DIGEST_SIZES)
    # what is not a str, or a start past the end or before it: handed back, not read
    assert native.run([good, b"x", 3], 1, b"v", b"t", "sha256", "sha1", None, KERNEL_DIGEST_SIZES) == (b"v", 1, False)
    assert native.run([good], 5, b"v", b"t", "sha256", "sha1", None, KERNEL_DIGEST_SIZES) == (b"v", 5, False)
    assert native.run([good], -3, b"v", b"t", "sha256", "sha1", None, KERNEL_DIGEST_SIZES)[1:] == (1, False)
    # a kernel table with odd entries: not a usable size, so not taken
    odd = {"sha256": 10**30, "sha1": "20", "md5": -1}
    for sizes in (odd, {}):
        assert native.run([good], 0, b"v", b"t", "sha256", "sha1", None, sizes) == (b"v", 0, False)


@needs_c
def test_a_mapping_that_changes_the_list_does_not_crash_it() -> None:
    lines = [_line(f"/a{k}", bytes(32), "sha256", "sha1") for k in range(50)]

    class Shrinking(dict[str, frozenset[bytes]]):
        def get(self, k: str, default: Any = None) -> Any:
            lines.clear()
            return frozenset([bytes(32)])

    _, stop, matched = FastNg("sha256", "sha1", Shrinking()).run(lines, 0, bytes(32), b"t")
    assert (stop, matched) == (1, False) and lines == []

    class Raising(dict[str, frozenset[bytes]]):
        def get(self, k: str, default: Any = None) -> Any:
            raise LookupError(k)

    lines = [_line("/b", bytes(32), "sha256", "sha1")]
    with pytest.raises(LookupError):
        FastNg("sha256", "sha1", Raising()).run(lines, 0, bytes(32), b"t")
    # a value that is no container: the same TypeError as the Python pass
    no_container: dict[str, Any] = {"/b": None}
    with pytest.raises(TypeError):
        FastNg("sha256", "sha1", no_container).run(lines, 0, bytes(32), b"t")
    with pytest.raises(TypeError):
        FastNg("sha256", "sha1", no_container, native=False)._lines(lines, 0, 1, bytes(32), b"t")


@needs_c
def test_huge_and_many_lines() -> None:
    rng = random.Random(7)
    names = ["/" + "n" * 1_000_000, "/" + "\u00e9" * 300_000, "/" + "\U0001f600" * 100_000]
    lines = [_line(p, bytes(32), "sha256", "sha256") for p in names]
    lines += ["10 " + "a" * 2_000_000, " " * 500_000, "\0" * 100_000, "\udc80" * 1000 + " " * 4]
    lines += ["".join(rng.choice(HOSTILE) for _ in range(rng.randrange(1, 60))) for _ in range(3000)]
    walk = _Walk("sha256", "sha256", {p: frozenset([bytes(32)]) for p in names})
    walk.compare(lines, bytes(32), b"t")
    assert walk.accepted >= 3
