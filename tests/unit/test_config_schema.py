"""What the directives mean: shaping, the voluptuous schema, cross-checks, the cache.

Second and third steps of config loading (``schema`` -> ``config``). Each
accepted directive is checked for its normalised value; each refusal for its
exact file:line:column and what the message says. The cache tests prove that
a second load really reads the cache and that any change to a source (or to
an included directory) makes it ignored.
"""

from __future__ import annotations

import dataclasses
import grp
import json
import os
import pwd
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import voluptuous as vol
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dlogd import config, schema
from dlogd.config import (
    ClientConfig,
    ClientKeyword,
    ConfigError,
    Host,
    Limits,
    Retry,
    ServerConfig,
    ServerKeyword,
    TLSFiles,
)
from dlogd.conflang import Statement, parse_file, parse_text

REPO = Path(__file__).resolve().parents[2]
FINGERPRINT_HEX = "ab" * 16 + "0123456789abcdef" * 2
FINGERPRINT_COLONS = "sha256:" + ":".join(
    FINGERPRINT_HEX.upper()[i : i + 2] for i in range(0, 64, 2)
)


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    return tmp_path / "dlogd.conf"


def check(path: Path, text: str, role: str = "client") -> config.Checked:
    path.write_text(text)
    return config.check(str(path), role)


def client(path: Path, text: str) -> ClientConfig:
    checked = check(path, text, "client")
    assert isinstance(checked.config, ClientConfig)
    return checked.config


def server(path: Path, text: str) -> ServerConfig:
    checked = check(path, text, "server")
    assert isinstance(checked.config, ServerConfig)
    return checked.config


def errors(path: Path, text: str, role: str = "client") -> list[tuple[int, int, str]]:
    """Every error as (line, column, message); all must be in ``path``."""
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        config.check(str(path), role)
    found = []
    for problem in caught.value.problems:
        assert problem.location.file == str(path)
        assert not problem.warning
        found.append((problem.location.line, problem.location.column, problem.message))
    return found


HOST_H = 'host "h" { }\n'


def kw(body: str) -> str:
    """A client keyword block around ``body`` that is otherwise valid."""
    return f'keyword "k" {{ host "h"; uid 0; {body} }}\n' + HOST_H


# -- the seed configs and defaults -------------------------------------------


def test_seed_client_config_parses_unchanged() -> None:
    path = REPO / "examples" / "seed-client.conf"
    checked = config.check(str(path), "client")
    assert isinstance(checked.config, ClientConfig)
    assert checked.config.keywords == {
        "audit": ClientKeyword("audit", frozenset({1001}), frozenset({"wheel"}), ("192.0.2.10",))
    }
    # An empty host block: the address is the name, the port the default.
    assert checked.config.hosts == {"192.0.2.10": Host("192.0.2.10", "192.0.2.10", 7878, None)}
    assert checked.config.sources == (str(path),)


def test_seed_server_config_parses_unchanged() -> None:
    path = REPO / "examples" / "seed-server.conf"
    checked = config.check(str(path), "server")
    assert isinstance(checked.config, ServerConfig)
    assert checked.config.keywords == {
        "audit": ServerKeyword("audit", {"192.0.2.11": "/var/log/remote/host1/audit"})
    }
    assert checked.config.hosts == {"192.0.2.11": Host("192.0.2.11", "192.0.2.11", 7878, None)}
    assert checked.warnings == ()


def test_empty_client_config_is_all_defaults(conf: Path) -> None:
    cfg = client(conf, "# nothing\n")
    # Literal values: these are the documented defaults (docs/config.md).
    assert cfg.spool == "/var/spool/dlogd"
    assert cfg.tls == TLSFiles(
        "/etc/dlogd/tls/host.crt", "/etc/dlogd/tls/host.key", "/etc/dlogd/tls/ca.crt", "1.3"
    )
    assert cfg.limits == Limits(64 * 1024**3, 60.0, 64, 256 * 1024, 256)
    assert cfg.retry == Retry(30.0, 3600.0)
    assert cfg.keywords == {}
    assert cfg.hosts == {}


def test_empty_server_config_is_all_defaults(conf: Path) -> None:
    cfg = server(conf, "")
    assert cfg.tls == TLSFiles()
    assert cfg.limits == Limits()
    assert (cfg.keywords, cfg.hosts) == ({}, {})


# -- every directive, accepted and normalised --------------------------------

FULL_CLIENT = f"""
spool "/srv/spool/../spool/dlogd/";
tls {{
    certificate "/etc/dlogd/tls/web1.crt";
    key "/etc/dlogd/tls/web1.key";
    ca "/etc/dlogd/tls/fleet-ca.crt";
    min_version "1.2";
}}
limits {{
    max_file_size 10G;
    timeout 90s;
    window 16;
    frame_size 64K;
    max_batch 100;
}}
retry {{ min 500ms; max 2h; }}
keyword "audit" {{
    uid 1001;
    uid "1002";
    uid "daemon";
    group "root";
    group "adm";
    host "logs2";
    host "logs1";
    copy yes;
}}
keyword "app.log-2" {{ group "root"; host "logs1"; }}
host "logs1" {{
    address "192.0.2.10";
    port 7979;
    fingerprint "{FINGERPRINT_COLONS}";
}}
host "logs2" {{ }}
"""


