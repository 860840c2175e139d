"""Webhooks, the pure part: URL and address checks against SSRF, signing, backoff.

A job submitted with `webhook_url` is POSTed to that URL once it reaches a final state
(worker/webhooks.py sends it; the stores keep the pending deliveries). This module decides
which URLs may be called and how a delivery is signed:

    check_url_syntax(url)          ValueError unless http(s)://host[:port]/… without credentials
    resolve_url(url, allow)        the (host, port, addresses) to connect to; WebhookRefused when
                                   any address is loopback, private, link-local, multicast,
                                   reserved, unspecified or a cloud metadata address (IPv4 and
                                   IPv6, IPv4-mapped and other embedded IPv4 included), unless
                                   the operator's allow-list (DALLE_FARM_WEBHOOK_ALLOW) has it
    sign(secret, body, timestamp)  the X-Dalle-Farm-Signature value, "t=<unix>,v1=<hex>", an
                                   HMAC-SHA256 of f"{timestamp}.".encode() + body
    verify(secret, body, header)   what a receiver does (README "Webhooks")

The sender resolves a name once, checks every address, and connects to a checked address
itself, so a name that resolves elsewhere a moment later (DNS rebinding) cannot reach a refused
address. Stdlib only.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import random
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

URL_MAX_CHARS = 2048
SIGNATURE_HEADER = "X-Dalle-Farm-Signature"
DELIVERY_HEADER = "X-Dalle-Farm-Delivery"
EVENT_HEADER = "X-Dalle-Farm-Event"
SECRET_PREFIX = "whsec_"
# A receiver refuses a signature older (or newer) than this: a replayed delivery is stale.
TOLERANCE_S = 300
# Backoff: the first retry after backoff_s, doubling, at most MAX_BACKOFF_S, ±10 % jitter.
MAX_BACKOFF_S = 3600.0
# Addresses that cloud metadata services answer on, refused even where the general rules
# would not (all are non-global anyway today; listed so that it stays true).
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)
# IPv6 prefixes that carry an IPv4 address in their last 32 bits (NAT64).
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_HOST_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


class WebhookRefused(ValueError):
    """The URL may not be called; the message says why and what to change."""


@dataclass(frozen=True)
class AllowList:
    """The operator's exceptions (DALLE_FARM_WEBHOOK_ALLOW): host names and networks."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> AllowList:
        """ "hooks.internal, 10.0.0.0/8, 127.0.0.1" → AllowList; ValueError on a bad entry."""
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for entry in (text or "").split(","):
            entry = entry.strip()
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            host = entry.lower().rstrip(".")
            if not all(_HOST_LABEL.match(label) for label in host.split(".")):
                raise ValueError(f"{entry!r} is neither a host name nor an address or CIDR")
            hosts.add(host)
        return cls(frozenset(hosts), tuple(networks))

    def allows(self, host: str, address: IPAddress) -> bool:
        return host in self.hosts or any(address in network for network in self.networks)


# No exceptions: only public addresses.
NO_EXCEPTIONS = AllowList()


def new_secret() -> str:
    """A webhook signing secret: "whsec_" and 32 random bytes, base64url."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def check_url_syntax(url: object) -> str:
    """`url` if it is an http or https URL that a delivery could be made to, by its shape
    alone; ValueError saying what is wrong otherwise."""
    if not isinstance(url, str):
        raise ValueError("webhook_url must be a string")
    if not url or len(url) > URL_MAX_CHARS:
        raise ValueError(f"webhook_url must be 1 to {URL_MAX_CHARS} characters")
    if not url.isascii() or any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        raise ValueError(
            "webhook_url must be ASCII without spaces or control characters (percent-encode "
            "the rest; write an international domain name in its xn-- form)"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise ValueError(f"webhook_url is not a valid URL: {error}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(f"webhook_url must be http:// or https://, got {parts.scheme or 'none'!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            "webhook_url must not hold credentials (user:password@); verify deliveries by "
            "their signature instead"
        )
    if not parts.hostname:
        raise ValueError("webhook_url has no host")
    if port == 0:
        raise ValueError("webhook_url's port must be from 1 to 65535")
    if parts.fragment:
        raise ValueError("webhook_url must not have a #fragment (it is never sent)")
    host = parts.hostname
    if not _is_ip_literal(host) and not all(
        _HOST_LABEL.match(label) for label in host.rstrip(".").split(".")
    ):
        raise ValueError(f"webhook_url's host {host!r} is not a valid host name")
    return url


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def refusal(address: IPAddress) -> str | None:
    """Why a delivery may not connect to `address`, or None when it may."""
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        reason = refusal(embedded)
        return None if reason is None else f"{reason} (as {embedded} inside an IPv6 address)"
    for reason, flag in (
        ("a loopback address", address.is_loopback),
        ("an unspecified address", address.is_unspecified),
        ("a link-local address", address.is_link_local),
        ("a multicast address", address.is_multicast),
        ("a private address", address.is_private),
        ("a reserved address", address.is_reserved),
    ):
        if flag:
            return reason
    if not address.is_global:
        return "not a public address"
    return None


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


Resolver = Callable[[str, int], Iterable[str]]


# The longest a webhook host's lookup may take: getaddrinfo has no timeout of its own, and a
# slow resolver must not hold a submit (or a delivery thread) for its own retries' length.
DNS_TIMEOUT_S = 5.0
# Lookups run on these threads, so that a caller can stop waiting; one that hangs holds a
# thread until the system resolver gives up, and at most this many hang at once.
_LOOKUPS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="webhook-dns")


def system_resolver(host: str, port: int, timeout_s: float = DNS_TIMEOUT_S) -> list[str]:
    """Every address `host` resolves to (getaddrinfo), as text; OSError if the lookup fails
    or takes longer than `timeout_s`."""
    lookup = _LOOKUPS.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        infos = lookup.result(timeout=timeout_s)
    except FutureTimeout:
        lookup.cancel()
        raise OSError(f"no answer from DNS within {timeout_s:g} s") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class Target:
    """Where a delivery goes: the URL's parts, and the checked addresses to connect to."""

    scheme: str
    host: str  # as in the URL: the Host header, and the TLS name
    port: int
    path: str  # path and query, at least "/"
    addresses: tuple[str, ...]


