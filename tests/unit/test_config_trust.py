"""Config files and include directories are trusted only when nobody but root or
the service user can change them, and what fails to parse is not echoed (issue 9 item 7).

Real files with real owners and modes: the tests run as root and hand files to
an ordinary user (uid 65534) with os.chown, as an attacker's drop-in would be.
Inputs are written with the project's own writer (``dlogd.config.to_text``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dlogd import config
from dlogd.config import ClientConfig, ClientKeyword, Host
from dlogd.conflang import ConfigSyntaxError, parse_file

NOBODY = 65534
SHADOW_LIKE = "root:$6$saltsalt$SECRETHASHSECRETHASH:19000:0:99999:7:::\nbin:*:19000::::::\n"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


def client_text(tmp_path: Path) -> str:
    return config.to_text(
        ClientConfig(
            keywords={"audit": ClientKeyword("audit", frozenset({0}), frozenset(), ("logs1",))},
            hosts={"logs1": Host("logs1", "logs1")},
            spool=str(tmp_path / "spool"),
        )
    )


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    """A config directory as installed: root's, 0755, with an include directory."""
    d = tmp_path / "etc"
    (d / "client.d").mkdir(parents=True)
    d.chmod(0o755)
    (d / "client.d").chmod(0o755)
    (d / "client.conf").write_text('include "client.d";\n')
    return d


def drop_in(etc: Path, tmp_path: Path, name: str = "10-audit.conf") -> Path:
    path = etc / "client.d" / name
    path.write_text(client_text(tmp_path))
    path.chmod(0o644)
    return path


def refusal(path: Path) -> str:
    with pytest.raises(ConfigSyntaxError) as caught:
        parse_file(str(path))
    return str(caught.value)


def test_root_owned_files_are_read(etc: Path, tmp_path: Path) -> None:
    drop_in(etc, tmp_path)
    assert "spool" in {s.name for s in parse_file(str(etc / "client.conf"))}


def test_drop_in_owned_by_an_ordinary_user_is_refused(etc: Path, tmp_path: Path) -> None:
    path = drop_in(etc, tmp_path)
    os.chown(path, NOBODY, NOBODY)
    message = refusal(etc / "client.conf")
    assert f"{path}" in message and f"owned by uid {NOBODY}" in message


@pytest.mark.parametrize(
    ("mode", "gid", "why"),
    [(0o666, 0, "writable by every user"), (0o664, NOBODY, f"writable by group {NOBODY}")],
)
def test_drop_in_writable_by_others_is_refused(
    etc: Path, tmp_path: Path, mode: int, gid: int, why: str
) -> None:
    path = drop_in(etc, tmp_path)
    os.chown(path, 0, gid)
    path.chmod(mode)
    assert why in refusal(etc / "client.conf")


def test_group_writable_by_root_s_group_is_trusted(etc: Path, tmp_path: Path) -> None:
    path = drop_in(etc, tmp_path)
    os.chown(path, 0, 0)
    path.chmod(0o664)
    parse_file(str(etc / "client.conf"))


@pytest.mark.parametrize("how", ["owner", "mode"])
def test_include_directory_others_can_write_is_refused(etc: Path, tmp_path: Path, how: str) -> None:
    drop_in(etc, tmp_path)
    if how == "owner":
        os.chown(etc / "client.d", NOBODY, NOBODY)
    else:
        (etc / "client.d").chmod(0o1777)  # sticky does not help: anyone may add a file
    message = refusal(etc / "client.conf")
    assert str(etc / "client.d") in message
    assert ("owned by uid" if how == "owner" else "writable by every user") in message


def test_main_config_owned_by_an_ordinary_user_is_refused(etc: Path) -> None:
    os.chown(etc / "client.conf", NOBODY, NOBODY)
    assert f"owned by uid {NOBODY}" in refusal(etc / "client.conf")


def test_main_config_in_a_directory_others_can_write_is_refused(etc: Path) -> None:
    etc.chmod(0o777)  # anyone could replace client.conf
    assert "writable by every user" in refusal(etc / "client.conf")


def test_config_in_a_sticky_directory_is_trusted(tmp_path: Path) -> None:
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)  # as /tmp: others cannot replace root's file
    (sticky / "c.conf").write_text("x;\n")
    assert [s.name for s in parse_file(str(sticky / "c.conf"))] == ["x"]


def test_symlink_in_include_directory_to_a_non_conf_file_is_not_followed(
    etc: Path, tmp_path: Path
) -> None:
    """A drop-in pointing at /etc/shadow: root's file, so ownership alone would pass."""
    shadow = tmp_path / "shadow"
    shadow.write_text(SHADOW_LIKE)
    shadow.chmod(0o640)
    os.symlink(shadow, etc / "client.d" / "50-x.conf")
    message = refusal(etc / "client.conf")
    assert "50-x.conf" in message and "symlink" in message and "not followed" in message
    for fragment in ("saltsalt", "SECRET", "19000", "root:"):
        assert fragment not in message


def test_symlink_to_a_trusted_conf_file_is_followed(etc: Path, tmp_path: Path) -> None:
    available = etc / "available"
    available.mkdir(mode=0o755)
    target = available / "audit.conf"
    target.write_text(client_text(tmp_path))
    os.symlink("../available/audit.conf", etc / "client.d" / "10-audit.conf")
    assert "spool" in {s.name for s in parse_file(str(etc / "client.conf"))}


@pytest.mark.parametrize("how", ["file", "directory"])
def test_symlink_to_a_conf_file_others_can_change_is_not_followed(
    etc: Path, tmp_path: Path, how: str
) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    target = theirs / "audit.conf"
    target.write_text(client_text(tmp_path))
    os.chown(target if how == "file" else theirs, NOBODY, NOBODY)
    os.symlink(target, etc / "client.d" / "10-audit.conf")
    message = refusal(etc / "client.conf")
    assert "10-audit.conf" in message and f"owned by uid {NOBODY}" in message


def test_a_file_that_is_not_config_is_not_echoed(etc: Path, tmp_path: Path) -> None:
    """Named explicitly (include "FILE"), a trusted file that is not config text: the
    error names the place and the offending character, never the lines around it."""
    shadow = tmp_path / "shadow"
    shadow.write_text(SHADOW_LIKE)
    (etc / "client.conf").write_text(f'include "{shadow}";\n')
    message = refusal(etc / "client.conf")
    assert f"{shadow}:1:" in message
    for fragment in ("saltsalt", "SECRET", "19000"):
        assert fragment not in message


def test_a_long_offending_token_is_cut(tmp_path: Path) -> None:
    path = tmp_path / "c.conf"
    path.write_text('"password=hunter2-and-a-lot-more-of-the-secret-line" x;\n')
    message = refusal(path)
    assert "expected a directive name" in message
    assert "of-the-secret-line" not in message
