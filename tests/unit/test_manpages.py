"""dlogctl(1) and dlogd.conf(5): rendered from their Markdown, committed, and lint-clean.

Rendering needs pandoc and checking needs groff and man (Debian: pandoc,
groff-base, man-db; scripts/setup.sh installs them). A missing tool fails
the test: the pages must not rot unnoticed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from dlogd.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
PAGES = ("dlogctl.1", "dlogd.conf.5")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (scripts/setup.sh installs it)")
    return path


def test_committed_pages_are_rendered_from_the_current_markdown(tmp_path: Path) -> None:
    _tool("pandoc")
    subprocess.run([str(REPO / "scripts/manpages.sh"), str(tmp_path)], check=True, cwd=REPO)
    for page in PAGES:
        fresh = (tmp_path / page).read_text()
        committed = (REPO / "docs/man" / page).read_text()
        assert fresh == committed, f"docs/man/{page} is stale: run scripts/manpages.sh"


@pytest.mark.parametrize("page", PAGES)
def test_page_is_clean_roff(page: str) -> None:
    done = subprocess.run(
        [_tool("groff"), "-ww", "-z", "-man", str(REPO / "docs/man" / page)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr


@pytest.mark.parametrize("page", PAGES)
def test_man_renders_the_page(page: str) -> None:
    done = subprocess.run(
        [_tool("man"), "-l", str(REPO / "docs/man" / page)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "MANWIDTH": "80"},
    )
    assert done.returncode == 0, done.stderr
    text = re.sub(r".\x08", "", done.stdout)  # drop the overstrike of bold and underline
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "SEE ALSO"):
        assert section in text


def test_every_dlogctl_command_is_in_its_page() -> None:
    parser = build_parser()
    [sub] = [a for a in parser._actions if a.dest == "command"]
    page = (REPO / "docs/man/dlogctl.1").read_text()
    assert sub.choices is not None
    for command in sub.choices:
        assert f"dlogctl {command}" in page.replace("\\-", "-"), command
