"""Real-TPM vectors: tpm2-tools against a private swtpm, checked with the pure protocol modules.

- the pcr blob ``tpm2_quote -o`` writes is byte-identical to ``encode_pcr_blob`` of the values
  ``tpm2_pcrread`` reports;
- the quote string built from tpm2_quote's files verifies with the AK ``tpm2_createak`` wrote,
  and tampering makes it invalid;
- MakeCredential blobs from protocol.credential are opened by ``tpm2_activatecredential`` for
  RSA-2048, ECC P-256 and ECC P-384 (high-range template, PolicyOR) EKs.

swtpm has no resource manager and 3 transient slots: every tool call is followed by
``tpm2_flushcontext -t``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from pathlib import Path

import pytest
import trio

from keytrio.protocol import credential, quote, tpm2
from keytrio.protocol.quote_check import check_pcr16, check_quote

pytestmark = pytest.mark.swtpm

NONCE = "abcdefghij0123456789"
PCRS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 16]
NK_PEM = "-----BEGIN PUBLIC KEY-----\nnot a real key, only bytes to hash\n-----END PUBLIC KEY-----\n"

# TCG EK Credential Profile 2.x: PolicyA (PolicySecret(endorsement)) and PolicyC, SHA-384;
# the high-range P-384 EK's authPolicy is PolicyOR(A, C).
POLICY_A_SHA384 = bytes.fromhex(
    "8bbf2266537c171cb56e403c4dc1d4b64f432611dc386e6f532050c3278c930e143e8bb1133824ccb431053871c6db53"
)
POLICY_C_SHA384 = bytes.fromhex(
    "d6032ce61f2fb3c240eb3cf6a33237ef2b6a16f4293c22b455e261cffd217ad5b4947c2d73e63005eed2dc2b3593d165"
)


class Tools:
    """Runs tpm2-tools against one swtpm, in one directory, flushing transient objects after each."""

    def __init__(self, tcti: str, cwd: Path) -> None:
        self.cwd = cwd
        self.env = {**os.environ, "TPM2TOOLS_TCTI": tcti, "TSS2_LOG": "all+NONE"}

    async def __call__(self, *args: str, ok: bool = True) -> str:
        proc = await trio.run_process(
            list(args), cwd=self.cwd, env=self.env, capture_stdout=True, capture_stderr=True, check=False
        )
        await trio.run_process(
            ["tpm2_flushcontext", "-t"], cwd=self.cwd, env=self.env, capture_stdout=True, capture_stderr=True
        )
        if ok and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed: {proc.stderr.decode(errors='replace')}")
        if not ok and proc.returncode == 0:
            raise AssertionError(f"{' '.join(args)} unexpectedly succeeded")
        return proc.stdout.decode(errors="replace")

    def read(self, name: str) -> bytes:
        return (self.cwd / name).read_bytes()


def _pcrread_values(text: str, bank: str) -> dict[int, bytes]:
    """{pcr: value} from tpm2_pcrread's YAML for one bank."""
    out: dict[int, bytes] = {}
    in_bank = False
    for line in text.splitlines():
        if re.match(r"^\s*\w+:\s*$", line):
            in_bank = line.strip() == f"{bank}:"
            continue
        m = re.match(r"^\s*(\d+)\s*:\s*0x([0-9A-Fa-f]+)\s*$", line)
        if m and in_bank:
            out[int(m.group(1))] = bytes.fromhex(m.group(2))
    return out


async def _make_ak(tools: Tools, kind: str, hash_alg: str) -> None:
    await tools("tpm2_createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub")
    scheme = "rsassa" if kind == "rsa" else "ecdsa"
    await tools(
        "tpm2_createak", "-C", "ek.ctx", "-c", "ak.ctx", "-G", kind, "-g", hash_alg, "-s", scheme,
        "-u", "ak.pub", "-n", "ak.name", "-f", "tss",
    )  # fmt: skip


