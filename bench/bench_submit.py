"""Submit benchmark: how fast and how heavy one ``dlogd_submit()`` is on this machine.

Place in the flow: measures the first hop (application -> ``dlogd-submit@`` ->
spool) exactly as systemd runs it, with ``systemd-socket-activate --accept``
starting one ``python -m dlogd.submit_service`` per connection, and compares it with
the same service kept running (``--listen``) so the cost of a process start
shows. Also breaks the latency down (interpreter start, imports, config
load, the spool's fsyncs) and measures each instance's peak memory.

A script, not a test: it asserts nothing about time. Run as root (the
keyword allows uid 0), from the repository root:

    .venv/bin/python bench/bench_submit.py [--submits 200] [--markdown OUT.md]

Everything it creates lives under /tmp/dlogd-bench/submit and is removed at
the end; the only traffic is on Unix sockets there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import BENCH_ROOT, DURABLE_LOOP, PYTHON, REPO, machine, publish, vm_hwm_kib

from dlogd import client
from dlogd.spool import Spool

KEYWORD = "bench"
FILE_SIZE = 4096

# Runs the service under fork + wait4 so its peak RSS can be read; LISTEN_PID
# must name the process that serves, so the child sets it to itself.
MAXRSS_WRAPPER = """
import os, sys
out, argv = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.execv(argv[0], argv)
_, status, usage = os.wait4(pid, 0)
with open(out, "a") as f:
    f.write(f"{usage.ru_maxrss}\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


# -- measuring --------------------------------------------------------------------


@dataclass
class Latencies:
    """Wall-clock seconds of individual operations, and the span they took together."""

    samples: list[float] = field(default_factory=list)
    span: float = 0.0
    items: int = 0  # files handled in ``span`` (more than len(samples) for batches)

    def ms(self, q: float) -> float:
        return percentile(self.samples, q) * 1000

    @property
    def rate(self) -> float:
        return self.items / self.span if self.span else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile; q in [0, 100]."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def alternating(
    count: int, operation: Callable[[int], int], reference: list[str]
) -> tuple[Latencies, Latencies]:
    """``operation(i)`` and a run of ``reference`` in turn, ``count`` times each:
    whatever the machine does meanwhile weighs on both alike."""
    ours, theirs = Latencies(), Latencies()
    for i in range(count):
        t0 = time.perf_counter()
        ours.items += operation(i)
        t1 = time.perf_counter()
        subprocess.run(reference, check=True)
        t2 = time.perf_counter()
        ours.samples.append(t1 - t0)
        theirs.samples.append(t2 - t1)
        theirs.items += 1
    ours.span, theirs.span = sum(ours.samples), sum(theirs.samples)
    return ours, theirs