def test_every_client_directive(conf: Path) -> None:
    checked = check(conf, FULL_CLIENT)
    assert checked.warnings == ()
    assert checked.config == ClientConfig(
        keywords={
            "audit": ClientKeyword(
                "audit",
                uids=frozenset({1001, 1002, pwd.getpwnam("daemon").pw_uid}),
                groups=frozenset({"root", "adm"}),
                hosts=("logs2", "logs1"),
                copy=True,
            ),
            "app.log-2": ClientKeyword("app.log-2", frozenset(), frozenset({"root"}), ("logs1",)),
        },
        hosts={
            "logs1": Host("logs1", "192.0.2.10", 7979, FINGERPRINT_HEX),
            "logs2": Host("logs2", "logs2", 7878, None),
        },
        spool="/srv/spool/dlogd",
        tls=TLSFiles(
            "/etc/dlogd/tls/web1.crt",
            "/etc/dlogd/tls/web1.key",
            "/etc/dlogd/tls/fleet-ca.crt",
            "1.2",
        ),
        limits=Limits(10 * 1024**3, 90.0, 16, 64 * 1024, 100),
        retry=Retry(0.5, 7200.0),
        sources=(str(conf),),
    )


FULL_SERVER = f"""
tls {{ certificate "/c"; key "/k"; ca "/ca"; min_version 1.3; }}
limits {{ max_file_size 1T; timeout 5min; window 1; frame_size 1M;
          max_batch 1000000; }}
keyword "audit" {{
    host "web1" dir "/var/log/remote/web1/audit/";
    host "web2" dir "/var/log/remote//web2/audit";
}}
host "web1" {{ address "192.0.2.21"; fingerprint "{FINGERPRINT_HEX.upper()}"; }}
host "web2" {{ }}
"""


def test_every_server_directive(conf: Path) -> None:
    checked = check(conf, FULL_SERVER, "server")
    assert checked.warnings == ()
    assert checked.config == ServerConfig(
        keywords={
            "audit": ServerKeyword(
                "audit",
                {"web1": "/var/log/remote/web1/audit", "web2": "/var/log/remote/web2/audit"},
            )
        },
        hosts={
            "web1": Host("web1", "192.0.2.21", 7878, FINGERPRINT_HEX),
            "web2": Host("web2", "web2", 7878, None),
        },
        tls=TLSFiles("/c", "/k", "/ca", "1.3"),
        limits=Limits(1024**4, 300.0, 1, 1024**2, 1_000_000),
        sources=(str(conf),),
    )


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("1", 1),
        ('"4096"', 4096),
        ("10K", 10 * 1024),
        ('"10K"', 10 * 1024),
        ("3M", 3 * 1024**2),
        ("2G", 2 * 1024**3),
        ("1T", 1024**4),
    ],
)
def test_sizes(conf: Path, written: str, expected: int) -> None:
    cfg = client(conf, f"limits {{ max_file_size {written}; }}")
    assert cfg.limits.max_file_size == expected


@pytest.mark.parametrize("written", ["0", "0K", "10k", "10KB", "1.5M", '"ten"', '"-1"', "10P"])
def test_bad_sizes(conf: Path, written: str) -> None:
    ((line, column, message),) = errors(conf, f"limits {{\n  max_file_size {written};\n}}")
    assert (line, column) == (2, 17)  # the value, not the directive
    assert message.endswith("expected a positive size in bytes, optionally with K, M, G or T")


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("45", 45.0),
        ('"45"', 45.0),
        ("45s", 45.0),
        ("250ms", 0.25),
        ("1500ms", 1.5),
        ("2min", 120.0),
        ("3h", 10800.0),
    ],
)
def test_durations(conf: Path, written: str, expected: float) -> None:
    cfg = client(
        conf, f"limits {{ timeout {written}; }}\nretry {{ min {written}; max {written}; }}"
    )
    assert (cfg.limits.timeout, cfg.retry.min_delay, cfg.retry.max_delay) == (expected,) * 3


def test_millisecond_durations_are_exact(conf: Path) -> None:
    # 9 * 0.001 == 0.009000000000000001: the value must be 9 / 1000 itself.
    assert client(conf, "limits { timeout 9ms; }").limits.timeout == 9 / 1000


@pytest.mark.parametrize(
    ("written", "shown"),
    [
        ("0", "0"),
        ("0ms", "'0ms'"),
        ("5d", "'5d'"),
        ("1.5s", "'1.5s'"),
        ('"-5"', "'-5'"),
        ("m", "'m'"),
    ],
)
def test_bad_durations(conf: Path, written: str, shown: str) -> None:
    assert errors(conf, f"retry {{\n  max {written};\n}}") == [
        (2, 7, f"{shown}: expected a positive duration: seconds, or a number with ms, s, min, h")
    ]


def test_duration_written_as_two_values_is_located_at_the_directive(conf: Path) -> None:
    assert errors(conf, "retry {\n  max 10 s;\n}") == [(2, 3, "takes exactly one value, got 2")]


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("yes", True),
        ("on", True),
        ("true", True),
        ('"YES"', True),
        ("no", False),
        ("off", False),
        ("False", False),
    ],
)
def test_booleans(conf: Path, written: str, expected: bool) -> None:
    assert client(conf, kw(f"copy {written};")).keywords["k"].copy is expected


def test_copy_defaults_to_hard_linking(conf: Path) -> None:
    assert client(conf, kw("")).keywords["k"].copy is False


