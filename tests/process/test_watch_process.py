"""dlogd-watch against the real submit service, as an unprivileged watch user.

The submit service runs the way dlogd-submit.socket runs it
(``systemd-socket-activate --accept``, one ``python -m dlogd.submit_service``
per connection, as root). dlogd-watch runs as a user created for the session:
the interpreter lives under root's home here, which other users cannot
execute, so each run is a forked child that drops to the user's uid, gid and
groups for real and then calls the console script's entry point
(``dlogd.watch:main``) with the arguments the unit gives it. The kernel's
access checks and the service's per-keyword checks are therefore the real
ones. Journal records come back as dlogd's stderr lines (no journal socket
here). Configs are written with ``config.to_text``.

The helpers are shared with tests/process/test_auditd_watch.py. (Not test_watch.py: the
unit tier has that basename, and pytest needs unique ones.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dlogd import config, journal, watch
from dlogd.config import ClientConfig, ClientKeyword, Host, TLSFiles, Watch
from tests.shipharness import JournalledRun, Record, parse_records

pytestmark = pytest.mark.process

REPO = Path(__file__).resolve().parents[2]
KEYWORD = "audit"


def _checked(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{argv}: {done.stdout}{done.stderr}"


@dataclass(frozen=True)
class WatchUser:
    name: str
    uid: int
    gid: int


@pytest.fixture(scope="session")
def watch_user() -> Iterator[WatchUser]:
    """An unprivileged system user (and its own group) for the watch."""
    import pwd

    name = f"dlogdw{uuid.uuid4().hex[:8]}"
    _checked("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
             "--user-group", name)  # fmt: skip
    try:
        entry = pwd.getpwnam(name)
        yield WatchUser(name, entry.pw_uid, entry.pw_gid)
    finally:
        _checked("userdel", name)


@dataclass(frozen=True)
class WatchRun(JournalledRun):
    returncode: int
    stdout: str
    stderr: str


@dataclass
class WatchWorld:
    """One test's client host: a watched directory, the submit service, the watch's state."""

    root: Path  # root-owned, 0755: the watch user may look in, not write
    user: WatchUser
    logs: Path  # the watched directory
    socket: Path
    spool: Path
    service_log: Path
    conf: Path
    state: Path
    cache: Path
    tls: TLSFiles = field(default_factory=TLSFiles)
    hosts: Mapping[str, Host] = field(default_factory=lambda: {"logs1": Host("logs1", "logs1")})

    def configure(self, *watches: Watch, keywords: Sequence[ClientKeyword] = ()) -> Path:
        """client.conf through the config's own writer: "audit" allows the watch user."""
        allowed = ClientKeyword(KEYWORD, frozenset({self.user.uid}), frozenset(), tuple(self.hosts))
        written = ClientConfig(
            keywords={k.name: k for k in (allowed, *keywords)},
            hosts=self.hosts,
            spool=str(self.spool),
            tls=self.tls,
            watches={w.directory: w for w in watches},
        )
        self.conf.write_text(config.to_text(written))
        return self.conf

    def watch(self, pattern: str = "audit.log.*", *, quiet: float | None = None,
              keyword: str = KEYWORD) -> Watch:  # fmt: skip
        return Watch(str(self.logs), pattern, keyword, self.user.name, quiet)

    def run(
        self, *, socket: Path | None = None, as_root: bool = False, crash_at: str = ""
    ) -> WatchRun:
        """One run of dlogd-watch, as dlogd-watch.service starts it (``crash_at``: the
        dlogd.crash point where it is killed with SIGKILL)."""
        argv = ["--config", str(self.conf), "--state-dir", str(self.state),
                "--socket", str(socket or self.socket)]  # fmt: skip
        return run_as(None if as_root else self.user, argv, self.cache, crash_at)

    def spooled(self) -> list[tuple[str, bytes]]:
        """Spool entries: (the name submitted under, without the timestamp; the bytes)."""
        kdir = self.spool / KEYWORD
        if not kdir.exists():
            return []
        return sorted(
            (p.name.split(".", 1)[1], p.read_bytes())
            for p in kdir.iterdir()
            if not p.name.startswith(".")
        )

    def service_records(self) -> list[Record]:
        return parse_records(self.service_log.read_text(errors="replace"))


