"""Unit tests for dlogd.shipwire: every message, every state, two real ends back to back.

The helpers here (Pair, SenderApp, ReceiverApp, converse) are also what
test_protocol_fuzz.py drives, so the fuzzer starts from conversations these
tests have shown to be valid.
"""

from __future__ import annotations

import hashlib
import re
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict, Unpack

import pytest

from dlogd.names import MAX_FRAME, MIN_FRAME
from dlogd.shipwire import (
    DATA_HEADER,
    HEADER,
    MAX_BUFFERED,
    MAX_MESSAGE,
    NEED_DATA,
    Accept,
    AlreadyStored,
    Code,
    Connection,
    ConnectionClosed,
    ConnState,
    Data,
    EndOfData,
    Error,
    Event,
    Failed,
    FileState,
    Goodbye,
    Hello,
    HelloReply,
    Kind,
    LocalProtocolError,
    Offer,
    Ping,
    Pong,
    ProtocolError,
    Refuse,
    RemoteProtocolError,
    Role,
    Stored,
    clip_message,
    decode,
    encode,
)

S, R = Role.SENDER, Role.RECEIVER
DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


class Limits(TypedDict, total=False):
    max_frame: int
    window: int


def other(who: Role) -> Role:
    return R if who is S else S


def digest(content: bytes) -> bytes:
    return hashlib.sha256(content).digest()


def drain(conn: Connection) -> list[Event]:
    """Every event the connection can produce from what it has been given."""
    events: list[Event] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return events
        events.append(event)
        if isinstance(event, ConnectionClosed | Error):
            return events


def coalesce(events: Iterable[Event]) -> list[Event]:
    """Adjacent Data events for one file joined: how a frame was cut is not observable."""
    out: list[Event] = []
    for event in events:
        last = out[-1] if out else None
        if isinstance(event, Data) and isinstance(last, Data) and last.file_id == event.file_id:
            out[-1] = Data(event.file_id, bytes(last.data) + bytes(event.data))
        elif isinstance(event, Data):
            out.append(Data(event.file_id, bytes(event.data)))
        else:
            out.append(event)
    return out


def feed(
    conn: Connection,
    data: bytes,
    chunk: int | None = None,
    on_event: Callable[[Event], object] | None = None,
) -> list[Event]:
    """Give ``data`` to ``conn`` in pieces of ``chunk`` bytes, taking every event out
    after each; ``on_event`` sees each event before the next is parsed, as an app would."""
    step = chunk or max(len(data), 1)
    events: list[Event] = []
    for start in range(0, len(data), step):
        conn.receive_data(data[start : start + step])
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
            if on_event is not None:
                on_event(event)
            if isinstance(event, ConnectionClosed | Error):
                return events
        assert conn.buffered <= MAX_BUFFERED
    return events


class Pair:
    """A sender and a receiver joined back to back (after h11/tests/helpers.py)."""

    def __init__(self, sender: Limits | None = None, receiver: Limits | None = None) -> None:
        self.conn = {S: Connection(S, **(sender or {})), R: Connection(R, **(receiver or {}))}

    def send(self, who: Role, *events: Event, expect: list[Event] | None = None) -> list[Event]:
        data = b"".join(self.conn[who].send(event) for event in events)
        got = coalesce(feed(self.conn[other(who)], data))
        assert got == (list(events) if expect is None else expect)
        return got

    def handshake(self) -> HelloReply:
        hello = self.conn[S].hello()
        self.send(S, hello)
        reply = self.conn[R].answer_hello(hello)
        assert isinstance(reply, HelloReply)
        self.send(R, reply)
        return reply

    def states(self) -> tuple[ConnState, ConnState]:
        return self.conn[S].state, self.conn[R].state


def offer(file_id: int, content: bytes = b"abc", name: str = "") -> Offer:
    return Offer(file_id, "audit", name or f"f{file_id}.log", len(content), digest(content))


# --- messages: bytes on the wire -----------------------------------------------------------

SAMPLES: list[Event] = [
    Hello(),
    Hello((1, 2, 7), MIN_FRAME, 1),
    HelloReply(1, MAX_FRAME, 1024),
    offer(0),
    Offer(2**32 - 1, "a" * 64, "n" * 255, 2**63 - 1, bytes(32)),
    Offer(5, "k", "ünïcødé log", 0, digest(b"")),
    Accept(3),
    Accept(3, 2**63 - 1),
    AlreadyStored(4),
    Refuse(5, Code.KEYWORD_NOT_ALLOWED, "host web1 may not send audit"),
    Refuse(5, Code.TOO_LARGE, "é" * 512),
    Data(6, b"x"),
    Data(6, bytes(range(256)) * 4096),
    EndOfData(7),
    Stored(8),
    Failed(9, Code.DIGEST_MISMATCH, "sha256 differs"),
    Ping(),
    Ping(2**64 - 1),
    Pong(12345),
    Goodbye(),
    Error(Code.INTERNAL, ""),
    Error(Code.TIMEOUT, "idle for 300 s"),
]


@pytest.mark.parametrize("event", SAMPLES, ids=repr)
def test_every_message_round_trips(event: Event) -> None:
    wire = encode(event)
    assert decode(wire) == event
    _, length = HEADER.unpack_from(wire)
    assert length == len(wire) - HEADER.size