def test_bad_boolean(conf: Path) -> None:
    assert errors(conf, kw("copy maybe;")) == [(1, 37, "'maybe': expected yes or no")]


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("1001", 1001),
        ('"1001"', 1001),
        ("0", 0),
        ("4294967294", 2**32 - 2),
        ('"nobody"', pwd.getpwnam("nobody").pw_uid),
        ("daemon", pwd.getpwnam("daemon").pw_uid),
    ],
)
def test_uid_as_number_numeric_string_or_user_name(conf: Path, written: str, expected: int) -> None:
    cfg = client(conf, f'keyword "k" {{ host "h"; uid {written}; }}\n' + HOST_H)
    assert cfg.keywords["k"].uids == frozenset({expected})


@pytest.mark.parametrize(
    ("written", "message"),
    [
        ("4294967295", "uid 4294967295 out of range: expected 0-4294967294"),
        ('"4294967296"', "uid 4294967296 out of range: expected 0-4294967294"),
        ('"-1"', "'-1': expected a numeric uid or a user name"),
        ('"no body"', "'no body': expected a numeric uid or a user name"),
        ('"1001;rm"', "'1001;rm': expected a numeric uid or a user name"),
        ('""', "'': expected a numeric uid or a user name"),
    ],
)
def test_bad_uid(conf: Path, written: str, message: str) -> None:
    text = f'keyword "k" {{\n  host "h";\n  uid {written};\n}}\n' + HOST_H
    assert errors(conf, text) == [(3, 7, message)]


@pytest.mark.parametrize(
    "written",
    [
        '"sha256:' + FINGERPRINT_HEX + '"',
        f'"{FINGERPRINT_COLONS}"',
        f'"{FINGERPRINT_HEX.upper()}"',
        FINGERPRINT_COLONS,
    ],
)
def test_fingerprint_is_normalised_to_lowercase_hex(conf: Path, written: str) -> None:
    cfg = client(conf, f'host "h" {{ fingerprint {written}; }}')
    assert cfg.hosts["h"].fingerprint == FINGERPRINT_HEX


@pytest.mark.parametrize(
    "written",
    [
        '"sha256:zz"',
        f'"{FINGERPRINT_HEX[:-2]}"',
        f'"{FINGERPRINT_HEX}00"',
        f'"sha1:{FINGERPRINT_HEX}"',
    ],
)
def test_bad_fingerprint(conf: Path, written: str) -> None:
    ((line, column, message),) = errors(conf, f'host "h" {{\n fingerprint {written}; }}')
    assert (line, column) == (2, 14)
    assert message.endswith("expected sha256:HEX (64 hex digits, colons allowed)")


@pytest.mark.parametrize("port", ["1", "65535", '"443"'])
def test_good_ports(conf: Path, port: str) -> None:
    assert client(conf, f'host "h" {{ port {port}; }}').hosts["h"].port == int(port.strip('"'))


@pytest.mark.parametrize(
    ("text", "role", "location", "message"),
    [
        ('host "h" {\n  port 0;\n}', "client", (2, 8), "port 0 out of range: expected 1-65535"),
        (
            'host "h" {\n  port 65536;\n}',
            "client",
            (2, 8),
            "port 65536 out of range: expected 1-65535",
        ),
        (
            'host "h" {\n  port "http";\n}',
            "client",
            (2, 8),
            "port 'http' out of range: expected 1-65535",
        ),
    ],
)
def test_bad_ports(
    conf: Path, text: str, role: str, location: tuple[int, int], message: str
) -> None:
    # A once-only directive's bad value is reported at the value, as a
    # repeatable directive's (uid) is.
    assert errors(conf, text, role) == [(*location, message)]


@pytest.mark.parametrize(
    ("directive", "column", "message"),
    [
        ('spool "var/spool";', 7, "expected an absolute path, got 'var/spool'"),
        ('spool "";', 7, "expected an absolute path, got ''"),
        ('tls { ca "ca.crt"; }', 10, "expected an absolute path, got 'ca.crt'"),
        ("spool 12;", 7, "expected a string, got 12"),
        ('spool "/a\\x00b";', 7, "NUL byte in string"),
        ('tls { min_version "1.1"; }', 19, '\'1.1\': expected "1.3" or "1.2"'),
        ("limits { window 0; }", 17, "0: expected a whole number from 1 to 1024"),
        ("limits { window 1025; }", 17, "1025: expected a whole number from 1 to 1024"),
        ("limits { frame_size 4095; }", 21, "4095: expected a size from 4K to 1M"),
        ("limits { frame_size 2M; }", 21, "'2M': expected a size from 4K to 1M"),
        (
            "limits { max_batch 1000001; }",
            20,
            "1000001: expected a whole number from 1 to 1000000",
        ),
        ('limits { max_batch "5"; }', 20, "'5': expected a whole number from 1 to 1000000"),
        (
            'host "h" { address "192.0.2.1 evil"; }',
            20,
            "'192.0.2.1 evil': expected a host name or address (A-Z a-z 0-9 _ . : -)",
        ),
    ],
)
def test_bad_client_values(conf: Path, directive: str, column: int, message: str) -> None:
    # Each bad value is located at the value itself.
    assert errors(conf, "\n" + directive) == [(2, column, message)]


def test_relative_spool_is_located(conf: Path) -> None:
    assert errors(conf, '# the spool\n   spool "spool";\n') == [
        (2, 10, "expected an absolute path, got 'spool'")
    ]


def test_relative_dir_on_the_collector_is_located(conf: Path) -> None:
    text = 'keyword "audit" {\n    host "web1" dir "remote/web1";\n}\nhost "web1" { }\n'
    assert errors(conf, text, "server") == [(2, 5, "expected an absolute path, got 'remote/web1'")]


