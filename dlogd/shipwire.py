"""The shipper <-> collector wire protocol, without I/O (spec: docs/protocol.md).

(The other protocol, between an application and the local submit service, is
``submitwire``.) Place in the flow: ``ship`` (the SENDER, the TLS client) and
``receive`` (the RECEIVER, on the collector) each own one :class:`Connection`,
driven by a :class:`dlogd.driver.Driver`: it feeds the connection what the
TLS socket read (:meth:`Connection.receive_data`), takes events out
(:meth:`Connection.next_event`), and writes the bytes that
:meth:`Connection.send` makes of what ``ship`` or ``receive`` want to say. No
socket, clock or file is touched here, so the protocol is tested and fuzzed
in memory.

Theory of operation
-------------------
Every message is a 5-byte header (type byte, u32 body length) and a body.
Two tables decide what may happen, for bytes we send and bytes we receive
alike:

* ``_CONN_TRANSITIONS[(state, role, event type)]`` -> next connection state
  (START, NEGOTIATING, OPEN, DRAINING after the sender's Goodbye, CLOSED);
* ``_FILE_TRANSITIONS[(file state, event type)]`` -> next state of the file
  the event names (OFFERED, ACCEPTED, SENDING, AWAITING_STORED, DONE).

An event the tables do not list is a protocol error by construction. The few
rules a table cannot say (the window, answers and data in offer order, byte
counts, negotiated limits) are guards, run after the lookup. Both directions
share that code; the only difference is the error class: LocalProtocolError
when we were about to break a rule, RemoteProtocolError when the peer did.
Any violation puts the connection in ERROR for good; the one thing still
allowed there is to send a single Error message telling the peer why.

Data frames are never buffered whole. Once a DATA header has passed the
guards, its payload is handed out as Data events as bytes arrive, as
zero-copy slices of what receive_data() was given. So a Data event received
may be shorter than the frame that was sent, and the unparsed buffer never
holds more than one incomplete control message (MAX_BUFFERED bytes).
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

from dlogd.names import (
    DEFAULT_FRAME,
    DEFAULT_WINDOW,
    KEYWORD_RULE,
    MAX_FRAME,
    MAX_KEYWORD,
    MAX_WINDOW,
    MIN_FRAME,
    is_keyword,
)

PORT: Final = 7878
MAGIC: Final = b"DLOG"
SUPPORTED_VERSIONS: Final = (1,)
MAX_VERSIONS: Final = 16
MAX_NAME: Final = 255
MAX_MESSAGE: Final = 1024
MAX_SIZE: Final = (1 << 63) - 1
DIGEST_SIZE: Final = 32
_U16_MAX: Final = 0xFFFF
_U32_MAX: Final = 0xFFFF_FFFF
_U64_MAX: Final = (1 << 64) - 1

Buffer: TypeAlias = bytes | bytearray | memoryview


class Code(enum.IntEnum):
    """Why a file was refused or failed, or why a connection ended.

    ``temporary`` codes mean "the same thing may work later"; permanent ones
    mean "it will fail the same way until an operator changes something".
    """

    UNSUPPORTED_VERSION = 1
    MALFORMED = 2
    UNEXPECTED_MESSAGE = 3
    LIMIT_EXCEEDED = 4
    KEYWORD_NOT_ALLOWED = 5
    BAD_NAME = 6
    TOO_LARGE = 7
    NAME_CONFLICT = 8
    DIGEST_MISMATCH = 9
    SIZE_MISMATCH = 10
    TEMPORARY_FAILURE = 11
    INTERNAL = 12
    TIMEOUT = 13
    CONNECTION_CLOSED = 14
    PEER_NOT_ALLOWED = 15

    @property
    def temporary(self) -> bool:
        return self in _TEMPORARY_CODES


_TEMPORARY_CODES: Final = frozenset(
    {
        # The data did not match its offer: the file may have been replaced
        # between hashing and sending, so a fresh offer can succeed.
        Code.DIGEST_MISMATCH,
        Code.SIZE_MISMATCH,
        Code.TEMPORARY_FAILURE,
        Code.TIMEOUT,
        Code.CONNECTION_CLOSED,
    }
)


class ProtocolError(Exception):
    """The protocol was broken; the connection is dead. ``code`` says how."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class LocalProtocolError(ProtocolError):
    """We were about to break the rules (a bug in the caller, or a bad event)."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the rules, closed early, or sent an Error."""


