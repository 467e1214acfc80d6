"""Mutual TLS for the ship -> receive link: contexts, peer identity, a blocking stream.

Place in the flow: ``dlogd-ship`` connects to each collector and ``dlogd-receive@``
is handed an accepted connection by systemd; both wrap their socket in a
:class:`TLSStream` built from :func:`client_context` / :func:`server_context`,
then carry the wire protocol over it. After the handshake the receiver asks
:func:`identify_sender` which configured host is on the other end, and the
shipper asks :func:`check_collector` whether it reached the collector it meant
to. Chain verification against the fleet CA is OpenSSL's job; deciding *which*
host a verified certificate belongs to is ours, and is kept in plain functions
of plain data so it is tested without sockets.

Errors come in four kinds so callers can tell them apart:
:class:`TLSConfigError` (our own files are unusable: names the file),
:class:`TLSFailure` (the handshake or record layer failed: carries OpenSSL's
reason; :class:`TLSTimeout` is the no-answer case), :class:`PeerClosed` (the
transport ended without a TLS close), and :class:`PeerRefused` (the peer proved
who it is, and that is not who we accept).
"""

from __future__ import annotations

import enum
import errno
import hmac
import ipaddress
import os
import select
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto

from dlogd.config import Host, TLSFiles

# AES-GCM first: with AES-NI it is the fastest bulk cipher here; ChaCha20 for the rest.
TLS13_SUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
# Only used when TLS 1.2 is configured: forward-secret AEAD suites, nothing else.
TLS12_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!SHA1"
VERIFY_DEPTH = 4
RECORD_SIZE = 16384  # TLS's largest plaintext record
MIN_VERSIONS = {"1.3": SSL.TLS1_3_VERSION, "1.2": SSL.TLS1_2_VERSION}

# Each of these names one thing a loaded file can be, for error messages.
_WHAT_CERT = "certificate chain"
_WHAT_KEY = "private key"
_WHAT_CA = "CA certificates"


class TLSError(Exception):
    """Base of every error this module raises."""


class TLSConfigError(TLSError):
    """One of our own TLS files cannot be used."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class TLSFailure(TLSError):
    """The TLS layer failed; the message is OpenSSL's reason (or ours, for timeouts)."""


class TLSTimeout(TLSFailure):
    """The peer did not make progress within the operation's timeout."""


class PeerClosed(TLSError):
    """The transport ended (EOF or reset) without a TLS close_notify."""


class Refusal(enum.StrEnum):
    """Why a verified peer is still not accepted: stable codes for logs and tests."""

    UNKNOWN_NAME = "unknown-name"  # the certificate names no configured host
    AMBIGUOUS_NAME = "ambiguous-name"  # it names more than one configured host
    NAME_MISMATCH = "name-mismatch"  # it does not name the host we meant to reach
    PIN_MISMATCH = "pin-mismatch"  # the host is pinned to another certificate
    ADDRESS_MISMATCH = "address-mismatch"  # right name, wrong source address
    NOT_END_ENTITY = "not-end-entity"  # a CA certificate presented as a host's
    WRONG_PURPOSE = "wrong-purpose"  # its extended key usage excludes this role


class Purpose(enum.StrEnum):
    """What a host certificate must be good for in this connection (RFC 5280 EKU)."""

    CLIENT = "clientAuth"  # a shipper, as the collector sees it
    SERVER = "serverAuth"  # a collector, as the shipper sees it

    @property
    def oid(self) -> str:
        return _PURPOSE_OIDS[self]


_PURPOSE_OIDS = {
    Purpose.CLIENT: ExtendedKeyUsageOID.CLIENT_AUTH.dotted_string,
    Purpose.SERVER: ExtendedKeyUsageOID.SERVER_AUTH.dotted_string,
}


class PeerRefused(TLSError):
    """A peer with a valid certificate that is not who we accept."""

    def __init__(self, code: Refusal, detail: str, identity: Identity) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.identity = identity


