"""Lab smoke test: the harness boots hosts, the install works, the units start.

Place in the flow: the last lab-tier module (its probes replace the
services); it runs on the fleet site.yml rolled out (the session's ``fleet``)
and on ``scripts/install.sh``, the by-hand wrapper over the same install
role. It checks the infrastructure, not dlogd's own services: the services'
sandboxes are exercised by small probe programs swapped in with drop-ins, so
this passes or fails on the units and the install alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from labfleet import Fleet
from labhosts import Lab, LabHost, in_lab, wait_until

PROBE_DIR = "/usr/local/lib/dlogd-probe"
CONNECT = "import socket, sys; socket.create_connection((sys.argv[1], 7878), timeout=5).close()"

# Each probe does what its service must be able to do inside its sandbox.
SUBMIT_PROBE = """
import ctypes, errno, os
# Another user's file, read-only to us, as a caller would pass it.
fd = os.open(os.environ.get("THEIRS", "/srv/dlogd-probe/theirs"), os.O_RDONLY | os.O_NOFOLLOW)
# linkat(fd, "", AT_FDCWD, new, AT_EMPTY_PATH): needs CAP_DAC_READ_SEARCH (the fd
# was opened by someone else), CAP_FOWNER (fs.protected_hardlinks) and one
# mount for both names. (Linking via /proc/self/fd gives EXDEV on this kernel.)
libc = ctypes.CDLL(None, use_errno=True)
new = b"/var/spool/dlogd/probe/linked"
if libc.linkat(fd, b"", -100, new, 0x1000) == 0:
    result = "linked"
else:
    result = errno.errorcode[ctypes.get_errno()]
with open("/var/spool/dlogd/probe/copied", "wb") as out:
    out.write(os.read(fd, 100))
with open("/var/spool/dlogd/probe/result", "w") as out:
    out.write(result)
# As Spool.announce does: the trigger file may be gone (each drain takes it).
os.close(os.open("/var/spool/dlogd/.submitted", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o640))
"""
SHIP_PROBE = """
import os, socket
from OpenSSL import SSL
# A Python verify callback is a cffi closure: must work under MemoryDenyWriteExecute.
SSL.Context(SSL.TLS_CLIENT_METHOD).set_verify(SSL.VERIFY_PEER, lambda *a: True)
# A spool entry; in hard-link mode it keeps its owner's 0600 mode.
fd = os.open("/var/spool/dlogd/probe/secret", os.O_RDONLY | os.O_NOFOLLOW)
data = os.read(fd, 100)
socket.create_connection(("192.0.2.10", 7878), timeout=5).close()
with open("/var/spool/dlogd/probe/ship-ok", "wb") as out:
    out.write(data)
"""
RECEIVE_PROBE = """
import os
# server.conf is root:dlogd 0640: readable through the supplementary group,
# even inside PrivateUsers=yes.
conf = open("/etc/dlogd/server.conf", "rb").read()
os.makedirs("/var/log/remote/probe", exist_ok=True)
with open("/var/log/remote/probe/ok", "wb") as out:
    out.write(conf)