class _Broken(Exception):
    """A rule was broken; turned into Local- or RemoteProtocolError by who broke it."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --- events ---------------------------------------------------------------------------
# Each validates itself on construction, so a malformed event cannot exist.


def _require(ok: bool, code: Code, message: str) -> None:
    if not ok:
        raise LocalProtocolError(code, message)


def _check_int(what: str, value: int, high: int, low: int = 0) -> None:
    _require(
        isinstance(value, int) and not isinstance(value, bool) and low <= value <= high,
        Code.LIMIT_EXCEEDED,
        f"{what} {value!r} is outside {low}..{high}",
    )


def _check_code(code: Code) -> None:
    _require(isinstance(code, Code), Code.MALFORMED, f"code {code!r} is not a Code")


def _utf8(text: str, what: str) -> bytes:
    _require(isinstance(text, str), Code.MALFORMED, f"{what} must be str")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise LocalProtocolError(Code.MALFORMED, f"{what} is not valid UTF-8") from None


def _check_message(message: str) -> None:
    size = len(_utf8(message, "message"))
    _require(size <= MAX_MESSAGE, Code.LIMIT_EXCEEDED, f"message of {size} bytes > {MAX_MESSAGE}")


def _check_name(name: str) -> None:
    raw = _utf8(name, "name")
    _require(1 <= len(raw) <= MAX_NAME, Code.BAD_NAME, f"name must be 1..{MAX_NAME} bytes")
    # The receiver's own naming policy is stricter; this is only what no
    # receiver could ever accept as a single path component.
    _require(b"/" not in raw and b"\0" not in raw, Code.BAD_NAME, f"name {name!r} has / or NUL")
    _require(name not in (".", ".."), Code.BAD_NAME, f"name {name!r} is not a file name")


def _nbytes(data: Buffer) -> int:
    return data.nbytes if isinstance(data, memoryview) else len(data)


def clip_message(text: str) -> str:
    """``text`` cut to fit an Error/Refuse/Failed message (MAX_MESSAGE bytes of UTF-8)."""
    raw = text.encode("utf-8", "replace")[:MAX_MESSAGE]
    return raw.decode("utf-8", "ignore")


@dataclass(frozen=True, slots=True)
class Hello:
    """SENDER's opening: the versions it speaks and the limits it proposes."""

    versions: tuple[int, ...] = SUPPORTED_VERSIONS
    max_frame: int = DEFAULT_FRAME
    window: int = DEFAULT_WINDOW

    def __post_init__(self) -> None:
        _require(
            isinstance(self.versions, tuple) and 1 <= len(self.versions) <= MAX_VERSIONS,
            Code.LIMIT_EXCEEDED,
            f"Hello needs 1..{MAX_VERSIONS} versions",
        )
        for version in self.versions:
            _check_int("version", version, _U16_MAX, 1)
        _check_int("max_frame", self.max_frame, MAX_FRAME, MIN_FRAME)
        _check_int("window", self.window, MAX_WINDOW, 1)


@dataclass(frozen=True, slots=True)
class HelloReply:
    """RECEIVER's answer: the version chosen and the limits it accepts (<= proposed)."""

    version: int
    max_frame: int
    window: int

    def __post_init__(self) -> None:
        _check_int("version", self.version, _U16_MAX, 1)
        _check_int("max_frame", self.max_frame, MAX_FRAME, MIN_FRAME)
        _check_int("window", self.window, MAX_WINDOW, 1)


@dataclass(frozen=True, slots=True)
class Offer:
    """SENDER proposes one file. ``file_id`` must grow with every offer."""

    file_id: int
    keyword: str
    name: str
    size: int
    sha256: bytes

    def __post_init__(self) -> None:
        _check_int("file_id", self.file_id, _U32_MAX)
        _require(
            isinstance(self.keyword, str) and is_keyword(self.keyword),
            Code.MALFORMED,
            f"keyword {self.keyword!r}: expected {KEYWORD_RULE}",
        )
        _check_name(self.name)
        _check_int("size", self.size, MAX_SIZE)
        _require(
            isinstance(self.sha256, bytes) and len(self.sha256) == DIGEST_SIZE,
            Code.MALFORMED,
            f"sha256 must be {DIGEST_SIZE} bytes",
        )


@dataclass(frozen=True, slots=True)
class Accept:
    """RECEIVER wants the file's bytes from ``offset`` on (0: fresh; N: it holds N)."""

    file_id: int
    offset: int = 0

    def __post_init__(self) -> None:
        _check_int("file_id", self.file_id, _U32_MAX)
        _check_int("offset", self.offset, MAX_SIZE)


@dataclass(frozen=True, slots=True)
class AlreadyStored:
    """RECEIVER holds an identical copy: the file counts as delivered, send nothing."""

    file_id: int

    def __post_init__(self) -> None:
        _check_int("file_id", self.file_id, _U32_MAX)


@dataclass(frozen=True, slots=True)
class Refuse:
    """RECEIVER will not take the file."""

    file_id: int
    code: Code
    message: str = ""

    def __post_init__(self) -> None:
        _check_int("file_id", self.file_id, _U32_MAX)
        _check_code(self.code)
        _check_message(self.message)


@dataclass(frozen=True, slots=True)
class Data:
    """Some of the file's bytes. Received payloads may alias the receive_data() buffer."""

    file_id: int
    data: Buffer = field(repr=False)

    def __post_init__(self) -> None:
        _check_int("file_id", self.file_id, _U32_MAX)
        _check_int("data length", _nbytes(self.data), MAX_FRAME, 1)


@dataclass(frozen=True, slots=True)
class EndOfData:
    """SENDER has sent all ``size - offset`` bytes of the file."""

    file_id: int

    def __post_init__(self) -> None:
        _check_int("file_id", self.file_id, _U32_MAX)


