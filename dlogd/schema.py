"""Statements -> plain data -> validated plain data, with every problem located.

Second step of config loading (``conflang`` -> ``schema`` -> ``config``). The
shaping pass turns statements into dicts and lists (a block with a name, such
as ``keyword "audit" { }``, becomes a dict keyed by that name; a simple
directive becomes a list of its occurrences, each a list of values) and
remembers where each piece came from. voluptuous then checks the whole tree
at once, so every error is reported, not only the first; each error's path is
mapped back to file, line and column.

Only ``dlogctl check-config`` and a service whose config cache is stale import
this module: voluptuous costs ~26 ms, too much for every submit.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
from collections.abc import Callable, Sequence
from typing import Any

import voluptuous as vol

from dlogd import quota
from dlogd.conflang import Location, Problem, Statement, Value
from dlogd.names import (
    ACCOUNT_RE,
    HOST_RULE,
    KEYWORD_RULE,
    MAX_FRAME,
    MAX_WINDOW,
    MIN_FRAME,
    is_host,
    is_keyword,
)

Path = tuple[str | int, ...]
Validator = Callable[[Any], Any]

FINGERPRINT_RE = re.compile(r"(?:sha256:)?((?:[0-9A-Fa-f]{2}:?){31}[0-9A-Fa-f]{2})\Z")
DURATION_RE = re.compile(r"([0-9]+)(ms|s|min|h)?\Z")
# Divide for ms: 9 * 0.001 is not 9 / 1000 in floating point, and to_text must round-trip.
DURATION_UNITS = {None: (1, 1), "s": (1, 1), "ms": (1, 1000), "min": (60, 1), "h": (3600, 1)}
MAX_UID = 2**32 - 2  # (uid_t)-1 means "no uid" to the kernel
# Directives dlogd once documented but never used: the systemd units decide these.
UNIT_DECIDES = {
    "socket": "the submit socket is dlogd-submit.socket's ListenStream= "
    "(clients find it at $DLOGD_SOCKET or /run/dlogd/submit.sock)",
    "listen": "the collector's address and port are dlogd-receive.socket's ListenStream=",
    "max_connections": "concurrent connections are the socket unit's MaxConnections=",
}


class Shaped:
    """Plain data plus where each part of it was written."""

    def __init__(self, origin: Location) -> None:
        self.origin = origin
        self.locations: dict[Path, Location] = {}
        self.problems: list[Problem] = []

    def locate(self, path: Sequence[str | int]) -> Location:
        for end in range(len(path), 0, -1):
            found = self.locations.get(tuple(path[:end]))
            if found is not None:
                return found
        return self.origin

    def shape(self, statements: Sequence[Statement], path: Path = ()) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for st in statements:
            if st.block is None:
                self._simple(data, st, path)
            elif not st.values:
                if self._same_kind(data, st, dict):
                    self._block(data, st.name, st, (*path, st.name))
            elif len(st.values) == 1 and st.values[0].kind == "string":
                if self._same_kind(data, st, dict):
                    named = data.setdefault(st.name, {})
                    self.locations.setdefault((*path, st.name), st.location)
                    self._block(named, st.values[0].text, st, (*path, st.name, st.values[0].text))
            else:
                self.problems.append(
                    Problem(
                        st.location, f'expected {st.name} "NAME" {{ ... }} or {st.name} {{ ... }}'
                    )
                )
        return data

    def _simple(self, data: dict[str, Any], st: Statement, path: Path) -> None:
        if not self._same_kind(data, st, list):
            return
        occurrences = data.setdefault(st.name, [])
        where = (*path, st.name, len(occurrences))
        self.locations.setdefault((*path, st.name), st.location)
        self.locations[where] = st.location
        for i, value in enumerate(st.values):
            self.locations[(*where, i)] = value.location
        occurrences.append([_plain(v) for v in st.values])

    def _same_kind(self, data: dict[str, Any], st: Statement, kind: type) -> bool:
        """A name used both as a block and as a simple directive: report, keep the first."""
        if st.name in data and not isinstance(data[st.name], kind):
            self.problems.append(
                Problem(st.location, f"{st.name!r} used both as a block and as a simple directive")
            )
            return False
        return True

    def _block(self, parent: dict[str, Any], key: str, st: Statement, path: Path) -> None:
        if key in parent:
            first = self.locations[path]
            what = f'{st.name} "{key}"' if key != st.name else st.name
            self.problems.append(
                Problem(st.location, f"duplicate {what} (first defined at {first})")
            )
            return
        assert st.block is not None
        self.locations[path] = st.location
        parent[key] = self.shape(st.block, path)


def _plain(value: Value) -> str | int:
    if value.kind == "number" and value.text.isdigit():
        return int(value.text)
    return value.text


# -- value validators: each takes the plain value, returns the normalised one ---


def _fail(message: str) -> vol.Invalid:
    return vol.Invalid(message)


def text(value: Any) -> str:
    if not isinstance(value, str):
        raise _fail(f"expected a string, got {value!r}")
    if "\0" in value:
        raise _fail("NUL byte in string")
    return value


def absolute_path(value: Any) -> str:
    path = text(value)
    if not path.startswith("/"):
        raise _fail(f"expected an absolute path, got {path!r}")
    return os.path.normpath(path)


def identifier(value: Any) -> str:
    name = text(value)
    if not is_keyword(name):
        raise _fail(f"{name!r}: expected {KEYWORD_RULE}")
    return name


def host_name(value: Any) -> str:
    name = text(value)
    if not is_host(name):
        raise _fail(f"{name!r}: expected {HOST_RULE}")
    return name


def port(value: Any) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or not 1 <= value <= 65535:
        raise _fail(f"port {value!r} out of range: expected 1-65535")
    return value


def uid(value: Any) -> int | str:
    """A numeric uid, or a user name resolved later (a missing user is a warning)."""
    if isinstance(value, str) and not value.isdigit():
        if not ACCOUNT_RE.match(value):
            raise _fail(f"{value!r}: expected a numeric uid or a user name")
        return value
    number = int(value)
    if not 0 <= number <= MAX_UID:
        raise _fail(f"uid {number} out of range: expected 0-{MAX_UID}")
    return number


def group(value: Any) -> str:
    name = text(value)
    if not ACCOUNT_RE.match(name):
        raise _fail(f"{name!r}: expected a group name")
    return name


def boolean(value: Any) -> bool:
    words = {"yes": True, "true": True, "on": True, "no": False, "false": False, "off": False}
    if isinstance(value, str) and value.lower() in words:
        return words[value.lower()]
    raise _fail(f"{value!r}: expected yes or no")


def size(value: Any) -> int:
    try:
        return quota.parse_size(str(value))
    except ValueError:
        raise _fail(f"{value!r}: expected {quota.SIZE_RULE}") from None


def amount(value: Any) -> int | str:
    """A quota (``limits { min_free }``...): a size, or ``"N%"`` of the file system."""
    try:
        return quota.parse_amount(str(value)).plain()
    except ValueError as exc:
        raise _fail(str(exc)) from None


def window(value: Any) -> int:
    """Files in flight: the protocol's own bound (docs/protocol.md, Limits)."""
    if not isinstance(value, int) or not 1 <= value <= MAX_WINDOW:
        raise _fail(f"{value!r}: expected a whole number from 1 to {MAX_WINDOW}")
    return value


