"""Property-based fuzzing of every route of a running actor over real sockets (no tests here).

* :func:`routes_of` lists ``(rule, methods)`` from an app's ``url_map``: a route added later is
  fuzzed without touching the suite.
* :func:`requests` is a hypothesis strategy of whole HTTP/1.1 requests (method, target with a
  hostile path and query, headers, body) that stay valid HTTP, so every answer must come from the
  app: a malformed JSON body (deep nesting, 5,000-digit integers, duplicate keys, NaN, bad UTF-8,
  lone surrogates), random JSON, raw bytes, or a *seed* (a valid body of the route) with one field
  replaced by a value that no field accepts. Requests that may change state only ever name unknown
  or malformed ids, so a right answer is always a refusal and the state must stay as it was.
* :class:`Fuzzer` runs the hypothesis engine in a worker thread (trio.to_thread.run_sync); each
  example sends its request from the trio loop that serves the actors (trio.from_thread.run) on a
  fresh connection, checks the answer (< 500, the JSON envelope with ``code`` = the status) and the
  caller's state snapshot before/after, and counts answers per status.

``KEYTRIO_FUZZ_EXAMPLES=N`` sets the examples per actor (the CI default keeps the whole suite near
two minutes); the seed is fixed (``derandomize=True``), so a run is reproducible.
"""

from __future__ import annotations

import json
import os
import sqlite3
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import h11
import trio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

GUARD = 30.0  # seconds: a hang guard for one request, never what a test asserts

#: HTTP methods the fuzzer may use on a route beyond its own (a wrong one must be a JSON 405)
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH")
MUTATING = frozenset({"POST", "PUT", "DELETE", "PATCH"})
VERSIONS = ("2.0", "2.1", "2.2", "2.3", "2.4", "2.5", "9.9", "2", "1.0", "2.1.0", "99999999999999999999999.1")


def examples(default: int) -> int:
    """Examples per actor: ``KEYTRIO_FUZZ_EXAMPLES`` when set (the long local mode)."""
    raw = os.environ.get("KEYTRIO_FUZZ_EXAMPLES", "")
    return int(raw) if raw.isascii() and raw.isdigit() and int(raw) > 0 else default


def routes_of(app: Any) -> list[tuple[str, tuple[str, ...]]]:
    """(rule, methods) of every route of a quart app (HEAD/OPTIONS are quart's, not ours)."""
    out = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        methods = tuple(sorted(m for m in (rule.methods or ()) if m not in ("HEAD", "OPTIONS")))
        out.append((rule.rule, methods))
    return sorted(out)


# --- hostile pieces ---------------------------------------------------------------------------------

#: JSON texts that a guarded decoder must refuse (or that no field accepts): inserted verbatim.
HOSTILE_JSON = (
    "[" * 100 + "]" * 100,
    "[" * 5000 + "]" * 5000,
    "{\"a\":" * 3000 + "1" + "}" * 3000,
    "[" * 200000,
    "1" * 5000,
    "-" + "9" * 4301,
    "1" * 65,
    "1e999999",
    "-1e999",
    "0." + "1" * 100000,
    "NaN",
    "Infinity",
    "-Infinity",
    '{"a": 1, "a": 2}',
    '"\\ud800"',
    '"\\udc80x"',
    '"\\u0000"',
    "[[0]]",
    '[[["x"]]]',
    '{"": [[0]]}',
)
#: The decoder-level classes put in every field of every seed (deep, long integer, NaN, duplicate
#: key, lone surrogate, nested list).
CORPUS_JSON = ("[" * 5000 + "]" * 5000, "-" + "9" * 4301, "NaN", '{"a": 1, "a": 2}', '"\\ud800"', "[[0]]")
#: Whole bodies: not JSON, not UTF-8, or JSON of the wrong shape.
HOSTILE_BODIES = (
    b"",
    b"\xff\xfe{\x00}\x00",
    b"\xef\xbb\xbf{}",
    b'{"a": "\xc3\x28"}',
    b'{"a": "\xed\xa0\x80"}',
    b"{",
    b"[]",
    b"null",
    b"1",
    b'"text"',
    b"{}",
    b'{"a":1}garbage',
    "{\"²\": \"²\"}".encode(),
)
#: Values for numeric text fields (ports, positions): Unicode digits, huge, signed, spaced.
NUMERIC_TEXT = ("²", "١٢٣", "٨٠٨٠", "\U0001d7d7", "1" * 5000, "-1", "+1", " 1", "1 ", "0x10", "1e3", "", "\u0660")
CONTENT_TYPES = (
    "application/json", "", "text/plain", "application/x-www-form-urlencoded", "application/foo+json",
    "multipart/form-data; boundary=xyz", "application/json; charset=utf-16", "image/png", "*/*",
    "application/json; charset=\"\\\"", "text/html; q=0.1, application/json",
)  # fmt: skip
QUERY_NAMES = ("nonce", "mask", "partial", "ima_ml_entry", "challenge", "verifier", "bulk",
               "agent_uuid", "quote", "hash_alg", "x")  # fmt: skip