# Byte layouts as written in docs/protocol.md, spelled out by hand.
GOLDEN: list[tuple[Event, str]] = [
    (Hello((1,), 262144, 128), "01 0000000d 444c4f47 01 0001 00040000 0080"),
    (HelloReply(1, 65536, 16), "02 00000008 0001 00010000 0010"),
    (
        Offer(1, "ab", "x.log", 3, bytes(range(32))),
        "10 00000035 00000001 0000000000000003 "
        + bytes(range(32)).hex()
        + " 02 6162 05 782e6c6f67",
    ),
    (Accept(2, 5), "11 0000000c 00000002 0000000000000005"),
    (AlreadyStored(3), "12 00000004 00000003"),
    (Refuse(4, Code.BAD_NAME, "no"), "13 0000000a 00000004 0006 0002 6e6f"),
    (Data(5, b"hi"), "20 00000006 00000005 6869"),
    (EndOfData(6), "21 00000004 00000006"),
    (Stored(7), "22 00000004 00000007"),
    (Failed(8, Code.TEMPORARY_FAILURE, ""), "23 00000008 00000008 000b 0000"),
    (Ping(1), "30 00000008 0000000000000001"),
    (Pong(1), "31 00000008 0000000000000001"),
    (Goodbye(), "3e 00000000"),
    (Error(Code.MALFORMED, "?"), "3f 00000005 0002 0001 3f"),
]


@pytest.mark.parametrize(("event", "hexbytes"), GOLDEN, ids=[repr(e) for e, _ in GOLDEN])
def test_byte_layout_matches_spec(event: Event, hexbytes: str) -> None:
    assert encode(event) == bytes.fromhex(hexbytes)


def _u(n: int, width: int) -> bytes:
    return n.to_bytes(width, "big")


def _frame(kind: int, body: bytes) -> bytes:
    return HEADER.pack(kind, len(body)) + body


def _offer_body(keyword: bytes, name: bytes, size: int = 3) -> bytes:
    fixed = _u(1, 4) + _u(size, 8) + bytes(32)
    return fixed + _u(len(keyword), 1) + keyword + _u(len(name), 1) + name


BAD_WIRE: list[tuple[str, bytes, Code]] = [
    ("unknown type", _frame(0x7F, b""), Code.MALFORMED),
    ("short body", _frame(Kind.STORED, b"\0\0\0"), Code.MALFORMED),
    ("body over its max", _frame(Kind.STORED, b"\0\0\0\0\0"), Code.LIMIT_EXCEEDED),
    ("trailing bytes", _frame(Kind.ERROR, _u(2, 2) + _u(1, 2) + b"ab"), Code.MALFORMED),
    ("bad magic", _frame(Kind.HELLO, b"HTTP\x01\x00\x01\x00\x04\x00\x00\x00\x80"), Code.MALFORMED),
    ("no versions", _frame(Kind.HELLO, b"DLOG\x00\x00\x04\x00\x00\x00\x80"), Code.LIMIT_EXCEEDED),
    (
        "frame too small",
        _frame(Kind.HELLO_REPLY, _u(1, 2) + _u(100, 4) + _u(1, 2)),
        Code.LIMIT_EXCEEDED,
    ),
    (
        "window zero",
        _frame(Kind.HELLO_REPLY, _u(1, 2) + _u(MIN_FRAME, 4) + _u(0, 2)),
        Code.LIMIT_EXCEEDED,
    ),
    ("unknown code", _frame(Kind.ERROR, _u(999, 2) + _u(0, 2)), Code.MALFORMED),
    ("message not utf-8", _frame(Kind.ERROR, _u(2, 2) + _u(1, 2) + b"\xff"), Code.MALFORMED),
    ("keyword charset", _frame(Kind.OFFER, _offer_body(b"a/b", b"x")), Code.MALFORMED),
    ("keyword empty", _frame(Kind.OFFER, _offer_body(b"", b"x")), Code.MALFORMED),
    ("keyword too long", _frame(Kind.OFFER, _offer_body(b"k" * 65, b"x")), Code.MALFORMED),
    ("name with slash", _frame(Kind.OFFER, _offer_body(b"k", b"../etc/passwd")), Code.BAD_NAME),
    ("name dotdot", _frame(Kind.OFFER, _offer_body(b"k", b"..")), Code.BAD_NAME),
    ("name with NUL", _frame(Kind.OFFER, _offer_body(b"k", b"a\0b")), Code.BAD_NAME),
    ("name empty", _frame(Kind.OFFER, _offer_body(b"k", b"")), Code.BAD_NAME),
    ("name not utf-8", _frame(Kind.OFFER, _offer_body(b"k", b"\xc0\xaf")), Code.MALFORMED),
    ("size over 2**63-1", _frame(Kind.OFFER, _offer_body(b"k", b"x", 2**63)), Code.LIMIT_EXCEEDED),
]


LEGAL_AT: dict[int, tuple[ConnState, Role]] = {
    Kind.HELLO: (ConnState.START, R),
    Kind.HELLO_REPLY: (ConnState.NEGOTIATING, S),
    Kind.STORED: (ConnState.OPEN, S),
    Kind.ERROR: (ConnState.OPEN, S),
}


@pytest.mark.parametrize(("why", "wire", "code"), BAD_WIRE, ids=[w for w, _, _ in BAD_WIRE])
def test_malformed_messages_are_remote_errors(why: str, wire: bytes, code: Code) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        decode(wire)
    assert caught.value.code is code
    # The same bytes kill a live connection in a state where such a message is legal.
    state, to = LEGAL_AT.get(wire[0], (ConnState.OPEN, R))
    target = pair_in(state).conn[to]
    with pytest.raises(RemoteProtocolError) as live:
        feed(target, wire)
    assert live.value.code is code
    assert target.state is ConnState.ERROR


OVERSIZED_HEADERS: list[tuple[str, bytes, Role]] = [
    ("error message over 1024", HEADER.pack(Kind.ERROR, 4 + MAX_MESSAGE + 1), S),
    ("offer body over its max", HEADER.pack(Kind.OFFER, 1 << 20), R),
    ("ping body of 4 GiB", HEADER.pack(Kind.PING, 2**32 - 1), R),
    ("data over negotiated frame", DATA_HEADER.pack(Kind.DATA, 4 + MIN_FRAME + 1, 1), R),
    ("data without payload", DATA_HEADER.pack(Kind.DATA, 4, 1), R),
]


