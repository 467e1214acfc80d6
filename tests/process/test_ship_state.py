"""What the shipper leaves in ``.retry/`` (issue 9 item 10): nothing a killed run left
half-written, no backoff for a collector nothing is owed to, and the backoff of one
that is still owed kept."""

from __future__ import annotations

import time

import pytest

from dlogd.backoff import RetryState
from dlogd.config import Retry
from tests.shipharness import (
    COLLECTOR2,
    Site,
    Target,
    free_port,
    make_file,
    pki_set,
    retry_state,
    site,
    visible_files,
)
from tests.tlsfixtures import COLLECTOR

pytestmark = pytest.mark.process

__all__ = ["pki_set", "site"]


def test_a_drain_removes_what_a_killed_run_left_and_backoff_nobody_needs(site: Site) -> None:
    collector = site.start()
    site.client_config([Target(COLLECTOR, collector.port), Target(COLLECTOR2, free_port())])
    retry = RetryState(str(site.spool), Retry(min_delay=1, max_delay=10))
    # A backoff that has run out, for the collector the file is owed to; one still
    # running for a collector the spool owes nothing now (its files went elsewhere
    # or were dropped); and a shipper killed while writing it (os.replace never ran).
    retry.failed(COLLECTOR, "timed out", time.time() - 3600)
    retry.failed(COLLECTOR2, "refused", time.time())
    leftover = site.spool / ".retry" / f"{COLLECTOR2}.json.4242.tmp"
    leftover.write_text('{"failures": 1')
    entries = site.add(make_file(site.root / "a.log", b"owed to logs1 only\n"))

    run = site.ship()

    assert run.returncode == 0, run.stderr
    assert visible_files(site.store_dir()) == entries
    assert sorted(p.name for p in (site.spool / ".retry").iterdir()) == []


def test_the_backoff_of_a_collector_still_owed_is_kept(site: Site) -> None:
    site.client_config([Target(COLLECTOR2, free_port())])  # nobody listens there
    site.add(make_file(site.root / "b.log", b"owed to a dead collector\n"), hosts=(COLLECTOR2,))
    first = site.ship()
    assert first.returncode == 75, first.stderr
    kept = retry_state(site.spool, COLLECTOR2)
    assert kept is not None and kept["failures"] == 1

    again = site.ship()  # deferred, or tried and failed again: either way still owed

    assert again.returncode == 75, again.stderr
    after = retry_state(site.spool, COLLECTOR2)
    assert after is not None and after["failures"] >= kept["failures"]
