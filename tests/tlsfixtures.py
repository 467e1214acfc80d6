"""Shared TLS test fixtures: a throwaway fleet PKI and connected TLS stream pairs.

Used by the TLS unit tests and by anything above them (shipper, receiver) that
needs real certificates and real TLS over loopback. Import the fixtures into a
conftest (``from tests.tlsfixtures import fleet, other_fleet``) or list this
module in ``pytest_plugins``.
"""

from __future__ import annotations

import datetime
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import pytest
from OpenSSL import SSL

from dlogd import pki
from dlogd.config import TLSFiles
from dlogd.tls import TLSStream

COLLECTOR = "logs1"
SENDER = "web1"
LOOPBACK = "127.0.0.1"

_A = TypeVar("_A")
_B = TypeVar("_B")


@dataclass(frozen=True)
class Fleet:
    """A CA and the certificates tests need, all in one directory."""

    ca: pki.CertPaths
    collector: pki.CertPaths  # logs1, DNS SAN plus 127.0.0.1
    sender: pki.CertPaths  # web1, DNS SAN plus 127.0.0.1
    expired: pki.CertPaths  # web1, validity ended yesterday
    cn_only: pki.CertPaths  # db1, no subjectAltName at all

    def tls(self, host: pki.CertPaths, min_version: str = "1.3") -> TLSFiles:
        return pki.tls_files(self.ca, host, min_version=min_version)


def make_fleet(directory: Path, ca_name: str = "dlogd test fleet") -> Fleet:
    ca = pki.make_ca(directory, ca_name)
    now = datetime.datetime.now(datetime.UTC)
    return Fleet(
        ca=ca,
        collector=pki.make_host_cert(ca, COLLECTOR, directory, ip_addresses=[LOOPBACK]),
        sender=pki.make_host_cert(ca, SENDER, directory, ip_addresses=[LOOPBACK]),
        expired=pki.make_host_cert(
            ca,
            SENDER,
            directory / "expired",
            not_before=now - datetime.timedelta(days=30),
            not_after=now - datetime.timedelta(days=1),
        ),
        cn_only=pki.make_host_cert(ca, "db1", directory, dns_names=()),
    )


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    return make_fleet(tmp_path_factory.mktemp("fleet"))


@pytest.fixture(scope="session")
def other_fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    """Same host names, different CA: what an impostor with its own CA would hold."""
    return make_fleet(tmp_path_factory.mktemp("other-fleet"), "impostor fleet")


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected (server side, client side) pair of loopback TCP sockets."""
    with socket.create_server((LOOPBACK, 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return server, client


@contextmanager
def tls_pair(
    server_ctx: SSL.Context, client_ctx: SSL.Context, *, timeout: float = 5.0
) -> Iterator[tuple[TLSStream, TLSStream]]:
    """(server, client) TLS streams over loopback, before the handshake."""
    server_sock, client_sock = tcp_pair()
    server = TLSStream(server_sock, server_ctx, server_side=True, timeout=timeout)
    client = TLSStream(
        client_sock, client_ctx, server_side=False, timeout=timeout, server_name=COLLECTOR
    )
    with server, client:
        yield server, client


class Outcome(Generic[_A]):
    """What a function returned or raised, to be inspected from the test's thread."""

    def __init__(self) -> None:
        self._value: _A | None = None
        self.error: BaseException | None = None

    def run(self, fn: Callable[[], _A]) -> None:
        try:
            self._value = fn()
        except BaseException as e:
            self.error = e

    # Explicit raises, not assert: this module may be imported before pytest can rewrite it.

    @property
    def value(self) -> _A:
        if self.error is not None:
            raise AssertionError(f"expected a result, got {self.error!r}") from self.error
        return self._value  # type: ignore[return-value]

    def raised(self, kind: type[BaseException]) -> str:
        """The error's message, failing unless it is a *kind*."""
        if not isinstance(self.error, kind):
            raise AssertionError(f"expected {kind.__name__}, got {self.error!r}")
        return str(self.error)


def concurrently(
    server: Callable[[], _A], client: Callable[[], _B], *, limit: float = 10.0
) -> tuple[Outcome[_A], Outcome[_B]]:
    """Run both sides at once (a handshake needs both), the server in a thread."""
    server_outcome: Outcome[_A] = Outcome()
    client_outcome: Outcome[_B] = Outcome()
    thread = threading.Thread(target=server_outcome.run, args=(server,), daemon=True)
    thread.start()
    client_outcome.run(client)
    thread.join(limit)
    if thread.is_alive():
        raise AssertionError(f"server side did not finish within {limit:g}s")
    return server_outcome, client_outcome
