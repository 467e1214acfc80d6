"""One table of names and limits (dlogd.names): every module that checks a name agrees.

Names are drawn from the table's own patterns and pushed through each real
consumer: the config schema, the submit wire format, the ship protocol's
Offer, the spool and the store. Bug 1 of issue 13 (a host the schema took and
the spool refused) is the kind of mismatch these catch.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from dlogd import names, schema
from dlogd.shipwire import Offer
from dlogd.spool import Spool
from dlogd.store import check_name
from dlogd.submitwire import Request

keywords = st.from_regex(names.KEYWORD_RE, fullmatch=True)
hosts = st.from_regex(names.HOST_RE, fullmatch=True)
SPOOLED = settings(max_examples=60, deadline=None)


@SPOOLED
@given(keyword=keywords, host=hosts)
def test_a_keyword_and_host_the_schema_accepts_can_be_submitted_spooled_and_offered(
    keyword: str, host: str
) -> None:
    assert schema.identifier(keyword) == keyword
    assert schema.host_name(host) == host
    Request(keyword, b"/var/log/x.log")
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "x.log"
        source.write_bytes(b"x")
        with Spool(os.path.join(tmp, "spool"), create=True) as spool:
            fd = os.open(source, os.O_RDONLY)
            try:
                added = spool.add(keyword, fd, names.entry_basename(b"x.log"), [host], now=1)
            finally:
                os.close(fd)
            spool.commit()
            (entry,) = spool.pending()
    assert (entry.keyword, entry.owed) == (keyword, frozenset({host}))
    Offer(1, keyword, added.name, 1, bytes(32))


@given(
    path=st.binary(min_size=1, max_size=400), when=st.integers(0, 2**34), n=st.integers(0, 99_999)
)
def test_every_spool_entry_name_is_a_name_the_store_keeps(path: bytes, when: int, n: int) -> None:
    """The shipper offers entry names as they are: the collector must take each one."""
    try:
        basename = names.entry_basename(path)
    except names.BadBasename:
        return
    name = names.entry_name(when, n, basename)
    assert names.BASENAME_RE.match(basename)
    check_name(name)  # the store's own check
    Offer(1, "audit", name, 0, bytes(32))


def test_the_limits_the_config_allows_are_the_protocol_s() -> None:
    assert schema.window(names.MAX_WINDOW) == names.MAX_WINDOW
    assert schema.frame_size(f"{names.MIN_FRAME}") == names.MIN_FRAME
    assert schema.frame_size(f"{names.MAX_FRAME}") == names.MAX_FRAME
    from dlogd.config import Limits
    from dlogd.shipwire import Hello

    defaults = Limits()
    assert (defaults.window, defaults.frame_size) == (names.DEFAULT_WINDOW, names.DEFAULT_FRAME)
    assert Hello() == Hello(max_frame=defaults.frame_size, window=defaults.window)
