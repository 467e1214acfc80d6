"""``dlogd-archive``: each file the collector stored, copied once to the S3 archive, verified.

Place in the flow: after ``receive``/``store`` have made a file durable in its
(keyword, host) directory, ``dlogd-archive.service`` (started by its path unit
and timer) walks those directories and, per file:

    no record -> hash it (SHA-256, and the MD5 of each part) -> object at its key?
        same size and SHA-256: adopt it (a run killed after the upload)
        another file's: refuse, keep the local copy, ARCHIVE_FAILED
        none: upload (PutObject, or multipart part by part, Content-MD5 on each)
    -> retention set on that version (PutObjectRetention) -> read back and checked
       (size, SHA-256 metadata, ETag, retention in force) -> record written
       (fsynced) -> ARCHIVE_STORED
    record, keep_local elapsed -> local SHA-256 still the archived one, archived
       copy checked again -> local copy removed -> ARCHIVE_REMOVED

The rules (what a record is, what "verified" means, when a local copy may go,
the object key and retain-until date) are the pure functions at the top; the
walk below them does the I/O, S3 through :mod:`dlogd.s3`. Records live in
``<state>/<keyword>/<host>/<stored name>.json``; ``dlogctl verify`` reads the
same records. The store being down ends the run with the on-disk backoff of
:mod:`dlogd.backoff` (exit 75), receiving is not affected, and the next run
after the backoff catches up.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import re
import socket
import stat
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, replace

from dlogd import journal, trigger
from dlogd.config import (
    DEFAULT_SERVER_CONFIG,
    Archive,
    Retry,
    ServerConfig,
    load_logged,
    load_server,
)
from dlogd.crash import crash_point
from dlogd.fsutil import DIR_FLAGS, read_json
from dlogd.names import is_stored_name
from dlogd.s3 import (
    ArchiveDown,
    ArchiveRefused,
    Bucket,
    CredentialsRefused,
    ObjectInfo,
    credentials_path,
    read_credentials,
)

DEFAULT_STATE = "/var/lib/dlogd/archive"
PART_SIZE = 8 * 1024 * 1024  # one part in memory at a time; files up to this are one PUT
MAX_PARTS = 10_000  # S3's limit: files above PART_SIZE * MAX_PARTS use larger parts
DAY = 86400.0
EX_TEMPFAIL = 75
BACKOFF_KEY = "archive"
BACKOFF = Retry(min_delay=30.0, max_delay=3600.0)
_SUBMIT_TIME = re.compile(r"([0-9]{9,11})(?:-[0-9]+)?\.")


# --- the rules --------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """What was archived for one stored file: written once its archived copy is verified."""

    key: str
    version_id: str
    etag: str
    sha256: str
    size: int
    retain_until: float
    archived_at: float
    removed_at: float | None = None  # when the local copy was removed

    @staticmethod
    def from_json(data: dict[str, object]) -> Record | None:
        try:
            return Record(
                key=str(data["key"]),
                version_id=str(data["version_id"]),
                etag=str(data["etag"]),
                sha256=str(data["sha256"]),
                size=int(data["size"]),  # type: ignore[call-overload]
                retain_until=float(data["retain_until"]),  # type: ignore[arg-type]
                archived_at=float(data["archived_at"]),  # type: ignore[arg-type]
                removed_at=None if data.get("removed_at") is None else float(data["removed_at"]),  # type: ignore[arg-type]
            )
        except (KeyError, TypeError, ValueError):
            return None


def _raise_first(done: Iterable[Future[None]]) -> None:
    for future in done:
        future.result()


def part_size(size: int) -> int:
    """PART_SIZE, doubled until the file fits in S3's 10,000 parts."""
    chosen = PART_SIZE
    while size > chosen * MAX_PARTS:
        chosen *= 2
    return chosen


def submit_time(name: str, fallback: float) -> float:
    """The submit time a stored name starts with (the spool's ``<unix time>.`` prefix)."""
    match = _SUBMIT_TIME.match(name)
    return float(match.group(1)) if match else fallback