def frame_size(value: Any) -> int:
    """Bytes per DATA frame: the protocol allows 4K to 1M."""
    number = size(value)
    if not MIN_FRAME <= number <= MAX_FRAME:
        raise _fail(f"{value!r}: expected a size from {MIN_FRAME // 1024}K to {MAX_FRAME >> 20}M")
    return number


def positive(value: Any) -> int:
    if not isinstance(value, int) or not 1 <= value <= 1_000_000:
        raise _fail(f"{value!r}: expected a whole number from 1 to 1000000")
    return value


def duration(value: Any) -> float:
    match = DURATION_RE.match(str(value))
    if not match or int(match.group(1)) == 0:
        raise _fail(
            f"{value!r}: expected a positive duration: seconds, or a number with ms, s, min, h"
        )
    multiplier, divisor = DURATION_UNITS[match.group(2)]
    return float(int(match.group(1)) * multiplier / divisor)


def tls_version(value: Any) -> str:
    if value not in ("1.2", "1.3"):
        raise _fail(f'{value!r}: expected "1.3" or "1.2"')
    return str(value)


def fingerprint(value: Any) -> str:
    match = FINGERPRINT_RE.match(text(value))
    if not match:
        raise _fail(f"{value!r}: expected sha256:HEX (64 hex digits, colons allowed)")
    return match.group(1).replace(":", "").lower()


