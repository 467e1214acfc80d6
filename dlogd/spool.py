"""The on-disk spool between the submit service (adds) and the shipper (drains).

Layout under the root (default /var/spool/dlogd; docs/spool.md has the why)::

    <root>/<keyword>/<entry>               the file: hard link to the caller's inode, or a copy
    <root>/<keyword>/.owed/<entry>/<host>  one empty marker per destination still owed a copy
    <root>/<keyword>/.ident/<key>          "<entry> <source record>": who submitted which file
    <root>/<keyword>/.ident/@<entry>       "<key>": the way back, to drop the index with the entry
    <root>/<keyword>/.owed/.new-*          marker sets being built (renamed into place)
    <root>/<keyword>/.tmp/                 copies being written (O_TMPFILE, else temp names)
    <root>/.retry/<host>.json              the shipper's backoff per collector (``backoff``)
    <root>/.drain.lock                     held (flock) by the one drain running
    <root>/.quota.lock                     held (flock) by the add being measured against a quota

Order of an add: markers built and fsynced under a temporary name, renamed to
``.owed/<entry>`` (which also claims the entry name), ``.owed`` fsynced, the
``.ident`` links made (a resubmit is recognised by them), then the entry linked
into place. The keyword directory is fsynced by :meth:`Spool.commit`
so that a batch pays for one flush. A crash therefore leaves at worst an owed
directory without an entry (removed by :meth:`Spool.cleanup`), never an entry that
nobody ships, never a half-written one.

Every access goes through directory descriptors opened with O_NOFOLLOW: the
spool tree is never resolved through a symlink, even one planted inside it.
A :class:`Spool` object is not thread-safe: the shipper's collector threads
share one through :class:`SharedSpool`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import stat
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import queue

from dlogd import journal, trigger
from dlogd.crash import crash_point
from dlogd.fsutil import DIR_FLAGS
from dlogd.names import BASENAME_RE, HOST_RE, KEYWORD_RE, entry_name
from dlogd.quota import Amount, Refusal, Space, refusal

OWED_DIR = ".owed"
TRIGGER = ".submitted"
DRAIN_LOCK = ".drain.lock"
QUOTA_LOCK = ".quota.lock"
RETRY_DIR = ".retry"
_TMP = ".tmp"
_NEW_PREFIX = ".new-"
_IDENT = ".ident"  # symlinks used as small atomic records: only ever readlink()ed
_BACK = "@"
_MAX_COLLISIONS = 100_000
_COPY_CHUNK = 64 * 1024 * 1024
# Link failures that a copy can work around: other file system, protected_hardlinks
# without CAP_FOWNER, a file already deleted (nlink 0), too many links.
_LINK_FALLBACK = frozenset({errno.EXDEV, errno.EPERM, errno.ENOENT, errno.EMLINK})
_AT_EMPTY_PATH = 0x1000


def hold_tries(record: Mapping[str, object]) -> int:
    """The ``tries`` of a hold marker's record: above 0 for a hold for now, 0 for good."""
    tries = record.get("tries", 0)
    return tries if isinstance(tries, int) and tries > 0 else 0


class DrainBusy(Exception):
    """Another drain holds this spool; ``holder`` is its pid as it wrote it, if readable."""

    def __init__(self, root: str, holder: str) -> None:
        who = f" (pid {holder})" if holder else ""
        super().__init__(f"another dlogd-ship is draining {root}{who}")
        self.holder = holder


class SpoolFull(OSError):
    """An add would take the spool past ``spool_max_size`` or below ``spool_min_free``.

    ENOSPC, so a caller that only looks at errno sees "no space", as from the disk.
    Nothing already in the spool is ever dropped to make room (issue 14).
    """

    def __init__(self, why: Refusal) -> None:
        super().__init__(errno.ENOSPC, f"spool full: {why.reason}")
        self.refusal = why


@dataclass(frozen=True)
class Entry:
    """One spooled file and the hosts that still have to receive it."""

    keyword: str
    name: str
    owed: frozenset[str]
    size: int
    held: frozenset[str] = frozenset()  # owed hosts that refused it, for good or for now (hold())


@dataclass(frozen=True)
class Added:
    """Result of :meth:`Spool.add`: the entry name, bytes spooled, and how."""

    keyword: str
    name: str
    size: int
    copied: bool
    resubmit: bool = False  # the same unchanged file again: answered with its pending entry

    @property
    def path(self) -> str:
        return f"{self.keyword}/{self.name}"


