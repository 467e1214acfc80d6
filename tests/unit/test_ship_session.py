"""The real shipper and the real collector, joined back to back over a socket pair.

As h11's tests join a client and a server: ``ship.Delivery`` (the SENDER)
and ``receive.serve`` (the collector's whole connection: TLS, identity,
``Session``) talk over ``socket.socketpair()`` with real mutual TLS, a real
spool and real store directories, in one process. Every case the protocol
knows meets in one connection: a fresh file, a resumed one, one already
stored, one with a keyword the sender may not send, an empty one, and a
different file under a taken name.
"""

from __future__ import annotations

import hashlib
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from dlogd import config as configuration
from dlogd import receive
from dlogd.config import (
    ClientConfig,
    ClientKeyword,
    Host,
    Limits,
    ServerConfig,
    ServerKeyword,
)
from dlogd.names import MIN_FRAME
from dlogd.ship import CollectorResult, Delivery
from dlogd.spool import Entry, SharedSpool, Spool
from dlogd.store import PARTIAL_DIR, partial_name
from dlogd.tls import TLSStream, check_collector, client_context
from tests.shipharness import Record, parse_records, spool_files
from tests.tlsfixtures import COLLECTOR, SENDER, Fleet

KEYWORDS = ("audit", "secret")  # the collector takes only "audit" from web1


@dataclass
class World:
    root: Path
    client: ClientConfig
    server: ServerConfig

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    def store(self, keyword: str = "audit") -> Path:
        return self.root / "remote" / keyword


@pytest.fixture
def world(tmp_path: Path, fleet: Fleet) -> World:
    # A small frame and window: several frames per file, offers held by the window.
    limits = Limits(timeout=10, window=3, frame_size=MIN_FRAME)
    collector = Host(COLLECTOR, COLLECTOR)
    client = ClientConfig(
        keywords={k: ClientKeyword(k, frozenset({0}), frozenset(), (COLLECTOR,)) for k in KEYWORDS},
        hosts={COLLECTOR: collector},
        spool=str(tmp_path / "spool"),
        tls=fleet.tls(fleet.sender),
        limits=limits,
    )
    server = ServerConfig(
        keywords={"audit": ServerKeyword("audit", {SENDER: str(tmp_path / "remote" / "audit")})},
        hosts={SENDER: Host(SENDER, SENDER)},
        tls=fleet.tls(fleet.collector),
        limits=limits,
    )
    # Through the config's own writer and loader, as the services would read them.
    loaded = []
    for cfg, role in ((client, "client"), (server, "server")):
        path = tmp_path / f"{role}.conf"
        path.write_text(configuration.to_text(cfg))
        loaded.append(configuration.check(str(path), role).config)
    assert isinstance(loaded[0], ClientConfig) and isinstance(loaded[1], ServerConfig)
    (tmp_path / "spool").mkdir()
    return World(tmp_path, loaded[0], loaded[1])


@dataclass
class Conversation:
    outcome: CollectorResult
    collector_status: int
    records: list[Record]


def converse(world: World, capfd: pytest.CaptureFixture[str]) -> Conversation:
    """One Delivery of everything owed, against one collector connection."""
    ours, theirs = socket.socketpair()
    status: list[int] = []
    collector = threading.Thread(
        target=lambda: status.append(receive.serve(theirs, world.server)), daemon=True
    )
    collector.start()

    def connect(host: Host, cfg: ClientConfig) -> TLSStream:
        stream = TLSStream(ours, client_context(cfg.tls), server_side=False, timeout=10)
        check_collector(stream.handshake(), host)
        return stream

    with Spool(str(world.spool)) as spool:
        entries = sorted(spool.pending(), key=lambda e: e.name)
        shared = SharedSpool(spool)
        try:
            outcome = Delivery(world.client, world.client.hosts[COLLECTOR], entries, shared).run(
                connect
            )
        finally:
            shared.close()
    collector.join(30)
    theirs.close()
    assert not collector.is_alive(), "the collector did not finish its side"
    return Conversation(outcome, status[0], parse_records(capfd.readouterr().err))


def submit(world: World, name: str, content: bytes, keyword: str = "audit") -> str:
    source = world.root / "src" / name
    source.parent.mkdir(exist_ok=True)
    source.write_bytes(content)
    (entry,) = spool_files(world.spool, [source], (COLLECTOR,), keyword=keyword, now=1_800_000_000)
    return entry


def stored(world: World) -> dict[str, bytes]:
    directory = world.store()
    return (
        {p.name: p.read_bytes() for p in directory.iterdir() if not p.name.startswith(".")}
        if directory.exists()
        else {}
    )


def owed(world: World) -> list[Entry]:
    with Spool(str(world.spool)) as spool:
        return list(spool.pending())


def test_every_case_in_one_connection(world: World, capfd: pytest.CaptureFixture[str]) -> None:
    big = bytes(range(256)) * 200
    fresh = submit(world, "fresh.log", b"hello\n" * 3000)
    resumed = submit(world, "resumed.log", big)
    dup = submit(world, "dup.log", b"seen before")
    secret = submit(world, "secret.log", b"wrong keyword", keyword="secret")
    empty = submit(world, "empty.log", b"")
    clash = submit(world, "clash.log", b"new content")
    late = submit(world, "late.log", b"after the window")
    # The collector already holds: an identical dup.log, a different clash.log, and
    # the first 7000 bytes of resumed.log from a broken transfer.
    world.store().mkdir(parents=True)
    (world.store() / dup).write_bytes(b"seen before")
    (world.store() / clash).write_bytes(b"old content")
    (world.store() / PARTIAL_DIR).mkdir()
    held = (
        world.store() / PARTIAL_DIR / partial_name(resumed, hashlib.sha256(big).digest(), len(big))
    )
    held.write_bytes(big[:7000])

    talk = converse(world, capfd)

    assert talk.collector_status == 0
    out = talk.outcome
    assert (out.owed, out.delivered, out.duplicates, out.held, out.failed) == (7, 5, 1, 1, 0)
    assert out.error is None
    assert stored(world) == {
        fresh: b"hello\n" * 3000,
        resumed: big,
        dup: b"seen before",
        empty: b"",
        clash: b"old content",
        f"{clash}.conflict-1": b"new content",
        late: b"after the window",
    }
    # Only what the collector lacked went over the wire for the resumed file.
    resumes = [r for r in talk.records if r.get("file") == resumed and "resuming" in r.message]
    assert {r.message.rsplit(" ", 1)[-1] for r in resumes} == {"7000"}
    # The refused one is held, still owed; everything else is acknowledged and gone.
    [left] = owed(world)
    assert (left.keyword, left.name, left.held) == ("secret", secret, frozenset({COLLECTOR}))
    assert any(r.get("reason") == "KEYWORD_NOT_ALLOWED" for r in talk.records)


def test_a_resend_after_a_lost_acknowledgement_is_recognised(
    world: World, capfd: pytest.CaptureFixture[str]
) -> None:
    files = {"a.log": b"a" * 100, "b.log": b"b" * 100}
    names = [submit(world, name, content) for name, content in files.items()]
    assert converse(world, capfd).outcome.delivered == 2
    # As if the acknowledgements had been lost: the same files, spooled again in the
    # same second, under the same entry names.
    assert [submit(world, name, content) for name, content in files.items()] == names

    second = converse(world, capfd)

    assert (second.outcome.delivered, second.outcome.duplicates) == (0, 2)
    assert owed(world) == []
    assert stored(world) == dict(zip(names, files.values(), strict=True))
