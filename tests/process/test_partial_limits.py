"""A live collector bounds the partial uploads one sending host leaves (issue 9 item 3):
beyond ``partials { max_files }`` a new upload is refused for now, a resume is not,
and each instance journals the host's partial usage as it starts."""

from __future__ import annotations

import dataclasses
import os

import pytest

from dlogd import config
from dlogd.config import PartialLimits, ServerConfig
from dlogd.shipwire import Accept, Code, Data, EndOfData, Refuse, Stored
from tests.process.test_ship_receive import RawSender, hostile_offer
from tests.shipharness import Collector, Site, partials, pki_set, site, start_collector, wait_for

pytestmark = pytest.mark.process

__all__ = ["pki_set", "site"]

RECEIVE_PARTIALS = "5b0f3c7e9a2d4e61b8c4f1d2a7e9c305"


def start_limited(site: Site, limits: PartialLimits) -> Collector:
    path = site.server_config()
    loaded = config.check(str(path), "server").config
    assert isinstance(loaded, ServerConfig)
    path.write_text(config.to_text(dataclasses.replace(loaded, partials=limits)))
    collector = start_collector(path, site.root)
    site.running.append(collector)
    return collector


def sender(site: Site, collector: Collector) -> RawSender:
    return RawSender(collector.port, site.pki.tls(site.pki.fleet.sender))


def partial_sizes(site: Site) -> list[int]:
    held = site.store_dir() / ".dlogd-partial"
    return [(held / name).stat().st_size for name in partials(site.store_dir())]


def break_off(site: Site, collector: Collector, name: str, data: bytes, sent: int) -> None:
    """An upload that stops after ``sent`` bytes: the connection drops."""
    raw = sender(site, collector)
    try:
        answer = raw.offer(hostile_offer(name, data))
        assert isinstance(answer, Accept) and answer.offset == 0, answer
        raw.send(Data(1, data[:sent]))
    finally:
        raw.close()


def test_beyond_the_cap_a_new_upload_waits_and_a_resume_goes_on(site: Site) -> None:
    collector = start_limited(site, PartialLimits(max_files=2))
    files = {f"{n}.log": os.urandom(50_000) for n in range(3)}
    for name in ("0.log", "1.log"):
        break_off(site, collector, name, files[name], 20_000)
    wait_for(lambda: partial_sizes(site) == [20_000, 20_000], 10, "two partials")

    raw = sender(site, collector)
    try:
        refused = raw.offer(hostile_offer("2.log", files["2.log"]))
        resumed = raw.offer(dataclasses.replace(hostile_offer("0.log", files["0.log"]), file_id=2))
        assert isinstance(refused, Refuse), refused
        assert refused.code == Code.TEMPORARY_FAILURE and "partial uploads" in refused.message
        assert isinstance(resumed, Accept) and resumed.offset == 20_000, resumed
        raw.send(Data(2, files["0.log"][20_000:]), EndOfData(2))
        assert isinstance(raw.next(), Stored)
    finally:
        raw.close()
    assert (site.store_dir() / "0.log").read_bytes() == files["0.log"]
    usage = [r for r in collector.records() if r.get("message_id") == RECEIVE_PARTIALS]
    assert usage and usage[-1].get("partial_files") == "2", usage


def test_empty_and_expired_partials_go_when_an_instance_starts(site: Site) -> None:
    collector = start_limited(site, PartialLimits(max_age=1))
    data = os.urandom(30_000)
    break_off(site, collector, "old.log", data, 10_000)
    wait_for(lambda: partial_sizes(site) == [10_000], 10, "the partial")
    [old] = partials(site.store_dir())
    then = os.stat(site.store_dir() / ".dlogd-partial" / old).st_mtime - 5
    os.utime(site.store_dir() / ".dlogd-partial" / old, (then, then))

    raw = sender(site, collector)  # a new instance (here: connection) tidies first
    try:
        answer = raw.offer(hostile_offer("old.log", data))
    finally:
        raw.close()
    assert isinstance(answer, Accept) and answer.offset == 0, answer
    removed = [r for r in collector.records() if r.get("message_id") == RECEIVE_PARTIALS]
    assert removed and removed[-1].get("removed_files") == "1", removed
    # The fresh partial of that offer was empty when the connection dropped: gone too.
    wait_for(lambda: partials(site.store_dir()) == [], 10, "no partial left")
