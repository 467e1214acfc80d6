"""Shared harness for the ship -> receive process and fault tiers.

Everything here runs the real thing: a throwaway fleet PKI (one per test
session), config files in the real language, the collector as a process
(standalone ``--listen 127.0.0.1:0``, or exactly as systemd starts it with
``systemd-socket-activate --accept``), files spooled with the real
:class:`dlogd.spool.Spool`, and ``python -m dlogd.ship`` as a process. With no
journal socket on the test machine, :mod:`dlogd.journal` writes one line per
record on stderr; :func:`parse_records` reads those lines back.

The tests import the fixtures with ``from tests.shipharness import pki_set``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dlogd import config, journal, pki, schema
from dlogd.config import (
    ClientConfig,
    ClientKeyword,
    Host,
    Limits,
    Retry,
    ServerConfig,
    ServerKeyword,
    TLSFiles,
)
from dlogd.names import entry_basename
from dlogd.spool import Spool
from tests.tlsfixtures import COLLECTOR, LOOPBACK, SENDER, Fleet, make_fleet

REPO = Path(__file__).resolve().parent.parent
KEYWORD = "audit"
COLLECTOR2 = "logs2"
START_TIMEOUT = 10.0
SHIP_TIMEOUT = 120.0
EX_TEMPFAIL = 75


# --- PKI ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """The fleet, a second collector, and an impostor fleet with the same host names."""

    fleet: Fleet
    collector2: pki.CertPaths
    impostor: Fleet

    def tls(self, host: pki.CertPaths) -> TLSFiles:
        return self.fleet.tls(host)

    def impostor_tls(self, host: pki.CertPaths) -> TLSFiles:
        """Certificate and key from the impostor CA, trusting the real fleet CA."""
        return pki.tls_files(self.fleet.ca, host)


@pytest.fixture(scope="session")
def pki_set(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("shippki")
    fleet = make_fleet(base / "fleet")
    return Pki(
        fleet=fleet,
        collector2=pki.make_host_cert(fleet.ca, COLLECTOR2, base / "fleet"),
        impostor=make_fleet(base / "impostor", "impostor fleet"),
    )


# --- configs -------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One collector as a client config names it."""

    name: str
    port: int
    address: str = LOOPBACK
    fingerprint: str | None = None


def write_client_config(
    path: Path,
    *,
    spool: Path,
    tls: TLSFiles,
    targets: Sequence[Target],
    keywords: Mapping[str, Sequence[str]] | None = None,
    retry: tuple[int, int] = (1, 10),
    timeout: int = 5,
) -> Path:
    """A client config: keyword -> hosts (default: "audit" to every target), uid 0 may submit."""
    keywords = keywords or {KEYWORD: [t.name for t in targets]}
    written = ClientConfig(
        keywords={
            name: ClientKeyword(name, frozenset({0}), frozenset(), tuple(hosts))
            for name, hosts in keywords.items()
        },
        hosts={t.name: Host(t.name, t.address, t.port, t.fingerprint) for t in targets},
        spool=str(spool),
        tls=tls,
        limits=Limits(timeout=timeout),
        retry=Retry(retry[0], retry[1]),
    )
    path.write_text(config.to_text(written))
    return path


def write_server_config(
    path: Path,
    *,
    tls: TLSFiles,
    dirs: Mapping[str, Mapping[str, Path]],
    senders: Mapping[str, str] | None = None,
    max_file_size: str = "2G",
    timeout: int = 5,
) -> Path:
    """A collector config: keyword -> {sending host: directory}; host -> address."""
    senders = senders if senders is not None else {SENDER: LOOPBACK}
    written = ServerConfig(
        keywords={
            keyword: ServerKeyword(keyword, {h: str(d) for h, d in by_host.items()})
            for keyword, by_host in dirs.items()
        },
        hosts={name: Host(name, address) for name, address in senders.items()},
        tls=tls,
        # The size as a config writes it ("2G"), read by the config's own parser.
        limits=Limits(max_file_size=schema.size(max_file_size), timeout=timeout),
    )
    path.write_text(config.to_text(written))
    return path


