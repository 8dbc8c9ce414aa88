"""The pull poll's floor: a minimal poller of the agents' API v2.1, to measure what a poll costs.

    python -m bench.floor_pull CA_DIR [INTERVAL]   # prints ``PORT <n>``; runs until SIGTERM/SIGINT

Not a verifier: a measuring instrument for issue 20 item 4 (docs/performance.md 4c.15), the pull
counterpart of bench.floor_push. It takes bench.fleet's admin requests (``POST /v2.x/allowlists/N``,
``POST /v2.x/agents/ID`` with the agent's address and AK, ``GET /v2.x/agents/?bulk``) and polls
each enrolled agent every INTERVAL seconds doing only what a pull verifier must do per poll, in
the fewest Python steps we know:

- one HTTPS exchange on a kept connection (``rawconn.RawConn``, the verifier's own client
  transport, with the verifier's client certificate): ``GET /v2.1/quotes/integrity`` with a fresh
  nonce, the PCR mask, ``partial`` and the IMA entry to start from; the answer read as a head of
  one split and a body of one Content-Length, and one ``json.loads``;
- the quote string split and base64-decoded (three parts), TPMS_ATTEST and TPMT_SIGNATURE decoded,
  the nonce, the selection, the PCR values' digest, the clock, one RSA verify (bench.floor_serve);
- PCR 16 compared with the binding of the agent's NK (computed once, from the first answer's
  ``pubkey``: ``partial=0`` until then), new IMA lines (none in a steady fleet) checked against the
  policy and replayed, PCR 10 compared;
- one row per poll to SQLite, batched as in bench.floor_push; one trio task per agent, sleeping
  to its next poll on the verifier's shared timer (actors/verifier/poll_timer.py, its slack too).

Left out (a lower bound, not a rival): retries and backoff, timeouts, failure records and
revocation notices, V delivery, the monitor's hand-overs, leases, metrics. A poll that fails
a check marks the agent failed and stops its task.
"""

from __future__ import annotations

import base64
import json
import secrets
import ssl
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from bench import floor_serve
from bench.floor_serve import Answer, Seen
from keytrio.actors.common.rawconn import RawConn
from keytrio.actors.verifier.poll_timer import PollTimer
from keytrio.protocol import tpm2

_B64 = base64.b64decode
PCRS = (10, 16)
MASK = hex(sum(1 << p for p in PCRS))


@dataclass
class Agent:
    agent_id: str
    host: str
    port: int
    ak: tpm2.AkKey
    seen: Seen = field(default_factory=Seen)
    pcr16: bytes | None = None  # the NK binding, once the agent sent its pubkey


