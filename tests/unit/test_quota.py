"""Quotas that push back (issue 14): sizes and percentages, the one "would this go
past" rule, and where each end applies it (the client's spool, a collector's store),
on real file systems; the config round trip goes through the project's own writer."""

from __future__ import annotations

import dataclasses
import errno
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dlogd import config
from dlogd.backoff import delay
from dlogd.config import ClientConfig, Host, Retry, ServerConfig, SpoolQuota, to_text
from dlogd.conflang import Location
from dlogd.names import entry_basename
from dlogd.quota import Amount, Space, from_plain, parse_amount, parse_size, refusal
from dlogd.ship import CollectorResult
from dlogd.spool import Spool, SpoolFull
from dlogd.store import NoRoom, Store

MiB = 1024**2


# --- parsing ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512", Amount(bytes=512)),
        ("64K", Amount(bytes=64 * 1024)),
        ("512M", Amount(bytes=512 * MiB)),
        ("2G", Amount(bytes=2 * 1024**3)),
        ("1T", Amount(bytes=1024**4)),
        ("10%", Amount(percent=10.0)),
        ("2.5%", Amount(percent=2.5)),
        ("99.9999%", Amount(percent=99.9999)),
        ("0.01%", Amount(percent=0.01)),
    ],
)
def test_amounts_parse(text: str, expected: Amount) -> None:
    assert parse_amount(text) == expected


@pytest.mark.parametrize(
    "text",
    ["0", "0K", "0%", "0.0%", "100%", "150%", "-5%", "10 %", "%", "5k", "5MB", "1.5G", "", "ten"],
)
def test_bad_amounts_are_refused_with_the_rule(text: str) -> None:
    with pytest.raises(ValueError, match="a percentage of the file system below 100"):
        parse_amount(text)


def test_sizes_are_the_configs_sizes() -> None:
    assert parse_size("3M") == 3 * MiB
    with pytest.raises(ValueError, match="positive size"):
        parse_size("0")
    with pytest.raises(ValueError, match="positive size"):
        parse_size("10%")


def test_a_percentage_is_of_the_whole_file_system() -> None:
    assert Amount(percent=10).of(1000) == 100
    assert Amount(percent=2.5).of(1000) == 25
    assert Amount(bytes=7).of(1000) == 7


@given(st.integers(1, 2**60) | st.integers(1, 999_999).map(lambda n: f"{n / 10000}%"))
def test_an_amount_survives_its_plain_form(value: int | str) -> None:
    amount = parse_amount(str(value))
    assert from_plain(amount.plain()) == amount


# --- the rule ---------------------------------------------------------------------

SPACE = Space(total=1000, free=600)


@pytest.mark.parametrize(
    ("adding", "min_free", "used", "max_used", "size", "refused"),
    [
        (100, None, 0, None, None, False),
        (600, None, 0, None, None, False),  # exactly fits
        (601, None, 0, None, None, True),  # does not fit, even with no limit
        (500, Amount(bytes=100), 0, None, None, False),  # leaves exactly min_free
        (501, Amount(bytes=100), 0, None, None, True),
        (500, Amount(percent=10), 0, None, None, False),  # 10% of 1000
        (501, Amount(percent=10), 0, None, None, True),
        (0, Amount(bytes=601), 0, None, 50, True),  # already below: a link is refused too
        (0, None, 900, Amount(bytes=1000), 100, False),  # a link: size counts, room not
        (0, None, 901, Amount(bytes=1000), 100, True),
        (100, None, 400, Amount(percent=50), None, False),  # 50% of 1000
        (101, None, 400, Amount(percent=50), None, True),
    ],
)
def test_the_rule(
    adding: int,
    min_free: Amount | None,
    used: int,
    max_used: Amount | None,
    size: int | None,
    refused: bool,
) -> None:
    why = refusal(adding, SPACE, min_free=min_free, used=used, max_used=max_used, size=size)
    assert (why is not None) is refused, why


def test_a_refusal_carries_the_figures() -> None:
    low = refusal(550, SPACE, min_free=Amount(bytes=100))
    assert low is not None and low.fields() == {"free": 600, "min_free": 100}
    assert "leave 50 of 600 free" in low.reason
    over = refusal(10, SPACE, used=995, max_used=Amount(bytes=1000))
    assert over is not None and over.fields() == {"free": 600, "used": 995, "max_used": 1000}


# --- the config -------------------------------------------------------------------


