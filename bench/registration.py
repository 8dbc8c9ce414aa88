"""Benchmark 5: registrations/s and activations/s, keytrio's registrar vs upstream's (up.sh).

Same client (httpx over trio, plain HTTP keep-alive, ``concurrency`` requests in flight), same
inputs, both registrars pinned to the same CPU (the client on the others). The TPM material is
real and made once: one swtpm, its RSA-2048 EK (+ EK cert from NV) and one RSA AK, registered
under many fresh agent ids (both registrars accept the same EK/AK under different ids; the run
fails if one refuses). A round of one side is:

1. timed: POST ``/v2.1/agents/{id}`` for ``per_round`` new ids -> MakeCredential blobs;
2. untimed: TPM2_ActivateCredential of every blob on the swtpm -> auth tags (so the TPM, 5-12 ms
   per call, is never inside a timed section);
3. timed: PUT ``/v2.1/agents/{id}/activate`` with each tag (must answer 200).

Rounds alternate keytrio / upstream (A B, B A, ...). Rates are successful requests divided by the
wall time of the phase; latencies are per request. Controls (both sides, before timing): the same
id re-registered with a different AK must be refused (403), and a wrong auth tag must not activate.

    python -m bench.registration serve CV_CA_DIR DATA_DIR   # keytrio's registrar, prints PORTS
"""

from __future__ import annotations

import argparse
import base64
import logging
import sys
import tempfile
import time
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio

from bench import stats

API = "2.1"  # what the agents of both projects speak to the registrar


# --- keytrio's registrar as a server process ---------------------------------------------------------


async def serve(ca_dir: Path, data_dir: Path) -> None:
    from keytrio.actors.registrar.actor import Registrar
    from keytrio.actors.registrar.config import load_config

    opts = {
        "ip": "127.0.0.1", "port": 0, "tls_port": 0, "data_dir": str(data_dir),
        "server_cert": str(ca_dir / "server-cert.crt"), "server_key": str(ca_dir / "server-private.pem"),
        "trusted_client_ca": [str(ca_dir / "cacert.crt")], "metrics_port": -1, "graceful_timeout": 0.5,
    }  # fmt: skip
    registrar = Registrar(load_config(None, env={}, overrides=opts))
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(registrar.run)
        print(f"PORTS {addrs.http[1]} {addrs.https[1]}", flush=True)


# --- TPM material --------------------------------------------------------------------------------------


@dataclass
class Material:
    """One real EK/AK (and a second AK for the identity-change control), opened on a swtpm."""

    tpm: Any
    ek: Any
    ak: Any
    body: dict[str, Any]  # the registration body (ek_tpm, ekcert, aik_tpm, mtls_cert, ip, port)
    other_ak_b64: str


async def _material(tpm: Any, tmp: Path) -> Material:
    from keytrio.actors.agent import datadir

    ek = await tpm.endorsement_key(alg="rsa2048")
    ak = await tpm.create_ak(ek, alg="rsa", hash_alg="sha256")
    other = await tpm.create_ak(ek, alg="rsa", hash_alg="sha256")
    other_b64 = base64.b64encode(other.public).decode()
    await tpm.flush(other)  # swtpm has 3 transient slots
    datadir.ensure_dir(tmp / "agent")
    _nk, _nk_pem, cert_pem = datadir.load_or_create_nk(tmp / "agent", "127.0.0.1")
    body = {
        "ek_tpm": base64.b64encode(ek.public).decode(),
        "ekcert": base64.b64encode(ek.cert_der).decode() if ek.cert_der else None,
        "aik_tpm": base64.b64encode(ak.public).decode(),
        "mtls_cert": cert_pem, "ip": "127.0.0.1", "port": 9002,
    }  # fmt: skip
    return Material(tpm, ek, ak, body, other_b64)


# --- the load ------------------------------------------------------------------------------------------


async def _phase(client: httpx.AsyncClient, jobs: list[tuple[str, str, dict[str, Any]]], concurrency: int
                 ) -> tuple[list[float], dict[str, Any], dict[int, int], float]:
    """Run ``(method, url, body)`` jobs with ``concurrency`` workers -> (latencies of 200s,
    results by url, non-200 status counts, wall seconds)."""
    latencies: list[float] = []
    results: dict[str, Any] = {}
    bad: dict[int, int] = {}
    it = iter(jobs)

    async def worker() -> None:
        for method, url, body in it:
            t0 = time.perf_counter()
            try:
                r = await client.request(method, url, json=body)
                status = r.status_code
                res = r.json().get("results") if status == 200 else None
            except (httpx.HTTPError, ValueError):
                status, res = 599, None
            if status == 200:
                latencies.append(time.perf_counter() - t0)
                results[url] = res
            else:
                bad[status] = bad.get(status, 0) + 1

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return latencies, results, bad, time.perf_counter() - t0


