"""Per-collector backoff for the shipper, kept on disk so that short-lived runs remember it.

``dlogd-ship`` is a oneshot started by a path unit and a timer: without a
memory of failures, every submit would make it hammer a collector that is
down. After a failure the next attempt waits an exponential, jittered,
capped delay (``retry { min max }``); state lives in the spool's ``.retry/``
(where: :data:`dlogd.spool.RETRY_DIR`), one ``<host>.json`` per collector.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections.abc import Collection, Mapping

from dlogd.config import Retry
from dlogd.fsutil import read_json
from dlogd.spool import RETRY_DIR

# The last run's outcome per collector, for `dlogctl status`: unlike the
# backoff it stays after a success (one small file per collector ever named).
STATE_DIR = ".status"


def delay(policy: Retry, failures: int) -> float:
    """Seconds to wait after the ``failures``-th failure in a row: ``retry { min }``
    doubled per failure, capped at ``retry { max }``, jittered. A collector's
    backoff and a file's hold after a temporary refusal both count this way."""
    base = min(policy.max_delay, policy.min_delay * 2.0 ** min(failures - 1, 32))
    # Jitter spreads a fleet's retries after a collector comes back.
    return min(policy.max_delay, base * random.uniform(0.75, 1.25))


class RetryState:
    """Per-collector backoff kept on disk, so short-lived runs remember it."""

    def __init__(self, spool_root: str, policy: Retry) -> None:
        self.directory = os.path.join(spool_root, RETRY_DIR)
        self.policy = policy
        os.makedirs(self.directory, mode=0o750, exist_ok=True)

    def _path(self, host: str) -> str:
        return os.path.join(self.directory, f"{host}.json")

    def read(self, host: str) -> dict[str, float]:
        state = read_json(self._path(host))
        try:
            return {"failures": float(state["failures"]), "next": float(state["next"])}  # type: ignore[arg-type]
        except (ValueError, KeyError, TypeError):
            return {"failures": 0.0, "next": 0.0}

    def due(self, host: str, now: float) -> float | None:
        """None if the host may be tried now, else when it may."""
        next_attempt = self.read(host)["next"]
        return None if next_attempt <= now else next_attempt

    def succeeded(self, host: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(host))

    def failed(self, host: str, reason: str, now: float) -> float:
        """Record a failure; returns when to try again."""
        failures = int(self.read(host)["failures"]) + 1
        next_attempt = now + delay(self.policy, failures)
        self._write(host, {"failures": failures, "next": next_attempt, "error": reason[:500]})
        return next_attempt

    def tidy(self, owed: Collection[str]) -> None:
        """Drop state nobody needs: the temporary file of a run killed mid-write,
        and the backoff of every collector nothing is owed to any more.

        Called under the spool's drain lock, so no other shipper is writing here.
        """
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        for name in names:
            stale = name.endswith(".tmp") or (
                name.endswith(".json") and name.removesuffix(".json") not in owed
            )
            if stale:
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    os.unlink(os.path.join(self.directory, name))

    def _write(self, host: str, state: Mapping[str, object]) -> None:
        _write_json(self._path(host), state)


def record_run(spool_root: str, host: str, now: float, error: str | None = None) -> None:
    """Remember how this run ended with ``host``: its time of success, or its error.

    Best effort: the delivery itself is already recorded where it matters (the
    spool and the journal), so a full disk here never fails the run.
    """
    directory = os.path.join(spool_root, STATE_DIR)
    path = os.path.join(directory, f"{host}.json")
    with contextlib.suppress(OSError, ValueError):
        os.makedirs(directory, mode=0o750, exist_ok=True)
        state = read_json(path)
        if error is None:
            state["last_success"] = now
        else:
            state.update(last_error=error[:500], last_error_time=now)
        _write_json(path, state)


def _write_json(path: str, state: Mapping[str, object]) -> None:
    """fsync, then rename over: a reader sees the old state or the new, never half."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o640)
    with os.fdopen(fd, "w") as handle:
        json.dump(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
