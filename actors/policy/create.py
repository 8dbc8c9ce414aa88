"""Build runtime (IMA) policies as upstream's ``keylime-policy create runtime`` does, from a file
tree, an IMA measurement list, or ``digest  path`` allowlist lines, and validate the result with
the verifier's own parser (:func:`protocol.runtime_policy.parse_policy`) before anyone uses it.

The JSON layout is upstream's (meta.version 1, generator 3): a policy made here and one made by
upstream's tool are interchangeable.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from keytrio.protocol import ima
from keytrio.protocol.errors import ProtocolError
from keytrio.protocol.runtime_policy import RuntimePolicy, parse_ima_key, parse_policy, policy_document

HASH_ALGS = ("sha256", "sha384", "sha512")
GENERATOR = 3  # upstream's "generator" value for keylime-policy made policies
_CHUNK = 1 << 20


class PolicyToolError(Exception):
    """An input cannot be used (unreadable file, bad line, bad regex, invalid result)."""


def empty_policy(*, timestamp: str | None = None) -> dict[str, Any]:
    """Upstream's empty policy skeleton (every section present)."""
    ts = timestamp or datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    return policy_document(meta={"version": 1, "generator": GENERATOR, "timestamp": ts})


def _add(table: dict[str, list[str]], name: str, digest_hex: str) -> None:
    values = table.setdefault(name, [])
    if digest_hex not in values:
        values.append(digest_hex)


def _compile(excludes: Iterable[str]) -> list[re.Pattern[str]]:
    out = []
    for rx in excludes:
        try:
            out.append(re.compile(rx))
        except re.error as exc:
            raise PolicyToolError(f"--exclude {rx!r}: not a regular expression ({exc})") from exc
    return out


def _file_digest(path: Path, alg: str) -> str:
    h = hashlib.new(alg)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def add_tree(policy: dict[str, Any], root: str | os.PathLike[str], *, hash_alg: str = "sha256",
             excludes: Iterable[str] = ()) -> int:
    """Add every regular file under ``root`` as ``/<path relative to root>`` with its digest.

    Paths matching an exclude regex (``re.match``, as the verifier applies them) are skipped, and
    the regexes are written to the policy's ``excludes`` so the verifier skips them too. Symlinks
    are not followed (the kernel measures the target under its own path). Returns files added.
    """
    _check_alg(hash_alg)
    pats = _compile(excludes)
    for rx in excludes:
        if rx not in policy["excludes"]:
            policy["excludes"].append(rx)
    base = Path(root)
    if not base.is_dir():
        raise PolicyToolError(f"--root {base}: not a directory")
    count = 0
    for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
        rel_dir = Path(dirpath).relative_to(base)
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            ppath = "/" + (rel_dir / name).as_posix().removeprefix("./")
            if any(p.match(ppath) for p in pats) or path.is_symlink() or not path.is_file():
                continue
            try:
                digest = _file_digest(path, hash_alg)
            except OSError as exc:
                raise PolicyToolError(f"{path}: unreadable ({exc.strerror or exc})") from exc
            _add(policy["digests"], ppath, digest)
            count += 1
    return count


def add_ima_log(policy: dict[str, Any], text: str, *, keyrings: bool = True, ima_buf: bool = True,
                hash_alg: str | None = None) -> int:
    """Add what an IMA measurement list recorded: file digests (boot_aggregate included), and
    ima-buf entries: those carrying a key go to ``keyrings``, the others to ``ima-buf`` (the
    verifier tells them apart the same way). Violations (ToMToU) are not policy material.
    ``hash_alg`` keeps only digests of that algorithm (None: all). Returns entries used."""
    try:
        entries = ima.parse_list(text)
    except ProtocolError as exc:
        raise PolicyToolError(f"IMA log: {exc}") from exc
    used = 0
    for e in entries:
        if e.is_violation or (hash_alg is not None and e.digest_alg != hash_alg
                              and e.path != ima.BOOT_AGGREGATE_NAME):
            continue
        if e.template == "ima-buf":
            try:
                is_key = parse_ima_key(e.buf or b"") is not None
            except ProtocolError:
                is_key = True  # a key of an unsupported type: still a keyring entry
            if is_key and keyrings:
                _add(policy["keyrings"], e.path, e.digest.hex())
                used += 1
            elif not is_key and ima_buf:
                _add(policy["ima-buf"], e.path, e.digest.hex())
                used += 1
            continue
        _add(policy["digests"], e.path, e.digest.hex())
        used += 1
    # The template-hash column of this log tells which log_hash_alg the verifier must use.
    sizes = {len(e.template_hash) for e in entries if not e.is_violation}
    alg = {20: "sha1", 32: "sha256", 48: "sha384", 64: "sha512"}.get(next(iter(sizes))) if len(sizes) == 1 else None
    if alg is not None:
        policy["ima"]["log_hash_alg"] = alg
    return used


def add_allowlist(policy: dict[str, Any], text: str) -> int:
    """Add ``<hex digest> <path>`` lines (sha256sum output; blank lines and ``#`` comments skipped)."""
    count = 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        digest, _, path = line.partition(" ")
        path = path.strip().removeprefix("*")  # sha256sum's binary-mode marker
        if not path or not re.fullmatch(r"[0-9a-fA-F]{40,128}", digest) or len(digest) // 2 not in (20, 32, 48, 64):
            raise PolicyToolError(f"allowlist line {n}: expected '<hex digest> <path>'")
        _add(policy["digests"], path, digest.lower())
        count += 1
    return count


def add_verification_keys(policy: dict[str, Any], key_files: Iterable[bytes]) -> None:
    """Put IMA signature verification keys (certs/public keys, DER or PEM) into the policy."""
    pubkeys, keyids = [], []
    for data in key_files:
        try:
            key = parse_ima_key(data)
        except ProtocolError as exc:
            raise PolicyToolError(f"IMA verification key: {exc}") from exc
        if key is None:
            raise PolicyToolError("IMA verification key: not a certificate or public key")
        pubkeys.append(base64.b64encode(key.der).decode())
        keyids.append(key.keyid)
    if pubkeys:
        policy["verification-keys"] = json.dumps({"pubkeys": pubkeys, "keyids": keyids})


def validate(policy: dict[str, Any] | bytes | str) -> RuntimePolicy:
    """The verifier's parse of ``policy``; PolicyToolError naming the JSON path when it refuses."""
    raw = policy if isinstance(policy, bytes | str) else dumps(policy)
    try:
        return parse_policy(raw)
    except ProtocolError as exc:
        raise PolicyToolError(f"the policy is not valid: {exc}") from exc


def dumps(policy: dict[str, Any]) -> str:
    return json.dumps(policy)


def _check_alg(alg: str) -> None:
    if alg not in HASH_ALGS:
        raise PolicyToolError(f"hash algorithm {alg!r}: use one of {', '.join(HASH_ALGS)}")


def add_excludes(policy: dict[str, Any], excludes: Iterable[str]) -> None:
    _compile(excludes)
    for rx in excludes:
        if rx not in policy["excludes"]:
            policy["excludes"].append(rx)


def load_base(raw: bytes) -> dict[str, Any]:
    """An existing plain policy to extend; missing sections are filled in."""
    validate(raw)
    doc = json.loads(raw)
    base = empty_policy()
    for key, value in doc.items():
        if key == "meta":
            continue
        base[key] = value
    for section in ("digests", "keyrings", "ima-buf"):
        base[section] = {k: list(v) for k, v in (base.get(section) or {}).items()}
    base["excludes"] = list(base.get("excludes") or [])
    return base
