"""The shipper's backoff: exponential, jittered, capped, kept on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dlogd.backoff import RetryState
from dlogd.config import Retry


def test_delays_grow_and_stay_within_jitter_and_cap(tmp_path: Path) -> None:
    retry = RetryState(str(tmp_path), Retry(min_delay=10, max_delay=100))
    delays = [retry.failed("logs1", "down", 1000.0) - 1000.0 for _ in range(6)]
    for n, delay in enumerate(delays):
        nominal = min(100.0, 10.0 * 2**n)
        assert min(nominal * 0.75, 100.0) <= delay <= min(nominal * 1.25, 100.0)
    assert delays[-1] == pytest.approx(100.0, rel=0.25)
    assert retry.due("logs1", 1000.0) is not None
    assert retry.due("logs1", 1000.0 + 126.0) is None


def test_a_collector_down_for_months_does_not_overflow(tmp_path: Path) -> None:
    retry = RetryState(str(tmp_path), Retry(min_delay=30, max_delay=3600))
    (tmp_path / ".retry" / "logs1.json").write_text(json.dumps({"failures": 5000, "next": 0}))
    assert retry.failed("logs1", "down", 0.0) == pytest.approx(3600.0, rel=0.25)
    assert retry.read("logs1")["failures"] == 5001


def test_success_forgets_the_backoff(tmp_path: Path) -> None:
    retry = RetryState(str(tmp_path), Retry(min_delay=10, max_delay=100))
    retry.failed("logs1", "down", 0.0)
    retry.succeeded("logs1")
    assert retry.due("logs1", 0.0) is None
    assert retry.read("logs1") == {"failures": 0.0, "next": 0.0}


@pytest.mark.parametrize("junk", ["", "{", "[]", '{"failures": "x", "next": 1}'])
def test_a_damaged_state_file_means_try_now(tmp_path: Path, junk: str) -> None:
    retry = RetryState(str(tmp_path), Retry(min_delay=10, max_delay=100))
    (tmp_path / ".retry" / "logs1.json").write_text(junk)
    assert retry.due("logs1", 0.0) is None