@pytest.mark.parametrize(
    ("why", "header", "to"), OVERSIZED_HEADERS, ids=[w for w, _, _ in OVERSIZED_HEADERS]
)
def test_oversized_length_is_refused_from_the_header_alone(
    why: str, header: bytes, to: Role
) -> None:
    pair = Pair(sender={"max_frame": MIN_FRAME})
    pair.handshake()
    pair.send(S, offer(1, bytes(2 * MIN_FRAME)))
    pair.send(R, Accept(1))
    # Only the header arrives: the limit is enforced before any body is buffered.
    with pytest.raises(RemoteProtocolError) as caught:
        feed(pair.conn[to], header)
    assert caught.value.code is Code.LIMIT_EXCEEDED


BAD_EVENTS: list[tuple[str, Callable[[], object], Code]] = [
    ("keyword with slash", lambda: offer_kw("a/b"), Code.MALFORMED),
    ("keyword starting with dot", lambda: offer_kw(".hidden"), Code.MALFORMED),
    ("keyword of 65", lambda: offer_kw("k" * 65), Code.MALFORMED),
    ("keyword non-ascii", lambda: offer_kw("ké"), Code.MALFORMED),
    ("name of 256 bytes", lambda: Offer(1, "k", "n" * 256, 0, bytes(32)), Code.BAD_NAME),
    ("name 128 two-byte chars", lambda: Offer(1, "k", "é" * 128, 0, bytes(32)), Code.BAD_NAME),
    ("name dot", lambda: Offer(1, "k", ".", 0, bytes(32)), Code.BAD_NAME),
    ("name lone surrogate", lambda: Offer(1, "k", "\udcff", 0, bytes(32)), Code.MALFORMED),
    ("digest 31 bytes", lambda: Offer(1, "k", "n", 0, bytes(31)), Code.MALFORMED),
    ("size negative", lambda: Offer(1, "k", "n", -1, bytes(32)), Code.LIMIT_EXCEEDED),
    ("size 2**63", lambda: Offer(1, "k", "n", 2**63, bytes(32)), Code.LIMIT_EXCEEDED),
    ("file_id 2**32", lambda: Stored(2**32), Code.LIMIT_EXCEEDED),
    ("file_id not int", lambda: Stored("1"), Code.LIMIT_EXCEEDED),  # type: ignore[arg-type]
    ("message 1025 bytes", lambda: Error(Code.INTERNAL, "x" * 1025), Code.LIMIT_EXCEEDED),
    ("code not a Code", lambda: Error(2, "x"), Code.MALFORMED),  # type: ignore[arg-type]
    ("data empty", lambda: Data(1, b""), Code.LIMIT_EXCEEDED),
    ("data over 1 MiB", lambda: Data(1, bytes(MAX_FRAME + 1)), Code.LIMIT_EXCEEDED),
    ("hello no versions", lambda: Hello(()), Code.LIMIT_EXCEEDED),
    ("hello 17 versions", lambda: Hello(tuple(range(1, 18))), Code.LIMIT_EXCEEDED),
    ("hello frame over 1 MiB", lambda: Hello(max_frame=MAX_FRAME + 1), Code.LIMIT_EXCEEDED),
    ("hello window 0", lambda: Hello(window=0), Code.LIMIT_EXCEEDED),
    ("ping nonce 2**64", lambda: Ping(2**64), Code.LIMIT_EXCEEDED),
]


def offer_kw(keyword: str) -> Offer:
    return Offer(1, keyword, "n", 0, bytes(32))


@pytest.mark.parametrize(("why", "make", "code"), BAD_EVENTS, ids=[w for w, _, _ in BAD_EVENTS])
def test_events_refuse_bad_values_when_built(
    why: str, make: Callable[[], object], code: Code
) -> None:
    with pytest.raises(LocalProtocolError) as caught:
        make()
    assert caught.value.code is code


