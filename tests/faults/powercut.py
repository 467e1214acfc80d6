"""A power cut, approximated: ext4 on a loop device over a tmpfs file, copied while frozen.

Place in the tests: this kernel has no device-mapper (no dm-flakey, no
dm-log-writes) and no netem, so a cut is made this way. The file system
under test is ext4 mounted with a long ``commit=`` interval, so nothing
reaches the "disk" (the loop device's backing file, in tmpfs) unless
somebody asked for it with fsync/syncfs, or the kernel's writeback happened
to send it. At the instant of the cut every process that writes to it is
frozen with SIGSTOP and the backing file is copied: the copy is the disk as
it was when the power went. The copy is then checked with ``e2fsck`` (which
replays the journal, as a mount after a crash does) and mounted elsewhere,
and the test looks at what survived.

``self_test`` in test_powercut.py shows the method catches a missing fsync:
a file renamed into place without one comes back missing or empty.

Everything is named ``dlf-<pid>-…`` (backing files in /dev/shm, mount points
under /tmp) and removed in finalizers; :func:`remove_leftovers` also clears
what a killed run left.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SHM = Path("/dev/shm")
MOUNT_BASE = Path("/tmp")
_OURS = re.compile(r"dlf-(\d+)-")
COMMIT_SECONDS = 600


def _run(*cmd: str, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode not in ok:
        raise AssertionError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr}{proc.stdout}")
    return proc


def _loops() -> list[tuple[str, str]]:
    """(loop device, backing file) of every attached loop device."""
    out = _run("losetup", "-J", "-l").stdout
    if not out.strip():
        return []
    return [(d["name"], d.get("back-file") or "") for d in json.loads(out)["loopdevices"]]


def _mounts_of(device: str) -> list[str]:
    proc = subprocess.run(
        ["findmnt", "-n", "-o", "TARGET", "-S", device], capture_output=True, text=True
    )
    return proc.stdout.split()


def _dead(path: str) -> bool:
    match = _OURS.search(path)
    return match is not None and not Path(f"/proc/{match.group(1)}").exists()


def remove_leftovers() -> list[str]:
    """Unmount, detach and delete what a killed earlier run left (its pid is gone)."""
    removed = []
    for device, backing in _loops():
        if backing.startswith(str(SHM / "dlf-")) and _dead(backing):
            for target in _mounts_of(device):
                _run("umount", "-l", target, ok=(0, 32))
            _run("losetup", "-d", device, ok=(0, 1))
            removed.append(device)
    for path in [*SHM.glob("dlf-*"), *MOUNT_BASE.glob("dlf-*")]:
        if _dead(str(path)):
            with contextlib.suppress(OSError):
                os.rmdir(path) if path.is_dir() else path.unlink()
            removed.append(str(path))
    return removed


@dataclass
class Volume:
    """One image file, attached to a loop device and mounted."""

    image: Path
    mountpoint: Path
    device: str = ""

    def attach_and_mount(self, options: str) -> None:
        self.device = _run("losetup", "-f", "--show", str(self.image)).stdout.strip()
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        _run("mount", "-t", "ext4", "-o", options, self.device, str(self.mountpoint))

    def release(self) -> None:
        if self.device:
            _run("umount", str(self.mountpoint), ok=(0, 32))
            _run("losetup", "-d", self.device, ok=(0, 1))
            self.device = ""
        with contextlib.suppress(OSError):
            self.mountpoint.rmdir()
        with contextlib.suppress(FileNotFoundError):
            self.image.unlink()


@dataclass
class Disk:
    """The disk under test and the copies made of it at each cut."""

    tag: str
    size_mb: int = 128
    live: Volume = field(init=False)
    cuts: list[Volume] = field(default_factory=list)
    fsck_codes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        stem = f"dlf-{os.getpid()}-{self.tag}"
        self.live = Volume(SHM / f"{stem}.img", MOUNT_BASE / stem)

    @property
    def root(self) -> Path:
        return self.live.mountpoint

    def create(self) -> None:
        with self.live.image.open("wb") as f:
            f.truncate(self.size_mb << 20)
        _run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", str(self.live.image))
        self.live.attach_and_mount(f"commit={COMMIT_SECONDS}")

    def cut(self) -> Volume:
        """Copy the backing file now (the caller has frozen every writer): the disk after
        the power went. Then e2fsck it (journal replay) and mount it read-write."""
        n = len(self.cuts)
        copy = Volume(
            SHM / f"dlf-{os.getpid()}-{self.tag}-cut{n}.img",
            MOUNT_BASE / f"dlf-{os.getpid()}-{self.tag}-cut{n}",
        )
        self.cuts.append(copy)
        # A plain read of the backing file: what the loop device has written, no more.
        shutil.copyfile(self.live.image, copy.image)
        # 0 clean, 1 errors corrected (e.g. journal replayed): both are a mountable disk.
        code = _run("e2fsck", "-f", "-y", str(copy.image), ok=(0, 1)).returncode
        self.fsck_codes.append(code)
        copy.attach_and_mount("commit=5")
        return copy

    def release_cuts(self) -> None:
        for copy in self.cuts:
            copy.release()
        self.cuts.clear()

    def destroy(self) -> None:
        self.release_cuts()
        self.live.release()


@contextlib.contextmanager
def disk(tag: str, size_mb: int = 128) -> Iterator[Disk]:
    if os.geteuid() != 0:
        raise AssertionError("power-cut tests attach loop devices: run them as root")
    remove_leftovers()
    made = Disk(tag, size_mb)
    try:
        made.create()
        yield made
    finally:
        made.destroy()