def run_as(user: WatchUser | None, argv: list[str], cache: Path, crash_at: str = "") -> WatchRun:
    """``dlogd.watch.main(argv)`` in a child with the user's credentials; its output."""
    out_path = Path(tempfile.mkstemp(prefix="dlogd-watch-out-")[1])
    err_path = Path(tempfile.mkstemp(prefix="dlogd-watch-err-")[1])
    pid = os.fork()
    if pid == 0:  # the child: become the watch user for real, then be dlogd-watch
        code = 70
        try:
            with out_path.open("wb") as out, err_path.open("wb") as err:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
            # pytest's capture replaced sys.stdout and sys.stderr: write to the fds again.
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            os.environ["DLOGD_CACHE_DIR"] = str(cache)
            os.environ.pop("DLOGD_SOCKET", None)
            os.environ["DLOGD_TEST_CRASH_AT"] = crash_at
            if user is not None:
                os.setgroups([])
                os.setgid(user.gid)
                os.setuid(user.uid)
            code = watch.main(argv)
        except BaseException as exc:  # anything at all: report it, never return into pytest
            with contextlib.suppress(Exception):
                os.write(2, f"child failed: {exc!r}\n".encode())
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    run = WatchRun(os.waitstatus_to_exitcode(status), out_path.read_text(), err_path.read_text())
    out_path.unlink()
    err_path.unlink()
    assert "child failed" not in run.stderr, run.stderr
    return run


@contextlib.contextmanager
def submit_service(conf: Path, sock: Path, log: Path, cache: Path) -> Iterator[None]:
    """The real submit service under systemd-socket-activate, as dlogd-submit.socket runs it."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["systemd-socket-activate", "--accept", "-l", str(sock),
             "-E", f"PYTHONPATH={REPO}", "-E", f"DLOGD_CACHE_DIR={cache}",
             sys.executable, "-m", "dlogd.submit_service", "--config", str(conf)],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert proc.poll() is None, f"systemd-socket-activate exited: {log.read_text()}"
            assert time.monotonic() < deadline, "the submit socket never appeared"
            time.sleep(0.02)
        sock.chmod(0o666)  # made under root's umask; any uid may connect (the unit's 0666)
        yield
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


@contextlib.contextmanager
def watch_world(
    user: WatchUser,
    name: str,
    *,
    tls: TLSFiles | None = None,
    hosts: Mapping[str, Host] | None = None,
) -> Iterator[WatchWorld]:
    """Directories with the owners the units give them; the submit service running.

    ``tls`` and ``hosts``: the collectors the config names, when a test ships."""
    root = Path(tempfile.mkdtemp(prefix=f"dlogd-watch-{name}-"))
    try:
        root.chmod(0o755)
        logs, private, state, cache = (root / d for d in ("logs", "private", "state", "cache"))
        logs.mkdir(mode=0o755)
        private.mkdir(mode=0o700)
        for own in (state, cache):  # StateDirectory=dlogd-watch: the user's own
            own.mkdir(mode=0o700)
            os.chown(own, user.uid, user.gid)
        world = WatchWorld(
            root, user, logs, root / "submit.sock", private / "spool",
            private / "service.log", root / "client.conf", state, cache,
        )  # fmt: skip
        if tls is not None:
            world.tls = tls
        if hosts is not None:
            world.hosts = hosts
        world.configure(world.watch())
        with submit_service(world.conf, world.socket, world.service_log, private / "cache"):
            yield world
    finally:
        shutil.rmtree(root)


@pytest.fixture
def site(watch_user: WatchUser, request: pytest.FixtureRequest) -> Iterator[WatchWorld]:
    with watch_world(watch_user, request.node.name[:20]) as world:
        yield world


def write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def rotate(logs: Path, base: str, keep: int) -> None:
    """What auditd's ROTATE does: .N-1 -> .N ... .1 -> .2, then the live file -> .1."""
    for n in range(keep - 1, 0, -1):
        older = logs / f"{base}.{n}"
        if older.exists():
            older.rename(logs / f"{base}.{n + 1}")
    (logs / base).rename(logs / f"{base}.1")


