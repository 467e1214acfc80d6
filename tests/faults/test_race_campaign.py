"""Races the campaign adds to test_races.py: overlap by a slow link, and a resubmit after silence.

* The same large file on two connections at once, with the overlap made by
  an ``htb``-limited link (tests/faults/netfaults.py) rather than by pausing
  one shipper: two spools owe the same entry, both shippers start together,
  and the stored bytes are hashed afterwards.
* Two drains of one spool over that slow link: the second leaves it to the
  first, and the first's copy is intact.
* A client that gets no answer (it died, or gave up waiting) after the submit
  service committed its batch, and submits the same unchanged files again:
  "retries are harmless" says each file is stored once (issue 9 item 2: the
  spool answers a resubmit with the pending entry).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from tests.faults.campaign import (
    RETRY_POLICY,
    Ledger,
    audit,
    drain,
    partial_bytes,
    pending_entries,
    stop_service,
    submit_files,
    submit_service,
    wait_until,
    write_random,
)
from tests.faults.netfaults import COLLECTOR_IP, PORT, SHIPPER_IP, Link, finish_ship, network
from tests.shipharness import (
    EX_TEMPFAIL,
    KEYWORD,
    REPO,
    ShipRun,
    Site,
    Target,
    pki_set,
    sha256_of,
    site,
    spool_files,
    write_client_config,
)
from tests.tlsfixtures import COLLECTOR, SENDER

pytestmark = [pytest.mark.faults, pytest.mark.slow]

__all__ = ["pki_set", "site"]

MB = 1 << 20


@pytest.fixture
def link() -> Iterator[Link]:
    with network(("r",)) as links:
        yield links[0]


def _ship_in(link: Link, config: Path, cache: Path) -> ShipRun:
    return finish_ship(link.start_ship(config, cache), 180)


def _slow_world(site: Site, link: Link) -> Path:
    link.rate_limit("100mbit")
    server = site.server_config(senders={SENDER: SHIPPER_IP}, timeout=30)
    link.start_collector(server, site.root)
    return site.client_config(
        [Target(COLLECTOR, PORT, address=COLLECTOR_IP)], retry=RETRY_POLICY, timeout=30
    )


def test_same_large_file_on_two_connections_over_a_slow_link(site: Site, link: Link) -> None:
    config = _slow_world(site, link)
    source = write_random(random.Random(9), site.root / "big.log", 48 * MB)
    when = time.time()
    (entry,) = site.add(source, now=when)
    other_spool = site.root / "spool2"
    assert spool_files(other_spool, [source], [COLLECTOR], now=when) == [entry]
    other = write_client_config(
        site.root / "client2.conf",
        spool=other_spool,
        tls=site.pki.tls(site.pki.fleet.sender),
        targets=[Target(COLLECTOR, PORT, address=COLLECTOR_IP)],
        retry=RETRY_POLICY,
        timeout=30,
    )
    first = link.start_ship(config, site.cache)
    wait_until(lambda: partial_bytes(site.store_dir()) > 0, 60, "the first upload to start")
    second = link.start_ship(other, site.cache)
    runs = [finish_ship(first, 180), finish_ship(second, 180)]

    # The overlap happened: one of them was told to come back later.
    assert sorted(r.returncode for r in runs) == [0, EX_TEMPFAIL], [r.stderr for r in runs]
    assert any("another connection is uploading this file" in r.stderr for r in runs)
    # Both spools then drain, and the file is stored once with the source's bytes.
    for spool, conf in ((site.spool, config), (other_spool, other)):
        drain(site, conf, spool=spool, runner=partial(_ship_in, link, conf, site.cache))
    ledger = Ledger()
    ledger.acknowledge_entries([entry], [sha256_of(source)])
    found = audit(ledger, site)
    assert found.problems() == {}, found
    assert pending_entries(other_spool) == []


def test_two_drains_of_one_spool_over_a_slow_link(site: Site, link: Link) -> None:
    config = _slow_world(site, link)
    rng = random.Random(10)
    paths = [write_random(rng, site.root / f"f{i}.log", 12 * MB) for i in range(3)]
    ledger = Ledger()
    ledger.acknowledge_entries(site.add(*paths), [sha256_of(p) for p in paths])
    first = link.start_ship(config, site.cache)
    wait_until(lambda: partial_bytes(site.store_dir()) > 0, 60, "the first drain to send")
    second = finish_ship(link.start_ship(config, site.cache), 60)
    done = finish_ship(first, 180)

    assert second.returncode == 0 and "another dlogd-ship is draining" in second.stderr
    assert done.returncode == 0, done.stderr
    found = audit(ledger, site)
    assert found.problems() == {}, found


# --- a resubmit after an unknown outcome ---------------------------------------------------


CLIENT = """
import sys
from dlogd.client import submit_many
submit_many(sys.argv[2:], sys.argv[1], socket_path={socket!r}, timeout=60)
"""


def test_resubmit_after_an_unknown_outcome_stores_each_file_once(site: Site) -> None:
    collector = site.start(activated=True)
    config = site.client_config([Target(COLLECTOR, collector.port)], retry=RETRY_POLICY)
    service = submit_service(site, config)
    # On another file system than the spool, so the service copies (slowly enough
    # that the client can die after sending and before the answers).
    shm = Path(f"/dev/shm/dlf-{os.getpid()}-resubmit")
    shm.mkdir()
    try:
        rng = random.Random(11)
        paths = [write_random(rng, shm / f"app-{i}.log", 8 * MB) for i in range(12)]
        code = CLIENT.format(socket=str(service.socket_path))
        client = subprocess.Popen(
            [sys.executable, "-c", code, KEYWORD, *map(str, paths)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        # The requests are on their way once the service has started copying.
        wait_until(lambda: bool(service.instances()), 30, "the submit instance")
        wait_until(
            lambda: (
                any((site.spool / KEYWORD / ".tmp").glob("*")) or bool(pending_entries(site.spool))
            ),
            30,
            "the service to start on the batch",
        )
        client.send_signal(signal.SIGKILL)  # the application dies: no answer seen
        client.wait(30)
        service.wait_idle(60)
        spooled = len(pending_entries(site.spool))
        if spooled == 0:
            pytest.fail("setup: nothing was spooled before the client died; no unknown outcome")

        again = submit_files(service, paths)  # the same unchanged files, same caller
        if not all(type(r).__name__ == "Submitted" for r in again):
            pytest.fail(f"setup: the resubmit was refused: {again}")
        ledger = Ledger()
        ledger.record(again, [sha256_of(p) for p in paths])
        drain(site, config)
        found = audit(ledger, site)
        assert found.duplicated == [], (
            f"{spooled} files spooled without an answer were stored again on resubmit: "
            f"{len(found.duplicated)} contents stored twice"
        )
    finally:
        stop_service(service)
        shutil.rmtree(shm, ignore_errors=True)
