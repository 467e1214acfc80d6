"""The collector's partial uploads stay bounded (issue 9 item 3): what a tidy removes and
what it must never remove."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from dlogd.store import PARTIAL_DIR, PartialUsage, Store, tidy_partials

AGE = 3600.0


def _begin(store: Store, name: str, data: bytes, written: int) -> str:
    upload = store.begin(name, len(data), hashlib.sha256(data).digest())
    upload.write(data[:written])
    upload.close()  # as a broken connection leaves it
    return upload.partial


def _age(directory: Path, partial: str, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(directory / PARTIAL_DIR / partial, (then, then))


def test_a_tidy_removes_what_nobody_can_resume_and_keeps_the_rest(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    data = os.urandom(10_000)
    empty = _begin(store, "empty.log", data, 0)
    stale = _begin(store, "stale.log", data, 4_000)
    young = _begin(store, "young.log", data, 3_000)
    _age(tmp_path, stale, AGE + 60)
    _age(tmp_path, young, AGE - 60)  # still resumable within the age

    usage = tidy_partials(str(tmp_path), AGE, time.time())

    assert usage == PartialUsage(files=1, bytes=3_000, removed=2, removed_bytes=4_000)
    assert os.listdir(tmp_path / PARTIAL_DIR) == [young]
    assert empty != young
    # What is kept still resumes where it stopped.
    again = store.begin("young.log", len(data), hashlib.sha256(data).digest())
    assert again.received == 3_000
    again.close()
    store.close()


def test_a_tidy_never_removes_a_partial_an_upload_holds(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    data = os.urandom(10_000)
    held = store.begin("held.log", len(data), hashlib.sha256(data).digest())
    _age(tmp_path, held.partial, AGE * 10)  # old and empty, but in use
    fresh = store.begin("fresh.log", len(data), hashlib.sha256(data).digest())
    fresh.write(data[:100])
    _age(tmp_path, fresh.partial, AGE * 10)

    usage = tidy_partials(str(tmp_path), AGE, time.time())

    assert (usage.removed, usage.files) == (0, 1)
    assert sorted(os.listdir(tmp_path / PARTIAL_DIR)) == sorted([held.partial, fresh.partial])
    held.write(data)
    store.finish(held)
    [done] = store.commit()
    assert (tmp_path / "held.log").read_bytes() == data and done.failure is None
    fresh.close()
    store.close()


def test_a_directory_not_made_yet_is_left_alone(tmp_path: Path) -> None:
    assert tidy_partials(str(tmp_path / "absent"), AGE, time.time()) == PartialUsage()
    assert not (tmp_path / "absent").exists()
