"""The real auditd rotates its own log; dlogd-watch submits each rotated file exactly once;
the real shipper delivers them to a real collector over mutual TLS.

Runs on this machine as root, not in the lab: the kernel accepts audit control
only from the initial PID namespace (``kernel/audit.c``, ``audit_netlink_ok``),
and every nspawn host has a PID namespace of its own (docs/watch.md says what
was found). Debian's auditd runs in the foreground (``-n``) with a config
directory of the test's own (``-c DIR``): ``max_log_file_action = ROTATE``,
``max_log_file = 1`` (MiB), ``num_logs = 5``, ``log_file`` in a temporary
directory, ``log_group`` the watch user's group. Events are one audit rule on
``chdir`` limited to this process, so nothing else on the machine adds to
them. The audit state is restored in a finalizer: the rule deleted by its
key, the enabled flag and backlog limit set back to what they were, auditd
stopped.
"""

from __future__ import annotations

import contextlib
import grp
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dlogd import watch
from dlogd.config import Host
from tests.process.test_watch_process import WatchUser, WatchWorld, watch_user, watch_world
from tests.shipharness import (
    Pki,
    pki_set,
    sha256_of,
    ship,
    start_collector,
    visible_files,
    write_server_config,
)
from tests.tlsfixtures import COLLECTOR, LOOPBACK, SENDER

__all__ = ["pki_set", "watch_user"]  # fixtures, used by name

pytestmark = [pytest.mark.process, pytest.mark.slow]

RULE_KEY = "dlogd-watch-test"
ROTATIONS = 3
# audit.log and nine rotated files: room for the rotations auditd still makes from
# events queued in the kernel after we stop (it writes asynchronously), so none of
# the files the test checks is deleted.
NUM_LOGS = 10
EVENTS_PER_FILE = 1_500  # about this many chdir events fill 1 MiB
ROTATION_WAIT = 60.0  # s: a bound for one rotation


