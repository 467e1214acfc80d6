"""Fault-test hook: ``DLOGD_TEST_CRASH_AT=<point>`` kills the process at that point.

The points, where a crash must lose nothing acknowledged (tests/faults):
``after-owed``, ``after-link`` (spool add), ``before-commit`` (submit
service), ``ship-after-stored`` (shipper, acknowledged but not yet applied).
Costs one environment lookup where no test asks for it.
"""

from __future__ import annotations

import os


def crash_point(point: str) -> None:
    """SIGKILL ourselves here if the environment names this point."""
    if os.environ.get("DLOGD_TEST_CRASH_AT") == point:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