@dataclass(frozen=True)
class Identity:
    """What a peer's certificate says about it."""

    common_name: str | None
    dns_names: tuple[str, ...]
    fingerprint: str  # lowercase hex SHA-256 of the DER certificate
    not_after: datetime
    serial: str = ""  # lowercase hex, no leading zeros or 0x
    is_ca: bool = False  # basicConstraints CA:TRUE
    # Extended key usages by dotted OID; None when the certificate has no EKU
    # extension (then, per RFC 5280, it is not restricted).
    usages: frozenset[str] | None = None

    @classmethod
    def from_certificate(cls, cert: x509.Certificate) -> Identity:
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = cns[0].value if cns else None
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            dns_names = tuple(san.get_values_for_type(x509.DNSName))
        except x509.ExtensionNotFound:
            dns_names = ()
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        try:
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            usages: frozenset[str] | None = frozenset(oid.dotted_string for oid in eku)
        except x509.ExtensionNotFound:
            usages = None
        return cls(
            common_name=cn if isinstance(cn, str) else None,
            dns_names=dns_names,
            fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
            not_after=cert.not_valid_after_utc,
            serial=f"{cert.serial_number:x}",
            is_ca=is_ca,
            usages=usages,
        )

    @property
    def names(self) -> tuple[str, ...]:
        """The host names this certificate vouches for.

        DNS subjectAltNames when there are any, else the common name: the rule
        of RFC 6125, so a CN cannot add a name the SANs leave out.
        """
        if self.dns_names:
            return self.dns_names
        return (self.common_name,) if self.common_name else ()

    def carries(self, host_name: str) -> bool:
        # DNS names compare case-insensitively; wildcards are deliberately not honoured:
        # fleet certificates are issued per host.
        wanted = host_name.lower()
        return any(n.lower() == wanted for n in self.names)

    def __str__(self) -> str:
        return f"CN={self.common_name} DNS={','.join(self.dns_names)} sha256={self.fingerprint}"


# --- contexts --------------------------------------------------------------------


def server_context(tls: TLSFiles) -> SSL.Context:
    """Context for the collector: demands a client certificate from the fleet CA."""
    ctx = _base_context(tls, SSL.TLS_SERVER_METHOD)
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _record_verify_error)
    # Every receiver is a fresh process, so a session cache or ticket could never be reused.
    ctx.set_options(SSL.OP_NO_TICKET | SSL.OP_CIPHER_SERVER_PREFERENCE)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    return ctx


def client_context(tls: TLSFiles) -> SSL.Context:
    """Context for the shipper: presents our certificate, verifies the collector's."""
    ctx = _base_context(tls, SSL.TLS_CLIENT_METHOD)
    ctx.set_verify(SSL.VERIFY_PEER, _record_verify_error)
    return ctx


def _base_context(tls: TLSFiles, method: int) -> SSL.Context:
    try:
        min_version = MIN_VERSIONS[tls.min_version]
    except KeyError:
        raise TLSConfigError(
            "min_version", f"{tls.min_version!r} is not one of {sorted(MIN_VERSIONS)}"
        ) from None
    ctx = SSL.Context(method)
    ctx.set_min_proto_version(min_version)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    ctx.set_tls13_ciphersuites(TLS13_SUITES)
    ctx.set_cipher_list(TLS12_CIPHERS)
    ctx.set_verify_depth(VERIFY_DEPTH)
    _load(tls.certificate, _WHAT_CERT, ctx.use_certificate_chain_file)
    _load(tls.key, _WHAT_KEY, ctx.use_privatekey_file)
    _load(tls.ca, _WHAT_CA, ctx.load_verify_locations)
    try:
        ctx.check_privatekey()
    except SSL.Error as e:
        raise TLSConfigError(tls.key, f"does not match {tls.certificate}: {_reason(e)}") from None
    return ctx


def _load(path: str, what: str, loader: Callable[[str], object]) -> None:
    # Open it ourselves first: OpenSSL's "system lib" says less than errno does.
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise TLSConfigError(path, f"cannot read {what}: {e.strerror}") from None
    try:
        loader(path)
    except SSL.Error as e:
        raise TLSConfigError(path, f"cannot load {what}: {_reason(e)}") from None


# --- verification detail -----------------------------------------------------------
#
# OpenSSL reports a failed chain check only as "certificate verify failed"; the
# callback below keeps the first X509 error per connection so TLSFailure can say
# *what* was wrong (expired, unknown issuer, ...), and keeps the leaf certificate
# so a refusal can be logged with the identity the peer claimed (invariant 5).

