"""Webhook secrets and the webhook outbox on Redis, a part of RedisJobStore (core/store_redis.py).

    {p}:webhook-secrets     hash owner (API key id) → signing secret (kept: the farm signs)
    {p}:webhook:{job id}    hash: id (the delivery id), job_id, url, owner, state, attempts,
                            last_error, claim, claim_until, created_at, finished_at
    {p}:webhooks-due        sorted set job id → when to look at its delivery next (Redis'
                            clock, Unix seconds); only pending deliveries are in it

A delivery is registered by the script that creates its job (CREATE_JOB, with
`delivery_fields`), due WAITING_RECHECK_S later. When the job reaches a final state the store
marks it due now (`_webhooks_job_final`). A claim (one script) takes due
deliveries whose job is final, pushes each WAITING_RECHECK_S on if its job is not (the safety
net), and leases each one it takes for `lease_s` under a claim token, so two dispatchers never
send one delivery at the same time; a dispatcher that dies leaves it due again when the lease
ends. Only the claim's holder may complete it.
"""

from __future__ import annotations

from typing import Any

from core.job import JobRecord, utc_now
from core.store_redis_base import RedisBackend, text
from core.webhooks import (
    WAITING_RECHECK_S,
    DeliveryState,
    WebhookDelivery,
    new_delivery_id,
    new_secret,
)

_NOW = """
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
"""

# KEYS: secrets. ARGV: owner, new secret, replace (1/0). Returns the owner's secret.
_SECRET = """
if ARGV[3] == '1' then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) return ARGV[2] end
redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
return redis.call('HGET', KEYS[1], ARGV[1])
"""


def delivery_fields(record: JobRecord) -> list[str]:
    """The hash fields of a new job's webhook delivery (field, value, ...), or none when it has
    no webhook_url; CREATE_JOB registers them with the job (core/store_redis_lua.py)."""
    url = record.params.get("webhook_url")
    if not isinstance(url, str):
        return []
    fields = {
        "id": new_delivery_id(),
        "job_id": record.id,
        "url": url,
        "owner": record.owner,
        "state": DeliveryState.PENDING,
        "attempts": "0",
        "created_at": utc_now(),
    }
    return [item for pair in fields.items() for item in pair]


# KEYS: due. ARGV: prefix, job ids... Pending, unclaimed deliveries of these jobs are due now.
_MARK_DUE = (
    _NOW
    + """
for i = 2, #ARGV do
    local delivery = ARGV[1] .. 'webhook:' .. ARGV[i]
    local state = redis.call('HMGET', delivery, 'state', 'claim_until')
    if state[1] == 'pending' and (tonumber(state[2]) or 0) <= now then
        redis.call('ZADD', KEYS[1], 'XX', now, ARGV[i])
    end
end
return 0
"""
)

# KEYS: due. ARGV: prefix, limit, lease_s, claimant.
# Returns, per claimed delivery: job id, delivery id, url, owner, attempts, claim token.
_CLAIM = (
    _NOW
    + f"""
local limit = tonumber(ARGV[2])
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit * 4)
local reply = {{}}
local claimed = 0
for _, id in ipairs(ids) do
    if claimed >= limit then break end
    local delivery = ARGV[1] .. 'webhook:' .. id
    local status = redis.call('HGET', ARGV[1] .. 'job:' .. id, 'status')
    if redis.call('HGET', delivery, 'state') ~= 'pending' then
        redis.call('ZREM', KEYS[1], id)
    elseif not status then
        redis.call('HSET', delivery, 'state', 'failed', 'last_error', 'the job is gone')
        redis.call('ZREM', KEYS[1], id)
    elseif status ~= 'succeeded' and status ~= 'failed' and status ~= 'canceled' then
        redis.call('ZADD', KEYS[1], now + {WAITING_RECHECK_S}, id)
    else
        local token = ARGV[4] .. ':' .. redis.call('HINCRBY', delivery, 'claims', 1)
        redis.call('HSET', delivery, 'claim', token, 'claim_until', now + tonumber(ARGV[3]))
        redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), id)
        local f = redis.call('HMGET', delivery, 'id', 'url', 'owner', 'attempts')
        table.insert(reply, id)
        table.insert(reply, f[1])
        table.insert(reply, f[2])
        table.insert(reply, f[3])
        table.insert(reply, f[4] or '0')
        table.insert(reply, token)
        claimed = claimed + 1
    end
end
return reply
"""
)