@dataclass(frozen=True, slots=True)
class Stored:
    """RECEIVER verified the file and made it durable (fsync, rename, directory fsync)."""

    file_id: int

    def __post_init__(self) -> None:
        _check_int("file_id", self.file_id, _U32_MAX)


@dataclass(frozen=True, slots=True)
class Failed:
    """RECEIVER got all the bytes but could not store them (see ``code.temporary``)."""

    file_id: int
    code: Code
    message: str = ""

    def __post_init__(self) -> None:
        _check_int("file_id", self.file_id, _U32_MAX)
        _check_code(self.code)
        _check_message(self.message)


@dataclass(frozen=True, slots=True)
class Ping:
    """Keepalive; the peer must answer with a Pong. ``nonce`` is the caller's."""

    nonce: int = 0

    def __post_init__(self) -> None:
        _check_int("nonce", self.nonce, _U64_MAX)


@dataclass(frozen=True, slots=True)
class Pong:
    """Answer to a Ping (conventionally echoing its nonce)."""

    nonce: int = 0

    def __post_init__(self) -> None:
        _check_int("nonce", self.nonce, _U64_MAX)


@dataclass(frozen=True, slots=True)
class Goodbye:
    """SENDER: no more offers. RECEIVER: every file answered, closing."""


@dataclass(frozen=True, slots=True)
class Error:
    """Anything unexpected: after it the connection is dead."""

    code: Code
    message: str = ""

    def __post_init__(self) -> None:
        _check_code(self.code)
        _check_message(self.message)

    @classmethod
    def from_exception(cls, exc: ProtocolError) -> Error:
        """The Error to send the peer after ``exc`` killed the connection."""
        return cls(exc.code, clip_message(exc.message))


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """Local only: the peer closed the stream after a clean Goodbye exchange."""


@dataclass(frozen=True, slots=True)
class _DataHeader:
    """A DATA frame's header: how bulk data goes through the state machine."""

    file_id: int
    length: int

    def __post_init__(self) -> None:
        _check_int("file_id", self.file_id, _U32_MAX)
        _check_int("data length", self.length, MAX_FRAME, 1)


Event: TypeAlias = (
    Hello
    | HelloReply
    | Offer
    | Accept
    | AlreadyStored
    | Refuse
    | Data
    | EndOfData
    | Stored
    | Failed
    | Ping
    | Pong
    | Goodbye
    | Error
    | ConnectionClosed
)


class NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA


# --- bytes ----------------------------------------------------------------------------

HEADER: Final = struct.Struct(">BI")
DATA_HEADER: Final = struct.Struct(">BII")
_HELLO_TAIL = struct.Struct(">IH")
_HELLO_REPLY = struct.Struct(">HIH")
_OFFER_FIXED = struct.Struct(">IQ32s")
_ACCEPT = struct.Struct(">IQ")
_ID = struct.Struct(">I")
_CODE_TEXT = struct.Struct(">HH")
_ID_CODE_TEXT = struct.Struct(">IHH")
_NONCE = struct.Struct(">Q")
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")


class Kind(enum.IntEnum):
    """The type byte of each message."""

    HELLO = 0x01
    HELLO_REPLY = 0x02
    OFFER = 0x10
    ACCEPT = 0x11
    ALREADY_STORED = 0x12
    REFUSE = 0x13
    DATA = 0x20
    END_OF_DATA = 0x21
    STORED = 0x22
    FAILED = 0x23
    PING = 0x30
    PONG = 0x31
    GOODBYE = 0x3E
    ERROR = 0x3F


class _Reader:
    """Walks a message body; running short or leaving bytes over is MALFORMED."""

    def __init__(self, kind: Kind, body: bytes) -> None:
        self._kind = kind
        self._body = body
        self._pos = 0

    def unpack(self, fmt: struct.Struct) -> tuple[Any, ...]:
        return fmt.unpack(self.raw(fmt.size))

    def raw(self, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._body):
            raise _Broken(Code.MALFORMED, f"{self._kind.name} body is too short")
        chunk = self._body[self._pos : end]
        self._pos = end
        return chunk

    def text(self, n: int, what: str) -> str:
        try:
            return self.raw(n).decode("utf-8")
        except UnicodeDecodeError:
            raise _Broken(Code.MALFORMED, f"{self._kind.name} {what} is not UTF-8") from None

    def code(self, value: int) -> Code:
        try:
            return Code(value)
        except ValueError:
            raise _Broken(Code.MALFORMED, f"{self._kind.name} has unknown code {value}") from None

    def end(self) -> None:
        if self._pos != len(self._body):
            raise _Broken(Code.MALFORMED, f"{self._kind.name} body has trailing bytes")


def _encode_hello(ev: Hello) -> bytes:
    versions = b"".join(_U16.pack(v) for v in ev.versions)
    return MAGIC + _U8.pack(len(ev.versions)) + versions + _HELLO_TAIL.pack(ev.max_frame, ev.window)


