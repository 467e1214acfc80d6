"""``dlogctl status``: what is pending, held or stuck, read off the disk without locks.

Place in the flow: beside the services, never in their way. On a client it
walks the spool (entries, owed markers, holds) and reads the shipper's
on-disk backoff (``.retry/<host>.json``) and last-run record
(``.status/<host>.json``); on a collector it walks each configured (keyword,
host) directory and its ``.dlogd-partial/``. Everything is read with
``O_NOFOLLOW``/``lstat`` and no flock, so a status call can never stall a
submit, a drain or a receive; an entry that vanishes mid-walk (delivered
meanwhile) is simply not counted.

The gathered figures are plain data; three renderings sit on top: a table
for people (80 columns), JSON for scripts, and node_exporter's textfile
format, written atomically. :func:`check` turns the figures into the
Nagios/Icinga plugin convention (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field

from dlogd.backoff import STATE_DIR
from dlogd.fsutil import DIR_FLAGS, read_json
from dlogd.spool import OWED_DIR, RETRY_DIR, hold_tries
from dlogd.store import PARTIAL_DIR

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
_STATE_NAMES = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}


# --- the figures ----------------------------------------------------------------------


@dataclass(frozen=True)
class HeldEntry:
    """An entry a collector refused: kept, not offered there until ``until``.

    ``tries`` 0: refused for good (only an operator moves it). Above 0: refused
    for now that many times in a row (a store short of space): retried by itself.
    """

    keyword: str
    entry: str
    host: str
    reason: str
    until: float
    tries: int = 0


@dataclass
class Pending:
    """What one keyword still owes one collector."""

    keyword: str
    host: str
    files: int = 0
    bytes: int = 0
    oldest: float | None = None  # submit time (entry name prefix) of the oldest
    held: int = 0  # refused for good
    deferred: int = 0  # refused for now, waiting for their own retry


@dataclass(frozen=True)
class Collector:
    """The shipper's view of one collector: backoff and the last run's outcome."""

    host: str
    failures: int = 0
    next_retry: float | None = None
    last_error: str | None = None
    last_error_time: float | None = None
    last_success: float | None = None


@dataclass
class ClientStatus:
    generated: float
    spool: str
    pending: list[Pending] = field(default_factory=list)
    collectors: list[Collector] = field(default_factory=list)
    held: list[HeldEntry] = field(default_factory=list)


@dataclass
class Stored:
    """One (sending host, keyword) directory on a collector."""

    host: str
    keyword: str
    directory: str
    files: int = 0
    bytes: int = 0
    last_file: str | None = None
    last_time: float | None = None
    partials: int = 0
    partial_bytes: int = 0
    free_bytes: int | None = None
    error: str | None = None


@dataclass
class ServerStatus:
    generated: float
    stores: list[Stored] = field(default_factory=list)


# --- reading a client's spool ------------------------------------------------------------


def _scandir(path: str | int) -> Iterator[os.DirEntry[str]]:
    """Entries of a directory, nothing if it is absent or vanished meanwhile."""
    try:
        with os.scandir(path) as it:
            yield from it
    except (FileNotFoundError, NotADirectoryError):
        return


def _submit_time(entry: str, fallback: float) -> float:
    """Entry names start with the submit's unix seconds (``<t>.<name>``, ``<t>-<n>.<name>``)."""
    head = entry.split(".", 1)[0].split("-", 1)[0]
    return float(head) if head.isdigit() else fallback


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _hold(marker: os.DirEntry[str]) -> tuple[float, str, int] | None:
    """A marker is empty while owed; a refusal writes {until, reason[, tries]} into it
    (``tries`` only for a refusal for now: see :meth:`dlogd.spool.Spool.hold`)."""
    try:
        if marker.stat(follow_symlinks=False).st_size == 0:
            return None
    except FileNotFoundError:
        return None
    data = read_json(marker.path)
    return (_number(data.get("until")) or 0.0, str(data.get("reason", "")), hold_tries(data))