@pytest.mark.parametrize(
    "line",
    ['host "web1";', 'host "web1" "/x";', 'host "web1" path "/x";', 'host "web1" dir "/x" "/y";'],
)
def test_collector_host_line_needs_name_dir_path(conf: Path, line: str) -> None:
    text = f'keyword "audit" {{\n    {line}\n}}\nhost "web1" {{ }}\n'
    assert errors(conf, text, "server") == [(2, 5, 'expected: host "NAME" dir "/ABSOLUTE/PATH";')]


# -- structure errors ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "role", "location", "message"),
    [
        ("bogus 1;", "client", (1, 1), "unknown directive 'bogus'"),
        ('spool "/a";\nretry_it { }', "client", (2, 1), "unknown directive 'retry_it'"),
        ('spool "/a";', "server", (1, 1), "unknown directive 'spool'"),
        ("retry { min 1; }", "server", (1, 1), "unknown directive 'retry'"),
        ('tls {\n  cert "/a";\n}', "client", (2, 3), "unknown directive 'cert'"),
        ("limits { bogus 1; }", "server", (1, 10), "unknown directive 'bogus'"),
        ('host "h" {\n  dir "/x";\n}', "client", (2, 3), "unknown directive 'dir'"),
        ('host "h" { port 1; }', "server", (1, 12), "unknown directive 'port'"),
        (
            'keyword "k" { host "h"; uid 0;\n  users "x"; }\nhost "h" { }',
            "client",
            (2, 3),
            "unknown directive 'users'",
        ),
        (
            'keyword "k" { host "h" dir "/x";\n  uid 0; }\nhost "h" { }',
            "server",
            (2, 3),
            "unknown directive 'uid'",
        ),
        ('tls { include "x.conf"; }', "client", (1, 7), "unknown directive 'include'"),
    ],
)
def test_unknown_directives(
    conf: Path, text: str, role: str, location: tuple[int, int], message: str
) -> None:
    assert errors(conf, text, role) == [(*location, message)]


@pytest.mark.parametrize(
    ("text", "location", "message"),
    [
        ('tls "/etc/tls";', (1, 1), "'tls' must be a block: tls ... { ... }"),
        ("limits 5;", (1, 1), "'limits' must be a block: limits ... { ... }"),
        ('keyword "audit";', (1, 1), "'keyword' must be a block: keyword ... { ... }"),
        ('host "h";', (1, 1), "'host' must be a block: host ... { ... }"),
        (
            'keyword "k" { host "h";\n  uid { } }\nhost "h" { }',
            (2, 3),
            "'uid' must be a simple directive ending in ';', not a block",
        ),
        (
            'keyword "k" { uid 0;\n  host "h" { } }\nhost "h" { }',
            (2, 3),
            "'host' must be a simple directive ending in ';', not a block",
        ),
        ("keyword audit { }", (1, 1), 'expected keyword "NAME" { ... } or keyword { ... }'),
        ('host "a" "b" { }', (1, 1), 'expected host "NAME" { ... } or host { ... }'),
    ],
)
def test_block_and_simple_directive_confused(
    conf: Path, text: str, location: tuple[int, int], message: str
) -> None:
    assert errors(conf, text) == [(*location, message)]


def test_empty_block_where_a_simple_directive_belongs(conf: Path) -> None:
    assert errors(conf, "retry { min 1; }\nspool { }") == [
        (2, 1, "'spool' must be a simple directive ending in ';', not a block")
    ]


def test_block_with_content_where_a_simple_directive_belongs(conf: Path) -> None:
    assert errors(conf, "spool {\n  x 1;\n}") == [
        (1, 1, "'spool' must be a simple directive ending in ';', not a block")
    ]


def test_simple_directive_after_a_block_of_the_same_name(conf: Path) -> None:
    # The first use (the block) is kept; the later one is refused where written.
    assert errors(conf, 'tls { ca "/x"; }\ntls "/y";\n') == [
        (2, 1, "'tls' used both as a block and as a simple directive")
    ]


def test_named_block_after_a_simple_directive_of_the_same_name(conf: Path) -> None:
    assert errors(conf, 'keyword "b";\nkeyword "a" { host "h"; uid 0; }\nhost "h" { }\n') == [
        (1, 1, "'keyword' must be a block: keyword ... { ... }"),
        (2, 1, "'keyword' used both as a block and as a simple directive"),
    ]


def test_simple_directive_then_block_of_the_same_name(conf: Path) -> None:
    assert errors(conf, 'tls "/y";\ntls { ca "/x"; }\n') == [
        (1, 1, "'tls' must be a block: tls ... { ... }"),
        (2, 1, "'tls' used both as a block and as a simple directive"),
    ]


@pytest.mark.parametrize(
    ("text", "role", "location", "message"),
    [
        (
            'keyword "a" { host "h"; uid 0; }\nhost "h" { }\n  keyword "a" { host "h"; uid 0; }',
            "client",
            (3, 3),
            'duplicate keyword "a" (first defined at {}:1:1)',
        ),
        (
            'host "h" { }\nhost "g" { }\nhost "h" { port 1; }',
            "client",
            (3, 1),
            'duplicate host "h" (first defined at {}:1:1)',
        ),
        (
            'tls { }\n\ntls { ca "/x"; }',
            "server",
            (3, 1),
            "duplicate tls (first defined at {}:1:1)",
        ),
        ("tls { }\ntls { }", "server", (2, 1), "duplicate tls (first defined at {}:1:1)"),
        (
            "retry { min 1; }\nretry { }",
            "client",
            (2, 1),
            "duplicate retry (first defined at {}:1:1)",
        ),
    ],
)
def test_duplicate_blocks(
    conf: Path, text: str, role: str, location: tuple[int, int], message: str
) -> None:
    assert errors(conf, text, role) == [(*location, message.format(conf))]


