"""Roll a dlogd fleet out onto booted lab hosts with ``ansible-playbook site.yml``.

Place in the flow: between :mod:`labhosts` (bare systemd hosts with sshd)
and the lab scenarios (tests/lab/test_lab_*.py) and ``scripts/lab-demo.py``.
It does what an operator does: write an inventory (the lab's three hosts in
the groups ``dlogd_collectors`` and ``dlogd_clients``) and the fleet
description in its group_vars, then run ``ansible/site.yml`` from this
machine over real SSH. Everything on the hosts (wheelhouse install, units,
CA and host certificates, configs, enabled units) is the playbook's work;
this module only makes the application's users (alice, bob, mallory) that a
host has before dlogd arrives.

It also holds the few actions the scenarios and the demo share: submitting
as a given user through the C library and through Python, and asking a
host's journal for dlogd's own records.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labhosts import DEFAULT_HOSTS, REPO, Lab, LabError, LabHost, in_lab, wait_until

KEYWORD = "audit"
COLLECTOR = "logs1"
CLIENTS = ("web1", "web2")
# The tests' lab has one more client, outside the inventory until the test
# that adds it (the demo boots only DEFAULT_HOSTS).
SPARE_CLIENT = "web3"
TEST_HOSTS = {**DEFAULT_HOSTS, SPARE_CLIENT: "192.0.2.13"}
PORT = 7878
TLS_DIR = "/etc/dlogd/tls"
CLIENT_CONF = "/etc/dlogd/client.conf"
SERVER_CONF = "/etc/dlogd/server.conf"
SPOOL = "/var/spool/dlogd"
RETRY_MIN, RETRY_MAX = 2, 8  # seconds: backoff observable within a test
# A cut cable is only noticed when connect() or a read times out.
CLIENT_TIMEOUT = 5
PERMITTED_GROUP = "auditors"
# alice is listed by uid, bob is in PERMITTED_GROUP, mallory is neither.
USERS = ("alice", "bob", "mallory")
CLIB_PROGRAM = Path("clib/build/dlogd-submit-test")
# The retry timer runs this often in the lab (dlogd_client_timer_interval);
# the shipped unit waits a minute after boot and between runs.
FAST_TIMER_SECONDS = 5
CLIENT_UNITS = ("dlogd-submit.socket", "dlogd-ship.path", "dlogd-ship.timer")
SERVER_UNITS = ("dlogd-receive.socket",)
# The app's view of dlogd: the system interpreter importing the checkout.
# Only dlogd.client is needed, which is standard library only.
APP_PYTHON = "/usr/bin/python3"
RECAP_LINE = re.compile(
    r"^(?P<host>\S+)\s+:\s+ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+"
    r"unreachable=(?P<unreachable>\d+)\s+failed=(?P<failed>\d+)\s+skipped=(?P<skipped>\d+)\s+"
    r"rescued=(?P<rescued>\d+)\s+ignored=(?P<ignored>\d+)",
    re.MULTILINE,
)


@dataclass(frozen=True)
class PlaybookRun:
    """One ``ansible-playbook`` run: its exit status, output, recap and duration."""

    argv: list[str]
    returncode: int
    output: str
    seconds: float

    @property
    def recap(self) -> dict[str, dict[str, int]]:
        """PLAY RECAP counts per host: ``{"web1": {"ok": 30, "changed": 0, ...}}``."""
        tail = self.output.rsplit("PLAY RECAP", 1)[-1]
        return {
            m["host"]: {k: int(v) for k, v in m.groupdict().items() if k != "host"}
            for m in RECAP_LINE.finditer(tail)
        }

    @property
    def recap_text(self) -> str:
        return (
            "PLAY RECAP" + self.output.rsplit("PLAY RECAP", 1)[-1]
            if "PLAY RECAP" in self.output
            else ""
        )

    def changed(self) -> dict[str, int]:
        return {host: counts["changed"] for host, counts in self.recap.items()}

    def check(self) -> PlaybookRun:
        """This run, if it succeeded on every host; else :class:`LabError` with its output."""
        failed = {h: c for h, c in self.recap.items() if c["failed"] or c["unreachable"]}
        if self.returncode != 0 or failed or not self.recap:
            raise LabError(
                f"{' '.join(self.argv)} failed ({self.returncode}):\n{self.output[-6000:]}"
            )
        return self


@dataclass(frozen=True)
class Fleet:
    """The rolled-out fleet: which host plays which role, and how to roll out again."""

    lab: Lab
    checkout: Path
    alice_uid: int
    inventory_dir: Path
    first_run: PlaybookRun
    source: Path  # the snapshot of the checkout that the rollouts install

    @property
    def collector(self) -> LabHost:
        return self.lab[COLLECTOR]

    @property
    def clients(self) -> tuple[LabHost, ...]:
        return tuple(self.lab[name] for name in CLIENTS)

    def store_dir(self, client: str, keyword: str = KEYWORD) -> str:
        """Where the collector keeps ``client``'s files of ``keyword``."""
        return f"/var/log/remote/{client}/{keyword}"

    def description(self) -> dict[str, Any]:
        """The lab's fleet description (group_vars/all), as the fixture wrote it."""
        return {
            **lab_fleet_vars(self.alice_uid, fast_timer=True),
            **install_vars(self.checkout, self.source),
        }

    def rollout(
        self,
        *args: str,
        fleet_vars: Mapping[str, Any] | None = None,
        host_vars: Mapping[str, Mapping[str, Any]] | None = None,
        clients: Sequence[str] = CLIENTS,
    ) -> PlaybookRun:
        """Write the inventory (default: the lab's description) and run site.yml with ``args``."""
        description = fleet_vars or self.description()
        write_inventory(self.inventory_dir, self.lab, description, host_vars, clients=clients)
        return run_playbook(self.lab, self.source, self.inventory_dir, *args)

    def submit_c(self, host: LabHost, user: str, keyword: str, *paths: str) -> list[str]:
        """Submit through libdlogd as ``user``; one "OK entry" / "ERR NAME msg" per path."""
        program = str(in_lab(self.checkout / CLIB_PROGRAM))
        done = host.run([program, keyword, *paths], user=user, check=False)
        if done.returncode not in (0, 1):
            raise LabError(f"{host.name}: {program} exited {done.returncode}: {done.stderr}")
        return done.stdout.splitlines()

    def submit_py(self, host: LabHost, user: str, keyword: str, *paths: str) -> list[str]:
        """Submit with ``dlogd.submit_many`` as ``user``; answers as :meth:`submit_c` gives."""
        code = (
            "import errno, sys, dlogd.client\n"
            "for r in dlogd.client.submit_many(sys.argv[2:], sys.argv[1]):\n"
            "    print(f'OK {r.entry}' if isinstance(r, dlogd.client.Submitted) else\n"
            "          f'ERR {errno.errorcode.get(r.errno, r.errno)} {type(r).__name__}: {r}')\n"
        )
        done = host.run(
            [APP_PYTHON, "-c", code, keyword, *paths],
            user=user,
            env={"PYTHONPATH": str(in_lab(self.checkout))},
        )
        return done.stdout.splitlines()


