"""The local submit protocol's bytes, without I/O (spec: docs/submit-protocol.md).

(The other protocol, between shipper and collector, is ``shipwire``.)

Used by the client side (``client``) to build requests and read answers, and by
the service (``submit``) to parse requests and build answers. Descriptor
passing (SCM_RIGHTS) is the socket layer's job; this module sees only bytes.
"""

from __future__ import annotations

import enum
import errno
import struct
from dataclasses import dataclass

from dlogd.names import KEYWORD_RULE, MAX_KEYWORD, is_keyword

REQUEST_MAGIC = b"DLS1"
RESPONSE_MAGIC = b"DLR1"
REQUEST_HEADER = struct.Struct(">4sHH")
RESPONSE_HEADER = struct.Struct(">4sBBHQ")
MAX_PATH = 4096
MAX_MESSAGE = 4096


class SubmitCode(enum.IntEnum):
    OK = 0
    BAD_REQUEST = 1
    UNKNOWN_KEYWORD = 2
    PERMISSION_DENIED = 3
    NOT_REGULAR_FILE = 4
    TOO_LARGE = 5
    BAD_NAME = 6
    TEMPORARY_FAILURE = 7
    INTERNAL = 8
    SPOOL_FULL = 9  # limits { spool_max_size; spool_min_free; } or the disk: retry later

    @property
    def errno(self) -> int:
        return _ERRNO[self]


_ERRNO = {
    SubmitCode.OK: 0,
    SubmitCode.BAD_REQUEST: errno.EPROTO,
    SubmitCode.UNKNOWN_KEYWORD: errno.ENOENT,
    SubmitCode.PERMISSION_DENIED: errno.EACCES,
    SubmitCode.NOT_REGULAR_FILE: errno.EINVAL,
    SubmitCode.TOO_LARGE: errno.EFBIG,
    SubmitCode.BAD_NAME: errno.EINVAL,
    SubmitCode.TEMPORARY_FAILURE: errno.EAGAIN,
    SubmitCode.INTERNAL: errno.EIO,
    SubmitCode.SPOOL_FULL: errno.ENOSPC,
}


class WireError(ValueError):
    """The peer sent bytes that are not this protocol."""


@dataclass(frozen=True)
class Request:
    keyword: str
    path: bytes

    def __post_init__(self) -> None:
        if not is_keyword(self.keyword):
            raise WireError(f"keyword {self.keyword!r}: expected {KEYWORD_RULE}")
        if not 1 <= len(self.path) <= MAX_PATH or b"\0" in self.path:
            raise WireError(f"path must be 1-{MAX_PATH} bytes without NUL")


@dataclass(frozen=True)
class Response:
    code: SubmitCode
    message: str
    size: int = 0

    def __post_init__(self) -> None:
        if self.code is not SubmitCode.OK and self.size:
            raise WireError("a refusal carries no size")

    @property
    def ok(self) -> bool:
        return self.code is SubmitCode.OK


def encode_request_header(request: Request) -> bytes:
    """The fixed header: sent in the sendmsg() that carries the descriptor."""
    return REQUEST_HEADER.pack(REQUEST_MAGIC, len(request.keyword), len(request.path))


def encode_request_body(request: Request) -> bytes:
    return request.keyword.encode("ascii") + request.path


def parse_request_header(header: bytes) -> tuple[int, int]:
    """Lengths of keyword and path, checked against the limits."""
    if len(header) != REQUEST_HEADER.size:
        raise WireError(f"request header of {len(header)} bytes, expected {REQUEST_HEADER.size}")
    magic, klen, plen = REQUEST_HEADER.unpack(header)
    if magic != REQUEST_MAGIC:
        raise WireError(f"bad request magic {magic!r}")
    if not 1 <= klen <= MAX_KEYWORD:
        raise WireError(f"keyword length {klen} outside 1-{MAX_KEYWORD}")
    if not 1 <= plen <= MAX_PATH:
        raise WireError(f"path length {plen} outside 1-{MAX_PATH}")
    return klen, plen


def parse_request_body(body: bytes, klen: int) -> Request:
    try:
        keyword = body[:klen].decode("ascii")
    except UnicodeDecodeError:
        raise WireError("keyword is not ASCII") from None
    return Request(keyword, body[klen:])


def encode_response(response: Response) -> bytes:
    # Cut at a character boundary: the message is UTF-8 on the wire.
    message = (
        response.message.encode("utf-8", "replace")[:MAX_MESSAGE]
        .decode("utf-8", "ignore")
        .encode("utf-8")
    )
    return RESPONSE_HEADER.pack(RESPONSE_MAGIC, response.code, 0, len(message), response.size) + (
        message
    )


def parse_response_header(header: bytes) -> tuple[SubmitCode, int, int]:
    """(code, message length, size) from the 16-byte header."""
    if len(header) != RESPONSE_HEADER.size:
        raise WireError(f"response header of {len(header)} bytes, expected {RESPONSE_HEADER.size}")
    magic, code, reserved, mlen, size = RESPONSE_HEADER.unpack(header)
    if magic != RESPONSE_MAGIC:
        raise WireError(f"bad response magic {magic!r}")
    if reserved != 0:
        raise WireError(f"reserved response byte is {reserved}, expected 0")
    try:
        parsed = SubmitCode(code)
    except ValueError:
        raise WireError(f"unknown response code {code}") from None
    if mlen > MAX_MESSAGE:
        raise WireError(f"message length {mlen} over {MAX_MESSAGE}")
    if parsed is not SubmitCode.OK and size:
        raise WireError("a refusal carries no size")
    return parsed, mlen, size
