"""The collector wakes dlogd-archive.path: a trigger file after each commit that stored.

Place in the flow: ``dlogd-receive`` (real TLS, real store) and
``dlogd.trigger``. The archive run that takes the trigger is in
tests/archive (it needs the real Ceph); the path unit itself in the lab.
Here: the trigger appears only where server.conf has an archive block and
the unit names the file (``DLOGD_STORED_TRIGGER``), only once something
was stored, and a failure to make it never fails the delivery.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dlogd import config, journal, schema, trigger
from dlogd.config import Archive, Host, Limits, ServerConfig, ServerKeyword
from tests.shipharness import KEYWORD, Site, Target, make_file, pki_set, site, start_collector
from tests.tlsfixtures import LOOPBACK, SENDER

pytestmark = pytest.mark.process
__all__ = ["pki_set", "site"]  # fixtures, re-exported for pytest


def collector_config(site: Site, *, archive: bool) -> Path:
    """A collector's server.conf, written by dlogd's own writer, with or without archive { }."""
    # Never contacted by the receiver: the archive run is another process.
    block = Archive(
        endpoint="http://127.0.0.1:9",
        bucket="never-used",
        credentials=str(site.root / "absent.credentials"),
        retention_days=1,
        mode="governance",
    )
    written = ServerConfig(
        keywords={KEYWORD: ServerKeyword(KEYWORD, {SENDER: str(site.store_dir())})},
        hosts={SENDER: Host(SENDER, LOOPBACK)},
        tls=site.pki.tls(site.pki.fleet.collector),
        limits=Limits(max_file_size=schema.size("1M"), timeout=5),
        archive=block if archive else None,
    )
    path = site.root / "server.conf"
    path.write_text(config.to_text(written))
    return path


def deliver(site: Site, conf: Path, trigger_path: Path, name: str) -> list[str]:
    collector = start_collector(conf, site.root, extra_env={trigger.STORED_ENV: str(trigger_path)})
    site.running.append(collector)
    site.client_config([Target("logs1", collector.port)])
    site.add(make_file(site.root / name, b"stored\n"))
    run = site.ship()
    assert run.returncode == 0, run.stderr
    collector.stop()
    return collector.stderr_path.read_text().splitlines()


def test_a_commit_that_stored_makes_the_trigger_where_the_collector_archives(site: Site) -> None:
    marker = site.root / "remote-root" / ".stored"
    marker.parent.mkdir()
    conf = collector_config(site, archive=True)
    assert not marker.exists()
    deliver(site, conf, marker, "first.log")
    assert marker.exists(), "no trigger after a stored file"
    trigger.take(str(marker))  # as the archive run does first
    deliver(site, conf, marker, "second.log")
    assert marker.exists(), "the next stored file did not make it again"


def test_no_trigger_where_the_collector_does_not_archive(site: Site) -> None:
    marker = site.root / "remote-root" / ".stored"
    marker.parent.mkdir()
    deliver(site, collector_config(site, archive=False), marker, "plain.log")
    assert not marker.exists()


def test_a_trigger_that_cannot_be_made_is_reported_and_the_file_still_stored(site: Site) -> None:
    marker = site.root / "no-such-directory" / ".stored"
    stderr = deliver(site, collector_config(site, archive=True), marker, "kept.log")
    stored = [p.name for p in site.store_dir().iterdir() if p.is_file()]
    assert [name.split(".", 1)[1] for name in stored] == ["kept.log"]
    said = [line for line in stderr if journal.ARCHIVE_FAILED in line]
    assert said and "trigger" in said[0], stderr
