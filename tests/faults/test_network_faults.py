"""Network faults between a real shipper and a real collector: cuts, flaps, drops, resets, stalls.

Two kinds of network. In namespaces of our own (:mod:`tests.faults.netfaults`),
the socket-activated collector listens on 192.0.2.1 and ``dlogd-ship`` runs in
a second namespace, over a veth with an ``htb`` rate limit: there the link is
cut for 10 s mid-transfer, or flaps at random instants while a short queue
drops packets. On loopback, :class:`tests.faults.faultproxy.FaultProxy` sits
between them and delays, stalls or resets connections mid-stream.

After every fault the shipper is simply run again (honouring its own backoff)
until it exits 0; then every file must be stored exactly once and
byte-identical, a broken transfer must have resumed at a byte offset instead
of starting over, no process may hang (every wait has a timeout), and the
collector must not have died with a traceback.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
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
    seeds,
    wait_until,
    write_random,
)
from tests.faults.faultproxy import Fault, FaultProxy
from tests.faults.netfaults import (
    COLLECTOR_IP,
    PORT,
    SHIPPER_IP,
    Link,
    finish_ship,
    network,
)
from tests.faults.test_ship_faults import resumed_at
from tests.shipharness import (
    EX_TEMPFAIL,
    Collector,
    ShipRun,
    Site,
    Target,
    pki_set,
    sha256_of,
    site,
)
from tests.tlsfixtures import COLLECTOR, SENDER

pytestmark = [pytest.mark.faults, pytest.mark.slow]

__all__ = ["pki_set", "site"]

MB = 1 << 20
SHIP_LIMIT = 120.0


@pytest.fixture
def link() -> Iterator[Link]:
    with network(("a",)) as links:
        yield links[0]


def spool_mix(site: Site, rng: random.Random, large: list[int], small: int) -> Ledger:
    """Large files of the given sizes and ``small`` small ones, spooled; their ledger."""
    paths = [write_random(rng, site.root / f"large-{i}.log", n) for i, n in enumerate(large)]
    paths += [
        write_random(rng, site.root / f"small-{i:03d}.log", rng.randint(0, 64 << 10))
        for i in range(small)
    ]
    ledger = Ledger()
    ledger.acknowledge_entries(site.add(*paths), [sha256_of(p) for p in paths])
    return ledger


def namespaced_world(site: Site, link: Link, *, timeout: int = 5) -> tuple[Collector, Path]:
    server = site.server_config(senders={SENDER: SHIPPER_IP}, timeout=timeout)
    collector = link.start_collector(server, site.root)
    config = site.client_config(
        [Target(COLLECTOR, PORT, address=COLLECTOR_IP)], retry=RETRY_POLICY, timeout=timeout
    )
    return collector, config


def runner(link: Link, site: Site, config: Path) -> ShipRun:
    return finish_ship(link.start_ship(config, site.cache), SHIP_LIMIT)


def no_traceback(collector: Collector) -> None:
    text = collector.stderr_path.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]


def offsets(runs: list[ShipRun]) -> list[int]:
    return [offset for run in runs for offset in resumed_at(run.records)]


# --- in namespaces --------------------------------------------------------------------------


def test_link_cut_for_10s_mid_transfer_resumes_at_the_byte_offset(site: Site, link: Link) -> None:
    link.rate_limit("100mbit")
    collector, config = namespaced_world(site, link)
    rng = random.Random(1)
    ledger = spool_mix(site, rng, [48 * MB], 20)
    store = site.store_dir()

    first = link.start_ship(config, site.cache)
    wait_until(lambda: partial_bytes(store) >= 12 * MB, 60, "12 MB of the upload")
    link.cut(10)
    cut_run = finish_ship(first, SHIP_LIMIT)
    held = partial_bytes(store)

    # Both sides' timeouts (5 s) are shorter than the cut: the run gave up by itself.
    assert cut_run.returncode == EX_TEMPFAIL, cut_run.stderr
    assert held >= 12 * MB
    runs = drain(site, config, runner=lambda: runner(link, site, config))
    resumed = offsets(runs)
    assert resumed and 12 * MB <= resumed[0] <= held, (resumed, held)
    found = audit(ledger, site)
    assert found.problems() == {}, found
    no_traceback(collector)


def test_random_flaps_and_drops_under_an_htb_rate_limit(
    site: Site, link: Link, capsys: pytest.CaptureFixture[str]
) -> None:
    (seed,) = seeds(1)
    rng = random.Random(seed)
    tally = Tally("network-flaps-drops")
    largest = count(ci=4, full=16)
    # A one-packet leaf queue under the rate: TCP keeps about two packets queued, so the
    # queue overflows and drops packets all the time, while the flaps cut the link.
    link.rate_limit("40mbit", queue_packets=1)
    collector, config = namespaced_world(site, link)
    ledger = spool_mix(site, rng, [rng.randint(2, largest) * MB for _ in range(2)], 40)

    stop = threading.Event()

    def flapper() -> None:
        while not stop.wait(rng.uniform(0.5, 3.0)):
            link.flap(rng.uniform(0.2, 4.0))

    thread = threading.Thread(target=flapper, daemon=True)
    thread.start()
    try:
        runs = drain(site, config, runs=40, runner=lambda: runner(link, site, config))
    finally:
        stop.set()
        thread.join(10)

    found = audit(ledger, site)
    tally.add("htb-flaps", seed, found, ship_runs=len(runs), link_flaps=link.flaps)
    tally.figures["packets_dropped"] = link.dropped()
    tally.figures["resumes"] = len([o for o in offsets(runs) if o > 0])
    tally.show(capsys)
    tally.assert_clean()
    assert tally.figures["packets_dropped"] > 0, "the queue never overflowed: no drops tested"
    no_traceback(collector)


# --- through the fault proxy ------------------------------------------------------------------


def proxied_world(site: Site, plan: list[Fault]) -> tuple[Collector, FaultProxy, Path]:
    collector = site.start(activated=True, timeout=5)
    proxy = FaultProxy(("127.0.0.1", collector.port), plan)
    config = site.client_config([Target(COLLECTOR, proxy.port)], retry=RETRY_POLICY, timeout=5)
    return collector, proxy, config


def random_plan(rng: random.Random, size: int, n: int) -> list[Fault]:
    """``n`` faulty connections: resets either way, stalls past the timeout, slow links."""
    plan = []
    for _ in range(n):
        kind = rng.choice(["reset", "reset", "reset-upstream", "stall", "delay"])
        if kind == "reset":
            plan.append(Fault(reset_at=rng.randint(1, size)))
        elif kind == "reset-upstream":
            plan.append(Fault(reset_upstream_at=rng.randint(1, 64 << 10)))
        elif kind == "stall":
            plan.append(Fault(stall_at=rng.randint(1, size), stall_for=rng.uniform(5.5, 8)))
        else:
            plan.append(Fault(delay=rng.uniform(0.001, 0.02)))
    return plan


def test_resets_stalls_and_delays_from_a_fault_proxy(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    tally = Tally("network-proxy")
    for seed in seeds(count(ci=2, full=12)):
        rng = random.Random(seed)
        trial = site.root / f"seed-{seed}"
        trial.mkdir()
        world = Site(trial, site.pki)
        ledger = spool_mix(world, rng, [rng.randint(8, 40) * MB], 30)
        total = sum((world.spool / "audit" / n).stat().st_size for n in ledger.acknowledged)
        collector, proxy, config = proxied_world(world, random_plan(rng, total, rng.randint(2, 5)))
        try:
            runs = drain(world, config, runs=30)
            found = audit(ledger, world)
            tally.add(
                "proxy",
                seed,
                found,
                connections=proxy.stats.connections,
                resets=proxy.stats.resets,
                stalls=proxy.stats.stalls,
                ship_runs=len(runs),
                resumed_transfers=len([o for o in offsets(runs) if o > 0]),
            )
            no_traceback(collector)
        finally:
            proxy.close()
            for running in world.running:
                running.kill()
    tally.show(capsys)
    tally.assert_clean()
