"""dlogd-watch: submit finished files from watched directories, once each (docs/watch.md).

Place in the flow: dlogd-watch is one more *caller* of the submit service, for
programs that never call ``dlogd_submit()`` (auditd rotating its own logs, any
daemon under logrotate). ``dlogd-watch.path`` starts ``dlogd-watch.service``
when a watched directory changes and ``dlogd-watch.timer`` every minute (files
waiting to be quiet, retries). One run, as the user the ``watch`` blocks name
(never root):

    scan (lstat each entry, no symlink followed)
      -> plan (pure: which files are finished and not yet submitted)
      -> submit (dlogd.client, the socket, the same per-keyword permissions as anyone)
      -> record (the state file: device + inode + size + mtime of what was submitted)

The plan is decided without I/O (:func:`plan`, :class:`State`), so rotation
renames, files still being written and files that vanish are tested as data.

A file is submitted through a descriptor this process opened with
``O_NOFOLLOW`` relative to the directory it scanned, never by re-resolving its
name: a rotation may rename ``audit.log.1`` to ``audit.log.2`` and make a new
``audit.log.1`` between the scan and the submit, and the identity recorded
must be that of the file actually sent. ``dlogd.client`` opens paths, so each
descriptor is handed over as a symlink ``<state>/.submitting/<name>`` to
``/proc/self/fd/N``: the client's ``open()`` reaches exactly the open file, and
the spool entry keeps the file's own name.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import fnmatch
import json
import os
import pwd
import shutil
import stat
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Final

from dlogd import client, journal
from dlogd.config import DEFAULT_CLIENT_CONFIG, ClientConfig, Watch, load_client, load_logged
from dlogd.conflang import untrusted
from dlogd.crash import crash_point
from dlogd.fsutil import DIR_FLAGS

# Stable ids (docs/watch.md); generated once with uuid4.
WATCH_SUBMITTED: Final = "49ab5e9e91744ea5948abb20b8d7365f"
WATCH_REFUSED: Final = "089ffdd5e6e64a899d1588ec63d24da4"
WATCH_PROBLEM: Final = "75414f9196294466a531cbf6c5566531"

DEFAULT_STATE_DIR: Final = "/var/lib/dlogd-watch"  # StateDirectory=dlogd-watch
STATE_FILE: Final = "state.json"
STATE_VERSION: Final = 1
# Bounds (invariant 6): matching files handled per directory and run; records
# of files no longer there are forgotten after a day, and at most this many kept.
MAX_FILES: Final = 10_000
FORGET_AFTER: Final = 24 * 3600.0
BATCH: Final = 256  # files per submit connection (one service process, one fsync)
EX_TEMPFAIL: Final = 75  # something is left for the timer's next run
_OPEN_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

Ident = tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns


# --- the decision, without I/O ---------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """One regular file of a watched directory, as lstat saw it."""

    name: str
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @property
    def ident(self) -> Ident:
        return (self.dev, self.ino, self.size, self.mtime_ns)

    @classmethod
    def of(cls, name: str, st: os.stat_result) -> Seen:
        return cls(name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


SUBMITTED: Final = "submitted"
REFUSED: Final = "refused"


@dataclass(frozen=True)
class Record:
    """What the state remembers of one file: submitted, or refused for good."""

    ident: Ident
    name: str  # the name it was last seen under (for people reading the state)
    outcome: str  # SUBMITTED or REFUSED
    at: float  # when
    # A refusal is tried again once the file's metadata changes (a chmod or chown
    # that fixes the permission), never in a loop while nothing changed.
    ctime_ns: int = 0
    reason: str = ""
    missing_since: float | None = None

    def covers(self, seen: Seen) -> bool:
        return self.outcome == SUBMITTED or self.ctime_ns == seen.ctime_ns


@dataclass(frozen=True)
class Plan:
    """One directory's decision: what to submit now, what waits, what is forgotten."""

    submit: tuple[Seen, ...]
    waiting: tuple[Seen, ...]  # matching but not finished yet (still being written)
    next_check: float | None  # wall-clock time the first waiting file becomes quiet
    skipped: int  # matching files beyond MAX_FILES


def matches(watch: Watch, name: str) -> bool:
    """The pattern, on names only; dot files (editors', tools' temporaries) never."""
    return not name.startswith(".") and fnmatch.fnmatchcase(name, watch.pattern)


