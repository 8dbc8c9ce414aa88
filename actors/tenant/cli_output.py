"""What ``keytrio tenant`` prints: the one-line failure with its hint (what to do about it), and
the human-readable agent status."""

from __future__ import annotations

import argparse
import datetime
from typing import Any, TextIO

from keytrio.actors.tenant.errors import (
    ConnectionProblem,
    Refused,
    TenantError,
    VerificationFailed,
)
from keytrio.protocol import states
from keytrio.protocol.failures import Severity


def say(err: TextIO, label: str, what: str, todo: str) -> None:
    line = f"keytrio tenant{' ' + label if label else ''}: {what} -- {todo}"
    print(" ".join(line.split()), file=err, flush=True)  # exactly one line, whatever the texts hold


# --- hints: what to do about a failure ---------------------------------------------------------------


def hint(exc: TenantError, args: argparse.Namespace) -> str:
    aid = getattr(args, "agent_id", "AGENT_ID")
    if isinstance(exc, ConnectionProblem):
        if "CERTIFICATE_REVOKED" in exc.detail:
            return (f"the {exc.peer} refused your client certificate as revoked: issue a new one "
                    "(keytrio ca issue --client NAME) and point client_cert/client_key at it")
        if "UNKNOWN_CA" in exc.detail or "BAD_CERTIFICATE" in exc.detail:
            return (f"the {exc.peer} does not trust your client certificate: use one issued by its CA "
                    "(client_cert/client_key in --tls-dir)")
        if "CERTIFICATE_VERIFY_FAILED" in exc.detail:
            return (f"the {exc.peer}'s certificate is not issued by the CA you trust: check --tls-dir and "
                    "trusted_server_ca (and that you reach the right host)")
        if exc.detail.startswith("tls"):
            return (f"the TLS handshake with the {exc.peer} failed: check that the CA in --tls-dir (trusted_server_ca) "
                    f"issued the {exc.peer}'s certificate and that the {exc.peer} accepts your client certificate "
                    "(issued by its CA, not revoked)")
        if exc.peer == "agent":
            return "is the agent running and reachable at the address it registered? (keytrio tenant status shows it)"
        flag = "--registrar" if exc.peer == "registrar" else "--verifier"
        return f"is the {exc.peer} running there? check {flag} HOST:PORT or the [tenant] configuration"
    if isinstance(exc, Refused):
        verb = args.tenant_verb
        if exc.status_code == 409 and verb == "policy":
            return "a policy of that name exists or agents use it: `policy update` it, or delete those agents first"
        if exc.status_code == 409:
            return f"the agent is already enrolled: use `keytrio tenant update {aid}` or delete it first"
        if exc.status_code == 404 and exc.peer == "registrar":
            return "the agent has not registered (and activated) with the registrar: start the agent first"
        if exc.status_code == 404 and verb == "policy":
            return "no such policy at the verifier: see `keytrio tenant policy list`"
        if exc.status_code == 404 and "neither" in exc.message:
            return "check the agent id: see `keytrio tenant list`"
        if exc.status_code == 404:
            return "the agent is not enrolled at the verifier: see `keytrio tenant list`"
        if exc.status_code in (401, 403):
            return f"the {exc.peer} does not accept this client certificate: use one issued by its CA"
        if exc.status_code == 400:
            return f"the {exc.peer} found the request malformed: check the options and files given"
        return f"see the {exc.peer}'s log"
    if isinstance(exc, VerificationFailed):
        if exc.what == "EK certificate":
            return ("give --ek-trust-store the TPM vendor's CA certificates, root and intermediates "
                    "(or --no-ek-check to skip the check)")
        if exc.what == "identity quote":
            return "the agent's TPM did not prove its identity; nothing was enrolled: check the agent and its registration"
        if exc.what == "runtime policy signature":
            return "check the policy file and the key that signed it (keytrio policy verify)"
        if exc.what == "keys/verify":
            return "the agent did not derive the bootstrap key: check the agent's log"
        if exc.what == "registrar record" and "push-mode" in exc.detail:
            return f"enrol it as one: `keytrio tenant add --push {aid}`"
        return f"see `keytrio tenant status {aid}` and the verifier's log"
    if str(exc).startswith("runtime policy"):
        return "check the policy file (`keytrio policy create runtime` makes valid ones)"
    if str(exc).startswith("TLS"):
        return "check --tls-dir and the client_cert, client_key and trusted_server_ca settings"
    return f"see `keytrio tenant {args.tenant_verb} --help`"


