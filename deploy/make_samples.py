"""Regenerate the sample configurations of deploy/ from `keytrio <actor> --print-default-config`.

Run from the repository root after adding or changing an option: ``python deploy/make_samples.py``.
Each sample is the actor's commented default configuration with the lines of ``EDITS`` set for the
three-machine deployment of three-machines.md (192.0.2.10/.20/.30: verifier, registrar, agent).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
KEYTRIO = Path(sys.executable).parent / "keytrio"

EDITS: dict[str, dict[str, str]] = {
    "registrar": {"ip": '"192.0.2.20"', "server_cert": '"registrar-cert.crt"',
                  "server_key": '"registrar-private.pem"', "crl": '"cacrl.pem"'},
    "verifier": {"ip": '"192.0.2.10"', "crl": '"cacrl.pem"'},
    "agent": {"uuid": '"d432fbb3-d2f1-4a97-9ef7-75bd81c0a9e1"', "ip": '"192.0.2.30"',
              "registrar_ip": '"192.0.2.20"', "trusted_client_ca": '["/etc/keytrio/cv_ca/cacert.crt"]',
              "crl": '"/etc/keytrio/cv_ca/cacrl.pem"'},
    "tenant": {"registrar_ip": '"192.0.2.20"', "verifier_ip": '"192.0.2.10"',
               "tls_dir": '"/var/lib/keytrio/verifier/cv_ca"', "tpm_cert_store": '"/etc/keytrio/tpm_cert_store"'},
    # the same agent in push mode (API v3.0): it binds no port and needs no client CA
    "agent-push": {"uuid": '"d432fbb3-d2f1-4a97-9ef7-75bd81c0a9e1"', "registrar_ip": '"192.0.2.20"',
                   "mode": '"push"', "verifier_url": '"https://192.0.2.10:8881"',
                   "verifier_tls_ca_cert": '"/etc/keytrio/cv_ca/cacert.crt"'},
}

HEADER = ("# Sample for a three-machine deployment (deploy/three-machines.md): `keytrio {actor} "
          "--print-default-config`\n# with the lines below edited (deploy/make_samples.py). 192.0.2.10/.20/.30 "
          "stand for the verifier,\n# registrar and agent machines. Edited: {keys}.\n#\n")


def sample(name: str) -> str:
    actor = name.split("-")[0]  # agent-push: the agent's options, other edits
    text = subprocess.run([str(KEYTRIO), actor, "--print-default-config"], check=True, capture_output=True,
                          text=True).stdout
    for key, value in EDITS[name].items():
        pattern = re.compile(rf"^(# )?{re.escape(key)} = .*$", re.M)
        if len(pattern.findall(text)) != 1:
            raise SystemExit(f"{actor}: option {key} not found once in the default configuration")
        text = pattern.sub(lambda _m, k=key, v=value: f"{k} = {v}", text)
    return HEADER.format(actor=actor, keys=", ".join(EDITS[name])) + text


def main() -> int:
    for actor in EDITS:
        (HERE / f"{actor}.toml").write_text(sample(actor))
        print(f"deploy/{actor}.toml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