@pytest.mark.parametrize(
    ("text", "location"),
    [
        ('spool "/a";\nretry { min 1; }\nspool "/a";', (3, 1)),
        ('host "h" { port 1;\n  port 1; }', (2, 3)),
        ("limits { timeout 1; timeout 2; }", (1, 21)),
        ("tls {\n min_version 1.3;\n min_version 1.3;\n}", (3, 2)),
        ('keyword "k" { host "h"; uid 0; copy yes;\n copy no; }\nhost "h" { }', (2, 2)),
    ],
)
def test_directive_that_may_appear_once_given_twice(
    conf: Path, text: str, location: tuple[int, int]
) -> None:
    # Reported at the second occurrence.
    assert errors(conf, text) == [(*location, "may appear only once")]


@pytest.mark.parametrize(
    ("text", "location", "count"),
    [
        ('spool "/a" "/b";', (1, 1), 2),
        ("spool;", (1, 1), 0),
        ('host "h" {\n  address; }', (2, 3), 0),
        ('keyword "k" { host "h";\n  uid 1 2; }\nhost "h" { }', (2, 3), 2),
        ('keyword "k" { uid 0;\n  host "h" "g"; }\nhost "h" { }\nhost "g" { }', (2, 3), 2),
        ('keyword "k" { host "h";\n  group; }\nhost "h" { }', (2, 3), 0),
    ],
)
def test_wrong_number_of_values(
    conf: Path, text: str, location: tuple[int, int], count: int
) -> None:
    assert errors(conf, text) == [(*location, f"takes exactly one value, got {count}")]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ('"bad name"', "'bad name': expected 1-64 of A-Z a-z 0-9 _ . - (not starting with . or -)"),
        ('".hidden"', "'.hidden': expected 1-64 of A-Z a-z 0-9 _ . - (not starting with . or -)"),
        ('"../etc"', "'../etc': expected 1-64 of A-Z a-z 0-9 _ . - (not starting with . or -)"),
        (
            f'"{"k" * 65}"',
            f"'{'k' * 65}': expected 1-64 of A-Z a-z 0-9 _ . - (not starting with . or -)",
        ),
    ],
)
def test_bad_keyword_name(conf: Path, name: str, message: str) -> None:
    text = f'spool "/a";\nkeyword {name} {{ host "h"; uid 0; }}\n' + HOST_H
    assert errors(conf, text) == [(2, 1, message)]


def test_longest_keyword_name_is_accepted(conf: Path) -> None:
    name = "k" * 64
    cfg = client(conf, f'keyword "{name}" {{ host "h"; uid 0; }}\n' + HOST_H)
    assert list(cfg.keywords) == [name]


def test_bad_host_name(conf: Path) -> None:
    assert errors(conf, '\nhost "web 1" { }') == [
        (2, 1, "'web 1': expected a host name or address (A-Z a-z 0-9 _ . : -)")
    ]


# -- cross-references ---------------------------------------------------------


@pytest.mark.parametrize("role", ["client", "server"])
def test_keyword_naming_an_undefined_host(conf: Path, role: str) -> None:
    line = 'host "logs9";' if role == "client" else 'host "logs9" dir "/x";'
    extra = " uid 0;" if role == "client" else ""
    text = f'keyword "audit" {{{extra}\n    {line}\n}}\nhost "logs1" {{ }}\n'
    assert errors(conf, text, role) == [
        (2, 5, 'keyword "audit" names host "logs9", which has no host block')
    ]


@pytest.mark.parametrize("role", ["client", "server"])
def test_host_listed_twice_in_a_keyword(conf: Path, role: str) -> None:
    line = 'host "h";' if role == "client" else 'host "h" dir "/x";'
    extra = " uid 0;" if role == "client" else ""
    text = f'keyword "audit" {{{extra}\n  {line}\n    {line}\n}}\n' + HOST_H
    assert errors(conf, text, role) == [(3, 5, 'host "h" listed twice for keyword "audit"')]


@pytest.mark.parametrize("role", ["client", "server"])
def test_keyword_with_no_host_line(conf: Path, role: str) -> None:
    body = "uid 0;" if role == "client" else ""
    text = f'{HOST_H}\n  keyword "audit" {{ {body} }}\n'
    assert errors(conf, text, role) == [(3, 3, "a keyword needs at least one host line")]


def test_host_defined_only_in_an_include_satisfies_a_keyword(tmp_path: Path) -> None:
    (tmp_path / "hosts.d").mkdir()
    (tmp_path / "hosts.d" / "logs1.conf").write_text('host "logs1" { address "192.0.2.10"; }\n')
    main = tmp_path / "client.conf"
    main.write_text('keyword "audit" { uid 0; host "logs1"; }\ninclude "hosts.d";\n')
    checked = config.check(str(main), "client")
    assert isinstance(checked.config, ClientConfig)
    assert checked.config.hosts["logs1"].address == "192.0.2.10"
    assert checked.config.sources == (str(main), str(tmp_path / "hosts.d" / "logs1.conf"))


def test_error_in_an_included_file_names_that_file(tmp_path: Path) -> None:
    (tmp_path / "inc.conf").write_text('\n\nhost "h" { port 0; }\n')
    main = tmp_path / "client.conf"
    main.write_text('include "inc.conf";\n')
    with pytest.raises(ConfigError) as caught:
        config.check(str(main), "client")
    (problem,) = caught.value.problems
    assert (
        str(problem)
        == f"{tmp_path / 'inc.conf'}:3:17: error: port 0 out of range: expected 1-65535"
    )


