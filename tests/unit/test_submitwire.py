"""The local submit protocol's bytes (dlogd/submitwire.py) and the Python caller's
handling of them (dlogd/client.py) against peers that break the rules.

The wire cases run without sockets. The client cases use a real Unix socket
with a scripted peer in a thread: the real service never sends garbage, so
this is the only place the client's defences against it can be exercised.
The client against the real service is tests/process/test_clients.py.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dlogd import client
from dlogd.submitwire import (
    MAX_MESSAGE,
    MAX_PATH,
    REQUEST_HEADER,
    REQUEST_MAGIC,
    RESPONSE_HEADER,
    RESPONSE_MAGIC,
    Request,
    Response,
    SubmitCode,
    WireError,
    encode_request_body,
    encode_request_header,
    encode_response,
    parse_request_body,
    parse_request_header,
    parse_response_header,
)

REPO = Path(__file__).resolve().parents[2]

keywords = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}", fullmatch=True)
paths = st.binary(min_size=1, max_size=MAX_PATH).filter(lambda p: b"\0" not in p)


# --- round trips -----------------------------------------------------------------


@given(keywords, paths)
def test_request_round_trip(keyword: str, path: bytes) -> None:
    request = Request(keyword, path)
    header = encode_request_header(request)
    assert len(header) == REQUEST_HEADER.size == 8
    klen, plen = parse_request_header(header)
    assert parse_request_body(encode_request_body(request), klen) == request
    assert plen == len(path)


@given(st.sampled_from(SubmitCode), st.text(max_size=MAX_MESSAGE // 4), st.integers(0, 2**64 - 1))
def test_response_round_trip(code: SubmitCode, message: str, size: int) -> None:
    size = size if code is SubmitCode.OK else 0  # a refusal carries no size
    wire = encode_response(Response(code, message, size))
    parsed_code, mlen, parsed_size = parse_response_header(wire[: RESPONSE_HEADER.size])
    body = wire[RESPONSE_HEADER.size :]
    assert (parsed_code, parsed_size, mlen) == (code, size, len(body))
    assert body.decode("utf-8") == message


def test_request_layout_matches_the_spec() -> None:
    request = Request("audit", b"/var/log/app/x.log")
    wire = encode_request_header(request) + encode_request_body(request)
    assert wire == b"DLS1\x00\x05\x00\x12audit/var/log/app/x.log"


def test_response_layout_matches_the_spec() -> None:
    wire = encode_response(Response(SubmitCode.OK, "audit/1.x.log", 300))
    assert wire == b"DLR1\x00\x00\x00\x0d" + (300).to_bytes(8, "big") + b"audit/1.x.log"


def test_overlong_message_is_cut_at_a_character_boundary() -> None:
    # A 3-byte character straddles the limit: the cut drops it whole, so the
    # message stays valid UTF-8 as the spec promises.
    message = "xx" + "€" * MAX_MESSAGE
    wire = encode_response(Response(SubmitCode.INTERNAL, message))
    _code, mlen, _size = parse_response_header(wire[: RESPONSE_HEADER.size])
    assert mlen == len(wire) - RESPONSE_HEADER.size == MAX_MESSAGE - 2
    assert message.startswith(wire[RESPONSE_HEADER.size :].decode("utf-8"))


def test_refusal_with_a_size_is_malformed() -> None:
    header = bytearray(encode_response(Response(SubmitCode.INTERNAL, ""))[: RESPONSE_HEADER.size])
    header[8:16] = (5).to_bytes(8, "big")
    with pytest.raises(WireError, match="no size"):
        parse_response_header(bytes(header))


def test_nonzero_reserved_byte_is_malformed() -> None:
    header = bytearray(encode_response(Response(SubmitCode.OK, "", 1))[: RESPONSE_HEADER.size])
    header[5] = 1
    with pytest.raises(WireError, match="reserved"):
        parse_response_header(bytes(header))


@pytest.mark.parametrize("cut", [0, 1, 7])
def test_short_headers_are_wire_errors(cut: int) -> None:
    with pytest.raises(WireError):
        parse_request_header(b"DLS1\x00\x01\x00\x01"[:cut])
    with pytest.raises(WireError):
        parse_response_header(b"DLR1" + bytes(12)[:cut])


def test_spec_table_matches_codes_and_errnos() -> None:
    """docs/submit-protocol.md's table is what C callers read: it must match the code."""
    spec = (REPO / "docs" / "submit-protocol.md").read_text()
    rows = re.findall(r"^\|\s*(\d+)\s*\|\s*([A-Z_]+)\s*\|[^|]*\|\s*(\S+)\s*\|$", spec, re.M)
    table = {
        int(value): (name, None if e == "\u2013" else getattr(errno, e)) for value, name, e in rows
    }
    code_table = {c.value: (c.name, c.errno or None) for c in SubmitCode}
    assert table == code_table


