"""DALLE_FARM_REDIS_URL: one Redis, or a Redis that Sentinel watches and fails over.

    redis://[:password@]host:6379/0                      one Redis (rediss:// for TLS)
    redis+sentinel://[:password@]host1:26379,host2:26379/mymaster
                                                         ask these sentinels which Redis is the
                                                         master of `mymaster` now

With sentinels, every part of the farm follows a failover with its client library's own
support, given the same sentinels and service name:

- the job store: redis-py's `Sentinel(...).master_for(name)`, whose connections ask the
  sentinels again for the master whenever a connection fails or reaches a replica;
- the Celery queue: kombu's `sentinel://` transport with `master_name`;
- the request rate counter: limits' `redis+sentinel://` storage (the same URL).

The password, if any, is the Redis master's and the sentinels' alike (as `requirepass` and the
sentinels' `requirepass` are usually set together). The database is 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import redis
from redis.sentinel import Sentinel

SENTINEL_SCHEME = "redis+sentinel"
DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelTarget:
    """A `redis+sentinel://` URL, read."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    password: str | None = None


def is_sentinel_url(url: str) -> bool:
    return url.lower().startswith(SENTINEL_SCHEME + "://")


def parse_sentinel_url(url: str) -> SentinelTarget:
    """ValueError saying what is wrong with a `redis+sentinel://` URL."""
    parts = urlsplit(url)
    service = parts.path.strip("/")
    hosts = parts.netloc.rpartition("@")[2]
    if not service or "/" in service:
        raise ValueError(
            f"a {SENTINEL_SCHEME}:// URL ends with the master's service name, as in "
            f"{SENTINEL_SCHEME}://host1:26379,host2:26379/mymaster"
        )
    sentinels = []
    for host in filter(None, hosts.split(",")):
        name, _, port = host.rpartition(":") if ":" in host else (host, "", "")
        if not name or (port and not port.isdigit()):
            raise ValueError(f"a sentinel must be host or host:port, got {host!r}")
        sentinels.append((name.strip("[]"), int(port) if port else DEFAULT_SENTINEL_PORT))
    if not sentinels:
        raise ValueError(f"a {SENTINEL_SCHEME}:// URL names at least one sentinel host")
    password = unquote(parts.password) if parts.password else None
    return SentinelTarget(tuple(sentinels), service, password)


def redis_client(url: str, **options: Any) -> redis.Redis:
    """A client of the Redis `url` names (its master, through the sentinels, for
    `redis+sentinel://`); `options` go to redis-py (decode_responses, timeouts)."""
    if not is_sentinel_url(url):
        return redis.Redis.from_url(url, **options)
    target = parse_sentinel_url(url)
    auth = {"password": target.password} if target.password else {}
    timeouts = {
        name: options[name]
        for name in ("socket_timeout", "socket_connect_timeout")
        if name in options
    }
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs={**auth, **timeouts}, **auth)
    client: redis.Redis = sentinel.master_for(target.service, **options)
    return client


def celery_broker(url: str) -> tuple[str, dict[str, Any]]:
    """Celery's broker URL and the transport options it needs for `url`."""
    if not is_sentinel_url(url):
        return url, {}
    target = parse_sentinel_url(url)
    auth = f":{quote(target.password, safe='')}@" if target.password else ""
    broker = ";".join(f"sentinel://{auth}{host}:{port}/0" for host, port in target.sentinels)
    options: dict[str, Any] = {"master_name": target.service}
    if target.password:
        options["sentinel_kwargs"] = {"password": target.password}
    return broker, options
