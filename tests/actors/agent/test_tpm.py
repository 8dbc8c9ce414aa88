"""actors.agent.tpm against a real swtpm: EKs + certs, AKs, PCRs, quotes, credential activation."""

from __future__ import annotations

import hashlib

import pytest
import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_GENERATED, TPM2_ST
from tpm2_pytss.types import TPM2B_PUBLIC, TPMS_ATTEST, TPMT_SIGNATURE
from tpm2_pytss.utils import credential_to_tools, make_credential

from keytrio.actors.agent.tpm import EK_CERT_INDEX, AttestationKey, Quote, Tpm, TpmError, public_key
from keytrio.protocol import pop
from keytrio.testbed import swtpm_state

pytestmark = pytest.mark.swtpm

BANKS = ("sha1", "sha256", "sha384")
_HASHES = {"sha1": hashes.SHA1(), "sha256": hashes.SHA256(), "sha384": hashes.SHA384()}


def verify_quote(ak: AttestationKey, q: Quote, nonce: bytes) -> TPMS_ATTEST:
    """Independent check of a quote: signature over the attest bytes, nonce, PCR digest."""
    sig, _ = TPMT_SIGNATURE.unmarshal(q.signature)
    key = public_key(ak.public)
    h = _HASHES[ak.hash_alg]
    if isinstance(key, rsa.RSAPublicKey):
        assert sig.sigAlg == TPM2_ALG.RSASSA
        key.verify(bytes(sig.signature.rsassa.sig), q.attest, padding.PKCS1v15(), h)
    else:
        assert isinstance(key, ec.EllipticCurvePublicKey)
        assert sig.sigAlg == TPM2_ALG.ECDSA
        der = encode_dss_signature(
            int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big"),
            int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big"),
        )
        key.verify(der, q.attest, ec.ECDSA(h))
    info, used = TPMS_ATTEST.unmarshal(q.attest)
    assert used == len(q.attest)
    assert info.magic == TPM2_GENERATED.VALUE and info.type == TPM2_ST.ATTEST_QUOTE
    assert bytes(info.extraData) == nonce
    pcrs = sorted(q.pcrs)
    expected = hashlib.new(ak.hash_alg, b"".join(q.pcrs[i] for i in pcrs)).digest()
    assert bytes(info.attested.quote.pcrDigest) == expected
    return info


@pytest.mark.parametrize("alg", ["rsa2048", "ecc384"])
async def test_ek_public_matches_cert(tpm: Tpm, swtpm, alg: str) -> None:
    ek = await tpm.endorsement_key(alg=alg)
    assert ek.cert_der is not None and not ek.persistent
    cert = x509.load_der_x509_certificate(ek.cert_der)
    assert cert.public_key() == public_key(ek.public)
    # the NV content is the certificate swtpm_setup issued, chaining to the local CA
    assert ek.cert_der == swtpm_state.ek_cert_files(swtpm.state_dir)[alg].read_bytes()
    issuer = x509.load_pem_x509_certificate(swtpm_state.ek_ca_certs(swtpm.state_dir)[0].read_bytes())
    cert.verify_directly_issued_by(issuer)
    pub, _ = TPM2B_PUBLIC.unmarshal(ek.public)
    if alg == "rsa2048":
        assert pub.publicArea.type == TPM2_ALG.RSA and pub.publicArea.parameters.rsaDetail.keyBits == 2048
    else:
        assert pub.publicArea.parameters.eccDetail.curveID == 0x0004  # NIST P-384
    # swtpm_setup also persisted the same EKs
    persisted = await tpm.endorsement_key(alg=alg, handle={"rsa2048": 0x81010001, "ecc384": 0x81010016}[alg])
    assert persisted.persistent and persisted.public == ek.public and persisted.cert_der == ek.cert_der
    assert EK_CERT_INDEX[alg] in (0x01C00002, 0x01C00016)


@pytest.mark.parametrize(("alg", "hash_alg"), [("rsa", "sha256"), ("ecc", "sha256"), ("ecc", "sha384")])
async def test_ak_create_load_round_trip(tpm: Tpm, alg: str, hash_alg: str) -> None:
    ek = await tpm.endorsement_key()
    ak = await tpm.create_ak(ek, alg=alg, hash_alg=hash_alg)
    pub, _ = TPM2B_PUBLIC.unmarshal(ak.public)
    # TPM2B_NAME = nameAlg (sha256) || sha256(TPMT_PUBLIC)
    assert ak.name == b"\x00\x0b" + hashlib.sha256(pub.publicArea.marshal()).digest()
    assert ak.alg == alg and ak.hash_alg == hash_alg
    await tpm.flush(ak)
    again = await tpm.load_ak(ek, ak.public, ak.private)
    assert again.name == ak.name and again.public == ak.public
    assert (again.alg, again.hash_alg) == (alg, hash_alg)
    # the reloaded key signs
    q = await tpm.quote(again, nonce=b"n" * 16, pcrs=[0], bank="sha256")
    verify_quote(again, q, b"n" * 16)


