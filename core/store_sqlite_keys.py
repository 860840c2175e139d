"""API keys in the embedded farm's SQLite file (the `api_keys` table), a part of
SqliteJobStore (core/store_sqlite.py). Each new key gets its webhook signing secret too
(`webhook_secrets`, see core/store_sqlite_webhooks.py); `webhook_secret(key.id)` reads it."""

from __future__ import annotations

import hmac

from core.job import utc_now
from core.store import ApiKey, check_key_name, hash_secret, key_id_from_secret, new_key_secret
from core.store_sqlite_db import SqliteBackend
from core.webhooks import new_secret as new_webhook_secret


class SqliteKeyStore(SqliteBackend):
    """The API-key half of the JobStore protocol on SQLite."""

    def create_key(self, name: str) -> tuple[ApiKey, str]:
        """A new key named `name` and its secret, which is shown only this once."""
        key_id, secret = new_key_secret()
        key = ApiKey(id=key_id, name=check_key_name(name), created_at=utc_now())
        with self._db.transaction() as connection:
            connection.execute(
                "INSERT INTO api_keys (id, name, secret_hash, created_at) VALUES (?, ?, ?, ?)",
                (key.id, key.name, hash_secret(secret), key.created_at),
            )
            # Its webhook signing secret (core/store_sqlite_webhooks.py), shown with it.
            connection.execute(
                "INSERT OR IGNORE INTO webhook_secrets (owner, secret, created_at)"
                " VALUES (?, ?, ?)",
                (key.id, new_webhook_secret(), key.created_at),
            )
        return key, secret

    def list_keys(self) -> list[ApiKey]:
        rows = self._db.fetch_all(
            # rowid: creation order (keys are never deleted), even within one millisecond.
            "SELECT id, name, created_at, revoked FROM api_keys ORDER BY rowid"
        )
        return [
            ApiKey(id=key_id, name=name, created_at=created_at, revoked=bool(revoked))
            for key_id, name, created_at, revoked in rows
        ]

    def revoke_key(self, id_or_name: str) -> bool:
        """Revoke the key with this id, or every key with this name; False if none matches."""
        try:
            id_or_name.encode("utf8")
        except UnicodeEncodeError:
            return False  # no stored name holds a lone surrogate
        with self._db.transaction() as connection:
            cursor = connection.execute(
                "UPDATE api_keys SET revoked = 1 WHERE id = ? OR name = ?", (id_or_name, id_or_name)
            )
            return cursor.rowcount > 0

    def authenticate(self, secret: str) -> ApiKey | None:
        """The key whose secret this is, unless unknown or revoked."""
        key_id = key_id_from_secret(secret)
        if key_id is None:
            return None
        presented = hash_secret(secret)
        row = self._db.fetch_one(
            "SELECT name, created_at, revoked, secret_hash FROM api_keys WHERE id = ?", (key_id,)
        )
        if row is None:
            return None
        name, created_at, revoked, secret_hash = row
        if not hmac.compare_digest(secret_hash, presented) or revoked:
            return None
        return ApiKey(id=key_id, name=name, created_at=created_at)
