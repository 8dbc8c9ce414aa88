"""``keytrio tenant``'s command line: the argument parser of every verb, and the flags and
configuration turned into library requests (:class:`actors.tenant.add.AddRequest`).

Everything here is local (files read, policies checked): nothing is sent, so a usage error
changes nothing anywhere.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from keytrio.actors.common import logs
from keytrio.actors.tenant import config as tconfig
from keytrio.actors.tenant import ekcheck, mbpolicies, policies
from keytrio.actors.tenant.add import AddRequest
from keytrio.actors.tenant.errors import UsageError
from keytrio.actors.tenant.payload import make_payload
from keytrio.protocol import safejson

if TYPE_CHECKING:
    from cryptography import x509

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
    p.add_argument("--push", action="store_true",
                   help="a push-mode agent (API v3.0): enrolled with no contact address; nothing is sent to "
                        "the agent, which attests on its own (see `tenant attestations`)")
    p.add_argument("--verify", action="store_true", help="after Get Quote, check that the agent derived K")
    p.add_argument("--timeout", type=_seconds, metavar="S", help="seconds to wait for Get Quote (default wait_timeout)")


def _seconds(text: str) -> float:
    """A positive, finite number of seconds (float() takes nan and inf, which no wait means)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return value


def build_parser(subparsers: argparse._SubParsersAction, func: Callable[[argparse.Namespace], int]) -> None:
    """Add the ``tenant`` verb, run by ``func``, to the top-level ``keytrio`` parser."""
    common = _common()
    p = subparsers.add_parser("tenant", help="enrol and manage agents, runtime policies (operator CLI)")
    p.add_argument("--print-default-config", action="store_true", help="print the commented default configuration")
    p.set_defaults(func=func, tenant_verb=None)
    verbs = p.add_subparsers(dest="tenant_verb", metavar="VERB")
    _agent_verbs(verbs, common)
    _policy_verbs(verbs, common)
    _mbpolicy_verbs(verbs, common)