# --- malformed requests and responses ----------------------------------------------


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (b"DLS2\x00\x05\x00\x01", "magic"),
        (b"dls1\x00\x05\x00\x01", "magic"),
        (b"DLS1\x00\x00\x00\x01", "keyword length 0"),
        (b"DLS1\x00\x41\x00\x01", "keyword length 65"),
        (b"DLS1\xff\xff\x00\x01", "keyword length 65535"),
        (b"DLS1\x00\x05\x00\x00", "path length 0"),
        (b"DLS1\x00\x05\x10\x01", "path length 4097"),
        (b"DLS1\x00\x05\xff\xff", "path length 65535"),
    ],
)
def test_bad_request_header_is_refused(header: bytes, reason: str) -> None:
    with pytest.raises(WireError, match=reason.split()[0]):
        parse_request_header(header)


@pytest.mark.parametrize(
    ("body", "klen"),
    [
        (b"aud\xc3\xa9t/x", 6),  # non-ASCII keyword
        (b"aud\xfft/x", 5),  # not even UTF-8
        (b".hidden/x", 7),  # leading dot
        (b"a/b/x", 3),  # slash in keyword
        (b"a b/x", 3),  # space
        (b"audit\nx", 6),  # newline would pass a "$"-anchored pattern
        (b"audit/a\0b", 5),  # NUL in path
        (b"audit", 5),  # empty path
    ],
)
def test_bad_request_body_is_refused(body: bytes, klen: int) -> None:
    with pytest.raises(WireError):
        parse_request_body(body, klen)


@pytest.mark.parametrize(
    ("keyword", "path"),
    [
        ("", b"x"),
        ("k" * 65, b"x"),
        ("é", b"x"),
        ("-x", b"x"),
        (".x", b"x"),
        ("ok", b""),
        ("ok", b"a\0"),
        ("ok", b"p" * 4097),
    ],
)
def test_unsendable_request_cannot_be_built(keyword: str, path: bytes) -> None:
    with pytest.raises(WireError):
        Request(keyword, path)


def test_limits_themselves_are_accepted() -> None:
    assert parse_request_header(b"DLS1\x00\x40\x10\x00") == (64, 4096)
    assert Request("k" * 64, b"p" * MAX_PATH).path == b"p" * MAX_PATH


def _response_header(
    magic: bytes = RESPONSE_MAGIC, code: int = 0, mlen: int = 0, size: int = 0
) -> bytes:
    return RESPONSE_HEADER.pack(magic, code, 0, mlen, size)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (_response_header(magic=b"DLR0"), "magic"),
        (_response_header(magic=REQUEST_MAGIC), "magic"),
        (_response_header(code=10), "unknown response code 10"),
        (_response_header(code=255), "unknown response code 255"),
        (_response_header(mlen=MAX_MESSAGE + 1), "message length 4097"),
        (_response_header(mlen=0xFFFF), "message length 65535"),
    ],
)
def test_bad_response_header_is_refused(header: bytes, reason: str) -> None:
    with pytest.raises(WireError, match=reason):
        parse_response_header(header)


# --- the Python client against a scripted peer ---------------------------------------

Script = Callable[[socket.socket], None]


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _read_request(conn: socket.socket) -> tuple[Request, list[int]]:
    """One request as the service would read it; the caller owns the fds."""
    header, fds, _flags, _addr = socket.recv_fds(conn, REQUEST_HEADER.size, 4)
    while len(header) < REQUEST_HEADER.size:
        header += conn.recv(REQUEST_HEADER.size - len(header))
    klen, plen = parse_request_header(header)
    body = b""
    while len(body) < klen + plen:
        body += conn.recv(klen + plen - len(body))
    return parse_request_body(body, klen), fds


class Peer:
    """A listening Unix socket whose one connection is handled by a script."""

    def __init__(self, path: Path, script: Script) -> None:
        self.path = str(path)
        self.error: BaseException | None = None
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(1)
        self._thread = threading.Thread(target=self._serve, args=(script,), daemon=True)
        self._thread.start()

    def _serve(self, script: Script) -> None:
        try:
            conn, _ = self._listener.accept()
            with conn:
                script(conn)
        except BaseException as exc:  # reported by close(), in the test's thread
            self.error = exc

    def close(self) -> None:
        self._listener.close()
        self._thread.join(5)
        assert not self._thread.is_alive()
        if self.error is not None:
            raise self.error


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[Callable[[Script], Peer]]:
    started: list[Peer] = []

    def start(script: Script) -> Peer:
        started.append(Peer(tmp_path / "submit.sock", script))
        return started[-1]

    yield start
    for p in started:
        p.close()


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    made = []
    for i in range(3):
        made.append(tmp_path / f"f{i}.log")
        made[-1].write_bytes(b"line %d\n" % i)
    return made