def _decode_hello(r: _Reader) -> Hello:
    if r.raw(len(MAGIC)) != MAGIC:
        raise _Broken(Code.MALFORMED, "HELLO lacks the dlogd magic: not a dlogd peer")
    (count,) = r.unpack(_U8)
    versions = tuple(r.unpack(_U16)[0] for _ in range(count))
    max_frame, window = r.unpack(_HELLO_TAIL)
    return Hello(versions, max_frame, window)


def _encode_offer(ev: Offer) -> bytes:
    keyword = ev.keyword.encode("ascii")
    name = ev.name.encode("utf-8")
    return b"".join(
        (
            _OFFER_FIXED.pack(ev.file_id, ev.size, ev.sha256),
            _U8.pack(len(keyword)),
            keyword,
            _U8.pack(len(name)),
            name,
        )
    )


def _decode_offer(r: _Reader) -> Offer:
    file_id, size, sha256 = r.unpack(_OFFER_FIXED)
    keyword = r.text(r.unpack(_U8)[0], "keyword")
    name = r.text(r.unpack(_U8)[0], "name")
    return Offer(file_id, keyword, name, size, sha256)


def _id_codec(
    cls: type[AlreadyStored | EndOfData | Stored],
) -> tuple[Callable[[Any], bytes], Callable[[_Reader], Event]]:
    return (lambda ev: _ID.pack(ev.file_id)), (lambda r: cls(r.unpack(_ID)[0]))


def _nonce_codec(
    cls: type[Ping | Pong],
) -> tuple[Callable[[Any], bytes], Callable[[_Reader], Event]]:
    return (lambda ev: _NONCE.pack(ev.nonce)), (lambda r: cls(r.unpack(_NONCE)[0]))


def _encode_verdict(ev: Refuse | Failed) -> bytes:
    message = ev.message.encode("utf-8")
    return _ID_CODE_TEXT.pack(ev.file_id, ev.code, len(message)) + message


def _verdict_decoder(cls: type[Refuse | Failed]) -> Callable[[_Reader], Event]:
    def decode(r: _Reader) -> Event:
        file_id, code, length = r.unpack(_ID_CODE_TEXT)
        return cls(file_id, r.code(code), r.text(length, "message"))

    return decode


def _encode_error(ev: Error) -> bytes:
    message = ev.message.encode("utf-8")
    return _CODE_TEXT.pack(ev.code, len(message)) + message


def _decode_error(r: _Reader) -> Error:
    code, length = r.unpack(_CODE_TEXT)
    return Error(r.code(code), r.text(length, "message"))


@dataclass(frozen=True)
class _Codec:
    kind: Kind
    max_body: int
    encode: Callable[[Any], bytes]
    decode: Callable[[_Reader], Event]


_VERDICT_MAX = _ID_CODE_TEXT.size + MAX_MESSAGE
_CODECS: Final[dict[type, _Codec]] = {
    Hello: _Codec(
        Kind.HELLO,
        len(MAGIC) + 1 + 2 * MAX_VERSIONS + _HELLO_TAIL.size,
        _encode_hello,
        _decode_hello,
    ),
    HelloReply: _Codec(
        Kind.HELLO_REPLY,
        _HELLO_REPLY.size,
        lambda ev: _HELLO_REPLY.pack(ev.version, ev.max_frame, ev.window),
        lambda r: HelloReply(*r.unpack(_HELLO_REPLY)),
    ),
    Offer: _Codec(
        Kind.OFFER, _OFFER_FIXED.size + 2 + MAX_KEYWORD + MAX_NAME, _encode_offer, _decode_offer
    ),
    Accept: _Codec(
        Kind.ACCEPT,
        _ACCEPT.size,
        lambda ev: _ACCEPT.pack(ev.file_id, ev.offset),
        lambda r: Accept(*r.unpack(_ACCEPT)),
    ),
    AlreadyStored: _Codec(Kind.ALREADY_STORED, _ID.size, *_id_codec(AlreadyStored)),
    Refuse: _Codec(Kind.REFUSE, _VERDICT_MAX, _encode_verdict, _verdict_decoder(Refuse)),
    EndOfData: _Codec(Kind.END_OF_DATA, _ID.size, *_id_codec(EndOfData)),
    Stored: _Codec(Kind.STORED, _ID.size, *_id_codec(Stored)),
    Failed: _Codec(Kind.FAILED, _VERDICT_MAX, _encode_verdict, _verdict_decoder(Failed)),
    Ping: _Codec(Kind.PING, _NONCE.size, *_nonce_codec(Ping)),
    Pong: _Codec(Kind.PONG, _NONCE.size, *_nonce_codec(Pong)),
    Goodbye: _Codec(Kind.GOODBYE, 0, lambda ev: b"", lambda r: Goodbye()),
    Error: _Codec(Kind.ERROR, _CODE_TEXT.size + MAX_MESSAGE, _encode_error, _decode_error),
}
_BY_KIND: Final[dict[int, _Codec]] = {codec.kind: codec for codec in _CODECS.values()}

