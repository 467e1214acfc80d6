"""Lab: dlogd-watch and the logrotate example on a real systemd host, rolled out by site.yml.

web1 gets ``dlogd_client_watches`` (the client role makes the watch user,
its drop-ins, enables dlogd-watch.path and .timer); a rotation by rename in
the watched directory reaches logs1 once, however often the file is renamed
again. The logrotate example runs under the host's own logrotate and its
lastaction submits through the host's dlogctl. The lab's description is
rolled out again afterwards (watches off: the units stopped and disabled).
And why the auditd test is not here: the kernel refuses audit control inside
a lab host (docs/watch.md).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from labfleet import KEYWORD, Fleet, listing
from labhosts import Lab, LabHost, wait_until

from dlogd import watch

WATCHED = "/var/log/dlogd-lab-watch"
ROTATED = "/var/log/dlogd-lab-rotate"
WATCH_USER = "dlogd-watch"
DELIVERY_TIMEOUT = 60.0


def stored(fleet: Fleet, suffix: str) -> list[str]:
    return [n for n in listing(fleet.collector, fleet.store_dir("web1")) if n.endswith(suffix)]


@pytest.fixture(scope="module")
def watching(fleet: Fleet) -> Iterator[LabHost]:
    """web1 with a watch, for this module's tests: one rollout and one back."""
    web1 = fleet.clients[0]
    description = fleet.description()
    description["dlogd_submitters"] = [
        *description["dlogd_submitters"],
        # The watch submits as any caller does; logrotate's lastaction runs as root.
        {"keyword": KEYWORD, "hosts": ["web1"], "users": [WATCH_USER], "uids": [0]},
    ]
    web1.run(["install", "-d", "-m", "0755", WATCHED, ROTATED])
    watches = [{"directory": WATCHED, "pattern": "app.log.*", "keyword": KEYWORD}]
    # Only web1 changes: the collector's view of web1 (which keywords it may
    # send) is the same with the watch's submitter added.
    try:
        fleet.rollout(
            "--limit", "web1",
            fleet_vars=description, host_vars={"web1": {"dlogd_client_watches": watches}},
        ).check()  # fmt: skip
        yield web1
    finally:
        fleet.rollout("--limit", "web1").check()
        web1.run(["rm", "-rf", WATCHED, ROTATED, "/etc/logrotate.d/dlogd-lab-example"])


def test_the_role_deploys_the_watch_and_a_rename_is_shipped_once(
    fleet: Fleet, watching: LabHost
) -> None:
    web1 = watching
    enabled = web1.run(["systemctl", "is-enabled", "dlogd-watch.path", "dlogd-watch.timer"])
    assert enabled.stdout.split() == ["enabled", "enabled"]
    user = web1.run(["systemctl", "show", "-p", "User", "dlogd-watch.service"]).stdout.strip()
    assert user == f"User={WATCH_USER}"
    web1.write_file(f"{WATCHED}/app.log", f"lab {time.time()}\n")
    web1.run(["mv", f"{WATCHED}/app.log", f"{WATCHED}/app.log.1"])  # the path unit fires
    wait_until(lambda: len(stored(fleet, ".app.log.1")) == 1, DELIVERY_TIMEOUT, "app.log.1")
    web1.run(["mv", f"{WATCHED}/app.log.1", f"{WATCHED}/app.log.2"])
    web1.run(["systemctl", "start", "dlogd-watch.service"])
    assert stored(fleet, ".app.log.2") == [] and len(stored(fleet, ".app.log.1")) == 1
    journal = web1.journal("dlogd-watch.service")
    assert [e for e in journal if e.get("MESSAGE_ID") == watch.WATCH_SUBMITTED]
    assert "dlogd-watch.service" not in web1.failed()


def test_the_logrotate_example_under_the_hosts_logrotate(fleet: Fleet, watching: LabHost) -> None:
    web1 = watching
    example = (fleet.checkout / "examples" / "logrotate.d" / "dlogd-example").read_text()
    config = example.replace("/var/log/app/app.log", f"{ROTATED}/app.log").replace(
        "--keyword app", f"--keyword {KEYWORD}"
    )
    web1.write_file("/etc/logrotate.d/dlogd-lab-example", config)
    web1.write_file(f"{ROTATED}/app.log", b"rotated in the lab\n")
    web1.run(["logrotate", "-f", "/etc/logrotate.d/dlogd-lab-example"])
    [rotated] = [n for n in listing(web1, ROTATED) if n.startswith("app.log-")]
    wait_until(lambda: len(stored(fleet, "." + rotated)) == 1, DELIVERY_TIMEOUT, rotated)


CAP_AUDIT_CONTROL = 30  # linux/capability.h


def test_kernel_audit_control_is_refused_inside_a_lab_host(lab: Lab) -> None:
    """nspawn leaves CAP_AUDIT_CONTROL to the container's init, yet auditctl -s fails there
    even run with every capability: the kernel takes audit control messages only from
    the initial PID namespace, so auditd cannot run in a lab host."""
    host = lab["web1"]
    bounding = host.run(["sed", "-n", "s/^CapBnd:[[:space:]]*//p", "/proc/1/status"]).stdout
    assert int(bounding, 16) & (1 << CAP_AUDIT_CONTROL)
    done = host.run(["auditctl", "-s"], check=False)
    assert done.returncode != 0
    assert "Operation not permitted" in done.stdout + done.stderr
