"""`dlogctl status` as a process, on a spool and a store the real shipper and collector made."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.shipharness import (
    EX_TEMPFAIL,
    REPO,
    Site,
    Target,
    env,
    free_port,
    make_file,
    pki_set,
    site,
)
from tests.tlsfixtures import COLLECTOR, SENDER

pytestmark = pytest.mark.process

__all__ = ["pki_set", "site"]  # fixtures, re-exported for pytest


def dlogctl(site: Site, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dlogd.cli", "status", *args],
        capture_output=True,
        text=True,
        env=env(site.cache),
        cwd=REPO,
        timeout=60,
    )


def figures(site: Site, *args: str) -> dict[str, Any]:
    done = dlogctl(site, "--json", *args)
    assert done.returncode == 0, done.stderr
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def test_collector_down_then_delivered(site: Site) -> None:
    port = free_port()
    config = site.client_config([Target(COLLECTOR, port)], retry=(300, 600))
    site.add(make_file(site.root / "a.log", b"a" * 1000), make_file(site.root / "b.log", b"b" * 10))
    assert site.ship().returncode == EX_TEMPFAIL  # nobody listens on the port

    down = figures(site, "--client", str(config))
    [pending] = down["pending"]
    assert (pending["host"], pending["files"], pending["bytes"]) == (COLLECTOR, 2, 1010)
    [collector] = down["collectors"]
    assert collector["failures"] == 1 and collector["next_retry"] is not None
    assert collector["last_error"]
    table = dlogctl(site, "--client", str(config))
    assert table.returncode == 0 and COLLECTOR in table.stdout
    check = dlogctl(site, "--client", str(config), "--warn-age", "1h", "--crit-age", "2h")
    assert check.returncode == 0 and check.stdout.startswith("DLOGD OK"), check.stdout
    check = dlogctl(site, "--client", str(config), "--warn-age", "1ms")
    assert check.returncode == 1 and check.stdout.startswith("DLOGD WARNING"), check.stdout

    site.start(port=port)
    site.clear_retry()
    assert site.ship().returncode == 0
    up = figures(site, "--client", str(config))
    assert up["pending"] == []
    # The shipper's own record of its runs: the failure above, then this success.
    [collector] = up["collectors"]
    assert collector["last_success"] is not None and collector["next_retry"] is None
    assert collector["last_error_time"] is not None
    assert collector["last_success"] >= collector["last_error_time"]
    prom = site.root / "dlogd.prom"
    assert dlogctl(site, "--client", str(config), "--prometheus", str(prom)).returncode == 0
    names = {f.name for f in text_string_to_metric_families(prom.read_text())}
    assert "dlogd_spool_pending_files" in names


def test_permanent_refusal_is_held_with_its_reason(site: Site) -> None:
    collector = site.start(max_file_size="1K")
    config = site.client_config([Target(COLLECTOR, collector.port)])
    site.add(make_file(site.root / "big.log", b"x" * 5000))
    site.ship()
    data = figures(site, "--client", str(config))
    [held] = data["held"]
    assert held["host"] == COLLECTOR and "TOO_LARGE" in held["reason"]
    check = dlogctl(site, "--client", str(config), "--warn-age", "1h")
    assert check.returncode == 1 and "1 held" in check.stdout


def test_collector_side_figures(site: Site) -> None:
    collector = site.start()
    site.client_config([Target(COLLECTOR, collector.port)])
    site.add(make_file(site.root / "c.log", b"c" * 300))
    assert site.ship().returncode == 0
    server = site.root / f"server-{COLLECTOR}.conf"
    data = figures(site, "--server", str(server))
    [store] = data["stores"]
    assert (store["host"], store["files"], store["bytes"]) == (SENDER, 1, 300)
    assert store["free_bytes"] > 0 and store["partials"] == 0
    check = dlogctl(site, "--server", str(server), "--warn-age", "1h")
    assert check.returncode == 0, check.stdout


def test_unreadable_config_is_unknown(site: Site, tmp_path: Path) -> None:
    bad = tmp_path / "bad.conf"
    bad.write_text("keyword {\n")
    done = dlogctl(site, "--client", str(bad), "--warn-age", "1h")
    assert done.returncode == 3 and done.stdout.startswith("DLOGD UNKNOWN"), done.stdout


def ship_with_metrics(site: Site, config: Path, prom: Path) -> subprocess.CompletedProcess[str]:
    """``dlogd-ship --prometheus`` as the role's drop-in runs it."""
    argv = [sys.executable, "-m", "dlogd.ship", "--config", str(config), "--prometheus", str(prom)]
    return subprocess.run(
        argv, capture_output=True, text=True, env=env(site.cache), cwd=REPO, timeout=120
    )


def samples(prom: Path) -> dict[tuple[str, str], float]:
    """{(metric, collector label): value}, read back with prometheus_client's parser."""
    found = {}
    for family in text_string_to_metric_families(prom.read_text()):
        for sample in family.samples:
            found[(sample.name, sample.labels.get("collector", ""))] = sample.value
    return found


def test_shipper_refreshes_the_prometheus_file_after_each_run(site: Site) -> None:
    port = free_port()
    config = site.client_config([Target(COLLECTOR, port)], retry=(300, 600))
    site.add(make_file(site.root / "a.log", b"a" * 1000), make_file(site.root / "b.log", b"b" * 10))
    prom = site.root / "textfile" / "dlogd.prom"
    prom.parent.mkdir()

    assert ship_with_metrics(site, config, prom).returncode == EX_TEMPFAIL  # nobody listens yet
    down = samples(prom)
    assert down[("dlogd_spool_pending_files", COLLECTOR)] == 2
    assert down[("dlogd_spool_pending_bytes", COLLECTOR)] == 1010
    assert down[("dlogd_ship_consecutive_failures", COLLECTOR)] == 1
    assert ("dlogd_ship_last_success_timestamp_seconds", COLLECTOR) not in down

    site.start(port=port)
    site.clear_retry()
    assert ship_with_metrics(site, config, prom).returncode == 0
    up = samples(prom)
    # Nothing pending: no pending series for the pair (status lists only what waits).
    assert up.get(("dlogd_spool_pending_files", COLLECTOR), 0) == 0
    assert up[("dlogd_ship_consecutive_failures", COLLECTOR)] == 0
    assert up[("dlogd_ship_last_success_timestamp_seconds", COLLECTOR)] > 0
    # Written by rename: no temporary file is left beside it for node_exporter to read.
    assert [p.name for p in prom.parent.iterdir()] == ["dlogd.prom"]


def test_shipper_that_cannot_write_metrics_says_so_and_still_delivers(site: Site) -> None:
    collector = site.start()
    config = site.client_config([Target(COLLECTOR, collector.port)])
    [entry] = site.add(make_file(site.root / "a.log", b"a" * 100))
    missing = site.root / "no-such-dir" / "dlogd.prom"
    done = ship_with_metrics(site, config, missing)
    assert done.returncode == 0, done.stderr
    assert f"cannot write metrics to {missing}" in done.stderr
    assert [p.name for p in site.store_dir().iterdir() if not p.name.startswith(".")] == [entry]
