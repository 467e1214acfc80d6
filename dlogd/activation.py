"""systemd socket activation, without importing systemd.daemon (its imports cost ~20 ms).

``submit`` and ``receive`` run as ``Accept=yes`` instances: systemd accepts
the connection and hands it over as fd 3 with LISTEN_FDS=1 and LISTEN_PID set
to us. As systemd-coredump does, the count decides the mode: 0 means "not
socket-activated", 1 means "serve this connection", more is an error.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Collection

SD_LISTEN_FDS_START = 3


def listen_fds() -> int:
    """sd_listen_fds(): 0 unless the descriptors were meant for this process."""
    try:
        if int(os.environ.get("LISTEN_PID", "")) != os.getpid():
            return 0
        return int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return 0


def inherited_connection(
    program: str, families: Collection[int], fd: int = SD_LISTEN_FDS_START
) -> socket.socket:
    """The connection systemd handed over, checked: family, SOCK_STREAM, connected."""
    os.set_inheritable(fd, False)
    sock = socket.socket(fileno=fd)
    if sock.family not in families or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise SystemExit(f"{program}: fd {fd} is not a stream socket of the expected family")
    try:
        sock.getpeername()
    except OSError:
        sock.detach()
        raise SystemExit(
            f"{program}: fd {fd} is not a connected socket (is the .socket unit Accept=yes?)"
        ) from None
    return sock


def run(
    program: str,
    families: Collection[int],
    serve_one: Callable[[socket.socket], int],
    development: Callable[[], int] | None,
    development_option: str,
) -> int:
    """A service's modes, decided by the descriptors systemd passed (as systemd-coredump):
    one is a connection to serve, none means the development mode if it was asked
    for (``development``), more is an error. Returns the exit status."""
    count = listen_fds()
    if count > 1:
        print(f"{program}: expected 1 socket from systemd, got {count}", file=sys.stderr)
        return 2
    if count == 1:
        with inherited_connection(program, families) as sock:
            return serve_one(sock)
    if development is not None:
        return development()
    print(f"{program}: no socket from systemd and no {development_option}", file=sys.stderr)
    return 2