def test_clip_message_fits_and_keeps_whole_characters() -> None:
    clipped = clip_message("é" * 1000 + "\udcff")
    assert len(clipped.encode()) <= MAX_MESSAGE
    assert clipped == "é" * (MAX_MESSAGE // 2)
    Error(Code.INTERNAL, clipped)  # builds without error


# --- the documentation and the code agree --------------------------------------------------


def _doc_rows(pattern: str) -> list[tuple[str, ...]]:
    return re.findall(pattern, DOC.read_text(), re.MULTILINE)


def test_spec_lists_every_code_with_its_class() -> None:
    rows = _doc_rows(r"^\|\s*(\d+)\s*\|\s*`?([A-Z_]+)`?\s*\|\s*(temporary|permanent)\s*\|")
    documented = {(int(n), name, kind == "temporary") for n, name, kind in rows}
    assert documented == {(c.value, c.name, c.temporary) for c in Code}


def test_spec_lists_every_message_type() -> None:
    rows = _doc_rows(r"^\|\s*0x([0-9a-f]{2})\s*\|\s*`?([A-Z_]+)`?\s*\|")
    assert {(int(n, 16), name) for n, name in rows} == {(k.value, k.name) for k in Kind}


# --- the connection state table -----------------------------------------------------------

ALL_KINDS: list[Event] = [
    Hello(),
    HelloReply(1, MIN_FRAME, 1),
    offer(99),
    Accept(99),
    AlreadyStored(99),
    Refuse(99, Code.INTERNAL),
    Data(99, b"x"),
    EndOfData(99),
    Stored(99),
    Failed(99, Code.INTERNAL),
    Ping(),
    Pong(),
    Goodbye(),
    Error(Code.INTERNAL),
]

# Written out independently of the module's table: which messages each role
# may send in each state (per-file rules come on top, tested further down).
ALLOWED: dict[ConnState, dict[Role, set[type]]] = {
    ConnState.START: {S: {Hello, Error}, R: {Error}},
    ConnState.NEGOTIATING: {S: {Error}, R: {HelloReply, Error}},
    ConnState.OPEN: {
        S: {Offer, Data, EndOfData, Goodbye, Ping, Pong, Error},
        R: {Accept, AlreadyStored, Refuse, Stored, Failed, Ping, Pong, Error},
    },
    ConnState.DRAINING: {S: {Ping, Pong, Error}, R: {Stored, Failed, Goodbye, Ping, Pong, Error}},
    ConnState.CLOSED: {S: set(), R: set()},
}


def pair_in(state: ConnState) -> Pair:
    pair = Pair()
    if state is ConnState.START:
        return pair
    pair.send(S, Hello())
    if state is ConnState.NEGOTIATING:
        return pair
    pair.send(R, HelloReply(1, DEFAULT_FRAME_FOR_TESTS, 8))
    if state is ConnState.OPEN:
        return pair
    pair.send(S, Goodbye())
    if state is ConnState.DRAINING:
        return pair
    pair.send(R, Goodbye())
    return pair


DEFAULT_FRAME_FOR_TESTS = 64 * 1024

FORBIDDEN = [
    (state, who, event)
    for state, roles in ALLOWED.items()
    for who, allowed in roles.items()
    for event in ALL_KINDS
    if type(event) not in allowed
]


@pytest.mark.parametrize(
    ("state", "who", "event"),
    FORBIDDEN,
    ids=[f"{s.name}-{w.value}-{type(e).__name__}" for s, w, e in FORBIDDEN],
)
def test_message_not_allowed_in_state(state: ConnState, who: Role, event: Event) -> None:
    local = pair_in(state)
    assert local.states() == (state, state)
    with pytest.raises(LocalProtocolError) as caught:
        local.conn[who].send(event)
    assert caught.value.code is Code.UNEXPECTED_MESSAGE
    assert local.conn[who].state is ConnState.ERROR

    remote = pair_in(state)
    with pytest.raises(RemoteProtocolError) as caught_remote:
        feed(remote.conn[other(who)], encode(event))
    assert caught_remote.value.code is Code.UNEXPECTED_MESSAGE
    assert remote.conn[other(who)].state is ConnState.ERROR


def test_state_walk_through_every_connection_state() -> None:
    pair = Pair()
    assert pair.states() == (ConnState.START, ConnState.START)
    pair.send(S, Hello())
    assert pair.states() == (ConnState.NEGOTIATING, ConnState.NEGOTIATING)
    pair.send(R, HelloReply(1, MIN_FRAME, 2))
    assert pair.states() == (ConnState.OPEN, ConnState.OPEN)
    pair.send(S, Goodbye())
    assert pair.states() == (ConnState.DRAINING, ConnState.DRAINING)
    pair.send(R, Goodbye())
    assert pair.states() == (ConnState.CLOSED, ConnState.CLOSED)
    for who in Role:
        pair.conn[who].receive_data(b"")
        assert pair.conn[who].next_event() == ConnectionClosed()
        assert pair.conn[who].next_event() == ConnectionClosed()


# --- per-file rules: each case breaks one, from our side and from the peer's ---------------

Step = tuple[Role, Event]
TEN = bytes(10)

GUARD_CASES: list[tuple[str, Limits, list[Step], Role, Event, Code]] = [
    ("offer beyond window", {"window": 1}, [(S, offer(1))], S, offer(2), Code.LIMIT_EXCEEDED),
    ("duplicate file_id", {}, [(S, offer(1))], S, offer(1), Code.UNEXPECTED_MESSAGE),
    ("file_id going back", {}, [(S, offer(5))], S, offer(3), Code.UNEXPECTED_MESSAGE),
    (
        "reused id of a finished file",
        {},
        [(S, offer(1)), (R, AlreadyStored(1))],
        S,
        offer(1),
        Code.UNEXPECTED_MESSAGE,
    ),
    (
        "answer out of order",
        {},
        [(S, offer(1)), (S, offer(2))],
        R,
        Accept(2),
        Code.UNEXPECTED_MESSAGE,
    ),
    (
        "answer for unknown file",
        {},
        [(S, offer(1))],
        R,
        Refuse(7, Code.INTERNAL),
        Code.UNEXPECTED_MESSAGE,
    ),
    ("answer twice", {}, [(S, offer(1)), (R, Accept(1))], R, Accept(1), Code.UNEXPECTED_MESSAGE),
    ("resume past the end", {}, [(S, offer(1, TEN))], R, Accept(1, 11), Code.MALFORMED),
    ("data before accept", {}, [(S, offer(1, TEN))], S, Data(1, b"x"), Code.UNEXPECTED_MESSAGE),
    (
        "data for a refused file",
        {},
        [(S, offer(1, TEN)), (R, Refuse(1, Code.BAD_NAME))],
        S,
        Data(1, b"x"),
        Code.UNEXPECTED_MESSAGE,
    ),
    (
        "data out of offer order",
        {},
        [(S, offer(1, TEN)), (S, offer(2, TEN)), (R, Accept(1)), (R, Accept(2))],
        S,
        Data(2, b"x"),
        Code.UNEXPECTED_MESSAGE,
    ),
    (
        "more bytes than announced",
        {},
        [(S, offer(1, TEN)), (R, Accept(1, 5)), (S, Data(1, b"1234"))],
        S,
        Data(1, b"56"),
        Code.SIZE_MISMATCH,
    ),
    (
        "frame over the negotiated max",
        {"max_frame": MIN_FRAME},
        [(S, offer(1, bytes(MIN_FRAME * 2))), (R, Accept(1))],
        S,
        Data(1, bytes(MIN_FRAME + 1)),
        Code.LIMIT_EXCEEDED,
    ),
    (
        "end of data too early",
        {},
        [(S, offer(1, TEN)), (R, Accept(1)), (S, Data(1, bytes(9)))],
        S,
        EndOfData(1),
        Code.SIZE_MISMATCH,
    ),
    (
        "end of data before accept",
        {},
        [(S, offer(1, b""))],
        S,
        EndOfData(1),
        Code.UNEXPECTED_MESSAGE,
    ),
    (
        "stored before the data ended",
        {},
        [(S, offer(1, TEN)), (R, Accept(1)), (S, Data(1, TEN))],
        R,
        Stored(1),
        Code.UNEXPECTED_MESSAGE,
    ),
    ("stored for an offer", {}, [(S, offer(1))], R, Stored(1), Code.UNEXPECTED_MESSAGE),
    (
        "stored twice",
        {},
        [(S, offer(1, b"")), (R, Accept(1)), (S, EndOfData(1)), (R, Stored(1))],
        R,
        Stored(1),
        Code.UNEXPECTED_MESSAGE,
    ),
    (
        "failed for an already-stored file",
        {},
        [(S, offer(1)), (R, AlreadyStored(1))],
        R,
        Failed(1, Code.DIGEST_MISMATCH),
        Code.UNEXPECTED_MESSAGE,
    ),
    (
        "goodbye with an offer unanswered",
        {},
        [(S, offer(1))],
        S,
        Goodbye(),
        Code.UNEXPECTED_MESSAGE,
    ),
    (
        "goodbye mid-file",
        {},
        [(S, offer(1, TEN)), (R, Accept(1)), (S, Data(1, b"1"))],
        S,
        Goodbye(),
        Code.UNEXPECTED_MESSAGE,
    ),
    (
        "receiver goodbye with a file unacknowledged",
        {},
        [(S, offer(1, b"")), (R, Accept(1)), (S, EndOfData(1)), (S, Goodbye())],
        R,
        Goodbye(),
        Code.UNEXPECTED_MESSAGE,
    ),
    ("pong without ping", {}, [], R, Pong(), Code.UNEXPECTED_MESSAGE),
    (
        "second pong for one ping",
        {},
        [(S, Ping(1)), (R, Pong(1))],
        R,
        Pong(1),
        Code.UNEXPECTED_MESSAGE,
    ),
    ("own pong for own ping", {}, [(S, Ping(1))], S, Pong(1), Code.UNEXPECTED_MESSAGE),
]


def pair_after(limits: Limits, steps: list[Step]) -> Pair:
    pair = Pair(sender=limits)
    pair.handshake()
    for who, event in steps:
        pair.send(who, event)
    return pair


@pytest.mark.parametrize(
    ("why", "limits", "steps", "who", "event", "code"),
    GUARD_CASES,
    ids=[c[0] for c in GUARD_CASES],
)
def test_per_file_rule_broken(
    why: str, limits: Limits, steps: list[Step], who: Role, event: Event, code: Code
) -> None:
    local = pair_after(limits, steps)
    with pytest.raises(LocalProtocolError) as caught:
        local.conn[who].send(event)
    assert caught.value.code is code
    assert local.conn[who].state is ConnState.ERROR

    remote = pair_after(limits, steps)
    with pytest.raises(RemoteProtocolError) as caught_remote:
        feed(remote.conn[other(who)], encode(event))
    assert caught_remote.value.code is code
    assert remote.conn[other(who)].state is ConnState.ERROR


@pytest.mark.parametrize(
    ("proposal", "reply", "code"),
    [
        (Hello((1,)), HelloReply(2, MIN_FRAME, 1), Code.UNSUPPORTED_VERSION),
        (Hello(max_frame=MIN_FRAME), HelloReply(1, MIN_FRAME * 2, 1), Code.LIMIT_EXCEEDED),
        (Hello(window=4), HelloReply(1, MIN_FRAME, 5), Code.LIMIT_EXCEEDED),
    ],
    ids=["version not offered", "frame raised", "window raised"],
)
def test_hello_reply_must_stay_within_the_proposal(
    proposal: Hello, reply: HelloReply, code: Code
) -> None:
    local = Pair()
    local.send(S, proposal)
    with pytest.raises(LocalProtocolError) as caught:
        local.conn[R].send(reply)
    assert caught.value.code is code
    remote = Pair()
    remote.send(S, proposal)
    with pytest.raises(RemoteProtocolError) as caught_remote:
        feed(remote.conn[S], encode(reply))
    assert caught_remote.value.code is code


def test_negotiation_takes_the_smaller_limits_and_the_newest_common_version() -> None:
    pair = Pair(
        sender={"max_frame": MAX_FRAME, "window": 100},
        receiver={"max_frame": MIN_FRAME, "window": 3},
    )
    pair.conn[S] = Connection(S, versions=(1, 2, 3), max_frame=MAX_FRAME, window=100)
    pair.conn[R] = Connection(R, versions=(1, 2), max_frame=MIN_FRAME, window=3)
    assert pair.handshake() == HelloReply(2, MIN_FRAME, 3)
    for conn in pair.conn.values():
        assert (conn.version, conn.max_frame, conn.window) == (2, MIN_FRAME, 3)
    for file_id in range(3):
        pair.send(S, offer(file_id))
    assert not pair.conn[S].can_offer
    assert pair.conn[S].in_flight == 3


def test_no_common_version_ends_with_an_error() -> None:
    pair = Pair()
    pair.conn[S] = Connection(S, versions=(7,))
    pair.send(S, pair.conn[S].hello())
    answer = pair.conn[R].answer_hello(Hello((7,)))
    assert isinstance(answer, Error)
    assert answer.code is Code.UNSUPPORTED_VERSION
    pair.send(R, answer)
    assert pair.states() == (ConnState.ERROR, ConnState.ERROR)
    with pytest.raises(RemoteProtocolError) as caught:
        pair.conn[S].next_event()
    assert caught.value.code is Code.UNSUPPORTED_VERSION


# --- errors are final ----------------------------------------------------------------------


def test_after_a_remote_error_only_one_error_message_may_be_sent() -> None:
    pair = Pair()
    pair.handshake()
    with pytest.raises(RemoteProtocolError) as caught:
        feed(pair.conn[R], encode(Stored(1)))
    conn = pair.conn[R]
    assert conn.state is ConnState.ERROR
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    with pytest.raises(LocalProtocolError):
        conn.send(Ping())
    farewell = conn.send(Error.from_exception(caught.value))
    got = feed(pair.conn[S], farewell)
    assert got == [Error(Code.UNEXPECTED_MESSAGE, caught.value.message)]
    assert pair.conn[S].state is ConnState.ERROR
    with pytest.raises(LocalProtocolError):
        conn.send(Error(Code.INTERNAL))
    assert conn.state is ConnState.ERROR


def test_receiving_an_error_ends_the_connection_with_its_code() -> None:
    pair = Pair()
    pair.handshake()
    pair.send(S, offer(1))
    pair.send(R, Error(Code.TIMEOUT, "idle"))
    with pytest.raises(RemoteProtocolError) as caught:
        pair.conn[S].next_event()
    assert caught.value.code is Code.TIMEOUT
    assert "idle" in caught.value.message
    with pytest.raises(LocalProtocolError):
        pair.conn[S].send(EndOfData(1))


@pytest.mark.parametrize(
    "state", [ConnState.START, ConnState.NEGOTIATING, ConnState.OPEN, ConnState.DRAINING]
)
def test_end_of_stream_before_goodbye_is_an_error(state: ConnState) -> None:
    for who in Role:
        pair = pair_in(state)
        pair.conn[who].receive_data(b"")
        with pytest.raises(RemoteProtocolError) as caught:
            pair.conn[who].next_event()
        assert caught.value.code is Code.CONNECTION_CLOSED


def test_data_after_end_of_stream_is_refused() -> None:
    conn = Connection(R)
    conn.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"x")


