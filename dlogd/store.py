"""The collector's file system side: where received bytes become durable files.

``receive`` drives it: an offer is checked against what is already here
(identical file -> "already stored"; a partial upload -> "resume from N"),
data is written under ``.dlogd-partial/`` in the target directory and hashed
as it arrives, and :meth:`Store.commit` makes a batch durable before anyone
acknowledges it:

    write data -> fsync (syncfs for a batch) -> verify size and SHA-256
    -> link into place without replacing -> fsync the directory -> ack

So a reader of the directory never sees a partial file (invariant 2), and an
acknowledged file survives a crash (invariant 1). A partial upload is keyed by
its offer (digest, size and name), so a resend after a crash resumes where the data
stopped. An upload holds an exclusive lock on its partial for as long as it has
it open: a second connection carrying the same file at the same time is told
to come back later, never handed the same partial to truncate or rename, so the
bytes hashed in memory are the bytes on disk. A different file arriving under a taken name is kept as
``<name>.conflict-<n>``, never overwriting. Directories are opened one component
at a time with O_NOFOLLOW: a symlink anywhere on the path is refused.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from dlogd.fsutil import DIR_FLAGS, hash_fd
from dlogd.names import MAX_CONFLICTS, STORED_NAME_RULE, conflict_name, is_stored_name
from dlogd.quota import Amount, Refusal, Space, refusal

PARTIAL_DIR = ".dlogd-partial"
WRITEBACK_CHUNK = 32 * 1024 * 1024


class StoreError(Exception):
    """A file cannot be stored; ``temporary`` says whether a retry may succeed."""

    def __init__(self, message: str, *, temporary: bool) -> None:
        super().__init__(message)
        self.temporary = temporary


class UnsafeName(StoreError):
    """The offered name is not one the store keeps a file under."""

    def __init__(self, message: str) -> None:
        super().__init__(message, temporary=False)


class PartialBusy(StoreError):
    """Another upload holds this file's partial: the offer may be made again later."""

    def __init__(self, name: str) -> None:
        super().__init__(f"{name}: another connection is uploading this file now", temporary=True)


class NoRoom(StoreError):
    """The file system cannot take an offer's bytes, or only by going below
    ``limits { min_free }``: refused for now, the figures in ``refusal``."""

    def __init__(self, name: str, directory: str, why: Refusal) -> None:
        super().__init__(f"{name}: {why.reason} in {directory}", temporary=True)
        self.refusal = why


class NameConflict(StoreError):
    """Different files fill the offered name and every conflict name after it."""

    def __init__(self, message: str) -> None:
        super().__init__(message, temporary=False)


class Mismatch(StoreError):
    """The bytes received are not the file that was offered."""

    def __init__(self, message: str) -> None:
        super().__init__(message, temporary=False)


class SizeMismatch(Mismatch):
    pass


class DigestMismatch(Mismatch):
    pass


def check_name(name: str) -> None:
    """The sender never chooses a path: a plain basename of safe characters."""
    if not is_stored_name(name):
        raise UnsafeName(f"file name {name!r} refused: expected {STORED_NAME_RULE}")


def open_directory(path: str, *, create: bool = True) -> int:
    """Open ``path`` one component at a time, never following a symlink."""
    if not path.startswith("/"):
        raise StoreError(f"directory {path!r} is not absolute", temporary=False)
    fd = os.open("/", DIR_FLAGS)
    try:
        for part in [p for p in path.split("/") if p]:
            if part in (".", ".."):
                raise StoreError(f"directory {path!r} has a {part!r} component", temporary=False)
            if create:
                try:
                    os.mkdir(part, 0o750, dir_fd=fd)
                    os.fsync(fd)  # the new directory must survive for what is acked in it
                except FileExistsError:
                    pass
            nxt = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise StoreError(
                f"{path}: a component is a symlink or not a directory", temporary=False
            ) from None
        raise StoreError(f"{path}: {exc.strerror}", temporary=_temporary(exc)) from None
    except StoreError:
        os.close(fd)
        raise
    return fd