def check(tmp_path: Path, text: str, role: str) -> ClientConfig | ServerConfig:
    path = tmp_path / f"{role}.conf"
    path.write_text(text)
    return config.check(str(path), role).config


def test_client_and_collector_limits_are_read(tmp_path: Path) -> None:
    client = check(tmp_path, 'limits { spool_max_size 512M; spool_min_free "10%"; }\n', "client")
    assert isinstance(client, ClientConfig)
    assert client.quota == SpoolQuota(Amount(bytes=512 * MiB), Amount(percent=10))
    server = check(tmp_path, "limits { min_free 2G; }\n", "server")
    assert isinstance(server, ServerConfig)
    assert server.min_free == Amount(bytes=2 * 1024**3)
    assert check(tmp_path, "", "client").quota == SpoolQuota()  # type: ignore[union-attr]
    assert check(tmp_path, "", "server").min_free is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("text", "role", "where", "message"),
    [
        ("limits { spool_min_free 0; }", "client", 25, "expected a positive size"),
        ('limits {\n  spool_max_size "150%";\n}', "client", 18, "below 100"),
        ("limits { min_free 1.5G; }", "server", 19, "expected a positive size"),
        # Each end's keys only: the other role's are unknown directives.
        ("limits { min_free 1G; }", "client", 10, "unknown directive 'min_free'"),
        ("limits { spool_max_size 1G; }", "server", 10, "unknown directive 'spool_max_size'"),
        ("limits { spool_max_size 1G; spool_max_size 2G; }", "client", 29, "only once"),
        # % is not a word character: a percentage is written quoted.
        ("limits { spool_min_free 10%; }", "client", 27, "unexpected character '%'"),
    ],
)
def test_bad_limits_are_located(
    tmp_path: Path, text: str, role: str, where: int, message: str
) -> None:
    with pytest.raises(config.ConfigError) as caught:
        check(tmp_path, text + "\n", role)
    [problem] = caught.value.problems
    assert isinstance(problem.location, Location)
    assert problem.location.column == where, problem
    assert message in problem.message, problem


amounts = (
    st.none()
    | st.builds(Amount, bytes=st.integers(1, 2**50))
    | st.builds(Amount, percent=st.integers(1, 999_999).map(lambda n: n / 10000))
)


@given(amounts, amounts, amounts)
def test_limits_round_trip_through_the_writer(
    tmp_path_factory: pytest.TempPathFactory,
    max_size: Amount | None,
    min_free: Amount | None,
    store_free: Amount | None,
) -> None:
    tmp = tmp_path_factory.mktemp("rt")
    client = ClientConfig(
        {}, {"logs1": Host("logs1", "logs1")}, quota=SpoolQuota(max_size, min_free)
    )
    server = ServerConfig({}, {}, min_free=store_free)
    for original, role in ((client, "client"), (server, "server")):
        loaded = check(tmp, to_text(original), role)
        assert dataclasses.replace(loaded, sources=()) == original


# --- the client's spool -----------------------------------------------------------


def add(spool: Spool, path: Path, *, copy: bool = False, caller: int | None = None) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        added = spool.add(
            "audit", fd, entry_basename(os.fsencode(path)), ("logs1",), copy=copy, caller=caller
        )
    finally:
        os.close(fd)
    spool.commit()
    return added.name


def test_spool_max_size_refuses_and_keeps_what_is_spooled(tmp_path: Path) -> None:
    files = {n: tmp_path / f"{n}.log" for n in "abc"}
    for n, path in files.items():
        path.write_bytes(n.encode() * 400)
    root = tmp_path / "spool"
    with Spool(str(root), create=True, max_size=Amount(bytes=1000)) as spool:
        first = add(spool, files["a"])
        second = add(spool, files["b"], copy=True)
        assert spool.usage() == 800
        with pytest.raises(SpoolFull) as caught:
            add(spool, files["c"])
        assert caught.value.errno == errno.ENOSPC
        assert caught.value.refusal.fields() == {
            "free": caught.value.refusal.free,
            "used": 800,
            "max_used": 1000,
        }
        # Nothing spooled was dropped to make room, and the refused add left nothing.
        assert sorted(p.name for p in (root / "audit").iterdir() if p.name[0] != ".") == sorted(
            [first, second]
        )
        assert sorted(p.name for p in (root / "audit" / ".owed").iterdir()) == sorted(
            [first, second]
        )
        assert [e.name for e in spool.pending()] == sorted([first, second])


