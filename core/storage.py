"""Where finished images go: an S3-compatible bucket, or a folder on local disk.

Torch-free, so the API imports it too: workers `put` images, the API hands out `url`s to them and
calls `check` from /readyz.

Configuration (core/settings.py reads it; `storage_from_settings` builds the storage):

- `DALLE_FARM_S3_BUCKET`: bucket name (default "dalle-farm" when S3 is in use).
- `DALLE_FARM_S3_ENDPOINT_URL`: endpoint of an S3-compatible store, e.g. "http://minio:9000" or
  "https://<account>.r2.cloudflarestorage.com"; unset means AWS S3 itself.
- `DALLE_FARM_S3_PUBLIC_URL`: the endpoint that clients reach, when it differs from the farm's
  own (default: the same); presigned URLs are signed for it.
- `DALLE_FARM_URL_EXPIRY_S`: lifetime of presigned image URLs in seconds, 1 to 3600 (default 3600).
- `DALLE_FARM_DATA_DIR`: used only when both S3 variables above are unset; images are then stored
  under `<DALLE_FARM_DATA_DIR>/files` (default "./dalle-farm-data") and served by the API.
- `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`: credentials and region for
  S3, read by boto3 in the usual way.

Errors:

    StorageError
    ├── ObjectNotFound       no object under that key
    └── StorageUnavailable   the store cannot be reached, or refuses the request
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import quote

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from core.settings import Settings

MAX_URL_EXPIRY_S = 3600
DEFAULT_BUCKET = "dalle-farm"


class StorageError(Exception):
    """Base class for every storage failure."""


class ObjectNotFound(StorageError):
    """No object is stored under the requested key."""


class StorageUnavailable(StorageError):
    """The store could not be reached or refused the request; retrying later may succeed."""


class Storage(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store `data` under `key`, replacing any earlier object."""
        ...

    def get(self, key: str) -> bytes:
        """Return the object under `key`; raise ObjectNotFound if there is none."""
        ...

    def exists(self, key: str) -> bool:
        """Whether an object is stored under `key`."""
        ...

    def url(self, key: str) -> str:
        """A URL a client can fetch the object from."""
        ...

    def check(self) -> None:
        """Raise StorageUnavailable, saying why, unless the store is usable."""
        ...

    def ensure_bucket(self) -> None:
        """Create the bucket (or folder) if it is missing."""
        ...


class S3Storage:
    """Objects in a bucket of AWS S3 or an S3-compatible store (MinIO, Cloudflare R2)."""

    def __init__(
        self,
        bucket: str,
        endpoint_url: str | None = None,
        region: str | None = None,
        url_expiry_s: int = MAX_URL_EXPIRY_S,
        max_attempts: int = 5,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 30.0,
        client: S3Client | None = None,
        public_endpoint_url: str | None = None,
    ) -> None:
        if not 0 < url_expiry_s <= MAX_URL_EXPIRY_S:
            raise ValueError(
                f"url_expiry_s must be between 1 and {MAX_URL_EXPIRY_S} seconds, got {url_expiry_s}"
            )
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        self.bucket = bucket
        self.url_expiry_s = url_expiry_s
        config = Config(
            signature_version="s3v4",
            # MinIO and R2 serve buckets by path, not by virtual host.
            s3={"addressing_style": "path"},
            # botocore's "max_attempts" counts retries only; "total_max_attempts" includes the
            # first try, which is what our max_attempts means.
            retries={"total_max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            # botocore >= 1.36 sends CRC checksums by default, which MinIO and R2 reject.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        # A session of its own: boto3's default session is not safe to share across threads.
        session = boto3.session.Session()
        if client is None:
            client = session.client(
                "s3", endpoint_url=endpoint_url, region_name=region, config=config
            )
        self.client = client
        # Presigned URLs name the endpoint clients reach, which may differ from the one the farm
        # uses inside its network (http://minio:9000 in docker-compose). Signing makes no request.
        self.signer = (
            client
            if public_endpoint_url is None
            else session.client(
                "s3", endpoint_url=public_endpoint_url, region_name=region, config=config
            )
        )

    @property
    def endpoint(self) -> str:
        """The endpoint URL the client talks to, for messages."""
        return str(self.client.meta.endpoint_url)

    def _where(self, key: str | None = None) -> str:
        place = f"s3://{self.bucket}/{key}" if key is not None else f"bucket {self.bucket!r}"
        return f"{place} at {self.endpoint}"

    def _unavailable(
        self, action: str, error: Exception, key: str | None = None
    ) -> StorageUnavailable:
        return StorageUnavailable(f"could not {action} {self._where(key)}: {error}")

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Upload `data` under `key`; raise StorageUnavailable once botocore's retries run out."""
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)
        except (BotoCoreError, ClientError) as error:
            raise self._unavailable("upload", error, key) from error

    def get(self, key: str) -> bytes:
        """Download the object under `key`; raise ObjectNotFound if there is none."""
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
            with response["Body"] as body:
                return body.read()
        except ClientError as error:
            if _error_code(error) == "NoSuchKey":
                raise ObjectNotFound(f"no object {self._where(key)}") from error
            raise self._unavailable("download", error, key) from error
        except BotoCoreError as error:
            raise self._unavailable("download", error, key) from error

    def exists(self, key: str) -> bool:
        """Whether an object is stored under `key`."""
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as error:
            if _http_status(error) == 404:
                return False
            raise self._unavailable("look up", error, key) from error
        except BotoCoreError as error:
            raise self._unavailable("look up", error, key) from error
        return True

    def url(self, key: str) -> str:
        """A presigned GET URL for `key`, valid for `url_expiry_s` seconds. Makes no request."""
        try:
            return self.signer.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": key},
                ExpiresIn=self.url_expiry_s,
            )
        except BotoCoreError as error:  # e.g. no credentials to sign with
            raise self._unavailable("sign a URL for", error, key) from error

    def check(self) -> None:
        """Raise StorageUnavailable, saying why, unless the bucket exists and is reachable."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as error:
            status = _http_status(error)
            if status == 404:
                hint = "it does not exist; create it or call ensure_bucket()"
            elif status == 403:
                hint = "access denied; check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            else:
                hint = str(error)
            raise StorageUnavailable(f"{self._where()} is not usable: {hint}") from error
        except BotoCoreError as error:
            raise StorageUnavailable(f"cannot reach {self._where()}: {error}") from error

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing; safe when another process creates it at once."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as error:
            if _http_status(error) != 404:
                raise self._unavailable("look up", error) from error
        except BotoCoreError as error:
            raise self._unavailable("look up", error) from error

        region = self.client.meta.region_name
        try:
            # us-east-1 is S3's default and rejects an explicit LocationConstraint for itself.
            if region and region != "us-east-1":
                self.client.create_bucket(
                    Bucket=self.bucket,
                    CreateBucketConfiguration={"LocationConstraint": region},  # type: ignore[typeddict-item]
                )
            else:
                self.client.create_bucket(Bucket=self.bucket)
        except ClientError as error:
            if _error_code(error) == "BucketAlreadyOwnedByYou":
                return
            raise self._unavailable("create", error) from error
        except BotoCoreError as error:
            raise self._unavailable("create", error) from error

    def close(self) -> None:
        """Close the clients' connection pools."""
        self.client.close()
        if self.signer is not self.client:
            self.signer.close()