def _temporary(exc: OSError) -> bool:
    return exc.errno in (
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EIO,
        errno.EAGAIN,
        errno.EMFILE,
        errno.ENFILE,
    )


@dataclass(frozen=True)
class Offered:
    """What the store says to an offer."""

    already_stored: str | None  # the existing file's name, when identical


class Upload:
    """One file being received into ``.dlogd-partial/<sha256>-<size>-<name tag>``."""

    def __init__(self, store: Store, name: str, size: int, sha256: bytes) -> None:
        self.store = store
        self.name = name
        self.size = size
        self.sha256 = sha256
        self.partial = partial_name(name, sha256, size)
        fd = _lock_partial(store.partial_fd, self.partial, create=True)
        assert fd is not None
        self.fd = fd
        try:
            # The offset is read under the lock: nobody else can change it now.
            held = os.fstat(self.fd).st_size
            os.utime(self.fd)  # resumed now: the age limit counts from here
            offset = held if held <= size else 0
            # Resume: the digest runs over the bytes we already hold.
            self.digest = hash_fd(self.fd, offset, store.progress)
            if held != offset:
                os.ftruncate(self.fd, offset)
        except BaseException:
            os.close(self.fd)
            raise
        self.received = offset  # the resume point the sender is told
        self.flushed = offset  # writeback started up to here
        self.stored_as: str | None = None
        self.failure: StoreError | None = None  # set by a commit that could not link it

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.received + len(data) > self.size:
            raise SizeMismatch(f"{self.name}: more bytes than the {self.size} announced")
        self.digest.update(data)
        try:
            view = memoryview(data)
            while view:
                written = os.pwrite(self.fd, view, self.received)
                self.received += written
                view = view[written:]
            if self.received - self.flushed >= WRITEBACK_CHUNK:
                _start_writeback(self.fd, self.flushed, self.received - self.flushed)
                self.flushed = self.received
        except OSError as exc:
            raise StoreError(f"{self.name}: {exc.strerror}", temporary=_temporary(exc)) from None

    @property
    def complete(self) -> bool:
        return self.received == self.size

    def verify(self) -> None:
        """Size and digest, before anything becomes visible."""
        if self.received != self.size:
            self.discard()
            raise SizeMismatch(
                f"{self.name}: {self.received} bytes received, {self.size} announced"
            )
        if self.digest.digest() != self.sha256:
            self.discard()
            raise DigestMismatch(f"{self.name}: SHA-256 of the data does not match the offer")

    def discard(self) -> None:
        # Unlink while the lock is still ours, so the name we remove is our file.
        if self.fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.partial, dir_fd=self.store.partial_fd)
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def partial_name(name: str, sha256: bytes, size: int) -> str:
    """Keyed by what is offered, so a resend resumes; the name is in the key because
    two files of one content may be in flight on one connection at once."""
    tag = hashlib.sha256(name.encode()).hexdigest()[:16]
    return f"{sha256.hex()}-{size}-{tag}"


def _lock_partial(partial_fd: int, name: str, *, create: bool) -> int | None:
    """Open ``name`` and lock it exclusively; None when absent and not created.

    Raises :class:`PartialBusy` while another upload holds it. The name is
    checked to still be the inode we locked: between our open and our lock, its
    holder may have renamed it into place or dropped it, and a lock on that old
    inode would guard nothing.
    """
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    for _ in range(3):
        try:
            fd = os.open(name, flags, 0o640, dir_fd=partial_fd)
        except FileNotFoundError:
            if create:
                raise
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise PartialBusy(name) from None
        except BaseException:
            os.close(fd)
            raise
        held = os.fstat(fd)
        try:
            named = os.stat(name, dir_fd=partial_fd, follow_symlinks=False)
        except FileNotFoundError:
            named = None
        if named is not None and (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino):
            if not stat.S_ISREG(held.st_mode):
                os.close(fd)
                raise StoreError(f"{name}: partial is not a regular file", temporary=False)
            return fd
        os.close(fd)
        if not create:
            return None
    raise PartialBusy(name)