def env(cache: Path, **extra: str) -> dict[str, str]:
    """The environment of every dlogd process we start: our package, our config cache."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    out["PYTHONPATH"] = str(REPO)
    out["DLOGD_CACHE_DIR"] = str(cache)
    out.update(extra)
    return out


# --- journal records (the stderr fallback) ---------------------------------------------


@dataclass(frozen=True)
class Record:
    """One ``dlogd: <message> key=value ...`` line."""

    message: str
    fields: Mapping[str, str]

    def get(self, name: str) -> str:
        return self.fields.get(name, "")


def parse_record(line: str) -> Record | None:
    parsed = journal.parse_stderr(line)
    return None if parsed is None else Record(*parsed)


def parse_records(text: str) -> list[Record]:
    return [r for r in map(parse_record, text.splitlines()) if r is not None]


def peer_refusals(records: Iterable[Record]) -> list[Record]:
    """PEER_REFUSED records."""
    return [r for r in records if r.get("message_id") == journal.PEER_REFUSED]


# --- the collector -----------------------------------------------------------------------


@dataclass
class Collector:
    """A running collector: its process, port, and stderr (its journal)."""

    proc: subprocess.Popen[bytes]
    port: int
    stderr_path: Path
    activated: bool
    stdout_lines: list[str] = field(default_factory=list)

    def records(self) -> list[Record]:
        return parse_records(self.stderr_path.read_text(errors="replace"))

    def vm_hwm_kib(self) -> int:
        """Peak resident memory of the collector process so far (standalone mode)."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
        assert match, status
        return int(match.group(1))

    def kill(self) -> None:
        """kill -9, the whole process group (with socket activation: every instance too)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def start_collector(
    config: Path,
    workdir: Path,
    *,
    port: int = 0,
    tag: str = "",
    extra_env: Mapping[str, str] | None = None,
) -> Collector:
    """``python -m dlogd.receive --listen 127.0.0.1:PORT``; waits for its port line."""
    stderr_path = workdir / f"collector{tag}-{time.monotonic_ns()}.stderr"
    cmd = [sys.executable, "-m", "dlogd.receive", "--config", str(config)]
    with stderr_path.open("wb") as err:
        proc = subprocess.Popen(
            [*cmd, "--listen", f"{LOOPBACK}:{port}"],
            stdout=subprocess.PIPE,
            stderr=err,
            env=env(workdir / "cache", **(extra_env or {})),
            cwd=REPO,
            start_new_session=True,
        )
    assert proc.stdout is not None
    line = _read_line_within(proc, START_TIMEOUT)
    match = re.search(r"listening on [^ ]+:(\d+)", line)
    if not match:
        proc.kill()
        raise AssertionError(
            f"collector did not start: {line!r}; stderr: {stderr_path.read_text()}"
        )
    return Collector(proc, int(match.group(1)), stderr_path, activated=False, stdout_lines=[line])


def _read_line_within(proc: subprocess.Popen[bytes], timeout: float) -> str:
    import select

    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        proc.kill()
        raise AssertionError(f"no output from {proc.args!r} within {timeout}s")
    return proc.stdout.readline().decode(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def start_activated_collector(config: Path, workdir: Path, *, tag: str = "") -> Collector:
    """Exactly as dlogd-receive.socket (Accept=yes) runs it: one instance per connection."""
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.fail("systemd-socket-activate is not installed (Debian package systemd)")
    port = free_port()
    stderr_path = workdir / f"activated{tag}-{time.monotonic_ns()}.stderr"
    cmd = [
        activate,
        "-l",
        f"{LOOPBACK}:{port}",
        "--accept",
        # The activated child gets a fresh environment: pass the cache on.
        "-E",
        "DLOGD_CACHE_DIR",
        sys.executable,
        "-m",
        "dlogd.receive",
        "--config",
        str(config),
    ]
    with stderr_path.open("wb") as err:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env(workdir / "cache"),
            cwd=REPO,
            start_new_session=True,
        )
    deadline = time.monotonic() + START_TIMEOUT
    while "Listening on" not in stderr_path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"socket activation did not start: {stderr_path.read_text()}")
        time.sleep(0.02)
    return Collector(proc, port, stderr_path, activated=True)


# --- the client side ---------------------------------------------------------------------


def make_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def sparse_file(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


def random_file(path: Path, size: int) -> Path:
    """``size`` random bytes, written in chunks (constant memory)."""
    with path.open("wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 4 << 20))
            f.write(chunk)
            left -= len(chunk)
    return path


def spool_files(
    spool: Path,
    paths: Iterable[Path],
    hosts: Sequence[str],
    *,
    keyword: str = KEYWORD,
    now: float | None = None,
) -> list[str]:
    """Spool each file as the submit service would (hard link + markers); entry names.

    ``now`` fixes the entry's timestamp prefix: the same file added twice with the
    same ``now`` (after the first was shipped) is the same entry, as after a lost ack.
    """
    names: list[str] = []
    with Spool(str(spool), create=True) as sp:
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                added = sp.add(keyword, fd, entry_basename(os.fsencode(path.name)), hosts, now=now)
            finally:
                os.close(fd)
            names.append(added.name)
        sp.commit()
        sp.announce()
    return names


def spool_entries(spool: Path, keyword: str = KEYWORD) -> list[str]:
    kdir = spool / keyword
    if not kdir.exists():
        return []
    return sorted(p.name for p in kdir.iterdir() if not p.name.startswith("."))


def owed_hosts(spool: Path, entry: str, keyword: str = KEYWORD) -> set[str]:
    owed = spool / keyword / ".owed" / entry
    return {p.name for p in owed.iterdir()} if owed.exists() else set()


def wait_until_unheld(spool: Path, host: str, timeout: float = 30.0) -> None:
    """Wait for every hold on ``host`` to end: a file refused for now (TEMPORARY_FAILURE)
    is held with a backoff of its own (issue 14), as a collector is after a failure."""
    with Spool(str(spool)) as sp:
        ends = [sp.held_until(e, host)[0] for e in sp.pending() if host in e.held]
    wait_for(lambda: time.time() > max(ends, default=0.0), timeout, f"the holds on {host} to end")


def retry_state(spool: Path, host: str) -> dict[str, float] | None:
    import json

    path = spool / ".retry" / f"{host}.json"
    if not path.exists():
        return None
    data: dict[str, float] = json.loads(path.read_text())
    return data


# GNU time (Debian package "time"), for a child's own peak RSS.
GNU_TIME = "/usr/bin/time"


class JournalledRun:
    """A finished dlogd process whose journal records went to its stderr."""

    stderr: str

    @property
    def records(self) -> list[Record]:
        return parse_records(self.stderr)

    def of(self, message_id: str) -> list[Record]:
        return [r for r in self.records if r.get("message_id") == message_id]


@dataclass(frozen=True)
class ShipRun(JournalledRun):
    """One ``python -m dlogd.ship`` run."""

    returncode: int
    stderr: str
    maxrss_kib: int
    seconds: float


def ship(config: Path, cache: Path, *, timeout: float = SHIP_TIMEOUT) -> ShipRun:
    """Run the shipper to completion; its own peak RSS, measured by GNU time.

    Not this process's wait4(): a child started by vfork (as subprocess does)
    inherits the parent's high-water RSS at exec, so after a few hundred tests
    the shipper would "peak" at pytest's size. time(1) is small and forks the
    shipper itself, so %M is the shipper's alone.
    """
    started = time.monotonic()
    fd, name = tempfile.mkstemp(prefix="dlogd-ship-maxrss-")
    os.close(fd)
    peak_file = Path(name)
    measured = [GNU_TIME, "-q", "-f", "%M", "-o", str(peak_file)]
    shipper = [sys.executable, "-m", "dlogd.ship", "--config", str(config)]
    proc = subprocess.Popen(
        measured + shipper,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env(cache),
        cwd=REPO,
        start_new_session=True,  # a timeout kills time(1) and the shipper together
    )
    assert proc.stderr is not None
    try:
        err = _read_all_within(proc, timeout)
        proc.wait()
        maxrss_kib = int(peak_file.read_text().split()[-1])
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        peak_file.unlink()
    return ShipRun(proc.returncode, err, maxrss_kib, time.monotonic() - started)


def start_ship(config: Path, cache: Path) -> subprocess.Popen[bytes]:
    """The shipper started in the background (for kill -9 tests); stderr to a pipe."""
    return subprocess.Popen(
        [sys.executable, "-m", "dlogd.ship", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env(cache),
        cwd=REPO,
    )


def _read_all_within(proc: subprocess.Popen[bytes], timeout: float) -> str:
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    import select

    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"shipper still running after {timeout}s")
        ready, _, _ = select.select([proc.stderr], [], [], left)
        if ready:
            chunk = os.read(proc.stderr.fileno(), 65536)
            if not chunk:
                return b"".join(chunks).decode(errors="replace")
            chunks.append(chunk)


# --- small real disks ----------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(mountpoint: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` (``"20M"``) at ``mountpoint``: a disk that fills up (root only)."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mountpoint)],
            check=True,
            capture_output=True,
        )
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        pytest.fail(f"this test mounts a tmpfs (run as root): {exc}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def resize(mountpoint: Path, size: str) -> None:
    """Grow (or shrink) a :func:`tmpfs` in place: space freed, or taken, under a service."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mountpoint)], check=True)


