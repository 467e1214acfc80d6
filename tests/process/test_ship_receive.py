"""dlogd-ship and dlogd-receive as processes, over real mutual TLS on loopback.

The collector runs standalone (``--listen 127.0.0.1:0``, a thread per
connection) or exactly as systemd runs it (``systemd-socket-activate
--accept``: one process per connection on fd 3); the shipper is ``python -m
dlogd.ship`` draining a spool filled by the real :class:`dlogd.spool.Spool`.
Hostile senders are a small raw client built from dlogd.shipwire and dlogd.tls,
free to put on the wire what the shipper never would.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path

import pytest

from dlogd import pki
from dlogd.config import TLSFiles
from dlogd.shipwire import (
    DATA_HEADER,
    HEADER,
    NEED_DATA,
    Accept,
    Code,
    Connection,
    Data,
    EndOfData,
    Error,
    Event,
    Failed,
    HelloReply,
    Kind,
    NeedData,
    Offer,
    Refuse,
    Role,
    Stored,
    encode,
)
from dlogd.spool import TRIGGER
from dlogd.store import partial_name
from dlogd.tls import TLSStream, client_context
from tests.shipharness import (
    COLLECTOR2,
    EX_TEMPFAIL,
    KEYWORD,
    Collector,
    Record,
    ShipRun,
    Site,
    Target,
    free_port,
    make_file,
    owed_hosts,
    partials,
    peer_refusals,
    pki_set,
    random_file,
    retry_state,
    sha256_of,
    site,
    sparse_file,
    spool_entries,
    visible_files,
    wait_for,
)
from tests.tlsfixtures import COLLECTOR, LOOPBACK

pytestmark = pytest.mark.process

__all__ = ["pki_set", "site"]  # fixtures, re-exported for pytest

MEMORY_BOUND_KIB = 150 * 1024
GIB = 1 << 30


def stored(records: list[Record]) -> list[Record]:
    return [r for r in records if r.message.endswith(": stored")]


def assert_delivered(site: Site, run: ShipRun, sources: list[Path], entries: list[str]) -> None:
    """Every source is in the collector directory under its entry name, byte for byte."""
    assert run.returncode == 0, run.stderr
    directory = site.store_dir()
    assert visible_files(directory) == sorted(entries)
    for source, entry in zip(sources, entries, strict=True):
        assert sha256_of(directory / entry) == sha256_of(source)
    assert spool_entries(site.spool) == []
    # The drain took the trigger file: dlogd-ship.path does not start it again.
    assert not (site.spool / TRIGGER).exists()
    assert not (site.spool / KEYWORD / ".owed").exists() or not any(
        (site.spool / KEYWORD / ".owed").iterdir()
    )
    assert retry_state(site.spool, COLLECTOR) is None


# --- delivery --------------------------------------------------------------------------


@pytest.mark.parametrize("activated", [False, True], ids=["standalone", "socket-activated"])
def test_single_file_is_stored_byte_identical(site: Site, activated: bool) -> None:
    collector = site.start(activated=activated)
    site.client_config([Target(COLLECTOR, collector.port)])
    source = random_file(site.root / "app.log", 100_000)
    entries = site.add(source)

    run = site.ship()

    assert_delivered(site, run, [source], entries)
    (record,) = stored(collector.records())
    assert record.get("file") == entries[0]
    assert record.get("sha256") == sha256_of(source)
    assert record.get("host") == "web1"
    # Which certificate sent it (issue 10: a renewal shows in the journal).
    sender_cert = pki.load_certificate(site.pki.fleet.sender.certificate)
    assert int(record.get("peer_serial"), 16) == sender_cert.serial_number


def test_empty_file_is_stored(site: Site) -> None:
    collector = site.start()
    site.client_config([Target(COLLECTOR, collector.port)])
    source = make_file(site.root / "empty.log", b"")
    entries = site.add(source)

    run = site.ship()

    assert_delivered(site, run, [source], entries)
    assert (site.store_dir() / entries[0]).stat().st_size == 0


@pytest.mark.slow
def test_one_gib_file_in_flat_memory(site: Site) -> None:
    collector = site.start()
    site.client_config([Target(COLLECTOR, collector.port)])
    source = sparse_file(site.root / "big.log", GIB)
    entries = site.add(source)

    run = site.ship()

    assert run.returncode == 0, run.stderr
    collector_peak = collector.vm_hwm_kib()
    stored_file = site.store_dir() / entries[0]
    assert stored_file.stat().st_size == GIB
    assert sha256_of(stored_file) == sha256_of(source)
    print(f"peak RSS: shipper {run.maxrss_kib} KiB, collector {collector_peak} KiB")
    # Memory must not grow with file size (invariant 6): a 1 GiB file in well under 150 MB.
    assert run.maxrss_kib < MEMORY_BOUND_KIB, f"shipper peaked at {run.maxrss_kib} KiB"
    assert collector_peak < MEMORY_BOUND_KIB, f"collector peaked at {collector_peak} KiB"


def test_two_thousand_small_files_in_one_connection(site: Site) -> None:
    collector = site.start(activated=True)
    site.client_config([Target(COLLECTOR, collector.port)])
    sources_dir = site.root / "src"
    sources_dir.mkdir()
    sources = [
        make_file(sources_dir / f"f{i:04d}.log", f"line {i}\n".encode() * (i % 7 + 1))
        for i in range(2000)
    ]
    entries = site.add(*sources)

    run = site.ship()

    assert_delivered(site, run, sources, entries)
    records = stored(collector.records())
    assert len(records) == 2000
    peers = {r.get("peer") for r in records}
    assert len(peers) == 1, f"expected one connection, saw {len(peers)}: {sorted(peers)[:5]}"
    assert next(iter(peers)).startswith(f"{LOOPBACK}:")


def test_two_collectors_each_get_a_copy(site: Site) -> None:
    one, two = site.start(COLLECTOR), site.start(COLLECTOR2)
    site.client_config([Target(COLLECTOR, one.port), Target(COLLECTOR2, two.port)])
    source = random_file(site.root / "both.log", 50_000)
    (entry,) = site.add(source, hosts=(COLLECTOR, COLLECTOR2))

    run = site.ship()

    assert run.returncode == 0, run.stderr
    for name in (COLLECTOR, COLLECTOR2):
        assert visible_files(site.store_dir(name)) == [entry]
        assert sha256_of(site.store_dir(name) / entry) == sha256_of(source)
    assert spool_entries(site.spool) == []


def test_a_dead_collector_does_not_hold_up_the_others(site: Site) -> None:
    one = site.start(COLLECTOR)
    dead_port = free_port()  # nobody listens here yet
    config = site.client_config([Target(COLLECTOR, one.port), Target(COLLECTOR2, dead_port)])
    source = random_file(site.root / "both.log", 50_000)
    (entry,) = site.add(source, hosts=(COLLECTOR, COLLECTOR2))

    first = site.ship(config)

    assert first.returncode == EX_TEMPFAIL, first.stderr
    assert visible_files(site.store_dir(COLLECTOR)) == [entry]
    assert visible_files(site.store_dir(COLLECTOR2)) == []
    assert spool_entries(site.spool) == [entry], "entry removed before every host acked"
    assert owed_hosts(site.spool, entry) == {COLLECTOR2}
    assert retry_state(site.spool, COLLECTOR2) is not None
    assert retry_state(site.spool, COLLECTOR) is None

    site.start(COLLECTOR2, port=dead_port)
    site.clear_retry()
    second = site.ship(config)

    assert second.returncode == 0, second.stderr
    assert sha256_of(site.store_dir(COLLECTOR2) / entry) == sha256_of(source)
    assert spool_entries(site.spool) == []
    assert len(stored(one.records())) == 1, "the collector that had its copy got another"


# --- refused peers -------------------------------------------------------------------------


def assert_kept_for_retry(
    site: Site, run: ShipRun, entries: list[str], host: str = COLLECTOR
) -> None:
    """Nothing stored anywhere, the spool entry still owed, a backoff on disk."""
    assert run.returncode == EX_TEMPFAIL, run.stderr
    assert visible_files(site.store_dir(host)) == []
    assert partials(site.store_dir(host)) == []
    assert spool_entries(site.spool) == entries
    for entry in entries:
        assert owed_hosts(site.spool, entry) == {host}
    state = retry_state(site.spool, host)
    assert state is not None and state["failures"] == 1
    assert state["next"] > time.time() - 1


def ship_one(
    site: Site, collector: Collector, tls: TLSFiles | None = None
) -> tuple[ShipRun, list[str]]:
    """One 10,000-byte file shipped to ``collector``, the client holding ``tls``."""
    site.client_config([Target(COLLECTOR, collector.port)], tls=tls)
    entries = site.add(random_file(site.root / "x.log", 10_000))
    return site.ship(), entries


def one_refusal(collector: Collector) -> Record:
    refusals = peer_refusals(collector.records())
    assert len(refusals) == 1, collector.stderr_path.read_text()
    assert refusals[0].get("peer").startswith(f"{LOOPBACK}:")
    return refusals[0]


def test_client_certificate_from_another_ca_is_refused(site: Site) -> None:
    collector = site.start()
    run, entries = ship_one(site, collector, tls=site.pki.impostor_tls(site.pki.impostor.sender))
    assert_kept_for_retry(site, run, entries)
    refusal = one_refusal(collector)
    assert "unable to get local issuer certificate" in refusal.get("reason")


def test_failed_handshake_log_names_the_certificate_presented(site: Site) -> None:
    collector = site.start()
    ship_one(site, collector, tls=site.pki.impostor_tls(site.pki.impostor.sender))
    assert "web1" in one_refusal(collector).get("identity")


def test_collector_certificate_from_another_ca_is_refused(site: Site) -> None:
    impostor = site.pki.impostor_tls(site.pki.impostor.collector)
    collector = site.start(tls=impostor)
    run, entries = ship_one(site, collector)
    assert_kept_for_retry(site, run, entries)
    assert "unable to get local issuer certificate" in run.stderr
    one_refusal(collector)  # the collector saw the shipper abort the handshake


def test_expired_client_certificate_is_refused(site: Site) -> None:
    collector = site.start()
    run, entries = ship_one(site, collector, tls=site.pki.tls(site.pki.fleet.expired))
    assert_kept_for_retry(site, run, entries)
    assert "certificate has expired" in one_refusal(collector).get("reason")


def test_unknown_sender_name_is_refused(site: Site) -> None:
    collector = site.start()
    run, entries = ship_one(site, collector, tls=site.pki.tls(site.pki.fleet.cn_only))
    assert_kept_for_retry(site, run, entries)
    refusal = one_refusal(collector)
    assert refusal.get("reason").startswith("unknown-name")
    assert "CN=db1" in refusal.get("identity")
    assert pki.fingerprint(site.pki.fleet.cn_only.certificate) in refusal.get("identity")


def test_sender_from_the_wrong_address_is_refused(site: Site) -> None:
    collector = site.start(senders={"web1": "127.0.0.2"})
    run, entries = ship_one(site, collector)
    assert_kept_for_retry(site, run, entries)
    refusal = one_refusal(collector)
    assert refusal.get("reason").startswith("address-mismatch")
    assert refusal.get("reason").count("address-mismatch") == 1  # said once, not twice
    assert "CN=web1" in refusal.get("identity")


def test_collector_pin_mismatch_is_refused_by_the_shipper(site: Site) -> None:
    collector = site.start()
    wrong_pin = pki.fingerprint(site.pki.collector2.certificate)  # a real cert, not logs1's
    site.client_config([Target(COLLECTOR, collector.port, fingerprint=wrong_pin)])
    entries = site.add(random_file(site.root / "x.log", 10_000))

    run = site.ship()

    assert_kept_for_retry(site, run, entries)
    (retry,) = [r for r in run.records if r.get("host") == COLLECTOR and r.get("reason")]
    assert retry.get("reason").startswith("pin-mismatch")
    assert pki.fingerprint(site.pki.fleet.collector.certificate) in retry.get("reason")
    assert stored(collector.records()) == []


def test_shipper_hanging_up_after_the_handshake_does_not_crash_the_collector(site: Site) -> None:
    collector = site.start()
    wrong_pin = pki.fingerprint(site.pki.collector2.certificate)
    site.client_config([Target(COLLECTOR, collector.port, fingerprint=wrong_pin)])
    site.add(random_file(site.root / "x.log", 1000))
    # The race (RST before getpeername) is lost ~9 times in 10; five tries make it certain.
    for _ in range(5):
        site.clear_retry()
        assert site.ship().returncode == EX_TEMPFAIL
    time.sleep(0.3)
    assert "Traceback" not in collector.stderr_path.read_text()


def test_plaintext_client_is_refused(site: Site) -> None:
    collector = site.start(activated=True)
    with socket.create_connection((LOOPBACK, collector.port), timeout=5) as raw:
        ours = f"{LOOPBACK}:{raw.getsockname()[1]}"
        raw.sendall(b"GET / HTTP/1.0\r\nHost: logs1\r\n\r\n")
        raw.shutdown(socket.SHUT_WR)
        try:
            answer = raw.recv(4096)  # a TLS alert, or nothing
        except ConnectionResetError:
            answer = b""
    assert not answer.startswith(b"HTTP"), answer
    wait_for_refusal(collector)
    refusal = one_refusal(collector)
    assert refusal.get("peer") == ours
    assert "not speaking TLS" in refusal.get("reason")
    assert visible_files(site.store_dir()) == []


def wait_for_refusal(collector: Collector, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not peer_refusals(collector.records()):
        assert time.monotonic() < deadline, collector.stderr_path.read_text()
        time.sleep(0.02)


# --- refused files -------------------------------------------------------------------------


def assert_held(site: Site, run: ShipRun, entry: str, code: str, keyword: str = KEYWORD) -> None:
    """Refused for good: kept and owed, the reason in its marker, the collector not backed off."""
    assert run.returncode == EX_TEMPFAIL, run.stderr
    assert spool_entries(site.spool, keyword) == [entry]
    assert owed_hosts(site.spool, entry, keyword) == {COLLECTOR}
    hold = json.loads((site.spool / keyword / ".owed" / entry / COLLECTOR).read_text())
    assert code in hold["reason"]
    assert hold["until"] > time.time() + 5  # retry { max 10 }: held for the longest backoff
    assert retry_state(site.spool, COLLECTOR) is None
    assert any(r.get("reason") == code for r in run.records), run.stderr


def test_keyword_the_host_may_not_send_is_refused_and_held(site: Site) -> None:
    collector = site.start()
    site.client_config(
        [Target(COLLECTOR, collector.port)], keywords={KEYWORD: [COLLECTOR], "secrets": [COLLECTOR]}
    )
    (entry,) = site.add(random_file(site.root / "s.log", 1000), keyword="secrets")

    run = site.ship()

    assert_held(site, run, entry, "KEYWORD_NOT_ALLOWED", keyword="secrets")
    assert any(r.get("reason") == "KEYWORD_NOT_ALLOWED" for r in collector.records())
    assert not (site.root / "remote" / COLLECTOR / "web1" / "secrets").exists()


def test_a_held_file_does_not_hold_up_the_others(site: Site) -> None:
    """One refused file must not put its whole collector into backoff (review F3)."""
    collector = site.start(max_file_size="4K")
    site.client_config([Target(COLLECTOR, collector.port)])
    (big,) = site.add(random_file(site.root / "big.log", 10_000))
    assert_held(site, site.ship(), big, "TOO_LARGE")
    refusals = len([r for r in collector.records() if r.get("reason") == "TOO_LARGE"])

    (small,) = site.add(make_file(site.root / "small.log", b"small\n"))
    run = site.ship()

    assert run.returncode == EX_TEMPFAIL, run.stderr  # the held one is still owed
    assert visible_files(site.store_dir()) == [small]
    assert spool_entries(site.spool) == [big]
    # Not offered again while held: the collector saw no second refusal.
    assert len([r for r in collector.records() if r.get("reason") == "TOO_LARGE"]) == refusals


def test_every_conflict_name_taken_is_held_as_name_conflict(site: Site) -> None:
    """The store's "every conflict name is taken" is permanent: sent as NAME_CONFLICT and
    held, not as INTERNAL, which the shipper counted as temporary (issue 13)."""
    from dlogd.names import MAX_CONFLICTS

    collector = site.start()
    site.client_config([Target(COLLECTOR, collector.port)])
    (entry,) = site.add(make_file(site.root / "taken.log", b"the new one\n"))
    site.store_dir().mkdir(parents=True)
    for n in range(MAX_CONFLICTS + 1):
        name = entry if n == 0 else f"{entry}.conflict-{n}"
        (site.store_dir() / name).write_bytes(f"another file {n}\n".encode())

    run = site.ship()

    assert_held(site, run, entry, "NAME_CONFLICT")
    assert len(visible_files(site.store_dir())) == MAX_CONFLICTS + 1  # nothing replaced


def test_a_collector_directory_behind_a_symlink_is_held_as_internal(site: Site) -> None:
    """A store error that only an operator can cure holds the file (INTERNAL is permanent)."""
    elsewhere = site.root / "elsewhere"
    elsewhere.mkdir()
    site.store_dir().parent.mkdir(parents=True)
    site.store_dir().symlink_to(elsewhere)
    collector = site.start()
    site.client_config([Target(COLLECTOR, collector.port)])
    (entry,) = site.add(make_file(site.root / "a.log", b"a\n"))

    run = site.ship()

    assert_held(site, run, entry, "INTERNAL")
    assert list(elsewhere.iterdir()) == []  # the symlink was not followed


# --- dedup ---------------------------------------------------------------------------------


def test_same_entry_twice_is_stored_once(site: Site) -> None:
    collector = site.start()
    site.client_config([Target(COLLECTOR, collector.port)])
    source = random_file(site.root / "dup.log", 20_000)
    when = time.time()
    (entry,) = site.add(source, now=when)
    assert site.ship().returncode == 0

    (again,) = site.add(source, now=when)  # the resend after a lost acknowledgement
    assert again == entry
    run = site.ship()

    assert run.returncode == 0, run.stderr
    assert "already stored there" in run.stderr
    assert visible_files(site.store_dir()) == [entry]
    assert spool_entries(site.spool) == []
    assert any(r.message.endswith(": already stored") for r in collector.records())


def test_different_file_under_a_taken_name_becomes_a_conflict_copy(site: Site) -> None:
    collector = site.start()
    site.client_config([Target(COLLECTOR, collector.port)])
    (site.root / "a").mkdir()
    (site.root / "b").mkdir()
    first = random_file(site.root / "a" / "same.log", 5000)
    second = random_file(site.root / "b" / "same.log", 6000)
    when = time.time()
    (entry,) = site.add(first, now=when)
    assert site.ship().returncode == 0
    (again,) = site.add(second, now=when)
    assert again == entry

    run = site.ship()

    assert run.returncode == 0, run.stderr
    directory = site.store_dir()
    assert visible_files(directory) == sorted([entry, f"{entry}.conflict-1"])
    assert sha256_of(directory / entry) == sha256_of(first)
    assert sha256_of(directory / f"{entry}.conflict-1") == sha256_of(second)


# --- hostile senders -----------------------------------------------------------------------


class RawSender:
    """A sender speaking the protocol by hand over real mutual TLS (web1's certificate)."""

    def __init__(self, port: int, tls: TLSFiles) -> None:
        sock = socket.create_connection((LOOPBACK, port), timeout=5)
        self.stream = TLSStream(sock, client_context(tls), server_side=False, timeout=5)
        self.stream.handshake()
        self.conn = Connection(Role.SENDER)
        self.stream.sendall(self.conn.send(self.conn.hello()))
        assert isinstance(self.next(), HelloReply)

    def close(self) -> None:
        self.stream.close()

    def next(self) -> Event:
        """The collector's next message (an Error is returned, not raised)."""
        while True:
            event = self.conn.next_event()
            if event is not NEED_DATA:
                assert not isinstance(event, NeedData)
                return event
            self.conn.receive_data(self.stream.recv(65536))

    def offer(self, offer: Offer, wire: bytes | None = None) -> Event:
        """Offer ``offer`` as far as our state machine knows; ``wire`` is what is really sent."""
        data = self.conn.send(offer)
        assert wire is None or len(wire) == len(data)
        self.stream.sendall(wire if wire is not None else data)
        return self.next()

    def send(self, *events: Event) -> None:
        """Events through our state machine: what an honest sender would say."""
        self.stream.sendall(b"".join(self.conn.send(e) for e in events))

    def send_raw(self, data: bytes) -> None:
        """Bytes our state machine never sees: what only a liar would say."""
        self.stream.sendall(data)


def hostile_offer(name: str, data: bytes, digest: bytes | None = None) -> Offer:
    return Offer(1, KEYWORD, name, len(data), digest or hashlib.sha256(data).digest())


def answer_code(event: Event) -> Code:
    assert isinstance(event, Refuse | Error | Failed), event
    return event.code


@pytest.fixture
def hostile(site: Site) -> tuple[Site, Collector]:
    return site, site.start()


def raw_sender(site: Site, collector: Collector) -> RawSender:
    return RawSender(collector.port, site.pki.tls(site.pki.fleet.sender))


def assert_nothing_visible(site: Site) -> None:
    assert visible_files(site.store_dir()) == []


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("../x", Code.BAD_NAME),
        (".hidden", Code.BAD_NAME),
        ("x" * 250, Code.BAD_NAME),  # fits the protocol's 255, not the store's 240
        ("--delete", Code.BAD_NAME),  # read as an option by a tool run on the store
    ],
)
def test_hostile_names_are_refused(hostile: tuple[Site, Collector], name: str, code: Code) -> None:
    site, collector = hostile
    sender = raw_sender(site, collector)
    data = b"payload\n"
    try:
        if "/" in name:
            # The Offer constructor itself refuses "/": build a valid offer and patch its bytes.
            valid = hostile_offer(name.replace("/", "_"), data)
            answer = sender.offer(valid, encode(valid).replace(b".._x", b"../x"))
        else:
            answer = sender.offer(hostile_offer(name, data))
    finally:
        sender.close()
    assert answer_code(answer) == code
    assert_nothing_visible(site)
    assert partials(site.store_dir()) == []


