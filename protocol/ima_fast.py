"""Fast path for the common IMA line: a plain ima-ng entry for PCR 10 that passes every check.

:func:`protocol.ima_eval.evaluate_ima` spends most of its time on lines like

    10 <template hash> ima-ng sha256:<hex> /usr/bin/foo

that parse, hash correctly and are listed in the runtime policy with their digest. This module
handles exactly those lines without building an :class:`protocol.ima.Entry`. It only ever
*accepts* lines: anything it is not sure passes (another template or PCR, odd spacing, unknown
digest algorithm, bad hex, unencodable name, a template hash that is not the lowercase hex of
the computed one — which covers violations, whose listed hash is zeros —, a path or digest the
policy does not list) is handed back untouched to the general per-line code, so every failure
is produced by that code alone and stays identical. Excludes need no look here: a listed digest
passes whether or not the path is also excluded (upstream: pass iff excluded or listed with
this digest). The caller makes sure the list holds no NUL (the general parser rejects a name
with one; the fast path does not look for it per line).

Two speeds, both with the hash constructors bound once and the ``<len>alg:\\0`` prefix of the
template data precomputed:

- **columns** (chunks of up to :data:`_CHUNK_MAX` lines with exactly four spaces each): the chunk
  is split into its five columns in one go and every step (hex decoding, name encoding, template
  data, the two digests, the template-hash comparison, the policy lookup) runs as one C-level
  ``map`` over a column; only the PCR 10 chain is a Python loop. A chunk it cannot take whole
  (another template, a space in a path, ...) goes line by line; a line that fails a check ends
  the run there.
- **line by line**: one split per line; used for chunks the column pass refused, and for a while
  after a refusal or a failing line (so a hostile list of failing lines does not make the column
  pass redo work over and over).

With the C extension :mod:`protocol._ima_fast` (built by setup.py; OpenSSL's libcrypto) importable
and both hash algorithms among those it computes, :meth:`FastNg.run` hands the whole run to its
``run``, which does what :meth:`FastNg._lines` does, line by line, in C: ≈ 0.6 µs a line instead of
≈ 2.6 µs here (three hashes per line cost ≈ 1.4 µs through hashlib objects alone). The Python
passes stay as the fallback for a machine without the extension and as the reference the tests
compare it with.

Pure: strings in, bytes out.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Callable, Mapping, Sequence
from itertools import repeat
from operator import add, contains
from typing import Any

from keytrio.protocol.ima import KERNEL_DIGEST_SIZES
from keytrio.protocol.tpm2 import DIGEST_SIZES

try:
    from keytrio.protocol import _ima_fast as _native
except ImportError:  # not built (no compiler or libssl-dev when installed): the Python passes
    _native = None

#: the bank / log hash algorithms the C extension computes (empty without it)
NATIVE_ALGORITHMS: frozenset[str] = _native.algorithms() if _native is not None else frozenset()

_U32 = struct.Struct("<I").pack
_NUL = b"\0"

#: ``alg`` -> (u32le(len(alg) + 2 + size) || alg || ":\\0", digest size): the d-ng field's
#: length-value prefix, so a line costs one concatenation instead of two packs.
_PREFIXES: dict[str, tuple[bytes, int]] = {
    alg: (_U32(len(alg) + 2 + size) + alg.encode("ascii") + b":\0", size)
    for alg, size in KERNEL_DIGEST_SIZES.items()
}
#: u32le(n) for the name lengths a chunk can take whole (longer names: line by line)
_LEN_PREFIX = tuple(_U32(n) for n in range(4097))
_CHUNK_MIN = 16  # first column chunk after line-by-line stretches; doubles while chunks pass whole
_CHUNK_MAX = 512
_COOL = 64  # lines taken one by one after the column pass met a line it could not accept


@functools.lru_cache(maxsize=64)
def _splitter(size: int, n: int) -> Callable[[bytes], tuple[bytes, ...]]:
    """Cuts n * size bytes into n digests in one call (struct builds the n bytes objects)."""
    return struct.Struct(f"{size}s" * n).unpack


class FastNg:
    """Accepts runs of plain, passing ima-ng lines and folds them into the running PCR 10 value.

    ``digests`` is the policy's path -> accepted digests (None: no policy, so only the template
    hash and the replay are checked, as in the general path). One instance per evaluation.

    ``native=False`` keeps to the Python passes even when the C extension could take the run
    (the tests compare the two); :attr:`native` says which one runs.
    """

    __slots__ = ("_bank", "_bank_hash", "_chunk", "_cool", "_digests", "_hash_type", "_log_alg", "_log_hash",
                 "native")

    def __init__(
        self,
        bank: str,
        log_hash_alg: str,
        digests: Mapping[str, frozenset[bytes]] | None,
        *,
        native: bool = True,
    ) -> None:
        if bank not in DIGEST_SIZES or log_hash_alg not in DIGEST_SIZES:
            raise ValueError("unsupported hash algorithm")
        self.native = native and bank in NATIVE_ALGORITHMS and log_hash_alg in NATIVE_ALGORITHMS
        self._bank = bank
        self._log_alg = log_hash_alg
        self._bank_hash: Callable[[bytes], Any] = getattr(hashlib, bank)
        # None when both are the same algorithm: the extended digest is the template hash
        self._log_hash: Callable[[bytes], Any] | None = (
            None if log_hash_alg == bank else getattr(hashlib, log_hash_alg)
        )
        self._hash_type = type(self._bank_hash(b""))  # for its unbound digest/hexdigest
        self._digests = digests
        self._chunk = _CHUNK_MIN
        self._cool = 0

    def run(self, lines: Sequence[str], start: int, value: bytes, target: bytes) -> tuple[bytes, int, bool]:
        """Fold in ``lines[start:]`` while each is a passing plain ima-ng line.

        Returns ``(value, stop, matched)``: ``lines[start:stop]`` were accepted and folded into
        ``value``. ``matched``: ``value`` reached ``target`` at line ``stop - 1`` (it stops
        there). Otherwise ``stop == len(lines)`` or ``lines[stop]`` is for the general path.
        """
        if self.native and type(lines) is list:
            return _native.run(  # type: ignore[union-attr]
                lines, start, value, target, self._bank, self._log_alg, self._digests, KERNEL_DIGEST_SIZES
            )
        n = len(lines)
        i = start
        while i < n:
            if self._cool > 0:
                stop = min(i + self._cool, n)
                value, j, matched = self._lines(lines, i, stop, value, target)
                self._cool -= j - i
                if matched or j < stop:
                    self._cool = _COOL
                    return value, j, matched
                i = j
                continue
            stop = min(i + self._chunk, n)
            r = self._columns(lines, i, stop, value, target)
            if r is None:  # not a uniform chunk: one by one for a while
                self._cool, self._chunk = _COOL, _CHUNK_MIN
                continue
            value, j, matched = r
            if matched or j < stop:
                self._cool, self._chunk = _COOL, _CHUNK_MIN
                return value, j, matched
            self._chunk = min(2 * self._chunk, _CHUNK_MAX)
            i = j
        return value, n, False

    def _columns(
        self, lines: Sequence[str], start: int, stop: int, value: bytes, target: bytes
    ) -> tuple[bytes, int, bool] | None:
        """The column pass over ``lines[start:stop]``; None when the chunk is not uniform."""
        seg = lines[start:stop]
        n = len(seg)
        # Five fields per line, checked without looking at each line: the text holds no NUL (the
        # caller's guarantee), so after joining with " \0" exactly the n - 1 fields that begin a
        # line after the first start with NUL; all of them at 5, 10, ... and 5 n fields in all
        # means every line split into exactly five.
        f = " \0".join(seg).split(" ")
        if (
            len(f) != 5 * n
            or f[0] != "10"
            or f[5::5].count("\x0010") != n - 1
            or f[2::5].count("ima-ng") != n
        ):
            return None
        dngs = f[3::5]
        alg, sep, _ = dngs[0].partition(":")
        entry = _PREFIXES.get(alg)
        if entry is None or not sep:
            return None
        pre, size = entry
        head = alg + ":"
        # Every digest field is exactly ``head`` + 2 size hex digits, checked on the joined
        # column: n fields of that length whose concatenation splits at ``head`` into n pieces of
        # 2 size characters (``head`` holds ":", never a hex digit, so the cuts are the fields'
        # starts); one fromhex of all pieces yielding n size bytes proves them hex without
        # whitespace (fromhex would skip it and come out short).
        if list(map(len, dngs)).count(len(head) + 2 * size) != n:
            return None
        hexes = "".join(dngs).split(head)
        if len(hexes) != n + 1 or list(map(len, hexes)).count(2 * size) != n:
            return None
        paths = f[4::5]
        try:
            blob = bytes.fromhex("".join(hexes))
            # each name with its NUL; names hold no "\n" and their UTF-8 no 0x0a byte
            names = ("\0\n".join(paths) + "\0").encode("utf-8", "surrogateescape").split(b"\n")
            lens = list(map(_LEN_PREFIX.__getitem__, map(len, names)))
        except (ValueError, IndexError):  # bad hex, an unencodable name, a name past _LEN_PREFIX
            return None
        if len(blob) != n * size:
            return None
        digests = _splitter(size, n)(blob)
        htype = self._hash_type
        data = list(map(b"".join, zip(repeat(pre), digests, lens, names)))
        exts = list(map(htype.digest, map(self._bank_hash, data)))
        # the first line that fails a check ends the run (the general path takes it)
        bad = n
        if self._log_hash is None:
            ths = list(map(bytes.hex, exts))
        else:
            ths = list(map(htype.hexdigest, map(self._log_hash, data)))
        listed = f[1::5]
        if ths != listed:
            bad = next(k for k in range(n) if ths[k] != listed[k])
        if self._digests is not None:
            ok = list(map(contains, map(self._digests.get, paths, repeat(frozenset())), digests))
            if False in ok:
                bad = min(bad, ok.index(False))
        # The PCR 10 chain without a Python loop: ``vals`` is extended from a map that reads
        # ``vals`` itself (a list iterator sees items appended while it runs), so value k + 1 is
        # H(value k || ext k), all in C. Values past a match cost a hash each and are dropped.
        vals = [value]
        vals.extend(map(htype.digest, map(self._bank_hash, map(add, vals, exts[:bad]))))
        try:
            k = vals.index(target, 1)
        except ValueError:
            return vals[-1], start + bad, False
        return target, start + k, True

    def _lines(
        self, lines: Sequence[str], start: int, stop: int, value: bytes, target: bytes
    ) -> tuple[bytes, int, bool]:
        """Line by line over ``lines[start:stop]``; same result contract as :meth:`run`."""
        bank_hash = self._bank_hash
        log_hash = self._log_hash
        listed = self._digests.get if self._digests is not None else None
        none: frozenset[bytes] = frozenset()
        prefixes = _PREFIXES
        fromhex = bytes.fromhex
        u32 = _U32
        nul = _NUL
        for i in range(start, stop):
            line = lines[i]
            try:
                pcr, th_hex, template, dng, path = line.split(" ", 4)
                alg, _, hexd = dng.partition(":")
                pre, size = prefixes[alg]
                digest = fromhex(hexd)
                name = path.encode("utf-8", "surrogateescape")
            except (ValueError, KeyError):  # too few fields, unknown alg, bad hex, unencodable name
                return value, i, False
            # exact hex length: bytes.fromhex skips whitespace, the general parser does not
            if pcr != "10" or template != "ima-ng" or not len(hexd) == 2 * len(digest) == 2 * size:
                return value, i, False
            data = pre + digest + u32(len(name) + 1) + name + nul
            ext = bank_hash(data).digest()
            if (ext.hex() if log_hash is None else log_hash(data).hexdigest()) != th_hex or (
                listed is not None and digest not in listed(path, none)
            ):
                return value, i, False
            value = bank_hash(value + ext).digest()
            if value == target:
                return value, i + 1, True
        return value, stop, False