def _agent_verbs(verbs: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """add, update, delete, stop, reactivate, regdelete, status, list."""
    add = verbs.add_parser("add", parents=[common], help="enrol an agent with the verifier")
    _add_options(add)
    upd = verbs.add_parser("update", parents=[common], help="re-enrol an agent with new options (delete + add)")
    _add_options(upd)
    for name, text in (("delete", "remove an agent from the verifier"), ("stop", "stop attesting an agent"),
                       ("reactivate", "attest a stopped or failed agent again"),
                       ("regdelete", "remove an agent's registrar record")):
        sp = verbs.add_parser(name, parents=[common], help=text)
        sp.add_argument("agent_id", metavar="AGENT_ID")
    st = verbs.add_parser("status", parents=[common], help="registrar record and verifier state of an agent (a push agent: also its latest attestation)")
    st.add_argument("agent_id", metavar="AGENT_ID")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    at = verbs.add_parser("attestations", parents=[common],
                          help="a push-mode agent's attestation history at the verifier (newest first)")
    at.add_argument("agent_id", metavar="AGENT_ID")
    at.add_argument("--json", action="store_true", help="machine-readable output")
    ls = verbs.add_parser("list", parents=[common], help="agents at the registrar and at the verifier")
    ls.add_argument("--verifier-id", metavar="ID", help="only agents of this verifier_id")
    ls.add_argument("--json", action="store_true", help="machine-readable output")


def _policy_verbs(verbs: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """policy add|update|show|list|delete: the verifier's named runtime policies."""
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


def _mbpolicy_verbs(verbs: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """mbpolicy add|update|show|list|delete: the verifier's named measured-boot policies."""
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


# --- option helpers ----------------------------------------------------------------------------------


def read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{what} {path}: unreadable ({exc.strerror or exc})") from exc


def read_text(path: Path, what: str) -> str:
    try:
        return read_bytes(path, what).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{what} {path}: not UTF-8 text") from exc


def tpm_policy_from(pcrs: list[str], path: Path | None) -> dict[str, Any] | None:
    """``--tpm-policy FILE`` merged with ``--pcr N=HEX`` values; None when neither is given."""
    doc: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = safejson.loads(read_text(path, "--tpm-policy"))
        except safejson.JsonError as exc:  # also a nesting deeper than any policy has
            raise UsageError(f"--tpm-policy {path}: {exc.reason}") from exc
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


def add_request(args: argparse.Namespace, cfg: Any, tls: tconfig.TlsFiles, err: TextIO) -> AddRequest:
    """The enrolment ``add``/``update`` ask for: flags over the ``[tenant]`` configuration, files
    read and policies checked (warnings about the EK trust store go to ``err``)."""
    ek_store = _ek_trust_store(args, cfg, err)
    payload = _payload(args)
    tpm_policy = tpm_policy_from(args.pcr, args.tpm_policy)
    runtime_policy, runtime_policy_key = _runtime_policy(args)
    mb_policy = None
    if getattr(args, "mb_policy", None) is not None:
        mb_policy = mbpolicies.check_mb_policy(read_bytes(args.mb_policy, "--mb-policy"))
    hash_algs = _algs(args.accept_hash, cfg.accept_tpm_hash_algs)
    sign_algs = _algs(args.accept_sign, cfg.accept_tpm_signing_algs)
    enc_algs = _algs(args.accept_enc, cfg.accept_tpm_encryption_algs)
    revocation_key, revocation_cert = _revocation_pems(args, tls)
    return AddRequest(
        args.agent_id,
        tpm_policy=tpm_policy,
        runtime_policy=runtime_policy,
        runtime_policy_name=args.runtime_policy_name,
        runtime_policy_key=runtime_policy_key,
        mb_policy=mb_policy,
        mb_policy_name=getattr(args, "mb_policy_name", None) or None,
        payload=payload,
        revocation_key_pem=revocation_key,
        revocation_cert_pem=revocation_cert,
        metadata=_metadata(args.metadata),
        accept_tpm_hash_algs=hash_algs,
        accept_tpm_encryption_algs=enc_algs,
        accept_tpm_signing_algs=sign_algs,
        ek_trust_store=ek_store,
        verify=bool(args.verify),
        timeout=args.timeout if args.timeout is not None else cfg.wait_timeout,
    )


def _ek_trust_store(args: argparse.Namespace, cfg: Any, err: TextIO) -> list[x509.Certificate] | None:
    """The EK trust store's certificates; None when the EK check is off."""
    store = args.ek_trust_store or ([cfg.tpm_cert_store] if cfg.tpm_cert_store else None)
    if args.no_ek_check or not cfg.require_ek_cert:
        return None
    if not store:
        raise UsageError("--ek-trust-store DIR|FILE is required (the TPM vendor CA), or --no-ek-check")
    verb = args.tenant_verb
    return ekcheck.load_trust_store(
        store, warn=lambda text: print(f"keytrio tenant {verb}: warning: {text}", file=err, flush=True))


def _payload(args: argparse.Namespace) -> bytes | None:
    """The zip for the agent: ``--payload`` and/or ``--include-autorun``; None without either."""
    autorun = read_bytes(args.include_autorun, "--include-autorun") if args.include_autorun else None
    if args.payload is None and autorun is None:
        return None
    return make_payload(args.payload, autorun=autorun)


def _runtime_policy(args: argparse.Namespace) -> tuple[bytes | None, str | None]:
    """(``--runtime-policy`` checked, ``--runtime-policy-key`` text)."""
    key = read_text(args.runtime_policy_key, "--runtime-policy-key") if args.runtime_policy_key else None
    if args.runtime_policy is None:
        return None, key
    raw = read_bytes(args.runtime_policy, "--runtime-policy")
    policies.check_policy(raw, key)  # refuse a bad file before the agent gets U
    return raw, key


def _revocation_pems(args: argparse.Namespace, tls: tconfig.TlsFiles) -> tuple[str | None, str | None]:
    """(notifier key, notifier cert) PEM: the flags, else the CA layout's pair; none with --no-revocation."""
    if args.no_revocation:
        return None, None
    rkey = args.revocation_key or tls.revocation_key
    rcert = args.revocation_cert or tls.revocation_cert
    key = read_text(rkey, "--revocation-key") if rkey is not None else None
    cert = read_text(rcert, "--revocation-cert") if rcert is not None else None
    return key, cert


def _metadata(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        meta = safejson.loads(text)
    except safejson.JsonError as exc:
        raise UsageError(f"--metadata: {exc.reason}") from exc
    if not isinstance(meta, dict):
        raise UsageError("--metadata must be a JSON object")
    return meta
