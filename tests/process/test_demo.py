"""The README's demo runs the whole flow on this machine and says where the file went."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.process


def test_demo_ships_a_file_and_leaves_the_spool_empty() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dlogd.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "dlogd-ship exited 0: logs1: 1/1 delivered" in result.stdout
    assert "arrived, byte-identical" in result.stdout
    assert "spool entries left on the client: none" in result.stdout