def test_name_with_a_nul_byte_is_refused(hostile: tuple[Site, Collector]) -> None:
    site, collector = hostile
    sender = raw_sender(site, collector)
    valid = hostile_offer("evil_name.log", b"data")
    wire = encode(valid).replace(b"evil_name.log", b"evil\0name.log")
    try:
        answer = sender.offer(valid, wire)
    finally:
        sender.close()
    assert answer_code(answer) == Code.BAD_NAME
    assert_nothing_visible(site)


def test_name_longer_than_the_wire_allows_is_malformed(hostile: tuple[Site, Collector]) -> None:
    site, collector = hostile
    sender = raw_sender(site, collector)
    valid = hostile_offer("n" * 44, b"data")
    body = encode(valid)[HEADER.size :]
    # A 300-byte name cannot be said in the u8 length field: 300 & 0xff = 44 bytes of
    # name, then 256 bytes the receiver must reject as trailing garbage.
    long_body = body + b"n" * 256
    wire = HEADER.pack(Kind.OFFER, len(long_body)) + long_body
    try:
        sender.conn.send(valid)
        sender.send_raw(wire)
        answer = sender.next()
    finally:
        sender.close()
    assert answer_code(answer) == Code.MALFORMED
    assert_nothing_visible(site)


def accept_offer(sender: RawSender, offer: Offer) -> None:
    answer = sender.offer(offer)
    assert isinstance(answer, Accept) and answer.offset == 0, answer


