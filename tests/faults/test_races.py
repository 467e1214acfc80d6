"""Races on one file: two drains of one spool, one file on two connections at once.

The silent corruption these guard against: a second connection offering a
file that a first is still uploading was told "resume at N", truncated the
shared partial to N under the first upload, and the first renamed a file
with a zero-filled hole into place (its digest ran over the bytes in memory).
Each test pauses the first shipper with SIGSTOP once its partial is on disk,
so the overlap is certain, not a matter of timing, and then checks the bytes
stored on disk against the source.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.shipharness import (
    EX_TEMPFAIL,
    Site,
    Target,
    partials,
    pki_set,
    random_file,
    retry_state,
    sha256_of,
    ship,
    site,
    spool_entries,
    spool_files,
    start_ship,
    visible_files,
    wait_for,
    wait_until_unheld,
    write_client_config,
)
from tests.tlsfixtures import COLLECTOR

pytestmark = [pytest.mark.faults, pytest.mark.slow]

__all__ = ["pki_set", "site"]  # fixtures, re-exported for pytest

MB = 1 << 20


def _partial_bytes(directory: Path) -> int:
    total = 0
    for name in partials(directory):
        try:
            total += (directory / ".dlogd-partial" / name).stat().st_size
        except FileNotFoundError:
            continue
    return total


def _paused_mid_upload(site: Site, source: Path) -> subprocess.Popen[bytes]:
    """A shipper sending ``source`` to the collector, stopped once part of it is stored."""
    proc = start_ship(site.root / "client.conf", site.cache)
    wait_for(lambda: _partial_bytes(site.store_dir()) >= 8 * MB, 60, "the upload to start")
    proc.send_signal(signal.SIGSTOP)
    return proc


def _resume(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err.decode(errors="replace")


def test_a_second_drain_of_one_spool_leaves_it_to_the_first(site: Site) -> None:
    collector = site.start(activated=True, timeout=30)
    site.client_config([Target(COLLECTOR, collector.port)], timeout=30)
    source = random_file(site.root / "big.log", 64 * MB)
    (entry,) = site.add(source)
    first = _paused_mid_upload(site, source)
    try:
        second = site.ship()
    finally:
        code, err = _resume(first)

    assert second.returncode == 0, second.stderr
    assert "another dlogd-ship is draining" in second.stderr, second.stderr
    assert str(first.pid) in second.stderr  # says which run holds the spool
    assert code == 0, err
    assert visible_files(site.store_dir()) == [entry]
    assert sha256_of(site.store_dir() / entry) == sha256_of(source)
    assert spool_entries(site.spool) == []


def test_one_file_on_two_connections_at_once_is_stored_intact(site: Site) -> None:
    """Two spools (so no drain lock between them) owe the same entry to one collector."""
    collector = site.start(activated=True, timeout=30)
    site.client_config([Target(COLLECTOR, collector.port)], timeout=30)
    source = random_file(site.root / "big.log", 64 * MB)
    when = time.time()
    (entry,) = site.add(source, now=when)
    other_spool = site.root / "spool2"
    (same,) = spool_files(other_spool, [source], [COLLECTOR], now=when)
    assert same == entry
    other = write_client_config(
        site.root / "client2.conf",
        spool=other_spool,
        tls=site.pki.tls(site.pki.fleet.sender),
        targets=[Target(COLLECTOR, collector.port)],
        timeout=30,
    )

    first = _paused_mid_upload(site, source)
    try:
        held = _partial_bytes(site.store_dir())
        second = ship(other, site.cache)
        # The second connection was refused for now, and left the first's partial alone.
        assert second.returncode == EX_TEMPFAIL, second.stderr
        assert "TEMPORARY_FAILURE" in second.stderr
        assert "another connection is uploading this file" in second.stderr
        assert _partial_bytes(site.store_dir()) >= held
        assert spool_entries(other_spool) == [entry]
    finally:
        code, err = _resume(first)

    assert code == 0, err
    assert visible_files(site.store_dir()) == [entry]
    assert sha256_of(site.store_dir() / entry) == sha256_of(source)
    # Its retry now finds the file and stores nothing twice. The refusal held that
    # one file for now, not the collector (issue 14): no backoff to wait out.
    assert retry_state(other_spool, COLLECTOR) is None
    wait_until_unheld(other_spool, COLLECTOR)
    again = ship(other, site.cache)
    assert again.returncode == 0, again.stderr
    assert "already stored" in again.stderr
    assert visible_files(site.store_dir()) == [entry]
    assert spool_entries(other_spool) == []
    assert partials(site.store_dir()) == []
