"""The archive tier's S3 I/O: boto3 calls against one bucket, and nothing that decides.

Place in the flow: ``dlogd.archive`` (what to upload, what is verified, when
a local copy may go) and ``dlogd.verify`` call :class:`Bucket`; this module
only speaks S3. boto3 is an optional extra (``pip install dlogd[archive]``):
it is imported here and only here, when an archive is used.

RGW 16.2 specifics handled here (../shared/CEPH.md):
- ``Content-MD5`` on every PutObject and UploadPart: the integrity check the
  server enforces (``BadDigest``); ``x-amz-checksum-*`` is silently ignored
  there, so it is never relied on, and boto3's default flexible checksums are
  turned off (over https they make RGW answer 411);
- CompleteMultipartUpload answers an empty ETag: the ETag and version of the
  result are read back with HeadObject;
- lock headers on CreateMultipartUpload are ignored: retention is always set
  with PutObjectRetention on the version, and read back.
"""

from __future__ import annotations

import base64
import configparser
import datetime
import os
import stat
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dlogd.config import Archive

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

SHA256_META = "sha256"  # x-amz-meta-sha256: the file's SHA-256, lowercase hex
MAX_CREDENTIALS = 64 * 1024
PART_THREADS = 4  # parts of one multipart upload in flight at once (put_parts)
CREDENTIAL_NAME = "archive"  # LoadCredential=archive:... in dlogd-archive.service


class ArchiveDown(Exception):
    """The store cannot be reached or answers with a server error: try again later."""


class ArchiveRefused(Exception):
    """The store refused a request for good (access denied, no such bucket...)."""


class CredentialsRefused(Exception):
    """The credentials file is not one only the archiving user can read, or is malformed."""


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str


@dataclass(frozen=True)
class ObjectInfo:
    """One object version as HeadObject and GetObjectRetention describe it."""

    key: str
    version_id: str
    size: int
    etag: str  # without quotes
    sha256: str | None  # the x-amz-meta-sha256 it was stored with
    last_modified: float
    retain_mode: str | None = None  # "GOVERNANCE" / "COMPLIANCE", None: no retention
    retain_until: float | None = None


