"""The caller's side of a submit: what an application imports to hand a file to dlogd.

Flow: ``submit()`` opens the file as the caller (so the kernel checks the
caller's own access, invariant 4), connects to the ``dlogd-submit@`` service on
the local socket, passes the descriptor with the request (``submitwire``) and
turns the answer into a :class:`Submitted` or a :class:`SubmitError` subclass.
``submit_many()`` does the same for a batch over one pipelined connection, so
the service can make the whole batch durable with one flush.

Imported into applications: standard library only, nothing heavy at import.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from dlogd.submitwire import (
    RESPONSE_HEADER,
    Request,
    Response,
    SubmitCode,
    WireError,
    encode_request_body,
    encode_request_header,
    parse_response_header,
)

__all__ = [
    "DEFAULT_SOCKET",
    "BadName",
    "BadRequest",
    "NotRegularFile",
    "PermissionDenied",
    "ServiceError",
    "SpoolFull",
    "SubmitError",
    "Submitted",
    "TemporaryFailure",
    "TooLarge",
    "UnknownKeyword",
    "default_socket_path",
    "submit",
    "submit_many",
]

DEFAULT_SOCKET: Final = "/run/dlogd/submit.sock"
DEFAULT_TIMEOUT: Final = 30.0
# The default unit copies into the spool and fsyncs before answering: allow a
# slow disk's worth of time for the bytes still to be answered for, on top of
# the timeout. A timeout still means "unknown", not "refused" (docs/api.md).
COPY_RATE: Final = 20 * 1024 * 1024
# Requests sent before their answers are read. Answers are small, so this many
# fit in the socket buffers and neither side blocks the other.
MAX_IN_FLIGHT: Final = 64
# O_NONBLOCK: opening a FIFO must not wait for a writer; the service refuses it.
# No O_NOFOLLOW: the caller may submit through a symlink it can read, and the
# service works from the descriptor the kernel gave the caller, never the name.
_OPEN_FLAGS: Final = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK

PathArg = str | bytes | os.PathLike[str] | os.PathLike[bytes]


@dataclass(frozen=True)
class Submitted:
    """A file the service has made durable in its spool."""

    entry: str  # "<keyword>/<entry name>", relative to the spool directory
    size: int  # bytes spooled


class SubmitError(OSError):
    """The service refused a file; ``code`` says why, ``errno`` follows the spec's table."""

    def __init__(self, code: SubmitCode, message: str, path: str | bytes) -> None:
        super().__init__(code.errno, message, path)
        self.code = code

    def __reduce__(self) -> tuple[type[SubmitError], tuple[object, ...]]:
        return (type(self), (self.code, self.strerror, self.filename))


class BadRequest(SubmitError):
    """The service could not parse the request (a client bug); it closed the connection."""


class UnknownKeyword(SubmitError):
    """No such keyword in the client host's config."""


class PermissionDenied(SubmitError):
    """The caller's uid and groups are not allowed to submit under this keyword."""


class NotRegularFile(SubmitError):
    """The path names a FIFO, directory, device or socket."""


class TooLarge(SubmitError):
    """The file exceeds the configured ``max_file_size``."""


class BadName(SubmitError):
    """The path has no basename usable as a spool entry name."""


class TemporaryFailure(SubmitError):
    """Spool full or an I/O error on the service side; retrying later may work."""


class SpoolFull(TemporaryFailure):
    """The spool is at ``limits { spool_max_size }`` or ``{ spool_min_free }`` (or its disk
    is full): refused, ``errno`` ENOSPC; nothing spooled before is dropped. Retry later."""


class ServiceError(SubmitError):
    """A bug or a bad configuration on the service side."""


_ERROR_CLASSES: Final[dict[SubmitCode, type[SubmitError]]] = {
    SubmitCode.BAD_REQUEST: BadRequest,
    SubmitCode.UNKNOWN_KEYWORD: UnknownKeyword,
    SubmitCode.PERMISSION_DENIED: PermissionDenied,
    SubmitCode.NOT_REGULAR_FILE: NotRegularFile,
    SubmitCode.TOO_LARGE: TooLarge,
    SubmitCode.BAD_NAME: BadName,
    SubmitCode.TEMPORARY_FAILURE: TemporaryFailure,
    SubmitCode.INTERNAL: ServiceError,
    SubmitCode.SPOOL_FULL: SpoolFull,
}


def default_socket_path() -> str:
    """``$DLOGD_SOCKET`` if set and not empty, else the packaged default."""
    return os.environ.get("DLOGD_SOCKET") or DEFAULT_SOCKET


