"""Lab rollout: what ``ansible-playbook site.yml`` built, and rolling out again.

Place in the flow: the session's ``fleet`` fixture ran site.yml once on
fresh hosts (tests/lab/labfleet.py); these tests look at what it built
(keys, certificates, configs derived from the one fleet description,
launchers), then run the playbook again the way an operator does: with no
change (nothing may change), in check mode, with a bad value (the working
config stays), with a certificate inside its renewal window (re-issued and
used from the next connection, nothing restarted), with a client taken
off a keyword (the collector refuses it), and with a new keyword and a
third client, web3 (it works end to end; the collector gains exactly that
permission; nothing else restarts). Each test that changes the fleet
description rolls the lab's own description out again before it ends, so
the scenarios in the other lab modules run on the fleet they expect.

Tests run in file order: the no-change runs come right after the first run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from labfleet import (
    CLIENT_CONF,
    CLIENT_UNITS,
    CLIENTS,
    COLLECTOR,
    KEYWORD,
    SERVER_CONF,
    SERVER_UNITS,
    SPARE_CLIENT,
    TLS_DIR,
    Fleet,
    PlaybookRun,
    records,
    sha256s,
    unit_invocations,
    wait_for_files,
)
from labhosts import CONTROL_ADDRESS, LabHost, wait_until
from prometheus_client.parser import text_string_to_metric_families

from dlogd import journal

NEW_KEYWORD = "app"  # the keyword the web3 test adds
METRICS_FILE = "/var/lib/prometheus/node-exporter/dlogd.prom"


def dump(host: LabHost, role: str) -> dict[str, Any]:
    """The host's config as dlogd reads it (``check-config --dump``)."""
    path = CLIENT_CONF if role == "client" else SERVER_CONF
    out = host.run(["dlogctl", "check-config", f"--{role}", path, "--dump"]).stdout
    parsed: dict[str, Any] = json.loads(out)
    return parsed


def certificate(host: LabHost) -> dict[str, str]:
    """Serial, SHA-256 fingerprint and subjectAltName of the host's certificate."""
    argv = ["openssl", "x509", "-in", f"{TLS_DIR}/host.crt", "-noout", "-serial",
            "-fingerprint", "-sha256", "-ext", "subjectAltName"]  # fmt: skip
    out = host.run(argv).stdout
    serial = out.split("serial=", 1)[1].split()[0]
    digest = out.split("Fingerprint=", 1)[1].split()[0].replace(":", "").lower()
    return {"serial": serial, "fingerprint": digest, "san": out.rsplit("\n", 2)[-2].strip()}


def all_invocations(fleet: Fleet) -> dict[str, dict[str, str]]:
    ids = {c.name: unit_invocations(c, CLIENT_UNITS) for c in fleet.clients}
    ids[COLLECTOR] = unit_invocations(fleet.collector, SERVER_UNITS)
    return ids


def assert_no_change(run: PlaybookRun) -> None:
    run.check()
    assert set(run.recap) == {"localhost", COLLECTOR, *CLIENTS}, run.recap_text
    assert run.changed() == dict.fromkeys(run.recap, 0), run.output[-8000:]


@contextmanager
def restored(fleet: Fleet, hosts: str) -> Iterator[None]:
    """Roll the lab's own description out again afterwards, to the ``hosts`` the
    test changed only: a full rollout costs minutes here (docs/ansible.md)."""
    try:
        yield
    finally:
        fleet.rollout("--limit", hosts).check()


