"""API keys on Redis, a part of RedisJobStore (core/store_redis.py).

{p}:key:{id}   hash per key: name, secret_hash (sha256; never the secret), created_at,
               revoked ("0"/"1"), and its own limits max_jobs and rate when it has them
{p}:keys       list of key ids in creation order

Each new key gets its webhook signing secret too ({p}:webhook-secrets, see
core/store_redis_webhooks.py); `webhook_secret(key.id)` reads it.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Any

from core.job import utc_now
from core.limits import check_key_limits
from core.store import (
    ApiKey,
    check_key_name,
    hash_secret,
    key_id_from_secret,
    new_key_secret,
)
from core.store_redis_base import RedisBackend, text
from core.store_redis_lua import REVOKE_KEY
from core.webhooks import new_secret as new_webhook_secret


class RedisKeyStore(RedisBackend):
    """The API-key half of the JobStore protocol on Redis."""

    def create_key(
        self, name: str, limits: Mapping[str, int | str | None] | None = None
    ) -> tuple[ApiKey, str]:
        """A new key named `name`, with its own `limits` if given, and its secret, which is
        shown only this once."""
        key_id, secret = new_key_secret()
        own = {k: v for k, v in check_key_limits(limits or {}).items() if v is not None}
        key = _key(
            key_id, check_key_name(name), utc_now(), "0", own.get("max_jobs"), own.get("rate")
        )
        with self._errors(), self._client.pipeline() as pipe:
            pipe.hset(
                self._key("key", key.id),
                mapping={
                    "name": key.name,
                    "secret_hash": hash_secret(secret),
                    "created_at": key.created_at,
                    "revoked": "0",
                    **{k: str(v) for k, v in own.items()},
                },
            )
            pipe.rpush(self._key("keys"), key.id)
            # Its webhook signing secret (core/store_redis_webhooks.py), shown with it.
            pipe.hsetnx(self._key("webhook-secrets"), key.id, new_webhook_secret())
            pipe.execute()
        return key, secret

    def list_keys(self) -> list[ApiKey]:
        with self._errors():
            key_ids = [text(key_id) for key_id in self._client.lrange(self._key("keys"), 0, -1)]
            with self._client.pipeline(transaction=False) as pipe:
                for key_id in key_ids:
                    pipe.hmget(self._key("key", key_id), _FIELDS)
                rows = pipe.execute()
        return [
            _key(key_id, *row)
            for key_id, row in zip(key_ids, rows, strict=True)
            if row[0] is not None
        ]

    def set_key_limits(
        self, id_or_name: str, limits: Mapping[str, int | str | None]
    ) -> list[ApiKey]:
        """Set the key's own limits (None: the farm's) for the key with this id, or every key
        with this name; the keys changed."""
        checked = check_key_limits(limits)
        matching = [key for key in self.list_keys() if id_or_name in (key.id, key.name)]
        with self._errors(), self._client.pipeline() as pipe:
            for key in matching:
                for name, value in checked.items():
                    if value is None:
                        pipe.hdel(self._key("key", key.id), name)
                    else:
                        pipe.hset(self._key("key", key.id), name, str(value))
            pipe.execute()
        changed = {key.id for key in matching}
        return [key for key in self.list_keys() if key.id in changed]

    def revoke_key(self, id_or_name: str) -> bool:
        """Revoke the key with this id, or every key with this name; False if none matches."""
        try:
            id_or_name.encode("utf8")
        except UnicodeEncodeError:
            return False  # no stored name holds a lone surrogate
        with self._errors():
            matched = self._script(REVOKE_KEY)(
                keys=[self._key("keys")], args=[self._key("key", ""), id_or_name]
            )
        return int(matched) > 0

    def authenticate(self, secret: str) -> ApiKey | None:
        """The key whose secret this is, unless unknown or revoked."""
        key_id = key_id_from_secret(secret)
        if key_id is None:
            return None
        with self._errors():
            *fields, secret_hash = self._client.hmget(
                self._key("key", key_id), [*_FIELDS, "secret_hash"]
            )
        if secret_hash is None or not hmac.compare_digest(text(secret_hash), hash_secret(secret)):
            return None
        key = _key(key_id, *fields)
        return None if key.revoked else key


_FIELDS = ["name", "created_at", "revoked", "max_jobs", "rate"]


def _key(key_id: str, name: Any, created_at: Any, revoked: Any, max_jobs: Any, rate: Any) -> ApiKey:
    """An ApiKey from the values of its hash's _FIELDS."""
    return ApiKey(
        id=key_id,
        name=text(name),
        created_at=text(created_at),
        revoked=text(revoked) == "1",
        max_jobs=None if max_jobs is None else int(text(max_jobs)),
        rate=None if rate is None else text(rate),
    )