def object_key(pattern: str, *, keyword: str, host: str, name: str, when: float) -> str:
    """The ``key`` pattern filled in; the date fields are ``when`` in UTC."""
    day = datetime.datetime.fromtimestamp(when, datetime.UTC)
    fields = {
        "keyword": keyword,
        "host": host,
        "collector": socket.gethostname(),
        "yyyy": f"{day.year:04d}",
        "mm": f"{day.month:02d}",
        "dd": f"{day.day:02d}",
        "name": name,
    }
    return re.sub(r"<([a-z]+)>", lambda m: fields[m.group(1)], pattern)


def multipart_etag(part_md5s: list[bytes]) -> str:
    """The ETag S3 gives an object: its MD5, or for a multipart one MD5(MD5s)-N."""
    if len(part_md5s) == 1:
        return part_md5s[0].hex()
    return f"{hashlib.md5(b''.join(part_md5s)).hexdigest()}-{len(part_md5s)}"


LOCK_MARGIN = 60.0  # seconds a single-part upload's lock is set beyond its request time
WORKERS = 4  # files archived at once (Archiver.run)


def retain_until(last_modified: float, archive: Archive) -> float:
    """Locked for the retention period from the upload. Derived from the object, so a
    run adopting a killed run's upload sets (about) the same date; recorded once
    set, since RGW moves LastModified when retention is put on a version."""
    return float(int(last_modified + archive.retention_days * DAY))


def removable(record: Record, archive: Archive, now: float) -> bool:
    """May the local copy go now (once it and the archived copy are checked again)?"""
    if archive.keep_local_days is None:
        return False
    return now >= record.archived_at + archive.keep_local_days * DAY


def object_problems(
    found: ObjectInfo | None,
    *,
    size: int,
    sha256: str,
    etag: str,
    archive: Archive,
    until: float,
    now: float,
) -> list[str]:
    """Why the archived object is not the verified copy of this file (empty: it is)."""
    if found is None:
        return ["missing from the archive"]
    problems = []
    if found.size != size:
        problems.append(f"archived size {found.size}, local {size}")
    if found.sha256 != sha256:
        problems.append(f"archived SHA-256 metadata {found.sha256!r} is not {sha256}")
    if etag and found.etag != etag:
        problems.append(f"archived ETag {found.etag} is not {etag}")
    if found.retain_mode is None or found.retain_until is None:
        problems.append("no retention on the archived version")
    else:
        if found.retain_mode.lower() != archive.mode:
            problems.append(f"retention mode {found.retain_mode}, configured {archive.mode}")
        if found.retain_until < until or found.retain_until <= now:
            problems.append("retention shorter than configured, or over")
    return problems


# --- records on disk -----------------------------------------------------------------------


def record_path(state: str, keyword: str, host: str, name: str) -> str:
    return os.path.join(state, keyword, host, f"{name}.json")


def read_record(state: str, keyword: str, host: str, name: str) -> Record | None:
    data = read_json(record_path(state, keyword, host, name))
    return Record.from_json(data) if data else None


def records(state: str, keyword: str, host: str) -> dict[str, Record]:
    """Every record of one (keyword, host), by stored name."""
    directory = os.path.join(state, keyword, host)
    found = {}
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(directory):
            if entry.name.endswith(".json") and entry.is_file(follow_symlinks=False):
                name = entry.name.removesuffix(".json")
                record = read_record(state, keyword, host, name)
                if record is not None:
                    found[name] = record
    return found


