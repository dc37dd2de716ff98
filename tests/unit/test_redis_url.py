"""`CALLERID_REDIS_URL` forms (`shared.redis_url.parse_redis_url`): what each good form means,
and the one-line error each bad form gets (naming the setting, never the password)."""

from __future__ import annotations

import logging

import pytest

from crm_resolver.ports import CacheMiss
from crm_resolver.redis_cache import RedisCache
from shared.node_sources import RedisHashSource, source_from_setting
from shared.nodes import ConfigError
from shared.redis_url import PlainRedis, RedisUrlError, SentinelRedis, parse_redis_url


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://:secret@redis.internal:6379/3",
        "rediss://redis.internal:6380/0?ssl_ca_certs=/etc/ca.pem",
        "redis://localhost",
        "unix:///run/redis/redis.sock?db=2",
    ],
)
def test_plain_urls_are_passed_to_redis_py_as_they_are(url: str) -> None:
    """One Redis: the URL itself, for redis-py's `from_url` (its query options included)."""
    assert parse_redis_url(url) == PlainRedis(url)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis+sentinel://10.0.0.1:26379,10.0.0.2:26380,10.0.0.3:26381/mymaster",
            SentinelRedis(
                (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("10.0.0.3", 26381)), "mymaster"
            ),
        ),
        (
            "redis+sentinel://:s%40cret@sentinel-a:26379/cache/2",
            SentinelRedis((("sentinel-a", 26379),), "cache", db=2, password="s@cret"),
        ),
        (
            "redis+sentinel://callerid:pw@[::1]:5000,sentinel-b/cache",
            SentinelRedis(
                (("::1", 5000), ("sentinel-b", 26379)),
                "cache",
                username="callerid",
                password="pw",
            ),
        ),
        (
            "REDIS+SENTINEL://s1:26379/cache/0",
            SentinelRedis((("s1", 26379),), "cache"),
        ),
        (
            "redis+sentinel://:pw@s1/cache?sentinel_password=s%26pw",
            SentinelRedis((("s1", 26379),), "cache", password="pw", sentinel_password="s&pw"),
        ),
        (
            "rediss+sentinel://s1:26379,s2:26379/cache?ssl_ca_certs=/etc/callerid/ca.pem",
            SentinelRedis(
                (("s1", 26379), ("s2", 26379)), "cache", tls=True, ca_file="/etc/callerid/ca.pem"
            ),
        ),
    ],
)
def test_sentinel_forms(url: str, expected: SentinelRedis) -> None:
    """Sentinels (port 26379 when left out, IPv6 in brackets), the service name, the db, the
    data nodes' password and user (percent-decoded), the sentinels' own password, TLS with an
    optional CA file."""
    assert parse_redis_url(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("localhost:6379", "is not a Redis URL: expected redis://, rediss://, unix://"),
        ("http://127.0.0.1:6379/0", "is not a Redis URL"),
        ("sentinel://s1:26379/cache", "is not a Redis URL"),
        ("redis://127.0.0.1:63x9/0", "the port must be a number 0-65535"),
        ("redis://127.0.0.1:6379/cache", "the path is the db number (e.g. /0), not 'cache'"),
        ("redis+sentinel:///cache", "name at least one sentinel as host:port"),
        ("redis+sentinel://s1:26379,,s2:26379/cache", "name at least one sentinel"),
        ("redis+sentinel://s1:26379", "the service name Sentinel monitors the primary by"),
        ("redis+sentinel://s1:26379/", "the service name Sentinel monitors the primary by"),
        ("redis+sentinel://s1:port/cache", "sentinel 's1:port': the port must be a number"),
        ("redis+sentinel://s1:0/cache", "sentinel 's1:0': the port must be a number 1-65535"),
        ("redis+sentinel://s1:70000/cache", "the port must be a number 1-65535"),
        ("redis+sentinel://:26379/cache", "sentinel ':26379' has no host"),
        ("redis+sentinel://[::1/cache", "write an IPv6 host as [::1]:26379"),
        ("redis+sentinel://s1/cache/x", "the db after the service name must be a number"),
        ("redis+sentinel://s1/cache/0/extra", "/service_name or /service_name/db, nothing more"),
        ("redis+sentinel://s1/cache/", "/service_name or /service_name/db, nothing more"),
        ("redis+sentinel://s1/my%20master", "service name 'my master': 1-128 characters"),
        ("redis+sentinel://secret@s1/cache", "write the password as ':password@'"),
        ("redis+sentinel://s1/cache?ssl_ca_certs=/ca.pem", "is for rediss+sentinel:// (TLS) only"),
        ("rediss+sentinel://s1/cache?db=2", "unknown option(s) db: the sentinel forms take only"),
        ("rediss+sentinel://s1/cache?ssl_ca_certs", "cannot read the query (name=value&...)"),
        ("redis+sentinel://s1/cache#x", "a '#' fragment means nothing here"),
    ],
)
def test_bad_urls_get_one_clear_line(url: str, message: str) -> None:
    """Each bad form: a RedisUrlError (a ConfigError: start-up reports it as one line) that
    starts with the setting's name and says what is wrong."""
    with pytest.raises(RedisUrlError) as caught:
        parse_redis_url(url)
    text = str(caught.value)
    assert text.startswith("CALLERID_REDIS_URL: ")
    assert message in text
    assert "\n" not in text
    assert isinstance(caught.value, ConfigError)


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://:hunter2-secret@s1:26379",
        "redis+sentinel://user:hunter2-secret@s1:bad/cache",
        "redis://:hunter2-secret@127.0.0.1:port/0",
        "http://:hunter2-secret@127.0.0.1/0",
        "redis+sentinel://s1/cache?sentinel_password=hunter2-secret&x=1",
    ],
)
def test_errors_never_show_the_password(url: str) -> None:
    with pytest.raises(RedisUrlError) as caught:
        parse_redis_url(url)
    assert "hunter2-secret" not in str(caught.value)
    assert "***" in str(caught.value)


