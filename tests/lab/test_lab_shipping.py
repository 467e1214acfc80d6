"""Lab scenarios: dlogd's real services under the real units, end to end.

Place in the flow: the top of the test pyramid. Files are submitted on web1
and web2 by ordinary users through libdlogd and the Python client, spooled by
socket-activated ``dlogd-submit@``, drained by ``dlogd-ship`` (started by its
path unit and timer) over mutual TLS to ``dlogd-receive@`` on logs1, and
checked there byte for byte and in both hosts' journals. The faults are real
too: a stopped collector socket, a cut cable, a reboot with a backlog.

The fleet (tests/lab/labfleet.py) runs the retry timer every 5 s (a test
drop-in) and the shipper's backoff with ``retry { min 2; max 8; }``.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
from labfleet import (
    COLLECTOR,
    FAST_TIMER_SECONDS,
    KEYWORD,
    RETRY_MAX,
    RETRY_MIN,
    Fleet,
    listing,
    records,
    retry_state,
    sha256s,
    spool_entries,
    wait_for_files,
)
from labhosts import LabError, LabHost, wait_until

from dlogd import journal

# Worst case from a fault's end to delivery: the backoff's cap, then the timer.
RECOVERY_TIMEOUT = RETRY_MAX * 1.25 + FAST_TIMER_SECONDS + 15
JITTER = (0.75, 1.25)  # the shipper's documented spread around each delay
CLOCK_SLACK = 0.2  # stat's mtime and time.time() inside the service differ a little


@dataclass(frozen=True)
class Submitted:
    """One file submitted on a client: where it came from and its spool entry name."""

    path: str
    name: str  # the entry's file name, which is also its name on the collector


def app_file(host: LabHost, user: str, name: str, size: int) -> str:
    """A file of random bytes in ``user``'s home, private to that user."""
    path = f"/home/{user}/{name}"
    host.write_file(path, secrets.token_bytes(size), 0o600, owner=user)
    return path


def accepted(answers: list[str], paths: list[str]) -> list[Submitted]:
    """Pair submit answers ("OK audit/NAME") with their paths; fail on any refusal."""
    assert len(answers) == len(paths), answers
    assert all(a.startswith(f"OK {KEYWORD}/") for a in answers), answers
    return [Submitted(p, a.split("/", 1)[1]) for a, p in zip(answers, paths, strict=True)]


def assert_arrived_identical(fleet: Fleet, client: LabHost, files: list[Submitted]) -> None:
    """Every file is in the client's directory on the collector, byte-identical."""
    store = fleet.store_dir(client.name)
    wait_for_files(fleet.collector, store, [f.name for f in files], RECOVERY_TIMEOUT)
    sent = sha256s(client, [f.path for f in files])
    stored = sha256s(fleet.collector, [f"{store}/{f.name}" for f in files])
    assert {f.name: sent[f.path.rsplit("/", 1)[1]] for f in files} == stored


def dlogd_failed_units(host: LabHost) -> list[str]:
    return [u for u in host.failed() if u.startswith("dlogd")]


@pytest.fixture
def timer_stopped(fleet: Fleet) -> Iterator[Fleet]:
    """web1 without its retry timer: only the path unit can start a drain."""
    web1 = fleet.lab["web1"]
    web1.run(["systemctl", "stop", "dlogd-ship.timer"])
    try:
        yield fleet
    finally:
        web1.run(["systemctl", "start", "dlogd-ship.timer"])


