"""Archive benchmark: dlogd-archive against rclone and s3cmd, into one real radosgw.

Place in the flow: the collector's third hop (issue 11), stored files ->
``dlogd-archive`` -> Ceph's S3 gateway. In one run, on the same files, into
the same single-node Ceph (``tests/archive/cephlab.py``: one monitor, one
memstore OSD, one radosgw on loopback; or ``--endpoint`` for one already
running), alternating the tools (A B C A B C), medians:

- dlogd: ``python -m dlogd.archive`` over a collector store holding the files
  (every upload with Content-MD5 and the SHA-256 in its metadata, Object
  Lock retention checked on each result, a record per file), into a bucket
  with Object Lock;
- ``rclone copy`` (4 transfers, its default) and ``s3cmd put --recursive``
  into a plain bucket: what an administrator would script instead, with
  neither retention nor a record of what was sent.

Cases: one big file (1 GiB by default: multipart) and many small ones
(10,000 x 4 KiB by default). Each run uploads into a bucket of its own, which
is emptied and removed after it (the OSD keeps everything in memory).

A script, not a test: it asserts nothing about time, but it checks that every
object arrived with the right size. Run as root from the repository root:

    .venv/bin/python bench/bench_archive.py [--big-mib 1024] [--small-count 10000] [--repeat 3] [--markdown OUT.md]

Needs the Ceph packages (scripts/setup.sh), ``rclone`` and ``s3cmd``
(``apt-get install rclone s3cmd``). Data under /tmp/dlogd-bench/archive.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import BENCH_ROOT, PYTHON, preamble, publish

from dlogd import config
from dlogd.config import Archive, Host, ServerConfig, ServerKeyword
from tests.archive import cephlab

KEYWORD = "bench"
HOST = "web1"
SMALL_SIZE = 4096
STAMP = 1_700_000_000  # the stored names' submit time


@dataclass
class Bench:
    root: Path
    endpoint: str
    big: Path  # a store directory holding the one big file
    small: Path  # a store directory holding the small files
    big_size: int
    small_count: int
    # The memstore OSD frees a deleted object's data only when the gateway's
    # garbage collection runs (hours later by default): with our own cluster,
    # each bucket's is run at once, untimed, or the OSD fills after a few GiB.
    collect: Callable[[], None] | None = None

    @property
    def credentials(self) -> Path:
        return self.root / "archive.credentials"


def prepare(root: Path, endpoint: str, big_size: int, small_count: int) -> Bench:
    shutil.rmtree(root, ignore_errors=True)
    bench = Bench(root, endpoint, root / "store-big", root / "store-small", big_size, small_count)
    bench.big.mkdir(parents=True)
    bench.small.mkdir()
    # Named as the collector stores them: <submit time>.<name>.
    with (bench.big / f"{STAMP}.big.log").open("wb") as out:
        for _ in range(big_size >> 20):
            out.write(os.urandom(1 << 20))
    payload = os.urandom(SMALL_SIZE)
    for i in range(small_count):
        (bench.small / f"{STAMP}.app-{i:05d}.log").write_bytes(i.to_bytes(8, "big") + payload[8:])
    bench.credentials.write_text(
        "[default]\n"
        f"aws_access_key_id = {cephlab.ACCESS_KEY}\n"
        f"aws_secret_access_key = {cephlab.SECRET_KEY}\n"
    )
    bench.credentials.chmod(0o600)
    os.sync()
    return bench


def s3(bench: Bench) -> Any:  # boto3's client type lives in the stubs only
    import boto3

    return boto3.client("s3", endpoint_url=bench.endpoint, region_name=cephlab.REGION,
                        aws_access_key_id=cephlab.ACCESS_KEY,
                        aws_secret_access_key=cephlab.SECRET_KEY)  # fmt: skip


@contextlib.contextmanager
def fresh_bucket(bench: Bench, *, locked: bool) -> Iterator[str]:
    """A bucket for one run; emptied (locks bypassed: governance mode) and removed after."""
    client = s3(bench)
    name = f"bench-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name, ObjectLockEnabledForBucket=locked)
    # This radosgw answers the first HEAD and the first CreateMultipartUpload on a
    # new bucket after 2 s each (a fresh bucket per run is the bench's, not a
    # collector's, whose bucket lives on): warmed alike for every tool, untimed.
    with contextlib.suppress(Exception):
        client.head_object(Bucket=name, Key="warm-up")
    upload = client.create_multipart_upload(Bucket=name, Key="warm-up")
    client.abort_multipart_upload(Bucket=name, Key="warm-up", UploadId=upload["UploadId"])
    try:
        yield name
    finally:
        # A page is at most 1,000 versions: one DeleteObjects request each (one
        # request per object made emptying 10,000 files take minutes).
        pages = client.get_paginator("list_object_versions").paginate(Bucket=name)
        for page in pages:
            versions = [*page.get("Versions", []), *page.get("DeleteMarkers", [])]
            if versions:
                client.delete_objects(
                    Bucket=name,
                    Delete={"Objects": [{"Key": v["Key"], "VersionId": v["VersionId"]}
                                        for v in versions], "Quiet": True},
                    BypassGovernanceRetention=True)  # fmt: skip
        # NoSuchBucket: botocore's retry of a DeleteBucket answered too late.
        with contextlib.suppress(client.exceptions.NoSuchBucket):
            client.delete_bucket(Bucket=name)
        if bench.collect is not None:
            bench.collect()


def check_uploaded(bench: Bench, bucket: str, directory: Path) -> None:
    want = {p.name: p.stat().st_size for p in directory.iterdir()}
    got: dict[str, int] = {}
    for page in s3(bench).get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            got[item["Key"].rsplit("/", 1)[-1]] = item["Size"]
    if got != want:
        missing = sorted(set(want) - set(got))[:5]
        raise RuntimeError(f"{bucket}: {len(got)} objects for {len(want)} files; missing {missing}")


# -- the contenders -----------------------------------------------------------------


def dlogd(bench: Bench, directory: Path, bucket: str) -> None:
    archive = Archive(
        endpoint=bench.endpoint,
        bucket=bucket,
        credentials=str(bench.credentials),
        retention_days=1,
        mode="governance",
    )
    written = ServerConfig(
        keywords={KEYWORD: ServerKeyword(KEYWORD, {HOST: str(directory)})},
        hosts={HOST: Host(HOST, "127.0.0.1")},
        archive=archive,
    )
    conf = bench.root / "server.conf"
    conf.write_text(config.to_text(written))
    state = bench.root / "archive-state"
    shutil.rmtree(state, ignore_errors=True)
    env = {**os.environ, "DLOGD_CACHE_DIR": str(bench.root / "cache")}
    argv = [PYTHON, "-m", "dlogd.archive", "--config", str(conf), "--state", str(state)]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"dlogd-archive exited {done.returncode}: {done.stderr[-2000:]}")


def rclone(bench: Bench, directory: Path, bucket: str) -> None:
    conf = bench.root / "rclone.conf"
    conf.write_text(
        "[ceph]\ntype = s3\nprovider = Ceph\n"
        f"access_key_id = {cephlab.ACCESS_KEY}\nsecret_access_key = {cephlab.SECRET_KEY}\n"
        f"endpoint = {bench.endpoint}\nregion = {cephlab.REGION}\n"
    )
    tool(["rclone", "--config", str(conf), "copy", str(directory), f"ceph:{bucket}"])


def s3cmd(bench: Bench, directory: Path, bucket: str) -> None:
    host = bench.endpoint.removeprefix("http://")
    conf = bench.root / "s3cfg"
    conf.write_text(
        f"[default]\naccess_key = {cephlab.ACCESS_KEY}\nsecret_key = {cephlab.SECRET_KEY}\n"
        f"host_base = {host}\nhost_bucket = {host}\nuse_https = False\n"
        f"bucket_location = {cephlab.REGION}\n"
    )
    tool(["s3cmd", "-c", str(conf), "--no-progress", "put", "--recursive", f"{directory}/",
          f"s3://{bucket}/"])  # fmt: skip


def tool(argv: list[str]) -> None:
    # Plain http on loopback: a CA bundle from the environment only trips rclone's
    # AWS SDK ("unsupported transport").
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {done.returncode}: {done.stderr[-2000:]}")


Upload = Callable[[Bench, Path, str], None]
CONTENDERS: dict[str, Upload] = {"dlogd-archive": dlogd, "rclone": rclone, "s3cmd": s3cmd}


def run_all(bench: Bench, repeat: int) -> dict[tuple[str, str], list[float]]:
    runs: dict[tuple[str, str], list[float]] = {}
    for i in range(repeat):
        for case, directory in (("big", bench.big), ("small", bench.small)):
            for name, upload in CONTENDERS.items():
                with fresh_bucket(bench, locked=name == "dlogd-archive") as bucket:
                    started = time.perf_counter()
                    upload(bench, directory, bucket)
                    seconds = time.perf_counter() - started
                    check_uploaded(bench, bucket, directory)
                runs.setdefault((name, case), []).append(seconds)
                print(f"[{i + 1}/{repeat}] {case:5} {name:13} {seconds:7.2f}s",
                      file=sys.stderr, flush=True)  # fmt: skip
    return runs


def report(bench: Bench, runs: dict[tuple[str, str], list[float]], repeat: int) -> str:
    lines = preamble("Archive: stored files -> radosgw (issue 11)", "bench_archive.py",
                     "store: single-node Ceph 16.2 (one memstore OSD, radosgw on loopback)",
                     f"medians of {repeat} runs, tools alternating")  # fmt: skip
    titles = {"big": f"one {bench.big_size >> 20} MiB file",
              "small": f"{bench.small_count:,} x {SMALL_SIZE // 1024} KiB"}  # fmt: skip
    for case, title in titles.items():
        median = {n: statistics.median(s) for (n, c), s in runs.items() if c == case}
        if not median:
            continue
        total = bench.big_size if case == "big" else bench.small_count * SMALL_SIZE
        lines += [f"### {title}", "", "| tool | seconds | rate | dlogd ÷ tool (rate) |",
                  "|---|---:|---:|---:|"]  # fmt: skip
        for name, seconds in median.items():
            rate = f"{total / seconds / 1e6:,.0f} MB/s"
            if case == "small":
                rate += f", {bench.small_count / seconds:,.0f} files/s"
            lines.append(f"| {name} | {seconds:.2f} | {rate} | "
                         f"{seconds / median['dlogd-archive']:.2f} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--big-mib", type=int, default=1024)
    parser.add_argument("--small-count", type=int, default=10_000)
    parser.add_argument("--endpoint", help="a radosgw already running with cephlab's S3 user")
    parser.add_argument("--root", type=Path, default=BENCH_ROOT / "archive")
    parser.add_argument("--markdown", help="also write the report to this file")
    args = parser.parse_args(argv)
    for tool in ("rclone", "s3cmd"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install rclone s3cmd")
    with contextlib.ExitStack() as stack:
        endpoint, collect = args.endpoint, None
        if endpoint is None:
            cluster = stack.enter_context(cephlab.running(args.root.parent))
            endpoint = cluster.endpoint

            def collect() -> None:
                cluster.run("radosgw-admin", "gc", "process", "--include-all", timeout=600)

        bench = prepare(args.root, endpoint, args.big_mib << 20, args.small_count)
        bench.collect = collect
        stack.callback(shutil.rmtree, args.root, ignore_errors=True)
        text = report(bench, run_all(bench, args.repeat), args.repeat)
    return publish(text, args.markdown)


if __name__ == "__main__":
    sys.exit(main())
