"""``keytrio tenant VERB``: the operator's command line over the tenant library.

Verbs: ``add`` (``--push``: a push-mode agent), ``update``, ``delete``, ``status``, ``list``,
``attestations`` (a push agent's history), ``stop``, ``reactivate``,
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
from typing import Any, TextIO

import trio

from keytrio.actors.common import logs
from keytrio.actors.common.config import ConfigError, default_path
from keytrio.actors.common.tls import private_key_problem
from keytrio.actors.tenant import config as tconfig
from keytrio.actors.tenant import mbpolicies, push
from keytrio.actors.tenant.cli_args import add_request, build_parser, read_bytes, read_text, tpm_policy_from
from keytrio.actors.tenant.cli_output import format_status, hint, say
from keytrio.actors.tenant.errors import TenantError, UsageError, VerificationFailed
from keytrio.actors.tenant.progress import Progress
from keytrio.actors.tenant.tenant import Tenant
from keytrio.protocol import states

EXIT_OK, EXIT_USAGE = 0, 2


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``tenant`` verb to the top-level ``keytrio`` parser (the parser is in
    :mod:`actors.tenant.cli_args`)."""
    build_parser(subparsers, main)


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
        say(err, "", "no verb given", "run `keytrio tenant --help` for the list of verbs")
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
        say(err, label, "configuration: " + "; ".join(exc.problems), "fix the [tenant] file, KEYTRIO_TENANT_* or the flags")
        return EXIT_USAGE
    except TenantError as exc:
        say(err, label, str(exc), hint(exc, args))
        return exc.exit_code


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


# --- verbs -------------------------------------------------------------------------------------------


async def _add(t: Tenant, args: argparse.Namespace, cfg: Any, tls: tconfig.TlsFiles, progress: Progress,
               out: TextIO, *, update: bool = False) -> int:
    req = add_request(args, cfg, tls, progress.stream)  # all local checks first: a usage error changes nothing
    if update:
        async with progress.step(f"removing {args.agent_id} from the verifier"):
            st = await t.status(args.agent_id)
            if st["verifier"] is not None:
                await t.delete(args.agent_id, timeout=req.timeout)
    if getattr(args, "push", False):
        async with progress.step(f"enrolling {args.agent_id} as a push-mode agent"):
            await push.add_push_agent(t, req, warn=lambda text: print(
                f"keytrio tenant {args.tenant_verb}: warning: {text}", file=progress.stream, flush=True))
        print(f"agent {args.agent_id} {'updated' if update else 'enrolled'} in push mode: it attests when it "
              f"connects (`keytrio tenant attestations {args.agent_id}`)", file=out)
        return EXIT_OK
    what = "waiting for Get Quote" + (" and the agent's key check" if req.verify else "")
    async with progress.step(f"enrolling {args.agent_id}: identity quote, keys, verifier; {what}"):
        res = await t.enrol(req)
        rec = await wait_attested(t, args.agent_id, timeout=req.timeout)
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


async def _status(t: Tenant, args: argparse.Namespace, cfg: Any, tls: tconfig.TlsFiles, progress: Progress,
                  out: TextIO) -> int:
    st = await t.status(args.agent_id)
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True), file=out)
    else:
        print(format_status(st), file=out)
    return EXIT_OK


async def _attestations(t: Tenant, args: argparse.Namespace, cfg: Any, tls: tconfig.TlsFiles,
                        progress: Progress, out: TextIO) -> int:
    items = await push.attestations(t, args.agent_id)
    print(json.dumps(items, indent=2, sort_keys=True) if args.json else "\n".join(push.format_attestations(items)),
          file=out)
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
        raw = read_bytes(args.file, "--file")
        key = read_text(args.key, "--key") if args.key else None
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
        await mbpolicies.add(t, args.name, read_bytes(args.file, "--file"), update=mverb == "update")
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
    "attestations": _attestations,
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
