"""Shared machinery of the fault campaign: seeds, the ledger, the checks, the tally.

Place in the tests: every campaign test (kill -9, power cut, network faults,
restart storms, fuzzing) builds a world with :mod:`tests.shipharness`, breaks
something at a random instant chosen from a seed, drains to completion and
then asks this module two questions: did every file the client was told OK
arrive exactly once and byte-identical (:func:`check_store` against a
:class:`Ledger`), and is anything left behind that a clean drain should have
removed (:func:`leftovers`)? Results go into a :class:`Tally` that prints the
figures docs/reliability.md quotes, and names the seed of every failing trial
so that ``DLOGD_CAMPAIGN_SEED=<seed>`` replays exactly that trial.

How much runs: ``DLOGD_CAMPAIGN=full`` (``make campaign``) runs the full
counts; anything else runs the short CI form.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest

from dlogd.client import Submitted, submit_many
from dlogd.spool import Spool
from tests.process.test_submit import Service, start_service
from tests.shipharness import (
    EX_TEMPFAIL,
    KEYWORD,
    SHIP_TIMEOUT,
    Collector,
    ShipRun,
    Site,
    Target,
    partials,
    sha256_of,
    ship,
    visible_files,
)
from tests.tlsfixtures import COLLECTOR

FULL = os.environ.get("DLOGD_CAMPAIGN") == "full"
REPORT_DIR_ENV = "DLOGD_CAMPAIGN_REPORT"
SEED_ENV = "DLOGD_CAMPAIGN_SEED"
# A conflict copy is the store's way of keeping a *different* file under a taken name.
CONFLICT_RE = re.compile(r"\.conflict-\d+\Z")
RETRY_POLICY = (1, 2)  # seconds: short backoff, so recovery waits for it honestly
MAX_RECOVERY_RUNS = 20


def count(ci: int, full: int) -> int:
    """How many of something to do in this run."""
    return full if FULL else ci


# --- seeds -----------------------------------------------------------------------------


def seeds(n: int) -> list[int]:
    """The trial seeds: one replayed seed if ``DLOGD_CAMPAIGN_SEED`` is set, else ``n``
    seeds drawn from a fresh base seed (printed, so the whole run can be replayed)."""
    if os.environ.get(SEED_ENV):
        return [int(os.environ[SEED_ENV])]
    base = random.SystemRandom().randrange(1 << 32)
    print(f"campaign base seed {base}", file=sys.stderr)
    rng = random.Random(base)
    return [rng.randrange(1 << 48) for _ in range(n)]


def write_random(rng: random.Random, path: Path, size: int) -> Path:
    """``size`` bytes from ``rng`` (so a seed replays the same content), in chunks."""
    with path.open("wb") as f:
        left = size
        while left:
            n = min(left, 4 << 20)
            f.write(rng.randbytes(n))
            left -= n
    return path


# --- the ledger ------------------------------------------------------------------------


@dataclass
class Ledger:
    """What the submitting client was told: OK (acknowledged) or no answer (unknown).

    Keys are stored names (the spool entry's name, which the collector keeps);
    values are the SHA-256 of the bytes the client submitted.
    """

    acknowledged: dict[str, str] = field(default_factory=dict)
    unknown: dict[str, str] = field(default_factory=dict)
    refused: int = 0

    def record(self, results: Sequence[object], digests: Sequence[str]) -> None:
        for result, digest in zip(results, digests, strict=True):
            if isinstance(result, Submitted):
                keyword, _, name = result.entry.partition("/")
                assert keyword == KEYWORD, result
                self.acknowledged[name] = digest
            elif isinstance(result, OSError) and _is_refusal(result):
                self.refused += 1
            else:
                # No answer: it may or may not be spooled. Keyed by digest, not name.
                self.unknown[f"?{len(self.unknown)}"] = digest

    def acknowledge_entries(self, entries: Sequence[str], digests: Sequence[str]) -> None:
        """Entries spooled directly (``Site.add``): as good as an OK from the service."""
        for name, digest in zip(entries, digests, strict=True):
            self.acknowledged[name] = digest


def _is_refusal(exc: OSError) -> bool:
    from dlogd.client import SubmitError

    return isinstance(exc, SubmitError)


@dataclass
class Findings:
    """What :func:`check_store` found; every list must be empty."""

    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    wrong_content: list[str] = field(default_factory=list)
    conflict_copies: list[str] = field(default_factory=list)
    strangers: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    retry_left: list[str] = field(default_factory=list)

    def problems(self) -> dict[str, list[str]]:
        """Defects, excluding retry state (issue 9 item 10, counted on its own)."""
        return {k: v for k, v in vars(self).items() if v and k != "retry_left"}


def check_store(ledger: Ledger, store_dir: Path) -> Findings:
    """Hash every visible stored file and hold it against the ledger."""
    found = Findings()
    seen_content: Counter[str] = Counter()
    allowed = set(ledger.acknowledged.values()) | set(ledger.unknown.values())
    for name in visible_files(store_dir):
        digest = sha256_of(store_dir / name)
        seen_content[digest] += 1
        if CONFLICT_RE.search(name):
            found.conflict_copies.append(name)
        want = ledger.acknowledged.get(name)
        if want is not None and want != digest:
            found.wrong_content.append(name)
        elif want is None and digest not in allowed:
            found.strangers.append(name)  # content nobody submitted: a torn file
    for name in ledger.acknowledged:
        if not (store_dir / name).is_file():
            found.lost.append(name)
    # Different files may share content (two empty ones): a duplicate is a copy more
    # than the client submitted of that content.
    submitted = Counter([*ledger.acknowledged.values(), *ledger.unknown.values()])
    found.duplicated = sorted(d[:12] for d, n in seen_content.items() if n > submitted[d])
    return found


def leftovers(spool: Path, store_dir: Path) -> tuple[list[str], list[str]]:
    """(what a clean drain must not leave, retry state left).

    The first list: partials on the collector, spool entries, owed marker
    sets (real or half-built), temporary copies. The second: anything in
    ``.retry/``: issue 9 item 10 says ``<host>.json`` stays after the spool
    empties and ``<host>.json.<pid>.tmp`` stays after a kill while writing it.
    """
    left = [f"partial:{p}" for p in partials(store_dir)]
    for kdir in (p for p in spool.iterdir() if p.is_dir() and not p.name.startswith(".")):
        left += [f"entry:{p.name}" for p in kdir.iterdir() if not p.name.startswith(".")]
        # Every hidden directory of the keyword (.owed, .tmp, and whatever state the
        # spool keeps beside them, such as resubmit records) must be empty by now.
        for hidden in (p for p in kdir.iterdir() if p.name.startswith(".") and p.is_dir()):
            left += [f"{hidden.name[1:]}:{p.name}" for p in hidden.iterdir()]
    retry_dir = spool / ".retry"
    # Backoff state, and its temp files (a shipper killed while writing it): both issue 9
    # item 10, counted apart so that a new defect is not hidden among them.
    retry = [f"retry:{p.name}" for p in retry_dir.iterdir()] if retry_dir.is_dir() else []
    return left, retry


def audit(
    ledger: Ledger, site: Site, store_dir: Path | None = None, spool: Path | None = None
) -> Findings:
    store = store_dir or site.store_dir()
    found = check_store(ledger, store)
    found.leftovers, found.retry_left = leftovers(spool or site.spool, store)
    return found


# --- the tally ---------------------------------------------------------------------------


@dataclass
class Tally:
    """Counts per target and per outcome; the seeds of failing trials."""

    name: str
    counts: Counter[str] = field(default_factory=Counter)
    failures: dict[int, dict[str, list[str]]] = field(default_factory=dict)
    figures: dict[str, float] = field(default_factory=dict)
    known: dict[int, list[str]] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def add(self, target: str, seed: int, found: Findings, **extra: int) -> None:
        self.counts[f"trials:{target}"] += 1
        self.counts["trials"] += 1
        for key, value in vars(found).items():
            self.counts[key] += len(value)
        for key, value in extra.items():
            self.counts[key] += value
        if found.retry_left:
            # Issue 9 item 10 (open): evidence, not a new defect; the seed is kept.
            self.known[seed] = found.retry_left
            print(f"KNOWN ISSUE (9.10) seed={seed}: {found.retry_left} left", file=sys.stderr)
        problems = found.problems()
        if problems:
            self.failures[seed] = problems
            print(f"FAILING TRIAL seed={seed} target={target}: {problems}", file=sys.stderr)

    def error(self, target: str, seed: int, exc: BaseException) -> None:
        self.counts[f"trials:{target}"] += 1
        self.counts["trials"] += 1
        self.counts["errors"] += 1
        self.failures[seed] = {"error": [f"{type(exc).__name__}: {exc}"]}
        print(f"FAILING TRIAL seed={seed} target={target}: {exc!r}", file=sys.stderr)

    def report(self) -> str:
        elapsed = time.monotonic() - self.started
        trials = f"{self.counts['trials']} trials in " if self.counts["trials"] else ""
        lines = [f"== {self.name}: {trials}{elapsed:.0f} s"]
        lines += [f"   {k} = {v}" for k, v in sorted(self.counts.items())]
        lines += [
            f"   {k} = {v:.6g}" if isinstance(v, float) else f"   {k} = {v}"
            for k, v in sorted(self.figures.items())
        ]
        if self.failures:
            lines.append(f"   failing seeds: {sorted(self.failures)}")
        if self.known:
            lines.append(f"   seeds with .retry state left (issue 9 item 10): {sorted(self.known)}")
        text = "\n".join(lines)
        directory = os.environ.get(REPORT_DIR_ENV)
        if directory:
            Path(directory).mkdir(parents=True, exist_ok=True)
            out = {
                "name": self.name,
                "full": FULL,
                "seconds": round(elapsed, 1),
                "counts": dict(self.counts),
                "figures": self.figures,
                "failing_seeds": sorted(self.failures),
                "failures": {str(k): v for k, v in self.failures.items()},
                "retry_left_seeds": sorted(self.known),
            }
            (Path(directory) / f"{self.name}.json").write_text(json.dumps(out, indent=1))
        return text

    def show(self, capsys: pytest.CaptureFixture[str]) -> None:
        with capsys.disabled():
            print("\n" + self.report())

    def assert_clean(self) -> None:
        assert not self.failures, (
            f"{len(self.failures)} failing trial(s); replay one with {SEED_ENV}=<seed>: "
            + "; ".join(f"seed {s}: {p}" for s, p in sorted(self.failures.items()))
        )


# --- processes -------------------------------------------------------------------------------


def submit_service(site: Site, config: Path) -> Service:
    """The real submit service, socket-activated, on the site's spool and config.

    The spool exists first, as the packaged tmpfiles.d line makes it at boot.
    """
    Spool(str(site.spool), create=True).close()
    service = start_service(site.root, config.read_text())
    # start_service returns once the socket file exists, which is after bind() and may
    # be before listen(): a connect in between is refused. Wait until one is accepted
    # (the instance it starts reads end of stream and exits).
    wait_until(partial(_accepts, str(service.socket_path)), 10, "the submit socket to listen")
    return service


def _accepts(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            return False
    return True


def stop_service(service: Service) -> None:
    if service.proc.poll() is None:
        service.proc.send_signal(signal.SIGTERM)
        try:
            service.proc.wait(10)
        except subprocess.TimeoutExpired:
            service.proc.kill()
            service.proc.wait(10)


def kill_instances(service: Service) -> int:
    """kill -9 every running submit instance; how many there were."""
    killed = 0
    for pid in service.instances():
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except ProcessLookupError:
            pass
    return killed


def submit_files(service: Service, paths: Sequence[Path], timeout: float = 30) -> list[object]:
    """``submit_many``'s answers; if it raised (the service could not be reached, as when
    it is killed while the connection is made), every file's outcome is that error."""
    try:
        return list(
            submit_many(paths, KEYWORD, socket_path=str(service.socket_path), timeout=timeout)
        )
    except OSError as exc:
        return [exc] * len(paths)


