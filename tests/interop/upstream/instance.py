"""One upstream Keylime 7.14.3 instance (verifier + registrar, pull mode, SQLite, mTLS) in a directory.

Run by the interpreter of the venv that venv.sh makes (up.sh and down.sh call it):

    python instance.py up DIR      # DIR empty or absent; prints the tenant environment
    python instance.py down DIR    # stops what ``up DIR`` started
    python instance.py restart DIR verifier|registrar   # stop one server and start it again (same env)
    python instance.py serve verifier|registrar   # the server launcher (used by ``up``)

Everything the instance writes stays in DIR::

    DIR/conf/{verifier,registrar,tenant,ca,logging}.conf   upstream configuration files
    DIR/work/                KEYLIME_DIR: cv_ca/ (made by the verifier), SQLite databases
    DIR/run/<server>.pid     launcher pid = process group id (each server runs in its own session)
    DIR/logs/<server>.log    server output
    DIR/env.sh               ``export NAME="value"`` lines: what upstream's tools need
    DIR/venv                 symlink to the venv

Environment read by ``up``: VERIFIER_PORT, REGISTRAR_PORT (plain HTTP, agents), REGISTRAR_TLS_PORT
(default: free ports), KL_QUOTE_INTERVAL (default 2), KL_MAX_WORKERS (default 1),
KL_REQUIRE_EK_CERT (default False: swtpm's EK CA is not in an empty tpm_cert_store),
KL_START_TIMEOUT (seconds, default 90), KL_VERIFIER_MODE (pull, the default, or push: the verifier
is started in pull mode, which makes cv_ca and answers /version, then restarted with
KEYLIME_VERIFIER_MODE=push, whose /version answers 410; see ``up``). Upstream also reads any option from ``KEYLIME_<SECTION>_<OPTION>``
variables, which pass through to the servers, e.g. KEYLIME_VERIFIER_MEASURED_BOOT_POLICY_NAME=example.

Only the standard library is used outside ``serve``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
SERVERS = ("verifier", "registrar")
MARKER = b"instance.py\0serve\0"  # in /proc/<pid>/cmdline of the launchers we start


def _free_port(taken: set[int]) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken:
            return port


def _ini(sections: dict[str, dict[str, object]]) -> str:
    out = []
    for name, options in sections.items():
        out.append(f"[{name}]")
        out.extend(f"{key} = {value}" for key, value in options.items())
        out.append("")
    return "\n".join(out)


# Config version 2.6 = keylime 7.14.3's; upstream refuses to start when an option it reads is
# missing, so each file carries every option of its section (values: upstream's defaults unless
# noted). "default" TLS paths resolve under KEYLIME_DIR/cv_ca, which the verifier fills on its
# first start (tls_dir = generate) and the registrar and tenant then reuse (tls_dir = default).
def _configs(d: Path, vport: int, rport: int, rtls: int) -> dict[str, str]:
    env = os.environ.get
    tls_default = {"server_key": "default", "server_key_password": "", "server_cert": "default",
                   "cert_subject_alternative_names": "", "trusted_client_ca": "default"}
    durable = {"durable_attestation_import": "", "persistent_store_url": "", "transparency_log_url": "",
               "time_stamp_authority_url": "", "time_stamp_authority_certs_path": "",
               "persistent_store_format": "json", "persistent_store_encoding": "",
               "transparency_log_sign_algo": "sha256"}
    workers = env("KL_MAX_WORKERS", "1")
    verifier = {
        "version": "2.6", "uuid": "default", "ip": '"127.0.0.1"', "port": vport,
        "registrar_ip": "127.0.0.1", "registrar_port": rtls, "enable_agent_mtls": "True",
        "tls_dir": "generate", **tls_default,
        "client_key": "default", "client_key_password": "", "client_cert": "default", "trusted_server_ca": "default",
        "authorization_provider": "simple", "database_url": "sqlite", "database_pool_sz_ovfl": "5,10",
        "auto_migrate_db": "True", "num_workers": 0, "max_workers": workers,
        "exponential_backoff": "True", "retry_interval": 2, "max_retries": 5,
        "quote_interval": env("KL_QUOTE_INTERVAL", "2"), "max_upload_size": 104857600, "request_timeout": 60.0,
        # accept-all: the measured-boot tests choose "example" through KEYLIME_VERIFIER_MEASURED_BOOT_POLICY_NAME
        "measured_boot_policy_name": "accept-all", "measured_boot_imports": "[]", "measured_boot_evaluate": "once",
        "severity_labels": '["info", "notice", "warning", "error", "critical", "alert", "emergency"]',
        "severity_policy": '[{"event_id": ".*", "severity_label" : "emergency"}]',
        "ignore_tomtou_errors": "False", **durable, "signed_attributes": "",
        "require_allow_list_signatures": "False", "mode": "pull", "challenge_lifetime": 1800,
        "verification_timeout": 0, "session_create_rate_limit_per_ip": 50,
        "session_create_rate_limit_window_ip": 60, "session_create_rate_limit_per_agent": 15,
        "session_create_rate_limit_window_agent": 60, "session_lifetime": 180,
        "extend_token_on_attestation": "True", "auto_recover_attestation_failures": "False",
        "shutdown_drain_timeout": 10,
    }
    revocations = {"enabled_revocation_notifications": "['agent']", "zmq_ip": "127.0.0.1", "zmq_port": 8992,
                   "webhook_url": ""}
    registrar = {
        "version": "2.6", "ip": '"127.0.0.1"', "port": rport, "tls_port": rtls, "tls_dir": "default", **tls_default,
        "authorization_provider": "simple", "database_url": "sqlite", "database_pool_sz_ovfl": "5,10",
        "max_workers": workers, "auto_migrate_db": "True", **durable,
        "signed_attributes": "ek_tpm,aik_tpm,ekcert", "tpm_identity": "default", "malformed_cert_action": "warn",
    }
    tenant = {
        "version": "2.6", "verifier_ip": "127.0.0.1", "verifier_port": vport, "registrar_ip": "127.0.0.1",
        "registrar_port": rtls, "tls_dir": "default", "enable_agent_mtls": "True", "client_key": "default",
        "client_key_password": "", "client_cert": "default", "trusted_server_ca": "default",
        "tpm_cert_store": d / "work" / "tpm_cert_store", "max_payload_size": 1048576,
        "accept_tpm_hash_algs": "['sha512', 'sha384', 'sha256']", "accept_tpm_encryption_algs": "['ecc', 'rsa']",
        "accept_tpm_signing_algs": "['ecschnorr', 'rsassa']", "exponential_backoff": "True",
        "retry_interval": 2, "max_retries": 5, "request_timeout": 60,
        "require_ek_cert": env("KL_REQUIRE_EK_CERT", "False"), "ek_check_script": "", "mb_refstate": "",
    }
    ca = {
        "version": "2.6", "password": "default", "cert_country": "US",
        "cert_ca_name": "Keylime Certificate Authority", "cert_state": "MA", "cert_locality": "Lexington",
        "cert_organization": "Keylime", "cert_org_unit": 53, "cert_ca_lifetime": 3650, "cert_lifetime": 365,
        "cert_bits": 2048, "cert_crl_dist": "http://localhost:38080/crl",
    }
    logging_conf = {
        "logging": {"version": "2.6"},
        "loggers": {"keys": "root,keylime"},
        "handlers": {"keys": "consoleHandler"},
        "formatters": {"keys": "formatter"},
        "formatter_formatter": {"format": "%(asctime)s.%(msecs)03d - %(name)s - %(levelname)s - %(message)s",
                                "datefmt": "%Y-%m-%d %H:%M:%S"},
        "logger_root": {"level": "INFO", "handlers": "consoleHandler"},
        "handler_consoleHandler": {"class": "StreamHandler", "level": "INFO", "formatter": "formatter",
                                   "args": "(sys.stdout,)"},
        "logger_keylime": {"level": "INFO", "qualname": "keylime", "handlers": ""},
    }
    return {
        "verifier": _ini({"verifier": verifier, "revocations": revocations}),
        "registrar": _ini({"registrar": registrar}),
        "tenant": _ini({"tenant": tenant}),
        "ca": _ini({"ca": ca}),
        "logging": _ini(logging_conf),
    }


def _tool_env(d: Path, vport: int, rport: int, rtls: int) -> dict[str, str]:
    conf = d / "conf"
    return {
        "KEYLIME_DIR": str(d / "work"),
        **{f"KEYLIME_{name.upper()}_CONFIG": str(conf / f"{name}.conf")
           for name in ("verifier", "registrar", "tenant", "ca", "logging")},
        "KL_RUNTIME_DIR": str(d / "run"),
        "KL_VERIFIER_URL": f"https://127.0.0.1:{vport}",
        "KL_REGISTRAR_URL": f"http://127.0.0.1:{rport}",
        "KL_REGISTRAR_TLS_URL": f"https://127.0.0.1:{rtls}",
        "KL_CA_DIR": str(d / "work" / "cv_ca"),
    }


def _probe(url: str, ca_dir: Path | None, status: int = 200) -> bool:
    """GET url/version answers ``status``; with ca_dir over mTLS with the cv_ca client certificate."""
    context = None
    if ca_dir is not None:
        context = ssl.create_default_context(cafile=str(ca_dir / "cacert.crt"))
        context.load_cert_chain(ca_dir / "client-cert.crt", ca_dir / "client-private.pem")
    try:
        with urllib.request.urlopen(f"{url}/version", timeout=3, context=context) as resp:
            return resp.status == status
    except urllib.error.HTTPError as exc:
        return exc.code == status
    except (OSError, ssl.SSLError):
        return False


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def up(d: Path) -> int:
    d.mkdir(parents=True, exist_ok=True)
    d = d.resolve()
    if any(d.iterdir()):
        print(f"up: {d} is not empty", file=sys.stderr)
        return 2
    ports: list[int] = []
    for name in ("VERIFIER_PORT", "REGISTRAR_PORT", "REGISTRAR_TLS_PORT"):
        value = os.environ.get(name)
        ports.append(int(value) if value else _free_port(set(ports)))
    vport, rport, rtls = ports
    for sub in ("conf", "work", "run", "logs"):
        (d / sub).mkdir(mode=0o700)
    (d / "work" / "tpm_cert_store").mkdir()
    (d / "venv").symlink_to(Path(sys.prefix))
    for name, text in _configs(d, vport, rport, rtls).items():
        (d / "conf" / f"{name}.conf").write_text(text)
    tool_env = _tool_env(d, vport, rport, rtls)
    lines = [f'export PATH="{d / "venv" / "bin"}:$PATH"']
    lines += [f'export {key}="{value}"' for key, value in tool_env.items()]
    (d / "env.sh").write_text("# source me: upstream's tools against this instance\n" + "\n".join(lines) + "\n")

    child_env = {**os.environ, **tool_env}
    child_env.pop("VIRTUAL_ENV", None)
    deadline = time.monotonic() + float(os.environ.get("KL_START_TIMEOUT", "90"))

    def start(server: str, extra: dict[str, str] | None = None) -> int:
        return _start(d, server, child_env, extra or {})

    def wait(what: str, ready: Callable[[], bool], servers: tuple[str, ...]) -> bool:
        while not ready():
            for server in servers:
                if not _alive(int((d / "run" / f"{server}.pid").read_text())):
                    print(f"up: the {server} exited before {what}:\n{_tail(d / 'logs' / f'{server}.log')}",
                          file=sys.stderr)
                    return False
            if time.monotonic() > deadline:
                print(f"up: timed out waiting for {what}", file=sys.stderr)
                return False
            time.sleep(0.3)
        return True

    ca_dir = d / "work" / "cv_ca"
    start("verifier")
    # the registrar serves with the certificates the verifier generates on its first start
    if not wait("cv_ca was generated",
                lambda: all((ca_dir / f).is_file() and (ca_dir / f).stat().st_size
                            for f in ("cacert.crt", "server-cert.crt", "client-cert.crt", "client-private.pem")),
                ("verifier",)):
        down(d)
        return 1
    # upstream writes its cv_ca keys 0640 (umask 0o037); keytrio's actors and tools refuse a key
    # of their own user that group may read (ssh's rule), so hand them over as an operator would
    for key in ca_dir.glob("*-private.pem"):
        key.chmod(0o600)
    start("registrar")
    if not wait("both servers answered /version",
                lambda: _probe(tool_env["KL_VERIFIER_URL"], ca_dir)
                and _probe(tool_env["KL_REGISTRAR_URL"], None)
                and _probe(tool_env["KL_REGISTRAR_TLS_URL"], ca_dir),
                SERVERS):
        down(d)
        return 1
    if os.environ.get("KL_VERIFIER_MODE", "pull") == "push":
        # upstream's push-mode verifier answers /version with 410 and serves /v3 to agents; started
        # in pull mode first (cv_ca made, every server answering), then restarted in push mode
        if _stop_server(d, "verifier", 20.0) != 0:
            down(d)
            return 1
        start("verifier", {"KEYLIME_VERIFIER_MODE": "push"})
        if not wait("the verifier answered /version with 410 in push mode",
                    lambda: _probe(tool_env["KL_VERIFIER_URL"], ca_dir, status=410), ("verifier",)):
            down(d)
            return 1
    print(f"[up] upstream Keylime 7.14.3 answers: verifier {tool_env['KL_VERIFIER_URL']}, registrar "
          f"{tool_env['KL_REGISTRAR_URL']} / {tool_env['KL_REGISTRAR_TLS_URL']}", file=sys.stderr)
    print((d / "env.sh").read_text(), end="")
    return 0


def _start(d: Path, server: str, env: dict[str, str], extra: dict[str, str]) -> int:
    """Launch one server in its own session (pid = process group: down stops the whole tree);
    ``extra`` (e.g. KEYLIME_VERIFIER_MODE) is kept in DIR/run/<server>.env for ``restart``."""
    with open(d / "logs" / f"{server}.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, str(HERE / "instance.py"), "serve", server], cwd=d,
                                env={**env, **extra}, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    (d / "run" / f"{server}.pid").write_text(f"{proc.pid}\n")
    (d / "run" / f"{server}.env").write_text(json.dumps(extra))
    print(f"[up] {server} started, pid {proc.pid}, log {d / 'logs' / f'{server}.log'}", file=sys.stderr)
    return proc.pid


def restart(d: Path, server: str) -> int:
    """Stop one server of ``up DIR`` and start it again with the same environment; wait until it answers."""
    d = d.resolve()
    tool_env = {}
    for line in (d / "env.sh").read_text().splitlines():
        if line.startswith("export ") and not line.startswith("export PATH="):
            key, _, value = line.removeprefix("export ").partition("=")
            tool_env[key] = value.strip('"')
    env = {**os.environ, **tool_env}
    env.pop("VIRTUAL_ENV", None)
    extra = json.loads((d / "run" / f"{server}.env").read_text())
    if _stop_server(d, server, float(os.environ.get("KL_STOP_GRACE", "20"))) != 0:
        return 1
    pid = _start(d, server, env, extra)
    url = tool_env["KL_VERIFIER_URL"] if server == "verifier" else tool_env["KL_REGISTRAR_TLS_URL"]
    status = 410 if extra.get("KEYLIME_VERIFIER_MODE") == "push" else 200
    deadline = time.monotonic() + float(os.environ.get("KL_START_TIMEOUT", "90"))
    while not _probe(url, d / "work" / "cv_ca", status=status):
        if not _alive(pid) or time.monotonic() > deadline:
            print(f"restart: the {server} did not answer:\n{_tail(d / 'logs' / f'{server}.log')}", file=sys.stderr)
            return 1
        time.sleep(0.3)
    print(f"[restart] {server} answers again, pid {pid}", file=sys.stderr)
    return 0


def _reap(pid: int) -> None:
    """Collect the launcher if ``up`` started it in this process (a zombie still counts as alive)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child (down.sh): init reaps it


