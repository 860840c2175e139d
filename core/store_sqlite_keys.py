"""API keys in the embedded farm's SQLite file (the `api_keys` table), a part of
SqliteJobStore (core/store_sqlite.py). Each new key gets its webhook signing secret too
(`webhook_secrets`, see core/store_sqlite_webhooks.py); `webhook_secret(key.id)` reads it."""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from core.job import utc_now
from core.limits import check_key_limits
from core.store import (
    ApiKey,
    check_key_name,
    hash_secret,
    key_id_from_secret,
    new_key_secret,
)
from core.store_sqlite_db import SqliteBackend
from core.webhooks import new_secret as new_webhook_secret


class SqliteKeyStore(SqliteBackend):
    """The API-key half of the JobStore protocol on SQLite."""

    def create_key(
        self, name: str, limits: Mapping[str, int | str | None] | None = None
    ) -> tuple[ApiKey, str]:
        """A new key named `name`, with its own `limits` if given, and its secret, which is
        shown only this once."""
        key_id, secret = new_key_secret()
        own = check_key_limits(limits or {})
        key = ApiKey(
            id=key_id,
            name=check_key_name(name),
            created_at=utc_now(),
            max_jobs=_int(own.get("max_jobs")),
            rate=_str(own.get("rate")),
        )
        with self._db.transaction() as connection:
            connection.execute(
                "INSERT INTO api_keys (id, name, secret_hash, created_at, max_jobs, rate)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (key.id, key.name, hash_secret(secret), key.created_at, key.max_jobs, key.rate),
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
            f"SELECT id, {_COLUMNS} FROM api_keys ORDER BY rowid"
        )
        return [_key(key_id, *row) for key_id, *row in rows]

    def set_key_limits(
        self, id_or_name: str, limits: Mapping[str, int | str | None]
    ) -> list[ApiKey]:
        """Set the key's own limits (None: the farm's) for the key with this id, or every key
        with this name; the keys changed."""
        checked = check_key_limits(limits)
        try:
            id_or_name.encode("utf8")
        except UnicodeEncodeError:
            return []  # no stored name holds a lone surrogate
        with self._db.transaction() as connection:
            ids = [
                row[0]
                for row in connection.execute(
                    "SELECT id FROM api_keys WHERE id = ? OR name = ?", (id_or_name, id_or_name)
                )
            ]
            for name, value in checked.items():  # names are KEY_LIMITS' own, never input
                connection.executemany(
                    f"UPDATE api_keys SET {name} = ? WHERE id = ?", [(value, i) for i in ids]
                )
        return [key for key in self.list_keys() if key.id in ids]

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
            f"SELECT secret_hash, {_COLUMNS} FROM api_keys WHERE id = ?", (key_id,)
        )
        if row is None:
            return None
        secret_hash, *fields = row
        key = _key(key_id, *fields)
        if not hmac.compare_digest(secret_hash, presented) or key.revoked:
            return None
        return key


_COLUMNS = "name, created_at, revoked, max_jobs, rate"


def _key(
    key_id: str, name: str, created_at: str, revoked: int, max_jobs: int | None, rate: str | None
) -> ApiKey:
    return ApiKey(key_id, name, created_at, bool(revoked), max_jobs, rate)


def _int(value: int | str | None) -> int | None:
    return None if value is None else int(value)


def _str(value: int | str | None) -> str | None:
    return None if value is None else str(value)