def durable_loop_rate(work: Workdir, files: list[Path]) -> Latencies:
    """The fsync-per-file loop over ``files`` (a process of its own, as a submitter is)."""
    src = work.root / "loop-src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir()
    for path in files:
        os.link(path, src / path.name)
    dst = work.root / "loop-dst"
    shutil.rmtree(dst, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([PYTHON, "-c", DURABLE_LOOP, str(src), str(dst), "1"], check=True)
    span = time.perf_counter() - t0
    shutil.rmtree(src)
    shutil.rmtree(dst)
    return Latencies([span], span, len(files))


def timed(count: int, operation: Callable[[int], int]) -> Latencies:
    """Run ``operation(i)`` ``count`` times in a row; it returns how many files it handled."""
    result = Latencies()
    start = time.perf_counter()
    for i in range(count):
        t0 = time.perf_counter()
        result.items += operation(i)
        result.samples.append(time.perf_counter() - t0)
    result.span = time.perf_counter() - start
    return result


def timed_concurrently(count: int, workers: int, operation: Callable[[int], int]) -> Latencies:
    result = Latencies()

    def one(i: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        n = operation(i)
        return time.perf_counter() - t0, n

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for seconds, n in pool.map(one, range(count)):
            result.samples.append(seconds)
            result.items += n
    result.span = time.perf_counter() - start
    return result


def command_seconds(argv: Sequence[str], runs: int, env: dict[str, str] | None = None) -> float:
    """Median wall-clock seconds of a command (its output discarded)."""
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, env=env)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


# -- the service under test ---------------------------------------------------------


@dataclass
class Workdir:
    root: Path
    config: Path
    cache: Path
    spool: Path
    files: list[Path]

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DLOGD_CACHE_DIR": str(self.cache)}


def prepare(root: Path, count: int) -> Workdir:
    """Config (validated once, so services read the cache), spool dir, small files."""
    root.mkdir(parents=True, exist_ok=True)
    config = root / "client.conf"
    config.write_text(
        f'spool "{root / "spool"}";\n'
        f'keyword "{KEYWORD}" {{ uid "0"; host "logs1"; }}\n'
        'host "logs1" { }\n'
    )
    work = Workdir(root, config, root / "cache", root / "spool", [])
    subprocess.run(
        [PYTHON, "-c", f"from dlogd.config import load_client; load_client({str(config)!r})"],
        check=True,
        env=work.env,
    )
    files = root / "files"
    files.mkdir(exist_ok=True)
    payload = os.urandom(FILE_SIZE)
    for i in range(count):
        path = files / f"app-{i:06d}.log"
        path.write_bytes(payload)
        work.files.append(path)
    return work


@contextlib.contextmanager
def activated(work: Workdir, name: str, wrapper_out: Path | None = None) -> Iterator[Path]:
    """A socket as dlogd.socket (Accept=yes) would give it: one instance per connection."""
    sock = work.root / f"{name}.sock"
    service = [PYTHON, "-m", "dlogd.submit_service", "--config", str(work.config)]
    if wrapper_out is not None:
        service = [PYTHON, "-c", MAXRSS_WRAPPER, str(wrapper_out), *service]
    argv = ["systemd-socket-activate", "--accept", "-l", str(sock)]
    argv += ["-E", f"DLOGD_CACHE_DIR={work.cache}", *service]
    with _running(argv, sock, work.root / f"{name}.log") as proc:
        yield sock
        _wait_instances_gone(proc.pid)


@contextlib.contextmanager
def listening(work: Workdir, name: str) -> Iterator[tuple[Path, int]]:
    """The development server: one process for every connection, no start-up per submit."""
    sock = work.root / f"{name}.sock"
    argv = [
        PYTHON,
        "-m",
        "dlogd.submit_service",
        "--config",
        str(work.config),
        "--listen",
        str(sock),
    ]
    with _running(argv, sock, work.root / f"{name}.log", env=work.env) as proc:
        yield sock, proc.pid


@contextlib.contextmanager
def _running(
    argv: list[str], sock: Path, log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} did not start; see {log}")
            time.sleep(0.01)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()


def _wait_instances_gone(pid: int, limit: float = 10.0) -> None:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    deadline = time.monotonic() + limit
    while children.read_text().split() and time.monotonic() < deadline:
        time.sleep(0.01)


# -- the scenarios ------------------------------------------------------------------


def one_per_connection(sock: Path, files: list[Path]) -> Callable[[int], int]:
    def submit(i: int) -> int:
        client.submit(files[i % len(files)], KEYWORD, socket_path=str(sock))
        return 1

    return submit


def batches(sock: Path, files: list[Path], size: int) -> Callable[[int], int]:
    def submit(i: int) -> int:
        chunk = [files[(i * size + j) % len(files)] for j in range(size)]
        results = client.submit_many(chunk, KEYWORD, socket_path=str(sock))
        failed = [r for r in results if isinstance(r, OSError)]
        if failed:
            raise failed[0]
        return size

    return submit


def c_client(binary: Path, sock: Path, files: list[Path]) -> Latencies:
    """libdlogd: one program, one connection (and so one instance) per file."""
    env = {**os.environ, "DLOGD_SOCKET": str(sock)}
    t0 = time.perf_counter()
    done = subprocess.run(
        [str(binary), KEYWORD, *map(str, files)], capture_output=True, text=True, env=env
    )
    span = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"dlogd-submit-test failed: {done.stdout[-500:]}{done.stderr[-500:]}")
    return Latencies([span / len(files)], span, len(files))


