"""The submit service run exactly as systemd runs it, driven by real users over raw sockets.

``systemd-socket-activate --accept`` starts one ``python -m dlogd.submit_service`` per
connection with the connection on fd 3 (LISTEN_FDS=1), as dlogd.socket does.
Clients are forked children that drop to test users (setgroups/setgid/setuid)
and then open and pass files themselves, as an application would.
"""

from __future__ import annotations

import array
import grp
import os
import pickle
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from dlogd import config, submitwire
from dlogd.config import ClientConfig, ClientKeyword, Host, Limits
from dlogd.spool import Spool
from dlogd.submitwire import Request, Response, SubmitCode

pytestmark = pytest.mark.process

ACTIVATE = shutil.which("systemd-socket-activate")
TIMEOUT_S = 2


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


@dataclass(frozen=True)
class Users:
    by_uid: User  # listed by uid
    by_group: User  # allowed only through a supplementary group
    outsider: User
    group: str


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.fixture(scope="session")
def users() -> Iterator[Users]:
    if os.geteuid() != 0:
        pytest.fail("process tests create users: run them as root")
    tag = f"dl{os.getpid() % 100000}"
    group = f"{tag}g"
    names = [f"{tag}u", f"{tag}m", f"{tag}o"]
    _run("groupadd", group)
    try:
        for name in names:
            extra = ["-G", group] if name.endswith("m") else []
            _run("useradd", "-M", "-N", "-s", "/usr/sbin/nologin", *extra, name)
        made = [
            User(n, pwd.getpwnam(n).pw_uid, pwd.getpwnam(n).pw_gid, _groups_of(n, group))
            for n in names
        ]
        yield Users(made[0], made[1], made[2], group)
    finally:
        for name in names:
            subprocess.run(["userdel", name], capture_output=True)
        subprocess.run(["groupdel", group], capture_output=True)


def _groups_of(name: str, group: str) -> tuple[int, ...]:
    return (grp.getgrnam(group).gr_gid,) if name.endswith("m") else ()


# -- the service ---------------------------------------------------------------------


@dataclass
class Service:
    work: Path
    socket_path: Path
    spool_root: Path
    log: Path
    proc: subprocess.Popen[bytes]
    accepted: dict[str, bytes | Path] = field(default_factory=dict)

    def instances(self) -> list[int]:
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(p) for p in children.read_text().split()]

    def wait_idle(self, limit: float = 10.0) -> None:
        """Until every per-connection instance has exited."""
        deadline = time.monotonic() + limit
        while self.instances():
            assert time.monotonic() < deadline, "a submit instance did not exit"
            time.sleep(0.02)

    def expect(self, response: Response, content: bytes | Path) -> str:
        """Record an accepted entry: its bytes, or a file whose inode it must be."""
        assert response.code is SubmitCode.OK, response
        self.accepted[response.message] = content
        return response.message

    def check_spool(self) -> None:
        """Exactly the accepted entries are spooled, each owed to both hosts, right content."""
        self.wait_idle()
        if not self.spool_root.exists():  # no request ever reached the spool
            assert self.accepted == {}
            return
        with Spool(str(self.spool_root)) as spool:
            entries = {f"{e.keyword}/{e.name}": e for e in spool.pending()}
        assert sorted(entries) == sorted(self.accepted)
        for name, want in self.accepted.items():
            path = self.spool_root / name
            assert entries[name].owed == frozenset({"logs1", "logs2"})
            if isinstance(want, Path):
                assert path.stat().st_ino == want.stat().st_ino
            else:
                assert path.read_bytes() == want
        leftovers = [p for p in self.spool_root.glob("*/.tmp/*")]
        leftovers += [p for p in self.spool_root.glob("*/.owed/.new-*")]
        assert leftovers == []

    def journal(self) -> str:
        return self.log.read_text(errors="replace")


def client_config_text(spool: Path, uid: int, group: str, timeout: float) -> str:
    """The service's config, through the config's own writer."""
    hosts = ("logs1", "logs2")
    return config.to_text(
        ClientConfig(
            keywords={
                "audit": ClientKeyword("audit", frozenset({uid, 0}), frozenset({group}), hosts),
                "copied": ClientKeyword("copied", frozenset({uid, 0}), frozenset(), hosts, True),
            },
            hosts={h: Host(h, h) for h in hosts},
            spool=str(spool),
            limits=Limits(max_file_size=2 * 1024**3, timeout=timeout),
        )
    )