def test_all_schema_errors_are_reported_at_once(conf: Path) -> None:
    text = (
        'spool "relative";\n'
        "limits {\n"
        "    window 0;\n"
        "}\n"
        'host "h" { port 65536; }\n'
        'keyword "k" { host "h"; uid "-1"; }\n'
    )
    assert errors(conf, text) == [
        (1, 7, "expected an absolute path, got 'relative'"),
        (3, 12, "0: expected a whole number from 1 to 1024"),
        (5, 17, "port 65536 out of range: expected 1-65535"),
        (6, 29, "'-1': expected a numeric uid or a user name"),
    ]


def test_all_cross_reference_errors_are_reported_at_once(conf: Path) -> None:
    text = (
        'keyword "a" { uid 0; host "x"; host "h"; host "h"; }\nkeyword "b" { uid 0; host "y"; }\n'
    )
    assert errors(conf, text + HOST_H) == [
        (1, 22, 'keyword "a" names host "x", which has no host block'),
        (1, 42, 'host "h" listed twice for keyword "a"'),
        (2, 22, 'keyword "b" names host "y", which has no host block'),
    ]


def test_syntax_error_is_a_config_error_with_its_location(conf: Path) -> None:
    assert errors(conf, 'spool "/a";\nhost "h" {\n') == [
        (2, 10, "unterminated block: expected '}' before end of file")
    ]


# -- warnings: doubtful, not fatal --------------------------------------------


def _absent(lookup: object, name: str) -> str:
    assert callable(lookup)
    with pytest.raises(KeyError):
        lookup(name)
    return name


def test_missing_group_and_user_are_warnings(conf: Path) -> None:
    group = _absent(grp.getgrnam, "dlogd-no-such-group")
    user = _absent(pwd.getpwnam, "dlogd-no-such-user")
    text = f'keyword "k" {{ host "h";\n  group "{group}";\n  uid "{user}";\n  uid 5; }}\n' + HOST_H
    checked = check(conf, text)
    assert [
        (w.location.line, w.location.column, w.message, w.warning) for w in checked.warnings
    ] == [
        (2, 3, f'no group "{group}" on this host', True),
        (3, 3, f'no user "{user}" on this host', True),
    ]
    assert str(checked.warnings[0]).startswith(f"{conf}:2:3: warning: ")
    assert isinstance(checked.config, ClientConfig)
    # A missing user matches nobody; the group is kept (it may be created later).
    assert checked.config.keywords["k"].uids == frozenset({5})
    assert checked.config.keywords["k"].groups == frozenset({group})


def test_keyword_that_allows_nobody_is_a_warning(conf: Path) -> None:
    checked = check(conf, '\nkeyword "k" { host "h"; }\n' + HOST_H)
    assert [(w.location.line, w.location.column, w.message) for w in checked.warnings] == [
        (2, 1, 'keyword "k" allows nobody: add a uid or group line')
    ]


# -- the validated-data cache -------------------------------------------------


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def layout(tmp_path: Path) -> Iterator[Path]:
    """A client config with an include directory; yields the main file."""
    drop = tmp_path / "client.d"
    drop.mkdir()
    (drop / "10-hosts.conf").write_text('host "logs1" { address "192.0.2.10"; }\n')
    main = tmp_path / "client.conf"
    main.write_text(
        'spool "/from/source";\nkeyword "audit" { uid 0; host "logs1"; }\ninclude "client.d";\n'
    )
    yield main


def only_cache_file(cache_dir: Path) -> Path:
    (found,) = cache_dir.iterdir()
    return found


def tamper(cache: Path, spool: str) -> None:
    """Change only the cached data, keeping the cache's stamps of the sources."""
    record = json.loads(cache.read_text())
    record["data"]["spool"] = spool
    cache.write_text(json.dumps(record))
    os.chmod(cache, 0o644)


def test_load_writes_the_cache_and_the_next_load_uses_it(layout: Path, cache_dir: Path) -> None:
    first = config.load_client(str(layout), str(cache_dir))
    assert first.spool == "/from/source"
    cache = only_cache_file(cache_dir)
    record = json.loads(cache.read_text())
    assert record["data"]["spool"] == "/from/source"
    assert record["files"] == [str(layout), str(layout.parent / "client.d" / "10-hosts.conf")]
    tamper(cache, "/from/cache")
    second = config.load_client(str(layout), str(cache_dir))
    assert second.spool == "/from/cache"  # the cache was read, not the source
    assert second.hosts == first.hosts
    assert second.sources == first.sources


def test_changed_source_makes_the_cache_ignored(layout: Path, cache_dir: Path) -> None:
    config.load_client(str(layout), str(cache_dir))
    cache = only_cache_file(cache_dir)
    tamper(cache, "/from/cache")
    layout.write_text(layout.read_text().replace("/from/source", "/from/edit"))
    assert config.load_client(str(layout), str(cache_dir)).spool == "/from/edit"
    # ...and the cache was refreshed from the source.
    assert json.loads(cache.read_text())["data"]["spool"] == "/from/edit"