async def test_ak_survives_reboot(swtpm) -> None:
    async with await Tpm.open(swtpm.tcti) as tpm:
        ak = await tpm.create_ak(await tpm.endorsement_key(), alg="ecc")
    await swtpm.restart()
    async with await Tpm.open(swtpm.tcti) as tpm:
        ek = await tpm.endorsement_key()
        again = await tpm.load_ak(ek, ak.public, ak.private)
        assert again.name == ak.name
        verify_quote(again, await tpm.quote(again, nonce=b"x", pcrs=[0, 1], bank="sha1"), b"x")


async def test_open_flushes_stale_objects(swtpm) -> None:
    """Objects left loaded by a client that never flushed are freed by the next open()."""
    from tpm2_pytss import ESAPI
    from tpm2_pytss.types import TPM2B_SENSITIVE_CREATE
    from tpm2_pytss.utils import NVReadEK, create_ek_template

    def leak() -> None:
        ectx = ESAPI(swtpm.tcti)
        _, template = create_ek_template("EK-HIGH-ECC384", NVReadEK(ectx))
        for _ in range(3):  # all of swtpm's transient slots
            ectx.create_primary(TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT)
        ectx.close()

    await trio.to_thread.run_sync(leak)
    async with await Tpm.open(swtpm.tcti) as tpm:
        ek = await tpm.endorsement_key(alg="ecc384")
        await tpm.create_ak(ek, alg="ecc")


async def test_active_banks_and_pcr_reads(tpm: Tpm) -> None:
    assert await tpm.active_banks() == list(BANKS)
    for bank in BANKS:
        values = await tpm.read_pcrs(bank, range(24))
        size = hashlib.new(bank).digest_size
        assert sorted(values) == list(range(24))
        assert all(len(v) == size for v in values.values())
        assert values[0] == bytes(size) and values[23] == bytes(size)
        assert values[17] == b"\xff" * size  # locality-4 PCRs start at -1
    with pytest.raises(TpmError):
        await tpm.read_pcrs("sha512", [0])  # inactive bank
    with pytest.raises(TpmError):
        await tpm.read_pcrs("sha256", [24])


async def test_extend_all_banks(tpm: Tpm) -> None:
    digests = {bank: hashlib.new(bank, b"event").digest() for bank in BANKS}
    old = {bank: (await tpm.read_pcrs(bank, [10]))[10] for bank in BANKS}
    await tpm.extend(10, digests)
    for bank in BANKS:
        new = (await tpm.read_pcrs(bank, [10]))[10]
        assert new == hashlib.new(bank, old[bank] + digests[bank]).digest()
    # one bank only: the others stay as they were
    before = await tpm.read_pcrs("sha1", [10])
    await tpm.extend(10, {"sha256": digests["sha256"]})
    assert await tpm.read_pcrs("sha1", [10]) == before
    with pytest.raises(TpmError):
        await tpm.extend(10, {"sha256": b"short"})
    with pytest.raises(TpmError):
        await tpm.extend(17, {"sha256": digests["sha256"]})  # locality 0 may not extend 17


@pytest.mark.parametrize("pcr", [16, 23])
async def test_reset(tpm: Tpm, pcr: int) -> None:
    await tpm.extend(pcr, {"sha256": b"\x05" * 32, "sha384": b"\x06" * 48})
    assert (await tpm.read_pcrs("sha256", [pcr]))[pcr] != bytes(32)
    await tpm.reset(pcr)
    assert (await tpm.read_pcrs("sha256", [pcr]))[pcr] == bytes(32)
    assert (await tpm.read_pcrs("sha384", [pcr]))[pcr] == bytes(48)
    with pytest.raises(TpmError):
        await tpm.reset(0)


