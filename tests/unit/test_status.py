"""dlogctl status on a spool and a store built by the real writers (Spool.add, Store)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dlogd import status
from dlogd.names import entry_basename
from dlogd.spool import Spool
from dlogd.store import Store

NOW = 1_800_000_000.0


def _spool_file(spool: Path, src: Path, hosts: list[str], when: float, kw: str = "audit") -> str:
    with Spool(str(spool), create=True) as sp:
        fd = os.open(src, os.O_RDONLY)
        try:
            added = sp.add(kw, fd, entry_basename(os.fsencode(src.name)), hosts, now=when)
        finally:
            os.close(fd)
        sp.commit()
    return added.name


def _client(tmp_path: Path) -> tuple[Path, list[str]]:
    spool = tmp_path / "spool"
    names = []
    for i, age in enumerate((3600, 60, 5)):
        src = tmp_path / f"f{i}.log"
        src.write_bytes(b"x" * (1000 * (i + 1)))
        names.append(_spool_file(spool, src, ["logs1", "logs2"], NOW - age))
    return spool, names


def test_client_pending_per_keyword_and_collector(tmp_path: Path) -> None:
    spool, _ = _client(tmp_path)
    got = status.gather_client(str(spool), ["logs1", "logs2", "logs3"], now=NOW)
    rows = {(p.keyword, p.host): p for p in got.pending}
    assert set(rows) == {("audit", "logs1"), ("audit", "logs2")}
    assert rows["audit", "logs1"].files == 3
    assert rows["audit", "logs1"].bytes == 6000
    assert rows["audit", "logs1"].oldest == NOW - 3600
    # A configured collector that is owed nothing is still listed.
    assert [c.host for c in got.collectors] == ["logs1", "logs2", "logs3"]


def test_held_entry_shows_its_reason(tmp_path: Path) -> None:
    spool, names = _client(tmp_path)
    with Spool(str(spool)) as sp:
        [entry] = [e for e in sp.pending() if e.name == names[0]]
        sp.hold(entry, "logs2", NOW + 600, "refuse: TOO_LARGE: over the limit")
    got = status.gather_client(str(spool), ["logs1", "logs2"], now=NOW)
    assert [(h.entry, h.host, h.reason, h.until) for h in got.held] == [
        (names[0], "logs2", "refuse: TOO_LARGE: over the limit", NOW + 600)
    ]
    assert {(p.host, p.held) for p in got.pending} == {("logs1", 0), ("logs2", 1)}
    code, line = status.check(got, warn_age=None, crit_age=None)
    assert code == status.WARNING and "1 held" in line


def test_entry_held_for_now_is_deferred_not_a_warning(tmp_path: Path) -> None:
    spool, names = _client(tmp_path)
    with Spool(str(spool)) as sp:
        [entry] = [e for e in sp.pending() if e.name == names[1]]
        sp.hold(entry, "logs1", NOW + 60, "refuse: TEMPORARY_FAILURE: store full", tries=2)
    got = status.gather_client(str(spool), ["logs1", "logs2"], now=NOW)
    assert [(h.entry, h.host, h.tries) for h in got.held] == [(names[1], "logs1", 2)]
    rows = {p.host: (p.held, p.deferred) for p in got.pending}
    assert rows == {"logs1": (0, 1), "logs2": (0, 0)}
    # It retries by itself: no operator needed, so no WARNING for it alone.
    code, line = status.check(got, warn_age=None, crit_age=None)
    assert code == status.OK and "held" not in line, line
    assert "held for now (2 tries)" in status.render(got)
    families = text_string_to_metric_families(status.prometheus(got))
    deferred = {
        s.labels["collector"]: s.value
        for f in families
        for s in f.samples
        if s.name == "dlogd_spool_deferred_files"
    }
    assert deferred == {"logs1": 1, "logs2": 0}


def test_delivered_entries_are_no_longer_pending(tmp_path: Path) -> None:
    spool, _ = _client(tmp_path)
    with Spool(str(spool)) as sp:
        for entry in list(sp.pending()):
            sp.acknowledge(entry, "logs1")
        sp.commit()
    got = status.gather_client(str(spool), ["logs1", "logs2"], now=NOW)
    assert [(p.host, p.files) for p in got.pending] == [("logs2", 3)]


def test_backoff_and_last_run_are_read_from_disk(tmp_path: Path) -> None:
    spool, _ = _client(tmp_path)
    (spool / ".retry").mkdir()
    (spool / ".retry" / "logs1.json").write_text(
        json.dumps({"failures": 3, "next": NOW + 120, "error": "connection refused"})
    )
    (spool / ".status").mkdir()
    (spool / ".status" / "logs2.json").write_text(json.dumps({"last_success": NOW - 30}))
    got = {c.host: c for c in status.gather_client(str(spool), [], now=NOW).collectors}
    assert got["logs1"].failures == 3
    assert got["logs1"].next_retry == NOW + 120
    assert got["logs1"].last_error == "connection refused"
    assert got["logs2"].last_success == NOW - 30 and got["logs2"].next_retry is None


@pytest.mark.parametrize(
    ("warn", "crit", "expected"),
    [(None, None, status.OK), (7200, None, status.OK), (600, None, status.WARNING),
     (600, 3000, status.CRITICAL)],
)  # fmt: skip
def test_check_mode_exit_codes(tmp_path: Path, warn: float, crit: float, expected: int) -> None:
    spool, _ = _client(tmp_path)
    code, line = status.check(status.gather_client(str(spool), [], now=NOW), warn, crit)
    assert code == expected, line
    assert line.startswith(f"DLOGD {('OK', 'WARNING', 'CRITICAL')[expected]} - ")


def test_symlinks_in_the_spool_are_not_followed(tmp_path: Path) -> None:
    spool, _ = _client(tmp_path)
    secret = tmp_path / "elsewhere"
    (secret / "0.x").mkdir(parents=True)
    (spool / "evil").symlink_to(secret)
    (spool / "audit" / "1.link").symlink_to(tmp_path / "f0.log")
    got = status.gather_client(str(spool), [], now=NOW)
    assert {p.keyword for p in got.pending} == {"audit"}
    assert sum(p.files for p in got.pending) == 6  # 3 entries x 2 collectors, link skipped


def _store(directory: Path, name: str, data: bytes, *, complete: bool = True) -> None:
    store = Store(str(directory))
    upload = store.begin(name, len(data), hashlib.sha256(data).digest())
    if complete:
        upload.write(data)
        store.finish(upload)
        store.commit()
    else:
        upload.write(data[: len(data) // 2])
        upload.close()
    store.close()


def test_server_stored_partials_and_free_space(tmp_path: Path) -> None:
    web1 = tmp_path / "web1" / "audit"
    _store(web1, "1.a.log", b"a" * 100)
    _store(web1, "2.b.log", b"b" * 200)
    _store(web1, "3.c.log", b"c" * 1000, complete=False)
    os.utime(web1 / "2.b.log", (NOW, NOW))
    os.utime(web1 / "1.a.log", (NOW - 50, NOW - 50))
    dirs = {("web1", "audit"): str(web1), ("web2", "audit"): str(tmp_path / "web2" / "audit")}
    got = {s.host: s for s in status.gather_server(dirs, now=NOW + 10).stores}
    assert (got["web1"].files, got["web1"].bytes) == (2, 300)
    assert (got["web1"].last_file, got["web1"].last_time) == ("2.b.log", NOW)
    assert (got["web1"].partials, got["web1"].partial_bytes) == (1, 500)
    assert got["web1"].free_bytes is not None and got["web1"].free_bytes > 0
    assert got["web2"].files == 0 and got["web2"].error is None
    code, line = status.check(status.gather_server(dirs, now=NOW + 10), 5, 60)
    assert code == status.WARNING and "web1/audit" in line


def test_prometheus_text_parses_back(tmp_path: Path) -> None:
    spool, _ = _client(tmp_path)
    out = tmp_path / "dlogd.prom"
    status.write_atomically(str(out), status.prometheus(status.gather_client(str(spool), [], NOW)))
    families = {f.name: f for f in text_string_to_metric_families(out.read_text())}
    pending = {
        (s.labels["keyword"], s.labels["collector"]): s.value
        for s in families["dlogd_spool_pending_files"].samples
    }
    assert pending == {("audit", "logs1"): 3.0, ("audit", "logs2"): 3.0}
    [age] = [s for s in families["dlogd_spool_oldest_pending_age_seconds"].samples
             if s.labels["collector"] == "logs1"]  # fmt: skip
    assert age.value == 3600.0
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_human_table_fits_80_columns(tmp_path: Path) -> None:
    spool, names = _client(tmp_path)
    with Spool(str(spool)) as sp:
        [entry] = [e for e in sp.pending() if e.name == names[0]]
        sp.hold(entry, "logs2", NOW + 600, "x" * 300)
    text = status.render(status.gather_client(str(spool), ["a" * 40], now=NOW))
    assert all(len(line) <= 80 for line in text.splitlines()), text
    assert "audit" in text and "logs2" in text


def _as_group_member(gid: int, fn: Callable[[], str]) -> str:
    """Run ``fn`` in a child that is uid 65534 with only ``gid``: not the owner, no root."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to the group member, report, never return
        code = 0
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(65534)
            os.write(write, fn().encode())
        except BaseException as exc:
            os.write(write, f"ERROR {exc!r}".encode())
            code = 1
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        out = pipe.read()
    _, status_code = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status_code) == 0, out
    return out


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory others may traverse (pytest's own base is 0700)."""
    base = Path(tempfile.mkdtemp(prefix="dlogd-status-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base)


def test_a_member_of_the_spools_group_reads_it_without_root(open_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root to set up another user's view")
    spool, names = _client(open_dir)
    with Spool(str(spool)) as sp:
        [entry] = [e for e in sp.pending() if e.name == names[0]]
        sp.hold(entry, "logs2", NOW + 600, "refuse: TOO_LARGE")
    (spool / ".retry").mkdir(mode=0o750)
    (spool / ".retry" / "logs1.json").write_text('{"failures": 2, "next": 1e12}')
    (spool / ".retry" / "logs1.json").chmod(0o640)
    # The services run as dlogd:dlogd; here the tree's group stands for it.
    group = 4242
    for path in [spool, *spool.rglob("*")]:
        os.chown(path, 0, group, follow_symlinks=False)
    out = _as_group_member(
        group, lambda: status.to_json(status.gather_client(str(spool), [], now=NOW))
    )
    got = json.loads(out)
    assert {(p["host"], p["files"]) for p in got["pending"]} == {("logs1", 3), ("logs2", 3)}
    assert [h["reason"] for h in got["held"]] == ["refuse: TOO_LARGE"]
    assert {c["host"]: c["failures"] for c in got["collectors"]}["logs1"] == 2
