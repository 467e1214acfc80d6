"""The I/O half of a ship-protocol connection, shared by the shipper and the collector.

``ship.Delivery`` (the SENDER) and ``receive.Session`` (the RECEIVER) each
decide what to say about the events of one :class:`dlogd.shipwire.Connection`;
a :class:`Driver` does what both do with the bytes:

- small messages are gathered in an outbox and go out as one TLS record,
  when we are about to wait for the peer or enough has piled up; a big DATA
  frame goes out on its own, with no copy;
- the NEED_DATA loop: read what the peer sent into one reused buffer and
  feed it to the connection, blocking or only if bytes are already there;
- a keepalive Ping when we have been silent for a quarter of the timeout
  (hashing a big file, say), so the peer's idle timer does not fire;
- "tell the peer why, then close": a protocol error or our own idle timeout
  becomes one ERROR message (answers already due go first), then the TLS
  session is shut down.

The stream is anything with the few :class:`Stream` methods; in production a
:class:`dlogd.tls.TLSStream`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Protocol

from dlogd.shipwire import (
    NEED_DATA,
    Buffer,
    Code,
    Connection,
    Error,
    Event,
    Ping,
    ProtocolError,
)
from dlogd.tls import TLSError, TLSTimeout

OUTBOX_LIMIT = 256 * 1024  # gathered bytes that go out without waiting for a pause
SMALL_FRAME = 16 * 1024  # DATA frames up to this size are gathered with their neighbours


class Stream(Protocol):
    """What a driver needs from its transport (a TLSStream, in production)."""

    def sendall(self, data: Buffer) -> None: ...

    def recv_into(self, buffer: bytearray | memoryview, nbytes: int = 0) -> int: ...

    def readable_now(self) -> bool: ...

    def shutdown(self, *, discard: bool = False) -> None: ...


class Driver:
    """Moves one Connection's bytes over one stream; see the module docstring."""

    def __init__(
        self, conn: Connection, stream: Stream, *, timeout: float, inbox_size: int = 64 * 1024
    ) -> None:
        self.conn = conn
        self.stream = stream
        self.timeout = timeout
        self.outbox = bytearray()
        self.inbox = bytearray(inbox_size)
        self.last_sent = time.monotonic()
        self.pings = 0

    # --- sending ---

    def send(self, event: Event) -> None:
        """Say ``event``: gathered, and flushed before we next wait for the peer."""
        self.outbox += self.conn.send(event)
        if len(self.outbox) >= OUTBOX_LIMIT:
            self.flush()

    def send_frame(self, frame: memoryview) -> None:
        """A whole DATA frame (header from ``Connection.send_data_header``, then payload)."""
        if len(frame) <= SMALL_FRAME:
            self.outbox += frame  # goes out with its neighbours
            return
        self.flush()
        self.stream.sendall(frame)

    def flush(self) -> None:
        if self.outbox:
            self.stream.sendall(self.outbox)
            self.outbox.clear()
        self.last_sent = time.monotonic()

    def keepalive(self) -> None:
        """Called while we are busy without talking: a Ping before the peer's timer runs out."""
        if time.monotonic() - self.last_sent > self.timeout / 4:
            self.pings += 1
            self.send(Ping(self.pings))
            self.flush()

    # --- receiving ---

    def next_event(self, before_wait: Callable[[], None] | None = None) -> Event:
        """The peer's next event, waiting for it. Before a wait, ``before_wait`` runs
        if nothing is readable yet (the collector commits its batch there), then
        everything gathered is flushed: we never wait with our own messages unsent."""
        while True:
            event = self.conn.next_event()
            if event is not NEED_DATA:
                return event
            if before_wait is not None and not self.stream.readable_now():
                before_wait()
            self.flush()
            self._read()

    def event_if_any(self) -> Event | None:
        """The peer's next event if its bytes have already arrived, else None."""
        while True:
            event = self.conn.next_event()
            if event is not NEED_DATA:
                return event
            if not self.stream.readable_now():
                return None
            self._read()

    def _read(self) -> None:
        received = self.stream.recv_into(self.inbox)
        self.conn.receive_data(memoryview(self.inbox)[:received] if received else b"")

    # --- endings ---

    def close(self) -> None:
        """A clean end, after the Goodbye exchange: what is gathered goes out, then the
        TLS session is closed both ways. Everything is answered by then, so a peer
        that hangs up first (a reset, a broken pipe) is no failure."""
        self.flush()
        with contextlib.suppress(TLSError, OSError):
            self.stream.shutdown()

    @contextlib.contextmanager
    def telling_why(self, peer: str) -> Iterator[None]:
        """Run a conversation; if it breaks the protocol, or ``peer`` stays silent past
        the timeout, tell the peer why before the exception goes on."""
        try:
            yield
        except ProtocolError as exc:
            self.tell(Error.from_exception(exc))
            raise
        except TLSTimeout:
            self.tell(Error(Code.TIMEOUT, f"nothing from the {peer} for {self.timeout:g} s"))
            raise

    def tell(self, error: Error | None = None) -> None:
        """Best effort: answers already due, then ``error`` (if any and still sayable),
        then hang up without waiting for what the peer may still be sending."""
        data = bytes(self.outbox)
        self.outbox.clear()
        if error is not None:
            with contextlib.suppress(ProtocolError):  # the connection may be over already
                data += self.conn.send(error)
        with contextlib.suppress(TLSError, OSError):
            if data:
                self.stream.sendall(data)
            self.stream.shutdown(discard=True)