class Poller(floor_serve.Admin):
    def __init__(self, db_path: Path, interval: float, nursery: trio.Nursery, ctx: ssl.SSLContext) -> None:
        super().__init__()
        self.interval = interval
        self.nursery = nursery
        self.ctx = ctx
        # the verifier's own timer and slack: trio.sleep_until would add a cancel scope and an
        # exception per poll and agent (poll_timer.py), which no poller needs to pay
        self.timer = PollTimer(nursery, slack=min(0.05, interval / 40))
        self.rows = floor_serve.Rows(db_path)

    def answer(self, method: str, path: str, headers: dict[str, str], body: bytes, client_cert: bool) -> Answer:
        return self.admin(method, path, body, client_cert)

    def enrol(self, agent_id: str, doc: dict[str, Any]) -> Agent:
        agent = Agent(agent_id, doc["cloudagent_ip"], int(doc["cloudagent_port"]), tpm2.ak_key(_B64(doc["ak_tpm"])))
        self.nursery.start_soon(self.poll, agent)
        return agent

    async def poll(self, agent: Agent) -> None:
        try:
            conn = await RawConn.connect(agent.host, agent.port, self.ctx)
        except OSError as exc:
            agent.seen.failed = f"connect: {exc!r}"
            return
        clock = trio.lowlevel.current_clock()
        base = f"GET /v2.1/quotes/integrity?mask={MASK}&"
        host = f" HTTP/1.1\r\nHost: {agent.host}:{agent.port}\r\n\r\n"
        seen = agent.seen
        buf = b""
        due = clock.current_time()
        try:
            while True:
                nonce = secrets.token_hex(10)
                partial = "0" if agent.pcr16 is None else "1"
                await conn.send_all(f"{base}nonce={nonce}&partial={partial}&ima_ml_entry={seen.next_line}{host}"
                                    .encode("latin-1"))
                while (end := buf.find(b"\r\n\r\n")) < 0:
                    buf += await _more(conn)
                lines = buf[:end].split(b"\r\n")
                if lines[0][9:12] != b"200":
                    raise ValueError(f"the agent answered {lines[0][:40]!r}")
                length = next(int(h[15:]) for h in lines[1:] if h[:15].lower() == b"content-length:")
                while len(buf) < end + 4 + length:
                    buf += await _more(conn)
                body, buf = buf[end + 4 : end + 4 + length], buf[end + 4 + length :]
                failure = self.check(agent, json.loads(body)["results"], nonce.encode("ascii"))
                self.rows.pending.append((agent.agent_id, seen.count, "pass" if failure is None else "fail", time.time()))
                if failure is not None:
                    seen.failed = failure
                    return
                due += self.interval
                await self.timer.sleep_until(due)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ValueError, LookupError, TypeError,
                StopIteration) as exc:  # the agent's poll ends (bad answers: ProtocolError is a ValueError); the others go on
            seen.failed = f"error: {exc!r}"
            print(f"{agent.agent_id}: {seen.failed}", file=sys.stderr, flush=True)
        finally:
            conn.close()

    def check(self, agent: Agent, results: dict[str, Any], nonce: bytes) -> str | None:
        seen = agent.seen
        message, signature, blob = results["quote"][1:].split(":")
        failure, values, clock = floor_serve.check_quote(agent.ak, _B64(message), _B64(signature), _B64(blob),
                                                         nonce, PCRS, seen)
        if failure is not None:
            return failure
        if agent.pcr16 is None:
            agent.pcr16 = tpm2.pcr16_binding_value("sha256", results["pubkey"])
        if values[16] != agent.pcr16:
            return "PCR 16 is not the NK's binding"
        failure = floor_serve.check_ima(seen, results["ima_measurement_list"], results["ima_measurement_list_entry"],
                                        values[10], self.policy)
        if failure is None:
            seen.count += 1
            seen.clock = clock
        return failure


async def _more(conn: RawConn) -> bytes:
    data = await conn.receive_some()
    if not data:
        raise trio.BrokenResourceError("the agent closed the connection")
    return data


async def floor_side(admin: httpx.AsyncClient, ca: Path, cpu: int, log: Any, agents: list[dict[str, Any]],
                     body: dict[str, Any], qi: float, seconds: float, served: Any, concurrency: int,
                     on_window: Any = None) -> dict[str, Any]:
    """One window of the pull agents ``agents`` (bench.fleet's enrolment dicts) polled by a fresh
    floor poller: bench.fleet._window's row, the polls counted as the agents served them."""
    from bench import fleet

    srv, url = floor_serve.start("bench.floor_pull", [str(ca), str(qi)], cpu, log)
    try:
        await fleet._upload(admin, url, body)
        await trio.sleep(0.5)
        rss0 = fleet.usage([srv.pid])[1]
        r = await fleet._window(admin, url, agents, lambda: [srv.pid], qi, seconds, rss0,
                                on_window=on_window, concurrency=concurrency, served=served)
        return {**r, "quote_interval": qi}
    finally:
        fleet.stop_child(srv)


def main() -> None:
    ca = Path(sys.argv[1])
    interval = float(sys.argv[2]) if len(sys.argv) > 2 else 2.0
    # the verifier's client certificate, as keytrio's verifier presents it to agents; the agent's
    # certificate is not checked (the handshake is outside the measured window either way)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(str(ca / "client-cert.crt"), str(ca / "client-private.pem"))

    trio.run(floor_serve.serve, ca, lambda tmp, nursery: Poller(tmp / "floor.sqlite", interval, nursery, ctx))


if __name__ == "__main__":
    main()
