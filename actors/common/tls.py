"""TLS contexts for keytrio's servers and clients (DESIGN.md "Trust and transport").

Trust model:

* one server-components CA issues the verifier/registrar server certs and the tenant/verifier
  client certs;
* the agent's HTTPS cert is self-signed and *pinned* by whoever connects to it: the client's trust
  store is "the CA + that one leaf", and no host name is checked (agents are reached by the
  address they registered, which their cert does not name).

Purpose (extended key usage): the server-components CA issues server certs for serverAuth only,
client certs for clientAuth only and the revocation notifier's cert for a keytrio-only purpose.
OpenSSL's standard purpose check, which every server context applies to a presented client cert,
fails the handshake for a cert whose EKU lacks clientAuth; :func:`client_cert_purpose` is the
same rule for the app (plus ``require_client_eku``, which also refuses certs without any EKU, as
upstream's cv_ca issues them).

Private keys: :func:`check_private_key` refuses a key file that group or others may access (as
ssh does: group access only for a key another user owns); both context builders call it.

Both sides speak TLS 1.2+ and HTTP/1.1 only (ALPN ``http/1.1``): hypercorn's HTTP/2 path is not
used anywhere in keytrio.
"""

from __future__ import annotations

import functools
import logging
import os
import ssl
import stat
import time
from collections.abc import Callable, Iterable
from typing import Literal

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

log = logging.getLogger("keytrio.tls")

ClientCertMode = Literal["required", "optional", "none"]

_VERIFY_MODES: dict[str, ssl.VerifyMode] = {
    "required": ssl.CERT_REQUIRED,
    "optional": ssl.CERT_OPTIONAL,
    "none": ssl.CERT_NONE,
}

StrPath = str | os.PathLike[str]


class UnprotectedKeyError(ValueError):
    """A private key file that group or others may read or write: refused, as ssh does."""


def check_private_key(path: StrPath) -> None:
    """Raise :class:`UnprotectedKeyError` when group or others may access the key file ``path``.

    ssh's rule: a key we own must grant nothing to group or others (0600/0400). A key owned by
    another user (root) may be shared with our group on purpose (0640 root:keytrio, like
    /etc/ssl/private with the ssl-cert group), but never with others. A key that other local
    users can read is already compromised; starting with it would hide that. The message is one
    line and says how to fix it.
    """
    st = os.stat(path)
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o007 or (mode & 0o070 and st.st_uid == os.geteuid()):
        raise UnprotectedKeyError(
            f"private key {os.fspath(path)} is accessible by group/others (mode {mode:04o}); "
            f"run: chmod 600 {os.fspath(path)}"
        )


def private_key_problem(path: StrPath) -> str | None:
    """:func:`check_private_key` as a message (for configuration checks), None when the key is safe
    or does not exist (that is reported elsewhere)."""
    try:
        check_private_key(path)
    except UnprotectedKeyError as exc:
        return str(exc)
    except OSError:
        return None
    return None


def client_cert_purpose(cert: x509.Certificate, *, require_eku: bool = False) -> str | None:
    """Why ``cert`` may not act as a TLS client, or None when it may.

    A cert with an extended key usage must list clientAuth or anyExtendedKeyUsage (RFC 5280
    4.2.1.12; OpenSSL's handshake check is stricter and refuses anyExtendedKeyUsage alone too).
    A cert without one is accepted unless ``require_eku`` (upstream's cv_ca issues leaves
    without EKU, its revocation notifier's too).
    """
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return "the client certificate has no extended key usage (require_client_eku = true)" \
            if require_eku else None
    except ValueError:
        return "the client certificate has a malformed extended key usage"
    if ExtendedKeyUsageOID.CLIENT_AUTH in eku or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in eku:
        return None
    return "the client certificate's extended key usage does not include clientAuth"


def server_context(
    cert_file: StrPath,
    key_file: StrPath,
    *,
    client_ca_files: Iterable[StrPath] = (),
    mode: ClientCertMode,
    crl_files: Iterable[StrPath] = (),
) -> ssl.SSLContext:
    """A server context: our cert chain, TLS 1.2+, ALPN http/1.1, client certs per ``mode``.

    ``mode``: ``"required"`` (the agent: the handshake fails without a client cert from one of
    ``client_ca_files``), ``"optional"`` (verifier and registrar: a client cert is asked for and, if
    presented, must chain to one of the CAs; routes then decide, see actors/common/app.py),
    ``"none"`` (no client cert is asked for).

    Note: with ``"optional"`` a presented cert that does *not* chain to the CAs still fails the
    handshake (OpenSSL semantics; Python offers no verify callback).
    """
    if mode not in _VERIFY_MODES:
        raise ValueError(f"mode must be one of {sorted(_VERIFY_MODES)}, not {mode!r}")
    ca_files = [os.fspath(p) for p in client_ca_files]
    if mode != "none" and not ca_files:
        raise ValueError(f"client_ca_files is required when mode={mode!r}")

    check_private_key(key_file)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    # OpenSSL verifies a client cert for the "SSL client" purpose: an EKU without clientAuth
    # fails the handshake ("unsuitable certificate purpose"), whatever ``mode``.
    ctx.load_cert_chain(os.fspath(cert_file), os.fspath(key_file))
    ctx.verify_mode = _VERIFY_MODES[mode]
    if mode != "none":
        for path in ca_files:
            ctx.load_verify_locations(cafile=path)
        crls = [os.fspath(p) for p in crl_files]
        if crls:
            # A client cert whose serial is on the CA's CRL fails the handshake (`keytrio ca revoke`).
            for path in crls:
                ctx.load_verify_locations(cafile=path)
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