@dataclass(frozen=True)
class PartialUsage:
    """What ``.dlogd-partial/`` holds: partials that hold data, and what a tidy removed."""

    files: int = 0
    bytes: int = 0
    removed: int = 0
    removed_bytes: int = 0

    def __add__(self, other: PartialUsage) -> PartialUsage:
        return PartialUsage(
            self.files + other.files,
            self.bytes + other.bytes,
            self.removed + other.removed,
            self.removed_bytes + other.removed_bytes,
        )


def tidy_partials(directory: str, max_age: float, now: float | None) -> PartialUsage:
    """Remove the partials of ``directory`` nobody can resume, and measure the rest
    (``now`` None: only measure, removing nothing).

    Removed: an empty partial (resuming it is the same as starting afresh) and
    one not written for ``max_age`` seconds (its sender gave up, or changed the
    file). A partial an upload holds (locked) is never touched. Cheap enough to
    run as each receive instance starts: one directory read and a stat per
    partial, and the partials are bounded by the caps this measures for.
    A directory not made yet holds nothing; it is not created here.
    """
    try:
        dir_fd = open_directory(directory, create=False)
    except StoreError:
        return PartialUsage()
    try:
        try:
            partial_fd = os.open(PARTIAL_DIR, DIR_FLAGS, dir_fd=dir_fd)
        except OSError:
            return PartialUsage()
        try:
            return _tidy(partial_fd, max_age, now)
        finally:
            os.close(partial_fd)
    finally:
        os.close(dir_fd)


def _tidy(partial_fd: int, max_age: float, now: float | None) -> PartialUsage:
    """``now`` None: only measure."""
    usage = PartialUsage()
    with os.scandir(partial_fd) as entries:
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode) or (st.st_size == 0 and now is None):
                continue
            stale = now is not None and (st.st_size == 0 or now - st.st_mtime > max_age)
            if stale and _remove_unheld(partial_fd, entry.name, max_age, now or 0.0):
                usage += PartialUsage(removed=1, removed_bytes=st.st_size)
            elif st.st_size:
                usage += PartialUsage(files=1, bytes=st.st_size)
    return usage


def _remove_unheld(partial_fd: int, name: str, max_age: float, now: float) -> bool:
    try:
        fd = _lock_partial(partial_fd, name, create=False)
    except (PartialBusy, OSError):
        return False  # an upload holds it, or it is not ours to judge
    if fd is None:
        return False
    try:
        # Judged again under the lock: its last holder may have written to it.
        st = os.fstat(fd)
        if st.st_size and now - st.st_mtime <= max_age:
            return False
        os.unlink(name, dir_fd=partial_fd)
        return True
    finally:
        os.close(fd)


