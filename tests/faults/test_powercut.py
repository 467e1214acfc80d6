"""Power cuts on the collector's store and on the client's spool (see tests/faults/powercut.py).

A trial freezes every writer of the disk with SIGSTOP at an instant drawn
from its seed, copies the disk (the state after the cut), kills the frozen
processes, fsck-s and mounts the copy, and checks what was acknowledged
before the cut: each such file must be on the copy, complete and
byte-identical. Then it recovers the way an operator's reboot would (the
collector and shipper started again on the copied disk) and drains: every
file stored exactly once, nothing visible with wrong content, no leftovers.

The self-test proves the method can fail: a file renamed into place without
an fsync does not survive the cut, while one written with fsync does.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dlogd.spool import Spool
from tests.faults.campaign import (
    RETRY_POLICY,
    Findings,
    Ledger,
    Tally,
    audit,
    check_store,
    count,
    drain,
    freeze,
    kill9,
    kill_instances,
    partial_bytes,
    pending_entries,
    reached,
    seeds,
    stop_service,
    submit_files,
    submit_service,
    write_random,
)
from tests.faults.powercut import Disk, disk
from tests.process.test_submit import Service
from tests.shipharness import (
    KEYWORD,
    Pki,
    Site,
    Target,
    partials,
    pki_set,
    sha256_of,
    ship,
    start_ship,
    visible_files,
    write_client_config,
)
from tests.tlsfixtures import COLLECTOR, SENDER

pytestmark = [pytest.mark.faults, pytest.mark.slow]

__all__ = ["pki_set"]

MB = 1 << 20


def test_self_test_a_rename_without_fsync_does_not_survive_the_cut() -> None:
    with disk("self") as d:
        where = d.root / "files"
        where.mkdir()
        careless, careful = where / "careless.log", where / "careful.log"
        data = os.urandom(256 << 10)
        (where / "careless.tmp").write_bytes(data)
        os.rename(where / "careless.tmp", careless)  # no fsync at all
        with (where / "careful.tmp").open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(where / "careful.tmp", careful)
        dir_fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)  # commits the journal: careless's rename goes with it
        finally:
            os.close(dir_fd)
        assert careless.read_bytes() == data  # before the cut, both look fine

        after = d.cut().mountpoint / "files"
        assert (after / "careful.log").read_bytes() == data
        survivor = after / "careless.log"
        assert not survivor.exists() or survivor.read_bytes() != data, (
            "a file renamed without fsync survived the cut: the method would not catch a "
            "missing fsync"
        )
        # And the campaign's check says so: the careless file counts as lost or torn.
        ledger = Ledger()
        ledger.acknowledge_entries(
            ["careless.log", "careful.log"], [sha256_of(careful), sha256_of(careful)]
        )
        found = check_store(ledger, after)
        assert found.lost + found.wrong_content == ["careless.log"]


# --- the collector's store --------------------------------------------------------------------


def make_mix(rng: random.Random, root: Path) -> list[Path]:
    paths = [
        write_random(rng, root / f"small-{i:03d}.log", rng.randint(0, 128 << 10))
        for i in range(rng.randint(5, 60))
    ]
    paths += [
        write_random(rng, root / f"large-{i}.log", rng.randint(1, 12) * MB)
        for i in range(rng.randint(0, 2))
    ]
    rng.shuffle(paths)
    return paths


Body = Callable[[random.Random, Site, Disk, Tally, list[Service]], Findings]


def cut_trial(kind: str, body: Body, pki: Pki, base: Path, seed: int, tally: Tally) -> None:
    """One trial in a world of its own with a fresh disk; failures are tallied by seed."""
    rng = random.Random(seed)
    root = base / f"{kind}-{seed}"
    root.mkdir()
    site = Site(root, pki)
    with disk(f"{kind[0]}{seed % 100000}") as d:
        services: list[Service] = []
        try:
            found = body(rng, site, d, tally, services)
            tally.add(kind, seed, found, fsck_repairs=int(d.fsck_codes[0] == 1))
        except Exception as exc:
            tally.error(kind, seed, exc)
        finally:
            for service in services:
                stop_service(service)
            for running in site.running:
                running.kill()
            site.running.clear()


def _store_cut(
    rng: random.Random, site: Site, d: Disk, tally: Tally, services: list[Service]
) -> Findings:
    live_store = d.root / SENDER / KEYWORD
    paths = make_mix(rng, site.root)
    ledger = Ledger()
    ledger.acknowledge_entries(site.add(*paths), [sha256_of(p) for p in paths])
    collector = site.start(activated=True, directory=live_store)
    config = site.client_config([Target(COLLECTOR, collector.port)], retry=RETRY_POLICY)
    shipper = start_ship(config, site.cache)
    # The instant: k files stored (k < all of them), or N bytes into a partial.
    if rng.random() < 0.6:
        k = rng.randint(0, len(paths) - 1)
        reached(lambda: len(visible_files(live_store)) >= k, 20, step=0.001)
    else:
        at = rng.randint(1, 4 * MB)
        reached(lambda: partial_bytes(live_store) >= at or shipper.poll() is not None, 20, 0.001)

    freeze(collector.proc.pid)  # the power goes: the activator, then its instances
    copy = d.cut()
    collector.kill()
    kill9(shipper)
    shipper.communicate(timeout=30)
    # Acknowledged before the cut: the shipper removed the entry only after STORED.
    remaining = set(pending_entries(site.spool))
    acked = {n: h for n, h in ledger.acknowledged.items() if n not in remaining}
    tally.counts["acknowledged_before_cut"] += len(acked)
    tally.counts["cuts_mid_drain"] += int(bool(remaining))
    store = copy.mountpoint / SENDER / KEYWORD
    before = Ledger(acknowledged=acked)
    survived = check_store(before, store) if store.exists() else None
    if acked:
        assert survived is not None, "the store directory itself did not survive the cut"
        assert survived.lost == [] and survived.wrong_content == [], survived
    tally.counts["partials_after_cut"] += len(partials(store)) if store.exists() else 0

    # Recovery: the collector comes back on the disk as it was after the cut.
    restarted = site.start(activated=True, directory=store)
    config = site.client_config([Target(COLLECTOR, restarted.port)], retry=RETRY_POLICY)
    drain(site, config)
    return audit(ledger, site, store_dir=store)


def test_power_cut_on_the_collector_store(
    tmp_path: Path, pki_set: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    tally = Tally("powercut-store")
    for seed in seeds(count(ci=3, full=60)):
        cut_trial("store", _store_cut, pki_set, tmp_path, seed, tally)
    tally.show(capsys)
    tally.assert_clean()


# --- the client's spool ---------------------------------------------------------------------


def _spool_cut(
    rng: random.Random, site: Site, d: Disk, tally: Tally, services: list[Service]
) -> Findings:
    live_spool = d.root / "spool"
    paths = make_mix(rng, site.root)  # on another file system: the service copies them
    digests = [sha256_of(p) for p in paths]
    config = write_client_config(
        site.root / "client.conf",
        spool=live_spool,
        tls=site.pki.tls(site.pki.fleet.sender),
        targets=[Target(COLLECTOR, 1)],
        retry=RETRY_POLICY,
    )
    service = submit_service_on(site, config, live_spool)
    services.append(service)
    results: list[object] = []
    cut = threading.Event()

    sizes = [rng.randint(1, 8) for _ in paths]

    def submitter() -> None:
        # Batches of 1-8 on their own connections, so that OKs arrive before the cut.
        done = 0
        for size in sizes:
            if done >= len(paths) or cut.is_set():
                break
            results.extend(submit_files(service, paths[done : done + size]))
            done += size
        results.extend([None] * (len(paths) - len(results)))  # never sent: unknown

    worker = threading.Thread(target=submitter)
    worker.start()
    # The instant: k entries spooled (k < all of them), or a random time.
    k = rng.randint(0, len(paths) - 1)
    if rng.random() < 0.7:
        reached(lambda: len(pending_entries(live_spool)) >= k, 20, step=0.001)
    else:
        time.sleep(rng.uniform(0.0, 0.3))
    cut.set()
    freeze(service.proc.pid)  # the power goes: the activator, then its instances
    copy = d.cut()
    # The power is off: every process dies, the activator too. (Left running, it would
    # accept a connection still waiting in its backlog and answer OK after the cut.)
    kill_instances(service)  # first: once the activator is gone its children are not listed
    os.kill(service.proc.pid, signal.SIGKILL)
    worker.join(60)
    assert not worker.is_alive(), "submit_many hung"
    ledger = Ledger()
    ledger.record(results, digests)
    tally.counts["acknowledged_before_cut"] += len(ledger.acknowledged)
    tally.counts["unknown_at_cut"] += len(ledger.unknown)

    # Recovery: the shipper drains the spool as it was after the cut.
    spool = copy.mountpoint / "spool"
    collector = site.start(activated=True)
    recovered = write_client_config(
        site.root / "client-after.conf",
        spool=spool,
        tls=site.pki.tls(site.pki.fleet.sender),
        targets=[Target(COLLECTOR, collector.port)],
        retry=RETRY_POLICY,
    )
    drain(site, recovered, spool=spool, runner=lambda: ship(recovered, site.cache))
    return audit(ledger, site, spool=spool)


def submit_service_on(site: Site, config: Path, spool: Path) -> Service:
    Spool(str(spool), create=True).close()
    os.sync()  # the spool exists long before any cut (tmpfiles makes it at boot)
    return submit_service(site, config)


def test_power_cut_on_the_client_spool(
    tmp_path: Path, pki_set: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    tally = Tally("powercut-spool")
    for seed in seeds(count(ci=3, full=40)):
        cut_trial("spool", _spool_cut, pki_set, tmp_path, seed, tally)
    tally.show(capsys)
    tally.assert_clean()
