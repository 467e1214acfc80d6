"""Mutation fuzzing of dlogd's two protocols: in memory, and against live services.

Place in the tests: test_live_fuzz.py drives three fuzzers with one
:class:`Mutator` (seeded, so a finding is replayed by its seed):

* :func:`fuzz_state_machine` feeds mutated recorded conversations to a fresh
  :class:`dlogd.shipwire.Connection` of either role, with the unit tests'
  deterministic apps (tests/unit/test_shipwire.py) answering as dlogd-ship
  and dlogd-receive would, so streams reach deep states before they break.
  Only a ProtocolError may come out; the unparsed buffer stays bounded.
* :func:`collector_session` makes a real mutual-TLS connection to a live
  collector and sends a mutated (but TLS-wrapped) sender conversation.
* :func:`submit_session` sends mutated submit requests, with zero, one or
  several descriptors of assorted kinds, to a live submit service.

Every wait has a deadline; a session that the service neither answers nor
closes in time is reported as a hang.
"""

from __future__ import annotations

import array
import contextlib
import os
import random
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass, field

from OpenSSL import SSL

from dlogd import submitwire
from dlogd.names import MIN_FRAME
from dlogd.shipwire import MAX_BUFFERED, ConnState, ProtocolError, Role
from dlogd.submitwire import Request
from dlogd.tls import TLSError, TLSStream, TLSTimeout
from tests.tlsfixtures import LOOPBACK
from tests.unit.test_shipwire import Disk, FileSpec, ReceiverApp, SenderApp, converse, replay

# Values that make length and size fields interesting.
BOUNDARY_U32 = (0, 1, 0x7F, 0xFF, 0x100, 0xFFFF, 0x10000, MIN_FRAME, 1 << 20, (1 << 20) + 1,
                0x7FFFFFFF, 0xFFFFFFFF)  # fmt: skip


