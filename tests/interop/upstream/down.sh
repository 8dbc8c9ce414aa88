#!/usr/bin/env bash
# down.sh DIR — stop the upstream servers that up.sh DIR started (SIGTERM to each server's process
# group, SIGKILL after KL_STOP_GRACE seconds, default 20). Leaves DIR itself in place.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[[ $# -eq 1 && -d "$1/run" ]] || { echo "usage: $0 DIR (a directory started by up.sh)" >&2; exit 2; }
# stdlib only: any python3 will do, even when the venv is gone
exec python3 "$here/instance.py" down "$1"