def start_service(work: Path, config_text: str, env: dict[str, str] | None = None) -> Service:
    assert ACTIVATE is not None, "systemd-socket-activate is not installed"
    config = work / "client.conf"
    config.write_text(config_text)
    sock = work / "submit.sock"
    log = work / "service.log"
    setenv = {"DLOGD_CACHE_DIR": str(work / "cache"), **(env or {})}
    cmd = [ACTIVATE, "--accept", "-l", str(sock)]
    for key, value in setenv.items():
        cmd += ["-E", f"{key}={value}"]
    cmd += [sys.executable, "-m", "dlogd.submit_service", "--config", str(config)]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while not sock.exists():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "socket never appeared"
        time.sleep(0.01)
    os.chmod(sock, 0o666)  # as dlogd.socket's SocketMode=0666
    return Service(work, sock, work / "spool", log, proc)


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Not under pytest's tmp_path: that is 0700 root, and test users must reach files.
    work = Path(tempfile.mkdtemp(prefix="dlogd-submit-", dir="/tmp"))
    work.chmod(0o755)
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def service(workdir: Path, users: Users) -> Iterator[Service]:
    text = client_config_text(workdir / "spool", users.by_uid.uid, users.group, TIMEOUT_S)
    svc = start_service(workdir, text)
    try:
        yield svc
        svc.check_spool()  # after every test: nothing refused spooled, all accepted present
    finally:
        svc.proc.send_signal(signal.SIGTERM)
        svc.proc.wait(10)


# -- raw clients ---------------------------------------------------------------------


def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(str(path))
    return sock


def send_request(sock: socket.socket, keyword: str, path: bytes, fds: list[int]) -> None:
    request = Request(keyword, path)
    header = submitwire.encode_request_header(request)
    send_with_fds(sock, header, fds)
    sock.sendall(submitwire.encode_request_body(request))


def send_with_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], anc)


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        try:
            chunk = sock.recv(count - len(data))
        except ConnectionResetError:  # the service hung up with our bytes still unread
            break
        if not chunk:
            break
        data += chunk
    return data


def read_response(sock: socket.socket) -> Response | None:
    """The next answer, or None if the service closed the connection first."""
    header = recv_exactly(sock, submitwire.RESPONSE_HEADER.size)
    if not header:
        return None
    code, mlen, size = submitwire.parse_response_header(header)
    return Response(code, recv_exactly(sock, mlen).decode(), size)


def submit_fds(svc: Service, keyword: str, items: list[tuple[bytes, int]]) -> list[Response]:
    """Pipeline one request per (path, fd), then read every answer."""
    with connect(svc.socket_path) as sock:
        for path, fd in items:
            send_request(sock, keyword, path, [fd])
        sock.shutdown(socket.SHUT_WR)
        answers = [read_response(sock) for _ in items]
    assert all(a is not None for a in answers)
    return [a for a in answers if a is not None]


def submit_path(svc: Service, keyword: str, path: bytes, *, flags: int = os.O_RDONLY) -> Response:
    """What an application does: open the file itself, pass the descriptor."""
    fd = os.open(path, flags)
    try:
        [answer] = submit_fds(svc, keyword, [(path, fd)])
    finally:
        os.close(fd)
    return answer


