"""Webhook secrets and the webhook outbox in the embedded farm's SQLite file, a part of
SqliteJobStore (core/store_sqlite.py).

    webhook_secrets     owner (API key id) → signing secret (kept: the farm signs with it)
    webhook_deliveries  job id → delivery id, url, owner, state, attempts, next_at, claim,
                        claim_until, last_error, created_at, finished_at

The same life as on Redis (core/store_redis_webhooks.py): registered in the transaction that
creates the job (register_webhook) and looked at WAITING_RECHECK_S later, due at once when the
job reaches a final state, claimed in one transaction (BEGIN IMMEDIATE) under a token and a
lease, completed only by the claim's holder.
Times are time.time(), which every process on the machine shares.
"""

from __future__ import annotations

import dataclasses
import secrets
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from core.job import JobRecord, utc_now
from core.store_sqlite_db import SqliteBackend
from core.webhooks import (
    WAITING_RECHECK_S,
    DeliveryState,
    WebhookDelivery,
    new_delivery_id,
    new_secret,
)

_FINAL = ("succeeded", "failed", "canceled")
# A delivery's columns as _delivery reads them, from webhook_deliveries as `d`.
_DELIVERY_COLUMNS = "d.id, d.job_id, d.url, d.owner, d.state, d.attempts, d.last_error, d.claim"


class SqliteWebhookStore(SqliteBackend):
    """Webhook secrets and deliveries (see the module docstring)."""

    # -- secrets -------------------------------------------------------------------------------
    def webhook_secret(self, owner: str) -> str:
        """The owner's signing secret, created now if it has none (keys made before webhooks)."""
        with self._db.transaction() as connection:
            return _secret(connection, owner, replace=False)

    def rotate_webhook_secret(self, owner: str) -> str:
        """A new signing secret for the owner; deliveries from now on are signed with it."""
        with self._db.transaction() as connection:
            return _secret(connection, owner, replace=True)

    # -- the outbox ----------------------------------------------------------------------------
    def _webhooks_job_final(self, job_ids: list[str]) -> None:
        """These jobs reached a final state: their pending deliveries are due now."""
        if not job_ids:
            return
        now = time.time()
        with self._db.transaction() as connection:
            connection.executemany(
                "UPDATE webhook_deliveries SET next_at = ?"
                " WHERE job_id = ? AND state = 'pending' AND claim_until <= ?",
                [(now, job_id, now) for job_id in job_ids],
            )

    def claim_webhook_deliveries(
        self, claimant: str, limit: int, lease_s: float
    ) -> list[WebhookDelivery]:
        """Up to `limit` due deliveries whose job is final, each leased to `claimant` for
        `lease_s` seconds (then it is due again unless completed)."""
        now = time.time()
        claimed: list[WebhookDelivery] = []
        with self._db.transaction() as connection:
            rows = connection.execute(
                f"SELECT {_DELIVERY_COLUMNS}, j.status"
                " FROM webhook_deliveries d LEFT JOIN jobs j ON j.id = d.job_id"
                " WHERE d.state = 'pending' AND d.next_at <= ? ORDER BY d.next_at LIMIT ?",
                (now, limit * 4),
            ).fetchall()
            for row in rows:
                if len(claimed) >= limit:
                    break
                delivery, status = _delivery(row[:-1]), row[-1]
                job_id = delivery.job_id
                if status is None:
                    connection.execute(
                        "UPDATE webhook_deliveries SET state = 'failed',"
                        " last_error = 'the job is gone' WHERE job_id = ?",
                        (job_id,),
                    )
                elif status not in _FINAL:
                    connection.execute(
                        "UPDATE webhook_deliveries SET next_at = ? WHERE job_id = ?",
                        (now + WAITING_RECHECK_S, job_id),
                    )
                else:
                    token = f"{claimant}:{secrets.token_hex(8)}"
                    connection.execute(
                        "UPDATE webhook_deliveries SET claim = ?, claim_until = ?, next_at = ?"
                        " WHERE job_id = ?",
                        (token, now + lease_s, now + lease_s, job_id),
                    )
                    claimed.append(dataclasses.replace(delivery, claim=token))
        return claimed

    def complete_webhook_delivery(
        self, delivery: WebhookDelivery, state: str, error: str | None, retry_in_s: float = 0.0
    ) -> bool:
        """Record a try of a claimed delivery: DELIVERED, FAILED (given up), or PENDING (try
        again in `retry_in_s`). False when the claim was lost (another dispatcher has it)."""
        now = time.time()
        finished_at = None if state == DeliveryState.PENDING else utc_now()
        with self._db.transaction() as connection:
            cursor = connection.execute(
                "UPDATE webhook_deliveries SET attempts = attempts + 1, state = ?,"
                " last_error = COALESCE(?, last_error), claim = NULL, claim_until = 0,"
                " next_at = ?, finished_at = ?"
                " WHERE job_id = ? AND claim = ?",
                (
                    state,
                    error,
                    now + retry_in_s,
                    finished_at,
                    delivery.job_id,
                    delivery.claim,
                ),
            )
            return cursor.rowcount > 0

    def webhook_delivery(self, job_id: str) -> WebhookDelivery | None:
        """The job's delivery as recorded, or None when the job has no webhook."""
        row = self._db.fetch_one(
            f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries d WHERE d.job_id = ?", (job_id,)
        )
        return None if row is None else _delivery(row)


def register_webhook(connection: sqlite3.Connection, record: JobRecord) -> None:
    """Register the delivery of a new job that has a webhook_url, in the transaction that
    creates the job (SqliteJobStore.create_job)."""
    url = record.params.get("webhook_url")
    if not isinstance(url, str):
        return
    connection.execute(
        "INSERT OR IGNORE INTO webhook_deliveries"
        " (job_id, id, url, owner, state, next_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            record.id,
            new_delivery_id(),
            url,
            record.owner,
            DeliveryState.PENDING,
            time.time() + WAITING_RECHECK_S,
            utc_now(),
        ),
    )


def _delivery(row: Sequence[Any]) -> WebhookDelivery:
    """A delivery from a row of _DELIVERY_COLUMNS."""
    delivery_id, job_id, url, owner, state, attempts, last_error, claim = row
    return WebhookDelivery(
        id=delivery_id,
        job_id=job_id,
        url=url,
        owner=owner,
        state=state,
        attempts=int(attempts),
        last_error=last_error,
        claim=claim,
    )


def _secret(connection: sqlite3.Connection, owner: str, *, replace: bool) -> str:
    verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
    connection.execute(
        f"{verb} INTO webhook_secrets (owner, secret, created_at) VALUES (?, ?, ?)",
        (owner, new_secret(), utc_now()),
    )
    row = connection.execute(
        "SELECT secret FROM webhook_secrets WHERE owner = ?", (owner,)
    ).fetchone()
    return str(row[0])
