"""Restart storm: back-to-back drains while the collector is killed and restarted at random.

A thread kills the collector (kill -9) and starts it again on the same port
at instants drawn from the seed, while ``dlogd-ship`` runs again and again,
each run honouring (or deferring to) its own on-disk backoff, and new files
keep arriving in the spool. Sampled after every drain: the backoff state
(``.retry``) and the collector's partials must stay bounded (one state file
per collector and no temp files; no more partials than files still owed).
Afterwards the collector stays up, a last drain finishes, and the ledger
check holds: every file stored once, byte-identical, nothing left behind.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest

from tests.faults.campaign import (
    RETRY_POLICY,
    Ledger,
    Tally,
    audit,
    count,
    drain,
    partial_bytes,
    pending_entries,
    seeds,
    write_random,
)
from tests.shipharness import (
    EX_TEMPFAIL,
    Collector,
    Site,
    Target,
    free_port,
    partials,
    pki_set,
    sha256_of,
    ship,
    site,
)
from tests.tlsfixtures import COLLECTOR

pytestmark = [pytest.mark.faults, pytest.mark.slow]

__all__ = ["pki_set", "site"]

MB = 1 << 20


def test_restart_storm_keeps_retry_state_and_partials_bounded(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    (seed,) = seeds(1)
    rng = random.Random(seed)
    drains = count(ci=15, full=50)
    tally = Tally("restart-storm")
    port = free_port()
    current: list[Collector] = [site.start(port=port)]
    config = site.client_config([Target(COLLECTOR, port)], retry=RETRY_POLICY, timeout=5)
    store = site.store_dir()
    ledger = Ledger()
    stop = threading.Event()
    restarts = 0

    def storm() -> None:
        nonlocal restarts
        while not stop.wait(rng.uniform(0.2, 1.5)):
            current[-1].kill()
            stop.wait(rng.uniform(0.0, 1.0))
            current.append(site.start(port=port))
            restarts += 1

    def add_files(n: int, tag: int) -> None:
        paths = [
            write_random(
                rng, site.root / f"f{tag}-{i}.log", rng.choice([1 << 10, 300 << 10, 3 * MB])
            )
            for i in range(n)
        ]
        ledger.acknowledge_entries(site.add(*paths), [sha256_of(p) for p in paths])

    add_files(10, 0)
    worst = {"retry_files": 0, "partials": 0, "partial_bytes": 0, "excess_partials": 0}
    thread = threading.Thread(target=storm, daemon=True)
    thread.start()
    try:
        for i in range(drains):
            add_files(rng.randint(0, 4), i + 1)
            run = ship(config, site.cache, timeout=120)
            assert run.returncode in (0, EX_TEMPFAIL), run.stderr
            assert "Traceback" not in run.stderr, run.stderr
            retry_files = sorted(p.name for p in (site.spool / ".retry").glob("*"))
            worst["retry_files"] = max(worst["retry_files"], len(retry_files))
            assert all(name == f"{COLLECTOR}.json" for name in retry_files), retry_files
            owed = len(pending_entries(site.spool))
            now_partials = len(partials(store))
            worst["partials"] = max(worst["partials"], now_partials)
            worst["partial_bytes"] = max(worst["partial_bytes"], partial_bytes(store))
            worst["excess_partials"] = max(worst["excess_partials"], now_partials - owed)
    finally:
        stop.set()
        thread.join(30)

    if current[-1].proc.poll() is not None:
        current.append(site.start(port=port))
    runs = drain(site, config)
    found = audit(ledger, site)
    tally.add("storm", seed, found, drains=drains, restarts=restarts, final_runs=len(runs))
    tally.figures.update({f"max_{k}": v for k, v in worst.items()})
    tally.show(capsys)
    tally.assert_clean()
    # No more partials than files still owed: a partial whose file was stored is a leak.
    assert worst["excess_partials"] <= 0, worst
    for collector in current:
        text = Path(collector.stderr_path).read_text(errors="replace")
        assert "Traceback" not in text, text[-3000:]
