"""The archive's rules without a store: keys, part sizes, ETags, retention, removal, credentials.

The ETag rule is also checked against the real radosgw (tests/archive/test_archive.py
compares it with what HeadObject answers); here its edges are pinned down.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dlogd import archive, config, s3
from dlogd.archive import Record, multipart_etag, object_key, part_size, removable, submit_time
from dlogd.config import Archive, Host, ServerConfig, ServerKeyword
from dlogd.s3 import CredentialsRefused, ObjectInfo, read_credentials
from tests.shipharness import REPO, env

ARCHIVE = Archive("http://127.0.0.1:7480", "dlogd-audit", "/c", retention_days=2)
DAY = 86400


def test_key_from_the_submit_time_in_utc() -> None:
    name = "1700000000.app.log"  # 2023-11-14T22:13:20Z
    when = submit_time(name, fallback=0.0)
    key = object_key(
        "<keyword>/<host>/<yyyy>/<mm>/<dd>/<name>",
        keyword="audit",
        host="web1",
        name=name,
        when=when,
    )
    assert key == "audit/web1/2023/11/14/1700000000.app.log"
    assert submit_time("1700000000-3.app.log", 0.0) == 1700000000.0
    assert submit_time("app.log", 42.0) == 42.0


def test_part_size_keeps_within_ten_thousand_parts() -> None:
    assert part_size(1) == archive.PART_SIZE
    assert part_size(archive.PART_SIZE * archive.MAX_PARTS) == archive.PART_SIZE
    bigger = part_size(archive.PART_SIZE * archive.MAX_PARTS + 1)
    assert bigger == 2 * archive.PART_SIZE


def test_etag_single_and_multipart() -> None:
    md5 = hashlib.md5(b"data").digest()
    assert multipart_etag([md5]) == hashlib.md5(b"data").hexdigest()
    two = [md5, hashlib.md5(b"more").digest()]
    assert multipart_etag(two) == hashlib.md5(b"".join(two)).hexdigest() + "-2"


def record(archived_at: float) -> Record:
    return Record("k", "v", "e", "s", 1, archived_at + 2 * DAY, archived_at)


def test_removal_waits_for_keep_local_and_never_when_forever() -> None:
    now = 1_000_000.0
    assert not removable(record(now), ARCHIVE, now)  # forever, the default
    thirty = Archive(**{**ARCHIVE.__dict__, "keep_local_days": 30})
    assert not removable(record(now - 29 * DAY), thirty, now)
    assert removable(record(now - 30 * DAY), thirty, now)


def info(**changes: object) -> ObjectInfo:
    base = {"key": "k", "version_id": "v", "size": 10, "etag": "e", "sha256": "s",
            "last_modified": 1000.0, "retain_mode": "GOVERNANCE", "retain_until": 1000.0 + 2 * DAY}  # fmt: skip
    return ObjectInfo(**{**base, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({}, None),
        ({"size": 11}, "archived size 11"),
        ({"sha256": "x"}, "SHA-256 metadata"),
        ({"etag": "f"}, "ETag"),
        ({"retain_mode": None, "retain_until": None}, "no retention"),
        ({"retain_mode": "COMPLIANCE"}, "retention mode COMPLIANCE"),
        ({"retain_until": 1000.0 + DAY}, "retention shorter"),
    ],
)
def test_object_problems(changes: dict[str, object], problem: str | None) -> None:
    found = archive.object_problems(
        info(**changes),
        size=10,
        sha256="s",
        etag="e",
        archive=ARCHIVE,
        until=1000.0 + 2 * DAY,
        now=2000.0,
    )
    assert found == [] if problem is None else any(problem in p for p in found), found


def test_object_missing() -> None:
    assert archive.object_problems(
        None, size=1, sha256="s", etag="", archive=ARCHIVE, until=0, now=0
    ) == ["missing from the archive"]


def credentials(
    tmp_path: Path,
    mode: int,
    text: str = "[default]\naws_access_key_id = A\naws_secret_access_key = B\n",
) -> Path:
    path = tmp_path / "credentials"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_credentials_read_when_private(tmp_path: Path) -> None:
    assert read_credentials(str(credentials(tmp_path, 0o400))) == s3.Credentials("A", "B")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o666])
def test_credentials_with_loose_mode_refused(tmp_path: Path, mode: int) -> None:
    with pytest.raises(CredentialsRefused, match=f"mode {mode:04o}"):
        read_credentials(str(credentials(tmp_path, mode)))


def test_credentials_symlink_and_other_owner_refused(tmp_path: Path) -> None:
    target = credentials(tmp_path, 0o600)
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(CredentialsRefused, match="cannot open"):
        read_credentials(str(link))
    os.chown(target, 65534, 65534)
    with pytest.raises(CredentialsRefused, match="owned by uid 65534"):
        read_credentials(str(target))


def test_malformed_credentials_not_echoed(tmp_path: Path) -> None:
    path = credentials(tmp_path, 0o600, "aws_secret_access_key = hunter2\n")
    with pytest.raises(CredentialsRefused) as refused:
        read_credentials(str(path))
    assert "hunter2" not in str(refused.value) and "[default]" in str(refused.value)


def test_one_run_at_a_time(tmp_path: Path) -> None:
    """A second run while one holds the state's lock does nothing (no second upload)."""
    conf = tmp_path / "server.conf"
    conf.write_text(
        config.to_text(
            ServerConfig(
                keywords={"audit": ServerKeyword("audit", {"web1": str(tmp_path / "store")})},
                hosts={"web1": Host("web1", "web1")},
                archive=ARCHIVE,
            )
        )
    )
    state = tmp_path / "state"
    state.mkdir()
    held = archive.run_lock(str(state))
    assert held is not None
    try:
        done = subprocess.run(
            [sys.executable, "-m", "dlogd.archive", "--config", str(conf), "--state", str(state)],
            capture_output=True,
            text=True,
            env=env(tmp_path / "cache"),
            cwd=REPO,
            timeout=60,
        )
    finally:
        os.close(held)
    assert (done.returncode, done.stderr) == (0, "dlogd-archive: another run is archiving now\n")
