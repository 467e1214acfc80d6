"""Both client libraries, libdlogd (clib/) and the Python dlogd.client, against the real service.

The library is built with its own Makefile once per session; the service runs
the way systemd runs it: ``systemd-socket-activate --accept`` starts
``python -m dlogd.submit_service`` per connection with the connection on fd 3. The C
test program runs as an unprivileged user created for the session, so the
kernel's access checks and the service's uid/group checks are the real ones.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import grp
import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlogd import client, names
from dlogd.config import ClientConfig, ClientKeyword, Host, Limits, to_text

pytestmark = pytest.mark.process

REPO = Path(__file__).resolve().parents[2]
CLIB = REPO / "clib"
EXPORTED = {"dlogd_submit", "dlogd_last_message"}


@dataclass(frozen=True)
class Build:
    directory: Path
    library: Path
    program: Path


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    group: str  # a supplementary group, named in the config


@dataclass(frozen=True)
class Service:
    socket: Path
    spool: Path
    files: Path  # readable and writable by the test user
    log: Path


def _run(*argv: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, check=False, env=env
    )


def _checked(*argv: str | Path) -> str:
    done = _run(*argv)
    assert done.returncode == 0, f"{argv}: {done.stdout}{done.stderr}"
    return done.stdout


@pytest.fixture(scope="session")
def world() -> Iterator[Path]:
    """A directory the test user can reach (pytest's own tmp is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="dlogd-clib-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture(scope="session")
def build(world: Path) -> Build:
    out = world / "build"
    _checked("make", "-C", CLIB, f"B={out}", "all", "test-program")
    return Build(out, out / "libdlogd.so.1", out / "dlogd-submit-test")


@pytest.fixture(scope="session")
def user() -> Iterator[User]:
    tag = uuid.uuid4().hex[:8]
    name, group = f"dlogdt{tag}", f"dlogdg{tag}"
    _checked("groupadd", "--system", group)
    try:
        _checked(
            "useradd",
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "--user-group",
            "--groups",
            group,
            name,
        )
        try:
            yield User(name, pwd.getpwnam(name).pw_uid, group)
        finally:
            _checked("userdel", name)
    finally:
        _checked("groupdel", group)


def _config(spool: Path, user: User, limits: Limits) -> str:
    """The service's config, through the config's own writer."""

    def keyword(name: str, uids: set[int], groups: set[str]) -> ClientKeyword:
        return ClientKeyword(name, frozenset(uids), frozenset(groups), ("logs1",))

    return to_text(
        ClientConfig(
            keywords={
                "audit": keyword("audit", {user.uid}, set()),
                "staff": keyword("staff", set(), {user.group}),
                "rootonly": keyword("rootonly", {0}, set()),
                "both": keyword("both", {0, user.uid}, set()),
            },
            hosts={"logs1": Host("logs1", "logs1")},
            spool=str(spool),
            limits=limits,
        )
    )


@contextlib.contextmanager
def _running_service(
    world: Path, name: str, user: User, limits: Limits | None = None
) -> Iterator[Service]:
    """The real service under systemd-socket-activate, as dlogd.socket runs it."""
    root = world / name
    files = root / "files"  # the caller's files: reachable and writable by the test user
    private = root / "private"  # spool, config, cache: root only
    root.mkdir(mode=0o755)
    files.mkdir(mode=0o755)
    private.mkdir(mode=0o700)
    os.chown(files, user.uid, -1)
    conf = private / "client.conf"
    conf.write_text(_config(private / "spool", user, limits or Limits()))
    sock, log = root / "submit.sock", private / "service.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                "systemd-socket-activate",
                "--accept",
                "-l",
                str(sock),
                "-E",
                f"PYTHONPATH={REPO}",
                "-E",
                f"DLOGD_CACHE_DIR={private / 'cache'}",
                sys.executable,
                "-m",
                "dlogd.submit_service",
                "--config",
                str(conf),
            ],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for(sock, proc, log)
        # Created under root's umask; callers of every uid must be able to connect.
        sock.chmod(0o666)
        yield Service(sock, private / "spool", files, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


@pytest.fixture(scope="session")
def service(world: Path, user: User) -> Iterator[Service]:
    with _running_service(world, "main", user) as running:
        yield running


@pytest.fixture(scope="module")
def small_service(world: Path, user: User) -> Iterator[Service]:
    """A service whose max_file_size is 100 bytes."""
    with _running_service(world, "small", user, Limits(max_file_size=100)) as running:
        yield running


def _wait_for(sock: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 10
    while not sock.exists():
        assert proc.poll() is None, f"systemd-socket-activate exited: {log.read_text()}"
        assert time.monotonic() < deadline, "the submit socket never appeared"
        time.sleep(0.02)


def _submit_as(
    user: User, build: Build, socket: Path, keyword: str, *paths: Path
) -> tuple[int, list[str]]:
    done = _run(
        "setpriv",
        f"--reuid={user.name}",
        f"--regid={user.name}",
        "--init-groups",
        "env",
        f"DLOGD_SOCKET={socket}",
        build.program,
        keyword,
        *paths,
    )
    assert done.stderr == "", done.stderr
    return done.returncode, done.stdout.splitlines()


def _user_file(service: Service, user: User, name: str, data: bytes, mode: int = 0o644) -> Path:
    path = service.files / name
    path.write_bytes(data)
    os.chown(path, user.uid, -1)
    path.chmod(mode)
    return path


def _spool_listing(service: Service) -> set[str]:
    """Spool entries, without the spool's own bookkeeping (dot names)."""
    if not service.spool.exists():
        return set()
    return {
        str(p.relative_to(service.spool))
        for p in service.spool.glob("[!.]*/[!.]*")
        if p.is_file() and not p.parent.name.startswith(".")
    }


def _spooled(service: Service, entry: str) -> bytes:
    return (service.spool / entry).read_bytes()


# --- the library as built ---------------------------------------------------------


def test_library_exports_exactly_the_api(build: Build) -> None:
    lines = _checked("nm", "-D", "--defined-only", build.library).splitlines()
    assert {line.split()[-1] for line in lines} == EXPORTED
    assert "SONAME" in _checked("readelf", "-d", build.library)
    soname = [ln for ln in _checked("readelf", "-d", build.library).splitlines() if "SONAME" in ln]
    assert soname and soname[0].endswith("[libdlogd.so.1]")


def test_test_program_links_only_libdlogd_and_libc(build: Build) -> None:
    libs = _checked("ldd", build.program)
    assert "libpython" not in libs
    assert f"libdlogd.so.1 => {build.directory}/libdlogd.so.1" in libs


def test_install_and_pkg_config_build_a_program(build: Build, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    _checked(
        "make",
        "-C",
        CLIB,
        f"B={build.directory}",
        f"DESTDIR={dest}",
        "PREFIX=/usr/local",
        "install",
    )
    lib = dest / "usr/local/lib"
    assert os.readlink(lib / "libdlogd.so.1") == "libdlogd.so.1.0.0"
    assert (dest / "usr/local/include/dlogd.h").read_bytes() == (CLIB / "dlogd.h").read_bytes()
    env = {
        **os.environ,
        "PKG_CONFIG_PATH": str(lib / "pkgconfig"),
        "PKG_CONFIG_SYSROOT_DIR": str(dest),
    }
    flags = _run("pkg-config", "--cflags", "--libs", "dlogd", env=env)
    assert flags.returncode == 0, flags.stderr
    assert flags.stdout.split() == [
        f"-I{dest}/usr/local/include",
        f"-L{dest}/usr/local/lib",
        "-ldlogd",
    ]
    prog = tmp_path / "prog"
    _checked("cc", "-o", prog, CLIB / "tests/submit_test.c", *flags.stdout.split())
    assert "dlogd_submit" in _checked("nm", "-u", prog)


# --- the C library against the real service -----------------------------------------


def test_c_submit_as_user_spools_identical_file(build: Build, service: Service, user: User) -> None:
    data = os.urandom(5000) + b"\nend of log\n"
    source = _user_file(service, user, "app.log", data)
    rc, out = _submit_as(user, build, service.socket, "audit", source)
    assert rc == 0, (out, service.log.read_text())
    [line] = out
    status, entry = line.split(" ", 1)
    assert status == "OK"
    assert entry.startswith("audit/") and entry.endswith("app.log")
    assert _spooled(service, entry) == data


def test_c_submit_through_group_membership(build: Build, service: Service, user: User) -> None:
    source = _user_file(service, user, "staff.log", b"by group\n")
    rc, [line] = _submit_as(user, build, service.socket, "staff", source)
    assert rc == 0 and line.startswith("OK staff/")
    assert _spooled(service, line.split(" ", 1)[1]) == b"by group\n"


def test_c_refusals_carry_errno_and_reason(build: Build, service: Service, user: User) -> None:
    source = _user_file(service, user, "refused.log", b"x\n")
    before = _spool_listing(service)
    fifo = service.files / "fifo"
    if not fifo.exists():
        os.mkfifo(fifo)
    cases = [
        ("nosuch", source, "ENOENT", "nosuch"),
        ("rootonly", source, "EACCES", "not allowed"),
        ("audit", fifo, "EINVAL", ""),
        ("audit", service.files, "EINVAL", ""),
    ]
    for keyword, path, name, reason in cases:
        rc, [line] = _submit_as(user, build, service.socket, keyword, path)
        assert rc == 1
        assert line.startswith(f"ERR {name} "), (keyword, path, line)
        assert reason in line
    assert _spool_listing(service) == before


def test_c_too_large(build: Build, small_service: Service, user: User) -> None:
    fits = _user_file(small_service, user, "fits.log", b"y" * 100)
    big = _user_file(small_service, user, "big.log", b"y" * 101)
    rc, out = _submit_as(user, build, small_service.socket, "audit", big, fits)
    assert rc == 1
    assert out[0].startswith("ERR EFBIG ")
    assert out[1].startswith("OK audit/") and out[1].endswith("fits.log")
    assert _spool_listing(small_service) == {out[1].split(" ", 1)[1]}


def test_c_cannot_submit_a_file_the_caller_cannot_read(
    build: Build, service: Service, user: User
) -> None:
    """Invariant 4: the service must never see a file the caller could not open."""
    secret = service.files / "root-only.log"
    secret.write_bytes(b"secret\n")
    os.chown(secret, 0, 0)
    secret.chmod(0o600)
    before = _spool_listing(service)
    rc, [line] = _submit_as(user, build, service.socket, "audit", secret)
    assert rc == 1
    assert line.startswith("ERR EACCES cannot open")
    assert _spool_listing(service) == before


def test_c_submit_through_a_readable_symlink(build: Build, service: Service, user: User) -> None:
    target = _user_file(service, user, "target.log", b"via link\n")
    link = service.files / "link.log"
    if not link.is_symlink():
        link.symlink_to(target)
    rc, [line] = _submit_as(user, build, service.socket, "audit", link)
    assert rc == 0, line
    assert _spooled(service, line.split(" ", 1)[1]) == b"via link\n"


def test_c_many_files_in_one_process_in_order(build: Build, service: Service, user: User) -> None:
    good = [_user_file(service, user, f"many{i}.log", b"%d\n" % i) for i in range(5)]
    missing = service.files / "missing.log"
    rc, out = _submit_as(user, build, service.socket, "audit", good[0], missing, *good[1:])
    assert rc == 1
    assert out[1].startswith("ERR ENOENT cannot open")
    oks = [out[0], *out[2:]]
    assert all(line.startswith("OK audit/") for line in oks), out
    assert [_spooled(service, line.split(" ", 1)[1]) for line in oks] == [
        b"%d\n" % i for i in range(5)
    ]


def test_c_unreachable_service(build: Build, user: User, world: Path) -> None:
    absent = world / "absent.sock"
    rc, [line] = _submit_as(user, build, absent, "audit", build.program)
    assert rc == 1
    assert line.startswith(f"ERR ENOENT cannot reach dlogd at {absent}")


@pytest.mark.parametrize("keyword", ["", ".x", "-x", "a/b", "k" * 65, "caf\u00e9"])
def test_c_refuses_an_unsendable_keyword_before_connecting(
    build: Build, tmp_path: Path, keyword: str
) -> None:
    # No socket at all: EINVAL (not ENOENT) proves the check comes first.
    env = {"DLOGD_SOCKET": str(tmp_path / "absent.sock")}
    done = _run(build.program, keyword, build.program, env=env)
    assert done.returncode == 1
    assert done.stdout.startswith("ERR EINVAL keyword must be")


def _one_answer(sock_path: Path, answer: bytes) -> threading.Thread:
    """A peer that reads one request (descriptor and all) and sends ``answer``."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen(1)

    def serve() -> None:
        with listener, listener.accept()[0] as conn:
            data, fds, _flags, _addr = socket.recv_fds(conn, 8, 4)
            for fd in fds:
                os.close(fd)
            # The whole request, as the service reads it before answering.
            klen, plen = struct.unpack(">HH", data[4:8])
            while len(data) < 8 + klen + plen:
                data += conn.recv(8 + klen + plen - len(data))
            conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (b"HTTP/1.1 200 OK\r\n\r\n", "ERR EPROTO malformed answer from dlogd: bad magic"),
        (
            b"DLR1\x0a\x00\x00\x00" + bytes(8),
            "ERR EPROTO malformed answer from dlogd: unknown code 10",
        ),
        (
            b"DLR1\x00\x00\x10\x01" + bytes(8),
            "ERR EPROTO malformed answer from dlogd: message length 4097",
        ),
        (b"DLR1\x00\x00\x00\x09" + bytes(8) + b"cut", "ERR ECONNRESET dlogd closed the connection"),
        (b"", "ERR ECONNRESET dlogd closed the connection"),
    ],
)
def test_c_rejects_a_peer_that_is_not_dlogd(
    build: Build, tmp_path: Path, answer: bytes, expected: str
) -> None:
    sock = tmp_path / "fake.sock"
    peer = _one_answer(sock, answer)
    done = _run(build.program, "audit", build.program, env={"DLOGD_SOCKET": str(sock)})
    peer.join(5)
    assert done.returncode == 1
    assert done.stdout.startswith(expected)


# --- the Python client against the real service -------------------------------------


def test_python_submit_spools_identical_file(service: Service, tmp_path: Path) -> None:
    data = os.urandom(70000)
    source = tmp_path / "py.log"
    source.write_bytes(data)
    result = client.submit(source, "rootonly", socket_path=str(service.socket))
    assert result.size == len(data)
    assert result.entry.startswith("rootonly/") and result.entry.endswith("py.log")
    assert _spooled(service, result.entry) == data


def test_python_refusals_raise_their_classes(service: Service, tmp_path: Path) -> None:
    source = tmp_path / "r.log"
    source.write_bytes(b"r\n")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock = str(service.socket)
    before = _spool_listing(service)
    cases: list[tuple[Path, str, type[client.SubmitError], int]] = [
        (source, "nosuch", client.UnknownKeyword, errno.ENOENT),
        (source, "audit", client.PermissionDenied, errno.EACCES),
        (fifo, "rootonly", client.NotRegularFile, errno.EINVAL),
        (tmp_path, "rootonly", client.NotRegularFile, errno.EINVAL),
    ]
    for path, keyword, cls, code in cases:
        with pytest.raises(cls) as caught:
            client.submit(path, keyword, socket_path=sock)
        assert caught.value.errno == code
        assert caught.value.strerror
    assert _spool_listing(service) == before


def test_python_too_large(small_service: Service, tmp_path: Path) -> None:
    big = tmp_path / "big.log"
    big.write_bytes(b"z" * 101)
    with pytest.raises(client.TooLarge) as caught:
        client.submit(big, "rootonly", socket_path=str(small_service.socket))
    assert caught.value.errno == errno.EFBIG
    assert caught.value.filename == str(big)


def test_python_batch_keeps_order_and_content(service: Service, tmp_path: Path) -> None:
    count = client.MAX_IN_FLIGHT + 36
    paths = []
    for i in range(count):
        paths.append(tmp_path / f"b{i:03d}.log")
        paths[-1].write_bytes(b"batch %d\n" % i)
    paths.insert(7, tmp_path / "not-there.log")
    fds_before = set(os.listdir("/proc/self/fd"))
    results = client.submit_many(paths, "rootonly", socket_path=str(service.socket))
    assert set(os.listdir("/proc/self/fd")) == fds_before
    assert isinstance(results.pop(7), FileNotFoundError)
    del paths[7]
    assert all(isinstance(r, client.Submitted) for r in results), results
    entries = [r.entry for r in results if isinstance(r, client.Submitted)]
    assert len(set(entries)) == count
    assert [_spooled(service, e) for e in entries] == [p.read_bytes() for p in paths]


def test_user_and_group_names_are_real(user: User) -> None:
    # Guards the fixtures: a config naming a group that does not exist would
    # make the group test pass or fail for the wrong reason.
    assert user.name in grp.getgrnam(user.group).gr_mem


# Surrogates (category Cs) cannot be encoded for a C string at all: not a keyword question.
keyword_candidates = st.from_regex(names.KEYWORD_RE, fullmatch=True) | st.text(
    st.characters(exclude_characters="\0", exclude_categories=["Cs"]), max_size=70
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(keyword=keyword_candidates)
def test_c_keyword_check_is_the_shared_rule(build: Build, tmp_path: Path, keyword: str) -> None:
    """libdlogd refuses exactly the keywords dlogd.names refuses (one table, two languages)."""
    lib = ctypes.CDLL(str(build.library), use_errno=True)
    lib.dlogd_submit.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    lib.dlogd_last_message.restype = ctypes.c_char_p
    os.environ["DLOGD_SOCKET"] = str(tmp_path / "absent.sock")
    try:
        rc = lib.dlogd_submit(bytes(build.program), keyword.encode())
        err = ctypes.get_errno()
    finally:
        del os.environ["DLOGD_SOCKET"]
    assert rc == -1
    refused = err == errno.EINVAL and lib.dlogd_last_message().startswith(b"keyword must be")
    assert refused == (not names.is_keyword(keyword)), (keyword, err, lib.dlogd_last_message())
