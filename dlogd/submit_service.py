"""The submit service: one socket-activated instance per connection (``dlogd-submit@``).

Flow: an application's ``dlogd.client.submit()`` connects to /run/dlogd/submit.sock;
systemd (``Accept=yes``) starts this program with the connection on fd 3. For each
request (docs/submit-protocol.md) it checks the caller's credentials against the
keyword, checks the descriptor it was handed, adds the file to the spool
(``dlogd.spool``), makes the batch durable, then answers. The shipper takes it
from there.

Modes, as systemd-coredump: LISTEN_FDS=1 serves that one connection and exits;
no LISTEN_FDS and ``--listen PATH`` runs a development accept loop; anything
else is an error. This process starts per connection, so imports stay lean:
no schema, no TLS, no ``systemd.journal`` on this path.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import grp
import os
import socket
import stat
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from dlogd import activation, journal, submitwire
from dlogd.config import (
    DEFAULT_CLIENT_CONFIG,
    ClientConfig,
    ClientKeyword,
    Limits,
    load_client,
    load_logged,
)
from dlogd.crash import crash_point
from dlogd.fsutil import DIR_FLAGS
from dlogd.names import BadBasename, entry_basename
from dlogd.quota import Space
from dlogd.spool import Added, Spool, SpoolFull
from dlogd.submitwire import Request, Response, SubmitCode, WireError

MAX_FDS_PER_MESSAGE = 16  # room to notice (and close) extra descriptors
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_UCRED = struct.Struct("iII")
_GID = struct.Struct("I")
_MAX_GROUPS = 65536
# Spool failures a later retry may cure; anything else is INTERNAL. No room is
# SPOOL_FULL, whether a quota or the disk itself said so.
_TEMPORARY = frozenset({errno.EIO, errno.EAGAIN, errno.EMFILE})
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT})


class BadRequest(Exception):
    """The stream is not the protocol any more: answer BAD_REQUEST and hang up."""


class Disconnected(Exception):
    """The connection ends without an answer to what was in progress; ``why`` is a
    token for the journal: timeout, reset, half-header, half-request, or a spent
    budget (budget-requests, budget-time)."""

    def __init__(self, why: str, detail: str) -> None:
        super().__init__(detail)
        self.why = why


@dataclass(frozen=True)
class Budget:
    """What one connection may use whatever the timing of its requests (issue 9 item 6).

    The timeout is reset by every request, so without this a client sending one
    request every few seconds would hold an instance for ever, and 64 of them
    (``MaxConnections=64`` in dlogd-submit.socket) every other user's submits.
    ``seconds`` stays under the unit's ``RuntimeMaxSec=10min``, so the service
    ends a connection itself, between batches, answered, rather than being
    killed in the middle of one. ``per_uid`` concurrent connections per caller
    uid keep one user from taking every slot; a connection over it waits up to
    ``slot_wait`` for one (a burst of short submits by one user is normal),
    then is refused.
    """

    requests: int = 100_000
    seconds: float = 300.0
    per_uid: int = 16
    slot_wait: float = 5.0


@dataclass(frozen=True)
class Peer:
    """Who is on the other end, from the kernel (SO_PEERCRED, SO_PEERGROUPS)."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int]


@dataclass
class Authorizer:
    """Keyword access for one peer; group names resolved once per connection."""

    peer: Peer
    _gids: dict[str, int | None] = field(default_factory=dict)

    def allows(self, keyword: ClientKeyword) -> bool:
        if self.peer.uid in keyword.uids:
            return True
        caller = self.peer.groups | {self.peer.gid}
        return any(self._gid(name) in caller for name in keyword.groups)

    def _gid(self, name: str) -> int | None:
        if name not in self._gids:
            try:
                self._gids[name] = grp.getgrnam(name).gr_gid
            except KeyError:
                self._gids[name] = None  # an unknown group matches nobody
        return self._gids[name]


@dataclass
class Received:
    """One request off the wire, owning the descriptor that came with it."""

    request: Request
    fd: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class Handled:
    request: Request
    response: Response
    added: Added | None = None
    fields: dict[str, int] = field(default_factory=dict)  # sizes for the journal (SPOOL_FULL)


