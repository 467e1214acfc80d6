"""Round trips through the whole loader: object -> ``to_text`` -> ``check`` -> object.

``config.to_text`` is the inverse of loading (conflang -> schema -> config);
hypothesis generates valid client and collector configs, including paths
with quotes, backslashes, newlines and non-ASCII characters and durations in
whole seconds and milliseconds, and checks that
nothing is lost or changed on the way back.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import dlogd.names
from dlogd import config
from dlogd.config import (
    DEFAULT_PORT,
    ClientConfig,
    ClientKeyword,
    Host,
    Limits,
    Retry,
    ServerConfig,
    ServerKeyword,
    TLSFiles,
)

REPO = Path(__file__).resolve().parents[2]

# Drawn from the one table every module checks against (dlogd.names), so a config
# that parses here is one the spool, the wire formats and the store accept too.
names = st.from_regex(dlogd.names.KEYWORD_RE, fullmatch=True)
host_names = st.from_regex(dlogd.names.HOST_RE, fullmatch=True)
segments = st.text(
    st.characters(exclude_characters="/\0", exclude_categories=["Cs"]),
    min_size=1,
    max_size=8,
).filter(lambda s: s not in (".", ".."))
# Already normalised, as the loader normalises: no empty, "." or ".." parts.
paths = st.lists(segments, max_size=4).map(lambda parts: "/" + "/".join(parts))
uids = st.integers(0, 2**32 - 2)
positives = st.integers(1, 1_000_000)
sizes = st.integers(1, 2**50)
whole_seconds = st.integers(1, 10**6).map(float)
milliseconds = st.integers(1, 10**6).map(lambda ms: ms / 1000)
durations_any = whole_seconds | milliseconds
fingerprints = st.none() | st.binary(min_size=32, max_size=32).map(bytes.hex)


def limits(durations: st.SearchStrategy[float]) -> st.SearchStrategy[Limits]:
    return st.builds(
        Limits,
        max_file_size=sizes,
        timeout=durations,
        window=st.integers(1, dlogd.names.MAX_WINDOW),
        frame_size=st.integers(dlogd.names.MIN_FRAME, dlogd.names.MAX_FRAME),
        max_batch=positives,
    )


tls_files = st.builds(
    TLSFiles, certificate=paths, key=paths, ca=paths, min_version=st.sampled_from(["1.2", "1.3"])
)


@st.composite
def client_configs(
    draw: st.DrawFn, durations: st.SearchStrategy[float] = durations_any
) -> ClientConfig:
    host_list = draw(st.lists(host_names, min_size=1, max_size=4, unique=True))
    hosts = {
        name: Host(
            name,
            draw(host_names),
            draw(st.integers(1, 65535)),
            draw(fingerprints),
        )
        for name in host_list
    }
    keywords = {
        name: ClientKeyword(
            name,
            uids=frozenset(draw(st.lists(uids, max_size=3))),
            groups=frozenset(draw(st.lists(names, max_size=3))),
            hosts=tuple(draw(st.lists(st.sampled_from(host_list), min_size=1, unique=True))),
            copy=draw(st.booleans()),
        )
        for name in draw(st.lists(names, max_size=3, unique=True))
    }
    return ClientConfig(
        keywords=keywords,
        hosts=hosts,
        spool=draw(paths),
        tls=draw(tls_files),
        limits=draw(limits(durations)),
        retry=Retry(draw(durations), draw(durations)),
    )


@st.composite
def server_configs(draw: st.DrawFn) -> ServerConfig:
    host_list = draw(st.lists(host_names, min_size=1, max_size=4, unique=True))
    hosts = {
        # The collector never connects out: its host blocks have no port.
        name: Host(name, draw(host_names), DEFAULT_PORT, draw(fingerprints))
        for name in host_list
    }
    keywords = {
        name: ServerKeyword(
            name,
            {
                host: draw(paths)
                for host in draw(st.lists(st.sampled_from(host_list), min_size=1, unique=True))
            },
        )
        for name in draw(st.lists(names, max_size=3, unique=True))
    }
    return ServerConfig(
        keywords=keywords,
        hosts=hosts,
        tls=draw(tls_files),
        limits=draw(limits(durations_any)),
    )


def reload(original: ClientConfig | ServerConfig) -> ClientConfig | ServerConfig:
    role = "client" if isinstance(original, ClientConfig) else "server"
    with tempfile.NamedTemporaryFile("w", suffix=".conf", encoding="utf-8") as handle:
        handle.write(config.to_text(original))
        handle.flush()
        loaded = config.check(handle.name, role).config
        assert loaded.sources == (handle.name,)
    return dataclasses.replace(loaded, sources=())


@settings(max_examples=150, deadline=None)
@given(client_configs())
def test_client_config_round_trips(original: ClientConfig) -> None:
    assert reload(original) == original


@settings(max_examples=150, deadline=None)
@given(server_configs())
def test_server_config_round_trips(original: ServerConfig) -> None:
    assert reload(original) == original


@settings(max_examples=30, deadline=None)
@given(client_configs(durations=milliseconds))
# 9 * 0.001 == 0.009000000000000001: a loader that multiplies loses the round trip.
@example(
    ClientConfig(keywords={}, hosts={}, limits=Limits(timeout=0.009), retry=Retry(0.009, 0.013))
)
def test_client_config_with_millisecond_durations_round_trips(original: ClientConfig) -> None:
    assert reload(original) == original


@pytest.mark.parametrize(
    ("path", "role"),
    [
        ("examples/client.conf", "client"),
        ("examples/server.conf", "server"),
        ("examples/seed-client.conf", "client"),
        ("examples/seed-server.conf", "server"),
    ],
)
def test_examples_round_trip(path: str, role: str) -> None:
    loaded = config.check(str(REPO / path), role).config
    assert reload(dataclasses.replace(loaded, sources=())) == dataclasses.replace(
        loaded, sources=()
    )