def test_a_copy_in_flight_is_counted_by_the_next_add(tmp_path: Path) -> None:
    """A copy reserves its room before the quota lock is let go (it copies outside it),
    so a second submitter measuring meanwhile sees it: no quota handed out twice."""
    a, b = tmp_path / "a.log", tmp_path / "b.log"
    a.write_bytes(b"a" * 600)
    b.write_bytes(b"b" * 600)
    root = str(tmp_path / "spool")
    quota = Amount(bytes=1000)
    with Spool(root, create=True, max_size=quota) as first, Spool(root, max_size=quota) as other:
        kdir = first._keyword("audit")
        fd = os.open(a, os.O_RDONLY)
        try:
            copying = first._copy(kdir, fd, 600)  # copied, not yet linked as an entry
        finally:
            os.close(fd)
        assert other.usage() == 600
        with pytest.raises(SpoolFull, match="over the limit of 1000"):
            add(other, b, copy=True)
        copying.discard(kdir)  # that add gave up: its room is free again
        assert other.usage() == 0
        add(other, b, copy=True)
        assert other.usage() == 600


def test_a_resubmit_is_answered_even_when_full(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    path.write_bytes(b"x" * 600)
    with Spool(str(tmp_path / "spool"), create=True, max_size=Amount(bytes=1000)) as spool:
        first = add(spool, path, caller=0)
        # 600 + 600 would be over 1000, but the same unchanged file adds nothing.
        assert add(spool, path, caller=0) == first


def test_spool_min_free_counts_a_copy_not_a_link(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    path.write_bytes(b"y" * 4 * MiB)
    root = tmp_path / "spool"
    with Spool(str(root), create=True) as spool:
        free = Space.of_fd(spool.root_fd).free
    # Room for the link (it takes none but its bookkeeping) but not for a 4 MiB copy.
    with Spool(str(root), min_free=Amount(bytes=max(free - 2 * MiB, 1))) as spool:
        add(spool, path)
        with pytest.raises(SpoolFull, match="must stay free"):
            add(spool, path, copy=True)
    with Spool(str(root), min_free=Amount(percent=99.9999)) as spool, pytest.raises(SpoolFull):
        add(spool, path)  # already below it: even a link is refused


# --- a collector's store ----------------------------------------------------------


def test_store_min_free_refuses_for_now(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    try:
        free = Space.of_fd(store.dir_fd).free
        store.check_space("a.log", 1000, b"\0" * 32, Amount(bytes=1))
        with pytest.raises(NoRoom) as caught:
            store.check_space("a.log", 1000, b"\0" * 32, Amount(bytes=free))
        assert caught.value.temporary
        assert caught.value.refusal.min_free == free
        with pytest.raises(NoRoom):
            store.check_space("a.log", free + 1, b"\0" * 32)  # no limit: it must still fit
    finally:
        store.close()


# --- the shipper's view ----------------------------------------------------------


def test_a_file_refused_for_now_leaves_the_collector_complete() -> None:
    """Held, not backed off: nothing left that a retry of the collector could send now."""
    result = CollectorResult("logs1", owed=3, delivered=2, deferred=1)
    assert result.complete and result.pending
    assert "1 refused for now" in result.summary()
    assert not CollectorResult("logs1", owed=3, delivered=2, failed=1).complete


def test_holds_count_their_tries(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    path.write_bytes(b"z")
    with Spool(str(tmp_path / "spool"), create=True) as spool:
        add(spool, path)
        [entry] = spool.pending()
        assert spool.hold_tries(entry, "logs1") == 0
        spool.hold(entry, "logs1", 123.0, "refuse: TEMPORARY_FAILURE: low", tries=3)
        assert spool.hold_tries(entry, "logs1") == 3
        assert spool.held_until(entry, "logs1") == (123.0, "refuse: TEMPORARY_FAILURE: low")
        spool.hold(entry, "logs1", 456.0, "refuse: BAD_NAME")  # for good: no tries
        assert spool.hold_tries(entry, "logs1") == 0


@given(st.integers(1, 100))
def test_a_hold_backs_off_as_a_collector_does(tries: int) -> None:
    policy = Retry(10.0, 600.0)
    wait = delay(policy, tries)
    assert 7.5 <= wait <= 600.0
    assert wait <= 10.0 * 2 ** (tries - 1) * 1.25