def test_permitted_users_files_arrive_byte_identical_and_are_journalled(
    timer_stopped: Fleet,
) -> None:
    fleet = timer_stopped
    web1, logs1 = fleet.lab["web1"], fleet.collector
    started = time.time()
    c_path = app_file(web1, "alice", "from-c.log", 300_000)
    py_path = app_file(web1, "alice", "from-python.log", 0)
    bob_path = app_file(web1, "bob", "from-bob.log", 70_000)
    files = accepted(fleet.submit_c(web1, "alice", KEYWORD, c_path), [c_path])
    files += accepted(fleet.submit_py(web1, "alice", KEYWORD, py_path), [py_path])
    files += accepted(fleet.submit_py(web1, "bob", KEYWORD, bob_path), [bob_path])

    # Nobody starts dlogd-ship here and its timer is stopped: the path unit must.
    assert_arrived_identical(fleet, web1, files)
    bob_uid = web1.run(["id", "-u", "bob"]).stdout.strip()
    uids = [str(fleet.alice_uid), str(fleet.alice_uid), bob_uid]
    for file, uid in zip(files, uids, strict=True):
        submitted = records(web1, journal.SUBMIT_ACCEPTED, since=started, keyword=KEYWORD,
                            entry=f"{KEYWORD}/{file.name}")  # fmt: skip
        assert [r["DLOGD_UID"] for r in submitted] == [uid], web1.journal_text()
        sent = records(web1, journal.SHIP_SENT, since=started, file=file.name, host=COLLECTOR)
        assert len(sent) == 1, web1.journal_text()
        stored = records(logs1, journal.RECEIVE_STORED, since=started, file=file.name)
        assert [(r["DLOGD_HOST"], r["DLOGD_SHA256"]) for r in stored] == [
            ("web1", sent[0]["DLOGD_SHA256"])
        ], logs1.journal_text()
    assert not {f.name for f in files} & set(spool_entries(web1))
    assert dlogd_failed_units(web1) == dlogd_failed_units(logs1) == []


def test_refused_submits_are_journalled_and_never_shipped(fleet: Fleet) -> None:
    web1, logs1 = fleet.lab["web1"], fleet.collector
    started = time.time()
    secret = app_file(web1, "mallory", "mallory.log", 1000)
    mine = app_file(web1, "alice", "wrong-keyword.log", 1000)

    [c_answer] = fleet.submit_c(web1, "mallory", KEYWORD, secret)
    [py_answer] = fleet.submit_py(web1, "mallory", KEYWORD, secret)
    [unknown] = fleet.submit_c(web1, "alice", "nosuchkeyword", mine)
    assert c_answer.startswith("ERR EACCES "), c_answer
    assert py_answer.startswith("ERR EACCES PermissionDenied"), py_answer
    assert unknown.startswith("ERR ENOENT "), unknown

    mallory_uid = web1.run(["id", "-u", "mallory"]).stdout.strip()
    refused = records(web1, journal.SUBMIT_REFUSED, since=started, uid=mallory_uid)
    assert [(r["DLOGD_KEYWORD"], r["DLOGD_REASON"]) for r in refused] == [
        (KEYWORD, "PERMISSION_DENIED")
    ] * 2, web1.journal_text()
    refused = records(web1, journal.SUBMIT_REFUSED, since=started, keyword="nosuchkeyword")
    assert [r["DLOGD_REASON"] for r in refused] == ["UNKNOWN_KEYWORD"], web1.journal_text()

    # A permitted file submitted afterwards goes through the same drain: once
    # it has arrived, anything queued before it would have arrived too.
    marker = app_file(web1, "alice", "after-refusals.log", 100)
    assert_arrived_identical(fleet, web1, accepted(fleet.submit_py(web1, "alice", KEYWORD, marker), [marker]))  # fmt: skip
    arrived = listing(logs1, fleet.store_dir("web1")) + listing(logs1, "/var/log/remote")
    assert not [
        n for n in arrived if "mallory" in n or "wrong-keyword" in n or n == "nosuchkeyword"
    ]
    spooled = listing(web1, f"/var/spool/dlogd/{KEYWORD}") + listing(web1, "/var/spool/dlogd")
    assert not [n for n in spooled if "mallory" in n or "wrong-keyword" in n or "nosuch" in n]
    assert not records(web1, journal.SHIP_SENT, since=started, file="mallory.log")


def test_files_with_identical_content_in_one_drain_are_each_stored_first_time(
    fleet: Fleet,
) -> None:
    """Two empty files (or a log and its copy) are everyday cases, not edge cases."""
    web1 = fleet.lab["web1"]
    started = time.time()
    paths = [app_file(web1, "alice", f"twin-{n}.log", 0) for n in range(2)]
    files = accepted(fleet.submit_py(web1, "alice", KEYWORD, *paths), paths)
    assert_arrived_identical(fleet, web1, files)
    failed = records(web1, journal.SHIP_FAILED, since=started)
    assert [r["MESSAGE"] for r in failed] == []


