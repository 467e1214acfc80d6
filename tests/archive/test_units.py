"""The archive units: hardened like the others (exposure at most 2.0), wired together.

``systemd-analyze security --offline=true`` scores the unit file as written
(systemd 252 here); the figure is parsed from its own output.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess

import pytest

from dlogd.s3 import CREDENTIAL_NAME
from tests.shipharness import REPO

UNITS = REPO / "systemd"
MAX_EXPOSURE = 2.0


def exposure(unit: str) -> float:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is not installed (Debian package systemd)")
    done = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(UNITS / unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", done.stdout)
    assert match, done.stdout + done.stderr
    return float(match.group(1))


def test_archive_service_exposure() -> None:
    assert exposure("dlogd-archive.service") <= MAX_EXPOSURE


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / name)
    return parser


def test_path_and_timer_start_the_service() -> None:
    assert unit("dlogd-archive.path")["Path"]["Unit"] == "dlogd-archive.service"
    assert unit("dlogd-archive.timer")["Timer"]["Unit"] == "dlogd-archive.service"
    service = unit("dlogd-archive.service")["Service"]
    # The secret reaches this service only, through systemd's credentials.
    assert service["LoadCredential"].startswith(f"{CREDENTIAL_NAME}:")
    assert service["SuccessExitStatus"] == "75"
