"""The shipper's lazy reading of the spool (``ship.Backlog``) over a real spool.

Place in the flow: between ``Spool.pending()`` and the per-collector
``Delivery``: each connection takes entries as its window has room, so the
first offer waits for one entry, not for the backlog (issue 12).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from dlogd.names import entry_basename
from dlogd.ship import Backlog
from dlogd.spool import Entry, SharedSpool, Spool

NOW = 1_700_000_000


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    with Spool(str(tmp_path / "spool"), create=True) as s:
        yield s


def spooled(spool: Spool, tmp_path: Path, count: int, hosts: tuple[str, ...]) -> list[str]:
    names = []
    for n in range(count):
        path = tmp_path / f"f{n:03d}.log"
        path.write_bytes(b"x" * n)
        fd = os.open(path, os.O_RDONLY)
        try:
            names.append(spool.add("audit", fd, entry_basename(os.fsencode(path)), hosts,
                                   now=NOW).name)  # fmt: skip
        finally:
            os.close(fd)
    spool.commit()
    return names


class Counting:
    """An iterator that counts how far it has been read."""

    def __init__(self, entries: Iterator[Entry]) -> None:
        self.entries = entries
        self.read = 0

    def __iter__(self) -> Counting:
        return self

    def __next__(self) -> Entry:
        entry = next(self.entries)
        self.read += 1
        return entry


def test_the_first_entry_is_read_alone_then_the_rest_in_spool_order(
    spool: Spool, tmp_path: Path
) -> None:
    names = spooled(spool, tmp_path, 50, ("logs1",))
    shared = SharedSpool(spool)
    try:
        source = Counting(spool.pending())
        backlog = Backlog(shared, source, ["logs1"], NOW)
        first = backlog.take("logs1")
        assert first is not None and first.name == names[0]
        assert source.read == 1, "the first offer waited for more than one entry"
        rest = iter(lambda: backlog.take("logs1"), None)
        assert [first.name, *(e.name for e in rest)] == sorted(names)
        assert backlog.owed == {"logs1": 50}
    finally:
        shared.close()


def test_an_entry_for_two_collectors_queues_for_both_and_counts_for_one_that_ended(
    spool: Spool, tmp_path: Path
) -> None:
    names = spooled(spool, tmp_path, 5, ("logs1", "logs2"))
    shared = SharedSpool(spool)
    try:
        backlog = Backlog(shared, spool.pending(), ["logs1", "logs2"], NOW)
        assert [backlog.take("logs1").name for _ in range(2)] == names[:2]  # type: ignore[union-attr]
        assert len(backlog.queues["logs2"]) == 2  # read for logs1, waiting for logs2
        backlog.close("logs2")  # its connection failed: the rest is only counted
        while backlog.take("logs1") is not None:
            pass
        assert "logs2" not in backlog.queues
        assert backlog.owed == {"logs1": 5, "logs2": 5}
    finally:
        shared.close()


def test_collectors_not_delivered_to_and_holds_are_counted_not_queued(
    spool: Spool, tmp_path: Path
) -> None:
    names = spooled(spool, tmp_path, 3, ("logs1", "logs2"))
    (held,) = [e for e in spool.pending() if e.name == names[1]]
    spool.hold(held, "logs1", NOW + 3600, "refused: TOO_LARGE")
    shared = SharedSpool(spool)
    try:
        backlog = Backlog(shared, spool.pending(), ["logs1"], NOW)  # logs2 backing off
        taken = list(iter(lambda: backlog.take("logs1"), None))
        assert [e.name for e in taken] == [names[0], names[2]]
        backlog.finish()
        assert backlog.owed == {"logs1": 3, "logs2": 3}
        assert backlog.held == {"logs1": 1}
    finally:
        shared.close()


def test_an_entry_acknowledged_by_all_but_left_by_a_crash_is_ended_after_the_pass(
    spool: Spool, tmp_path: Path
) -> None:
    keep, done = spooled(spool, tmp_path, 2, ("logs1",))
    (tmp_path / "spool/audit/.owed" / done / "logs1").unlink()  # crash after the last ack
    assert spool.cleanup(markers=False) == 0  # the drain's cleanup does not open markers
    assert [e.name for e in spool.pending()] == [keep]
    assert spool.cleanup(markers=False) == 1  # the pass saw it: ended now
    assert sorted(os.listdir(tmp_path / "spool/audit")) == [".owed", ".tmp", keep]
    assert os.listdir(tmp_path / "spool/audit/.owed") == [keep]