@dataclass(frozen=True)
class _Source:
    """Who submitted which file, as the kernel saw it: what makes a resubmit recognisable.

    A client that got no answer (the service died after its commit) and submits
    the same unchanged file again must get the pending entry back, not a second
    one. "Unchanged" is the inode (st_dev, st_ino), size and mtime; ctime too,
    except where the entry *is* the source inode (hard link: linking it moved
    its ctime). The index key leaves ctime out for that reason.
    """

    uid: int
    keyword: str
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, uid: int, keyword: str, st: os.stat_result) -> _Source:
        return cls(uid, keyword, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def index_name(self) -> str:
        who = f"{self.uid} {self.keyword} {self.dev} {self.ino} {self.size} {self.mtime_ns}"
        return hashlib.sha256(who.encode()).hexdigest()[:32]

    def record(self) -> str:
        fields = (self.uid, self.keyword, self.dev, self.ino, self.size, self.mtime_ns)
        return " ".join(map(str, (*fields, self.ctime_ns)))

    def matches(self, recorded: str, entry: os.stat_result) -> bool:
        if recorded == self.record():
            return True
        linked = (entry.st_dev, entry.st_ino) == (self.dev, self.ino)
        return linked and recorded.rsplit(" ", 1)[0] == self.record().rsplit(" ", 1)[0]


def _check_name(kind: str, value: str, pattern: re.Pattern[str]) -> None:
    if not pattern.match(value):
        raise ValueError(f"{kind} {value!r} is not a safe spool name")


class _KeywordDir:
    """Descriptors for one keyword's directory and its two hidden subdirectories."""

    def __init__(self, root_fd: int, keyword: str) -> None:
        self.fd = _open_dir(root_fd, keyword)
        try:
            self.owed = _open_dir(self.fd, OWED_DIR)
            self.tmp = _open_dir(self.fd, _TMP)
        except BaseException:
            self.close()
            raise

    def ident(self, *, create: bool) -> int | None:
        """The ``.ident`` directory, made only by the first add that records a source."""
        fd: int = getattr(self, "_ident", -1)
        if fd < 0:
            try:
                if create:
                    fd = _open_dir(self.fd, _IDENT)
                else:
                    fd = os.open(_IDENT, DIR_FLAGS, dir_fd=self.fd)
            except FileNotFoundError:
                return None
            self._ident = fd
        return fd

    def close(self) -> None:
        for name in ("_ident", "tmp", "owed", "fd"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


def _open_dir(parent_fd: int, name: str) -> int:
    """Open a child directory without following a symlink, creating it (0700) if absent."""
    try:
        return os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        pass
    with contextlib.suppress(FileExistsError):  # a concurrent submit made it
        os.mkdir(name, 0o750, dir_fd=parent_fd)
    fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    os.fsync(parent_fd)  # once per new directory: its name must survive before entries do
    return fd


class Spool:
    """The spool tree, opened once by root directory descriptor."""

    use_o_tmpfile = True  # tests switch this off to cover the temp-name path

    def __init__(
        self,
        root: str,
        *,
        create: bool = False,
        max_size: Amount | None = None,
        min_free: Amount | None = None,
    ) -> None:
        if create:
            os.makedirs(root, 0o750, exist_ok=True)
        self.root = root
        # The quotas adds are held to (``limits { spool_max_size; spool_min_free; }``).
        self.max_size = max_size
        self.min_free = min_free
        self._quota_fd: int | None = None  # the quota lock, while held (_measuring)
        self.root_fd = os.open(root, DIR_FLAGS)
        self._dirs: dict[str, _KeywordDir] = {}
        self._touched: dict[int, None] = {}  # ordered set of dir fds awaiting fsync
        self._finished: list[tuple[_KeywordDir, str]] = []  # entries gone, owed dirs to drop
        self._unowed: list[tuple[_KeywordDir, str]] = []  # seen by pending() with no marker left
        self._host_sets: dict[frozenset[str], frozenset[str]] = {}

    def close(self) -> None:
        for kdir in self._dirs.values():
            kdir.close()
        self._dirs.clear()
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _keyword(self, keyword: str) -> _KeywordDir:
        # Always create: a crash may have left a keyword dir without .owed or .tmp.
        kdir = self._dirs.get(keyword)
        if kdir is None:
            _check_name("keyword", keyword, KEYWORD_RE)
            kdir = self._dirs[keyword] = _KeywordDir(self.root_fd, keyword)
        return kdir

    # -- adding (the submit service) ---------------------------------------------

    def add(
        self,
        keyword: str,
        source_fd: int,
        basename: str,
        hosts: Sequence[str],
        *,
        copy: bool = False,
        now: float | None = None,
        caller: int | None = None,
    ) -> Added:
        """Spool the open file ``source_fd`` for ``hosts``; durable after :meth:`commit`.

        ``basename`` comes from :func:`dlogd.names.entry_basename`. The file is hard-linked
        unless ``copy`` is set or linking is impossible (other file system,
        protected_hardlinks, deleted file), in which case the descriptor's bytes
        are copied (``st_size`` at the time of the call, constant memory).

        With ``caller`` (the submitting uid) the source is recorded, and the same
        caller submitting the same unchanged file to the same keyword again while
        its entry is pending gets that entry back (``Added.resubmit``), not a copy.
        """
        _check_name("entry basename", basename, BASENAME_RE)
        if not hosts:
            raise ValueError(f"keyword {keyword!r} names no destination host")
        for host in hosts:
            _check_name("host", host, HOST_RE)
        kdir = self._keyword(keyword)
        lock_fd = self._lock(fcntl.LOCK_SH)
        try:
            st = os.fstat(source_fd)
            source = None if caller is None else _Source.of(caller, keyword, st)
            if source is not None and (found := self._resubmitted(kdir, source)) is not None:
                return found  # a resubmit adds nothing: answered even when full
            return self._add_locked(
                kdir, keyword, source_fd, st, basename, hosts, copy, now, source
            )
        finally:
            os.close(lock_fd)

    @property
    def _quotas(self) -> bool:
        return self.max_size is not None or self.min_free is not None

    @contextlib.contextmanager
    def _measuring(self) -> Iterator[None]:
        """With a quota, what an add is measured against stays put until it is counted.

        Two adds measured together could each fit and both go past the quota, so
        measuring and becoming countable (an entry linked, or a copy's room
        reserved under .tmp) happen under one flock; the copying itself does not,
        so a big copy does not hold up other submits. Re-entrant: a link that
        falls back to a copy measures again under the lock it holds.
        """
        if not self._quotas or self._quota_fd is not None:
            yield
            return
        fd = os.open(
            QUOTA_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
            dir_fd=self.root_fd,
        )  # fmt: skip
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._quota_fd = fd
            yield
        finally:
            self._quota_fd = None
            os.close(fd)

    def check_room(self, kdir_fd: int, adding: int, size: int) -> None:
        """Raise :class:`SpoolFull` if an entry of ``size`` bytes, ``adding`` of them new
        on the spool's file system (0 for a hard link), would go past a quota."""
        if self.max_size is None and self.min_free is None:
            return
        used = self.usage() if self.max_size is not None else 0
        why = refusal(
            adding,
            Space.of_fd(kdir_fd),
            min_free=self.min_free,
            used=used,
            max_used=self.max_size,
            size=size,
        )
        if why is not None:
            raise SpoolFull(why)

    def usage(self) -> int:
        """Bytes of every entry waiting in the spool, linked or copied, and of the
        copies being made (their room is reserved): what ``spool_max_size`` bounds.
        One stat per entry."""
        total = 0
        for keyword in self.keywords():
            kdir = self._keyword(keyword)
            for fd in (kdir.fd, kdir.tmp):
                with os.scandir(fd) as entries:
                    for item in entries:
                        if item.name.startswith("."):
                            continue
                        with contextlib.suppress(FileNotFoundError):
                            st = item.stat(follow_symlinks=False)
                            if stat.S_ISREG(st.st_mode):
                                total += st.st_size
        return total

    def _add_locked(
        self,
        kdir: _KeywordDir,
        keyword: str,
        source_fd: int,
        st: os.stat_result,
        basename: str,
        hosts: Sequence[str],
        copy: bool,
        now: float | None,
        source: _Source | None,
    ) -> Added:
        tmp: _TempCopy | None = None
        if copy or st.st_dev != os.fstat(kdir.fd).st_dev:
            tmp = self._copy(kdir, source_fd, st.st_size)  # measured as it reserves room
        else:
            _fsync_source(source_fd)
        try:
            with self._measuring():
                if tmp is None:
                    self.check_room(kdir.fd, 0, st.st_size)  # a link takes no room
                when = int(time.time() if now is None else now)
                name = self._claim(kdir, basename, hosts, when, source)
                crash_point("after-owed")
                try:
                    if tmp is None:
                        tmp = self._link_or_copy(kdir, source_fd, st.st_size, name)
                    else:
                        _link_fd(tmp.fd, kdir.fd, name)
                except BaseException:
                    _remove_owed(kdir, name)
                    raise
        finally:
            if tmp is not None:
                tmp.discard(kdir)
        crash_point("after-link")
        self._touched[kdir.fd] = None
        size = tmp.size if tmp is not None else st.st_size
        return Added(keyword, name, size, copied=tmp is not None)

    def _link_or_copy(
        self, kdir: _KeywordDir, source_fd: int, size: int, name: str
    ) -> _TempCopy | None:
        try:
            _link_fd(source_fd, kdir.fd, name)
            return None
        except OSError as e:
            if e.errno not in _LINK_FALLBACK:
                raise
        tmp = self._copy(kdir, source_fd, size)  # a copy after all: measured again
        try:
            _link_fd(tmp.fd, kdir.fd, name)
        except BaseException:
            tmp.discard(kdir)
            raise
        return tmp

    def _claim(
        self,
        kdir: _KeywordDir,
        basename: str,
        hosts: Sequence[str],
        now: int,
        source: _Source | None,
    ) -> str:
        """Build the owed markers, rename them to the first free entry name, index the source."""
        new = f"{_NEW_PREFIX}{os.getpid()}-{time.monotonic_ns()}"
        os.mkdir(new, 0o750, dir_fd=kdir.owed)
        try:
            _fill_markers(kdir.owed, new, hosts)
            name = self._rename_to_free_name(kdir, new, basename, now)
        except BaseException:
            _remove_tree(kdir.owed, new)
            raise
        os.fsync(kdir.owed)
        try:
            self._index(kdir, name, source)
        except BaseException:
            _remove_owed(kdir, name)
            raise
        return name

    def _index(self, kdir: _KeywordDir, name: str, source: _Source | None) -> None:
        """Record which source ``name`` was spooled from, before the entry is linked.

        Durable with the batch's commit (the answer waits for it). A claim that
        records nothing still clears a way-back link a crash may have left for
        this name, so no old record is taken for this entry's.
        """
        ident = kdir.ident(create=source is not None)
        if ident is None:
            return
        if source is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(_BACK + name, dir_fd=ident)
        else:
            key = source.index_name()
            _set_link(ident, key, f"{name} {source.record()}")
            _set_link(ident, _BACK + name, key)
        self._touched[ident] = None

    def _resubmitted(self, kdir: _KeywordDir, source: _Source) -> Added | None:
        """The pending entry this same unchanged source was spooled as, if any.

        The entry must exist, its way-back link must name this key (so a name
        reused after a crash left a stale record finds nothing), and the record
        must match the source as it is now.
        """
        ident = kdir.ident(create=False)
        if ident is None:
            return None
        key = source.index_name()
        try:
            name, _, recorded = os.readlink(key, dir_fd=ident).partition(" ")
            entry = os.stat(name, dir_fd=kdir.fd, follow_symlinks=False)
            back = os.readlink(_BACK + name, dir_fd=ident)
        except (OSError, ValueError):
            return None
        if back != key or not stat.S_ISREG(entry.st_mode) or not source.matches(recorded, entry):
            return None
        # The first answer may have been lost before its commit: flush again.
        self._touched[kdir.owed] = None
        self._touched[kdir.fd] = None
        self._touched[ident] = None
        linked = (entry.st_dev, entry.st_ino) == (source.dev, source.ino)
        return Added(source.keyword, name, source.size, copied=not linked, resubmit=True)

    def _rename_to_free_name(self, kdir: _KeywordDir, new: str, basename: str, now: int) -> str:
        for n in range(_MAX_COLLISIONS):
            name = entry_name(now, n, basename)
            if _exists(kdir.fd, name):
                continue
            try:
                # Our marker dir is never empty, so rename onto a live (non-empty)
                # owed dir fails: that is the no-replace claim of the entry name.
                # Onto an empty one (an entry just delivered, its directory not yet
                # removed by the shipper's commit) it succeeds, and may: the name is
                # free, and the shipper's later rmdir then fails harmlessly.
                os.rename(new, name, src_dir_fd=kdir.owed, dst_dir_fd=kdir.owed)
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                    continue
                raise
            return name
        raise OSError(errno.EEXIST, f"no free entry name for {basename!r} at {now}")

    def _copy(self, kdir: _KeywordDir, source_fd: int, size: int) -> _TempCopy:
        with self._measuring():
            self.check_room(kdir.fd, size, size)
            # With a quota the copy's room is taken before the lock is let go, under a
            # name usage() counts: measured by the next add, never handed out twice.
            tmp = _TempCopy.create(kdir, self.use_o_tmpfile and not self._quotas)
            try:
                if self._quotas:
                    _reserve(tmp.fd, size)
            except BaseException:
                tmp.discard(kdir)
                raise
        try:
            tmp.size = _copy_bytes(source_fd, tmp.fd, size)
            if self._quotas and tmp.size != size:
                os.ftruncate(tmp.fd, tmp.size)  # the file shrank: not the room reserved
            os.fsync(tmp.fd)
        except BaseException:
            tmp.discard(kdir)
            raise
        return tmp

    def commit(self) -> None:
        """Make every add and acknowledge since the last commit durable."""
        self._sync_touched()
        if self._finished:
            self._remove_finished()
            self._sync_touched()

    def _sync_touched(self) -> None:
        while self._touched:
            fd = next(iter(self._touched))
            os.fsync(fd)
            del self._touched[fd]

    def _lock(self, how: int) -> int:
        # A fresh open file description per lock, so that two Spool objects in
        # one process exclude each other as two processes would.
        fd = os.open(".", DIR_FLAGS, dir_fd=self.root_fd)
        try:
            fcntl.flock(fd, how)
        except BaseException:
            os.close(fd)
            raise
        return fd

    # -- draining (the shipper) --------------------------------------------------

    def lock_drain(self) -> int:
        """Take the spool's one drain lock; returns its descriptor (closing it releases).

        Two drains at once would offer the same files on two connections and
        race each other's acknowledgements. The lock goes with the process, so
        a killed drain never leaves it held. Raises :class:`DrainBusy`.
        """
        fd = os.open(
            DRAIN_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
            dir_fd=self.root_fd,
        )  # fmt: skip
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise DrainBusy(self.root, holder) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # for the message a second run prints
        return fd

    def announce(self) -> None:
        """Wake the shipper: the trigger file exists until a drain takes it
        (``dlogd.trigger``; ``dlogd-ship.path`` watches it with PathExists=).

        A trigger file, not the spool itself, so that a spool that stays full
        while a collector is down does not keep re-firing the path unit.
        """
        try:
            trigger.announce_at(self.root_fd, TRIGGER)
        except OSError as e:
            # The entry is durable and the timer will find it; only promptness is lost.
            _warn(f"cannot touch trigger file: {e.strerror}", "-", TRIGGER)

    def take_announcement(self) -> None:
        """Remove the trigger file before a pass reads the spool.

        Whatever is submitted from now on makes it again, so the path unit
        starts another drain after this one unless this one already saw it.
        """
        try:
            trigger.take_at(self.root_fd, TRIGGER)
        except OSError as e:
            # The pass goes on; the path unit may start one more drain than needed.
            _warn(f"cannot remove trigger file: {e.strerror}", "-", TRIGGER)

    @property
    def unowed_seen(self) -> bool:
        """Whether pending() met entries acknowledged by all that cleanup() has yet to end."""
        return bool(self._unowed)

    def keywords(self) -> list[str]:
        """Keyword directories present in the spool (symlinks and odd names skipped)."""
        return sorted(
            name
            for name, mode in _list(self.root_fd)
            if stat.S_ISDIR(mode) and KEYWORD_RE.match(name)
        )

    def pending(self, hosts: Mapping[str, Sequence[str]] | None = None) -> Iterator[Entry]:
        """Every entry still owed to at least one host, oldest name first per keyword.

        ``hosts`` (keyword -> the config's current hosts) is used only for an entry
        whose owed directory is missing: it gets markers for all of them (at
        least once) and a warning. Without it such an entry is skipped, kept.
        """
        for keyword in self.keywords():
            kdir = self._keyword(keyword)
            # Names only, sorted in place: a backlog costs a string per entry here.
            names = os.listdir(kdir.fd)
            names.sort()
            for name in names:
                if name.startswith("."):
                    continue
                try:
                    st = os.stat(name, dir_fd=kdir.fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue  # finished meanwhile (another collector's acknowledgement)
                if not stat.S_ISREG(st.st_mode):
                    _warn("not a regular file, skipped", keyword, name)
                    continue
                markers = self._owed(kdir, keyword, name, (hosts or {}).get(keyword, ()))
                if markers is None:
                    continue
                owed, held = markers
                if not owed:
                    self._unowed.append((kdir, name))  # acknowledged by all: cleanup() ends it
                    continue
                yield Entry(keyword, name, owed, st.st_size, held)

    def _owed(
        self, kdir: _KeywordDir, keyword: str, name: str, fallback: Sequence[str]
    ) -> tuple[frozenset[str], frozenset[str]] | None:
        """The hosts ``name`` is owed to (none: all have it) and those of them that
        refused it (hold()); None: skip the entry."""
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=kdir.owed)
        except FileNotFoundError:
            return self._repair_owed(kdir, keyword, name, fallback)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            _warn("owed entry is not a directory, skipped", keyword, name)
            return None
        owed: set[str] = set()
        held: set[str] = set()
        try:
            with os.scandir(fd) as markers:
                for marker in markers:
                    if marker.name[0] == "." or not marker.is_file(follow_symlinks=False):
                        continue
                    owed.add(marker.name)
                    # A marker is empty until hold() writes why its host refused the entry.
                    with contextlib.suppress(FileNotFoundError):
                        if marker.stat(follow_symlinks=False).st_size:
                            held.add(marker.name)
        finally:
            os.close(fd)
        return self._interned(owed), self._interned(held)

    def _interned(self, hosts: set[str]) -> frozenset[str]:
        # One set object per distinct host set, not one per entry: a backlog of
        # 100,000 entries owed to the same collector holds one.
        key = frozenset(hosts)
        return self._host_sets.setdefault(key, key)

    def _repair_owed(
        self, kdir: _KeywordDir, keyword: str, name: str, fallback: Sequence[str]
    ) -> tuple[frozenset[str], frozenset[str]] | None:
        if not _exists(kdir.fd, name):
            return None  # finished after the directory was listed: nothing to repair
        if not fallback:
            _warn("entry has no owed markers and no configured hosts, kept", keyword, name)
            return None
        _warn("entry had no owed markers, owed to every configured host", keyword, name)
        os.mkdir(name, 0o750, dir_fd=kdir.owed)
        _fill_markers(kdir.owed, name, fallback)
        os.fsync(kdir.owed)
        return self._interned(set(fallback)), frozenset()

    def hold(self, entry: Entry, host: str, until: float, reason: str, *, tries: int = 0) -> None:
        """``host`` refused ``entry``: stop offering it there until ``until``.

        For good (a permanent refusal), or with ``tries`` for now: the
        ``tries``-th temporary refusal in a row of this one file (a store below
        ``min_free``, a full disk), which holds the file, not its collector.
        The entry stays owed (nothing refused is ever dropped) and the reason is
        written into the host's marker, for the operator and for the shipper.
        Not fsynced: losing a hold in a crash costs one more offer.
        """
        _check_name("host", host, HOST_RE)
        kdir = self._keyword(entry.keyword)
        fd = os.open(entry.name, DIR_FLAGS, dir_fd=kdir.owed)
        try:
            tmp = f".{host}.hold"
            out = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640,
                dir_fd=fd,
            )  # fmt: skip
            record: dict[str, object] = {"until": until, "reason": reason}
            if tries:
                record["tries"] = tries
            with os.fdopen(out, "w") as handle:
                json.dump(record, handle)
            os.rename(tmp, host, src_dir_fd=fd, dst_dir_fd=fd)
        finally:
            os.close(fd)

    def held_until(self, entry: Entry, host: str) -> tuple[float, str]:
        """(until, reason) of a hold; (0, "") when there is none."""
        hold = self._hold_record(entry, host)
        try:
            return float(hold["until"]), str(hold["reason"])  # type: ignore[arg-type]
        except (ValueError, KeyError, TypeError):
            return 0.0, ""

    def hold_tries(self, entry: Entry, host: str) -> int:
        """How many temporary refusals in a row the hold on ``entry`` counts (0: none)."""
        return hold_tries(self._hold_record(entry, host))

    def _hold_record(self, entry: Entry, host: str) -> dict[str, object]:
        kdir = self._keyword(entry.keyword)
        try:
            fd = os.open(entry.name, DIR_FLAGS, dir_fd=kdir.owed)
        except FileNotFoundError:
            return {}
        try:
            marker = os.open(host, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            with os.fdopen(marker) as handle:
                hold = json.load(handle)
        except (OSError, ValueError):
            return {}
        finally:
            os.close(fd)
        return hold if isinstance(hold, dict) else {}

    def open_entry(self, entry: Entry) -> int:
        """A read-only descriptor on the entry's file (never through a symlink)."""
        kdir = self._keyword(entry.keyword)
        fd = os.open(entry.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=kdir.fd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, f"spool entry {entry.keyword}/{entry.name} is not a file")
        return fd

    def acknowledge(self, entry: Entry, host: str) -> None:
        """``host`` has the entry durably: drop its marker, and the entry once none remain.

        Durable at the next :meth:`commit`; a crash before it means at worst a
        re-send, which the collector recognises. The entry is unlinked before its
        owed directory, so no crash leaves an entry that looks owed to nobody.
        """
        _check_name("host", host, HOST_RE)
        kdir = self._keyword(entry.keyword)
        try:
            fd = os.open(entry.name, DIR_FLAGS, dir_fd=kdir.owed)
        except FileNotFoundError:
            return  # already fully acknowledged
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(host, dir_fd=fd)
            self._touched[kdir.owed] = None
            remaining = _markers(fd)
        finally:
            os.close(fd)
        if not remaining:
            self._finish(kdir, entry.name)

    def _finish(self, kdir: _KeywordDir, name: str) -> None:
        # The index first: a crash after it costs at most the recognition of a
        # resubmit of an entry already delivered.
        if (ident := kdir.ident(create=False)) is not None and _drop_index(ident, name):
            self._touched[ident] = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=kdir.fd)
        # The markers go only after the entry's removal is durable (commit), so
        # no crash leaves an entry that looks owed to nobody. Deferring both to
        # commit() makes a stream of acknowledgements cost one flush per batch.
        self._touched[kdir.fd] = None
        self._finished.append((kdir, name))

    def _remove_finished(self) -> None:
        for kdir, name in self._finished:
            try:
                os.rmdir(name, dir_fd=kdir.owed)
            except OSError as e:
                # ENOTEMPTY: a new submit in the same second reused the name meanwhile.
                if e.errno not in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST):
                    raise
            self._touched[kdir.owed] = None
        self._finished.clear()

    def cleanup(self, *, markers: bool = True) -> int:
        """Remove what crashes leave behind; returns how many items were removed.

        Orphan owed directories (no entry), unfinished marker sets, stale copy
        temp files, and entries whose markers are all gone. Takes the spool lock
        exclusively, so no add is in flight while it decides what is an orphan.

        ``markers=False`` leaves out the one check that opens every entry's
        owed directory: the shipper, which reads them all anyway while it
        drains (``pending()``), calls it so at the start of a pass and lets the
        cleanup after the pass end the entries ``pending()`` found with no
        marker left. Its first offer then does not wait for a scan of the backlog.
        """
        lock_fd = self._lock(fcntl.LOCK_EX)
        try:
            removed = sum(
                self._cleanup_keyword(self._keyword(k), markers=markers) for k in self.keywords()
            )
            for kdir, name in self._unowed:
                if _exists(kdir.owed, name) and not _has_entries(kdir.owed, name):
                    self._finish(kdir, name)
                    removed += 1
            self._unowed.clear()
            self.commit()
        finally:
            os.close(lock_fd)
        return removed

    def _cleanup_keyword(self, kdir: _KeywordDir, *, markers: bool) -> int:
        removed = 0
        # Names only: the type of an owed child matters only for the few it removes.
        with os.scandir(kdir.fd) as children:
            entries = {c.name for c in children if not c.name.startswith(".")}
        with os.scandir(kdir.owed) as children:
            owed = [c.name for c in children if c.name.startswith(_NEW_PREFIX)
                    or c.name not in entries or markers]  # fmt: skip
        for name in owed:
            if name.startswith(_NEW_PREFIX) or name not in entries:
                if _is_dir(kdir.owed, name):
                    _remove_tree(kdir.owed, name)
                    removed += 1
            elif markers and _is_dir(kdir.owed, name) and not _has_entries(kdir.owed, name):
                self._finish(kdir, name)
                removed += 1
        for name, mode in _list(kdir.tmp):
            if stat.S_ISREG(mode):
                os.unlink(name, dir_fd=kdir.tmp)
                removed += 1
        if removed:
            self._touched[kdir.owed] = None
            self._touched[kdir.tmp] = None
        if (ident := kdir.ident(create=False)) is not None and _drop_stale_links(ident, entries):
            self._touched[ident] = None  # not counted: part of the claims counted above
        return removed


