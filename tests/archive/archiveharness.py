"""One collector with an archive: the real shipper and collector, then ``dlogd-archive``.

Builds on tests/shipharness.py (fleet PKI, the collector as a process, the
real shipper): the collector's config gets an ``archive { }`` block written
with :func:`dlogd.config.to_text`, pointing at the session's radosgw, and
``python -m dlogd.archive`` runs as a process (its peak RSS measured by GNU
time, as the shipper's is). Journal records come back from its stderr.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from dlogd import config, schema, trigger
from dlogd.config import Archive, Host, Limits, ServerConfig, ServerKeyword
from tests.archive import cephlab
from tests.shipharness import (
    GNU_TIME,
    KEYWORD,
    REPO,
    Collector,
    JournalledRun,
    Site,
    Target,
    env,
    start_collector,
)
from tests.tlsfixtures import COLLECTOR, LOOPBACK, SENDER

ARCHIVE_TIMEOUT = 120.0


@dataclass(frozen=True)
class Run(JournalledRun):
    """One ``dlogd-archive`` run."""

    returncode: int
    stderr: str
    maxrss_kib: int


@dataclass
class World:
    """A site (client spool, collector) whose collector archives into ``bucket``."""

    site: Site
    cluster: cephlab.Cluster
    bucket: str
    archive: Archive = field(init=False)
    collector: Collector | None = None

    def __post_init__(self) -> None:
        self.archive = Archive(
            endpoint=self.cluster.endpoint,
            bucket=self.bucket,
            credentials=str(self.write_credentials(0o600)),
            retention_days=1,
            mode="governance",
        )

    @property
    def root(self) -> Path:
        return self.site.root

    @property
    def state(self) -> Path:
        return self.root / "archive-state"

    @property
    def store(self) -> Path:
        return self.site.store_dir()

    @property
    def trigger(self) -> Path:
        """dlogd-archive.path's trigger file, as the units name it (DLOGD_STORED_TRIGGER)."""
        return self.root / "stored-trigger"

    def env(self, **extra: str) -> dict[str, str]:
        return env(self.site.cache, **{trigger.STORED_ENV: str(self.trigger)}, **extra)

    @property
    def server_conf(self) -> Path:
        return self.root / "server.conf"

    def write_credentials(self, mode: int, name: str = "archive.credentials") -> Path:
        path = self.root / name
        path.write_text(
            "[default]\n"
            f"aws_access_key_id = {cephlab.ACCESS_KEY}\n"
            f"aws_secret_access_key = {cephlab.SECRET_KEY}\n"
        )
        path.chmod(mode)
        return path

    def configure(self, **changes: object) -> Path:
        """Write the collector's config with the archive block changed by ``changes``."""
        self.archive = dataclasses.replace(self.archive, **changes)  # type: ignore[arg-type]
        written = ServerConfig(
            keywords={KEYWORD: ServerKeyword(KEYWORD, {SENDER: str(self.store)})},
            hosts={SENDER: Host(SENDER, LOOPBACK)},
            tls=self.site.pki.tls(self.site.pki.fleet.collector),
            limits=Limits(max_file_size=schema.size("2G"), timeout=5),
            archive=self.archive,
        )
        self.server_conf.write_text(config.to_text(written))
        return self.server_conf

    def start_collector(self) -> Collector:
        self.configure()
        self.collector = start_collector(
            self.server_conf, self.root, extra_env={trigger.STORED_ENV: str(self.trigger)}
        )
        self.site.running.append(self.collector)
        return self.collector

    def deliver(self, *paths: Path) -> list[str]:
        """Spool ``paths`` on the client and ship them to the collector; the stored names."""
        assert self.collector is not None
        self.site.client_config([Target(COLLECTOR, self.collector.port)])
        names = self.site.add(*paths)
        shipped = self.site.ship()
        assert shipped.returncode == 0, shipped.stderr
        return names

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "dlogd.archive",
            "--config",
            str(self.server_conf),
            "--state",
            str(self.state),
        ]

    def run(self, timeout: float = ARCHIVE_TIMEOUT, **extra_env: str) -> Run:
        fd, name = tempfile.mkstemp(prefix="dlogd-archive-maxrss-")
        os.close(fd)
        peak = Path(name)
        try:
            done = subprocess.run(
                [GNU_TIME, "-q", "-f", "%M", "-o", str(peak), *self.command()],
                capture_output=True,
                text=True,
                env=self.env(**extra_env),
                cwd=REPO,
                timeout=timeout,
            )
            maxrss = int(peak.read_text().split()[-1] or 0)
        finally:
            peak.unlink()
        return Run(done.returncode, done.stderr, maxrss)

    def start(self) -> subprocess.Popen[str]:
        """The archiver in the background (to be killed mid-upload)."""
        return subprocess.Popen(
            self.command(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env(),
            cwd=REPO,
            start_new_session=True,
        )

    def clear_backoff(self) -> None:
        """What waiting out the backoff does, without the wait."""
        (self.state / ".retry" / "archive.json").unlink()


def kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