# The most an incomplete message can make us hold: data bodies are streamed.
MAX_BUFFERED: Final = HEADER.size + max(codec.max_body for codec in _CODECS.values())


def encode(event: Event) -> bytes:
    """One message's bytes, with no state checks: for tests and tools, not connections."""
    if isinstance(event, Data):
        return DATA_HEADER.pack(Kind.DATA, _ID.size + _nbytes(event.data), event.file_id) + bytes(
            event.data
        )
    codec = _CODECS.get(type(event))
    if codec is None:
        raise LocalProtocolError(Code.UNEXPECTED_MESSAGE, f"{event!r} has no wire form")
    body = codec.encode(event)
    return HEADER.pack(codec.kind, len(body)) + body


def decode(message: Buffer) -> Event:
    """Exactly one whole message back into its event, with no state checks (tests, tools).

    Raises RemoteProtocolError if ``message`` is not one valid message.
    """
    raw = bytes(message)
    try:
        if len(raw) < HEADER.size:
            raise _Broken(Code.MALFORMED, "shorter than a message header")
        kind, length = HEADER.unpack_from(raw)
        body = raw[HEADER.size :]
        if len(body) != length:
            raise _Broken(Code.MALFORMED, f"header says {length} body bytes, got {len(body)}")
        if kind == Kind.DATA:
            if len(body) <= _ID.size:
                raise _Broken(Code.MALFORMED, "DATA without payload")
            return Data(_ID.unpack_from(body)[0], body[_ID.size :])
        codec = _BY_KIND.get(kind)
        if codec is None:
            raise _Broken(Code.MALFORMED, f"unknown message type 0x{kind:02x}")
        if length > codec.max_body:
            raise _Broken(Code.LIMIT_EXCEEDED, f"{codec.kind.name} body of {length} bytes")
        return _decode(codec, body)
    except _Broken as broken:
        raise RemoteProtocolError(broken.code, broken.message) from None
    except LocalProtocolError as exc:  # e.g. a DATA payload over MAX_FRAME
        raise RemoteProtocolError(exc.code, exc.message) from None


# --- state ----------------------------------------------------------------------------


class Role(enum.Enum):
    SENDER = "sender"
    RECEIVER = "receiver"


class ConnState(enum.Enum):
    START = "START"
    NEGOTIATING = "NEGOTIATING"
    OPEN = "OPEN"
    DRAINING = "DRAINING"
    CLOSED = "CLOSED"
    ERROR = "ERROR"


class FileState(enum.Enum):
    OFFERED = "OFFERED"
    ACCEPTED = "ACCEPTED"
    SENDING = "SENDING"
    AWAITING_STORED = "AWAITING_STORED"
    DONE = "DONE"


_S, _R = Role.SENDER, Role.RECEIVER
_START, _NEGOTIATING, _OPEN = ConnState.START, ConnState.NEGOTIATING, ConnState.OPEN
_DRAINING, _CLOSED, _ERROR = ConnState.DRAINING, ConnState.CLOSED, ConnState.ERROR

_CONN_TRANSITIONS: Final[dict[tuple[ConnState, Role, type], ConnState]] = {
    (_START, _S, Hello): _NEGOTIATING,
    (_NEGOTIATING, _R, HelloReply): _OPEN,
    (_OPEN, _S, Offer): _OPEN,
    (_OPEN, _S, _DataHeader): _OPEN,
    (_OPEN, _S, EndOfData): _OPEN,
    (_OPEN, _R, Accept): _OPEN,
    (_OPEN, _R, AlreadyStored): _OPEN,
    (_OPEN, _R, Refuse): _OPEN,
    (_OPEN, _R, Stored): _OPEN,
    (_OPEN, _R, Failed): _OPEN,
    (_OPEN, _S, Goodbye): _DRAINING,
    (_DRAINING, _R, Stored): _DRAINING,
    (_DRAINING, _R, Failed): _DRAINING,
    (_DRAINING, _R, Goodbye): _CLOSED,
    # Keepalive, either way, once the handshake is done.
    **{
        (state, who, kind): state
        for state in (_OPEN, _DRAINING)
        for who in Role
        for kind in (Ping, Pong)
    },
    # Either side may give up at any point before the end.
    **{
        (state, who, Error): _ERROR
        for state in (_START, _NEGOTIATING, _OPEN, _DRAINING)
        for who in Role
    },
}

_FS = FileState
_FILE_TRANSITIONS: Final[dict[tuple[FileState | None, type], FileState]] = {
    (None, Offer): _FS.OFFERED,
    (_FS.OFFERED, Accept): _FS.ACCEPTED,
    (_FS.OFFERED, AlreadyStored): _FS.DONE,
    (_FS.OFFERED, Refuse): _FS.DONE,
    (_FS.ACCEPTED, _DataHeader): _FS.SENDING,
    (_FS.SENDING, _DataHeader): _FS.SENDING,
    (_FS.ACCEPTED, EndOfData): _FS.AWAITING_STORED,
    (_FS.SENDING, EndOfData): _FS.AWAITING_STORED,
    (_FS.AWAITING_STORED, Stored): _FS.DONE,
    (_FS.AWAITING_STORED, Failed): _FS.DONE,
}


