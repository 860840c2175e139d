"""Per-key limits at the API (core/limits.py says what they are): the request rate, counted
with the `limits` library (the rate-limiting core of Flask-Limiter), and the 429 answers.

    limiter = RequestLimiter.from_settings(settings)
    enforce(blueprint, limiter, settings)   after require_owner: each request counts against
                                            its key's rate; over it, 429 with Retry-After

The counts live in Redis when the farm has one (DALLE_FARM_REDIS_URL), so every API process
counts against the same window and a restarted process forgets nothing; the embedded farm, one
process, counts in memory. The window moves (a request counts for exactly one window length
after it was made), so a key never gets twice its rate across a window's edge.

If the counter cannot be reached, requests are let through and a warning is logged: the rate
is a protection, not a reason to fail requests the farm could serve. The job limit is the
store's (checked when a job is created; see api/routes.py) and never fails open.
"""

from __future__ import annotations

import logging
import math
import time
from http import HTTPStatus

from flask import Blueprint, g
from limits import (
    RateLimitItem,
    RateLimitItemPerHour,
    RateLimitItemPerMinute,
    RateLimitItemPerSecond,
)
from limits.storage import MemoryStorage, RedisSentinelStorage, RedisStorage, Storage
from limits.strategies import MovingWindowRateLimiter

from api.auth import require_owner
from api.problems import Problem
from core.limits import KeyLimits, Rate, limits_for, parse_rate
from core.redis_url import is_sentinel_url
from core.settings import Settings
from core.store import JobStore

log = logging.getLogger(__name__)

_ITEMS = {"s": RateLimitItemPerSecond, "m": RateLimitItemPerMinute, "h": RateLimitItemPerHour}
# Keys in the counter's store: {prefix}/... (the library adds the rest).
KEY_PREFIX = "dalle-farm-limits"


class RequestLimiter:
    """Counts each key's requests in a moving window; `hit` answers whether one more fits."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._limiter = MovingWindowRateLimiter(storage)

    @classmethod
    def from_settings(cls, settings: Settings) -> RequestLimiter:
        url = settings.redis_url
        if url is None:
            return cls(MemoryStorage())
        if is_sentinel_url(url):  # the same URL form as limits' own (core/redis_url.py)
            return cls(RedisSentinelStorage(url, use_replicas=False, key_prefix=KEY_PREFIX))
        return cls(RedisStorage(url, key_prefix=KEY_PREFIX))

    def hit(self, owner: str, rate: Rate) -> float | None:
        """Count one request of `owner`; None if it fits in `rate`, else the seconds until
        one more would."""
        item = _item(rate)
        try:
            if self._limiter.hit(item, owner):
                return None
            reset_at, _ = self._limiter.get_window_stats(item, owner)
        except Exception as error:  # the counter's store is down: let the request through
            log.warning("the request rate of %s could not be counted: %s", owner, error)
            return None
        return max(reset_at - time.time(), 0.0)


def _item(rate: Rate) -> RateLimitItem:
    return _ITEMS[rate.unit](rate.amount)


def key_limits(settings: Settings) -> KeyLimits:
    """The limits that hold for this request's key (g.key, set by api.auth; no key in the
    embedded farm on loopback: the farm's)."""
    key = g.get("key")
    return limits_for(
        None if key is None else key.max_jobs,
        None if key is None else key.rate,
        settings.key_max_jobs,
        parse_rate(settings.key_rate),
    )


def v1_blueprint(
    name: str,
    settings: Settings,
    store: JobStore,
    anonymous_owner: str | None,
    limiter: RequestLimiter,
) -> Blueprint:
    """A blueprint under /v1 whose every request is authenticated (api.auth) and then counted
    against its key's rate."""
    blueprint = Blueprint(name, __name__, url_prefix="/v1")
    require_owner(blueprint, store, anonymous_owner)
    enforce(blueprint, limiter, settings)
    return blueprint


def enforce(blueprint: Blueprint, limiter: RequestLimiter, settings: Settings) -> None:
    """Count every request to `blueprint` against its key's rate (after require_owner)."""

    @blueprint.before_request
    def count_request() -> None:
        limits = key_limits(settings)
        if limits.rate is None:
            return
        wait_s = limiter.hit(g.owner, limits.rate)
        if wait_s is not None:
            raise rate_limited(limits, wait_s)


def rate_limited(limits: KeyLimits, wait_s: float) -> Problem:
    assert limits.rate is not None
    whose = "this API key's own" if limits.own_rate else "the farm's per-key"
    retry_after = max(1, math.ceil(wait_s))
    return Problem(
        HTTPStatus.TOO_MANY_REQUESTS,
        f"too many requests: {whose} rate limit is {limits.rate.describe()} "
        f"({'the key' if limits.own_rate else 'DALLE_FARM_KEY_RATE'}); retry in "
        f"{retry_after} s, or ask the farm's operator for a higher rate",
        slug="rate-limited",
        headers={"Retry-After": str(retry_after)},
    )


def too_many_jobs(limits: KeyLimits, active: int) -> Problem:
    """The 429 for a submit past the key's job limit."""
    whose = "this API key's own" if limits.own_max_jobs else "the farm's per-key"
    source = "the key" if limits.own_max_jobs else "DALLE_FARM_KEY_MAX_JOBS"
    return Problem(
        HTTPStatus.TOO_MANY_REQUESTS,
        f"too many jobs: this API key has {active} jobs queued or running, and {whose} limit "
        f"is {limits.max_jobs} ({source}); submit again when one has finished, or cancel one",
        slug="too-many-jobs",
        headers={"Retry-After": str(JOBS_RETRY_AFTER_S)},
    )


# What a 429 for the job limit suggests: about how soon a job may have finished.
JOBS_RETRY_AFTER_S = 5
