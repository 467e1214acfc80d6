"""Quotas that push back (issue 14 item 2), with real processes, sockets and file systems.

On a client: the submit service as systemd runs it (``systemd-socket-activate
--accept``), its spool on a small real tmpfs or under ``spool_max_size``; the
refusal reaches the C library (the clib test program), the Python client and
``dlogctl submit``, each with its own code, and everything acknowledged before
is then delivered to a real collector. On a collector: a store on a small tmpfs
below ``min_free`` makes the shipper hold that one file, while a second
collector in the same run gets everything; once space is freed the held file
goes too. A disk that fills in the middle of a file keeps the partial for a
resume and shows nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dlogd import client, config, journal
from dlogd.backoff import STATE_DIR
from dlogd.config import ClientConfig, ServerConfig, SpoolQuota
from dlogd.quota import Amount
from dlogd.shipwire import Accept, Code, Data, EndOfData, Failed, Stored
from dlogd.spool import Spool
from tests.process.test_ship_receive import RawSender, hostile_offer
from tests.shipharness import (
    COLLECTOR2,
    EX_TEMPFAIL,
    REPO,
    Record,
    Site,
    Target,
    owed_hosts,
    parse_records,
    partials,
    pki_set,
    random_file,
    resize,
    retry_state,
    sha256_of,
    site,
    spool_entries,
    start_collector,
    tmpfs,
    visible_files,
    wait_for,
)
from tests.tlsfixtures import COLLECTOR
from tests.unit.test_ship_session import World, converse, owed, submit, world

pytestmark = pytest.mark.process

__all__ = ["pki_set", "site", "world"]

MiB = 1024**2
KiB = 1024
EXIT_SPOOL_FULL = 4  # dlogctl submit's own status for SPOOL_FULL (docs/dlogctl.md)


# --- real file systems, real configs ----------------------------------------------------


def with_changes(path: Path, role: str, **changes: object) -> Path:
    """The config at ``path``, as loaded, with ``changes``: written back by ``to_text``."""
    loaded = config.check(str(path), role).config
    assert isinstance(loaded, ClientConfig if role == "client" else ServerConfig)
    path.write_text(config.to_text(dataclasses.replace(loaded, **changes)))  # type: ignore[arg-type]
    return path


# --- the submit service and its three kinds of caller ---------------------------------------


@dataclass
class SubmitService:
    socket: Path
    log: Path

    def refusals(self) -> list[Record]:
        """SUBMIT_REFUSED records for SPOOL_FULL (the service's stderr: no journal here)."""
        return [
            r
            for r in parse_records(self.log.read_text(errors="replace"))
            if r.get("message_id") == journal.SUBMIT_REFUSED and r.get("reason") == "SPOOL_FULL"
        ]


@contextlib.contextmanager
def submit_service(site: Site, conf: Path) -> Iterator[SubmitService]:
    """One service instance per connection, as dlogd-submit.socket (Accept=yes) runs it."""
    service = SubmitService(site.root / "submit.sock", site.root / "submit.log")
    service.socket.unlink(missing_ok=True)  # an earlier service's: the next one binds anew
    with service.log.open("w") as out:
        proc = subprocess.Popen(
            [
                *("systemd-socket-activate", "--accept", "-l", str(service.socket)),
                *("-E", f"PYTHONPATH={REPO}", "-E", f"DLOGD_CACHE_DIR={site.cache}"),
                *(sys.executable, "-m", "dlogd.submit_service", "--config", str(conf)),
            ],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(service.socket.exists, 10, "the submit socket")
        yield service
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


@pytest.fixture(scope="module")
def c_program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """libdlogd and its test program, built with the library's own Makefile."""
    out = tmp_path_factory.mktemp("clib")
    done = subprocess.run(
        ["make", "-C", str(REPO / "clib"), f"B={out}", "all", "test-program"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out / "dlogd-submit-test"


def submit_c(program: Path, service: SubmitService, path: Path) -> str:
    """``OK <entry>`` or ``ERR <errno name> <message>`` from dlogd_submit()."""
    done = subprocess.run(
        [str(program), "audit", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "DLOGD_SOCKET": str(service.socket)},
    )
    assert done.stderr == "", done.stderr
    return done.stdout.strip()


def submit_cli(service: SubmitService, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *(sys.executable, "-m", "dlogd.cli", "submit", "--keyword", "audit"),
            "--socket",
            str(service.socket),
            str(path),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def submit_py(service: SubmitService, path: Path) -> client.Submitted:
    return client.submit(path, "audit", socket_path=str(service.socket))


def assert_refused_everywhere(program: Path, service: SubmitService, path: Path, why: str) -> None:
    """The same file refused SPOOL_FULL to C (ENOSPC), Python (SpoolFull) and the CLI (4)."""
    c_says = submit_c(program, service, path)
    assert c_says.startswith("ERR ENOSPC spool full"), c_says
    assert why in c_says, c_says
    with pytest.raises(client.SpoolFull) as caught:
        submit_py(service, path)
    assert caught.value.errno == errno.ENOSPC
    assert caught.value.code.name == "SPOOL_FULL"
    assert isinstance(caught.value, client.TemporaryFailure)  # "retry later", as before
    cli = submit_cli(service, path)
    assert cli.returncode == EXIT_SPOOL_FULL, cli.stdout + cli.stderr
    assert "refused:" in cli.stderr and f"spool full: {path.stat().st_size} bytes" in cli.stderr


def stored_names(directory: Path) -> dict[str, str]:
    """Stored file -> SHA-256, by the submitted basename (entry names lead with a time)."""
    return {name.split(".", 1)[1]: sha256_of(directory / name) for name in visible_files(directory)}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the client's spool ------------------------------------------------------------------


def test_spool_max_size_refuses_every_caller_and_delivers_what_it_took(
    site: Site, c_program: Path
) -> None:
    collector = site.start()
    conf = with_changes(
        site.client_config([Target(COLLECTOR, collector.port)]),
        "client",
        quota=SpoolQuota(max_size=Amount(bytes=300_000)),
    )
    sizes = {"a": 100_000, "b": 100_000, "c": 150_000, "d": 50_000, "e": 200_000, "f": 10_000}
    files = {n: random_file(site.root / f"{n}.log", size) for n, size in sizes.items()}

    with submit_service(site, conf) as service:
        assert submit_c(c_program, service, files["a"]).startswith("OK audit/")
        assert submit_py(service, files["b"]).size == 100_000
        # 200,000 waiting + 150,000 would be over 300,000.
        assert_refused_everywhere(c_program, service, files["c"], "over the limit of 300000")
        # A batch is spooled as the part before its first refusal: f would fit on
        # its own (260,000) but is not spooled after e, an earlier file, was refused.
        batch = client.submit_many(
            [files["d"], files["e"], files["f"]], "audit", socket_path=str(service.socket)
        )
        assert isinstance(batch[0], client.Submitted), batch
        assert [type(r) for r in batch[1:]] == [client.SpoolFull, client.SpoolFull], batch
        assert "earlier file on this connection was refused" in str(batch[2])
        refusals = service.refusals()

    assert sorted(e.split(".", 1)[1] for e in spool_entries(site.spool)) == [
        "a.log",
        "b.log",
        "d.log",
    ]
    # One record per refusal (3 callers for c, then e and f), with keyword, uid and sizes.
    assert [r.get("path").rsplit("/", 1)[-1] for r in refusals] == [
        *["c.log"] * 3,
        "e.log",
        "f.log",
    ]
    assert all(r.get("keyword") == "audit" and r.get("uid") == "0" for r in refusals)
    first = refusals[0]
    assert (first.get("size"), first.get("used"), first.get("max_used")) == (
        "150000",
        "200000",
        "300000",
    )
    assert refusals[3].get("used") == "250000" and refusals[3].get("size") == "200000"

    # Everything acknowledged before the refusals is delivered, nothing else.
    run = site.ship()
    assert run.returncode == 0, run.stderr
    assert stored_names(site.store_dir()) == {
        n: digest(files[n[0]]) for n in ("a.log", "b.log", "d.log")
    }
    assert spool_entries(site.spool) == []
    # With the spool drained there is room again.
    with submit_service(site, conf) as service:
        assert submit_cli(service, files["c"]).returncode == 0


def test_a_spool_on_a_small_tmpfs_keeps_min_free_then_meets_a_full_disk(
    site: Site, c_program: Path
) -> None:
    with tmpfs(site.spool, "4M"):
        collector = site.start()
        base = site.client_config([Target(COLLECTOR, collector.port)])
        # The files are on another file system than the spool: they are copied in.
        files = {n: random_file(site.root / f"{n}.log", size) for n, size in
                 {"one": MiB, "two": MiB, "three": 1536 * KiB, "huge": 3 * MiB}.items()}  # fmt: skip
        conf = with_changes(base, "client", quota=SpoolQuota(min_free=Amount(percent=25)))
        with submit_service(site, conf) as service:
            assert submit_py(service, files["one"]).size == MiB
            assert submit_c(c_program, service, files["two"]).startswith("OK audit/")
            # About 2 MiB free; 1.5 MiB more would leave less than 25% of 4 MiB.
            assert_refused_everywhere(c_program, service, files["three"], "must stay free")
            [record, *_] = service.refusals()
            assert record.get("min_free") == str(MiB) and record.get("size") == str(1536 * KiB)
            assert MiB < int(record.get("free")) <= 2 * MiB

        # No quota now: the disk itself runs out in the middle of the copy.
        with_changes(conf, "client", quota=SpoolQuota())
        with submit_service(site, conf) as service:
            with pytest.raises(client.SpoolFull, match="No space left on device"):
                submit_py(service, files["huge"])
            cli = submit_cli(service, files["huge"])
            assert cli.returncode == EXIT_SPOOL_FULL, cli.stderr
            assert submit_c(c_program, service, files["huge"]).startswith("ERR ENOSPC")
        # Nothing half-copied is left, and nothing spooled was dropped.
        assert list((site.spool / "audit" / ".tmp").iterdir()) == []
        assert sorted(e.split(".", 1)[1] for e in spool_entries(site.spool)) == [
            "one.log",
            "two.log",
        ]

        run = site.ship()
        assert run.returncode == 0, run.stderr
        assert stored_names(site.store_dir()) == {
            "one.log": digest(files["one"]),
            "two.log": digest(files["two"]),
        }
        assert spool_entries(site.spool) == []


# --- a collector's store -----------------------------------------------------------------


def start_with_min_free(site: Site, min_free: Amount) -> tuple[Path, int]:
    path = with_changes(site.server_config(COLLECTOR), "server", min_free=min_free)
    running = start_collector(path, site.root, tag=COLLECTOR)
    site.running.append(running)
    return path, running.port


def refused_offers(site: Site, name: str) -> list[Record]:
    return [
        r
        for r in parse_records(
            "".join(c.stderr_path.read_text(errors="replace") for c in site.running)
        )
        if r.get("message_id") == journal.RECEIVE_REFUSED and r.get("file") == name
    ]


def test_a_store_below_min_free_holds_that_file_and_no_collector(site: Site) -> None:
    with tmpfs(site.root / "remote" / COLLECTOR, "8M") as disk:
        _, port = start_with_min_free(site, Amount(percent=50))
        other = site.start(COLLECTOR2)
        # A long retry: the held file must not come back within this test by itself.
        conf = site.client_config(
            [Target(COLLECTOR, port), Target(COLLECTOR2, other.port)], retry=(60, 600)
        )
        big = random_file(site.root / "big.log", 5 * MiB)
        small = random_file(site.root / "small.log", 20 * KiB)
        big_entry, small_entry = site.add(big, small, hosts=(COLLECTOR, COLLECTOR2))

        first = site.ship(conf)

        # 8 MiB - 5 MiB would leave less than half free: refused for now, before its data.
        assert first.returncode == EX_TEMPFAIL, first.stderr
        assert visible_files(site.store_dir(COLLECTOR)) == [small_entry]
        assert partials(site.store_dir(COLLECTOR)) == []
        assert visible_files(site.store_dir(COLLECTOR2)) == sorted([big_entry, small_entry])
        assert spool_entries(site.spool) == [big_entry]
        assert owed_hosts(site.spool, big_entry) == {COLLECTOR}
        # Neither collector is backed off: only the one file is held.
        assert retry_state(site.spool, COLLECTOR) is None
        assert retry_state(site.spool, COLLECTOR2) is None
        [refused] = refused_offers(site, big_entry)
        assert refused.get("reason") == "TEMPORARY_FAILURE"
        assert refused.get("min_free") == str(4 * MiB)
        assert int(refused.get("free")) > 5 * MiB
        assert "must stay free" in refused.message
        with Spool(str(site.spool)) as spool:
            [entry] = spool.pending()
            until, reason = spool.held_until(entry, COLLECTOR)
            assert entry.held == {COLLECTOR} and spool.hold_tries(entry, COLLECTOR) == 1
        assert until > time.time() and "TEMPORARY_FAILURE" in reason
        assert "held for now" in first.stderr
        # What `dlogctl status` shows for the collector: its last error, not a success.
        last = json.loads((site.spool / STATE_DIR / f"{COLLECTOR}.json").read_text())
        assert "1 refused for now" in last["last_error"] and "last_success" not in last

        # While the hold lasts the file is not offered again, and nothing else waits.
        second = site.ship(conf)
        assert second.returncode == EX_TEMPFAIL, second.stderr
        assert len(refused_offers(site, big_entry)) == 1
        assert retry_state(site.spool, COLLECTOR) is None

        # Space is freed; the hold's time passes (written as the shipper writes holds).
        resize(disk, "32M")
        with Spool(str(site.spool)) as spool:
            spool.hold(entry, COLLECTOR, time.time() - 1, reason, tries=1)
        third = site.ship(conf)

        assert third.returncode == 0, third.stderr
        assert "last_success" in json.loads(
            (site.spool / STATE_DIR / f"{COLLECTOR}.json").read_text()
        )
        assert sha256_of(site.store_dir(COLLECTOR) / big_entry) == sha256_of(big)
        assert spool_entries(site.spool) == []
        assert partials(site.store_dir(COLLECTOR)) == []


def test_a_disk_that_fills_mid_file_keeps_the_partial_and_shows_nothing(site: Site) -> None:
    with tmpfs(site.root / "remote" / COLLECTOR, "8M") as disk:
        collector = site.start()
        data = os.urandom(3 * MiB)
        frame = 256 * KiB
        first = RawSender(collector.port, site.pki.tls(site.pki.fleet.sender))
        try:
            assert isinstance(first.offer(hostile_offer("big.log", data)), Accept)
            first.send(*(Data(1, data[i : i + frame]) for i in range(0, MiB, frame)))
            held = site.store_dir() / ".dlogd-partial"
            wait_for(lambda: sum(p.stat().st_size for p in held.iterdir()) == MiB, 10, "1 MiB")
            fill(disk / "filler")  # someone else takes the rest of the disk
            first.send(*(Data(1, data[i : i + frame]) for i in range(MiB, len(data), frame)))
            first.send(EndOfData(1))
            failed = first.next()
        finally:
            first.close()

        assert isinstance(failed, Failed) and failed.code == Code.TEMPORARY_FAILURE, failed
        assert visible_files(site.store_dir()) == []
        [partial] = partials(site.store_dir())
        kept = (held / partial).stat().st_size
        assert MiB <= kept < len(data)

        (disk / "filler").unlink()
        again = RawSender(collector.port, site.pki.tls(site.pki.fleet.sender))
        try:
            accepted = again.offer(hostile_offer("big.log", data))
            assert isinstance(accepted, Accept) and accepted.offset == kept, accepted
            again.send(*(Data(1, data[i : i + frame]) for i in range(kept, len(data), frame)))
            again.send(EndOfData(1))
            assert isinstance(again.next(), Stored)
        finally:
            again.close()
        assert (site.store_dir() / "big.log").read_bytes() == data
        assert partials(site.store_dir()) == []


def test_a_disk_full_mid_file_holds_that_file_at_the_shipper(
    world: World, capfd: pytest.CaptureFixture[str]
) -> None:
    """The real shipper and collector back to back: three 3 MiB files offered in one
    window to an 8 MiB store, each fitting when offered (before any data): the third
    runs out of disk in the middle, FAILED TEMPORARY_FAILURE; the shipper holds that
    one file for now (not failed, not the collector), the partial stays, nothing of it
    is visible; with room again it resumes from the partial."""
    with tmpfs(world.root / "remote", "8M") as disk:
        contents = [os.urandom(3 * MiB) for _ in range(3)]
        names = [submit(world, f"{n}.log", data) for n, data in enumerate(contents)]

        first = converse(world, capfd)

        out = first.outcome
        assert (out.delivered, out.deferred, out.failed, out.error) == (2, 1, 0, None), out
        assert out.complete, "a file refused for now does not back the collector off"
        visible = visible_files(world.store())
        assert visible == names[:2]
        [partial] = partials(world.store())
        kept = (world.store() / ".dlogd-partial" / partial).stat().st_size
        assert 0 < kept < 3 * MiB
        [left] = owed(world)
        assert left.name == names[2] and left.held == {COLLECTOR}
        with Spool(str(world.spool)) as spool:
            assert spool.hold_tries(left, COLLECTOR) == 1
            assert "failed: TEMPORARY_FAILURE" in spool.held_until(left, COLLECTOR)[1]

        resize(disk, "32M")
        second = converse(world, capfd)

    assert (second.outcome.delivered, second.outcome.deferred) == (1, 0), second.outcome
    resumed = [r for r in second.records if r.get("file") == names[2] and "resuming" in r.message]
    assert resumed and resumed[0].message.rsplit(" ", 1)[-1] == str(kept)
    assert owed(world) == []


def fill(path: Path) -> None:
    """Write until the file system says ENOSPC."""
    chunk = b"\0" * (64 * KiB)
    with path.open("wb", buffering=0) as out, contextlib.suppress(OSError):
        while True:
            out.write(chunk)
    assert shutil.disk_usage(path.parent).free < 64 * KiB