@pytest.mark.parametrize(("kind", "bank"), [("rsa", "sha256"), ("ecc", "sha256"), ("rsa", "sha384")])
async def test_quote_vectors(swtpm, tmp_path, kind, bank):
    tools = Tools(swtpm.tcti, tmp_path)
    await _make_ak(tools, kind, bank)

    # the real AK public: TPM2B_PUBLIC, a usable AK, Name as the TPM computes it
    ak_raw = tools.read("ak.pub")
    ak = tpm2.parse_public(ak_raw)
    tpm2.check_ak_attributes(ak)
    assert tpm2.object_name(ak) == tools.read("ak.name")
    assert tpm2.key_algorithms(ak) == (kind, "rsassa" if kind == "rsa" else "ecdsa", bank)

    # bind PCR 16 to an "NK" as the agent does
    await tools("tpm2_pcrreset", "16")
    nk_digest = hashlib.new(bank, NK_PEM.encode()).hexdigest()
    await tools("tpm2_pcrextend", f"16:{bank}={nk_digest}")

    selection = f"{bank}:" + ",".join(map(str, PCRS))
    await tools(
        "tpm2_quote", "-c", "ak.ctx", "-q", NONCE.encode().hex(), "-l", selection,
        "-m", "msg", "-s", "sig", "-o", "pcrs.out", "-g", bank,
    )  # fmt: skip
    values = _pcrread_values(await tools("tpm2_pcrread", selection), bank)
    assert sorted(values) == PCRS

    # (a) the blob tpm2_quote wrote is exactly encode_pcr_blob(values)
    blob = tools.read("pcrs.out")
    assert quote.encode_pcr_blob(bank, values) == blob
    assert quote.decode_pcr_blob(blob) == (bank, values)

    # (b) the quote string verifies
    text = quote.build_quote(tools.read("msg"), tools.read("sig"), blob)
    parsed = quote.parse_quote(text)
    assert bytes(parsed.attest.extraData) == NONCE.encode()
    assert parsed.signature.marshal() == tools.read("sig")
    result = check_quote(
        text, ak_public=ak_raw, nonce=NONCE, hash_alg=bank,
        accepted_hash_algs=["sha256", "sha384", "sha512"], accepted_sign_algs=["rsassa", "ecdsa"],
    )  # fmt: skip
    assert result.valid, result.failures
    assert result.pcrs == values
    assert result.clock is not None and result.clock.safe == 1
    assert check_pcr16(bank, result.pcrs, NK_PEM) is None
    assert check_pcr16(bank, result.pcrs, NK_PEM + " ") is not None

    # a second quote is later on the TPM clock
    await tools(
        "tpm2_quote", "-c", "ak.ctx", "-q", NONCE.encode().hex(), "-l", selection,
        "-m", "msg2", "-s", "sig2", "-o", "pcrs2.out", "-g", bank,
    )  # fmt: skip
    second = quote.build_quote(tools.read("msg2"), tools.read("sig2"), tools.read("pcrs2.out"))
    assert check_quote(
        second, ak_public=ak_raw, nonce=NONCE, hash_alg=bank, previous_clock=result.clock
    ).valid
    replay = check_quote(text, ak_public=ak_raw, nonce=NONCE, hash_alg=bank, previous_clock=parsed.clock)
    assert replay.checks_failed() == ["clock"]

    # (c) tampering
    assert check_quote(text, ak_public=ak_raw, nonce=NONCE[:-1] + "X", hash_alg=bank).checks_failed() == [
        "nonce"
    ]
    forged = dict(values)
    forged[10] = b"\x01" * len(values[10])
    a, s, _ = text[1:].split(":")
    forged_text = f"r{a}:{s}:" + base64.b64encode(quote.encode_pcr_blob(bank, forged)).decode()
    assert check_quote(forged_text, ak_public=ak_raw, nonce=NONCE, hash_alg=bank).checks_failed() == [
        "pcr_digest"
    ]
    sig = bytearray(tools.read("sig"))
    sig[-3] ^= 0x40
    bad_sig = f"r{a}:{base64.b64encode(bytes(sig)).decode()}:" + text.rsplit(":", 1)[1]
    assert "signature" in check_quote(bad_sig, ak_public=ak_raw, nonce=NONCE, hash_alg=bank).checks_failed()


async def _activation_session(tools: Tools, ek_kind: str) -> None:
    await tools("tpm2_flushcontext", "-s")
    halg = "sha384" if ek_kind == "ecc384" else "sha256"
    await tools("tpm2_startauthsession", "--policy-session", "-S", "s.ctx", "-g", halg)
    await tools("tpm2_policysecret", "-S", "s.ctx", "-c", "e")
    if ek_kind == "ecc384":
        (tools.cwd / "polA").write_bytes(POLICY_A_SHA384)
        (tools.cwd / "polC").write_bytes(POLICY_C_SHA384)
        await tools("tpm2_policyor", "-S", "s.ctx", "-l", "sha384:polA,polC")


@pytest.mark.parametrize("ek_kind", ["rsa", "ecc", "ecc384"])
async def test_make_credential_activates(swtpm, tmp_path, ek_kind):
    tools = Tools(swtpm.tcti, tmp_path)
    await _make_ak(tools, "rsa", "sha256")
    await tools("tpm2_createek", "-c", "ek2.ctx", "-G", ek_kind, "-u", "ek2.pub")
    ek = tpm2.parse_public(tools.read("ek2.pub"))
    cred = credential.new_credential(os.urandom(32))
    ak_name = tools.read("ak.name")

    (tmp_path / "cred.blob").write_bytes(credential.make_credential_blob(ek, ak_name, cred))
    await _activation_session(tools, ek_kind)
    await tools(
        "tpm2_activatecredential", "-c", "ak.ctx", "-C", "ek2.ctx", "-i", "cred.blob", "-o", "cred.out",
        "-P", "session:s.ctx",
    )  # fmt: skip
    assert tools.read("cred.out") == cred
    tag = credential.activation_auth_tag(tools.read("cred.out"), "agent-1")
    assert credential.check_auth_tag(cred, "agent-1", tag)

    # bound to another Name: the TPM refuses it
    other_name = ak_name[:2] + hashlib.sha256(ak_name).digest()
    (tmp_path / "bad.blob").write_bytes(credential.make_credential_blob(ek, other_name, cred))
    await _activation_session(tools, ek_kind)
    await tools(
        "tpm2_activatecredential", "-c", "ak.ctx", "-C", "ek2.ctx", "-i", "bad.blob", "-o", "bad.out",
        "-P", "session:s.ctx", ok=False,
    )  # fmt: skip
