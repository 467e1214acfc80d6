"""The ``archive { }`` block of server.conf: what it means, and every way it is refused.

No cluster needed: configs are written with :func:`dlogd.config.to_text` and
read back through the real loader, and each malformed block must be refused
with its file, line and column, nothing else in the config lost.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from dlogd import config
from dlogd.config import Archive, Host, ServerConfig, ServerKeyword

ARCHIVE = Archive(
    endpoint="http://127.0.0.1:7480",
    bucket="dlogd-audit",
    credentials="/etc/dlogd/archive.credentials",
    retention_days=30,
)
BASE = ServerConfig(
    keywords={"audit": ServerKeyword("audit", {"web1": "/var/log/remote/web1/audit"})},
    hosts={"web1": Host("web1", "web1")},
)


def written(tmp_path: Path, archive: Archive) -> Path:
    path = tmp_path / "server.conf"
    path.write_text(config.to_text(dataclasses.replace(BASE, archive=archive)))
    return path


def replaced_line(path: Path, directive: str, line: str) -> Path:
    """The config with one archive directive's line written by hand (bad values)."""
    lines = path.read_text().splitlines()
    start = lines.index("archive {")
    end = lines.index("}", start)
    [i] = [n for n in range(start, end) if lines[n].startswith(f"    {directive} ")]
    lines[i] = f"    {line}"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "archive",
    [
        ARCHIVE,
        dataclasses.replace(
            ARCHIVE,
            endpoint="https://s3.example.net:7480",
            region="eu-west-1",
            mode="compliance",
            key="<collector>/<keyword>/<host>/<yyyy>/<mm>/<dd>/<name>",
            keep_local_days=0,
            keywords=("audit",),
        ),
        dataclasses.replace(ARCHIVE, keep_local_days=3650, retention_days=36500),
    ],
)
def test_archive_block_round_trips(tmp_path: Path, archive: Archive) -> None:
    checked = config.check(str(written(tmp_path, archive)), "server").config
    assert isinstance(checked, ServerConfig)
    assert checked.archive == archive


def test_defaults(tmp_path: Path) -> None:
    path = tmp_path / "server.conf"
    path.write_text(
        config.to_text(BASE)
        + 'archive { endpoint "http://s3:80"; bucket "abc"; credentials "/c"; retention 10y; }\n'
    )
    checked = config.check(str(path), "server").config
    assert isinstance(checked, ServerConfig)
    assert checked.archive == Archive("http://s3:80", "abc", "/c", 3650)
    assert (checked.archive.mode, checked.archive.keep_local_days) == ("governance", None)


@pytest.mark.parametrize(
    ("directive", "line", "message"),
    [
        ("endpoint", 'endpoint "ftp://s3";', "expected an http:// or https:// URL"),
        ("endpoint", 'endpoint "http://s3/bucket";', "expected an http:// or https:// URL"),
        ("bucket", 'bucket "Upper_Case";', "expected a bucket name"),
        ("bucket", 'bucket "ab";', "expected a bucket name"),
        ("credentials", 'credentials "relative";', "expected an absolute path"),
        ("retention", "retention 0d;", "expected a number of days or years"),
        ("retention", "retention 30;", "expected a number of days or years"),
        ("retention", "retention 1h;", "expected a number of days or years"),
        ("mode", "mode legal-hold;", "expected governance or compliance"),
        ("key", 'key "<keyword>/<name>";', "must hold <host>"),
        ("key", 'key "<keyword>/<host>/<size>/<name>";', "<size>: expected one of"),
        ("key", 'key "<keyword>//<host>/<name>";', "expected segments"),
        ("key", 'key "../<keyword>/<host>/<name>";', "expected segments"),
        ("key", 'key "<keyword>/<host>/<name> x";', "expected segments"),
        ("keep_local", "keep_local always;", "expected a number of days (30d, 0d) or forever"),
        ("keep_local", "keep_local 5min;", "expected a number of days (30d, 0d) or forever"),
        ("keyword", 'keyword "nosuch";', 'archive names keyword "nosuch"'),
    ],
)
def test_bad_values_are_refused_where_written(
    tmp_path: Path, directive: str, line: str, message: str
) -> None:
    archive = dataclasses.replace(ARCHIVE, keywords=("audit",))
    path = replaced_line(written(tmp_path, archive), directive, line)
    number = 1 + path.read_text().splitlines().index(f"    {line}")
    with pytest.raises(config.ConfigError) as refused:
        config.check(str(path), "server")
    [problem] = refused.value.problems
    assert message in problem.message
    assert (problem.location.file, problem.location.line) == (str(path), number)


@pytest.mark.parametrize("missing", ["endpoint", "bucket", "credentials", "retention"])
def test_required_directives(tmp_path: Path, missing: str) -> None:
    path = written(tmp_path, ARCHIVE)
    path.write_text(
        "\n".join(
            line for line in path.read_text().splitlines() if not line.startswith(f"    {missing} ")
        )
    )
    with pytest.raises(config.ConfigError) as refused:
        config.check(str(path), "server")
    article = "an" if missing == "endpoint" else "a"
    assert [p.message for p in refused.value.problems] == [
        f"an archive needs {article} {missing} line"
    ]


def test_archive_is_no_client_directive(tmp_path: Path) -> None:
    path = tmp_path / "client.conf"
    path.write_text('archive { bucket "abc"; }\n')
    with pytest.raises(config.ConfigError) as refused:
        config.check(str(path), "client")
    assert [p.message for p in refused.value.problems] == ["unknown directive 'archive'"]
