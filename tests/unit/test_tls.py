"""Mutual TLS and peer identity: real handshakes over loopback TCP, real certificates."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from OpenSSL import SSL

from dlogd import pki
from dlogd.config import Host, TLSFiles
from dlogd.tls import (
    Identity,
    PeerClosed,
    PeerRefused,
    Refusal,
    TLSConfigError,
    TLSFailure,
    TLSStream,
    TLSTimeout,
    check_collector,
    client_context,
    identify_sender,
    server_context,
)
from tests import tlsfixtures
from tests.tlsfixtures import (
    COLLECTOR,
    LOOPBACK,
    SENDER,
    Fleet,
    Outcome,
    concurrently,
    make_fleet,
    tcp_pair,
    tls_pair,
)

# The shared fixtures, bound here so this module runs before tests/conftest.py wires them
# (a test module's own binding wins, and it is the same fixture either way).
fleet = tlsfixtures.fleet
other_fleet = tlsfixtures.other_fleet

CHUNK = 256 * 1024


def exchange(
    server_ctx: SSL.Context, client_ctx: SSL.Context
) -> tuple[Outcome[bytes], Outcome[bytes]]:
    """Handshake, one message each way. A refused client cert only shows on the
    client's first read (TLS 1.3 finishes the client's handshake first)."""
    with tls_pair(server_ctx, client_ctx) as (server, client):

        def serve() -> bytes:
            server.handshake()
            got = server.recv(100)
            server.sendall(b"pong")
            return got

        def call() -> bytes:
            client.handshake()
            client.sendall(b"ping")
            return client.recv(100)

        return concurrently(serve, call)


def identity_of(cert: pki.CertPaths) -> Identity:
    return Identity.from_certificate(pki.load_certificate(cert.certificate))


# --- handshakes ------------------------------------------------------------------


def test_mutual_handshake_identifies_both_sides(fleet: Fleet) -> None:
    server_ctx = server_context(fleet.tls(fleet.collector))
    with tls_pair(server_ctx, client_context(fleet.tls(fleet.sender))) as (server, client):
        server_saw, client_saw = concurrently(server.handshake, client.handshake)
        sender = server_saw.value
        assert sender.dns_names == (SENDER,)
        assert sender.fingerprint == pki.fingerprint(fleet.sender.certificate)
        assert client_saw.value.common_name == COLLECTOR
        assert client.conn.get_protocol_version_name() == "TLSv1.3"
        hosts = {SENDER: Host(SENDER, LOOPBACK)}
        assert identify_sender(sender, server.peer_ip(), hosts) is hosts[SENDER]
        check_collector(client_saw.value, Host(COLLECTOR, COLLECTOR))


def test_data_flows_both_ways(fleet: Fleet) -> None:
    served, answered = exchange(
        server_context(fleet.tls(fleet.collector)), client_context(fleet.tls(fleet.sender))
    )
    assert served.value == b"ping"
    assert answered.value == b"pong"


def test_client_cert_from_other_ca_refused_by_server(fleet: Fleet, other_fleet: Fleet) -> None:
    impostor = TLSFiles(
        certificate=str(other_fleet.sender.certificate),
        key=str(other_fleet.sender.key),
        ca=str(fleet.ca.certificate),  # it trusts our collector: only its own cert is foreign
    )
    served, answered = exchange(
        server_context(fleet.tls(fleet.collector)), client_context(impostor)
    )
    assert "certificate verify failed: unable to get local issuer certificate" in served.raised(
        TLSFailure
    )
    assert "unknown ca" in answered.raised(TLSFailure)


def test_server_cert_from_other_ca_refused_by_client(fleet: Fleet, other_fleet: Fleet) -> None:
    impostor = TLSFiles(
        certificate=str(other_fleet.collector.certificate),
        key=str(other_fleet.collector.key),
        ca=str(fleet.ca.certificate),
    )
    served, answered = exchange(server_context(impostor), client_context(fleet.tls(fleet.sender)))
    message = answered.raised(TLSFailure)
    assert message.startswith("handshake: ")
    assert "certificate verify failed: unable to get local issuer certificate" in message
    assert "unknown ca" in served.raised(TLSFailure)


def test_impostor_ca_with_our_ca_name_refused(fleet: Fleet, tmp_path: Path) -> None:
    # Same CA subject, different key: chain building finds a name match, the signature fails.
    lookalike = make_fleet(tmp_path, "dlogd test fleet")
    impostor = TLSFiles(
        certificate=str(lookalike.sender.certificate),
        key=str(lookalike.sender.key),
        ca=str(fleet.ca.certificate),
    )
    served, _ = exchange(server_context(fleet.tls(fleet.collector)), client_context(impostor))
    assert "certificate verify failed" in served.raised(TLSFailure)


def test_expired_client_cert_refused(fleet: Fleet) -> None:
    served, answered = exchange(
        server_context(fleet.tls(fleet.collector)), client_context(fleet.tls(fleet.expired))
    )
    assert "certificate has expired (certificate depth 0: CN=web1)" in served.raised(TLSFailure)
    assert "alert certificate expired" in answered.raised(TLSFailure)


def test_refused_certificate_still_named_for_the_log(fleet: Fleet, other_fleet: Fleet) -> None:
    impostor = TLSFiles(
        certificate=str(other_fleet.sender.certificate),
        key=str(other_fleet.sender.key),
        ca=str(fleet.ca.certificate),
    )
    server_ctx = server_context(fleet.tls(fleet.collector))
    with tls_pair(server_ctx, client_context(impostor)) as (server, client):
        served, _ = concurrently(server.handshake, client.handshake)
        served.raised(TLSFailure)
        assert server.presented is not None
        assert server.presented.fingerprint == pki.fingerprint(other_fleet.sender.certificate)
        assert server.presented.dns_names == (SENDER,)


def test_client_without_cert_refused(fleet: Fleet) -> None:
    bare = SSL.Context(SSL.TLS_CLIENT_METHOD)
    bare.load_verify_locations(str(fleet.ca.certificate))
    bare.set_verify(SSL.VERIFY_PEER)
    served, answered = exchange(server_context(fleet.tls(fleet.collector)), bare)
    assert "peer did not return a certificate" in served.raised(TLSFailure)
    assert "alert certificate required" in answered.raised(TLSFailure)


def tls12_only_client(fleet: Fleet) -> SSL.Context:
    ctx = client_context(fleet.tls(fleet.sender, min_version="1.2"))
    ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    return ctx


def test_tls12_client_refused_when_minimum_is_13(fleet: Fleet) -> None:
    served, answered = exchange(
        server_context(fleet.tls(fleet.collector)), tls12_only_client(fleet)
    )
    assert "unsupported protocol" in served.raised(TLSFailure)
    assert "alert protocol version" in answered.raised(TLSFailure)


def test_tls12_client_accepted_when_configured(fleet: Fleet) -> None:
    server_ctx = server_context(fleet.tls(fleet.collector, min_version="1.2"))
    with tls_pair(server_ctx, tls12_only_client(fleet)) as (server, client):
        server_saw, _ = concurrently(server.handshake, client.handshake)
        assert server_saw.value.dns_names == (SENDER,)
        assert server.conn.get_protocol_version_name() == "TLSv1.2"
        assert "ECDHE" in (server.conn.get_cipher_name() or "")


def test_plaintext_client_refused_promptly(fleet: Fleet) -> None:
    server_sock, client_sock = tcp_pair()
    with (
        client_sock,
        TLSStream(
            server_sock, server_context(fleet.tls(fleet.collector)), server_side=True, timeout=5.0
        ) as server,
    ):
        client_sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        started = time.monotonic()
        with pytest.raises(TLSFailure, match="not speaking TLS"):
            server.handshake()
        assert time.monotonic() - started < 2.5  # well under the 5 s timeout


def test_silent_client_times_out(fleet: Fleet) -> None:
    server_sock, client_sock = tcp_pair()
    with (
        client_sock,
        TLSStream(
            server_sock, server_context(fleet.tls(fleet.collector)), server_side=True, timeout=0.3
        ) as server,
    ):
        started = time.monotonic()
        with pytest.raises(TLSTimeout, match=r"^handshake: no progress from peer within 0.3s"):
            server.handshake()
        assert 0.3 <= time.monotonic() - started < 2.0


def test_32_mib_arrive_intact(fleet: Fleet) -> None:
    payload = os.urandom(32 * 1024 * 1024)
    server_ctx = server_context(fleet.tls(fleet.collector))
    with tls_pair(server_ctx, client_context(fleet.tls(fleet.sender))) as (server, client):
        concurrently(server.handshake, client.handshake)

        def receive() -> tuple[str, int]:
            digest, total, buffer = hashlib.sha256(), 0, bytearray(CHUNK)
            view = memoryview(buffer)
            while got := server.recv_into(buffer):
                digest.update(view[:got])
                total += got
            server.shutdown()
            return digest.hexdigest(), total

        def send() -> None:
            client.sendall(payload)
            client.shutdown()

        received, sent = concurrently(receive, send)
        sent.value  # noqa: B018 -- raises if the sender failed
        assert received.value == (hashlib.sha256(payload).hexdigest(), len(payload))


def test_clean_close_reads_as_end_of_stream(fleet: Fleet) -> None:
    server_ctx = server_context(fleet.tls(fleet.collector))
    with tls_pair(server_ctx, client_context(fleet.tls(fleet.sender))) as (server, client):
        concurrently(server.handshake, client.handshake)

        def serve() -> tuple[bytes, bytes]:
            first, again = server.recv(10), server.recv(10)
            server.shutdown()  # answers the client's close_notify, which it waits for
            return first, again

        started = time.monotonic()
        received, closed = concurrently(serve, client.shutdown)
        assert received.value == (b"", b"")
        assert closed.error is None
        assert time.monotonic() - started < 2.5  # well under the 5 s timeout


def test_abrupt_close_is_peer_closed(fleet: Fleet) -> None:
    server_ctx = server_context(fleet.tls(fleet.collector))
    with tls_pair(server_ctx, client_context(fleet.tls(fleet.sender))) as (server, client):
        concurrently(server.handshake, client.handshake)
        client.close()
        assert server.peer_ip() == LOOPBACK  # still known for the log, though the peer left
        # Unread session tickets in the client's buffer turn its close into an RST.
        with pytest.raises(PeerClosed, match=r"without TLS close_notify|\(ECONNRESET\)"):
            server.recv(10)


def test_inherited_fd_is_served(fleet: Fleet) -> None:
    server_sock, client_sock = tcp_pair()
    server = TLSStream.from_fd(
        server_sock.detach(),
        server_context(fleet.tls(fleet.collector)),
        server_side=True,
        timeout=5.0,
    )
    client = TLSStream(
        client_sock, client_context(fleet.tls(fleet.sender)), server_side=False, timeout=5.0
    )
    with server, client:
        server_saw, _ = concurrently(server.handshake, client.handshake)
        assert server_saw.value.common_name == SENDER
        assert server.peer_ip() == LOOPBACK


@pytest.mark.parametrize(
    ("make_socket", "reason"),
    [
        (lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM), "is not a stream socket"),
        (lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM), "is not a connected socket"),
    ],
)
def test_unusable_inherited_fd_refused(
    fleet: Fleet, make_socket: Callable[[], socket.socket], reason: str
) -> None:
    fd = make_socket().detach()
    with pytest.raises(TLSFailure, match=reason):
        TLSStream.from_fd(
            fd, server_context(fleet.tls(fleet.collector)), server_side=True, timeout=1.0
        )
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)  # what we were handed is closed, not leaked


def test_inherited_non_socket_refused(fleet: Fleet, tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    with pytest.raises(TLSFailure, match=f"fd {fd} is not a socket"):
        TLSStream.from_fd(
            fd, server_context(fleet.tls(fleet.collector)), server_side=True, timeout=1.0
        )
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)


# --- who is on the other end -----------------------------------------------------------


def test_unknown_sender_name_refused(fleet: Fleet) -> None:
    with pytest.raises(PeerRefused) as refused:
        identify_sender(identity_of(fleet.sender), LOOPBACK, {"web2": Host("web2", "web2")})
    assert refused.value.code is Refusal.UNKNOWN_NAME
    assert "['web1']" in refused.value.detail


def test_name_matching_ignores_case(fleet: Fleet) -> None:
    hosts = {"WEB1": Host("WEB1", "WEB1")}
    assert identify_sender(identity_of(fleet.sender), LOOPBACK, hosts) is hosts["WEB1"]


def test_cert_naming_two_configured_hosts_refused(fleet: Fleet, tmp_path: Path) -> None:
    both = pki.make_host_cert(fleet.ca, "web1", tmp_path, dns_names=("web1", "web2"))
    hosts = {n: Host(n, n) for n in ("web1", "web2")}
    with pytest.raises(PeerRefused) as refused:
        identify_sender(identity_of(both), LOOPBACK, hosts)
    assert refused.value.code is Refusal.AMBIGUOUS_NAME


def test_cn_identifies_only_without_dns_names(fleet: Fleet, tmp_path: Path) -> None:
    hosts = {"db1": Host("db1", "db1"), "web1": Host("web1", "web1")}
    assert identify_sender(identity_of(fleet.cn_only), LOOPBACK, hosts) is hosts["db1"]
    # CN "web1" but SAN "web1-alias": the SAN is what counts.
    alias = pki.make_host_cert(fleet.ca, "web1", tmp_path, dns_names=("web1-alias",))
    with pytest.raises(PeerRefused) as refused:
        identify_sender(identity_of(alias), LOOPBACK, hosts)
    assert refused.value.code is Refusal.UNKNOWN_NAME


def test_pin_mismatch_refused(fleet: Fleet) -> None:
    pinned = pki.fingerprint(fleet.collector.certificate)
    with pytest.raises(PeerRefused) as refused:
        identify_sender(
            identity_of(fleet.sender), LOOPBACK, {SENDER: Host(SENDER, SENDER, fingerprint=pinned)}
        )
    assert refused.value.code is Refusal.PIN_MISMATCH
    assert pinned in refused.value.detail


def openssl_fingerprint(cert: Path) -> str:
    """SHA-256 fingerprint as the openssl CLI prints it: AB:CD:..."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl CLI not installed: needed as an independent fingerprint oracle")
    out = subprocess.run(
        [openssl, "x509", "-in", str(cert), "-noout", "-fingerprint", "-sha256"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.strip().split("=", 1)[1]


def test_pin_match_accepted(fleet: Fleet) -> None:
    cli = openssl_fingerprint(fleet.sender.certificate)
    expected = cli.replace(":", "").lower()
    assert pki.fingerprint(fleet.sender.certificate) == expected
    for pin in (expected, cli):  # the openssl CLI's colon form is accepted too
        hosts = {SENDER: Host(SENDER, SENDER, fingerprint=pin)}
        assert identify_sender(identity_of(fleet.sender), LOOPBACK, hosts) is hosts[SENDER]


def test_address_mismatch_refused(fleet: Fleet) -> None:
    with pytest.raises(PeerRefused) as refused:
        identify_sender(identity_of(fleet.sender), LOOPBACK, {SENDER: Host(SENDER, "10.1.2.3")})
    assert refused.value.code is Refusal.ADDRESS_MISMATCH
    assert "10.1.2.3" in refused.value.detail


def test_address_required_when_configured_but_peer_has_none(fleet: Fleet) -> None:
    with pytest.raises(PeerRefused) as refused:
        identify_sender(identity_of(fleet.sender), None, {SENDER: Host(SENDER, LOOPBACK)})
    assert refused.value.code is Refusal.ADDRESS_MISMATCH


@pytest.mark.parametrize(
    ("configured", "peer"),
    [
        ("127.0.0.1", "::ffff:127.0.0.1"),  # IPv4 peer on a dual-stack listener
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("2001:db8::1", "2001:db8:0:0::1"),
        ("web1", "192.0.2.99"),  # a host name is not an address to compare
    ],
)
def test_address_match_accepted(fleet: Fleet, configured: str, peer: str) -> None:
    hosts = {SENDER: Host(SENDER, configured)}
    assert identify_sender(identity_of(fleet.sender), peer, hosts) is hosts[SENDER]


def test_collector_with_wrong_name_refused(fleet: Fleet) -> None:
    with pytest.raises(PeerRefused) as refused:
        check_collector(identity_of(fleet.sender), Host(COLLECTOR, COLLECTOR))
    assert refused.value.code is Refusal.NAME_MISMATCH


def test_collector_pin_checked(fleet: Fleet) -> None:
    wrong = pki.fingerprint(fleet.sender.certificate)
    with pytest.raises(PeerRefused) as refused:
        check_collector(identity_of(fleet.collector), Host(COLLECTOR, COLLECTOR, fingerprint=wrong))
    assert refused.value.code is Refusal.PIN_MISMATCH
    right = pki.fingerprint(fleet.collector.certificate)
    check_collector(identity_of(fleet.collector), Host(COLLECTOR, COLLECTOR, fingerprint=right))


# --- our own files ------------------------------------------------------------------------


def test_missing_certificate_named(fleet: Fleet, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.crt")
    tls = TLSFiles(certificate=missing, key=str(fleet.sender.key), ca=str(fleet.ca.certificate))
    with pytest.raises(TLSConfigError) as error:
        client_context(tls)
    assert error.value.path == missing
    assert "cannot read certificate chain: No such file or directory" in str(error.value)


def test_garbage_ca_named(fleet: Fleet, tmp_path: Path) -> None:
    garbage = tmp_path / "ca.crt"
    garbage.write_text("not a certificate\n")
    tls = TLSFiles(str(fleet.sender.certificate), str(fleet.sender.key), str(garbage))
    with pytest.raises(
        TLSConfigError, match=f"^{re.escape(str(garbage))}: cannot load CA certificates: "
    ):
        server_context(tls)


def test_key_not_matching_certificate_named(fleet: Fleet) -> None:
    tls = TLSFiles(
        str(fleet.sender.certificate), str(fleet.collector.key), str(fleet.ca.certificate)
    )
    with pytest.raises(TLSConfigError) as error:
        server_context(tls)
    assert error.value.path == str(fleet.collector.key)


def test_unknown_min_version_refused(fleet: Fleet) -> None:
    with pytest.raises(TLSConfigError, match=r"'1\.1' is not one of"):
        client_context(fleet.tls(fleet.sender, min_version="1.1"))


# --- the PKI ----------------------------------------------------------------------------


def test_key_and_certificate_modes(fleet: Fleet) -> None:
    for paths in (fleet.ca, fleet.sender):
        assert stat.S_IMODE(paths.key.stat().st_mode) == 0o600
        assert stat.S_IMODE(paths.certificate.stat().st_mode) == 0o644


def test_existing_files_not_replaced(fleet: Fleet) -> None:
    before = fleet.ca.key.read_bytes()
    with pytest.raises(FileExistsError, match=r"/ca\.key: already exists"):
        pki.make_ca(fleet.ca.key.parent, "another")
    assert fleet.ca.key.read_bytes() == before


def test_host_name_cannot_escape_directory(fleet: Fleet, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot be used as a file name"):
        pki.make_host_cert(fleet.ca, "../evil", tmp_path)


# --- as systemd runs it -----------------------------------------------------------------

# The receiving end of an Accept=yes socket unit, reduced to TLS: fd 3, handshake, report
# the sender's identity back over the same session.
ACCEPTED_SERVER = """
import os, sys
from dlogd.config import TLSFiles
from dlogd.tls import TLSStream, server_context
assert os.environ["LISTEN_FDS"] == "1", os.environ.get("LISTEN_FDS")
tls = TLSFiles(*sys.argv[1:4])
with TLSStream.from_fd(3, server_context(tls), server_side=True, timeout=5.0) as stream:
    identity = stream.handshake()
    stream.sendall(f"{identity.common_name} {stream.peer_ip()}".encode())
    stream.shutdown()
"""


@pytest.mark.process
def test_socket_activated_server(fleet: Fleet) -> None:
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.fail("systemd-socket-activate is not installed")
    with socket.create_server((LOOPBACK, 0)) as probe:
        port = probe.getsockname()[1]
    server_files = fleet.tls(fleet.collector)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    child = subprocess.Popen(
        [
            activate,
            "--accept",
            f"--listen={LOOPBACK}:{port}",
            sys.executable,
            "-c",
            ACCEPTED_SERVER,
            server_files.certificate,
            server_files.key,
            server_files.ca,
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stderr is not None
        assert "Listening on" in child.stderr.readline()
        sock = socket.create_connection((LOOPBACK, port), timeout=5.0)
        with TLSStream(
            sock, client_context(fleet.tls(fleet.sender)), server_side=False, timeout=10.0
        ) as client:
            check_collector(client.handshake(), Host(COLLECTOR, COLLECTOR))
            answer, ended = client.recv(100), client.recv(100)
            client.shutdown()
        assert answer == f"{SENDER} {LOOPBACK}".encode()
        assert ended == b""
    finally:
        child.terminate()
        child.wait(5)


def test_hanging_up_mid_stream_lets_peer_read_last_message(fleet: Fleet) -> None:
    server_ctx = server_context(fleet.tls(fleet.collector))
    with tls_pair(server_ctx, client_context(fleet.tls(fleet.sender))) as (server, client):
        concurrently(server.handshake, client.handshake)
        client.sendall(b"pipelined request " * 1000)  # the server will never read these
        assert server.readable_now()

        def refuse() -> None:
            server.sendall(b"go away")
            server.shutdown(discard=True)
            server.close()  # with unread input this would send RST, had shutdown not drained it

        def listen() -> bytes:
            time.sleep(0.1)  # a slow reader: a hasty close would have hit us with RST by now
            got = client.recv(100)
            client.shutdown()
            return got

        refused, heard = concurrently(refuse, listen)
        assert refused.error is None
        assert heard.value == b"go away"


def test_data_after_close_is_an_error_unless_discarded(fleet: Fleet) -> None:
    server_ctx = server_context(fleet.tls(fleet.collector))
    with tls_pair(server_ctx, client_context(fleet.tls(fleet.sender))) as (server, client):
        concurrently(server.handshake, client.handshake)
        assert not server.readable_now()
        client.sendall(b"unexpected")
        with pytest.raises(TLSFailure, match="peer sent data after we closed the session"):
            server.shutdown()
