"""push_wire.parsed_quote: the push check's quote decoded from the evidence's bytes, where it was
encoded back to a Keylime quote string (quote_text) and parsed again (parse_quote).

Differential: on good quotes of every key kind and bank and on many mutated ones (each byte of
the attest, signature and PCR blob replaced, truncations, extensions, lengths around the quote
text limit), parsed_quote gives a ParsedQuote equal to ``parse_quote(quote_text(ev))`` when that
parses, and None exactly when it fails (the caller then passes the text, so the failure is the
text path's); and evidence.verify gives the same verdict for either form.
"""

from __future__ import annotations

import pytest

from keytrio.protocol import push_wire, quote
from keytrio.protocol.errors import ProtocolError
from keytrio.protocol.evidence import Evidence, Expectations, verify
from tests.protocol.quote_support import make_attest, pcr_values, sign_attest
from tests.protocol.tpm2_support import ak_public

NONCE = b"abcdefghij0123456789"


def good(kind: str = "rsa", bank: str = "sha256") -> push_wire.Evidence:
    pcrs = pcr_values(bank, [0, 1, 2, 7, 10])
    attest = make_attest(bank=bank, pcrs=pcrs, nonce=NONCE)
    return push_wire.Evidence(attest, sign_attest(attest, kind, bank), quote.encode_pcr_blob(bank, pcrs), {})


def text_parse(ev: push_wire.Evidence) -> quote.ParsedQuote | None:
    try:
        return quote.parse_quote(push_wire.quote_text(ev))
    except ProtocolError:
        return None


def agrees(ev: push_wire.Evidence) -> bool:
    """parsed_quote and the text path agree on ``ev``; True when it parsed."""
    fast, slow = push_wire.parsed_quote(ev), text_parse(ev)
    assert fast == slow, ev
    return fast is not None


def mutations(raw: bytes) -> list[bytes]:
    out = [b"", raw[:1], raw[:-1], raw[: len(raw) // 2], raw + b"\x00", raw + raw]
    for i in range(len(raw)):
        for b in (0x00, 0xFF, raw[i] ^ 0x01, raw[i] ^ 0x80):
            out.append(raw[:i] + bytes([b]) + raw[i + 1:])
    return out


@pytest.mark.parametrize(("kind", "bank"), [("rsa", "sha256"), ("rsa", "sha1"), ("p256", "sha256"), ("p384", "sha384"),
                                            ("rsa", "sha384")])
def test_good_quotes_parse_the_same(kind: str, bank: str) -> None:
    assert agrees(good(kind, bank))


@pytest.mark.parametrize("part", ["message", "signature", "pcr_blob"])
def test_mutated_quotes_parse_or_fail_the_same(part: str) -> None:
    ev = good()
    parsed = refused = 0
    for raw in mutations(getattr(ev, part)):
        if agrees(push_wire.Evidence(**{**ev.__dict__, part: raw})):
            parsed += 1
        else:
            refused += 1
    assert parsed and refused  # both sides of the guard were exercised


def test_the_quote_text_limit_is_the_same() -> None:
    """Around parse_quote's length limit (a long signature part: the text grows by 4 per 3 bytes)."""
    ev = good()
    base = len(push_wire.quote_text(ev))
    limit = quote.MAX_QUOTE_TEXT
    seen = set()
    for extra in range((limit - base) // 4 * 3 - 6, (limit - base) // 4 * 3 + 7):
        padded = push_wire.Evidence(ev.message, ev.signature + b"\x00" * extra, ev.pcr_blob, {})
        seen.add(len(push_wire.quote_text(padded)) <= limit)
        agrees(padded)  # the signature no longer decodes either way: both None
        long_blob = push_wire.Evidence(ev.message, ev.signature, ev.pcr_blob + b"\x00" * extra, {})
        agrees(long_blob)
    assert seen == {True, False}


def test_verify_gives_the_same_verdict_for_either_form() -> None:
    ev = good()
    expect = Expectations(ak=ak_public("rsa").marshal(), nonce=NONCE.decode(), nk_pem=None,
                          required_pcrs=(0, 10))
    cases = [ev,
             push_wire.Evidence(ev.message, ev.signature[:-1] + bytes([ev.signature[-1] ^ 1]), ev.pcr_blob, {}),
             push_wire.Evidence(ev.message[:-1] + bytes([ev.message[-1] ^ 1]), ev.signature, ev.pcr_blob, {}),
             push_wire.Evidence(ev.message, ev.signature,
                                quote.encode_pcr_blob("sha256", pcr_values("sha256", [0, 1, 2, 7, 10], b"x")), {})]
    verdicts = []
    for case in cases:
        parsed = push_wire.parsed_quote(case)
        assert parsed is not None
        fast = verify(expect, Evidence(parsed, "sha256", "rsa"))
        slow = verify(expect, Evidence(push_wire.quote_text(case), "sha256", "rsa"))
        assert fast == slow
        verdicts.append(fast.valid)
    assert verdicts == [True, False, False, False]
