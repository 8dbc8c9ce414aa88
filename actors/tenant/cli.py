"""``keytrio tenant VERB``: the operator's command line over the tenant library.

Verbs: ``add``, ``update``, ``delete``, ``status``, ``list``, ``stop``, ``reactivate``,
``regdelete`` and ``policy add|update|show|list|delete`` (the verifier's named runtime policies).
Every verb takes ``-c/--config`` (TOML ``[tenant]``, see ``--print-default-config``; default
``/etc/keytrio/tenant.toml`` if it exists, the directory moved by ``KEYTRIO_CONFIG_DIR``),
``--registrar HOST:PORT``, ``--verifier HOST:PORT`` and ``--tls-dir DIR``.

Exit codes: 0 ok, 2 usage (also argparse's own), 3 connection, 4 verification failed, 5 refused
by a server. Every failure is one line on stderr saying what failed and what to do.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import trio

from keytrio.actors.common import logs
from keytrio.actors.common.config import ConfigError, default_path
from keytrio.actors.common.tls import private_key_problem
from keytrio.actors.tenant import config as tconfig
from keytrio.actors.tenant import ekcheck, mbpolicies, policies
from keytrio.actors.tenant.errors import (
    ConnectionProblem,
    Refused,
    TenantError,
    UsageError,
    VerificationFailed,
)
from keytrio.actors.tenant.payload import make_payload
from keytrio.actors.tenant.progress import Progress
from keytrio.actors.tenant.tenant import Tenant
from keytrio.protocol import states
from keytrio.protocol.failures import Severity

EXIT_OK, EXIT_USAGE = 0, 2


# --- parser ------------------------------------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection (override the [tenant] configuration)")
    g.add_argument("-c", "--config", type=Path,
                   help="TOML configuration file ([tenant] table; default /etc/keytrio/tenant.toml if present)")
    g.add_argument("--registrar", metavar="HOST:PORT", help="registrar HTTPS address")
    g.add_argument("--verifier", metavar="HOST:PORT", help="verifier HTTPS address")
    g.add_argument("--tls-dir", type=Path, help="CA directory (cv_ca layout: cacert.crt, client-cert.crt, ...)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    logs.add_options(p, default_level="WARNING")  # the tenant's own output is its progress lines
    return p


def _add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("agent_id", metavar="AGENT_ID")
    ek = p.add_argument_group("EK certificate")
    ek.add_argument("--ek-trust-store", action="append", type=Path, metavar="DIR|FILE",
                    help="TPM vendor CA certificates the agent's EK cert must chain to (repeatable)")
    ek.add_argument("--no-ek-check", action="store_true", help="do not check the EK certificate")
    pay = p.add_argument_group("payload")
    pay.add_argument("--payload", type=Path, metavar="FILE|DIR", help="file or directory delivered to the agent (zipped)")
    pay.add_argument("--include-autorun", type=Path, metavar="FILE", help="script run by the agent as autorun.sh")
    pol = p.add_argument_group("policies")
    pol.add_argument("--pcr", action="append", default=[], metavar="N=HEX",
                     help="accepted value of PCR N (repeatable; several values per PCR allowed)")
    pol.add_argument("--tpm-policy", type=Path, metavar="FILE", help="JSON tpm_policy: {\"N\": [hex], \"mask\": ...}")
    rp = pol.add_mutually_exclusive_group()
    rp.add_argument("--runtime-policy", type=Path, metavar="FILE", help="runtime (IMA) policy, plain or DSSE-signed")
    rp.add_argument("--runtime-policy-name", metavar="NAME", help="a runtime policy stored at the verifier")
    pol.add_argument("--runtime-policy-key", type=Path, metavar="FILE", help="public key/cert that signed the policy")
    pol.add_argument("--mb-policy", type=Path, metavar="FILE",
                     help="measured-boot reference state (keytrio policy create measured-boot)")
    pol.add_argument("--mb-policy-name", metavar="NAME",
                     help="a measured-boot policy stored at the verifier (with --mb-policy: store it under NAME)")
    alg = p.add_argument_group("algorithms (comma-separated; default from the configuration)")
    alg.add_argument("--accept-hash", metavar="LIST", help="e.g. sha256,sha384")
    alg.add_argument("--accept-sign", metavar="LIST", help="e.g. rsassa,ecschnorr")
    alg.add_argument("--accept-enc", metavar="LIST", help="e.g. rsa,ecc")
    rev = p.add_argument_group("revocation (default: the CA layout's RevocationNotifier pair, when present)")
    rev.add_argument("--revocation-key", type=Path, metavar="PEM")
    rev.add_argument("--revocation-cert", type=Path, metavar="PEM")
    rev.add_argument("--no-revocation", action="store_true", help="send no revocation key/cert")
    p.add_argument("--metadata", metavar="JSON", help="JSON object stored with the agent")
    p.add_argument("--verify", action="store_true", help="after Get Quote, check that the agent derived K")
    p.add_argument("--timeout", type=float, metavar="S", help="seconds to wait for Get Quote (default wait_timeout)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``tenant`` verb to the top-level ``keytrio`` parser."""
    common = _common()
    p = subparsers.add_parser("tenant", help="enrol and manage agents, runtime policies (operator CLI)")
    p.add_argument("--print-default-config", action="store_true", help="print the commented default configuration")
    p.set_defaults(func=main, tenant_verb=None)
    verbs = p.add_subparsers(dest="tenant_verb", metavar="VERB")

    add = verbs.add_parser("add", parents=[common], help="enrol an agent with the verifier")
    _add_options(add)
    upd = verbs.add_parser("update", parents=[common], help="re-enrol an agent with new options (delete + add)")
    _add_options(upd)
    for name, text in (("delete", "remove an agent from the verifier"), ("stop", "stop attesting an agent"),
                       ("reactivate", "attest a stopped or failed agent again"),
                       ("regdelete", "remove an agent's registrar record")):
        sp = verbs.add_parser(name, parents=[common], help=text)
        sp.add_argument("agent_id", metavar="AGENT_ID")
    st = verbs.add_parser("status", parents=[common], help="registrar record and verifier state of an agent")
    st.add_argument("agent_id", metavar="AGENT_ID")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    ls = verbs.add_parser("list", parents=[common], help="agents at the registrar and at the verifier")
    ls.add_argument("--verifier-id", metavar="ID", help="only agents of this verifier_id")
    ls.add_argument("--json", action="store_true", help="machine-readable output")

    pol = verbs.add_parser("policy", help="the verifier's named runtime policies")
    pverbs = pol.add_subparsers(dest="policy_verb", metavar="ACTION", required=True)
    for name, text in (("add", "upload a new runtime policy"), ("update", "replace a stored runtime policy")):
        sp = pverbs.add_parser(name, parents=[common], help=text)
        sp.add_argument("name", metavar="NAME")
        sp.add_argument("--file", "-f", type=Path, required=True, metavar="FILE", help="the policy (plain or DSSE-signed)")
        sp.add_argument("--key", type=Path, metavar="FILE", help="public key/cert that signed the policy")
        sp.add_argument("--tpm-policy", type=Path, metavar="FILE", help="JSON tpm_policy stored with it")
        sp.add_argument("--pcr", action="append", default=[], metavar="N=HEX", help="PCR value for the tpm_policy")
    sh = pverbs.add_parser("show", parents=[common], help="print a stored runtime policy")
    sh.add_argument("name", metavar="NAME")
    sh.add_argument("--json", action="store_true", help="the whole record, not only the policy")
    sh.add_argument("-o", "--output", type=Path, help="write the policy to FILE")
    pl = pverbs.add_parser("list", parents=[common], help="names of the stored runtime policies")
    pl.add_argument("--json", action="store_true")
    pd = pverbs.add_parser("delete", parents=[common], help="delete a stored runtime policy")
    pd.add_argument("name", metavar="NAME")

    mbp = verbs.add_parser("mbpolicy", help="the verifier's named measured-boot policies")
    mverbs = mbp.add_subparsers(dest="mbpolicy_verb", metavar="ACTION", required=True)
    for name, text in (("add", "upload a new measured-boot policy"), ("update", "replace a stored one")):
        sp = mverbs.add_parser(name, parents=[common], help=text)
        sp.add_argument("name", metavar="NAME")
        sp.add_argument("--file", "-f", type=Path, required=True, metavar="FILE", help="the reference state (JSON)")
    sh = mverbs.add_parser("show", parents=[common], help="print a stored measured-boot policy")
    sh.add_argument("name", metavar="NAME")
    sh.add_argument("--json", action="store_true", help="the whole record, not only the policy")
    ml = mverbs.add_parser("list", parents=[common], help="names of the stored measured-boot policies")
    ml.add_argument("--json", action="store_true")
    md = mverbs.add_parser("delete", parents=[common], help="delete a stored measured-boot policy")
    md.add_argument("name", metavar="NAME")


