"""Structured journal records for every dlogd event, with a stderr fallback.

Every service (``submit``, ``ship``, ``receive``, ``cli``) reports what it did
through :func:`send`: one journal record per event, carrying a stable
``MESSAGE_ID`` (constants below, documented in docs/journal.md) and ``DLOGD_*``
fields that ``journalctl MESSAGE_ID=... DLOGD_KEYWORD=audit`` can filter on.

The submit service starts once per connection, so this module imports only the
C core ``systemd._journal`` (about 1 ms), lazily, never ``systemd.journal``
(about 20 ms of ``uuid``/``logging``/``traceback``). Where no journal socket
exists (containers, tests, early boot) or the send fails, the record becomes
one line on stderr, which systemd would route to the journal anyway.
"""

from __future__ import annotations

import os
import re
import sys

# Stable 128-bit ids, generated once with uuid4: never change a published one.
SUBMIT_ACCEPTED = "c0047bd1a55b4d8ca6bb09de83393ac1"
SUBMIT_REFUSED = "7340939bcf224caa8a0fc3348293801f"
SHIP_SENT = "bc4fd513b99b42bbb0b2790a0cdea29a"
SHIP_RETRY = "c0299c317e19425695d7acac878cdd41"
SHIP_FAILED = "948a5905afc248c2989acc57f489fa2f"
SHIP_RESUMED = "878ba73940624f87aae109ddec0171cf"
RECEIVE_STORED = "ad53c1edad4048dcab640fe1245eed22"
RECEIVE_DUPLICATE = "df4b614b48224824b9d5a151a8b470aa"
RECEIVE_RESUMED = "f353fecbd2894ab69403c81cb1ac8045"
RECEIVE_REFUSED = "d29a0ac1d3864dea81bab0f04ec97d1b"
PEER_REFUSED = "731e5e1f99284eb0951223b724734b06"
CONFIG_ERROR = "e58169c42bd44d66ab7b2755f5dc71b7"
SPOOL_WARNING = "7b3027e65cbd4c77a9e01696de33ee61"
# The collector's archive tier (dlogd-archive, issue 11).
ARCHIVE_STORED = "c43f36571cb24407b2bb7ce21f48cd75"
ARCHIVE_REMOVED = "97b7330a4066412693763e736d771cbb"
ARCHIVE_FAILED = "c3c611b0ab3f4987a3762adf1d0133d0"
ARCHIVE_RETRY = "7bd236f36b2a4b0cb0c92ad23cbac38e"

JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "dlogd"
FIELD_PREFIX = "DLOGD_"


def send(message: str, *, message_id: str, priority: int = 6, **fields: str | int) -> None:
    """Record one event: journal if reachable, else one escaped line on stderr.

    ``fields`` become ``DLOGD_<NAME>`` (``keyword=`` -> ``DLOGD_KEYWORD``).
    Never raises for a logging failure: losing a log line must not fail a submit.
    """
    if os.path.exists(JOURNAL_SOCKET) and _send_journal(message, message_id, priority, fields):
        return
    _send_stderr(message, {**fields, "message_id": message_id})


def _send_journal(
    message: str, message_id: str, priority: int, fields: dict[str, str | int]
) -> bool:
    try:
        from systemd import _journal  # type: ignore[attr-defined]

        args = [
            f"MESSAGE={message}",
            f"MESSAGE_ID={message_id}",
            f"PRIORITY={priority}",
            f"SYSLOG_IDENTIFIER={IDENTIFIER}",
        ]
        args += [f"{FIELD_PREFIX}{name.upper()}={value}" for name, value in fields.items()]
        _journal.sendv(*args)
    except (ImportError, OSError, ValueError, UnicodeError):
        return False
    return True


STDERR_PREFIX = f"{IDENTIFIER}: "
# One "key=value" at the end of a stderr line; a quoted value may hold blanks.
_FIELD_AT_END = re.compile(r' ([a-z_][a-z0-9_]*)=("(?:[^"\\]|\\.)*"|[^ "]*)$')


def _send_stderr(message: str, fields: dict[str, str | int]) -> None:
    parts = [f"{STDERR_PREFIX}{escape(message)}"]
    parts += [f"{name}={_quote(escape(str(value)))}" for name, value in fields.items()]
    try:
        sys.stderr.write(" ".join(parts) + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass  # stderr closed: nowhere left to report to


def parse_stderr(line: str) -> tuple[str, dict[str, str]] | None:
    """(message, fields) of a line :func:`send` wrote to stderr; None for any other line.

    Fields come last; they are read from the right, up to a repeated key, since a
    message (a certificate identity "CN=web1", say) may itself hold "key=value".
    Values stay escaped as written.
    """
    if not line.startswith(STDERR_PREFIX):
        return None
    rest = line[len(STDERR_PREFIX) :].rstrip("\n")
    fields: dict[str, str] = {}
    while (match := _FIELD_AT_END.search(rest)) and match.group(1) not in fields:
        value = match.group(2)
        if value.startswith('"'):
            value = value[1:-1].replace('\\"', '"')
        fields[match.group(1)] = value
        rest = rest[: match.start()]
    return rest, dict(reversed(list(fields.items())))


def escape(text: str) -> str:
    """Control characters and backslashes as escapes, so a hostile name cannot forge lines."""
    if text.isascii() and text.isprintable() and "\\" not in text:
        return text  # the common case, without a call per character
    return "".join(_escape_char(c) for c in text)


def _escape_char(c: str) -> str:
    code = ord(c)
    if c == "\\":
        return "\\\\"
    if code < 0x20 or code == 0x7F or 0xD800 <= code <= 0xDFFF or 0x80 <= code < 0xA0:
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    return c


def _quote(value: str) -> str:
    # Spaces and quotes would make key=value ambiguous to a reader splitting on blanks.
    if value == "" or any(c in value for c in ' "='):
        return '"' + value.replace('"', '\\"') + '"'
    return value