# -- the collector unreachable -------------------------------------------------


def stop_collector_socket(fleet: Fleet) -> Callable[[], None]:
    fleet.collector.run(["systemctl", "stop", "dlogd-receive.socket"])

    def restart() -> None:
        fleet.collector.run(["systemctl", "start", "dlogd-receive.socket"])

    return restart


def cut_collector_link(fleet: Fleet) -> Callable[[], None]:
    fleet.lab.cut_link(COLLECTOR)
    return lambda: fleet.lab.restore_link(COLLECTOR)


FAULTS = {"socket-stopped": stop_collector_socket, "link-cut": cut_collector_link}


@pytest.fixture(params=sorted(FAULTS))
def outage(request: pytest.FixtureRequest, fleet: Fleet) -> Iterator[Callable[[], None]]:
    """The collector unreachable from web1; yields the function that ends it."""
    web1 = fleet.lab["web1"]
    wait_out_backoff(web1)
    end = FAULTS[request.param](fleet)
    ended = False

    def end_once() -> None:
        nonlocal ended
        if not ended:
            ended = True
            end()

    try:
        yield end_once
    finally:
        end_once()


def wait_out_backoff(host: LabHost) -> None:
    """Start from a clean slate: an earlier test's retry must have succeeded first."""
    wait_until(lambda: retry_state(host) is None, RECOVERY_TIMEOUT,
               f"{host.name} to finish backing off from an earlier test")  # fmt: skip


def finished_ship_run(host: LabHost) -> dict[str, str]:
    """How the last dlogd-ship run ended (waits while one is running)."""
    show = ["systemctl", "show", "-p", "ActiveState,ExecMainStatus,Result", "dlogd-ship"]
    props: dict[str, str] = {}

    def idle() -> bool:
        lines = host.run(show).stdout.splitlines()
        props.update(line.partition("=")[::2] for line in lines)
        return props.get("ActiveState") == "inactive"

    wait_until(idle, 15, f"dlogd-ship on {host.name} to finish a run")
    return props


def collect_backoff(host: LabHost, failures: int, timeout: float) -> list[dict[str, float]]:
    """Every distinct retry state the shipper writes until ``failures`` is reached."""
    seen: list[dict[str, float]] = []

    def reached() -> bool:
        state = retry_state(host)
        if state is not None and (not seen or state != seen[-1]):
            seen.append(state)
        return bool(seen) and seen[-1]["failures"] >= failures

    try:
        wait_until(reached, timeout, f"{failures} failed attempts on {host.name}", interval=0.2)
    except LabError as err:
        raise LabError(f"{err}; states {seen}\n{host.journal_text()}") from None
    return seen


def test_collector_outage_backs_off_keeps_accepting_and_delivers_afterwards(
    fleet: Fleet, outage: Callable[[], None]
) -> None:
    web1 = fleet.lab["web1"]
    started = time.time()
    first = app_file(web1, "alice", "during-outage-1.log", 50_000)
    files = accepted(fleet.submit_py(web1, "alice", KEYWORD, first), [first])

    states = collect_backoff(web1, failures=3, timeout=45)
    second = app_file(web1, "alice", "during-outage-2.log", 50_000)
    files += accepted(fleet.submit_c(web1, "alice", KEYWORD, second), [second])

    assert [s["failures"] for s in states] == [1, 2, 3], states
    delays = [s["next"] - s["mtime"] for s in states]
    nominal = [min(RETRY_MAX, RETRY_MIN * 2**n) for n in range(3)]
    for delay, base in zip(delays, nominal, strict=True):
        assert base * JITTER[0] - CLOCK_SLACK <= delay <= min(RETRY_MAX, base * JITTER[1]) + CLOCK_SLACK, delays  # fmt: skip
    assert delays == sorted(delays), delays
    # Honoured, not bypassed: no attempt before the time the previous one set.
    for before, after in itertools.pairwise(states):
        assert after["mtime"] >= before["next"] - CLOCK_SLACK, states
    retries = records(web1, journal.SHIP_RETRY, since=started, host=COLLECTOR)
    assert len(retries) >= 3, web1.journal_text()

    # Exit 75 is not a failure: the last run said "retry later" and the unit is fine.
    last_run = finished_ship_run(web1)
    assert (last_run["ExecMainStatus"], last_run["Result"]) == ("75", "success"), last_run
    assert dlogd_failed_units(web1) == []
    assert {f.name for f in files} <= set(spool_entries(web1))

    outage()
    assert_arrived_identical(fleet, web1, files)
    wait_until(lambda: retry_state(web1) is None, 10, "web1 to clear its retry state")
    assert dlogd_failed_units(web1) == dlogd_failed_units(fleet.collector) == []