# -- the socket layer --------------------------------------------------------------


def peer_of(sock: socket.socket) -> Peer:
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return Peer(pid, uid, gid, _peer_groups(sock))


def _peer_groups(sock: socket.socket) -> frozenset[int]:
    size = 64 * _GID.size
    while True:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as e:
            if e.errno != errno.ERANGE or size >= _MAX_GROUPS * _GID.size:
                raise
            size *= 4
            continue
        return frozenset(g for (g,) in _GID.iter_unpack(raw[: len(raw) - len(raw) % _GID.size]))


class Stream:
    """Reads exact byte counts with descriptors attached: one deadline per request,
    never past the connection's budget."""

    def __init__(self, sock: socket.socket, timeout: float, budget: Budget = Budget()) -> None:
        self.sock = sock
        self.timeout = timeout
        self.deadline = 0.0
        self.budget = budget
        self.ends = time.monotonic() + budget.seconds
        self.requests = 0

    def start_request(self) -> None:
        if self.requests >= self.budget.requests:
            raise Disconnected("budget-requests", f"{self.requests} requests on one connection")
        self.requests += 1
        self.deadline = min(time.monotonic() + self.timeout, self.ends)

    def _timed_out(self) -> Disconnected:
        if self.deadline >= self.ends:
            return Disconnected("budget-time", f"connection open {self.budget.seconds:g} s")
        return Disconnected("timeout", f"no progress for {self.timeout:g} s")

    def read(self, count: int, fds: list[int]) -> bytes:
        """Up to ``count`` bytes (fewer only at end of stream); descriptors go to ``fds``."""
        data = bytearray()
        space = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * 4)
        while len(data) < count:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise self._timed_out()
            self.sock.settimeout(remaining)
            try:
                chunk, anc, flags, _ = self.sock.recvmsg(
                    count - len(data), space, socket.MSG_CMSG_CLOEXEC
                )
            except TimeoutError:
                raise self._timed_out() from None
            except (ConnectionResetError, BrokenPipeError):
                raise Disconnected("reset", "connection reset") from None
            fds.extend(_fds_in(anc))
            if flags & socket.MSG_CTRUNC:
                raise BadRequest("too many descriptors (control message truncated)")
            if not chunk:
                break
            data += chunk
        return bytes(data)

    def more_waiting(self) -> bool:
        """A next request (or end of stream) is already readable: part of this batch."""
        self.sock.settimeout(0.0)  # with a timeout set, Python would poll before peeking
        try:
            return bool(self.sock.recv(1, socket.MSG_PEEK))
        except OSError:  # BlockingIOError: nothing yet; others surface on the next read
            return False

    def send(self, data: bytes) -> None:
        self.sock.settimeout(self.timeout)
        self.sock.sendall(data)


def _fds_in(ancillary: list[tuple[int, int, bytes]]) -> Iterator[int]:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            yield from (int.from_bytes(data[i : i + 4], sys.byteorder) for i in range(0, usable, 4))


def read_request(stream: Stream) -> Received | None:
    """The next request, None at a clean end of stream. Closes stray fds on every path."""
    fds: list[int] = []
    try:
        stream.start_request()
        header = stream.read(submitwire.REQUEST_HEADER.size, fds)
        if not header and not fds:
            return None
        if len(header) < submitwire.REQUEST_HEADER.size:
            raise Disconnected("half-header", "end of stream inside a request header")
        header_fds = len(fds)
        klen, plen = submitwire.parse_request_header(header)
        body = stream.read(klen + plen, fds)
        if len(body) < klen + plen:
            raise Disconnected("half-request", "end of stream inside a request")
        if header_fds != 1 or len(fds) != 1:
            raise BadRequest(f"expected one descriptor with the header, got {len(fds)}")
        received = Received(submitwire.parse_request_body(body, klen), fds.pop())
    except WireError as e:
        raise BadRequest(str(e)) from None
    finally:
        for fd in fds:
            os.close(fd)
    return received


# -- one request -------------------------------------------------------------------