def test_first_run_built_keys_certificates_and_derived_configs(fleet: Fleet) -> None:
    run = fleet.first_run
    assert all(counts["changed"] > 0 for host, counts in run.recap.items() if host != "localhost")
    owners = {COLLECTOR: "dlogd-recv", **dict.fromkeys(CLIENTS, "dlogd")}
    for name, owner in owners.items():
        host = fleet.lab[name]
        listing = host.run(f"stat -c '%n %a %U %G' {TLS_DIR} {TLS_DIR}/*").stdout.split("\n")
        assert listing[:4] == [
            f"{TLS_DIR} 750 root dlogd",
            f"{TLS_DIR}/ca.crt 644 root root",
            f"{TLS_DIR}/host.crt 644 root root",
            f"{TLS_DIR}/host.key 400 {owner} {owner}",
        ], name
        # The CA key stays on the control node.
        assert not host.run(["sh", "-c", "ls /etc/dlogd/tls /opt/dlogd | grep -i 'ca.key'"],
                            check=False).stdout  # fmt: skip
        assert certificate(host)["san"] == f"DNS:{name}, IP Address:{host.address}"
        launcher = host.read_file("/usr/local/bin/dlogd-ship").decode().splitlines()
        assert launcher[0] == "#!/opt/dlogd/venv/bin/python -IS"
    assert (fleet.inventory_dir / "pki" / "ca.key").stat().st_mode & 0o777 == 0o600

    server = dump(fleet.collector, "server")
    assert server["keywords"][KEYWORD]["dirs"] == {c: fleet.store_dir(c) for c in CLIENTS}
    pins = {c: certificate(fleet.lab[c])["fingerprint"] for c in CLIENTS}
    assert {n: h["fingerprint"] for n, h in server["hosts"].items()} == pins
    for client in fleet.clients:
        config = dump(client, "client")
        assert list(config["keywords"]) == [KEYWORD]
        assert config["hosts"][COLLECTOR]["address"] == fleet.collector.address
        assert (
            config["hosts"][COLLECTOR]["fingerprint"] == certificate(fleet.collector)["fingerprint"]
        )


def test_second_run_changes_nothing(fleet: Fleet) -> None:
    assert_no_change(fleet.rollout())


def test_check_diff_on_the_converged_fleet_reports_no_change(fleet: Fleet) -> None:
    assert_no_change(fleet.rollout("--check", "--diff"))


def test_bad_value_fails_on_the_host_and_keeps_the_running_config(fleet: Fleet) -> None:
    web1 = fleet.lab["web1"]
    before = sha256s(web1, [CLIENT_CONF])
    # limits { window } allows 1-1024: only the host's validate: can say so.
    run = fleet.rollout(
        "--limit", "dlogd_clients", host_vars={"web1": {"dlogd_client_limits": {"window": 5000}}}
    )
    assert run.returncode != 0
    assert run.recap["web1"]["failed"] == 1, run.recap_text
    assert run.recap["web2"]["failed"] == 0, run.recap_text
    assert "window" in run.output and "error:" in run.output, run.output[-4000:]
    assert sha256s(web1, [CLIENT_CONF]) == before
    web1.run(["dlogctl", "check-config", "--client", CLIENT_CONF])


def test_renewed_certificate_is_used_from_the_next_connection_without_restarts(
    fleet: Fleet,
) -> None:
    # No rollout afterwards: the renewed certificate is as good as the first, and
    # the lab's own description renews nothing more (the next no-change runs say so).
    web1, logs1 = fleet.lab["web1"], fleet.collector
    old = certificate(web1)
    units = all_invocations(fleet)
    # A window longer than the validity: the certificate is due for renewal now.
    # Only the renewed host and the collectors that pin it have anything to change.
    run = fleet.rollout(
        "--limit", "dlogd_collectors:web1", host_vars={"web1": {"dlogd_pki_renew_before": "+400d"}}
    ).check()
    new = certificate(web1)
    assert new["serial"] != old["serial"] and new["fingerprint"] != old["fingerprint"]
    assert new["san"] == old["san"]
    assert run.changed()["web1"] > 0, run.output[-6000:]
    # The collector pins the new certificate: a delivery that arrives was made with it.
    assert dump(logs1, "server")["hosts"]["web1"]["fingerprint"] == new["fingerprint"]
    started = time.time()
    path = "/home/alice/after-renewal.log"
    web1.write_file(path, b"renewed\n" * 100, 0o600, owner="alice")
    [answer] = fleet.submit_py(web1, "alice", KEYWORD, path)
    assert answer.startswith(f"OK {KEYWORD}/"), answer
    name = answer.split("/", 1)[1]
    wait_for_files(logs1, fleet.store_dir("web1"), [name], timeout=40)
    stored = records(logs1, journal.RECEIVE_STORED, since=started, file=name)
    assert [r["DLOGD_HOST"] for r in stored] == ["web1"], logs1.journal_text()
    # The collector journals which certificate sent it: the renewed one.
    assert [int(r["DLOGD_PEER_SERIAL"], 16) for r in stored] == [int(new["serial"], 16)]
    assert all_invocations(fleet) == units


def test_client_taken_off_a_keyword_is_refused_by_the_collector(fleet: Fleet) -> None:
    with restored(fleet, "dlogd_collectors"):
        _refused_after_removal(fleet)