def _audit(*args: str) -> str:
    done = subprocess.run(["auditctl", *args], capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"auditctl {' '.join(args)}: {done.stdout}{done.stderr}"
    return done.stdout


def _status() -> dict[str, str]:
    return dict(line.split(" ", 1) for line in _audit("-s").splitlines() if " " in line)


def _auditd_conf(directory: Path, log_dir: Path, group: str) -> Path:
    plugins = directory / "plugins.d"  # empty: no dispatcher, no plugins
    plugins.mkdir(mode=0o750)
    settings = {
        "local_events": "yes",
        "write_logs": "yes",
        "log_file": str(log_dir / "audit.log"),
        "log_group": group,
        "log_format": "RAW",
        "flush": "INCREMENTAL_ASYNC",
        "freq": "50",
        "max_log_file": "1",
        "num_logs": str(NUM_LOGS),
        "max_log_file_action": "ROTATE",
        # A full disk must not stop the test's auditd (nor suspend auditing).
        "space_left": "2",
        "space_left_action": "IGNORE",
        "admin_space_left": "1",
        "admin_space_left_action": "IGNORE",
        "disk_full_action": "IGNORE",
        "disk_error_action": "IGNORE",
        "plugin_dir": str(plugins),
        "q_depth": "2000",
    }
    conf = directory / "auditd.conf"
    conf.write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
    conf.chmod(0o640)  # auditd refuses a config others can write
    return conf


@contextlib.contextmanager
def running_auditd(log_dir: Path, group: str, workdir: Path) -> Iterator[None]:
    """auditd -n -c DIR with the test's config; the machine's audit state restored after."""
    auditd = shutil.which("auditd") or "/sbin/auditd"
    if not os.path.exists(auditd) or shutil.which("auditctl") is None:
        pytest.fail("auditd is not installed (Debian package auditd; scripts/setup.sh)")
    before = _status()
    if before.get("pid", "0") != "0":
        pytest.fail(f"an audit daemon already runs (pid {before['pid']}): not replacing it")
    confdir = workdir / "auditd"
    confdir.mkdir(mode=0o750)
    _auditd_conf(confdir, log_dir, group)
    log = workdir / "auditd.out"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [auditd, "-n", "-c", str(confdir)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 10
        while _status().get("pid") != str(proc.pid):
            assert proc.poll() is None, f"auditd exited: {log.read_text()}"
            assert time.monotonic() < deadline, f"auditd did not register: {log.read_text()}"
            time.sleep(0.05)
        # Room for bursts: with the default 64 events would be lost, not logged.
        _audit("-b", "8192")
        _audit("-a", "always,exit", "-F", "arch=b64", "-S", "chdir",
               "-F", f"pid={os.getpid()}", "-k", RULE_KEY)  # fmt: skip
        yield
    finally:
        with contextlib.suppress(AssertionError):
            _audit("-D", "-k", RULE_KEY)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        _audit("-e", before.get("enabled", "0"))
        _audit("-b", before.get("backlog_limit", "64"))


def _rotated(log_dir: Path) -> list[Path]:
    return sorted(p for p in log_dir.iterdir() if re.fullmatch(r"audit\.log\.\d+", p.name))


def _live_inode(log_dir: Path) -> int:
    return (log_dir / "audit.log").stat().st_ino


def rotate_by_events(log_dir: Path) -> None:
    """Audit events (chdir to where we are) until auditd starts a new audit.log."""
    here = os.getcwd()
    first = _live_inode(log_dir)
    made = 0
    deadline = time.monotonic() + ROTATION_WAIT
    while True:
        for _ in range(200):
            os.chdir(here)
        made += 200
        with contextlib.suppress(FileNotFoundError):  # mid-rename: look again
            if _live_inode(log_dir) != first:
                return
        assert time.monotonic() < deadline, f"no rotation within {ROTATION_WAIT} s of {made} events"
        # auditd writes asynchronously: chdir() can outrun it by far (the CI run
        # after the lab tier made 40,000 events before it wrote 1 MiB). Past
        # twice what fills a file, wait for it instead of making more, which
        # would only rotate away files the test still checks.
        if made >= 2 * EVENTS_PER_FILE:
            time.sleep(0.25)


@pytest.fixture
def audit_site(watch_user: WatchUser, pki_set: Pki) -> Iterator[tuple[WatchWorld, Path, int]]:
    store = Path(os.environ.get("TMPDIR", "/tmp")) / f"dlogd-auditd-store-{os.getpid()}"
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir(mode=0o700)
    server_conf = write_server_config(
        store / "server.conf",
        tls=pki_set.tls(pki_set.fleet.collector),
        dirs={"audit": {SENDER: store / "remote"}},
        senders={SENDER: LOOPBACK},
    )
    collector = start_collector(server_conf, store)
    try:
        hosts = {COLLECTOR: Host(COLLECTOR, LOOPBACK, collector.port)}
        with watch_world(
            watch_user, "auditd", tls=pki_set.tls(pki_set.fleet.sender), hosts=hosts
        ) as world:
            yield world, store / "remote", collector.port
    finally:
        collector.kill()
        shutil.rmtree(store, ignore_errors=True)


def test_auditd_rotations_are_each_submitted_once_and_shipped(
    audit_site: tuple[WatchWorld, Path, int],
) -> None:
    site, store, _ = audit_site
    group = grp.getgrgid(site.user.gid).gr_name
    with running_auditd(site.logs, group, site.root):
        submitted: list[str] = []
        for _ in range(ROTATIONS):
            rotate_by_events(site.logs)
            # Every older file was renamed once more (audit.log.1 -> .2 ...): only
            # the files rotated since the last run are new, and each is audit.log.1
            # or, if auditd rotated again meanwhile, a little further down.
            run = site.run()
            assert run.returncode == 0, run.stderr
            new = [r.get("path") for r in run.of(watch.WATCH_SUBMITTED)]
            assert new, run.stdout
            submitted += new
        # Once auditd is stopped nothing rotates any more: every rotated file was
        # submitted exactly once, however often it was renamed.
    rotated = _rotated(site.logs)
    assert [p.name for p in rotated] == [f"audit.log.{n}" for n in range(1, len(rotated) + 1)]
    assert len(rotated) < NUM_LOGS - 1  # none deleted yet
    final = site.run()
    assert final.returncode == 0, final.stderr
    submitted += [r.get("path") for r in final.of(watch.WATCH_SUBMITTED)]
    assert len(submitted) == len(rotated) >= ROTATIONS, submitted
    # The real shipper, as root like the unit's dlogd user here, to the real collector.
    shipped = ship(site.conf, site.root / "ship-cache")
    assert shipped.returncode == 0, shipped.stderr
    names = visible_files(store)
    assert len(names) == len(rotated), names
    assert sorted(sha256_of(store / n) for n in names) == sorted(sha256_of(p) for p in rotated)
    # auditd's own records are in them: the events this test made, under its key.
    assert all(f'key="{RULE_KEY}"' in (store / n).read_text(errors="replace") for n in names)