def lab_fleet_vars(alice_uid: int, *, fast_timer: bool) -> dict[str, Any]:
    """The lab's fleet description: "audit" from both clients to logs1, pinned.

    ``fast_timer`` runs the retry timer every 5 s instead of every minute (for
    tests; the shipper's own backoff still decides whether a run connects).
    """
    return {
        "dlogd_keywords": [{"name": KEYWORD, "collectors": ["dlogd_collectors"]}],
        "dlogd_submitters": [
            {
                "keyword": KEYWORD,
                "hosts": ["dlogd_clients"],
                "uids": [alice_uid],
                "groups": [PERMITTED_GROUP],
            },
        ],
        "dlogd_pin_fingerprints": True,
        "dlogd_client_retry": {"min": RETRY_MIN, "max": RETRY_MAX},
        "dlogd_client_limits": {"timeout": f"{CLIENT_TIMEOUT}s"},
        "dlogd_client_timer_interval": f"{FAST_TIMER_SECONDS}s" if fast_timer else "",
    }


def write_inventory(
    directory: Path,
    lab: Lab,
    fleet_vars: Mapping[str, Any],
    host_vars: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    collectors: Sequence[str] = (COLLECTOR,),
    clients: Sequence[str] = CLIENTS,
) -> Path:
    """hosts.yml and group_vars/all.yml for the lab (JSON, which YAML reads).

    The CA and the record of issued certificates go to ``directory/pki``.
    """
    ssh_args = " ".join(lab.ssh_options())

    def host_entry(name: str) -> dict[str, Any]:
        entry = {"ansible_host": lab[name].address, "ansible_user": "root",
                 "ansible_ssh_common_args": ssh_args}  # fmt: skip
        return {**entry, **(host_vars or {}).get(name, {})}

    hosts = {"all": {"children": {
        "dlogd_collectors": {"hosts": {n: host_entry(n) for n in collectors}},
        "dlogd_clients": {"hosts": {n: host_entry(n) for n in clients}},
    }}}  # fmt: skip
    (directory / "group_vars").mkdir(parents=True, exist_ok=True)
    (directory / "hosts.yml").write_text(json.dumps(hosts, indent=2) + "\n")
    (directory / "group_vars" / "all.yml").write_text(json.dumps(fleet_vars, indent=2) + "\n")
    return directory / "hosts.yml"


