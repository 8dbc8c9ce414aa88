"""Configuration options that the server actors (registrar, verifier) share: storage, TLS, service."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keytrio.actors.common.config import Config, ConfigError, Option
from keytrio.actors.common.store import parse_pool, sqlite_file, sqlite_url
from keytrio.actors.common.tls import private_key_problem


def _database_url(value: str) -> str | None:
    if value and "://" not in value:
        return "must be empty (SQLite in data_dir) or a URL like sqlite:///path or postgresql://…"
    if value.startswith("sqlite") and _in_memory(value):
        return ("an in-memory SQLite database loses every agent and record at each restart: give a file "
                "(sqlite:////absolute/path) or leave it empty (SQLite in data_dir)")
    return None


def _in_memory(url: str) -> bool:
    try:
        return sqlite_file(url) is None
    except Exception:  # unparsable: reported when the database is opened, with the driver's words
        return False


def _pool(value: str) -> str | None:
    try:
        parse_pool(value)
    except ValueError as exc:
        return str(exc)
    return None


def storage_options(actor: str) -> tuple[Option, ...]:
    """data_dir, database_url, database_pool_sz_ovfl, auto_migrate_db."""
    return (
        Option(
            "data_dir",
            "path",
            f"/var/lib/keytrio/{actor}",
            f"Directory of the default SQLite database ({actor}.sqlite) and of the default tls_dir.",
        ),
        Option(
            "database_url",
            "str",
            "",
            f"SQLAlchemy URL of the database; empty = sqlite:///<data_dir>/{actor}.sqlite (in-memory\n"
            "SQLite is refused: a restart would lose everything). PostgreSQL:\n"
            "postgresql+psycopg://user:password@host/db",
            check=_database_url,
        ),
        Option(
            "database_pool_sz_ovfl",
            "str",
            "5,10",
            "PostgreSQL connection pool: \"<pool size>,<max overflow>\" (at most their sum connections;\n"
            "SQLite uses one writer connection at a time).",
            check=_pool,
        ),
        Option(
            "auto_migrate_db",
            "bool",
            True,
            f"Upgrade the database schema at start (else `keytrio {actor} db upgrade --config FILE`\n"
            "must have been run; the actor refuses to start on an older schema).",
        ),
    )


def tls_server_options() -> tuple[Option, ...]:
    """tls_dir, server_cert, server_key, trusted_client_ca (file names relative to tls_dir), require_client_eku."""
    return (
        Option("tls_dir", "path", None, "Directory of the TLS files below; empty = <data_dir>/cv_ca."),
        Option("server_cert", "path", "server-cert.crt", "Server certificate (PEM) of the HTTPS listener."),
        Option("server_key", "path", "server-private.pem", "Private key (PEM, unencrypted) of server_cert."),
        Option(
            "trusted_client_ca",
            "list",
            ["cacert.crt"],
            "CA certificates (PEM files) whose client certificates may use the HTTPS API.",
        ),
        Option(
            "require_client_eku",
            "bool",
            False,
            "Refuse client certificates without an extended key usage too (those whose EKU lacks\n"
            "clientAuth are always refused). Upstream's cv_ca issues certificates without one,\n"
            "its revocation notifier's too: see docs/compatibility.md before turning this on.",
        ),
    )


def tls_path_resolver(config: Config) -> Callable[[Any], Path]:
    """Resolves TLS file names against ``tls_dir`` (default ``<data_dir>/cv_ca``); absolute paths stay."""
    tls_dir = Path(config.tls_dir) if config.tls_dir is not None else Path(config.data_dir) / "cv_ca"

    def in_tls_dir(p: Any) -> Path:
        p = Path(p)
        return p if p.is_absolute() else tls_dir / p

    return in_tls_dir


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """The options with every path resolved: what a server actor actually uses (each actor's
    ``Settings`` adds its own)."""

    config: Config
    database_url: str
    data_dir: Path
    server_cert: Path
    server_key: Path
    trusted_client_ca: tuple[Path, ...]
    crl: Path | None = None


def is_file(path: Path) -> bool:
    """``path.is_file()``, False where that raises (a name too long for the file system, ...):
    for a configuration that is "no such file", not a traceback."""
    try:
        return path.is_file()
    except OSError:
        return False


def is_dir(path: Path) -> bool:
    """``path.is_dir()``, False where that raises (as :func:`is_file`)."""
    try:
        return path.is_dir()
    except OSError:
        return False


class PathChecks:
    """Resolves a server's file options (TLS ones against ``tls_dir``) and collects every problem,
    so that one ConfigError lists them all (:meth:`raise_problems`)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.data_dir = Path(config.data_dir)
        self.in_tls_dir = tls_path_resolver(config)
        self.problems: list[str] = []

    def file(self, name: str) -> Path:
        """The TLS file of option ``name``: it must exist; a ``*_key`` must be private too."""
        path = self.in_tls_dir(self.config[name])
        if not is_file(path):
            self.problems.append(f"{name}: no such file {path}")
        elif name.endswith("_key") and (exposed := private_key_problem(path)) is not None:
            self.problems.append(f"{name}: {exposed}")
        return path

    def cas(self, name: str, purpose: str = "") -> tuple[Path, ...]:
        """The CA files of list option ``name``: at least one (needed ``purpose``), each existing."""
        paths = tuple(self.in_tls_dir(p) for p in self.config[name])
        if not paths:
            self.problems.append(f"{name}: at least one CA is needed" + (f" {purpose}" if purpose else ""))
        for p in paths:
            if not is_file(p):
                self.problems.append(f"{name}: no such file {p}")
        return paths

    def crl(self) -> Path | None:
        crl = self.in_tls_dir(self.config.crl) if self.config.crl else None
        if crl is not None and not is_file(crl):
            self.problems.append(f"crl: no such file {crl}")
        return crl

    def database_url(self, actor: str) -> str:
        """``database_url``, or SQLite ``<data_dir>/<actor>.sqlite`` when empty."""
        return self.config.database_url or sqlite_url(self.data_dir / f"{actor}.sqlite")

    def raise_problems(self) -> None:
        if self.problems:
            raise ConfigError(self.problems)