class _TempCopy:
    """A copy being written under .tmp: anonymous (O_TMPFILE) or a temp name."""

    def __init__(self, fd: int, name: str | None) -> None:
        self.fd = fd
        self.name = name
        self.size = 0

    @classmethod
    def create(cls, kdir: _KeywordDir, use_o_tmpfile: bool) -> _TempCopy:
        flags = os.O_WRONLY | os.O_CLOEXEC
        if use_o_tmpfile:
            try:
                return cls(os.open(".", flags | os.O_TMPFILE, 0o600, dir_fd=kdir.tmp), None)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
        name = f"{os.getpid()}-{time.monotonic_ns()}"
        flags |= os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        return cls(os.open(name, flags, 0o600, dir_fd=kdir.tmp), name)

    def discard(self, kdir: _KeywordDir) -> None:
        """Close, and drop the temp name (the entry's link, if made, keeps the data)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.name is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.name, dir_fd=kdir.tmp)
            self.name = None


def _link_fd(fd: int, dir_fd: int, name: str) -> None:
    """Link the file behind ``fd``: through /proc first, then with AT_EMPTY_PATH.

    The /proc route needs at most CAP_FOWNER (protected_hardlinks). Some kernels
    refuse it with EXDEV even within one mount (seen on 6.18); AT_EMPTY_PATH
    works there but only with CAP_DAC_READ_SEARCH, which only the opt-in
    hard-link mode grants (systemd/hardlink/). Without it: EPERM or ENOENT,
    and the caller copies instead.
    """
    try:
        os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dir_fd, follow_symlinks=True)
        return
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
    import ctypes  # only on this path: the submit service starts per connection

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.linkat(fd, b"", dir_fd, os.fsencode(name), _AT_EMPTY_PATH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), name)


def _copy_bytes(src: int, dst: int, size: int) -> int:
    """Copy the first ``size`` bytes by offset (the caller's file offset is untouched)."""
    offset = 0
    use_cfr = True
    while offset < size:
        count = min(_COPY_CHUNK, size - offset)
        if use_cfr:
            try:
                n = os.copy_file_range(src, dst, count, offset, offset)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                use_cfr = False
                continue
        else:
            os.lseek(dst, offset, os.SEEK_SET)
            n = os.sendfile(dst, src, offset, count)
        if n == 0:
            break  # the file shrank meanwhile: spool what there is
        offset += n
    return offset


def _reserve(fd: int, size: int) -> None:
    """Take ``size`` bytes of room for a copy now: free space drops (``spool_min_free``)
    and the file's size is the copy's (``spool_max_size``) before a byte is copied.
    Where the file system cannot allocate ahead, only the size is set."""
    if size == 0:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)