def write_record(state: str, keyword: str, host: str, name: str, record: Record) -> None:
    """Durable before anything relies on it (fsync the file, rename, fsync the directory)."""
    path = record_path(state, keyword, host, name)
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o750, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    with os.fdopen(fd, "w") as handle:
        json.dump(asdict(record), handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(directory, DIR_FLAGS)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def archived_dirs(config: ServerConfig) -> Iterator[tuple[str, str, str]]:
    """(keyword, host, directory) of every store directory the archive block covers."""
    archive = config.archive
    for name, keyword in config.keywords.items():
        if archive is None or (archive.keywords and name not in archive.keywords):
            continue
        for host, directory in keyword.dirs.items():
            yield name, host, directory


# --- local files -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Local:
    """A stored file as hashed now."""

    size: int
    mtime: float
    sha256: str
    part_md5s: list[bytes]
    part_size: int


def stored_names(dir_fd: int) -> Iterator[str]:
    """The finished files of a store directory (no partials, nothing hidden, no symlinks)."""
    with os.scandir(dir_fd) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if is_stored_name(entry.name) and entry.is_file(follow_symlinks=False):
                yield entry.name


def open_stored(dir_fd: int, name: str) -> int:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{name}: not a regular file")
    return fd


def hash_local(fd: int) -> Local:
    """SHA-256 of the file and the MD5 of each part, one part in memory at a time."""
    st = os.fstat(fd)
    chosen = part_size(st.st_size)
    digest = hashlib.sha256()
    md5s = []
    offset = 0
    while offset < st.st_size or offset == 0:
        chunk = os.pread(fd, min(chosen, st.st_size - offset), offset)
        digest.update(chunk)
        md5s.append(hashlib.md5(chunk).digest())
        offset += len(chunk)
        if not chunk:
            break
    return Local(st.st_size, st.st_mtime, digest.hexdigest(), md5s, chosen)


# --- one run ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    archived: int = 0
    adopted: int = 0
    removed: int = 0
    failed: int = 0


class Archiver:
    """One run over every archived (keyword, host) directory of a collector."""

    def __init__(self, config: ServerConfig, state: str, bucket: Bucket) -> None:
        assert config.archive is not None
        self.config = config
        self.archive: Archive = config.archive
        self.state = state
        self.bucket = bucket
        self.outcome = Outcome()
        self._counting = threading.Lock()  # the workers of run() count into one Outcome
        self.buffers = threading.BoundedSemaphore(WORKERS)  # part buffers in memory

    def _count(self, what: str) -> None:
        with self._counting:
            setattr(self.outcome, what, getattr(self.outcome, what) + 1)

    def targets(self) -> Iterator[tuple[str, str, str]]:
        return archived_dirs(self.config)

    def run(self) -> Outcome:
        """Raises :class:`dlogd.s3.ArchiveDown` when the store cannot be reached.

        ``WORKERS`` files at a time: each request waits on the store for a round
        trip, and a file takes three (HEAD, PUT, HEAD). What one file needs is
        the same as alone (its record, its own lock on the store's side), so a
        run killed at any point leaves each file as a sequential run would.
        Memory stays bounded: at most ``WORKERS`` part buffers.
        """
        with ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="archive") as pool:
            for keyword, host, directory in self.targets():
                try:
                    dir_fd = os.open(directory, DIR_FLAGS)
                except FileNotFoundError:
                    continue  # nothing received yet
                running: set[Future[None]] = set()
                try:
                    for name in stored_names(dir_fd):
                        if len(running) >= WORKERS:
                            done, running = wait(running, return_when=FIRST_COMPLETED)
                            _raise_first(done)  # ArchiveDown: no new file is started
                        running.add(pool.submit(self.one, dir_fd, keyword, host, name))
                finally:
                    # Every file of the directory ends before its descriptor closes.
                    done, _ = wait(running)
                    os.close(dir_fd)
                _raise_first(done)
        return self.outcome

    def one(self, dir_fd: int, keyword: str, host: str, name: str) -> None:
        record = read_record(self.state, keyword, host, name)
        if record is not None and not removable(record, self.archive, time.time()):
            return  # archived and verified; the local copy stays for now
        try:
            fd = open_stored(dir_fd, name)
        except OSError:
            return  # removed or replaced meanwhile: not ours to judge now
        try:
            if record is None:
                self.upload(fd, keyword, host, name)
            else:
                self.remove_local(fd, dir_fd, keyword, host, name, record)
        except (ArchiveRefused, OSError) as exc:
            self._count("failed")
            journal.send(
                f"not archived: {exc}",
                message_id=journal.ARCHIVE_FAILED,
                priority=4,
                keyword=keyword,
                host=host,
                file=name,
                reason=str(exc)[:500],
            )
        finally:
            os.close(fd)

    def upload(self, fd: int, keyword: str, host: str, name: str) -> None:
        local = hash_local(fd)
        when = submit_time(name, local.mtime)
        key = object_key(self.archive.key, keyword=keyword, host=host, name=name, when=when)
        etag = multipart_etag(local.part_md5s)
        found = self.bucket.head(key)
        adopted = found is not None
        if found is not None and (found.sha256 != local.sha256 or found.size != local.size):
            raise ArchiveRefused(
                f"{key} already holds another file (SHA-256 {found.sha256}): kept locally"
            )
        if found is None:
            self.send(fd, key, local)
            crash_point("archive-after-upload")  # fault tests: uploaded, no record yet
            found = self.bucket.head(key)
            if found is None:
                raise ArchiveRefused(f"{key}: not found right after its upload")
        until = retain_until(found.last_modified, self.archive)
        if found.retain_until is None or found.retain_until < until:
            self.bucket.lock(key, found.version_id, self.archive.mode, until)
            found = self.bucket.head(key, found.version_id)
        problems = object_problems(
            found,
            size=local.size,
            sha256=local.sha256,
            etag=etag,
            archive=self.archive,
            until=until,
            now=time.time(),
        )
        if problems or found is None:
            raise ArchiveRefused(f"{key}: archived copy not verified: {'; '.join(problems)}")
        record = Record(
            key=key,
            version_id=found.version_id,
            etag=found.etag,
            sha256=local.sha256,
            size=local.size,
            retain_until=found.retain_until or until,
            archived_at=time.time(),
        )
        write_record(self.state, keyword, host, name, record)
        self._count("adopted" if adopted else "archived")
        journal.send(
            f"archived as {key}" + (" (found already uploaded)" if adopted else ""),
            message_id=journal.ARCHIVE_STORED,
            keyword=keyword,
            host=host,
            file=name,
            size=local.size,
            sha256=local.sha256,
            key=key,
            etag=found.etag,
            version_id=found.version_id,
            retain_until=int(record.retain_until),
        )

    def send(self, fd: int, key: str, local: Local) -> None:
        """Upload from the descriptor, each part with the MD5 it had when hashed.

        At most ``WORKERS`` part buffers in memory in the whole run (``buffers``),
        whether they belong to four small files or to one big one."""

        def part(number: int) -> tuple[bytes, bytes]:
            # Sent with the MD5 taken when the file was hashed: the store refuses
            # (BadDigest) bytes that changed since, so no second hash here.
            data = os.pread(fd, local.part_size, (number - 1) * local.part_size)
            return data, local.part_md5s[number - 1]

        if len(local.part_md5s) == 1:
            with self.buffers:
                data, md5 = part(1)
                self._put_single(key, data, md5, local)
        else:
            # A file of several parts is always sent as a multipart upload: one a
            # killed run left for this key is aborted first (a single-part file never
            # had one, so it costs it no listing).
            self.bucket.abort_uploads(key)
            self.bucket.put_parts(key, part, len(local.part_md5s), local.sha256, self.buffers)

    def _put_single(self, key: str, data: bytes, md5: bytes, local: Local) -> None:
        # Locked at once (the retention is then extended to the upload time's,
        # if it falls later): no moment without a lock for a killed run to leave.
        # LOCK_MARGIN: the date derived from the object's LastModified after the
        # upload must not fall later than this one, or the lock is put again
        # (two more requests per file).
        until = retain_until(time.time() + LOCK_MARGIN, self.archive)
        self.bucket.put(key, data, md5, local.sha256, (self.archive.mode, until))

    def remove_local(
        self, fd: int, dir_fd: int, keyword: str, host: str, name: str, record: Record
    ) -> None:
        local = hash_local(fd)
        if local.sha256 != record.sha256 or local.size != record.size:
            raise ArchiveRefused(
                f"{name}: the local copy is not the one archived as {record.key} "
                f"(SHA-256 {local.sha256}, archived {record.sha256}): kept"
            )
        found = self.bucket.head(record.key, record.version_id)
        problems = object_problems(
            found,
            size=record.size,
            sha256=record.sha256,
            etag=record.etag,
            archive=self.archive,
            until=record.retain_until,
            now=time.time(),
        )
        if problems:
            raise ArchiveRefused(f"{record.key}: {'; '.join(problems)}: local copy kept")
        held = os.fstat(fd)
        named = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if (named.st_dev, named.st_ino) != (held.st_dev, held.st_ino):
            return  # replaced since we opened it: judged again next run
        os.unlink(name, dir_fd=dir_fd)
        os.fsync(dir_fd)
        write_record(self.state, keyword, host, name, replace(record, removed_at=time.time()))
        self._count("removed")
        journal.send(
            f"local copy removed, archived as {record.key}",
            message_id=journal.ARCHIVE_REMOVED,
            keyword=keyword,
            host=host,
            file=name,
            sha256=record.sha256,
            key=record.key,
            version_id=record.version_id,
        )