class Mutator:
    """Byte-level mutations of a valid stream, drawn from one seeded generator."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def mutate(self, data: bytes, donors: tuple[bytes, ...] = ()) -> bytes:
        out = bytearray(data)
        for _ in range(self.rng.choice((1, 1, 1, 2, 3, 5))):
            self._one(out, donors)
        return bytes(out)

    def _one(self, out: bytearray, donors: tuple[bytes, ...]) -> None:
        rng = self.rng
        at = rng.randint(0, len(out))
        op = rng.randrange(8)
        if op == 0 and at < len(out):  # flip a bit
            out[at] ^= 1 << rng.randrange(8)
        elif op == 1 and at < len(out):  # set a byte
            out[at] = rng.randrange(256)
        elif op == 2:  # insert noise
            out[at:at] = rng.randbytes(rng.randint(1, 32))
        elif op == 3:  # delete a run
            del out[at : at + rng.randint(1, 64)]
        elif op == 4:  # cut the stream short
            del out[at:]
        elif op == 5 and len(out) > 4:  # overwrite a 32-bit field with a boundary value
            at = min(at, len(out) - 4)
            out[at : at + 4] = struct.pack(">I", rng.choice(BOUNDARY_U32))
        elif op == 6 and out:  # repeat a slice (a replayed message)
            start = rng.randrange(len(out))
            piece = out[start : start + rng.randint(1, 256)]
            out[at:at] = piece
        elif op == 7 and donors:  # splice in part of another valid conversation
            donor = rng.choice(donors)
            start = rng.randrange(max(1, len(donor)))
            out[at:at] = donor[start : start + rng.randint(1, 512)]

    def chunk(self, data: bytes) -> int:
        return self.rng.choice((1, 7, 64, 512, 4096, max(1, len(data))))


# --- conversations ----------------------------------------------------------------------


def random_files(rng: random.Random, tag: str) -> list[FileSpec]:
    files = []
    for i in range(rng.randint(1, 4)):
        size = rng.choice((0, 1, rng.randint(2, 3000), rng.randint(3000, 40000)))
        keyword = "audit" if rng.random() < 0.9 else rng.choice(("other", "secret"))
        files.append(FileSpec(f"fz-{tag}-{i}.log", rng.randbytes(size), keyword))
    return files


def conversation(rng: random.Random, tag: str) -> dict[Role, bytes]:
    """What each side sent in one valid conversation over fresh files (nothing stored)."""
    sender = SenderApp(random_files(rng, tag), window=rng.randint(1, 4), max_frame=MIN_FRAME)
    receiver = ReceiverApp(Disk(keywords=frozenset({"audit"})))
    return converse(sender, receiver).sent


def rich_disk() -> Disk:
    return Disk(stored={"fz-s-0.log": b"seen"}, partial={"fz-s-1.log": b"par"})


# --- in memory ---------------------------------------------------------------------------


@dataclass
class SansIOResult:
    inputs: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    findings: list[str] = field(default_factory=list)


def fuzz_state_machine(seed: int, inputs: int) -> SansIOResult:
    """``inputs`` mutated streams into fresh Connections; anything but ProtocolError is a
    finding, as is a buffer over MAX_BUFFERED or a window overrun."""
    rng = random.Random(seed)
    mutator = Mutator(rng)
    corpus = [conversation(rng, "s") for _ in range(24)]
    donors = tuple(c[r] for c in corpus for r in Role)
    sender_files = [random_files(rng, "s") for _ in range(16)]
    result = SansIOResult()
    for n in range(inputs):
        role = rng.choice((Role.SENDER, Role.RECEIVER))
        base = rng.choice(corpus)[Role.RECEIVER if role is Role.SENDER else Role.SENDER]
        stream = mutator.mutate(base, donors)
        app: SenderApp | ReceiverApp
        if role is Role.SENDER:
            app = SenderApp(rng.choice(sender_files), window=4, max_frame=MIN_FRAME)
        else:
            app = ReceiverApp(rich_disk())
        app.start()
        try:
            replay(app, stream, mutator.chunk(stream))
            # Unparsed bytes are bounded while the connection lives (after an error the
            # rest of the stream is simply never read).
            if app.conn.buffered > MAX_BUFFERED:
                result.findings.append(f"seed {seed} input {n}: buffer over MAX_BUFFERED")
            app.conn.receive_data(b"")
            app.conn.next_event()  # end of stream: ConnectionClosed, or an error
            result.outcomes[f"{role.value}:{app.conn.state.name}"] += 1
        except ProtocolError as exc:
            if app.conn.state is not ConnState.ERROR:
                result.findings.append(f"seed {seed} input {n}: error outside ERROR state")
            result.outcomes[f"{role.value}:{exc.code.name}"] += 1
        except Exception as exc:  # the finding this fuzzer exists for
            result.findings.append(f"seed {seed} input {n}: {type(exc).__name__}: {exc}")
        if app.conn.in_flight > app.conn.window:
            result.findings.append(f"seed {seed} input {n}: more files in flight than the window")
        result.inputs += 1
    return result


# --- live collector ------------------------------------------------------------------------


@dataclass
class LiveResult:
    sessions: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    hangs: list[str] = field(default_factory=list)


def collector_session(
    port: int,
    context: SSL.Context,
    stream: bytes,
    rng: random.Random,
    *,
    wait: float,
    keep_open: bool,
) -> str:
    """One mutual-TLS session carrying ``stream``; how it ended ("hang" if it did not)."""
    sock = socket.create_connection((LOOPBACK, port), timeout=wait)
    tls = TLSStream(sock, context, server_side=False, timeout=wait)
    try:
        try:
            tls.handshake()
        except TLSError as exc:
            return f"handshake:{type(exc).__name__}"
        sent = _send_pieces(tls, stream, rng)
        if not keep_open:
            # Our close_notify: the collector sees end of stream at once.
            with contextlib.suppress(SSL.Error):
                tls.conn.shutdown()
        return ("sent:" if sent else "cut:") + _read_to_end(tls, wait)
    finally:
        tls.close()


def _send_pieces(tls: TLSStream, stream: bytes, rng: random.Random) -> bool:
    view = memoryview(stream)
    try:
        while view:
            n = rng.choice((len(view), 1, 100, 5000))
            tls.sendall(view[:n])
            view = view[n:]
    except (TLSError, OSError):
        return False  # the collector closed on us: fine, if it said why
    return True


def _read_to_end(tls: TLSStream, wait: float) -> str:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            if not tls.recv(65536):
                return "closed"
        except TLSTimeout:
            return "hang"
        except (TLSError, OSError):
            return "reset"
    return "hang"


# --- live submit service ------------------------------------------------------------------


def submit_template(rng: random.Random, path: bytes) -> list[bytes]:
    """Valid requests (header, body) for ``path``, 1-5 of them, keyword mostly right."""
    out = []
    for _ in range(rng.randint(1, 5)):
        keyword = rng.choice(("audit", "audit", "audit", "nope", "a" * 64))
        request = Request(keyword, path)
        out.append(
            submitwire.encode_request_header(request) + submitwire.encode_request_body(request)
        )
    return out


def descriptors(rng: random.Random, regular: str, directory: str) -> list[int]:
    """0-3 descriptors of assorted kinds to pass: the file, a directory, a pipe, /dev/null."""
    fds = []
    for _ in range(rng.choice((0, 1, 1, 1, 1, 2, 3))):
        kind = rng.choice(("file", "file", "file", "dir", "pipe", "null"))
        if kind == "file":
            fds.append(os.open(regular, os.O_RDONLY))
        elif kind == "dir":
            fds.append(os.open(directory, os.O_RDONLY | os.O_DIRECTORY))
        elif kind == "pipe":
            r, w = os.pipe()
            os.close(w)
            fds.append(r)
        else:
            fds.append(os.open(os.devnull, os.O_RDONLY))
    return fds


def submit_session(
    socket_path: str, messages: list[bytes], fds: list[int], rng: random.Random, wait: float
) -> str:
    """Send ``messages`` (the first with ``fds`` attached) and read answers to the end."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(wait)
    try:
        sock.connect(socket_path)
        try:
            first, rest = messages[0], b"".join(messages[1:])
            if fds and first:
                sock.sendmsg(
                    [first], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                )
            else:
                sock.sendall(first)
            sock.sendall(rest)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return "send-refused"
        got = 0
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return "hang"
            except OSError:
                return "reset"
            if not chunk:
                return f"closed:{min(got, 1)}"
            got += len(chunk)
    finally:
        sock.close()
        for fd in fds:
            os.close(fd)
