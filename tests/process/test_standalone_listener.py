"""``dlogd-receive --listen`` against peers that only connect (issue 9 item 5): the
connection limit holds, a descriptor shortage in accept() is survived, and a real
shipper is served once the idle peers are gone."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from tests.shipharness import (
    REPO,
    Collector,
    Site,
    Target,
    env,
    make_file,
    pki_set,
    site,
    visible_files,
    wait_for,
)
from tests.tlsfixtures import COLLECTOR, LOOPBACK

pytestmark = pytest.mark.process

__all__ = ["pki_set", "site"]

TIMEOUT = 2  # the collector's idle limit: idle peers are dropped after it


@contextmanager
def listener(site: Site, *args: str, nofile: int | None = None) -> Iterator[Collector]:
    config = site.server_config(timeout=TIMEOUT)
    stderr_path = site.root / "listener.stderr"
    limit = ["prlimit", f"--nofile={nofile}:{nofile}", "--"] if nofile else []
    cmd = [*limit, sys.executable, "-m", "dlogd.receive", "--config", str(config)]
    with stderr_path.open("wb") as err:
        proc = subprocess.Popen(
            [*cmd, "--listen", f"{LOOPBACK}:0", *args],
            stdout=subprocess.PIPE,
            stderr=err,
            env=env(site.root / "cache"),
            cwd=REPO,
            start_new_session=True,
        )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    match = re.search(r"listening on [^ ]+:(\d+)", line)
    collector = Collector(proc, int(match.group(1)) if match else 0, stderr_path, False)
    try:
        assert match, f"{line!r}: {stderr_path.read_text()}"
        yield collector
    finally:
        collector.stop()


def idle_peers(stack: ExitStack, port: int, n: int) -> None:
    """TCP connections that never say a word."""
    for _ in range(n):
        stack.enter_context(socket.create_connection((LOOPBACK, port), timeout=5))


def ship_one(site: Site, collector: Collector, name: str) -> None:
    site.client_config([Target(COLLECTOR, collector.port)], timeout=10)
    entries = site.add(make_file(site.root / name, b"served after all\n"))
    run = site.ship()
    assert run.returncode == 0, run.stderr
    assert visible_files(site.store_dir()) == sorted(entries)


def reasons(collector: Collector) -> set[str]:
    return {r.get("reason") for r in collector.records()}


def test_running_out_of_descriptors_does_not_end_the_listener(site: Site) -> None:
    with listener(site, nofile=48) as collector, ExitStack() as peers:
        idle_peers(peers, collector.port, 80)  # more than the collector has descriptors
        wait_for(lambda: "EMFILE" in reasons(collector), 20, "the accept failure journalled")
        assert collector.proc.poll() is None, collector.stderr_path.read_text()
        peers.close()
        ship_one(site, collector, "after-emfile.log")
        assert collector.proc.poll() is None
        assert "Traceback" not in collector.stderr_path.read_text()


def test_beyond_max_connections_peers_wait_for_a_free_slot(site: Site) -> None:
    with listener(site, "--max-connections", "3") as collector, ExitStack() as peers:
        idle_peers(peers, collector.port, 6)
        wait_for(lambda: "LIMIT" in reasons(collector), 20, "the limit journalled")
        # The idle ones are timed out after TIMEOUT s, freeing their slots for a shipper.
        ship_one(site, collector, "after-limit.log")
        limit_notes = [r for r in collector.records() if r.get("reason") == "LIMIT"]
        assert "limit of 3 connections" in limit_notes[0].message


def test_max_connections_must_be_a_positive_number(tmp_path: Path) -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "dlogd.receive",
            "--listen",
            "127.0.0.1:0",
            "--max-connections",
            "0",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env(tmp_path / "cache"),
        timeout=30,
    )
    assert run.returncode == 2
    assert "--max-connections: 0 is not at least 1" in run.stderr