# --- the command -----------------------------------------------------------------------------


def open_bucket(archive: Archive) -> Bucket:
    """The archive's bucket with its credentials (raises CredentialsRefused)."""
    # A request per file worker, and the part uploads (at most WORKERS buffers).
    credentials = read_credentials(credentials_path(archive.credentials))
    return Bucket(archive, credentials, connections=2 * WORKERS)


def run_lock(state: str) -> int | None:
    """An exclusive lock on ``<state>/.lock`` for this process's life; None if held."""
    fd = os.open(
        os.path.join(state, ".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640
    )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dlogd-archive",
        description="Copy each file this collector stored to the S3 archive once, verified.",
        epilog="exit status: 0 done, 1 config or credentials refused, 75 the archive is "
        "down or backing off (receiving is not affected; a later run catches up)",
    )
    parser.add_argument("--config", default=DEFAULT_SERVER_CONFIG, help="the collector config")
    parser.add_argument("--state", default=DEFAULT_STATE, help="where the records are kept")
    return parser.parse_args(argv)


def _take_trigger() -> None:
    """Take dlogd-archive.path's trigger before looking at the stores: a file
    stored from now on makes it again, and the next run starts when this ends."""
    path = trigger.stored_trigger()
    if path is None:
        return
    try:
        trigger.take(path)
    except OSError as exc:
        print(f"dlogd-archive: cannot remove {path}: {exc.strerror or exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from dlogd.backoff import RetryState

    args = parse_args(argv)
    config, why = load_logged(load_server, args.config)
    if config is None:
        print(f"dlogd-archive: {why}", file=sys.stderr)
        return 1
    if config.archive is None:
        print(f"dlogd-archive: {args.config} has no archive {{ }} block", file=sys.stderr)
        return 0
    os.makedirs(args.state, mode=0o750, exist_ok=True)
    lock = run_lock(args.state)
    if lock is None:
        # Two runs at once could both upload one file (two versions): one at a time.
        print("dlogd-archive: another run is archiving now", file=sys.stderr)
        return 0
    _take_trigger()
    backoff = RetryState(args.state, BACKOFF)
    now = time.time()
    due = backoff.due(BACKOFF_KEY, now)
    if due is not None:
        print(f"dlogd-archive: archive backing off until {time.ctime(due)}", file=sys.stderr)
        return EX_TEMPFAIL
    try:
        bucket = open_bucket(config.archive)
        outcome = Archiver(config, args.state, bucket).run()
    except CredentialsRefused as exc:
        journal.send(
            f"archive credentials refused: {exc}",
            message_id=journal.CONFIG_ERROR,
            priority=3,
            path=config.archive.credentials,
        )
        return 1
    except ArchiveDown as exc:
        next_attempt = backoff.failed(BACKOFF_KEY, str(exc), time.time())
        journal.send(
            f"archive unreachable, next attempt at {time.ctime(next_attempt)}: {exc}",
            message_id=journal.ARCHIVE_RETRY,
            priority=4,
            reason=str(exc)[:500],
            next=int(next_attempt),
        )
        return EX_TEMPFAIL
    backoff.succeeded(BACKOFF_KEY)
    print(
        f"dlogd-archive: {outcome.archived} archived, {outcome.adopted} found already archived, "
        f"{outcome.removed} local copies removed, {outcome.failed} failed",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
