"""A small fault-injecting TCP proxy: delay, stalls and mid-stream resets, per connection.

Place in the tests: the shipper is pointed at the proxy (on loopback), the
proxy forwards to the real collector, and each accepted connection gets the
next :class:`Fault` from a plan the test drew from its seed. The proxy sees
only TLS records, so it breaks the transport the way a network does, never
the content: it can hold bytes back (delay, stall) or end the connection
with a TCP reset at a chosen byte count in either direction.

Every thread has a deadline; ``close()`` ends everything still running.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from tests.tlsfixtures import LOOPBACK

CHUNK = 64 * 1024
IDLE_LIMIT = 120.0  # no connection of a test lives longer than this


@dataclass(frozen=True)
class Fault:
    """What to do to one connection. Byte counts are of the shipper -> collector stream."""

    delay: float = 0.0  # added before each chunk is forwarded, both ways
    stall_at: int | None = None  # after this many bytes, forward nothing ...
    stall_for: float = 0.0  # ... for this long (both ways)
    reset_at: int | None = None  # after this many bytes, RST both sides
    reset_upstream_at: int | None = None  # collector -> shipper bytes before an RST


CLEAN = Fault()


@dataclass
class Stats:
    connections: int = 0
    resets: int = 0
    stalls: int = 0
    delayed_chunks: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a middlebox or a crashed host would."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class FaultProxy:
    """Listens on 127.0.0.1:<port>, forwards to ``target`` applying one fault per connection."""

    def __init__(self, target: tuple[str, int], plan: Iterable[Fault] = ()) -> None:
        self.target = target
        self.plan: deque[Fault] = deque(plan)
        self.stats = Stats()
        self._lock = threading.Lock()
        self._listener = socket.create_server((LOOPBACK, 0))
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._accept = threading.Thread(target=self._accept_loop, daemon=True)
        self._accept.start()

    def add(self, *faults: Fault) -> None:
        with self._lock:
            self.plan.extend(faults)

    def _next_fault(self) -> Fault:
        with self._lock:
            self.stats.connections += 1
            return self.plan.popleft() if self.plan else CLEAN

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            fault = self._next_fault()
            thread = threading.Thread(target=self._serve, args=(client, fault), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, client: socket.socket, fault: Fault) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            _reset(client)
            return
        with self._lock:
            self._sockets += [client, upstream]
        try:
            self._pump(client, upstream, fault)
        except OSError:
            pass
        finally:
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.close()

    def _pump(self, client: socket.socket, upstream: socket.socket, fault: Fault) -> None:
        up = down = 0  # bytes shipper -> collector, collector -> shipper
        stalled = False
        deadline = time.monotonic() + IDLE_LIMIT
        peers = {client: upstream, upstream: client}
        open_ends = {client, upstream}
        while open_ends and time.monotonic() < deadline and not self._closing.is_set():
            readable, _, _ = select.select(list(open_ends), [], [], 0.2)
            for sock in readable:
                data = sock.recv(CHUNK)
                if not data:
                    open_ends.discard(sock)
                    with contextlib.suppress(OSError):
                        peers[sock].shutdown(socket.SHUT_WR)
                    continue
                if sock is client:
                    data, up = self._cut(data, up, fault.reset_at)
                else:
                    data, down = self._cut(data, down, fault.reset_upstream_at)
                if fault.stall_at is not None and not stalled and up >= fault.stall_at:
                    stalled = True
                    self.stats.stalls += 1
                    self._closing.wait(fault.stall_for)
                if fault.delay:
                    self.stats.delayed_chunks += 1
                    self._closing.wait(fault.delay)
                if data:
                    peers[sock].sendall(data)
                    if sock is client:
                        self.stats.bytes_up += len(data)
                    else:
                        self.stats.bytes_down += len(data)
                if self._tripped(fault, up, down):
                    with self._lock:
                        self.stats.resets += 1
                    _reset(client)
                    _reset(upstream)
                    return

    @staticmethod
    def _cut(data: bytes, done: int, limit: int | None) -> tuple[bytes, int]:
        """Forward at most up to ``limit`` bytes in total."""
        if limit is not None and done + len(data) > limit:
            data = data[: max(0, limit - done)]
        return data, done + len(data)

    @staticmethod
    def _tripped(fault: Fault, up: int, down: int) -> bool:
        return (fault.reset_at is not None and up >= fault.reset_at) or (
            fault.reset_upstream_at is not None and down >= fault.reset_upstream_at
        )

    def close(self) -> None:
        self._closing.set()
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()
        for thread in [self._accept, *self._threads]:
            thread.join(5)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