# -- many files, two clients -----------------------------------------------------

BATCH = 200


def make_batch(host: LabHost, user: str) -> list[str]:
    """BATCH files of different random sizes, made in one go inside the host."""
    directory = f"/home/{user}/batch-{host.name}"
    script = (
        f"mkdir -p {directory} && cd {directory} && for i in $(seq {BATCH}); do "
        f"head -c $((i * 97)) /dev/urandom > {host.name}-$i.log; done"
    )
    host.run(["sh", "-c", script], user=user)
    return [f"{directory}/{host.name}-{i}.log" for i in range(1, BATCH + 1)]


def test_two_clients_ship_batches_at_once_none_missing_none_duplicated(fleet: Fleet) -> None:
    clients, logs1 = fleet.clients, fleet.collector
    started = time.time()
    batches = {host.name: make_batch(host, "alice") for host in clients}

    def submit(host: LabHost) -> list[Submitted]:
        paths = batches[host.name]
        return accepted(fleet.submit_py(host, "alice", KEYWORD, *paths), paths)

    with ThreadPoolExecutor(len(clients)) as pool:
        submitted = dict(zip([h.name for h in clients], pool.map(submit, clients), strict=True))

    for host in clients:
        files = submitted[host.name]
        assert_arrived_identical(fleet, host, files)
        # Exactly these: nothing doubled under another name, nothing in the wrong place.
        in_store = listing(logs1, fleet.store_dir(host.name))
        assert sorted(n for n in in_store if f".{host.name}-" in n) == sorted(f.name for f in files)
        stored = records(logs1, journal.RECEIVE_STORED, since=started, host=host.name)
        assert sorted(r["DLOGD_FILE"] for r in stored) == sorted(f.name for f in files)
    for host in clients:
        other = next(h for h in clients if h is not host)
        misplaced = [
            n for n in listing(logs1, fleet.store_dir(host.name)) if f".{other.name}-" in n
        ]
        assert misplaced == []
    assert dlogd_failed_units(logs1) == []


# -- reboot with a backlog ---------------------------------------------------------


def test_backlog_in_the_spool_drains_after_the_client_reboots(fleet: Fleet) -> None:
    web1, logs1 = fleet.lab["web1"], fleet.collector
    wait_out_backoff(web1)
    restart_collector = stop_collector_socket(fleet)
    try:
        paths = [app_file(web1, "alice", f"before-reboot-{i}.log", 20_000) for i in range(3)]
        files = accepted(fleet.submit_py(web1, "alice", KEYWORD, *paths), paths)
        collect_backoff(web1, failures=1, timeout=20)

        web1.reboot()
        units = ["dlogd-submit.socket", "dlogd-ship.path", "dlogd-ship.timer"]
        active = web1.run(["systemctl", "is-active", *units], check=False).stdout.split()
        assert active == ["active"] * len(units), web1.journal_text()
        assert {f.name for f in files} <= set(spool_entries(web1))
    finally:
        restart_collector()
    # No submit after the reboot: the timer's boot trigger must find the backlog.
    assert_arrived_identical(fleet, web1, files)
    assert not {f.name for f in files} & set(spool_entries(web1))
    assert dlogd_failed_units(web1) == dlogd_failed_units(logs1) == []