"""


# The venv the install made on every host (dlogd_install_prefix).
HOST_PYTHON = Path("/opt/dlogd/venv/bin/python")


@pytest.fixture(scope="module")
def installed(fleet: Fleet) -> Lab:
    """web1 as a client, logs1 as a collector, as site.yml installed them."""
    return fleet.lab


def unit_names(host: LabHost, unit_glob: str) -> set[str]:
    """Units matching the glob that the journal has records about."""
    names: set[str] = set()
    for entry in host.journal(unit_glob, "UNIT", "_SYSTEMD_UNIT"):
        names.update(entry.values())
    return {n for n in names if Path(n).match(unit_glob)}


def tree_digest(host: LabHost) -> str:
    """Names, modes, owners, link targets and contents of what the install writes."""
    where = "/etc/systemd/system /usr/local/bin /etc/sysusers.d /etc/tmpfiles.d /etc/dlogd"
    listing = host.run(
        f"find {where} -path '*dlog*' -printf '%p %m %u %g %l\\n' | sort && "
        f"find {where} -path '*dlog*' -type f -exec sha256sum {{}} + | sort"
    ).stdout
    assert "/usr/local/bin/dlogd-submit" in listing
    return hashlib.sha256(listing.encode()).hexdigest()


def test_hosts_boot_resolve_each_other_and_share_the_checkout(lab: Lab, lab_checkout: Path) -> None:
    for host in lab.hosts.values():
        assert host.run(["hostname"]).stdout.strip() == host.name
        host.run(["test", "-f", str(in_lab(lab_checkout / "scripts" / "install.sh"))])
        for other in lab.hosts.values():
            assert host.run(["getent", "hosts", other.name]).stdout.split()[0] == other.address
    machine_ids = {h.read_file("/etc/machine-id") for h in lab.hosts.values()}
    assert len(machine_ids) == len(lab.hosts)


def test_install_creates_users_and_private_directories(installed: Lab) -> None:
    web1, logs1 = installed["web1"], installed["logs1"]
    modes = web1.run(
        "stat -c '%n %a %U %G' /var/spool/dlogd /var/lib/dlogd /etc/dlogd"
    ).stdout.splitlines()
    assert modes == [
        "/var/spool/dlogd 750 dlogd dlogd",
        "/var/lib/dlogd 750 dlogd dlogd",
        "/etc/dlogd 750 root dlogd",
    ]
    assert logs1.run("stat -c '%a %U' /var/log/remote").stdout.split() == ["750", "dlogd-recv"]
    assert "dlogd" in logs1.run(["id", "-nG", "dlogd-recv"]).stdout.split()
    # Enabled for real: the alias (from Alias=) and the link that starts the
    # socket at boot. A ready-made alias once made "is-enabled" say yes without
    # the second, so the role's enable step skipped it.
    alias, wanted = "dlogd.socket", "sockets.target.wants/dlogd-submit.socket"
    targets = web1.run(["readlink", *(f"/etc/systemd/system/{ln}" for ln in (alias, wanted))])
    assert targets.stdout.split() == ["/etc/systemd/system/dlogd-submit.socket"] * 2


def test_man_pages_are_installed_and_found_by_man(installed: Lab) -> None:
    web1 = installed["web1"]
    # Debian's /usr/local/man is a link to share/man, and man may name either.
    found = web1.run('readlink -f "$(man -w dlogctl)" "$(man -w 5 dlogd.conf)"').stdout.split()
    assert found == [
        "/usr/local/share/man/man1/dlogctl.1",
        "/usr/local/share/man/man5/dlogd.conf.5",
    ]
    page = web1.run(["man", "-P", "cat", "dlogctl"], env={"MANWIDTH": "80"}).stdout
    assert "dlogctl status" in page


def test_install_twice_changes_nothing(installed: Lab, lab_checkout: Path, lab_venv: Path) -> None:
    web1 = installed["web1"]
    before = tree_digest(web1)
    web1.install_dlogd("client", lab_checkout, lab_venv)
    assert tree_digest(web1) == before


@pytest.mark.parametrize("name", ["web1", "logs1"])
def test_installed_units_pass_systemd_analyze_verify(installed: Lab, name: str) -> None:
    host = installed[name]
    # Unit files only: verify loads an alias (dlogd.socket) through its target.
    units = host.run("find /etc/systemd/system -maxdepth 1 -type f -name 'dlogd*'")
    paths = sorted(units.stdout.split())
    assert paths, "the install installed no units"
    done = host.run(["systemd-analyze", "verify", "--man=no", *paths], check=False)
    assert done.returncode == 0, done.stderr
    assert "dlogd" not in done.stderr, done.stderr


def test_receive_socket_starts_an_instance_for_a_peer_across_the_bridge(installed: Lab) -> None:
    logs1, web1 = installed["logs1"], installed["web1"]
    logs1.run(["systemctl", "start", "dlogd-receive.socket"])
    web1.run(["python3", "-c", CONNECT, "logs1"])
    # The instance is named after both ends: it must carry web1's address.
    wait_until(
        lambda: any(web1.address in n for n in unit_names(logs1, "dlogd-receive@*.service")),
        15,
        "a dlogd-receive@ instance for web1's connection on logs1",
    )


def test_submit_socket_alias_starts_and_accepts_any_local_user(installed: Lab) -> None:
    web1 = installed["web1"]
    web1.run(["systemctl", "start", "dlogd.socket"])
    assert web1.run(["systemctl", "is-active", "dlogd-submit.socket"]).stdout.strip() == "active"
    assert web1.run(["systemctl", "show", "-P", "Id", "dlogd.socket"]).stdout.strip() == (
        "dlogd-submit.socket"
    )
    stat = web1.run("stat -c '%a %U %F' /run/dlogd /run/dlogd/submit.sock").stdout.splitlines()
    assert stat == ["755 root directory", "666 root socket"]
    connect = (
        "import socket; s = socket.socket(socket.AF_UNIX); s.connect('/run/dlogd/submit.sock')"
    )
    web1.run(["python3", "-c", connect], user="nobody")
    wait_until(
        lambda: bool(unit_names(web1, "dlogd-submit@*.service")),
        15,
        "a dlogd-submit@ instance on web1",
    )


def test_ship_path_keeps_watching_through_rapid_submits(installed: Lab) -> None:
    """More triggers than the default start limit (5 in 10 s) allows."""
    web1 = installed["web1"]
    web1.run(["systemctl", "start", "dlogd-ship.path"])
    triggers = 7
    for n in range(triggers):
        _trigger_and_wait_for_a_run(web1, f"ship run {n + 1} of {triggers}")
    assert web1.run(["systemctl", "is-active", "dlogd-ship.path"], check=False).stdout.strip() == (
        "active"
    )


def _trigger_and_wait_for_a_run(host: LabHost, what: str) -> None:
    finished = _finished_ship_jobs(host)
    host.run(["touch", "/var/spool/dlogd/.submitted"], user="dlogd")
    wait_until(lambda: _finished_ship_jobs(host) > finished, 15, what)


def _finished_ship_jobs(host: LabHost) -> int:
    entries = host.journal("dlogd-ship.service", "UNIT", "JOB_TYPE", "JOB_RESULT")
    return sum(1 for e in entries if e.get("JOB_TYPE") == "start" and "JOB_RESULT" in e)


def install_probe(host: LabHost, service: str, source: str, python: Path) -> None:
    """Swap ``service``'s ExecStart for ``source`` (a runtime drop-in)."""
    script = f"{PROBE_DIR}/{service}.py"
    host.write_file(script, source)
    dropin = f"[Service]\nExecStart=\nExecStart={python} -I {script}\n"
    host.write_file(f"/run/systemd/system/{service}.service.d/zz-probe.conf", dropin)
    host.run(["systemctl", "daemon-reload"])


