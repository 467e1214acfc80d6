"""dlogd-ship tells systemd what it is doing: STATUS= over $NOTIFY_SOCKET, as sd_notify does."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.shipharness import EX_TEMPFAIL, Site, Target, env, free_port, make_file, pki_set, site
from tests.tlsfixtures import COLLECTOR

__all__ = ["pki_set", "site"]

pytestmark = pytest.mark.process


def _ship_with_notify(site: Site, tmp_path: Path) -> tuple[int, list[str]]:
    """Run the shipper with a notify socket of ours; return its exit code and STATUS lines."""
    path = tmp_path / "notify.sock"
    path.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        listener.settimeout(0)
        run = subprocess.run(
            [sys.executable, "-m", "dlogd.ship", "--config", str(site.root / "client.conf")],
            env=env(site.cache, NOTIFY_SOCKET=str(path)),
            capture_output=True,
            timeout=60,
            check=False,
        )
        statuses = []
        while True:
            try:
                datagram = listener.recv(4096).decode()
            except BlockingIOError:
                break
            statuses += [line[7:] for line in datagram.splitlines() if line.startswith("STATUS=")]
    return run.returncode, statuses


def test_status_says_what_is_sent_then_what_happened(site: Site, tmp_path: Path) -> None:
    collector = site.start()
    site.client_config([Target(COLLECTOR, collector.port)])
    site.add(make_file(site.root / "a.log", b"a\n"), make_file(site.root / "b.log", b"b\n"))
    code, statuses = _ship_with_notify(site, tmp_path)
    assert code == 0
    assert statuses[0] == f"sending to {COLLECTOR}"
    assert statuses[-1] == f"{COLLECTOR}: 2/2 delivered"


def test_status_names_the_next_retry_when_the_collector_is_down(site: Site, tmp_path: Path) -> None:
    site.client_config([Target(COLLECTOR, free_port())], retry=(300, 600))  # not due again soon
    site.add(make_file(site.root / "a.log", b"a\n"))
    code, statuses = _ship_with_notify(site, tmp_path)
    assert code == EX_TEMPFAIL
    assert statuses[-1].startswith(f"{COLLECTOR}: 0/1 delivered (")
    assert "next try " in statuses[-1]
    # The next run does not connect: the status says so and when it will.
    code, statuses = _ship_with_notify(site, tmp_path)
    assert code == EX_TEMPFAIL
    assert statuses[0].startswith(f"nothing due; {COLLECTOR}: 0/1 delivered, next try ")