# --- the collector's side of the disk -----------------------------------------------------


def visible_files(directory: Path) -> list[str]:
    """What a reader of the collector directory sees (the partial dir excluded)."""
    if not directory.exists():
        return []
    return sorted(p.name for p in directory.iterdir() if p.name != ".dlogd-partial")


def partials(directory: Path) -> list[str]:
    partial = directory / ".dlogd-partial"
    return sorted(p.name for p in partial.iterdir()) if partial.exists() else []


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(4 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def wait_for(predicate: object, timeout: float, what: str) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


# --- one test's world ----------------------------------------------------------------------


@dataclass
class Site:
    """A client spool and its collectors under one tmp dir; the collectors die with the test."""

    root: Path
    pki: Pki
    running: list[Collector] = field(default_factory=list)

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def store_dir(self, collector: str = COLLECTOR) -> Path:
        return self.root / "remote" / collector / SENDER / KEYWORD

    def server_config(
        self,
        collector: str = COLLECTOR,
        *,
        tls: TLSFiles | None = None,
        senders: Mapping[str, str] | None = None,
        max_file_size: str = "2G",
        directory: Path | None = None,
        timeout: int = 5,
    ) -> Path:
        certs = self.pki.collector2 if collector == COLLECTOR2 else self.pki.fleet.collector
        return write_server_config(
            self.root / f"server-{collector}.conf",
            tls=tls or self.pki.tls(certs),
            dirs={KEYWORD: {SENDER: directory or self.store_dir(collector)}},
            senders=senders,
            max_file_size=max_file_size,
            timeout=timeout,
        )

    def start(
        self,
        collector: str = COLLECTOR,
        *,
        activated: bool = False,
        port: int = 0,
        tls: TLSFiles | None = None,
        senders: Mapping[str, str] | None = None,
        max_file_size: str = "2G",
        directory: Path | None = None,
        timeout: int = 5,
    ) -> Collector:
        """Write this collector's config and start it (standalone, or socket-activated)."""
        path = self.server_config(
            collector,
            tls=tls,
            senders=senders,
            max_file_size=max_file_size,
            directory=directory,
            timeout=timeout,
        )
        if activated:
            running = start_activated_collector(path, self.root, tag=collector)
        else:
            running = start_collector(path, self.root, port=port, tag=collector)
        self.running.append(running)
        return running

    def client_config(
        self,
        targets: Sequence[Target],
        *,
        tls: TLSFiles | None = None,
        keywords: Mapping[str, Sequence[str]] | None = None,
        retry: tuple[int, int] = (1, 10),
        timeout: int = 5,
    ) -> Path:
        return write_client_config(
            self.root / "client.conf",
            spool=self.spool,
            tls=tls or self.pki.tls(self.pki.fleet.sender),
            targets=targets,
            keywords=keywords,
            retry=retry,
            timeout=timeout,
        )

    def add(
        self,
        *paths: Path,
        hosts: Sequence[str] = (COLLECTOR,),
        keyword: str = KEYWORD,
        now: float | None = None,
    ) -> list[str]:
        return spool_files(self.spool, paths, hosts, keyword=keyword, now=now)

    def ship(self, config: Path | None = None) -> ShipRun:
        return ship(config or self.root / "client.conf", self.cache)

    def clear_retry(self) -> None:
        shutil.rmtree(self.spool / ".retry", ignore_errors=True)


@pytest.fixture
def site(tmp_path: Path, pki_set: Pki) -> Iterator[Site]:
    world = Site(tmp_path, pki_set)
    try:
        yield world
    finally:
        for collector in world.running:
            collector.kill()
