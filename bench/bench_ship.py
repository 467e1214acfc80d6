"""Ship benchmark: dlogd's spool -> collector path against rsync, scp, socat and dd.

Place in the flow: measures the second hop (``dlogd-ship`` -> mutual TLS ->
``dlogd-receive`` -> durable store) on loopback, in one run, on the same
files, next to what an administrator would otherwise use:

- dlogd: files spooled with ``dlogd.spool.Spool.add``, a collector started
  with ``python -m dlogd.receive --listen 127.0.0.1:0``, and the timed part
  is one ``python -m dlogd.ship`` run (process start, hashing, TLS, the
  collector's writes and group commits, until the shipper exits).
- ``rsync -e ssh`` and ``scp`` through a throwaway sshd on a high loopback
  port (temporary host key and authorized key, started and stopped here).
- a raw TLS pipe: ``socat`` OPENSSL-LISTEN / OPENSSL with the same
  certificates; the 10,000 files go through it as one tar stream.
- ``dd conv=fsync`` of the 1 GiB file: the disk's limit.

rsync, scp and socat do not fsync what they write; dlogd acknowledges a file
only once it is durable. Each run is therefore also reported with a
``sync -f`` of the destination added ("+sync"), which is what it would cost
them to be as safe (and costs dlogd next to nothing).

A script, not a test: it asserts nothing about time. Run as root from the
repository root (about 3-4 minutes with the defaults):

    .venv/bin/python bench/bench_ship.py [--repeat 3] [--profile] [--markdown OUT.md]

Everything lives under /tmp/dlogd-bench/ship and is removed at the end.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import BENCH_ROOT, DURABLE_LOOP, PYTHON, preamble, publish, vm_hwm_kib

from dlogd import pki
from dlogd.spool import Spool

KEYWORD = "bench"
LOOPBACK = "127.0.0.1"
BIG_SIZE = 1 << 30
SMALL_COUNT = 10_000
SMALL_SIZE = 4096
GNU_TIME = "/usr/bin/time"
SOCAT_BLOCK = 256 * 1024  # as dlogd's frame size; socat's default is 8 KiB
SSH_OPTS = [
    "-F", "/dev/null", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
    "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
]  # fmt: skip


# -- measuring --------------------------------------------------------------------


@dataclass
class Run:
    """One transfer: how long until the tool returned, the sync after it, peak memory."""

    seconds: float
    sync_seconds: float
    rss_kib: dict[str, int] = field(default_factory=dict)


def measured(
    argv: Sequence[str], *, env: dict[str, str] | None = None, log: Path
) -> tuple[float, int]:
    """Wall-clock seconds and peak RSS in KiB (the process and its reaped children).

    Through GNU time, a small process: a child forked from this (large) Python
    process would report this process's RSS as its own peak.
    """
    rss_file = log.with_suffix(".rss")
    with log.open("ab") as out:
        t0 = time.perf_counter()
        done = subprocess.run([*peak_rss(rss_file), *argv], stdout=out, stderr=subprocess.STDOUT,
                              env=env)  # fmt: skip
        seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {done.returncode}; see {log}")
    return seconds, read_rss(rss_file)


def peak_rss(out: Path) -> list[str]:
    """Command prefix that writes the command's peak RSS (KiB) to ``out``."""
    if not os.path.exists(GNU_TIME):
        raise RuntimeError(f"{GNU_TIME} is missing: apt-get install time")
    return [GNU_TIME, "-f", "%M", "-o", str(out), "--"]


def read_rss(path: Path) -> int:
    # GNU time writes "Command exited with non-zero status N" first when it did.
    return int(path.read_text().split()[-1])


def sync_seconds(directory: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["sync", "-f", str(directory)], check=True)
    return time.perf_counter() - t0


def wait_file(path: Path, proc: subprocess.Popen[bytes], what: str, limit: float = 15.0) -> None:
    deadline = time.monotonic() + limit
    while not path.exists() or not path.stat().st_size:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.02)


