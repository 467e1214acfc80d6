"""The benchmark scripts still run: each one at toy sizes (no timing is judged).

Place in the flow: bench/ measures; this only keeps the scripts from rotting
as the code they drive changes (issue 12: a quick smoke run of each).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
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


def run_bench(script: str, *args: str, timeout: float = 600) -> str:
    """Run a bench script that keeps its data under /tmp/dlogd-bench; its report."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.md"
        argv = [sys.executable, str(REPO / "bench" / script), *args, "--markdown", str(report)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        assert done.returncode == 0, done.stderr[-4000:]
        return report.read_text()


def tools_in(report: str) -> list[str]:
    return [line.split("|")[1].strip() for line in report.splitlines()
            if line.startswith("| ") and not line.startswith("| tool")]  # fmt: skip


def test_bench_ship_runs_every_contender_on_both_cases() -> None:
    text = run_bench("bench_ship.py", "--repeat", "1", "--big-mib", "2", "--small-count", "20")
    # The script checks what each tool delivered; each contender has its row.
    rows = tools_in(text.split("### Peak memory")[0])
    big = ["dlogd", "rsync -e ssh", "scp", "socat TLS pipe", "dd conv=fsync"]
    small = ["dlogd", "rsync -e ssh", "scp", "socat TLS pipe", "loop: fsync each",
             "loop: syncfs per 500"]  # fmt: skip
    assert rows == big + small, text


def test_bench_submit_measures_every_scenario_and_its_references() -> None:
    text = run_bench("bench_submit.py", "--submits", "6", "--batch", "5", "--batches", "2",
                     "--runs", "2")  # fmt: skip
    scenarios = [row for row in tools_in(text) if row.startswith("(")]
    assert "(ref) `python -I -S -c pass`, alternating with (a)" in scenarios, text
    assert "(ref) fsync-per-file loop over the same files (one process)" in scenarios, text
    assert any(s.startswith("(b) socket-activated, submit_many") for s in scenarios), text