def gather_client(spool: str, hosts: Iterable[str], now: float | None = None) -> ClientStatus:
    """Pending and held entries per (keyword, collector), and each collector's state."""
    now = time.time() if now is None else now
    status = ClientStatus(now, spool)
    table: dict[tuple[str, str], Pending] = {}
    for kdir in _scandir(spool):
        if kdir.name.startswith(".") or not kdir.is_dir(follow_symlinks=False):
            continue
        owed_dir = os.path.join(kdir.path, OWED_DIR)
        for item in _scandir(kdir.path):
            if item.name.startswith(".") or not item.is_file(follow_symlinks=False):
                continue
            try:
                size = item.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                continue  # delivered while we looked
            submitted = _submit_time(item.name, now)
            for marker in _scandir(os.path.join(owed_dir, item.name)):
                if marker.name.startswith(".") or not marker.is_file(follow_symlinks=False):
                    continue
                row = table.setdefault((kdir.name, marker.name), Pending(kdir.name, marker.name))
                row.files += 1
                row.bytes += size
                row.oldest = submitted if row.oldest is None else min(row.oldest, submitted)
                hold = _hold(marker)
                if hold is not None:
                    until, reason, tries = hold
                    if tries:
                        row.deferred += 1
                    else:
                        row.held += 1
                    status.held.append(
                        HeldEntry(kdir.name, item.name, marker.name, reason, until, tries)
                    )
    status.pending = [table[key] for key in sorted(table)]
    known = sorted({*hosts, *(host for _, host in table)})
    status.collectors = [_collector(spool, host, now) for host in known]
    return status


def _collector(spool: str, host: str, now: float) -> Collector:
    retry = read_json(os.path.join(spool, RETRY_DIR, f"{host}.json"))
    state = read_json(os.path.join(spool, STATE_DIR, f"{host}.json"))
    next_retry = _number(retry.get("next"))
    error = retry.get("error") or state.get("last_error")
    return Collector(
        host=host,
        failures=int(_number(retry.get("failures")) or 0),
        next_retry=next_retry if next_retry is not None and next_retry > now else None,
        last_error=str(error) if error else None,
        last_error_time=_number(state.get("last_error_time")),
        last_success=_number(state.get("last_success")),
    )


# --- reading a collector's directories ----------------------------------------------------


def gather_server(dirs: Mapping[tuple[str, str], str], now: float | None = None) -> ServerStatus:
    """``dirs``: (host, keyword) -> directory, as the collector's config names them."""
    now = time.time() if now is None else now
    status = ServerStatus(now)
    for (host, keyword), directory in sorted(dirs.items()):
        status.stores.append(_stored(host, keyword, directory))
    return status


def _stored(host: str, keyword: str, directory: str) -> Stored:
    row = Stored(host, keyword, directory)
    try:
        os.close(os.open(directory, DIR_FLAGS))
    except FileNotFoundError:
        return row  # nothing received yet: the directory is made on the first file
    except OSError as exc:
        row.error = f"{directory}: {exc.strerror}"
        return row
    for item in _scandir(directory):
        if item.name.startswith(".") or not item.is_file(follow_symlinks=False):
            continue
        try:
            st = item.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        row.files += 1
        row.bytes += st.st_size
        if row.last_time is None or st.st_mtime > row.last_time:
            row.last_time, row.last_file = st.st_mtime, item.name
    for part in _scandir(os.path.join(directory, PARTIAL_DIR)):
        try:
            st = part.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(st.st_mode):
            row.partials += 1
            row.partial_bytes += st.st_size
    try:
        vfs = os.statvfs(directory)
        row.free_bytes = vfs.f_bavail * vfs.f_frsize
    except OSError as exc:
        row.error = f"{directory}: {exc.strerror}"
    return row


# --- checks -------------------------------------------------------------------------------


