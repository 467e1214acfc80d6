"""``dlogctl check-config``: exit status, located messages, ``--dump`` JSON, the cache (process tier).

The operator's front end to config loading (``cli`` -> ``config``). A few
tests run the installed entry point as a real process; the rest call
``cli.main`` in-process to keep the unit tier fast.
"""

from __future__ import annotations

import grp
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dlogd import cli

pytestmark = pytest.mark.process

REPO = Path(__file__).resolve().parents[2]
CLIENT_EXAMPLE = REPO / "examples" / "client.conf"
SERVER_EXAMPLE = REPO / "examples" / "server.conf"
DLOGCTL = REPO / ".venv" / "bin" / "dlogctl"


def dlogctl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """The real command in a child process, as an operator runs it."""
    command = [str(DLOGCTL)] if DLOGCTL.exists() else [sys.executable, "-m", "dlogd.cli"]
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = cli.main(["check-config", *args])
    out, err = capsys.readouterr()
    return status, out, err


def test_examples_are_valid_as_a_real_process() -> None:
    result = dlogctl(
        "check-config", "--client", str(CLIENT_EXAMPLE), "--server", str(SERVER_EXAMPLE)
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == (
        f"{CLIENT_EXAMPLE}: valid client config\n{SERVER_EXAMPLE}: valid server config\n"
    )


def test_errors_exit_1_with_file_line_column_as_a_real_process(tmp_path: Path) -> None:
    bad = tmp_path / "client.conf"
    bad.write_text('spool "spool";\nhost "h" {\n  port 0;\n}\nbogus;\n')
    result = dlogctl("check-config", "--client", str(bad))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{bad}:1:7: error: expected an absolute path, got 'spool'",
        f"{bad}:3:8: error: port 0 out of range: expected 1-65535",
        f"{bad}:5:1: error: unknown directive 'bogus'",
        f"{bad}: invalid client config (3 errors)",
    ]


def test_fifo_config_fails_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "client.conf"
    os.mkfifo(fifo)
    result = dlogctl("check-config", "--client", str(fifo), timeout=20)
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == f"{fifo}:0:0: error: not a regular file"


def test_help_as_a_real_process() -> None:
    result = dlogctl("check-config", "--help")
    assert result.returncode == 0
    assert "--dump" in result.stdout
    assert "2  usage error" in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["check-config", "--bogus"],
        ["check-config", "--client"],
        ["check-config", "extra-positional"],
        ["no-such-command"],
        [],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(args)
    assert caught.value.code == 2


def test_usage_error_exits_2_as_a_real_process() -> None:
    result = dlogctl("check-config", "--no-such-option")
    assert result.returncode == 2
    assert "unrecognized arguments: --no-such-option" in result.stderr


def test_missing_config_file_is_an_error_not_a_crash(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = tmp_path / "nope.conf"
    status, out, err = run(capsys, "--server", str(missing))
    assert (status, out) == (1, "")
    assert err.splitlines() == [
        f"{missing}:0:0: error: cannot open: No such file or directory",
        f"{missing}: invalid server config (1 errors)",
    ]


def test_warning_is_printed_and_exit_is_0(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(KeyError):
        grp.getgrnam("dlogd-absent-group")
    conf = tmp_path / "client.conf"
    conf.write_text(
        'keyword "audit" {\n  group "dlogd-absent-group";\n  host "h";\n}\nhost "h" { }\n'
    )
    status, out, err = run(capsys, "--client", str(conf))
    assert status == 0
    assert out == f"{conf}: valid client config\n"
    assert err == f'{conf}:2:3: warning: no group "dlogd-absent-group" on this host\n'


def test_one_bad_config_among_several_fails_the_run(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.conf"
    bad.write_text("limits { window 1025; }\n")
    status, out, err = run(capsys, "--client", str(CLIENT_EXAMPLE), "--server", str(bad))
    assert status == 1
    assert out == f"{CLIENT_EXAMPLE}: valid client config\n"
    assert err.splitlines() == [
        f"{bad}:1:17: error: 1025: expected a whole number from 1 to 1024",
        f"{bad}: invalid server config (1 errors)",
    ]


def test_dump_prints_normalised_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    conf = tmp_path / "client.conf"
    conf.write_text(
        'spool "/var/spool//dlogd/";\n'
        "limits { max_file_size 2G; frame_size 64K; timeout 2min; }\n"
        "retry { min 500ms; }\n"
        'keyword "audit" { uid "1001"; uid 0; group "root"; host "logs1"; copy on; }\n'
        'host "logs1" { fingerprint "sha256:' + ":".join(["AB"] * 32) + '"; }\n'
    )
    status, out, err = run(capsys, "--dump", "--client", str(conf))
    assert (status, err) == (0, "")
    dumped = json.loads(out)
    assert dumped["role"] == "client"
    assert dumped["spool"] == "/var/spool/dlogd"
    assert dumped["limits"]["max_file_size"] == 2 * 1024**3
    assert dumped["limits"]["frame_size"] == 64 * 1024
    assert dumped["limits"]["timeout"] == 120.0
    assert dumped["retry"] == {"min_delay": 0.5, "max_delay": 3600.0}
    assert dumped["keywords"]["audit"] == {
        "name": "audit",
        "uids": [0, 1001],
        "groups": ["root"],
        "hosts": ["logs1"],
        "copy": True,
    }
    assert dumped["hosts"]["logs1"] == {
        "name": "logs1",
        "address": "logs1",
        "port": 7878,
        "fingerprint": "ab" * 32,
    }
    assert dumped["sources"] == [str(conf)]


def test_dump_of_both_roles_is_a_json_list_as_a_real_process() -> None:
    result = dlogctl(
        "check-config", "--dump", "--client", str(CLIENT_EXAMPLE), "--server", str(SERVER_EXAMPLE)
    )
    assert result.returncode == 0
    client, server = json.loads(result.stdout)
    assert (client["role"], server["role"]) == ("client", "server")
    assert server["limits"]["window"] == 64
    assert client["sources"][0] == str(CLIENT_EXAMPLE)
    assert any(s.endswith(".conf") and "/client.d/" in s for s in client["sources"])


def test_write_cache(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    status, _, _ = run(
        capsys, "--write-cache", "--cache-dir", str(cache_dir), "--server", str(SERVER_EXAMPLE)
    )
    assert status == 0
    (cache,) = cache_dir.iterdir()
    assert cache.name.startswith("server-")
    assert json.loads(cache.read_text())["files"][0] == str(SERVER_EXAMPLE)


def test_invalid_config_writes_no_cache(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.conf"
    bad.write_text("bogus;\n")
    cache_dir = tmp_path / "cache"
    status, _, _ = run(capsys, "--write-cache", "--cache-dir", str(cache_dir), "--client", str(bad))
    assert status == 1
    assert not cache_dir.exists()
