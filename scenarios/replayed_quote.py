"""Replayed quote: a relay in front of the agent answers the verifier with an old, genuine quote.

Story: an attacker sits between verifier and agent and holds the agent's TLS key (not its TPM):
a relay terminating TLS with the agent's own certificate and key, forwarding every request to
the real agent. The machine's network path is routed through it before enrolment, so the tenant's
add and the verifier's first polls pass through unchanged while the relay records the agent's
integrity-quote replies. Then the relay stops asking the agent and answers every quote request
with the first recorded reply: a quote that was genuine, signed by the machine's AK, for an old
nonce.
Expected verdict: Get Quote while forwarding; then Invalid Quote with
``qoute_validation.quote_validation`` (the quote's nonce is not the verifier's), and a signed
notice about the machine on the machine.
"""

from __future__ import annotations

from typing import Literal

import trio

from keytrio.actors.common import tls
from keytrio.actors.common.client import make_client
from keytrio.scenarios.runner import Expect, Run, scenario
from keytrio.testbed.machine import Machine
from keytrio.testbed.pki import CaFiles
from keytrio.testbed.world import GET_QUOTE, INVALID_QUOTE

EVENT = "qoute_validation.quote_validation"
EXPECT = {"m0": Expect(events=(EVENT,), notices=(("m0", EVENT),), states=(GET_QUOTE, INVALID_QUOTE),
                       final=INVALID_QUOTE)}
QUOTE_PATH = "/quotes/integrity"


class ReplayRelay:
    """TLS (the agent's cert + key) in, HTTPS to the agent out; one request per connection."""

    def __init__(self, machine: Machine, ca: CaFiles) -> None:
        self.machine = machine
        self.ca = ca
        self.mode: Literal["forward", "replay"] = "forward"
        self.recorded: list[bytes] = []  # integrity-quote reply bodies, in arrival order
        self.replayed = 0
        self.port = 0

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        data = self.machine.dir / "agent-data"
        ctx = tls.server_context(data / "nk-cert.pem", data / "nk-private.pem", mode="none")
        listeners = await trio.open_ssl_over_tcp_listeners(0, ctx, host="127.0.0.1")
        self.port = listeners[0].transport_listener.socket.getsockname()[1]
        assert self.machine.info is not None
        upstream_ctx = tls.client_context([self.ca.ca], self.ca.client_cert, self.ca.client_key,
                                          pinned_server_cert_pem=self.machine.info.mtls_cert)
        async with make_client(upstream_ctx, timeout=10) as upstream:
            task_status.started(self.port)
            await trio.serve_listeners(lambda s: self._handle(s, upstream), listeners)

    async def _handle(self, stream: trio.SSLStream, upstream: object) -> None:
        try:
            request = await _read_request(stream)
            if request is None:
                return
            method, target, body = request
            if self.mode == "replay" and QUOTE_PATH in target and self.recorded:
                status, reply = 200, self.recorded[0]
                self.replayed += 1
            else:
                url = "https://{}:{}{}".format(*self.machine.address, target)
                resp = await upstream.request(method, url, content=body or None,  # type: ignore[attr-defined]
                                              headers={"content-type": "application/json"} if body else None)
                status, reply = resp.status_code, resp.content
                if QUOTE_PATH in target and status == 200:
                    self.recorded.append(reply)
            head = (f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(reply)}\r\n"
                    "Connection: close\r\n\r\n").encode()
            await stream.send_all(head + reply)
            await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


async def _read_request(stream: trio.SSLStream) -> tuple[str, str, bytes] | None:
    data = b""
    with trio.move_on_after(10):
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        while len(body) < length:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return None
            body += chunk
        return method, target, body
    return None


@scenario("replayed-quote", expect=EXPECT)
async def replayed_quote(run: Run) -> None:
    async with run.testbed(machines=1) as tb, trio.open_nursery() as nursery:
        m = tb.machines[0]
        assert tb.ca is not None and m.proxy is not None
        relay = ReplayRelay(m, tb.ca)
        async with run.step("route the machine's network through a relay holding the agent's TLS key"):
            port = await nursery.start(relay.run)
            m.proxy.target = ("127.0.0.1", port)

        async with run.step("enrol through the relay (forwarding); the verifier attests"):
            await tb.enrol(m)
            await tb.wait_count(m, 3)
            run.note(f"{len(relay.recorded)} genuine quote replies recorded")

        async with run.step("the relay replays the first recorded quote: Invalid Quote"):
            relay.mode = "replay"
            rec = await tb.wait_state(m, INVALID_QUOTE)
            run.check(relay.replayed >= 1, "nothing was replayed")
            run.note(f"{relay.replayed} replayed; event {rec['last_event_id']}")
            await tb.wait_notices(m, 1)
        nursery.cancel_scope.cancel()