def _fsync_source(fd: int) -> None:
    # The linked inode's data must be durable before we say OK; a read-only
    # descriptor can be fsynced on Linux. EINVAL/EROFS: nothing to flush there.
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EROFS):
            raise


def _fill_markers(owed_fd: int, name: str, hosts: Sequence[str]) -> None:
    """One empty marker per host in the marker directory ``name``, made durable."""
    fd = os.open(name, DIR_FLAGS, dir_fd=owed_fd)
    try:
        for host in dict.fromkeys(hosts):
            _create_empty(host, fd)
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_empty(name: str, dir_fd: int) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    os.close(os.open(name, flags, 0o600, dir_fd=dir_fd))


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _is_dir(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _list(dir_fd: int) -> list[tuple[str, int]]:
    """(name, file type bits) of a directory's children, sorted by name.

    The types come from the directory itself (d_type), not from a stat of
    each child: at 100,000 entries that is a second of system calls per pass.
    A file system without d_type costs the lstat after all.
    """
    out: list[tuple[str, int]] = []
    with os.scandir(dir_fd) as children:
        for child in children:
            try:
                if child.is_symlink():
                    kind = stat.S_IFLNK
                elif child.is_dir(follow_symlinks=False):
                    kind = stat.S_IFDIR
                elif child.is_file(follow_symlinks=False):
                    kind = stat.S_IFREG
                else:
                    kind = stat.S_IFMT(child.stat(follow_symlinks=False).st_mode)
            except FileNotFoundError:
                continue
            out.append((child.name, kind))
    out.sort()
    return out


def _has_entries(parent_fd: int, name: str) -> bool:
    fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    try:
        return bool(_markers(fd))
    finally:
        os.close(fd)


def _markers(owed_fd: int) -> list[str]:
    """Host markers of one entry; a dot name is a hold being written, not a host."""
    return [name for name in os.listdir(owed_fd) if not name.startswith(".")]


def _remove_tree(parent_fd: int, name: str) -> None:
    """Remove a marker directory (one level of plain files; nothing is followed)."""
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        return
    try:
        for child in os.listdir(fd):
            os.unlink(child, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent_fd)


def _remove_owed(kdir: _KeywordDir, name: str) -> None:
    # On failure cleanup() takes it: an owed dir without entry is an orphan.
    with contextlib.suppress(OSError):
        if (ident := kdir.ident(create=False)) is not None:
            _drop_index(ident, name)
        _remove_tree(kdir.owed, name)


def _set_link(dir_fd: int, name: str, value: str) -> None:
    """Make ``name`` a symlink holding ``value``, replacing one that is there atomically.

    A symlink is a small record written in one call; it is only ever read with
    readlink() and never resolved (its value is not a path anything follows).
    """
    try:
        os.symlink(value, name, dir_fd=dir_fd)
        return
    except FileExistsError:
        pass  # stale (a crash, or an entry gone) or a racing twin: replace it
    tmp = f"{_NEW_PREFIX}{os.getpid()}-{time.monotonic_ns()}"
    os.symlink(value, tmp, dir_fd=dir_fd)
    try:
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def _drop_index(ident: int, name: str) -> bool:
    """Remove entry ``name``'s index links (the key only if it still names this entry)."""
    try:
        key = os.readlink(_BACK + name, dir_fd=ident)
    except FileNotFoundError:
        return False
    with contextlib.suppress(FileNotFoundError):
        if os.readlink(key, dir_fd=ident).partition(" ")[0] == name:
            os.unlink(key, dir_fd=ident)
    os.unlink(_BACK + name, dir_fd=ident)
    return True


def _drop_stale_links(ident: int, entries: set[str]) -> int:
    """cleanup(): links whose entry is gone (a crash mid add or mid removal), half-made ones."""
    dropped = 0
    for link in os.listdir(ident):
        try:
            value = os.readlink(link, dir_fd=ident)
        except FileNotFoundError:
            continue
        except OSError:  # not a symlink: nothing the spool made; leave it
            continue
        name = link[len(_BACK) :] if link.startswith(_BACK) else value.partition(" ")[0]
        if link.startswith(_NEW_PREFIX) or name not in entries:
            os.unlink(link, dir_fd=ident)
            dropped += 1
    return dropped


def _warn(what: str, keyword: str, name: str) -> None:
    journal.send(
        f"spool: {what}",
        message_id=journal.SPOOL_WARNING,
        priority=4,
        keyword=keyword,
        entry=name,
    )


# -- the shipper's front: one spool, many collector threads ---------------------------

ACKS_PER_COMMIT = 256  # acknowledgements made durable by one commit


class AcknowledgementFailed(Exception):
    """Applying acknowledgements broke in a way no retry cures: the run must stop."""


class SharedSpool:
    """The spool behind a lock: one Spool object serves every collector thread.

    Acknowledgements are applied by a thread of their own: removing an entry
    is several file system operations, and doing them between sends would
    stall the connection. They are durable only after :meth:`commit`, as
    before; a crash before it means at worst a resend, which the collector
    answers with ALREADY_STORED. A file system error leaves that entry owed
    (``failure``); any other error stops the worker applying anything more and
    makes :meth:`commit` raise :class:`AcknowledgementFailed`, never wait.
    """

    def __init__(self, spool: Spool) -> None:
        # Imported here: only the shipper builds one, the submit service never does.
        import queue
        import threading

        self.spool = spool
        self.lock = threading.Lock()
        self.unsynced = 0
        self.acks: queue.Queue[tuple[Entry, str] | None] = queue.Queue()
        self.failure: OSError | None = None
        self.broken: Exception | None = None
        self.worker = threading.Thread(target=self._apply_acks, name="acks", daemon=True)
        self.worker.start()

    def open_entry(self, entry: Entry) -> int:
        with self.lock:
            return self.spool.open_entry(entry)

    def acknowledge(self, entry: Entry, host: str) -> None:
        self.acks.put((entry, host))

    def hold(self, entry: Entry, host: str, until: float, reason: str, *, tries: int = 0) -> None:
        with self.lock:
            self.spool.hold(entry, host, until, reason, tries=tries)

    def hold_tries(self, entry: Entry, host: str) -> int:
        with self.lock:
            return self.spool.hold_tries(entry, host)

    def _apply_acks(self) -> None:
        # Every item is marked done whatever happens, so that commit() never waits
        # on a queue nobody serves.
        while (item := self.acks.get()) is not None:
            try:
                if self.broken is None:
                    self._apply(*item)
            except OSError as exc:
                self.failure = exc  # the entry stays owed: resent, then recognised
            except Exception as exc:
                self.broken = exc  # what follows stays owed too, and the run fails
            finally:
                self.acks.task_done()
        self.acks.task_done()

    def _apply(self, entry: Entry, host: str) -> None:
        with self.lock:
            self.spool.acknowledge(entry, host)
            self.unsynced += 1
            if self.unsynced >= ACKS_PER_COMMIT:
                self._commit()

    def commit(self) -> None:
        """Every acknowledgement so far applied and durable; raises if the worker broke."""
        self.acks.join()
        with self.lock:
            self._commit()
        if self.broken is not None:
            raise AcknowledgementFailed(
                f"applying acknowledgements failed: {self.broken}"
            ) from self.broken

    def close(self) -> None:
        try:
            self.commit()
        finally:
            self.acks.put(None)
            self.worker.join()

    def _commit(self) -> None:
        self.spool.commit()
        self.unsynced = 0