def resolve_url(
    url: str, allow: AllowList = NO_EXCEPTIONS, resolver: Resolver = system_resolver
) -> Target:
    """Check `url`, resolve its host once and check every address; WebhookRefused (a
    ValueError) saying why when it may not be called."""
    try:
        check_url_syntax(url)
    except ValueError as error:
        raise WebhookRefused(str(error)) from None
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").rstrip(".")  # urlsplit lowercases it
    port = parts.port or (443 if scheme == "https" else 80)
    try:
        found = [ipaddress.ip_address(a.split("%", 1)[0]) for a in resolver(host, port)]
    except (OSError, UnicodeError, ValueError) as error:
        raise WebhookRefused(
            f"webhook_url's host {host!r} cannot be resolved ({error}); use a name that "
            "resolves to a public address"
        ) from None
    if not found:
        raise WebhookRefused(f"webhook_url's host {host!r} resolves to no address")
    for address in found:
        reason = refusal(address)
        if reason is not None and not allow.allows(host, address):
            raise WebhookRefused(
                f"webhook_url's host {host!r} resolves to {address}, {reason}; webhooks only "
                "go to public addresses (the farm's operator can allow hosts or networks with "
                "DALLE_FARM_WEBHOOK_ALLOW)"
            )
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(scheme, host, port, path, tuple(str(a) for a in found))


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The signature header's value: "t=<timestamp>,v1=<hex HMAC-SHA256>"."""
    mac = hmac.new(secret.encode("utf8"), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(
    secret: str,
    body: bytes,
    header: str,
    *,
    now: float | None = None,
    tolerance_s: int = TOLERANCE_S,
) -> bool:
    """Whether `header` is a valid signature of `body` made within `tolerance_s` of `now`."""
    fields: dict[str, list[str]] = {}
    for item in header.split(","):
        name, _, value = item.strip().partition("=")
        fields.setdefault(name, []).append(value)
    try:
        timestamp = int(fields["t"][0])
    except (KeyError, ValueError):
        return False
    now = time.time() if now is None else now
    if abs(now - timestamp) > tolerance_s:
        return False
    expected = sign(secret, body, timestamp).split("v1=", 1)[1]
    return any(hmac.compare_digest(expected, given) for given in fields.get("v1", []))


def backoff_s(attempts: int, base_s: float, rng: random.Random | None = None) -> float:
    """Seconds before the next try after `attempts` failed ones: base_s doubling, capped."""
    delay = min(MAX_BACKOFF_S, base_s * 2 ** max(0, attempts - 1))
    return delay * (rng or random).uniform(0.9, 1.1)


def is_retryable_status(status: int) -> bool:
    """A 5xx, 408 or 429 is tried again; any other answer under 200 or over 299 is final."""
    return status >= 500 or status in (408, 429)


# -- the outbox's records (core/store_*_webhooks.py keep them) -------------------------------

# A delivery registered for a job that is not finished yet is looked at again after this long:
# the safety net behind the stores' "due now" mark when a job finishes.
WAITING_RECHECK_S = 30.0


class DeliveryState:
    PENDING = "pending"  # the job is not finished, or the delivery waits for its next try
    DELIVERED = "delivered"  # the receiver answered 2xx
    FAILED = "failed"  # given up: a final answer (4xx), too many tries, or the job is gone


@dataclass(frozen=True)
class WebhookDelivery:
    """One job's delivery as the outbox holds it. `claim` is set while a dispatcher sends it."""

    id: str  # the X-Dalle-Farm-Delivery header; the same on every try
    job_id: str
    url: str
    owner: str
    state: str = DeliveryState.PENDING
    attempts: int = 0
    last_error: str | None = None
    claim: str | None = None


def new_delivery_id() -> str:
    return "whd_" + secrets.token_hex(12)