def reached(predicate: Callable[[], bool], timeout: float, step: float = 0.005) -> bool:
    """Poll until ``predicate`` holds (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    if not reached(predicate, timeout):
        raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def finish(proc: subprocess.Popen[bytes], timeout: float = 60) -> tuple[int, str]:
    """Wait for a background process; a hang is a failure, not a wait for ever."""
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=10)
        raise AssertionError(f"{proc.args!r} hung for {timeout:g}s") from None
    return proc.returncode, (err or b"").decode(errors="replace")


def kill9(proc: subprocess.Popen[bytes]) -> bool:
    """kill -9; True if it was still running (the kill landed mid-operation)."""
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    return True


def point_at(site: Site, collector: Collector) -> Path:
    """The client config naming this collector (its port changes on every restart)."""
    return site.client_config([Target(COLLECTOR, collector.port)], retry=RETRY_POLICY, timeout=5)


def wait_for_backoff(spool: Path, host: str = COLLECTOR, limit: float = 15) -> None:
    """Sleep until the shipper's on-disk backoff says it may try again (bounded)."""
    path = spool / ".retry" / f"{host}.json"
    try:
        due = float(json.loads(path.read_text())["next"])
    except (OSError, ValueError, KeyError):
        return
    time.sleep(max(0.0, min(limit, due - time.time() + 0.05)))