def tls_files(config: Config, names: tuple[str, ...]) -> list[tuple[str, Path]]:
    """(option, resolved path) of every TLS file the options ``names`` configure (unset ones skipped)."""
    in_tls_dir = tls_path_resolver(config)
    out: list[tuple[str, Path]] = []
    for name in names:
        value = config[name]
        for item in value if isinstance(value, list) else [value]:
            if item is not None and str(item):
                out.append((name, in_tls_dir(item)))
    return out


def service_options(metrics_port: int) -> tuple[Option, ...]:
    """graceful_timeout, the /metrics + /health listener (default port ``metrics_port``) and the CRL:
    the end of both tables."""
    return (
        Option(
            "graceful_timeout", "float", 3.0, "Seconds in-flight requests get to finish at shutdown.", minimum=0.0
        ),
        Option("metrics_ip", "str", "127.0.0.1", "Address of the plain-HTTP /metrics + /health listener."),
        metrics_port_option(metrics_port),
        Option("crl", "path", None,
               "CRL (PEM, `keytrio ca revoke` writes cacrl.pem) checked for client certificates of the\n"
               "HTTPS API; empty = none. Re-read when the file\n"
               "changes (checked at most once a second, on a new connection): no restart needed."),
    )


def metrics_port_option(default: int) -> Option:
    """``metrics_port``: a fixed documented default per actor (README "Ports")."""
    return Option("metrics_port", "int", default,
                  f"Port of the plain-HTTP /metrics + /health listener (default {default});\n"
                  "0 = any free port (logged at start), a negative value disables the listener.",
                  maximum=65535)