def data_frame(file_id: int, payload: bytes) -> bytes:
    return DATA_HEADER.pack(Kind.DATA, 4 + len(payload), file_id) + payload


def test_more_bytes_than_announced_is_a_size_mismatch(hostile: tuple[Site, Collector]) -> None:
    site, collector = hostile
    sender = raw_sender(site, collector)
    offer = hostile_offer("liar.log", b"0123456789")
    try:
        accept_offer(sender, offer)
        sender.send_raw(data_frame(1, b"0123456789" * 2))
        answer = sender.next()
    finally:
        sender.close()
    assert answer_code(answer) == Code.SIZE_MISMATCH
    assert_nothing_visible(site)
    assert_no_partial_holds_data(site)


def assert_no_partial_holds_data(site: Site) -> None:
    partial_dir = site.store_dir() / ".dlogd-partial"
    sizes = {p: (partial_dir / p).stat().st_size for p in partials(site.store_dir())}
    assert all(size == 0 for size in sizes.values()), sizes


def test_fewer_bytes_then_end_of_data_is_a_size_mismatch(hostile: tuple[Site, Collector]) -> None:
    site, collector = hostile
    sender = raw_sender(site, collector)
    data = b"0123456789"
    offer = hostile_offer("short.log", data)
    try:
        accept_offer(sender, offer)
        sender.send_raw(data_frame(1, data[:5]) + encode(EndOfData(1)))
        answer = sender.next()
    finally:
        sender.close()
    # As docs/protocol.md says: a protocol error ending the connection, not a FAILED.
    assert isinstance(answer, Error) and answer.code == Code.SIZE_MISMATCH, answer
    assert_nothing_visible(site)
    # The 5 true bytes may stay for a resume, under the offer's key, and nothing more.
    for name in partials(site.store_dir()):
        assert name == partial_name("short.log", hashlib.sha256(data).digest(), len(data))
        assert (site.store_dir() / ".dlogd-partial" / name).read_bytes() == data[:5]