# --- entry points ------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    """``func`` of the ``tenant`` verb (synchronous: runs its own trio loop)."""
    logs.setup(getattr(args, "log_level", "WARNING"), getattr(args, "log_format", "text"))
    return trio.run(run, args)


async def run(args: argparse.Namespace, *, out: TextIO | None = None, err: TextIO | None = None,
              env: Mapping[str, str] | None = None) -> int:
    """The verb in ``args`` inside a running trio loop; returns the exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    verb = args.tenant_verb
    if getattr(args, "print_default_config", False) and verb is None:
        out.write(tconfig.default_config())
        return EXIT_OK
    if verb is None:
        _say(err, "", "no verb given", "run `keytrio tenant --help` for the list of verbs")
        return EXIT_USAGE
    label = verb if verb != "policy" else f"policy {args.policy_verb}"
    try:
        cfg = _load_config(args, env)
        tls = tconfig.tls_files(cfg)
        for path in (*tls.ca_files, tls.client_cert, tls.client_key):
            if not path.is_file():
                raise UsageError(f"TLS file {path} does not exist")
        if (exposed := private_key_problem(tls.client_key)) is not None:
            raise UsageError(exposed)
        progress = Progress(err, lines=out, quiet=args.quiet)
        async with Tenant(
            f"https://{_host(cfg.registrar_ip)}:{cfg.registrar_tls_port}",
            f"https://{_host(cfg.verifier_ip)}:{cfg.verifier_port}",
            ca_files=tls.ca_files, client_cert=tls.client_cert, client_key=tls.client_key,
            request_timeout=cfg.request_timeout,
        ) as t:
            return await _VERBS[verb](t, args, cfg, tls, progress, out)
    except ConfigError as exc:
        _say(err, label, "configuration: " + "; ".join(exc.problems), "fix the [tenant] file, KEYTRIO_TENANT_* or the flags")
        return EXIT_USAGE
    except TenantError as exc:
        _say(err, label, str(exc), _hint(exc, args))
        return exc.exit_code


def _say(err: TextIO, label: str, what: str, todo: str) -> None:
    line = f"keytrio tenant{' ' + label if label else ''}: {what} -- {todo}"
    print(" ".join(line.split()), file=err, flush=True)  # exactly one line, whatever the texts hold


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip and not ip.startswith("[") else ip


def _load_config(args: argparse.Namespace, env: Mapping[str, str] | None) -> Any:
    overrides: dict[str, Any] = {}
    try:
        if args.registrar:
            overrides["registrar_ip"], overrides["registrar_tls_port"] = tconfig.split_hostport(args.registrar, "--registrar")
        if args.verifier:
            overrides["verifier_ip"], overrides["verifier_port"] = tconfig.split_hostport(args.verifier, "--verifier")
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if args.tls_dir:
        overrides["tls_dir"] = str(args.tls_dir)
    # without -c: /etc/keytrio/tenant.toml (or $KEYTRIO_CONFIG_DIR/tenant.toml) if it exists
    path = args.config if args.config is not None else default_path("tenant", env)
    return tconfig.load(path, env=env, overrides=overrides)


# --- hints: what to do about a failure ---------------------------------------------------------------


def _hint(exc: TenantError, args: argparse.Namespace) -> str:
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
        return f"see `keytrio tenant status {aid}` and the verifier's log"
    if str(exc).startswith("runtime policy"):
        return "check the policy file (`keytrio policy create runtime` makes valid ones)"
    if str(exc).startswith("TLS"):
        return "check --tls-dir and the client_cert, client_key and trusted_server_ca settings"
    return f"see `keytrio tenant {args.tenant_verb} --help`"


# --- option helpers ----------------------------------------------------------------------------------


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{what} {path}: unreadable ({exc.strerror or exc})") from exc


def _read_text(path: Path, what: str) -> str:
    try:
        return _read_bytes(path, what).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{what} {path}: not UTF-8 text") from exc


def tpm_policy_from(pcrs: list[str], path: Path | None) -> dict[str, Any] | None:
    """``--tpm-policy FILE`` merged with ``--pcr N=HEX`` values; None when neither is given."""
    doc: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = json.loads(_read_text(path, "--tpm-policy"))
        except ValueError as exc:
            raise UsageError(f"--tpm-policy {path}: not JSON ({exc})") from exc
        if not isinstance(loaded, dict):
            raise UsageError(f"--tpm-policy {path}: must be a JSON object")
        doc.update(loaded)
    for item in pcrs:
        num, sep, value = item.partition("=")
        value = value.strip().lower().removeprefix("0x")
        if not sep or not num.strip().isascii() or not num.strip().isdigit() or len(num.strip()) > 2 or not value or any(c not in "0123456789abcdef" for c in value):
            raise UsageError(f"--pcr {item!r}: expected N=HEX, e.g. 7=3d45...")
        key = str(int(num))
        current = doc.get(key, [])
        current = [current] if isinstance(current, str) else list(current)
        if value not in current:
            current.append(value)
        doc[key] = current
    if not doc:
        return None
    doc.setdefault("mask", "0x0")  # the library adds every listed PCR to the mask
    return doc


def _algs(flag: str | None, default: list[str]) -> list[str]:
    if flag is None:
        return list(default)
    algs = [a.strip().lower() for a in flag.split(",") if a.strip()]
    if not algs:
        raise UsageError("an --accept-* list must name at least one algorithm")
    return algs


def _add_kwargs(args: argparse.Namespace, cfg: Any, tls: tconfig.TlsFiles, err: TextIO) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    store = args.ek_trust_store or ([cfg.tpm_cert_store] if cfg.tpm_cert_store else None)
    if args.no_ek_check or not cfg.require_ek_cert:
        kw["ek_trust_store"] = None
    elif not store:
        raise UsageError("--ek-trust-store DIR|FILE is required (the TPM vendor CA), or --no-ek-check")
    else:
        verb = args.tenant_verb
        kw["ek_trust_store"] = ekcheck.load_trust_store(
            store, warn=lambda text: print(f"keytrio tenant {verb}: warning: {text}", file=err, flush=True))
    payload = None
    autorun = _read_bytes(args.include_autorun, "--include-autorun") if args.include_autorun else None
    if args.payload is not None or autorun is not None:
        payload = make_payload(args.payload, autorun=autorun)
    kw["payload"] = payload
    kw["tpm_policy"] = tpm_policy_from(args.pcr, args.tpm_policy)
    key = _read_text(args.runtime_policy_key, "--runtime-policy-key") if args.runtime_policy_key else None
    if args.runtime_policy is not None:
        raw = _read_bytes(args.runtime_policy, "--runtime-policy")
        policies.check_policy(raw, key)  # refuse a bad file before the agent gets U
        kw["runtime_policy"] = raw
    kw["runtime_policy_name"] = args.runtime_policy_name
    kw["runtime_policy_key"] = key
    if getattr(args, "mb_policy", None) is not None:
        kw["mb_policy"] = mbpolicies.check_mb_policy(_read_bytes(args.mb_policy, "--mb-policy"))
    if getattr(args, "mb_policy_name", None):
        kw["mb_policy_name"] = args.mb_policy_name
    kw["accept_tpm_hash_algs"] = _algs(args.accept_hash, cfg.accept_tpm_hash_algs)
    kw["accept_tpm_signing_algs"] = _algs(args.accept_sign, cfg.accept_tpm_signing_algs)
    kw["accept_tpm_encryption_algs"] = _algs(args.accept_enc, cfg.accept_tpm_encryption_algs)
    if not args.no_revocation:
        rkey = args.revocation_key or tls.revocation_key
        rcert = args.revocation_cert or tls.revocation_cert
        if rkey is not None:
            kw["revocation_key_pem"] = _read_text(rkey, "--revocation-key")
        if rcert is not None:
            kw["revocation_cert_pem"] = _read_text(rcert, "--revocation-cert")
    if args.metadata is not None:
        try:
            meta = json.loads(args.metadata)
        except ValueError as exc:
            raise UsageError(f"--metadata: not JSON ({exc})") from exc
        if not isinstance(meta, dict):
            raise UsageError("--metadata must be a JSON object")
        kw["metadata"] = meta
    kw["verify"] = bool(args.verify)
    kw["timeout"] = args.timeout if args.timeout is not None else cfg.wait_timeout
    return kw


# --- verbs -------------------------------------------------------------------------------------------


async def _add(t: Tenant, args: argparse.Namespace, cfg: Any, tls: tconfig.TlsFiles, progress: Progress,
               out: TextIO, *, update: bool = False) -> int:
    kw = _add_kwargs(args, cfg, tls, progress.stream)  # all local checks first: a usage error changes nothing
    if update:
        async with progress.step(f"removing {args.agent_id} from the verifier"):
            st = await t.status(args.agent_id)
            if st["verifier"] is not None:
                await t.delete(args.agent_id, timeout=kw["timeout"])
    what = "waiting for Get Quote" + (" and the agent's key check" if kw["verify"] else "")
    async with progress.step(f"enrolling {args.agent_id}: identity quote, keys, verifier; {what}"):
        res = await t.add(args.agent_id, **kw)
        rec = await wait_attested(t, args.agent_id, timeout=kw["timeout"])
    parts = [f"agent {res.agent_id} {'updated' if update else 'enrolled'}",
             f"verifier state {states.name(rec.get('operational_state'))}"
             f" after {rec.get('attestation_count')} verified quote(s)",
             f"quote {res.hash_alg}/{res.sign_alg}/{res.enc_alg}"]
    if res.verified:
        parts.append("the agent proved K")
    print("; ".join(parts), file=out)
    return EXIT_OK


async def wait_attested(t: Tenant, agent_id: str, *, timeout: float) -> dict[str, Any]:
    """The verifier's record once it verified a quote and is in Get Quote.

    The verifier enters Get Quote at enrolment already (before any quote), so the state alone
    does not show that attestation works; ``attestation_count`` does. A final state or the
    timeout is a VerificationFailed naming the state and the last event."""
    verifier = await t.ready(t.verifier)
    rec: dict[str, Any] = {}
    with trio.move_on_after(timeout):
        while True:
            reply = await verifier.call("GET", f"/agents/{agent_id}", expect=(200, 404))
            if reply.status_code == 404:
                raise VerificationFailed("verifier state", "the agent is no longer enrolled at the verifier")
            rec = reply.results
            state = rec.get("operational_state")
            if state in states.FINAL:
                raise VerificationFailed("verifier state", f"agent reached {states.name(state)}"
                                         f" (last event {rec.get('last_event_id')!r})")
            count = rec.get("attestation_count")
            if state == states.GET_QUOTE and isinstance(count, int) and count >= 1:
                return rec
            await trio.sleep(t.poll_interval)
    raise VerificationFailed("verifier state", f"no verified quote within {timeout:g} s"
                             f" (state {states.name(rec.get('operational_state'))})")


async def _update(t: Tenant, args: argparse.Namespace, cfg: Any, tls: tconfig.TlsFiles, progress: Progress,
                  out: TextIO) -> int:
    return await _add(t, args, cfg, tls, progress, out, update=True)


async def _delete(t: Tenant, args: argparse.Namespace, cfg: Any, tls: tconfig.TlsFiles, progress: Progress,
                  out: TextIO) -> int:
    async with progress.step(f"deleting {args.agent_id} at the verifier"):
        await t.delete(args.agent_id, timeout=cfg.wait_timeout)
    print(f"agent {args.agent_id} deleted from the verifier", file=out)
    return EXIT_OK


async def _simple(t: Tenant, args: argparse.Namespace, cfg: Any, tls: tconfig.TlsFiles, progress: Progress,
                  out: TextIO) -> int:
    verb = args.tenant_verb
    await getattr(t, verb)(args.agent_id)
    done = {"stop": "stopped (no more quotes)", "reactivate": "reactivated",
            "regdelete": "deleted from the registrar"}[verb]
    print(f"agent {args.agent_id} {done}", file=out)
    return EXIT_OK


def _when(value: object) -> str:
    import datetime

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


def format_status(st: dict[str, Any]) -> str:
    """The human-readable status (one fact per line)."""
    reg, ver = st.get("registrar"), st.get("verifier")
    lines = [f"agent        {st['agent_id']}"]
    if reg is None:
        lines.append("registrar    not registered")
    else:
        lines.append(f"registrar    registered, contact {reg.get('ip')}:{reg.get('port')}, regcount {reg.get('regcount')}")
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
    lines.append(f"verifier id  {ver.get('verifier_id')} ({ver.get('verifier_ip')}:{ver.get('verifier_port')})")
    lines.append(f"algorithms   hash {ver.get('hash_alg') or '-'}, encryption {ver.get('enc_alg') or '-'},"
                 f" signing {ver.get('sign_alg') or '-'}")
    lines.append(f"accepted     hash {_names(ver.get('accept_tpm_hash_algs'))};"
                 f" encryption {_names(ver.get('accept_tpm_encryption_algs'))};"
                 f" signing {_names(ver.get('accept_tpm_signing_algs'))}")
    lines.append(f"policies     tpm {ver.get('tpm_policy')}; runtime policy {'yes' if ver.get('has_runtime_policy') else 'no'};"
                 f" measured boot {'yes' if ver.get('has_mb_refstate') else 'no'}")
    return "\n".join(lines)


async def _status(t: Tenant, args: argparse.Namespace, cfg: Any, tls: tconfig.TlsFiles, progress: Progress,
                  out: TextIO) -> int:
    st = await t.status(args.agent_id)
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True), file=out)
    else:
        print(format_status(st), file=out)
    return EXIT_OK


async def _list(t: Tenant, args: argparse.Namespace, cfg: Any, tls: tconfig.TlsFiles, progress: Progress,
                out: TextIO) -> int:
    registrar = await t.reglist()
    verifier = await t.list(args.verifier_id)
    if args.json:
        print(json.dumps({"registrar": registrar, "verifier": verifier}), file=out)
        return EXIT_OK
    enrolled = set(verifier)
    where = f" (verifier_id {args.verifier_id})" if args.verifier_id else ""
    print(f"{'AGENT':<40} REGISTRAR  VERIFIER{where}", file=out)
    for aid in sorted(set(registrar) | enrolled):
        print(f"{aid:<40} {'yes' if aid in registrar else 'no':<10} {'yes' if aid in enrolled else 'no'}", file=out)
    return EXIT_OK


async def _policy(t: Tenant, args: argparse.Namespace, cfg: Any, tls: tconfig.TlsFiles, progress: Progress,
                  out: TextIO) -> int:
    pverb = args.policy_verb
    if pverb in ("add", "update"):
        raw = _read_bytes(args.file, "--file")
        key = _read_text(args.key, "--key") if args.key else None
        tpm = tpm_policy_from(args.pcr, args.tpm_policy)
        send = t.policy_add if pverb == "add" else t.policy_update
        await send(args.name, raw, key=key, tpm_policy=json.dumps(tpm) if tpm else None)
        print(f"runtime policy {args.name} {'stored' if pverb == 'add' else 'updated'} at the verifier", file=out)
    elif pverb == "show":
        rec = await t.policy_show(args.name)
        if args.output is not None:
            try:
                args.output.write_text(rec.get("runtime_policy") or "")
            except OSError as exc:
                raise UsageError(f"-o {args.output}: cannot write ({exc.strerror or exc})") from exc
        if args.json:
            print(json.dumps(rec, indent=2, sort_keys=True), file=out)
        elif args.output is None:
            print(rec.get("runtime_policy") or "", file=out)
    elif pverb == "list":
        names = await t.policy_list()
        print(json.dumps(names) if args.json else "\n".join(names), file=out)
    else:
        await t.policy_delete(args.name)
        print(f"runtime policy {args.name} deleted", file=out)
    return EXIT_OK


async def _mbpolicy(t: Tenant, args: argparse.Namespace, cfg: Any, tls: tconfig.TlsFiles, progress: Progress,
                    out: TextIO) -> int:
    mverb = args.mbpolicy_verb
    if mverb in ("add", "update"):
        await mbpolicies.add(t, args.name, _read_bytes(args.file, "--file"), update=mverb == "update")
        print(f"measured-boot policy {args.name} {'stored' if mverb == 'add' else 'updated'} at the verifier", file=out)
    elif mverb == "show":
        rec = await mbpolicies.show(t, args.name)
        print(json.dumps(rec, indent=2, sort_keys=True) if args.json else rec.get("mb_policy") or "", file=out)
    elif mverb == "list":
        names = await mbpolicies.list_names(t)
        print(json.dumps(names) if args.json else "\n".join(names), file=out)
    else:
        await mbpolicies.delete(t, args.name)
        print(f"measured-boot policy {args.name} deleted", file=out)
    return EXIT_OK


_VERBS = {
    "add": _add,
    "update": _update,
    "delete": _delete,
    "status": _status,
    "list": _list,
    "stop": _simple,
    "reactivate": _simple,
    "regdelete": _simple,
    "policy": _policy,
    "mbpolicy": _mbpolicy,
}
