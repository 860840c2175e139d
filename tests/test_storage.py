"""core.storage against a real S3 server on loopback (moto in server mode) and a temp folder."""

from __future__ import annotations

import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
from moto.server import ThreadedMotoServer

from core.settings import Settings
from core.storage import (
    LocalStorage,
    ObjectNotFound,
    S3Storage,
    StorageUnavailable,
    storage_from_settings,
)
from tests.servers import free_port

PNG_BYTES = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


@pytest.fixture(scope="module")
def aws_env() -> Iterator[None]:
    """Fake credentials, and no AWS settings from the machine running the tests."""
    with pytest.MonkeyPatch.context() as patch:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            patch.delenv(name, raising=False)
        patch.setenv("AWS_ACCESS_KEY_ID", "test")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "test")
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        patch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
        yield


@pytest.fixture(scope="module")
def s3_endpoint(aws_env: None) -> Iterator[str]:
    """URL of an S3 server (moto) on a free loopback port."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_storage(s3_endpoint: str) -> Iterator[S3Storage]:
    """An S3Storage on a fresh, existing bucket."""
    storage = S3Storage(f"test-{uuid.uuid4().hex[:12]}", endpoint_url=s3_endpoint)
    storage.ensure_bucket()
    yield storage
    storage.close()


def bucket_names(storage: S3Storage) -> set[str]:
    return {bucket["Name"] for bucket in storage.client.list_buckets()["Buckets"]}


def fetch(url: str) -> bytes:
    # No proxy: the server is on loopback whatever the environment says.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as response:
        body: bytes = response.read()
        return body


# S3


def test_ensure_bucket_creates_a_missing_bucket_and_is_idempotent(s3_endpoint: str) -> None:
    storage = S3Storage("farm-images", endpoint_url=s3_endpoint)
    try:
        with pytest.raises(StorageUnavailable, match="does not exist"):
            storage.check()
        storage.ensure_bucket()
        storage.ensure_bucket()
        assert "farm-images" in bucket_names(storage)
        storage.check()
    finally:
        storage.close()


def test_ensure_bucket_outside_us_east_1_sets_the_location(s3_endpoint: str) -> None:
    storage = S3Storage("farm-eu", endpoint_url=s3_endpoint, region="eu-west-1")
    try:
        storage.ensure_bucket()
        storage.ensure_bucket()
        location = storage.client.get_bucket_location(Bucket="farm-eu")
        assert location["LocationConstraint"] == "eu-west-1"
    finally:
        storage.close()


def test_ensure_bucket_tolerates_a_concurrent_create(s3_endpoint: str) -> None:
    # Another process creates the bucket between our head_bucket (404) and our create_bucket;
    # outside us-east-1 S3 then answers BucketAlreadyOwnedByYou.
    storage = S3Storage("farm-race", endpoint_url=s3_endpoint, region="eu-west-1")
    rival = S3Storage("farm-race", endpoint_url=s3_endpoint, region="eu-west-1")

    def rival_creates_bucket(**_: Any) -> None:
        rival.client.create_bucket(
            Bucket="farm-race", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}
        )

    storage.client.meta.events.register("after-call.s3.HeadBucket", rival_creates_bucket)
    try:
        storage.ensure_bucket()
        assert "farm-race" in bucket_names(storage)
    finally:
        storage.close()
        rival.close()


def test_put_get_exists_round_trip_keeps_content_type(s3_storage: S3Storage) -> None:
    key = "jobs/abc123/0.png"
    assert not s3_storage.exists(key)

    s3_storage.put(key, PNG_BYTES, "image/png")

    assert s3_storage.exists(key)
    assert s3_storage.get(key) == PNG_BYTES
    head = s3_storage.client.head_object(Bucket=s3_storage.bucket, Key=key)
    assert head["ContentType"] == "image/png"
    assert head["ContentLength"] == len(PNG_BYTES)


def test_get_missing_key_raises_object_not_found(s3_storage: S3Storage) -> None:
    with pytest.raises(ObjectNotFound, match=r"jobs/missing\.png"):
        s3_storage.get("jobs/missing.png")


def test_presigned_url_serves_the_bytes_and_expires_within_an_hour(
    s3_storage: S3Storage,
) -> None:
    s3_storage.put("jobs/abc123/1.png", PNG_BYTES, "image/png")

    url = s3_storage.url("jobs/abc123/1.png")

    parts = urlsplit(url)
    assert parts.path == f"/{s3_storage.bucket}/jobs/abc123/1.png"  # path-style addressing
    query = parse_qs(parts.query)
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert 0 < int(query["X-Amz-Expires"][0]) <= 3600
    assert fetch(url) == PNG_BYTES


def test_presigned_url_names_the_public_endpoint(s3_storage: S3Storage, s3_endpoint: str) -> None:
    # The farm uploads through one address; clients fetch through another that reaches the same
    # server (here "localhost" instead of "127.0.0.1"), and the signature must hold for it.
    public = s3_endpoint.replace("127.0.0.1", "localhost")
    assert public != s3_endpoint
    storage = S3Storage(s3_storage.bucket, endpoint_url=s3_endpoint, public_endpoint_url=public)
    try:
        storage.put("jobs/abc123/grid.png", PNG_BYTES, "image/png")
        url = storage.url("jobs/abc123/grid.png")
        assert url.startswith(f"{public}/{s3_storage.bucket}/jobs/abc123/grid.png?")
        assert fetch(url) == PNG_BYTES
    finally:
        storage.close()


def test_url_expiry_follows_the_setting(s3_endpoint: str) -> None:
    storage = S3Storage("any-bucket", endpoint_url=s3_endpoint, url_expiry_s=600)
    try:
        query = parse_qs(urlsplit(storage.url("a.png")).query)
        assert query["X-Amz-Expires"] == ["600"]
    finally:
        storage.close()


@pytest.mark.parametrize("url_expiry_s", [0, -1, 3601, 7 * 24 * 3600])
def test_url_expiry_outside_one_hour_is_rejected(url_expiry_s: int) -> None:
    with pytest.raises(ValueError, match="url_expiry_s"):
        S3Storage("any-bucket", url_expiry_s=url_expiry_s)


def test_endpoint_down_fails_fast_with_storage_unavailable(aws_env: None) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    storage = S3Storage(
        "farm-images",
        endpoint_url=endpoint,
        max_attempts=2,
        connect_timeout_s=1,
        read_timeout_s=1,
    )
    attempts = []
    storage.client.meta.events.register(
        "before-send.s3.PutObject", lambda **_: attempts.append(time.monotonic())
    )
    try:
        started = time.monotonic()
        with pytest.raises(StorageUnavailable, match="could not upload") as put_error:
            storage.put("jobs/abc123/0.png", PNG_BYTES, "image/png")
        assert time.monotonic() - started < 10
        assert len(attempts) == 2  # the first try and one retry
        assert put_error.value.__cause__ is not None
        assert endpoint in str(put_error.value)
        assert "jobs/abc123/0.png" in str(put_error.value)

        with pytest.raises(StorageUnavailable, match="cannot reach") as check_error:
            storage.check()
        assert endpoint in str(check_error.value)
        assert "farm-images" in str(check_error.value)
    finally:
        storage.close()


def test_client_is_configured_for_s3_compatible_stores(aws_env: None) -> None:
    storage = S3Storage("farm-images", endpoint_url="http://minio:9000", max_attempts=3)
    try:
        # Config sets its options as attributes at run time; the stubs do not list them.
        config: Any = storage.client.meta.config
        assert config.s3 == {"addressing_style": "path"}
        assert config.signature_version == "s3v4"
        assert config.retries == {"total_max_attempts": 3, "mode": "standard"}
        assert config.request_checksum_calculation == "when_required"
        assert config.response_checksum_validation == "when_required"
        assert storage.endpoint == "http://minio:9000"
    finally:
        storage.close()


# Local


def test_local_round_trip(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "files")
    storage.ensure_bucket()
    storage.check()
    assert not storage.exists("jobs/abc123/0.png")

    storage.put("jobs/abc123/0.png", PNG_BYTES, "image/png")
    storage.put("jobs/abc123/0.png", PNG_BYTES[::-1], "image/png")  # replaces

    assert storage.exists("jobs/abc123/0.png")
    assert storage.get("jobs/abc123/0.png") == PNG_BYTES[::-1]
    assert (tmp_path / "files" / "jobs" / "abc123" / "0.png").read_bytes() == PNG_BYTES[::-1]


def test_local_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    for index in range(3):
        storage.put(f"jobs/abc123/{index}.png", PNG_BYTES, "image/png")

    assert sorted(path.name for path in (tmp_path / "jobs" / "abc123").iterdir()) == [
        "0.png",
        "1.png",
        "2.png",
    ]


def test_local_get_missing_key_raises_object_not_found(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.put("jobs/abc123/0.png", PNG_BYTES, "image/png")
    with pytest.raises(ObjectNotFound, match=r"missing\.png"):
        storage.get("jobs/abc123/missing.png")
    with pytest.raises(ObjectNotFound):
        storage.get("jobs/abc123")  # a folder, not an object


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/etc/passwd",
        "../secret",
        "jobs/../../secret",
        "jobs//0.png",
        "jobs/",
        "jobs\\0.png",
        ".",
    ],
)
def test_local_rejects_keys_that_could_escape_the_root(tmp_path: Path, key: str) -> None:
    storage = LocalStorage(tmp_path / "files")
    with pytest.raises(ValueError, match="invalid storage key"):
        storage.put(key, PNG_BYTES, "image/png")
    with pytest.raises(ValueError, match="invalid storage key"):
        storage.get(key)
    with pytest.raises(ValueError, match="invalid storage key"):
        storage.url(key)
    assert list(tmp_path.iterdir()) == []


def test_local_url_is_the_api_path(tmp_path: Path) -> None:
    assert LocalStorage(tmp_path).url("jobs/abc123/0.png") == "/v1/files/jobs/abc123/0.png"
    assert LocalStorage(tmp_path, url_prefix="/files/").url("a.png") == "/files/a.png"


def test_local_check_reports_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(StorageUnavailable, match="does not exist"):
        LocalStorage(tmp_path / "absent").check()


# storage_from_settings


def test_storage_from_settings_defaults_to_local_files() -> None:
    storage = storage_from_settings(Settings.from_env({}))
    assert isinstance(storage, LocalStorage)
    assert storage.root == Path("dalle-farm-data/files")


def test_storage_from_settings_uses_the_data_dir(tmp_path: Path) -> None:
    storage = storage_from_settings(Settings.from_env({"DALLE_FARM_DATA_DIR": str(tmp_path)}))
    assert isinstance(storage, LocalStorage)
    assert storage.root == tmp_path / "files"


def test_storage_from_settings_picks_s3_for_an_endpoint(aws_env: None) -> None:
    settings = Settings.from_env(
        {"DALLE_FARM_S3_ENDPOINT_URL": "http://minio:9000", "DALLE_FARM_URL_EXPIRY_S": "900"}
    )
    storage = storage_from_settings(settings)
    assert isinstance(storage, S3Storage)
    try:
        assert storage.bucket == "dalle-farm"
        assert storage.endpoint == "http://minio:9000"
        assert storage.url_expiry_s == 900
    finally:
        storage.close()


def test_storage_from_settings_picks_s3_for_a_bucket(aws_env: None) -> None:
    settings = Settings.from_env({"DALLE_FARM_S3_BUCKET": "renders"})
    storage = storage_from_settings(settings, region="eu-west-1")
    assert isinstance(storage, S3Storage)
    try:
        assert storage.bucket == "renders"
        assert storage.client.meta.region_name == "eu-west-1"
    finally:
        storage.close()


def test_settings_reject_a_bad_expiry() -> None:
    with pytest.raises(ValueError, match="DALLE_FARM_URL_EXPIRY_S must be an integer"):
        Settings.from_env({"DALLE_FARM_S3_BUCKET": "renders", "DALLE_FARM_URL_EXPIRY_S": "1h"})
    with pytest.raises(ValueError, match="DALLE_FARM_URL_EXPIRY_S must be from 1 to 3600"):
        Settings.from_env({"DALLE_FARM_S3_BUCKET": "renders", "DALLE_FARM_URL_EXPIRY_S": "86400"})


def test_s3_storage_accepts_an_injected_client(aws_env: None) -> None:
    # S3Storage accepts an injected client (e.g. shared by a worker process).
    # E.g. a client a worker process already holds.
    client = boto3.session.Session().client("s3", endpoint_url="http://minio:9000")
    storage = S3Storage("renders", client=client)
    try:
        assert storage.client is client
    finally:
        storage.close()