# -- the data and the fleet ---------------------------------------------------------


@dataclass
class Bench:
    root: Path
    big: Path
    small: Path  # directory of SMALL_COUNT files
    dest: Path  # where every tool writes; emptied between runs
    pki: Path
    big_size: int = BIG_SIZE
    small_count: int = SMALL_COUNT
    ssh_port: int = 0
    ssh_key: Path | None = None
    logs: Path = field(init=False)

    def __post_init__(self) -> None:
        self.logs = self.root / "logs"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DLOGD_CACHE_DIR": str(self.root / "cache")}

    def clean_dest(self) -> None:
        shutil.rmtree(self.dest, ignore_errors=True)
        self.dest.mkdir()

    def cert(self, host: str) -> tuple[Path, Path]:
        return self.pki / f"{host}.crt", self.pki / f"{host}.key"


def prepare(root: Path, big_size: int, small_count: int) -> Bench:
    shutil.rmtree(root, ignore_errors=True)
    src = root / "src"
    bench = Bench(root, src / "big.bin", src / "small", root / "dest", root / "pki",
                  big_size, small_count)  # fmt: skip
    for d in (bench.small, bench.pki, bench.logs):
        d.mkdir(parents=True)
    bench.clean_dest()
    with bench.big.open("wb") as out:
        for _ in range(big_size // (1 << 20)):
            out.write(os.urandom(1 << 20))
    for i in range(small_count):
        (bench.small / f"app-{i:05d}.log").write_bytes(os.urandom(SMALL_SIZE))
    ca = pki.make_ca(bench.pki, "dlogd bench fleet")
    for host in ("logs1", "web1"):
        pki.make_host_cert(ca, host, bench.pki, ip_addresses=[LOOPBACK])
    os.sync()  # the inputs on disk before anything is timed
    return bench


def tls_block(bench: Bench, host: str) -> str:
    cert, key = bench.cert(host)
    return f'tls {{ certificate "{cert}"; key "{key}"; ca "{bench.pki / "ca.crt"}"; }}\n'


def server_config(bench: Bench) -> Path:
    path = bench.root / "server.conf"
    path.write_text(
        tls_block(bench, "logs1")
        + f'keyword "{KEYWORD}" {{ host "web1" dir "{bench.dest / "dlogd"}"; }}\n'
        + f'host "web1" {{ address "{LOOPBACK}"; }}\n'
    )
    return path


def client_config(bench: Bench, port: int) -> Path:
    path = bench.root / "client.conf"
    path.write_text(
        f'spool "{bench.root / "spool"}";\n'
        + tls_block(bench, "web1")
        + f'keyword "{KEYWORD}" {{ uid "0"; host "logs1"; }}\n'
        + f'host "logs1" {{ address "{LOOPBACK}"; port {port}; }}\n'
    )
    return path


def spool_files(root: Path, files: Sequence[Path]) -> None:
    """Hard-link the inputs into a fresh spool. Set-up, not measured: fsyncs skipped, one sync."""
    shutil.rmtree(root, ignore_errors=True)
    real_fsync = os.fsync
    os.fsync = lambda fd: None
    try:
        with Spool(str(root), create=True) as spool:
            for path in files:
                fd = os.open(path, os.O_RDONLY)
                try:
                    spool.add(KEYWORD, fd, path.name, ["logs1"])
                finally:
                    os.close(fd)
            spool.commit()
    finally:
        os.fsync = real_fsync
    os.sync()


# -- the contenders -----------------------------------------------------------------


Transfer = Callable[[Bench, str], Run]  # (bench, "big" | "small") -> Run


def inputs(bench: Bench, case: str) -> list[Path]:
    return [bench.big] if case == "big" else sorted(bench.small.iterdir())


@contextlib.contextmanager
def collector(bench: Bench, wrap: Sequence[str] = ()) -> Iterator[tuple[int, int]]:
    """A standalone dlogd-receive on an ephemeral loopback port: (port, pid of the service)."""
    out = bench.logs / "receive.out"
    out.unlink(missing_ok=True)
    argv = [*wrap, PYTHON, "-m", "dlogd.receive", "--config", str(server_config(bench)),
            "--listen", f"{LOOPBACK}:0"]  # fmt: skip
    with out.open("wb") as stdout, (bench.logs / "receive.err").open("ab") as stderr:
        proc = subprocess.Popen(argv, stdout=stdout, stderr=stderr, env=bench.env)
    try:
        wait_file(out, proc, "dlogd-receive")
        deadline = time.monotonic() + 15
        while "listening on" not in out.read_text():
            if time.monotonic() > deadline:
                raise RuntimeError("dlogd-receive never said where it listens")
            time.sleep(0.02)
        port = int(out.read_text().split("listening on")[1].split()[0].rsplit(":", 1)[1])
        yield port, _child_pid(proc.pid) if wrap else proc.pid
    finally:
        proc.send_signal(signal.SIGINT if wrap else signal.SIGTERM)
        proc.wait(30)


def _child_pid(parent: int) -> int:
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return int(children[0]) if children else parent


def ship_argv(bench: Bench, port: int) -> list[str]:
    return [PYTHON, "-m", "dlogd.ship", "--config", str(client_config(bench, port))]


def dlogd(bench: Bench, case: str) -> Run:
    files = inputs(bench, case)
    spool_files(bench.root / "spool", files)
    with collector(bench) as (port, pid):
        argv = ship_argv(bench, port)
        seconds, ship_rss = measured(argv, env=bench.env, log=bench.logs / "ship.log")
        receive_rss = vm_hwm_kib(pid)
    check_received(bench.dest / "dlogd", files)
    return Run(seconds, sync_seconds(bench.dest), {"shipper": ship_rss, "collector": receive_rss})


def check_received(directory: Path, files: Sequence[Path]) -> None:
    names = {p.name: p.stat().st_size for p in directory.iterdir() if p.is_file()}
    if len(names) != len(files) or sum(names.values()) != sum(p.stat().st_size for p in files):
        raise RuntimeError(f"{directory}: {len(names)} of {len(files)} files arrived")


def dd(bench: Bench, case: str) -> Run:
    argv = ["dd", f"if={bench.big}", f"of={bench.dest / 'big.bin'}", "bs=1M", "conv=fsync",
            "status=none"]  # fmt: skip
    seconds, rss = measured(argv, log=bench.logs / "dd.log")
    return Run(seconds, sync_seconds(bench.dest), {"dd": rss})


def durable_loop(every: int) -> Transfer:
    def run(bench: Bench, case: str) -> Run:
        argv = [PYTHON, "-c", DURABLE_LOOP, str(bench.small), str(bench.dest / "small"),
                str(every)]  # fmt: skip
        seconds, rss = measured(argv, log=bench.logs / "loop.log")
        return Run(seconds, sync_seconds(bench.dest), {f"python loop ({every})": rss})

    return run


def ssh_command(bench: Bench) -> str:
    return " ".join(["ssh", *SSH_OPTS, "-i", str(bench.ssh_key), "-p", str(bench.ssh_port)])


def rsync(bench: Bench, case: str) -> Run:
    source = str(bench.big) if case == "big" else f"{bench.small}/"
    target = f"root@{LOOPBACK}:{bench.dest / ('big.bin' if case == 'big' else 'small')}"
    argv = ["rsync", "-a", "-e", ssh_command(bench), source, target]
    seconds, rss = measured(argv, log=bench.logs / "rsync.log")
    return Run(seconds, sync_seconds(bench.dest), {"rsync + ssh (sender)": rss})


def scp(bench: Bench, case: str) -> Run:
    assert bench.ssh_key is not None
    source = str(bench.big if case == "big" else bench.small)
    argv = ["scp", "-q", "-r", *SSH_OPTS, "-i", str(bench.ssh_key), "-P", str(bench.ssh_port),
            source, f"root@{LOOPBACK}:{bench.dest}/"]  # fmt: skip
    seconds, rss = measured(argv, log=bench.logs / "scp.log")
    return Run(seconds, sync_seconds(bench.dest), {"scp + ssh (sender)": rss})


def socat(bench: Bench, case: str) -> Run:
    """TLS with the dlogd certificates, no protocol: the cipher and copy cost alone."""
    port = free_port()
    cert, key = bench.cert("logs1")
    ca = bench.pki / "ca.crt"
    listen = (f"OPENSSL-LISTEN:{port},bind={LOOPBACK},reuseaddr,cert={cert},key={key},"
              f"cafile={ca},verify=1")  # fmt: skip
    ccert, ckey = bench.cert("web1")
    connect = (
        f"OPENSSL:{LOOPBACK}:{port},cert={ccert},key={ckey},cafile={ca},verify=1,commonname=logs1"
    )
    block = f"-b{SOCAT_BLOCK}"
    if case == "big":
        receive = ["socat", "-u", block, listen, f"CREATE:{bench.dest / 'big.bin'}"]
        send = ["socat", "-u", block, f"OPEN:{bench.big},rdonly", connect]
    else:
        (bench.dest / "small").mkdir()
        receive = ["sh", "-c", f'socat -u {block} "$1" STDOUT | tar -C "$2" -xf -', "sh",
                   listen, str(bench.dest / "small")]  # fmt: skip
        send = ["sh", "-c", f'tar -C "$1" -cf - . | socat -u {block} STDIN "$2"', "sh",
                str(bench.small), connect]  # fmt: skip
    log = bench.logs / "socat.log"
    receiver_rss = bench.logs / "socat-receiver.rss"
    with log.open("ab") as out:
        receiver = subprocess.Popen([*peak_rss(receiver_rss), *receive], stdout=out,
                                    stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_listening(port)
        t0 = time.perf_counter()
        _, send_rss = measured(send, log=log)
        # Done when the receiver has written the last byte and exited, not when the sender has.
        receiver.wait(600)
        seconds = time.perf_counter() - t0
    finally:
        if receiver.returncode is None:
            receiver.kill()
            receiver.wait()
    if receiver.returncode != 0:
        raise RuntimeError(f"socat receiver exited {receiver.returncode}; see {log}")
    rss = {"socat sender": send_rss, "socat receiver": read_rss(receiver_rss)}
    return Run(seconds, sync_seconds(bench.dest), rss)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, limit: float = 10.0) -> None:
    hexport = f":{port:04X} "
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1].endswith(hexport.strip()) and fields[3] == "0A":  # LISTEN
                return
        time.sleep(0.01)
    raise RuntimeError(f"nothing listens on {LOOPBACK}:{port}")