def test_touched_source_makes_the_cache_ignored(layout: Path, cache_dir: Path) -> None:
    config.load_client(str(layout), str(cache_dir))
    tamper(only_cache_file(cache_dir), "/from/cache")
    included = layout.parent / "client.d" / "10-hosts.conf"
    st = included.stat()
    os.utime(included, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert config.load_client(str(layout), str(cache_dir)).spool == "/from/source"


def test_new_file_in_an_included_directory_makes_the_cache_ignored(
    layout: Path, cache_dir: Path
) -> None:
    config.load_client(str(layout), str(cache_dir))
    tamper(only_cache_file(cache_dir), "/from/cache")
    (layout.parent / "client.d" / "20-logs2.conf").write_text('host "logs2" { }\n')
    cfg = config.load_client(str(layout), str(cache_dir))
    assert cfg.spool == "/from/source"
    assert set(cfg.hosts) == {"logs1", "logs2"}


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_cache_writable_by_group_or_others_is_ignored(
    layout: Path, cache_dir: Path, mode: int
) -> None:
    config.load_client(str(layout), str(cache_dir))
    cache = only_cache_file(cache_dir)
    tamper(cache, "/from/cache")
    os.chmod(cache, mode)
    assert config.load_client(str(layout), str(cache_dir)).spool == "/from/source"


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_cache_owned_by_another_user_is_ignored(layout: Path, cache_dir: Path) -> None:
    config.load_client(str(layout), str(cache_dir))
    cache = only_cache_file(cache_dir)
    tamper(cache, "/from/cache")
    os.chown(cache, 65534, 65534)
    assert config.load_client(str(layout), str(cache_dir)).spool == "/from/source"


def test_cache_that_is_a_symlink_is_not_followed(layout: Path, cache_dir: Path) -> None:
    config.load_client(str(layout), str(cache_dir))
    cache = only_cache_file(cache_dir)
    tamper(cache, "/from/cache")
    elsewhere = cache_dir.parent / "planted.json"
    cache.rename(elsewhere)
    cache.symlink_to(elsewhere)
    assert config.load_client(str(layout), str(cache_dir)).spool == "/from/source"
    assert json.loads(elsewhere.read_text())["data"]["spool"] == "/from/cache"


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]", '{"version": 999}'])
def test_unusable_cache_is_ignored(layout: Path, cache_dir: Path, content: str) -> None:
    config.load_client(str(layout), str(cache_dir))
    cache = only_cache_file(cache_dir)
    cache.write_text(content)
    assert config.load_client(str(layout), str(cache_dir)).spool == "/from/source"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("stamps", None),
        ("stamps", []),
        ("stamps", "x"),
        ("data", None),
        ("data", []),
        ("files", None),
        ("files", {}),
    ],
)
def test_cache_record_of_the_wrong_shape_is_ignored(
    layout: Path, cache_dir: Path, field: str, value: object
) -> None:
    # Start from the real record (current stamps) and break one field of it.
    config.load_client(str(layout), str(cache_dir))
    cache = only_cache_file(cache_dir)
    record = json.loads(cache.read_text())
    record["data"]["spool"] = "/from/cache"
    if value is None:
        del record[field]
    else:
        record[field] = value
    cache.write_text(json.dumps(record))
    assert config.load_client(str(layout), str(cache_dir)).spool == "/from/source"


def test_invalid_config_raises_and_writes_no_cache(conf: Path, cache_dir: Path) -> None:
    conf.write_text('spool "relative";\n')
    with pytest.raises(ConfigError) as caught:
        config.load_client(str(conf), str(cache_dir))
    assert [str(p) for p in caught.value.problems] == [
        f"{conf}:1:7: error: expected an absolute path, got 'relative'"
    ]
    assert not cache_dir.exists()


