"""Fixtures for the lab tier: one booted :class:`labhosts.Lab` per session.

Place in the flow: scenario tests under tests/lab get real systemd hosts from
here, and a fleet that ``ansible-playbook site.yml`` rolled out onto them over
SSH (tests/lab/labfleet.py). The checkout rolled out (and whose venv runs
install.sh inside a host) defaults to the repository these tests run from;
DLOGD_LAB_CHECKOUT and DLOGD_LAB_VENV choose others. Every test in this
directory is marked ``lab`` and ``slow``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import labfleet
import pytest
from labhosts import REPO, Lab


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.lab)
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def lab_checkout() -> Path:
    """The checkout whose scripts/install.sh and dlogd/ the hosts use."""
    return Path(os.environ.get("DLOGD_LAB_CHECKOUT", str(REPO))).resolve()


@pytest.fixture(scope="session")
def lab_venv(lab_checkout: Path) -> Path:
    return Path(os.environ.get("DLOGD_LAB_VENV", str(lab_checkout / ".venv")))


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """Hosts logs1 (192.0.2.10), web1 (.11), web2 (.12), web3 (.13), booted and wired."""
    tools = ("systemd-nspawn", "nsenter", "ip", "ssh", "ssh-keygen", "sshd")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if os.geteuid() != 0 or missing:
        pytest.skip(f"lab needs root and {missing or 'these tools'}: see shared LAB.md")
    the_lab = Lab(labfleet.TEST_HOSTS)
    the_lab.start()
    try:
        yield the_lab
    finally:
        the_lab.stop()


@pytest.fixture(scope="session")
def fleet(lab: Lab, lab_checkout: Path, tmp_path_factory: pytest.TempPathFactory) -> labfleet.Fleet:
    """logs1 collecting "audit" from web1 and web2, rolled out by site.yml.

    The retry timer of the clients runs every few seconds (the role's
    ``dlogd_client_timer_interval``).
    """
    inventory = tmp_path_factory.mktemp("lab-inventory")
    return labfleet.install_fleet(lab, lab_checkout, inventory, fast_timer=True)