def build_c_client(out: Path) -> Path | None:
    done = subprocess.run(
        ["make", "-s", "-C", str(REPO / "clib"), f"B={out}", "test-program"],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        print(f"(C client not built: {done.stderr.strip()[-300:]})", file=sys.stderr)
        return None
    return out / "dlogd-submit-test"


def instance_memory(work: Workdir, count: int) -> list[int]:
    """Peak RSS (KiB) of ``count`` socket-activated instances, from wait4."""
    out = work.root / "maxrss.txt"
    out.unlink(missing_ok=True)
    with activated(work, "rss", wrapper_out=out) as sock:
        for i in range(count):
            client.submit(work.files[i], KEYWORD, socket_path=str(sock))
    return [int(x) for x in out.read_text().split()]


# -- where the time goes ------------------------------------------------------------


@dataclass
class Breakdown:
    interpreter: float
    interpreter_no_site: float  # `python -S`: no site, so no .pth files (the editable finder)
    imports: float  # `-m dlogd.submit_service --help` minus an empty interpreter
    config_load: float
    spool_single: float  # one add + commit
    fsyncs_single: float
    fsync_count_single: float
    spool_batched: float  # per file, 100 adds + one commit
    fsyncs_batched: float
    fsync_count_batched: float
    importtime_top: list[tuple[int, int, str]]


CONFIG_LOAD = """
import sys, time
import dlogd.submit_service as service
t = time.perf_counter()
service.load(sys.argv[1])
print(time.perf_counter() - t)
"""


def breakdown(work: Workdir, runs: int) -> Breakdown:
    env = work.env
    interpreter = command_seconds([PYTHON, "-c", "pass"], runs, env)
    helped = command_seconds([PYTHON, "-m", "dlogd.submit_service", "--help"], runs, env)
    loads = [
        float(subprocess.run([PYTHON, "-c", CONFIG_LOAD, str(work.config)], check=True,
                             capture_output=True, text=True, env=env).stdout)
        for _ in range(runs)
    ]  # fmt: skip
    single = spool_cost(work.root / "spool-probe", work.files[:50], batch=1)
    batched = spool_cost(work.root / "spool-probe", work.files[:100], batch=100)
    return Breakdown(
        interpreter=interpreter,
        interpreter_no_site=command_seconds([PYTHON, "-S", "-c", "pass"], runs, env),
        imports=helped - interpreter,
        config_load=statistics.median(loads),
        spool_single=single[0],
        fsyncs_single=single[1],
        fsync_count_single=single[2],
        spool_batched=batched[0],
        fsyncs_batched=batched[1],
        fsync_count_batched=batched[2],
        importtime_top=importtime_top(env),
    )


def spool_cost(root: Path, files: list[Path], batch: int) -> tuple[float, float, float]:
    """Per file: seconds of Spool.add + commit, seconds inside fsync, fsync calls."""
    shutil.rmtree(root, ignore_errors=True)
    spent = [0.0, 0]
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        t0 = time.perf_counter()
        real_fsync(fd)
        spent[0] += time.perf_counter() - t0
        spent[1] += 1

    os.fsync = counting_fsync  # type: ignore[assignment]
    try:
        with Spool(str(root), create=True) as spool:
            t0 = time.perf_counter()
            for start in range(0, len(files), batch):
                for path in files[start : start + batch]:
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        spool.add(KEYWORD, fd, path.name, ["logs1"])
                    finally:
                        os.close(fd)
                spool.commit()
            total = time.perf_counter() - t0
    finally:
        os.fsync = real_fsync
        shutil.rmtree(root, ignore_errors=True)
    n = len(files)
    return total / n, float(spent[0]) / n, spent[1] / n


_IMPORTTIME = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)")