def _answer_each(reply: Callable[[Request, list[int]], bytes], count: int) -> Script:
    def script(conn: socket.socket) -> None:
        for _ in range(count):
            request, fds = _read_request(conn)
            try:
                conn.sendall(reply(request, fds))
            finally:
                for fd in fds:
                    os.close(fd)

    return script


def test_request_carries_exactly_one_descriptor_of_the_file(
    peer: Callable[[Script], Peer], files: list[Path]
) -> None:
    seen: list[tuple[Request, list[tuple[int, int]], bytes]] = []

    def reply(request: Request, fds: list[int]) -> bytes:
        ids = [(os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in fds]
        seen.append((request, ids, os.pread(fds[0], 100, 0)))
        return encode_response(Response(SubmitCode.OK, "audit/entry", 7))

    p = peer(_answer_each(reply, 1))
    result = client.submit(files[0], "audit", socket_path=p.path)
    p.close()
    st_file = files[0].stat()
    assert seen == [
        (Request("audit", bytes(files[0])), [(st_file.st_dev, st_file.st_ino)], b"line 0\n")
    ]
    assert result == client.Submitted("audit/entry", 7)


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (SubmitCode.BAD_REQUEST, client.BadRequest),
        (SubmitCode.UNKNOWN_KEYWORD, client.UnknownKeyword),
        (SubmitCode.PERMISSION_DENIED, client.PermissionDenied),
        (SubmitCode.NOT_REGULAR_FILE, client.NotRegularFile),
        (SubmitCode.TOO_LARGE, client.TooLarge),
        (SubmitCode.BAD_NAME, client.BadName),
        (SubmitCode.TEMPORARY_FAILURE, client.TemporaryFailure),
        (SubmitCode.INTERNAL, client.ServiceError),
    ],
)
def test_each_refusal_raises_its_own_class(
    peer: Callable[[Script], Peer],
    files: list[Path],
    code: SubmitCode,
    cls: type[client.SubmitError],
) -> None:
    p = peer(_answer_each(lambda _r, _f: encode_response(Response(code, "because")), 1))
    with pytest.raises(cls) as caught:
        client.submit(files[0], "audit", socket_path=p.path)
    assert type(caught.value) is cls
    assert caught.value.code is code
    assert caught.value.errno == code.errno != 0
    assert caught.value.strerror == "because"
    assert caught.value.filename == str(files[0])


def _send_raw(data: bytes) -> Script:
    def script(conn: socket.socket) -> None:
        _request, fds = _read_request(conn)
        for fd in fds:
            os.close(fd)
        conn.sendall(data)

    return script


@pytest.mark.parametrize(
    "answer",
    [
        _response_header(magic=b"HTTP"),
        _response_header(code=42),
        _response_header(mlen=MAX_MESSAGE + 1),
    ],
)
def test_malformed_answer_is_a_protocol_error(
    peer: Callable[[Script], Peer], files: list[Path], answer: bytes
) -> None:
    before = _open_fds()
    p = peer(_send_raw(answer))
    with pytest.raises(OSError) as caught:
        client.submit(files[0], "audit", socket_path=p.path)
    assert caught.value.errno == errno.EPROTO
    assert not isinstance(caught.value, client.SubmitError)
    p.close()
    assert _open_fds() == before


def test_invalid_utf8_message_is_replaced_not_fatal(
    peer: Callable[[Script], Peer], files: list[Path]
) -> None:
    p = peer(_send_raw(_response_header(code=SubmitCode.INTERNAL, mlen=3) + b"a\xffb"))
    with pytest.raises(client.ServiceError, match="a\ufffdb"):
        client.submit(files[0], "audit", socket_path=p.path)


def test_hang_up_mid_answer_is_a_connection_error(
    peer: Callable[[Script], Peer], files: list[Path]
) -> None:
    p = peer(_send_raw(_response_header(mlen=10) + b"abc"))
    with pytest.raises(ConnectionAbortedError, match=re.escape(p.path)):
        client.submit(files[0], "audit", socket_path=p.path)


