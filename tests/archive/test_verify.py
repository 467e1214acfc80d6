"""``dlogctl verify`` as a process, on files the real shipper, collector and archiver made."""

from __future__ import annotations

import json
import subprocess
import sys

from dlogd import journal
from dlogd.status import CRITICAL, OK, UNKNOWN, WARNING
from tests.archive.archiveharness import World
from tests.shipharness import REPO, env, make_file


def verify(world: World, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "dlogd.cli",
            "verify",
            "--server",
            str(world.server_conf),
            "--state",
            str(world.state),
            *args,
        ],
        capture_output=True,
        text=True,
        env=env(world.site.cache),
        cwd=REPO,
        timeout=60,
    )


def states(world: World) -> dict[str, str]:
    done = verify(world, "--json")
    return {f["name"]: f["state"] for f in json.loads(done.stdout)}


def test_verify_finds_unarchived_altered_and_missing(world: World) -> None:
    names = world.deliver(*(make_file(world.root / f"{n}.log", n.encode() * 100) for n in "abc"))
    assert verify(world).returncode == WARNING  # nothing archived yet
    run = world.run()
    assert len(run.of(journal.ARCHIVE_STORED)) == 3, run.stderr
    clean = verify(world)
    assert clean.returncode == OK, clean.stdout + clean.stderr
    assert clean.stdout.startswith("DLOGD VERIFY OK - 3 ok")

    tampered, deleted, forged = names
    (world.store / tampered).write_bytes(b"A" * 100)  # same size, other bytes
    (world.store / deleted).unlink()  # gone, and not by the archiver
    [late] = world.deliver(make_file(world.root / "d.log", b"late"))
    found = verify(world)
    assert found.returncode == CRITICAL, found.stdout + found.stderr
    assert states(world) == {
        tampered: "altered",
        deleted: "missing",
        forged: "ok",
        late: "unarchived",
    }
    assert f"altered    audit/web1/{tampered}: local copy has size 100" in found.stdout

    # Retention not in force as configured: the archived versions are governance-locked.
    world.configure(mode="compliance")
    assert "retention mode GOVERNANCE, configured compliance" in verify(world).stdout
    assert states(world)[forged] == "altered"
    only = verify(world, "--keyword", "audit", "--host", "nosuch")
    assert only.returncode == OK and "0 ok" in only.stdout


def test_verify_without_an_archive_is_unknown(world: World) -> None:
    world.server_conf.write_text(
        world.server_conf.read_text().replace("archive {", "partials {}\nxarchive {")
    )
    assert verify(world).returncode == UNKNOWN