# --- the scenarios of issue 14 --------------------------------------------------------------


def test_rotation_renames_submit_each_file_once(site: WatchWorld) -> None:
    write(site.logs / "audit.log", b"first\n")
    rotate(site.logs, "audit.log", 4)
    write(site.logs / "audit.log", b"second\n")
    first = site.run()
    assert first.returncode == 0, first.stderr
    assert site.spooled() == [("audit.log.1", b"first\n")]  # the live audit.log never
    for round_ in range(3):  # each rotation renames every older file once more
        rotate(site.logs, "audit.log", 4)
        write(site.logs / "audit.log", b"live %d\n" % round_)
        again = site.run()
        assert again.returncode == 0, again.stderr
        assert len(again.of(watch.WATCH_SUBMITTED)) == 1, again.stderr
    # Each file went once, under the name it had when it was finished: audit.log.1.
    contents = [b"first\n", b"live 0\n", b"live 1\n", b"second\n"]
    assert site.spooled() == [("audit.log.1", data) for data in contents]
    accepted = [r for r in site.service_records() if r.get("message_id") == journal.SUBMIT_ACCEPTED]
    assert len(accepted) == 4


def test_a_file_still_being_written_waits_until_it_is_quiet(site: WatchWorld) -> None:
    site.configure(site.watch("app-*.log", quiet=3600))
    growing = write(site.logs / "app-1.log", b"line 1\n")
    for line in range(2, 4):
        run = site.run()
        assert (run.returncode, site.spooled()) == (0, []), run.stderr
        assert "1 still being written" in run.stdout
        with growing.open("ab") as f:
            f.write(b"line %d\n" % line)
    # Quiet for a second is quiet enough now: the decision reads the file's own times.
    site.configure(site.watch("app-*.log", quiet=1))
    time.sleep(1.1)
    done = site.run()
    assert done.returncode == 0, done.stderr
    assert site.spooled() == [("app-1.log", b"line 1\nline 2\nline 3\n")]
    assert site.run().of(watch.WATCH_SUBMITTED) == []


def test_a_file_that_disappears_before_it_is_finished_is_skipped(site: WatchWorld) -> None:
    site.configure(site.watch("app-*.log", quiet=3600))
    doomed = write(site.logs / "app-1.log", b"short-lived\n")
    assert "1 still being written" in site.run().stdout
    doomed.unlink()
    run = site.run()
    assert (run.returncode, run.records, site.spooled()) == (0, [], []), run.stderr
    assert "0 submitted, 0 refused, 0 still being written" in run.stdout


def test_a_file_the_watch_user_cannot_read_is_refused_once(site: WatchWorld) -> None:
    write(site.logs / "audit.log.1", b"root only\n", mode=0o600)
    write(site.logs / "audit.log.2", b"readable\n")
    first = site.run()
    assert first.returncode == 0, first.stderr
    [refusal] = first.of(watch.WATCH_REFUSED)
    assert refusal.get("path") == str(site.logs / "audit.log.1")
    assert f"user {site.user.uid} cannot read it" in refusal.message
    assert site.spooled() == [("audit.log.2", b"readable\n")]
    for _ in range(2):  # not retried in a loop: nothing changed
        again = site.run()
        assert (again.returncode, again.records) == (0, []), again.stderr
    # Fixing the permission changes the file's ctime: then it is tried again.
    (site.logs / "audit.log.1").chmod(0o644)
    fixed = site.run()
    assert len(fixed.of(watch.WATCH_SUBMITTED)) == 1, fixed.stderr
    assert ("audit.log.1", b"root only\n") in site.spooled()


