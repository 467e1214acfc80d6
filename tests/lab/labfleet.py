"""Put a dlogd fleet onto booted lab hosts: PKI, configs, users, units.

Place in the flow: between :mod:`labhosts` (bare systemd hosts) and the lab
scenarios (tests/lab/test_lab_shipping.py) and ``scripts/lab-demo.py``. It
does what an operator (or Ansible) does on a real fleet: mint a CA and one
certificate per host on this machine with :mod:`dlogd.pki`, copy them to
``/etc/dlogd/tls`` on each host, write ``client.conf`` on the clients and
``server.conf`` on the collector, run ``scripts/install.sh``, refresh the
config cache as root (the sandboxed services cannot write /var/cache) and
enable the units, so that everything also comes back after a reboot.

It also holds the few actions the scenarios and the demo share: submitting
as a given user through the C library and through Python, and asking a
host's journal for dlogd's own records.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from labhosts import Lab, LabError, LabHost, in_lab, wait_until

from dlogd import pki

KEYWORD = "audit"
COLLECTOR = "logs1"
CLIENTS = ("web1", "web2")
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
# Test-only timer: the shipped one waits a minute after boot and between runs.
FAST_TIMER_DROPIN = "/etc/systemd/system/dlogd-ship.timer.d/50-lab-fast.conf"
FAST_TIMER_SECONDS = 5
CLIENT_UNITS = ("dlogd-submit.socket", "dlogd-ship.path", "dlogd-ship.timer")
SERVER_UNITS = ("dlogd-receive.socket",)
# The app's view of dlogd: the system interpreter importing the checkout.
# Only dlogd.client is needed, which is standard library only.
APP_PYTHON = "/usr/bin/python3"


@dataclass(frozen=True)
class Fleet:
    """The installed fleet: which host plays which role, and what it runs."""

    lab: Lab
    checkout: Path
    alice_uid: int

    @property
    def collector(self) -> LabHost:
        return self.lab[COLLECTOR]

    @property
    def clients(self) -> tuple[LabHost, ...]:
        return tuple(self.lab[name] for name in CLIENTS)

    def store_dir(self, client: str, keyword: str = KEYWORD) -> str:
        """Where the collector keeps ``client``'s files of ``keyword``."""
        return f"/var/log/remote/{client}/{keyword}"

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


def make_pki(directory: Path, lab: Lab) -> None:
    """A CA and a certificate per lab host, naming it and its address."""
    ca = pki.make_ca(directory, "dlogd lab CA")
    for host in lab.hosts.values():
        pki.make_host_cert(ca, host.name, directory, ip_addresses=[host.address])


def install_fleet(
    lab: Lab, checkout: Path, venv: Path, pki_dir: Path, *, fast_timer: bool = False
) -> Fleet:
    """Install and start dlogd on every lab host; returns the :class:`Fleet`.

    ``fast_timer`` adds a drop-in that runs the retry timer 5 s after boot
    and 5 s after each drain instead of a minute (for tests; the shipper's
    own backoff still decides whether a run connects).
    """
    build_clib(checkout)
    if not (pki_dir / "ca.crt").exists():
        make_pki(pki_dir, lab)
    collector = lab[COLLECTOR]
    collector.install_dlogd("server", checkout, venv)
    install_tls(collector, pki_dir)
    write_config(collector, SERVER_CONF, server_config(lab), "--server")
    start_units(collector, SERVER_UNITS)
    pin = pki.fingerprint(pki_dir / f"{COLLECTOR}.crt")
    uids = set()
    for name in CLIENTS:
        client = lab[name]
        client.install_dlogd("client", checkout, venv)
        alice_uid = add_test_users(client)
        uids.add(alice_uid)
        install_tls(client, pki_dir)
        make_checkout_reachable(client, in_lab(checkout))
        if fast_timer:
            client.write_file(FAST_TIMER_DROPIN, fast_timer_dropin())
            client.run(["systemctl", "daemon-reload"])
        config = client_config(alice_uid, collector, pin)
        write_config(client, CLIENT_CONF, config, "--client")
        start_units(client, CLIENT_UNITS)
        client.run(["systemctl", "start", "dlogd.socket"])
    if len(uids) != 1:
        raise LabError(f"alice has different uids on the clients: {sorted(uids)}")
    return Fleet(lab, checkout, uids.pop())


