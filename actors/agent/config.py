"""The agent's configuration options (key names as upstream Keylime's agent where shared)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from keytrio.actors.agent import push_config
from keytrio.actors.common import config as cfg
from keytrio.actors.common.config import Config, ConfigError, Option
from keytrio.protocol import validation
from keytrio.protocol.errors import ValidationError

ACTOR = "agent"
#: default port of the /metrics + /health listener (the API port 9002 + 1)
METRICS_PORT = 9003

DEFAULT_SECURE_SIZE = "1m"


def _check_secure_size(value: str) -> str | None:
    try:
        parse_size(value)
    except ValueError as exc:
        return str(exc)
    return None


def parse_size(text: str) -> int:
    """``"1m"``/``"512k"``/``"4096"`` (tmpfs ``size=`` syntax) -> bytes."""
    t = text.strip().lower()
    factor = 1
    if t and t[-1] in "kmg":
        factor = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[t[-1]]
        t = t[:-1]
    if not t.isascii() or not t.isdigit() or len(t) > 20 or int(t) <= 0:
        raise ValueError(f"bad size {text!r}: expected a positive number with an optional k/m/g suffix")
    return int(t) * factor


def _check_uuid(value: str) -> str | None:
    if value in ("generate", "hash_ek"):
        return None
    try:
        validation.agent_id(value, "uuid")
    except ValidationError as exc:
        return f"must be generate, hash_ek or an agent id ({exc.reason})"
    return None


def _check_ek_handle(value: object) -> str | None:
    if value == "generate" or (isinstance(value, int) and 0x81000000 <= value <= 0x81FFFFFF):
        return None
    return "must be 'generate' or a persistent handle 0x81000000-0x81FFFFFF"


OPTIONS: tuple[Option, ...] = (
    Option("uuid", "str", "generate",
           "Agent id: 'generate' (a random UUID kept in data_dir), 'hash_ek' (SHA-256 hex of the\n"
           "EK public key's SubjectPublicKeyInfo PEM text), or a literal id.", check=_check_uuid),
    Option("ip", "str", "127.0.0.1", "Address the agent's HTTPS server binds."),
    Option("port", "int", 9002, "Port the agent's HTTPS server binds (0: any free port).", minimum=0, maximum=65535),
    Option("contact_ip", "str", None, "Address registered with the registrar (default: ip)."),
    Option("contact_port", "int", None,
           "Port registered with the registrar (default: the bound port).", minimum=1, maximum=65535),
    Option("registrar_ip", "str", None, "Registrar address; unset = do not register (tests, --no-registrar)."),
    Option("registrar_port", "int", 8890, "Registrar plain-HTTP (agent) port.", minimum=1, maximum=65535),
    Option("retry_interval", "float", 2.0, "Seconds between registration attempts.", minimum=0),
    Option("max_retries", "int", 30, "Registration retries while the registrar is unreachable.", minimum=0),
    Option("exponential_backoff", "bool", False, "Registration backoff: retry_interval ** attempt."),
    Option("tcti", "str", "device:/dev/tpmrm0", "TPM TCTI (e.g. device:/dev/tpmrm0, swtpm:path=/x/swtpm.sock)."),
    Option("ek_handle", "int_or_str", "generate",
           "'generate' (create the EK from the default template) or a persistent handle (0x81...).",
           check=_check_ek_handle),
    Option("tpm_ownerpassword", "str", "", "Owner hierarchy password (empty: none)."),
    Option("tpm_hash_alg", "choice", "sha256", "PCR bank and quote signature hash.",
           choices=("sha1", "sha256", "sha384", "sha512")),
    Option("tpm_signing_alg", "choice", "rsassa", "AK signing scheme.", choices=("rsassa", "ecdsa")),
    Option("tpm_encryption_alg", "choice", "rsa", "EK/AK key type.", choices=("rsa", "ecc")),
    Option("trusted_client_ca", "list", [],
           "PEM files of the CA(s) whose client certs may connect (required in pull mode)."),
    Option("require_client_eku", "bool", False,
           "Refuse client certs without an extended key usage too (those whose EKU lacks clientAuth\n"
           "are always refused). Upstream's cv_ca issues certs without one: see docs/compatibility.md."),
    Option("data_dir", "path", "/var/lib/keytrio/agent",
           "Persistent agent state: uuid, AK blobs, NK key and mTLS cert, seen revocation ids."),
    Option("ima_ml_path", "path", "/sys/kernel/security/ima/ascii_runtime_measurements",
           "IMA measurement list."),
    Option("measuredboot_ml_path", "path", "/sys/kernel/security/tpm0/binary_bios_measurements",
           "UEFI event log."),
    Option("boottime_source", "path", "/proc/stat",
           "Boot time: /proc/stat (its btime line) or a file holding an integer epoch."),
    Option("revocation_actions_dir", "path", None, "Directory of executables run on a revocation notice."),
    Option("revocation_cert", "path", None,
           "PEM cert verifying revocation notices (used until a payload delivers RevocationNotifier-cert.crt)."),
    Option("secure_dir", "path", None, "Where payloads are unpacked (default: <data_dir>/secure)."),
    Option("secure_size", "str", DEFAULT_SECURE_SIZE, "tmpfs size of secure_dir (when mounted).",
           check=_check_secure_size),
    Option("secure_mount", "choice", "auto",
           "Mount a tmpfs on secure_dir: auto (when root), always, never.", choices=("auto", "always", "never")),
    Option("enable_autorun", "bool", True, "Run autorun.sh from an unpacked payload."),
    Option("run_as", "str", None, "user:group to run payload scripts and actions as (when root)."),
    Option("max_upload_size", "int", 1 << 20, "Request body limit in bytes.", minimum=1024),
    Option("action_timeout", "float", 60.0, "Seconds a payload script or revocation action may run.", minimum=1),
    Option("keep_alive_timeout", "float", 30.0,
           "Seconds an idle HTTPS connection stays open. A verifier keeps one connection per agent\n"
           "across polls: above its quote_interval, a quote costs no TLS handshake on either side.",
           minimum=1.0),
    Option("crl", "path", None,
           "CRL (PEM, e.g. the CA's cacrl.pem) checked for client certificates (tenant, verifier);\n"
           "empty = none. Re-read when the file\n"
           "changes (checked at most once a second, on a new connection): no restart needed."),
    Option("metrics_ip", "str", "127.0.0.1", "Address of the plain-HTTP /metrics + /health listener."),
    Option("metrics_port", "int", METRICS_PORT,
           f"Port of the plain-HTTP /metrics + /health listener (default {METRICS_PORT});\n"
           "0 = any free port (logged at start), a negative value disables the listener.", maximum=65535),
    *push_config.OPTIONS,
)


def load(path: Path | None = None, *, env: Mapping[str, str] | None = None,
         overrides: Mapping[str, Any] | None = None) -> Config:
    """Load and validate the agent configuration (TOML ``[agent]`` table + KEYTRIO_AGENT_*)."""
    config = cfg.load(ACTOR, OPTIONS, path, env=env, overrides=overrides)
    if problems := push_config.problems(dict(config)):
        raise ConfigError(problems)
    return config


def default_text() -> str:
    return cfg.default_config_text(ACTOR, OPTIONS, "the attested machine's agent")