# -- a throwaway sshd ---------------------------------------------------------------


@contextlib.contextmanager
def throwaway_sshd(bench: Bench) -> Iterator[dict[str, int]]:
    """sshd on a high loopback port with its own host key and authorized key.

    Yields a dict that, after the block, holds the peak RSS of everything the
    sshd ran for its clients (sessions, rsync and sftp servers), from GNU time.
    """
    d = bench.root / "sshd"
    d.mkdir()
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)],
                       check=True)  # fmt: skip
    shutil.copy(d / "client_key.pub", d / "authorized_keys")
    bench.ssh_key, bench.ssh_port = d / "client_key", free_port()
    (d / "sshd_config").write_text(
        f"ListenAddress {LOOPBACK}\nPort {bench.ssh_port}\nHostKey {d / 'host_key'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile {d / 'sshd.pid'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nUsePAM no\n"
        "StrictModes no\nSubsystem sftp internal-sftp\n"
    )
    made_privsep = not os.path.isdir("/run/sshd")
    if made_privsep:
        os.mkdir("/run/sshd", 0o755)  # OpenSSH's privilege-separation directory, empty
    result: dict[str, int] = {}
    log = bench.logs / "sshd.log"
    rss_file = d / "sshd.rss"
    argv = [*peak_rss(rss_file), "/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")]
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_listening(bench.ssh_port)
        yield result
    finally:
        # Stop sshd itself; GNU time then reports it and everything it reaped.
        os.kill(_child_pid(proc.pid), signal.SIGTERM)
        proc.wait(10)
        result["sshd and its sessions (receiver, all runs)"] = read_rss(rss_file)
        if made_privsep:
            os.rmdir("/run/sshd")