_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.!~*'", min_size=1,
                 max_size=20)
_latin1_value = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
                        max_size=200).map(str.strip)


def _percent(raw: bytes) -> str:
    return quote(raw, safe="")


_segment = st.one_of(
    st.text(max_size=80).map(lambda s: _percent(s.encode("utf-8"))),
    st.binary(max_size=80).map(_percent),
    st.sampled_from(["", ".", "..", "%00", "%2e%2e", "%2F", "~", "A" * 300, "x" * 5000, "%ff%fe",
                     "00000000-0000-0000-0000-000000000000", "D432FBB3-D2F1-4A97-9EF7-75BD81C0FFFF",
                     "a" * 64, "Z" * 64, "%E2%80%AE", "%F0%9F%92%A9", "name.with.dots", "-", "_"]),
)


_UNKNOWN = {
    "agent_id": st.one_of(st.uuids().map(str), st.uuids().map(lambda u: str(u).upper()),
                          st.binary(min_size=32, max_size=32).map(bytes.hex)),
    "name": st.from_regex(r"\A[A-Za-z0-9_][A-Za-z0-9._:@+-]{0,40}\Z"),
}


@dataclass(frozen=True)
class Request:
    rule: str
    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    chunked: bool
    with_cert: bool

    def short(self) -> str:
        return f"{self.method} {self.target[:120]} body={self.body[:80]!r}"


@dataclass
class Seed:
    """A valid body of a route (method, rule): mutated before sending, never sent as it is."""

    method: str
    rule: str
    body: dict[str, Any]
    #: dotted paths of fields that hold numbers written as text
    numeric: frozenset[str] = frozenset()


