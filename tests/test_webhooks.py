"""core/webhooks.py: which URLs and addresses a webhook may reach, and the signature scheme."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import threading

import pytest

from core import webhooks
from core.webhooks import (
    AllowList,
    Resolver,
    WebhookRefused,
    backoff_s,
    check_url_syntax,
    is_retryable_status,
    refusal,
    resolve_url,
    sign,
    verify,
)


def resolver_to(*addresses: str) -> Resolver:
    def resolve(host: str, port: int) -> list[str]:
        return list(addresses)

    return resolve


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.8.9.10",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.100.100.200",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "fd00:ec2::254",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize(
    "address", ["93.184.215.14", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"]
)
def test_public_addresses_pass(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("ftp://example.com/x", "http:// or https://"),
        ("http://user:pw@example.com/", "credentials"),
        ("http://example.com/#frag", "fragment"),
        ("http:///path", "no host"),
        ("http://exa mple.com/", "ASCII without spaces"),
        ("http://bücher.example/", "xn--"),
        ("http://example.com:99999/", "Port out of range"),
        ("http://ex$ample.com/", "not a valid host name"),
        ("x" * 3000, "2048"),
    ],
)
def test_url_shape_errors_say_what_to_change(url: str, words: str) -> None:
    with pytest.raises(ValueError, match="webhook_url") as error:
        check_url_syntax(url)
    assert words in str(error.value)


def test_a_name_is_refused_if_any_address_is_not_public() -> None:
    url = "https://hooks.example.com/x?a=1"
    target = resolve_url(url, resolver=resolver_to("93.184.215.14"))
    assert (target.host, target.port, target.path) == ("hooks.example.com", 443, "/x?a=1")
    assert target.addresses == ("93.184.215.14",)
    with pytest.raises(WebhookRefused, match=r"10\.0\.0\.7, a private address.*WEBHOOK_ALLOW"):
        resolve_url(url, resolver=resolver_to("93.184.215.14", "10.0.0.7"))
    with pytest.raises(WebhookRefused, match="loopback"):
        resolve_url("http://127.0.0.1:8080/hook")
    with pytest.raises(WebhookRefused, match="IPv6"):
        resolve_url("http://[::ffff:127.0.0.1]/hook")
    with pytest.raises(WebhookRefused, match="cannot be resolved"):
        resolve_url("http://no-such-host.invalid/")


def test_the_allow_list_admits_hosts_and_networks() -> None:
    allow = AllowList.parse(" 127.0.0.1 , hooks.internal, 10.0.0.0/8,")
    assert resolve_url("http://127.0.0.1:9/x", allow).addresses == ("127.0.0.1",)
    internal = resolver_to("192.168.3.3")
    assert resolve_url("http://HOOKS.internal/", allow, internal).host == "hooks.internal"
    assert resolve_url("http://a.example/", allow, resolver_to("10.9.9.9")).port == 80
    with pytest.raises(WebhookRefused):
        resolve_url("http://a.example/", allow, resolver_to("192.168.3.3"))
    with pytest.raises(ValueError, match="neither"):
        AllowList.parse("not a host")


def test_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    body = b'{"id":"x","status":"succeeded"}'
    header = sign("whsec_abc", body, 1_700_000_000)
    expected = hmac.new(b"whsec_abc", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"
    assert verify("whsec_abc", body, header, now=1_700_000_100)
    assert not verify("whsec_abc", body + b" ", header, now=1_700_000_100)
    assert not verify("whsec_other", body, header, now=1_700_000_100)
    assert not verify("whsec_abc", body, header, now=1_700_000_000 + 301)  # a replay, late
    assert not verify("whsec_abc", body, "v1=" + expected, now=1_700_000_000)


def test_backoff_doubles_with_jitter_and_a_cap() -> None:
    assert 4.5 <= backoff_s(1, 5) <= 5.5
    assert 18 <= backoff_s(3, 5) <= 22
    assert backoff_s(40, 5) <= 3600 * 1.1
    assert [is_retryable_status(s) for s in (500, 503, 408, 429, 400, 404, 410, 301)] == [
        True,
        True,
        True,
        True,
        False,
        False,
        False,
        False,
    ]


def test_a_lookup_that_takes_too_long_is_refused_not_waited_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """getaddrinfo has no timeout of its own: a resolver that does not answer must not hold a
    submit for longer than DNS_TIMEOUT_S (here a stand-in getaddrinfo that never answers)."""
    answer = threading.Event()

    def silent(*args: object, **kwargs: object) -> object:
        answer.wait(10)
        raise OSError("gave up")

    monkeypatch.setattr(webhooks.socket, "getaddrinfo", silent)
    try:
        with pytest.raises(WebhookRefused, match=r"no answer from DNS within 0\.2 s"):
            resolve_url(
                "https://hooks.example.com/x",
                resolver=lambda host, port: webhooks.system_resolver(host, port, timeout_s=0.2),
            )
    finally:
        answer.set()


def test_the_system_resolver_resolves() -> None:
    assert "127.0.0.1" in webhooks.system_resolver("localhost", 80)
