"""Microbenchmark: server CPU per small HTTPS exchange on a kept connection, serve.py's TLS
transport (``TLSServerStream``) against ``trio.SSLStream`` (what serve.py used before).

The server side is a loop like serve.py's lean path (read a whole ~1.4 KB request, answer
~700 bytes with one write) on one or the other stream; the client is a separate process with a
blocking ``ssl`` socket, so the server's ``time.process_time()`` over the exchanges is the
server's CPU alone. Rounds alternate the two; the minimum per stream is printed.

    python -m bench.micro_serve_tls [--exchanges 3000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import ssl
import tempfile
import time
from pathlib import Path

import trio
import trustme

from keytrio.actors.common.serve import TLSServerStream

REQUEST = (b"PATCH /v3/agents/a1/attestations/latest HTTP/1.1\r\nHost: 127.0.0.1\r\n"
           b"Authorization: Bearer abc.def\r\nContent-Type: application/vnd.api+json\r\n"
           b"Content-Length: 1200\r\n\r\n" + b"x" * 1200)
ANSWER = b"HTTP/1.1 202 \r\ncontent-type: application/vnd.api+json\r\ncontent-length: 600\r\n\r\n" + b"y" * 600


def _client(port: int, ca: str, exchanges: int) -> None:
    ctx = ssl.create_default_context(cafile=ca)
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            for _ in range(exchanges + 1):  # one to warm up
                tls.sendall(REQUEST)
                got = 0
                while got < len(ANSWER):
                    got += len(tls.recv(65536))


async def _serve_one(kind: str, ctx: ssl.SSLContext, ca: str, exchanges: int) -> float:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    proc = multiprocessing.Process(target=_client, args=(listener.getsockname()[1], ca, exchanges))
    proc.start()
    sock, _ = await listener.accept()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if kind == "trio":
        stream = trio.SSLStream(trio.SocketStream(sock), ctx, server_side=True, https_compatible=True)
    else:
        stream = TLSServerStream(socket.socket(fileno=sock.detach()), ctx)
    await stream.do_handshake()
    t0 = 0.0
    for i in range(exchanges + 1):
        if i == 1:
            t0 = time.process_time()
        got = b""
        while len(got) < len(REQUEST):
            got += await stream.receive_some(65536)
        await stream.send_all(ANSWER)
    used = time.process_time() - t0
    await stream.aclose()
    listener.close()
    proc.join()
    return used / exchanges


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--exchanges", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    leaf.configure_cert(ctx)
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as d:
        ca_file = str(Path(d) / "ca.pem")
        ca.cert_pem.write_to_path(ca_file)
        for _ in range(args.rounds):
            for kind in ("trio", "lean"):
                per = trio.run(_serve_one, kind, ctx, ca_file, args.exchanges)
                best[kind] = min(best.get(kind, per), per)
                print(f"{kind}: {per * 1e6:.1f} us per exchange", flush=True)
    print(f"min: trio.SSLStream {best['trio'] * 1e6:.1f} us, TLSServerStream {best['lean'] * 1e6:.1f} us "
          f"({(best['trio'] - best['lean']) * 1e6:.1f} us less per exchange)")


if __name__ == "__main__":
    main()
