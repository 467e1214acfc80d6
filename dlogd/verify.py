"""``dlogctl verify``: do the local files, the archive records and the archive agree?

Place in the flow: beside ``dlogd-archive``, read-only. For each archived
(keyword, host) directory of a collector, every name that is a local file or
has an archive record (``dlogd.archive``'s, written once an upload was
verified) is judged:

- ``ok``: archived, both copies match the record (a local copy removed by the
  archiver after ``keep_local`` counts as expected);
- ``unarchived``: a local file with no record yet (WARNING: it may simply be
  waiting for the next run);
- ``altered``: the local file's size or SHA-256 is not the one archived, or
  the archived version's size, SHA-256 metadata or ETag is not, or its
  retention is not in force as configured (CRITICAL);
- ``missing``: the archived version is gone, or the local copy is gone
  without the archiver having removed it (CRITICAL).

Exit codes are ``dlogctl status``'s check mode (the monitoring-plugin
convention): 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (no usable config, no
archive block, credentials refused, the store unreachable).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from dlogd.archive import (
    archived_dirs,
    hash_local,
    object_problems,
    open_stored,
    records,
    stored_names,
)
from dlogd.config import ServerConfig
from dlogd.fsutil import DIR_FLAGS
from dlogd.s3 import Bucket
from dlogd.status import CRITICAL, OK, UNKNOWN, WARNING

STATES = {"ok": OK, "unarchived": WARNING, "altered": CRITICAL, "missing": CRITICAL}


@dataclass(frozen=True)
class Finding:
    keyword: str
    host: str
    name: str
    state: str  # a key of STATES
    detail: str = ""


def _local_names(directory: str) -> set[str]:
    try:
        dir_fd = os.open(directory, DIR_FLAGS)
    except FileNotFoundError:
        return set()
    try:
        return set(stored_names(dir_fd))
    finally:
        os.close(dir_fd)


def gather(
    config: ServerConfig,
    state: str,
    bucket: Bucket,
    *,
    keyword: str | None = None,
    host: str | None = None,
) -> Iterator[Finding]:
    """A finding per name (raises :class:`dlogd.s3.ArchiveDown` if the store is unreachable)."""
    assert config.archive is not None
    archive = config.archive
    for kw, sender, directory in archived_dirs(config):
        if keyword not in (None, kw) or host not in (None, sender):
            continue
        local = _local_names(directory)
        archived = records(state, kw, sender)
        for name in sorted(local | set(archived)):
            record = archived.get(name)
            if record is None:
                yield Finding(kw, sender, name, "unarchived", "no archive record yet")
                continue
            problems = []
            if name in local:
                problems += _local_problems(directory, name, record.size, record.sha256)
            elif record.removed_at is None:
                yield Finding(
                    kw, sender, name, "missing", "local copy gone, not removed by archiving"
                )
                continue
            found = bucket.head(record.key, record.version_id)
            if found is None:
                yield Finding(
                    kw,
                    sender,
                    name,
                    "missing",
                    f"{record.key} version {record.version_id} not in the archive",
                )
                continue
            problems += object_problems(
                found,
                size=record.size,
                sha256=record.sha256,
                etag=record.etag,
                archive=archive,
                until=record.retain_until,
                now=time.time(),
            )
            if problems:
                yield Finding(kw, sender, name, "altered", "; ".join(problems))
            else:
                yield Finding(kw, sender, name, "ok", record.key)


def _local_problems(directory: str, name: str, size: int, sha256: str) -> list[str]:
    dir_fd = os.open(directory, DIR_FLAGS)
    try:
        fd = open_stored(dir_fd, name)
    except OSError as exc:
        return [f"local copy unreadable: {exc}"]
    finally:
        os.close(dir_fd)
    try:
        local = hash_local(fd)
    finally:
        os.close(fd)
    if (local.size, local.sha256) != (size, sha256):
        return [
            f"local copy has size {local.size}, SHA-256 {local.sha256}; archived {size}, {sha256}"
        ]
    return []


def check(findings: list[Finding]) -> tuple[int, str]:
    """The worst state as an exit code, and the plugin's one line."""
    code = max((STATES[f.state] for f in findings), default=OK)
    counts = {s: sum(f.state == s for f in findings) for s in STATES}
    word = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL"}[code]
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    return code, f"DLOGD VERIFY {word} - {summary}"


def render(findings: list[Finding]) -> str:
    lines = [
        f"{f.state:<10} {f.keyword}/{f.host}/{f.name}"
        + (f": {f.detail}" if f.state != "ok" else "")
        for f in findings
    ]
    return "".join(line + "\n" for line in lines)


def to_json(findings: list[Finding]) -> str:
    return json.dumps([asdict(f) for f in findings], indent=2) + "\n"


__all__ = ["STATES", "UNKNOWN", "Finding", "check", "gather", "render", "to_json"]
