"""The farm's backends, built from Settings for either mode.

    distributed (DALLE_FARM_REDIS_URL set)   RedisJobStore, S3Storage, CeleryJobQueue
    embedded    (no Redis URL)               SqliteJobStore + SqliteJobQueue on
                                             <data_dir>/farm.db, LocalStorage(<data_dir>/files)

S3 is used whenever DALLE_FARM_S3_BUCKET or DALLE_FARM_S3_ENDPOINT_URL is set, in either mode;
the bucket (or folder) is created if missing when the services are built.
Client libraries are imported inside the builders, so each mode loads only its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from core.queue import JobQueue
from core.settings import Settings
from core.storage import Storage, storage_from_settings
from core.store import JobStore

if TYPE_CHECKING:
    from core.queue_sqlite import SqliteJobQueue

# The embedded farm's database, in Settings.data_dir; the store and the queue share it.
EMBEDDED_DATABASE = "farm.db"


@dataclass
class FarmServices:
    store: JobStore
    storage: Storage
    queue: JobQueue

    def close(self) -> None:
        for part in (self.queue, self.storage, self.store):
            close = getattr(part, "close", None)
            if close is not None:
                close()


def build_store(settings: Settings) -> JobStore:
    """RedisJobStore on settings.redis_url, or the embedded SqliteJobStore."""
    if settings.is_embedded:
        from core.store_sqlite import SqliteJobStore

        settings.data_dir.mkdir(parents=True, exist_ok=True)
        return SqliteJobStore(settings.data_dir / EMBEDDED_DATABASE)
    from core.store_redis import RedisJobStore

    assert settings.redis_url is not None
    return RedisJobStore(settings.redis_url, confirm_replicas=settings.redis_confirm_replicas)


def build_embedded_queue(settings: Settings) -> SqliteJobQueue:
    from core.queue_sqlite import SqliteJobQueue

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return SqliteJobQueue(
        settings.data_dir / EMBEDDED_DATABASE, bulk_max_wait_s=settings.bulk_max_wait_s
    )


def build_storage(settings: Settings, *, ensure_bucket: bool = False) -> Storage:
    """S3Storage when settings name a bucket or endpoint, else LocalStorage(<data_dir>/files).

    With `ensure_bucket`, create the bucket or folder if it is missing (raises
    StorageUnavailable when the store cannot be reached).
    """
    storage = storage_from_settings(settings)
    if ensure_bucket:
        storage.ensure_bucket()
    return storage


def build_queue(settings: Settings, store: JobStore) -> JobQueue:
    """CeleryJobQueue (looking jobs' models up in `store`), or the embedded SqliteJobQueue."""
    if settings.is_embedded:
        return build_embedded_queue(settings)
    from core.queue_celery import CeleryJobQueue

    return CeleryJobQueue(settings, store=store)


def build_services(settings: Settings, *, ensure_bucket: bool = True) -> FarmServices:
    """The store, storage and queue `settings` describe, the bucket created if missing."""
    store = build_store(settings)
    storage = build_storage(settings, ensure_bucket=ensure_bucket)
    return FarmServices(store=store, storage=storage, queue=build_queue(settings, store))
