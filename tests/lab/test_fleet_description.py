"""The fleet description's checks, and the playbook's static checks, without hosts.

Place in the flow: the first play of ansible/site.yml runs on the control
node only and refuses a fleet description with an undefined keyword,
collector or group, a bad uid or a keyword name the config language
rejects, before any host is touched. These tests run the real playbook with
``--limit localhost`` (so no host could be reached even if a check let
something through) and look for the message naming the culprit. The filter
that derives both sides from one description is exercised directly too, and
``--syntax-check`` and ``vagrant validate`` run here as tests do in CI.

No lab is booted: these need only Ansible (the ``fleet`` extra) and, for the
Vagrantfile, Debian's ``vagrant`` package.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from labhosts import REPO

ANSIBLE = REPO / "ansible"
PLAYBOOK_BIN = Path(sys.executable).parent / "ansible-playbook"
# Documentation addresses: the validation play fails before anything could use them.
HOSTS = {"logs1": "192.0.2.10", "web1": "192.0.2.11", "web2": "192.0.2.12"}
GOOD: dict[str, Any] = {
    "dlogd_keywords": [
        {"name": "audit", "collectors": ["dlogd_collectors"]},
        {"name": "app", "collectors": ["logs1"], "dir": "/var/log/remote/{host}/apps/{keyword}"},
    ],
    "dlogd_submitters": [
        {"keyword": "audit", "hosts": ["dlogd_clients"], "uids": [0], "groups": ["adm"]},
        {"keyword": "app", "hosts": ["web1"], "users": ["www-data"]},
    ],
}


def load_filters() -> ModuleType:
    path = ANSIBLE / "filter_plugins" / "dlogd_fleet.py"
    spec = importlib.util.spec_from_file_location("dlogd_fleet_filters", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def inventory(directory: Path, fleet_vars: dict[str, Any]) -> Path:
    hosts = {
        "all": {
            "hosts": {"localhost": {"ansible_connection": "local"}},
            "children": {
                "dlogd_collectors": {"hosts": {"logs1": {"ansible_host": HOSTS["logs1"]}}},
                "dlogd_clients": {
                    "hosts": {n: {"ansible_host": HOSTS[n]} for n in ("web1", "web2")}
                },
            },
        }
    }
    (directory / "group_vars").mkdir()
    (directory / "hosts.yml").write_text(json.dumps(hosts))
    (directory / "group_vars" / "all.yml").write_text(json.dumps(fleet_vars))
    return directory / "hosts.yml"


def playbook(*args: str) -> subprocess.CompletedProcess[str]:
    if not PLAYBOOK_BIN.exists():
        pytest.fail(f"{PLAYBOOK_BIN} missing: pip install -e '.[fleet]' (scripts/setup.sh does)")
    env = {**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"}
    env["PATH"] = f"{PLAYBOOK_BIN.parent}:{env.get('PATH', '/usr/bin:/bin')}"
    return subprocess.run([str(PLAYBOOK_BIN), *args], cwd=ANSIBLE, env=env, capture_output=True,
                          text=True, check=False, timeout=300)  # fmt: skip


def check_play(tmp_path: Path, fleet_vars: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return playbook("-i", str(inventory(tmp_path, fleet_vars)), "site.yml", "--limit", "localhost")


def broken(*changes: str) -> dict[str, Any]:
    """GOOD with the mistakes named by ``changes``."""
    fleet = copy.deepcopy(GOOD)
    keywords, submitters = fleet["dlogd_keywords"], fleet["dlogd_submitters"]
    for change in changes:
        if change == "undefined keyword":
            submitters.append({"keyword": "nosuch", "hosts": ["web1"], "uids": [0]})
        elif change == "collector not in the inventory":
            keywords[0]["collectors"] = ["dlogd_collectors", "logs9"]
        elif change == "undefined group":
            submitters[0]["hosts"] = ["webservers"]
        elif change == "client not in dlogd_clients":
            submitters[1]["hosts"] = ["logs1"]
        elif change == "unknown directory placeholder":
            keywords[1]["dir"] = "/var/log/remote/{client}"
        elif change == "uid out of range":
            submitters[0]["uids"] = [4294967295]
        elif change == "keyword name rejected":
            keywords[1]["name"] = submitters[1]["keyword"] = "my app"
        elif change == "uid not a number":
            submitters[0]["uids"] = ["alice"]
        else:
            raise AssertionError(change)
    return fleet


EXPECTED = {
    # Cross-references: the assert pass reports every one in one message.
    "undefined keyword": "dlogd_submitters[2]: keyword 'nosuch' is not defined in dlogd_keywords",
    "collector not in the inventory": "'logs9' is neither a host nor a group of the inventory",
    "undefined group": "'webservers' is neither a host nor a group of the inventory",
    "client not in dlogd_clients": "host 'logs1' is not in group dlogd_clients",
    "unknown directory placeholder": "uses ['client']; only {host} and {keyword}",
    # Values: dlogctl on the fleet-wide configs, every error with its line.
    "uid out of range": "uid 4294967295 out of range",
    "keyword name rejected": "'my app': expected 1-64 of",
    # Types: the argument spec, before anything else.
    "uid not a number": "option 'uids' found in 'dlogd_submitters' is of type str",
}
RUNS = {
    "cross-references": [
        "undefined keyword", "collector not in the inventory", "undefined group",
        "client not in dlogd_clients", "unknown directory placeholder",
    ],
    "values": ["uid out of range", "keyword name rejected"],
    "types": ["uid not a number"],
}  # fmt: skip


@pytest.mark.parametrize("run", sorted(RUNS))
def test_bad_fleet_description_fails_on_the_control_node_naming_each_culprit(
    tmp_path: Path, run: str
) -> None:
    done = check_play(tmp_path, broken(*RUNS[run]))
    # Ansible's YAML output wraps long lines and doubles quotes inside quotes.
    output = " ".join((done.stdout + done.stderr).split()).replace("''", "'")
    assert done.returncode != 0, output[-3000:]
    for change in RUNS[run]:
        assert EXPECTED[change] in output, (change, output[-3000:])
    # Nothing but the control node was in the run.
    recap = output.rsplit("PLAY RECAP", 1)[-1]
    assert "localhost" in recap and not any(h in recap for h in HOSTS), recap


def test_good_fleet_description_passes_the_checks(tmp_path: Path) -> None:
    done = check_play(tmp_path, GOOD)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "failed=0" in done.stdout


def test_both_sides_derive_from_one_description() -> None:
    filters = load_filters()
    groups = {"all": list(HOSTS), "dlogd_collectors": ["logs1"], "dlogd_clients": ["web1", "web2"]}
    keywords, submitters = GOOD["dlogd_keywords"], GOOD["dlogd_submitters"]
    assert filters.problems(keywords, submitters, groups, "/var/log/remote/{host}/{keyword}") == []
    web1 = filters.client_view(keywords, submitters, groups, "web1")
    web2 = filters.client_view(keywords, submitters, groups, "web2")
    assert [(k["name"], k["collectors"]) for k in web1] == [
        ("app", ["logs1"]),
        ("audit", ["logs1"]),
    ]
    assert [k["name"] for k in web2] == ["audit"]
    logs1 = filters.collector_view(keywords, submitters, groups, "logs1", "/r/{host}/{keyword}")
    pairs = [(k["name"], s["host"], s["dir"]) for k in logs1 for s in k["senders"]]
    assert pairs == [
        ("app", "web1", "/var/log/remote/web1/apps/app"),
        ("audit", "web1", "/r/web1/audit"),
        ("audit", "web2", "/r/web2/audit"),
    ]


def test_config_strings_are_quoted_with_the_languages_escapes() -> None:
    quote = load_filters().quote
    assert quote('a"b\\c\nd\te\x01') == '"a\\"b\\\\c\\nd\\te\\x01"'


def test_site_yml_passes_the_syntax_check() -> None:
    done = playbook("--syntax-check", "site.yml", "install.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_vagrantfile_validates() -> None:
    vagrant = shutil.which("vagrant")
    if vagrant is None:
        pytest.fail("vagrant missing: Debian's vagrant package (scripts/setup.sh installs it)")
    done = subprocess.run([vagrant, "validate", "--ignore-provider"], cwd=REPO / "vagrant",
                          capture_output=True, text=True, check=False, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "validated successfully" in done.stdout
