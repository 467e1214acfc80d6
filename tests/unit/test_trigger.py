"""dlogd.trigger on a real file system: make, take, and never through a symlink."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from dlogd import trigger


def test_announce_then_take_and_both_are_idempotent(tmp_path: Path) -> None:
    path = tmp_path / ".stored"
    trigger.take(str(path))  # nothing there: not an error
    trigger.announce(str(path))
    trigger.announce(str(path))
    assert path.is_file() and path.stat().st_size == 0
    trigger.take(str(path))
    assert not path.exists()


def test_a_symlink_in_the_triggers_place_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    (tmp_path / ".stored").symlink_to(target)
    with pytest.raises(OSError) as refused:
        trigger.announce(str(tmp_path / ".stored"))
    assert refused.value.errno == errno.ELOOP
    assert not target.exists()
    trigger.take(str(tmp_path / ".stored"))  # takes the link itself, never its target
    assert not os.path.lexists(tmp_path / ".stored")


def test_the_unit_names_the_stored_trigger(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(trigger.STORED_ENV, raising=False)
    assert trigger.stored_trigger() is None  # run by hand: no path unit to wake
    monkeypatch.setenv(trigger.STORED_ENV, "/var/log/remote/.stored")
    assert trigger.stored_trigger() == "/var/log/remote/.stored"


UNITS = Path(__file__).resolve().parents[2] / "systemd"


def unit_values(name: str, key: str) -> list[str]:
    prefix = f"{key}="
    lines = (UNITS / name).read_text().splitlines()
    return [line[len(prefix) :] for line in lines if line.startswith(prefix)]


def test_the_units_name_one_trigger_file_each() -> None:
    """The path units watch the very file their services take and their writers make."""
    from dlogd.config import DEFAULT_SPOOL
    from dlogd.spool import TRIGGER

    submitted = f"{DEFAULT_SPOOL}/{TRIGGER}"
    assert unit_values("dlogd-ship.path", "PathExists") == [submitted]
    assert unit_values("dlogd-ship.service", "ExecStartPre") == [f"-/usr/bin/rm -f {submitted}"]

    [stored] = unit_values("dlogd-archive.path", "PathExists")
    named = f"{trigger.STORED_ENV}={stored}"
    assert unit_values("dlogd-archive.service", "Environment") == [named]
    assert unit_values("dlogd-receive@.service", "Environment") == [named]
    assert unit_values("dlogd-archive.service", "ExecStartPre") == [f"-/usr/bin/rm -f {stored}"]
