"""The `keytrio` command.

Production verbs (registrar, verifier, agent, tenant, ca, policy, eventlog, completion) are defined here and
in each actor's own cli module. Further verbs plug in through the `keytrio.verbs` entry-point
group: a callable taking the top-level subparsers. The testbed and scenario verbs come that way
(keytrio.scenarios.cli:register), so a service verb never imports the testbed.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import import_module, metadata

from keytrio import __version__

PLUGIN_GROUP = "keytrio.verbs"
# verb -> the module whose register() defines it. A command names one verb, so only that verb's
# module is imported: `keytrio eventlog` or `keytrio tenant` does not load the servers' code.
VERB_MODULES = {
    "registrar": "keytrio.actors.registrar.cli",
    "verifier": "keytrio.actors.verifier.cli",
    "agent": "keytrio.actors.agent.cli",
    "ca": "keytrio.actors.ca.cli",
    "tenant": "keytrio.actors.tenant.cli",
    "policy": "keytrio.actors.policy.cli",
    "eventlog": "keytrio.actors.eventlog.cli",
}
BUILTIN_VERBS = frozenset({*VERB_MODULES, "completion"})


def register(subparsers: argparse._SubParsersAction, only: str | None = None) -> None:
    """Add the actor verbs (or just `only`) to the top-level parser."""
    for verb, module in VERB_MODULES.items():
        if only in (None, verb):
            import_module(module).register(subparsers)


def _plugins() -> list[metadata.EntryPoint]:
    return sorted(metadata.entry_points(group=PLUGIN_GROUP), key=lambda ep: ep.name)


def build_parser(*, plugins: bool = True, only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keytrio",
        description="Keylime-compatible remote attestation on Trio, with a software-TPM testbed.",
    )
    parser.add_argument("--version", action="version", version=f"keytrio {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    register(verbs, only)
    comp = verbs.add_parser("completion", help="print a shell completion script (bash)")
    comp.add_argument("shell", choices=["bash"], help="the shell")
    comp.set_defaults(func=_completion)
    if plugins:
        for ep in _plugins():
            ep.load()(verbs)
    return parser


def _words(parser: argparse.ArgumentParser, path: tuple[str, ...], out: dict[str, list[str]]) -> None:
    """Collect, for each verb path, the words that may follow it (sub-verbs and options)."""
    words: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                words.append(name)
                _words(sub, (*path, name), out)
        else:
            words += [s for s in action.option_strings if s.startswith("--")]
    out[" ".join(path)] = sorted(words)


def completion_script(parser: argparse.ArgumentParser) -> str:
    table: dict[str, list[str]] = {}
    _words(parser, (), table)
    cases = "\n".join(f'    "{path}") words="{" ".join(ws)}" ;;' for path, ws in sorted(table.items()))
    return f"""# bash completion for keytrio: eval "$(keytrio completion bash)"
_keytrio() {{
  local cur path="" i w words
  cur="${{COMP_WORDS[COMP_CWORD]}}"
  for ((i = 1; i < COMP_CWORD; i++)); do
    w="${{COMP_WORDS[i]}}"
    [[ $w == -* ]] && continue
    case "${{path:+$path }}$w" in
{chr(10).join(f'      "{p}") path="{p}" ;;' for p in sorted(table) if p)}
    esac
  done
  case "$path" in
{cases}
  esac
  COMPREPLY=($(compgen -W "$words" -- "$cur"))  # none: -o default completes file names
}}
complete -o default -F _keytrio keytrio
"""


def _completion(args: argparse.Namespace) -> int:
    print(completion_script(build_parser()), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    # The TSS logs expected TPM errors (probing, refused activations) to stderr; keytrio reports
    # its own errors. An operator can still ask for the TSS log by setting TSS2_LOG.
    os.environ.setdefault("TSS2_LOG", "all+NONE")
    argv = sys.argv[1:] if argv is None else argv
    # A production verb needs no plugin: its process never even imports the plugins' modules.
    verb = argv[0] if argv and argv[0] in BUILTIN_VERBS else None
    args = build_parser(plugins=verb is None, only=verb).parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
