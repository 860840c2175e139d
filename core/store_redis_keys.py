"""API keys on Redis, a part of RedisJobStore (core/store_redis.py).

{p}:key:{id}   hash per key: name, secret_hash (sha256; never the secret), created_at,
               revoked ("0"/"1")
{p}:keys       list of key ids in creation order

Each new key gets its webhook signing secret too ({p}:webhook-secrets, see
core/store_redis_webhooks.py); `webhook_secret(key.id)` reads it.
"""

from __future__ import annotations

import hmac

from core.job import utc_now
from core.store import ApiKey, check_key_name, hash_secret, key_id_from_secret, new_key_secret
from core.store_redis_base import RedisBackend, text
from core.store_redis_lua import REVOKE_KEY
from core.webhooks import new_secret as new_webhook_secret


class RedisKeyStore(RedisBackend):
    """The API-key half of the JobStore protocol on Redis."""

    def create_key(self, name: str) -> tuple[ApiKey, str]:
        """A new key named `name` and its secret, which is shown only this once."""
        key_id, secret = new_key_secret()
        key = ApiKey(id=key_id, name=check_key_name(name), created_at=utc_now())
        with self._errors(), self._client.pipeline() as pipe:
            pipe.hset(
                self._key("key", key.id),
                mapping={
                    "name": key.name,
                    "secret_hash": hash_secret(secret),
                    "created_at": key.created_at,
                    "revoked": "0",
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
                    pipe.hmget(self._key("key", key_id), ["name", "created_at", "revoked"])
                rows = pipe.execute()
        return [
            ApiKey(id=key_id, name=text(name), created_at=text(at), revoked=text(r) == "1")
            for key_id, (name, at, r) in zip(key_ids, rows, strict=True)
            if name is not None
        ]

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
            name, created_at, revoked, secret_hash = self._client.hmget(
                self._key("key", key_id), ["name", "created_at", "revoked", "secret_hash"]
            )
        if secret_hash is None or not hmac.compare_digest(text(secret_hash), hash_secret(secret)):
            return None
        if text(revoked) == "1":
            return None
        return ApiKey(id=key_id, name=text(name), created_at=text(created_at))