def _new_ids(n: int) -> list[str]:
    return [str(uuidlib.uuid4()) for _ in range(n)]


async def _tags(m: Material, blobs: dict[str, bytes]) -> dict[str, str]:
    from keytrio.protocol import credential

    out = {}
    for agent_id, blob in blobs.items():
        cred = await m.tpm.activate_credential(m.ak, m.ek, blob)
        out[agent_id] = credential.activation_auth_tag(cred, agent_id)
    return out


async def _round(client: httpx.AsyncClient, base: str, m: Material, n: int, concurrency: int) -> dict[str, Any]:
    ids = _new_ids(n)
    reg_lat, reg_res, reg_bad, reg_wall = await _phase(
        client, [("POST", f"{base}/v{API}/agents/{i}", m.body) for i in ids], concurrency)
    blobs = {}
    for i in ids:
        res = reg_res.get(f"{base}/v{API}/agents/{i}")
        if isinstance(res, dict) and isinstance(res.get("blob"), str):
            blobs[i] = base64.b64decode(res["blob"])
    tags = await _tags(m, blobs)
    act_lat, _res, act_bad, act_wall = await _phase(
        client, [("PUT", f"{base}/v{API}/agents/{i}/activate", {"auth_tag": t}) for i, t in tags.items()],
        concurrency)
    return {"reg": reg_lat, "reg_wall": reg_wall, "reg_errors": reg_bad,
            "act": act_lat, "act_wall": act_wall, "act_errors": act_bad}  # fmt: skip


async def _controls(client: httpx.AsyncClient, base: str, m: Material) -> dict[str, Any]:
    """An id registered + activated, then re-registered with another AK (must be refused); an id
    activated with a wrong tag (must not answer 200)."""
    agent_id, wrong_id = _new_ids(2)
    r = await client.post(f"{base}/v{API}/agents/{agent_id}", json=m.body)
    if r.status_code != 200:
        raise RuntimeError(f"{base}: registration refused: {r.status_code} {r.text[:300]}")
    tag = (await _tags(m, {agent_id: base64.b64decode(r.json()["results"]["blob"])}))[agent_id]
    a = await client.put(f"{base}/v{API}/agents/{agent_id}/activate", json={"auth_tag": tag})
    if a.status_code != 200:
        raise RuntimeError(f"{base}: activation refused: {a.status_code} {a.text[:300]}")
    changed = await client.post(f"{base}/v{API}/agents/{agent_id}", json={**m.body, "aik_tpm": m.other_ak_b64})
    await client.post(f"{base}/v{API}/agents/{wrong_id}", json=m.body)
    wrong = await client.put(f"{base}/v{API}/agents/{wrong_id}/activate", json={"auth_tag": "00" * 48})
    out = {"other_ak_same_id": changed.status_code, "wrong_auth_tag": wrong.status_code}
    if changed.status_code == 200 or wrong.status_code == 200:
        raise RuntimeError(f"{base}: control accepted: {out}")
    return out


async def _bench(urls: dict[str, str], tmp: Path, rounds: int, per_round: int, concurrency: int) -> dict[str, Any]:
    from keytrio.actors.agent.tpm import Tpm
    from keytrio.testbed.swtpm import swtpm_running

    out: dict[str, Any] = {name: {"reg": [], "act": [], "reg_wall": 0.0, "act_wall": 0.0, "reg_ok": 0, "act_ok": 0,
                                  "errors": {}} for name in urls}  # fmt: skip
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with swtpm_running(tmp / "swtpm", banks=("sha256",)) as sw, await Tpm.open(sw.tcti) as tpm:
        m = await _material(tpm, tmp)
        async with httpx.AsyncClient(timeout=60.0, limits=limits) as client:
            for name, base in urls.items():
                out[name]["controls"] = await _controls(client, base, m)
            names = list(urls)
            for r in range(rounds):
                for name in names if r % 2 == 0 else reversed(names):
                    res = await _round(client, urls[name], m, per_round, concurrency)
                    o = out[name]
                    for k in ("reg", "act"):
                        o[k] += res[k]
                        o[f"{k}_wall"] += res[f"{k}_wall"]
                        o[f"{k}_ok"] += len(res[k])
                        for status, count in res[f"{k}_errors"].items():
                            key = f"{k}:{status}"
                            o["errors"][key] = o["errors"].get(key, 0) + count
    return out