def remove_probes(host: LabHost) -> None:
    host.run(
        "rm -rf /run/systemd/system/dlogd-*.d/zz-probe.conf /srv/dlogd-probe /var/spool/app "
        f"/var/spool/dlogd/probe /var/log/remote/probe {PROBE_DIR}"
        " && systemctl daemon-reload && systemctl reset-failed"
    )


@pytest.fixture
def probes(installed: Lab, lab_checkout: Path, lab_venv: Path) -> Iterator[Lab]:
    """web1 (copy mode), web2 (hard-link mode), logs1 with probes as services."""
    python = HOST_PYTHON
    web2 = installed["web2"]
    # Linking through /proc/self/fd fails (EXDEV) on overlayfs, whose files
    # live on its hidden upper mount: give web2 a real filesystem for both the
    # app's file and the spool, as /var/spool on one disk would be.
    web2.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/var/spool"])
    # The new file system needs the spool that tmpfiles makes at boot.
    web2.run(["systemd-tmpfiles", "--create", "/etc/tmpfiles.d/dlogd.conf"])
    web2.install_dlogd("client", lab_checkout, lab_venv, hardlink=True)
    web2.write_file(
        "/run/systemd/system/dlogd-submit@.service.d/zz-theirs.conf",
        "[Service]\nEnvironment=THEIRS=/var/spool/app/theirs\n",
    )
    logs1 = installed["logs1"]
    # The rollout's server.conf comes back afterwards: the lab's later tests
    # (the watch's) roll out to the clients only and need the collector as it was.
    server_conf = logs1.read_file("/etc/dlogd/server.conf")
    # Only the runs the probes start themselves: a timer's run in between would
    # run the ship probe against half-made probe files.
    quiet = ["dlogd-ship.path", "dlogd-ship.timer"]
    try:
        for name in ("web1", "web2"):
            installed[name].run(["systemctl", "stop", *quiet])
            install_probe(installed[name], "dlogd-submit@", SUBMIT_PROBE, python)
            install_probe(installed[name], "dlogd-ship", SHIP_PROBE, python)
        install_probe(installed["logs1"], "dlogd-receive@", RECEIVE_PROBE, python)
        logs1.write_file("/etc/dlogd/server.conf", b"# probe\n", 0o640)
        logs1.run(["chgrp", "dlogd", "/etc/dlogd/server.conf"])
        logs1.run(["systemctl", "start", "dlogd-receive.socket"])
        yield installed
    finally:
        logs1.write_file("/etc/dlogd/server.conf", server_conf, 0o640)
        logs1.run(["chgrp", "dlogd", "/etc/dlogd/server.conf"])
        for host in installed.hosts.values():
            remove_probes(host)
        for name in ("web1", "web2"):
            installed[name].run(["systemctl", "start", *quiet], check=False)
        web2.run("rm -f /run/systemd/system/dlogd-submit@.service.d/zz-theirs.conf")
        web2.run("umount /var/spool; systemctl daemon-reload", check=False)