_FileStamp = tuple[int, int, int] | None


def _stamp(path: str) -> _FileStamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class ReloadingServerContext:
    """A server context that is rebuilt when one of its files changes: a CRL rewritten by
    ``keytrio ca revoke``, a renewed server certificate or a new client CA take effect for the next
    connection, without a restart.

    The files are looked at on a new connection, at most every ``check_interval`` seconds (a few
    ``stat`` calls). A rebuild that fails (a file half written, a key that does not match) keeps
    the previous context: one bad file never takes the service down, and it is logged once.
    """

    def __init__(
        self,
        build: Callable[[], ssl.SSLContext],
        files: Iterable[StrPath],
        *,
        check_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._build = build
        self._files = [os.fspath(f) for f in files]
        self._interval = check_interval
        self._clock = clock
        self._stamps = [_stamp(f) for f in self._files]
        self._context = build()  # the first build must work: a bad configuration fails at start
        self._checked = clock()
        self._failed: list[_FileStamp] | None = None
        self.reloads = 0

    def current(self) -> ssl.SSLContext:
        now = self._clock()
        if now - self._checked >= self._interval:
            self._checked = now
            stamps = [_stamp(f) for f in self._files]
            if stamps != self._stamps and stamps != self._failed:
                self._reload(stamps)
        return self._context

    def _reload(self, stamps: list[_FileStamp]) -> None:
        try:
            context = self._build()
        except (OSError, ssl.SSLError, ValueError) as exc:
            self._failed = stamps
            log.warning("event=tls_reload_failed files=%s error=%s (still serving the previous context)",
                        ",".join(self._files), exc)
            return
        self._context, self._stamps, self._failed = context, stamps, None
        self.reloads += 1
        log.info("event=tls_reloaded files=%s", ",".join(self._files))


def reloading_server_context(
    cert_file: StrPath,
    key_file: StrPath,
    *,
    client_ca_files: Iterable[StrPath] = (),
    mode: ClientCertMode,
    crl_files: Iterable[StrPath] = (),
    check_interval: float = 1.0,
) -> ReloadingServerContext:
    """:func:`server_context` that follows changes of its files (see ReloadingServerContext)."""
    ca_files, crls = list(client_ca_files), list(crl_files)
    build = functools.partial(server_context, cert_file, key_file, client_ca_files=ca_files, mode=mode,
                              crl_files=crls)
    return ReloadingServerContext(build, [cert_file, key_file, *ca_files, *crls], check_interval=check_interval)


def client_context(
    ca_files: Iterable[StrPath],
    cert_file: StrPath | None = None,
    key_file: StrPath | None = None,
    *,
    pinned_server_cert_pem: str | None = None,
    check_hostname: bool | None = None,
) -> ssl.SSLContext:
    """A client context that always verifies the server (CERT_REQUIRED, never ``verify=False``).

    * ``ca_files``: the CA(s) that may issue the server's cert (the server-components CA).
    * ``cert_file``/``key_file``: our client cert, loaded *into the context* (httpx 0.28.1 silently
      sends no client cert with ``verify="ca.pem", cert=(...)``; pass this context as ``verify``).
    * ``pinned_server_cert_pem``: an agent's registered self-signed ``mtls_cert``; it is added to
      the trust store as a trust anchor of its own (partial-chain verification, so the leaf is
      trusted even though it carries no CA flags).
    * ``check_hostname``: default False when a cert is pinned (agents are reached by IP and their
      cert names only the agent), True otherwise.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED
    loaded = False
    for path in ca_files:
        ctx.load_verify_locations(cafile=os.fspath(path))
        loaded = True
    if pinned_server_cert_pem is not None:
        if "-----BEGIN CERTIFICATE-----" not in pinned_server_cert_pem:
            raise ValueError("pinned_server_cert_pem is not a PEM certificate")
        ctx.load_verify_locations(cadata=pinned_server_cert_pem)
        # A self-signed leaf without CA:TRUE/keyCertSign is only accepted as an anchor when
        # OpenSSL may stop the chain at any trusted cert.
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        loaded = True
    if not loaded:
        raise ValueError("a client context needs at least one CA file or a pinned server cert")
    if check_hostname is None:
        check_hostname = pinned_server_cert_pem is None
    ctx.check_hostname = check_hostname
    if cert_file is not None:
        check_private_key(key_file if key_file is not None else cert_file)
        ctx.load_cert_chain(os.fspath(cert_file), os.fspath(key_file) if key_file is not None else None)
    elif key_file is not None:
        raise ValueError("key_file given without cert_file")
    return ctx


def _harden(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