def run(args: argparse.Namespace, cpu: int) -> dict[str, Any]:
    """Benchmark 5 against the up.sh instance ``args.upstream_dir``; keytrio's registrar is started
    here with upstream's certificates (its HTTPS side is not used by this benchmark)."""
    from bench.http_load import _env_sh, pin_group, server_process

    up_dir: Path = args.upstream_dir
    env = _env_sh(up_dir)
    ca = Path(env["KL_CA_DIR"])
    pinned = pin_group(int((up_dir / "run" / "registrar.pid").read_text().strip()), cpu)
    rounds, per_round = args.reg_rounds, args.reg_per_round
    with tempfile.TemporaryDirectory(prefix="keytrio-bench-reg-") as tmp, \
            server_process(["bench.registration", "serve", str(ca), str(Path(tmp) / "registrar")],
                           Path(args.out) / "keytrio-registrar.log", cpu, "PORTS") as ports:
        urls = {"keytrio": f"http://127.0.0.1:{int(ports[0])}", "upstream": env["KL_REGISTRAR_URL"]}
        res = trio.run(_bench, urls, Path(tmp), rounds, per_round, args.reg_concurrency)
    report: dict[str, Any] = {"rounds": rounds, "per_round": per_round, "concurrency": args.reg_concurrency,
                              "upstream_pids_pinned": pinned, "api": API}  # fmt: skip
    for phase in ("reg", "act"):
        k, u = res["keytrio"], res["upstream"]
        rate = {n: (o[f"{phase}_ok"] / o[f"{phase}_wall"] if o[f"{phase}_wall"] else 0.0) for n, o in res.items()}
        report[phase] = {
            "rate": rate, "rate_speedup": rate["keytrio"] / rate["upstream"] if rate["upstream"] else float("nan"),
            "ok": {n: o[f"{phase}_ok"] for n, o in res.items()},
            "latency": stats.compare(k[phase], u[phase]) if k[phase] and u[phase] else None,
            "samples": {n: o[phase] for n, o in res.items()},
        }  # fmt: skip
    report["errors"] = {n: o["errors"] for n, o in res.items()}
    report["controls"] = {n: o["controls"] for n, o in res.items()}
    return report


def tables(reg: dict[str, Any]) -> str:
    rows = ["| | keytrio | upstream | keytrio/upstream |", "|---|---|---|---|"]
    for phase, label in (("reg", "registrations"), ("act", "activations")):
        p = reg[phase]
        rows.append(f"| {label}/s | {p['rate']['keytrio']:.1f} | {p['rate']['upstream']:.1f} | "
                    f"{p['rate_speedup']:.2f} (throughput ratio) |")
        lat = p["latency"]
        if lat:
            for q in ("median", "p10", "p90"):
                rows.append(f"| {label[:-1]} latency {q} | {stats.fmt_time(lat['keytrio'][q])} | "
                            f"{stats.fmt_time(lat['upstream'][q])} | {lat['keytrio'][q] / lat['upstream'][q]:.3f} |")
    errs = {n: ", ".join(f"{k}x{v}" for k, v in e.items()) or "0" for n, e in reg["errors"].items()}
    rows.append(f"| errors | {errs['keytrio']} | {errs['upstream']} | |")
    c = reg["controls"]
    rows.append(f"| controls: other AK same id / wrong auth_tag | {c['keytrio']['other_ak_same_id']} / "
                f"{c['keytrio']['wrong_auth_tag']} | {c['upstream']['other_ak_same_id']} / "
                f"{c['upstream']['wrong_auth_tag']} | |")
    return (f"### 5. Registration (POST /v{reg['api']}/agents/{{id}} + PUT .../activate, one real EK/AK under "
            f"{reg['rounds'] * reg['per_round']} new ids per side, "
            f"{reg['concurrency']} concurrent, keep-alive; TPM ActivateCredential outside the timed phases)\n\n"
            + "\n".join(rows))


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "serve":
        logging.basicConfig(level=logging.WARNING)
        trio.run(serve, Path(sys.argv[2]), Path(sys.argv[3]))
        return
    raise SystemExit("usage: python -m bench.registration serve CV_CA_DIR DATA_DIR")


if __name__ == "__main__":
    main()
