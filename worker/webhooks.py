"""Webhook deliveries: a dispatcher thread per worker process that POSTs finished jobs' JSON to
their webhook_url, off the jobs' path.

    dispatcher = WebhookDispatcher(store, storage, settings, name="gpu0@node-a").start()
    ...
    dispatcher.stop()

The dispatcher claims due deliveries from the store's outbox (core/store_*_webhooks.py: a
delivery is due once its job is final) and sends each on its own thread of a small pool
(`threads`), so a slow or dead receiver holds one delivery's thread and nothing else: never a
job, never another delivery while a thread is free. Each send:

- builds the job's JSON as GET /v1/jobs/{id} answers it (core/job_json.py), with fresh URLs;
- resolves the URL's host once, refuses it if any address is not public (core/webhooks.py,
  unless DALLE_FARM_WEBHOOK_ALLOW allows it) and connects to a checked address itself, with
  the name in the Host header and as the TLS name (no DNS rebinding; no proxies);
- signs `f"{t}.".encode() + body` with the owner's secret (X-Dalle-Farm-Signature:
  t=<unix>,v1=<hex>) and sends the delivery's id (X-Dalle-Farm-Delivery, the same on every try);
- ends within DALLE_FARM_WEBHOOK_TIMEOUT_S, connect to answer: a watchdog closes a connection
  that is still open then, however slowly the receiver trickles bytes.

A 2xx is delivered; a 5xx, 408, 429, a timeout or a connection error is tried again after
DALLE_FARM_WEBHOOK_BACKOFF_S doubling (at most an hour apart), until
DALLE_FARM_WEBHOOK_MAX_ATTEMPTS tries; any other answer, or a refused address, is final. What
happened is recorded in the store (state, attempts, last_error). Delivery is at least once: a
dispatcher that dies mid-send leaves its claim to expire, and the delivery is sent again.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from core.job_json import job_json
from core.settings import Settings
from core.storage import Storage
from core.store import JobStore, StoreError
from core.webhooks import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    NO_EXCEPTIONS,
    SIGNATURE_HEADER,
    AllowList,
    DeliveryState,
    Resolver,
    Target,
    WebhookDelivery,
    WebhookRefused,
    backoff_s,
    is_retryable_status,
    refusal,
    resolve_url,
    sign,
    system_resolver,
)

log = logging.getLogger(__name__)

POLL_S = 0.5
DEFAULT_THREADS = 4
# Of a receiver's answer only this much is read: its status is what counts.
MAX_ANSWER_BYTES = 64 * 1024
USER_AGENT = "dalle-farm-webhooks/1"


class DeliveryError(Exception):
    """A try that may succeed later: no answer, a timeout, or a 5xx/408/429 (`status`)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _PinnedConnection(http.client.HTTPConnection):
    """HTTP(S) to one checked address, with the URL's name as Host and TLS server name."""

    def __init__(
        self,
        target: Target,
        address: str,
        timeout_s: float,
        check: Callable[[str], None],
        tls: ssl.SSLContext | None,
    ) -> None:
        super().__init__(target.host, target.port, timeout=timeout_s)
        self._address = address
        self._check = check
        self._tls = tls

    def connect(self) -> None:
        self._check(self._address)  # the address connected to is the one checked
        sock = socket.create_connection((self._address, self.port), self.timeout)
        if self._tls is not None:
            sock = self._tls.wrap_socket(sock, server_hostname=self.host)
        self.sock = sock


def post(
    target: Target,
    body: bytes,
    headers: dict[str, str],
    timeout_s: float,
    allow: AllowList = NO_EXCEPTIONS,
) -> int:
    """POST `body` to `target` (one of its checked addresses); the answer's status.

    Raises DeliveryError when no answer came within `timeout_s` in all, WebhookRefused when
    an address may not be called.
    """

    def check(address: str) -> None:
        ip = ipaddress.ip_address(address)
        reason = refusal(ip)
        if reason is not None and not allow.allows(target.host, ip):
            raise WebhookRefused(f"{target.host} resolves to {address}, {reason}")

    deadline = time.monotonic() + timeout_s
    tls = ssl.create_default_context() if target.scheme == "https" else None
    errors: list[str] = []
    for address in target.addresses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        connection = _PinnedConnection(target, address, remaining, check, tls)
        try:
            connection.connect()
        except (OSError, ssl.SSLError) as error:
            errors.append(f"{address}: {error}")
            connection.close()
            continue
        return _exchange(connection, target, body, headers, deadline, timeout_s)
    raise DeliveryError(f"could not connect to {target.host}: {'; '.join(errors) or 'timed out'}")


def _exchange(
    connection: _PinnedConnection,
    target: Target,
    body: bytes,
    headers: dict[str, str],
    deadline: float,
    timeout_s: float,
) -> int:
    timed_out = threading.Event()

    def abort() -> None:
        timed_out.set()
        try:
            if connection.sock is not None:
                connection.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), abort)
    watchdog.daemon = True
    watchdog.start()
    try:
        connection.request("POST", target.path, body=body, headers=headers)
        response = connection.getresponse()
        response.read(MAX_ANSWER_BYTES)
        return response.status
    except (OSError, http.client.HTTPException) as error:
        if timed_out.is_set() or isinstance(error, TimeoutError):
            raise DeliveryError(f"no answer within {timeout_s:g} s") from None
        raise DeliveryError(f"the connection failed: {error!r}") from None
    finally:
        watchdog.cancel()
        connection.close()


