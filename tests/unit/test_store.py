"""The collector's storage: nothing half-written visible, retries harmless, no symlinks."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from dlogd.store import PARTIAL_DIR, Mismatch, Store, StoreError, UnsafeName, check_name


def _sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _store_file(store: Store, name: str, data: bytes) -> str:
    offered = store.offer(name, len(data), _sha(data))
    assert offered.already_stored is None
    upload = store.begin(name, len(data), _sha(data))
    upload.write(data[upload.received :])
    store.finish(upload)
    [done] = store.commit()
    assert done.stored_as is not None
    return done.stored_as


def _visible(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.name != PARTIAL_DIR}


def test_stored_file_appears_only_after_commit(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "web1" / "audit"))
    data = b"line\n" * 1000
    upload = store.begin("1.audit.log", len(data), _sha(data))
    upload.write(data)
    store.finish(upload)
    assert _visible(tmp_path / "web1" / "audit") == {}
    [done] = store.commit()
    assert done.stored_as == "1.audit.log"
    assert _visible(tmp_path / "web1" / "audit") == {"1.audit.log": data}
    assert os.listdir(tmp_path / "web1" / "audit" / PARTIAL_DIR) == []


def test_identical_resend_is_already_stored(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    data = os.urandom(5000)
    _store_file(store, "a.log", data)
    offered = store.offer("a.log", len(data), _sha(data))
    assert offered.already_stored == "a.log"
    assert _visible(tmp_path) == {"a.log": data}


def test_different_file_under_taken_name_is_kept_beside_it(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    first, second = b"first\n", b"second\n"
    assert _store_file(store, "a.log", first) == "a.log"
    assert _store_file(store, "a.log", second) == "a.log.conflict-1"
    # And the second one, resent, is recognised under its conflict name.
    assert store.offer("a.log", len(second), _sha(second)).already_stored == "a.log.conflict-1"
    assert _visible(tmp_path) == {"a.log": first, "a.log.conflict-1": second}


def test_interrupted_upload_resumes_from_held_bytes(tmp_path: Path) -> None:
    data = os.urandom(100_000)
    store = Store(str(tmp_path))
    upload = store.begin("big", len(data), _sha(data))
    upload.write(data[:40_000])
    upload.close()  # the connection died here
    store.close()

    store = Store(str(tmp_path))
    assert store.offer("big", len(data), _sha(data)).already_stored is None
    upload = store.begin("big", len(data), _sha(data))
    assert upload.received == 40_000
    upload.write(data[40_000:])
    store.finish(upload)
    store.commit()
    assert _visible(tmp_path) == {"big": data}


def test_wrong_digest_is_refused_and_nothing_visible(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    data = b"payload"
    upload = store.begin("x", len(data), _sha(b"something else"))
    upload.write(data)
    with pytest.raises(Mismatch, match="SHA-256"):
        store.finish(upload)
    assert store.commit() == []
    assert _visible(tmp_path) == {}
    assert os.listdir(tmp_path / PARTIAL_DIR) == []


def test_short_and_long_data_refused(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    data = b"0123456789"
    short = store.begin("s", len(data), _sha(data))
    short.write(data[:5])
    with pytest.raises(Mismatch, match="5 bytes received, 10 announced"):
        store.finish(short)
    long = store.begin("l", 4, _sha(data[:4]))
    with pytest.raises(Mismatch, match="more bytes"):
        long.write(data)
    long.discard()
    assert _visible(tmp_path) == {}


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        ".hidden",
        "a/b",
        "nul\0byte",
        "x" * 300,
        "",
        "new\nline",
        "tab\tname",
        "é",
        "-rf",  # an option to whatever tool later meets the name unquoted
    ],
)
def test_hostile_names_refused(tmp_path: Path, name: str) -> None:
    store = Store(str(tmp_path))
    with pytest.raises(UnsafeName):
        store.offer(name, 1, _sha(b"x"))
    with pytest.raises(UnsafeName):
        check_name(name)


def test_symlink_in_directory_path_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(StoreError, match="symlink"):
        Store(str(tmp_path / "link" / "audit"))
    assert not (tmp_path / "real" / "audit").exists()


def test_symlink_at_target_name_never_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    (store_dir / "a.log").symlink_to(victim)
    store = Store(str(store_dir))
    data = b"new data"
    assert _store_file(store, "a.log", data) == "a.log.conflict-1"
    assert victim.read_bytes() == b"keep me"
    assert (store_dir / "a.log").is_symlink()


def test_batch_commit_makes_all_visible(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    files = {f"{i}.log": os.urandom(100 + i) for i in range(20)}
    for name, data in files.items():
        upload = store.begin(name, len(data), _sha(data))
        upload.write(data)
        store.finish(upload)
    done = store.commit()
    assert sorted(u.stored_as or "" for u in done) == sorted(files)
    assert _visible(tmp_path) == files


def test_empty_file(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    assert _store_file(store, "empty", b"") == "empty"
    assert _visible(tmp_path) == {"empty": b""}


def test_a_partial_held_by_one_upload_is_refused_to_another(tmp_path: Path) -> None:
    """Two connections carrying one file at once: the second must not share the partial.

    It used to be told "resume at N", truncate the partial to N under the first
    upload's feet, and the first renamed a file with a hole into place.
    """
    data = os.urandom(300_000)
    first_store, second_store = Store(str(tmp_path)), Store(str(tmp_path))
    first = first_store.begin("big", len(data), _sha(data))
    first.write(data[:100_000])
    with pytest.raises(StoreError) as refused:
        second_store.begin("big", len(data), _sha(data))
    assert refused.value.temporary and "another connection" in str(refused.value)
    # The identical-file check of an offer must not drop a partial in use either.
    assert second_store.offer("big", len(data), _sha(data)).already_stored is None
    first.write(data[100_000:])
    first_store.finish(first)
    first_store.commit()
    assert _visible(tmp_path) == {"big": data}
    # Once the first is done the file is simply there.
    assert second_store.offer("big", len(data), _sha(data)).already_stored == "big"
    first_store.close()
    second_store.close()


def test_a_partial_released_by_a_dead_upload_resumes(tmp_path: Path) -> None:
    data = os.urandom(50_000)
    store = Store(str(tmp_path))
    upload = store.begin("f", len(data), _sha(data))
    upload.write(data[:20_000])
    upload.close()  # the lock goes with the descriptor, as when a process dies
    again = Store(str(tmp_path)).begin("f", len(data), _sha(data))
    assert again.received == 20_000
    again.close()


def test_a_failure_in_a_group_commit_keeps_the_files_that_landed(tmp_path: Path) -> None:
    """One file of a batch cannot be linked (its partial vanished): the others are
    still stored and reported, and that one alone carries the failure (issue 9 item 4:
    it used to raise out of commit before the directory fsync, failing the batch)."""
    store = Store(str(tmp_path))
    files = {"a.log": b"first\n", "b.log": b"second\n", "c.log": b"third\n"}
    uploads = {}
    for name, data in files.items():
        upload = store.begin(name, len(data), _sha(data))
        upload.write(data)
        store.finish(upload)
        uploads[name] = upload
    os.unlink(tmp_path / PARTIAL_DIR / uploads["b.log"].partial)

    done = store.commit()

    outcome = {u.name: (u.stored_as, u.failure is not None) for u in done}
    assert outcome == {"a.log": ("a.log", False), "b.log": (None, True), "c.log": ("c.log", False)}
    assert _visible(tmp_path) == {"a.log": b"first\n", "c.log": b"third\n"}
    store.close()
