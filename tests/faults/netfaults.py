"""A two-namespace network for network-fault tests: a link to cut, rate-limit and flap.

Place in the tests: the network-fault and race tests run the collector
(socket-activated, as dlogd-receive.socket does) in one network namespace
and ``dlogd-ship`` in another, joined by a veth pair with 192.0.2.0/24
(documentation) addresses, with ``ip netns exec``. No container is booted:
the nspawn lab (netns ``lab-*``) belongs to another test tier, and these
namespaces are named ``dlf-<pid>-<side>`` so that neither touches the other.

This kernel has no netem and no tc classifiers or actions, so the faults
are what ``ip`` and ``htb`` can do: the link set down and up (a cut, or
random flaps), and an ``htb`` rate limit whose leaf queue is a short
``pfifo`` of one or two packets (TCP's small-queue logic keeps about two
packets queued, so a shorter queue drops at its tail, as a congested link
does). Namespaces are removed in a finalizer and, at the start of
each run, any ``dlf-*`` left by a run that was killed (its pid is gone).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from tests.shipharness import REPO, START_TIMEOUT, Collector, ShipRun, env

COLLECTOR_IP = "192.0.2.1"
SHIPPER_IP = "192.0.2.2"
PORT = 7878
PREFIX = "dlf-"
_OURS = re.compile(r"dlf-(\d+)-")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=30)


def _tc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tc", *args], check=True, capture_output=True, text=True, timeout=30)


def namespaces() -> list[str]:
    out = _ip("netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def remove_leftovers() -> list[str]:
    """Delete ``dlf-<pid>-*`` namespaces whose creating process no longer exists."""
    removed = []
    for name in namespaces():
        match = _OURS.match(name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            _ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


@dataclass
class Link:
    """Two namespaces and the veth between them; ``tag`` keeps several apart."""

    tag: str
    collector_ns: str = ""
    shipper_ns: str = ""
    dev: str = ""  # the shipper's end: where data to the collector leaves
    peer_dev: str = ""
    cuts: int = 0
    flaps: int = 0
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        pid = os.getpid()
        self.collector_ns = f"{PREFIX}{pid}-{self.tag}c"
        self.shipper_ns = f"{PREFIX}{pid}-{self.tag}s"
        # Interface names are at most 15 bytes.
        self.dev = f"dlf{pid % 100000}{self.tag}s"[:15]
        self.peer_dev = f"dlf{pid % 100000}{self.tag}c"[:15]

    def create(self) -> None:
        _ip("netns", "add", self.collector_ns)
        _ip("netns", "add", self.shipper_ns)
        _ip(
            "link", "add", self.dev, "netns", self.shipper_ns,
            "type", "veth", "peer", "name", self.peer_dev, "netns", self.collector_ns,
        )  # fmt: skip
        for ns, dev, address in (
            (self.collector_ns, self.peer_dev, COLLECTOR_IP),
            (self.shipper_ns, self.dev, SHIPPER_IP),
        ):
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def destroy(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        for ns in (self.shipper_ns, self.collector_ns):
            _ip("netns", "del", ns, check=False)

    # --- faults ---

    def set_up(self, up: bool) -> None:
        """Both ends down (or up): nothing passes either way, as with a pulled cable."""
        state = "up" if up else "down"
        _ip("-n", self.shipper_ns, "link", "set", self.dev, state)
        _ip("-n", self.collector_ns, "link", "set", self.peer_dev, state)

    def cut(self, seconds: float) -> None:
        self.cuts += 1
        self.set_up(False)
        try:
            time.sleep(seconds)
        finally:
            self.set_up(True)

    def flap(self, seconds: float) -> None:
        self.flaps += 1
        self.cut(seconds)
        self.cuts -= 1

    def rate_limit(self, rate: str, queue_packets: int | None = None) -> None:
        """``htb`` at ``rate`` on both ends; a short pfifo leaf drops what overflows it."""
        for ns, dev in ((self.shipper_ns, self.dev), (self.collector_ns, self.peer_dev)):
            _tc("-n", ns, "qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb",
                "default", "10", "r2q", "1000")  # fmt: skip
            _tc("-n", ns, "class", "replace", "dev", dev, "parent", "1:", "classid", "1:10",
                "htb", "rate", rate, "ceil", rate)  # fmt: skip
            if queue_packets is not None:
                _tc("-n", ns, "qdisc", "replace", "dev", dev, "parent", "1:10", "handle", "10:",
                    "pfifo", "limit", str(queue_packets))  # fmt: skip

    def dropped(self) -> int:
        """Packets the qdiscs on both ends dropped so far (``tc -s``)."""
        total = 0
        for ns, dev in ((self.shipper_ns, self.dev), (self.collector_ns, self.peer_dev)):
            out = subprocess.run(
                ["tc", "-s", "-n", ns, "qdisc", "show", "dev", dev],
                check=True, capture_output=True, text=True, timeout=30,
            ).stdout  # fmt: skip
            # Leaf drops only (the htb root sums them again): lines after "qdisc pfifo".
            for block in out.split("qdisc ")[1:]:
                if block.startswith("pfifo"):
                    total += sum(int(n) for n in re.findall(r"dropped (\d+)", block))
        return total

    # --- processes inside ---

    def start_collector(self, config: Path, workdir: Path, *, tag: str = "") -> Collector:
        """dlogd-receive socket-activated (Accept=yes) on 192.0.2.1:7878 in its namespace."""
        stderr_path = workdir / f"netcollector{tag}-{time.monotonic_ns()}.stderr"
        cmd = [
            "ip", "netns", "exec", self.collector_ns,
            "systemd-socket-activate", "-l", f"{COLLECTOR_IP}:{PORT}", "--accept",
            "-E", "DLOGD_CACHE_DIR", sys.executable, "-m", "dlogd.receive",
            "--config", str(config),
        ]  # fmt: skip
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
        self.processes.append(proc)
        deadline = time.monotonic() + START_TIMEOUT
        while "Listening on" not in stderr_path.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"collector did not start: {stderr_path.read_text()}")
            time.sleep(0.02)
        return Collector(proc, PORT, stderr_path, activated=True)

    def start_ship(self, config: Path, cache: Path) -> subprocess.Popen[bytes]:
        """``dlogd-ship`` in the shipper's namespace, in the background."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.shipper_ns,
             sys.executable, "-m", "dlogd.ship", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env(cache),
            cwd=REPO,
            start_new_session=True,
        )  # fmt: skip
        self.processes.append(proc)
        return proc


def finish_ship(proc: subprocess.Popen[bytes], timeout: float) -> ShipRun:
    """Wait for a shipper, bounded: a hang fails the test instead of waiting for ever."""
    started = time.monotonic()
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)
        raise AssertionError(f"dlogd-ship hung: still running after {timeout:g}s") from None
    return ShipRun(proc.returncode, err.decode(errors="replace"), 0, time.monotonic() - started)


@contextmanager
def network(tags: Sequence[str] = ("a",)) -> Iterator[list[Link]]:
    """Links for the test, always torn down (and killed runs' leftovers removed first)."""
    if os.geteuid() != 0:
        raise AssertionError("network-fault tests make network namespaces: run them as root")
    remove_leftovers()
    links = [Link(tag) for tag in tags]
    try:
        for link in links:
            link.create()
        yield links
    finally:
        for link in links:
            link.destroy()
