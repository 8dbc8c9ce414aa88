"""The secure directory where payloads are unpacked, and safe zip extraction into it.

A tmpfs is mounted on it when configured (``secure_mount = always``, or ``auto`` when running as
root); otherwise, or when ``auto`` cannot mount (an unprivileged container), it is a plain 0700
directory. A tmpfs we mounted is unmounted at shutdown, so decrypted payloads do not outlive the
agent on disk.

Extraction never writes outside the target: absolute names, ``..`` components, symlinks, device
entries and archives bigger than the directory's size limit are refused before anything is
written (everything is extracted into a staging directory that replaces ``unzipped`` at the end).
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import stat
import subprocess
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from keytrio.actors.common.private_files import private_dir

log = logging.getLogger("keytrio.agent")

UNZIPPED = "unzipped"
DECRYPTED = "decrypted_payload"
MAX_ENTRIES = 4096


class UnsafeArchive(ValueError):
    """The payload zip would write outside the secure dir, or is too large."""


class SecureDir:
    def __init__(self, path: Path, *, size: int, mount: str) -> None:
        self.path = path
        self.size = size
        self.mount_mode = mount  # auto | always | never
        self.mounted = False

    @property
    def unzipped(self) -> Path:
        return self.path / UNZIPPED

    def prepare(self) -> None:
        """Create (and maybe mount) the directory. Blocking: call in a thread."""
        private_dir(self.path)
        want = self.mount_mode == "always" or (self.mount_mode == "auto" and os.geteuid() == 0)
        if not want or os.path.ismount(self.path):
            return
        cmd = ["mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0700", "tmpfs", os.fspath(self.path)]
        proc = subprocess.run(cmd, capture_output=True, check=False)
        if proc.returncode == 0:
            self.mounted = True
            return
        reason = proc.stderr.decode("utf-8", "replace").strip()
        if self.mount_mode == "always":
            raise OSError(f"cannot mount a tmpfs on {self.path}: {reason}")
        log.warning("event=secure_dir_unmounted path=%s reason=%s (tmpfs mount failed; a 0700 directory is used)",
                    self.path, reason)

    def release(self) -> None:
        """Unmount the tmpfs if we mounted it. Blocking: call in a thread."""
        if self.mounted:
            subprocess.run(["umount", os.fspath(self.path)], capture_output=True, check=False)
            self.mounted = False

    def store(self, plaintext: bytes) -> Path | None:
        """Store a decrypted payload: a zip is extracted into ``unzipped`` (returned), anything
        else is written to ``decrypted_payload`` (returns None). Raises UnsafeArchive before
        writing anything when a zip is unsafe. Blocking: call in a thread."""
        if not _looks_like_zip(plaintext):
            _write_private(self.path / DECRYPTED, plaintext)
            return None
        try:
            zf = zipfile.ZipFile(io.BytesIO(plaintext))
        except zipfile.BadZipFile as exc:
            raise UnsafeArchive(f"payload is not a readable zip: {exc}") from exc
        with zf:
            members = _check_members(zf, self.size)
            staging = self.path / ".unzipped.staging"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(mode=0o700)
            os.chmod(staging, 0o700)
            try:
                for info, rel in members:
                    target = staging.joinpath(*rel.parts)
                    if info.is_dir():
                        private_dir(target)
                        continue
                    private_dir(target.parent)
                    mode = 0o700 if (info.external_attr >> 16) & 0o111 else 0o600
                    with zf.open(info) as src:
                        data = src.read(self.size + 1)
                    if len(data) > info.file_size or len(data) > self.size:
                        raise UnsafeArchive(f"{info.filename}: larger than declared")
                    _write_private(target, data, mode)
            except UnsafeArchive:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            # what a corrupt or exotic zip raises: CRC/format errors, encrypted or unsupported
            # compression, truncated streams
            except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError, EOFError, zlib.error) as exc:
                shutil.rmtree(staging, ignore_errors=True)
                raise UnsafeArchive(f"payload zip does not extract: {exc}") from exc
        shutil.rmtree(self.unzipped, ignore_errors=True)
        os.replace(staging, self.unzipped)
        return self.unzipped


def _looks_like_zip(data: bytes) -> bool:
    return data[:4] in (b"PK\x03\x04", b"PK\x05\x06")


def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # before the first byte: the umask or an older file may be wider
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _safe_relative(name: str) -> PurePosixPath | None:
    if not name or "\x00" in name or "\\" in name:
        return None
    p = PurePosixPath(name)
    if p.is_absolute() or any(part in ("..", "") for part in p.parts) or not p.parts:
        return None
    return p


def _check_members(zf: zipfile.ZipFile, limit: int) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    infos = zf.infolist()
    if len(infos) > MAX_ENTRIES:
        raise UnsafeArchive(f"payload zip has more than {MAX_ENTRIES} entries")
    total = 0
    out = []
    for info in infos:
        rel = _safe_relative(info.filename.rstrip("/") if info.is_dir() else info.filename)
        if rel is None:
            raise UnsafeArchive(f"payload zip entry {info.filename!r} is not a safe relative path")
        kind = stat.S_IFMT(info.external_attr >> 16)
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise UnsafeArchive(f"payload zip entry {info.filename!r} is not a regular file or directory")
        total += info.file_size
        if total > limit:
            raise UnsafeArchive(f"payload zip unpacks to more than {limit} bytes")
        out.append((info, rel))
    return out