def watch_dir(value: Any) -> str:
    """A ``watch "DIR" { }`` block's name: an absolute path, written normalised, so two
    spellings of one directory cannot make two blocks."""
    path = absolute_path(value)
    if path != value:
        raise _fail(f"{value!r}: write the directory as {path!r}")
    return path


def file_pattern(value: Any) -> str:
    """A watch's file-name pattern (fnmatch: ``*``, ``?``, ``[...]``), matched on names only."""
    pattern = text(value)
    if not pattern or "/" in pattern or len(pattern) > 255:
        raise _fail(f"{pattern!r}: expected a file-name pattern (1-255 characters, no '/')")
    return pattern


def watch_user(value: Any) -> int | str:
    """The account dlogd-watch runs as for a watch: never root (it reads as that user)."""
    user = uid(value)
    if user in (0, "root"):
        raise _fail("a watch must not run as root: name an unprivileged user")
    return user


# -- the collector's archive { } block (issue 11, dlogd/archive.py) --

ENDPOINT_RE = re.compile(r"https?://[A-Za-z0-9_.:\[\]-]+(?::[0-9]{1,5})?/?\Z")
# S3 bucket names as AWS and RGW accept them (no dots: path-style and TLS both work).
BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]\Z")
REGION_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}\Z")
DAYS_RE = re.compile(r"([0-9]+)(d|y)\Z")
KEY_FIELDS = ("keyword", "host", "collector", "yyyy", "mm", "dd", "name")
KEY_REQUIRED = ("keyword", "host", "name")  # what makes one stored file's key its own
KEY_FIELD_RE = re.compile(r"<([a-z]+)>")
KEY_TEXT_RE = re.compile(r"[A-Za-z0-9_.=@%+,/-]*\Z")


def endpoint(value: Any) -> str:
    url = text(value)
    if not ENDPOINT_RE.match(url):
        raise _fail(f"{url!r}: expected an http:// or https:// URL of host and port only")
    return url.rstrip("/")


def bucket(value: Any) -> str:
    name = text(value)
    if not BUCKET_RE.match(name):
        raise _fail(f"{name!r}: expected a bucket name (3-63 of a-z 0-9 -)")
    return name


def region(value: Any) -> str:
    name = text(value)
    if not REGION_RE.match(name):
        raise _fail(f"{name!r}: expected a region name (a-z 0-9 -)")
    return name


def days(value: Any) -> int:
    """A retention period: whole days ``3650d`` or years of 365 days ``10y``."""
    match = DAYS_RE.match(str(value))
    if not match or int(match.group(1)) == 0 or int(match.group(1)) > 100_000:
        raise _fail(f"{value!r}: expected a number of days or years above 0: 30d, 10y")
    return int(match.group(1)) * (365 if match.group(2) == "y" else 1)


def keep_local(value: Any) -> int | None:
    """How long a verified archived file stays on the collector: ``30d``, ``0d``, ``forever``."""
    if value == "forever":
        return None
    if value in ("0d", "0y"):
        return 0
    try:
        return days(value)
    except vol.Invalid:
        raise _fail(f"{value!r}: expected a number of days (30d, 0d) or forever") from None


def lock_mode(value: Any) -> str:
    if value not in ("governance", "compliance"):
        raise _fail(f"{value!r}: expected governance or compliance")
    return str(value)