def test_wrong_digest_fails_and_leaves_nothing(hostile: tuple[Site, Collector]) -> None:
    site, collector = hostile
    sender = raw_sender(site, collector)
    data = b"the real bytes\n"
    offer = hostile_offer("forged.log", data, hashlib.sha256(b"other bytes").digest())
    try:
        accept_offer(sender, offer)
        sender.send(Data(1, data), EndOfData(1))
        answer = sender.next()
    finally:
        sender.close()
    assert isinstance(answer, Failed), answer
    assert answer.code == Code.DIGEST_MISMATCH
    assert_nothing_visible(site)
    assert partials(site.store_dir()) == []


def test_honest_raw_sender_is_stored(hostile: tuple[Site, Collector]) -> None:
    """The raw client is trustworthy as a probe: done right, the collector stores its file."""
    site, collector = hostile
    sender = raw_sender(site, collector)
    data = b"honest\n"
    offer = hostile_offer("honest.log", data)
    try:
        accept_offer(sender, offer)
        sender.send(Data(1, data), EndOfData(1))
        answer = sender.next()
    finally:
        sender.close()
    assert isinstance(answer, Stored), answer
    assert (site.store_dir() / "honest.log").read_bytes() == data


def test_sender_with_no_common_version_is_told_why_and_logged(site: Site) -> None:
    collector = site.start()
    tls = site.pki.tls(site.pki.fleet.sender)
    sock = socket.create_connection((LOOPBACK, collector.port), timeout=5)
    stream = TLSStream(sock, client_context(tls), server_side=False, timeout=5)
    try:
        stream.handshake()
        conn = Connection(Role.SENDER, versions=(2,))
        stream.sendall(conn.send(conn.hello()))
        reply = b""
        while chunk := stream.recv(65536):
            reply += chunk
    finally:
        stream.close()
    conn.receive_data(reply)
    answer = conn.next_event()
    assert isinstance(answer, Error)
    assert answer.code == Code.UNSUPPORTED_VERSION
    refusal = one_refusal(collector)
    assert refusal.get("reason").startswith("UNSUPPORTED_VERSION")
    assert "Traceback" not in collector.stderr_path.read_text()