def finished_at(watch: Watch, seen: Seen) -> float:
    """When ``seen`` counts as finished (wall-clock seconds; 0: already).

    Being under a name that matches the pattern is enough when the watch has no
    ``quiet``: the pattern names only what the rotating program renamed into
    place (``audit.log.*``, never the live ``audit.log``). With ``quiet``, its
    data and metadata must also have stayed unchanged that long (mtime and
    ctime: an append, a truncate or a rename move one of them), for files
    written in place under their final name, and for logrotate, which renames
    first while the daemon may write on until it is told to reopen.
    """
    if watch.quiet is None:
        return 0.0
    return max(seen.mtime_ns, seen.ctime_ns) / 1e9 + watch.quiet


def plan(watch: Watch, scanned: Iterable[Seen], state: State, now: float) -> Plan:
    """Which of the files scanned in ``watch.directory`` to submit now."""
    candidates = sorted((s for s in scanned if matches(watch, s.name)), key=lambda s: s.name)
    skipped = max(0, len(candidates) - MAX_FILES)
    submit: list[Seen] = []
    waiting: list[Seen] = []
    for seen in candidates[:MAX_FILES]:
        record = state.records.get(seen.ident)
        if record is not None and record.covers(seen):
            continue
        due = finished_at(watch, seen)
        if due <= now:
            submit.append(seen)
        else:
            waiting.append(seen)
    next_check = min((finished_at(watch, s) for s in waiting), default=None)
    return Plan(tuple(submit), tuple(waiting), next_check, skipped)


@dataclass
class State:
    """One watched directory's memory: records by identity, and its last problem."""

    records: dict[Ident, Record] = field(default_factory=dict)
    problem: str = ""  # journalled when it changes, not on every run

    def observe(self, scanned: Iterable[Seen], now: float) -> None:
        """Names and presence from a complete scan; forget what has been gone long.

        A file is forgotten only after it has been missing from every scan for
        FORGET_AFTER: a listing taken while a rotation renames files may miss
        one, and a record forgotten too early would submit that file again.
        """
        present = {s.ident: s.name for s in scanned}
        for ident, record in list(self.records.items()):
            if ident in present:
                self.records[ident] = replace(record, name=present[ident], missing_since=None)
            elif record.missing_since is None:
                self.records[ident] = replace(record, missing_since=now)
            elif now - record.missing_since > FORGET_AFTER:
                del self.records[ident]
        gone = sorted(
            (r for r in self.records.values() if r.missing_since is not None),
            key=lambda r: r.missing_since or 0.0,
        )
        for record in gone[: max(0, len(gone) - MAX_FILES)]:
            del self.records[record.ident]

    def submitted(self, seen: Seen, now: float) -> None:
        self.records[seen.ident] = Record(seen.ident, seen.name, SUBMITTED, now)

    def refused(self, seen: Seen, now: float, reason: str) -> None:
        self.records[seen.ident] = Record(
            seen.ident, seen.name, REFUSED, now, seen.ctime_ns, reason
        )


# --- the state file ------------------------------------------------------------------------


class StateError(Exception):
    """The state file exists but cannot be read: running on would submit everything again."""


def _record_json(record: Record) -> dict[str, object]:
    return {
        "ident": list(record.ident),
        "name": record.name,
        "outcome": record.outcome,
        "at": record.at,
        "ctime_ns": record.ctime_ns,
        "reason": record.reason,
        "missing_since": record.missing_since,
    }


def _record_of(data: Mapping[str, object]) -> Record:
    ident = data["ident"]
    missing = data.get("missing_since")
    if (
        not isinstance(ident, list)
        or len(ident) != 4
        or data["outcome"] not in (SUBMITTED, REFUSED)
    ):
        raise ValueError("bad record")
    return Record(
        (int(ident[0]), int(ident[1]), int(ident[2]), int(ident[3])),
        str(data["name"]),
        str(data["outcome"]),
        float(str(data["at"])),
        int(str(data.get("ctime_ns", 0))),
        str(data.get("reason", "")),
        None if missing is None else float(str(missing)),
    )


def encode_states(states: Mapping[str, State]) -> bytes:
    body = {
        "version": STATE_VERSION,
        "watches": {
            directory: {
                "problem": s.problem,
                "records": [_record_json(r) for r in s.records.values()],
            }
            for directory, s in states.items()
        },
    }
    return json.dumps(body, indent=1, sort_keys=True).encode() + b"\n"