class Store:
    """One (keyword, sending host) directory on the collector."""

    def __init__(self, directory: str, progress: Callable[[], None] | None = None) -> None:
        self.directory = directory
        self.progress = progress  # called while hashing what is already here
        self.dir_fd = open_directory(directory)
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(PARTIAL_DIR, 0o700, dir_fd=self.dir_fd)
            self.partial_fd = os.open(PARTIAL_DIR, DIR_FLAGS, dir_fd=self.dir_fd)
        except OSError as exc:
            os.close(self.dir_fd)
            raise StoreError(
                f"{directory}/{PARTIAL_DIR}: {exc.strerror}", temporary=_temporary(exc)
            ) from None
        self.pending: list[Upload] = []

    def close(self) -> None:
        for upload in self.pending:
            upload.close()
        os.close(self.partial_fd)
        os.close(self.dir_fd)

    def partial_usage(self) -> PartialUsage:
        """The partials here that hold data (empty ones are transient and bounded
        by the window; they are removed when their connection ends)."""
        try:
            return _tidy(self.partial_fd, 0.0, None)
        except OSError as exc:
            raise StoreError(
                f"{self.directory}: {exc.strerror}", temporary=_temporary(exc)
            ) from None

    def check_space(
        self, name: str, size: int, sha256: bytes, min_free: Amount | None = None
    ) -> None:
        """Refuse, for now (:class:`NoRoom`), an offer whose remaining bytes the file
        system cannot take, or only by leaving less than ``min_free`` free.

        Asked at the offer, so a sender is not made to send the data of a file
        only to hear FAILED at its end (and again on every retry). Counts what
        an unprivileged writer may use (f_bavail) less what the partial of this
        offer already holds; the rule is :func:`dlogd.quota.refusal`, the one
        the client's spool quota uses. Other uploads may still take the room
        meanwhile, so a write can still fail with ENOSPC and is handled where
        it does.
        """
        try:
            held = os.stat(
                partial_name(name, sha256, size), dir_fd=self.partial_fd, follow_symlinks=False
            ).st_size
        except OSError:
            held = 0
        try:
            space = Space.of_fd(self.partial_fd)
        except OSError as exc:
            raise StoreError(
                f"{self.directory}: {exc.strerror}", temporary=_temporary(exc)
            ) from None
        why = refusal(max(size - held, 0), space, min_free=min_free, size=size)
        if why is not None:
            raise NoRoom(name, self.directory, why)

    def holds_partial(self, name: str, size: int, sha256: bytes) -> bool:
        """Is there a partial of this offer to resume (so no new one is needed)?"""
        try:
            st = os.stat(
                partial_name(name, sha256, size), dir_fd=self.partial_fd, follow_symlinks=False
            )
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and st.st_size > 0

    def offer(self, name: str, size: int, sha256: bytes) -> Offered:
        """Is this file here already, partly here, or new?"""
        check_name(name)
        try:
            identical = self._find_identical(name, size, sha256)
            if identical is not None:
                # Its rename may not be durable yet (an instance killed before the
                # directory fsync): make it so before the sender drops its copy.
                os.fsync(self.dir_fd)
                self._drop_partial(name, sha256, size)
                return Offered(identical)
            return Offered(None)
        except OSError as exc:
            raise StoreError(f"{name}: {exc.strerror}", temporary=_temporary(exc)) from None

    def begin(self, name: str, size: int, sha256: bytes) -> Upload:
        """Open (or resume) this file's partial; ``received`` is where its data starts."""
        try:
            upload = Upload(self, name, size, sha256)
        except OSError as exc:
            raise StoreError(f"{name}: {exc.strerror}", temporary=_temporary(exc)) from None
        return upload

    def finish(self, upload: Upload) -> None:
        """Verify a complete upload and queue it for the next :meth:`commit`."""
        upload.verify()
        self.pending.append(upload)

    def commit(self) -> list[Upload]:
        """Make every queued upload durable and visible; returns them, each with
        ``stored_as`` or, for one that could not be linked, ``failure``.

        Raises :class:`StoreError` only when nothing in the batch is durable
        (the data flush or the directory fsync failed).
        """
        if not self.pending:
            return []
        batch, self.pending = self.pending, []
        try:
            try:
                _flush([u.fd for u in batch])
            except OSError as exc:
                raise self._error(exc) from None
            for upload in batch:
                # One file that cannot be linked fails alone: the others landed,
                # and their directory entries still get the fsync below.
                try:
                    upload.stored_as = self._link_into_place(upload)
                except StoreError as exc:
                    upload.failure = exc
                except OSError as exc:
                    upload.failure = StoreError(
                        f"{upload.name}: {exc.strerror}", temporary=_temporary(exc)
                    )
            if any(u.stored_as is not None for u in batch):
                try:
                    os.fsync(self.dir_fd)
                except OSError as exc:
                    raise self._error(exc) from None
        finally:
            for upload in batch:
                upload.close()
        return batch

    def _error(self, exc: OSError) -> StoreError:
        return StoreError(f"{self.directory}: {exc.strerror}", temporary=_temporary(exc))

    def _link_into_place(self, upload: Upload) -> str:
        """Move under the offered name, or the first free conflict name; never replace."""
        for candidate in _candidates(upload.name):
            try:
                _rename_noreplace(self.partial_fd, upload.partial, self.dir_fd, candidate)
                return candidate
            except FileExistsError:
                if self._identical(candidate, upload.size, upload.sha256):
                    # A retry raced a lost ack: already there.
                    upload.discard()
                    return candidate
        raise NameConflict(
            f"{upload.name}: more than {MAX_CONFLICTS} different files under this name"
        )

    def _find_identical(self, name: str, size: int, sha256: bytes) -> str | None:
        for candidate in _candidates(name):
            try:
                st = os.stat(candidate, dir_fd=self.dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                return None  # the first free name ends the chain
            if (
                stat.S_ISREG(st.st_mode)
                and st.st_size == size
                and self._identical(candidate, size, sha256)
            ):
                return candidate
        return None

    def _identical(self, name: str, size: int, sha256: bytes) -> bool:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dir_fd)
        except OSError:
            return False
        try:
            st = os.fstat(fd)
            return (
                stat.S_ISREG(st.st_mode)
                and st.st_size == size
                and hash_fd(fd, size, self.progress).digest() == sha256
            )
        finally:
            os.close(fd)

    def _drop_partial(self, name: str, sha256: bytes, size: int) -> None:
        """Remove a partial made redundant, unless an upload holds it (it will see)."""
        try:
            fd = _lock_partial(self.partial_fd, partial_name(name, sha256, size), create=False)
        except PartialBusy:
            return
        if fd is None:
            return
        try:
            os.unlink(partial_name(name, sha256, size), dir_fd=self.partial_fd)
        finally:
            os.close(fd)