def key_pattern(value: Any) -> str:
    """An object key pattern: text and ``<field>``s, one stored file one key."""
    pattern = text(value)
    fields = KEY_FIELD_RE.findall(pattern)
    unknown = [f for f in fields if f not in KEY_FIELDS]
    if unknown:
        raise _fail(f"<{unknown[0]}>: expected one of " + " ".join(f"<{f}>" for f in KEY_FIELDS))
    missing = [f for f in KEY_REQUIRED if f not in fields]
    if missing:
        raise _fail(f"{pattern!r}: a key must hold <{missing[0]}> (two files, one key otherwise)")
    rest = KEY_FIELD_RE.sub("x", pattern)
    segments = rest.split("/")
    if not KEY_TEXT_RE.match(rest) or "" in segments or ".." in segments or "." in segments:
        raise _fail(f"{pattern!r}: expected segments of A-Z a-z 0-9 _ . = @ % + , - between '/'")
    return pattern


def host_dir(value: Any) -> tuple[str, str]:
    """The collector's ``host "web1" dir "/path";`` line."""
    if not isinstance(value, list) or len(value) != 3 or value[1] != "dir":
        raise _fail('expected: host "NAME" dir "/ABSOLUTE/PATH";')
    return host_name(value[0]), absolute_path(value[2])


# -- occurrence helpers: a simple directive arrives as [[values], [values], ...] --


def once(validator: Validator) -> Validator:
    """A directive that may appear once, with one value."""

    def check(occurrences: Any) -> Any:
        if not isinstance(occurrences, list):
            raise vol.Invalid("expected a list")  # a block where a directive belongs
        if len(occurrences) != 1:
            raise vol.Invalid("may appear only once", path=[1])
        try:
            return one_value(validator)(occurrences[0])
        except vol.Invalid as exc:
            exc.prepend([0])
            raise

    return check


def one_value(validator: Validator) -> Validator:
    def check(values: Any) -> Any:
        if len(values) != 1:
            raise vol.Invalid(f"takes exactly one value, got {len(values)}")
        try:
            return validator(values[0])
        except vol.Invalid as exc:
            exc.prepend([0])
            raise

    return check


def each(validator: Validator) -> Validator:
    """A directive that may repeat (``uid``, ``group``, ``host``); values in order."""
    return vol.Schema([validator])


def _block(fields: dict[Any, Any]) -> vol.Schema:
    return vol.Schema(fields, extra=vol.PREVENT_EXTRA)