def run_client_probes(
    host: LabHost, secret_owner: str, theirs: str = "/srv/dlogd-probe/theirs"
) -> str:
    """Submit and ship probes on ``host``; returns the submit probe's link result."""
    host.run("install -d -o dlogd -m 0750 /var/spool/dlogd/probe")
    host.write_file(theirs, b"theirs\n", 0o644, owner="nobody")
    host.write_file("/var/spool/dlogd/probe/secret", b"secret\n", 0o600, owner=secret_owner)
    host.run(["systemctl", "start", "dlogd-submit.socket"])
    connect = "import socket; socket.socket(socket.AF_UNIX).connect('/run/dlogd/submit.sock')"
    host.run(["python3", "-c", connect])
    host.wait_for_path("/var/spool/dlogd/probe/result", unit_glob="dlogd-submit@*")
    assert host.read_file("/var/spool/dlogd/probe/copied") == b"theirs\n"
    ship = host.run(["systemctl", "start", "dlogd-ship.service"], check=False)
    assert ship.returncode == 0, host.journal_text("dlogd-ship.service")
    assert host.read_file("/var/spool/dlogd/probe/ship-ok") == b"secret\n"
    return host.read_file("/var/spool/dlogd/probe/result").decode()


def test_copy_mode_sandbox_copies_ships_and_cannot_link(probes: Lab) -> None:
    # Own mount namespace and no capabilities: the link is refused (EXDEV, as
    # the spool is a separate bind mount), so submit must copy.
    assert run_client_probes(probes["web1"], secret_owner="dlogd") != "linked"


def test_hardlink_mode_links_other_users_files_and_ships_them(probes: Lab) -> None:
    web2 = probes["web2"]
    theirs = "/var/spool/app/theirs"
    assert run_client_probes(web2, secret_owner="nobody", theirs=theirs) == "linked"
    inodes = web2.run(f"stat -c %i {theirs} /var/spool/dlogd/probe/linked").stdout
    assert len(set(inodes.split())) == 1


def test_receive_sandbox_reads_config_by_group_and_writes_store(probes: Lab) -> None:
    logs1, web1 = probes["logs1"], probes["web1"]
    web1.run(["python3", "-c", CONNECT, "logs1"])
    logs1.wait_for_path("/var/log/remote/probe/ok", unit_glob="dlogd-receive@*")
    assert logs1.read_file("/var/log/remote/probe/ok") == b"# probe\n"
