"""A throwaway single-node Ceph (one mon, one memstore OSD, one radosgw) on loopback.

The archive tier's real S3 store (issue 11; the recipe is ../shared/CEPH.md,
verified on these machines). Everything lives in one temporary directory:
config, monitor data, logs, pid files. Each daemon runs in the foreground
(``-f``) as our child, in a session of its own so that a signal to pytest's
process group (a CI timeout) does not reach it by accident, and is stopped by
its pid, never by name. A run killed before its teardown leaves its directory
behind with the pid files in it: :func:`reap_leftovers` stops those daemons
(after checking that each pid still is that daemon) before a new cluster
starts, so the loopback ports are free again.

Auth is ``none`` (loopback only, a cluster that lives for one test session),
which needs ``ms mon client mode = crc`` for radosgw (CEPH.md gotcha 1).
The manager is not started: S3 does not need it (CEPH.md), and it costs 300 MiB.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

MON_PORT = 3300
RGW_PORT = 7480
LOOPBACK = "127.0.0.1"
ACCESS_KEY = "DLOGDTESTACCESS"
SECRET_KEY = "dlogd-test-secret-key-0123456789"
REGION = "us-east-1"
PREFIX = "dlogd-ceph-"  # temporary directories of this module, for the leftover reaper
DAEMONS = ("rgw", "osd", "mon")  # the order they are stopped in
COMMANDS = {"mon": "ceph-mon", "osd": "ceph-osd", "rgw": "radosgw"}
MON_TIMEOUT = 30.0
OSD_TIMEOUT = 60.0
RGW_TIMEOUT = 90.0
STOP_TIMEOUT = 15.0
MEMSTORE_BYTES = 3 << 30  # the OSD's "disk" is its RAM: sized for the tier's test data


class CephError(Exception):
    """The cluster could not be brought up; the message says which step and shows its log."""


def _conf(root: Path, fsid: str) -> str:
    return f"""[global]
fsid = {fsid}
mon host = [v2:{LOOPBACK}:{MON_PORT}]
mon initial members = a
public addr = {LOOPBACK}
cluster addr = {LOOPBACK}
public network = 127.0.0.0/8
cluster network = 127.0.0.0/8
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
run dir = {root}/run
admin socket = {root}/run/$cluster-$name.asok
log file = {root}/log/$cluster-$name.log
crash dir = {root}/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim allowed = false
mon warn on insecure global id reclaim = false
mon max pg per osd = 1000
mon osd full ratio = .99
mon osd nearfull ratio = .99
mon osd backfillfull ratio = .99
osd failsafe full ratio = .99
[mon]
mon data = {root}/mon/$cluster-$id
mon data avail warn = 1
mon data avail crit = 0
[osd]
osd data = {root}/osd/$cluster-$id
osd objectstore = memstore
memstore device bytes = {MEMSTORE_BYTES}
[client.rgw.a]
ms mon client mode = crc
rgw data = {root}/rgw
rgw frontends = beast endpoint={LOOPBACK}:{RGW_PORT}
"""


@dataclass
class Cluster:
    """One running cluster: where it lives and its daemons by role."""

    root: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{RGW_PORT}"

    @property
    def conf(self) -> Path:
        return self.root / "ceph.conf"

    def env(self) -> dict[str, str]:
        return {**os.environ, "CEPH_CONF": str(self.conf)}

    def run(self, *args: str, timeout: float = 30.0) -> str:
        """A ceph CLI (``ceph``, ``radosgw-admin``, ``monmaptool``...) against this cluster."""
        try:
            done = subprocess.run(
                args, env=self.env(), capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as exc:
            raise CephError(f"{' '.join(args)}: no answer within {timeout}s") from exc
        if done.returncode != 0:
            raise CephError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}")
        return done.stdout

    def start_daemon(self, role: str, *args: str) -> None:
        log = (self.root / "log" / f"{role}.out").open("ab")
        with log:
            proc = subprocess.Popen(
                [COMMANDS[role], "-f", *args],
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[role] = proc
        (self.root / "pids" / f"{role}.pid").write_text(str(proc.pid))

    def wait(self, what: str, ready: Callable[[], bool], timeout: float, role: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            proc = self.procs.get(role)
            if proc is not None and proc.poll() is not None:
                raise CephError(
                    f"{role} exited ({proc.returncode}) before {what}: {self.log(role)}"
                )
            if time.monotonic() > deadline:
                raise CephError(f"timed out after {timeout}s waiting for {what}: {self.log(role)}")
            time.sleep(0.3)

    def log(self, role: str) -> str:
        path = self.root / "log" / f"{role}.out"
        return path.read_text(errors="replace")[-2000:] if path.exists() else "(no log)"

    def stop_daemon(self, role: str) -> None:
        proc = self.procs.pop(role, None)
        if proc is not None:
            _stop(proc.pid, lambda: proc.poll() is not None)
            proc.wait()
        with contextlib.suppress(FileNotFoundError):
            (self.root / "pids" / f"{role}.pid").unlink()

    def stop(self) -> None:
        for role in DAEMONS:
            self.stop_daemon(role)

    # -- radosgw alone: the "archive is down" faults --

    def start_rgw(self) -> None:
        self.start_daemon("rgw", "-n", "client.rgw.a")
        self.wait("radosgw to answer HTTP", self.rgw_answers, RGW_TIMEOUT, "rgw")

    def rgw_answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint + "/", timeout=2) as answer:
                return bool(answer.status == 200)
        except (urllib.error.URLError, OSError):
            return False


def _stop(pid: int, gone: Callable[[], bool]) -> None:
    """SIGTERM, wait, SIGKILL: the daemon alone (its own session), by pid."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.1)
    if not gone():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _is_daemon(pid: int, root: Path) -> bool:
    """Is ``pid`` still one of our daemons (its command and its config dir), not a reused pid?"""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    names = {os.fsencode(c) for c in COMMANDS.values()}
    ours = os.fsencode(f"CEPH_CONF={root / 'ceph.conf'}") in environ
    return bool(cmdline) and os.path.basename(cmdline[0]) in names and ours