TLS = _block(
    {
        vol.Optional("certificate"): once(absolute_path),
        vol.Optional("key"): once(absolute_path),
        vol.Optional("ca"): once(absolute_path),
        vol.Optional("min_version"): once(tls_version),
    }
)
LIMITS = _block(
    {
        vol.Optional("max_file_size"): once(size),
        vol.Optional("timeout"): once(duration),
        vol.Optional("window"): once(window),
        vol.Optional("frame_size"): once(frame_size),
        vol.Optional("max_batch"): once(positive),
    }
)
# Quotas that push back (issue 14, dlogd/quota.py): the spool's on a client,
# each store's file system on a collector.
CLIENT_LIMITS = LIMITS.extend(
    {vol.Optional("spool_max_size"): once(amount), vol.Optional("spool_min_free"): once(amount)}
)
SERVER_LIMITS = LIMITS.extend({vol.Optional("min_free"): once(amount)})
CLIENT_HOST = _block(
    {
        vol.Optional("address"): once(host_name),
        vol.Optional("port"): once(port),
        vol.Optional("fingerprint"): once(fingerprint),
    }
)
SERVER_HOST = _block(
    {
        vol.Optional("address"): once(host_name),
        vol.Optional("fingerprint"): once(fingerprint),
    }
)
# A directory whose finished files dlogd-watch submits (issue 14, dlogd/watch.py).
WATCH = _block(
    {
        vol.Required("pattern", msg="a watch needs a pattern line"): once(file_pattern),
        vol.Required("keyword", msg="a watch needs a keyword line"): once(identifier),
        vol.Required("user", msg="a watch needs a user line"): once(watch_user),
        vol.Optional("quiet"): once(duration),
    }
)
CLIENT = _block(
    {
        vol.Optional("spool"): once(absolute_path),
        vol.Optional("tls"): TLS,
        vol.Optional("limits"): CLIENT_LIMITS,
        vol.Optional("retry"): _block(
            {vol.Optional("min"): once(duration), vol.Optional("max"): once(duration)}
        ),
        vol.Optional("keyword"): {
            identifier: _block(
                {
                    vol.Optional("uid"): each(one_value(uid)),
                    vol.Optional("group"): each(one_value(group)),
                    vol.Required("host", msg="a keyword needs at least one host line"): each(
                        one_value(host_name)
                    ),
                    vol.Optional("copy"): once(boolean),
                }
            )
        },
        vol.Optional("host"): {host_name: CLIENT_HOST},
        vol.Optional("watch"): {watch_dir: WATCH},
    }
)
ARCHIVE = _block(
    {
        vol.Required("endpoint", msg="an archive needs an endpoint line"): once(endpoint),
        vol.Required("bucket", msg="an archive needs a bucket line"): once(bucket),
        vol.Optional("region"): once(region),
        vol.Required("credentials", msg="an archive needs a credentials line"): once(absolute_path),
        vol.Required("retention", msg="an archive needs a retention line"): once(days),
        vol.Optional("mode"): once(lock_mode),
        vol.Optional("key"): once(key_pattern),
        vol.Optional("keep_local"): once(keep_local),
        vol.Optional("keyword"): each(one_value(identifier)),
    }
)
SERVER = _block(
    {
        vol.Optional("tls"): TLS,
        vol.Optional("archive"): ARCHIVE,
        vol.Optional("limits"): SERVER_LIMITS,
        vol.Optional("partials"): _block(
            {
                vol.Optional("max_age"): once(duration),
                vol.Optional("max_bytes"): once(size),
                vol.Optional("max_files"): once(positive),
            }
        ),
        vol.Optional("keyword"): {
            identifier: _block(
                {vol.Required("host", msg="a keyword needs at least one host line"): each(host_dir)}
            )
        },
        vol.Optional("host"): {host_name: SERVER_HOST},
    }
)


def validate(
    statements: Sequence[Statement], role: str, origin: Location
) -> tuple[dict[str, Any], list[Problem]]:
    """Validated plain data for ``role`` ("client" or "server"), and every problem."""
    shaped = Shaped(origin)
    data = shaped.shape(statements)
    problems = shaped.problems
    schema = CLIENT if role == "client" else SERVER
    try:
        data = schema(data)
    except vol.MultipleInvalid as exc:
        problems.extend(_problem(shaped, error) for error in exc.errors)
        return data, _sorted(problems)
    problems.extend(_cross_check(data, role, shaped))
    return data, _sorted(problems)


