"""A submit connection's overall budget, the per-uid connection limit, and why drops are journalled.

The real service code (``serve_connection``) on a real Unix socket pair, with a
real spool: the budget is a parameter so that a test can make it small instead
of sending 100,000 requests or waiting five minutes. Issue 9 item 6.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dlogd import journal, submitwire
from dlogd.config import ClientConfig, ClientKeyword, Host, Limits
from dlogd.submit_service import Budget, serve_connection
from dlogd.submitwire import Request, Response, SubmitCode


@dataclass
class Served:
    client: socket.socket
    thread: threading.Thread

    def close(self) -> None:
        self.client.close()
        self.thread.join(30)  # a guard against a hang, not a measurement
        assert not self.thread.is_alive(), "the service did not end the connection"


@pytest.fixture
def config(tmp_path: Path) -> ClientConfig:
    uid = os.getuid()
    return ClientConfig(
        keywords={"audit": ClientKeyword("audit", frozenset({uid}), frozenset(), ("logs1",))},
        hosts={"logs1": Host("logs1", "logs1")},
        spool=str(tmp_path / "spool"),
        limits=Limits(timeout=5),
    )


@pytest.fixture
def source(tmp_path: Path) -> Iterator[int]:
    path = tmp_path / "app.log"
    path.write_bytes(b"a line\n")
    fd = os.open(path, os.O_RDONLY)
    yield fd
    os.close(fd)


def serve(config: ClientConfig, budget: Budget) -> Served:
    client, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def run() -> None:
        with server:
            serve_connection(server, config, budget=budget)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    client.settimeout(30)
    return Served(client, thread)


def send(sock: socket.socket, fd: int, path: bytes = b"/x/app.log") -> None:
    request = Request("audit", path)
    sock.sendmsg(
        [submitwire.encode_request_header(request)],
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd.to_bytes(4, "little"))],
    )
    sock.sendall(submitwire.encode_request_body(request))


def answer(sock: socket.socket) -> Response | None:
    header = _exactly(sock, submitwire.RESPONSE_HEADER.size)
    if not header:
        return None
    code, mlen, size = submitwire.parse_response_header(header)
    return Response(code, _exactly(sock, mlen).decode(), size)


def _exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        try:
            chunk = sock.recv(count - len(data))
        except ConnectionResetError:  # closed with our unread requests: after its answers
            break
        if not chunk:
            break
        data += chunk
    return data


def dropped(err: str) -> list[str]:
    """The DROPPED field of every connection-dropped record the service wrote."""
    records = (journal.parse_stderr(line) for line in err.splitlines())
    return [r[1]["dropped"] for r in records if r is not None and "dropped" in r[1]]


def test_request_budget_ends_the_connection_after_answering(
    config: ClientConfig, source: int, capfd: pytest.CaptureFixture[str]
) -> None:
    served = serve(config, Budget(requests=3))
    for _ in range(5):
        send(served.client, source)
    served.client.shutdown(socket.SHUT_WR)
    answers = []
    while (a := answer(served.client)) is not None:
        answers.append(a)
    served.close()
    assert [a.code for a in answers] == [SubmitCode.OK] * 3
    assert dropped(capfd.readouterr().err) == ["budget-requests"]


def test_time_budget_ends_a_connection_kept_busy_by_slow_requests(
    config: ClientConfig, source: int, capfd: pytest.CaptureFixture[str]
) -> None:
    """One request every 0.2 s never hits the 5 s timeout; the 1 s budget ends it."""
    served = serve(config, Budget(seconds=1.0))
    answered = 0
    for _ in range(50):
        try:
            send(served.client, source)
        except BrokenPipeError:
            break
        if answer(served.client) is None:
            break
        answered += 1
        time.sleep(0.2)
    served.close()
    assert 0 < answered < 50
    assert dropped(capfd.readouterr().err) == ["budget-time"]


@pytest.mark.parametrize(
    ("sent", "why"),
    [(b"", "timeout"), (b"DLS", "half-header"), (b"DLS1\x00\x05\x00\x09aud", "half-request")],
)
def test_why_a_connection_was_dropped_is_journalled(
    config: ClientConfig, capfd: pytest.CaptureFixture[str], sent: bytes, why: str
) -> None:
    short = ClientConfig(**{**config.__dict__, "limits": Limits(timeout=0.3)})
    served = serve(short, Budget())
    if sent:
        served.client.sendall(sent)
    if why != "timeout":
        served.client.shutdown(socket.SHUT_WR)
    assert answer(served.client) is None
    served.close()
    assert dropped(capfd.readouterr().err) == [why]


def test_per_uid_limit_refuses_one_connection_too_many(
    config: ClientConfig, source: int, capfd: pytest.CaptureFixture[str]
) -> None:
    budget = Budget(per_uid=2, slot_wait=0.2)
    held = [serve(config, budget) for _ in range(2)]
    for h in held:  # each one served once: both instances hold their slot now
        send(h.client, source)
        assert (a := answer(h.client)) is not None and a.code is SubmitCode.OK
    extra = serve(config, budget)
    send(extra.client, source)
    refused = answer(extra.client)
    assert refused is not None and refused.code is SubmitCode.TEMPORARY_FAILURE, refused
    assert f"uid {os.getuid()}" in refused.message
    assert answer(extra.client) is None  # and it hangs up
    extra.close()
    held.pop().close()  # a slot is free again
    again = serve(config, budget)
    send(again.client, source)
    assert (a := answer(again.client)) is not None and a.code is SubmitCode.OK
    again.close()
    for h in held:
        h.close()
    assert "uid-limit" in dropped(capfd.readouterr().err)


def test_a_connection_over_the_per_uid_limit_waits_for_a_slot(
    config: ClientConfig, source: int
) -> None:
    budget = Budget(per_uid=1, slot_wait=30)
    first = serve(config, budget)
    send(first.client, source)
    assert (a := answer(first.client)) is not None and a.code is SubmitCode.OK
    second = serve(config, budget)
    send(second.client, source)  # waits: its instance has no slot yet
    first.close()
    assert (b := answer(second.client)) is not None and b.code is SubmitCode.OK
    second.close()