def drain(
    site: Site,
    config: Path,
    *,
    runs: int = MAX_RECOVERY_RUNS,
    runner: Callable[[], ShipRun] | None = None,
    spool: Path | None = None,
) -> list[ShipRun]:
    """Run the shipper until it says everything was delivered, honouring its backoff.

    ``runner`` runs one shipper to its end (default: on this host, ``ship()``).
    """
    run_once = runner or (lambda: ship(config, site.cache, timeout=SHIP_TIMEOUT))
    done: list[ShipRun] = []
    for _ in range(runs):
        run = run_once()
        done.append(run)
        if run.returncode == 0 and not pending_entries(spool or site.spool):
            return done
        assert run.returncode in (0, EX_TEMPFAIL), run.stderr
        wait_for_backoff(spool or site.spool)
    raise AssertionError(
        f"not drained after {runs} runs; last: {done[-1].returncode} {done[-1].stderr[-2000:]}"
    )


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "gone"
    return stat.rpartition(")")[2].split()[0]


def _stopped(pid: int) -> bool:
    return _state(pid) in ("T", "t", "Z", "X", "gone")


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def freeze(pid: int) -> int:
    """SIGSTOP a process, then its descendants, each confirmed stopped: the instant of a
    cut. The parent first, so that it forks no new child once its children are listed;
    "stopped" is waited for because a process inside fsync stops only when it returns.
    Returns how many processes were frozen."""
    frozen = 0
    todo = [pid]
    while todo:
        current = todo.pop()
        with contextlib.suppress(ProcessLookupError):
            os.kill(current, signal.SIGSTOP)
        if reached(partial(_stopped, current), 10, 0.001):
            frozen += 1
        else:
            raise AssertionError(f"process {current} did not stop within 10 s")
        todo += _children(current)
    return frozen


def pending_entries(spool: Path) -> list[str]:
    kdir = spool / KEYWORD
    if not kdir.is_dir():
        return []
    return [p.name for p in kdir.iterdir() if not p.name.startswith(".")]


def partial_bytes(store_dir: Path) -> int:
    total = 0
    pdir = store_dir / ".dlogd-partial"
    for name in partials(store_dir):
        try:
            total += (pdir / name).stat().st_size
        except FileNotFoundError:
            continue
    return total


def rss_kib(pid: int) -> int:
    """Resident memory of a running process (VmRSS), 0 if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    return int(match.group(1)) if match else 0


def trial_root(base: Path, seed: int) -> Path:
    root = base / f"seed-{seed}"
    root.mkdir()
    return root


def discard(root: Path) -> None:
    """A passing trial's files go (disk space); a failing one's stay for a look."""
    shutil.rmtree(root, ignore_errors=True)