def _candidates(name: str) -> Iterator[str]:
    yield name
    for n in range(1, MAX_CONFLICTS + 1):
        yield conflict_name(name, n)


def _flush(fds: list[int]) -> None:
    """Make file data durable: one syncfs for a batch, fsync for a single file."""
    if len(fds) > 1 and _syncfs(fds[0]):
        return
    for fd in fds:
        os.fsync(fd)


_libc = ctypes.CDLL(None, use_errno=True)
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a big file's data now, so the final fsync finds little left.

    Without it the kernel waits until a tenth of RAM is dirty, and the whole
    file is flushed after its last byte arrives instead of while it streams.
    """
    _libc.sync_file_range(
        fd, ctypes.c_int64(offset), ctypes.c_int64(length), _SYNC_FILE_RANGE_WRITE
    )


_RENAME_NOREPLACE = 1


def _rename_noreplace(src_dir: int, src: str, dst_dir: int, dst: str) -> None:
    """renameat2(RENAME_NOREPLACE): atomic, and never over an existing name.

    Where the file system lacks it, link then unlink gives the same guarantee
    (a crash between them leaves the partial too, which the next offer drops).
    """
    if _libc.renameat2(src_dir, src.encode(), dst_dir, dst.encode(), _RENAME_NOREPLACE) == 0:
        return
    err = ctypes.get_errno()
    if err == errno.EEXIST:
        raise FileExistsError(err, os.strerror(err), dst)
    if err not in (errno.EINVAL, errno.ENOSYS):
        raise OSError(err, os.strerror(err), dst)
    os.link(src, dst, src_dir_fd=src_dir, dst_dir_fd=dst_dir, follow_symlinks=False)
    os.unlink(src, dir_fd=src_dir)


def _syncfs(fd: int) -> bool:
    if _libc.syncfs(fd) == 0:
        return True
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