# --- buffering -----------------------------------------------------------------------------


def test_data_payload_is_a_view_of_the_received_bytes_not_a_copy() -> None:
    pair = Pair()
    pair.handshake()
    pair.send(S, offer(1, bytes(5000)))
    pair.send(R, Accept(1))
    chunk = pair.conn[S].send_data_header(1, 5000) + bytes(range(250)) * 20
    pair.conn[R].receive_data(chunk)
    (event,) = drain(pair.conn[R])
    assert isinstance(event, Data)
    assert isinstance(event.data, memoryview) and event.data.obj is chunk
    assert event.data == bytes(range(250)) * 20


def test_data_arrives_before_the_whole_frame_has() -> None:
    pair = Pair()
    pair.handshake()
    pair.send(S, offer(1, bytes(1000)))
    pair.send(R, Accept(1))
    frame = pair.conn[S].send(Data(1, bytes(range(200)) * 5))
    receiver = pair.conn[R]
    receiver.receive_data(frame[:500])
    first = drain(receiver)
    assert coalesce(first) == [Data(1, (bytes(range(200)) * 5)[: 500 - DATA_HEADER.size])]
    assert receiver.buffered == 0
    receiver.receive_data(frame[500:])
    assert coalesce(first + drain(receiver)) == [Data(1, bytes(range(200)) * 5)]
    assert receiver.file_state(1) is FileState.SENDING
    assert receiver.data_due == (1, 0)


