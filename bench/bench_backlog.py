"""Backlog benchmark: one shipper run over a spool of 10,000 and of 100,000 entries.

Place in the flow: the shipper's side of issue 12's backlog row. A client
whose collector was away for a day has a long backlog; the run that drains
it must not take memory in proportion, nor make the first file wait for a
scan of all the others. For each spool size, in one run, alternating the
sizes (A B A B), medians:

- time until the first file is stored at the collector (the first offer,
  plus one small file's round trip), polled every 2 ms in the store;
- the whole run: seconds and files/s, everything acknowledged and removed
  from the spool, every file checked present at the collector;
- the shipper's peak RSS (GNU time %M).

The reference is the same shipper at the smaller size: a shipper that streams
its spool has the same first-file time, memory and files/s at both.

The spool is built with ``dlogd.spool.Spool.add`` (fsyncs skipped in set-up,
one sync after); the files are 1 KiB each, so the run measures the
per-entry work, not the disk. A standalone collector on loopback stores
them (``python -m dlogd.receive --listen``) as in bench_ship.

    .venv/bin/python bench/bench_backlog.py [--sizes 10000 100000] [--repeat 3] [--markdown OUT.md]

Needs root (as bench_ship) and GNU time. Data under /tmp/dlogd-bench/backlog,
removed at the end; about 4 minutes with the defaults.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ship import (
    Bench,
    check_received,
    collector,
    peak_rss,
    read_rss,
    ship_argv,
    spool_files,
)
from benchlib import BENCH_ROOT, preamble, publish

from dlogd import pki

FILE_SIZE = 1024
SIZES = (10_000, 100_000)


@dataclass
class Drain:
    first_stored: float  # seconds from the shipper's start to the first file in the store
    seconds: float
    rss_kib: int


def prepare(root: Path, largest: int) -> Bench:
    """Inputs for the largest spool (the smaller ones use the first names), and the PKI."""
    shutil.rmtree(root, ignore_errors=True)
    bench = Bench(root, root / "unused", root / "src", root / "dest", root / "pki")
    for d in (bench.small, bench.pki, bench.logs):
        d.mkdir(parents=True)
    bench.clean_dest()
    payload = os.urandom(FILE_SIZE)
    for i in range(largest):
        # Distinct content per file: the collector's duplicate check sees different files.
        (bench.small / f"app-{i:06d}.log").write_bytes(i.to_bytes(8, "big") + payload[8:])
    ca = pki.make_ca(bench.pki, "dlogd bench fleet")
    for host in ("logs1", "web1"):
        pki.make_host_cert(ca, host, bench.pki, ip_addresses=["127.0.0.1"])
    os.sync()
    return bench


def first_file(directory: Path, started: float, stop: threading.Event, out: list[float]) -> None:
    """Record when ``directory`` first holds a file (os.scandir stops at the first)."""
    while not stop.is_set():
        if directory.is_dir():
            with os.scandir(directory) as it:
                if any(e.is_file() for e in it):
                    out.append(time.perf_counter() - started)
                    return
        time.sleep(0.002)


def drain(bench: Bench, files: list[Path]) -> Drain:
    bench.clean_dest()
    spool_files(bench.root / "spool", files)
    store = bench.dest / "dlogd"
    with collector(bench) as (port, _pid):
        argv = [*peak_rss(bench.logs / "ship.rss"), *ship_argv(bench, port)]
        stop, seen = threading.Event(), list[float]()
        started = time.perf_counter()
        watcher = threading.Thread(target=first_file, args=(store, started, stop, seen))
        watcher.start()
        with (bench.logs / "ship.log").open("ab") as log:
            done = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=bench.env)
        seconds = time.perf_counter() - started
        stop.set()
        watcher.join()
    if done.returncode != 0:
        raise RuntimeError(f"dlogd-ship exited {done.returncode}; see {bench.logs / 'ship.log'}")
    check_received(store, files)
    left = [p for p in (bench.root / "spool" / "bench").iterdir() if not p.name.startswith(".")]
    if left:
        raise RuntimeError(f"{len(left)} entries left in the spool after a complete run")
    if not seen:
        raise RuntimeError("no file was seen in the store before the run ended")
    return Drain(seen[0], seconds, read_rss(bench.logs / "ship.rss"))


def report(sizes: list[int], runs: dict[int, list[Drain]], repeat: int) -> str:
    lines = [*preamble("Backlog: one shipper run over a long spool (issue 12)", "bench_backlog.py",
                       f"{FILE_SIZE} B files, medians of {repeat} runs, sizes alternating; "
                       "the peak RSS is the largest of the runs"),
             "| entries in the spool | first file stored | whole run | files/s | shipper peak RSS |"
             " files/s ÷ smallest | RSS ÷ smallest |",
             "|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    base = sizes[0]

    def rate(n: int) -> float:
        return n / statistics.median(d.seconds for d in runs[n])

    for n in sizes:
        first = statistics.median(d.first_stored for d in runs[n])
        whole = statistics.median(d.seconds for d in runs[n])
        rss = max(d.rss_kib for d in runs[n])
        lines.append(
            f"| {n:,} | {first * 1000:,.0f} ms | {whole:.1f} s | {rate(n):,.0f} | "
            f"{rss / 1024:.1f} MiB | {rate(n) / rate(base):.2f} | "
            f"{rss / max(d.rss_kib for d in runs[base]):.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--root", type=Path, default=BENCH_ROOT / "backlog")
    parser.add_argument("--markdown", help="also write the report to this file")
    args = parser.parse_args(argv)
    sizes = sorted(args.sizes)
    bench = prepare(args.root, sizes[-1])
    try:
        inputs = sorted(bench.small.iterdir())
        runs: dict[int, list[Drain]] = {n: [] for n in sizes}
        for i in range(args.repeat):
            for n in sizes:
                run = drain(bench, inputs[:n])
                runs[n].append(run)
                print(f"[{i + 1}/{args.repeat}] {n:>7} entries: first {run.first_stored:.3f}s, "
                      f"all {run.seconds:.1f}s, {run.rss_kib / 1024:.1f} MiB",
                      file=sys.stderr, flush=True)  # fmt: skip
        text = report(sizes, runs, args.repeat)
    finally:
        shutil.rmtree(args.root, ignore_errors=True)
    return publish(text, args.markdown)


if __name__ == "__main__":
    sys.exit(main())
