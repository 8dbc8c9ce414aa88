"""The verifier's configuration options (keys as upstream Keylime's where the concept is shared).

File names of the TLS material are resolved against ``tls_dir`` (default ``<data_dir>/cv_ca``,
upstream's CA directory layout); absolute paths are used as they are.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from keytrio.actors.common.bodylimit import DEFAULT_MAX_UPLOAD_SIZE
from keytrio.actors.common.config import AUTO, ActorOptions, Config, Option
from keytrio.actors.common.server_options import (
    PathChecks,
    ServerSettings,
    service_options,
    storage_options,
    tls_server_options,
)

ACTOR = "verifier"
#: default port of the /metrics + /health listener
METRICS_PORT = 8882
#: the options naming TLS files (checked readable before anything starts)
TLS_OPTIONS = (
    "server_cert", "server_key", "client_cert", "client_key", "trusted_client_ca", "trusted_server_ca", "crl",
)

#: 100,000 ima-ng lines of ~210 bytes (sha256 digests, 86-byte mean path) plus a runtime policy
DEFAULT_MAX_EVIDENCE_SIZE = 64 << 20
DEFAULT_MAX_POLICY_SIZE = 32 << 20
#: the longest commit_linger / push_commit_linger accepted (seconds): beyond, a setting is a mistake
MAX_COMMIT_LINGER = 10.0


def _verifier_id(value: str) -> str | None:
    if not value or len(value) > 255:
        return "must be 1-255 characters"
    return None


OPTIONS: tuple[Option, ...] = (
    Option("ip", "str", "127.0.0.1", "Address the HTTPS listener binds to."),
    Option("port", "int", 8881, "HTTPS port (mTLS); 0 = any free port.", minimum=0, maximum=65535),
    *storage_options(ACTOR),
    *tls_server_options(),
    Option(
        "trusted_server_ca",
        "list",
        ["cacert.crt"],
        "CA certificates (PEM files) trusted when talking to agents (plus each agent's mtls_cert).",
    ),
    Option("client_cert", "path", "client-cert.crt", "Client certificate (PEM) presented to agents."),
    Option("client_key", "path", "client-private.pem", "Private key (PEM, unencrypted) of client_cert."),
    Option("verifier_id", "str", "default", "Name of this verifier (agents are listed per verifier).",
           check=_verifier_id),
    Option("quote_interval", "float", 2.0, "Seconds between two quotes of one agent.", minimum=0.0),
    Option("cluster", "bool", False,
           "Share the agents of verifier_id with the other verifiers of that verifier_id on the same\n"
           "PostgreSQL by leases (failover, fair share; docs/architecture.md). Off: this verifier\n"
           "monitors every agent of its verifier_id (SQLite or PostgreSQL).", ),
    Option("workers", "int", 0,
           "Processes of `keytrio verifier` (docs/architecture.md \"Workers\"): N > 1 runs N worker\n"
           "processes that share the one API port (a socket bound once, inherited by each) and split\n"
           "the agents of verifier_id by cluster leases (pull and push agents). PostgreSQL only.\n"
           "0 = auto: the number of cores with a PostgreSQL database_url and mode = pull, else 1\n"
           "(push: set N yourself); SQLite stays one process (one writer per file). Worker i serves\n"
           "/metrics on metrics_port + i.",
           minimum=0, maximum=256),
    Option("lease_ttl", "float", 15.0,
           "cluster: seconds an agent lease lasts unrenewed; a dead verifier's agents are polled again\n"
           "by the others within lease_ttl + quote_interval. Renewed every min(lease_ttl / 3,\n"
           "quote_interval); polling stops lease_ttl / 5 before expiry without renewal (fencing).",
           minimum=1.0),
    Option("mode", "choice", "pull",
           "pull: the verifier polls its agents (API v2.x); push: agents dial in and push their evidence\n"
           "(API v3.0, /v3/...; enrolled with cloudagent_ip/port null); both: serve the two kinds.",
           choices=("pull", "push", "both")),
    Option("session_lifetime", "float", 180.0,
           "Seconds a push agent's PoP bearer token is valid (each passed attestation extends it).", minimum=1.0),
    Option("attestation_history", "int", 10,
           "Push attestations kept per agent (GET /v3/agents/{id}/attestations); older ones are deleted.",
           minimum=1),
    Option("retry_interval", "float", 2.0, "Seconds before retrying a failed agent request.", minimum=0.0),
    Option("max_retries", "int", 10, "Retries of a failed agent request before FAILED.", minimum=0),
    Option(
        "exponential_backoff",
        "bool",
        True,
        "With it the n-th retry waits retry_interval ** n seconds (as upstream).",
    ),
    Option("request_timeout", "float", 60.0, "Timeout in seconds of one request to an agent.", minimum=0.1),
    Option(
        "max_upload_size",
        "int",
        DEFAULT_MAX_UPLOAD_SIZE,
        "Largest accepted request body in bytes on routes without a limit of their own (413 beyond).",
        minimum=1024,
    ),
    Option(
        "max_evidence_size",
        "int",
        DEFAULT_MAX_EVIDENCE_SIZE,
        "Largest accepted POST /verify/evidence body in bytes: an IMA list of 100,000 lines is ~21 MB.",
        minimum=1024,
    ),
    Option(
        "max_policy_size",
        "int",
        DEFAULT_MAX_POLICY_SIZE,
        "Largest accepted body in bytes of the routes that carry a policy (allowlists, mbpolicies, "
        "agent enrolment with an inline runtime policy).",
        minimum=1024,
    ),
    Option(
        "max_response_size",
        "int",
        64 << 20,
        "Largest accepted response body from an agent in bytes (IMA lists can be large).",
        minimum=1024,
    ),
    Option(
        "max_concurrent_requests",
        "int",
        64,
        "Agent requests in flight at once across all agents.",
        minimum=1,
    ),
    Option("commit_linger", "float_or_auto", AUTO,
           "Seconds a store write that nobody waits for (a pull poll's success record, a push\n"
           "verdict after its 202) may wait for others to share its commit and fsync: more saves CPU\n"
           "per record (one thread hop and commit serve every write of that window), at the cost of\n"
           "storing the verdict that much later. auto = min(0.25, quote_interval / 8); 0 = commit at\n"
           f"once (alone unless writes queued meanwhile); at most {MAX_COMMIT_LINGER:g}.",
           minimum=0.0, maximum=MAX_COMMIT_LINGER),
    Option("push_commit_linger", "float_or_auto", AUTO,
           "mode push/both: seconds a write that a push agent waits for (its 201 to the capabilities,\n"
           "its 202 to the evidence) may wait for other writes to share its commit and fsync. Each\n"
           "push request waits up to this, twice per attestation cycle: more saves CPU per\n"
           "attestation under load (docs/performance.md 4c.8), less answers sooner. auto =\n"
           "min(0.1, quote_interval / 20, commit_linger); 0 = commit at once; at most commit_linger\n"
           "(a group never waits longer than that).",
           minimum=0.0, maximum=MAX_COMMIT_LINGER),
    Option(
        "require_allow_list_signatures",
        "bool",
        False,
        "Refuse runtime policies that are not DSSE-signed with a valid signature by their\n"
        "runtime_policy_key (uploads to /allowlists and inline policies at enrolment).",
    ),
    Option(
        "policy_refresh_interval",
        "float",
        5.0,
        "Seconds between two reads of the named runtime policies, so that a POST/PUT/DELETE made\n"
        "through another verifier on the same database applies here too; 0 = never (one verifier).",
        minimum=0.0,
    ),
    Option(
        "ignore_tomtou_errors",
        "bool",
        False,
        "Treat IMA ToMToU / open-writers violation entries as logged warnings instead of failures.",
    ),
    Option("measured_boot_evaluate", "choice", "once",
           "When to evaluate an agent's measured-boot policy: once (first good quote of each boot) "
           "or always (every quote); the UEFI log is replayed against the PCRs every time.",
           choices=("once", "always")),
    Option("webhook_url", "str", "", "If set, revocation notices are also POSTed to this URL."),
    Option(
        "revocation_notice_ttl",
        "float",
        86400.0,
        "Seconds a revocation notice is retried for a recipient that does not acknowledge it\n"
        "(stored notices survive restarts; after this the delivery is given up as expired).",
        minimum=0.0,
    ),
    Option(
        "revocation_max_retry_interval",
        "float",
        60.0,
        "Longest wait between two delivery attempts of one notice to one recipient (the wait\n"
        "starts at retry_interval and doubles with exponential_backoff).",
        minimum=0.01,
    ),
    *service_options(METRICS_PORT),
)


@dataclass(frozen=True, kw_only=True)
class Settings(ServerSettings):
    """The options with every path resolved: what the actor actually uses."""

    trusted_server_ca: tuple[Path, ...]
    client_cert: Path
    client_key: Path


SPEC = ActorOptions(ACTOR, OPTIONS, "continuous attestation of enrolled agents")
#: defaults < TOML file < ``KEYTRIO_VERIFIER_*`` environment < ``overrides``
load_config = SPEC.load
#: the commented default configuration (``keytrio verifier --print-default-config``)
default_config = SPEC.default_text


def worker_count(config: Config) -> int:
    """How many processes ``keytrio verifier`` runs: ``workers``, or for 0 (auto) the cores this
    process may use when the workers can share the agents (PostgreSQL, mode = pull), else 1.
    Push and both modes run N workers when asked explicitly (push agents are leased too)."""
    if config.workers > 0:
        return int(config.workers)
    if str(config.database_url).startswith("postgresql") and config.mode == "pull":
        return max(len(os.sched_getaffinity(0)), 1)
    return 1


def commit_lingers(config: Config) -> tuple[float, float]:
    """The store's two group-commit lingers in seconds: ``commit_linger`` (Store.group_linger, the
    writes nobody waits for) and ``push_commit_linger`` (Store.urgent_linger, a push request's),
    each derived from quote_interval when "auto". An explicit push_commit_linger above the first
    is refused by :func:`resolve` (the store never lets a group wait longer than group_linger)."""
    interval = float(config.quote_interval)
    group = min(0.25, interval / 8) if config.commit_linger == AUTO else float(config.commit_linger)
    urgent = min(0.1, interval / 20, group) if config.push_commit_linger == AUTO else float(config.push_commit_linger)
    return group, urgent


def resolve(config: Config) -> Settings:
    """Resolve paths and cross-check options; raises ConfigError listing every problem."""
    check = PathChecks(config)
    files = {name: check.file(name) for name in ("server_cert", "server_key", "client_cert", "client_key")}
    client_cas, server_cas = check.cas("trusted_client_ca"), check.cas("trusted_server_ca")
    crl = check.crl()
    if config.webhook_url and not str(config.webhook_url).startswith(("http://", "https://")):
        check.problems.append("webhook_url: must be an http:// or https:// URL (or empty)")
    if config.cluster and not str(config.database_url).startswith("postgresql"):
        check.problems.append("cluster: needs a PostgreSQL database_url (leases use its row locks)")
    if config.workers > 1 and not str(config.database_url).startswith("postgresql"):
        check.problems.append("workers: more than 1 needs a PostgreSQL database_url (SQLite is one process)")
    if config.metrics_port > 0 and config.metrics_port + worker_count(config) - 1 > 65535:
        check.problems.append(f"metrics_port: worker i serves metrics_port + i: {config.metrics_port} + "
                              f"{worker_count(config) - 1} is past 65535")
    group, urgent = commit_lingers(config)
    if config.push_commit_linger != AUTO and urgent > group:
        check.problems.append(f"push_commit_linger: must not exceed commit_linger ({group:g} s"
                              f"{' = auto' if config.commit_linger == AUTO else ''}): a push request's "
                              f"commit never waits longer than the store's group linger, not {urgent:g}")
    check.raise_problems()
    return Settings(
        config=config, database_url=check.database_url(ACTOR), data_dir=check.data_dir,
        trusted_client_ca=client_cas, trusted_server_ca=server_cas, crl=crl, **files,
    )