def credentials_path(configured: str) -> str:
    """systemd's copy (``LoadCredential=``, readable by the service alone) when there is one."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if directory:
        candidate = os.path.join(directory, CREDENTIAL_NAME)
        if os.path.lexists(candidate):
            return candidate
    return configured


def read_credentials(path: str) -> Credentials:
    """An AWS-style credentials file (``[default]`` with ``aws_access_key_id`` and
    ``aws_secret_access_key``) that nobody but its owner (us, or root) can read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise CredentialsRefused(f"{path}: cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CredentialsRefused(f"{path}: not a regular file")
        if st.st_uid not in (0, os.geteuid()):
            raise CredentialsRefused(
                f"{path}: refused: owned by uid {st.st_uid}, not root or the archiving user"
            )
        if st.st_mode & 0o077:
            raise CredentialsRefused(
                f"{path}: refused: readable or writable by others than its owner "
                f"(mode {stat.S_IMODE(st.st_mode):04o}; make it 0400 or 0600)"
            )
        data = os.read(fd, MAX_CREDENTIALS + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_CREDENTIALS:
        raise CredentialsRefused(f"{path}: larger than {MAX_CREDENTIALS} bytes")
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(data.decode(), source=path)
        section = parser["default"]
        found = Credentials(section["aws_access_key_id"], section["aws_secret_access_key"])
    except (configparser.Error, UnicodeError, KeyError):
        # Never echo the file: it holds a secret.
        raise CredentialsRefused(
            f"{path}: expected a [default] section with aws_access_key_id and aws_secret_access_key"
        ) from None
    if not found.access_key or not found.secret_key:
        raise CredentialsRefused(f"{path}: empty key")
    return found


def content_md5(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def _epoch(moment: datetime.datetime) -> float:
    return moment.timestamp()


class Bucket:
    """The archive bucket of one ``archive { }`` block."""

    def __init__(
        self,
        archive: Archive,
        credentials: Credentials,
        *,
        timeout: float = 60,
        connections: int = 10,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.name = archive.bucket
        self.client: S3Client = boto3.client(
            "s3",
            endpoint_url=archive.endpoint,
            region_name=archive.region,
            aws_access_key_id=credentials.access_key,
            aws_secret_access_key=credentials.secret_key,
            config=Config(
                s3={"addressing_style": "path", "payload_signing_enabled": True},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                connect_timeout=timeout,
                read_timeout=timeout,
                # One per request in flight, or urllib3 drops the extra ones after use.
                max_pool_connections=connections,
                # Our own backoff on disk decides when to try again, not a retry loop here.
                retries={"max_attempts": 2, "mode": "standard"},
            ),
        )

    def _call(self, what: str, fn: Callable[[], Any], absent: tuple[str, ...] = ()) -> Any:
        """``fn()``, its failures as :class:`ArchiveDown` or :class:`ArchiveRefused`;
        None when the error code is one of ``absent`` (the thing asked for is not there)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn()
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "?"))
            if code in absent:
                return None
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            message = f"{what}: {code} (HTTP {status}) {error.get('Message') or ''}".strip()
            if status >= 500 or status in (408, 429) or code == "SlowDown":
                raise ArchiveDown(message) from None
            raise ArchiveRefused(message) from None
        except BotoCoreError as exc:
            raise ArchiveDown(f"{what}: {exc}") from None

    def head(self, key: str, version_id: str | None = None) -> ObjectInfo | None:
        """The current version of ``key`` (or that version), with its retention; None if absent."""
        args: dict[str, Any] = {"Bucket": self.name, "Key": key}
        if version_id:
            args["VersionId"] = version_id
        # 405: the current version is a delete marker.
        answer = self._call(
            f"HEAD {key}",
            lambda: self.client.head_object(**args),
            absent=("404", "NoSuchKey", "NoSuchVersion", "NotFound", "405"),
        )
        if answer is None:
            return None
        version = answer.get("VersionId") or ""
        # RGW answers HEAD with the version's lock (as S3 does for a caller allowed
        # to read it): a GetObjectRetention more, 50 ms a file here, only without.
        if "ObjectLockRetainUntilDate" in answer:
            mode = answer.get("ObjectLockMode")
            until: float | None = _epoch(answer["ObjectLockRetainUntilDate"])
        else:
            mode, until = self.retention(key, version)
        return ObjectInfo(
            key=key,
            version_id=version,
            size=int(answer["ContentLength"]),
            etag=answer.get("ETag", "").strip('"'),
            sha256=answer.get("Metadata", {}).get(SHA256_META),
            last_modified=_epoch(answer["LastModified"]),
            retain_mode=mode,
            retain_until=until,
        )

    def retention(self, key: str, version_id: str) -> tuple[str | None, float | None]:
        answer = self._call(
            f"GetObjectRetention {key}",
            lambda: self.client.get_object_retention(
                Bucket=self.name, Key=key, VersionId=version_id
            ),
            absent=("ObjectLockConfigurationNotFoundError", "NoSuchObjectLockConfiguration", "404"),
        )
        retention = answer.get("Retention", {}) if answer else {}
        until = retention.get("RetainUntilDate")
        return retention.get("Mode"), (_epoch(until) if until else None)

    def put(
        self, key: str, data: bytes, md5: bytes, sha256_hex: str, lock: tuple[str, float]
    ) -> None:
        """PutObject, locked from its first moment (``lock``: mode and retain-until):
        RGW honours the lock headers on a single PUT (not on multipart uploads)."""
        mode, until = lock
        self._call(
            f"PUT {key}",
            lambda: self.client.put_object(
                Bucket=self.name,
                Key=key,
                Body=data,
                ContentMD5=content_md5(md5),
                Metadata={SHA256_META: sha256_hex},
                ObjectLockMode="COMPLIANCE" if mode == "compliance" else "GOVERNANCE",
                ObjectLockRetainUntilDate=datetime.datetime.fromtimestamp(until, datetime.UTC),
            ),
        )

    def put_parts(
        self,
        key: str,
        parts: Callable[[int], tuple[bytes, bytes]],
        count: int,
        sha256_hex: str,
        buffers: threading.Semaphore,
    ) -> None:
        """A multipart upload of ``count`` parts; ``parts(n)`` gives part n's bytes and MD5.

        Parts go up at once, as many as ``buffers`` (shared by every upload of the
        run) allows: each holds one while its bytes are in memory, so a run never
        holds more part buffers than the semaphore's count, and one big file can
        use all of them. An upload that fails is aborted; one left by a killed run
        is aborted by :meth:`abort_uploads` before the next attempt.
        """
        created = self._call(
            f"CreateMultipartUpload {key}",
            lambda: self.client.create_multipart_upload(
                Bucket=self.name, Key=key, Metadata={SHA256_META: sha256_hex}
            ),
        )
        upload_id = created["UploadId"]

        def upload(number: int) -> dict[str, Any]:
            with buffers:
                data, md5 = parts(number)
                answer = self._call(
                    f"UploadPart {key} #{number}",
                    lambda: self.client.upload_part(
                        Bucket=self.name,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=data,
                        ContentMD5=content_md5(md5),
                    ),
                )
            return {"PartNumber": number, "ETag": answer["ETag"]}

        try:
            with ThreadPoolExecutor(PART_THREADS, thread_name_prefix="part") as pool:
                # At most PART_THREADS parts wait at once: the window moves as they end.
                pending: deque[Future[dict[str, Any]]] = deque()
                done = []
                for number in range(1, count + 1):
                    if len(pending) >= PART_THREADS:
                        done.append(pending.popleft().result())
                    pending.append(pool.submit(upload, number))
                done.extend(future.result() for future in pending)
            self._call(
                f"CompleteMultipartUpload {key}",
                lambda: self.client.complete_multipart_upload(
                    Bucket=self.name,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": done},  # type: ignore[typeddict-item]
                ),
            )
        except BaseException:
            from contextlib import suppress

            with suppress(Exception):
                self.client.abort_multipart_upload(Bucket=self.name, Key=key, UploadId=upload_id)
            raise

    def abort_uploads(self, key: str) -> int:
        """Abort unfinished multipart uploads of exactly ``key`` (a killed run's)."""
        listed = self._call(
            f"ListMultipartUploads {key}",
            lambda: self.client.list_multipart_uploads(Bucket=self.name, Prefix=key),
        )
        aborted = 0
        for upload in listed.get("Uploads", []):
            if upload.get("Key") == key:
                self._call(
                    f"AbortMultipartUpload {key}",
                    lambda upload=upload: self.client.abort_multipart_upload(  # type: ignore[misc]
                        Bucket=self.name, Key=key, UploadId=upload["UploadId"]
                    ),
                )
                aborted += 1
        return aborted

    def lock(self, key: str, version_id: str, mode: str, until: float) -> None:
        when = datetime.datetime.fromtimestamp(until, datetime.UTC)
        self._call(
            f"PutObjectRetention {key}",
            lambda: self.client.put_object_retention(
                Bucket=self.name,
                Key=key,
                VersionId=version_id,
                Retention={
                    "Mode": "COMPLIANCE" if mode == "compliance" else "GOVERNANCE",
                    "RetainUntilDate": when,
                },
            ),
        )

    def delete_unlocked(self, key: str, version_id: str) -> None:
        """Remove a version we just wrote that turned out wrong (before it was locked)."""
        self._call(
            f"DELETE {key}",
            lambda: self.client.delete_object(Bucket=self.name, Key=key, VersionId=version_id),
        )
