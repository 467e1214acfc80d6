"""File system helpers more than one module needs (the spool, the store, the shipper).

Nothing here decides where anything lives: the spool and the store own
their layouts. These are the small operations both do the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable

# Directories are always opened like this: never through a symlink, never inherited.
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_HASH_CHUNK = 4 * 1024 * 1024


def hash_fd(fd: int, length: int, progress: Callable[[], None] | None = None) -> hashlib._Hash:
    """SHA-256 of the first ``length`` bytes of ``fd``, read with pread.

    ``progress`` is called every chunk: hashing tens of GB takes minutes, and
    the peer waiting for our answer must hear from us meanwhile (a keepalive).
    """
    digest = hashlib.sha256()
    offset = 0
    while offset < length:
        chunk = os.pread(fd, min(_HASH_CHUNK, length - offset), offset)
        if not chunk:
            break
        digest.update(chunk)
        offset += len(chunk)
        if progress is not None:
            progress()
    return digest


def read_json(path: str) -> dict[str, object]:
    """A small JSON state file as a dict; {} when absent, unreadable, not JSON or a symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        with os.fdopen(fd) as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
