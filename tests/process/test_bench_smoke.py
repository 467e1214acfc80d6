"""The benchmark scripts still run: each one at toy sizes (no timing is judged).

Place in the flow: bench/ measures; this only keeps the scripts from rotting
as the code they drive changes (issue 12: a quick smoke run of each).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.shipharness import REPO

pytestmark = pytest.mark.process


def test_bench_status_counts_a_small_spool(tmp_path: Path) -> None:
    report = tmp_path / "report.md"
    argv = [sys.executable, str(REPO / "bench" / "bench_status.py"), "--entries", "30",
            "--repeat", "1", "--root", str(tmp_path / "scratch"), "--markdown", str(report)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    # The script checks status's count against what it built; the row is its result.
    assert "| 30 | " in report.read_text(), report.read_text()
    assert not (tmp_path / "scratch").exists()


def test_bench_backlog_drains_two_small_spools(tmp_path: Path) -> None:
    report = tmp_path / "report.md"
    argv = [sys.executable, str(REPO / "bench" / "bench_backlog.py"), "--sizes", "20", "50",
            "--repeat", "1", "--root", str(tmp_path / "scratch"), "--markdown", str(report)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    # The script checks every file arrived and the spool emptied; a row per size.
    rows = [line for line in report.read_text().splitlines() if line.startswith("| 5")]
    assert len(rows) == 1 and rows[0].startswith("| 50 | "), report.read_text()
    assert not (tmp_path / "scratch").exists()


def test_bench_fanin_three_senders_into_one_activated_collector(tmp_path: Path) -> None:
    report = tmp_path / "report.md"
    argv = [sys.executable, str(REPO / "bench" / "bench_fanin.py"), "--senders", "1", "3",
            "--files", "4", "--repeat", "1", "--root", str(tmp_path / "scratch"),
            "--markdown", str(report)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    # The script checks each file arrived once and byte-identical; a row per sender count.
    rows = [line.split("|")[1:3] for line in report.read_text().splitlines()
            if line.startswith("| ") and line[2].isdigit()]  # fmt: skip
    assert [[c.strip() for c in row] for row in rows] == [["1", "4"], ["3", "12"]], rows
    assert not (tmp_path / "scratch").exists()
