#!/usr/bin/env bash
# venv.sh — make (once) the virtualenv that runs upstream Keylime 7.14.3 and print its path.
#
# The venv is kept between runs: KEYTRIO_KL_VENV, else KL_VENV, else ~/.cache/keytrio-klvenv.
# The first run pip-installs requirements.txt (keylime==7.14.3 and its pinned dependencies: a few
# minutes); later runs only compare a stamp and return at once. keylime imports the GPGME binding
# `gpg` unconditionally, and upstream expects it from the distribution (python3-gpg), not from
# PyPI: Debian's module is linked into the venv, so the venv's interpreter must be the Python that
# python3-gpg was built for (KEYTRIO_KL_PYTHON, default /usr/bin/python3).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${KEYTRIO_KL_VENV:-${KL_VENV:-$HOME/.cache/keytrio-klvenv}}"
python="${KEYTRIO_KL_PYTHON:-/usr/bin/python3}"
say() { printf '[kl-venv] %s\n' "$*" >&2; }

[[ -x "$python" ]] || { say "no interpreter $python (set KEYTRIO_KL_PYTHON)"; exit 1; }
mkdir -p "$(dirname "$venv")"
# one writer at a time: parallel test sessions share the venv
exec 9>"$venv.lock"
flock 9

stamp="$venv/.keytrio-requirements"
want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  if [[ ! -x "$venv/bin/python" ]]; then
    say "creating $venv with $python"
    "$python" -m venv "$venv"
  fi
  say "installing keylime 7.14.3 into $venv (first run only: a few minutes)"
  log="$(mktemp)"
  # env -u: never install into whatever venv the caller runs in
  if ! env -u VIRTUAL_ENV -u PYTHONPATH "$venv/bin/python" -m pip install -q --disable-pip-version-check \
      -r "$here/requirements.txt" >"$log" 2>&1; then
    cat "$log" >&2; rm -f "$log"; exit 1
  fi
  rm -f "$log"
  purelib="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  suffix="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
  if ! "$venv/bin/python" -c 'import gpg' 2>/dev/null; then
    debian_gpg=/usr/lib/python3/dist-packages/gpg
    if [[ ! -e "$debian_gpg/_gpgme$suffix" ]]; then
      say "python3-gpg for this interpreter is missing ($debian_gpg/_gpgme$suffix): apt-get install python3-gpg"
      exit 1
    fi
    ln -sfn "$debian_gpg" "$purelib/gpg"
  fi
  "$venv/bin/python" -c 'import keylime, gpg, tornado, sqlalchemy' \
    || { say "the venv cannot import keylime"; exit 1; }
  echo "$want" > "$stamp"
fi
echo "$venv"
