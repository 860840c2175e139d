"""What RedisJobStore's parts share: the connection, key names under a prefix, the Lua scripts
as loaded on the server, and Redis' failures as StoreUnavailable."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.commands.core import Script
from redis.retry import Retry

from core.redis_url import redis_client
from core.store import StoreUnavailable

CONNECT_TIMEOUT_S = 5.0
SOCKET_TIMEOUT_S = 10.0
HEALTH_CHECK_INTERVAL_S = 15
# How long a new job waits for its replicas' confirmation (Redis WAIT) before the API gives up.
CONFIRM_TIMEOUT_MS = 2000
# Errors Redis answers when it is up but cannot serve: loading, read-only replica, out of memory.
_OUTAGE_REPLIES = ("LOADING", "READONLY", "MASTERDOWN", "MISCONF", "OOM", "NOREPLICAS")


class RedisBackend:
    """A connection to the farm's Redis and the key names under `prefix`.

    `url_or_client`: a redis:// or redis+sentinel:// URL (the backend opens and closes its own
    connections) or a redis.Redis the caller owns (and closes). `confirm_replicas`: how many
    replicas must hold a new job before create_job returns (Settings.redis_confirm_replicas).
    """

    def __init__(
        self,
        url_or_client: str | redis.Redis,
        prefix: str = "dalle-farm",
        *,
        confirm_replicas: int = 0,
    ) -> None:
        self.confirm_replicas = confirm_replicas
        if isinstance(url_or_client, str):
            self.url = redact_url(url_or_client)
            # A redis+sentinel:// URL: the master the sentinels name, found again after a
            # failover (core/redis_url.py).
            self._client: redis.Redis = redis_client(
                url_or_client,
                decode_responses=True,
                socket_connect_timeout=CONNECT_TIMEOUT_S,
                socket_timeout=SOCKET_TIMEOUT_S,
                health_check_interval=HEALTH_CHECK_INTERVAL_S,
                # Retry only failures to reach Redis, not timeouts, after which a script may
                # have run: run twice, a compare-and-set would report its own success as refused.
                retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2, (redis.ConnectionError,)),
            )
            self._owns_client = True
        else:
            self.url = _client_url(url_or_client)
            self._client = url_or_client
            self._owns_client = False
        self._prefix = prefix
        self._scripts: dict[str, Script] = {}

    def _key(self, *parts: str) -> str:
        return ":".join((self._prefix, *parts))

    @property
    def _key_prefix(self) -> str:
        """The prefix scripts build key names from: "dalle-farm:"."""
        return self._key("")

    def _script(self, source: str) -> Script:
        """The script, registered once (redis-py loads it again after a Redis restart)."""
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self._client.register_script(source)
        return script

    def _run_confirmed(self, script: Script, keys: list[str], args: list[Any]) -> tuple[Any, bool]:
        """Run `script`, then WAIT on the same connection until self.confirm_replicas replicas
        hold what it wrote: (its reply, whether they did within CONFIRM_TIMEOUT_MS). A write
        no replica holds yet is lost if Sentinel promotes a replica now: the old master takes
        writes until it is demoted, then drops them. Call inside self._errors()."""
        if not self.confirm_replicas:
            return script(keys=keys, args=args), True
        with self._client.pipeline(transaction=False) as pipe:
            script(keys=keys, args=args, client=pipe)
            pipe.execute_command("WAIT", self.confirm_replicas, CONFIRM_TIMEOUT_MS)
            reply, replicas = pipe.execute(raise_on_error=False)
        if isinstance(reply, Exception):
            raise reply
        # WAIT fails too when the master is being demoted (its blocked clients are unblocked).
        confirmed = not isinstance(replicas, Exception) and int(replicas) >= self.confirm_replicas
        return reply, confirmed

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as err:
            raise StoreUnavailable(
                f"Redis at {self.url} cannot be reached ({err}); check that it is running and "
                "that DALLE_FARM_REDIS_URL points to it"
            ) from err
        except redis.ResponseError as err:
            if str(err).startswith(_OUTAGE_REPLIES):
                raise StoreUnavailable(f"Redis at {self.url} cannot serve requests: {err}") from err
            raise

    def check(self) -> None:
        """Raise StoreUnavailable unless Redis answers."""
        with self._errors():
            self._client.ping()

    def close(self) -> None:
        if self._owns_client:
            self._client.close()


def redact_url(url: str) -> str:
    """The URL without its password, fit for error messages and logs."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hosts}"))


def _client_url(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    host, port = kwargs.get("host", "localhost"), kwargs.get("port", 6379)
    return f"redis://{host}:{port}/{kwargs.get('db', 0)}"


def text(value: Any) -> str:
    """A reply as text, from a client with or without decode_responses."""
    return value.decode("utf8") if isinstance(value, bytes) else str(value)