def build_clib(checkout: Path) -> None:
    """Build the C test program in the checkout (the hosts see it through their overlay)."""
    done = subprocess.run(
        ["make", "-s", "-C", str(checkout / "clib"), "test-program"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise LabError(f"make -C clib test-program failed:\n{done.stdout}{done.stderr}")


def install_tls(host: LabHost, pki_dir: Path) -> None:
    """``/etc/dlogd/tls``: CA and host certificate public, the key for group dlogd only."""
    host.run(["install", "-d", "-m", "0750", "-o", "root", "-g", "dlogd", TLS_DIR])
    host.write_file(f"{TLS_DIR}/ca.crt", (pki_dir / "ca.crt").read_bytes(), 0o644)
    host.write_file(f"{TLS_DIR}/host.crt", (pki_dir / f"{host.name}.crt").read_bytes(), 0o644)
    key = (pki_dir / f"{host.name}.key").read_bytes()
    host.write_file(f"{TLS_DIR}/host.key", key, 0o640, owner="root:dlogd")


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


def fast_timer_dropin() -> str:
    # An empty OnBootSec= clears every monotonic trigger of the unit first.
    return (
        "# Lab tests only: retry every few seconds instead of every minute.\n"
        "[Timer]\nOnBootSec=\n"
        f"OnBootSec={FAST_TIMER_SECONDS}s\nOnUnitInactiveSec={FAST_TIMER_SECONDS}s\n"
        "AccuracySec=100ms\nRandomizedDelaySec=0\n"
    )


def client_config(alice_uid: int, collector: LabHost, pin: str) -> str:
    return f"""# dlogd lab client: ships "{KEYWORD}" to {collector.name}
retry {{ min {RETRY_MIN}; max {RETRY_MAX}; }}
limits {{ timeout {CLIENT_TIMEOUT}s; }}
keyword "{KEYWORD}" {{
    uid {alice_uid};
    group "{PERMITTED_GROUP}";
    host "{collector.name}";
}}
host "{collector.name}" {{
    address "{collector.address}";
    port {PORT};
    fingerprint "sha256:{pin}";
}}
"""


def server_config(lab: Lab) -> str:
    senders = "".join(
        f'    host "{name}" dir "/var/log/remote/{name}/{KEYWORD}";\n' for name in CLIENTS
    )
    hosts = "".join(f'host "{name}" {{ address "{lab[name].address}"; }}\n' for name in CLIENTS)
    return f'# dlogd lab collector\nkeyword "{KEYWORD}" {{\n{senders}}}\n{hosts}'


def write_config(host: LabHost, path: str, text: str, role_flag: str) -> None:
    """Write a config readable by group dlogd and refresh the services' cache."""
    host.write_file(path, text, 0o640, owner="root:dlogd")
    host.run(["dlogctl", "check-config", role_flag, path, "--write-cache"])
    role = role_flag.removeprefix("--")
    fresh = host.run(f"find /var/cache/dlogd -name '{role}-*.json' -newer {path}").stdout
    if not fresh.strip():
        raise LabError(f"{host.name}: check-config --write-cache wrote no {role} cache")


def start_units(host: LabHost, units: Sequence[str]) -> None:
    """Enable (so they come back after a reboot) and start the role's triggers."""
    host.run(["systemctl", "enable", "--now", *units])


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
    done = host.run(f"stat -c %.6Y {path} && cat {path}", check=False)
    if done.returncode != 0:
        return None
    mtime, _, text = done.stdout.partition("\n")
    state: dict[str, float] = {k: float(v) for k, v in json.loads(text).items() if k != "error"}
    state["mtime"] = float(mtime)
    return state
