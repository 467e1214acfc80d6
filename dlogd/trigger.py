"""Trigger files: how one service wakes another through a systemd path unit.

Place in the flow: ``dlogd-submit@`` announces each acknowledged submit for
``dlogd-ship.path``; ``dlogd-receive@`` announces each commit that stored a
file for ``dlogd-archive.path`` (on a collector that archives). The path units
watch with ``PathExists=``, and the woken service takes the file before it
reads its work, so:

- a service that finds a collector or an archive down does not re-fire its
  path unit for as long as the work waits (the file is gone after the run);
- work announced while the service runs (the path unit does not watch then)
  starts the next run when this one ends: systemd checks ``PathExists=``
  again at that point, where a ``PathChanged=`` event would have been lost.

Losing a trigger costs promptness only: every service's timer finds the
work. So a failure here is reported by the caller and never fails its job.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

# The receiver's and the archiver's: where dlogd-archive.path looks (the units set it).
STORED_ENV = "DLOGD_STORED_TRIGGER"


def announce_at(dir_fd: int, name: str) -> None:
    """Create ``name`` in ``dir_fd`` if it is not there (a write-open and close)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    os.close(os.open(name, flags, 0o640, dir_fd=dir_fd))


def take_at(dir_fd: int, name: str) -> None:
    """Remove ``name`` from ``dir_fd``; not there is not an error."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


def announce(path: str) -> None:
    """:func:`announce_at` for a full path (its directory is the unit's, trusted)."""
    _at(path, announce_at)


def take(path: str) -> None:
    """:func:`take_at` for a full path."""
    _at(path, take_at)


def stored_trigger() -> str | None:
    """The collector's trigger for dlogd-archive.path, if the unit names one."""
    return os.environ.get(STORED_ENV) or None


def _at(path: str, do: Callable[[int, str], None]) -> None:
    directory, name = os.path.split(path)
    fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        do(fd, name)
    finally:
        os.close(fd)