def check(
    status: ClientStatus | ServerStatus, warn_age: float | None, crit_age: float | None
) -> tuple[int, str]:
    """(exit code, one line) in the monitoring-plugin convention.

    Client: the age of the oldest pending entry; an entry held for good is at least a
    WARNING (it will not move without an operator). Collector: the time since
    each (host, keyword) last stored a file, so a sender that went quiet shows.
    """
    if isinstance(status, ClientStatus):
        ages = {
            f"{p.keyword}->{p.host}": status.generated - p.oldest
            for p in status.pending
            if p.oldest is not None
        }
        for_good = [h for h in status.held if not h.tries]
        floor = WARNING if for_good else OK
        extra = f", {len(for_good)} held" if for_good else ""
    else:
        ages = {
            f"{s.host}/{s.keyword}": status.generated - s.last_time
            for s in status.stores
            if s.last_time is not None
        }
        errors = [s.error for s in status.stores if s.error]
        floor = UNKNOWN if errors else OK
        extra = f", {errors[0]}" if errors else ""
    code = floor
    worst = max(ages.items(), key=lambda kv: kv[1], default=None)
    if worst is not None:
        if crit_age is not None and worst[1] >= crit_age:
            code = CRITICAL
        elif warn_age is not None and worst[1] >= warn_age and code != UNKNOWN:
            code = max(code, WARNING)
    summary = f"oldest {worst[0]} {_age(worst[1])}" if worst else "nothing pending"
    if isinstance(status, ServerStatus):
        summary = f"last stored {worst[0]} {_age(worst[1])} ago" if worst else "nothing stored"
    return code, f"DLOGD {_STATE_NAMES[code]} - {summary}{extra}"


# --- renderings -----------------------------------------------------------------------------


def to_json(status: ClientStatus | ServerStatus) -> str:
    role = "client" if isinstance(status, ClientStatus) else "server"
    return json.dumps({"role": role, **asdict(status)}, indent=2, sort_keys=True)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _size(count: int | None) -> str:
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _when(now: float, moment: float | None) -> str:
    return "-" if moment is None else time.strftime("%m-%d %H:%M:%S", time.localtime(moment))


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def render(status: ClientStatus | ServerStatus) -> str:
    """The human table; every line fits 80 columns."""
    lines: list[str] = []
    now = status.generated
    if isinstance(status, ClientStatus):
        lines.append(f"{'KEYWORD':<14} {'COLLECTOR':<16} {'FILES':>7} {'BYTES':>8} "
                     f"{'OLDEST':>7} {'HELD':>5}")  # fmt: skip
        for p in status.pending:
            age = None if p.oldest is None else now - p.oldest
            lines.append(
                f"{_cut(p.keyword, 14):<14} {_cut(p.host, 16):<16} {p.files:>7} "
                f"{_size(p.bytes):>8} {_age(age):>7} {p.held:>5}"
            )
        if not status.pending:
            lines.append(f"(nothing pending in {_cut(status.spool, 56)})")
        lines.append("")
        lines.append(f"{'COLLECTOR':<16} {'LAST SUCCESS':<14} {'NEXT RETRY':<14} {'FAILS':>5} "
                     "LAST ERROR")  # fmt: skip
        for c in status.collectors:
            lines.append(
                f"{_cut(c.host, 16):<16} {_when(now, c.last_success):<14} "
                f"{_when(now, c.next_retry):<14} {c.failures:>5} {_cut(c.last_error or '-', 26)}"
            )
        for h in status.held:
            what = f"held for now ({h.tries} tries)" if h.tries else "held"
            lines.append(_cut(f"{what}: {h.keyword}/{h.entry} for {h.host}: {h.reason}", 80))
    else:
        lines.append(f"{'HOST':<12} {'KEYWORD':<12} {'FILES':>7} {'BYTES':>8} {'LAST STORED':<14} "
                     f"{'PARTIAL':>7} {'FREE':>8}")  # fmt: skip
        for s in status.stores:
            lines.append(
                f"{_cut(s.host, 12):<12} {_cut(s.keyword, 12):<12} {s.files:>7} "
                f"{_size(s.bytes):>8} {_when(now, s.last_time):<14} {s.partials:>7} "
                f"{_size(s.free_bytes):>8}"
            )
            if s.error:
                lines.append(_cut(f"  error: {s.error}", 80))
    return "\n".join(lines) + "\n"