def _error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _http_status(error: ClientError) -> int | None:
    return error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


class LocalStorage:
    """Objects as files under `root`, for a single machine; the API serves them at `url_prefix`.

    The content type is not stored: the API infers it from the key's extension.
    """

    def __init__(self, root: Path, url_prefix: str = "/v1/files/") -> None:
        self.root = Path(root)
        self.url_prefix = url_prefix

    def path(self, key: str) -> Path:
        """The file that holds `key`; raise ValueError for a key that could escape `root`."""
        segments = key.split("/")
        if (
            not key
            or key.startswith("/")
            or "\\" in key
            or "\x00" in key
            or any(segment in ("", ".", "..") for segment in segments)
        ):
            raise ValueError(
                f"invalid storage key {key!r}: use relative '/'-separated names, "
                "without empty, '.' or '..' segments or backslashes"
            )
        return self.root.joinpath(*segments)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Write `data` to the key's file atomically: readers see the old file or the new one."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # The temporary file must be in the same folder for os.replace to be an atomic rename.
        descriptor, temporary_name = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
        )
        temporary_path = Path(temporary_name)
        try:
            with os.fdopen(descriptor, "wb") as temporary:
                temporary.write(data)
                temporary.flush()
                os.fsync(temporary.fileno())
            # mkstemp creates 0600; the API may run as another user on a shared volume.
            os.chmod(temporary_path, 0o644)
            os.replace(temporary_path, path)
        except BaseException:
            temporary_path.unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        """Read the key's file; raise ObjectNotFound if there is none."""
        path = self.path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as error:
            raise ObjectNotFound(f"no object {key!r} under {self.root}") from error

    def exists(self, key: str) -> bool:
        """Whether a file is stored under `key`."""
        return self.path(key).is_file()

    def url(self, key: str) -> str:
        """The API path that serves `key` (behind the API's authentication)."""
        self.path(key)  # validate
        return self.url_prefix + quote(key)

    def check(self) -> None:
        """Raise StorageUnavailable unless `root` is a writable folder."""
        if not self.root.is_dir():
            raise StorageUnavailable(
                f"storage folder {self.root} does not exist; create it or call ensure_bucket()"
            )
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageUnavailable(f"storage folder {self.root} is not writable")

    def ensure_bucket(self) -> None:
        """Create the `root` folder if it is missing."""
        self.root.mkdir(parents=True, exist_ok=True)


def storage_from_settings(settings: Settings, region: str | None = None) -> Storage:
    """The storage `settings` ask for: S3 when they name a bucket or an endpoint, else files
    under `<data_dir>/files`. boto3 reads the credentials, and the region unless given."""
    if not settings.uses_s3:
        return LocalStorage(settings.data_dir / "files")
    return S3Storage(
        bucket=settings.s3_bucket or DEFAULT_BUCKET,
        endpoint_url=settings.s3_endpoint_url,
        region=region,
        url_expiry_s=settings.url_expiry_s,
        public_endpoint_url=settings.s3_public_url,
    )
