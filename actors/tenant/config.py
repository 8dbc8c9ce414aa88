"""The tenant's configuration: TOML ``[tenant]`` + ``KEYTRIO_TENANT_*`` (actors.common.config),
overridable by command-line flags. TLS file names are resolved against ``tls_dir`` (upstream's
``cv_ca`` layout, as ``keytrio ca init`` writes it); absolute names are used as they are."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keytrio.actors.common import config as cfg
from keytrio.actors.common.config import Config, Option

DEFAULT_TLS_DIR = "/var/lib/keytrio/cv_ca"

OPTIONS: tuple[Option, ...] = (
    Option("registrar_ip", "str", "127.0.0.1", "Registrar address (its HTTPS/mTLS API)."),
    Option("registrar_tls_port", "int", 8891, "Registrar HTTPS port.", minimum=1, maximum=65535),
    Option("verifier_ip", "str", "127.0.0.1", "Verifier address."),
    Option("verifier_port", "int", 8881, "Verifier HTTPS port.", minimum=1, maximum=65535),
    Option("tls_dir", "path", DEFAULT_TLS_DIR, "Directory of the TLS files below (keytrio ca's cv_ca layout)."),
    Option("client_cert", "path", "client-cert.crt", "Client certificate (PEM) for registrar, verifier and agents."),
    Option("client_key", "path", "client-private.pem", "Private key (PEM, unencrypted) of client_cert."),
    Option("trusted_server_ca", "list", ["cacert.crt"], "CA file(s) that issue the registrar's and verifier's certs."),
    Option("revocation_key", "path", "RevocationNotifier-private.pem",
           "Revocation notifier private key sent to the verifier (used when the file exists)."),
    Option("revocation_cert", "path", "RevocationNotifier-cert.crt",
           "Revocation notifier certificate put into each payload (used when the file exists)."),
    Option("require_ek_cert", "bool", True, "Check the agent's EK certificate against tpm_cert_store on add."),
    Option("tpm_cert_store", "path", None,
           "TPM vendor CA certificates, roots and intermediates (file or directory): the EK cert must chain to them."),
    Option("accept_tpm_hash_algs", "list", ["sha512", "sha384", "sha256"], "Accepted quote hash algorithms."),
    Option("accept_tpm_encryption_algs", "list", ["ecc", "rsa"], "Accepted TPM encryption algorithms."),
    Option("accept_tpm_signing_algs", "list", ["ecschnorr", "rsassa"], "Accepted quote signing algorithms."),
    Option("request_timeout", "float", 60.0, "Timeout in seconds of one request.", minimum=0.1),
    Option("wait_timeout", "float", 60.0, "Seconds add waits for the verifier's Get Quote state.", minimum=0.1),
)


def load(path: Path | None = None, *, env: Mapping[str, str] | None = None,
         overrides: Mapping[str, Any] | None = None) -> Config:
    """Defaults < file < environment < ``overrides``; raises actors.common.config.ConfigError."""
    return cfg.load("tenant", OPTIONS, path, env=env, overrides=overrides)


def default_config() -> str:
    return cfg.default_config_text("tenant", OPTIONS, "the tenant command line")


@dataclass(frozen=True)
class TlsFiles:
    ca_files: list[Path]
    client_cert: Path
    client_key: Path
    revocation_key: Path | None  # None when the file is absent
    revocation_cert: Path | None


def tls_files(c: Config) -> TlsFiles:
    base = Path(c.tls_dir)
    existing = [base / c.revocation_key, base / c.revocation_cert]
    return TlsFiles(
        ca_files=[base / p for p in c.trusted_server_ca],
        client_cert=base / c.client_cert,
        client_key=base / c.client_key,
        revocation_key=existing[0] if existing[0].is_file() else None,
        revocation_cert=existing[1] if existing[1].is_file() else None,
    )


def split_hostport(text: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port); ValueError with a readable reason."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isascii() or not port.isdigit() or len(port) > 5 or not 0 < int(port) < 65536:
        raise ValueError(f"{what} {text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)