class RequestRefused(Exception):
    def __init__(
        self, code: SubmitCode, message: str, fields: dict[str, int] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.fields = fields or {}


class Handler:
    """Checks and spools requests for one connection's peer."""

    def __init__(self, config: ClientConfig, spool: Spool, peer: Peer) -> None:
        self.config = config
        self.spool = spool
        self.auth = Authorizer(peer)
        # Set by the first SPOOL_FULL: the later requests of this connection are
        # refused too, so a batch is spooled as an in-order prefix (issue 14).
        self.full = False

    def handle(self, received: Received) -> Handled:
        request = received.request
        try:
            added = self._spool(request, received.fd)
        except RequestRefused as e:
            self.full = self.full or e.code is SubmitCode.SPOOL_FULL
            return Handled(request, Response(e.code, str(e)), fields=e.fields)
        return Handled(request, Response(SubmitCode.OK, added.path, added.size), added)

    def _spool(self, request: Request, fd: int) -> Added:
        keyword = self.config.keywords.get(request.keyword)
        if keyword is None:
            raise RequestRefused(
                SubmitCode.UNKNOWN_KEYWORD, f"no keyword {request.keyword!r} configured"
            )
        if not self.auth.allows(keyword):
            raise RequestRefused(
                SubmitCode.PERMISSION_DENIED, f"not allowed to submit to {keyword.name!r}"
            )
        size = _check_descriptor(fd, self.config.limits)
        try:
            basename = entry_basename(request.path)
        except BadBasename as e:
            raise RequestRefused(SubmitCode.BAD_NAME, str(e)) from None
        if self.full:
            raise RequestRefused(
                SubmitCode.SPOOL_FULL,
                "spool full: an earlier file on this connection was refused, so no later"
                " one is spooled before it",
                {"size": size},
            )
        try:
            return self.spool.add(
                keyword.name,
                fd,
                basename,
                keyword.hosts,
                copy=keyword.copy,
                caller=self.auth.peer.uid,  # a resubmit by the same caller gets the same entry
            )
        except SpoolFull as e:
            raise RequestRefused(
                SubmitCode.SPOOL_FULL,
                e.strerror or "spool full",
                {"size": size, **e.refusal.fields()},
            ) from None
        except OSError as e:
            raise _spool_failure(e, size, self.spool.root_fd) from None
        except ValueError as e:
            raise RequestRefused(SubmitCode.INTERNAL, f"bad configuration: {e}") from None


def _check_descriptor(fd: int, limits: Limits) -> int:
    """Only a regular file the caller opened for reading, within the size limit."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    # An O_PATH or write-only descriptor proves no right to read the file.
    if flags & os.O_PATH or flags & os.O_ACCMODE == os.O_WRONLY:
        raise RequestRefused(SubmitCode.PERMISSION_DENIED, "descriptor is not open for reading")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise RequestRefused(
            SubmitCode.NOT_REGULAR_FILE, f"not a regular file (mode {st.st_mode:o})"
        )
    # procfs (and the like) report st_size 0 for files with content: both link and
    # copy would spool them empty. One byte read at offset 0 tells; a normal empty
    # file reads nothing. (sysfs reports 4096 and is copied as its real bytes.)
    if st.st_size == 0 and os.pread(fd, 1, 0):
        raise RequestRefused(
            SubmitCode.NOT_REGULAR_FILE,
            "the kernel reports size 0 but the file has content (a /proc file, or one"
            " still being written): copy it to a regular file and submit that",
        )
    if st.st_size > limits.max_file_size:
        raise RequestRefused(
            SubmitCode.TOO_LARGE, f"{st.st_size} bytes is over the limit of {limits.max_file_size}"
        )
    return st.st_size


def _spool_failure(e: OSError, size: int, spool_fd: int) -> RequestRefused:
    reason = f"spooling {size} bytes failed: {os.strerror(e.errno or 0)}"
    if e.errno in _NO_ROOM:
        fields = {"size": size}
        with contextlib.suppress(OSError):
            fields["free"] = Space.of_fd(spool_fd).free
        return RequestRefused(SubmitCode.SPOOL_FULL, f"spool full: {reason}", fields)
    code = SubmitCode.TEMPORARY_FAILURE if e.errno in _TEMPORARY else SubmitCode.INTERNAL
    return RequestRefused(code, reason)


# -- one connection ----------------------------------------------------------------


def serve_connection(
    sock: socket.socket,
    config: ClientConfig | None,
    config_error: str = "",
    *,
    budget: Budget = Budget(),
) -> None:
    """Answer every request on ``sock`` until end of stream, error, timeout or budget."""
    limits = config.limits if config is not None else Limits()
    stream = Stream(sock, limits.timeout, budget)
    peer = peer_of(sock)
    if config is None:
        _refuse_all(stream, peer, SubmitCode.INTERNAL, f"service misconfigured: {config_error}")
        return
    try:
        spool = Spool(
            config.spool,
            create=True,
            max_size=config.quota.max_size,
            min_free=config.quota.min_free,
        )
    except OSError as e:
        reason = f"spool {config.spool}: {os.strerror(e.errno or 0)}"
        _refuse_all(stream, peer, SubmitCode.INTERNAL, f"service misconfigured: {reason}")
        return
    with spool:
        slot = _wait_for_slot(spool.root_fd, peer.uid, budget)
        if slot is None:
            _report_dropped("uid-limit", f"{budget.per_uid} connections of uid {peer.uid}", peer)
            message = (
                f"uid {peer.uid} already has {budget.per_uid} submit connections open:"
                " retry after one of them ends"
            )
            _refuse_all(stream, peer, SubmitCode.TEMPORARY_FAILURE, message, first_only=True)
            return
        try:
            handler = Handler(config, spool, peer)
            while _serve_batch(stream, handler, spool, peer, limits.max_batch):
                pass
        finally:
            os.close(slot)


CONNECTION_SLOTS = ".connections"


def _wait_for_slot(root_fd: int, uid: int, budget: Budget) -> int | None:
    waited_until = time.monotonic() + budget.slot_wait
    while (slot := _take_slot(root_fd, uid, budget.per_uid)) is None:
        if time.monotonic() >= waited_until:
            return None
        time.sleep(0.05)  # slots are flocks: nothing to wait on but time
    return slot


def _take_slot(root_fd: int, uid: int, limit: int) -> int | None:
    """One of ``limit`` per-uid slots: an flock on ``<spool>/.connections/<uid>.<n>``.

    A lock, not a count, so that a killed instance frees its slot with its
    process and nothing needs repair. The files stay (at most ``limit`` per uid
    that ever connected). None when every slot is held.
    """
    with contextlib.suppress(FileExistsError):
        os.mkdir(CONNECTION_SLOTS, 0o700, dir_fd=root_fd)
    dir_fd = os.open(CONNECTION_SLOTS, DIR_FLAGS, dir_fd=root_fd)
    try:
        for n in range(limit):
            flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(f"{uid}.{n}", flags, 0o600, dir_fd=dir_fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return fd
    finally:
        os.close(dir_fd)
    return None


def _serve_batch(stream: Stream, handler: Handler, spool: Spool, peer: Peer, limit: int) -> bool:
    """Read what is already waiting (up to ``limit``), commit once, answer in order."""
    outcomes: list[Handled] = []
    go_on = True
    bad: str | None = None
    dropped: Disconnected | None = None
    try:
        while len(outcomes) < limit:
            received = read_request(stream)
            if received is None:
                go_on = False
                break
            try:
                outcomes.append(handler.handle(received))
            finally:
                received.close()
            if not stream.more_waiting():
                break
    except BadRequest as e:
        bad, go_on = str(e), False
    except Disconnected as e:
        dropped, go_on = e, False  # nothing of an unfinished request was spooled
    _commit(spool, outcomes)
    try:
        for outcome in outcomes:
            _report(outcome, peer)
            stream.send(submitwire.encode_response(outcome.response))
        if bad is not None:
            _report_bad(bad, peer)
            stream.send(submitwire.encode_response(Response(SubmitCode.BAD_REQUEST, bad)))
    except OSError:
        return False  # the client left: what was committed stays spooled
    if dropped is not None:
        _report_dropped(dropped.why, str(dropped), peer)
    return go_on


def _commit(spool: Spool, outcomes: list[Handled]) -> None:
    if not any(o.added for o in outcomes):
        return
    crash_point("before-commit")
    try:
        spool.commit()
        spool.announce()
    except OSError as e:
        # Entries linked but not known durable: answer failure so the caller
        # retries. A retry may ship the file twice, never zero times.
        failure = _spool_failure(e, 0, spool.root_fd)
        for o in outcomes:
            if o.added is not None:
                o.response = Response(failure.code, str(failure))
                o.fields = failure.fields
                o.added = None


def _refuse_all(
    stream: Stream, peer: Peer, code: SubmitCode, message: str, *, first_only: bool = False
) -> None:
    """Answer requests with ``code`` until end of stream (or after the first one)."""
    try:
        while (received := read_request(stream)) is not None:
            received.close()
            outcome = Handled(received.request, Response(code, message))
            _report(outcome, peer)
            stream.send(submitwire.encode_response(outcome.response))
            if first_only:
                return
    except (BadRequest, Disconnected, OSError):
        return


def _report(outcome: Handled, peer: Peer) -> None:
    request, response, added = outcome.request, outcome.response, outcome.added
    path = request.path.decode("utf-8", "backslashreplace")
    if added is not None:
        journal.send(
            f"accepted {added.path}" + (" (resubmit: already spooled)" if added.resubmit else ""),
            message_id=journal.SUBMIT_ACCEPTED,
            keyword=request.keyword,
            uid=peer.uid,
            pid=peer.pid,
            path=path,
            entry=added.path,
            # The name the shipper and collector log it under: one field follows it.
            file=added.name,
            size=added.size,
        )
    else:
        journal.send(
            f"refused: {response.message}",
            message_id=journal.SUBMIT_REFUSED,
            priority=4,
            keyword=request.keyword,
            uid=peer.uid,
            pid=peer.pid,
            path=path,
            reason=response.code.name,
            **outcome.fields,
        )


def _report_dropped(why: str, detail: str, peer: Peer) -> None:
    """A connection ended with no request in progress answered: say why (issue 9 item 6)."""
    journal.send(
        f"connection dropped: {detail}",
        message_id=journal.SUBMIT_REFUSED,
        priority=4,
        reason="CONNECTION_DROPPED",
        dropped=why,
        uid=peer.uid,
        pid=peer.pid,
    )


def _report_bad(reason: str, peer: Peer) -> None:
    journal.send(
        f"refused: {reason}",
        message_id=journal.SUBMIT_REFUSED,
        priority=4,
        reason=SubmitCode.BAD_REQUEST.name,
        uid=peer.uid,
        pid=peer.pid,
    )


# -- process modes -----------------------------------------------------------------


def load(path: str) -> tuple[ClientConfig | None, str]:
    return load_logged(load_client, path)


def serve_listening(path: str, loader: Callable[[], tuple[ClientConfig | None, str]]) -> None:
    """Development mode: a socket of our own, one connection at a time."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        if os.path.exists(path) and stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
        server.bind(path)
        os.chmod(path, 0o666)
        server.listen(16)
        while True:
            conn, _ = server.accept()
            with conn:
                config, error = loader()
                serve_connection(conn, config, error)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dlogd-submit",
        description="Spool files submitted over the local socket (run by dlogd-submit@.service).",
    )
    parser.add_argument("--config", default=DEFAULT_CLIENT_CONFIG, help="client config file")
    parser.add_argument(
        "--listen", metavar="PATH", help="without socket activation: listen on PATH (development)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def serve_one(sock: socket.socket) -> int:
        config, error = load(args.config)
        serve_connection(sock, config, error)
        return 0

    def development() -> int:
        serve_listening(args.listen, lambda: load(args.config))
        return 0

    return activation.run(
        "dlogd-submit",
        (socket.AF_UNIX,),
        serve_one,
        development if args.listen else None,
        "--listen PATH",
    )


if __name__ == "__main__":
    sys.exit(main())
