"""What every benchmark script shares: where it runs, what it ran on, how it reports.

Place in the flow: imported by the scripts of bench/ (not by dlogd, not by the
tests). Each script measures dlogd and what people use instead in one run and
prints a Markdown section; this module gives them one header (the machine,
the date, the exact command) and one way to publish it.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = str(REPO / ".venv" / "bin" / "python")
BENCH_ROOT = Path("/tmp/dlogd-bench")

sys.path.insert(0, str(REPO))  # run as a script from anywhere: import this checkout's dlogd


# What the disk allows a program that makes each small file durable itself:
# write + fsync each (argv[3] == 1), or one syncfs per N files (the group commit
# dlogd's collector does), then the directory. Run as its own process, like
# every other contender, so that its start is counted as theirs is.
DURABLE_LOOP = """
import ctypes, os, sys
src, dst, every = sys.argv[1], sys.argv[2], int(sys.argv[3])
os.mkdir(dst)
dfd = os.open(dst, os.O_RDONLY | os.O_DIRECTORY)
libc = ctypes.CDLL(None, use_errno=True)
names = sorted(os.listdir(src))
for n, name in enumerate(names, 1):
    with open(os.path.join(src, name), "rb") as f:
        data = f.read()
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dfd)
    os.write(fd, data)
    if every == 1:
        os.fsync(fd)
    os.close(fd)
    if every > 1 and n % every == 0 and libc.syncfs(dfd) != 0:
        raise OSError(ctypes.get_errno(), "syncfs")
if every > 1 and libc.syncfs(dfd) != 0:
    raise OSError(ctypes.get_errno(), "syncfs")
os.fsync(dfd)
"""


def vm_hwm_kib(pid: int) -> int:
    """Peak resident set of a live process, from /proc (kernel-kept high-water mark)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    fs = subprocess.run(
        ["df", "--output=source,fstype", str(BENCH_ROOT)], capture_output=True, text=True
    ).stdout.splitlines()[-1]
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cpus": f"{os.cpu_count()} x {model}",
        "memory": f"{mem_kib / 1024 / 1024:.0f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "disk": " ".join(fs.split()) + " (temp data under /tmp/dlogd-bench)",
    }


def preamble(title: str, script: str, *notes: str) -> list[str]:
    """A report's first lines: its title, the machine, how to run it again, then ``notes``."""
    command = f"sudo .venv/bin/python bench/{script} " + " ".join(sys.argv[1:])
    return [f"## {title}", "", *(f"- {k}: {v}" for k, v in machine().items()),
            f"- reproduce: `{command.strip()}`", *(f"- {n}" for n in notes), ""]  # fmt: skip


def publish(text: str, markdown: str | None) -> int:
    """Print the report, and write it to ``markdown`` if given; the script's exit status."""
    print(text, end="" if text.endswith("\n") else "\n")
    if markdown:
        Path(markdown).write_text(text)
    return 0