def test_an_idle_sender_is_told_timeout(site: Site) -> None:
    """The collector's idle timer ends the connection with ERROR TIMEOUT, as the spec says."""
    collector = site.start(timeout=1)
    tls = site.pki.tls(site.pki.fleet.sender)
    sock = socket.create_connection((LOOPBACK, collector.port), timeout=10)
    stream = TLSStream(sock, client_context(tls), server_side=False, timeout=10)
    conn = Connection(Role.SENDER)
    try:
        stream.handshake()
        stream.sendall(conn.send(conn.hello()))
        reply = b""
        while chunk := stream.recv(65536):  # then nothing more: the collector gives up
            reply += chunk
    finally:
        stream.close()
    conn.receive_data(reply)
    assert isinstance(conn.next_event(), HelloReply)
    told = conn.next_event()
    assert isinstance(told, Error) and told.code == Code.TIMEOUT, told
    # Logged once the collector has hung up, which may be just after we saw it do so.
    wait_for(
        lambda: any(r.get("reason") == "TIMEOUT" for r in collector.records()),
        10,
        "the collector's TIMEOUT record",
    )


@pytest.mark.slow
def test_hashing_a_window_of_big_files_keeps_the_collector_listening(site: Site) -> None:
    """Offers wait for their digests; the collector's idle timer must not fire meanwhile
    (review F1: 12 x 200 MiB with a 1 s timeout delivered nothing)."""
    collector = site.start(timeout=1)
    site.client_config([Target(COLLECTOR, collector.port)], timeout=1)
    entries = site.add(*(sparse_file(site.root / f"big{n}.log", 200 << 20) for n in range(12)))
    run = site.ship()
    assert run.returncode == 0, run.stderr
    assert visible_files(site.store_dir()) == sorted(entries)