def decode_states(data: bytes) -> dict[str, State]:
    try:
        body = json.loads(data)
        if body["version"] != STATE_VERSION:
            raise ValueError(f"version {body['version']!r}, expected {STATE_VERSION}")
        states: dict[str, State] = {}
        for directory, watch in body["watches"].items():
            records = (_record_of(r) for r in watch["records"])
            states[str(directory)] = State({r.ident: r for r in records}, str(watch["problem"]))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StateError(f"not a dlogd-watch state file: {exc}") from None
    return states


def read_states(state_dir: str) -> dict[str, State]:
    path = os.path.join(state_dir, STATE_FILE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise StateError(f"{path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(64 << 20)  # ~2 x MAX_FILES records per watch: far below this
    try:
        return decode_states(data)
    except StateError as exc:
        raise StateError(f"{path}: {exc}") from None


def write_states(state_dir: str, states: Mapping[str, State]) -> None:
    """Atomically and durably: a run killed at any point leaves the old or the new file."""
    path = os.path.join(state_dir, STATE_FILE)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, encode_states(states))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    dfd = os.open(state_dir, DIR_FLAGS)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# --- scanning -------------------------------------------------------------------------------


class ScanProblem(Exception):
    """The directory cannot be watched (missing, unreadable, writable by others)."""


def _trust(directory: str, st: os.stat_result) -> None:
    """Whoever else could write the directory (or one above it) could make it hold
    files, or links to files, that the watch user would then ship as the keyword:
    the config files' trust rule (conflang.untrusted) applies."""
    why = untrusted(st)
    if why is not None:
        raise ScanProblem(f"refused: {directory} is {why}")
    seen: set[str] = set()
    for start in (os.path.dirname(directory), os.path.dirname(os.path.realpath(directory))):
        d = start
        while d not in seen:
            seen.add(d)
            try:
                why = untrusted(os.stat(d), container=True)
            except OSError as exc:
                raise ScanProblem(f"cannot check {d}: {exc.strerror}") from None
            if why is not None:
                raise ScanProblem(f"refused: directory {d} (above {directory}) is {why}")
            d = os.path.dirname(d)


def open_directory(directory: str) -> int:
    """The watched directory, never through a symlink, checked as trusted."""
    try:
        fd = os.open(directory, DIR_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(directory):
            raise ScanProblem(f"{directory} is a symbolic link: not followed") from None
        raise ScanProblem(f"cannot open {directory}: {exc.strerror}") from None
    try:
        _trust(directory, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return fd


def scan(dir_fd: int) -> list[Seen]:
    """Every regular file in the directory; symlinks and others skipped, never followed."""
    found: list[Seen] = []
    try:
        with os.scandir(dir_fd) as entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # gone between readdir and lstat: the next scan decides
                if stat.S_ISREG(st.st_mode):
                    found.append(Seen.of(entry.name, st))
    except OSError as exc:
        raise ScanProblem(f"cannot list the directory: {exc.strerror}") from None
    return found


# --- one run --------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What a run did, for its exit status and the tests."""

    submitted: list[str] = field(default_factory=list)  # paths
    refused: list[str] = field(default_factory=list)
    retry: bool = False  # something temporary is left
    waiting: int = 0


# A refusal that says something about this file or this user: kept, not retried
# while the file is unchanged. Everything else (spool full, the service down or
# broken) is retried by the next run.
_FOR_GOOD: Final = (
    client.PermissionDenied,
    client.UnknownKeyword,
    client.NotRegularFile,
    client.TooLarge,
    client.BadName,
    client.BadRequest,
)


def run_watch(
    watch: Watch,
    state: State,
    *,
    state_dir: str,
    socket_path: str,
    now: float,
    outcome: Outcome,
    save: Callable[[], None],
) -> None:
    """Scan one directory, submit what is finished, record it."""
    try:
        dir_fd = open_directory(watch.directory)
    except ScanProblem as exc:
        _problem(watch, state, str(exc))
        return
    try:
        scanned = scan(dir_fd)
    except ScanProblem as exc:
        os.close(dir_fd)
        _problem(watch, state, f"{watch.directory}: {exc}")
        return
    try:
        state.observe(scanned, now)
        decided = plan(watch, scanned, state, now)
        outcome.waiting += len(decided.waiting)
        if decided.skipped:
            _problem(
                watch,
                state,
                f"{watch.directory}: more than {MAX_FILES} files match {watch.pattern!r};"
                " the rest are left for later runs",
            )
        elif state.problem:
            journal.send(
                f"watching {watch.directory} again",
                message_id=WATCH_PROBLEM,
                priority=5,
                directory=watch.directory,
            )
            state.problem = ""
        for start in range(0, len(decided.submit), BATCH):
            reached = _submit_batch(
                watch,
                state,
                dir_fd,
                decided.submit[start : start + BATCH],
                state_dir=state_dir,
                socket_path=socket_path,
                now=now,
                outcome=outcome,
            )
            save()
            if not reached:
                break  # the service is down: the next run tries again, once
    finally:
        os.close(dir_fd)


def _problem(watch: Watch, state: State, message: str) -> None:
    """Journalled once: a directory that stays unreadable says so when it starts to."""
    if state.problem != message:
        journal.send(
            f"cannot watch {watch.directory}: {message}",
            message_id=WATCH_PROBLEM,
            priority=4,
            directory=watch.directory,
        )
        state.problem = message


def _refuse(watch: Watch, state: State, seen: Seen, reason: str, now: float) -> None:
    """Journalled once per file (and again only if its metadata changes)."""
    path = os.path.join(watch.directory, seen.name)
    journal.send(
        f"{path}: not submitted: {reason}",
        message_id=WATCH_REFUSED,
        priority=4,
        path=path,
        keyword=watch.keyword,
        uid=os.geteuid(),
    )
    state.refused(seen, now, reason)


def _submit_batch(
    watch: Watch,
    state: State,
    dir_fd: int,
    batch: Sequence[Seen],
    *,
    state_dir: str,
    socket_path: str,
    now: float,
    outcome: Outcome,
) -> bool:
    """Submit one connection's worth; False if the service could not be reached."""
    with _handed_over(dir_fd, batch, state_dir) as opened:
        sendable: list[tuple[Seen, str]] = []
        for seen, got in opened:
            path = os.path.join(watch.directory, seen.name)
            if isinstance(got, str):
                sendable.append((seen, got))
            elif got.errno in (errno.EACCES, errno.EPERM):
                _refuse(watch, state, seen, f"user {os.geteuid()} cannot read it", now)
                outcome.refused.append(path)
            # ENOENT: gone (or renamed) since the scan; ELOOP: now a symlink. The
            # next scan sees whatever is there, under whichever name.
        if not sendable:
            return True
        try:
            results = client.submit_many(
                [link for _, link in sendable], watch.keyword, socket_path=socket_path
            )
        except OSError as exc:
            journal.send(
                f"cannot submit from {watch.directory}: {exc}",
                message_id=WATCH_PROBLEM,
                priority=4,
                directory=watch.directory,
                keyword=watch.keyword,
            )
            outcome.retry = True
            return False
    # Spooled but not yet recorded: the next run submits these again, and the
    # spool answers a resubmit by the same caller with the entry it already has.
    crash_point("watch-after-submit")
    for (seen, _), result in zip(sendable, results, strict=True):
        path = os.path.join(watch.directory, seen.name)
        if isinstance(result, client.Submitted):
            state.submitted(seen, now)
            outcome.submitted.append(path)
            journal.send(
                f"{path}: submitted as {result.entry} ({result.size} bytes)",
                message_id=WATCH_SUBMITTED,
                path=path,
                keyword=watch.keyword,
                entry=result.entry,
                size=result.size,
            )
        elif isinstance(result, _FOR_GOOD):
            _refuse(watch, state, seen, f"{result.code.name}: {result.strerror}", now)
            outcome.refused.append(path)
        else:
            journal.send(
                f"{path}: not submitted yet: {result}",
                message_id=WATCH_PROBLEM,
                priority=4,
                path=path,
                keyword=watch.keyword,
            )
            outcome.retry = True
    return True


@contextlib.contextmanager
def _handed_over(
    dir_fd: int, batch: Sequence[Seen], state_dir: str
) -> Iterator[list[tuple[Seen, str | OSError]]]:
    """Each file opened (O_NOFOLLOW, relative to the scanned directory) and, if it is
    still the file scanned, a link ``<state>/.submitting/<name>`` -> ``/proc/self/fd/N``
    for the client to open; else the error. Descriptors and links go afterwards."""
    links = os.path.join(state_dir, ".submitting")
    shutil.rmtree(links, ignore_errors=True)  # a killed run's leftovers
    os.mkdir(links, 0o700)
    fds: list[int] = []
    opened: list[tuple[Seen, str | OSError]] = []
    try:
        for seen in batch:
            try:
                fd = os.open(seen.name, _OPEN_FLAGS, dir_fd=dir_fd)
            except OSError as exc:
                opened.append((seen, exc))
                continue
            fds.append(fd)
            now_seen = Seen.of(seen.name, os.fstat(fd))
            if now_seen.ident != seen.ident or not stat.S_ISREG(os.fstat(fd).st_mode):
                # Renamed over or written since the scan: the next run decides anew.
                opened.append((seen, FileNotFoundError(errno.ENOENT, "changed", seen.name)))
                continue
            link = os.path.join(links, seen.name)
            os.symlink(f"/proc/self/fd/{fd}", link)
            opened.append((seen, link))
        yield opened
    finally:
        for fd in fds:
            os.close(fd)
        shutil.rmtree(links, ignore_errors=True)


def resolve_user(user: int | str) -> int | None:
    if isinstance(user, int):
        return user
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


def mine(config: ClientConfig, uid: int) -> list[Watch]:
    """The watch blocks this user serves; the others are another instance's."""
    return [w for w in config.watches.values() if resolve_user(w.user) == uid]


@contextlib.contextmanager
def _locked(state_dir: str) -> Iterator[bool]:
    """One run at a time per state directory (a manual run beside the unit's)."""
    fd = os.open(os.path.join(state_dir, "lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def run(config: ClientConfig, *, state_dir: str, socket_path: str, now: float, uid: int) -> Outcome:
    """One pass over this user's watches; the state is saved after every batch."""
    states = read_states(state_dir)
    watches = mine(config, uid)
    current = {w.directory: states.get(w.directory, State()) for w in watches}
    # Watches of other users (or removed ones) keep their records untouched.
    kept = {d: s for d, s in states.items() if d not in current}

    def save() -> None:
        write_states(state_dir, {**kept, **current})

    outcome = Outcome()
    for watch in watches:
        run_watch(
            watch,
            current[watch.directory],
            state_dir=state_dir,
            socket_path=socket_path,
            now=now,
            outcome=outcome,
            save=save,
        )
    save()
    return outcome


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dlogd-watch",
        description="Submit finished files of the watched directories (client.conf watch"
        " blocks of this user) once each (run by dlogd-watch.service).",
    )
    parser.add_argument("--config", default=DEFAULT_CLIENT_CONFIG, help="client config file")
    parser.add_argument(
        "--state-dir",
        default=os.environ.get("STATE_DIRECTORY", DEFAULT_STATE_DIR).split(":")[0],
        help="where what was submitted is remembered (default: $STATE_DIRECTORY, else"
        f" {DEFAULT_STATE_DIR})",
    )
    parser.add_argument(
        "--socket", help=f"the submit socket (default: $DLOGD_SOCKET, else {client.DEFAULT_SOCKET})"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    import time

    args = parse_args(argv)
    uid = os.geteuid()
    if uid == 0:
        print("dlogd-watch: refusing to run as root: run it as the watch's user", file=sys.stderr)
        return 1
    config, error = load_logged(load_client, args.config)
    if config is None:
        print(f"dlogd-watch: {error}", file=sys.stderr)
        return 1
    if not mine(config, uid):
        print(f"dlogd-watch: no watch block in {args.config} names user {uid}", file=sys.stderr)
        return 1
    try:
        with _locked(args.state_dir) as locked:
            if not locked:
                print("dlogd-watch: another run holds the state; it will see the changes")
                return 0
            outcome = run(
                config,
                state_dir=args.state_dir,
                socket_path=args.socket or client.default_socket_path(),
                now=time.time(),
                uid=uid,
            )
    except (StateError, OSError) as exc:
        journal.send(f"dlogd-watch: state: {exc}", message_id=WATCH_PROBLEM, priority=3)
        return 1
    print(
        f"dlogd-watch: {len(outcome.submitted)} submitted, {len(outcome.refused)} refused,"
        f" {outcome.waiting} still being written"
    )
    return EX_TEMPFAIL if outcome.retry else 0


if __name__ == "__main__":
    sys.exit(main())