@dataclass
class _File:
    state: FileState | None = None
    size: int = 0
    remaining: int = 0  # data bytes still due, known once accepted


_StateEvent: TypeAlias = Event | _DataHeader


class Connection:
    """One end of one shipper<->collector connection. See the module docstring."""

    def __init__(
        self,
        role: Role,
        *,
        versions: tuple[int, ...] = SUPPORTED_VERSIONS,
        max_frame: int = DEFAULT_FRAME,
        window: int = DEFAULT_WINDOW,
    ) -> None:
        self.role = role
        self._peer = _R if role is _S else _S
        # What we propose (sender) or allow at most (receiver); validated as a Hello.
        self._own = Hello(versions, max_frame, window)
        self._proposal: Hello | None = None
        self.version: int | None = None
        self.max_frame = max_frame
        self.window = window
        self._state = _START
        self._failure: ProtocolError | None = None
        self._sent_error = False
        self._files: dict[int, _File] = {}
        self._unanswered: deque[int] = deque()
        self._data_due: deque[int] = deque()
        self._last_file_id = -1
        self._pings_unanswered = {_S: 0, _R: 0}
        self._chunks: deque[memoryview] = deque()
        self._buffered = 0
        self._eof = False
        self._frame_file = 0
        self._frame_left = 0

    # --- what the I/O layer asks ---

    @property
    def state(self) -> ConnState:
        return self._state

    @property
    def buffered(self) -> int:
        """Bytes received but not yet handed out as events."""
        return self._buffered

    @property
    def in_flight(self) -> int:
        """Files offered and not yet finished (Stored, Failed, AlreadyStored, Refused)."""
        return len(self._files)

    @property
    def can_offer(self) -> bool:
        return self._state is _OPEN and len(self._files) < self.window

    @property
    def data_due(self) -> tuple[int, int] | None:
        """(file_id, bytes still to send) of the file whose data goes next, if any."""
        if not self._data_due:
            return None
        file_id = self._data_due[0]
        return file_id, self._files[file_id].remaining

    def file_state(self, file_id: int) -> FileState | None:
        """The file's state while in flight; None once done or if never offered."""
        entry = self._files.get(file_id)
        return entry.state if entry else None

    def hello(self) -> Hello:
        """The Hello a sender opens with, from the constructor's limits."""
        return self._own

    def answer_hello(self, hello: Hello) -> HelloReply | Error:
        """A receiver's answer: highest common version, the smaller of each limit."""
        common = set(hello.versions) & set(self._own.versions)
        if not common:
            return Error(
                Code.UNSUPPORTED_VERSION,
                f"peer speaks versions {list(hello.versions)}, we speak {list(self._own.versions)}",
            )
        return HelloReply(
            max(common),
            min(hello.max_frame, self._own.max_frame),
            min(hello.window, self._own.window),
        )

    # --- sending ---

    def send(self, event: Event) -> bytes:
        """The bytes that say ``event`` to the peer, after checking we may say it."""
        if isinstance(event, Data):
            return self.send_data_header(event.file_id, _nbytes(event.data)) + bytes(event.data)
        if isinstance(event, Error) and self._state is _ERROR and not self._sent_error:
            # Telling the peer why is the one thing a dead connection still does.
            self._sent_error = True
            return encode(event)
        self._step(self.role, event)
        return encode(event)

    def send_data_header(self, file_id: int, length: int) -> bytes:
        """The 9-byte header of a DATA frame whose ``length`` payload bytes the caller
        writes right after it: lets bulk data go out without being copied here."""
        try:
            header = _DataHeader(file_id, length)
        except LocalProtocolError as exc:
            raise self._fail(exc) from None
        self._step(self.role, header)
        return DATA_HEADER.pack(Kind.DATA, _ID.size + length, file_id)

    # --- receiving ---

    def receive_data(self, data: Buffer) -> None:
        """Bytes the peer sent; ``b""`` means it closed its side.

        A mutable buffer passed here may be reused once next_event() has
        returned NEED_DATA (the leftover is copied then); Data events taken out
        before that alias it.
        """
        if self._eof:
            raise LocalProtocolError(Code.INTERNAL, "receive_data() after end of stream")
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        if not view.nbytes:
            self._eof = True
            return
        self._chunks.append(view)
        self._buffered += view.nbytes

    def next_event(self) -> Event | NeedData:
        """The next event from the peer, or NEED_DATA if its bytes have not all arrived."""
        if self._failure is not None:
            raise type(self._failure)(self._failure.code, f"dead connection: {self._failure}")
        try:
            return self._next_event()
        except _Broken as broken:
            raise self._fail(RemoteProtocolError(broken.code, broken.message)) from None

    def _next_event(self) -> Event | NeedData:
        if self._frame_left:
            return self._data_piece()
        header = self._peek(HEADER.size)
        if header is None:
            return self._need_more()
        kind, length = HEADER.unpack(header)
        if kind == Kind.DATA:
            return self._start_data_frame(length)
        codec = _BY_KIND.get(kind)
        if codec is None:
            raise _Broken(Code.MALFORMED, f"unknown message type 0x{kind:02x}")
        if length > codec.max_body:
            raise _Broken(Code.LIMIT_EXCEEDED, f"{codec.kind.name} body of {length} bytes")
        if self._buffered < HEADER.size + length:
            return self._need_more()
        self._take(HEADER.size)
        event = _decode(codec, self._take(length))
        self._apply(self._peer, event)
        return event

    def _start_data_frame(self, length: int) -> Event | NeedData:
        if not _ID.size < length <= _ID.size + self.max_frame:
            raise _Broken(Code.LIMIT_EXCEEDED, f"DATA body of {length} bytes")
        if self._buffered < DATA_HEADER.size:
            return self._need_more()
        _, _, file_id = DATA_HEADER.unpack(self._take(DATA_HEADER.size))
        self._apply(self._peer, _DataHeader(file_id, length - _ID.size))
        self._frame_file = file_id
        self._frame_left = length - _ID.size
        return self._data_piece()

    def _data_piece(self) -> Event | NeedData:
        if not self._buffered:
            return self._need_more()
        piece = self._take_view(self._frame_left)
        self._frame_left -= piece.nbytes
        return Data(self._frame_file, piece)

    def _need_more(self) -> ConnectionClosed | NeedData:
        if not self._eof:
            self._compact()
            return NEED_DATA
        if self._buffered or self._frame_left:
            raise _Broken(Code.CONNECTION_CLOSED, "peer closed the connection mid-message")
        if self._state is not _CLOSED:
            raise _Broken(
                Code.CONNECTION_CLOSED, f"peer closed the connection in {self._state.name}"
            )
        return ConnectionClosed()

    # --- the receive buffer: received chunks, sliced without copying ---

    def _peek(self, n: int) -> bytes | None:
        if self._buffered < n:
            return None
        if not n:
            return b""
        first = self._chunks[0]
        if first.nbytes >= n:
            return bytes(first[:n])
        out = bytearray()
        for chunk in self._chunks:
            out += chunk[: n - len(out)]
            if len(out) == n:
                break
        return bytes(out)

    def _take(self, n: int) -> bytes:
        out = self._peek(n)
        assert out is not None  # callers check _buffered first
        while n:
            n -= self._take_view(n).nbytes
        return out

    def _take_view(self, limit: int) -> memoryview:
        first = self._chunks[0]
        if first.nbytes <= limit:
            self._chunks.popleft()
            piece = first
        else:
            piece = first[:limit]
            self._chunks[0] = first[limit:]
        self._buffered -= piece.nbytes
        return piece

    def _compact(self) -> None:
        # What is left is part of one small message. Copying it makes the
        # caller's buffer free to reuse, and keeps a peer that trickles bytes
        # from piling up one object per byte; it also lets go of the big
        # chunk the leftover was sliced from.
        if len(self._chunks) > 1 or (self._chunks and not _owns_bytes(self._chunks[0])):
            self._chunks = deque([memoryview(b"".join(self._chunks))])

    # --- the state machine ---

    def _step(self, who: Role, event: _StateEvent) -> None:
        if self._failure is not None:
            raise LocalProtocolError(self._failure.code, f"dead connection: {self._failure}")
        try:
            self._apply(who, event)
        except _Broken as broken:
            raise self._fail(LocalProtocolError(broken.code, broken.message)) from None

    def _fail(self, exc: ProtocolError) -> ProtocolError:
        self._state = _ERROR
        self._failure = exc
        return exc

    def _apply(self, who: Role, event: _StateEvent) -> None:
        new_state = _CONN_TRANSITIONS.get((self._state, who, type(event)))
        if new_state is None:
            raise _Broken(
                Code.UNEXPECTED_MESSAGE,
                f"{who.value} may not send {type(event).__name__} in state {self._state.name}",
            )
        guard = _GUARDS.get(type(event))
        if guard is not None:
            guard(self, who, event)
        self._state = new_state

    def _advance(self, file_id: int, event: _StateEvent) -> _File:
        entry = self._files.get(file_id) or _File()
        new_state = _FILE_TRANSITIONS.get((entry.state, type(event)))
        if new_state is None:
            where = entry.state.name if entry.state else "no such file in flight"
            raise _Broken(
                Code.UNEXPECTED_MESSAGE, f"{type(event).__name__} for file {file_id}: {where}"
            )
        entry.state = new_state
        if new_state is _FS.DONE:
            del self._files[file_id]
        else:
            self._files[file_id] = entry
        return entry

    def _on_hello(self, who: Role, event: Hello) -> None:
        self._proposal = event

    def _on_hello_reply(self, who: Role, event: HelloReply) -> None:
        proposal = self._proposal
        assert proposal is not None  # the table admits HelloReply only after Hello
        if event.version not in proposal.versions:
            raise _Broken(Code.UNSUPPORTED_VERSION, f"version {event.version} was not offered")
        if event.max_frame > proposal.max_frame or event.window > proposal.window:
            raise _Broken(Code.LIMIT_EXCEEDED, "HelloReply raises a limit the Hello proposed")
        self.version, self.max_frame, self.window = event.version, event.max_frame, event.window

    def _on_offer(self, who: Role, event: Offer) -> None:
        if len(self._files) >= self.window:
            raise _Broken(Code.LIMIT_EXCEEDED, f"window of {self.window} files is full")
        if event.file_id <= self._last_file_id:
            raise _Broken(
                Code.UNEXPECTED_MESSAGE,
                f"file_id {event.file_id} does not follow {self._last_file_id}",
            )
        self._advance(event.file_id, event).size = event.size
        self._unanswered.append(event.file_id)
        self._last_file_id = event.file_id

    def _on_answer(self, who: Role, event: Accept | AlreadyStored | Refuse) -> None:
        _expect_head(self._unanswered, event.file_id, "answer")
        entry = self._advance(event.file_id, event)
        self._unanswered.popleft()
        if isinstance(event, Accept):
            if event.offset > entry.size:
                raise _Broken(
                    Code.MALFORMED, f"offset {event.offset} is past the size {entry.size}"
                )
            entry.remaining = entry.size - event.offset
            self._data_due.append(event.file_id)

    def _on_data(self, who: Role, event: _DataHeader) -> None:
        _expect_head(self._data_due, event.file_id, "data")
        if event.length > self.max_frame:
            raise _Broken(Code.LIMIT_EXCEEDED, f"data frame of {event.length} > {self.max_frame}")
        entry = self._advance(event.file_id, event)
        if event.length > entry.remaining:
            raise _Broken(
                Code.SIZE_MISMATCH,
                f"file {event.file_id}: {event.length} bytes sent, {entry.remaining} due",
            )
        entry.remaining -= event.length

    def _on_end_of_data(self, who: Role, event: EndOfData) -> None:
        _expect_head(self._data_due, event.file_id, "EndOfData")
        entry = self._advance(event.file_id, event)
        if entry.remaining:
            raise _Broken(
                Code.SIZE_MISMATCH, f"file {event.file_id} ended {entry.remaining} bytes short"
            )
        self._data_due.popleft()

    def _on_result(self, who: Role, event: Stored | Failed) -> None:
        self._advance(event.file_id, event)

    def _on_goodbye(self, who: Role, event: Goodbye) -> None:
        # The sender leaves only acknowledgements pending; the receiver nothing.
        pending = [
            f"{file_id} {entry.state.name if entry.state else '?'}"
            for file_id, entry in self._files.items()
            if who is _R or entry.state is not _FS.AWAITING_STORED
        ]
        if pending:
            raise _Broken(Code.UNEXPECTED_MESSAGE, f"Goodbye with files pending: {pending[:8]}")

    def _on_ping(self, who: Role, event: Ping) -> None:
        self._pings_unanswered[who] += 1

    def _on_pong(self, who: Role, event: Pong) -> None:
        asker = _R if who is _S else _S
        if not self._pings_unanswered[asker]:
            raise _Broken(Code.UNEXPECTED_MESSAGE, "Pong without a Ping")
        self._pings_unanswered[asker] -= 1

    def _on_error(self, who: Role, event: Error) -> None:
        if who is self.role:
            self._sent_error = True
            self._failure = LocalProtocolError(event.code, f"we sent Error: {event.message}")
        else:
            self._failure = RemoteProtocolError(event.code, f"peer sent Error: {event.message}")


