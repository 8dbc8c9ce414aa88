"""A provisioned swtpm state directory: manufacturing it (EKs and EK certificates from a private
local CA), reading what it was made with, and copying it. Synchronous: the async API calls it from
a thread, CLI code directly. Running swtpm on a state is :mod:`testbed.swtpm`.

Layout of a state directory ``D`` (everything stays under ``D``; nothing in /etc or /var/lib):

    D/keytrio-swtpm.json   banks + where the local CA lives (written last: marks "provisioned")
    D/tpm/                 swtpm's TPM state (tpm2-00.permall)
    D/localca/             the private swtpm-localca CA (unless ``ca_dir`` points elsewhere)
    D/ek-certs/            copies of the EK certificates (DER) written by swtpm_setup
    D/swtpm_setup.conf     private swtpm_setup configuration
    D/setup.log, D/swtpm.log
    D/swtpm.sock, D/swtpm.sock.ctrl   unix transport (or a short /tmp dir when D's path is too long)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from keytrio.actors.common.private_files import private_dir

DEFAULT_BANKS: tuple[str, ...] = ("sha1", "sha256", "sha384")
KNOWN_BANKS = ("sha1", "sha256", "sha384", "sha512")

_META = "keytrio-swtpm.json"
#: files of a running swtpm in the state dir (a detached one's endpoint and pid): never copied
RUN_INFO = "swtpm.run.json"
PID_FILE = "swtpm.pid"


class SwtpmError(RuntimeError):
    """swtpm could not be provisioned, started or stopped."""


def is_provisioned(state_dir: Path) -> bool:
    state_dir = Path(state_dir)
    return (state_dir / _META).is_file() and (state_dir / "tpm" / "tpm2-00.permall").is_file()


def _check_banks(banks: Sequence[str]) -> tuple[str, ...]:
    out = tuple(b.lower() for b in banks)
    if not out or any(b not in KNOWN_BANKS for b in out):
        raise SwtpmError(f"unsupported PCR banks {banks!r}; choose from {KNOWN_BANKS}")
    return out


def init_local_ca(ca_dir: Path) -> Path:
    """Write the private swtpm-localca configuration into ``ca_dir``; return the .conf path.

    The CA key and certificates are created by swtpm_localca on first use (lazily, under its lock),
    so several TPMs provisioned against one ``ca_dir`` share one CA.
    """
    ca_dir = Path(ca_dir).resolve()
    private_dir(ca_dir)  # swtpm_localca writes the EK CA's signing key here
    conf = ca_dir / "swtpm-localca.conf"
    if not conf.exists():
        conf.write_text(
            f"statedir = {ca_dir}\n"
            f"signingkey = {ca_dir / 'signkey.pem'}\n"
            f"issuercert = {ca_dir / 'issuercert.pem'}\n"
            f"certserial = {ca_dir / 'certserial'}\n"
        )
    opts = ca_dir / "swtpm-localca.options"
    if not opts.exists():
        opts.write_text("--platform-manufacturer keytrio\n--platform-version 2.1\n--platform-model swtpm\n")
    return conf


def provision(
    state_dir: Path,
    *,
    banks: Sequence[str] = DEFAULT_BANKS,
    ca_dir: Path | None = None,
    platform_cert: bool = True,
) -> None:
    """Manufacture a TPM 2.0 state in ``state_dir`` (idempotent: does nothing if already provisioned).

    Creates the RSA-2048 EK (persistent 0x81010001, cert at NV 0x01c00002) and the ECC P-384 EK
    (persistent 0x81010016, cert at NV 0x01c00016), certificates signed by a private local CA in
    ``ca_dir`` (default ``state_dir/localca``), and activates exactly ``banks``.
    """
    state_dir = Path(state_dir).resolve()
    banks = _check_banks(banks)
    if is_provisioned(state_dir):
        return
    if shutil.which("swtpm_setup") is None or shutil.which("swtpm") is None:
        raise SwtpmError("swtpm / swtpm_setup not found (apt-get install swtpm swtpm-tools)")
    ca_dir = Path(ca_dir).resolve() if ca_dir is not None else state_dir / "localca"
    tpm_dir = state_dir / "tpm"
    certs_dir = state_dir / "ek-certs"
    certs_dir.mkdir(parents=True, exist_ok=True)
    private_dir(tpm_dir)  # the TPM's seeds and keys
    setup_conf = _write_setup_conf(state_dir, ca_dir, banks)
    log = state_dir / "setup.log"
    cmd = [
        "swtpm_setup", "--tpm2", "--tpmstate", str(tpm_dir),
        "--pcr-banks", ",".join(banks),
        "--create-ek-cert",
        "--config", str(setup_conf),
        "--write-ek-cert-files", str(certs_dir),
        "--logfile", str(log),
        "--overwrite",
    ]  # fmt: skip
    if platform_cert:
        cmd.insert(cmd.index("--create-ek-cert") + 1, "--create-platform-cert")
    # XDG_CONFIG_HOME: keep swtpm_setup from looking at the user's ~/.config defaults.
    env = {**os.environ, "XDG_CONFIG_HOME": str(state_dir)}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=60)
    if res.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise SwtpmError(f"swtpm_setup failed ({res.returncode}): {res.stderr.strip()}\n{tail}")
    for key in ca_dir.glob("*key*.pem"):  # swtpm_localca makes its CA keys 0640
        key.chmod(0o600)
    _write_meta(state_dir, banks, ca_dir)


def _write_setup_conf(state_dir: Path, ca_dir: Path, banks: Sequence[str]) -> Path:
    """A private swtpm_setup configuration: EK certificates from the local CA in ``ca_dir``."""
    ca_conf = init_local_ca(ca_dir)
    setup_conf = state_dir / "swtpm_setup.conf"
    setup_conf.write_text(
        f"create_certs_tool = {shutil.which('swtpm_localca') or '/usr/bin/swtpm_localca'}\n"
        f"create_certs_tool_config = {ca_conf}\n"
        f"create_certs_tool_options = {ca_dir / 'swtpm-localca.options'}\n"
        f"active_pcr_banks = {','.join(banks)}\n"
    )
    return setup_conf


def _write_meta(state_dir: Path, banks: Sequence[str], ca_dir: Path) -> None:
    """Written last (atomically): its presence marks the state as provisioned."""
    meta = {
        "banks": list(banks),
        # relative when inside the state dir, so a copied state dir stays self-contained
        "ca_dir": _rel_or_abs(ca_dir, state_dir),
    }
    tmp = state_dir / (_META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(state_dir / _META)


def _rel_or_abs(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


def _meta(state_dir: Path) -> dict:
    state_dir = Path(state_dir)
    try:
        return json.loads((state_dir / _META).read_text())
    except FileNotFoundError:
        raise SwtpmError(f"{state_dir} is not a provisioned swtpm state dir") from None


def state_banks(state_dir: Path) -> tuple[str, ...]:
    """The PCR banks a provisioned state was manufactured with."""
    return tuple(_meta(state_dir)["banks"])


def ca_dir_of(state_dir: Path) -> Path:
    state_dir = Path(state_dir).resolve()
    return (state_dir / _meta(state_dir)["ca_dir"]).resolve()


def local_ca_certs(ca_dir: Path) -> list[Path]:
    """PEM files of an swtpm-localca's chain that exist: [issuer (intermediate) cert, root CA cert]."""
    out = [Path(ca_dir) / "issuercert.pem", Path(ca_dir) / "swtpm-localca-rootca-cert.pem"]
    return [p for p in out if p.is_file()]