# -- profiling ----------------------------------------------------------------------


def profile(bench: Bench, case: str) -> dict[str, list[tuple[float, str]]]:
    """py-spy samples of shipper and collector for one dlogd run; top frames by share."""
    pyspy = Path(PYTHON).parent / "py-spy"
    if not pyspy.exists():
        raise RuntimeError("py-spy is not installed in the venv: .venv/bin/pip install py-spy")
    files = inputs(bench, case)
    spool_files(bench.root / "spool", files)
    bench.clean_dest()
    raw = {side: bench.root / f"profile-{case}-{side}.txt" for side in ("shipper", "collector")}
    spy = [str(pyspy), "record", "--format", "raw", "--rate", "250", "--threads", "--nonblocking"]
    with collector(bench, wrap=[*spy, "--output", str(raw["collector"]), "--"]) as (port, _):
        measured([*spy, "--output", str(raw["shipper"]), "--", *ship_argv(bench, port)],
                 env=bench.env, log=bench.logs / "ship-profile.log")  # fmt: skip
    return {side: top_frames(path) for side, path in raw.items()}


def top_frames(path: Path, count: int = 12) -> list[tuple[float, str]]:
    """Share of samples by leaf frame (where the CPU was), from py-spy's collapsed stacks."""
    leaves: collections.Counter[str] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if frames:
            leaves[_frame_name(frames[-1])] += int(samples)
    total = sum(leaves.values()) or 1
    return [(100 * n / total, name) for name, n in leaves.most_common(count)]


