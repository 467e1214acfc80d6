"""Fan-in benchmark: 1, 4, 16 and 64 shippers at once into one socket-activated collector.

Place in the flow: issue 12's concurrency row. The collector is started as
``dlogd-receive.socket`` (Accept=yes) starts it: ``systemd-socket-activate
--accept`` on a loopback port, one ``python -m dlogd.receive`` per
connection. Each sender has a spool of its own (``Spool.add``, fsyncs
skipped in set-up) with the same number of 4 KiB files, and all of them run
``python -m dlogd.ship`` at the same moment. Reported per number of senders
(alternating, medians): the wall time until the last shipper exits, the
aggregate files/s and MB/s, and the ratio to a single sender. Every file is
checked present once at the collector and byte-identical.

    .venv/bin/python bench/bench_fanin.py [--senders 1 4 16 64] [--files 100] [--repeat 3] [--markdown OUT.md]

Run as root from the repository root; data under /tmp/dlogd-bench/fanin,
removed at the end. About 3 minutes with the defaults.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ship import (
    KEYWORD,
    LOOPBACK,
    SMALL_SIZE,
    Bench,
    free_port,
    server_config,
    spool_files,
    tls_block,
    wait_listening,
)
from benchlib import BENCH_ROOT, PYTHON, preamble, publish

from dlogd import pki

SENDERS = (1, 4, 16, 64)


def prepare(root: Path, senders: int, files: int) -> Bench:
    """Each sender's files in src/<n>/ (distinct names and content), and the PKI."""
    shutil.rmtree(root, ignore_errors=True)
    bench = Bench(root, root / "unused", root / "src", root / "dest", root / "pki")
    for d in (bench.small, bench.pki, bench.logs):
        d.mkdir(parents=True)
    payload = os.urandom(SMALL_SIZE)
    for n in range(senders):
        (bench.small / str(n)).mkdir()
        for i in range(files):
            data = n.to_bytes(4, "big") + i.to_bytes(4, "big") + payload[8:]
            (bench.small / str(n) / f"s{n:02d}-{i:05d}.log").write_bytes(data)
    ca = pki.make_ca(bench.pki, "dlogd bench fleet")
    for host in ("logs1", "web1"):
        pki.make_host_cert(ca, host, bench.pki, ip_addresses=[LOOPBACK])
    os.sync()
    return bench


def sender_config(bench: Bench, n: int, port: int) -> Path:
    path = bench.root / f"client-{n}.conf"
    path.write_text(
        f'spool "{bench.root / "spools" / str(n)}";\n'
        + tls_block(bench, "web1")
        + f'keyword "{KEYWORD}" {{ uid "0"; host "logs1"; }}\n'
        + f'host "logs1" {{ address "{LOOPBACK}"; port {port}; }}\n'
    )
    return path


@contextmanager
def activated_collector(bench: Bench) -> Iterator[int]:
    """The collector as dlogd-receive.socket runs it: one instance per connection."""
    port = free_port()
    argv = ["systemd-socket-activate", "--accept", "-l", f"{LOOPBACK}:{port}",
            "-E", f"DLOGD_CACHE_DIR={bench.root / 'cache'}",
            PYTHON, "-m", "dlogd.receive", "--config", str(server_config(bench))]  # fmt: skip
    with (bench.logs / "activate.log").open("ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_listening(port)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def fan_in(bench: Bench, senders: int, port: int) -> float:
    bench.clean_dest()
    sources = [sorted((bench.small / str(n)).iterdir()) for n in range(senders)]
    for n, files in enumerate(sources):
        spool_files(bench.root / "spools" / str(n), files)
    argvs = [[PYTHON, "-m", "dlogd.ship", "--config", str(sender_config(bench, n, port))]
             for n in range(senders)]  # fmt: skip
    env = {**os.environ, "DLOGD_CACHE_DIR": str(bench.root / "cache")}
    with (bench.logs / "ship.log").open("ab") as log:
        started = time.perf_counter()
        procs = [subprocess.Popen(a, stdout=log, stderr=subprocess.STDOUT, env=env) for a in argvs]
        codes = [p.wait() for p in procs]
        seconds = time.perf_counter() - started
    if any(codes):
        raise RuntimeError(f"shippers exited {sorted(set(codes))}; see {bench.logs / 'ship.log'}")
    check_fan_in(bench.dest / "dlogd", [f for files in sources for f in files])
    return seconds


def check_fan_in(directory: Path, files: list[Path]) -> None:
    """Each source once at the collector (stored as <time>.<name>), with its bytes."""
    stored: dict[str, list[Path]] = {}
    for path in directory.iterdir():
        if path.is_file():
            stored.setdefault(path.name.split(".", 1)[1], []).append(path)
    for source in files:
        copies = stored.pop(source.name, [])
        if len(copies) != 1:
            raise RuntimeError(f"{source.name}: {len(copies)} copies at the collector")
        if (
            hashlib.sha256(copies[0].read_bytes()).digest()
            != hashlib.sha256(source.read_bytes()).digest()
        ):
            raise RuntimeError(f"{source.name}: stored bytes differ")
    if stored:
        raise RuntimeError(f"files nobody sent: {sorted(stored)[:5]}")


def report(counts: list[int], files: int, runs: dict[int, list[float]], repeat: int) -> str:
    lines = [*preamble("Fan-in: shippers at once into one socket-activated collector (issue 12)",
                       "bench_fanin.py",
                       f"{files} files of {SMALL_SIZE // 1024} KiB per sender, medians of "
                       f"{repeat} runs, sender counts alternating; the time is until the last "
                       "shipper exited"),
             "| senders | files | seconds | files/s | MB/s | files/s ÷ one sender |",
             "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    single = counts[0] * files / statistics.median(runs[counts[0]])
    for n in counts:
        seconds = statistics.median(runs[n])
        rate = n * files / seconds
        lines.append(f"| {n} | {n * files:,} | {seconds:.2f} | {rate:,.0f} | "
                     f"{rate * SMALL_SIZE / 1e6:.1f} | {rate / single:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--senders", type=int, nargs="+", default=list(SENDERS))
    parser.add_argument("--files", type=int, default=100, help="files per sender")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--root", type=Path, default=BENCH_ROOT / "fanin")
    parser.add_argument("--markdown", help="also write the report to this file")
    args = parser.parse_args(argv)
    counts = sorted(args.senders)
    bench = prepare(args.root, counts[-1], args.files)
    try:
        runs: dict[int, list[float]] = {n: [] for n in counts}
        with activated_collector(bench) as port:
            for i in range(args.repeat):
                for n in counts:
                    runs[n].append(fan_in(bench, n, port))
                    print(f"[{i + 1}/{args.repeat}] {n:>3} senders: {runs[n][-1]:.2f}s",
                          file=sys.stderr, flush=True)  # fmt: skip
        text = report(counts, args.files, runs, args.repeat)
    finally:
        shutil.rmtree(args.root, ignore_errors=True)
    return publish(text, args.markdown)


if __name__ == "__main__":
    sys.exit(main())
