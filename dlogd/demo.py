"""``dlogctl demo``: the whole flow on this machine, no systemd needed.

Makes a throwaway fleet CA and certificates, writes a client and a collector
config, starts the collector on loopback and the submit service on a Unix
socket in a temporary directory (both as the real entry points, in their
development modes), submits a file with :func:`dlogd.client.submit`, runs one
drain with ``dlogd-ship``, and shows the file arriving, byte-identical.
Everything lives under one directory, removed at the end unless ``--keep``.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dlogd import client, config, pki
from dlogd.config import (
    ClientConfig,
    ClientKeyword,
    Host,
    Retry,
    ServerConfig,
    ServerKeyword,
)

KEYWORD = "audit"


def _write_configs(root: Path, port: int) -> tuple[Path, Path]:
    """This machine as the client "web1" and the collector "logs1", in config text
    written by :func:`dlogd.config.to_text` (the same text an operator would write)."""
    ca = pki.make_ca(root / "pki", "dlogd demo CA")
    certs = {
        host: pki.make_host_cert(ca, host, root / "pki", ip_addresses=["127.0.0.1"])
        for host in ("logs1", "web1")
    }
    collector = Host("logs1", "127.0.0.1", port, pki.fingerprint(certs["logs1"].certificate))
    client_conf = root / "client.conf"
    client_conf.write_text(
        config.to_text(
            ClientConfig(
                keywords={
                    KEYWORD: ClientKeyword(
                        KEYWORD, frozenset({os.getuid()}), frozenset(), ("logs1",)
                    )
                },
                hosts={"logs1": collector},
                spool=str(root / "spool"),
                tls=pki.tls_files(ca, certs["web1"]),
                retry=Retry(1, 5),
            )
        )
    )
    server_conf = root / "server.conf"
    server_conf.write_text(
        config.to_text(
            ServerConfig(
                keywords={
                    KEYWORD: ServerKeyword(
                        KEYWORD, {"web1": str(root / "remote" / "web1" / KEYWORD)}
                    )
                },
                hosts={"web1": Host("web1", "127.0.0.1")},
                tls=pki.tls_files(ca, certs["logs1"]),
            )
        )
    )
    return client_conf, server_conf


@contextmanager
def _service(args: list[str], log: Path, ready: Callable[[], bool]) -> Iterator[None]:
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", *args], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{args[0]} did not start; see {log}:\n{log.read_text()}")
            time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run(keep: bool = False, say: Callable[[str], None] = print) -> int:
    root = Path(tempfile.mkdtemp(prefix="dlogd-demo-"))
    os.environ["DLOGD_CACHE_DIR"] = str(root / "cache")
    try:
        port = _free_port()
        client_conf, server_conf = _write_configs(root, port)
        say(f"1. throwaway CA and certificates for web1 and logs1 in {root}/pki")
        sample = root / "app" / "audit.log"
        sample.parent.mkdir()
        sample.write_bytes(b"".join(b"%d login uid=1000 ok\n" % i for i in range(10_000)))
        collector_log, submit_log = root / "collector.log", root / "submit.log"
        with (
            _service(
                ["dlogd.receive", "--config", str(server_conf), "--listen", f"127.0.0.1:{port}"],
                collector_log,
                lambda: b"listening" in collector_log.read_bytes(),
            ),
            _service(
                [
                    "dlogd.submit_service",
                    "--config",
                    str(client_conf),
                    "--listen",
                    str(root / "submit.sock"),
                ],
                submit_log,
                lambda: (root / "submit.sock").exists(),
            ),
        ):
            say(f"2. collector on 127.0.0.1:{port}, submit service on {root}/submit.sock")
            done = client.submit(sample, KEYWORD, socket_path=str(root / "submit.sock"))
            say(
                f"3. dlogd.submit({sample}, {KEYWORD!r}) -> spooled as {done.entry}, {done.size} bytes"
            )
            ship = subprocess.run(
                [sys.executable, "-m", "dlogd.ship", "--config", str(client_conf)],
                capture_output=True,
                text=True,
                check=False,
            )
            say(f"4. dlogd-ship exited {ship.returncode}: {ship.stderr.strip().splitlines()[-1]}")
        arrived = root / "remote" / "web1" / KEYWORD / done.entry.split("/", 1)[1]
        if not arrived.exists() or not filecmp.cmp(sample, arrived, shallow=False):
            say(f"FAILED: {arrived} missing or different; logs in {root}")
            keep = True
            return 1
        say(f"5. arrived, byte-identical: {arrived}")
        say("   collector's record: " + collector_log.read_text().strip().splitlines()[-1])
        left = [p.name for p in (root / "spool" / KEYWORD).iterdir() if not p.name.startswith(".")]
        say(f"6. spool entries left on the client: {left or 'none'}")
        return 0
    finally:
        if keep:
            say(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