class WebhookDispatcher:
    """Claims due deliveries and sends them on `threads` threads, until stop()."""

    def __init__(
        self,
        store: JobStore,
        storage: Storage,
        settings: Settings,
        *,
        name: str,
        threads: int = DEFAULT_THREADS,
        poll_s: float = POLL_S,
        resolver: Resolver = system_resolver,
    ) -> None:
        self.store = store
        self.storage = storage
        self.name = name
        self.threads = threads
        self.poll_s = poll_s
        self.resolver = resolver
        self.timeout_s = float(settings.webhook_timeout_s)
        self.max_attempts = settings.webhook_max_attempts
        self.backoff_s = float(settings.webhook_backoff_s)
        self.allow = AllowList.parse(settings.webhook_allow)
        # A claim outlives the longest send (resolving included) before another may take it.
        self.lease_s = 2 * self.timeout_s + 30
        self._stop = threading.Event()
        self._in_flight = threading.Semaphore(threads)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="webhook")
        self._thread = threading.Thread(target=self._run, name="webhook-dispatcher", daemon=True)

    def start(self) -> WebhookDispatcher:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop claiming; deliveries in flight finish on their own (bounded by their timeout),
        and a claim left unfinished expires and is sent again by some dispatcher."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                claimed = self.run_once()
            except StoreError as error:
                log.warning("webhooks: cannot read the outbox: %s", error)
                claimed = 0
            except Exception:  # a bug must not end deliveries for good
                log.exception("webhooks: the dispatcher failed")
                claimed = 0
            if not claimed:
                self._stop.wait(self.poll_s)

    def run_once(self) -> int:
        """Claim as many due deliveries as there are free threads and start them; how many."""
        free = 0
        while self._in_flight.acquire(blocking=False):
            free += 1
        if not free:
            return 0
        try:
            claimed = self.store.claim_webhook_deliveries(self.name, free, self.lease_s)
        except BaseException:
            for _ in range(free):
                self._in_flight.release()
            raise
        for _ in range(free - len(claimed)):
            self._in_flight.release()
        for delivery in claimed:
            self._pool.submit(self._deliver_and_release, delivery)
        return len(claimed)

    def _deliver_and_release(self, delivery: WebhookDelivery) -> None:
        try:
            self.deliver(delivery)
        except StoreError as error:  # the claim expires; the delivery is tried again then
            log.warning("webhooks: delivery %s: %s", delivery.id, error)
        except Exception:
            log.exception("webhooks: delivery %s failed unexpectedly", delivery.id)
        finally:
            self._in_flight.release()

    def deliver(self, delivery: WebhookDelivery) -> str:
        """One try of a claimed delivery, recorded in the store; the state it is left in."""
        record = self.store.get_job(delivery.job_id)
        if record is None:
            return self._complete(delivery, DeliveryState.FAILED, "the job is gone")
        body = json.dumps(job_json(record, self.storage), separators=(",", ":")).encode()
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            DELIVERY_HEADER: delivery.id,
            EVENT_HEADER: f"job.{record.status.value}",
            SIGNATURE_HEADER: sign(self.store.webhook_secret(delivery.owner), body, timestamp),
        }
        try:
            target = resolve_url(delivery.url, self.allow, self.resolver)
            status = post(target, body, headers, self.timeout_s, self.allow)
        except WebhookRefused as error:
            return self._complete(delivery, DeliveryState.FAILED, f"refused: {error}")
        except DeliveryError as error:
            return self._retry(delivery, str(error))
        if 200 <= status < 300:
            return self._complete(delivery, DeliveryState.DELIVERED, None)
        if is_retryable_status(status):
            return self._retry(delivery, f"the receiver answered {status}")
        return self._complete(
            delivery, DeliveryState.FAILED, f"the receiver answered {status}, which is final"
        )

    def _retry(self, delivery: WebhookDelivery, error: str) -> str:
        tries = delivery.attempts + 1
        if tries >= self.max_attempts:
            return self._complete(
                delivery, DeliveryState.FAILED, f"gave up after {tries} tries; last: {error}"
            )
        delay = backoff_s(tries, self.backoff_s)
        log.info(
            "webhooks: delivery %s try %d: %s; again in %.0f s", delivery.id, tries, error, delay
        )
        return self._complete(delivery, DeliveryState.PENDING, error, delay)

    def _complete(
        self, delivery: WebhookDelivery, state: str, error: str | None, retry_in_s: float = 0.0
    ) -> str:
        if state == DeliveryState.FAILED:
            log.warning(
                "webhooks: delivery %s of job %s failed: %s", delivery.id, delivery.job_id, error
            )
        if not self.store.complete_webhook_delivery(delivery, state, error, retry_in_s):
            log.warning("webhooks: delivery %s was claimed by another dispatcher", delivery.id)
        return state