def _refused_after_removal(fleet: Fleet) -> None:
    web2, logs1 = fleet.lab["web2"], fleet.collector
    description = fleet.description()
    description["dlogd_submitters"] = [
        {**entry, "hosts": ["web1"]} for entry in description["dlogd_submitters"]
    ]
    # web2 keeps its old client.conf (and a file to send) while the
    # collector is rolled out first, as a rollout in stages does.
    web2.run(["systemctl", "stop", "dlogd-ship.path", "dlogd-ship.timer"])
    try:
        path = "/home/alice/after-removal.log"
        web2.write_file(path, b"late\n" * 100, 0o600, owner="alice")
        [answer] = fleet.submit_py(web2, "alice", KEYWORD, path)
        assert answer.startswith(f"OK {KEYWORD}/"), answer
        name = answer.split("/", 1)[1]
        units = unit_invocations(logs1, SERVER_UNITS)
        run = fleet.rollout("--limit", "dlogd_collectors", fleet_vars=description).check()
        assert run.changed()[COLLECTOR] > 0
        assert dump(logs1, "server")["keywords"][KEYWORD]["dirs"] == {
            "web1": fleet.store_dir("web1")
        }
        started = time.time()
        web2.run(["systemctl", "start", "dlogd-ship.service"], check=False)

        def refused() -> bool:
            found = records(logs1, journal.RECEIVE_REFUSED, since=started, host="web2")
            found += records(logs1, journal.PEER_REFUSED, since=started)
            return bool(found)

        wait_until(refused, 30, "the collector to refuse web2")
        assert name not in " ".join(
            logs1.run(["ls", "-R", "/var/log/remote"], check=False).stdout.split()
        )
        assert unit_invocations(logs1, SERVER_UNITS) == units
    finally:
        web2.run(["systemctl", "start", "dlogd-ship.path", "dlogd-ship.timer"])


