"""Status benchmark: `dlogctl status` on a large spool, next to `find | wc -l`.

Place in the flow: `dlogctl status --client` reads the spool the submit
service writes and the shipper drains (issue 14: it must stay fast with
100,000 entries and take no lock that could stall the services). This
builds spools of 10,000 and 100,000 pending entries with the project's own
writer (``dlogd.spool.Spool.add``, committed in batches), then times, in
alternation, medians of ``--repeat`` runs:

- ``dlogctl status --client CONFIG --json`` (a fresh process, config from
  its cache, every entry's size, owed collectors and hold state read),
- ``find SPOOL -type f | wc -l``, what an operator would type to count
  the backlog (it reads less: names only, no owed or hold state),

and each one's peak RSS (GNU time's %M). A script, not a test: it asserts
nothing about time. Run as root from the repository root:

    .venv/bin/python bench/bench_status.py [--entries 10000,100000] [--repeat 5] [--markdown OUT.md]

Everything lives under /tmp/dlogd-bench/status (``--root``) and is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import BENCH_ROOT, PYTHON, REPO, machine, publish

from dlogd import config
from dlogd.names import entry_basename
from dlogd.spool import Spool

ROOT = BENCH_ROOT / "status"
KEYWORD = "bench"
COLLECTORS = ("logs1", "logs2")
BATCH = 1000  # entries per commit while building
GNU_TIME = "/usr/bin/time"


def build_spool(where: Path, entries: int) -> Path:
    """A client config and a spool holding ``entries`` pending 512-byte files."""
    spool = where / "spool"
    source = where / "app.log"
    source.write_bytes(os.urandom(512))
    conf = config.ClientConfig(
        keywords={KEYWORD: config.ClientKeyword(KEYWORD, frozenset({0}), frozenset(), COLLECTORS)},
        hosts={h: config.Host(h, "127.0.0.1") for h in COLLECTORS},
        spool=str(spool),
    )
    path = where / "client.conf"
    path.write_text(config.to_text(conf))
    with Spool(str(spool), create=True) as sp:
        fd = os.open(source, os.O_RDONLY)
        try:
            for i in range(entries):
                # copy: one inode linked 100,000 times is past ext4's link limit.
                sp.add(KEYWORD, fd, entry_basename(f"app-{i}.log".encode()), COLLECTORS, copy=True)
                if (i + 1) % BATCH == 0:
                    sp.commit()
            sp.commit()
        finally:
            os.close(fd)
    return path


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (KiB) and stdout of one run."""
    with tempfile.NamedTemporaryFile(prefix="maxrss-") as peak:
        started = time.perf_counter()
        done = subprocess.run(
            [GNU_TIME, "-q", "-f", "%M", "-o", peak.name, *argv],
            capture_output=True, text=True, env=env, check=True,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        return seconds, int(Path(peak.name).read_text().split()[-1]), done.stdout


def measure(root: Path, entries: int, repeat: int) -> dict[str, object]:
    where = root / str(entries)
    where.mkdir(parents=True)
    started = time.perf_counter()
    conf = build_spool(where, entries)
    built = time.perf_counter() - started
    env = {**os.environ, "DLOGD_CACHE_DIR": str(where / "cache"), "PYTHONPATH": str(REPO)}
    status_argv = [PYTHON, "-m", "dlogd.cli", "status", "--client", str(conf), "--json"]
    find_argv = ["sh", "-c", f"find {where / 'spool'} -type f | wc -l"]
    timed(status_argv, env)  # warm the page cache and write the config cache
    runs: dict[str, list[tuple[float, int]]] = {"status": [], "find": []}
    for _ in range(repeat):  # alternating, so drift hits both alike
        seconds, rss, out = timed(status_argv, env)
        runs["status"].append((seconds, rss))
        pending = json.loads(out)["pending"]
        counted = sum(p["files"] for p in pending)
        if counted != entries * len(COLLECTORS):
            raise SystemExit(f"status counted {counted} owed, expected {entries * 2}")
        seconds, rss, _ = timed(find_argv, env)
        runs["find"].append((seconds, rss))
    return {
        "entries": entries,
        "build_seconds": built,
        **{
            f"{name}_{what}": statistics.median(r[i] for r in samples)
            for name, samples in runs.items()
            for i, what in enumerate(("seconds", "rss_kib"))
        },
    }


def markdown(rows: list[dict[str, object]], repeat: int, argv: list[str]) -> str:
    info = machine()
    lines = [
        f"Measured on {', '.join(f'{k} {v}' for k, v in info.items())};"
        f" medians of {repeat}, alternating.",
        f"Command: `{' '.join(argv)}`",
        "",
        "| pending entries | `dlogctl status --json` | its peak RSS | `find \\| wc -l` | ratio |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        status_s, find_s = float(str(r["status_seconds"])), float(str(r["find_seconds"]))
        lines.append(
            f"| {r['entries']:,} | {status_s * 1000:.0f} ms | "
            f"{float(str(r['status_rss_kib'])) / 1024:.1f} MiB | {find_s * 1000:.0f} ms | "
            f"{status_s / find_s:.1f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", default="10000,100000", help="comma-separated spool sizes")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--markdown", help="write the report here too")
    parser.add_argument("--root", type=Path, default=ROOT, help="scratch directory (removed)")
    args = parser.parse_args()
    shutil.rmtree(args.root, ignore_errors=True)
    try:
        rows = [measure(args.root, int(n), args.repeat) for n in args.entries.split(",")]
    finally:
        shutil.rmtree(args.root, ignore_errors=True)
    report = markdown(rows, args.repeat, ["bench/bench_status.py", *sys.argv[1:]])
    return publish(report, args.markdown)


if __name__ == "__main__":
    sys.exit(main())
