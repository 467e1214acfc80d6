"""What dlogd-archive relies on from the store, checked against the real radosgw.

If a Ceph upgrade changes one of these, the archiver's guarantees change with
it: a wrong Content-MD5 must be refused (the integrity check the server
enforces), Object Lock must hold a version against delete, and the bucket the
fixture made must have Object Lock (and with it versioning) on.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
from typing import TYPE_CHECKING

import pytest
from botocore.exceptions import ClientError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


def test_bucket_has_object_lock_and_versioning(s3: S3Client, bucket: str) -> None:
    lock = s3.get_object_lock_configuration(Bucket=bucket)
    assert lock["ObjectLockConfiguration"]["ObjectLockEnabled"] == "Enabled"
    assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"


def test_wrong_content_md5_is_refused(s3: S3Client, bucket: str) -> None:
    wrong = base64.b64encode(hashlib.md5(b"other").digest()).decode()
    with pytest.raises(ClientError) as refused:
        s3.put_object(Bucket=bucket, Key="k", Body=b"data", ContentMD5=wrong)
    assert refused.value.response["Error"]["Code"] == "BadDigest"
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket)


def test_locked_version_cannot_be_deleted(s3: S3Client, bucket: str) -> None:
    until = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)
    put = s3.put_object(
        Bucket=bucket,
        Key="k",
        Body=b"data",
        ObjectLockMode="GOVERNANCE",
        ObjectLockRetainUntilDate=until,
    )
    with pytest.raises(ClientError) as refused:
        s3.delete_object(Bucket=bucket, Key="k", VersionId=put["VersionId"])
    assert refused.value.response["Error"]["Code"] == "AccessDenied"
    assert (
        s3.get_object(Bucket=bucket, Key="k", VersionId=put["VersionId"])["Body"].read() == b"data"
    )