def _frame_name(frame: str) -> str:
    """``func (path/to/file.py:12)`` -> ``func (file.py)``."""
    function, _, where = frame.partition(" (")
    return f"{function} ({where.split(':')[0].rsplit('/', 1)[-1]})"


# -- report -------------------------------------------------------------------------

CONTENDERS: dict[str, Transfer] = {"dlogd": dlogd, "rsync -e ssh": rsync, "scp": scp,
                                   "socat TLS pipe": socat, "dd conv=fsync": dd,
                                   "loop: fsync each": durable_loop(1),
                                   "loop: syncfs per 500": durable_loop(500)}  # fmt: skip
# Contenders that measure one case only: the disk's limit for it.
ONLY = {"dd conv=fsync": "big", "loop: fsync each": "small", "loop: syncfs per 500": "small"}
CASES = {"big": "the big random file (1 GiB unless --big-mib)",
         "small": "many 4 KiB files (10,000 unless --small-count)"}  # fmt: skip


def run_all(bench: Bench, repeat: int) -> tuple[dict[tuple[str, str], list[Run]], dict[str, int]]:
    runs: dict[tuple[str, str], list[Run]] = collections.defaultdict(list)
    with throwaway_sshd(bench) as sshd_rss:
        for i in range(repeat):
            for case in CASES:
                for name, transfer in CONTENDERS.items():
                    if ONLY.get(name, case) != case:
                        continue
                    bench.clean_dest()
                    run = transfer(bench, case)
                    runs[(name, case)].append(run)
                    print(f"[{i + 1}/{repeat}] {case:5} {name:15} {run.seconds:7.2f}s "
                          f"+sync {run.sync_seconds:5.2f}s", file=sys.stderr, flush=True)  # fmt: skip
    return runs, sshd_rss