def importtime_top(env: dict[str, str], count: int = 12) -> list[tuple[int, int, str]]:
    """(cumulative us, self us, module) of the costliest imports of the submit service."""
    done = subprocess.run(
        [PYTHON, "-X", "importtime", "-m", "dlogd.submit_service", "--help"],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    rows = []
    for line in done.stderr.splitlines():
        m = _IMPORTTIME.match(line)
        if m:
            depth = (len(m.group(3)) - 1) // 2
            rows.append((int(m.group(2)), int(m.group(1)), "  " * depth + m.group(4)))
    return sorted(rows, reverse=True)[:count]


# -- report -------------------------------------------------------------------------


def report(results: dict[str, Latencies], memory: dict[str, str], parts: Breakdown,
           meta: dict[str, str], command: str) -> str:  # fmt: skip
    lines = [
        "## Submit (issue 4)",
        "",
        *(f"- {k}: {v}" for k, v in meta.items()),
        f"- reproduce: `{command}`",
        "",
        "| scenario | files/s | p50 ms | p99 ms | samples |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, lat in results.items():
        lines.append(
            f"| {name} | {lat.rate:,.0f} | {lat.ms(50):.1f} | {lat.ms(99):.1f} | {len(lat.samples)} |"
        )
    lines += ["", "| process | peak RSS |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in memory.items()]
    lines += [
        "",
        "Where one socket-activated submit's time goes (medians):",
        "",
        "| part | ms |",
        "|---|---:|",
        f"| interpreter start (`python -c pass`) | {parts.interpreter * 1000:.1f} |",
        f"| of which without `site` (`python -S -c pass`) | {parts.interpreter_no_site * 1000:.1f} |",
        f"| imports (`-m dlogd.submit_service --help` minus the above) | {parts.imports * 1000:.1f} |",
        f"| config load from the cache (`submit.load`) | {parts.config_load * 1000:.1f} |",
        f"| spool add + commit, one file | {parts.spool_single * 1000:.2f} |",
        f"| of which in {parts.fsync_count_single:.0f} fsync calls | {parts.fsyncs_single * 1000:.2f} |",
        f"| spool add, per file in a batch of 100 + one commit | {parts.spool_batched * 1000:.2f} |",
        f"| of which in {parts.fsync_count_batched:.2f} fsync calls per file | {parts.fsyncs_batched * 1000:.2f} |",
        "",
        "Costliest imports (`python -X importtime -m dlogd.submit_service --help`, microseconds):",
        "",
        "| cumulative | self | module |",
        "|---:|---:|---|",
    ]
    lines += [f"| {c:,} | {s:,} | `{m}` |" for c, s, m in parts.importtime_top]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> str:
    root = BENCH_ROOT / "submit"
    shutil.rmtree(root, ignore_errors=True)
    work = prepare(root, max(args.submits, args.batch * args.batches))
    files = work.files
    results: dict[str, Latencies] = {}
    memory: dict[str, str] = {}
    try:
        with activated(work, "activated") as sock:
            timed(5, one_per_connection(sock, files))  # warm the page cache and .pyc files
            single, interpreter = alternating(
                args.submits, one_per_connection(sock, files), [PYTHON, "-I", "-S", "-c", "pass"]
            )
            results["(a) socket-activated, one connection per submit"] = single
            results["(ref) `python -I -S -c pass`, alternating with (a)"] = interpreter
            results["(a) the same, 4 clients at once"] = timed_concurrently(
                args.submits, 4, one_per_connection(sock, files)
            )
            results[f"(b) socket-activated, submit_many of {args.batch} (latency per batch)"] = (
                timed(args.batches, batches(sock, files, args.batch))
            )
            # The same files made durable one by one by a program of its own.
            results["(ref) fsync-per-file loop over the same files (one process)"] = (
                durable_loop_rate(work, files[: args.batch * args.batches])
            )
            binary = build_c_client(root / "clib")
            if binary is not None:
                results["(a) socket-activated, C libdlogd, one connection per submit (mean)"] = (
                    c_client(binary, sock, files[: args.submits])
                )
        with listening(work, "listen") as (sock, pid):
            timed(5, one_per_connection(sock, files))
            results["(c) `--listen` server, one connection per submit"] = timed(
                args.submits, one_per_connection(sock, files)
            )
            results[f"(c) `--listen` server, submit_many of {args.batch}"] = timed(
                args.batches, batches(sock, files, args.batch)
            )
            memory["`--listen` server (VmHWM after the runs above)"] = (
                f"{vm_hwm_kib(pid) / 1024:.1f} MiB"
            )
        rss = instance_memory(work, min(20, len(work.files)))
        memory["socket-activated instance (ru_maxrss, median of 20)"] = (
            f"{statistics.median(rss) / 1024:.1f} MiB (max {max(rss) / 1024:.1f})"
        )
        memory["`python -c pass` (ru_maxrss)"] = f"{empty_interpreter_rss(root) / 1024:.1f} MiB"
        parts = breakdown(work, args.runs)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    command = "sudo .venv/bin/python bench/bench_submit.py " + " ".join(sys.argv[1:])
    text = report(results, memory, parts, machine(), command.strip())
    if args.json:
        Path(args.json).write_text(
            json.dumps({k: vars(v) for k, v in results.items()} | {"memory": memory}, indent=1)
        )
    return text


def empty_interpreter_rss(root: Path) -> int:
    """Through the same wrapper as the instances: forked from a small process, as they are."""
    out = root / "maxrss-empty.txt"
    subprocess.run([PYTHON, "-c", MAXRSS_WRAPPER, str(out), PYTHON, "-c", "pass"], check=True)
    return int(out.read_text().split()[0])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--submits", type=int, default=200, help="single submits per scenario")
    parser.add_argument("--batch", type=int, default=100, help="files per submit_many call")
    parser.add_argument("--batches", type=int, default=10, help="submit_many calls")
    parser.add_argument("--runs", type=int, default=15, help="runs per breakdown timing")
    parser.add_argument("--markdown", help="also write the report to this file")
    parser.add_argument("--json", help="write raw samples to this file")
    parser.add_argument("--keep", action="store_true", help="keep /tmp/dlogd-bench/submit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return publish(run(args), args.markdown)


if __name__ == "__main__":
    sys.exit(main())
