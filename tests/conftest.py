"""Shared fixtures for every tier. Tier-specific fixtures live in each tier's conftest."""

from __future__ import annotations

import os
import tempfile

import pytest

from tests.tlsfixtures import fleet, other_fleet

__all__ = ["fleet", "other_fleet"]


def pytest_configure(config: pytest.Config) -> None:
    # Config caches of every process the tests start land in a private place,
    # never in this machine's /var/cache/dlogd.
    if "DLOGD_CACHE_DIR" not in os.environ:
        os.environ["DLOGD_CACHE_DIR"] = tempfile.mkdtemp(prefix="dlogd-test-cache-")