def ek_ca_certs(state_dir: Path) -> list[Path]:
    """PEM files of the EK certificates' issuer chain: [local CA issuer cert, local root CA cert]."""
    return local_ca_certs(ca_dir_of(state_dir))


def ek_cert_files(state_dir: Path) -> dict[str, Path]:
    """DER copies of the EK certs that swtpm_setup wrote: keys ``rsa2048`` and ``ecc384``."""
    d = Path(state_dir) / "ek-certs"
    out = {}
    for key, name in (("rsa2048", "ek-rsa2048.crt"), ("ecc384", "ek-secp384r1.crt")):
        if (d / name).is_file():
            out[key] = d / name
    return out


def copy_state(src: Path, dst: Path) -> None:
    """Copy a provisioned (not running) state dir: a clone with the SAME EKs, for fast tests."""
    src, dst = Path(src).resolve(), Path(dst).resolve()
    if not is_provisioned(src):
        raise SwtpmError(f"{src} is not provisioned")
    transient = {"swtpm.log", PID_FILE, RUN_INFO, "swtpm.sock", "swtpm.sock.ctrl", ".lock"}
    # A CA inside src is copied along (its path is stored relative); an outside CA is shared.
    shutil.copytree(src, dst, dirs_exist_ok=True, ignore=lambda _d, names: [n for n in names if n in transient])
