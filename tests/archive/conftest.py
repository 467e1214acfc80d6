"""Fixtures for the archive tier: one real single-node Ceph per test session.

Place in the flow: tests under tests/archive archive what the real collector
stored into a real radosgw (tests/archive/cephlab.py), never a mock. The
cluster starts once per session (about 15 s), the first time a test asks for
``ceph``; each test gets a bucket of its own, created with Object Lock, so
tests cannot see each other's objects. Every test here is marked ``archive``
and ``slow`` (the config checks beside them, which need no cluster, are not). Needs root and the Debian Ceph packages (scripts/setup.sh).
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.archive import cephlab
from tests.archive.archiveharness import World
from tests.shipharness import Site, pki_set, site

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


__all__ = ["pki_set", "site"]  # fixtures, re-exported for pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test here that needs the cluster is ``archive`` and ``slow``; the config
    and credentials checks beside them need no cluster and stay in the fast set."""
    here = Path(__file__).parent
    for item in items:
        uses = getattr(item, "fixturenames", ())
        if here in Path(item.path).parents and "ceph" in uses:
            item.add_marker(pytest.mark.archive)
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def ceph() -> Iterator[cephlab.Cluster]:
    try:
        with cephlab.running(Path(tempfile.gettempdir())) as cluster:
            yield cluster
    except cephlab.CephError as exc:
        pytest.fail(f"the test Ceph cluster did not come up: {exc}")


def s3_client(cluster: cephlab.Cluster) -> S3Client:
    """A boto3 client as CEPH.md says RGW 16.2 needs it (path style, checksums when required)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=cluster.endpoint,
        region_name=cephlab.REGION,
        aws_access_key_id=cephlab.ACCESS_KEY,
        aws_secret_access_key=cephlab.SECRET_KEY,
        config=Config(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"max_attempts": 1},
        ),
    )


@pytest.fixture
def s3(ceph: cephlab.Cluster) -> S3Client:
    return s3_client(ceph)


@pytest.fixture
def bucket(s3: S3Client) -> str:
    """A fresh bucket with Object Lock enabled (RGW switches versioning on with it)."""
    name = f"dlogd-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    return name


@pytest.fixture
def world(site: Site, ceph: cephlab.Cluster, bucket: str) -> Iterator[World]:
    """One test's collector, archiving into its own bucket."""
    archived = World(site, ceph, bucket)
    archived.start_collector()
    yield archived
    if not ceph.rgw_answers():  # a test that stopped radosgw and failed before restarting it
        ceph.start_rgw()