def test_errors_name_the_setting_they_are_for() -> None:
    """The node source reads CALLERID_NODES with the same parser: its errors say so."""
    with pytest.raises(RedisUrlError, match=r"^CALLERID_NODES: "):
        parse_redis_url("redis+sentinel://s1:26379", setting="CALLERID_NODES")


async def test_no_password_in_what_a_failed_sentinel_lookup_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """redis-py writes the sentinel clients it asked into MasterNotFoundError, and the cache
    logs that message: the clients are shown by address alone, so neither the nodes' nor the
    sentinels' password appears (a port where nothing listens: refused at once)."""
    cache = RedisCache.from_url(
        "redis+sentinel://:node-secret@127.0.0.1:1,127.0.0.1:2/cache"
        "?sentinel_password=sentinel-secret",
        timeout=1.0,
        pepper="a-pepper-of-16-chars",
    )
    try:
        with caplog.at_level(logging.WARNING, logger="crm_resolver.redis_cache"):
            assert await cache.fetch("n", "12345") is CacheMiss.ERROR
    finally:
        await cache.close()
    text = caplog.text
    assert "No master found for 'cache'" in text
    assert "<sentinel 127.0.0.1:1>" in text
    assert "secret" not in text


def test_no_password_in_what_a_failed_node_source_read_says() -> None:
    """The same for the node source's synchronous client (its ConfigError is logged)."""
    source = source_from_setting(
        "redis+sentinel://:node-secret@127.0.0.1:1/oml?sentinel_password=sentinel-secret"
    )
    assert isinstance(source, RedisHashSource)
    try:
        with pytest.raises(ConfigError) as caught:
            source._read_blocking()
    finally:
        source._client.close()
    assert "No master found for 'oml'" in str(caught.value)
    assert "secret" not in str(caught.value)