def flat(tree: Any, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """A nested config dump as {key path: leaf}, to compare two dumps key by key."""
    if isinstance(tree, dict) and tree:
        return {k: v for key, sub in tree.items() for k, v in flat(sub, (*path, key)).items()}
    return {path: tree}


def test_new_keyword_third_client_and_metrics_file_without_restarts(fleet: Fleet) -> None:
    """One rollout that grows the fleet (a keyword, web3) and gives web1 a metrics file."""
    # web3 is not in the lab's own inventory: it keeps its config, and the
    # collector, rolled out again, no longer lets it in.
    with restored(fleet, "dlogd_collectors:web1"):
        _grown(fleet)


def _grown(fleet: Fleet) -> None:
    web1, web3, logs1 = fleet.lab["web1"], fleet.lab[SPARE_CLIENT], fleet.collector
    description = fleet.description()
    description["dlogd_keywords"] = [
        *description["dlogd_keywords"],
        {"name": NEW_KEYWORD, "collectors": ["dlogd_collectors"]},
    ]
    description["dlogd_submitters"] = [
        *description["dlogd_submitters"],
        {"keyword": NEW_KEYWORD, "hosts": [SPARE_CLIENT], "uids": [fleet.alice_uid]},
    ]
    before = flat(dump(logs1, "server"))
    units = all_invocations(fleet)

    metrics = {"web1": {"dlogd_client_prometheus_file": METRICS_FILE}}
    run = fleet.rollout(
        fleet_vars=description, host_vars=metrics, clients=(*CLIENTS, SPARE_CLIENT)
    ).check()

    assert run.recap[SPARE_CLIENT]["changed"] > 0, run.recap_text
    after = flat(dump(logs1, "server"))
    # The collector gained exactly web3 as a host and its two keywords (audit
    # through dlogd_clients, the new one by name); nothing it had changed.
    assert {k: v for k, v in after.items() if k in before} == before
    gained = {k for k in after if k not in before}
    new_permissions = [("hosts", SPARE_CLIENT), ("keywords", NEW_KEYWORD),
                       ("keywords", KEYWORD, "dirs", SPARE_CLIENT)]  # fmt: skip

    def under(key: tuple[str, ...], prefix: tuple[str, ...]) -> bool:
        return key[: len(prefix)] == prefix

    assert all(any(under(k, p) for p in new_permissions) for k in gained), gained
    assert all(any(under(k, p) for k in gained) for p in new_permissions), gained
    assert all_invocations(fleet) == units, "a rollout that adds a client restarted others"

    path = "/home/alice/from-web3.log"
    web3.write_file(path, b"third client\n" * 500, 0o600, owner="alice")
    [answer] = fleet.submit_py(web3, "alice", NEW_KEYWORD, path)
    assert answer.startswith(f"OK {NEW_KEYWORD}/"), answer
    name = answer.split("/", 1)[1]
    directory = fleet.store_dir(SPARE_CLIENT, NEW_KEYWORD)
    wait_for_files(logs1, directory, [name], timeout=40)
    stored = sha256s(logs1, [f"{directory}/{name}"])[name]
    assert stored == sha256s(web3, [path])["from-web3.log"]

    # The shipper's next run (any run: the timer's) rewrites web1's metrics file.
    def written() -> bool:
        found = web1.run(["test", "-s", METRICS_FILE], check=False)
        return found.returncode == 0

    wait_until(written, 30, f"dlogd-ship to write {METRICS_FILE} on web1")
    families = text_string_to_metric_families(web1.read_file(METRICS_FILE).decode())
    assert "dlogd_status_generated_timestamp_seconds" in {f.name for f in families}
    owner = web1.run(["stat", "-c", "%U", METRICS_FILE]).stdout.strip()
    assert owner == "dlogd", "the shipper, as user dlogd, writes the file"


HOST_PYTHON = "/opt/dlogd/venv/bin/python"  # the venv dlogd_install makes
CREDENTIALS = "/etc/dlogd/archive.credentials"
ARCHIVE_UNITS = ["dlogd-archive.path", "dlogd-archive.timer"]


def test_collector_with_an_archive_gets_the_s3_client_units_and_credentials(fleet: Fleet) -> None:
    """The fleet side of the archive tier: the roles install and switch it on and off.

    The archive itself is the control node's address with nothing listening:
    what an S3 store does is tests/archive's (a real Ceph); here the run that
    cannot reach it must back off and say so, while the collector receives.
    """
    logs1, web1 = fleet.collector, fleet.lab["web1"]
    archive = {"endpoint": f"http://{CONTROL_ADDRESS}:7480", "bucket": "dlogd-lab",
               "retention": "1d", "mode": "governance"}  # fmt: skip
    host_vars = {COLLECTOR: {"dlogd_collector_archive": archive,
                             "dlogd_collector_archive_access_key": "lab-access-key",
                             "dlogd_collector_archive_secret_key": "lab-secret-key"}}  # fmt: skip
    with restored(fleet, "dlogd_collectors"):
        started = time.time()
        fleet.rollout("--limit", "dlogd_collectors", host_vars=host_vars).check()
        assert dump(logs1, "server")["archive"]["bucket"] == "dlogd-lab"
        # The S3 client on the collector that archives, and on no client.
        logs1.run([HOST_PYTHON, "-c", "import boto3"])
        assert web1.run([HOST_PYTHON, "-c", "import boto3"], check=False).returncode != 0
        assert logs1.run(["stat", "-c", "%a %U %G", CREDENTIALS]).stdout.split() == [
            "400", "root", "root"
        ]  # fmt: skip
        assert logs1.run(["systemctl", "is-enabled", *ARCHIVE_UNITS]).stdout.split() == [
            "enabled", "enabled"
        ]  # fmt: skip
        # A file stored now makes the receiver's trigger: dlogd-archive.path starts a
        # run, which finds the store unreachable (a run with nothing stored to
        # archive contacts no store at all).
        path = "/home/alice/to-archive.log"
        web1.write_file(path, b"for the archive\n" * 100, 0o600, owner="alice")
        [answer] = fleet.submit_py(web1, "alice", KEYWORD, path)
        assert answer.startswith(f"OK {KEYWORD}/"), answer
        wait_for_files(logs1, fleet.store_dir("web1"), [answer.split("/", 1)[1]], timeout=40)

        def backed_off() -> bool:
            return bool(records(logs1, journal.ARCHIVE_RETRY, since=started))

        wait_until(backed_off, 30, "an archive run to find the store unreachable")
        [retry, *_] = records(logs1, journal.ARCHIVE_RETRY, since=started)
        assert "unreachable" in retry["MESSAGE"], logs1.journal_text()
        assert "dlogd-archive.service" not in logs1.failed()  # EX_TEMPFAIL is not a failure
    # Rolled out without the archive: switched off, and the credentials gone.
    enabled = logs1.run(["systemctl", "is-enabled", *ARCHIVE_UNITS], check=False).stdout.split()
    assert enabled == ["disabled", "disabled"]
    assert logs1.run(["test", "-e", CREDENTIALS], check=False).returncode != 0
