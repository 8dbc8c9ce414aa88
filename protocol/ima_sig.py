"""IMA signatures (``security.ima`` v2, as evmctl writes them): verify one over a file digest, or
assemble one around a raw signature (tests and tools sign files the kernel would accept).

Layout (Linux ``struct signature_v2_hdr``): type (3 = EVM_IMA_XATTR_DIGSIG, 5 = portable),
version 2, kernel hash_algo id, 32-bit keyidv2, big-endian signature size, then the signature:
PKCS#1 v1.5 for RSA keys, DER ECDSA for EC keys, over the file digest as it is (prehashed).

Pure: bytes and keys in, a reason (or None) out.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from keytrio.protocol.errors import ValidationError
from keytrio.protocol.runtime_policy import ImaKey

#: Kernel hash_algo ids (include/uapi/linux/hash_info.h) usable in IMA signature v2 headers.
SIG_HASH_ALGOS: dict[int, str] = {2: "sha1", 4: "sha256", 5: "sha384", 6: "sha512", 7: "sha224"}
_SIG_HASH_IDS = {v: k for k, v in SIG_HASH_ALGOS.items()}
_SIG_HDR = struct.Struct(">BBBIH")
_SIG_TYPES = (3, 5)
_CRYPTO_HASHES = {
    "sha1": hashes.SHA1, "sha224": hashes.SHA224, "sha256": hashes.SHA256,
    "sha384": hashes.SHA384, "sha512": hashes.SHA512,
}  # fmt: skip


def verify_ima_sig(
    sig: bytes, digest: bytes, digest_alg: str, keys: Mapping[int, Iterable[ImaKey]]
) -> str | None:
    """None when the IMA v2 signature over ``digest`` verifies with one of ``keys`` (by keyid);
    else why not."""
    if len(sig) < _SIG_HDR.size:
        return "malformed signature"
    typ, version, algo, keyid, size = _SIG_HDR.unpack_from(sig)
    if typ not in _SIG_TYPES or version != 2:
        return "not an IMA v2 digital signature"
    if size != len(sig) - _SIG_HDR.size:
        return "malformed signature"
    alg = SIG_HASH_ALGOS.get(algo)
    if alg is None or alg != digest_alg:
        return "signature hash algorithm does not match the file digest"
    candidates = keys.get(keyid, ())
    if not candidates:
        return f"no key with id 0x{keyid:08x}"
    raw = sig[_SIG_HDR.size :]
    pre = Prehashed(_CRYPTO_HASHES[alg]())
    for k in candidates:
        try:
            if isinstance(k.public_key, rsa.RSAPublicKey):
                k.public_key.verify(raw, digest, padding.PKCS1v15(), pre)
            else:
                k.public_key.verify(raw, digest, ec.ECDSA(pre))
        except (InvalidSignature, ValueError):
            continue
        return None
    return "invalid signature"


def ima_signature(digest: bytes, digest_alg: str, keyid: int, raw_signature: bytes) -> bytes:
    """Assemble an IMA signature v2 (as evmctl writes into security.ima) around a raw signature."""
    algo = _SIG_HASH_IDS.get(digest_alg)
    if algo is None or len(digest) != hashlib.new(digest_alg).digest_size:
        raise ValidationError("digest_alg", f"unsupported for IMA signatures: {digest_alg!r}")
    return _SIG_HDR.pack(3, 2, algo, keyid, len(raw_signature)) + raw_signature