def _owns_bytes(view: memoryview) -> bool:
    """True if ``view`` is the whole of an immutable bytes object."""
    return isinstance(view.obj, bytes) and len(view.obj) == view.nbytes


def _expect_head(queue: deque[int], file_id: int, what: str) -> None:
    """Answers and data go in offer order: ``file_id`` must be first in ``queue``."""
    if not queue or queue[0] != file_id:
        due = queue[0] if queue else "none"
        raise _Broken(Code.UNEXPECTED_MESSAGE, f"{what} for file {file_id}, but due is {due}")


def _decode(codec: _Codec, body: bytes) -> Event:
    reader = _Reader(codec.kind, body)
    try:
        event = codec.decode(reader)
    except LocalProtocolError as exc:
        # The event refused the peer's values: the peer broke the rules.
        raise _Broken(exc.code, exc.message) from None
    reader.end()
    return event


_GUARDS: Final[dict[type, Callable[[Connection, Role, Any], None]]] = {
    Hello: Connection._on_hello,
    HelloReply: Connection._on_hello_reply,
    Offer: Connection._on_offer,
    Accept: Connection._on_answer,
    AlreadyStored: Connection._on_answer,
    Refuse: Connection._on_answer,
    _DataHeader: Connection._on_data,
    EndOfData: Connection._on_end_of_data,
    Stored: Connection._on_result,
    Failed: Connection._on_result,
    Goodbye: Connection._on_goodbye,
    Ping: Connection._on_ping,
    Pong: Connection._on_pong,
    Error: Connection._on_error,
}