def _fields(doc: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in doc.items():
        out.append(prefix + key)
        if isinstance(value, dict):
            out.extend(_fields(value, prefix + key + "."))
    return out


def _replace(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    head, _, rest = path.partition(".")
    new = dict(doc)
    new[head] = _replace(doc[head], rest, value) if rest else value
    return new


_MARK = "@@keytrio-fuzz@@"


@st.composite
def _mutated(draw: st.DrawFn, seed: Seed) -> bytes:
    path = draw(st.sampled_from(_fields(seed.body)))
    if path in seed.numeric and draw(st.booleans()):
        return json.dumps(_replace(seed.body, path, draw(st.sampled_from(NUMERIC_TEXT)))).encode()
    text = json.dumps(_replace(seed.body, path, _MARK))
    return text.replace(json.dumps(_MARK), draw(st.sampled_from(HOSTILE_JSON)), 1).encode()


_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.floats(allow_nan=False),
                       st.text(max_size=40))
_json_value = st.recursive(_json_leaf, lambda kids: st.one_of(st.lists(kids, max_size=5),
                                                             st.dictionaries(st.text(max_size=10), kids, max_size=5)),
                           max_leaves=30)


def _bodies(seeds: Sequence[Seed]) -> st.SearchStrategy[bytes]:
    options = [
        st.sampled_from(HOSTILE_BODIES),
        st.sampled_from(HOSTILE_JSON).map(str.encode),
        st.binary(max_size=300),
        _json_value.map(lambda v: json.dumps(v).encode()),
        st.dictionaries(st.text(max_size=20), _json_value, max_size=8).map(lambda v: json.dumps(v).encode()),
    ]
    options += [_mutated(s) for s in seeds] * 3  # seeds reach the deep validation: weigh them up
    return st.one_of(*options)


@st.composite
def requests(
    draw: st.DrawFn,
    routes: Sequence[tuple[str, tuple[str, ...]]],
    *,
    known: Mapping[str, Sequence[str]],
    seeds: Sequence[Seed] = (),
    cert_optional: bool = False,
) -> Request:
    """A whole request to one of ``routes``. ``known``: path parameter -> values that exist
    (used with GET only, so a mutating request never targets an existing record)."""
    rule, methods = draw(st.sampled_from(list(routes)))
    method = draw(st.sampled_from(METHODS)) if _rare(draw, 10) else draw(st.sampled_from(methods))
    path = rule
    for name in ("api_version", "agent_id", "name"):
        for marker in (f"<apiversion:{name}>", f"<{name}>"):
            if marker not in path:
                continue
            if name == "api_version":
                value = draw(st.sampled_from(VERSIONS)) if _rare(draw, 6) else "2.1"
            elif method == "GET" and known.get(name) and draw(st.booleans()):
                value = draw(st.sampled_from(list(known[name])))
            elif draw(st.booleans()):  # well-formed but unknown: the request reaches its body
                fresh = _UNKNOWN[name].filter(lambda v, k=tuple(known.get(name, ())): v not in k)
                value = draw(fresh)
            else:
                value = draw(_segment)
            path = path.replace(marker, value)
    if _rare(draw, 10):
        path += draw(st.sampled_from(["/", "//", "/x", "/..", "%00", ";x"]))
    params = draw(st.lists(st.tuples(st.one_of(st.sampled_from(QUERY_NAMES), _token),
                                     st.one_of(st.sampled_from(NUMERIC_TEXT), st.text(max_size=60),
                                               st.binary(max_size=40).map(lambda b: b.decode("latin-1")))),
                           max_size=5))
    query = "&".join(f"{_percent(k.encode())}={_percent(v.encode('utf-8', 'surrogatepass'))}" for k, v in params)
    if _rare(draw, 10):
        query = draw(st.sampled_from(["&&&", "=", "a=%", "a=%zz", "a", "%ff=%fe", "a=1;b=2", "?"]))
    target = path + ("?" + query if query else "")
    body = draw(_bodies([s for s in seeds if s.rule == rule and s.method == method] or list(seeds)))
    if method == "GET" and not _rare(draw, 3):
        body = b""
    headers = [("Content-Type", draw(st.sampled_from(CONTENT_TYPES)) if _rare(draw, 4) else "application/json")]
    headers += draw(st.lists(st.tuples(_token.map(lambda t: "X-" + t), _latin1_value), max_size=3))
    headers += draw(st.lists(st.sampled_from([("Accept", "*/*"), ("Accept", "text/html"),
                                              ("Accept-Encoding", "gzip, br"), ("Expect", "something"),
                                              ("Cookie", "a=" + "b" * 4000), ("Authorization", "Bearer x"),
                                              ("Range", "bytes=0-1"), ("If-None-Match", "*")]), max_size=2))
    chunked = _rare(draw, 8)
    with_cert = not cert_optional or not _rare(draw, 8)
    return Request(rule, method, target, tuple(headers), body, chunked, with_cert)


def _rare(draw: st.DrawFn, n: int) -> bool:
    """True about once in ``n`` (hypothesis favours the low end of a range: ask for the top)."""
    return draw(st.integers(0, n - 1)) == n - 1


def corpus(route: tuple[str, tuple[str, ...]], seeds: Sequence[Seed]) -> list[Request]:
    """The fixed cases sent to a route before hypothesis explores it: every hostile body, and every
    field of the route's seeds replaced by each decoder-level hostile value, on an unknown id."""
    rule, methods = route
    target = rule.replace("<apiversion:api_version>", "2.1")
    target = target.replace("<agent_id>", "d432fbb3-d2f1-4a97-9ef7-75bd81c0ffff").replace("<name>", "unknown-fuzz")
    out = []
    json_type = (("Content-Type", "application/json"),)
    for seed in seeds:
        if seed.rule != rule or seed.method not in methods:
            continue  # routes without a seed do not read a body: hypothesis alone covers them
        bodies = list(HOSTILE_BODIES) + [t.encode() for t in HOSTILE_JSON]
        for path in _fields(seed.body):
            for hostile in CORPUS_JSON:
                text = json.dumps(_replace(seed.body, path, _MARK))
                bodies.append(text.replace(json.dumps(_MARK), hostile, 1).encode())
            if path in seed.numeric:
                bodies += [json.dumps(_replace(seed.body, path, v)).encode() for v in NUMERIC_TEXT]
        out += [Request(rule, seed.method, target, json_type, b, False, True) for b in bodies]
    return out


# --- the raw client ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


async def send(host: str, port: int, ctx: ssl.SSLContext | None, req: Request) -> Answer:
    """One request on a fresh connection (TLS with ``ctx`` unless None)."""
    conn = h11.Connection(h11.CLIENT)
    headers = [(b"Host", f"{host}:{port}".encode()), (b"Connection", b"close")]
    headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in req.headers]
    if req.chunked:
        headers.append((b"Transfer-Encoding", b"chunked"))
    else:
        headers.append((b"Content-Length", str(len(req.body)).encode()))
    with trio.fail_after(GUARD):
        tcp = await trio.open_tcp_stream(host, port)
        stream: trio.abc.Stream = tcp
        if ctx is not None:
            stream = trio.SSLStream(tcp, ctx, server_hostname=host, https_compatible=True)
        async with stream:
            out = conn.send(h11.Request(method=req.method, target=req.target.encode("ascii"), headers=headers))
            if req.body:
                step = max(1, len(req.body) // 3) if req.chunked else len(req.body)
                for i in range(0, len(req.body), step):
                    out += conn.send(h11.Data(data=req.body[i:i + step]))
            out += conn.send(h11.EndOfMessage())
            await stream.send_all(out)
            status, got, chunks = 0, {}, []
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                    continue
                if isinstance(event, h11.Response):
                    status = event.status_code
                    got = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    break
    return Answer(status, got, b"".join(chunks))


def check_answer(req: Request, ans: Answer) -> None:
    """< 500, and the body is the envelope (204 excepted: upstream's empty DELETE answer)."""
    assert ans.status < 500, (req.short(), ans.status, ans.body[:300])
    if ans.status == 204:
        return
    assert ans.headers.get("content-type", "").startswith("application/json"), (req.short(), ans)
    doc = json.loads(ans.body)
    if req.rule == "/openapi.json" and ans.status == 200:  # the OpenAPI document, not an envelope
        assert isinstance(doc, dict) and str(doc.get("openapi", "")).startswith("3."), req.short()
        return
    if req.target.startswith(("/v3/", "/v3.0/")) or req.target in ("/v3", "/v3.0"):
        check_v3_answer(req, ans, doc)
        return
    assert isinstance(doc, dict) and doc.get("code") == ans.status, (req.short(), ans.body[:300])
    assert isinstance(doc.get("status"), str) and doc["status"], (req.short(), doc)
    assert isinstance(doc.get("results"), dict), (req.short(), doc)
    assert "Traceback" not in ans.body.decode("utf-8", "replace"), req.short()


def check_v3_answer(req: Request, ans: Answer, doc: object) -> None:
    """API v3 answers are JSON:API documents: errors carry their HTTP status as text."""
    assert isinstance(doc, dict), (req.short(), ans.body[:300])
    if ans.status >= 400:
        errors = doc.get("errors")
        assert isinstance(errors, list) and errors, (req.short(), doc)
        assert all(isinstance(e, dict) and e.get("status") == str(ans.status) for e in errors), (req.short(), doc)
        assert all(isinstance(e.get("detail"), str) and e["detail"] for e in errors), (req.short(), doc)
    else:
        assert "data" in doc or "results" in doc or "errors" not in doc, (req.short(), doc)
    assert "Traceback" not in ans.body.decode("utf-8", "replace"), req.short()


# --- state ------------------------------------------------------------------------------------------


def sqlite_dump(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every table of a SQLite file, rows sorted (a read-only connection; WAL readers see commits)."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        names = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {n: sorted(con.execute(f'SELECT * FROM "{n}"').fetchall(), key=repr) for n in names}
    finally:
        con.close()


def file_tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- the engine -------------------------------------------------------------------------------------


@dataclass
class Fuzzer:
    """Sends hypothesis-drawn requests to one actor and checks answer and state after each."""

    name: str
    host: str
    port: int
    ctx: ssl.SSLContext | None
    snapshot: Callable[[], Any]  # sync, runs in the worker thread
    anon_ctx: ssl.SSLContext | None = None  # for requests drawn without a client cert
    extra_check: Callable[[], Awaitable[None]] | None = None  # async, in the trio loop
    counts: Counter[int] = field(default_factory=Counter)
    rules: Counter[str] = field(default_factory=Counter)
    sent: int = 0

    def run(self, strategy: st.SearchStrategy[Request], max_examples: int) -> None:
        """Blocking: call through trio.to_thread.run_sync from the loop that serves the actor."""

        @settings(max_examples=max_examples, derandomize=True, deadline=None, database=None,
                  phases=(Phase.explicit, Phase.generate, Phase.shrink), print_blob=False,
                  suppress_health_check=list(HealthCheck))
        @given(strategy)
        def one(req: Request) -> None:
            self.check(req)

        one()

    def check(self, req: Request) -> None:
        """Blocking: send one request, check the answer and that the state did not move."""
        before = self.snapshot()
        ans = trio.from_thread.run(self._send, req)
        self.sent += 1
        self.counts[ans.status] += 1
        self.rules[req.rule] += 1
        check_answer(req, ans)
        assert self.snapshot() == before, ("state changed", req.short(), ans.status, ans.body[:300])
        if self.extra_check is not None:
            trio.from_thread.run(self.extra_check)

    def run_routes(self, routes: Sequence[tuple[str, tuple[str, ...]]], total: int, **kwargs: Any) -> None:
        """Blocking: ``total`` examples shared by every route (one hypothesis run per route, so each
        route gets its share whatever the engine's preferences)."""
        # Literal rules first (``/v3.0/``): hypothesis runs out of distinct requests for them
        # before their share, and the budget they leave goes to the routes after them.
        ordered = sorted(routes, key=lambda r: "<" in r[0])
        start = self.sent
        for i, route in enumerate(ordered):
            for req in corpus(route, kwargs.get("seeds", ())):
                self.check(req)
            left = total - (self.sent - start)
            self.run(requests([route], **kwargs), max(10, left // (len(ordered) - i)))

    async def _send(self, req: Request) -> Answer:
        ctx = self.ctx if req.with_cert or self.anon_ctx is None else self.anon_ctx
        return await send(self.host, self.port, ctx, req)

    def report(self) -> str:
        per = ", ".join(f"{code}: {n}" for code, n in sorted(self.counts.items()))
        return f"fuzz {self.name}: {self.sent} requests ({per})"
