"""Randomized kill -9 campaign: submit service, shipper, collector, or both, at a random instant.

Each trial (one seed) builds a world of its own: the socket-activated submit
service and collector, a mix of small and large files submitted through
``dlogd.client.submit_many``; then kills its target at an instant drawn from
the seed (a random time, or a random point of progress such as "k files
stored" or "N bytes of partial"), restarts what it killed, drains with
``dlogd-ship`` until it exits 0 (waiting out its own backoff, never editing
its state), and checks against the ledger of what the client was told OK:
every acknowledged file present exactly once and byte-identical, nothing
visible with content nobody submitted, no conflict copies, no leftovers.

CI runs a couple of dozen trials; ``DLOGD_CAMPAIGN=full`` (``make campaign``)
runs 220. ``DLOGD_CAMPAIGN_SEED=<seed>`` replays one trial.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest

from tests.faults.campaign import (
    Findings,
    Ledger,
    Tally,
    audit,
    count,
    discard,
    drain,
    finish,
    kill9,
    kill_instances,
    partial_bytes,
    point_at,
    reached,
    seeds,
    stop_service,
    submit_files,
    submit_service,
    trial_root,
    write_random,
)
from tests.process.test_submit import Service
from tests.shipharness import Pki, Site, pki_set, sha256_of, start_ship, visible_files

pytestmark = [pytest.mark.faults, pytest.mark.slow]

__all__ = ["pki_set"]

MB = 1 << 20
TARGETS = ("submit", "shipper", "collector", "both")


def make_files(rng: random.Random, root: Path) -> list[Path]:
    """Small files (empty to 256 KiB) and up to two large ones (4-48 MiB), mixed."""
    files = []
    for i in range(rng.randint(1, 60)):
        size = rng.choice([0, rng.randint(1, 4096), rng.randint(4096, 256 << 10)])
        files.append(write_random(rng, root / f"small-{i:03d}.log", size))
    for i in range(rng.choice([0, 0, 1, 2])):
        files.append(write_random(rng, root / f"large-{i}.log", rng.randint(4, 48) * MB))
    rng.shuffle(files)
    return files


def run_trial(base: Path, pki: Pki, seed: int, tally: Tally) -> None:
    rng = random.Random(seed)
    target = rng.choice(TARGETS)
    root = trial_root(base, seed)
    site = Site(root, pki)
    services: list[Service] = []
    try:
        found, extra = _trial(rng, target, site, services)
        tally.add(target, seed, found, **extra)
        if not found.problems():
            discard(root)
    except Exception as exc:  # a hang or crash of the harness is a failing trial too
        tally.error(target, seed, exc)
    finally:
        for collector in site.running:
            collector.kill()
        for service in services:
            stop_service(service)


def _trial(
    rng: random.Random, target: str, site: Site, services: list[Service]
) -> tuple[Findings, dict[str, int]]:
    files = make_files(rng, site.root)
    digests = [sha256_of(p) for p in files]
    collector = site.start(activated=True)
    config = point_at(site, collector)
    service = submit_service(site, config)
    services.append(service)
    ledger = Ledger()
    hit = 0
    if target == "submit":
        results: list[object] = []
        worker = threading.Thread(target=lambda: results.extend(submit_files(service, files)))
        worker.start()
        time.sleep(rng.uniform(0, 0.4))
        hit = int(kill_instances(service) > 0)
        worker.join(90)
        assert not worker.is_alive(), "submit_many hung after its service was killed"
        ledger.record(results, digests)
    else:
        ledger.record(submit_files(service, files), digests)
        assert not ledger.unknown and not ledger.refused, ledger
        shipper = start_ship(config, site.cache)
        _wait_random_instant(rng, site, len(files))
        if target in ("shipper", "both"):
            hit = int(kill9(shipper))
        if target in ("collector", "both"):
            hit = int(shipper.poll() is None)
            collector.kill()
        finish(shipper, 60)  # after a collector kill the shipper must end by itself
        if target in ("collector", "both"):
            collector = site.start(activated=True)
            config = point_at(site, collector)
    runs = drain(site, config)
    found = audit(ledger, site)
    extra = {
        "kills_mid_operation": hit,
        "files_acknowledged": len(ledger.acknowledged),
        "files_unknown_outcome": len(ledger.unknown),
        "files_stored": len(visible_files(site.store_dir())),
        # Recovery is only ever re-running dlogd-ship; nothing else touches the state.
        "recovery_ship_runs": len(runs),
    }
    return found, extra


def _wait_random_instant(rng: random.Random, site: Site, n_files: int) -> None:
    """A random time, or a random point of progress (files stored, partial bytes)."""
    store = site.store_dir()
    how = rng.choice(["time", "stored", "partial"])
    if how == "time":
        time.sleep(rng.uniform(0.2, 2.0))
    elif how == "stored":
        k = rng.randint(0, n_files)
        # The drain may finish before the point is reached: a valid instant too.
        reached(lambda: len(visible_files(store)) >= k, 20)
    else:
        at = rng.randint(1, 8 * MB)
        reached(lambda: partial_bytes(store) >= at or len(visible_files(store)) >= n_files, 20)


def test_kill_campaign(tmp_path: Path, pki_set: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    tally = Tally("kill-campaign")
    for seed in seeds(count(ci=24, full=220)):
        run_trial(tmp_path, pki_set, seed, tally)
    tally.show(capsys)
    tally.assert_clean()