def test_a_reused_receive_buffer_does_not_corrupt_leftovers() -> None:
    pair = Pair()
    pair.handshake()
    stream = b"".join(pair.conn[S].send(offer(i)) for i in range(1, 6))
    receiver = pair.conn[R]
    scratch = bytearray(7)
    events: list[Event] = []
    for start in range(0, len(stream), 7):
        piece = stream[start : start + 7]
        scratch[: len(piece)] = piece
        receiver.receive_data(memoryview(scratch)[: len(piece)])
        events += drain(receiver)
        scratch[:] = b"\xee" * 7  # what the next recv_into would do
    assert events == [offer(i) for i in range(1, 6)]


def test_a_trickling_peer_keeps_the_buffer_within_one_message() -> None:
    pair = Pair()
    pair.handshake()
    wire = encode(Error(Code.INTERNAL, "x" * MAX_MESSAGE))
    receiver = pair.conn[S]
    for i, byte in enumerate(wire[:-1]):
        receiver.receive_data(bytes([byte]))
        assert receiver.next_event() is NEED_DATA
        assert receiver.buffered == i + 1 <= MAX_BUFFERED
    receiver.receive_data(wire[-1:])
    assert receiver.next_event() == Error(Code.INTERNAL, "x" * MAX_MESSAGE)
    assert receiver.buffered == 0


def test_send_data_header_lets_the_caller_write_the_payload_itself() -> None:
    pair = Pair()
    pair.handshake()
    content = bytes(range(256)) * 64
    pair.send(S, offer(1, content))
    pair.send(R, Accept(1, 1000))
    frame = bytearray(DATA_HEADER.size + len(content) - 1000)
    frame[: DATA_HEADER.size] = pair.conn[S].send_data_header(1, len(content) - 1000)
    frame[DATA_HEADER.size :] = content[1000:]
    assert pair.conn[S].data_due == (1, 0)
    assert coalesce(feed(pair.conn[R], bytes(frame))) == [Data(1, content[1000:])]
    pair.send(S, EndOfData(1))
    with pytest.raises(LocalProtocolError):
        pair.conn[S].send_data_header(1, 1)