@pytest.mark.parametrize(("ak_alg", "hash_alg"), [("rsa", "sha256"), ("ecc", "sha256"), ("rsa", "sha384")])
async def test_quote_verifies(tpm: Tpm, ak_alg: str, hash_alg: str) -> None:
    ek = await tpm.endorsement_key()
    ak = await tpm.create_ak(ek, alg=ak_alg, hash_alg=hash_alg)
    await tpm.extend(16, {bank: hashlib.new(bank, b"q").digest() for bank in BANKS})
    for bank in BANKS:
        nonce = await tpm.get_random(20)
        pcrs = [0, 1, 2, 3, 4, 5, 6, 7, 10, 16, 23]  # > 8: several PCR_Read calls
        q = await tpm.quote(ak, nonce=nonce, pcrs=pcrs, bank=bank)
        assert q.bank == bank and sorted(q.pcrs) == pcrs and q.nonce == nonce
        assert q.pcrs == await tpm.read_pcrs(bank, pcrs)
        info = verify_quote(ak, q, nonce)
        sel = info.attested.quote.pcrSelect
        assert sel.count == 1 and sel.pcrSelections[0].hash == TPM2_ALG.parse(bank)
        # a tampered attest no longer verifies
        bad = Quote(q.attest[:-1] + bytes([q.attest[-1] ^ 1]), q.signature, q.bank, q.pcrs, q.nonce)
        with pytest.raises(InvalidSignature):
            verify_quote(ak, bad, nonce)
    with pytest.raises(TpmError):
        await tpm.quote(ak, nonce=b"n" * 65, pcrs=[0], bank="sha256")


@pytest.mark.parametrize("ak_alg", ["rsa", "ecc"])
async def test_certify_self_proves_the_ak(tpm: Tpm, ak_alg: str) -> None:
    ek = await tpm.endorsement_key()
    ak = await tpm.create_ak(ek, alg=ak_alg)
    challenge = pop.new_challenge()
    cert = await tpm.certify_self(ak, challenge)
    attest = pop.verify_pop(cert.attest, cert.signature, ak_public=ak.public, challenge=challenge)
    assert attest.name == ak.name
    with pytest.raises(pop.PopError):  # another challenge: not a proof for it
        pop.verify_pop(cert.attest, cert.signature, ak_public=ak.public, challenge=pop.new_challenge())
    with pytest.raises(TpmError):
        await tpm.certify_self(ak, b"c" * 65)


@pytest.mark.parametrize("ek_alg", ["rsa2048", "ecc384"])
@pytest.mark.parametrize("ak_alg", ["rsa", "ecc"])
async def test_activate_credential(tpm: Tpm, ek_alg: str, ak_alg: str) -> None:
    ek = await tpm.endorsement_key(alg=ek_alg)
    ak = await tpm.create_ak(ek, alg=ak_alg)
    ek_pub, _ = TPM2B_PUBLIC.unmarshal(ek.public)
    secret = b"K" * 32
    blob = credential_to_tools(*make_credential(ek_pub, secret, ak.name))
    assert await tpm.activate_credential(ak, ek, blob) == secret
    # sessions are flushed: it works many times over
    for _ in range(3):
        assert await tpm.activate_credential(ak, ek, blob) == secret
    # bound to the AK's name: a credential made for another name does not open
    other = credential_to_tools(*make_credential(ek_pub, secret, b"\x00\x0b" + b"\x01" * 32))
    with pytest.raises(TpmError):
        await tpm.activate_credential(ak, ek, other)
    with pytest.raises(TpmError):
        await tpm.activate_credential(ak, ek, b"\x00" * 12)


async def test_concurrent_quotes_are_serialized(tpm: Tpm) -> None:
    ek = await tpm.endorsement_key(alg="ecc384")
    ak = await tpm.create_ak(ek, alg="ecc")
    results: list[tuple[bytes, Quote]] = []

    async def quoter(i: int) -> None:
        for j in range(5):
            nonce = bytes([i, j]) * 8
            results.append((nonce, await tpm.quote(ak, nonce=nonce, pcrs=range(24), bank="sha256")))

    async def extender() -> None:
        for k in range(20):
            await tpm.extend(16, {"sha256": hashlib.sha256(bytes([k])).digest()})
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        for i in range(6):
            nursery.start_soon(quoter, i)
        nursery.start_soon(extender)
    assert len(results) == 30
    for nonce, q in results:
        verify_quote(ak, q, nonce)
    assert len({q.pcrs[16] for _, q in results}) > 1  # the extends interleaved with quotes


async def test_closed_tpm_raises(swtpm) -> None:
    tpm = await Tpm.open(swtpm.tcti)
    await tpm.close()
    await tpm.close()  # idempotent
    with pytest.raises(TpmError):
        await tpm.get_random(4)


async def test_open_bad_tcti() -> None:
    with pytest.raises(TpmError):
        await Tpm.open("swtpm:path=/nonexistent/keytrio.sock")


async def test_persist_ak(tpm: Tpm) -> None:
    ek = await tpm.endorsement_key(alg="ecc384")
    ak = await tpm.create_ak(ek, alg="ecc")
    handle = await tpm.persist(ak, 0x81000100)
    _, name, _ = await tpm._run(lambda e: e.read_public(handle))
    assert bytes(name) == ak.name
    with pytest.raises(TpmError):  # the handle is taken now
        await tpm.persist(ak, 0x81000100)