def rates(bench: Bench, case: str, seconds: float) -> str:
    if case == "big":
        return f"{bench.big_size / seconds / 1e6:,.0f} MB/s"
    files = bench.small_count
    return f"{files / seconds:,.0f} files/s ({files * SMALL_SIZE / seconds / 1e6:.0f} MB/s)"


def report(bench: Bench, runs: dict[tuple[str, str], list[Run]], sshd_rss: dict[str, int],
           profiles: dict[str, dict[str, list[tuple[float, str]]]], repeat: int) -> str:  # fmt: skip
    lines = preamble("Ship (issue 5)", "bench_ship.py",
                     f"medians of {repeat} runs; the time is until the tool returned")  # fmt: skip
    for case, title in CASES.items():
        median = {name: statistics.median(r.seconds for r in rs)
                  for (name, c), rs in runs.items() if c == case}  # fmt: skip
        if not median:
            continue
        synced = {name: statistics.median(r.seconds + r.sync_seconds for r in rs)
                  for (name, c), rs in runs.items() if c == case}  # fmt: skip
        lines += [f"### {title}", "",
                  "| tool | seconds | rate | + `sync -f` after | rate with sync | dlogd ÷ tool (rate) | dlogd ÷ tool, both synced |",
                  "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for name in median:
            lines.append(
                f"| {name} | {median[name]:.2f} | {rates(bench, case, median[name])} "
                f"| {synced[name]:.2f} | {rates(bench, case, synced[name])} "
                f"| {median[name] / median['dlogd']:.2f} | {synced[name] / synced['dlogd']:.2f} |"
            )
        lines.append("")
    lines += ["### Peak memory (max RSS, largest of the runs)", "", "| process | big file | small files |",
              "|---|---:|---:|"]  # fmt: skip
    names = sorted({k for rs in runs.values() for r in rs for k in r.rss_kib})
    for proc in names:
        cells = []
        for case in CASES:
            values = [r.rss_kib[proc] for (_, c), rs in runs.items() if c == case for r in rs
                      if proc in r.rss_kib]  # fmt: skip
            cells.append(f"{max(values) / 1024:.1f} MiB" if values else "-")
        lines.append(f"| {proc} | {' | '.join(cells)} |")
    for proc, kib in sshd_rss.items():
        lines.append(f"| {proc} | {kib / 1024:.1f} MiB | (same) |")
    for case, sides in profiles.items():
        lines += [
            "",
            f"### Profile: {CASES[case]} (py-spy, share of CPU samples by leaf frame)",
            "",
        ]
        for side, frames in sides.items():
            lines += [f"{side}:", "", "| % | frame |", "|---:|---|"]
            lines += [f"| {pct:.1f} | `{name}` |" for pct, name in frames]
            lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of every transfer")
    parser.add_argument(
        "--profile", action="store_true", help="also profile one dlogd run per case"
    )
    parser.add_argument("--only-profile", action="store_true", help="profile, skip the comparison")
    parser.add_argument("--big-mib", type=int, default=BIG_SIZE >> 20, help="size of the big file")
    parser.add_argument(
        "--small-count", type=int, default=SMALL_COUNT, help="number of 4 KiB files"
    )
    parser.add_argument("--markdown", help="also write the report to this file")
    parser.add_argument("--keep", action="store_true", help="keep /tmp/dlogd-bench/ship")
    args = parser.parse_args(argv)
    bench = prepare(BENCH_ROOT / "ship", args.big_mib << 20, args.small_count)
    try:
        runs, sshd_rss = ({}, {}) if args.only_profile else run_all(bench, args.repeat)
        profiles = {}
        if args.profile or args.only_profile:
            profiles = {case: profile(bench, case) for case in CASES}
        text = report(bench, runs, sshd_rss, profiles, args.repeat)
    finally:
        if not args.keep:
            shutil.rmtree(bench.root, ignore_errors=True)
    return publish(text, args.markdown)


if __name__ == "__main__":
    sys.exit(main())
