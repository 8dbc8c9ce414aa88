"""The registrar's configuration options (keys as upstream Keylime's where the concept is shared).

File names of the TLS material are resolved against ``tls_dir`` (default ``<data_dir>/cv_ca``,
upstream's CA directory layout); absolute paths are used as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from keytrio.actors.common.bodylimit import DEFAULT_MAX_UPLOAD_SIZE
from keytrio.actors.common.config import ActorOptions, Config, Option
from keytrio.actors.common.server_options import (
    PathChecks,
    ServerSettings,
    is_dir,
    service_options,
    storage_options,
    tls_server_options,
)

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


@dataclass(frozen=True, kw_only=True)
class Settings(ServerSettings):
    """The options with every path resolved: what the actor actually uses."""

    tpm_cert_store: Path | None


SPEC = ActorOptions(ACTOR, OPTIONS, "registration and credential activation of agents")
#: defaults < TOML file < ``KEYTRIO_REGISTRAR_*`` environment < ``overrides``
load_config = SPEC.load
#: the commented default configuration (``keytrio registrar --print-default-config``)
default_config = SPEC.default_text


def resolve(config: Config) -> Settings:
    """Resolve paths and cross-check options; raises ConfigError listing every problem."""
    check = PathChecks(config)
    server_cert, server_key = check.file("server_cert"), check.file("server_key")
    cas = check.cas("trusted_client_ca", "for the HTTPS API")
    crl = check.crl()
    store = Path(config.tpm_cert_store) if config.tpm_cert_store is not None else None
    if store is not None and not is_dir(store):
        check.problems.append(f"tpm_cert_store: no such directory {store}")
    if config.require_ek_cert and store is None:
        check.problems.append("require_ek_cert needs tpm_cert_store (the TPM vendor CAs)")
    check.raise_problems()
    return Settings(
        config=config, database_url=check.database_url(ACTOR), data_dir=check.data_dir, server_cert=server_cert,
        server_key=server_key, trusted_client_ca=cas, tpm_cert_store=store, crl=crl,
    )