def as_user(user: User, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a forked child with the user's uid, gid and groups; return its result."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop privileges for real, then act as the application
        status = 0
        try:
            os.close(rfd)
            os.setgroups(list(user.groups))
            os.setgid(user.gid)
            os.setuid(user.uid)
            try:
                result: Any = ("ok", fn())
            except OSError as e:
                result = ("oserror", e.errno)
            with os.fdopen(wfd, "wb") as out:
                pickle.dump(result, out)
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as inp:
        data = inp.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, "client child failed"
    kind, value = pickle.loads(data)
    if kind == "oserror":
        raise OSError(value, os.strerror(value))
    return value


def user_file(work: Path, user: User, name: bytes, data: bytes, mode: int = 0o600) -> bytes:
    path = os.fsencode(work) + b"/" + name
    with open(path, "wb") as f:
        f.write(data)
    os.chown(path, user.uid, user.gid)
    os.chmod(path, mode)
    return path


# -- allowed -------------------------------------------------------------------------


def test_allowed_by_uid_links_the_file(service: Service, users: Users) -> None:
    path = user_file(service.work, users.by_uid, b"app.log", b"by uid\n")
    answer = as_user(users.by_uid, lambda: submit_path(service, "audit", path))
    entry = service.expect(answer, Path(os.fsdecode(path)))
    assert entry.startswith("audit/") and entry.endswith(".app.log")
    assert answer.size == len(b"by uid\n")
    assert f"uid={users.by_uid.uid}" in service.journal()


def test_allowed_by_supplementary_group(service: Service, users: Users) -> None:
    path = user_file(service.work, users.by_group, b"grp.log", b"by group\n")
    answer = as_user(users.by_group, lambda: submit_path(service, "audit", path))
    service.expect(answer, b"by group\n")


def test_refused_uid(service: Service, users: Users) -> None:
    path = user_file(service.work, users.outsider, b"no.log", b"nope")
    answer = as_user(users.outsider, lambda: submit_path(service, "audit", path))
    assert answer.code is SubmitCode.PERMISSION_DENIED
    service.wait_idle()
    log = service.journal()
    assert "reason=PERMISSION_DENIED" in log and f"uid={users.outsider.uid}" in log


def test_group_member_not_listed_for_keyword(service: Service, users: Users) -> None:
    path = user_file(service.work, users.by_group, b"c.log", b"c")
    answer = as_user(users.by_group, lambda: submit_path(service, "copied", path))
    assert answer.code is SubmitCode.PERMISSION_DENIED


def test_unknown_keyword(service: Service, users: Users) -> None:
    path = user_file(service.work, users.by_uid, b"u.log", b"u")
    answer = as_user(users.by_uid, lambda: submit_path(service, "nosuch", path))
    assert answer.code is SubmitCode.UNKNOWN_KEYWORD


def test_unreadable_file_is_never_sent(service: Service, users: Users) -> None:
    secret = user_file(service.work, User("root", 0, 0, ()), b"secret", b"root only")
    link = os.fsencode(service.work) + b"/link-to-secret"
    os.symlink(secret, link)
    for path in (secret, link):
        with pytest.raises(PermissionError):
            as_user(users.by_uid, partial(submit_path, service, "audit", path))


@pytest.mark.parametrize(("flags", "what"), [(os.O_PATH, "O_PATH"), (os.O_WRONLY, "write-only")])
def test_descriptor_without_read_access_is_refused(
    service: Service, users: Users, flags: int, what: str
) -> None:
    # O_PATH needs no read permission at all: linking from it would leak the file.
    path = user_file(service.work, User("root", 0, 0, ()), b"wo", b"secret", mode=0o622)
    answer = as_user(users.by_uid, lambda: submit_path(service, "audit", path, flags=flags))
    assert answer.code is SubmitCode.PERMISSION_DENIED, what


def test_fifo_directory_and_device_are_refused(service: Service, users: Users) -> None:
    fifo = os.fsencode(service.work / "fifo")
    os.mkfifo(fifo, 0o666)
    for path, flags in (
        (fifo, os.O_RDONLY | os.O_NONBLOCK),
        (os.fsencode(service.work), os.O_RDONLY | os.O_DIRECTORY),
        (b"/dev/zero", os.O_RDONLY),
    ):
        answer = as_user(users.by_uid, partial(submit_path, service, "audit", path, flags=flags))
        assert answer.code is SubmitCode.NOT_REGULAR_FILE, path


def test_procfs_file_whose_size_the_kernel_does_not_report_is_refused(
    service: Service, users: Users
) -> None:
    """/proc files say st_size 0 and have content: spooled, they came out empty."""
    for path in (b"/proc/version", b"/proc/self/status"):
        assert os.stat(path).st_size == 0 and Path(os.fsdecode(path)).read_bytes()
        answer = as_user(users.by_uid, partial(submit_path, service, "audit", path))
        assert answer.code is SubmitCode.NOT_REGULAR_FILE, answer
        assert "size" in answer.message and "/proc" in answer.message
        copied = as_user(users.by_uid, partial(submit_path, service, "copied", path))
        assert copied.code is SubmitCode.NOT_REGULAR_FILE, copied
    # A sysfs attribute reports 4096 bytes but is copied as its real content.
    sysfs = b"/sys/class/net/lo/address"
    answer = as_user(users.by_uid, partial(submit_path, service, "audit", sysfs))
    service.expect(answer, Path(os.fsdecode(sysfs)).read_bytes())
    assert answer.size == len(Path(os.fsdecode(sysfs)).read_bytes())


def test_other_file_system_is_copied(service: Service, users: Users) -> None:
    shm = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        shm.chmod(0o755)
        path = user_file(shm, users.by_uid, b"tmpfs.log", b"on tmpfs" * 1000)
        answer = as_user(users.by_uid, lambda: submit_path(service, "audit", path))
        entry = service.expect(answer, b"on tmpfs" * 1000)
        assert (service.spool_root / entry).stat().st_dev != os.stat(path).st_dev
    finally:
        shutil.rmtree(shm)


def test_copy_keyword_snapshots(service: Service, users: Users) -> None:
    path = user_file(service.work, users.by_uid, b"snap.log", b"before")
    answer = as_user(users.by_uid, lambda: submit_path(service, "copied", path))
    Path(os.fsdecode(path)).write_bytes(b"after")
    service.expect(answer, b"before")


def test_empty_file(service: Service, users: Users) -> None:
    path = user_file(service.work, users.by_uid, b"empty", b"")
    answer = as_user(users.by_uid, lambda: submit_path(service, "audit", path))
    service.expect(answer, b"")
    assert answer.size == 0


def test_sparse_1g_linked_and_3g_too_large(service: Service, users: Users) -> None:
    big = user_file(service.work, users.by_uid, b"big", b"")
    os.truncate(big, 1 << 30)
    answer = as_user(users.by_uid, lambda: submit_path(service, "audit", big))
    service.expect(answer, Path(os.fsdecode(big)))
    assert answer.size == 1 << 30
    huge = user_file(service.work, users.by_uid, b"huge", b"")
    os.truncate(huge, 3 << 30)
    answer = as_user(users.by_uid, lambda: submit_path(service, "audit", huge))
    assert answer.code is SubmitCode.TOO_LARGE


def test_hostile_names(service: Service, users: Users) -> None:
    path = user_file(service.work, users.by_uid, b"a b\nc\xff%.log", b"hostile")
    answer = as_user(users.by_uid, lambda: submit_path(service, "audit", path))
    entry = service.expect(answer, b"hostile")
    assert entry.endswith(".a%20b%0Ac%FF%25.log")
    dotted = user_file(service.work, users.by_uid, b".hidden", b"dot")
    answer = as_user(users.by_uid, lambda: submit_path(service, "audit", dotted))
    assert service.expect(answer, b"dot").endswith(".%2Ehidden")
    service.wait_idle()
    assert "\\n" in service.journal() or "\\x0a" in service.journal()


def test_name_without_basename_is_refused(service: Service, users: Users) -> None:
    path = user_file(service.work, users.by_uid, b"real", b"r")
    fd = os.open(path, os.O_RDONLY)
    try:
        answers = submit_fds(service, "audit", [(b"/some/dir/..", fd), (b"/", fd)])
    finally:
        os.close(fd)
    assert [a.code for a in answers] == [SubmitCode.BAD_NAME, SubmitCode.BAD_NAME]


def test_4096_byte_path_accepted_4097_is_bad_request(service: Service, users: Users) -> None:
    path = user_file(service.work, users.by_uid, b"deep.log", b"deep")
    claimed = (b"/" + b"d" * 254) * 17
    claimed = claimed[: 4096 - len(b"/deep.log")] + b"/deep.log"
    assert len(claimed) == 4096
    fd = os.open(path, os.O_RDONLY)
    try:
        [answer] = submit_fds(service, "audit", [(claimed, fd)])
        service.expect(answer, b"deep")
        with connect(service.socket_path) as sock:
            header = submitwire.REQUEST_HEADER.pack(submitwire.REQUEST_MAGIC, 5, 4097)
            send_with_fds(sock, header, [fd])
            sock.sendall(b"audit" + b"x" * 4097)
            bad = read_response(sock)
    finally:
        os.close(fd)
    assert bad is not None and bad.code is SubmitCode.BAD_REQUEST


# -- broken streams ------------------------------------------------------------------


def _raw_exchange(svc: Service, data: bytes, fds: list[int], *, close_write: bool) -> list[Any]:
    """Send bytes (fds on the first message), then every answer until the service hangs up."""
    with connect(svc.socket_path) as sock:
        send_with_fds(sock, data[:8], fds)
        sock.sendall(data[8:])
        if close_write:
            sock.shutdown(socket.SHUT_WR)
        answers: list[Any] = []
        while (answer := read_response(sock)) is not None:
            answers.append(answer.code)
    return answers


def test_garbage_bytes_get_bad_request(service: Service) -> None:
    with open("/etc/hostname", "rb") as f:
        answers = _raw_exchange(
            service, b"GARBAGE!" + os.urandom(64), [f.fileno()], close_write=False
        )
    assert answers == [SubmitCode.BAD_REQUEST]


def test_truncated_request_gets_no_answer(service: Service, users: Users) -> None:
    path = user_file(service.work, users.by_uid, b"t", b"t")
    request = Request("audit", path)
    whole = submitwire.encode_request_header(request) + submitwire.encode_request_body(request)
    fd = os.open(path, os.O_RDONLY)
    try:
        for cut in (3, 8, len(whole) - 1):
            assert _raw_exchange(service, whole[:cut], [fd], close_write=True) == []
    finally:
        os.close(fd)


def test_header_without_fd_and_with_two_fds(service: Service, users: Users) -> None:
    path = user_file(service.work, users.by_uid, b"two", b"2")
    request = Request("audit", path)
    whole = submitwire.encode_request_header(request) + submitwire.encode_request_body(request)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert _raw_exchange(service, whole, [], close_write=True) == [SubmitCode.BAD_REQUEST]
        assert _raw_exchange(service, whole, [fd, fd], close_write=True) == [SubmitCode.BAD_REQUEST]
        many = [fd] * 40  # more than the service makes room for: MSG_CTRUNC
        assert _raw_exchange(service, whole, many, close_write=True) == [SubmitCode.BAD_REQUEST]
    finally:
        os.close(fd)


def test_good_request_then_garbage_keeps_the_good_one(service: Service, users: Users) -> None:
    path = user_file(service.work, users.by_uid, b"good", b"good")
    request = Request("audit", path)
    whole = submitwire.encode_request_header(request) + submitwire.encode_request_body(request)
    fd = os.open(path, os.O_RDONLY)
    try:
        with connect(service.socket_path) as sock:
            send_with_fds(sock, whole[:8], [fd])
            sock.sendall(whole[8:] + b"JUNKJUNK")
            first, second = read_response(sock), read_response(sock)
    finally:
        os.close(fd)
    assert first is not None and second is not None
    service.expect(first, Path(os.fsdecode(path)))
    assert second.code is SubmitCode.BAD_REQUEST


def test_stalled_client_is_dropped_and_nothing_spooled(service: Service, users: Users) -> None:
    path = user_file(service.work, users.by_uid, b"stall", b"s")
    request = Request("audit", path)
    fd = os.open(path, os.O_RDONLY)
    try:
        with connect(service.socket_path) as sock:
            send_with_fds(sock, submitwire.encode_request_header(request), [fd])
            started = time.monotonic()
            assert read_response(sock) is None  # the service hangs up on us
            assert time.monotonic() - started < TIMEOUT_S + 3
    finally:
        os.close(fd)


def test_disconnect_mid_request_loses_and_leaves_nothing(service: Service, users: Users) -> None:
    path = user_file(service.work, users.by_uid, b"gone", b"g")
    request = Request("audit", path)
    fd = os.open(path, os.O_RDONLY)
    try:
        sock = connect(service.socket_path)
        send_with_fds(sock, submitwire.encode_request_header(request), [fd])
        sock.sendall(submitwire.encode_request_body(request)[:3])
        sock.close()
    finally:
        os.close(fd)
    service.wait_idle()


def test_pipelined_batch_answers_in_order(service: Service, users: Users) -> None:
    paths = [
        user_file(service.work, users.by_uid, f"b{i}".encode(), f"{i}".encode()) for i in range(5)
    ]
    fds = [os.open(p, os.O_RDONLY) for p in paths]
    try:
        answers = submit_fds(service, "audit", list(zip(paths, fds, strict=True)))
        refused = submit_fds(service, "nosuch", [(paths[0], fds[0])])
    finally:
        for fd in fds:
            os.close(fd)
    for i, answer in enumerate(answers):
        assert answer.message.endswith(f".b{i}")
        service.expect(answer, f"{i}".encode())
    assert refused[0].code is SubmitCode.UNKNOWN_KEYWORD


def test_fifty_concurrent_submitters(service: Service, users: Users) -> None:
    paths = [
        user_file(service.work, users.by_uid, f"c{i}.log".encode(), os.urandom(512))
        for i in range(50)
    ]
    pids = []
    for path in paths:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setgroups([])
                os.setgid(users.by_uid.gid)
                os.setuid(users.by_uid.uid)
                code = 0 if submit_path(service, "audit", path).code is SubmitCode.OK else 2
            finally:
                os._exit(code)
        pids.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    assert codes == [0] * 50
    with Spool(str(service.spool_root)) as spool:
        spooled = {e.name.split(".", 1)[1]: e for e in spool.pending()}
    for i, path in enumerate(paths):
        service.accepted[f"audit/{spooled[f'c{i}.log'].name}"] = Path(os.fsdecode(path))


def test_bad_config_answers_internal(workdir: Path, users: Users) -> None:
    svc = start_service(workdir, 'keyword "audit" { uid "0"; }  # no host\n')
    try:
        answer = submit_path(svc, "audit", b"/etc/hostname")
        assert answer.code is SubmitCode.INTERNAL
        assert "misconfigured" in answer.message
        svc.wait_idle()
        assert not (workdir / "spool").exists()
    finally:
        svc.proc.send_signal(signal.SIGTERM)
        svc.proc.wait(10)


def test_more_than_one_listen_fd_is_an_error() -> None:
    proc = subprocess.run(
        ["sh", "-c", f'LISTEN_PID=$$ LISTEN_FDS=2 exec "{sys.executable}" -m dlogd.submit_service'],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "expected 1 socket" in proc.stderr


# -- dlogctl submit ------------------------------------------------------------------


def _dlogctl_submit(
    sock: Path, *files: Path, keyword: str = "audit"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "dlogd.cli",
            "submit",
            "-k",
            keyword,
            "--socket",
            str(sock),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_dlogctl_submit_reports_each_file_and_exits_by_the_worst(service: Service) -> None:
    good = service.work / "good.log"
    good.write_bytes(b"good\n")
    run = _dlogctl_submit(service.socket_path, good, service.work / "missing.log")
    assert run.returncode == 1, run.stderr
    (line,) = run.stdout.splitlines()
    assert line.startswith(f"{good}: spooled as audit/") and line.endswith("(5 bytes)")
    service.expect(
        Response(SubmitCode.OK, line.split(" spooled as ")[1].split(" (")[0], 5), b"good\n"
    )
    assert "missing.log: [Errno 2]" in run.stderr


def test_dlogctl_submit_refusal_exits_1_with_the_reason(service: Service) -> None:
    good = service.work / "good.log"
    good.write_bytes(b"good\n")
    run = _dlogctl_submit(service.socket_path, good, keyword="nosuch")
    assert run.returncode == 1
    assert "refused:" in run.stderr and "nosuch" in run.stderr


def test_dlogctl_submit_without_a_service_exits_3(tmp_path: Path) -> None:
    good = tmp_path / "good.log"
    good.write_bytes(b"good\n")
    run = _dlogctl_submit(tmp_path / "no.sock", good)
    assert run.returncode == 3, run.stderr
    assert "cannot reach the submit service" in run.stderr


# -- a resubmit after an unknown outcome (issue 9 item 2) ------------------------------


@pytest.mark.parametrize("keyword", ["audit", "copied"])
def test_resubmit_of_unchanged_files_gets_the_pending_entries(
    service: Service, users: Users, keyword: str
) -> None:
    """The client never saw the first answers (its connection died): the same files
    again, by the same user, are answered with the entries already spooled."""
    content = {f"r{i}.log".encode(): os.urandom(100 + i) for i in range(3)}
    paths = [user_file(service.work, users.by_uid, name, data) for name, data in content.items()]

    def submit_all() -> list[Response]:
        fds = [os.open(p, os.O_RDONLY) for p in paths]
        try:
            return submit_fds(service, keyword, list(zip(paths, fds, strict=True)))
        finally:
            for fd in fds:
                os.close(fd)

    first = as_user(users.by_uid, submit_all)
    again = as_user(users.by_uid, submit_all)
    assert [a.message for a in again] == [f.message for f in first]
    assert [a.size for a in again] == [len(d) for d in content.values()]
    for answer, data in zip(first, content.values(), strict=True):
        service.expect(answer, data)
    service.wait_idle()
    assert service.journal().count("resubmit") == len(paths)
    # Another user submitting the same file is not a resubmit: a new entry.
    fd = os.open(paths[0], os.O_RDONLY)
    try:
        [other] = submit_fds(service, keyword, [(paths[0], fd)])  # as root, also allowed
    finally:
        os.close(fd)
    assert other.message not in {f.message for f in first}
    service.expect(other, content[b"r0.log"])