def submit(
    path: PathArg,
    keyword: str,
    *,
    socket_path: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Submitted:
    """Hand one file to dlogd; return once it is durable in the spool.

    Raises the plain ``OSError`` from ``open()`` if the caller cannot open the
    file, an ``OSError`` naming the socket if the service cannot be reached, a
    :class:`SubmitError` subclass if the service refuses, and ``ValueError`` for
    a keyword that the protocol cannot carry. ``timeout`` bounds each socket
    operation, not the whole call.
    """
    [result] = submit_many([path], keyword, socket_path=socket_path, timeout=timeout)
    if isinstance(result, OSError):
        raise result
    return result


def submit_many(
    paths: Iterable[PathArg],
    keyword: str,
    *,
    socket_path: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[Submitted | OSError]:
    """Hand several files to dlogd over one connection, answers in the order given.

    Each item is a :class:`Submitted`, a :class:`SubmitError` (refused), or the
    ``OSError`` from opening that file; one bad file does not stop the batch.
    If the connection breaks, the files whose answers never arrived get that
    error (their fate is unknown: they may or may not be spooled). Raises only
    for an unreachable service or an unusable keyword.
    """
    _check_keyword(keyword)
    with _Batch(socket_path or default_socket_path(), keyword, timeout) as batch:
        return batch.run(paths)


def _check_keyword(keyword: str) -> None:
    # A dummy path: only the keyword is being checked here.
    Request(keyword, b"x")


def _connect(sock_path: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(sock_path)
    except OSError as exc:
        sock.close()
        raise _naming_socket(exc, "cannot reach dlogd", sock_path) from exc
    return sock


def _naming_socket(exc: OSError, what: str, sock_path: str) -> OSError:
    """The same exception class, but saying what failed and naming the socket."""
    if isinstance(exc, TimeoutError):
        return TimeoutError(errno.ETIMEDOUT, f"{what}: timed out", sock_path)
    return type(exc)(exc.errno, f"{what}: {exc.strerror or exc}", sock_path)


class _Batch:
    """One connection's worth of pipelined requests, answered in order."""

    def __init__(self, sock_path: str, keyword: str, timeout: float) -> None:
        self._sock_path = sock_path
        self._keyword = keyword
        self._timeout = timeout
        # Connected at the first file that opens: each connection starts a service
        # process, which a batch of unreadable files should not cost.
        self._sock: socket.socket | None = None
        self._results: list[Submitted | OSError | None] = []
        # (result index, path, size) awaiting answers
        self._pending: deque[tuple[int, bytes, int]] = deque()
        # Kept apart: answers to requests already sent may still be readable after
        # sending failed (the service answers what it got, then closes).
        self._send_failed: OSError | None = None
        self._receive_failed: OSError | None = None

    def __enter__(self) -> _Batch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._sock is not None:
            self._sock.close()

    def run(self, paths: Iterable[PathArg]) -> list[Submitted | OSError]:
        for path in paths:
            self._results.append(self._offer(path))
            if len(self._pending) >= MAX_IN_FLIGHT:
                self._collect_one()
        self._finish_sending()
        while self._pending:
            self._collect_one()
        return [r for r in self._results if r is not None]

    def _offer(self, path: PathArg) -> OSError | None:
        """Send one request; None while its answer is pending, else the failure."""
        if self._send_failed is not None:
            return self._send_failed
        try:
            # The caller's own spelling of the path, so open errors name it as given.
            fd = os.open(path, _OPEN_FLAGS)
        except (OSError, ValueError) as exc:
            return _as_oserror(exc, path)
        try:
            return self._send(fd, os.fsencode(path))
        finally:
            # The descriptor in flight holds its own reference; ours is no longer needed.
            os.close(fd)

    def _send(self, fd: int, path: bytes) -> OSError | None:
        try:
            request = Request(self._keyword, path)
        except WireError as exc:
            # Only a path over the protocol's limit gets here (the keyword was checked).
            return OSError(errno.ENAMETOOLONG, str(exc), path)
        if self._sock is None:
            self._sock = _connect(self._sock_path, self._timeout)  # raises to the caller
        header = encode_request_header(request)
        try:
            sent = socket.send_fds(self._sock, [header], [fd], socket.MSG_NOSIGNAL)
            # The descriptor rides on the first byte; any rest of the header follows plainly.
            self._sock.sendall(header[sent:] + encode_request_body(request), socket.MSG_NOSIGNAL)
        except OSError as exc:
            self._send_failed = self._stream_error(exc)
            return self._send_failed
        self._pending.append((len(self._results), path, _size_of(fd)))
        return None

    def _finish_sending(self) -> None:
        if self._sock is None or self._send_failed is not None:
            return
        # If this fails, the answers (or their absence) tell the rest.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)

    def _collect_one(self) -> None:
        # The service may copy every pending file before it answers (a batch is
        # fsynced together): wait long enough for that, not a fixed 30 s.
        backlog = sum(size for _, _, size in self._pending)
        if self._sock is not None:
            self._sock.settimeout(self._timeout + backlog / COPY_RATE)
        index, path, _ = self._pending.popleft()
        if self._receive_failed is None:
            try:
                self._results[index] = _outcome(self._receive(), path)
                return
            except OSError as exc:
                self._receive_failed = exc
        self._results[index] = self._receive_failed

    def _receive(self) -> Response:
        try:
            header = self._recv_exactly(RESPONSE_HEADER.size)
            code, length, size = parse_response_header(header)
            message = self._recv_exactly(length).decode("utf-8", "replace")
        except WireError as exc:
            raise OSError(
                errno.EPROTO, f"dlogd sent a malformed answer: {exc}", self._sock_path
            ) from exc
        except OSError as exc:
            raise self._stream_error(exc) from exc
        return Response(code, message, size)

    def _recv_exactly(self, count: int) -> bytes:
        assert self._sock is not None  # only called for requests that were sent
        buf = bytearray(count)
        view = memoryview(buf)
        got = 0
        while got < count:
            n = self._sock.recv_into(view[got:])
            if n == 0:
                raise ConnectionAbortedError(
                    errno.ECONNABORTED, "dlogd closed the connection before answering"
                )
            got += n
        return bytes(buf)

    def _stream_error(self, exc: OSError) -> OSError:
        return _naming_socket(exc, "connection to dlogd failed", self._sock_path)


def _size_of(fd: int) -> int:
    try:
        return os.fstat(fd).st_size
    except OSError:
        return 0


def _outcome(response: Response, path: bytes) -> Submitted | SubmitError:
    if response.ok:
        return Submitted(response.message, response.size)
    return _ERROR_CLASSES[response.code](response.code, response.message, os.fsdecode(path))


def _as_oserror(exc: OSError | ValueError, path: PathArg) -> OSError:
    if isinstance(exc, OSError):
        return exc
    # os.open() raises ValueError for an embedded NUL; no file can have that name.
    return OSError(errno.EINVAL, str(exc), os.fspath(path))