def run_playbook(lab: Lab, checkout: Path, inventory_dir: Path, *args: str) -> PlaybookRun:
    """``ansible-playbook site.yml`` from ``checkout/ansible``, in the control node's namespace.

    ``checkout`` is the session's snapshot (:func:`snapshot`): roles and
    payload from one version, whatever is edited in the working tree meanwhile.
    """
    bindir = Path(sys.executable).parent
    argv = lab.on_control_node([str(bindir / "ansible-playbook"), "-i",
                                str(inventory_dir / "hosts.yml"), "site.yml", *args])  # fmt: skip
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(checkout / "ansible" / "ansible.cfg"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "PATH": f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
    }
    started = time.monotonic()
    done = subprocess.run(argv, cwd=checkout / "ansible", env=env, capture_output=True,
                          text=True, check=False, timeout=900)  # fmt: skip
    run = PlaybookRun(argv, done.returncode, done.stdout + done.stderr, time.monotonic() - started)
    record_playbook_run(run, list(args))
    return run


PLAYBOOK_LOG = REPO / "build" / "lab" / "playbook-runs.jsonl"


def record_playbook_run(run: PlaybookRun, args: list[str]) -> None:
    """One line per rollout (duration, recap) for docs/ansible.md's measured table."""
    PLAYBOOK_LOG.parent.mkdir(parents=True, exist_ok=True)
    line = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "args": args,
            "seconds": round(run.seconds, 1), "returncode": run.returncode,
            "changed": run.changed(), "load": os.getloadavg()[0]}  # fmt: skip
    with PLAYBOOK_LOG.open("a") as log:
        log.write(json.dumps(line) + "\n")


def snapshot(checkout: Path, directory: Path) -> Path:
    """Copy what the playbook and the install role take from a checkout into ``directory``.

    The session rolls out this one version, roles included: edits made to the
    checkout meanwhile (by whoever works in it) cannot make a no-change run
    change, nor pair new roles with an old payload.
    """
    keep = (
        "pyproject.toml",
        "README.md",
        "dlogd",
        "systemd",
        "clib",
        "docs",  # the payload installs the units' documentation and the man pages
        "ansible",
    )
    skip = shutil.ignore_patterns("__pycache__", "build", "*.o", "*.so")
    for item in keep:
        source, target = checkout / item, directory / item
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=skip)
        else:
            shutil.copy2(source, target)
    return directory


def install_vars(checkout: Path, source: Path) -> dict[str, str]:
    """Install from the session's snapshot; the wheelhouse stays in the checkout's build/."""
    return {
        "dlogd_install_source": str(source),
        "dlogd_install_wheelhouse": str(checkout / "build" / "ansible-wheelhouse"),
    }


def install_fleet(
    lab: Lab, checkout: Path, inventory_dir: Path, *, fast_timer: bool = False
) -> Fleet:
    """Roll dlogd out to every lab host with site.yml; returns the :class:`Fleet`."""
    build_clib(checkout)
    source = snapshot(checkout, inventory_dir / "source")
    build_wheelhouse(source, checkout / "build" / "ansible-wheelhouse")
    uids = set()
    for name in (*CLIENTS, *(n for n in [SPARE_CLIENT] if n in lab.hosts)):
        client = lab[name]
        uids.add(add_test_users(client))
        make_checkout_reachable(client, in_lab(checkout))
    if len(uids) != 1:
        raise LabError(f"alice has different uids on the clients: {sorted(uids)}")
    alice_uid = uids.pop()
    fleet_vars = {
        **lab_fleet_vars(alice_uid, fast_timer=fast_timer),
        **install_vars(checkout, source),
    }
    write_inventory(inventory_dir, lab, fleet_vars)
    first = run_playbook(lab, source, inventory_dir).check()
    return Fleet(lab, checkout, alice_uid, inventory_dir, first, source)


