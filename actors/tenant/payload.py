"""Payload zips for the agent (extracted into its secure dir; ``autorun.sh`` is run once).

``make_payload(source, autorun=...)`` zips a file or a directory tree; ``add_files`` adds members
to an existing zip (the tenant puts ``RevocationNotifier-cert.crt`` there).
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

from keytrio.actors.tenant.errors import UsageError

AUTORUN = "autorun.sh"
REVOCATION_CERT = "RevocationNotifier-cert.crt"
_EXEC_MODE = 0o755
_FILE_MODE = 0o644


def _member(zf: zipfile.ZipFile, name: str, data: bytes, mode: int) -> None:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))  # reproducible bytes
    info.external_attr = (mode | 0o100000) << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    zf.writestr(info, data)


def make_payload(
    source: str | os.PathLike[str] | None = None,
    *,
    autorun: str | bytes | None = None,
    extra: Mapping[str, bytes | str] | None = None,
) -> bytes:
    """A zip of ``source`` (a file at the top level, or a directory's tree relative to it), plus
    ``autorun`` as ``autorun.sh`` (replacing one from ``source``) and ``extra`` members."""
    members: dict[str, tuple[bytes, int]] = {}
    if source is not None:
        root = Path(source)
        try:
            if root.is_dir():
                for path in sorted(root.rglob("*")):
                    if path.is_symlink():
                        raise UsageError(f"payload: symlinks are not packed ({path})")
                    if path.is_file():
                        mode = _EXEC_MODE if os.access(path, os.X_OK) else _FILE_MODE
                        members[path.relative_to(root).as_posix()] = (path.read_bytes(), mode)
            elif root.is_file():
                mode = _EXEC_MODE if os.access(root, os.X_OK) else _FILE_MODE
                members[root.name] = (root.read_bytes(), mode)
            else:
                raise UsageError(f"payload source {root} is neither a file nor a directory")
        except OSError as exc:
            raise UsageError(f"payload source {root} is unreadable: {exc}") from exc
    if autorun is not None:
        members[AUTORUN] = (_bytes(autorun), _EXEC_MODE)
    for name, data in (extra or {}).items():
        members[_safe_name(name)] = (_bytes(data), _FILE_MODE)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, (data, mode) in members.items():
            _member(zf, name, data, mode)
    return buf.getvalue()


def add_files(zip_bytes: bytes, files: Mapping[str, bytes | str]) -> bytes:
    """A copy of ``zip_bytes`` with ``files`` added (same-named members are replaced)."""
    try:
        with zipfile.ZipFile(io.BytesIO(zip_bytes)) as src:
            kept = [(info, src.read(info)) for info in src.infolist() if info.filename not in files]
    except (zipfile.BadZipFile, ValueError) as exc:
        raise UsageError(f"payload is not a zip file: {exc}") from exc
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for info, data in kept:
            zf.writestr(info, data)
        for name, data in files.items():
            _member(zf, _safe_name(name), _bytes(data), _FILE_MODE)
    return buf.getvalue()


def _bytes(data: bytes | str) -> bytes:
    return data.encode("utf-8") if isinstance(data, str) else bytes(data)


def _safe_name(name: str) -> str:
    parts = name.replace("\\", "/").split("/")
    if name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise UsageError(f"payload member name {name!r} is not a plain relative path")
    return name