def _labels(**labels: str) -> str:
    def escape(value: str) -> str:
        return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels.items()) + "}"


_Metric = tuple[str, str, str]  # name, type, help
_CLIENT_METRICS: tuple[_Metric, ...] = (
    ("dlogd_spool_pending_files", "gauge", "Spool entries still owed to a collector."),
    ("dlogd_spool_pending_bytes", "gauge", "Bytes of the spool entries still owed."),
    ("dlogd_spool_oldest_pending_age_seconds", "gauge", "Age of the oldest owed entry."),
    ("dlogd_spool_held_files", "gauge", "Owed entries the collector refused for good."),
    ("dlogd_spool_deferred_files", "gauge", "Owed entries refused for now, retried alone."),
    ("dlogd_ship_consecutive_failures", "gauge", "Failed drains in a row for a collector."),
    ("dlogd_ship_next_retry_timestamp_seconds", "gauge", "When the shipper tries again."),
    ("dlogd_ship_last_success_timestamp_seconds", "gauge", "Last drain that delivered all."),
)
_SERVER_METRICS: tuple[_Metric, ...] = (
    ("dlogd_store_files", "gauge", "Files stored for a (host, keyword)."),
    ("dlogd_store_bytes", "gauge", "Bytes stored for a (host, keyword)."),
    ("dlogd_store_last_stored_timestamp_seconds", "gauge", "Modification time of the newest."),
    ("dlogd_store_partial_files", "gauge", "Partial uploads waiting for a resume."),
    ("dlogd_store_partial_bytes", "gauge", "Bytes held in partial uploads."),
    ("dlogd_store_free_bytes", "gauge", "Free bytes for an unprivileged writer there."),
)


def prometheus(status: ClientStatus | ServerStatus) -> str:
    """node_exporter textfile-collector format (metric names in docs/status.md)."""
    samples: dict[str, list[str]] = {}

    def add(metric: str, value: float | None, **labels: str) -> None:
        if value is not None:
            samples.setdefault(metric, []).append(f"{metric}{_labels(**labels)} {value:g}")

    if isinstance(status, ClientStatus):
        metrics = _CLIENT_METRICS
        for p in status.pending:
            kw = {"keyword": p.keyword, "collector": p.host}
            add("dlogd_spool_pending_files", p.files, **kw)
            add("dlogd_spool_pending_bytes", p.bytes, **kw)
            add("dlogd_spool_oldest_pending_age_seconds",
                None if p.oldest is None else max(0.0, status.generated - p.oldest), **kw)  # fmt: skip
            add("dlogd_spool_held_files", p.held, **kw)
            add("dlogd_spool_deferred_files", p.deferred, **kw)
        for c in status.collectors:
            add("dlogd_ship_consecutive_failures", c.failures, collector=c.host)
            add("dlogd_ship_next_retry_timestamp_seconds", c.next_retry, collector=c.host)
            add("dlogd_ship_last_success_timestamp_seconds", c.last_success, collector=c.host)
    else:
        metrics = _SERVER_METRICS
        for s in status.stores:
            kw = {"host": s.host, "keyword": s.keyword}
            add("dlogd_store_files", s.files, **kw)
            add("dlogd_store_bytes", s.bytes, **kw)
            add("dlogd_store_last_stored_timestamp_seconds", s.last_time, **kw)
            add("dlogd_store_partial_files", s.partials, **kw)
            add("dlogd_store_partial_bytes", s.partial_bytes, **kw)
            add("dlogd_store_free_bytes", s.free_bytes, **kw)
    out: list[str] = []
    for name, kind, help_text in metrics:
        out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples.get(name, [])]
    out.append("# HELP dlogd_status_generated_timestamp_seconds When these figures were read.")
    out.append("# TYPE dlogd_status_generated_timestamp_seconds gauge")
    out.append(f"dlogd_status_generated_timestamp_seconds {status.generated:.3f}")
    return "\n".join(out) + "\n"


def write_atomically(path: str, text: str) -> None:
    """Write, fsync, rename: node_exporter never reads a half-written file.

    The temporary name does not end in ``.prom``, so the collector skips it.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
