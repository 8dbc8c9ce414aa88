#!/usr/bin/env bash
# up.sh DIR — start upstream Keylime 7.14.3 (verifier + registrar) with all its state in DIR.
#
# The project's own bring-up of upstream for tests/interop and bench/: venv.sh makes (once) the
# cached venv with keylime==7.14.3, then instance.py writes DIR/conf, starts both servers in their
# own sessions, waits until they answer, and prints DIR/env.sh (the tenant's environment).
# Ports, quote interval and pass-through KEYLIME_* options: see instance.py. Stop with down.sh DIR.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[[ $# -eq 1 ]] || { echo "usage: $0 DIR (empty or absent)" >&2; exit 2; }
venv="$("$here/venv.sh")"
exec env -u VIRTUAL_ENV -u PYTHONPATH "$venv/bin/python" "$here/instance.py" up "$1"
