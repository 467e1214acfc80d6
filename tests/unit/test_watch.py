"""dlogd-watch's decisions as data (dlogd/watch.py), its scan on a real directory, and the
``watch { }`` block of client.conf: parsed, validated, written back by ``config.to_text``."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlogd import config, watch
from dlogd.config import ClientConfig, ClientKeyword, ConfigError, Host, Watch
from dlogd.watch import FORGET_AFTER, REFUSED, SUBMITTED, Seen, State

NOW = 1_800_000_000.0
AUDIT = Watch("/var/log/audit", "audit.log.*", "audit", "daemon")
QUIET = Watch("/var/log/app", "app.log.*", "app", "daemon", 30.0)


def seen(
    name: str, ino: int, *, size: int = 100, age: float = 3600.0, ctime_age: float | None = None
) -> Seen:
    mtime = int((NOW - age) * 1e9)
    ctime = int((NOW - (age if ctime_age is None else ctime_age)) * 1e9)
    return Seen(name, 42, ino, size, mtime, ctime)


def names(files: tuple[Seen, ...]) -> list[str]:
    return [f.name for f in files]


# --- plan: what is finished and new --------------------------------------------------


def test_only_the_pattern_counts_and_dot_files_never() -> None:
    scanned = [seen("audit.log", 1), seen("audit.log.1", 2), seen(".audit.log.swp", 3)]
    decided = watch.plan(AUDIT, scanned, State(), NOW)
    assert names(decided.submit) == ["audit.log.1"]
    assert decided.waiting == ()


def test_a_rotation_rename_is_not_a_new_file() -> None:
    """auditd renames audit.log.1 -> audit.log.2 and audit.log -> audit.log.1."""
    state = State()
    first = [seen("audit.log", 1), seen("audit.log.1", 2)]
    state.observe(first, NOW)
    for f in watch.plan(AUDIT, first, state, NOW).submit:
        state.submitted(f, NOW)
    rotated = [seen("audit.log", 3), seen("audit.log.1", 1), seen("audit.log.2", 2)]
    state.observe(rotated, NOW + 60)
    assert names(watch.plan(AUDIT, rotated, state, NOW + 60).submit) == ["audit.log.1"]
    assert state.records[rotated[2].ident].name == "audit.log.2"  # followed by identity


def test_a_file_still_being_written_waits_until_quiet() -> None:
    fresh = seen("app.log.1", 7, age=5.0)
    decided = watch.plan(QUIET, [fresh], State(), NOW)
    assert decided.submit == ()
    assert names(decided.waiting) == ["app.log.1"]
    assert decided.next_check == pytest.approx(NOW - 5.0 + 30.0)
    # Written to again: the quiet time starts over from the new mtime.
    grown = dataclasses.replace(
        fresh, size=200, mtime_ns=int((NOW + 20) * 1e9), ctime_ns=int((NOW + 20) * 1e9)
    )
    assert watch.plan(QUIET, [grown], State(), NOW + 40).submit == ()
    assert names(watch.plan(QUIET, [grown], State(), NOW + 51).submit) == ["app.log.1"]


def test_a_rename_restarts_the_quiet_time() -> None:
    """ctime counts: logrotate renames, then the daemon may still write until told to reopen."""
    renamed = seen("app.log.1", 7, age=3600.0, ctime_age=10.0)
    assert watch.plan(QUIET, [renamed], State(), NOW).submit == ()
    assert watch.plan(dataclasses.replace(QUIET, quiet=None), [renamed], State(), NOW).submit == (
        renamed,
    )


def test_a_file_grown_after_it_was_submitted_is_a_new_version() -> None:
    state = State()
    first = seen("audit.log.1", 2)
    state.submitted(first, NOW)
    grown = dataclasses.replace(first, size=first.size + 1)
    assert watch.plan(AUDIT, [grown], state, NOW).submit == (grown,)


def test_a_refusal_is_not_retried_until_the_file_changes() -> None:
    state = State()
    locked = seen("audit.log.1", 2)
    state.refused(locked, NOW, "user 1 cannot read it")
    assert state.records[locked.ident].outcome == REFUSED
    assert watch.plan(AUDIT, [locked], state, NOW + 60).submit == ()
    chmodded = dataclasses.replace(locked, ctime_ns=locked.ctime_ns + 1)
    assert watch.plan(AUDIT, [chmodded], state, NOW + 60).submit == (chmodded,)


def test_a_file_that_disappears_is_forgotten_after_a_day_not_at_once() -> None:
    state = State()
    kept = seen("audit.log.1", 2)
    state.submitted(kept, NOW)
    state.observe([], NOW + 1)  # a listing that missed it (a rename in progress)
    assert state.records[kept.ident].missing_since == NOW + 1
    state.observe([kept], NOW + 2)  # back: still known, so not submitted again
    assert state.records[kept.ident].missing_since is None
    assert watch.plan(AUDIT, [kept], state, NOW + 2).submit == ()
    state.observe([], NOW + 3)
    state.observe([], NOW + 3 + FORGET_AFTER / 2)
    assert kept.ident in state.records
    state.observe([], NOW + 4 + FORGET_AFTER)
    assert kept.ident not in state.records


def test_a_waiting_file_that_vanishes_leaves_nothing_behind() -> None:
    state = State()
    fresh = seen("app.log.1", 9, age=1.0)
    state.observe([fresh], NOW)
    assert names(watch.plan(QUIET, [fresh], state, NOW).waiting) == ["app.log.1"]
    state.observe([], NOW + 60)
    decided = watch.plan(QUIET, [], state, NOW + 60)
    assert (decided.submit, decided.waiting, state.records) == ((), (), {})


def test_state_is_bounded() -> None:
    state = State()
    for ino in range(watch.MAX_FILES + 50):
        state.submitted(seen(f"audit.log.{ino}", ino), NOW)
    state.observe([], NOW)
    assert len(state.records) == watch.MAX_FILES


def test_more_matching_files_than_the_bound_are_left_for_later() -> None:
    many = [seen(f"audit.log.{i:05d}", i) for i in range(watch.MAX_FILES + 3)]
    decided = watch.plan(AUDIT, many, State(), NOW)
    assert (len(decided.submit), decided.skipped) == (watch.MAX_FILES, 3)


# --- the state file --------------------------------------------------------------------


def test_state_round_trips_and_a_corrupt_file_stops_the_run(tmp_path: Path) -> None:
    state = State(problem="cannot open")
    state.submitted(seen("audit.log.1", 2), NOW)
    state.refused(seen("audit.log.2", 3), NOW, "PERMISSION_DENIED: no")
    state.observe([seen("audit.log.1", 2)], NOW + 5)
    watch.write_states(str(tmp_path), {"/var/log/audit": state})
    assert watch.read_states(str(tmp_path)) == {"/var/log/audit": state}
    assert {r.outcome for r in state.records.values()} == {SUBMITTED, REFUSED}
    assert (tmp_path / watch.STATE_FILE).stat().st_mode & 0o777 == 0o600
    (tmp_path / watch.STATE_FILE).write_text('{"version": 1, "watches": {"/x": {}}}')
    with pytest.raises(watch.StateError, match="not a dlogd-watch state file"):
        watch.read_states(str(tmp_path))


def test_no_state_file_is_an_empty_state(tmp_path: Path) -> None:
    assert watch.read_states(str(tmp_path)) == {}


# --- scanning a real directory -------------------------------------------------------------


def test_scan_lists_regular_files_and_never_follows_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "audit.log.1").write_text("x")
    (tmp_path / "audit.log.2").symlink_to("/etc/shadow")
    (tmp_path / "audit.log.3").mkdir()
    os.mkfifo(tmp_path / "audit.log.4")
    fd = watch.open_directory(str(tmp_path))
    try:
        found = watch.scan(fd)
    finally:
        os.close(fd)
    st = (tmp_path / "audit.log.1").stat()
    assert found == [Seen.of("audit.log.1", st)]


def test_a_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    with pytest.raises(watch.ScanProblem, match=r"writable by every user \(mode 1777\)"):
        watch.open_directory(str(shared))


def test_a_symlinked_directory_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(watch.ScanProblem, match="symbolic link: not followed"):
        watch.open_directory(str(tmp_path / "link"))


# --- the watch { } block ----------------------------------------------------------------------


def client_with(watches: dict[str, Watch]) -> ClientConfig:
    return ClientConfig(
        keywords={"audit": ClientKeyword("audit", frozenset({1}), frozenset(), ("logs1",))},
        hosts={"logs1": Host("logs1", "192.0.2.10")},
        watches=watches,
    )


def load(tmp_path: Path, text: str) -> ClientConfig:
    path = tmp_path / "client.conf"
    path.write_text(text)
    loaded = config.check(str(path), "client").config
    assert isinstance(loaded, ClientConfig)
    return dataclasses.replace(loaded, sources=())


watch_dirs = st.lists(
    st.from_regex(r"[a-z][a-z0-9._-]{0,8}", fullmatch=True), min_size=1, max_size=3
)
patterns = st.from_regex(r"[a-z0-9._*?-]{1,16}", fullmatch=True)


@settings(max_examples=40, deadline=None)
@given(
    directories=st.lists(watch_dirs, min_size=0, max_size=3, unique_by=tuple),
    pattern=patterns,
    user=st.one_of(st.integers(1, 2**32 - 2), st.just("daemon")),
    quiet=st.one_of(st.none(), st.integers(1, 86400).map(float)),
)
def test_watch_blocks_round_trip(
    tmp_path_factory: pytest.TempPathFactory,
    directories: list[list[str]],
    pattern: str,
    user: int | str,
    quiet: float | None,
) -> None:
    watches = {
        "/" + "/".join(parts): Watch("/" + "/".join(parts), pattern, "audit", user, quiet)
        for parts in directories
    }
    original = client_with(watches)
    assert load(tmp_path_factory.mktemp("w"), config.to_text(original)) == original


BAD_WATCHES = [
    (
        'watch "/var/log/audit/" { pattern "a"; keyword "audit"; user "daemon"; }',
        "1:1: error: '/var/log/audit/': write the directory as '/var/log/audit'",
    ),
    (
        'watch "/var/log/audit" { pattern "a/b"; keyword "audit"; user "daemon"; }',
        "1:34: error: 'a/b': expected a file-name pattern (1-255 characters, no '/')",
    ),
    (
        'watch "/var/log/audit" { keyword "audit"; user "daemon"; }',
        "1:1: error: a watch needs a pattern line",
    ),
    (
        'watch "/var/log/audit" { pattern "a"; user "daemon"; }',
        "1:1: error: a watch needs a keyword line",
    ),
    (
        'watch "/var/log/audit" { pattern "a"; keyword "audit"; }',
        "1:1: error: a watch needs a user line",
    ),
    (
        'watch "/var/log/audit" { pattern "a"; keyword "audit"; user root; }',
        "1:61: error: a watch must not run as root: name an unprivileged user",
    ),
    (
        'watch "/var/log/audit" { pattern "a"; keyword "audit"; user 0; }',
        "1:61: error: a watch must not run as root: name an unprivileged user",
    ),
    (
        'watch "/var/log/audit" { pattern "a"; keyword "nope"; user "daemon"; }',
        '1:47: error: watch "/var/log/audit" names keyword "nope", which has no keyword block',
    ),
    (
        'watch "/var/log/audit" { pattern "a"; keyword "audit"; user "daemon"; quiet 0; }',
        "1:77: error: 0: expected a positive duration",
    ),
    (
        'watch "/var/log/audit" { pattern "a"; keyword "audit"; user "daemon"; mode 1; }',
        "1:71: error: unknown directive 'mode'",
    ),
    (
        'watch "/var/log/audit" { pattern "a"; pattern "b"; keyword "audit"; user "daemon"; }',
        "1:39: error: may appear only once",
    ),
    (
        'watch "relative" { pattern "a"; keyword "audit"; user "daemon"; }',
        "1:1: error: expected an absolute path, got 'relative'",
    ),
]


@pytest.mark.parametrize(("block", "expected"), BAD_WATCHES)
def test_a_bad_watch_block_is_a_clear_located_error(
    tmp_path: Path, block: str, expected: str
) -> None:
    path = tmp_path / "client.conf"
    # The bad block on line 1, the rest from the config's own writer.
    path.write_text(block + "\n" + config.to_text(client_with({})))
    with pytest.raises(ConfigError) as caught:
        config.check(str(path), "client")
    assert str(caught.value.problems[0]).startswith(f"{path}:{expected}")


def test_a_watch_naming_a_missing_user_is_a_warning(tmp_path: Path) -> None:
    text = config.to_text(
        client_with({"/srv/x": Watch("/srv/x", "*.log", "audit", "nosuchuser-dlogd")})
    )
    path = tmp_path / "client.conf"
    path.write_text(text)
    checked = config.check(str(path), "client")
    assert [p.message for p in checked.warnings] == [
        'no user "nosuchuser-dlogd" on this host (the watch submits nothing until it exists)'
    ]


def test_two_spellings_of_one_directory_cannot_make_two_watches(tmp_path: Path) -> None:
    block = 'watch "/var/log/audit" { pattern "a"; keyword "audit"; user "daemon"; }\n'
    path = tmp_path / "client.conf"
    path.write_text(block + block + config.to_text(client_with({})))
    with pytest.raises(ConfigError, match=r'2:1: error: duplicate watch "/var/log/audit"'):
        config.check(str(path), "client")


def test_only_this_users_watches_run() -> None:
    mine = Watch("/a", "*", "audit", 1234)
    other = Watch("/b", "*", "audit", "daemon")
    cfg = client_with({"/a": mine, "/b": other})
    assert watch.mine(cfg, 1234) == [mine]
    assert watch.mine(cfg, watch.resolve_user("daemon") or -1) == [other]


def test_a_file_replaced_after_the_scan_is_not_sent_under_the_old_identity(tmp_path: Path) -> None:
    """A rotation between scan and submit: the name now holds another file, which the next
    scan will see; the descriptor handed over is always the file whose identity is recorded."""
    logs, state_dir = tmp_path / "logs", tmp_path / "state"
    logs.mkdir()
    state_dir.mkdir()
    (logs / "audit.log.1").write_text("old\n")
    (logs / "audit.log.2").write_text("kept\n")
    fd = watch.open_directory(str(logs))
    try:
        scanned = sorted(watch.scan(fd), key=lambda s: s.name)
        (logs / "audit.log.1").rename(logs / "audit.log.3")
        (logs / "new").write_text("new\n")
        (logs / "new").rename(logs / "audit.log.1")
        with watch._handed_over(fd, scanned, str(state_dir)) as opened:
            replaced, kept = opened
            assert isinstance(replaced[1], FileNotFoundError)
            assert isinstance(kept[1], str)
            assert Path(kept[1]).name == "audit.log.2"
            assert Path(kept[1]).read_text() == "kept\n"  # through /proc/self/fd: that file
    finally:
        os.close(fd)
    assert not (state_dir / ".submitting").exists()
