#!/usr/bin/env python3
"""dlogd on real systemd hosts: boot a lab, ship a file, show where to look.

Place in the flow: the demo of the whole product under its real units. It
boots three containers with sshd with tests/lab/labhosts.py (logs1
192.0.2.10, the collector; web1 .11 and web2 .12, clients), rolls the fleet
out with ``ansible-playbook ansible/site.yml`` over SSH (tests/lab/labfleet.py
writes the inventory and the fleet description; the playbook does the rest:
wheelhouse install, units, CA and host certificates, configs) and prints the
playbook's recap and the time it took, then submits one file as the
permitted user "alice" on web1 through libdlogd and one through Python,
waits for both on logs1, compares them byte for byte and prints the journal
records on both hosts with the commands that show them.

    sudo .venv/bin/python scripts/lab-demo.py          # tears the lab down at the end
    sudo .venv/bin/python scripts/lab-demo.py --keep   # leaves it running to explore
    sudo .venv/bin/python scripts/lab-demo.py --stop   # removes a kept lab

Needs root, systemd-nspawn, nsenter, ip and a C compiler (it builds clib/).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "lab")]

import labfleet  # noqa: E402
import labhosts  # noqa: E402
from labhosts import Lab, LabError, LabHost  # noqa: E402

from dlogd import journal  # noqa: E402

DEMO_FILES = ("/home/alice/app-audit.log", "/home/alice/app-audit.log.1")
PY_SUBMIT = "import dlogd, sys; print('spooled as', dlogd.submit(sys.argv[1], 'audit').entry)"


def say(text: str = "") -> None:
    print(text, flush=True)


def step(text: str) -> None:
    say(f"\n== {text}")


def indent(text: str, prefix: str = "   ") -> str:
    return "\n".join(prefix + line for line in text.rstrip().splitlines())


def nsenter(host: LabHost, command: str) -> str:
    return f"sudo nsenter -t {host.leader} -a {command}"


def submit_both_ways(fleet: labfleet.Fleet, web1: LabHost) -> list[str]:
    """Submit one file as alice through libdlogd, another through Python; entry names."""
    for n, path in enumerate(DEMO_FILES):
        lines = b"".join(b"%d.%d user=alice action=login ok\n" % (n, i) for i in range(20_000))
        web1.write_file(path, lines, 0o600, owner="alice")
        say(f"   {path}: {len(lines)} bytes, mode 0600, owned by alice")
    program = labhosts.in_lab(fleet.checkout / labfleet.CLIB_PROGRAM)
    [c_answer] = fleet.submit_c(web1, "alice", labfleet.KEYWORD, DEMO_FILES[0])
    say(f"   C:      {program} audit {DEMO_FILES[0]}   (as alice)\n           -> {c_answer}")
    py = web1.run(
        [labfleet.APP_PYTHON, "-c", PY_SUBMIT, DEMO_FILES[1]],
        user="alice",
        env={"PYTHONPATH": str(labhosts.in_lab(fleet.checkout))},
    ).stdout.strip()
    say(f"   Python: python3 -c {shlex.quote(PY_SUBMIT)} {DEMO_FILES[1]}\n           -> {py}")
    if not c_answer.startswith("OK audit/"):
        raise LabError(f"the C submit was refused: {c_answer}")
    return [c_answer.split("/", 1)[1], py.rsplit("/", 1)[1]]


def show_arrival(fleet: labfleet.Fleet, web1: LabHost, names: list[str]) -> None:
    logs1 = fleet.collector
    store = fleet.store_dir(web1.name)
    labfleet.wait_for_files(logs1, store, names, timeout=30)
    sent = labfleet.sha256s(web1, DEMO_FILES)
    stored = labfleet.sha256s(logs1, [f"{store}/{n}" for n in names])
    for path, name in zip(DEMO_FILES, names, strict=True):
        same = stored[name] == sent[Path(path).name]
        verdict = "byte-identical" if same else "DIFFERENT"
        say(f"   logs1:{store}/{name}  sha256 {stored[name][:16]}...  {verdict}")
        if not same:
            raise LabError(f"{name} on logs1 differs from {path} on web1")
    left = labfleet.spool_entries(web1)
    say(f"   web1's spool ({labfleet.SPOOL}/audit) now holds: {left or 'nothing'}")


def show_journals(fleet: labfleet.Fleet, web1: LabHost, names: list[str]) -> None:
    logs1 = fleet.collector
    for host in (web1, logs1):
        command = "journalctl -u 'dlogd*' --no-pager -n 14"
        say(f"\n   $ {nsenter(host, command)}")
        say(indent(host.run(["sh", "-c", command]).stdout, "   | "))
    stored = f"journalctl MESSAGE_ID={journal.RECEIVE_STORED} DLOGD_FILE={names[0]} -o verbose"
    say(f"\n   one file's record on the collector, all fields:\n   $ {nsenter(logs1, stored)}")
    fields = logs1.run(["sh", "-c", stored + " --no-pager"]).stdout
    say(indent("\n".join(ln for ln in fields.splitlines() if "DLOGD_" in ln or "MESSAGE=" in ln)))
    say("\n   other filters: journalctl SYSLOG_IDENTIFIER=dlogd DLOGD_KEYWORD=audit;")
    say(f"   refusals: journalctl MESSAGE_ID={journal.SUBMIT_REFUSED} (see docs/journal.md)")


def explain_kept(lab: Lab, inventory_dir: Path) -> None:
    step("the lab keeps running")
    for host in lab.hosts.values():
        say(f"   {host.name:6} {host.address:12} {nsenter(host, 'bash')}")
    say(f"   e.g. {nsenter(lab['web1'], 'systemctl status dlogd-ship.path dlogd-ship.timer')}")
    say("   submit more as alice on web1:")
    say(
        f"   {nsenter(lab['web1'], '')}setpriv --reuid=alice --regid=alice --init-groups "
        f"{REPO / labfleet.CLIB_PROGRAM} audit FILE"
    )
    say("   roll out again (from the control node's lab namespace):")
    say(f"   cd {REPO}/ansible && sudo ip netns exec {labhosts.CONTROL_NS} "
        f"{Path(sys.executable).parent}/ansible-playbook -i {inventory_dir}/hosts.yml site.yml")  # fmt: skip
    say(f"   stop it: sudo {sys.executable} {Path(__file__).resolve()} --stop")


def run(keep: bool) -> int:
    step("building clib (libdlogd and its test program)")
    labfleet.build_clib(REPO)
    lab = Lab()
    inventory_dir = Path(tempfile.mkdtemp(prefix="dlogd-lab-inventory-"))
    ok = False
    try:
        step("booting logs1 (collector), web1 and web2 (clients) in systemd-nspawn")
        lab.start()
        say(f"   booted in {lab.boot_seconds:.1f}s: " + ", ".join(
            f"{h.name} {h.address}" for h in lab.hosts.values()))  # fmt: skip
        step("rolling the fleet out: ansible-playbook site.yml (over SSH into the hosts)")
        fleet = labfleet.install_fleet(lab, REPO, inventory_dir)
        run = fleet.first_run
        say(f"   $ cd ansible && ansible-playbook -i {inventory_dir}/hosts.yml site.yml")
        say(indent(run.recap_text, "   | "))
        say(f"   the playbook took {run.seconds:.1f}s; the CA stays in {inventory_dir}/pki")
        say("   web1/web2: /etc/dlogd/client.conf (alice by uid, group auditors), "
            "dlogd.socket, dlogd-ship.path, dlogd-ship.timer")  # fmt: skip
        say("   logs1: /etc/dlogd/server.conf (audit from web1, web2), dlogd-receive.socket")
        web1 = lab["web1"]
        step("alice submits on web1 (the path unit starts the drain; nobody runs dlogd-ship)")
        started = time.monotonic()
        names = submit_both_ways(fleet, web1)
        step("waiting for the files on logs1")
        show_arrival(fleet, web1, names)
        say(f"   submitted to stored: {time.monotonic() - started:.1f}s")
        step("what the journals say")
        show_journals(fleet, web1, names)
        ok = True
    except LabError as err:
        say(f"\nFAILED: {err}")
    finally:
        if not keep:
            shutil.rmtree(inventory_dir, ignore_errors=True)
        if keep:
            explain_kept(lab, inventory_dir)
        else:
            step("tearing the lab down")
            lab.stop()
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="leave the lab running")
    parser.add_argument("--stop", action="store_true", help="remove a lab left by --keep")
    args = parser.parse_args()
    tools = ("systemd-nspawn", "nsenter", "ip", "make", "cc", "ssh", "ssh-keygen", "sshd")
    missing = [t for t in tools if not shutil.which(t)]
    if os.geteuid() != 0 or missing:
        print(f"lab-demo: needs root and {missing or 'nothing else'} (see LAB.md)", file=sys.stderr)
        return 2
    if args.stop:
        try:
            Lab().remove_leftovers()
        except LabError as err:
            print(f"lab-demo: {err}", file=sys.stderr)
            return 1
        return 0
    return run(args.keep)


if __name__ == "__main__":
    sys.exit(main())