_X509_ERRORS = {
    2: "unable to get issuer certificate",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    24: "invalid CA certificate",
    26: "unsupported certificate purpose",
}


def _record_verify_error(
    conn: SSL.Connection, cert: crypto.X509, errnum: int, depth: int, ok: int
) -> bool:
    holder = conn.get_app_data()
    if not isinstance(holder, TLSStream):
        return bool(ok)
    certificate = cert.to_cryptography()
    if depth == 0 and holder.presented is None:
        holder.presented = Identity.from_certificate(certificate)
    if not ok and holder.verify_error is None:
        text = _X509_ERRORS.get(errnum, f"X509 verify error {errnum}")
        subject = certificate.subject.rfc4514_string()
        holder.verify_error = f"{text} (certificate depth {depth}: {subject})"
    return bool(ok)


def _reason(e: SSL.Error) -> str:
    """OpenSSL's reason strings from a pyOpenSSL error, without the library noise."""
    errors = e.args[0] if e.args and isinstance(e.args[0], list) else []
    reasons = [str(item[2]) for item in errors if isinstance(item, tuple) and len(item) == 3]
    return "; ".join(reasons) if reasons else f"{type(e).__name__} without a reason from OpenSSL"


# --- identity -------------------------------------------------------------------


def peer_identity(conn: SSL.Connection) -> Identity:
    """The identity in the peer's (already verified) certificate."""
    cert = conn.get_peer_certificate(as_cryptography=True)
    if cert is None:
        raise TLSFailure("peer presented no certificate")
    return Identity.from_certificate(cert)


def identify_sender(identity: Identity, peer_ip: str | None, hosts: Mapping[str, Host]) -> Host:
    """Which configured host sent this connection, or :class:`PeerRefused`.

    The certificate must name exactly one configured host; that host's pin, if
    set, must match; and if its configured address is an IP address, the
    connection must come from it. An address that is a host name is not
    resolved: DNS is not an authority the receiver trusts (and a sandboxed
    receiver may have none).
    """
    _check_end_entity(identity, Purpose.CLIENT)
    matches = [h for name, h in hosts.items() if identity.carries(name)]
    if not matches:
        raise PeerRefused(
            Refusal.UNKNOWN_NAME,
            f"certificate names {list(identity.names)}, none of them a configured host",
            identity,
        )
    if len(matches) > 1:
        raise PeerRefused(
            Refusal.AMBIGUOUS_NAME,
            f"certificate names several configured hosts: {sorted(h.name for h in matches)}",
            identity,
        )
    host = matches[0]
    _check_pin(identity, host)
    _check_address(identity, peer_ip, host)
    return host


def check_collector(identity: Identity, host: Host) -> None:
    """Raise :class:`PeerRefused` unless the collector we reached is *host*."""
    _check_end_entity(identity, Purpose.SERVER)
    if not identity.carries(host.name):
        raise PeerRefused(
            Refusal.NAME_MISMATCH,
            f"expected {host.name!r}, certificate names {list(identity.names)}",
            identity,
        )
    _check_pin(identity, host)


def _check_end_entity(identity: Identity, purpose: Purpose) -> None:
    """A host speaks with a host certificate: not a CA's, and fit for its role.

    OpenSSL's chain check accepts any certificate the fleet CA signed; a CA
    certificate (which could sign others) or one whose extended key usage
    leaves out this role is still not a host's identity.
    """
    if identity.is_ca:
        raise PeerRefused(
            Refusal.NOT_END_ENTITY, "certificate is a CA certificate (CA:TRUE)", identity
        )
    if identity.usages is not None and purpose.oid not in identity.usages:
        raise PeerRefused(
            Refusal.WRONG_PURPOSE,
            f"certificate's extended key usage does not allow {purpose}",
            identity,
        )


def _check_pin(identity: Identity, host: Host) -> None:
    if host.fingerprint is None:
        return
    pinned = host.fingerprint.replace(":", "").lower()
    if not hmac.compare_digest(pinned, identity.fingerprint):
        raise PeerRefused(
            Refusal.PIN_MISMATCH,
            f"{host.name} is pinned to sha256 {pinned}, peer has {identity.fingerprint}",
            identity,
        )