def _sorted(problems: list[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: (p.location.file, p.location.line, p.location.column))


def _problem(shaped: Shaped, error: vol.Invalid) -> Problem:
    path: list[str | int] = [p if isinstance(p, int) else str(p) for p in error.path]
    message = error.msg
    if message == "extra keys not allowed" and path:
        message = f"unknown directive {path[-1]!r}"
        if path[-1] in UNIT_DECIDES:
            message += f": {UNIT_DECIDES[str(path[-1])]}"
    elif message.startswith("required key not provided"):
        message = f"missing {path[-1]!r}"
    elif message.startswith("expected str for dictionary value") or message.startswith(
        "expected a dictionary"
    ):
        message = f"{path[-1]!r} must be a block: {path[-1]} ... {{ ... }}"
    elif message == "expected a list" and path:
        message = f"{path[-1]!r} must be a simple directive ending in ';', not a block"
    loc = shaped.locate(path)
    return Problem(loc, message)


def _cross_check(data: dict[str, Any], role: str, shaped: Shaped) -> list[Problem]:
    """What a schema cannot see: references between blocks, and this host's users."""
    problems: list[Problem] = []
    hosts = data.get("host", {})
    for kw_name, keyword in data.get("keyword", {}).items():
        lines = keyword["host"]
        seen: set[str] = set()
        for i, line in enumerate(lines):
            name = line if role == "client" else line[0]
            where = shaped.locate(("keyword", kw_name, "host", i))
            if name not in hosts:
                problems.append(
                    Problem(
                        where, f'keyword "{kw_name}" names host "{name}", which has no host block'
                    )
                )
            if name in seen:
                problems.append(
                    Problem(where, f'host "{name}" listed twice for keyword "{kw_name}"')
                )
            seen.add(name)
        if role == "client":
            problems.extend(_check_principals(kw_name, keyword, shaped))
        else:
            problems.extend(_check_dirs(kw_name, keyword, shaped))
    if role == "client":
        problems.extend(_check_watches(data, shaped))
    else:
        problems.extend(_check_archive(data, shaped))
    return problems


def _check_archive(data: dict[str, Any], shaped: Shaped) -> list[Problem]:
    keywords = data.get("keyword", {})
    return [
        Problem(
            shaped.locate(("archive", "keyword", i)),
            f'archive names keyword "{name}", which has no keyword block',
        )
        for i, name in enumerate(data.get("archive", {}).get("keyword", []))
        if name not in keywords
    ]


def _check_watches(data: dict[str, Any], shaped: Shaped) -> list[Problem]:
    problems: list[Problem] = []
    for directory, watch in data.get("watch", {}).items():
        if watch["keyword"] not in data.get("keyword", {}):
            problems.append(
                Problem(
                    shaped.locate(("watch", directory, "keyword", 0, 0)),
                    f'watch "{directory}" names keyword "{watch["keyword"]}", '
                    "which has no keyword block",
                )
            )
        user = watch["user"]
        if isinstance(user, str) and not _exists(pwd.getpwnam, user):
            problems.append(
                Problem(
                    shaped.locate(("watch", directory, "user", 0, 0)),
                    f'no user "{user}" on this host (the watch submits nothing until it exists)',
                    True,
                )
            )
    return problems


RECEIVE_WRITABLE = "/var/log/remote"  # dlogd-receive@.service's ReadWritePaths=


def _check_dirs(kw_name: str, keyword: dict[str, Any], shaped: Shaped) -> list[Problem]:
    return [
        Problem(
            shaped.locate(("keyword", kw_name, "host", i)),
            f"{directory} is outside {RECEIVE_WRITABLE}: the stock dlogd-receive@ unit "
            "cannot write there (add it to ReadWritePaths= in a drop-in)",
            warning=True,
        )
        for i, (_host, directory) in enumerate(keyword["host"])
        if not (directory + "/").startswith(RECEIVE_WRITABLE + "/")
    ]


def _check_principals(kw_name: str, keyword: dict[str, Any], shaped: Shaped) -> list[Problem]:
    problems: list[Problem] = []
    if not keyword.get("uid") and not keyword.get("group"):
        problems.append(
            Problem(
                shaped.locate(("keyword", kw_name)),
                f'keyword "{kw_name}" allows nobody: add a uid or group line',
                warning=True,
            )
        )
    for i, user in enumerate(keyword.get("uid", [])):
        if isinstance(user, str) and not _exists(pwd.getpwnam, user):
            problems.append(
                Problem(
                    shaped.locate(("keyword", kw_name, "uid", i)),
                    f'no user "{user}" on this host',
                    True,
                )
            )
    for i, name in enumerate(keyword.get("group", [])):
        if not _exists(grp.getgrnam, name):
            problems.append(
                Problem(
                    shaped.locate(("keyword", kw_name, "group", i)),
                    f'no group "{name}" on this host',
                    True,
                )
            )
    return problems


def _exists(lookup: Callable[[str], object], name: str) -> bool:
    try:
        lookup(name)
    except KeyError:
        return False
    return True
