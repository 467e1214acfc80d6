"""kill -9 of the submit service at chosen points of a submit, then a look at the spool.

The service is started as systemd would start one instance: the connection on
fd 3, LISTEN_PID/LISTEN_FDS set. ``DLOGD_TEST_CRASH_AT`` (see docs/spool.md)
makes it SIGKILL itself at the named point; the test proves that it died there
and that the spool is consistent: no entry without its full set of markers, no
half-written file, and ``Spool.cleanup()`` + ``pending()`` agree with the disk.
"""

from __future__ import annotations

import array
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dlogd import submitwire
from dlogd.config import ClientConfig, ClientKeyword, Host, to_text
from dlogd.spool import Spool
from dlogd.submitwire import Request, SubmitCode

pytestmark = pytest.mark.faults

HOSTS = frozenset({"logs1", "logs2"})


def run_instance(tmp_path: Path, keyword: str, source: Path, crash_at: str) -> tuple[int, bytes]:
    """One submit through one service instance; (its exit status, the bytes it answered)."""
    config = tmp_path / "client.conf"
    config.write_text(
        to_text(
            ClientConfig(
                keywords={
                    "audit": ClientKeyword("audit", frozenset({0}), frozenset(), tuple(HOSTS)),
                    "copied": ClientKeyword(
                        "copied", frozenset({0}), frozenset(), tuple(HOSTS), True
                    ),
                },
                hosts={h: Host(h, h) for h in HOSTS},
                spool=str(tmp_path / "spool"),
            )
        )
    )
    ours, theirs = socket.socketpair()
    fd = theirs.fileno()
    # bash, not sh: dash cannot redirect descriptors above 9.
    script = f'exec 3<&{fd} {fd}<&-; LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" "$@"'
    env = {"DLOGD_CACHE_DIR": str(tmp_path / "cache"), "DLOGD_TEST_CRASH_AT": crash_at}
    cmd = [
        "bash",
        "-c",
        script,
        sys.executable,
        "-m",
        "dlogd.submit_service",
        "--config",
        str(config),
    ]
    with ours:
        proc = subprocess.Popen(cmd, pass_fds=(fd,), env=env)
        theirs.close()
        request = Request(keyword, os.fsencode(source))
        with source.open("rb") as f:
            fds = array.array("i", [f.fileno()])
            ours.sendmsg(
                [submitwire.encode_request_header(request)],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)],
            )
        ours.sendall(submitwire.encode_request_body(request))
        ours.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := ours.recv(65536):
            answer += chunk
    return proc.wait(30), answer


def on_disk(root: Path) -> tuple[set[str], dict[str, frozenset[str]]]:
    """Entries and owed marker sets as the file system has them, without the Spool class."""
    entries, owed = set(), {}
    # Dot names at the root are the spool's own (the ship trigger, retry state).
    for kw in (p for p in root.iterdir() if not p.name.startswith(".")):
        entries |= {f"{kw.name}/{p.name}" for p in kw.iterdir() if not p.name.startswith(".")}
        for d in (kw / ".owed").iterdir():
            owed[f"{kw.name}/{d.name}"] = frozenset(p.name for p in d.iterdir())
    return entries, owed


@pytest.mark.parametrize("keyword", ["audit", "copied"])
@pytest.mark.parametrize(
    ("crash_at", "entry_survives"),
    [("after-owed", False), ("after-link", True), ("before-commit", True)],
)
def test_kill_during_submit_leaves_a_consistent_spool(
    tmp_path: Path, keyword: str, crash_at: str, entry_survives: bool
) -> None:
    source = tmp_path / "app.log"
    source.write_bytes(b"precious\n" * 1000)
    status, answer = run_instance(tmp_path, keyword, source, crash_at)
    assert status == -signal.SIGKILL, "the service did not die at the crash point"
    assert answer == b"", "no OK may be sent before the commit"

    root = tmp_path / "spool"
    entries, owed = on_disk(root)
    # Invariant: no entry without every marker; the entry exists only past the link.
    assert all(owed.get(e) == HOSTS for e in entries)
    assert len(entries) == (1 if entry_survives else 0)
    assert len(owed) == 1  # the markers are made first, whatever the crash point
    for entry in entries:
        assert (root / entry).read_bytes() == source.read_bytes()
    assert list(root.glob("*/.tmp/*")) == []  # copies are anonymous until linked

    with Spool(str(root)) as spool:
        removed = spool.cleanup()
        pending = {f"{e.keyword}/{e.name}": e.owed for e in spool.pending()}
    assert removed == (0 if entry_survives else 1)
    assert pending == dict.fromkeys(entries, HOSTS)
    assert on_disk(root) == (entries, pending)


def test_submit_after_a_crash_and_cleanup_works(tmp_path: Path) -> None:
    source = tmp_path / "again.log"
    source.write_bytes(b"again")
    assert run_instance(tmp_path, "audit", source, "after-owed")[0] == -signal.SIGKILL
    with Spool(str(tmp_path / "spool")) as spool:
        spool.cleanup()
    status, answer = run_instance(tmp_path, "audit", source, "")
    assert status == 0
    code, mlen, size = submitwire.parse_response_header(answer[:16])
    assert (code, size) == (SubmitCode.OK, 5)
    entry = answer[16 : 16 + mlen].decode()
    assert on_disk(tmp_path / "spool") == ({entry}, {entry: HOSTS})