def test_a_keyword_the_watch_user_may_not_submit_is_refused_once(site: WatchWorld) -> None:
    root_only = ClientKeyword("rootonly", frozenset({0}), frozenset(), ("logs1",))
    site.configure(site.watch(keyword="rootonly"), keywords=[root_only])
    write(site.logs / "audit.log.1", b"x\n")
    first = site.run()
    [refusal] = first.of(watch.WATCH_REFUSED)
    assert "PERMISSION_DENIED" in refusal.message, first.stderr
    assert site.run().records == []
    # The service was asked once: the second run did not connect again.
    refused = [r for r in site.service_records() if r.get("message_id") == journal.SUBMIT_REFUSED]
    assert len(refused) == 1 and refused[0].get("uid") == str(site.user.uid)


def test_a_restarted_watch_submits_nothing_twice(site: WatchWorld) -> None:
    for n in (1, 2, 3):
        write(site.logs / f"audit.log.{n}", b"file %d\n" % n)
    assert len(site.run().of(watch.WATCH_SUBMITTED)) == 3
    for _ in range(3):  # each run is a fresh process, as each start of the unit is
        run = site.run()
        assert (run.returncode, run.of(watch.WATCH_SUBMITTED)) == (0, []), run.stderr
    assert len(site.spooled()) == 3


def test_a_watch_killed_between_submit_and_record_does_not_spool_twice(site: WatchWorld) -> None:
    """kill -9 after the service answered, before the state was written: the next run
    submits again, and the spool recognises the same caller's same file."""
    write(site.logs / "audit.log.1", b"once\n")
    killed = site.run(crash_at="watch-after-submit")
    assert killed.returncode == -9, killed.stderr
    assert site.spooled() == [("audit.log.1", b"once\n")]
    assert watch.read_states(str(site.state)).get(str(site.logs)) is None
    again = site.run()
    assert (again.returncode, len(again.of(watch.WATCH_SUBMITTED))) == (0, 1), again.stderr
    assert site.spooled() == [("audit.log.1", b"once\n")]
    assert site.run().of(watch.WATCH_SUBMITTED) == []


def test_an_unreachable_service_is_retried_by_the_next_run(site: WatchWorld) -> None:
    write(site.logs / "audit.log.1", b"later\n")
    down = site.run(socket=site.root / "nobody-listens.sock")
    assert down.returncode == watch.EX_TEMPFAIL, down.stderr
    assert down.of(watch.WATCH_PROBLEM) and site.spooled() == []
    up = site.run()
    assert (up.returncode, site.spooled()) == (0, [("audit.log.1", b"later\n")]), up.stderr


def test_a_symlink_in_the_directory_is_never_followed(site: WatchWorld) -> None:
    secret = write(site.root / "secret", b"not for shipping\n")
    (site.logs / "audit.log.1").symlink_to(secret)
    run = site.run()
    assert (run.returncode, site.spooled()) == (0, []), run.stderr


def test_a_directory_others_can_write_is_refused_and_said_once(site: WatchWorld) -> None:
    write(site.logs / "audit.log.1", b"planted?\n")
    site.logs.chmod(0o777)
    first = site.run()
    [problem] = first.of(watch.WATCH_PROBLEM)
    assert "writable by every user (mode 0777)" in problem.message
    assert site.run().records == []  # said once, not on every run
    site.logs.chmod(0o755)
    back = site.run()
    assert [r.message for r in back.of(watch.WATCH_PROBLEM)] == [f"watching {site.logs} again"]
    assert site.spooled() == [("audit.log.1", b"planted?\n")]