def _gone(pid: int, root: Path) -> Callable[[], bool]:
    return lambda: not _is_daemon(pid, root)


def reap_leftovers(tmp: Path) -> list[int]:
    """Stop the daemons of a cluster whose run was killed before its teardown; their pids."""
    reaped = []
    for root in sorted(tmp.glob(f"{PREFIX}*")):
        for pidfile in sorted((root / "pids").glob("*.pid")):
            with contextlib.suppress(ValueError, OSError):
                pid = int(pidfile.read_text())
                if _is_daemon(pid, root):
                    _stop(pid, _gone(pid, root))
                    reaped.append(pid)
        shutil.rmtree(root, ignore_errors=True)
    return reaped


def _osd_up(cluster: Cluster) -> bool:
    try:
        return "1 up" in cluster.run("ceph", "osd", "stat", timeout=10)
    except CephError:
        return False


def _mon_answers(cluster: Cluster) -> bool:
    try:
        cluster.run("ceph", "mon", "stat", timeout=10)
    except CephError:
        return False
    return True


def start(tmp: Path) -> Cluster:
    """Bring a cluster up from nothing (about 15 s here) and make the S3 user."""
    for command in (*COMMANDS.values(), "ceph", "monmaptool", "radosgw-admin"):
        if shutil.which(command) is None:
            raise CephError(
                f"{command} is not installed: apt-get install --no-install-recommends "
                "ceph-mon ceph-osd ceph-mgr radosgw ceph-common (scripts/setup.sh does)"
            )
    reap_leftovers(tmp)
    root = Path(os.path.realpath(tmp)) / f"{PREFIX}{uuid.uuid4().hex[:8]}"
    for sub in ("run", "log", "pids", "crash", "mon/ceph-a", "osd/ceph-0", "rgw"):
        (root / sub).mkdir(parents=True)
    cluster = Cluster(root)
    fsid = str(uuid.uuid4())
    cluster.conf.write_text(_conf(root, fsid))
    try:
        monmap = str(root / "monmap")
        cluster.run("monmaptool", "--create", "--fsid", fsid, "--addv", "a",
                    f"[v2:{LOOPBACK}:{MON_PORT}]", monmap)  # fmt: skip
        cluster.run("ceph-mon", "--mkfs", "-i", "a", "--monmap", monmap)
        cluster.start_daemon("mon", "-i", "a")
        cluster.wait("the monitor", lambda: _mon_answers(cluster), MON_TIMEOUT, "mon")
        osd_uuid = str(uuid.uuid4())
        osd_id = cluster.run("ceph", "osd", "new", osd_uuid).strip()
        cluster.run("ceph-osd", "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid, timeout=60)
        cluster.start_daemon("osd", "-i", osd_id)
        cluster.wait("the OSD to be up", lambda: _osd_up(cluster), OSD_TIMEOUT, "osd")
        cluster.start_rgw()
        cluster.run("radosgw-admin", "user", "create", "--uid=dlogd", "--display-name=dlogd",
                    f"--access-key={ACCESS_KEY}", f"--secret-key={SECRET_KEY}")  # fmt: skip
    except BaseException:
        cluster.stop()
        raise
    return cluster


@contextlib.contextmanager
def running(tmp: Path) -> Iterator[Cluster]:
    """A cluster for the duration of the block; every daemon stopped after, also on failure."""
    cluster = start(tmp)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
