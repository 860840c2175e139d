"""Farm settings, read once from the environment and passed down (API, workers, CLI).

DALLE_FARM_REDIS_URL          Redis for the queue and job records (redis://, or
                              redis+sentinel://host:26379,.../master-name to follow Sentinel's
                              failovers); unset: embedded mode
DALLE_FARM_REDIS_CONFIRM_REPLICAS  replicas that must hold a new job before the API answers
                              202 (Redis WAIT; none confirmed in 2 s answers 503). Default 1
                              with redis+sentinel:// (a failover drops what the old master
                              took last), 0 otherwise
DALLE_FARM_S3_ENDPOINT_URL    S3-compatible endpoint (MinIO, R2, ...); unset: AWS
DALLE_FARM_S3_PUBLIC_URL      the S3 endpoint as clients reach it, for presigned URLs
                              (default: DALLE_FARM_S3_ENDPOINT_URL)
DALLE_FARM_S3_BUCKET          bucket for results, created if missing (default dalle-farm)
DALLE_FARM_URL_EXPIRY_S       lifetime of presigned result URLs, at most 3600 (default 3600)
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION   S3 credentials (boto3's own)
DALLE_FARM_MODELS_ROOT        weight files (default pretrained)
DALLE_FARM_MODEL              mini or mega: the model a worker serves (default mini)
DALLE_FARM_DEVICE             cpu, cuda, cuda:N or auto (default auto)
DALLE_FARM_DTYPE              float32, float16, bfloat16 or auto: bfloat16 on a GPU,
                              float32 on the CPU (default auto)
DALLE_FARM_DATA_DIR           embedded mode's database and result files (default
                              ./dalle-farm-data)
DALLE_FARM_MAX_GRID_SIZE      largest grid_size a job may ask for (default 8)
DALLE_FARM_MAX_ATTEMPTS       a job that crashed workers this many times fails (default 3)
DALLE_FARM_MAX_JOBS           jobs a worker process decodes at once, in one batch (default 8)
DALLE_FARM_BATCH_ROWS         decoder rows in a batch (2 per image: a 4×4 grid takes 32);
                              0 sizes it to half the free GPU (or host) memory (default 0)
DALLE_FARM_PNG_COMPRESSION    zlib level of result PNGs, 0 to 9: 1 encodes faster and writes
                              bigger files, 9 the reverse (default 6, Pillow's own)
DALLE_FARM_PNG_THREADS        threads that encode a worker's PNGs, 1 to 256 (default: the
                              CPUs the process may use)
DALLE_FARM_UPLOAD_THREADS     threads that upload one job's result objects, 1 to 256
                              (default 8)
DALLE_FARM_VQGAN_MODE         float32 (default: min-dalle's pixels), fast (float32 with
                              channels-last and cuDNN autotuning, CUDA only) or bfloat16 (fast,
                              in bfloat16: pixels change by a few levels)
DALLE_FARM_VQGAN_BATCH_IMAGES  images of several jobs' grids the VQGAN decodes at once, 1 to
                              1024; 1 decodes each job alone; 0 picks 16 on CUDA, 1 on the CPU
                              (default 0)
DALLE_FARM_VISIBILITY_TIMEOUT_S  seconds before Redis hands an unacknowledged job to another
                              worker after its worker vanished (default 60)
DALLE_FARM_UNSERVED_JOB_TIMEOUT_S  seconds a queued job waits while no live worker serves its
                              model; then it fails, saying so (default 300)
DALLE_FARM_BULK_MAX_WAIT_S    seconds the oldest queued bulk job waits behind interactive ones
                              before it is taken as interactive, one at a time (default 300)
DALLE_FARM_REQUEST_TIMEOUT_S  seconds a client has to send a whole request (line, headers,
                              body) before the API answers 408 and closes (default 30)
DALLE_FARM_IDLE_TIMEOUT_S     seconds an idle keep-alive connection stays open (default 60)
DALLE_FARM_MAX_CONNECTIONS    open connections per API process; more wait to be accepted
                              (default 1000)
DALLE_FARM_MAX_HEADER_BYTES   the request line and headers together, at most (default 16384)
DALLE_FARM_MAX_EVENT_STREAMS  live event streams open at once per API process, on threads of
                              their own; more answer 429 (default 256)
DALLE_FARM_KEY_MAX_JOBS       jobs queued plus running per API key; more answer 429 (default
                              1000; 0: no limit). A key's own (`keys set`) replaces it
DALLE_FARM_KEY_RATE           requests per API key, R/s, R/m or R/h (default none: no limit);
                              more answer 429. A key's own (`keys set`) replaces it
DALLE_FARM_WEBHOOK_ALLOW      hosts and networks (CIDR) that webhooks may call although they
                              are not public, comma-separated (default: none)
DALLE_FARM_WEBHOOK_TIMEOUT_S  seconds a webhook delivery may take, connect to answer (default 10)
DALLE_FARM_WEBHOOK_MAX_ATTEMPTS  tries of a delivery before it is given up (default 10)
DALLE_FARM_WEBHOOK_BACKOFF_S  seconds before the first retry, doubling each time (default 5)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from core.job import MODELS
from core.limits import MAX_AMOUNT, parse_rate

DTYPES = ("auto", "float32", "float16", "bfloat16")
VQGAN_MODES = ("float32", "fast", "bfloat16")
MAX_FINISHING_THREADS = 256


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity, as a container's cpuset limits it)."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        count = os.cpu_count() or 1
    return max(1, min(count, MAX_FINISHING_THREADS))


class SettingsError(ValueError):
    """An environment variable has an invalid value; the message names it."""


@dataclass(frozen=True)
class Settings:
    redis_url: str | None = None
    redis_confirm_replicas: int = 0
    s3_endpoint_url: str | None = None
    s3_bucket: str | None = None
    s3_public_url: str | None = None
    url_expiry_s: int = 3600
    models_root: Path = Path("pretrained")
    model: str = "mini"
    device: str = "auto"
    dtype: str = "auto"
    data_dir: Path = Path("dalle-farm-data")
    max_grid_size: int = 8
    max_attempts: int = 3
    visibility_timeout_s: int = 60
    max_jobs: int = 8
    batch_rows: int = 0
    png_compression: int = 6
    png_threads: int = field(default_factory=cpu_count)
    upload_threads: int = 8
    vqgan_mode: str = "float32"
    vqgan_batch_images: int = 0
    unserved_job_timeout_s: int = 300
    bulk_max_wait_s: int = 300
    request_timeout_s: int = 30
    idle_timeout_s: int = 60
    max_connections: int = 1000
    max_header_bytes: int = 16384
    max_event_streams: int = 256
    key_max_jobs: int | None = 1000
    key_rate: str | None = None
    webhook_allow: str | None = None
    webhook_timeout_s: int = 10
    webhook_max_attempts: int = 10
    webhook_backoff_s: int = 5

    @property
    def is_embedded(self) -> bool:
        return self.redis_url is None

    @property
    def uses_s3(self) -> bool:
        return self.s3_bucket is not None or self.s3_endpoint_url is not None

    def queue_name(self, model: str | None = None) -> str:
        """Each model has its queue, so a Mega job only reaches workers that hold Mega."""
        return f"dalle-farm.{model or self.model}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        def get(name: str) -> str | None:
            value = environ.get(f"DALLE_FARM_{name}", "").strip()
            return value or None

        def integer(name: str, default: int, low: int, high: int) -> int:
            value = get(name)
            if value is None:
                return default
            try:
                number = int(value)
            except ValueError:
                raise SettingsError(
                    f"DALLE_FARM_{name} must be an integer, got {value!r}"
                ) from None
            if not low <= number <= high:
                raise SettingsError(f"DALLE_FARM_{name} must be from {low} to {high}, got {number}")
            return number

        def choice(name: str, default: str, choices: tuple[str, ...]) -> str:
            value = get(name) or default
            if value not in choices:
                raise SettingsError(
                    f"DALLE_FARM_{name} must be one of {', '.join(choices)}, got {value!r}"
                )
            return value

        redis_url = _redis_url(get("REDIS_URL"))
        return cls(
            redis_url=redis_url,
            redis_confirm_replicas=integer(
                "REDIS_CONFIRM_REPLICAS", _default_confirm_replicas(redis_url), 0, 16
            ),
            s3_endpoint_url=get("S3_ENDPOINT_URL"),
            s3_bucket=get("S3_BUCKET"),
            s3_public_url=get("S3_PUBLIC_URL"),
            url_expiry_s=integer("URL_EXPIRY_S", 3600, 1, 3600),
            models_root=Path(get("MODELS_ROOT") or "pretrained"),
            model=choice("MODEL", "mini", MODELS),
            device=get("DEVICE") or "auto",
            dtype=choice("DTYPE", "auto", DTYPES),
            data_dir=Path(get("DATA_DIR") or "dalle-farm-data"),
            max_grid_size=integer("MAX_GRID_SIZE", 8, 1, 16),
            max_attempts=integer("MAX_ATTEMPTS", 3, 1, 100),
            visibility_timeout_s=integer("VISIBILITY_TIMEOUT_S", 60, 5, 86400),
            max_jobs=integer("MAX_JOBS", 8, 1, 1024),
            batch_rows=integer("BATCH_ROWS", 0, 0, 65536),
            png_compression=integer("PNG_COMPRESSION", 6, 0, 9),
            png_threads=integer("PNG_THREADS", cpu_count(), 1, MAX_FINISHING_THREADS),
            upload_threads=integer("UPLOAD_THREADS", 8, 1, MAX_FINISHING_THREADS),
            vqgan_mode=choice("VQGAN_MODE", "float32", VQGAN_MODES),
            vqgan_batch_images=integer("VQGAN_BATCH_IMAGES", 0, 0, 1024),
            unserved_job_timeout_s=integer("UNSERVED_JOB_TIMEOUT_S", 300, 1, 7 * 86400),
            bulk_max_wait_s=integer("BULK_MAX_WAIT_S", 300, 1, 7 * 86400),
            request_timeout_s=integer("REQUEST_TIMEOUT_S", 30, 1, 3600),
            idle_timeout_s=integer("IDLE_TIMEOUT_S", 60, 1, 86400),
            max_connections=integer("MAX_CONNECTIONS", 1000, 1, 100000),
            max_header_bytes=integer("MAX_HEADER_BYTES", 16384, 1024, 1048576),
            max_event_streams=integer("MAX_EVENT_STREAMS", 256, 1, 10000),
            key_max_jobs=integer("KEY_MAX_JOBS", 1000, 0, MAX_AMOUNT) or None,
            key_rate=_key_rate(get("KEY_RATE")),
            webhook_allow=_webhook_allow(get("WEBHOOK_ALLOW")),
            webhook_timeout_s=integer("WEBHOOK_TIMEOUT_S", 10, 1, 300),
            webhook_max_attempts=integer("WEBHOOK_MAX_ATTEMPTS", 10, 1, 100),
            webhook_backoff_s=integer("WEBHOOK_BACKOFF_S", 5, 1, 3600),
        )


def _redis_url(value: str | None) -> str | None:
    """DALLE_FARM_REDIS_URL, checked when it names sentinels (core/redis_url.py)."""
    from core.redis_url import is_sentinel_url, parse_sentinel_url

    if value is not None and is_sentinel_url(value):
        try:
            parse_sentinel_url(value)
        except ValueError as error:
            raise SettingsError(f"DALLE_FARM_REDIS_URL: {error}") from None
    return value


def _default_confirm_replicas(redis_url: str | None) -> int:
    """One replica confirms new jobs behind sentinels (core/store_redis.create_job)."""
    from core.redis_url import is_sentinel_url

    return 1 if redis_url is not None and is_sentinel_url(redis_url) else 0


def _key_rate(value: str | None) -> str | None:
    """DALLE_FARM_KEY_RATE, checked and written as core.limits reads it (None: no limit)."""
    try:
        rate = parse_rate(value)
    except ValueError as error:
        raise SettingsError(f"DALLE_FARM_KEY_RATE: {error}") from None
    return None if rate is None else str(rate)


def _webhook_allow(value: str | None) -> str | None:
    """DALLE_FARM_WEBHOOK_ALLOW, checked: each entry a host name, an address or a CIDR."""
    from core.webhooks import AllowList

    try:
        AllowList.parse(value)
    except ValueError as error:
        raise SettingsError(f"DALLE_FARM_WEBHOOK_ALLOW: {error}") from None
    return value