# KEYS: delivery, due. ARGV: job id, claim, state, error, retry delay s, finished_at.
# Counts the try; state 'pending' is a retry after the delay; an empty error keeps the last
# one (a delivery that succeeded on its second try still says what went wrong on the first).
# Returns 0 if not the claim holder.
_COMPLETE = (
    _NOW
    + """
if redis.call('HGET', KEYS[1], 'claim') ~= ARGV[2] then return 0 end
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'claim', '', 'claim_until', '0')
redis.call('HSET', KEYS[1], 'state', ARGV[3])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'last_error', ARGV[4]) end
if ARGV[3] == 'pending' then
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), ARGV[1])
else
    redis.call('HSET', KEYS[1], 'finished_at', ARGV[6])
    redis.call('ZREM', KEYS[2], ARGV[1])
end
return 1
"""
)


class RedisWebhookStore(RedisBackend):
    """Webhook secrets and deliveries (see the module docstring)."""

    # -- secrets -------------------------------------------------------------------------------
    def webhook_secret(self, owner: str) -> str:
        """The owner's signing secret, created now if it has none (keys made before webhooks)."""
        return self._secret(owner, replace=False)

    def rotate_webhook_secret(self, owner: str) -> str:
        """A new signing secret for the owner; deliveries from now on are signed with it."""
        return self._secret(owner, replace=True)

    def _secret(self, owner: str, *, replace: bool) -> str:
        with self._errors():
            secret = self._script(_SECRET)(
                keys=[self._key("webhook-secrets")],
                args=[owner, new_secret(), "1" if replace else "0"],
            )
        return text(secret)

    # -- the outbox ----------------------------------------------------------------------------
    def _webhooks_job_final(self, job_ids: list[str]) -> None:
        """These jobs reached a final state: their pending deliveries are due now."""
        if job_ids:
            with self._errors():
                self._script(_MARK_DUE)(
                    keys=[self._key("webhooks-due")], args=[self._key_prefix, *job_ids]
                )

    def claim_webhook_deliveries(
        self, claimant: str, limit: int, lease_s: float
    ) -> list[WebhookDelivery]:
        """Up to `limit` due deliveries whose job is final, each leased to `claimant` for
        `lease_s` seconds (then it is due again unless completed)."""
        with self._errors():
            flat = self._script(_CLAIM)(
                keys=[self._key("webhooks-due")],
                args=[self._key_prefix, limit, lease_s, claimant],
            )
        values = [text(value) for value in flat]
        return [
            WebhookDelivery(
                job_id=values[i],
                id=values[i + 1],
                url=values[i + 2],
                owner=values[i + 3],
                attempts=int(values[i + 4]),
                claim=values[i + 5],
            )
            for i in range(0, len(values), 6)
        ]

    def complete_webhook_delivery(
        self, delivery: WebhookDelivery, state: str, error: str | None, retry_in_s: float = 0.0
    ) -> bool:
        """Record a try of a claimed delivery: DELIVERED, FAILED (given up), or PENDING (try
        again in `retry_in_s`). False when the claim was lost (another dispatcher has it)."""
        with self._errors():
            done = self._script(_COMPLETE)(
                keys=[self._key("webhook", delivery.job_id), self._key("webhooks-due")],
                args=[
                    delivery.job_id,
                    delivery.claim or "",
                    state,
                    error or "",
                    retry_in_s,
                    utc_now(),
                ],
            )
        return int(done) == 1

    def webhook_delivery(self, job_id: str) -> WebhookDelivery | None:
        """The job's delivery as recorded, or None when the job has no webhook."""
        with self._errors():
            fields: dict[Any, Any] = self._client.hgetall(self._key("webhook", job_id))
        if not fields:
            return None
        values = {text(name): text(value) for name, value in fields.items()}
        return WebhookDelivery(
            id=values["id"],
            job_id=values["job_id"],
            url=values["url"],
            owner=values["owner"],
            state=values["state"],
            attempts=int(values.get("attempts", "0")),
            last_error=values.get("last_error") or None,
            claim=values.get("claim") or None,
        )
