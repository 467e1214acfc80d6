"""Hostile bytes into dlogd.shipwire: nothing but ProtocolError escapes, memory stays bounded.

Three sources, fed to both roles in random pieces: pure noise; a recorded
valid conversation with bytes flipped, inserted, deleted or cut; and a valid
prefix followed by well-formed messages in random order (which gets past the
parser and exercises the state tables). The other end is played by the same
deterministic apps the unit tests use, so a stream reaches deep states before
it goes wrong. ``feed`` checks the unparsed buffer against MAX_BUFFERED after
every piece.
"""

from __future__ import annotations

from functools import cache

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dlogd.names import MIN_FRAME
from dlogd.shipwire import (
    Accept,
    AlreadyStored,
    Code,
    ConnState,
    Data,
    EndOfData,
    Event,
    Failed,
    Offer,
    Ping,
    Pong,
    ProtocolError,
    Refuse,
    Role,
    Stored,
    encode,
)
from tests.unit.test_shipwire import (
    SAMPLES,
    Disk,
    FileSpec,
    ReceiverApp,
    SenderApp,
    Transcript,
    converse,
    digest,
    replay,
)

FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


def files() -> list[FileSpec]:
    return [
        FileSpec("fresh.log", b"fresh " * 40),
        FileSpec("resumed.log", bytes(range(256)) * 2),
        FileSpec("dup.log", b"seen"),
        FileSpec("other.log", b"x", keyword="secret"),
        FileSpec("empty.log", b""),
        FileSpec("bad.log", b"damaged"),
    ]


def disk() -> Disk:
    return Disk(
        stored={"dup.log": b"seen"},
        partial={"resumed.log": bytes(range(256))[:100], "bad.log": b"XX"},
    )


def sender() -> SenderApp:
    return SenderApp(files(), window=3, max_frame=MIN_FRAME)


def receiver() -> ReceiverApp:
    return ReceiverApp(disk())


def fresh(role: Role) -> SenderApp | ReceiverApp:
    app = sender() if role is Role.SENDER else receiver()
    app.start()
    return app


@cache
def conversation() -> Transcript:
    return converse(sender(), receiver())


def attack(role: Role, stream: bytes, chunk: int) -> None:
    """Feed ``stream`` to a fresh ``role`` end; only a ProtocolError may stop it."""
    app = fresh(role)
    try:
        replay(app, stream, chunk)
    except ProtocolError as exc:
        assert app.conn.state is ConnState.ERROR
        event(f"{role.value}: {exc.code.name}")
    else:
        event(f"{role.value}: ended in {app.conn.state.name}")
    assert app.conn.in_flight <= app.conn.window


def valid_stream(role: Role) -> bytes:
    """What the peer of ``role`` sent in the recorded conversation."""
    return conversation().sent[Role.RECEIVER if role is Role.SENDER else Role.SENDER]


roles = st.sampled_from(list(Role))
chunks = st.integers(min_value=1, max_value=600)


@FUZZ
@given(role=roles, noise=st.binary(max_size=2048), chunk=chunks)
def test_noise(role: Role, noise: bytes, chunk: int) -> None:
    attack(role, noise, chunk)


@st.composite
def mutated(draw: st.DrawFn, role: Role) -> bytes:
    data = bytearray(valid_stream(role))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
        if action == "flip" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif action == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        else:
            del data[at:]
    return bytes(data)


@FUZZ
@given(data=st.data(), role=roles, chunk=chunks)
def test_mutated_conversation(data: st.DataObject, role: Role, chunk: int) -> None:
    attack(role, data.draw(mutated(role)), chunk)


file_ids = st.integers(0, 8)
codes = st.sampled_from(list(Code))
messages = st.one_of(
    st.sampled_from(SAMPLES),
    st.builds(Accept, file_ids, st.integers(0, 600)),
    st.builds(AlreadyStored, file_ids),
    st.builds(Refuse, file_ids, codes),
    st.builds(Stored, file_ids),
    st.builds(Failed, file_ids, codes),
    st.builds(EndOfData, file_ids),
    st.builds(Data, file_ids, st.binary(min_size=1, max_size=300)),
    st.builds(
        Offer,
        file_ids,
        st.sampled_from(["audit", "secret"]),
        st.sampled_from(["fresh.log", "dup.log", "n"]),
        st.integers(0, 600),
        st.sampled_from([digest(b"seen"), bytes(32)]),
    ),
    st.builds(Ping, st.integers(0, 3)),
    st.builds(Pong, st.integers(0, 3)),
)


@FUZZ
@given(
    role=roles,
    cut=st.integers(0, 4096),
    tail=st.lists(messages, max_size=12),
    chunk=chunks,
)
def test_valid_prefix_then_messages_in_any_order(
    role: Role, cut: int, tail: list[Event], chunk: int
) -> None:
    prefix = valid_stream(role)[:cut]
    attack(role, prefix + b"".join(encode(m) for m in tail), chunk)


def test_the_unmutated_conversation_is_accepted() -> None:
    """Without this, the fuzzer could be rejecting everything at the first byte."""
    for role in Role:
        app = fresh(role)
        replay(app, valid_stream(role), 97)
        assert app.conn.state is ConnState.CLOSED
