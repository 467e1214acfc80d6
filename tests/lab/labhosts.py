"""Boot real systemd hosts in containers for the lab test tier.

Place in the flow: the third test tier (see DESIGN.md, "Testing tiers" and
shared LAB.md). A :class:`Lab` boots each host with ``systemd-nspawn`` on a
RAM-backed overlay of this machine's root, so every host sees the same Python,
the checkout and its venv, while what it writes stays in its own upper layer.
Each host has a network namespace of its own with one veth into a bridge that
lives in a further namespace; all addresses are in 192.0.2.0/24 and exist only
in those namespaces.

This machine is the lab's Ansible control node, from a network namespace of
its own (:data:`CONTROL_NS`, one more veth into the bridge, address
:data:`CONTROL_ADDRESS`): the root namespace gets no lab address or route
(this VM's own network may be 192.0.2.0/24 too). Only the network changes;
files, the checkout and its venv are this machine's. Every host runs sshd
with a host key of its own (written to the lab's known_hosts) that accepts
the lab's own client key for root.

Everything the lab creates is named with :data:`PREFIX` (network namespaces,
machine names, the control link) or lives under :data:`LAB_ROOT` (mounts,
logs, SSH keys), so leftovers of a killed run can be found and removed without
touching anything else, and a lock file keeps two test sessions from booting
labs over each other.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

PREFIX = "dlogdlab-"
LAB_ROOT = Path("/tmp/dlogd-lab")
LOCK_PATH = Path("/tmp/dlogd-lab.lock")
BRIDGE_NS = PREFIX + "br"
SUBNET_BITS = 24
# Where the control node's commands (ssh, ansible-playbook) run.
CONTROL_NS = PREFIX + "ctl"
CONTROL_ADDRESS = "192.0.2.1"
SSH_DIR = LAB_ROOT / "ssh"
CLIENT_KEY = SSH_DIR / "id_ed25519"
KNOWN_HOSTS = SSH_DIR / "known_hosts"
AUTHORIZED_KEYS = "/etc/ssh/dlogd-lab-authorized_keys"
DEFAULT_HOSTS: Mapping[str, str] = {
    "logs1": "192.0.2.10",
    "web1": "192.0.2.11",
    "web2": "192.0.2.12",
}
REPO = Path(__file__).resolve().parents[2]
HOST_CHECKOUT = Path(os.environ.get("DLOGD_LAB_CHECKOUT", str(REPO)))
# nspawn gives each host a fresh /tmp, and dlogd's units PrivateTmp= on top: a
# checkout under /tmp (as a CI clone may be) is bound in at a fixed place instead.
_UNDER_TMP = HOST_CHECKOUT.is_relative_to("/tmp") or HOST_CHECKOUT.is_relative_to("/var/tmp")
LAB_CHECKOUT = Path("/opt/dlogd-lab-checkout") if _UNDER_TMP else HOST_CHECKOUT


def in_lab(path: Path) -> Path:
    """Where the hosts see ``path`` (a path of this machine's checkout, or any other)."""
    if path.is_relative_to(HOST_CHECKOUT):
        return LAB_CHECKOUT / path.relative_to(HOST_CHECKOUT)
    return path


# Units of this machine that only slow a lab host down or fail in a container.
DEFAULT_MASKS = (
    "postgresql.service",
    "systemd-timesyncd.service",
    "e2scrub_reap.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "man-db.timer",
    # Installed on this machine for other tiers (setup.sh): the archive tier's
    # Ceph, the watch tier's auditd, logrotate's daily timer. Lab hosts share
    # the root file system; their services would only cost boot time.
    "ceph.target",
    "ceph-crash.service",
    "auditd.service",
    "logrotate.timer",
)
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BOOT_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0

Command = str | Sequence[str]


class LabError(RuntimeError):
    """The lab could not be set up, or a host did not respond as expected."""


def sh(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command on this machine (not in a host), capturing its output."""
    done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise LabError(f"{shlex.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.1
) -> None:
    """Poll ``predicate`` until it holds; raise :class:`LabError` naming ``what``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise LabError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@dataclass
class LabHost:
    """One booted container: its name, address and ways to act inside it."""

    name: str
    address: str
    base: Path
    masks: Sequence[str] = DEFAULT_MASKS
    hosts_lines: str = ""
    nspawn: subprocess.Popen[bytes] | None = None
    leader: int = 0
    boot_seconds: float = 0.0
    failed_units: list[str] = field(default_factory=list)
    host_key: list[str] = field(default_factory=list)
    _boot_started: float = 0.0

    @property
    def netns(self) -> str:
        return PREFIX + self.name

    @property
    def machine(self) -> str:
        return PREFIX + self.name

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def log_path(self) -> Path:
        return LAB_ROOT / f"{self.name}.log"

    # -- lifecycle ---------------------------------------------------------

    def prepare(self) -> None:
        """Mount the RAM-backed overlay and give the host its own identity."""
        self.base.mkdir(parents=True, exist_ok=True)
        sh(["mount", "-t", "tmpfs", "-o", "mode=0700", "tmpfs", str(self.base)])
        for sub in ("upper", "work", "root"):
            (self.base / sub).mkdir()
        opts = f"lowerdir=/,upperdir={self.base}/upper,workdir={self.base}/work"
        sh(["mount", "-t", "overlay", "overlay", "-o", opts, str(self.root)])
        etc = self.root / "etc"
        # nspawn refuses a container whose machine id equals the host's.
        (etc / "machine-id").write_text(uuid.uuid4().hex + "\n")
        (etc / "hostname").write_text(self.name + "\n")
        hosts = etc / "hosts"
        base_hosts = hosts.read_text() if hosts.exists() else "127.0.0.1\tlocalhost\n"
        hosts.write_text(base_hosts + "\n# dlogd lab\n" + self.hosts_lines)
        self._mask_units(etc / "systemd" / "system")
        self._prepare_sshd(etc / "ssh")

    def _prepare_sshd(self, ssh: Path) -> None:
        """A host key of its own, root login by the lab's key only, on the lab address."""
        for old in ssh.glob("ssh_host_*"):
            old.unlink()
        key = ssh / "ssh_host_ed25519_key"
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", self.name, "-f", str(key)])
        (ssh / "sshd_config.d").mkdir(exist_ok=True)
        (ssh / "sshd_config.d" / "50-dlogd-lab.conf").write_text(
            "# dlogd lab: the control node (192.0.2.1) logs in as root with the lab's key.\n"
            f"ListenAddress {self.address}\nHostKey /etc/ssh/ssh_host_ed25519_key\n"
            f"AuthorizedKeysFile {AUTHORIZED_KEYS}\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
            # No PAM: a session per command (Ansible runs many) skips logind and motd.
            "UsePAM no\nMaxStartups 30\n"
        )
        authorized = self.root / AUTHORIZED_KEYS.lstrip("/")
        authorized.write_text(CLIENT_KEY.with_suffix(".pub").read_text())
        authorized.chmod(0o600)
        self.host_key = (key.with_suffix(".pub")).read_text().split()[:2]

    def known_hosts_line(self) -> str:
        return f"{self.name},{self.address} {' '.join(self.host_key)}\n"

    def _mask_units(self, unit_dir: Path) -> None:
        unit_dir.mkdir(parents=True, exist_ok=True)
        for unit in self.masks:
            link = unit_dir / unit
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            link.symlink_to("/dev/null")

    def boot(self) -> None:
        """Start systemd in the container; :meth:`wait_booted` waits for it."""
        argv = [
            "systemd-nspawn", "-D", str(self.root), f"--machine={self.machine}", "-b",
            "--register=no", "--keep-unit", "--link-journal=no", "--console=pipe",
            f"--network-namespace-path=/run/netns/{self.netns}",
        ]  # fmt: skip
        if LAB_CHECKOUT != HOST_CHECKOUT:
            argv.append(f"--bind-ro={HOST_CHECKOUT}:{LAB_CHECKOUT}")
        with self.log_path.open("ab") as log:
            self.nspawn = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # a ^C to pytest must not hit the containers first
            )  # fmt: skip
        self.leader = 0
        self._boot_started = time.monotonic()

    def wait_booted(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Wait until systemd inside reports running (or degraded: recorded)."""
        wait_until(self._find_leader, timeout, f"{self.name}: container init ({self.log_path})")
        deadline = time.monotonic() + timeout
        state = self._system_state(timeout)
        # Right after exec, init has not opened its bus yet: ask again.
        while state == "" and time.monotonic() < deadline:
            time.sleep(0.1)
            state = self._system_state(deadline - time.monotonic())
        if state not in ("running", "degraded"):
            raise LabError(f"{self.name}: system state {state!r}; see {self.log_path}")
        self.boot_seconds = time.monotonic() - self._boot_started
        self.failed_units = self.failed()

    def _system_state(self, timeout: float) -> str:
        wait = ["timeout", str(max(1, int(timeout))), "systemctl", "is-system-running", "--wait"]
        return self.run(wait, check=False).stdout.strip()

    def _find_leader(self) -> bool:
        assert self.nspawn is not None
        if self.nspawn.poll() is not None:
            raise LabError(f"{self.name}: systemd-nspawn exited; see {self.log_path}")
        children = sh(["ps", "-o", "pid=", "--ppid", str(self.nspawn.pid)], check=False)
        # The first child is nspawn's helper until it execs the container's init.
        for pid in children.stdout.split():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    self.leader = int(pid)
                    return True
        return False

    def shutdown(self, timeout: float = STOP_TIMEOUT) -> None:
        """Power the container off cleanly; kill it if it does not stop in time."""
        if self.nspawn is None or self.nspawn.poll() is not None:
            self.nspawn = None
            return
        if self.leader:
            self.run(["systemctl", "--no-block", "poweroff"], check=False)
        try:
            self.nspawn.wait(timeout)
        except subprocess.TimeoutExpired:
            self.power_cut()
        self.nspawn = None

    def power_cut(self) -> None:
        """Kill the container at once (SIGKILL to nspawn ends its PID namespace)."""
        if self.nspawn is not None and self.nspawn.poll() is None:
            os.kill(self.nspawn.pid, signal.SIGKILL)
            self.nspawn.wait(STOP_TIMEOUT)
        self.nspawn = None

    def reboot(self, clean: bool = True, timeout: float = BOOT_TIMEOUT) -> None:
        """Stop and boot again on the same upper layer: all state persists.

        ``clean=False`` kills the container instead of shutting it down. The
        upper layer is in RAM, so data not yet fsynced survives too: this
        tests restart and recovery logic, not the disk's durability.
        """
        if clean:
            self.shutdown()
        else:
            self.power_cut()
        self.boot()
        self.wait_booted(timeout)

    def unmount(self) -> None:
        for target in (self.root, self.base):
            if os.path.ismount(target):
                sh(["umount", "-l", str(target)], check=False)

    # -- acting inside -----------------------------------------------------

    def run(
        self,
        cmd: Command,
        check: bool = True,
        user: str | None = None,
        input: bytes | str | None = None,
        timeout: float = 60.0,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` (argv, or a string for ``sh -c``) inside the host.

        Output is text (undecodable bytes replaced); use :meth:`read_file` for
        binary content. ``user`` runs it with that user's uid, gid and groups.
        """
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        done = self._exec(argv, user, input, timeout, env)
        result = subprocess.CompletedProcess(
            done.args,
            done.returncode,
            done.stdout.decode(errors="replace"),
            done.stderr.decode(errors="replace"),
        )
        if check and result.returncode != 0:
            raise LabError(
                f"{self.name}: {shlex.join(argv)} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}"
            )
        return result

    def _exec(
        self,
        argv: list[str],
        user: str | None,
        input: bytes | str | None,
        timeout: float,
        env: Mapping[str, str] | None,
    ) -> subprocess.CompletedProcess[bytes]:
        if not self.leader:
            raise LabError(f"{self.name}: not booted")
        environ = {"PATH": CONTAINER_PATH, "LANG": "C.UTF-8", **(env or {})}
        full = ["nsenter", "-t", str(self.leader), "-a", "--", "env", "-i"]
        full += [f"{k}={v}" for k, v in environ.items()]
        if user is not None:
            # setpriv, not su/runuser: no PAM session, same environment.
            switch = 'u=$1; shift; exec setpriv --reuid="$u" --regid="$(id -g "$u")" --init-groups -- "$@"'
            full += ["sh", "-c", switch, "sh", user]
        data = input.encode() if isinstance(input, str) else input
        return subprocess.run(
            full + argv, input=data, capture_output=True, timeout=timeout, check=False
        )

    def write_file(
        self, path: str, data: bytes | str, mode: int = 0o644, owner: str | None = None
    ) -> None:
        """Write ``path`` inside the host atomically with ``mode`` (and owner).

        Missing parent directories are created (root-owned, 0755).
        """
        chown = 'chown -- "$3" "$1.lab-tmp" &&' if owner else ""
        script = (
            'mkdir -p -- "$(dirname -- "$1")" && umask 077 && cat > "$1.lab-tmp" && chmod "$2" "$1.lab-tmp" && '
            f'{chown} mv -f -- "$1.lab-tmp" "$1"'
        )
        self.run(["sh", "-c", script, "sh", path, f"{mode:o}", owner or ""], input=data)

    def read_file(self, path: str) -> bytes:
        """Return the bytes of ``path`` inside the host."""
        done = self._exec(["cat", "--", path], None, None, 60.0, None)
        if done.returncode != 0:
            raise LabError(f"{self.name}: cannot read {path}: {done.stderr.decode().strip()}")
        return done.stdout

    def journal(
        self, unit_glob: str = "dlogd*", *fields: str, since: str | None = None
    ) -> list[dict[str, str]]:
        """Journal entries of units matching ``unit_glob``, oldest first.

        With ``fields``, each entry keeps only those fields. Values that the
        journal stores as bytes or lists come back as their JSON text.
        """
        argv = ["journalctl", "--no-pager", "-o", "json", "-u", unit_glob]
        if since is not None:
            argv += ["--since", since]
        done = self.run(argv, check=False)
        # A glob that matches no unit in the journal yet is an error to journalctl.
        if done.returncode != 0 and "No data available" in done.stderr:
            return []
        if done.returncode != 0:
            raise LabError(f"{self.name}: {shlex.join(argv)}: {done.stderr.strip()}")
        entries = [_journal_entry(line) for line in done.stdout.splitlines()]
        if fields:
            return [{k: e[k] for k in fields if k in e} for e in entries]
        return entries

    def journal_text(self, unit_glob: str = "dlogd*", lines: int = 40) -> str:
        """The last ``lines`` journal lines of matching units, for error messages."""
        argv = ["journalctl", "--no-pager", "-n", str(lines), "-u", unit_glob]
        return self.run(argv, check=False).stdout

    def wait_for_path(self, path: str, timeout: float = 15.0, unit_glob: str = "dlogd*") -> None:
        """Wait until ``path`` exists inside; on timeout show the units' journal."""
        try:
            wait_until(lambda: self.run(["test", "-e", path], check=False).returncode == 0,
                       timeout, f"{self.name}:{path}")  # fmt: skip
        except LabError as err:
            raise LabError(f"{err}\n{self.journal_text(unit_glob)}") from None

    def failed(self) -> list[str]:
        """Names of the host's failed units now."""
        out = self.run(["systemctl", "--failed", "--plain", "--no-legend"], check=False).stdout
        return [line.split()[0] for line in out.splitlines() if line.strip()]

    def install_dlogd(
        self,
        role: str = "both",
        checkout: Path = REPO,
        venv: Path | None = None,
        hardlink: bool = False,
    ) -> None:
        """Run the checkout's ``scripts/install.sh`` (ansible/install.yml) inside this host.

        ``venv`` is the one whose ansible-playbook runs the install there.
        """
        checkout, venv = in_lab(checkout), in_lab(venv or checkout / ".venv")
        argv = ["sh", str(checkout / "scripts" / "install.sh"), f"--{role}"]
        argv += ["--hardlink"] if hardlink else []
        env = {"HOME": "/root", "ANSIBLE_PLAYBOOK": str(venv / "bin" / "ansible-playbook")}
        self.run(argv, env=env, timeout=300)


def _journal_entry(line: str) -> dict[str, str]:
    raw: dict[str, object] = json.loads(line)
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in raw.items()}


class Lab:
    """A set of hosts on one bridge; use as a context manager or start/stop.

    >>> with Lab() as lab:                      # doctest: +SKIP
    ...     lab["web1"].run("ping -c1 logs1")
    """

    def __init__(
        self,
        hosts: Mapping[str, str] = DEFAULT_HOSTS,
        masks: Sequence[str] = DEFAULT_MASKS,
    ) -> None:
        lines = "".join(f"{addr}\t{name}\n" for name, addr in hosts.items())
        self.hosts: dict[str, LabHost] = {
            name: LabHost(name, addr, LAB_ROOT / name, masks, lines) for name, addr in hosts.items()
        }
        self._lock: IO[str] | None = None
        self.boot_seconds = 0.0

    def __getitem__(self, name: str) -> LabHost:
        return self.hosts[name]

    def __enter__(self) -> Lab:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Clean leftovers, build the network, boot every host in parallel."""
        self._take_lock()
        started = time.monotonic()
        try:
            cleanup_leftovers()
            LAB_ROOT.mkdir(mode=0o700, exist_ok=True)
            self._make_client_key()
            self._build_network()
            for host in self.hosts.values():
                host.prepare()
                host.boot()
            KNOWN_HOSTS.write_text("".join(h.known_hosts_line() for h in self.hosts.values()))
            for host in self.hosts.values():
                host.wait_booted()
            for host in self.hosts.values():
                self.wait_for_ssh(host)
        except BaseException:
            self.stop()
            raise
        self.boot_seconds = time.monotonic() - started

    def stop(self) -> None:
        """Tear everything down; safe to call twice and after a failed start."""
        if self._lock is None:
            # Not ours: without the lock, "leftovers" may be another session's
            # running lab (a start that found the lock taken must not kill it).
            return
        try:
            for host in self.hosts.values():
                host.shutdown()
            for host in self.hosts.values():
                host.unmount()
            cleanup_leftovers()
        finally:
            self._release_lock()

    def _make_client_key(self) -> None:
        SSH_DIR.mkdir(mode=0o700, exist_ok=True)
        for old in (CLIENT_KEY, CLIENT_KEY.with_suffix(".pub")):
            old.unlink(missing_ok=True)
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dlogd-lab-control",
            "-f", str(CLIENT_KEY)])  # fmt: skip

    def ssh_options(self) -> list[str]:
        """ssh options that reach the lab's hosts as root, host keys checked."""
        return [
            "-o", f"IdentityFile={CLIENT_KEY}", "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={KNOWN_HOSTS}", "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
        ]  # fmt: skip

    @staticmethod
    def on_control_node(argv: Sequence[str]) -> list[str]:
        """``argv`` run from the control node's namespace (it reaches the hosts)."""
        return ["ip", "netns", "exec", CONTROL_NS, *argv]

    def wait_for_ssh(self, host: LabHost, timeout: float = BOOT_TIMEOUT) -> None:
        """Until sshd on ``host`` answers the control node (over the bridge)."""
        argv = self.on_control_node(["ssh", *self.ssh_options(), f"root@{host.address}", "true"])
        wait_until(lambda: sh(argv, check=False).returncode == 0, timeout,
                   f"sshd on {host.name} ({host.address})", interval=0.3)  # fmt: skip

    def remove_leftovers(self) -> None:
        """Remove a lab that an earlier run left (killed, or kept on purpose).

        Takes the lock first, so a lab that another session is using right
        now is never touched (that raises :class:`LabError` instead).
        """
        self._take_lock()
        try:
            cleanup_leftovers()
        finally:
            self._release_lock()

    def _take_lock(self) -> None:
        lock = LOCK_PATH.open("w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise LabError(f"another lab run holds {LOCK_PATH}") from None
        self._lock = lock

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # -- network -----------------------------------------------------------

    def _build_network(self) -> None:
        sh(["ip", "netns", "add", BRIDGE_NS])
        in_bridge = ["ip", "-n", BRIDGE_NS]
        sh([*in_bridge, "link", "add", "br0", "type", "bridge"])
        sh([*in_bridge, "link", "set", "br0", "up"])
        for host in self.hosts.values():
            sh(["ip", "netns", "add", host.netns])
            sh(["ip", "link", "add", _port(host), "netns", BRIDGE_NS, "type", "veth",
                "peer", "name", "eth0", "netns", host.netns])  # fmt: skip
            sh([*in_bridge, "link", "set", _port(host), "master", "br0", "up"])
            in_host = ["ip", "-n", host.netns]
            sh([*in_host, "addr", "add", f"{host.address}/{SUBNET_BITS}", "dev", "eth0"])
            sh([*in_host, "link", "set", "eth0", "up"])
            sh([*in_host, "link", "set", "lo", "up"])
        # The control node's namespace: one more port on the bridge.
        sh(["ip", "netns", "add", CONTROL_NS])
        sh(["ip", "link", "add", "v-control", "netns", BRIDGE_NS, "type", "veth",
            "peer", "name", "eth0", "netns", CONTROL_NS])  # fmt: skip
        sh([*in_bridge, "link", "set", "v-control", "master", "br0", "up"])
        in_control = ["ip", "-n", CONTROL_NS]
        sh([*in_control, "addr", "add", f"{CONTROL_ADDRESS}/{SUBNET_BITS}", "dev", "eth0"])
        sh([*in_control, "link", "set", "eth0", "up"])
        sh([*in_control, "link", "set", "lo", "up"])

    def cut_link(self, name: str) -> None:
        """Unplug the host's cable at the bridge: its packets go nowhere."""
        sh(["ip", "-n", BRIDGE_NS, "link", "set", _port(self[name]), "down"])

    def restore_link(self, name: str) -> None:
        sh(["ip", "-n", BRIDGE_NS, "link", "set", _port(self[name]), "up"])

    def set_netem(self, name: str, spec: str) -> None:
        """Shape the host's outgoing traffic, e.g. ``"delay 50ms loss 5%"``."""
        sh(["ip", "netns", "exec", self[name].netns, "tc", "qdisc", "replace", "dev", "eth0",
            "root", "netem", *spec.split()])  # fmt: skip

    def clear_netem(self, name: str) -> None:
        sh(["ip", "netns", "exec", self[name].netns, "tc", "qdisc", "del", "dev", "eth0",
            "root"], check=False)  # fmt: skip


def _port(host: LabHost) -> str:
    # The bridge-side end of the host's veth; interface names are at most 15 bytes.
    return ("v-" + host.name)[:15]


# -- leftovers of killed runs --------------------------------------------------


def cleanup_leftovers() -> None:
    """Remove what an earlier (killed) run left: containers, mounts, namespaces."""
    for pid in _stray_nspawns():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not any(_stray_nspawns()), STOP_TIMEOUT, "stray nspawn processes to exit")
    for target in _lab_mounts():
        sh(["umount", "-l", target], check=False)
    for ns in _lab_netns():
        sh(["ip", "netns", "del", ns], check=False)


def _stray_nspawns() -> Iterator[int]:
    """nspawn processes running one of our machines (matched by --machine=)."""
    marker = f"--machine={PREFIX}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"systemd-nspawn") and any(a.startswith(marker) for a in argv):
            yield int(entry.name)


def _lab_mounts() -> list[str]:
    """Mount points under LAB_ROOT, deepest first so children go before parents."""
    root = str(LAB_ROOT)
    targets = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        target = line.split()[4].encode().decode("unicode_escape")
        if target == root or target.startswith(root + "/"):
            targets.append(target)
    return sorted(set(targets), key=len, reverse=True)


def _lab_netns() -> list[str]:
    out = sh(["ip", "netns", "list"], check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(PREFIX)]