# --- scripted ends, for replays and the fuzzer ---------------------------------------------
# The real ends (ship.Delivery, receive.Session) are joined back to back in
# test_ship_session.py. These two are the smallest deterministic peers that
# answer whatever arrives, in memory, so that a recorded conversation can be
# replayed byte by byte and the fuzzer reaches deep states thousands of times.


@dataclass(frozen=True)
class FileSpec:
    name: str
    content: bytes
    keyword: str = "audit"


@dataclass
class Disk:
    """The collector's storage, as the ReceiverApp sees it."""

    stored: dict[str, bytes] = field(default_factory=dict)
    partial: dict[str, bytes] = field(default_factory=dict)
    keywords: frozenset[str] = frozenset({"audit"})


class SenderApp:
    """A scripted sender: offers its files, sends their data, says Goodbye."""

    def __init__(self, files: list[FileSpec], **limits: Unpack[Limits]) -> None:
        self.conn = Connection(S, **limits)
        self.queue = deque(files)
        self.offered: dict[int, FileSpec] = {}
        self.results: dict[str, Event] = {}
        self.next_id = 1

    def start(self) -> bytes:
        return self.conn.send(self.conn.hello())

    def on_event(self, event: Event) -> bytes:
        if isinstance(event, Stored | Failed | AlreadyStored | Refuse):
            self.results[self.offered.pop(event.file_id).name] = event
        elif isinstance(event, Ping):
            return self.conn.send(Pong(event.nonce)) + self.pump()
        return self.pump()

    def pump(self) -> bytes:
        if self.conn.state is not ConnState.OPEN:
            return b""
        out = []
        while self.queue and self.conn.can_offer:
            spec = self.queue.popleft()
            self.offered[self.next_id] = spec
            out.append(
                self.conn.send(
                    Offer(
                        self.next_id,
                        spec.keyword,
                        spec.name,
                        len(spec.content),
                        digest(spec.content),
                    )
                )
            )
            self.next_id += 1
        while (due := self.conn.data_due) is not None:
            out.extend(self.send_rest(*due))
        waiting = [self.conn.file_state(i) for i in self.offered]
        if not self.queue and all(s is FileState.AWAITING_STORED for s in waiting):
            out.append(self.conn.send(Goodbye()))
        return b"".join(out)

    def send_rest(self, file_id: int, remaining: int) -> list[bytes]:
        content = self.offered[file_id].content
        rest = memoryview(content)[len(content) - remaining :]
        out = [
            self.conn.send(Data(file_id, rest[i : i + self.conn.max_frame]))
            for i in range(0, len(rest), self.conn.max_frame)
        ]
        return [*out, self.conn.send(EndOfData(file_id))]


class ReceiverApp:
    """A scripted receiver with a dict for a disk.

    With ``group`` set, Stored answers are held back and sent together when
    the sender's window is full or it says Goodbye, as a group commit would.
    """

    def __init__(self, disk: Disk, group: bool = False, **limits: Unpack[Limits]) -> None:
        self.conn = Connection(R, **limits)
        self.disk = disk
        self.group = group
        self.incoming: dict[int, tuple[Offer, bytearray]] = {}
        self.held: list[int] = []

    def start(self) -> bytes:
        return b""  # the sender speaks first

    def on_event(self, event: Event) -> bytes:
        match event:
            case Hello():
                return self.conn.send(self.conn.answer_hello(event))
            case Offer():
                return self.conn.send(self.answer(event))
            case Data():
                self.incoming[event.file_id][1].extend(event.data)
            case EndOfData():
                return self.finish(event.file_id)
            case Goodbye():
                return self.flush() + self.conn.send(Goodbye())
            case Ping():
                return self.conn.send(Pong(event.nonce))
        return b""

    def answer(self, offer: Offer) -> Event:
        if offer.keyword not in self.disk.keywords:
            return Refuse(offer.file_id, Code.KEYWORD_NOT_ALLOWED, f"{offer.keyword} not allowed")
        stored = self.disk.stored.get(offer.name)
        if stored is not None and digest(stored) == offer.sha256:
            return AlreadyStored(offer.file_id)
        if stored is not None:
            return Refuse(offer.file_id, Code.NAME_CONFLICT, "different file by that name")
        held = self.disk.partial.pop(offer.name, b"")
        if len(held) > offer.size:
            held = b""
        self.incoming[offer.file_id] = (offer, bytearray(held))
        return Accept(offer.file_id, len(held))

    def finish(self, file_id: int) -> bytes:
        offer, content = self.incoming[file_id]
        if digest(bytes(content)) != offer.sha256:
            del self.incoming[file_id]
            return self.conn.send(Failed(file_id, Code.DIGEST_MISMATCH, "sha256 differs"))
        self.held.append(file_id)
        if self.group and len(self.held) < self.conn.window:
            return b""
        return self.flush()

    def flush(self) -> bytes:
        out = []
        for file_id in self.held:
            offer, content = self.incoming.pop(file_id)
            self.disk.stored[offer.name] = bytes(content)
            out.append(self.conn.send(Stored(file_id)))
        self.held.clear()
        return b"".join(out)


@dataclass
class Transcript:
    sent: dict[Role, bytes]
    events: dict[Role, list[Event]]