def build_wheelhouse(source: Path, wheelhouse: Path) -> None:
    """Fill the playbook's wheelhouse from this machine's network first.

    The playbook runs in the control node's lab namespace, which reaches the
    lab hosts and nothing else: its own build step then finds every
    dependency in the wheelhouse and works offline, as on a fleet without
    internet. Same script, same wheelhouse (dlogd_install_wheelhouse's default).
    """
    script = REPO / "ansible/roles/dlogd_install/files/build-payload.sh"
    done = subprocess.run(["sh", str(script), str(source), str(wheelhouse), sys.executable],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        raise LabError(f"{script} failed:\n{done.stderr[-3000:]}")


def build_clib(checkout: Path) -> None:
    """Build the C test program in the checkout (the hosts see it through their overlay)."""
    done = subprocess.run(
        ["make", "-s", "-C", str(checkout / "clib"), "all", "test-program"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise LabError(f"make -C clib test-program failed:\n{done.stdout}{done.stderr}")


def add_test_users(host: LabHost) -> int:
    """alice (listed by uid), bob (through group auditors), mallory; returns alice's uid."""
    host.run(f"getent group {PERMITTED_GROUP} >/dev/null || groupadd {PERMITTED_GROUP}")
    for user in USERS:
        extra = f"-G {PERMITTED_GROUP}" if user == "bob" else ""
        host.run(f"id -u {user} >/dev/null 2>&1 || useradd -m {extra} {user}")
    return int(host.run(["id", "-u", "alice"]).stdout)


def make_checkout_reachable(host: LabHost, checkout: Path) -> None:
    """Let unprivileged users run the checkout's programs inside the container.

    A checkout under /root (pyenv setups) is behind a 0700 directory; the
    change is made in the container's overlay only, never on this machine.
    """
    if checkout.is_relative_to("/root"):
        host.run(["chmod", "o+x", "/root"])


def unit_invocations(host: LabHost, units: Iterable[str]) -> dict[str, str]:
    """{unit: InvocationID}: a unit restarted since has a new one."""
    listed = list(units)
    out = host.run(["systemctl", "show", "-p", "Id,InvocationID", *listed]).stdout
    ids: dict[str, str] = {}
    for block in out.strip().split("\n\n"):
        props = dict(line.partition("=")[::2] for line in block.splitlines())
        ids[props["Id"]] = props["InvocationID"]
    return ids


# -- looking at what happened ---------------------------------------------------


def records(
    host: LabHost, message_id: str, /, *, since: float = 0.0, **fields: str
) -> list[dict[str, str]]:
    """dlogd's journal records with ``message_id`` whose DLOGD_* fields match.

    ``since`` is a Unix time: older records are left out (hosts share this
    machine's clock).
    """
    wanted = {f"DLOGD_{k.upper()}": v for k, v in fields.items()}
    return [
        e
        for e in host.journal("dlogd*")
        if e.get("MESSAGE_ID") == message_id
        and int(e["__REALTIME_TIMESTAMP"]) >= since * 1e6
        and all(e.get(k) == v for k, v in wanted.items())
    ]


def sha256s(host: LabHost, paths: Iterable[str]) -> dict[str, str]:
    """{basename: sha256} of ``paths`` inside ``host``."""
    listed = list(paths)
    if not listed:
        return {}
    out = host.run(["sha256sum", "--", *listed]).stdout
    pairs = (line.split(maxsplit=1) for line in out.splitlines())
    return {Path(name).name: digest for digest, name in pairs}


def listing(host: LabHost, directory: str) -> list[str]:
    """Entry names in ``directory`` (missing directory: none), dot entries included."""
    done = host.run(["ls", "-A", "--", directory], check=False)
    return done.stdout.split() if done.returncode == 0 else []


def spool_entries(host: LabHost, keyword: str = KEYWORD) -> list[str]:
    """Files waiting in the client's spool for ``keyword`` (markers excluded)."""
    return [n for n in listing(host, f"{SPOOL}/{keyword}") if not n.startswith(".")]


def wait_for_files(host: LabHost, directory: str, names: Iterable[str], timeout: float) -> None:
    """Wait until every name is in ``directory``; on timeout show the journals."""
    wanted = set(names)
    try:
        wait_until(lambda: wanted <= set(listing(host, directory)), timeout,
                   f"{len(wanted)} files in {host.name}:{directory}", interval=0.3)  # fmt: skip
    except LabError as err:
        missing = sorted(wanted - set(listing(host, directory)))
        raise LabError(f"{err}; missing {missing[:5]}...\n{host.journal_text()}") from None


def retry_state(host: LabHost, collector: str = COLLECTOR) -> dict[str, float] | None:
    """The shipper's backoff record for ``collector`` plus the file's mtime; None if absent."""
    path = f"{SPOOL}/.retry/{collector}.json"
    # The mtime and the content of one file: the shipper replaces it by rename, so
    # a stat and a cat apart could pair one version's mtime with the next's content.
    read = ("import os, sys\nwith open(sys.argv[1]) as f:\n"
            "    print(os.fstat(f.fileno()).st_mtime); print(f.read())")  # fmt: skip
    done = host.run([APP_PYTHON, "-c", read, path], check=False)
    if done.returncode != 0:
        return None
    mtime, _, text = done.stdout.partition("\n")
    state: dict[str, float] = {k: float(v) for k, v in json.loads(text).items() if k != "error"}
    state["mtime"] = float(mtime)
    return state
