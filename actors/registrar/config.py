"""The registrar's configuration options (keys as upstream Keylime's where the concept is shared).

File names of the TLS material are resolved against ``tls_dir`` (default ``<data_dir>/cv_ca``,
upstream's CA directory layout); absolute paths are used as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keytrio.actors.common.config import Config, ConfigError, Option, default_config_text, load
from keytrio.actors.common.serve import DEFAULT_MAX_UPLOAD_SIZE
from keytrio.actors.common.server_options import (
    service_options,
    storage_options,
    tls_path_resolver,
    tls_server_options,
)
from keytrio.actors.common.store import sqlite_url
from keytrio.actors.common.tls import private_key_problem

ACTOR = "registrar"
#: default port of the /metrics + /health listener
METRICS_PORT = 8892
#: the options naming TLS files (checked readable before anything starts)
TLS_OPTIONS = ("server_cert", "server_key", "trusted_client_ca", "crl")




OPTIONS: tuple[Option, ...] = (
    Option("ip", "str", "127.0.0.1", "Address both listeners bind to."),
    Option(
        "port",
        "int",
        8890,
        "Plain-HTTP port for agents (register, activate); 0 = any free port.",
        minimum=0,
        maximum=65535,
    ),
    Option(
        "tls_port",
        "int",
        8891,
        "HTTPS port for tenants and verifiers (mTLS); 0 = any free port.",
        minimum=0,
        maximum=65535,
    ),
    *storage_options(ACTOR),
    *tls_server_options(),
    Option(
        "max_upload_size",
        "int",
        DEFAULT_MAX_UPLOAD_SIZE,
        "Largest accepted request body in bytes (larger ones get 413).",
        minimum=1024,
    ),
    Option(
        "require_ek_cert",
        "bool",
        False,
        "Refuse registrations without an EK certificate that chains to a CA in tpm_cert_store.",
    ),
    Option(
        "tpm_cert_store",
        "path",
        None,
        "Directory of TPM manufacturer CA certificates (PEM or DER files) for EK cert chains.",
    ),
    Option(
        "activation_timeout",
        "float",
        300.0,
        "Seconds a registration may stay unactivated; then it is dropped (a re-registration of an\n"
        "already active agent is rolled back instead).",
        minimum=0.05,
    ),
    *service_options(METRICS_PORT),
)


@dataclass(frozen=True)
class Settings:
    """The options with every path resolved: what the actor actually uses."""

    config: Config
    database_url: str
    data_dir: Path
    server_cert: Path
    server_key: Path
    trusted_client_ca: tuple[Path, ...]
    tpm_cert_store: Path | None
    crl: Path | None = None


def load_config(
    path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Defaults < TOML file < ``KEYTRIO_REGISTRAR_*`` environment < ``overrides``."""
    return load(ACTOR, OPTIONS, path, env=env, overrides=overrides)


def default_config() -> str:
    """The commented default configuration (``keytrio registrar --print-default-config``)."""
    return default_config_text(ACTOR, OPTIONS, "registration and credential activation of agents")


def resolve(config: Config) -> Settings:
    """Resolve paths and cross-check options; raises ConfigError listing every problem."""
    data_dir = Path(config.data_dir)
    in_tls_dir = tls_path_resolver(config)

    problems: list[str] = []
    server_cert = in_tls_dir(config.server_cert)
    server_key = in_tls_dir(config.server_key)
    cas = tuple(in_tls_dir(p) for p in config.trusted_client_ca)
    for name, p in (("server_cert", server_cert), ("server_key", server_key)):
        if not p.is_file():
            problems.append(f"{name}: no such file {p}")
    if (exposed := private_key_problem(server_key)) is not None:
        problems.append(f"server_key: {exposed}")
    if not cas:
        problems.append("trusted_client_ca: at least one CA is needed for the HTTPS API")
    for p in cas:
        if not p.is_file():
            problems.append(f"trusted_client_ca: no such file {p}")
    crl = in_tls_dir(config.crl) if config.crl else None
    if crl is not None and not crl.is_file():
        problems.append(f"crl: no such file {crl}")
    store = Path(config.tpm_cert_store) if config.tpm_cert_store is not None else None
    if store is not None and not store.is_dir():
        problems.append(f"tpm_cert_store: no such directory {store}")
    if config.require_ek_cert and store is None:
        problems.append("require_ek_cert needs tpm_cert_store (the TPM vendor CAs)")
    if problems:
        raise ConfigError(problems)
    url = config.database_url or sqlite_url(data_dir / "registrar.sqlite")
    return Settings(config, url, data_dir, server_cert, server_key, cas, store, crl)