def converse(sender: SenderApp, receiver: ReceiverApp, chunk: int | None = None) -> Transcript:
    """Run both apps until each has closed; every byte goes through both Connections."""
    apps: dict[Role, SenderApp | ReceiverApp] = {S: sender, R: receiver}
    sent = {S: b"", R: b""}
    events: dict[Role, list[Event]] = {S: [], R: []}
    pending = {R: sender.start(), S: b""}  # bytes on their way *to* each role
    sent[S] += pending[R]
    while pending[R] or pending[S]:
        for to in (R, S):
            data, pending[to] = pending[to], b""
            app = apps[to]

            def answer(event: Event, app: SenderApp | ReceiverApp = app, to: Role = to) -> None:
                reply = app.on_event(event)
                sent[to] += reply
                pending[other(to)] += reply

            events[to] += feed(app.conn, data, chunk, answer)
    for who in Role:
        apps[who].conn.receive_data(b"")
        events[who] += drain(apps[who].conn)
    return Transcript(sent, {who: coalesce(evs) for who, evs in events.items()})


def mixed_files() -> tuple[list[FileSpec], Disk]:
    """One of each case: fresh, resumed, already stored, refused, empty, name conflict."""
    big = bytes(range(256)) * 200
    files = [
        FileSpec("fresh.log", b"hello\n" * 3000),
        FileSpec("resumed.log", big),
        FileSpec("dup.log", b"seen before"),
        FileSpec("secret.log", b"wrong keyword", keyword="secret"),
        FileSpec("empty.log", b""),
        FileSpec("clash.log", b"new content"),
        FileSpec("late.log", b"after the window"),
        FileSpec("bad.log", b"will be damaged"),
    ]
    disk = Disk(
        stored={"dup.log": b"seen before", "clash.log": b"old content"},
        partial={"resumed.log": big[:7000], "bad.log": b"XXXX"},
    )
    return files, disk


def test_the_window_holds_offers_until_answers_free_it() -> None:
    pair = Pair(sender={"window": 2})
    pair.handshake()
    pair.send(S, offer(1, b""), offer(2, b"xy"))
    assert not pair.conn[S].can_offer
    with pytest.raises(LocalProtocolError) as caught:
        pair.conn[S].send(offer(3))
    assert caught.value.code is Code.LIMIT_EXCEEDED


def test_window_frees_a_slot_only_when_a_file_is_done() -> None:
    pair = Pair(sender={"window": 2})
    pair.handshake()
    pair.send(S, offer(1, b""), offer(2, b"xy"))
    pair.send(R, Accept(1), Accept(2))
    pair.send(S, EndOfData(1))
    assert not pair.conn[S].can_offer  # file 1 still awaits Stored
    pair.send(R, Stored(1))
    assert pair.conn[S].can_offer
    pair.send(S, offer(3), expect=[offer(3)])
    assert [pair.conn[R].file_state(i) for i in (1, 2, 3)] == [
        None,
        FileState.ACCEPTED,
        FileState.OFFERED,
    ]


def test_keepalive_in_both_directions_while_draining() -> None:
    pair = Pair()
    pair.handshake()
    pair.send(S, offer(1, b""))
    pair.send(R, Accept(1))
    pair.send(S, EndOfData(1), Goodbye())
    pair.send(R, Ping(7))
    pair.send(S, Pong(7), Ping(8))
    pair.send(R, Pong(8), Stored(1), Goodbye())
    assert pair.states() == (ConnState.CLOSED, ConnState.CLOSED)


def test_replaying_one_side_reproduces_the_other() -> None:
    """The apps are deterministic: the fuzzer relies on replays reaching deep states."""
    files, disk = mixed_files()
    talk = converse(SenderApp(files, window=3, max_frame=MIN_FRAME), ReceiverApp(disk))
    _, fresh_disk = mixed_files()
    assert replay(ReceiverApp(fresh_disk), talk.sent[S], 1000) == talk.sent[R]
    sender = SenderApp(files, window=3, max_frame=MIN_FRAME)
    assert sender.start() + replay(sender, talk.sent[R], 1000) == talk.sent[S]


def replay(app: SenderApp | ReceiverApp, stream: bytes, chunk: int) -> bytes:
    """Feed one side's recorded bytes to a fresh app; what it answers."""
    out: list[bytes] = []
    feed(app.conn, stream, chunk, lambda event: out.append(app.on_event(event)))
    return b"".join(out)


def small_apps() -> tuple[SenderApp, ReceiverApp]:
    files = [FileSpec("a.log", b"abc" * 50), FileSpec("b.log", b""), FileSpec("c.log", b"z")]
    disk = Disk(stored={"c.log": b"z"}, partial={"a.log": b"abc"})
    return SenderApp(files, window=2), ReceiverApp(disk)


@pytest.mark.parametrize("role", [R, S], ids=["receiver-reads", "sender-reads"])
def test_truncation_at_every_byte_is_need_data_then_eof_is_an_error(role: Role) -> None:
    stream = converse(*small_apps()).sent[other(role)]
    for cut in range(len(stream)):
        sender, receiver = small_apps()
        app: SenderApp | ReceiverApp = receiver if role is R else sender
        app.start()
        replay(app, stream[:cut], len(stream))
        assert app.conn.next_event() is NEED_DATA
        app.conn.receive_data(b"")
        with pytest.raises(RemoteProtocolError) as caught:
            app.conn.next_event()
        assert caught.value.code is Code.CONNECTION_CLOSED


def test_codes_say_whether_to_retry() -> None:
    assert Code.TEMPORARY_FAILURE.temporary and Code.TIMEOUT.temporary
    assert not Code.INTERNAL.temporary and not Code.NAME_CONFLICT.temporary
    assert not Code.KEYWORD_NOT_ALLOWED.temporary and not Code.MALFORMED.temporary
    assert isinstance(RemoteProtocolError(Code.MALFORMED, "x"), ProtocolError)