def test_silent_peer_times_out(peer: Callable[[Script], Peer], files: list[Path]) -> None:
    done = threading.Event()

    def script(conn: socket.socket) -> None:
        _request, fds = _read_request(conn)
        for fd in fds:
            os.close(fd)
        done.wait(5)

    p = peer(script)
    try:
        with pytest.raises(TimeoutError) as caught:
            client.submit(files[0], "audit", socket_path=p.path, timeout=0.2)
        assert caught.value.filename == p.path
    finally:
        done.set()


def test_descriptor_smuggled_into_answer_is_not_kept(
    peer: Callable[[Script], Peer], files: list[Path]
) -> None:
    def script(conn: socket.socket) -> None:
        _request, fds = _read_request(conn)
        answer = encode_response(Response(SubmitCode.OK, "audit/x", 1))
        socket.send_fds(conn, [answer], fds)
        for fd in fds:
            os.close(fd)

    before = _open_fds()
    p = peer(script)
    assert client.submit(files[0], "audit", socket_path=p.path).entry == "audit/x"
    p.close()
    assert _open_fds() == before


def test_batch_survives_a_peer_that_quits_after_one_answer(
    peer: Callable[[Script], Peer], files: list[Path]
) -> None:
    # As the service does after BAD_REQUEST: answer, then close.
    before = _open_fds()
    p = peer(
        _answer_each(lambda _r, _f: encode_response(Response(SubmitCode.BAD_REQUEST, "bad")), 1)
    )
    results = client.submit_many(files, "audit", socket_path=p.path)
    assert isinstance(results[0], client.BadRequest)
    assert len(results) == 3
    for lost in results[1:]:
        assert isinstance(lost, OSError) and not isinstance(lost, client.SubmitError)
        assert lost.filename == p.path
    p.close()
    assert _open_fds() == before


def test_batch_reports_unopenable_files_in_place(
    peer: Callable[[Script], Peer], files: list[Path], tmp_path: Path
) -> None:
    p = peer(
        _answer_each(lambda r, _f: encode_response(Response(SubmitCode.OK, r.path.decode())), 2)
    )
    missing = tmp_path / "missing.log"
    results = client.submit_many(
        [files[0], missing, b"nul\0name", files[1]], "audit", socket_path=p.path
    )
    assert results[0] == client.Submitted(str(files[0]), 0)
    assert isinstance(results[1], FileNotFoundError) and results[1].filename == str(missing)
    assert isinstance(results[2], OSError) and results[2].errno == errno.EINVAL
    assert results[3] == client.Submitted(str(files[1]), 0)


def test_batch_pipelines_beyond_the_window(peer: Callable[[Script], Peer], tmp_path: Path) -> None:
    """More files than MAX_IN_FLIGHT: the client must read answers while sending."""
    count = client.MAX_IN_FLIGHT * 2 + 5
    names = [tmp_path / f"n{i}" for i in range(count)]
    for name in names:
        name.write_bytes(name.name.encode())

    def reply(request: Request, fds: list[int]) -> bytes:
        return encode_response(Response(SubmitCode.OK, os.pread(fds[0], 64, 0).decode(), len(fds)))

    p = peer(_answer_each(reply, count))
    results = client.submit_many(names, "audit", socket_path=p.path)
    assert results == [client.Submitted(n.name, 1) for n in names]


def test_unreachable_service_names_the_socket(files: list[Path], tmp_path: Path) -> None:
    missing = str(tmp_path / "no.sock")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)) as caught:
        client.submit(files[0], "audit", socket_path=missing)
    assert caught.value.filename == missing


def test_socket_from_environment(
    files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from_env = str(tmp_path / "env.sock")
    monkeypatch.setenv("DLOGD_SOCKET", from_env)
    with pytest.raises(FileNotFoundError) as caught:
        client.submit(files[0], "audit")
    assert caught.value.filename == from_env


def test_unopenable_file_fails_before_connecting(tmp_path: Path) -> None:
    # No service exists at all: the open error must win, not the connect error.
    with pytest.raises(FileNotFoundError) as caught:
        client.submit(tmp_path / "nope", "audit", socket_path=str(tmp_path / "none.sock"))
    assert caught.value.filename == str(tmp_path / "nope")


def test_unsendable_keyword_is_refused_before_anything(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keyword"):
        client.submit(tmp_path / "nope", "no/slash", socket_path=str(tmp_path / "none.sock"))


def test_submit_error_survives_pickling() -> None:
    import pickle

    error = client.TooLarge(SubmitCode.TOO_LARGE, "over 1 GiB", "/x")
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy.code, copy.errno, copy.strerror, copy.filename) == (
        client.TooLarge,
        SubmitCode.TOO_LARGE,
        errno.EFBIG,
        "over 1 GiB",
        "/x",
    )