def test_a_file_offered_twice_in_one_window_is_stored_then_already_stored(
    hostile: tuple[Site, Collector],
) -> None:
    """The second offer of the file in flight waits for the first copy (issue 9 item 4):
    ALREADY_STORED once that one is durable, never FAILED nor a refusal."""
    site, collector = hostile
    sender = raw_sender(site, collector)
    data = b"twice in one window\n" * 100
    first = hostile_offer("twice.log", data)
    second = Offer(2, KEYWORD, first.name, first.size, first.sha256)
    try:
        sender.send(first, second)
        answer = sender.next()
        assert isinstance(answer, Accept) and answer.file_id == 1, answer
        sender.send(Data(1, data), EndOfData(1))
        answers = [sender.next(), sender.next()]
    finally:
        sender.close()
    assert [(type(a).__name__, getattr(a, "file_id", None)) for a in answers] == [
        ("Stored", 1),
        ("AlreadyStored", 2),
    ], answers
    assert (site.store_dir() / "twice.log").read_bytes() == data
    assert visible_files(site.store_dir()) == ["twice.log"]


def test_an_offer_the_disk_cannot_take_is_refused_before_its_data(site: Site) -> None:
    """Refused for now at the offer (issue 9 item 10): a full disk must not make the
    shipper send the data first, on every retry, only to be told FAILED."""
    collector = site.start(max_file_size="1000T")
    fs = os.statvfs(site.root)
    too_big = fs.f_bavail * fs.f_frsize + (1 << 30)
    sender = raw_sender(site, collector)
    try:
        answer = sender.offer(Offer(1, KEYWORD, "huge.log", too_big, hashlib.sha256().digest()))
    finally:
        sender.close()
    assert isinstance(answer, Refuse) and answer.code == Code.TEMPORARY_FAILURE, answer
    assert "free in" in answer.message
    wait_for(
        lambda: any(
            r.get("file") == "huge.log" and r.get("reason") == "TEMPORARY_FAILURE"
            for r in collector.records()
        ),
        10,
        "the refusal journalled",
    )
    assert partials(site.store_dir()) == []