def _stop_server(d: Path, server: str, grace: float) -> int:
    """SIGTERM the server's process group, SIGKILL after ``grace`` s; 1 if it survived."""
    pid_file = d / "run" / f"{server}.pid"
    try:
        pgid = int(pid_file.read_text())
    except (OSError, ValueError):
        return 0
    try:
        ours = MARKER + server.encode() in Path(f"/proc/{pgid}/cmdline").read_bytes()
    except OSError:
        ours = False  # the launcher is gone; its group may still hold workers
    if not ours and Path(f"/proc/{pgid}").exists():
        print(f"[down] {server}: pid {pgid} is not our launcher any more; left alone", file=sys.stderr)
        pid_file.unlink()
        return 0
    for sig, wait_s in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not _alive(pgid):
            break
        os.killpg(pgid, sig)
        end = time.monotonic() + wait_s
        while _alive(pgid) and time.monotonic() < end:
            _reap(pgid)
            time.sleep(0.2)
    _reap(pgid)
    if _alive(pgid):
        print(f"[down] {server}: process group {pgid} survived SIGKILL", file=sys.stderr)
        return 1
    pid_file.unlink()
    print(f"[down] {server} stopped", file=sys.stderr)
    return 0


def down(d: Path, grace: float | None = None) -> int:
    grace = float(os.environ.get("KL_STOP_GRACE", "20")) if grace is None else grace
    failed = False
    for server in reversed(SERVERS):
        failed |= _stop_server(d, server, grace) != 0
    return 1 if failed else 0