def _when(value: object) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return datetime.datetime.fromtimestamp(value, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return "never"


def severity_name(level: object) -> str:
    """Upstream's severity label of a ``severity_level`` (its index in the verifier's labels)."""
    if isinstance(level, int) and not isinstance(level, bool):
        try:
            return Severity(level).label
        except ValueError:
            return f"level {level}"
    return "none"


def _names(algs: object) -> str:
    return ",".join(map(str, algs)) if isinstance(algs, list) and algs else "-"


def _latest(att: dict[str, Any] | None) -> str:
    """A push agent's latest attestation: index, stage, evaluation, failure reason."""
    if att is None:
        return "push agent, no attestation yet"
    reason = att.get("failure_reason")
    return (f"push attestation #{att.get('index')}: stage {att.get('stage')}, evaluation {att.get('evaluation')}"
            + (f", failure {reason}" if reason else ""))


def format_status(st: dict[str, Any]) -> str:
    """The human-readable status (one fact per line)."""
    reg, ver = st.get("registrar"), st.get("verifier")
    lines = [f"agent        {st['agent_id']}"]
    if reg is None:
        lines.append("registrar    not registered")
    else:
        contact = (f"contact {reg.get('ip')}:{reg.get('port')}" if reg.get("ip") or reg.get("port")
                   else "no contact address (it dials out: a push agent)")
        lines.append(f"registrar    registered, {contact}, regcount {reg.get('regcount')}")
    if ver is None:
        lines.append("verifier     not enrolled")
        return "\n".join(lines)
    state = ver.get("operational_state")
    lines.append(f"state        {states.name(state)} ({state})")
    event = ver.get("last_event_id")
    lines.append(f"last event   {event} (severity {severity_name(ver.get('severity_level'))})" if event
                 else "last event   none")
    lines.append(f"attestations {ver.get('attestation_count', 0)}; last quote {_when(ver.get('last_received_quote'))};"
                 f" last success {_when(ver.get('last_successful_attestation'))}")
    if "attestation_status" in ver:
        lines.append(f"attestation  {ver.get('attestation_status')}")
    if "pending_notices" in ver:
        # revocation notices about this agent's failures (or to it) the verifier still delivers
        lines.append(f"notices      {ver.get('pending_notices') or 0} pending revocation notice deliveries")
    pending = {k: v for k, v in ver.items() if ("notice" in k or "notification" in k) and k != "pending_notices"}
    for k, v in pending.items():
        lines.append(f"{k:<12} {v}")
    if "latest_attestation" in st:
        lines.append(f"latest       {_latest(st['latest_attestation'])}")
    lines.append(f"verifier id  {ver.get('verifier_id')} ({ver.get('verifier_ip')}:{ver.get('verifier_port')})")
    lines.append(f"algorithms   hash {ver.get('hash_alg') or '-'}, encryption {ver.get('enc_alg') or '-'},"
                 f" signing {ver.get('sign_alg') or '-'}")
    lines.append(f"accepted     hash {_names(ver.get('accept_tpm_hash_algs'))};"
                 f" encryption {_names(ver.get('accept_tpm_encryption_algs'))};"
                 f" signing {_names(ver.get('accept_tpm_signing_algs'))}")
    lines.append(f"policies     tpm {ver.get('tpm_policy')}; runtime policy {'yes' if ver.get('has_runtime_policy') else 'no'};"
                 f" measured boot {'yes' if ver.get('has_mb_refstate') else 'no'}")
    return "\n".join(lines)
