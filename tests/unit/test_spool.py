"""Spool operations on a real file system: naming, link/copy, markers, acks, cleanup."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dlogd.names import MAX_BASENAME, BadBasename, entry_basename
from dlogd.spool import Added, Entry, Spool

SAFE_RE = re.compile(r"[A-Za-z0-9._+,=@%-]+\Z")
NOW = 1_700_000_000


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    with Spool(str(tmp_path / "spool"), create=True) as s:
        yield s


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def add_file(spool: Spool, path: Path, hosts: tuple[str, ...] = ("logs1",), **kw: bool) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        added = spool.add("audit", fd, entry_basename(os.fsencode(path)), hosts, now=NOW, **kw)
    finally:
        os.close(fd)
    spool.commit()
    return added.name


def unquote(text: str) -> bytes:
    return re.sub(rb"%([0-9A-F]{2})", lambda m: bytes([int(m[1], 16)]), text.encode())


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (b"/var/log/app.log", "app.log"),
        (b"rel/a b", "a%20b"),
        (b"x\ny", "x%0Ay"),
        (b"/t/\xff\xfe.log", "%FF%FE.log"),
        (b"100%", "100%25"),
        (b"/t/.hidden", "%2Ehidden"),
        (b"..x", "%2E.x"),
        (b"dir/name/", "name"),
        (b"a+b,c=d@e-f_g", "a+b,c=d@e-f_g"),
        (b"tab\there", "tab%09here"),
    ],
)
def test_entry_basename_encodes(path: bytes, expected: str) -> None:
    assert entry_basename(path) == expected


@pytest.mark.parametrize("path", [b"", b"/", b".", b"..", b"/a/..", b"a/./", b"//"])
def test_entry_basename_refuses_empty_and_dots(path: bytes) -> None:
    with pytest.raises(BadBasename):
        entry_basename(path)


def test_entry_basename_truncates_without_splitting_escape() -> None:
    long_name = b"a" * 179 + b" " + b"b" * 75  # 255 bytes, an escape straddles byte 180
    encoded = entry_basename(b"/x/" + long_name)
    assert encoded == "a" * 179
    assert len(entry_basename(b"\n" * 255)) == 180  # 60 whole escapes


@given(
    st.binary(min_size=1, max_size=300).filter(lambda b: b"/" not in b and b not in (b".", b".."))
)
def test_entry_basename_is_safe_and_faithful(base: bytes) -> None:
    encoded = entry_basename(b"/dir/" + base)
    assert SAFE_RE.match(encoded)
    assert len(encoded) <= MAX_BASENAME
    assert not encoded.startswith(".")
    assert base.startswith(unquote(encoded))


def test_add_links_same_inode_with_markers(spool: Spool, tmp_path: Path) -> None:
    src = write(tmp_path / "app.log", b"hello\n")
    name = add_file(spool, src, ("logs1", "logs2"))
    assert name == f"{NOW}.app.log"
    stored = tmp_path / "spool" / "audit" / name
    assert stored.stat().st_ino == src.stat().st_ino
    assert sorted(os.listdir(tmp_path / "spool/audit/.owed" / name)) == ["logs1", "logs2"]
    assert list(spool.pending()) == [Entry("audit", name, frozenset({"logs1", "logs2"}), 6)]


def test_same_name_same_second_all_survive(spool: Spool, tmp_path: Path) -> None:
    names = [add_file(spool, _fresh(tmp_path, i)) for i in range(3)]
    assert names == [f"{NOW}.same.log", f"{NOW}-1.same.log", f"{NOW}-2.same.log"]
    contents = [(tmp_path / "spool/audit" / n).read_bytes() for n in names]
    assert contents == [b"content 0", b"content 1", b"content 2"]


def _fresh(tmp_path: Path, i: int) -> Path:
    d = tmp_path / f"d{i}"
    d.mkdir()
    return write(d / "same.log", f"content {i}".encode())


def test_other_file_system_is_copied(spool: Spool, tmp_path: Path) -> None:
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        src = write(Path(shm) / "shm.log", b"x" * 100_000)
        name = add_file(spool, src)
        stored = tmp_path / "spool/audit" / name
        assert stored.stat().st_dev != src.stat().st_dev
        src.write_bytes(b"changed")  # a copy is a snapshot
    assert stored.read_bytes() == b"x" * 100_000
    assert os.listdir(tmp_path / "spool/audit/.tmp") == []


@pytest.mark.parametrize("o_tmpfile", [True, False])
def test_copy_flag_copies_on_same_file_system(
    spool: Spool, tmp_path: Path, o_tmpfile: bool
) -> None:
    spool.use_o_tmpfile = o_tmpfile
    src = write(tmp_path / "c.log", b"data")
    name = add_file(spool, src, copy=True)
    stored = tmp_path / "spool/audit" / name
    assert stored.stat().st_ino != src.stat().st_ino
    assert stored.read_bytes() == b"data"
    assert stored.stat().st_mode & 0o777 == 0o600
    assert os.listdir(tmp_path / "spool/audit/.tmp") == []


def test_link_changes_with_file_copy_does_not(spool: Spool, tmp_path: Path) -> None:
    src = write(tmp_path / "l.log", b"v1")
    linked = add_file(spool, src)
    copied = add_file(spool, src, copy=True)
    src.write_bytes(b"v2")
    assert (tmp_path / "spool/audit" / linked).read_bytes() == b"v2"
    assert (tmp_path / "spool/audit" / copied).read_bytes() == b"v1"


def test_acknowledge_per_host(spool: Spool, tmp_path: Path) -> None:
    name = add_file(spool, write(tmp_path / "a.log", b"a"), ("h1", "h2"))
    (entry,) = spool.pending()
    spool.acknowledge(entry, "h1")
    spool.commit()
    assert [e.owed for e in spool.pending()] == [frozenset({"h2"})]
    spool.acknowledge(entry, "h1")  # a repeated ack is harmless
    spool.acknowledge(entry, "h2")
    spool.commit()
    assert list(spool.pending()) == []
    assert not (tmp_path / "spool/audit" / name).exists()
    assert os.listdir(tmp_path / "spool/audit/.owed") == []
    assert (tmp_path / "a.log").read_bytes() == b"a"  # the caller's file is untouched


def test_open_entry_reads_content(spool: Spool, tmp_path: Path) -> None:
    add_file(spool, write(tmp_path / "r.log", b"read me"))
    (entry,) = spool.pending()
    fd = spool.open_entry(entry)
    try:
        assert os.read(fd, 100) == b"read me"
    finally:
        os.close(fd)


def test_cleanup_removes_crash_leftovers(spool: Spool, tmp_path: Path) -> None:
    keep = add_file(spool, write(tmp_path / "keep.log", b"k"))
    kw = tmp_path / "spool/audit"
    (kw / ".owed/123.orphan/logs1").parent.mkdir()
    (kw / ".owed/123.orphan/logs1").touch()
    (kw / ".owed/.new-1-2").mkdir()
    (kw / ".owed/.new-1-2/logs1").touch()
    (kw / ".tmp/99-1").write_bytes(b"half")
    done = add_file(spool, write(tmp_path / "done.log", b"d"))
    (kw / ".owed" / done / "logs1").unlink()  # crash after the last ack, before unlink
    assert spool.cleanup() == 4
    assert sorted(os.listdir(kw)) == [".owed", ".tmp", keep]
    assert os.listdir(kw / ".owed") == [keep]
    assert os.listdir(kw / ".tmp") == []
    assert [e.name for e in spool.pending()] == [keep]


def test_entry_without_markers_is_owed_to_configured_hosts(spool: Spool, tmp_path: Path) -> None:
    name = add_file(spool, write(tmp_path / "m.log", b"m"))
    (tmp_path / "spool/audit/.owed" / name / "logs1").unlink()
    (tmp_path / "spool/audit/.owed" / name).rmdir()
    assert list(spool.pending()) == []  # no hosts known: kept, not shipped, not deleted
    assert (tmp_path / "spool/audit" / name).exists()
    (entry,) = spool.pending({"audit": ["a", "b"]})
    assert entry.owed == frozenset({"a", "b"})
    assert sorted(os.listdir(tmp_path / "spool/audit/.owed" / name)) == ["a", "b"]


def test_planted_symlinks_are_not_followed(spool: Spool, tmp_path: Path) -> None:
    secret = write(tmp_path / "secret", b"root only")
    outside = tmp_path / "outside"
    outside.mkdir()
    add_file(spool, write(tmp_path / "x.log", b"x"))
    kw = tmp_path / "spool/audit"
    (kw / "1.evil").symlink_to(secret)
    (kw / ".owed/1.evil").mkdir()
    (kw / ".owed/1.evil/logs1").touch()
    (tmp_path / "spool/linked").symlink_to(outside)
    assert [e.name for e in spool.pending()] == [f"{NOW}.x.log"]
    with pytest.raises(OSError):
        spool.open_entry(Entry("audit", "1.evil", frozenset({"logs1"}), 0))
    fd = os.open(tmp_path / "x.log", os.O_RDONLY)
    try:
        with pytest.raises(OSError):
            spool.add("linked", fd, "x.log", ["logs1"], now=NOW)
    finally:
        os.close(fd)
    assert os.listdir(outside) == []
    assert secret.read_bytes() == b"root only"


def test_symlinked_owed_dir_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    kw = tmp_path / "spool/audit"
    kw.mkdir(parents=True)
    (kw / ".owed").symlink_to(outside)
    src = write(tmp_path / "s.log", b"s")
    with Spool(str(tmp_path / "spool")) as spool, pytest.raises(OSError):
        add_file(spool, src)
    assert os.listdir(outside) == []


@pytest.mark.parametrize("basename", ["../x", ".hidden", "a/b", "", "x" * 181])
def test_add_refuses_unencoded_names(spool: Spool, tmp_path: Path, basename: str) -> None:
    fd = os.open(write(tmp_path / "f", b""), os.O_RDONLY)
    try:
        with pytest.raises(ValueError):
            spool.add("audit", fd, basename, ["logs1"])
    finally:
        os.close(fd)


@pytest.mark.parametrize("hosts", [[], ["../etc"], [".h"], ["a/b"]])
def test_add_refuses_bad_hosts(spool: Spool, tmp_path: Path, hosts: list[str]) -> None:
    fd = os.open(write(tmp_path / "f", b""), os.O_RDONLY)
    try:
        with pytest.raises(ValueError):
            spool.add("audit", fd, "f", hosts)
    finally:
        os.close(fd)
    assert list(spool.pending()) == []


def test_deleted_source_is_copied(spool: Spool, tmp_path: Path) -> None:
    src = write(tmp_path / "gone.log", b"still here")
    fd = os.open(src, os.O_RDONLY)
    try:
        src.unlink()  # nlink 0: linkat fails with ENOENT, the copy path takes over
        added = spool.add("audit", fd, "gone.log", ["logs1"], now=NOW)
    finally:
        os.close(fd)
    assert added.copied
    assert (tmp_path / "spool/audit" / added.name).read_bytes() == b"still here"


def test_announce_fires_close_write_on_the_trigger_file(tmp_path: Path) -> None:
    """Each announce is a write-open of <spool>/.submitted, also when it already exists."""
    import ctypes
    import select
    import struct

    from dlogd.spool import TRIGGER

    in_close_write = 0x00000008
    libc = ctypes.CDLL(None, use_errno=True)
    spool = Spool(str(tmp_path / "spool"), create=True)
    spool.announce()  # creates the file; now watch it as systemd would
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert fd >= 0
    try:
        path = str(tmp_path / "spool" / TRIGGER).encode()
        assert libc.inotify_add_watch(fd, path, in_close_write) >= 0
        spool.announce()
        assert select.select([fd], [], [], 2)[0], "no inotify event"
        _wd, mask, _cookie, _len = struct.unpack("iIII", os.read(fd, 4096)[:16])
        assert mask & in_close_write
    finally:
        os.close(fd)
        spool.close()


def test_a_drain_takes_the_announcement_and_the_next_submit_makes_it_again(
    tmp_path: Path,
) -> None:
    """dlogd-ship.path (PathExists=) starts a drain again only for what came since."""
    from dlogd.spool import TRIGGER

    spool = Spool(str(tmp_path / "spool"), create=True)
    trigger = tmp_path / "spool" / TRIGGER
    try:
        spool.take_announcement()  # none yet: not an error
        spool.announce()
        assert trigger.exists()
        spool.take_announcement()
        assert not trigger.exists()
        add_file(spool, write(tmp_path / "x.log", b"x"))
        spool.announce()
        assert trigger.exists()
    finally:
        spool.close()


def test_hold_keeps_the_entry_owed_and_says_why(spool: Spool, tmp_path: Path) -> None:
    name = add_file(spool, write(tmp_path / "x.log", b"x"), hosts=("logs1", "logs2"))
    (entry,) = spool.pending()
    spool.hold(entry, "logs1", 5000.0, "refused: TOO_LARGE")
    (entry,) = spool.pending()
    assert (entry.name, entry.owed, entry.held) == (
        name,
        frozenset({"logs1", "logs2"}),
        frozenset({"logs1"}),
    )
    assert spool.held_until(entry, "logs1") == (5000.0, "refused: TOO_LARGE")
    assert spool.held_until(entry, "logs2") == (0.0, "")


def test_held_entry_is_removed_once_every_host_has_it(spool: Spool, tmp_path: Path) -> None:
    add_file(spool, write(tmp_path / "x.log", b"x"), hosts=("logs1",))
    (entry,) = spool.pending()
    spool.hold(entry, "logs1", 5000.0, "refused")
    # A hold being written when a crash came leaves a dot file: it is not a host.
    owed = tmp_path / "spool" / "audit" / ".owed" / entry.name
    (owed / ".logs1.hold").write_text("{")
    spool.acknowledge(entry, "logs1")  # e.g. the operator raised the limit
    spool.commit()
    assert list(spool.pending()) == []
    assert not (tmp_path / "spool" / "audit" / entry.name).exists()
    spool.cleanup()
    assert not owed.exists()


def test_every_host_a_client_config_accepts_can_be_owed(spool: Spool, tmp_path: Path) -> None:
    """``host "::1"`` passed check-config, then every submit failed as INTERNAL (issue 13)."""
    from dlogd import config
    from dlogd.config import ClientConfig, ClientKeyword, Host

    written = ClientConfig(
        keywords={"audit": ClientKeyword("audit", frozenset({0}), frozenset(), ("::1",))},
        hosts={"::1": Host("::1", "::1")},
    )
    path = tmp_path / "client.conf"
    path.write_text(config.to_text(written))
    checked = config.check(str(path), "client")
    assert checked.warnings == ()
    assert isinstance(checked.config, ClientConfig)
    hosts = checked.config.keywords["audit"].hosts

    name = add_file(spool, write(tmp_path / "x.log", b"x"), hosts=hosts)

    (entry,) = spool.pending()
    assert (entry.name, entry.owed) == (name, frozenset({"::1"}))
    spool.acknowledge(entry, "::1")
    spool.commit()
    assert list(spool.pending()) == []


def test_a_failing_acknowledgement_fails_the_commit_instead_of_hanging(
    spool: Spool, tmp_path: Path
) -> None:
    """The ack worker caught only OSError: a ValueError killed it and commit() waited forever."""
    import threading

    from dlogd.spool import SharedSpool

    add_file(spool, write(tmp_path / "x.log", b"x"))
    (entry,) = spool.pending()
    shared = SharedSpool(spool)
    shared.acknowledge(entry, "../not-a-host")  # Spool.acknowledge raises ValueError
    shared.acknowledge(entry, "logs1")  # queued behind it, for a worker that is gone
    raised: list[BaseException] = []

    def commit() -> None:
        try:
            shared.commit()
        except Exception as exc:
            raised.append(exc)

    committer = threading.Thread(target=commit, daemon=True)
    committer.start()
    committer.join(30)  # a guard against the hang, not a measurement
    assert not committer.is_alive(), "commit() hung on a dead acknowledgement worker"
    assert [type(e).__name__ for e in raised] == ["AcknowledgementFailed"]
    assert "../not-a-host" in str(raised[0])
    # Nothing after the failure was applied: the entry is still owed, to be sent again.
    (still,) = spool.pending()
    assert still.owed == {"logs1"}


# -- a resubmit after an unknown outcome (issue 9 item 2) ------------------------------

UID = 1000


def submit(
    spool: Spool, path: Path, *, uid: int = UID, keyword: str = "audit", copy: bool = False
) -> Added:
    fd = os.open(path, os.O_RDONLY)
    try:
        added = spool.add(
            keyword,
            fd,
            entry_basename(os.fsencode(path)),
            ("logs1",),
            copy=copy,
            now=NOW,
            caller=uid,
        )
    finally:
        os.close(fd)
    spool.commit()
    return added


def entries(spool_root: Path, keyword: str = "audit") -> list[str]:
    return sorted(p.name for p in (spool_root / keyword).iterdir() if not p.name.startswith("."))


@pytest.mark.parametrize("copy", [False, True], ids=["linked", "copied"])
def test_resubmit_of_the_same_unchanged_file_gets_the_pending_entry(
    spool: Spool, tmp_path: Path, copy: bool
) -> None:
    src = write(tmp_path / "app.log", b"one file, submitted twice\n")
    first = submit(spool, src, copy=copy)
    again = submit(spool, src, copy=copy)
    assert (again.name, again.size, again.copied) == (first.name, first.size, first.copied)
    assert (first.resubmit, again.resubmit) == (False, True)
    assert entries(tmp_path / "spool") == [first.name]
    assert [e.owed for e in spool.pending()] == [frozenset({"logs1"})]


def test_other_file_system_resubmit_gets_the_copy(spool: Spool, tmp_path: Path) -> None:
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        src = write(Path(shm) / "shm.log", b"x" * 10_000)
        first = submit(spool, src)
        again = submit(spool, src)
    assert first.copied and again.resubmit and again.name == first.name
    assert entries(tmp_path / "spool") == [first.name]


def test_changed_file_other_caller_or_keyword_is_a_new_entry(spool: Spool, tmp_path: Path) -> None:
    src = write(tmp_path / "app.log", b"v1")
    first = submit(spool, src, copy=True)
    assert not submit(spool, src, uid=UID + 1, copy=True).resubmit
    assert not submit(spool, src, keyword="other", copy=True).resubmit
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched: a new version
    touched = submit(spool, src, copy=True)
    assert not touched.resubmit and touched.name != first.name
    src.write_bytes(b"v2 longer")
    assert not submit(spool, src, copy=True).resubmit
    assert len(entries(tmp_path / "spool")) == 4


def test_copied_source_whose_ctime_moved_is_a_new_entry(spool: Spool, tmp_path: Path) -> None:
    src = write(tmp_path / "app.log", b"v1")
    first = submit(spool, src, copy=True)
    os.chmod(src, 0o640)  # same inode, size and mtime; ctime moved
    assert not submit(spool, src, copy=True).resubmit
    assert submit(spool, src, copy=True).name != first.name


def test_delivered_entry_leaves_no_index_behind(spool: Spool, tmp_path: Path) -> None:
    src = write(tmp_path / "app.log", b"data")
    first = submit(spool, src)
    assert len(os.listdir(tmp_path / "spool/audit/.ident")) == 2  # the key and the way back
    (entry,) = spool.pending()
    spool.acknowledge(entry, "logs1")
    spool.commit()
    assert os.listdir(tmp_path / "spool/audit/.owed") == []
    assert os.listdir(tmp_path / "spool/audit/.ident") == []
    assert entries(tmp_path / "spool") == []
    # Once delivered, the spool no longer knows it: a later submit is a new entry.
    assert not submit(spool, src).resubmit
    assert first.name in entries(tmp_path / "spool")  # the name was free again


def test_markers_stay_one_file_per_host(spool: Spool, tmp_path: Path) -> None:
    added = submit(spool, write(tmp_path / "app.log", b"data"))
    assert os.listdir(tmp_path / "spool/audit/.owed" / added.name) == ["logs1"]


def test_index_without_its_entry_matches_nothing_and_cleanup_drops_it(
    spool: Spool, tmp_path: Path
) -> None:
    src = write(tmp_path / "app.log", b"data")
    first = submit(spool, src, copy=True)
    ident = tmp_path / "spool/audit/.ident"
    (tmp_path / "spool/audit" / first.name).unlink()  # a crash after the claim, before the link
    os.symlink("x", ident / ".new-1-2")  # a crash while replacing a link
    again = submit(spool, src, copy=True)
    assert not again.resubmit and again.name != first.name
    assert spool.cleanup() == 1  # the orphan claim (its links go with it)
    links = {p.name: os.readlink(p) for p in ident.iterdir()}
    assert sorted(links) == sorted([f"@{again.name}", links[f"@{again.name}"]])
    assert links[links[f"@{again.name}"]].startswith(f"{again.name} ")
    assert submit(spool, src, copy=True).name == again.name


def test_a_reused_name_does_not_take_an_old_record(spool: Spool, tmp_path: Path) -> None:
    """A stale key link naming an entry that now belongs to another file finds nothing."""
    a = submit(spool, write(tmp_path / "a.log", b"a"), copy=True)
    b = submit(spool, write(tmp_path / "b.log", b"b"), copy=True)
    ident = tmp_path / "spool/audit/.ident"
    key_a = os.readlink(ident / f"@{a.name}")
    record_a = os.readlink(ident / key_a).partition(" ")[2]
    (ident / key_a).unlink()
    os.symlink(f"{b.name} {record_a}", ident / key_a)  # as if a.log had been spooled as b's name
    assert not submit(spool, tmp_path / "a.log", copy=True).resubmit


def test_cleanup_drops_a_way_back_link_without_its_entry(spool: Spool, tmp_path: Path) -> None:
    first = submit(spool, write(tmp_path / "a.log", b"a"), copy=True)
    ident = tmp_path / "spool/audit/.ident"
    (entry,) = spool.pending()
    os.symlink("stale", ident / "@x")  # what a crash mid removal could leave
    spool.acknowledge(entry, "logs1")
    spool.commit()
    spool.cleanup()
    assert os.listdir(ident) == []
    assert first.name not in entries(tmp_path / "spool")