def serve(server: str) -> None:
    """Start one upstream server. keylime 7.14.3 hard-codes /run/keylime for its multiprocessing
    manager socket (keylime.shared_data._RUNTIME_DIR) and the revocation notifier's ZeroMQ IPC
    socket (keylime.revocation_notifier._SOCKET_PATH): both move into KL_RUNTIME_DIR, so instances
    run side by side and without root."""
    runtime = os.environ["KL_RUNTIME_DIR"]
    import keylime.revocation_notifier as notifier
    import keylime.shared_data as shared_data

    shared_data._RUNTIME_DIR = runtime
    notifier._SOCKET_PATH = os.path.join(runtime, "keylime.verifier.ipc")
    if server == "verifier":
        from keylime.cmd.verifier import main
    elif server == "registrar":
        from keylime.cmd.registrar import main
    else:
        raise SystemExit(f"serve: unknown server {server!r}")
    sys.argv = [f"keylime_{server}"]
    main()


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "serve":
        serve(argv[1])
        return 0
    if len(argv) == 3 and argv[0] == "restart" and argv[2] in SERVERS:
        return restart(Path(argv[1]), argv[2])
    if len(argv) == 2 and argv[0] in ("up", "down"):
        return up(Path(argv[1])) if argv[0] == "up" else down(Path(argv[1]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