def _check_address(identity: Identity, peer_ip: str | None, host: Host) -> None:
    expected = _parse_ip(host.address)
    if expected is None:
        return
    actual = _parse_ip(peer_ip) if peer_ip is not None else None
    if actual != expected:
        raise PeerRefused(
            Refusal.ADDRESS_MISMATCH,
            f"{host.name} is configured at {expected}, connection came from {peer_ip}",
            identity,
        )


def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    # A dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


# --- the stream -------------------------------------------------------------------

_T = TypeVar("_T")

# Reasons OpenSSL gives when the first bytes are not TLS at all.
_NOT_TLS = ("wrong version number", "http request", "packet length too long", "record layer")


class TLSStream:
    """Blocking TLS over a connected stream socket, with a timeout per operation.

    The socket is put in non-blocking mode and every operation waits with
    poll() until its own deadline (``timeout`` seconds from the call, like a
    Python socket timeout, so a trickling peer cannot stretch a handshake
    forever; sendall() restarts the clock on each partial write, so a large
    buffer is bounded by progress, not size). pyOpenSSL's WantRead/WantWrite
    never escape; the results are data, ``0``/``b""`` at a clean TLS close,
    or one of this module's errors.
    """

    def __init__(
        self,
        sock: socket.socket,
        context: SSL.Context,
        *,
        server_side: bool,
        timeout: float,
        server_name: str | None = None,
    ) -> None:
        # Taken now: once the peer hangs up, getpeername() fails with ENOTCONN, yet a
        # refusal must still be logged with the address it came from.
        self._peer_ip = _peer_ip_of(sock)
        sock.setblocking(False)
        self.sock = sock
        self.timeout = timeout
        self.verify_error: str | None = None
        # The leaf certificate the peer sent, even if it failed verification: for
        # logging who was refused, never for deciding anything.
        self.presented: Identity | None = None
        self._eof = False
        self._deferred: TLSError | None = None
        self.conn = SSL.Connection(context, sock)
        self.conn.set_app_data(self)
        if server_side:
            self.conn.set_accept_state()
        else:
            self.conn.set_connect_state()
            if server_name is not None:
                self.conn.set_tlsext_host_name(server_name.encode("idna"))

    @classmethod
    def from_fd(
        cls, fd: int, context: SSL.Context, *, server_side: bool, timeout: float
    ) -> TLSStream:
        """Wrap an inherited descriptor, e.g. fd 3 from systemd's ``Accept=yes``.

        The descriptor is ours from here on: if it is unusable it is closed, not leaked.
        """
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            os.close(fd)
            raise TLSFailure(f"fd {fd} is not a socket: {e.strerror}") from None
        try:
            return cls(sock, context, server_side=server_side, timeout=timeout)
        except BaseException:
            sock.close()
            raise

    def __enter__(self) -> TLSStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def peer_ip(self) -> str | None:
        """The peer's IP address, or None for a non-IP (Unix) socket."""
        return self._peer_ip

    def handshake(self) -> Identity:
        """Complete the handshake and return the verified peer's identity."""
        self._io(self.conn.do_handshake, "handshake")
        return peer_identity(self.conn)

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            view = view[self._send_some(view) :]

    def _send_some(self, view: memoryview) -> int:
        # The same view is retried after WantWrite, as OpenSSL requires.
        return self._io(lambda: self.conn.send(view), "send")

    def recv_into(self, buffer: bytearray | memoryview, nbytes: int = 0) -> int:
        """Read up to *nbytes* (default: len(buffer)); 0 means the peer closed TLS cleanly.

        Waits only for the first record, then tops up from records that have
        already arrived, so bulk readers get large chunks without extra waits.
        """
        if self._deferred is not None:
            error, self._deferred = self._deferred, None
            raise error
        if self._eof:
            return 0
        view = memoryview(buffer).cast("B")[: nbytes or len(buffer)]
        got = self._io(lambda: self._read_record(view), "receive")
        while 0 < got < len(view):
            more = self._read_arrived(view[got:])
            if not more:
                break
            got += more
        return got

    def _read_record(self, view: memoryview) -> int:
        # One SSL_read never returns more than a record; asking for more only makes
        # pyOpenSSL allocate (and the allocator mmap) a bigger bounce buffer per call.
        try:
            return self.conn.recv_into(view, RECORD_SIZE)
        except SSL.ZeroReturnError:
            self._eof = True
            return 0

    def _read_arrived(self, view: memoryview) -> int:
        try:
            return self._read_record(view)
        except (SSL.WantReadError, SSL.WantWriteError):
            return 0
        except SSL.Error as e:
            # Data already read goes to the caller first; the error is theirs next call.
            self._deferred = self._translate(e, "receive")
            return 0

    def recv(self, n: int) -> bytes:
        """Read up to *n* bytes; b"" means the peer closed TLS cleanly."""
        buffer = bytearray(n)
        got = self.recv_into(buffer)
        del buffer[got:]
        return bytes(buffer)

    def shutdown(self, *, discard: bool = False) -> None:
        """End the TLS session both ways: send close_notify, then await the peer's.

        Waiting matters: closing a socket that still holds unread bytes (TLS 1.3
        session tickets, pipelined requests) makes the kernel send RST, and an
        RST can destroy data the peer has not read yet, such as our last
        message. The peer, seeing end of stream, is expected to call
        shutdown() too; if it just closes, that is fine here. Data arriving
        meanwhile raises :class:`TLSFailure`, or with *discard* (for hanging
        up on a peer mid-conversation) is dropped. The whole wait is bounded
        by one timeout, so a peer that keeps sending cannot hold us.
        """
        self._io(self.conn.shutdown, "shutdown")
        deadline = time.monotonic() + self.timeout
        scratch = bytearray(RECORD_SIZE)
        try:
            while not self._eof:
                if self.recv_into(scratch) and not discard:
                    raise TLSFailure("shutdown: peer sent data after we closed the session")
                if time.monotonic() > deadline:
                    raise TLSTimeout(f"shutdown: peer still sending after {self.timeout:g}s")
        except PeerClosed:
            pass  # the transport ended: nothing left that an RST could destroy

    def readable_now(self) -> bool:
        """Is input already here (decrypted, or in the socket), so a read can start now?

        A True may still be a non-data record (a session ticket): recv_into()
        then waits for data as usual.
        """
        if self.conn.pending():
            return True
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return bool(poller.poll(0))

    def close(self) -> None:
        self.sock.close()

    def _io(self, op: Callable[[], _T], what: str) -> _T:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return op()
            except SSL.WantReadError:
                self._wait(select.POLLIN, deadline, what)
            except SSL.WantWriteError:
                self._wait(select.POLLOUT, deadline, what)
            except SSL.Error as e:
                raise self._translate(e, what) from None

    def _wait(self, events: int, deadline: float, what: str) -> None:
        poller = select.poll()
        poller.register(self.sock, events)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TLSTimeout(f"{what}: no progress from peer within {self.timeout:g}s")
            # Round up: poll(0) would spin instead of waiting out the last millisecond.
            if poller.poll(int(remaining * 1000) + 1):
                return

    def _translate(self, e: SSL.Error, what: str) -> TLSError:
        if isinstance(e, SSL.ZeroReturnError):
            return PeerClosed(f"{what}: peer closed the TLS session")
        if isinstance(e, SSL.SysCallError):
            return _closed(e, what)
        reason = _reason(e)
        if self.verify_error is not None:
            reason = f"{reason}: {self.verify_error}"
        elif any(marker in reason for marker in _NOT_TLS):
            reason = f"{reason} (peer is not speaking TLS?)"
        return TLSFailure(f"{what}: {reason}")


def _closed(e: SSL.SysCallError, what: str) -> PeerClosed:
    code = e.args[0] if e.args else -1
    if isinstance(code, int) and code > 0:
        return PeerClosed(f"{what}: {os.strerror(code)} ({errno.errorcode.get(code, code)})")
    return PeerClosed(f"{what}: connection ended without TLS close_notify")


def _peer_ip_of(sock: socket.socket) -> str | None:
    """The peer's IP (None for a Unix socket), checking that *sock* is a connected stream.

    An inherited fd could be anything; find out now rather than mid-handshake.
    """
    if sock.type != socket.SOCK_STREAM:
        raise TLSFailure(f"fd {sock.fileno()} is not a stream socket")
    try:
        address = sock.getpeername()
    except OSError as e:
        raise TLSFailure(f"fd {sock.fileno()} is not a connected socket: {e.strerror}") from None
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    return str(address[0])
