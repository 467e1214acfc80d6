"""Names and limits every part of dlogd agrees on: one rule, one place.

Who checks what against these rules:

- keyword: the config schema, the submit wire format (``submitwire``), the
  C library (``clib/dlogd.c``, tested against :data:`KEYWORD_RE`), the ship
  protocol's Offer, the spool's keyword directories;
- host: the config schema and the spool's per-host marker files;
- spool entry: :func:`entry_basename` turns a caller's path into the
  basename part, :func:`entry_name` adds the submit time; the shipper offers
  entry names as they are, so every entry name is also a stored name;
- stored name: the collector's store, for whatever a sender offers.

Standard library only and cheap to import: the submit service (a process per
connection) reads it.
"""

from __future__ import annotations

import re
from typing import Final

MAX_KEYWORD: Final = 64
KEYWORD_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\Z")
KEYWORD_RULE: Final = f"1-{MAX_KEYWORD} of A-Z a-z 0-9 _ . - (not starting with . or -)"
# User and group names in a config are spelled as keywords are.
ACCOUNT_RE: Final = KEYWORD_RE

MAX_HOST: Final = 253
# A host name or address as configs write it (``host "logs1"``, ``host "::1"``),
# also the name of that host's marker file in the spool: no "/", no leading "." or "-".
HOST_RE: Final = re.compile(r"[A-Za-z0-9_:][A-Za-z0-9_.:-]{0,252}\Z")
HOST_RULE: Final = "a host name or address (A-Z a-z 0-9 _ . : -)"

# Spool entries: "<unix time>[-<n>].<basename>", the basename encoded so that it
# is a safe file name anywhere (bytes outside SAFE_BYTES become %XX).
MAX_BASENAME: Final = 180
SAFE_BYTES: Final = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._+,=@-"
)
BASENAME_RE: Final = re.compile(r"[A-Za-z0-9_+,=@%-][A-Za-z0-9._+,=@%-]{0,179}\Z")

# What a collector stores under: the sender never chooses a path. Not starting
# with "-" either, so that no tool an operator runs on the store reads a stored
# name as an option; spool entry names (what an honest shipper offers) start
# with the submit time's digits, so none is refused for it.
MAX_STORED_NAME: Final = 240  # leaves room for ".conflict-1000" within NAME_MAX
STORED_NAME_RE: Final = re.compile(r"[A-Za-z0-9_+,=@%][A-Za-z0-9._+,=@%-]{0,239}\Z")
STORED_NAME_RULE: Final = (
    f"1-{MAX_STORED_NAME} of A-Z a-z 0-9 . _ + , = @ % -, not starting with a dot or a dash"
)
MAX_CONFLICTS: Final = 1000

# Ship protocol limits the config may set within (docs/protocol.md, Limits).
MIN_FRAME: Final = 4096
MAX_FRAME: Final = 1 << 20
DEFAULT_FRAME: Final = 256 << 10
MAX_WINDOW: Final = 1024
DEFAULT_WINDOW: Final = 64


class BadBasename(ValueError):
    """The caller's path has no basename usable as a spool entry name."""


def is_keyword(text: str) -> bool:
    return KEYWORD_RE.match(text) is not None


def is_host(text: str) -> bool:
    return HOST_RE.match(text) is not None


def is_stored_name(text: str) -> bool:
    return len(text.encode()) <= MAX_STORED_NAME and STORED_NAME_RE.match(text) is not None


def entry_basename(path: bytes) -> str:
    """The caller's basename, encoded so that it is a safe file name anywhere.

    Bytes in :data:`SAFE_BYTES` are kept, every other byte becomes ``%XX``,
    a leading ``.`` becomes ``%2E``; the result is cut to :data:`MAX_BASENAME`
    bytes without splitting an escape. Raises :class:`BadBasename` for an
    empty, ``.`` or ``..`` name.
    """
    base = path.rstrip(b"/").rpartition(b"/")[2]
    if base in (b"", b".", b".."):
        raise BadBasename(f"path {path[:200]!r} has no usable basename")
    parts = [chr(b) if b in SAFE_BYTES else f"%{b:02X}" for b in base]
    if base.startswith(b"."):
        parts[0] = "%2E"
    out: list[str] = []
    length = 0
    for part in parts:
        if length + len(part) > MAX_BASENAME:
            break
        out.append(part)
        length += len(part)
    return "".join(out)


def entry_name(when: int, collision: int, basename: str) -> str:
    """The spool entry for ``basename`` submitted at ``when``; ``collision`` counts
    the entries of that name and second already there."""
    return f"{when}.{basename}" if collision == 0 else f"{when}-{collision}.{basename}"


def conflict_name(name: str, n: int) -> str:
    """Where a collector keeps the ``n``-th different file offered as ``name``."""
    return f"{name}.conflict-{n}"