def test_bad_watch_config_is_a_clear_error(site: WatchWorld) -> None:
    site.conf.write_text(
        config.to_text(ClientConfig({}, {}))
        + f'watch "{site.logs}" {{ pattern "a/b"; keyword "audit"; user "{site.user.name}"; }}\n'
    )
    run = site.run()
    assert run.returncode == 1
    assert "expected a file-name pattern (1-255 characters, no '/')" in run.stderr
    line = len(site.conf.read_text().splitlines())
    assert f"{site.conf}:{line}:" in run.stderr


def test_it_refuses_to_run_as_root_or_as_a_user_with_no_watch(site: WatchWorld) -> None:
    as_root = site.run(as_root=True)
    assert (as_root.returncode, site.spooled()) == (1, [])
    assert "refusing to run as root" in as_root.stderr
    site.configure(Watch(str(site.logs), "*", KEYWORD, "daemon"))
    other = site.run()
    assert other.returncode == 1
    assert f"no watch block in {site.conf} names user {site.user.uid}" in other.stderr


# --- examples/logrotate.d/dlogd-example with the real logrotate ----------------------------

LOGROTATE_EXAMPLE = REPO / "examples" / "logrotate.d" / "dlogd-example"


def logrotate(site: WatchWorld, log: Path) -> subprocess.CompletedProcess[str]:
    """``logrotate -f`` of the example, for ``log`` instead of /var/log/app/app.log; dlogctl
    is this checkout's (the example honours $DLOGCTL), talking to the test's service."""
    if shutil.which("logrotate") is None:
        pytest.fail("logrotate is not installed (Debian package logrotate; scripts/setup.sh)")
    example = LOGROTATE_EXAMPLE.read_text()
    assert example.count("/var/log/app/app.log {") == 1
    conf = write(
        site.root / "logrotate.conf", example.replace("/var/log/app/app.log", str(log)).encode()
    )
    dlogctl = site.root / "dlogctl"
    dlogctl.write_text(f'#!/bin/sh\nexec {sys.executable} -m dlogd.cli "$@"\n')
    dlogctl.chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(REPO), "DLOGCTL": str(dlogctl),
           "DLOGD_SOCKET": str(site.socket)}  # fmt: skip
    return subprocess.run(
        ["logrotate", "-f", "-s", str(site.root / "logrotate.state"), str(conf)],
        capture_output=True, text=True, check=False, env=env,
    )  # fmt: skip


def test_the_logrotate_example_submits_each_rotated_file_once(site: WatchWorld) -> None:
    """dateext + delaycompress: the file just rotated is submitted, never the .gz of the one before."""
    # logrotate runs as root; copy: it will not compress a file the spool still links.
    app = ClientKeyword("app", frozenset({0}), frozenset(), ("logs1",), copy=True)
    site.configure(keywords=[app])
    log = write(site.logs / "app.log", b"day 1\n")
    first = logrotate(site, log)
    assert first.returncode == 0, first.stderr
    [rotated] = sorted(p.name for p in site.logs.iterdir() if p.name != "app.log")
    assert rotated.startswith("app.log-")  # dateext
    assert [
        p.name.split(".", 1)[1] for p in (site.spool / "app").iterdir() if p.name[0] != "."
    ] == [rotated]
    # The next day: yesterday's file, still uncompressed (delaycompress), and new lines.
    (site.logs / rotated).rename(site.logs / "app.log-19991231")
    log.write_bytes(b"day 2\n")
    second = logrotate(site, log)
    assert second.returncode == 0, second.stderr
    assert sorted(p.name for p in site.logs.iterdir()) == [
        "app.log", "app.log-19991231.gz", rotated,
    ]  # fmt: skip
    entries = sorted(p for p in (site.spool / "app").iterdir() if not p.name.startswith("."))
    assert sorted(p.read_bytes() for p in entries) == [b"day 1\n", b"day 2\n"]
    assert all(p.name.endswith("." + rotated) for p in entries)
