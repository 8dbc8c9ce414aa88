"""Smoke: one software TPM proves its identity and its runtime state, and every tampering is caught.

Story: an swtpm (sha1 + sha256 banks) comes up with an EK certificate from the testbed's local
CA. An AK is created under the EK; a registrar-style MakeCredential is done in software and the
TPM activates it, proving the AK lives beside the EK. A node key (NK) is bound into PCR 16, a
boot_aggregate and 100 IMA measurements are written (each line appended, then PCR 10 extended
in both banks). A quote over PCRs 0-7, 10 and 16 with a fresh nonce verifies with protocol/, PCR
16 holds the NK binding, and the IMA log replays to the quoted PCR 10.
Then four forgeries: the wrong nonce, a changed PCR value in the pcr blob, a flipped signature
byte and one edited IMA line. Expected verdict: the genuine evidence passes, and each forgery is
rejected with its own typed failure.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import secrets
import string

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from keytrio.actors.agent.tpm import Tpm
from keytrio.protocol import credential, ima, quote, quote_check, tpm2
from keytrio.scenarios.runner import Run, scenario
from keytrio.testbed import swtpm, swtpm_state
from keytrio.testbed.ima_log import FILE_NAME, ImaLog

BANKS = ("sha1", "sha256")
BANK = "sha256"
QUOTED_PCRS = [0, 1, 2, 3, 4, 5, 6, 7, 10, 16]
SEED = 20261128


def _nonce() -> str:
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(20))


@scenario("smoke")
async def smoke(run: Run) -> None:
    rng = random.Random(SEED)
    async with swtpm.swtpm_running(run.dir / "tpm", banks=BANKS) as sw:
        async with run.step("start an swtpm with sha1+sha256 banks and EK certs from a private CA"):
            run.check(set(BANKS) <= set(sw.banks), f"active banks {sw.banks}")
            run.note(f"TCTI {sw.tcti}")
        tpm = await Tpm.open(sw.tcti)
        try:
            await _attest(run, rng, sw, tpm)
        finally:
            await tpm.close()


async def _attest(run: Run, rng: random.Random, sw: swtpm.Swtpm, tpm: Tpm) -> None:
    async with run.step("EK and its certificate: the cert's key is the EK, issued by the local CA"):
        ek = await tpm.endorsement_key(alg="rsa2048")
        run.check(ek.cert_der is not None, "no EK certificate in NV")
        cert = x509.load_der_x509_certificate(ek.cert_der)
        ek_key = tpm2.public_key(ek.public)
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        run.check(
            cert.public_key().public_bytes(serialization.Encoding.DER, spki)
            == ek_key.public_bytes(serialization.Encoding.DER, spki),
            "EK certificate key differs from the EK",
        )
        issuer = x509.load_pem_x509_certificate(swtpm_state.ek_ca_certs(sw.state_dir)[0].read_bytes())
        cert.verify_directly_issued_by(issuer)
        run.note(f"EK cert subject/issuer: {cert.issuer.rfc4514_string()}")

    async with run.step("AK: a restricted signing key under the EK"):
        ak = await tpm.create_ak(ek, alg="rsa", hash_alg="sha256")
        tpm2.check_ak_attributes(ak.public)
        run.check(tpm2.object_name(ak.public) == ak.name, "AK name does not match its public area")
        run.note("AK " + "/".join(tpm2.key_algorithms(ak.public)) + f", name {ak.name.hex()[:16]}…")

    async with run.step("MakeCredential in software, ActivateCredential on the TPM"):
        secret = credential.new_credential(os.urandom(32))
        blob = credential.make_credential_blob(ek.public, ak.name, secret)
        recovered = await tpm.activate_credential(ak, ek, blob)
        run.check(recovered == secret, "the TPM recovered a different credential")
        tag = credential.activation_auth_tag(recovered, "d432fbb3-d2f1-4a97-9ef7-75bd81c00000")
        run.check(
            credential.check_auth_tag(secret, "d432fbb3-d2f1-4a97-9ef7-75bd81c00000", tag),
            "activation auth tag does not verify",
        )
        wrong = credential.make_credential_blob(ek.public, b"\x00\x0b" + bytes(32), secret)
        try:
            await tpm.activate_credential(ak, ek, wrong)
        except Exception:
            run.note("a blob bound to another AK name is refused by the TPM")
        else:
            run.check(False, "the TPM activated a credential bound to another key")

    async with run.step("bind a node key into PCR 16 (reset, extend with H(NK PEM))"):
        nk = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        nk_pem = nk.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()
        await tpm.reset(16)
        await tpm.extend(16, {b: hashlib.new(b, nk_pem.encode()).digest() for b in BANKS})

    log = ImaLog(run.dir / FILE_NAME, tpm.extend, BANKS)
    async with run.step("IMA: boot_aggregate + 100 measurements, each appended then extended into PCR 10"):
        boot = {b: await tpm.read_pcrs(b, range(8)) for b in BANKS}
        await log.boot_aggregate(boot)
        for i in range(100):
            content = rng.randbytes(rng.randint(16, 256))
            await log.measure(f"/usr/bin/tool-{i:03d}", content)
        run.check(len(log) == 101, f"{len(log)} IMA entries")

    nonce = _nonce()
    async with run.step(f"quote PCRs {QUOTED_PCRS} of the {BANK} bank with nonce {nonce}"):
        q = await tpm.quote(ak, nonce=nonce.encode(), pcrs=QUOTED_PCRS, bank=BANK)
        text = quote.build_quote(q.attest, q.signature, quote.encode_pcr_blob(q.bank, q.pcrs))
        run.note(f"quote string {len(text)} characters")

    async with run.step("verify: signature, nonce, PCR digest, clock; PCR 16 binds the NK"):
        result = quote_check.check_quote(text, ak_public=ak.public, nonce=nonce, hash_alg=BANK)
        run.check(result.valid, f"genuine quote rejected: {[f.to_json() for f in result.failures]}")
        bad16 = quote_check.check_pcr16(BANK, result.pcrs, nk_pem)
        run.check(bad16 is None, f"PCR 16 does not bind the NK: {bad16}")
        run.note(f"clock {result.clock.clock} ms, resetCount {result.clock.reset_count}, safe {result.clock.safe}")

    ima_text = (run.dir / FILE_NAME).read_text(encoding="utf-8", errors="surrogateescape")
    async with run.step("replay the IMA log file against the quoted PCR 10 (sha256) and PCR 10 (sha1)"):
        entries = ima.parse_list(ima_text)
        bad = [e.line_no for e in entries if not ima.check_template_hash(e)]
        run.check(not bad, f"template hashes wrong on lines {bad}")
        run.check(ima.replay(entries, BANK) == result.pcrs[10], "IMA replay != quoted PCR 10")
        sha1_pcr10 = (await tpm.read_pcrs("sha1", [10]))[10]
        run.check(ima.replay(entries, "sha1") == sha1_pcr10, "IMA replay != PCR 10 in the sha1 bank")

    async with run.step("forgery 1: the same quote presented for another nonce"):
        _expect(run, quote_check.check_quote(text, ak_public=ak.public, nonce=_nonce(), hash_alg=BANK),
                quote_check.CHECK_NONCE)

    async with run.step("forgery 2: PCR 10 changed in the pcr blob"):
        parsed = quote.parse_quote(text)
        pcrs = dict(parsed.pcrs)
        pcrs[10] = bytes(len(pcrs[10]))
        forged = quote.build_quote(parsed.attest_raw, parsed.signature_raw, quote.encode_pcr_blob(BANK, pcrs))
        _expect(run, quote_check.check_quote(forged, ak_public=ak.public, nonce=nonce, hash_alg=BANK),
                quote_check.CHECK_PCR_DIGEST)

    async with run.step("forgery 3: one signature byte flipped"):
        sig = bytearray(parsed.signature_raw)
        sig[-1] ^= 0x01
        forged = quote.build_quote(parsed.attest_raw, bytes(sig), parsed.pcr_blob)
        _expect(run, quote_check.check_quote(forged, ak_public=ak.public, nonce=nonce, hash_alg=BANK),
                quote_check.CHECK_SIGNATURE)

    async with run.step("forgery 4: one IMA line's file digest edited"):
        lines = ima_text.splitlines()
        victim = 50
        fields = lines[victim].split(" ")
        alg, _, digest = fields[3].partition(":")
        fields[3] = f"{alg}:{bytes(len(digest) // 2).hex()}"
        lines[victim] = " ".join(fields)
        entries = ima.parse_list("\n".join(lines) + "\n")
        bad = [e.line_no for e in entries if not ima.check_template_hash(e)]
        run.check(bad == [victim], f"template-hash check flagged lines {bad}, expected [{victim}]")
        run.check(ima.replay(entries, BANK) != result.pcrs[10], "an edited log still replays to the quote")
        run.note(f"line {victim}: template hash mismatch, and the replay is ima.pcr_mismatch against the quote")

    async with run.step("credential blob and quote string survive a base64 round trip unchanged"):
        run.check(base64.b64decode(base64.b64encode(blob)) == blob, "blob")
        run.check(quote.build_quote(parsed.attest_raw, parsed.signature_raw, parsed.pcr_blob) == text, "quote")


def _expect(run: Run, result: quote_check.QuoteCheck, check: str) -> None:
    run.check(not result.valid, "forged quote was accepted")
    seen = [f.context.get("check") for f in result.failures]
    run.check(check in seen, f"expected a '{check}' failure, got {seen}")
    f = next(f for f in result.failures if f.context.get("check") == check)
    run.note(f"rejected: {f.event_id} ({check}: {f.context.get('message', '')})")