def test_unwritable_cache_dir_still_loads(layout: Path, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    cfg = config.load_client(str(layout), str(not_a_dir / "cache"))
    assert cfg.spool == "/from/source"
    assert config.refresh_cache(str(layout), "client", str(not_a_dir / "cache")) is False


def test_server_cache_round_trip(conf: Path, cache_dir: Path) -> None:
    conf.write_text(FULL_SERVER)
    fresh = config.load_server(str(conf), str(cache_dir))
    record = json.loads(only_cache_file(cache_dir).read_text())
    assert record["data"]["keyword"]["audit"]["host"][0] == ["web1", "/var/log/remote/web1/audit"]
    assert config.load_server(str(conf), str(cache_dir)) == fresh
    assert config.check(str(conf), "server").config == fresh


def test_client_and_server_caches_of_one_path_are_separate(conf: Path, cache_dir: Path) -> None:
    conf.write_text("")
    config.load_client(str(conf), str(cache_dir))
    config.load_server(str(conf), str(cache_dir))
    names = sorted(p.name.split("-")[0] for p in cache_dir.iterdir())
    assert names == ["client", "server"]
    assert isinstance(config.load_server(str(conf), str(cache_dir)), ServerConfig)


def test_refresh_cache_records_what_load_then_uses(layout: Path, cache_dir: Path) -> None:
    assert config.refresh_cache(str(layout), "client", str(cache_dir)) is True
    tamper(only_cache_file(cache_dir), "/from/cache")
    assert config.load_client(str(layout), str(cache_dir)).spool == "/from/cache"


def test_cache_dir_comes_from_the_environment(
    layout: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DLOGD_CACHE_DIR", str(cache_dir))
    config.load_client(str(layout))
    assert only_cache_file(cache_dir).name.startswith("client-")


# -- the reference and the examples agree with the code -----------------------

DOC_ROW = re.compile(r"^\| `(?:(\w+) \{ )?(\w+)(?: \})?` \| [^|]+ \| `([^`]+)` \|", re.M)


def documented_defaults(role: str) -> list[str]:
    """Each row of a directives table in docs/config.md, written out as config text."""
    doc = (REPO / "docs" / "config.md").read_text()
    start = doc.index("## CLIENT DIRECTIVES" if role == "client" else "## COLLECTOR DIRECTIVES")
    section = doc[start : doc.index("\n### ", start)]
    lines = []
    for block, name, default in DOC_ROW.findall(section):
        value = f'"{default}"' if default.startswith("/") else default
        lines.append(f"{block} {{ {name} {value}; }}" if block else f"{name} {value};")
    return lines


@pytest.mark.parametrize("role", ["client", "server"])
def test_documented_defaults_are_the_code_defaults(conf: Path, role: str) -> None:
    lines = documented_defaults(role)
    # The collector's table lists blocks documented with the client's (tls, limits, ...)
    # and its own partials { }.
    assert len(lines) == (12 if role == "client" else 3)
    # Every documented default, written out explicitly, changes nothing.
    for line in lines:
        written = check(conf, line, role).config
        assert dataclasses.replace(written, sources=()) == (
            ClientConfig({}, {}) if role == "client" else ServerConfig({}, {})
        ), line


def schema_directives(schema: object, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Every directive path the voluptuous schema knows; named blocks add no level."""
    fields = schema.schema if isinstance(schema, vol.Schema) else schema
    if not isinstance(fields, dict):
        return set()
    found = set()
    for key, value in fields.items():
        if isinstance(key, vol.Marker):
            path = (*prefix, str(key.schema))
            found |= {path} | schema_directives(value, path)
        else:  # a named block's key validator: its fields are one level down
            found |= schema_directives(value, prefix)
    return found


def used_directives(
    statements: tuple[Statement, ...], prefix: tuple[str, ...] = ()
) -> set[tuple[str, ...]]:
    found = set()
    for statement in statements:
        found.add((*prefix, statement.name))
        if statement.block is not None:
            found |= used_directives(statement.block, (*prefix, statement.name))
    return found


@pytest.mark.parametrize(("name", "schema"), [("client", schema.CLIENT), ("server", schema.SERVER)])
def test_examples_use_every_directive_and_an_include(name: str, schema: vol.Schema) -> None:
    path = REPO / "examples" / f"{name}.conf"
    assert used_directives(parse_file(str(path))) == schema_directives(schema)
    top = parse_text(path.read_text())
    assert [s.values[0].text for s in top if s.name == "include"] == [f"{name}.d"]
    assert sorted(p.name for p in (REPO / "examples" / f"{name}.d").iterdir()) == ["50-app.conf"]
    checked = config.check(str(path), "client" if name == "client" else "server")
    assert checked.warnings == ()
    assert len(checked.config.sources) == 2


# -- structure fuzzing: any arrangement of real directives is an error or a config --

DIRECTIVE_NAMES = [
    "spool",
    "tls",
    "ca",
    "limits",
    "window",
    "keyword",
    "host",
    "uid",
    "port",
    "dir",
]
VALUES = ['"/a"', '"h"', "0", "64K", "yes", '"1.3"', "dir"]


@st.composite
def statement_soup(draw: st.DrawFn, depth: int = 0) -> str:
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(DIRECTIVE_NAMES))
        values = " ".join(draw(st.lists(st.sampled_from(VALUES), max_size=3)))
        if depth < 2 and draw(st.booleans()):
            parts.append(f"{name} {values} {{ {draw(statement_soup(depth + 1))} }}")
        else:
            parts.append(f"{name} {values};")
    return "\n".join(parts)


@settings(max_examples=200, deadline=None)
@given(text=statement_soup(), role=st.sampled_from(["client", "server"]))
@example(text='tls { ca "/a"; }\ntls "/a";', role="client")
def test_any_arrangement_of_directives_is_a_config_or_a_config_error(text: str, role: str) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".conf") as handle:
        handle.write(text)
        handle.flush()
        try:
            config.check(handle.name, role)
        except ConfigError as exc:
            assert exc.problems
            for problem in exc.problems:
                assert problem.location.file == handle.name
                assert problem.location.line >= 1


def test_collector_dir_outside_the_units_writable_tree_is_a_warning(conf: Path) -> None:
    text = (
        'keyword "audit" {\n'
        '    host "web1" dir "/var/log/remote/web1/audit";\n'
        '    host "web2" dir "/srv/logs/web2";\n'
        "}\n"
        'host "web1" { }\n'
        'host "web2" { }\n'
    )
    conf.write_text(text)
    checked = config.check(str(conf), "server")
    assert [(w.location.line, w.location.column, w.message) for w in checked.warnings] == [
        (
            3,
            5,
            "/srv/logs/web2 is outside /var/log/remote: the stock dlogd-receive@ unit "
            "cannot write there (add it to ReadWritePaths= in a drop-in)",
        )
    ]


@pytest.mark.parametrize(
    ("text", "role", "unit_setting"),
    [
        ('socket "/run/dlogd/submit.sock";', "client", "ListenStream="),
        ("listen { port 7878; }", "server", "ListenStream="),
        ("limits { max_connections 64; }", "client", "MaxConnections="),
        ("limits { max_connections 64; }", "server", "MaxConnections="),
    ],
)
def test_a_directive_the_units_decide_is_refused_saying_where_it_went(
    conf: Path, text: str, role: str, unit_setting: str
) -> None:
    """socket, listen and max_connections were documented but did nothing (issue 13)."""
    [(line, _column, message)] = errors(conf, text, role)
    assert line == 1
    assert message.startswith("unknown directive") and unit_setting in message
